// Batching rules: convolution and convolution_backward (conv1d/2d/3d and transposed forms all
// reach these two ops). Two tricks cover every case:
// - only the input is batched: fold the vmap batch into the conv's own batch dim N;
// - the weight is batched (ensembles) or a per-sample weight gradient is wanted: fold the vmap
//   batch into the channel dim and multiply `groups` by B, so one grouped conv runs B convs.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

using SymIntRef = c10::SymIntArrayRef;

// Sizes as SymInts: a traced batch stays symbolic (NOTE [Symbolic batch sizes] in levels.h).
// [B, N, C, ...] -> [B*N, C, ...]
Tensor foldBatchIntoN(const Tensor& x) {
  c10::SymDimVector s(x.sym_sizes().begin() + 1, x.sym_sizes().end());
  s[0] = x.sym_size(0) * x.sym_size(1);
  return x.reshape_symint(s);
}
// [M, ...] -> [B, M/B, ...]
Tensor unfoldDim0(const Tensor& x, const c10::SymInt& B) {
  c10::SymDimVector s(x.sym_sizes().begin(), x.sym_sizes().end());
  s[0] = x.sym_size(0) / B;
  s.insert(s.begin(), B);
  return x.view_symint(s);
}
// [B, N, C, ...] -> [N, B*C, ...]
Tensor foldBatchIntoChannels(const Tensor& x) {
  Tensor t = x.transpose(0, 1);  // [N, B, C, ...]
  c10::SymDimVector s(t.sym_sizes().begin(), t.sym_sizes().end());
  s[1] = s[1] * s[2];
  s.erase(s.begin() + 2);
  return t.reshape_symint(s);
}
// [N, B*C, ...] -> [B, N, C, ...]
Tensor unfoldChannels(const Tensor& x, const c10::SymInt& B) {
  c10::SymDimVector s(x.sym_sizes().begin(), x.sym_sizes().end());
  s[1] = x.sym_size(1) / B;
  s.insert(s.begin() + 1, B);
  return x.view_symint(s).transpose(0, 1);
}

std::tuple<Tensor, bdim_t> convolutionRule(const Tensor& input, bdim_t ibd, const Tensor& weight, bdim_t wbd,
                                           const std::optional<Tensor>& bias, bdim_t bbd, SymIntRef stride,
                                           SymIntRef padding, SymIntRef dilation, bool transposed,
                                           SymIntRef output_padding, c10::SymInt groups) {
  const c10::SymInt B = batchSizeOf({{&input, ibd}, {&weight, wbd}, {bias ? &*bias : &input, bbd}});
  if (!wbd && !bbd) {
    Tensor x = foldBatchIntoN(moveBdimToFront(input, ibd));
    Tensor out = at::convolution_symint(x, weight, bias, stride, padding, dilation, transposed,
                                        output_padding, groups);
    return {unfoldDim0(out, B), 0};
  }
  // Grouped-conv trick: weight [B, O, C/g, k...] -> [B*O, C/g, k...] (transposed: [B*C, O/g, k...]).
  Tensor x = foldBatchIntoChannels(materializeBdimFront(input, ibd, B));
  Tensor w = foldBatchIntoN(materializeBdimFront(weight, wbd, B));
  std::optional<Tensor> b;
  if (bias.has_value() && bias->defined()) b = materializeBdimFront(*bias, bbd, B).reshape({-1});
  Tensor out =
      at::convolution_symint(x, w, b, stride, padding, dilation, transposed, output_padding, groups * B);
  return {unfoldChannels(out, B), 0};
}

std::tuple<Tensor, bdim_t, Tensor, bdim_t, Tensor, bdim_t> convolutionBackwardRule(
    const Tensor& grad_out, bdim_t gbd, const Tensor& input, bdim_t ibd, const Tensor& weight, bdim_t wbd,
    at::OptionalSymIntArrayRef bias_sizes, SymIntRef stride, SymIntRef padding, SymIntRef dilation,
    bool transposed, SymIntRef output_padding, c10::SymInt groups, std::array<bool, 3> mask) {
  const c10::SymInt B = batchSizeOf({{&grad_out, gbd}, {&input, ibd}, {&weight, wbd}});
  Tensor gi, gw, gb;
  bdim_t gibd, gwbd, gbbd;
  if (mask[0]) {
    if (!wbd) {
      // Only the weight is shared: fold the batch into N.
      Tensor g = foldBatchIntoN(materializeBdimFront(grad_out, gbd, B));
      Tensor x = foldBatchIntoN(materializeBdimFront(input, ibd, B));
      gi = std::get<0>(at::convolution_backward_symint(g, x, weight, std::nullopt, stride, padding, dilation,
                                                       transposed, output_padding, groups,
                                                       {true, false, false}));
      gi = unfoldDim0(gi, B);
    } else {
      Tensor g = foldBatchIntoChannels(materializeBdimFront(grad_out, gbd, B));
      Tensor x = foldBatchIntoChannels(materializeBdimFront(input, ibd, B));
      Tensor w = foldBatchIntoN(moveBdimToFront(weight, wbd));
      gi = std::get<0>(at::convolution_backward_symint(g, x, w, std::nullopt, stride, padding, dilation,
                                                       transposed, output_padding, groups * B,
                                                       {true, false, false}));
      gi = unfoldChannels(gi, B);
    }
    gibd = 0;
  }
  if (mask[1]) {
    if (!gbd && !ibd) {
      // Neither depends on the batch: the weight gradient is the same for every element.
      gw = std::get<1>(at::convolution_backward_symint(grad_out, input, weight, std::nullopt, stride, padding,
                                                       dilation, transposed, output_padding, groups,
                                                       {false, true, false}));
    } else {
      // Per-element weight gradients: one grouped conv backward over B*groups groups.
      Tensor g = foldBatchIntoChannels(materializeBdimFront(grad_out, gbd, B));
      Tensor x = foldBatchIntoChannels(materializeBdimFront(input, ibd, B));
      Tensor w = foldBatchIntoN(materializeBdimFront(weight, wbd, B));
      gw = std::get<1>(at::convolution_backward_symint(g, x, w, std::nullopt, stride, padding, dilation,
                                                       transposed, output_padding, groups * B,
                                                       {false, true, false}));
      gw = unfoldDim0(gw, B);
      gwbd = 0;
    }
  }
  if (mask[2]) {
    // d(bias) = grad_out summed over N and every spatial dim.
    Tensor g = moveBdimToFront(grad_out, gbd);
    c10::SmallVector<int64_t, 6> dims;
    const int64_t first = gbd ? 1 : 0;
    dims.push_back(first);
    for (int64_t d = first + 2; d < g.dim(); ++d) dims.push_back(d);
    gb = g.sum(dims);
    if (gbd) gbbd = 0;
  }
  return {gi, gibd, gw, gwbd, gb, gbbd};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // Other ranks (a weight of fewer than 3 dims, a bias that is not a vector) run per element,
  // where torch raises its own error.
  using AtLeast3 = R<3, kAnyRank>;
  registerVmapRule<at::_ops::convolution, &convolutionRule, RankIn<AtLeast3, AtLeast3, R<1>>>(m);
  registerVmapRule<at::_ops::convolution_backward, &convolutionBackwardRule,
                   RankIn<AtLeast3, AtLeast3, AtLeast3>>(m);
}

}  // namespace ftl
