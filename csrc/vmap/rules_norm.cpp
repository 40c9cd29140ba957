// Batching rules: normalization layers (layer_norm so far). Normalized dims are trailing, so the
// batch dim at the front is one more leading dim, except for the per-element weight and bias
// gradients, which must not sum over it: those are computed from x_hat = (x - mean) * rstd.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> layerNormRule(
    const Tensor& x, bdim_t xbd, c10::SymIntArrayRef shape, const std::optional<Tensor>& w,
    bdim_t wbd, const std::optional<Tensor>& b, bdim_t bbd, double eps) {
  const int64_t B = batchSizeOf({{&x, xbd}, {w ? &*w : &x, wbd}, {b ? &*b : &x, bbd}});
  Tensor xp = materializeBdimFront(x, xbd, B);
  if (!wbd && !bbd) {
    auto [out, mean, rstd] = at::native_layer_norm_symint(xp, shape, w, b, eps);
    return {out, 0, mean, 0, rstd, 0};
  }
  auto [out, mean, rstd] = at::native_layer_norm_symint(xp, shape, std::nullopt, std::nullopt, eps);
  const int64_t r = xp.dim() - 1;
  if (w && w->defined()) out = out.mul(wbd ? padToLogicalRank(moveBdimToFront(*w, wbd), true, r) : *w);
  if (b && b->defined()) out = out.add(bbd ? padToLogicalRank(moveBdimToFront(*b, bbd), true, r) : *b);
  return {out, 0, mean, 0, rstd, 0};
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> layerNormBackwardRule(
    const Tensor& grad, bdim_t gbd, const Tensor& x, bdim_t xbd, c10::SymIntArrayRef shape,
    const Tensor& mean, bdim_t mbd, const Tensor& rstd, bdim_t rbd, const std::optional<Tensor>& w,
    bdim_t wbd, const std::optional<Tensor>& b, bdim_t bbd, std::array<bool, 3> mask) {
  const int64_t B = batchSizeOf({{&grad, gbd}, {&x, xbd}, {&mean, mbd}, {&rstd, rbd},
                                 {w ? &*w : &x, wbd}, {b ? &*b : &x, bbd}});
  // The CPU kernel reads mean/rstd as dense buffers: expanded (stride-0) views must be copied.
  Tensor g = materializeBdimFront(grad, gbd, B).contiguous();
  Tensor xp = materializeBdimFront(x, xbd, B).contiguous();
  Tensor mu = materializeBdimFront(mean, mbd, B).contiguous();
  Tensor rs = materializeBdimFront(rstd, rbd, B).contiguous();
  const int64_t r = xp.dim() - 1;
  const int64_t n_lead = r - static_cast<int64_t>(shape.size());
  Tensor gi, gw, gb;
  bdim_t gibd, gwbd, gbbd;
  if (mask[0]) {
    if (wbd) {
      Tensor wp = padToLogicalRank(moveBdimToFront(*w, wbd), true, r);
      gi = std::get<0>(at::native_layer_norm_backward_symint(g.mul(wp), xp, shape, mu, rs,
                                                             std::nullopt, std::nullopt,
                                                             {true, false, false}));
    } else {
      gi = std::get<0>(at::native_layer_norm_backward_symint(g, xp, shape, mu, rs, w, b,
                                                             {true, false, false}));
    }
    gibd = 0;
  }
  c10::SmallVector<int64_t, 6> lead;
  for (int64_t d = 1; d <= n_lead; ++d) lead.push_back(d);
  auto sumLead = [&](const Tensor& t) { return lead.empty() ? t : t.sum(lead); };
  if (mask[1] && w && w->defined()) {
    gw = sumLead(g.mul(xp.sub(mu).mul(rs)));
    gwbd = 0;
  }
  if (mask[2] && b && b->defined()) {
    gb = sumLead(g);
    gbbd = 0;
  }
  return {gi, gibd, gw, gwbd, gb, gbbd};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::native_layer_norm, &layerNormRule>(m);
  registerVmapRule<at::_ops::native_layer_norm_backward, &layerNormBackwardRule>(m);
}

}  // namespace ftl
