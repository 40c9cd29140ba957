// Batching rules: loss functions and their backward ops (nll_loss and nll_loss2d, which
// cross_entropy uses, the pointwise losses: mse, smooth_l1, huber, soft_margin,
// binary_cross_entropy (+ with_logits), and the margin losses multi_margin, multilabel_margin).
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

// NOTE [Loss shapes per batch element]
// A rule's output must have, per batch element, the shape the op gives one element, for every
// input and target shape the op accepts. The batched computations below assume the common case
// (shapes that broadcast the usual way); where torch's kernel shapes its output differently (it
// squeezes, or writes into a tensor shaped like one argument), the rule checks the logical shapes
// and, outside the case it computes, runs the op once per element: that is vmap's definition,
// and it raises torch's own error where torch refuses the shapes.
Tensor one(const Tensor& t, bdim_t bd, int64_t b) {
  return bd && t.defined() ? exampleOf(t, *bd, b) : t;
}
std::optional<Tensor> one(const std::optional<Tensor>& t, bdim_t bd, int64_t b) {
  return t.has_value() && t->defined() ? std::optional<Tensor>(one(*t, bd, b)) : t;
}
// call(b) is the op on batch element b; results stacked at dim 0. Over an empty batch the op
// still runs once (on zeros: exampleOf) for the shape and torch's error.
template <class F>
Tensor perElement(const c10::SymInt& batch_size, F&& call) {
  // one call per element: a number (NOTE [Symbolic batch sizes] in levels.h)
  const int64_t B = batch_size.guard_int(__FILE__, __LINE__);
  std::vector<Tensor> rows;
  rows.reserve(B);
  for (int64_t b = 0; b < B; ++b) rows.push_back(call(b));
  const Tensor like = B > 0 ? rows[0] : call(0);
  return stackRows(rows, like);
}
at::DimVector logicalShape(const Tensor& t, bdim_t bd) {
  at::DimVector s(t.sizes().begin(), t.sizes().end());
  if (bd) s.erase(s.begin() + *bd);
  return s;
}
// Whether `b` broadcasts into `a`'s shape (an in-place op on `a` accepts it).
bool broadcastsInto(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (b.size() > a.size()) return false;
  for (size_t i = 1; i <= b.size(); ++i)
    if (b[b.size() - i] != 1 && b[b.size() - i] != a[a.size() - i]) return false;
  return true;
}

struct NllInputs {
  Tensor logp;    // [B, N, C]
  Tensor target;  // [B, N], ignored entries replaced by class 0
  Tensor weight;  // [B, N]: class weight of each target, 0 where ignored
  bool one_d;     // logical input was [C] (no N dim)
};

// The targets with ignored entries replaced by class 0, and each target's class weight (0 where
// ignored), in the targets' layout.
struct TargetWeights {
  Tensor target;
  Tensor weight;
};

TargetWeights targetWeights(const Tensor& t, const std::optional<Tensor>& weight, bdim_t wbd,
                            const c10::SymInt& B, int64_t ignore_index, const at::TensorOptions& opts) {
  Tensor valid = t.ne(ignore_index);
  Tensor tc = at::where(valid, t, at::zeros_like(t));
  Tensor w;
  if (weight.has_value() && weight->defined()) {
    Tensor wm = materializeBdimFront(*weight, wbd, B);  // [B, C]
    w = wm.gather(1, tc.reshape_symint({B, -1})).view_symint(tc.sym_sizes());
  } else {
    w = at::ones_like(tc, opts);
  }
  return {std::move(tc), w.mul(valid.to(w.scalar_type()))};
}

// nll_loss's (output, total_weight) from each target's picked score and weight, [B, *] both.
std::tuple<Tensor, bdim_t, Tensor, bdim_t> nllOutputs(const Tensor& picked, const Tensor& weight,
                                                      int64_t reduction) {
  if (reduction == kNone) return {picked, 0, at::zeros({}, picked.options()), std::nullopt};
  Tensor total = weight.flatten(1).sum(1);
  Tensor summed = picked.flatten(1).sum(1);
  return {reduction == kSum ? summed : summed.div(total), 0, total, 0};
}

