// Batching rules: pointwise ops (unary, binary with broadcasting and type promotion, ternary,
// comparisons, logical ops, activations and their backward ops, *_like factories, in-place forms).
#include <ATen/ExpandUtils.h>
#include <ATen/Operators.h>
#include <ATen/native/TypeProperties.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

// ---- unary: the op maps elementwise, so it runs on the physical tensor as it is.
template <class Op, class Sig = typename Op::schema>
struct Unary;
template <class Op, class... Extra>
struct Unary<Op, Tensor(const Tensor&, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, Extra... e) {
    return {Op::call(x, e...), bd};
  }
};

template <class Op, class Sig = typename Op::schema>
struct UnaryInplace;
template <class Op, class... Extra>
struct UnaryInplace<Op, Tensor&(Tensor&, Extra...)> {
  static void rule(Tensor& x, bdim_t, Extra... e) { Op::call(x, e...); }
};

// Unary ops with two outputs (frexp, log_sigmoid_forward), both laid out like the input.
template <class Op, class Sig = typename Op::schema>
struct Unary2;
template <class Op, class... Extra>
struct Unary2<Op, std::tuple<Tensor, Tensor>(const Tensor&, Extra...)> {
  static std::tuple<Tensor, bdim_t, Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, Extra... e) {
    auto [a, b] = Op::call(x, e...);
    return {a, bd, b, bd};
  }
};

// Elementwise in a tensor that comes after a non-tensor argument: polygamma(int n, Tensor),
// special_zeta.self_scalar(Scalar, Tensor), the polynomials' x_scalar(Scalar x, Tensor n).
template <class Op, class Sig = typename Op::schema>
struct UnaryAfterScalar;
template <class Op, class First>
struct UnaryAfterScalar<Op, Tensor(First, const Tensor&)> {
  static std::tuple<Tensor, bdim_t> rule(First f, const Tensor& x, bdim_t bd) { return {Op::call(f, x), bd}; }
};

// ---- binary: batch dims to the front, batched operands padded to a common logical rank right
// after the batch dim, and the logical type-promotion result restored where the extra physical
// dim would change it (a batched logical scalar counts as a 0-dim tensor, not a dimensioned one).
c10::ScalarType promoteSkipUndefined(c10::ScalarType a, c10::ScalarType b) {
  if (a == c10::ScalarType::Undefined) return b;
  if (b == c10::ScalarType::Undefined) return a;
  return c10::promoteTypes(a, b);
}

at::native::ResultTypeState logicalState(const Tensor& t, bdim_t bd, at::native::ResultTypeState s) {
  if (!bd) return at::native::update_result_type_state(t, s);
  if (t.dim() == 1) {
    s.zeroResult = promoteSkipUndefined(s.zeroResult, t.scalar_type());
  } else {
    s.dimResult = promoteSkipUndefined(s.dimResult, t.scalar_type());
  }
  return s;
}

std::tuple<Tensor, Tensor> alignBinary(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd,
                                       bool promote) {
  const int64_t rank = std::max(rankWithoutBdim(a, abd), rankWithoutBdim(b, bbd));
  Tensor a2 = padToLogicalRank(moveBdimToFront(a, abd), abd.has_value(), rank);
  Tensor b2 = padToLogicalRank(moveBdimToFront(b, bbd), bbd.has_value(), rank);
  const bool logical_scalar = (abd && a.dim() == 1) || (bbd && b.dim() == 1);
  if (promote && logical_scalar && a.scalar_type() != b.scalar_type()) {
    auto logical = at::native::result_type(logicalState(b, bbd, logicalState(a, abd, {})));
    if (logical != at::native::result_type(at::native::update_result_type_state(
                       b2, at::native::update_result_type_state(a2, {})))) {
      if (a2.scalar_type() != logical) a2 = a2.to(logical);
      if (b2.scalar_type() != logical) b2 = b2.to(logical);
    }
  }
  return {std::move(a2), std::move(b2)};
}

