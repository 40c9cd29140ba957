// Batching rules: reductions and scans over dims (sum, mean, prod, amax/amin, max/min with indices,
// argmax/argmin, var/std and var_mean/std_mean, norms, median, aminmax, count_nonzero, renorm,
// logsumexp, all/any, cumsum/cumprod, sort, softmax and their backward ops).
// The batch dim goes to the front and every logical dim shifts by one. A logical scalar (0-dim)
// is first given a unit dim so that "reduce every dim" never reduces the batch dim.
#include <ATen/Functions.h>
#include <ATen/Operators.h>
#include <ATen/WrapDimUtils.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

Tensor flatBatch(const Tensor& x, bdim_t bd) {
  return flattenAfterBatch(moveBdimToFront(x, bd));
}

// A logical scalar is reduced as a [B, 1] tensor; a kept unit dim is dropped again.
inline Tensor dropScalarDim(const Tensor& t) {
  return t.dim() == 2 ? t.squeeze(1) : t;
}
template <class Ret>
auto pairsAt0(Ret r, bool scalar) {
  auto fix = [&](Tensor t) { return scalar ? dropScalarDim(t) : t; };
  if constexpr (std::is_same_v<Ret, Tensor>) {
    return std::make_tuple(fix(r), bdim_t(0));
  } else {
    return std::make_tuple(fix(std::get<0>(r)), bdim_t(0), fix(std::get<1>(r)), bdim_t(0));
  }
}

// Logical dims to physical ones past a leading batch dim; none (or empty) means all of them.
c10::SmallVector<int64_t, 8> physicalDims(at::OptionalIntArrayRef dim, int64_t lr) {
  c10::SmallVector<int64_t, 8> dims;
  if (!dim.has_value() || dim->empty()) {
    for (int64_t d = 1; d <= lr; ++d) dims.push_back(d);
  } else {
    for (int64_t d : *dim) dims.push_back(physicalDim(d, lr, true));
  }
  return dims;
}

// Ops taking a list of dims as their second argument (int[]? or int[]); empty/None means all.
// One output (sum, var, ...) or two (var_mean, std_mean).
template <class Op, class Sig = typename Op::schema>
struct ReduceDims;
template <class Op, class Ret, class DimT, class... Extra>
struct ReduceDims<Op, Ret(const Tensor&, DimT, Extra...)> {
  static auto rule(const Tensor& x, bdim_t bd, DimT dim, Extra... e) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t lr = p.dim() - 1;
    if (lr == 0) {
      // torch accepts dims -1 and 0 on a scalar: anything else is its IndexError
      if constexpr (std::is_same_v<DimT, at::OptionalIntArrayRef>) {
        if (dim.has_value())
          for (int64_t d : *dim) c10::maybe_wrap_dim(d, 0);
      } else {
        for (int64_t d : dim) c10::maybe_wrap_dim(d, 0);
      }
      const int64_t one[] = {1};
      return pairsAt0<Ret>(Op::call(p.unsqueeze(-1), DimT(c10::IntArrayRef(one)), e...), true);
    }
    at::OptionalIntArrayRef given;
    if constexpr (std::is_same_v<DimT, at::OptionalIntArrayRef>) {
      given = dim;
    } else {
      given = c10::IntArrayRef(dim);
    }
    const auto dims = physicalDims(given, lr);
    return pairsAt0<Ret>(Op::call(p, DimT(c10::IntArrayRef(dims)), e...), false);
  }
};

// Ops taking one dim as their second argument; one or two outputs.
template <class Op, class Sig = typename Op::schema>
struct ReduceDim;
template <class Op, class Ret, class... Extra>
struct ReduceDim<Op, Ret(const Tensor&, int64_t, Extra...)> {
  static auto rule(const Tensor& x, bdim_t bd, int64_t dim, Extra... e) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t lr = p.dim() - 1;
    const bool scalar = lr == 0;
    const int64_t pd = physicalDim(dim, lr, true);  // on a scalar: -1 and 0 only, as in torch
    if (scalar) p = p.unsqueeze(-1);
    return pairsAt0<Ret>(Op::call(p, pd, e...), scalar);
  }
};

