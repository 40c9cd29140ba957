// Batching rules: loss functions and their backward ops (nll_loss, which cross_entropy uses).
// nll_loss is a gather along the class dim with per-target weights, so the batched rule does
// exactly that over [B, N, C]; reductions then happen per batch element.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

struct NllInputs {
  Tensor logp;    // [B, N, C]
  Tensor target;  // [B, N], ignored entries replaced by class 0
  Tensor weight;  // [B, N]: class weight of each target, 0 where ignored
  bool one_d;     // logical input was [C] (no N dim)
};

NllInputs prepareNll(const Tensor& self, bdim_t sbd, const Tensor& target, bdim_t tbd,
                     const std::optional<Tensor>& weight, bdim_t wbd, int64_t ignore_index) {
  const int64_t B = batchSizeOf({{&self, sbd}, {&target, tbd}, {weight ? &*weight : &self, wbd}});
  Tensor logp = materializeBdimFront(self, sbd, B);
  Tensor t = materializeBdimFront(target, tbd, B);
  const bool one_d = logp.dim() == 2;
  TORCH_CHECK(logp.dim() == 3 || one_d, "nll_loss under vmap: expected input of 1 or 2 dims per "
              "batch element (use nll_loss2d-style reshapes for more), got ", logp.dim() - 1);
  if (one_d) {
    logp = logp.unsqueeze(1);
    t = t.unsqueeze(1);
  }
  Tensor valid = t.ne(ignore_index);
  Tensor tc = at::where(valid, t, at::zeros_like(t));
  Tensor w;
  if (weight.has_value() && weight->defined()) {
    Tensor wm = materializeBdimFront(*weight, wbd, B);  // [B, C]
    w = wm.gather(1, tc.reshape({B, -1})).view(tc.sizes());
  } else {
    w = at::ones_like(tc, logp.options());
  }
  w = w.mul(valid.to(w.scalar_type()));
  return {std::move(logp), std::move(tc), std::move(w), one_d};
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t> nllForwardRule(
    const Tensor& self, bdim_t sbd, const Tensor& target, bdim_t tbd,
    const std::optional<Tensor>& weight, bdim_t wbd, int64_t reduction, c10::SymInt ignore_index) {
  auto in = prepareNll(self, sbd, target, tbd, weight, wbd, ignore_index.expect_int());
  Tensor picked = in.logp.gather(2, in.target.unsqueeze(2)).squeeze(2).neg().mul(in.weight);  // [B,N]
  if (reduction == kNone) {
    Tensor out = in.one_d ? picked.squeeze(1) : picked;
    return {out, 0, at::zeros({}, in.logp.options()), std::nullopt};
  }
  Tensor total = in.weight.sum(1);
  Tensor summed = picked.sum(1);
  return {reduction == kSum ? summed : summed.div(total), 0, total, 0};
}

Tensor nllBackwardRule_(const Tensor& grad_out, bdim_t gbd, const Tensor& self, bdim_t sbd,
                        const Tensor& target, bdim_t tbd, const std::optional<Tensor>& weight,
                        bdim_t wbd, int64_t reduction, int64_t ignore_index,
                        const Tensor& total_weight, bdim_t twbd) {
  const int64_t B = batchSizeOf({{&self, sbd}, {&target, tbd}, {&grad_out, gbd},
                                 {&total_weight, twbd}, {weight ? &*weight : &self, wbd}});
  auto in = prepareNll(materializeBdimFront(self, sbd, B), 0, target, tbd, weight, wbd, ignore_index);
  Tensor g = materializeBdimFront(grad_out, gbd, B);
  if (reduction == kNone) {
    if (in.one_d) g = g.unsqueeze(1);           // [B, N]
  } else {
    g = g.reshape({B, 1});                       // one scalar per batch element
    if (reduction == kMean) g = g.div(materializeBdimFront(total_weight, twbd, B).reshape({B, 1}));
  }
  Tensor coef = in.weight.mul(g).neg().unsqueeze(2);  // [B, N, 1]
  Tensor grad = at::zeros_like(in.logp).scatter(2, in.target.unsqueeze(2), coef);
  return in.one_d ? grad.squeeze(1) : grad;
}

std::tuple<Tensor, bdim_t> nllBackwardRule(const Tensor& grad_out, bdim_t gbd, const Tensor& self,
                                           bdim_t sbd, const Tensor& target, bdim_t tbd,
                                           const std::optional<Tensor>& weight, bdim_t wbd,
                                           int64_t reduction, c10::SymInt ignore_index,
                                           const Tensor& total_weight, bdim_t twbd) {
  return {nllBackwardRule_(grad_out, gbd, self, sbd, target, tbd, weight, wbd, reduction,
                           ignore_index.expect_int(), total_weight, twbd),
          0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::nll_loss_forward, &nllForwardRule>(m);
  registerVmapRule<at::_ops::nll_loss_backward, &nllBackwardRule>(m);
}

}  // namespace ftl
