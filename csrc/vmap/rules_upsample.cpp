// Batching rules: upsampling (F.interpolate) and grid_sample. The upsample ops take [N, C, *K]
// only, and treat every (n, c) plane alike, so the vmap batch folds into N: [B, N, ...] ->
// [B*N, ...]. Their backward ops get the input's size, N included, as an argument: its N becomes
// B*N. (The .vec overloads are composite and reach these.)
// grid_sampler_2d/3d take input [N, C, *K] and grid [N, *K_out, K]; both fold into N (an unbatched
// one is expanded first), so every element samples its own input with its own grid.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/fold_n.h"

namespace ftl {
namespace {

template <class Op, class Sig = typename Op::schema>
struct Upsample;
template <class Op, class... Extra>
struct Upsample<Op, Tensor(const Tensor&, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, Extra... e) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t B = p.size(0);
    return {Op::call(p.flatten(0, 1), e...).unflatten(0, {B, p.size(1)}), 0};
  }
};

template <class Op, class Sig = typename Op::schema>
struct UpsampleBackward;
template <class Op, class... Extra>
struct UpsampleBackward<Op, Tensor(const Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& g, bdim_t bd, c10::SymIntArrayRef out_size,
                                         c10::SymIntArrayRef in_size, Extra... e) {
    Tensor p = moveBdimToFront(g, bd);
    const int64_t B = p.size(0);
    TORCH_CHECK(!in_size.empty(), opName<Op>(), ": input_size must not be empty");
    c10::SmallVector<c10::SymInt, 5> folded(in_size.begin(), in_size.end());
    folded[0] = folded[0] * B;
    return {Op::call(p.flatten(0, 1), out_size, folded, e...).unflatten(0, {B, p.size(1)}), 0};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // clang-format off
  registerFamily<Upsample,
      at::_ops::_upsample_bicubic2d_aa,
      at::_ops::_upsample_bilinear2d_aa,
      at::_ops::_upsample_nearest_exact1d,
      at::_ops::_upsample_nearest_exact2d,
      at::_ops::_upsample_nearest_exact3d,
      at::_ops::upsample_bicubic2d,
      at::_ops::upsample_bilinear2d,
      at::_ops::upsample_linear1d,
      at::_ops::upsample_nearest1d,
      at::_ops::upsample_nearest2d,
      at::_ops::upsample_nearest3d,
      at::_ops::upsample_trilinear3d>(m);
  // clang-format on
  // clang-format off
  registerFamily<UpsampleBackward,
      at::_ops::_upsample_bicubic2d_aa_backward,
      at::_ops::_upsample_bilinear2d_aa_backward,
      at::_ops::_upsample_nearest_exact1d_backward,
      at::_ops::_upsample_nearest_exact2d_backward,
      at::_ops::_upsample_nearest_exact3d_backward,
      at::_ops::upsample_bicubic2d_backward,
      at::_ops::upsample_bilinear2d_backward,
      at::_ops::upsample_linear1d_backward,
      at::_ops::upsample_nearest1d_backward,
      at::_ops::upsample_nearest2d_backward,
      at::_ops::upsample_nearest3d_backward,
      at::_ops::upsample_trilinear3d_backward>(m);
  // clang-format on
  registerFoldN<2, at::_ops::grid_sampler_2d, at::_ops::grid_sampler_2d_backward>(m);
  registerFoldN<3, at::_ops::grid_sampler_3d, at::_ops::grid_sampler_3d_backward>(m);
}

}  // namespace ftl