// The gradient of nll_loss with respect to its scores (class dim 2, batch first): each target's
// -weight * grad scattered along the class dim into zeros of the scores' layout. g is grad_out at
// the batch front, already shaped like the targets for 'none'.
Tensor nllScoresGrad(const Tensor& scores, const Tensor& target, const Tensor& weight, Tensor g,
                     int64_t reduction, const Tensor& total_weight, bdim_t twbd, const c10::SymInt& B) {
  if (reduction != kNone) {
    c10::SymDimVector one(target.dim(), 1);  // one scalar per batch element, broadcast over the rest
    one[0] = B;
    g = g.reshape_symint(one);
    if (reduction == kMean) g = g.div(materializeBdimFront(total_weight, twbd, B).reshape_symint(one));
  }
  Tensor coef = weight.mul(g).neg().unsqueeze(2);
  return at::zeros_like(scores, at::MemoryFormat::Contiguous).scatter(2, target.unsqueeze(2), coef);
}

NllInputs prepareNll(const Tensor& self, bdim_t sbd, const Tensor& target, bdim_t tbd,
                     const std::optional<Tensor>& weight, bdim_t wbd, int64_t ignore_index) {
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&target, tbd}, {weight ? &*weight : &self, wbd}});
  Tensor logp = materializeBdimFront(self, sbd, B);
  Tensor t = materializeBdimFront(target, tbd, B);
  const bool one_d = logp.dim() == 2;
  TORCH_CHECK(logp.dim() == 3 || one_d,
              "nll_loss under vmap: expected input of 1 or 2 dims per "
              "batch element (use nll_loss2d-style reshapes for more), got ",
              logp.dim() - 1);
  if (one_d) {
    logp = logp.unsqueeze(1);
    if (t.dim() == 1) t = t.unsqueeze(1);  // a 0-D target, or torch's accepted [1]: [B, 1] both
  }
  auto tw = targetWeights(t, weight, wbd, B, ignore_index, logp.options());
  return {std::move(logp), std::move(tw.target), std::move(tw.weight), one_d};
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t> nllForwardRule(const Tensor& self, bdim_t sbd,
                                                          const Tensor& target, bdim_t tbd,
                                                          const std::optional<Tensor>& weight, bdim_t wbd,
                                                          int64_t reduction, c10::SymInt ignore_index) {
  const int64_t rt = rankWithoutBdim(target, tbd);
  if (rankWithoutBdim(self, sbd) == 1 && rt != 0 && (rt != 1 || target.size(tbd && *tbd == 0 ? 1 : 0) != 1)) {
    auto one = [](const Tensor& t, bdim_t bd) { return bd ? exampleOf(t, *bd, 0) : t; };
    raiseForElement(
        [&] {
          at::_ops::nll_loss_forward::call(
              one(self, sbd), one(target, tbd),
              weight && weight->defined() ? std::optional<Tensor>(one(*weight, wbd)) : weight, reduction,
              ignore_index);
        },
        "nll_loss", "a 1-D input takes a 0-D target");
  }
  auto in = prepareNll(self, sbd, target, tbd, weight, wbd, ignore_index.expect_int());
  Tensor picked = in.logp.gather(2, in.target.unsqueeze(2)).squeeze(2).neg().mul(in.weight);  // [B,N]
  if (reduction == kNone && in.one_d) picked = picked.squeeze(1);
  return nllOutputs(picked, in.weight, reduction);
}

Tensor nllBackwardRule_(const Tensor& grad_out, bdim_t gbd, const Tensor& self, bdim_t sbd,
                        const Tensor& target, bdim_t tbd, const std::optional<Tensor>& weight, bdim_t wbd,
                        int64_t reduction, int64_t ignore_index, const Tensor& total_weight, bdim_t twbd) {
  const c10::SymInt B = batchSizeOf({{&self, sbd},
                                     {&target, tbd},
                                     {&grad_out, gbd},
                                     {&total_weight, twbd},
                                     {weight ? &*weight : &self, wbd}});
  auto in = prepareNll(materializeBdimFront(self, sbd, B), 0, target, tbd, weight, wbd, ignore_index);
  Tensor g = materializeBdimFront(grad_out, gbd, B);
  if (reduction == kNone && in.one_d) g = g.unsqueeze(1);  // [B, N]
  Tensor grad = nllScoresGrad(in.logp, in.target, in.weight, g, reduction, total_weight, twbd, B);
  return in.one_d ? grad.squeeze(1) : grad;
}

