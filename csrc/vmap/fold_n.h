#pragma once
// Kernels for ops whose tensors all share the layout [N, C, *spatial] or, without N,
// [C, *spatial], with K trailing dims fixed by the op (pooling, padding, im2col, ...): the vmap
// batch folds into N ([B, N, ...] -> [B*N, ...]) or, for logical tensors without N, becomes N;
// outputs have the same layout and unfold the same way. Unbatched tensors are expanded to the
// batch first, so every output is batched. Every tensor is made contiguous: some CPU kernels
// (adaptive_max_pool3d_backward's indices) index raw data as if it were dense, which reads the
// wrong elements of a permuted tensor and crashes on an expanded one.
#include "vmap/plumbing.h"

namespace ftl {
namespace fold_n {

template <class T>
decltype(auto) foldArg(const T& arg, int64_t lvl, int64_t B, bool fold) {
  if constexpr (detail::is_tensor_v<T>) {
    auto [v, bd] = unwrapAt(arg, lvl);
    Tensor t = materializeBdimFront(v, bd, B);
    return (fold ? t.flatten(0, 1) : t).contiguous();
  } else if constexpr (detail::is_opt_tensor_v<T>) {
    if (!arg.has_value() || !arg->defined()) return std::optional<Tensor>();
    auto [v, bd] = unwrapAt(*arg, lvl);
    Tensor t = materializeBdimFront(v, bd, B);
    return std::optional<Tensor>((fold ? t.flatten(0, 1) : t).contiguous());
  } else {
    return (const T&)arg;
  }
}

inline Tensor unfoldOut(Tensor t, int64_t B, bool fold, const Level& lvl) {
  if (!t.defined()) return t;
  if (fold) t = t.unflatten(0, {B, t.size(0) / B});
  return makeBatched(std::move(t), 0, lvl);
}

template <class Op, int64_t K, class Sig = typename Op::schema>
struct Kernel;
template <class Op, int64_t K, class Ret, class... Args>
struct Kernel<Op, K, Ret(Args...)> {
  static Ret fn(c10::DispatchKeySet ks, Args... args) {
    std::optional<Ret> done;
    const Level* top = detail::vmapPrologue<Op, Ret, Args...>(done, ks, args...);
    if (!top) return std::move(*done);
    const int64_t lvl = top->id, B = top->concreteBatchSize(Op::name);
    // The first argument (self or grad_output) tells whether the logical tensors have N.
    const at::Tensor& first = std::get<0>(std::forward_as_tuple(args...));
    const bool fold = first.dim() == K + 2;  // logical rank: BatchedTensors report it
    bool same_layout = true;                 // every tensor shares the layout (indices of max_unpool, ...)
    for (const at::Tensor* t : detail::logicalTensors(args...)) same_layout &= !t || t->dim() == first.dim();
    HandDownGuard guard;
    if ((first.dim() != K + 1 && !fold) || !same_layout) {
      // Not a layout the op takes: [B, ...] could pass for one (max_pool1d would pool a batch
      // of vectors as one [C, L] tensor). Per element, torch raises its own error.
      return detail::wrapAllAt0<Ret>(detail::runPerElement<Op, Ret>(lvl, B, args...), *top);
    }
    Ret r = Op::call(foldArg(args, lvl, B, fold)...);
    if constexpr (std::is_same_v<Ret, Tensor>) {
      return unfoldOut(std::move(r), B, fold, *top);
    } else {
      return std::apply([&](auto&&... ts) { return Ret(unfoldOut(std::move(ts), B, fold, *top)...); },
                        std::move(r));
    }
  }
};

}  // namespace fold_n

// registerFoldN<K, ops...>(m): each op's tensors are [N, C, *K dims] or [C, *K dims].
template <int64_t K, class... Ops>
void registerFoldN(torch::Library& m) {
  (m.impl(opName<Ops>().c_str(), TORCH_FN((fold_n::Kernel<Ops, K>::fn))), ...);
}

}  // namespace ftl
