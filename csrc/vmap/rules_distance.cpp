// Batching rules: pairwise distances (cdist and its matmul form _euclidean_dist, pdist) and _trilinear
// (F.bilinear). _cdist_forward/_cdist_backward broadcast leading batch dims, so batched arguments only need
// size-1 dims up to a common logical rank. pdist is the strict upper triangle of cdist(x, x), and
// its gradient is cdist's gradient for x1 with the pair gradients mirrored into a symmetric
// matrix (d(x_i, x_j) depends on x_i through both positions).
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

std::tuple<Tensor, bdim_t> cdistRule(const Tensor& x1, bdim_t bd1, const Tensor& x2, bdim_t bd2, double p,
                                     std::optional<int64_t> mode) {
  const int64_t r = std::max(rankWithoutBdim(x1, bd1), rankWithoutBdim(x2, bd2));
  Tensor a = bd1 ? padToLogicalRank(moveBdimToFront(x1, bd1), true, r) : x1;
  Tensor b = bd2 ? padToLogicalRank(moveBdimToFront(x2, bd2), true, r) : x2;
  return {at::_ops::_cdist_forward::call(a, b, p, mode), 0};
}

// cdist's matmul form for p = 2 (compute_mode, or more than 25 rows); it broadcasts the same way.
std::tuple<Tensor, bdim_t> euclideanDistRule(const Tensor& x1, bdim_t bd1, const Tensor& x2, bdim_t bd2) {
  const int64_t r = std::max(rankWithoutBdim(x1, bd1), rankWithoutBdim(x2, bd2));
  Tensor a = bd1 ? padToLogicalRank(moveBdimToFront(x1, bd1), true, r) : x1;
  Tensor b = bd2 ? padToLogicalRank(moveBdimToFront(x2, bd2), true, r) : x2;
  return {at::_ops::_euclidean_dist::call(a, b), 0};
}

// The gradient has x1's shape expanded to the common batch dims, so x1 itself must carry the
// vmap batch even where only grad is batched.
std::tuple<Tensor, bdim_t> cdistBackwardRule(const Tensor& grad, bdim_t gbd, const Tensor& x1, bdim_t bd1,
                                             const Tensor& x2, bdim_t bd2, double p, const Tensor& dist,
                                             bdim_t dbd) {
  const c10::SymInt B = batchSizeOf({{&grad, gbd}, {&x1, bd1}, {&x2, bd2}, {&dist, dbd}});
  const int64_t r = std::max(rankWithoutBdim(x1, bd1), rankWithoutBdim(x2, bd2));
  Tensor a = padToLogicalRank(materializeBdimFront(x1, bd1, B), true, r);
  Tensor b = bd2 ? padToLogicalRank(moveBdimToFront(x2, bd2), true, r) : x2;
  return {at::_ops::_cdist_backward::call(materializeBdimFront(grad, gbd, B), a, b, p,
                                          materializeBdimFront(dist, dbd, B)),
          0};
}

// Flat indices i*n + j of the pairs i < j, in pdist's order.
Tensor upperPairs(int64_t n, const Tensor& like) {
  Tensor ij = at::triu_indices(n, n, 1, like.options().dtype(at::kLong));
  return ij[0].mul(n).add(ij[1]);
}

std::tuple<Tensor, bdim_t> pdistRule(const Tensor& x, bdim_t bd, double p) {
  TORCH_CHECK(rankWithoutBdim(x, bd) == 2, "pdist only supports 2D tensors, got: ", rankWithoutBdim(x, bd),
              "D");
  TORCH_CHECK(p >= 0, "pdist only supports non-negative p values");
  Tensor s = moveBdimToFront(x, bd);
  const int64_t n = s.size(1);
  // compute_mode 2: never the matmul shortcut for p = 2, which is less accurate than pdist.
  Tensor d = at::_ops::_cdist_forward::call(s, s, p, 2).flatten(1);
  return {d.index_select(1, upperPairs(n, s)), 0};
}

std::tuple<Tensor, bdim_t> pdistBackwardRule(const Tensor& grad, bdim_t gbd, const Tensor& x, bdim_t bd,
                                             double p, const Tensor& dist, bdim_t dbd) {
  const c10::SymInt B = batchSizeOf({{&grad, gbd}, {&x, bd}, {&dist, dbd}});
  Tensor s = materializeBdimFront(x, bd, B);
  const int64_t n = s.size(1);
  Tensor k = upperPairs(n, s);
  Tensor ij = at::triu_indices(n, n, 1, k.options());
  Tensor kt = ij[1].mul(n).add(ij[0]);
  auto symmetric = [&](const Tensor& t, bdim_t tbd) {
    Tensor v = materializeBdimFront(t, tbd, B);
    Tensor full = at::zeros_symint({B, n * n}, v.options());
    return full.index_copy(1, k, v).index_copy(1, kt, v).view_symint({B, n, n});
  };
  return {at::_ops::_cdist_backward::call(symmetric(grad, gbd), s, s, p, symmetric(dist, dbd)), 0};
}

// Every input gains the batch dim in front, so every dim index (expand, sumdim, unroll_dim),
// all counted over the common expanded rank, moves up by one.
std::tuple<Tensor, bdim_t> trilinearRule(const Tensor& i1, bdim_t bd1, const Tensor& i2, bdim_t bd2,
                                         const Tensor& i3, bdim_t bd3, at::IntArrayRef e1, at::IntArrayRef e2,
                                         at::IntArrayRef e3, at::IntArrayRef sumdim, int64_t unroll_dim) {
  const c10::SymInt B = batchSizeOf({{&i1, bd1}, {&i2, bd2}, {&i3, bd3}});
  const int64_t r = rankWithoutBdim(i1, bd1) + static_cast<int64_t>(e1.size());
  auto shift = [r](at::IntArrayRef dims) {
    std::vector<int64_t> out(dims.begin(), dims.end());
    for (auto& d : out) d = physicalDim(d, r, true);
    return out;
  };
  return {at::_ops::_trilinear::call(materializeBdimFront(i1, bd1, B), materializeBdimFront(i2, bd2, B),
                                     materializeBdimFront(i3, bd3, B), shift(e1), shift(e2), shift(e3),
                                     shift(sumdim), physicalDim(unroll_dim, r, true)),
          0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::_cdist_forward, &cdistRule>(m);
  registerVmapRule<at::_ops::_cdist_backward, &cdistBackwardRule>(m);
  registerVmapRule<at::_ops::_euclidean_dist, &euclideanDistRule>(m);
  registerVmapRule<at::_ops::_pdist_forward, &pdistRule>(m);
  registerVmapRule<at::_ops::_pdist_backward, &pdistBackwardRule>(m);
  registerVmapRule<at::_ops::_trilinear, &trilinearRule>(m);
}

}  // namespace ftl