std::tuple<Tensor, bdim_t> nllBackwardRule(const Tensor& grad_out, bdim_t gbd, const Tensor& self, bdim_t sbd,
                                           const Tensor& target, bdim_t tbd,
                                           const std::optional<Tensor>& weight, bdim_t wbd, int64_t reduction,
                                           c10::SymInt ignore_index, const Tensor& total_weight,
                                           bdim_t twbd) {
  if (rankWithoutBdim(self, sbd) == 1 && rankWithoutBdim(target, tbd) != 0) {
    // The forward takes a [1] target for a [C] input; the backward accepts it only for C == 1
    // (NOTE [Loss shapes per batch element]).
    const c10::SymInt B =
        batchSizeOf({{&self, sbd}, {&target, tbd}, {&grad_out, gbd}, {&total_weight, twbd}});
    return {perElement(B,
                       [&](int64_t b) {
                         return at::_ops::nll_loss_backward::call(
                             one(grad_out, gbd, b), one(self, sbd, b), one(target, tbd, b),
                             one(weight, wbd, b), reduction, ignore_index, one(total_weight, twbd, b));
                       }),
            0};
  }
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
const Tensor* ptrOf(const std::optional<Tensor>& t) {
  return t ? &*t : nullptr;
}

// [B, *S] per-element losses -> [B] for 'mean'/'sum' (a logical scalar still reduces to [B]).
Tensor reducePerSample(const Tensor& loss, int64_t reduction) {
  if (reduction == kNone) return loss;
  Tensor flat = flattenAfterBatch(loss);
  return reduction == kSum ? flat.sum(1) : flat.mean(1);
}

// A backward op run with reduction='none' and the per-element grad_output gives the 'sum'
// gradient; 'mean' divides by the numel of one element of the input (`x`), as torch's kernels do,
// also where a broadcasting target makes the loss (and this gradient) larger than the input.
Tensor scaleForReduction(const Tensor& grad_input, int64_t reduction, const Tensor& x, bdim_t xbd) {
  if (reduction != kMean) return grad_input;
  int64_t n = 1;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (!xbd || d != *xbd) n *= x.size(d);
  return grad_input.div(n);
}

template <class Op, class Sig = typename Op::schema>
struct PointwiseLoss;
template <class Op, class... Extra>
struct PointwiseLoss<Op, Tensor(const Tensor&, const Tensor&, int64_t, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd,
                                         int64_t reduction, Extra... e) {
    if constexpr (std::is_same_v<Op, at::_ops::soft_margin_loss>) {
      // soft_margin_loss writes into a tensor of the input's shape: a target that broadcasts
      // to more than that is torch's error (the others broadcast both)
      Tensor xe = xbd ? exampleOf(x, *xbd, 0) : x, te = tbd ? exampleOf(t, *tbd, 0) : t;
      if (at::infer_size(xe.sizes(), te.sizes()) != xe.sizes().vec()) {
        raiseForElement([&] { Op::call(xe, te, reduction, e...); }, "soft_margin_loss",
                        "the target must broadcast to the input's shape");
      }
    }
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
    return {scaleForReduction(Op::call(a[0], a[1], a[2], kNone, e...), reduction, x, xbd), 0};
  }
};

// torch's kernel gives the input's shape: it squeezes input and target before broadcasting them,
// then scales by the weight in place. The batched computation broadcasts without squeezing, which
// is the same when the target has the input's shape and the weight broadcasts into it (what
// F.binary_cross_entropy passes); other shapes run per element (NOTE [Loss shapes per batch
// element]).
bool bceShapesCommon(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd, const std::optional<Tensor>& w,
                     bdim_t wbd) {
  const auto xs = logicalShape(x, xbd);
  return logicalShape(t, tbd) == xs && (!w || !w->defined() || broadcastsInto(xs, logicalShape(*w, wbd)));
}

