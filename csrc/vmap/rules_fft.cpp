// Batching rules: the FFT primitives every torch.fft function lowers to (_fft_r2c, _fft_c2c,
// _fft_c2r). They transform over an explicit list of dims, so the batch dim goes to the front and
// the listed dims shift past it; the batch dim itself is never transformed.
#include <ATen/WrapDimUtils.h>
#include <ATen/ops/_fft_c2c_ops.h>
#include <ATen/ops/_fft_c2r_ops.h>
#include <ATen/ops/_fft_r2c_ops.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

int64_t dimValue(int64_t d) {
  return d;
}
int64_t dimValue(const c10::SymInt& d) {
  return d.guard_int(__FILE__, __LINE__);
}

template <class Op, class Sig = typename Op::schema>
struct Fft;
template <class Op, class Dims, class... Extra>
struct Fft<Op, Tensor(const Tensor&, Dims, int64_t, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, Dims dims, int64_t normalization,
                                         Extra... e) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t rank = p.dim() - 1;
    using Elem = std::remove_cv_t<std::remove_reference_t<decltype(dims[0])>>;
    c10::SmallVector<Elem, 4> shifted;
    for (const auto& d : dims) shifted.push_back(Elem(c10::maybe_wrap_dim(dimValue(d), rank) + 1));
    return {Op::call(p, shifted, normalization, e...), 0};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // clang-format off
  registerFamily<Fft,
      at::_ops::_fft_c2c,
      at::_ops::_fft_c2r,
      at::_ops::_fft_r2c>(m);
  // clang-format on
}

}  // namespace ftl
