// Batching rules: matrix products (mm, bmm, mv, dot, vdot, addmm, matmul, linear), which all lower
// to one at::matmul over bdim-front tensors whose broadcasting over leading dims does the batching;
// and the decompositions and solvers (inv, det, slogdet, cholesky, qr, eigh, svd, lu, solve, ...),
// which natively accept leading batch dims (registerBatchNative), plus trace, linalg_cross,
// lstsq and pinv; and baddbmm, addbmm, addmv, addr.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

std::tuple<Tensor, bdim_t> dotRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  if (abd && bbd) {
    Tensor a2 = moveBdimToFront(a, abd), b2 = moveBdimToFront(b, bbd);
    return {at::matmul(a2.unsqueeze(1), b2.unsqueeze(2)).view_symint({a2.sym_size(0)}), 0};
  }
  if (abd) return {at::matmul(moveBdimToFront(a, abd), b), 0};
  return {at::matmul(moveBdimToFront(b, bbd), a), 0};
}

// General matmul with numpy-style logical semantics.
std::tuple<Tensor, bdim_t> matmulRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  int64_t ra = rankWithoutBdim(a, abd), rb = rankWithoutBdim(b, bbd);
  TORCH_CHECK(ra > 0 && rb > 0, "both arguments to matmul need to be at least 1D, but they are ", ra,
              "D and ", rb, "D");
  Tensor A = moveBdimToFront(a, abd), Bm = moveBdimToFront(b, bbd);
  const c10::SymInt ka = A.sym_size(-1), kb = Bm.sym_size(rb == 1 ? -1 : -2);
  if (ka != kb) {
    // torch's message names one element's shapes, not the batch's
    raiseForElement([&] { at::matmul(abd ? exampleOf(A, 0, 0) : A, bbd ? exampleOf(Bm, 0, 0) : Bm); },
                    "matmul", "the contracted dims differ");
  }
  if (ra == 1 && rb == 1) return dotRule(a, abd, b, bbd);
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
  if (m1bd && !m2bd && !sbd && rankWithoutBdim(m1, m1bd) == 2 && rankWithoutBdim(m2, m2bd) == 2 &&
      (self.dim() <= 1 || (self.dim() == 2 && self.sym_size(0) == 1))) {
    // Only the rows are batched and the bias is one row (a Linear's, transformers' Conv1D's):
    // the batch's rows are one matrix, and one addmm keeps the bias add fused in the product
    // (a separate add is another pass over the output, and its temporary).
    Tensor x = moveBdimToFront(m1, m1bd);  // [B, n, k]
    const c10::SymInt B = x.sym_size(0), n = x.sym_size(1);
    return {at::addmm(self, x.flatten(0, 1), m2, beta, alpha).unflatten_symint(0, {B, n}), 0};
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

// ---- add*(self, ..., beta, alpha): beta == 0 must ignore self (NaNs included), so the batched
// forms run the ops themselves, or baddbmm, whose beta/alpha semantics are the same.

// Tensors of logical rank r (<= r_out) to [B, *out] for out = the op's logical output shape.
Tensor expandToBatchedShape(const Tensor& t, bdim_t bd, const c10::SymInt& B, c10::SymIntArrayRef out) {
  const int64_t r = static_cast<int64_t>(out.size());
  Tensor p;
  if (bd) {
    p = padToLogicalRank(moveBdimToFront(t, bd), true, r);
  } else {
    p = t;
    while (p.dim() < r) p = p.unsqueeze(0);
    p = p.unsqueeze(0);
  }
  c10::SymDimVector sizes{B};
  sizes.append(out.begin(), out.end());
  return p.expand_symint(sizes);
}

// baddbmm's own batch dim takes the vmap batch: [B, b, ...] -> [B*b, ...].
std::tuple<Tensor, bdim_t> baddbmmRule(const Tensor& self, bdim_t sbd, const Tensor& b1, bdim_t b1bd,
                                       const Tensor& b2, bdim_t b2bd, const c10::Scalar& beta,
                                       const c10::Scalar& alpha) {
  TORCH_CHECK(rankWithoutBdim(b1, b1bd) == 3 && rankWithoutBdim(b2, b2bd) == 3,
              "baddbmm: batch1 and batch2 must be 3D tensors");
  TORCH_CHECK(rankWithoutBdim(self, sbd) <= 3,
              "baddbmm: self must be broadcastable to the "
              "result, but it has ",
              rankWithoutBdim(self, sbd), " dims");
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&b1, b1bd}, {&b2, b2bd}});
  Tensor m1 = materializeBdimFront(b1, b1bd, B), m2 = materializeBdimFront(b2, b2bd, B);
  const c10::SymInt b = m1.sym_size(1);
  Tensor s = expandToBatchedShape(self, sbd, B, {b, m1.sym_size(2), m2.sym_size(3)});
  Tensor out = at::baddbmm(s.flatten(0, 1), m1.flatten(0, 1), m2.flatten(0, 1), beta, alpha);
  return {out.unflatten_symint(0, {B, b}), 0};
}