// Backward ops of softmax-like ops: (grad, output, dim, ...), both made batched at the front.
template <class Op, class Sig = typename Op::schema>
struct BinaryDim;
template <class Op, class... Extra>
struct BinaryDim<Op, Tensor(const Tensor&, const Tensor&, int64_t, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd,
                                         int64_t dim, Extra... e) {
    const c10::SymInt B = batchSizeOf({{&a, abd}, {&b, bbd}});
    Tensor a2 = materializeBdimFront(a, abd, B), b2 = materializeBdimFront(b, bbd, B);
    const int64_t lr = a2.dim() - 1;
    const int64_t pd = physicalDim(dim, lr, true);  // on a scalar: -1 and 0 only, as in torch
    if (lr == 0) return {Op::call(a2.unsqueeze(-1), b2.unsqueeze(-1), 1, e...).squeeze(1), 0};
    return {Op::call(a2, b2, pd, e...), 0};
  }
};

// Full reductions to a 0-dim tensor.
std::tuple<Tensor, bdim_t> sumAll(const Tensor& x, bdim_t bd, std::optional<c10::ScalarType> dt) {
  return {at::sum(flatBatch(x, bd), {1}, false, dt), 0};
}
std::tuple<Tensor, bdim_t> meanAll(const Tensor& x, bdim_t bd, std::optional<c10::ScalarType> dt) {
  return {at::mean(flatBatch(x, bd), {1}, false, dt), 0};
}
std::tuple<Tensor, bdim_t> prodAll(const Tensor& x, bdim_t bd, std::optional<c10::ScalarType> dt) {
  return {at::prod(flatBatch(x, bd), 1, false, dt), 0};
}
std::tuple<Tensor, bdim_t> maxAll(const Tensor& x, bdim_t bd) {
  return {at::amax(flatBatch(x, bd), {1}), 0};
}
std::tuple<Tensor, bdim_t> minAll(const Tensor& x, bdim_t bd) {
  return {at::amin(flatBatch(x, bd), {1}), 0};
}
std::tuple<Tensor, bdim_t> allAll(const Tensor& x, bdim_t bd) {
  return {at::all(flatBatch(x, bd), 1), 0};
}
std::tuple<Tensor, bdim_t> anyAll(const Tensor& x, bdim_t bd) {
  return {at::any(flatBatch(x, bd), 1), 0};
}

// argmax/argmin(self, int? dim, bool keepdim): no dim means "over the flattened tensor".
template <class Op>
struct ArgReduce {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, std::optional<int64_t> dim,
                                         bool keepdim) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t lr = p.dim() - 1;
    if (!dim.has_value()) {
      Tensor r = Op::call(flattenAfterBatch(p), 1, false);
      if (keepdim) {
        c10::SmallVector<int64_t, 8> shape(lr + 1, 1);
        shape[0] = p.size(0);
        r = r.view(shape);
      }
      return {r, 0};
    }
    if (lr == 0) return {Op::call(p.unsqueeze(-1), 1, false), 0};
    return {Op::call(p, physicalDim(*dim, lr, true), keepdim), 0};
  }
};

// linalg_vector_norm(self, ord, dim?, keepdim, dtype) and norm(self, p?, dim, keepdim[, dtype]):
// dims are the third argument.
template <class Op, class Sig = typename Op::schema>
struct NormDims;
template <class Op, class P, class DimT, class... Extra>
struct NormDims<Op, Tensor(const Tensor&, P, DimT, bool, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, P ord, DimT dim, bool keepdim,
                                         Extra... e) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t lr = p.dim() - 1;
    const auto dims = physicalDims(at::OptionalIntArrayRef(dim), lr);  // torch's check on scalars too
    if (lr == 0) return {Op::call(p.unsqueeze(-1), ord, c10::IntArrayRef{1}, false, e...), 0};
    return {Op::call(p, ord, c10::IntArrayRef(dims), keepdim, e...), 0};
  }
};

// Full norms: the norm over every logical dim of the flattened element.
std::tuple<Tensor, bdim_t> normAllRule(const Tensor& x, bdim_t bd, const c10::Scalar& ord) {
  return {at::_ops::norm_ScalarOpt_dim::call(flatBatch(x, bd), ord, {1}, false), 0};
}
std::tuple<Tensor, bdim_t> normAllDtypeRule(const Tensor& x, bdim_t bd, const std::optional<c10::Scalar>& ord,
                                            c10::ScalarType dt) {
  return {at::_ops::norm_ScalarOpt_dim_dtype::call(flatBatch(x, bd), ord, {1}, false, dt), 0};
}
// dist(a, b, p) is the norm of the broadcast difference; sub brings both to a common batch.
std::tuple<Tensor, bdim_t> distRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd,
                                    const c10::Scalar& ord) {
  const int64_t r = std::max(rankWithoutBdim(a, abd), rankWithoutBdim(b, bbd));
  Tensor a2 = padToLogicalRank(moveBdimToFront(a, abd), abd.has_value(), r);
  Tensor b2 = padToLogicalRank(moveBdimToFront(b, bbd), bbd.has_value(), r);
  return {at::linalg_vector_norm(flattenAfterBatch(at::sub(a2, b2)), ord, c10::IntArrayRef{1}), 0};
}