std::tuple<Tensor, bdim_t> bceRule(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd,
                                   const std::optional<Tensor>& w, bdim_t wbd, int64_t reduction) {
  if (!bceShapesCommon(x, xbd, t, tbd, w, wbd)) {
    const c10::SymInt B = batchSizeOf({{&x, xbd}, {&t, tbd}, {w ? &*w : &x, wbd}});
    return {perElement(B,
                       [&](int64_t b) {
                         return at::_ops::binary_cross_entropy::call(one(x, xbd, b), one(t, tbd, b),
                                                                     one(w, wbd, b), reduction);
                       }),
            0};
  }
  auto a = broadcastBatchFirst({{&x, xbd}, {&t, tbd}, {ptrOf(w), wbd}});
  return {
      reducePerSample(at::_ops::binary_cross_entropy::call(a[0], a[1], optTensor(a[2]), kNone), reduction),
      0};
}

std::tuple<Tensor, bdim_t> bceBackwardRule(const Tensor& g, bdim_t gbd, const Tensor& x, bdim_t xbd,
                                           const Tensor& t, bdim_t tbd, const std::optional<Tensor>& w,
                                           bdim_t wbd, int64_t reduction) {
  // grad_output has the output's shape (the input's) for 'none', and is a scalar otherwise.
  const bool grad_common =
      reduction == kNone ? logicalShape(g, gbd) == logicalShape(x, xbd) : rankWithoutBdim(g, gbd) == 0;
  if (!grad_common || !bceShapesCommon(x, xbd, t, tbd, w, wbd)) {
    const c10::SymInt B = batchSizeOf({{&g, gbd}, {&x, xbd}, {&t, tbd}, {w ? &*w : &x, wbd}});
    return {perElement(B,
                       [&](int64_t b) {
                         return at::_ops::binary_cross_entropy_backward::call(
                             one(g, gbd, b), one(x, xbd, b), one(t, tbd, b), one(w, wbd, b), reduction);
                       }),
            0};
  }
  auto a = broadcastBatchFirst({{&g, gbd}, {&x, xbd}, {&t, tbd}, {ptrOf(w), wbd}});
  return {scaleForReduction(
              at::_ops::binary_cross_entropy_backward::call(a[0], a[1], a[2], optTensor(a[3]), kNone),
              reduction, x, xbd),
          0};
}

// pos_weight broadcasts against the class (last) dim, which right-aligned broadcasting keeps.
// torch computes (1 - target).mul_(input) and scales in place: the output has the target's shape,
// and the input, the weight and log(sigmoid) scaled by pos_weight must broadcast into it (or into
// the input's shape). Other shapes run per element, which raises torch's error (NOTE [Loss shapes
// per batch element]).
std::tuple<Tensor, bdim_t> bceLogitsRule(const Tensor& x, bdim_t xbd, const Tensor& t, bdim_t tbd,
                                         const std::optional<Tensor>& w, bdim_t wbd,
                                         const std::optional<Tensor>& pw, bdim_t pwbd, int64_t reduction) {
  const auto xs = logicalShape(x, xbd), ts = logicalShape(t, tbd);
  bool common = broadcastsInto(ts, xs);
  if (common && w && w->defined()) common = broadcastsInto(ts, logicalShape(*w, wbd));
  if (common && pw && pw->defined()) {
    const auto pws = logicalShape(*pw, pwbd);
    common = broadcastsInto(ts, pws) && broadcastsInto(xs, at::infer_size_dimvector(pws, ts));
  }
  if (!common) {
    const c10::SymInt B = batchSizeOf({{&x, xbd}, {&t, tbd}, {w ? &*w : &x, wbd}, {pw ? &*pw : &x, pwbd}});
    return {perElement(B,
                       [&](int64_t b) {
                         return at::_ops::binary_cross_entropy_with_logits::call(
                             one(x, xbd, b), one(t, tbd, b), one(w, wbd, b), one(pw, pwbd, b), reduction);
                       }),
            0};
  }
  auto a = broadcastBatchFirst({{&x, xbd}, {&t, tbd}, {ptrOf(w), wbd}, {ptrOf(pw), pwbd}});
  return {reducePerSample(at::_ops::binary_cross_entropy_with_logits::call(a[0], a[1], optTensor(a[2]),
                                                                           optTensor(a[3]), kNone),
                          reduction),
          0};
}