// sum_i b1[i] @ b2[i] is one product over the concatenated inner dims:
// [n, b*m] @ [b*m, p], so the batched addbmm is a baddbmm over the vmap batch. addbmm with
// alpha == 0 ignores NaNs of the product, which baddbmm would propagate.
std::tuple<Tensor, bdim_t> addbmmRule(const Tensor& self, bdim_t sbd, const Tensor& b1, bdim_t b1bd,
                                      const Tensor& b2, bdim_t b2bd, const c10::Scalar& beta,
                                      const c10::Scalar& alpha) {
  TORCH_CHECK(rankWithoutBdim(b1, b1bd) == 3 && rankWithoutBdim(b2, b2bd) == 3,
              "addbmm: batch1 and batch2 must be 3D tensors");
  TORCH_CHECK(rankWithoutBdim(self, sbd) <= 2,
              "addbmm: self must be broadcastable to the "
              "result, but it has ",
              rankWithoutBdim(self, sbd), " dims");
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&b1, b1bd}, {&b2, b2bd}});
  Tensor m1 = materializeBdimFront(b1, b1bd, B), m2 = materializeBdimFront(b2, b2bd, B);
  const c10::SymInt n = m1.sym_size(2), p = m2.sym_size(3);
  m1 = m1.permute({0, 2, 1, 3}).reshape_symint({B, n, -1});
  m2 = m2.reshape_symint({B, -1, p});
  if (alpha.equal(0)) m1 = at::zeros_like(m1);
  Tensor s = sbd ? padToLogicalRank(moveBdimToFront(self, sbd), true, 2) : self;
  return {at::baddbmm(s, m1, m2, beta, alpha), 0};
}

// mat @ vec as a baddbmm of [B, n, m] @ [B, m, 1]; addmv, like addbmm, ignores NaNs of the
// product when alpha == 0.
std::tuple<Tensor, bdim_t> addmvRule(const Tensor& self, bdim_t sbd, const Tensor& mat, bdim_t mbd,
                                     const Tensor& vec, bdim_t vbd, const c10::Scalar& beta,
                                     const c10::Scalar& alpha) {
  TORCH_CHECK(rankWithoutBdim(mat, mbd) == 2 && rankWithoutBdim(vec, vbd) == 1,
              "addmv: expected a matrix and a vector, got ", rankWithoutBdim(mat, mbd), "D and ",
              rankWithoutBdim(vec, vbd), "D");
  TORCH_CHECK(rankWithoutBdim(self, sbd) <= 1,
              "addmv: self must be broadcastable to the "
              "result, but it has ",
              rankWithoutBdim(self, sbd), " dims");
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&mat, mbd}, {&vec, vbd}});
  Tensor m = materializeBdimFront(mat, mbd, B);
  Tensor v = materializeBdimFront(vec, vbd, B).unsqueeze(-1);
  if (alpha.equal(0)) m = at::zeros_like(m);
  Tensor s = expandToBatchedShape(self, sbd, B, {m.sym_size(1)}).unsqueeze(-1);
  return {at::baddbmm(s, m, v, beta, alpha).squeeze(-1), 0};
}