std::tuple<Tensor, bdim_t> medianAll(const Tensor& x, bdim_t bd) {
  return {std::get<0>(at::median(flatBatch(x, bd), 1)), 0};
}
std::tuple<Tensor, bdim_t> nanmedianAll(const Tensor& x, bdim_t bd) {
  return {std::get<0>(at::nanmedian(flatBatch(x, bd), 1)), 0};
}

// aminmax(self, *, dim?, keepdim): no dim means over the flattened tensor.
std::tuple<Tensor, bdim_t, Tensor, bdim_t> aminmaxRule(const Tensor& x, bdim_t bd, std::optional<int64_t> dim,
                                                       bool keepdim) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (!dim.has_value() || lr == 0) {
    auto [lo, hi] = at::aminmax(flattenAfterBatch(p), 1, false);
    if (keepdim && !dim.has_value()) {
      c10::SmallVector<int64_t, 8> shape(lr + 1, 1);
      shape[0] = p.size(0);
      lo = lo.view(shape);
      hi = hi.view(shape);
    }
    return {lo, 0, hi, 0};
  }
  auto [lo, hi] = at::aminmax(p, physicalDim(*dim, lr, true), keepdim);
  return {lo, 0, hi, 0};
}

// count_nonzero(self, dim?): no dim means every dim.
std::tuple<Tensor, bdim_t> countNonzeroRule(const Tensor& x, bdim_t bd, std::optional<int64_t> dim) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (!dim.has_value() || lr == 0) return {at::count_nonzero(flattenAfterBatch(p), c10::IntArrayRef{1}), 0};
  return {at::count_nonzero(p, c10::IntArrayRef{physicalDim(*dim, lr, true)}), 0};
}

// renorm rescales each slice along `dim` by the norm over all its other dims. Merging the batch
// dim into `dim` makes each (batch element, slice) pair one slice, so torch's kernel does it all.
Tensor renormPhysical(const Tensor& p, const c10::Scalar& ord, int64_t dim, const c10::Scalar& maxnorm) {
  const int64_t lr = p.dim() - 1;
  TORCH_CHECK(lr > 1, "renorm: input needs at least 2 dimensions, got ", lr, " dimensions");
  const int64_t pd = physicalDim(dim, lr, true);
  Tensor moved = p.movedim(pd, 1);
  Tensor merged = moved.flatten(0, 1);
  Tensor r = at::renorm(merged, ord, 0, maxnorm);
  return r.view(moved.sizes()).movedim(1, pd);
}
std::tuple<Tensor, bdim_t> renormRule(const Tensor& x, bdim_t bd, const c10::Scalar& ord, int64_t dim,
                                      const c10::Scalar& maxnorm) {
  return {renormPhysical(moveBdimToFront(x, bd), ord, dim, maxnorm), 0};
}
void renormInplaceRule(Tensor& x, bdim_t bd, const c10::Scalar& ord, int64_t dim,
                       const c10::Scalar& maxnorm) {
  Tensor p = moveBdimToFront(x, bd);
  p.copy_(renormPhysical(p, ord, dim, maxnorm));
}

// sort(self, dim, descending), sort.stable(self, *, stable?, dim, descending) and
// topk(self, k, dim, largest, sorted).
std::tuple<Tensor, bdim_t, Tensor, bdim_t> sortStableRule(const Tensor& x, bdim_t bd,
                                                          std::optional<bool> stable, int64_t dim,
                                                          bool descending) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  const int64_t pd = physicalDim(dim, lr, true);  // on a scalar: -1 and 0 only, as in torch
  if (lr == 0) return {p, 0, at::zeros_like(p, at::kLong), 0};
  auto [v, i] = at::sort(p, stable, pd, descending);
  return {v, 0, i, 0};
}
std::tuple<Tensor, bdim_t, Tensor, bdim_t> sortRule(const Tensor& x, bdim_t bd, int64_t dim,
                                                    bool descending) {
  return sortStableRule(x, bd, false, dim, descending);
}
std::tuple<Tensor, bdim_t, Tensor, bdim_t> topkRule(const Tensor& x, bdim_t bd, c10::SymInt k, int64_t dim,
                                                    bool largest, bool sorted) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  const int64_t pd = physicalDim(dim, lr, true);  // on a scalar: -1 and 0 only, as in torch
  if (lr == 0) {
    auto [v, i] = at::topk_symint(p.unsqueeze(-1), k, 1, largest, sorted);
    return {v.squeeze(1), 0, i.squeeze(1), 0};
  }
  auto [v, i] = at::topk_symint(p, k, pd, largest, sorted);
  return {v, 0, i, 0};
}

