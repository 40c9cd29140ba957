// Batching rules: normalization layers. layer_norm: normalized dims are trailing, so the batch
// dim at the front is one more leading dim, except for the per-element weight and bias
// gradients, which must not sum over it: those are computed from x_hat = (x - mean) * rstd.
// batch_norm and group_norm: statistics are per channel (per group of channels), taken over N and
// the spatial dims, so the vmap batch moves into the channel dim: [B, N, C, *] -> [N, B*C, *]
// (group norm: B*G groups). Each batch element then gets its own statistics, per-channel
// arguments (weight, bias, running stats) may be batched themselves ([B, C] -> [B*C]), and the
// per-channel gradients come back per element ([B*C] -> [B, C]).
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

// These rules count in numbers: a symbolic batch size is specialized here (guard_int), which
// recompiles per batch size (NOTE [Symbolic batch sizes] in levels.h).

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> layerNormRule(
    const Tensor& x, bdim_t xbd, c10::SymIntArrayRef shape, const std::optional<Tensor>& w, bdim_t wbd,
    const std::optional<Tensor>& b, bdim_t bbd, double eps) {
  const int64_t B =
      batchSizeOf({{&x, xbd}, {w ? &*w : &x, wbd}, {b ? &*b : &x, bbd}}).guard_int(__FILE__, __LINE__);
  Tensor xp = materializeBdimFront(x, xbd, B);
  const int64_t k = static_cast<int64_t>(shape.size());
  // weight and bias have exactly normalized_shape, for every element
  auto fits = [&](const std::optional<Tensor>& t, bdim_t bd) {
    if (!t || !t->defined()) return true;
    Tensor e = bd ? exampleOf(*t, *bd, 0) : *t;
    return e.sym_sizes() == shape;
  };
  if (xp.dim() - 1 < k || xp.sym_sizes().slice(xp.dim() - k) != shape || !fits(w, wbd) || !fits(b, bbd)) {
    // torch's error names the input's size: that of one element, not the batch
    auto one = [](const std::optional<Tensor>& t, bdim_t bd) {
      return t && t->defined() && bd ? std::optional<Tensor>(exampleOf(*t, *bd, 0)) : t;
    };
    raiseForElement(
        [&] { at::native_layer_norm_symint(exampleOf(xp, 0, 0), shape, one(w, wbd), one(b, bbd), eps); },
        "layer_norm", "the input's trailing dims, weight and bias must have normalized_shape");
  }
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
  const c10::SymInt B = batchSizeOf(
      {{&grad, gbd}, {&x, xbd}, {&mean, mbd}, {&rstd, rbd}, {w ? &*w : &x, wbd}, {b ? &*b : &x, bbd}});
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
      gi = std::get<0>(at::native_layer_norm_backward_symint(g.mul(wp), xp, shape, mu, rs, std::nullopt,
                                                             std::nullopt, {true, false, false}));
    } else {
      gi = std::get<0>(
          at::native_layer_norm_backward_symint(g, xp, shape, mu, rs, w, b, {true, false, false}));
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

// ---- batch norm and group norm: the vmap batch folded into the channel dim.
// [B, N, C, *] (or unbatched [N, C, *], copied B times) -> [N, B*C, *]. Also folds the group
// norm statistics [B, N, G] -> [N, B*G]. The CPU kernels want dense inputs.
Tensor batchIntoChannels(const Tensor& t, bdim_t bd, int64_t B) {
  return materializeBdimFront(t, bd, B).movedim(0, 1).flatten(1, 2).contiguous();
}

// Per-channel [B, C] or unbatched [C] -> [B*C]. Eval-mode batch norm saves empty statistics,
// which stay as they are. Dense, always: the CPU kernels read these as plain buffers, and an
// unbatched [1] expanded to [B, 1] reshapes to a stride-0 view (no copy), from which
// native_batch_norm_backward read past the one element (garbage in jacrev of batch norm, C == 1).
std::optional<Tensor> perChannelFlat(const std::optional<Tensor>& t, bdim_t bd, int64_t B) {
  if (!t || !t->defined()) return std::nullopt;
  if (!bd && t->numel() == 0) return t;
  return materializeBdimFront(*t, bd, B).reshape({-1}).contiguous();
}

// [B*C] -> [B, C] at bdim 0; anything else (empty eval-mode statistics, undefined) unbatched.
std::tuple<Tensor, bdim_t> perChannelOut(const Tensor& t, int64_t B, int64_t C) {
  if (!t.defined() || t.dim() != 1 || t.numel() != B * C) return {t, std::nullopt};
  return {t.view({B, C}), 0};
}

// [N, B*C, *] -> [N, B, C, *] at bdim 1.
std::tuple<Tensor, bdim_t> channelsOut(const Tensor& t, int64_t B, int64_t C) {
  if (!t.defined()) return {t, std::nullopt};
  return {t.unflatten(1, {B, C}), 1};
}

int64_t channelsOf(const Tensor& x, bdim_t xbd, const char* op) {
  TORCH_CHECK(rankWithoutBdim(x, xbd) >= 2, op,
              " under vmap: expected an input of at least 2 "
              "dims (N, C, ...) per batch element, got ",
              rankWithoutBdim(x, xbd));
  return moveBdimToFront(x, xbd).size(xbd ? 2 : 1);
}

// Training mode updates running_mean/running_var in place, and the schema does not say so (so
// the fallback's mutated-argument check cannot see it): an unbatched buffer cannot take one
// update per batch element.
void checkRunningStatsBatched(bool training, const std::optional<Tensor>& rm, bdim_t rmbd,
                              const std::optional<Tensor>& rv, bdim_t rvbd) {
  if (!training) return;
  const bool unbatched = (rm && rm->defined() && !rmbd) || (rv && rv->defined() && !rvbd);
  TORCH_CHECK(!unbatched,
              "functorch_lite.vmap: batch norm in training mode would update its "
              "running_mean/running_var once per batch element, but they are not batched. "
              "Options: call model.eval() (use the running stats), build the BatchNorm with "
              "track_running_stats=False, use GroupNorm/LayerNorm instead, or pass batched "
              "buffers (e.g. functional_call with stacked buffers).");
}

// The op updated the flat [B*C] copy; when reshaping could not give a view, copy it back.
void writeBackRunningStat(const std::optional<Tensor>& stat, bdim_t bd, const std::optional<Tensor>& flat,
                          int64_t B, int64_t C) {
  if (!stat || !stat->defined() || !bd || flat->is_alias_of(*stat)) return;
  moveBdimToFront(*stat, bd).copy_(flat->view({B, C}));
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> batchNormRule(
    const Tensor& x, bdim_t xbd, const std::optional<Tensor>& w, bdim_t wbd, const std::optional<Tensor>& b,
    bdim_t bbd, const std::optional<Tensor>& rm, bdim_t rmbd, const std::optional<Tensor>& rv, bdim_t rvbd,
    bool training, double momentum, double eps) {
  checkRunningStatsBatched(training, rm, rmbd, rv, rvbd);
  const int64_t B = batchSizeOf({{&x, xbd},
                                 {w ? &*w : &x, wbd},
                                 {b ? &*b : &x, bbd},
                                 {rm ? &*rm : &x, rmbd},
                                 {rv ? &*rv : &x, rvbd}})
                        .guard_int(__FILE__, __LINE__);
  const int64_t C = channelsOf(x, xbd, "native_batch_norm");
  auto rmf = perChannelFlat(rm, rmbd, B), rvf = perChannelFlat(rv, rvbd, B);
  auto [y, mean, invstd] =
      at::native_batch_norm(batchIntoChannels(x, xbd, B), perChannelFlat(w, wbd, B),
                            perChannelFlat(b, bbd, B), rmf, rvf, training, momentum, eps);
  if (training) {
    writeBackRunningStat(rm, rmbd, rmf, B, C);
    writeBackRunningStat(rv, rvbd, rvf, B, C);
  }
  return std::tuple_cat(channelsOut(y, B, C), perChannelOut(mean, B, C), perChannelOut(invstd, B, C));
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> batchNormBackwardRule(
    const Tensor& g, bdim_t gbd, const Tensor& x, bdim_t xbd, const std::optional<Tensor>& w, bdim_t wbd,
    const std::optional<Tensor>& rm, bdim_t rmbd, const std::optional<Tensor>& rv, bdim_t rvbd,
    const std::optional<Tensor>& sm, bdim_t smbd, const std::optional<Tensor>& si, bdim_t sibd, bool train,
    double eps, std::array<bool, 3> mask) {
  const int64_t B = batchSizeOf({{&g, gbd},
                                 {&x, xbd},
                                 {w ? &*w : &x, wbd},
                                 {rm ? &*rm : &x, rmbd},
                                 {rv ? &*rv : &x, rvbd},
                                 {sm ? &*sm : &x, smbd},
                                 {si ? &*si : &x, sibd}})
                        .guard_int(__FILE__, __LINE__);
  const int64_t C = channelsOf(x, xbd, "native_batch_norm_backward");
  auto [gi, gw, gb] = at::native_batch_norm_backward(
      batchIntoChannels(g, gbd, B), batchIntoChannels(x, xbd, B), perChannelFlat(w, wbd, B),
      perChannelFlat(rm, rmbd, B), perChannelFlat(rv, rvbd, B), perChannelFlat(sm, smbd, B),
      perChannelFlat(si, sibd, B), train, eps, mask);
  return std::tuple_cat(channelsOut(gi, B, C), perChannelOut(gw, B, C), perChannelOut(gb, B, C));
}

// On CUDA (ROCm) torch's batch_norm picks cudnn_batch_norm (miopen_batch_norm) when it can: the
// same math, with save_var holding the inverse std like native_batch_norm's invstd. Under vmap
// they run as native_batch_norm on the folded tensors (cuDNN would see B*C channels, fine, but
// its workspace would belong to the folded call anyway), so the running-stats check and the
// per-element statistics are the same on every device. The cuDNN workspace comes back empty;
// our backward rule does not need it.
std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> cudnnBatchNormRule(
    const Tensor& x, bdim_t xbd, const Tensor& w, bdim_t wbd, const std::optional<Tensor>& b, bdim_t bbd,
    const std::optional<Tensor>& rm, bdim_t rmbd, const std::optional<Tensor>& rv, bdim_t rvbd, bool training,
    double factor, double eps) {
  return std::tuple_cat(batchNormRule(x, xbd, w, wbd, b, bbd, rm, rmbd, rv, rvbd, training, factor, eps),
                        std::make_tuple(at::empty({0}, x.options().dtype(at::kByte)), bdim_t()));
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> miopenBatchNormRule(
    const Tensor& x, bdim_t xbd, const Tensor& w, bdim_t wbd, const std::optional<Tensor>& b, bdim_t bbd,
    const std::optional<Tensor>& rm, bdim_t rmbd, const std::optional<Tensor>& rv, bdim_t rvbd, bool training,
    double factor, double eps) {
  return batchNormRule(x, xbd, w, wbd, b, bbd, rm, rmbd, rv, rvbd, training, factor, eps);
}

// Only the training-mode backward goes through these (torch's formula uses
// native_batch_norm_backward in eval mode).
std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> miopenBatchNormBackwardRule(
    const Tensor& x, bdim_t xbd, const Tensor& g, bdim_t gbd, const Tensor& w, bdim_t wbd,
    const std::optional<Tensor>& rm, bdim_t rmbd, const std::optional<Tensor>& rv, bdim_t rvbd,
    const std::optional<Tensor>& sm, bdim_t smbd, const std::optional<Tensor>& si, bdim_t sibd, double eps) {
  return batchNormBackwardRule(g, gbd, x, xbd, w, wbd, rm, rmbd, rv, rvbd, sm, smbd, si, sibd,
                               /*train=*/true, eps, {true, true, true});
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> cudnnBatchNormBackwardRule(
    const Tensor& x, bdim_t xbd, const Tensor& g, bdim_t gbd, const Tensor& w, bdim_t wbd,
    const std::optional<Tensor>& rm, bdim_t rmbd, const std::optional<Tensor>& rv, bdim_t rvbd,
    const std::optional<Tensor>& sm, bdim_t smbd, const std::optional<Tensor>& si, bdim_t sibd, double eps,
    const Tensor& /*workspace*/, bdim_t) {
  return miopenBatchNormBackwardRule(x, xbd, g, gbd, w, wbd, rm, rmbd, rv, rvbd, sm, smbd, si, sibd, eps);
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> groupNormRule(
    const Tensor& x, bdim_t xbd, const std::optional<Tensor>& w, bdim_t wbd, const std::optional<Tensor>& b,
    bdim_t bbd, c10::SymInt N, c10::SymInt C, c10::SymInt HxW, int64_t group, double eps) {
  const int64_t B =
      batchSizeOf({{&x, xbd}, {w ? &*w : &x, wbd}, {b ? &*b : &x, bbd}}).guard_int(__FILE__, __LINE__);
  const int64_t c = C.expect_int();
  auto [y, mean, rstd] =
      at::native_group_norm_symint(batchIntoChannels(x, xbd, B), perChannelFlat(w, wbd, B),
                                   perChannelFlat(b, bbd, B), N, C * B, HxW, group * B, eps);
  return std::tuple_cat(channelsOut(y, B, c), channelsOut(mean, B, group), channelsOut(rstd, B, group));
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> groupNormBackwardRule(
    const Tensor& g, bdim_t gbd, const Tensor& x, bdim_t xbd, const Tensor& mean, bdim_t mbd,
    const Tensor& rstd, bdim_t rbd, const std::optional<Tensor>& w, bdim_t wbd, c10::SymInt N, c10::SymInt C,
    c10::SymInt HxW, int64_t group, std::array<bool, 3> mask) {
  const int64_t B = batchSizeOf({{&g, gbd}, {&x, xbd}, {&mean, mbd}, {&rstd, rbd}, {w ? &*w : &x, wbd}})
                        .guard_int(__FILE__, __LINE__);
  const int64_t c = C.expect_int();
  auto [gi, gw, gb] = at::native_group_norm_backward_symint(
      batchIntoChannels(g, gbd, B), batchIntoChannels(x, xbd, B), batchIntoChannels(mean, mbd, B),
      batchIntoChannels(rstd, rbd, B), perChannelFlat(w, wbd, B), N, C * B, HxW, group * B, mask);
  return std::tuple_cat(channelsOut(gi, B, c), perChannelOut(gw, B, c), perChannelOut(gb, B, c));
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::native_layer_norm, &layerNormRule>(m);
  registerVmapRule<at::_ops::native_layer_norm_backward, &layerNormBackwardRule>(m);
  // Inputs of fewer than 2 dims (N, C) per element run per element: torch raises its own error.
  using NC = R<2, kAnyRank>;
  registerVmapRule<at::_ops::native_batch_norm, &batchNormRule, RankIn<NC>>(m);
  registerVmapRule<at::_ops::native_batch_norm_backward, &batchNormBackwardRule, RankIn<NC, NC>>(m);
  registerVmapRule<at::_ops::cudnn_batch_norm, &cudnnBatchNormRule, RankIn<NC>>(m);
  registerVmapRule<at::_ops::cudnn_batch_norm_backward, &cudnnBatchNormBackwardRule, RankIn<NC, NC>>(m);
  registerVmapRule<at::_ops::miopen_batch_norm, &miopenBatchNormRule, RankIn<NC>>(m);
  registerVmapRule<at::_ops::miopen_batch_norm_backward, &miopenBatchNormBackwardRule, RankIn<NC, NC>>(m);
  registerVmapRule<at::_ops::native_group_norm, &groupNormRule, RankIn<NC>>(m);
  registerVmapRule<at::_ops::native_group_norm_backward, &groupNormBackwardRule, RankIn<NC, NC>>(m);
}

}  // namespace ftl