template <class Op, class Sig = typename Op::schema>
struct Binary;
template <class Op, class... Extra>
struct Binary<Op, Tensor(const Tensor&, const Tensor&, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd,
                                         Extra... e) {
    auto [a2, b2] = alignBinary(a, abd, b, bbd, /*promote=*/true);
    return {Op::call(a2, b2, e...), 0};
  }
};

template <class Op, class Sig = typename Op::schema>
struct BinaryInplace;
template <class Op, class... Extra>
struct BinaryInplace<Op, Tensor&(Tensor&, const Tensor&, Extra...)> {
  static void rule(Tensor& self, bdim_t sbd, const Tensor& other, bdim_t obd, Extra... e) {
    Tensor s = moveBdimToFront(self, sbd);
    Tensor o = obd ? padToLogicalRank(moveBdimToFront(other, obd), true, s.dim() - 1) : other;
    Op::call(s, o, e...);
  }
};

// ---- ternary and n-ary pointwise ops: every tensor argument aligned as for binary ops.
Tensor alignTo(const Tensor& t, bdim_t bd, int64_t rank) {
  return padToLogicalRank(moveBdimToFront(t, bd), bd.has_value(), rank);
}

// N-ary form of the logical type-promotion fix of alignBinary: among the aligned non-bool
// operands (a where's condition does not take part), cast to the logical result type when a
// batched logical scalar would make the physical promotion differ.
void promoteLogically(std::initializer_list<std::tuple<const Tensor*, bdim_t, Tensor*>> ops) {
  bool logical_scalar = false;
  at::native::ResultTypeState logical{}, physical{};
  for (const auto& [orig, bd, aligned] : ops) {
    if (!aligned->defined() || orig->scalar_type() == c10::ScalarType::Bool) continue;
    logical_scalar |= bd.has_value() && orig->dim() == 1;
    logical = logicalState(*orig, bd, logical);
    physical = at::native::update_result_type_state(*aligned, physical);
  }
  if (!logical_scalar) return;
  const auto want = at::native::result_type(logical);
  if (want == at::native::result_type(physical)) return;
  for (const auto& [orig, bd, aligned] : ops) {
    if (aligned->defined() && orig->scalar_type() != c10::ScalarType::Bool &&
        aligned->scalar_type() != want) {
      *aligned = aligned->to(want);
    }
  }
}

template <class Op, class Sig = typename Op::schema>
struct Ternary;
template <class Op, class... Extra>
struct Ternary<Op, Tensor(const Tensor&, const Tensor&, const Tensor&, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd,
                                         const Tensor& c, bdim_t cbd, Extra... e) {
    const int64_t r = std::max({rankWithoutBdim(a, abd), rankWithoutBdim(b, bbd), rankWithoutBdim(c, cbd)});
    Tensor a2 = alignTo(a, abd, r), b2 = alignTo(b, bbd, r), c2 = alignTo(c, cbd, r);
    promoteLogically({{&a, abd, &a2}, {&b, bbd, &b2}, {&c, cbd, &c2}});
    return {Op::call(a2, b2, c2, e...), 0};
  }
};

template <class Op, class Sig = typename Op::schema>
struct TernaryInplace;
template <class Op, class... Extra>
struct TernaryInplace<Op, Tensor&(Tensor&, const Tensor&, const Tensor&, Extra...)> {
  static void rule(Tensor& self, bdim_t sbd, const Tensor& b, bdim_t bbd, const Tensor& c, bdim_t cbd,
                   Extra... e) {
    Tensor s = moveBdimToFront(self, sbd);
    const int64_t r = s.dim() - 1;
    Op::call(s, alignTo(b, bbd, r), alignTo(c, cbd, r), e...);
  }
};