// ---- nll_loss2d: [N, C, H, W] scores and [N, H, W] targets. The class dim stays where it is:
// the picked scores are a gather along it and the gradient a scatter into zeros of the input's
// layout. (Moving C last to reuse nll_loss's rule copied the scores, and its gradient came back
// strided, so log_softmax's backward copied it again: a language model's (vocab, T) logits,
// what cross_entropy(logits.transpose(1, 2), y) sees, paid three copies of its largest tensor.)
std::tuple<Tensor, bdim_t, Tensor, bdim_t> nll2dForwardRule(const Tensor& self, bdim_t sbd,
                                                            const Tensor& target, bdim_t tbd,
                                                            const std::optional<Tensor>& weight, bdim_t wbd,
                                                            int64_t reduction, c10::SymInt ignore_index) {
  TORCH_CHECK(rankWithoutBdim(self, sbd) == 4 && rankWithoutBdim(target, tbd) == 3,
              "nll_loss2d: expected input of 4 dims and target of 3 dims per batch element");
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&target, tbd}, {weight ? &*weight : &self, wbd}});
  Tensor x = materializeBdimFront(self, sbd, B);    // [B, N, C, H, W]
  Tensor t = materializeBdimFront(target, tbd, B);  // [B, N, H, W]
  auto in = targetWeights(t, weight, wbd, B, ignore_index.expect_int(), x.options());
  Tensor picked = x.gather(2, in.target.unsqueeze(2)).squeeze(2).neg().mul(in.weight);  // [B, N, H, W]
  return nllOutputs(picked, in.weight, reduction);
}

std::tuple<Tensor, bdim_t> nll2dBackwardRule(const Tensor& grad_out, bdim_t gbd, const Tensor& self,
                                             bdim_t sbd, const Tensor& target, bdim_t tbd,
                                             const std::optional<Tensor>& weight, bdim_t wbd,
                                             int64_t reduction, c10::SymInt ignore_index,
                                             const Tensor& total_weight, bdim_t twbd) {
  TORCH_CHECK(rankWithoutBdim(self, sbd) == 4 && rankWithoutBdim(target, tbd) == 3,
              "nll_loss2d_backward: expected input of 4 dims and target of 3 dims per batch element");
  const c10::SymInt B = batchSizeOf({{&self, sbd},
                                     {&target, tbd},
                                     {&grad_out, gbd},
                                     {&total_weight, twbd},
                                     {weight ? &*weight : &self, wbd}});
  Tensor x = materializeBdimFront(self, sbd, B);
  Tensor t = materializeBdimFront(target, tbd, B);
  Tensor g = materializeBdimFront(grad_out, gbd, B);  // [B, N, H, W] for 'none', else [B]
  auto in = targetWeights(t, weight, wbd, B, ignore_index.expect_int(), x.options());
  return {nllScoresGrad(x, in.target, in.weight, g, reduction, total_weight, twbd, B), 0};
}

// ---- margin losses over [N, C] (or [C]) scores: the vmap batch folds into N, the op runs with
// reduction='none' and each element reduces its own N afterwards.
struct Folded {
  Tensor x;  // [B*N, C]
  Tensor t;  // multi_margin: [B*N]; multilabel: [B*N, C]
  int64_t B, N;
  bool one_d;   // logical input was [C] (no N)
  bool zero_d;  // logical input was a scalar: one class
};

