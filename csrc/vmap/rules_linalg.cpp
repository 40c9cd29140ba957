// Batching rules: matrix products (mm, bmm, mv, dot, addmm, matmul, linear), which all lower to
// one at::matmul over bdim-front tensors whose broadcasting over leading dims does the batching;
// and the decompositions and solvers (inv, det, slogdet, cholesky, qr, eigh, svd, lu, solve, ...),
// which natively accept leading batch dims (registerBatchNative), plus trace.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

std::tuple<Tensor, bdim_t> dotRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  if (abd && bbd) {
    Tensor a2 = moveBdimToFront(a, abd), b2 = moveBdimToFront(b, bbd);
    return {at::matmul(a2.unsqueeze(1), b2.unsqueeze(2)).view({a2.size(0)}), 0};
  }
  if (abd) return {at::matmul(moveBdimToFront(a, abd), b), 0};
  return {at::matmul(moveBdimToFront(b, bbd), a), 0};
}

// General matmul with numpy-style logical semantics.
std::tuple<Tensor, bdim_t> matmulRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  int64_t ra = rankWithoutBdim(a, abd), rb = rankWithoutBdim(b, bbd);
  TORCH_CHECK(ra > 0 && rb > 0, "both arguments to matmul need to be at least 1D, but they are ",
              ra, "D and ", rb, "D");
  if (ra == 1 && rb == 1) return dotRule(a, abd, b, bbd);
  Tensor A = moveBdimToFront(a, abd), Bm = moveBdimToFront(b, bbd);
  bool squeeze_a = false, squeeze_b = false;
  if (abd && ra == 1) {
    A = A.unsqueeze(-2);
    ra = 2;
    squeeze_a = true;
  }
  if (bbd && rb == 1) {
    Bm = Bm.unsqueeze(-1);
    rb = 2;
    squeeze_b = true;
  }
  const int64_t r = std::max(ra, rb);
  if (abd) A = padToLogicalRank(A, true, r);
  if (bbd) Bm = padToLogicalRank(Bm, true, r);
  Tensor out = at::matmul(A, Bm);
  if (squeeze_a) out = out.squeeze(-2);
  if (squeeze_b) out = out.squeeze(-1);
  return {out, 0};
}

std::tuple<Tensor, bdim_t> mmRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  TORCH_CHECK(rankWithoutBdim(a, abd) == 2 && rankWithoutBdim(b, bbd) == 2,
              "mm: both arguments must be 2D matrices");
  return {at::matmul(moveBdimToFront(a, abd), moveBdimToFront(b, bbd)), 0};
}

std::tuple<Tensor, bdim_t> bmmRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  TORCH_CHECK(rankWithoutBdim(a, abd) == 3 && rankWithoutBdim(b, bbd) == 3,
              "bmm: both arguments must be 3D tensors");
  return {at::matmul(moveBdimToFront(a, abd), moveBdimToFront(b, bbd)), 0};
}

std::tuple<Tensor, bdim_t> mvRule(const Tensor& a, bdim_t abd, const Tensor& v, bdim_t vbd) {
  TORCH_CHECK(rankWithoutBdim(a, abd) == 2 && rankWithoutBdim(v, vbd) == 1,
              "mv: expected a matrix and a vector");
  if (!abd) return {at::mm(a, moveBdimToFront(v, vbd).t()), 1};  // [n,k] @ [k,B] -> [n,B]
  return matmulRule(a, abd, v, vbd);
}

std::tuple<Tensor, bdim_t> addmmRule(const Tensor& self, bdim_t sbd, const Tensor& m1, bdim_t m1bd,
                                     const Tensor& m2, bdim_t m2bd, const c10::Scalar& beta,
                                     const c10::Scalar& alpha) {
  if (!m1bd && !m2bd) {
    // Only the bias is batched: the product is computed once.
    Tensor prod = at::mm(m1, m2);
    Tensor s = padToLogicalRank(moveBdimToFront(self, sbd), true, 2);
    Tensor scaled = alpha.equal(1) ? prod : prod.mul(alpha);
    if (beta.equal(0)) return {scaled.unsqueeze(0).expand({s.size(0), -1, -1}), 0};
    return {at::add(scaled, s, beta), 0};
  }
  Tensor prod = std::get<0>(mmRule(m1, m1bd, m2, m2bd));
  if (!alpha.equal(1)) prod = prod.mul(alpha);
  if (beta.equal(0)) return {prod, 0};
  Tensor s = sbd ? padToLogicalRank(moveBdimToFront(self, sbd), true, 2) : self;
  return {at::add(prod, s, beta), 0};
}

