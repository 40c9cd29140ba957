// Batching rules: CPU scaled-dot-product attention, the op F.scaled_dot_product_attention and
// nn.MultiheadAttention reach on CPU for 4-D [N, H, L, E] inputs, and its backward.
// Folding the vmap batch into N ([B, N, ...] -> [B*N, ...]) is exact: attention is independent
// per leading index (row n of every output reads only row n of q, k, v, grad_out, out,
// logsumexp and of a per-row mask), and is_causal/scale act within a row. Unbatched tensors are
// expanded to the batch first. The fold needs every tensor to have the same logical N (the
// kernel does not check that key/value N matches the query's; folded, a mismatch would pair
// rows of different batch elements) and a mask the kernel takes ([L, S] or [1 or N, *, *, *], of the
// query's dtype). Anything else, dropout_p > 0 included (the CPU kernel rejects it: F.sdpa
// takes its math path for dropout, where the dropout op follows vmap's randomness), runs once
// per batch element, which is vmap's definition and raises torch's own error.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

using Fwd = at::_ops::_scaled_dot_product_flash_attention_for_cpu;
using Bwd = at::_ops::_scaled_dot_product_flash_attention_for_cpu_backward;
using OptTensor = std::optional<Tensor>;

// Logical tensors (wrappers report logical sizes) of the given ranks sharing one leading size.
bool sameLeading(std::initializer_list<std::pair<const Tensor*, int64_t>> ts) {
  std::optional<int64_t> n;
  for (auto [t, rank] : ts) {
    if (!t->defined() || t->dim() != rank || (n && t->size(0) != *n)) return false;
    n = t->size(0);
  }
  return true;
}

bool maskFolds(const OptTensor& mask, const Tensor& q) {
  if (!mask.has_value() || !mask->defined()) return true;
  const Tensor& m = *mask;
  if (m.scalar_type() != q.scalar_type()) return false;
  return m.dim() == 2 || (m.dim() == 4 && (m.size(0) == 1 || m.size(0) == q.size(0)));
}

Tensor fold(const Tensor& t, int64_t lvl, int64_t B) {
  auto [v, bd] = unwrapAt(t, lvl);
  return materializeBdimFront(v, bd, B).flatten(0, 1);
}

// A mask that is the same for every row ([L, S], or leading size 1) broadcasts over the folded
// dim as it is; otherwise it becomes [B, N, ...] (size-1 dims other than N stay broadcast).
OptTensor foldMask(const OptTensor& mask, int64_t lvl, int64_t B, int64_t N) {
  if (!mask.has_value() || !mask->defined()) return mask;
  auto [v, bd] = unwrapAt(*mask, lvl);
  const int64_t rank = rankWithoutBdim(v, bd);
  if (!bd && (rank == 2 || v.size(0) == 1)) return v;
  Tensor m = materializeBdimFront(v, bd, B);
  if (rank == 2) m = m.unsqueeze(1).unsqueeze(1);
  return m.expand({B, N, m.size(2), m.size(3), m.size(4)}).flatten(0, 1);
}

Tensor unfold(const Tensor& t, int64_t B, int64_t N, const Level& lvl) {
  return makeBatched(t.unflatten(0, {B, N}), 0, lvl);
}

std::tuple<Tensor, Tensor> forwardKernel(c10::DispatchKeySet ks, const Tensor& q, const Tensor& k,
                                         const Tensor& v, double dropout_p, bool is_causal,
                                         const OptTensor& attn_mask, std::optional<double> scale) {
  using Ret = std::tuple<Tensor, Tensor>;
  std::optional<Ret> done;
  const Level* top = detail::vmapPrologue<Fwd, Ret, const Tensor&, const Tensor&, const Tensor&, double, bool,
                                          const OptTensor&, std::optional<double>>(
      done, ks, q, k, v, dropout_p, is_causal, attn_mask, scale);
  if (!top) return std::move(*done);
  const int64_t lvl = top->id, B = top->concreteBatchSize("scaled_dot_product_attention");
  const bool fast =
      B > 0 && dropout_p == 0 && sameLeading({{&q, 4}, {&k, 4}, {&v, 4}}) && maskFolds(attn_mask, q);
  HandDownGuard guard;
  if (!fast) {
    return detail::wrapAllAt0<Ret>(
        detail::runPerElement<Fwd, Ret>(lvl, B, q, k, v, dropout_p, is_causal, attn_mask, scale), *top);
  }
  const int64_t N = q.size(0);
  auto [out, lse] = Fwd::call(fold(q, lvl, B), fold(k, lvl, B), fold(v, lvl, B), dropout_p, is_causal,
                              foldMask(attn_mask, lvl, B, N), scale);
  return {unfold(out, B, N, *top), unfold(lse, B, N, *top)};
}

std::tuple<Tensor, Tensor, Tensor> backwardKernel(c10::DispatchKeySet ks, const Tensor& grad_out,
                                                  const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& out, const Tensor& lse, double dropout_p,
                                                  bool is_causal, const OptTensor& attn_mask,
                                                  std::optional<double> scale) {
  using Ret = std::tuple<Tensor, Tensor, Tensor>;
  std::optional<Ret> done;
  const Level* top = detail::vmapPrologue<Bwd, Ret, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const Tensor&, const Tensor&, double, bool,
                                          const OptTensor&, std::optional<double>>(
      done, ks, grad_out, q, k, v, out, lse, dropout_p, is_causal, attn_mask, scale);
  if (!top) return std::move(*done);
  const int64_t lvl = top->id, B = top->concreteBatchSize("scaled_dot_product_attention");
  const bool fast = B > 0 && dropout_p == 0 &&
                    sameLeading({{&grad_out, 4}, {&q, 4}, {&k, 4}, {&v, 4}, {&out, 4}, {&lse, 3}}) &&
                    maskFolds(attn_mask, q);
  HandDownGuard guard;
  if (!fast) {
    return detail::wrapAllAt0<Ret>(detail::runPerElement<Bwd, Ret>(lvl, B, grad_out, q, k, v, out, lse,
                                                                   dropout_p, is_causal, attn_mask, scale),
                                   *top);
  }
  const int64_t N = q.size(0);
  auto [gq, gk, gv] =
      Bwd::call(fold(grad_out, lvl, B), fold(q, lvl, B), fold(k, lvl, B), fold(v, lvl, B), fold(out, lvl, B),
                fold(lse, lvl, B), dropout_p, is_causal, foldMask(attn_mask, lvl, B, N), scale);
  return {unfold(gq, B, N, *top), unfold(gk, B, N, *top), unfold(gv, B, N, *top)};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  m.impl(opName<Fwd>().c_str(), TORCH_FN(forwardKernel));
  m.impl(opName<Bwd>().c_str(), TORCH_FN(backwardKernel));
}

}  // namespace ftl