// clamp.Tensor(self, Tensor? min, Tensor? max)
std::tuple<Tensor, bdim_t> clampTensorRule(const Tensor& x, bdim_t xbd, const std::optional<Tensor>& lo,
                                           bdim_t lobd, const std::optional<Tensor>& hi, bdim_t hibd) {
  int64_t r = rankWithoutBdim(x, xbd);
  if (lo) r = std::max(r, rankWithoutBdim(*lo, lobd));
  if (hi) r = std::max(r, rankWithoutBdim(*hi, hibd));
  Tensor x2 = alignTo(x, xbd, r), lo2, hi2;
  const Tensor none;
  if (lo) lo2 = alignTo(*lo, lobd, r);
  if (hi) hi2 = alignTo(*hi, hibd, r);
  promoteLogically({{&x, xbd, &x2}, {lo ? &*lo : &none, lobd, &lo2}, {hi ? &*hi : &none, hibd, &hi2}});
  return {at::_ops::clamp_Tensor::call(x2, lo2.defined() ? std::optional<Tensor>(lo2) : std::nullopt,
                                       hi2.defined() ? std::optional<Tensor>(hi2) : std::nullopt),
          0};
}

// gelu_backward's oneDNN kernel cannot broadcast (it fails to build a reorder primitive), and
// aligning a batched with an unbatched operand broadcasts: expand both to one shape first.
std::tuple<Tensor, bdim_t> geluBackwardRule(const Tensor& grad, bdim_t gbd, const Tensor& self, bdim_t sbd,
                                            c10::string_view approximate) {
  auto [g, x] = alignBinary(grad, gbd, self, sbd, /*promote=*/true);
  if (!g.sizes().equals(x.sizes())) {
    const auto shape = at::infer_size(g.sizes(), x.sizes());
    g = g.expand(shape);
    x = x.expand(shape);
  }
  return {at::_ops::gelu_backward::call(g, x, approximate), 0};
}

// masked_fill.Tensor wants a 0-dim value; a batched one is one value per element: use where.
std::tuple<Tensor, bdim_t> maskedFillTensorRule(const Tensor& x, bdim_t xbd, const Tensor& mask, bdim_t mbd,
                                                const Tensor& value, bdim_t vbd) {
  const int64_t r = std::max(rankWithoutBdim(x, xbd), rankWithoutBdim(mask, mbd));
  Tensor x2 = alignTo(x, xbd, r), m2 = alignTo(mask, mbd, r);
  if (!vbd) return {at::_ops::masked_fill_Tensor::call(x2, m2, value), 0};
  Tensor v2 = padToLogicalRank(moveBdimToFront(value, vbd), true, r).to(x.scalar_type());
  return {at::_ops::where_self::call(m2, v2, x2), 0};
}

// log_sigmoid_forward's buffer is the input's shape on CPU but an empty placeholder on CUDA; a
// placeholder is the same for every element, so it stays unbatched.
std::tuple<Tensor, bdim_t, Tensor, bdim_t> logSigmoidForwardRule(const Tensor& x, bdim_t bd) {
  auto [out, buffer] = at::_ops::log_sigmoid_forward::call(x);
  const bdim_t buffer_bd = buffer.sizes().equals(x.sizes()) ? bd : std::nullopt;
  return {out, bd, buffer, buffer_bd};
}

// glu halves `dim`; a logical scalar has no dim to halve (torch's message, not an index error).
std::tuple<Tensor, bdim_t> gluRule(const Tensor& x, bdim_t bd, int64_t dim) {
  Tensor p = moveBdimToFront(x, bd);
  TORCH_CHECK(p.dim() > 1, "glu does not support scalars because halving size must be even");
  return {at::_ops::glu::call(p, physicalDim(dim, p.dim() - 1, true)), 0};
}

// glu's forward-mode formula: the output and both inputs share every dim but the halved one.
std::tuple<Tensor, bdim_t> gluJvpRule(const Tensor& glu, bdim_t gbd, const Tensor& x, bdim_t xbd,
                                      const Tensor& dx, bdim_t dbd, int64_t dim) {
  const c10::SymInt B = batchSizeOf({{&glu, gbd}, {&x, xbd}, {&dx, dbd}});
  Tensor x2 = materializeBdimFront(x, xbd, B);
  return {at::_ops::glu_jvp::call(materializeBdimFront(glu, gbd, B), x2, materializeBdimFront(dx, dbd, B),
                                  physicalDim(dim, x2.dim() - 1, true)),
          0};
}

