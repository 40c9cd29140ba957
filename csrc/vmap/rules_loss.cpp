// Batching rules: loss functions and their backward ops (nll_loss, which cross_entropy uses, and
// the pointwise losses: mse, smooth_l1, huber, binary_cross_entropy (+ with_logits)).
// nll_loss is a gather along the class dim with per-target weights, so the batched rule does
// exactly that over [B, N, C]; reductions then happen per batch element.
// Pointwise losses run with reduction='none' on batch-first tensors and reduce per element
// afterwards: the op's own 'mean'/'sum' would mix the batch elements.
#include <ATen/ExpandUtils.h>
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

// ---- pointwise losses
// Every defined tensor to one batch-first shape [B, *S], S the broadcast logical shape (unbatched
// ones expanded, not copied). Expanding all of them, not just broadcasting, is what lets a
// batched weight or grad_output meet unbatched inputs: the ops only broadcast weight into input.
std::vector<Tensor> broadcastBatchFirst(std::initializer_list<std::pair<const Tensor*, bdim_t>> ts) {
  int64_t r = 0;
  for (const auto& [t, bd] : ts)
    if (t && t->defined()) r = std::max(r, rankWithoutBdim(*t, bd));
  std::vector<Tensor> out;
  at::DimVector shape;
  for (const auto& [t, bd] : ts) {
    if (!t || !t->defined()) {
      out.emplace_back();
      continue;
    }
    out.push_back(padToLogicalRank(moveBdimToFront(*t, bd), bd.has_value(), r));
    shape = at::infer_size_dimvector(shape, out.back().sizes());
  }
  for (auto& t : out)
    if (t.defined()) t = t.expand(shape);
  return out;
}

std::optional<Tensor> optTensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}
const Tensor* ptrOf(const std::optional<Tensor>& t) { return t ? &*t : nullptr; }

// [B, *S] per-element losses -> [B] for 'mean'/'sum' (a logical scalar still reduces to [B]).
Tensor reducePerSample(const Tensor& loss, int64_t reduction) {
  if (reduction == kNone) return loss;
  Tensor flat = flattenAfterBatch(loss);
  return reduction == kSum ? flat.sum(1) : flat.mean(1);
}

// A backward op run with reduction='none' and the per-element grad_output gives the 'sum'
// gradient; 'mean' divides by each element's own numel, not the physical one.
Tensor scaleForReduction(const Tensor& grad_input, int64_t reduction) {
  if (reduction != kMean) return grad_input;
  int64_t n = 1;
  for (int64_t d = 1; d < grad_input.dim(); ++d) n *= grad_input.size(d);
  return grad_input.div(n);
}

template <class Op, class Sig = typename Op::schema>
struct PointwiseLoss;
template <class Op, class... Extra>
struct PointwiseLoss<Op, Tensor(const Tensor&, const Tensor&, int64_t, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd,
                                         int64_t reduction, Extra... e) {
    auto a = broadcastBatchFirst({{&x, xbd}, {&t, tbd}});
    return {reducePerSample(Op::call(a[0], a[1], kNone, e...), reduction), 0};
  }
};

// grad_output of a 'mean'/'sum' loss is a logical scalar; broadcastBatchFirst spreads it over S.
template <class Op, class Sig = typename Op::schema>
struct PointwiseLossBackward;
template <class Op, class... Extra>
struct PointwiseLossBackward<Op, Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& g, bdim_t gbd, const Tensor& x, bdim_t xbd,
                                         const Tensor& t, bdim_t tbd, int64_t reduction, Extra... e) {
    auto a = broadcastBatchFirst({{&g, gbd}, {&x, xbd}, {&t, tbd}});
    return {scaleForReduction(Op::call(a[0], a[1], a[2], kNone, e...), reduction), 0};
  }
};

std::tuple<Tensor, bdim_t> bceRule(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd,
                                   const std::optional<Tensor>& w, bdim_t wbd, int64_t reduction) {
  auto a = broadcastBatchFirst({{&x, xbd}, {&t, tbd}, {ptrOf(w), wbd}});
  return {reducePerSample(at::_ops::binary_cross_entropy::call(a[0], a[1], optTensor(a[2]), kNone),
                          reduction),
          0};
}

std::tuple<Tensor, bdim_t> bceBackwardRule(const Tensor& g, bdim_t gbd, const Tensor& x, bdim_t xbd,
                                           const Tensor& t, bdim_t tbd,
                                           const std::optional<Tensor>& w, bdim_t wbd,
                                           int64_t reduction) {
  auto a = broadcastBatchFirst({{&g, gbd}, {&x, xbd}, {&t, tbd}, {ptrOf(w), wbd}});
  return {scaleForReduction(at::_ops::binary_cross_entropy_backward::call(
                                a[0], a[1], a[2], optTensor(a[3]), kNone),
                            reduction),
          0};
}

// pos_weight broadcasts against the class (last) dim, which right-aligned broadcasting keeps.
std::tuple<Tensor, bdim_t> bceLogitsRule(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd,
                                         const std::optional<Tensor>& w, bdim_t wbd,
                                         const std::optional<Tensor>& pw, bdim_t pwbd,
                                         int64_t reduction) {
  auto a = broadcastBatchFirst({{&x, xbd}, {&t, tbd}, {ptrOf(w), wbd}, {ptrOf(pw), pwbd}});
  return {reducePerSample(at::_ops::binary_cross_entropy_with_logits::call(
                              a[0], a[1], optTensor(a[2]), optTensor(a[3]), kNone),
                          reduction),
          0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::nll_loss_forward, &nllForwardRule>(m);
  registerVmapRule<at::_ops::nll_loss_backward, &nllBackwardRule>(m);
  registerFamily<PointwiseLoss, at::_ops::mse_loss, at::_ops::smooth_l1_loss, at::_ops::huber_loss>(m);
  registerFamily<PointwiseLossBackward, at::_ops::mse_loss_backward, at::_ops::smooth_l1_loss_backward, at::_ops::huber_loss_backward>(m);
  registerVmapRule<at::_ops::binary_cross_entropy, &bceRule>(m);
  registerVmapRule<at::_ops::binary_cross_entropy_backward, &bceBackwardRule>(m);
  registerVmapRule<at::_ops::binary_cross_entropy_with_logits, &bceLogitsRule>(m);
}

}  // namespace ftl