// addr propagates NaNs of the outer product even when alpha == 0 (unlike addmv); booleans use
// and/or for */+.
std::tuple<Tensor, bdim_t> addrRule(const Tensor& self, bdim_t sbd, const Tensor& v1, bdim_t v1bd,
                                    const Tensor& v2, bdim_t v2bd, const c10::Scalar& beta,
                                    const c10::Scalar& alpha) {
  TORCH_CHECK(rankWithoutBdim(v1, v1bd) == 1 && rankWithoutBdim(v2, v2bd) == 1,
              "addr: vec1 and vec2 must be 1D, got ", rankWithoutBdim(v1, v1bd), "D and ",
              rankWithoutBdim(v2, v2bd), "D");
  TORCH_CHECK(rankWithoutBdim(self, sbd) <= 2,
              "addr: self must be broadcastable to the result, "
              "but it has ",
              rankWithoutBdim(self, sbd), " dims");
  Tensor a = moveBdimToFront(v1, v1bd).unsqueeze(-1), b = moveBdimToFront(v2, v2bd).unsqueeze(-2);
  if (v1bd && !v2bd) b = b.unsqueeze(0);
  if (v2bd && !v1bd) a = a.unsqueeze(0);
  const bool prod_batched = v1bd || v2bd;
  Tensor s = sbd ? padToLogicalRank(moveBdimToFront(self, sbd), true, 2) : self;
  Tensor out;
  if (self.scalar_type() == at::kBool && v1.scalar_type() == at::kBool && v2.scalar_type() == at::kBool) {
    out = alpha.to<bool>() ? at::logical_and(a, b) : at::zeros_like(at::logical_and(a, b));
    if (beta.to<bool>()) out = at::logical_or(out, s);
  } else {
    out = a.mul(b);
    if (!alpha.equal(1)) out = out.mul(alpha);
    if (!beta.equal(0)) out = at::add(out, s, beta);
  }
  // With beta == 0 and only self batched, the result does not depend on the batch.
  return {out, prod_batched || (sbd && !beta.equal(0)) ? bdim_t(0) : std::nullopt};
}

std::tuple<Tensor, bdim_t> vdotRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd) {
  TORCH_CHECK(rankWithoutBdim(a, abd) == 1 && rankWithoutBdim(b, bbd) == 1,
              "vdot: 1D tensors expected, but got ", rankWithoutBdim(a, abd), "D and ",
              rankWithoutBdim(b, bbd), "D tensors");
  return dotRule(a.is_complex() ? a.conj() : a, abd, b, bbd);
}

// linalg_cross wants equal ranks (it broadcasts size-1 dims): unbatched arguments get a size-1
// batch dim instead of being expanded.
std::tuple<Tensor, bdim_t> crossRule(const Tensor& a, bdim_t abd, const Tensor& b, bdim_t bbd, int64_t dim) {
  const int64_t ra = rankWithoutBdim(a, abd), rb = rankWithoutBdim(b, bbd);
  TORCH_CHECK(ra == rb, "linalg.cross: inputs must have the same number of dimensions.");
  Tensor x = abd ? moveBdimToFront(a, abd) : a.unsqueeze(0);
  Tensor y = bbd ? moveBdimToFront(b, bbd) : b.unsqueeze(0);
  return {at::linalg_cross(x, y, physicalDim(dim, ra, true)), 0};
}

