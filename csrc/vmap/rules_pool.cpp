// Batching rules: pooling ops and their backward ops. Every tensor argument has the layout
// [N, C, *spatial] or, unbatched, [C, *spatial], with K spatial dims fixed by the op. The vmap
// batch folds into N ([B, N, ...] -> [B*N, ...]) or, for unbatched inputs, becomes N; outputs
// have the same layout and unfold the same way.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

template <class T>
decltype(auto) foldArg(const T& arg, int64_t lvl, int64_t B, bool fold) {
  if constexpr (detail::is_tensor_v<T>) {
    auto [v, bd] = unwrapAt(arg, lvl);
    Tensor t = materializeBdimFront(v, bd, B);
    return fold ? t.flatten(0, 1) : t;
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
struct PoolKernel;
template <class Op, int64_t K, class Ret, class... Args>
struct PoolKernel<Op, K, Ret(Args...)> {
  static Ret fn(Args... args) {
    std::optional<Ret> done;
    const Level* top = detail::vmapPrologue<Op, Ret, Args...>(done, args...);
    if (!top) return std::move(*done);
    const int64_t lvl = top->id, B = top->batch_size;
    // The first argument (self or grad_output) tells whether the logical tensors have N.
    const at::Tensor& first = std::get<0>(std::forward_as_tuple(args...));
    const bool fold = first.dim() == K + 2;  // logical rank: BatchedTensors report it
    HandDownGuard guard;
    Ret r = Op::call(foldArg(args, lvl, B, fold)...);
    if constexpr (std::is_same_v<Ret, Tensor>) {
      return unfoldOut(std::move(r), B, fold, *top);
    } else {
      return std::apply([&](auto&&... ts) { return Ret(unfoldOut(std::move(ts), B, fold, *top)...); },
                        std::move(r));
    }
  }
};

template <int64_t K, class... Ops>
void registerPool(torch::Library& m) {
  (m.impl(opName<Ops>().c_str(), TORCH_FN((PoolKernel<Ops, K>::fn))), ...);
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerPool<2, at::_ops::max_pool2d_with_indices, at::_ops::max_pool2d_with_indices_backward,
               at::_ops::avg_pool2d, at::_ops::avg_pool2d_backward, at::_ops::_adaptive_avg_pool2d,
               at::_ops::_adaptive_avg_pool2d_backward, at::_ops::adaptive_max_pool2d,
               at::_ops::adaptive_max_pool2d_backward>(m);
  registerPool<3, at::_ops::max_pool3d_with_indices, at::_ops::max_pool3d_with_indices_backward,
               at::_ops::avg_pool3d, at::_ops::avg_pool3d_backward, at::_ops::_adaptive_avg_pool3d,
               at::_ops::_adaptive_avg_pool3d_backward>(m);
}

}  // namespace ftl