// target_like_input: multilabel targets have the input's shape, multi_margin ones lack C.
// The rows are counted in numbers (NOTE [Symbolic batch sizes] in levels.h).
Folded foldMargin(const Tensor& self, bdim_t sbd, const Tensor& target, bdim_t tbd,
                  const c10::SymInt& batch_size, bool target_like_input, const char* op) {
  const int64_t B = batch_size.guard_int(__FILE__, __LINE__);
  Tensor x = materializeBdimFront(self, sbd, B);
  Tensor t = materializeBdimFront(target, tbd, B);
  TORCH_CHECK(x.dim() <= 3, op, ": expected input of at most 2 dims per batch element, got ", x.dim() - 1);
  const bool zero_d = x.dim() == 1;
  if (zero_d) x = x.unsqueeze(1);
  const bool one_d = x.dim() == 2;
  if (one_d) x = x.unsqueeze(1);
  const int64_t N = x.size(1);
  x = x.flatten(0, 1);
  // Reshaped rather than unsqueezed: torch also takes a [1] target for a [C] input.
  t = target_like_input ? t.reshape(x.sizes()) : t.reshape({B * N});
  return {x, t, B, N, one_d, zero_d};
}

// [B*N] per-row losses -> the op's output for `reduction`, per batch element. `unbatched_none`:
// the op's 'none' output for one element has no N dim.
Tensor reduceRows(const Tensor& rows, const Folded& f, int64_t reduction, bool unbatched_none) {
  Tensor l = rows.view({f.B, f.N});
  if (reduction == kNone) return unbatched_none ? l.squeeze(1) : l;
  return reduction == kSum ? l.sum(1) : l.mean(1);
}

// grad_output of the op for `reduction` -> the per-row grad_output of reduction='none', [B*N].
Tensor rowsGrad(const Tensor& grad_out, bdim_t gbd, const Folded& f, int64_t reduction) {
  Tensor g = materializeBdimFront(grad_out, gbd, f.B);
  if (reduction == kNone) return g.reshape({f.B * f.N});
  g = g.reshape({f.B, 1}).expand({f.B, f.N});
  if (reduction == kMean) g = g.div(f.N);
  return g.reshape({f.B * f.N});
}

Tensor unfoldRows(const Tensor& grad, const Folded& f) {
  if (f.zero_d) return grad.reshape({f.B});
  Tensor g = grad.view({f.B, f.N, -1});
  return f.one_d ? g.squeeze(1) : g;
}

// The CPU kernel scales each row's loss (and gradient) by weight[target]: a batched weight is that
// factor applied after an unweighted run.
Tensor targetWeight(const std::optional<Tensor>& weight, bdim_t wbd, const Folded& f) {
  Tensor w = moveBdimToFront(*weight, wbd);  // [B, C]
  return w.gather(1, f.t.view({f.B, f.N})).reshape({f.B * f.N});
}

std::tuple<Tensor, bdim_t> multiMarginRule(const Tensor& self, bdim_t sbd, const Tensor& target, bdim_t tbd,
                                           const c10::Scalar& p, const c10::Scalar& margin,
                                           const std::optional<Tensor>& weight, bdim_t wbd,
                                           int64_t reduction) {
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&target, tbd}, {weight ? &*weight : &self, wbd}});
  Folded f = foldMargin(self, sbd, target, tbd, B, false, "multi_margin_loss");
  Tensor rows = at::_ops::multi_margin_loss::call(f.x, f.t, p, margin, wbd ? std::nullopt : weight, kNone);
  if (wbd) rows = rows.mul(targetWeight(weight, wbd, f));
  // torch's 'none' output is [N] whenever the target has a dim, also for a [C] (or scalar) input
  // with a [1] target, and a scalar for a 0-D target (a [C] input, or a [1, C] one).
  return {reduceRows(rows, f, reduction, rankWithoutBdim(target, tbd) == 0), 0};
}