std::tuple<Tensor, bdim_t> linearRule(const Tensor& x, bdim_t xbd, const Tensor& w, bdim_t wbd,
                                      const std::optional<Tensor>& bias, bdim_t bbd) {
  if (!wbd && !bbd) {
    Tensor x2 = moveBdimToFront(x, xbd);
    return {at::linear(x2, w, bias), 0};
  }
  if (!xbd && !wbd) {
    // Only the bias is batched: one product, then a broadcast add of [B, 1.., out].
    Tensor out = at::linear(x, w);
    return {at::add(padToLogicalRank(moveBdimToFront(*bias, bbd), true, out.dim()), out), 0};
  }
  Tensor wt = wbd ? moveBdimToFront(w, wbd).transpose(-1, -2) : w.t();
  auto [out, obd] = matmulRule(x, xbd, wt, wbd ? bdim_t(0) : std::nullopt);
  if (!bias.has_value() || !bias->defined()) return {out, obd};
  const int64_t lr = out.dim() - 1;
  Tensor b = bbd ? padToLogicalRank(moveBdimToFront(*bias, bbd), true, lr) : *bias;
  return {out.add(b), 0};
}

std::tuple<Tensor, bdim_t> traceRule(const Tensor& x, bdim_t bd) {
  return {moveBdimToFront(x, bd).diagonal(0, -2, -1).sum(-1), 0};
}

// _linalg_check_errors(info, api, is_matrix) returns nothing, so it has no rule of the usual
// shape. Batched `info` is checked as a batch of matrices (is_matrix=false), so an error names
// the failing batch element like torch does for batched input.
template <class Op, class Sig = typename Op::schema>
struct CheckErrorsKernel;
template <class Op, class Api>
struct CheckErrorsKernel<Op, void(const Tensor&, Api, bool)> {
  static void fn(const Tensor& info_in, Api api, bool is_matrix) {
    const Tensor info = unwrapIfDead(info_in);
    const Level* top = levelStack().top();
    if (!top || top->kind != LevelKind::Vmap) {
      detail::redirectToFront<Op, void, const Tensor&, Api, bool>(info, api, is_matrix);
      return;
    }
    HandDownGuard guard;
    auto [value, bd] = unwrapAt(info, top->id);
    if (!bd) {
      Op::call(value, api, is_matrix);
      return;
    }
    Op::call(moveBdimToFront(value, bd), api, /*is_matrix=*/false);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  m.impl("_linalg_check_errors",
         TORCH_FN(CheckErrorsKernel<at::_ops::_linalg_check_errors>::fn));
  registerVmapRule<at::_ops::dot, &dotRule>(m);
  registerVmapRule<at::_ops::matmul, &matmulRule>(m);
  registerVmapRule<at::_ops::mm, &mmRule>(m);
  registerVmapRule<at::_ops::bmm, &bmmRule>(m);
  registerVmapRule<at::_ops::mv, &mvRule>(m);
  registerVmapRule<at::_ops::addmm, &addmmRule>(m);
  registerVmapRule<at::_ops::linear, &linearRule>(m);
  registerVmapRule<at::_ops::trace, &traceRule>(m);
  registerBatchNative<at::_ops::linalg_inv_ex, at::_ops::_linalg_det, at::_ops::_linalg_slogdet,
                      at::_ops::linalg_cholesky_ex, at::_ops::linalg_qr, at::_ops::_linalg_eigh,
                      at::_ops::_linalg_svd, at::_ops::linalg_lu_factor_ex, at::_ops::linalg_lu,
                      at::_ops::_linalg_solve_ex, at::_ops::linalg_solve_triangular,
                      at::_ops::triu, at::_ops::tril, at::_ops::linalg_matrix_exp,
                      at::_ops::cholesky_solve, at::_ops::linalg_lu_solve, at::_ops::lu_unpack,
                      at::_ops::linalg_eig, at::_ops::linalg_householder_product,
                      at::_ops::linalg_ldl_factor_ex, at::_ops::linalg_ldl_solve,
                      at::_ops::triangular_solve, at::_ops::cholesky_inverse>(m);
}

}  // namespace ftl