// linalg.solve and linalg.lstsq take B as a vector (one per matrix of A) when B is 1-D or
// B.shape == A.shape[:-1], else as matrices. On [vmap, *logical] tensors torch sees the same case
// as the unbatched call exactly when B and A have equal ranks (matrices, equal batch ranks) or B
// is that vector: anything else runs per element (NOTE [Batch-native ops and logical ranks]).
struct SolveSpec {
  static constexpr bool always = false;
  static bool fast(const std::vector<const Tensor*>& ts) {
    const Tensor *A = ts[0], *Bm = ts[1];
    if (A->dim() < 2 || Bm->dim() < 1) return false;
    return Bm->dim() == A->dim() ||
           (Bm->dim() == A->dim() - 1 && Bm->sizes() == A->sizes().slice(0, A->dim() - 1));
  }
};

// atol/rtol broadcast against self's own batch dims: batched ones get size-1 dims up to those.
std::tuple<Tensor, bdim_t> pinvRule(const Tensor& a, bdim_t abd, const std::optional<Tensor>& atol,
                                    bdim_t atbd, const std::optional<Tensor>& rtol, bdim_t rtbd,
                                    bool hermitian) {
  const c10::SymInt B = batchSizeOf({{&a, abd}, {atol ? &*atol : &a, atbd}, {rtol ? &*rtol : &a, rtbd}});
  const int64_t r = rankWithoutBdim(a, abd) - 2;
  auto tol = [r](const std::optional<Tensor>& t, bdim_t bd) -> std::optional<Tensor> {
    if (!t || !t->defined() || !bd) return t;
    return padToLogicalRank(moveBdimToFront(*t, bd), true, r);
  };
  return {at::_ops::linalg_pinv_atol_rtol_tensor::call(materializeBdimFront(a, abd, B), tol(atol, atbd),
                                                       tol(rtol, rtbd), hermitian),
          0};
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
  static void fn(c10::DispatchKeySet ks, const Tensor& info_in, Api api, bool is_matrix) {
    const Tensor info = unwrapIfDead(info_in);
    const Level* top = levelStack().top();
    if (!top || top->kind != LevelKind::Vmap || isForeignWithFrontKey(info)) {
      detail::redirectToFront<Op, void, const Tensor&, Api, bool>(ks, info, api, is_matrix);
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
  m.impl("_linalg_check_errors", TORCH_FN(CheckErrorsKernel<at::_ops::_linalg_check_errors>::fn));
  // Each rule runs only on the logical ranks torch accepts; anything else runs per element, so
  // that torch's own error is raised (NOTE [Batch-native ops and logical ranks]).
  using Any = R<0, kAnyRank>;
  using AtLeast1 = R<1, kAnyRank>;
  registerVmapRule<at::_ops::dot, &dotRule, RankIn<R<1>, R<1>>>(m);
  registerVmapRule<at::_ops::vdot, &vdotRule, RankIn<R<1>, R<1>>>(m);
  registerVmapRule<at::_ops::matmul, &matmulRule, RankIn<AtLeast1, AtLeast1>>(m);
  registerVmapRule<at::_ops::mm, &mmRule, RankIn<R<2>, R<2>>>(m);
  registerVmapRule<at::_ops::bmm, &bmmRule, RankIn<R<3>, R<3>>>(m);
  registerVmapRule<at::_ops::mv, &mvRule, RankIn<R<2>, R<1>>>(m);
  registerVmapRule<at::_ops::addmm, &addmmRule, RankIn<R<0, 2>, R<2>, R<2>>>(m);
  registerVmapRule<at::_ops::linear, &linearRule, RankIn<AtLeast1, R<1, 2>, Any>>(m);
  registerVmapRule<at::_ops::trace, &traceRule, RankIn<R<2>>>(m);
  registerVmapRule<at::_ops::baddbmm, &baddbmmRule, RankIn<R<0, 3>, R<3>, R<3>>>(m);
  registerVmapRule<at::_ops::addbmm, &addbmmRule, RankIn<R<0, 2>, R<3>, R<3>>>(m);
  registerVmapRule<at::_ops::addmv, &addmvRule, RankIn<R<0, 1>, R<2>, R<1>>>(m);
  registerVmapRule<at::_ops::addr, &addrRule, RankIn<R<0, 2>, R<1>, R<1>>>(m);
  registerVmapRule<at::_ops::linalg_cross, &crossRule, RankIn<AtLeast1, AtLeast1>>(m);
  registerVmapRule<at::_ops::linalg_pinv_atol_rtol_tensor, &pinvRule, RankIn<R<2, kAnyRank>, Any, Any>>(m);
  // Batch-native ops, grouped by the core rank of each tensor argument (schema order).
  registerBatchNative<CoreRanks<2>, at::_ops::linalg_inv_ex, at::_ops::_linalg_det, at::_ops::_linalg_slogdet,
                      at::_ops::linalg_cholesky_ex, at::_ops::linalg_qr, at::_ops::_linalg_eigh,
                      at::_ops::_linalg_svd, at::_ops::linalg_lu_factor_ex, at::_ops::linalg_lu,
                      at::_ops::triu, at::_ops::tril, at::_ops::linalg_matrix_exp, at::_ops::linalg_eig,
                      at::_ops::_linalg_eigvals, at::_ops::linalg_ldl_factor_ex, at::_ops::cholesky_inverse,
                      at::_ops::cholesky, at::_ops::geqrf>(m);
  registerBatchNative<CoreRanks<2, 2>, at::_ops::linalg_solve_triangular, at::_ops::cholesky_solve,
                      at::_ops::triangular_solve>(m);
  registerBatchNative<CoreRanks<2, 1>, at::_ops::lu_unpack, at::_ops::linalg_householder_product>(m);
  registerBatchNative<CoreRanks<2, 1, 2>, at::_ops::linalg_lu_solve, at::_ops::linalg_ldl_solve,
                      at::_ops::ormqr>(m);
  registerBatchNative<SolveSpec, at::_ops::_linalg_solve_ex, at::_ops::linalg_lstsq>(m);
  // Composite entry points whose rank checks live in the ops they decompose into (under another
  // name: linalg.eigvals would report linalg.eig's error): checked here against logical ranks.
  registerCheckedComposite<
      CoreRanks<2>, at::_ops::det, at::_ops::inverse, at::_ops::logdet, at::_ops::slogdet,
      at::_ops::linalg_det, at::_ops::linalg_inv, at::_ops::linalg_cholesky, at::_ops::linalg_slogdet,
      at::_ops::linalg_eigh, at::_ops::linalg_eigvalsh, at::_ops::linalg_eigvals, at::_ops::linalg_svd,
      at::_ops::linalg_svdvals, at::_ops::svd, at::_ops::qr, at::_ops::linalg_lu_factor,
      at::_ops::linalg_ldl_factor, at::_ops::linalg_matrix_power, at::_ops::matrix_power,
      at::_ops::linalg_pinv, at::_ops::linalg_pinv_atol_rtol_float, at::_ops::linalg_pinv_rcond_tensor,
      at::_ops::pinverse, at::_ops::linalg_matrix_rank, at::_ops::linalg_matrix_rank_atol_rtol_float,
      at::_ops::linalg_matrix_rank_atol_rtol_tensor, at::_ops::linalg_matrix_rank_tol_tensor,
      at::_ops::linalg_cond, at::_ops::linalg_cond_p_str, at::_ops::linalg_matrix_norm,
      at::_ops::linalg_matrix_norm_str_ord, at::_ops::matrix_exp, at::_ops::_lu_with_info,
      at::_ops::nuclear_norm>(m);
  registerCheckedComposite<CoreRanks<2, 1>, at::_ops::orgqr>(m);
  registerCheckedComposite<CoreRanks<2, 2, 1>, at::_ops::lu_solve>(m);
  registerCheckedComposite<SolveSpec, at::_ops::linalg_solve, at::_ops::linalg_solve_ex>(m);
}

}  // namespace ftl