// _is_any_true / _is_all_true exist for checks that end in .item() (torch._assert, autograd's
// anomaly-mode NaN check): the answer for the whole batch is one unbatched boolean, as in
// torch.func, so such checks work under vmap instead of raising vmap's data-dependent error.
template <class Op>
struct WholeBatchTruth {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t) { return {Op::call(x), std::nullopt}; }
};

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // clang-format off
  registerFamily<ReduceDims,
      at::_ops::all_dims,
      at::_ops::amax,
      at::_ops::amin,
      at::_ops::any_dims,
      at::_ops::count_nonzero_dim_IntList,
      at::_ops::logsumexp,
      at::_ops::mean_dim,
      at::_ops::nansum,
      at::_ops::std_correction,
      at::_ops::std_mean_correction,
      at::_ops::sum_dim_IntList,
      at::_ops::var_correction,
      at::_ops::var_mean_correction>(m);
  // clang-format on
  // clang-format off
  registerFamily<ReduceDim,
      at::_ops::_log_softmax,
      at::_ops::_safe_softmax,
      at::_ops::_softmax,
      at::_ops::all_dim,
      at::_ops::any_dim,
      at::_ops::cummax,
      at::_ops::cummin,
      at::_ops::cumprod,
      at::_ops::cumsum,
      at::_ops::logcumsumexp,
      at::_ops::max_dim,
      at::_ops::median_dim,
      at::_ops::min_dim,
      at::_ops::mode,
      at::_ops::nanmedian_dim,
      at::_ops::prod_dim_int>(m);
  // clang-format on
  // glu_backward(grad, self, dim) has the same shape: a dim shifted past both batch dims.
  // clang-format off
  registerFamily<BinaryDim,
      at::_ops::_log_softmax_backward_data,
      at::_ops::_softmax_backward_data,
      at::_ops::glu_backward>(m);
  // clang-format on
  // clang-format off
  registerFamily<NormDims,
      at::_ops::linalg_vector_norm,
      at::_ops::norm_ScalarOpt_dim,
      at::_ops::norm_ScalarOpt_dim_dtype>(m);
  // clang-format on
  registerVmapRule<at::_ops::sum, &sumAll>(m);
  registerVmapRule<at::_ops::mean, &meanAll>(m);
  registerVmapRule<at::_ops::prod, &prodAll>(m);
  registerVmapRule<at::_ops::max, &maxAll>(m);
  registerVmapRule<at::_ops::min, &minAll>(m);
  registerVmapRule<at::_ops::all, &allAll>(m);
  registerVmapRule<at::_ops::any, &anyAll>(m);
  registerVmapRule<at::_ops::argmax, &ArgReduce<at::_ops::argmax>::rule>(m);
  registerVmapRule<at::_ops::argmin, &ArgReduce<at::_ops::argmin>::rule>(m);
  registerVmapRule<at::_ops::sort, &sortRule>(m);
  registerVmapRule<at::_ops::sort_stable, &sortStableRule>(m);
  registerVmapRule<at::_ops::norm_Scalar, &normAllRule>(m);
  registerVmapRule<at::_ops::norm_ScalarOpt_dtype, &normAllDtypeRule>(m);
  registerVmapRule<at::_ops::dist, &distRule>(m);
  registerVmapRule<at::_ops::median, &medianAll>(m);
  registerVmapRule<at::_ops::nanmedian, &nanmedianAll>(m);
  registerVmapRule<at::_ops::aminmax, &aminmaxRule>(m);
  registerVmapRule<at::_ops::count_nonzero, &countNonzeroRule>(m);
  registerVmapRule<at::_ops::renorm, &renormRule>(m);
  registerVmapInplaceRule<at::_ops::renorm_, &renormInplaceRule>(m);
  registerVmapRule<at::_ops::topk, &topkRule>(m);
  registerVmapRule<at::_ops::_is_any_true, &WholeBatchTruth<at::_ops::_is_any_true>::rule>(m);
  registerVmapRule<at::_ops::_is_all_true, &WholeBatchTruth<at::_ops::_is_all_true>::rule>(m);
}

}  // namespace ftl