std::tuple<Tensor, bdim_t> multiMarginBackwardRule(const Tensor& grad_out, bdim_t gbd, const Tensor& self,
                                                   bdim_t sbd, const Tensor& target, bdim_t tbd,
                                                   const c10::Scalar& p, const c10::Scalar& margin,
                                                   const std::optional<Tensor>& weight, bdim_t wbd,
                                                   int64_t reduction) {
  const int64_t B =
      batchSizeOf({{&grad_out, gbd}, {&self, sbd}, {&target, tbd}, {weight ? &*weight : &self, wbd}})
          .guard_int(__FILE__, __LINE__);
  Folded f = foldMargin(self, sbd, target, tbd, B, false, "multi_margin_loss_backward");
  Tensor g = rowsGrad(grad_out, gbd, f, reduction);
  if (wbd) g = g.mul(targetWeight(weight, wbd, f));
  Tensor grad =
      at::_ops::multi_margin_loss_backward::call(g, f.x, f.t, p, margin, wbd ? std::nullopt : weight, kNone);
  return {unfoldRows(grad, f), 0};
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t> multilabelMarginRule(const Tensor& self, bdim_t sbd,
                                                                const Tensor& target, bdim_t tbd,
                                                                int64_t reduction) {
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&target, tbd}});
  Folded f = foldMargin(self, sbd, target, tbd, B, true, "multilabel_margin_loss");
  auto [rows, is_target] = at::_ops::multilabel_margin_loss_forward::call(f.x, f.t, kNone);
  // torch's 'none' output has no N dim for an input without one (its target has the input's shape).
  return {reduceRows(rows, f, reduction, f.one_d), 0, unfoldRows(is_target, f), 0};
}

std::tuple<Tensor, bdim_t> multilabelMarginBackwardRule(const Tensor& grad_out, bdim_t gbd,
                                                        const Tensor& self, bdim_t sbd, const Tensor& target,
                                                        bdim_t tbd, int64_t reduction,
                                                        const Tensor& is_target, bdim_t ibd) {
  const c10::SymInt B = batchSizeOf({{&grad_out, gbd}, {&self, sbd}, {&target, tbd}, {&is_target, ibd}});
  Folded f = foldMargin(self, sbd, target, tbd, B, true, "multilabel_margin_loss_backward");
  Tensor it = materializeBdimFront(is_target, ibd, B).reshape(f.x.sizes());
  Tensor grad = at::_ops::multilabel_margin_loss_backward::call(rowsGrad(grad_out, gbd, f, reduction), f.x,
                                                                f.t, kNone, it);
  return {unfoldRows(grad, f), 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::nll_loss_forward, &nllForwardRule>(m);
  registerVmapRule<at::_ops::nll_loss_backward, &nllBackwardRule>(m);
  registerVmapRule<at::_ops::nll_loss2d_forward, &nll2dForwardRule>(m);
  registerVmapRule<at::_ops::nll_loss2d_backward, &nll2dBackwardRule>(m);
  // clang-format off
  registerFamily<PointwiseLoss,
      at::_ops::huber_loss,
      at::_ops::mse_loss,
      at::_ops::smooth_l1_loss,
      at::_ops::soft_margin_loss>(m);
  // clang-format on
  // clang-format off
  registerFamily<PointwiseLossBackward,
      at::_ops::huber_loss_backward,
      at::_ops::mse_loss_backward,
      at::_ops::smooth_l1_loss_backward,
      at::_ops::soft_margin_loss_backward>(m);
  // clang-format on
  registerVmapRule<at::_ops::multi_margin_loss, &multiMarginRule>(m);
  registerVmapRule<at::_ops::multi_margin_loss_backward, &multiMarginBackwardRule>(m);
  registerVmapRule<at::_ops::multilabel_margin_loss_forward, &multilabelMarginRule>(m);
  registerVmapRule<at::_ops::multilabel_margin_loss_backward, &multilabelMarginBackwardRule>(m);
  registerVmapRule<at::_ops::binary_cross_entropy, &bceRule>(m);
  registerVmapRule<at::_ops::binary_cross_entropy_backward, &bceBackwardRule>(m);
  registerVmapRule<at::_ops::binary_cross_entropy_with_logits, &bceLogitsRule>(m);
}

}  // namespace ftl
