// Batching rules: reductions and scans over dims (sum, mean, prod, amax/amin, max/min with indices,
// argmax/argmin, var/std, logsumexp, all/any, cumsum/cumprod, softmax and their backward ops).
// The batch dim goes to the front and every logical dim shifts by one. A logical scalar (0-dim)
// is first given a unit dim so that "reduce every dim" never reduces the batch dim.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

Tensor flatBatch(const Tensor& x, bdim_t bd) { return flattenAfterBatch(moveBdimToFront(x, bd)); }

// Ops taking a list of dims as their second argument (int[]? or int[]); empty/None means all.
template <class Op, class Sig = typename Op::schema>
struct ReduceDims;
template <class Op, class DimT, class... Extra>
struct ReduceDims<Op, Tensor(const Tensor&, DimT, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, DimT dim, Extra... e) {
    Tensor p = moveBdimToFront(x, bd);
    const int64_t lr = p.dim() - 1;
    c10::IntArrayRef given;
    if constexpr (std::is_same_v<DimT, at::OptionalIntArrayRef>) {
      if (dim.has_value()) given = *dim;
    } else {
      given = dim;
    }
    if (lr == 0) {
      const int64_t one[] = {1};
      Tensor r = Op::call(p.unsqueeze(-1), DimT(c10::IntArrayRef(one)), e...);
      return {r.dim() == 2 ? r.squeeze(1) : r, 0};
    }
    c10::SmallVector<int64_t, 8> dims;
    if (given.empty()) {
      for (int64_t d = 1; d <= lr; ++d) dims.push_back(d);
    } else {
      for (int64_t d : given) dims.push_back(physicalDim(d, lr, true));
    }
    return {Op::call(p, DimT(c10::IntArrayRef(dims)), e...), 0};
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
    if (scalar) p = p.unsqueeze(-1);
    Ret r = Op::call(p, scalar ? 1 : physicalDim(dim, lr, true), e...);
    auto fix = [&](Tensor t) { return scalar && t.dim() == 2 ? t.squeeze(1) : t; };
    if constexpr (std::is_same_v<Ret, Tensor>) {
      return std::make_tuple(fix(r), bdim_t(0));
    } else {
      return std::make_tuple(fix(std::get<0>(r)), bdim_t(0), fix(std::get<1>(r)), bdim_t(0));
    }
  }
};

// Backward ops of softmax-like ops: (grad, output, dim, ...), both made batched at the front.
template <class Op, class Sig = typename Op::schema>
struct BinaryDim;
template <class Op, class... Extra>
struct BinaryDim<Op, Tensor(const Tensor&, const Tensor&, int64_t, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd,
                                         int64_t dim, Extra... e) {
    const int64_t B = batchSizeOf({{&a, abd}, {&b, bbd}});
    Tensor a2 = materializeBdimFront(a, abd, B), b2 = materializeBdimFront(b, bbd, B);
    const int64_t lr = a2.dim() - 1;
    if (lr == 0) return {Op::call(a2.unsqueeze(-1), b2.unsqueeze(-1), 1, e...).squeeze(1), 0};
    return {Op::call(a2, b2, physicalDim(dim, lr, true), e...), 0};
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
std::tuple<Tensor, bdim_t> maxAll(const Tensor& x, bdim_t bd) { return {at::amax(flatBatch(x, bd), {1}), 0}; }
std::tuple<Tensor, bdim_t> minAll(const Tensor& x, bdim_t bd) { return {at::amin(flatBatch(x, bd), {1}), 0}; }
std::tuple<Tensor, bdim_t> allAll(const Tensor& x, bdim_t bd) { return {at::all(flatBatch(x, bd), 1), 0}; }
std::tuple<Tensor, bdim_t> anyAll(const Tensor& x, bdim_t bd) { return {at::any(flatBatch(x, bd), 1), 0}; }

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

// linalg_vector_norm(self, ord, dim?, keepdim, dtype): dims are the third argument.
std::tuple<Tensor, bdim_t> vectorNormRule(const Tensor& x, bdim_t bd, const c10::Scalar& ord,
                                          at::OptionalIntArrayRef dim, bool keepdim,
                                          std::optional<c10::ScalarType> dt) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (lr == 0) {
    return {at::linalg_vector_norm(p.unsqueeze(-1), ord, c10::IntArrayRef{1}, false, dt), 0};
  }
  c10::SmallVector<int64_t, 8> dims;
  if (!dim.has_value() || dim->empty()) {
    for (int64_t d = 1; d <= lr; ++d) dims.push_back(d);
  } else {
    for (int64_t d : *dim) dims.push_back(physicalDim(d, lr, true));
  }
  return {at::linalg_vector_norm(p, ord, c10::IntArrayRef(dims), keepdim, dt), 0};
}

// sort(self, dim, descending) and topk(self, k, dim, largest, sorted).
std::tuple<Tensor, bdim_t, Tensor, bdim_t> sortRule(const Tensor& x, bdim_t bd, int64_t dim,
                                                    bool descending) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (lr == 0) return {p, 0, at::zeros_like(p, at::kLong), 0};
  auto [v, i] = at::sort(p, physicalDim(dim, lr, true), descending);
  return {v, 0, i, 0};
}
std::tuple<Tensor, bdim_t, Tensor, bdim_t> topkRule(const Tensor& x, bdim_t bd, c10::SymInt k,
                                                    int64_t dim, bool largest, bool sorted) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (lr == 0) {
    auto [v, i] = at::topk_symint(p.unsqueeze(-1), k, 1, largest, sorted);
    return {v.squeeze(1), 0, i.squeeze(1), 0};
  }
  auto [v, i] = at::topk_symint(p, k, physicalDim(dim, lr, true), largest, sorted);
  return {v, 0, i, 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerFamily<ReduceDims, at::_ops::sum_dim_IntList, at::_ops::mean_dim, at::_ops::amax, at::_ops::amin, at::_ops::logsumexp, at::_ops::var_correction, at::_ops::std_correction, at::_ops::all_dims, at::_ops::any_dims, at::_ops::nansum>(m);
  registerFamily<ReduceDim, at::_ops::prod_dim_int, at::_ops::max_dim, at::_ops::min_dim, at::_ops::all_dim, at::_ops::any_dim, at::_ops::cumsum, at::_ops::cumprod, at::_ops::logcumsumexp, at::_ops::_softmax, at::_ops::_log_softmax, at::_ops::cummax, at::_ops::cummin, at::_ops::median_dim, at::_ops::nanmedian_dim, at::_ops::mode>(m);
  registerFamily<BinaryDim, at::_ops::_softmax_backward_data, at::_ops::_log_softmax_backward_data>(m);
  registerVmapRule<at::_ops::sum, &sumAll>(m);
  registerVmapRule<at::_ops::mean, &meanAll>(m);
  registerVmapRule<at::_ops::prod, &prodAll>(m);
  registerVmapRule<at::_ops::max, &maxAll>(m);
  registerVmapRule<at::_ops::min, &minAll>(m);
  registerVmapRule<at::_ops::all, &allAll>(m);
  registerVmapRule<at::_ops::any, &anyAll>(m);
  registerVmapRule<at::_ops::argmax, &ArgReduce<at::_ops::argmax>::rule>(m);
  registerVmapRule<at::_ops::argmin, &ArgReduce<at::_ops::argmin>::rule>(m);
  registerVmapRule<at::_ops::linalg_vector_norm, &vectorNormRule>(m);
  registerVmapRule<at::_ops::sort, &sortRule>(m);
  registerVmapRule<at::_ops::topk, &topkRule>(m);
}

}  // namespace ftl