// _prelu_kernel's output is empty_like(self) and only the weight broadcasts into it, so self
// must carry the batch dim even when only the weight is batched.
std::tuple<Tensor, bdim_t> preluKernelRule(const Tensor& x, bdim_t xbd, const Tensor& w, bdim_t wbd) {
  const c10::SymInt B = batchSizeOf({{&x, xbd}, {&w, wbd}});
  const int64_t r = std::max(rankWithoutBdim(x, xbd), rankWithoutBdim(w, wbd));
  Tensor x2 = padToLogicalRank(materializeBdimFront(x, xbd, B), true, r);
  return {at::_ops::_prelu_kernel::call(x2, alignTo(w, wbd, r)), 0};
}
// Both gradients come out in the broadcast shape (autograd sums grad_weight down afterwards).
std::tuple<Tensor, bdim_t, Tensor, bdim_t> preluKernelBackwardRule(const Tensor& g, bdim_t gbd,
                                                                   const Tensor& x, bdim_t xbd,
                                                                   const Tensor& w, bdim_t wbd) {
  const c10::SymInt B = batchSizeOf({{&g, gbd}, {&x, xbd}, {&w, wbd}});
  const int64_t r = std::max({rankWithoutBdim(g, gbd), rankWithoutBdim(x, xbd), rankWithoutBdim(w, wbd)});
  Tensor x2 = padToLogicalRank(materializeBdimFront(x, xbd, B), true, r);
  auto [gx, gw] = at::_ops::_prelu_kernel_backward::call(alignTo(g, gbd, r), x2, alignTo(w, wbd, r));
  return {gx, 0, gw, 0};
}

// self.fill_(value) with a 0-d value. A batched value is copied in (one value per element), as
// torch.func does: under forward AD, fill_ of a tensor without a tangent fills fresh, unbatched
// zeros with the value's batched tangent, which only copy_'s formula (it replaces the tangent
// instead of writing into it) can take.
void fillTensorInplaceRule(Tensor& self, bdim_t sbd, const Tensor& value, bdim_t vbd) {
  const int64_t vrank = rankWithoutBdim(value, vbd);
  TORCH_CHECK(vrank == 0, "fill_ only supports 0-dimension value tensor but got tensor with ", vrank,
              " dimensions.");
  Tensor s = moveBdimToFront(self, sbd);
  if (!vbd) {
    at::_ops::fill__Tensor::call(s, value);
    return;
  }
  Tensor v = padToLogicalRank(moveBdimToFront(value, vbd), true, s.dim() - 1);
  at::_ops::copy_::call(s, v.expand(s.sizes()), false);  // copy_ casts to self's dtype
}

