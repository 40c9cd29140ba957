// Batching rules: indexing ops (embedding and its backward so far).
// A batched table [B, V, D] is looked up as one flat table [B*V, D] with each element's indices
// shifted by b*V, which also gives per-element gradients from one embedding_dense_backward.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

// indices [B, ...] + b*V, so that element b addresses rows [b*V, (b+1)*V) of a flat table.
Tensor offsetIndices(const Tensor& idx, int64_t V) {
  const int64_t B = idx.size(0);
  c10::SmallVector<int64_t, 6> shape(idx.dim(), 1);
  shape[0] = B;
  return idx.add(at::arange(B, idx.options()).mul(V).view(shape));
}

std::tuple<Tensor, bdim_t> embeddingRule(const Tensor& weight, bdim_t wbd, const Tensor& indices,
                                         bdim_t ibd, c10::SymInt padding_idx,
                                         bool scale_grad_by_freq, bool sparse) {
  if (!wbd) {
    return {at::embedding_symint(weight, indices, padding_idx, scale_grad_by_freq, sparse), ibd};
  }
  Tensor w = moveBdimToFront(weight, wbd);  // [B, V, D]
  const int64_t B = w.size(0), V = w.size(1);
  Tensor idx = offsetIndices(materializeBdimFront(indices, ibd, B), V);
  return {at::embedding(w.reshape({B * V, w.size(2)}), idx, -1, scale_grad_by_freq, sparse), 0};
}

std::tuple<Tensor, bdim_t> embeddingDenseBackwardRule(const Tensor& grad, bdim_t gbd,
                                                      const Tensor& indices, bdim_t ibd,
                                                      c10::SymInt num_weights,
                                                      c10::SymInt padding_idx,
                                                      bool scale_grad_by_freq) {
  const int64_t B = batchSizeOf({{&grad, gbd}, {&indices, ibd}});
  const int64_t V = num_weights.expect_int();
  Tensor g = materializeBdimFront(grad, gbd, B);       // [B, ..., D]
  Tensor idx = materializeBdimFront(indices, ibd, B);  // [B, ...]
  const int64_t pad = padding_idx.expect_int();
  if (pad >= 0) g = g.mul(idx.ne(pad).unsqueeze(-1).to(g.scalar_type()));
  Tensor flat = at::embedding_dense_backward(g, offsetIndices(idx, V), B * V, -1,
                                             scale_grad_by_freq);
  return {flat.view({B, V, flat.size(1)}), 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::embedding, &embeddingRule>(m);
  registerVmapRule<at::_ops::embedding_dense_backward, &embeddingDenseBackwardRule>(m);
}

}  // namespace ftl
