// Batching rules: pooling ops and their backward ops, max_unpool, and im2col/col2im
// (F.unfold/F.fold). Every tensor argument has the layout [N, C, *spatial] or, unbatched,
// [C, *spatial], with K spatial dims fixed by the op, so they all use the fold-into-N kernel of
// fold_n.h. col2im's input [N, C*k, L] counts as K = 1.
// max_pool1d and max_pool1d_with_indices are composite, but their CPU kernels read raw data, so
// the fallback cannot decompose them: they get the kernel here and run below on plain tensors.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/fold_n.h"

namespace ftl {

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerFoldN<1, at::_ops::max_pool1d, at::_ops::max_pool1d_with_indices, at::_ops::col2im>(m);
  registerFoldN<2, at::_ops::max_pool2d_with_indices, at::_ops::max_pool2d_with_indices_backward,
                at::_ops::avg_pool2d, at::_ops::avg_pool2d_backward, at::_ops::_adaptive_avg_pool2d,
                at::_ops::_adaptive_avg_pool2d_backward, at::_ops::adaptive_max_pool2d,
                at::_ops::adaptive_max_pool2d_backward, at::_ops::max_unpool2d, at::_ops::im2col>(m);
  registerFoldN<3, at::_ops::max_pool3d_with_indices, at::_ops::max_pool3d_with_indices_backward,
                at::_ops::avg_pool3d, at::_ops::avg_pool3d_backward, at::_ops::_adaptive_avg_pool3d,
                at::_ops::_adaptive_avg_pool3d_backward, at::_ops::adaptive_max_pool3d,
                at::_ops::adaptive_max_pool3d_backward, at::_ops::max_unpool3d>(m);
}

}  // namespace ftl
