// Batching rules: padding. constant_pad_nd pads the last len(pad)/2 dims of any tensor, so the
// batch dim only has to be in front (where it is never padded). The reflection and replication
// pads (and their backward ops) take [N, C, *K dims] or [C, *K dims] like pooling, so they use the
// fold-into-N kernel. Circular padding is composite (narrow + cat) and needs no rule.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/fold_n.h"

namespace ftl {
namespace {

std::tuple<Tensor, bdim_t> constantPadRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef pad,
                                           const c10::Scalar& value) {
  const int64_t r = rankWithoutBdim(x, bd);
  TORCH_CHECK(pad.size() % 2 == 0,
              "constant_pad_nd: length of pad must be even but instead it "
              "equals ",
              pad.size());
  TORCH_CHECK(static_cast<int64_t>(pad.size() / 2) <= r,
              "constant_pad_nd: length of pad should "
              "be no more than twice the number of dimensions of the input (",
              r, "), got ", pad.size());
  return {at::_ops::constant_pad_nd::call(moveBdimToFront(x, bd), pad, value), 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::constant_pad_nd, &constantPadRule>(m);
  registerFoldN<1, at::_ops::reflection_pad1d, at::_ops::reflection_pad1d_backward,
                at::_ops::replication_pad1d, at::_ops::replication_pad1d_backward>(m);
  registerFoldN<2, at::_ops::reflection_pad2d, at::_ops::reflection_pad2d_backward,
                at::_ops::replication_pad2d, at::_ops::replication_pad2d_backward>(m);
  registerFoldN<3, at::_ops::reflection_pad3d, at::_ops::reflection_pad3d_backward,
                at::_ops::replication_pad3d, at::_ops::replication_pad3d_backward>(m);
}

}  // namespace ftl