// copy(self, src): copy_ without the write, what functionalization turns copy_ into (`y[0] = v`
// inside functionalize). The result has self's shape and dtype, with src's values broadcast in.
std::tuple<Tensor, bdim_t> copyRule(const Tensor& self, bdim_t sbd, const Tensor& src, bdim_t srcbd,
                                    bool non_blocking) {
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&src, srcbd}});
  const int64_t r = rankWithoutBdim(self, sbd);
  TORCH_CHECK(rankWithoutBdim(src, srcbd) <= r, "copy: the source (", rankWithoutBdim(src, srcbd),
              " dims per example) cannot be broadcast to self (", r, " dims per example)");
  Tensor s = materializeBdimFront(self, sbd, B);
  return {at::_ops::copy::call(s, alignTo(src, srcbd, r), non_blocking), 0};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // clang-format off
  registerFamily<Unary,
      at::_ops::_conj,
      at::_ops::_neg_view,
      at::_ops::_to_copy,
      at::_ops::abs,
      at::_ops::acos,
      at::_ops::acosh,
      at::_ops::add_Scalar,
      at::_ops::alias,
      at::_ops::angle,
      at::_ops::asin,
      at::_ops::asinh,
      at::_ops::atan,
      at::_ops::atanh,
      at::_ops::bitwise_and_Scalar,
      at::_ops::bitwise_not,
      at::_ops::bitwise_or_Scalar,
      at::_ops::bitwise_xor_Scalar,
      at::_ops::ceil,
      at::_ops::celu,
      at::_ops::clamp,
      at::_ops::clamp_max,
      at::_ops::clamp_min,
      at::_ops::conj_physical,
      at::_ops::cos,
      at::_ops::cosh,
      at::_ops::deg2rad,
      at::_ops::detach,
      at::_ops::digamma,
      at::_ops::div_Scalar,
      at::_ops::div_Scalar_mode,
      at::_ops::elu,
      at::_ops::empty_like,
      at::_ops::eq_Scalar,
      at::_ops::erf,
      at::_ops::erfc,
      at::_ops::erfinv,
      at::_ops::exp,
      at::_ops::exp2,
      at::_ops::expm1,
      at::_ops::fill_Scalar,
      at::_ops::floor,
      at::_ops::fmod_Scalar,
      at::_ops::frac,
      at::_ops::full_like,
      at::_ops::ge_Scalar,
      at::_ops::gelu,
      at::_ops::gt_Scalar,
      at::_ops::hardshrink,
      at::_ops::hardsigmoid,
      at::_ops::hardswish,
      at::_ops::hardtanh,
      at::_ops::i0,
      at::_ops::imag,
      at::_ops::isfinite,
      at::_ops::isinf,
      at::_ops::isnan,
      at::_ops::isneginf,
      at::_ops::isposinf,
      at::_ops::le_Scalar,
      at::_ops::leaky_relu,
      at::_ops::lgamma,
      at::_ops::lift_fresh,
      at::_ops::log,
      at::_ops::log10,
      at::_ops::log1p,
      at::_ops::log2,
      at::_ops::logical_not,
      at::_ops::logit,
      at::_ops::lt_Scalar,
      at::_ops::mish,
      at::_ops::mul_Scalar,
      at::_ops::mvlgamma,
      at::_ops::nan_to_num,
      at::_ops::ne_Scalar,
      at::_ops::neg,
      at::_ops::ones_like,
      at::_ops::positive,
      at::_ops::pow_Tensor_Scalar,
      at::_ops::rad2deg,
      at::_ops::real,
      at::_ops::reciprocal,
      at::_ops::relu,
      at::_ops::remainder_Scalar,
      at::_ops::round,
      at::_ops::round_decimals,
      at::_ops::rsqrt,
      at::_ops::rsub_Scalar,
      at::_ops::selu,
      at::_ops::sgn,
      at::_ops::sigmoid,
      at::_ops::sign,
      at::_ops::signbit,
      at::_ops::silu,
      at::_ops::sin,
      at::_ops::sinc,
      at::_ops::sinh,
      at::_ops::softplus,
      at::_ops::softshrink,
      at::_ops::special_airy_ai,
      at::_ops::special_bessel_j0,
      at::_ops::special_bessel_j1,
      at::_ops::special_bessel_y0,
      at::_ops::special_bessel_y1,
      at::_ops::special_chebyshev_polynomial_t_n_scalar,
      at::_ops::special_chebyshev_polynomial_u_n_scalar,
      at::_ops::special_chebyshev_polynomial_v_n_scalar,
      at::_ops::special_chebyshev_polynomial_w_n_scalar,
      at::_ops::special_entr,
      at::_ops::special_erfcx,
      at::_ops::special_hermite_polynomial_h_n_scalar,
      at::_ops::special_hermite_polynomial_he_n_scalar,
      at::_ops::special_i0e,
      at::_ops::special_i1,
      at::_ops::special_i1e,
      at::_ops::special_laguerre_polynomial_l_n_scalar,
      at::_ops::special_legendre_polynomial_p_n_scalar,
      at::_ops::special_log_ndtr,
      at::_ops::special_modified_bessel_i0,
      at::_ops::special_modified_bessel_i1,
      at::_ops::special_modified_bessel_k0,
      at::_ops::special_modified_bessel_k1,
      at::_ops::special_ndtri,
      at::_ops::special_scaled_modified_bessel_k0,
      at::_ops::special_scaled_modified_bessel_k1,
      at::_ops::special_shifted_chebyshev_polynomial_t_n_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_u_n_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_v_n_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_w_n_scalar,
      at::_ops::special_spherical_bessel_j0,
      at::_ops::special_xlog1py_other_scalar,
      at::_ops::special_zeta_other_scalar,
      at::_ops::sqrt,
      at::_ops::square,
      at::_ops::sub_Scalar,
      at::_ops::tan,
      at::_ops::tanh,
      at::_ops::threshold,
      at::_ops::trunc,
      at::_ops::xlogy_Scalar_Other,
      at::_ops::zeros_like>(m);
  // clang-format on
  // clang-format off
  registerFamily<Unary2,
      at::_ops::frexp_Tensor>(m);
  // clang-format on
  // clang-format off
  registerFamily<UnaryAfterScalar,
      at::_ops::polygamma,
      at::_ops::special_chebyshev_polynomial_t_x_scalar,
      at::_ops::special_chebyshev_polynomial_u_x_scalar,
      at::_ops::special_chebyshev_polynomial_v_x_scalar,
      at::_ops::special_chebyshev_polynomial_w_x_scalar,
      at::_ops::special_hermite_polynomial_h_x_scalar,
      at::_ops::special_hermite_polynomial_he_x_scalar,
      at::_ops::special_laguerre_polynomial_l_x_scalar,
      at::_ops::special_legendre_polynomial_p_x_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_t_x_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_u_x_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_v_x_scalar,
      at::_ops::special_shifted_chebyshev_polynomial_w_x_scalar,
      at::_ops::special_xlog1py_self_scalar,
      at::_ops::special_zeta_self_scalar>(m);
  // clang-format on
  // clang-format off
  registerFamily<Binary,
      at::_ops::add_Tensor,
      at::_ops::atan2,
      at::_ops::bitwise_and_Tensor,
      at::_ops::bitwise_or_Tensor,
      at::_ops::bitwise_xor_Tensor,
      at::_ops::clamp_max_Tensor,
      at::_ops::clamp_min_Tensor,
      at::_ops::complex,
      at::_ops::copysign_Tensor,
      at::_ops::div_Tensor,
      at::_ops::div_Tensor_mode,
      at::_ops::eq_Tensor,
      at::_ops::floor_divide,
      at::_ops::fmax,
      at::_ops::fmin,
      at::_ops::fmod_Tensor,
      at::_ops::ge_Tensor,
      at::_ops::gt_Tensor,
      at::_ops::hardsigmoid_backward,
      at::_ops::hardswish_backward,
      at::_ops::hardtanh_backward,
      at::_ops::heaviside,
      at::_ops::hypot,
      at::_ops::igamma,
      at::_ops::igammac,
      at::_ops::isclose,
      at::_ops::ldexp_Tensor,
      at::_ops::le_Tensor,
      at::_ops::leaky_relu_backward,
      at::_ops::lerp_Scalar,
      at::_ops::logaddexp,
      at::_ops::logaddexp2,
      at::_ops::logical_and,
      at::_ops::logical_or,
      at::_ops::logical_xor,
      at::_ops::logit_backward,
      at::_ops::lt_Tensor,
      at::_ops::masked_fill_Scalar,
      at::_ops::maximum,
      at::_ops::minimum,
      at::_ops::mul_Tensor,
      at::_ops::native_dropout_backward,
      at::_ops::ne_Tensor,
      at::_ops::nextafter,
      at::_ops::polar,
      at::_ops::pow_Tensor_Tensor,
      at::_ops::remainder_Tensor,
      at::_ops::rsub_Tensor,
      at::_ops::sigmoid_backward,
      at::_ops::silu_backward,
      at::_ops::softplus_backward,
      at::_ops::special_chebyshev_polynomial_t,
      at::_ops::special_chebyshev_polynomial_u,
      at::_ops::special_chebyshev_polynomial_v,
      at::_ops::special_chebyshev_polynomial_w,
      at::_ops::special_hermite_polynomial_h,
      at::_ops::special_hermite_polynomial_he,
      at::_ops::special_laguerre_polynomial_l,
      at::_ops::special_legendre_polynomial_p,
      at::_ops::special_shifted_chebyshev_polynomial_t,
      at::_ops::special_shifted_chebyshev_polynomial_u,
      at::_ops::special_shifted_chebyshev_polynomial_v,
      at::_ops::special_shifted_chebyshev_polynomial_w,
      at::_ops::special_xlog1py,
      at::_ops::special_zeta,
      at::_ops::sub_Tensor,
      at::_ops::tanh_backward,
      at::_ops::threshold_backward,
      at::_ops::xlogy_Tensor>(m);
  // clang-format on
  // clang-format off
  registerFamily<Ternary,
      at::_ops::addcdiv,
      at::_ops::addcmul,
      at::_ops::lerp_Tensor,
      at::_ops::log_sigmoid_backward,
      at::_ops::where_self>(m);
  // clang-format on
  registerVmapRule<at::_ops::log_sigmoid_forward, &logSigmoidForwardRule>(m);
  registerVmapRule<at::_ops::glu, &gluRule>(m);
  registerVmapRule<at::_ops::glu_jvp, &gluJvpRule>(m);
  registerVmapRule<at::_ops::_prelu_kernel, &preluKernelRule>(m);
  registerVmapRule<at::_ops::_prelu_kernel_backward, &preluKernelBackwardRule>(m);
  registerVmapRule<at::_ops::clamp_Tensor, &clampTensorRule>(m);
  registerVmapRule<at::_ops::masked_fill_Tensor, &maskedFillTensorRule>(m);
  registerVmapRule<at::_ops::gelu_backward, &geluBackwardRule>(m);
  registerVmapRule<at::_ops::copy, &copyRule>(m);
  registerVmapInplaceRule<at::_ops::fill__Tensor, &fillTensorInplaceRule>(m);
  registerInplaceFamily<
      UnaryInplace, at::_ops::abs_, at::_ops::cos_, at::_ops::exp_, at::_ops::log_, at::_ops::neg_,
      at::_ops::sigmoid_, at::_ops::sin_, at::_ops::sqrt_, at::_ops::tanh_, at::_ops::relu_, at::_ops::zero_,
      at::_ops::fill__Scalar, at::_ops::clamp_, at::_ops::clamp_min_, at::_ops::clamp_max_,
      at::_ops::add__Scalar, at::_ops::sub__Scalar, at::_ops::mul__Scalar, at::_ops::div__Scalar,
      at::_ops::pow__Scalar, at::_ops::floor_, at::_ops::ceil_, at::_ops::round_, at::_ops::reciprocal_,
      at::_ops::rsqrt_, at::_ops::leaky_relu_, at::_ops::hardtanh_, at::_ops::elu_, at::_ops::nan_to_num_,
      at::_ops::exp2_, at::_ops::log1p_, at::_ops::expm1_, at::_ops::erf_, at::_ops::trunc_, at::_ops::frac_,
      at::_ops::sign_, at::_ops::square_, at::_ops::logical_not_, at::_ops::polygamma_>(m);
  registerInplaceFamily<
      BinaryInplace, at::_ops::add__Tensor, at::_ops::sub__Tensor, at::_ops::mul__Tensor,
      at::_ops::div__Tensor, at::_ops::div__Tensor_mode, at::_ops::pow__Tensor, at::_ops::copy_,
      at::_ops::masked_fill__Scalar, at::_ops::atan2_, at::_ops::remainder__Tensor, at::_ops::fmod__Tensor,
      at::_ops::eq__Tensor, at::_ops::ne__Tensor, at::_ops::lt__Tensor, at::_ops::le__Tensor,
      at::_ops::gt__Tensor, at::_ops::ge__Tensor, at::_ops::logical_and_, at::_ops::logical_or_,
      at::_ops::hypot_, at::_ops::xlogy__Tensor, at::_ops::copysign__Tensor, at::_ops::lerp__Scalar,
      at::_ops::clamp_min__Tensor, at::_ops::clamp_max__Tensor>(m);
  registerInplaceFamily<TernaryInplace, at::_ops::lerp__Tensor, at::_ops::addcmul_, at::_ops::addcdiv_,
                        at::_ops::masked_fill__Tensor>(m);
}

}  // namespace ftl
