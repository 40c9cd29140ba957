// Decompositions for forward AD (NOTE [Decompositions for forward AD] in jvp_decomps.h): backward
// ops that have no forward-AD formula in torch, and ops whose formula is wrong at second order.
// Each is the op's math in differentiable at:: ops, with the op's own result shape and dtype.
#include "core/jvp_decomps.h"

#include <ATen/Functions.h>
#include <ATen/core/Reduction.h>

#include <string>
#include <unordered_map>

namespace ftl {
namespace {

using at::Tensor;
using torch::jit::Stack;

// The scale a reduction puts on each element's gradient.
double reductionScale(const Tensor& self, int64_t reduction) {
  return reduction == at::Reduction::Mean ? 1.0 / static_cast<double>(self.numel()) : 1.0;
}

// huber_loss_backward(grad_output, self, target, reduction, delta): the loss is quadratic
// (0.5 d^2) within delta of the target and linear (delta * (|d| - 0.5 delta)) outside, so the
// gradient is d inside and delta * sign(d) outside.
void huberLossBackward(Stack* stack) {
  auto a = torch::jit::pop(*stack, 5);
  const Tensor g = a[0].toTensor(), self = a[1].toTensor(), target = a[2].toTensor();
  const double delta = a[4].toDouble();
  const Tensor scaled = g.mul(reductionScale(self, a[3].toInt()));
  const Tensor d = self.sub(target);
  // d strictly inside, +-delta elsewhere (nan stays nan, as in torch's kernel). Its derivative is
  // 1 strictly inside and 0 elsewhere, as torch's huber_loss_double_backward has it (d < delta):
  // clamp's own would be 1 at |d| == delta, so the outer branch is clamp's value, detached (a
  // constant, or nan); sign() would turn nan into 0.
  const Tensor clipped = at::where(d.abs().lt(delta), d, at::clamp(d, -delta, delta).detach());
  torch::jit::push(*stack, clipped.mul(scaled).to(self.scalar_type()));
}

// soft_margin_loss_backward(grad_output, self, target, reduction): the loss is
// log(1 + exp(-y x)), whose derivative in x is -y * sigmoid(-y x).
void softMarginLossBackward(Stack* stack) {
  auto a = torch::jit::pop(*stack, 4);
  const Tensor g = a[0].toTensor(), self = a[1].toTensor(), target = a[2].toTensor();
  const Tensor scaled = g.mul(reductionScale(self, a[3].toInt()));
  const Tensor grad = target.neg().mul(at::sigmoid(target.neg().mul(self))).mul(scaled);
  torch::jit::push(*stack, grad.to(self.scalar_type()));
}

// _linalg_solve_ex(A, B, left, check_errors) -> (result, LU, pivots, info), what
// torch.linalg.solve runs. torch's forward formula for it is right at first order but reads the LU
// factors as constants, so forward-over-forward (jvp of jacfwd) misses their tangent and is wrong
// (off by O(1) against central differences of the Jacobian; reverse-over-reverse is right). The
// same solve as lu_factor + lu_solve, whose formulas carry the factors' tangents, is right at any
// order and costs the same: it is what _linalg_solve_ex does inside.
void linalgSolveEx(Stack* stack) {
  auto a = torch::jit::pop(*stack, 4);
  const Tensor A = a[0].toTensor(), B = a[1].toTensor();
  const bool left = a[2].toBool(), check_errors = a[3].toBool();
  // B is a vector (or a batch of them) when it has A's shape without its last dim
  const bool vector =
      B.dim() == 1 || (A.dim() - 1 == B.dim() && B.sizes() == A.sizes().slice(0, A.dim() - 1));
  TORCH_CHECK(left || !vector, "torch.linalg.solve: with left=False, B must be a matrix (or a batch of ",
              "matrices), not a vector of shape ", B.sizes());
  auto [LU, pivots, info] = at::linalg_lu_factor_ex(A, /*pivot=*/true, /*check_errors=*/false);
  if (check_errors) at::_linalg_check_errors(info, "torch.linalg.solve_ex", A.dim() == 2);
  Tensor result = at::linalg_lu_solve(LU, pivots, vector ? B.unsqueeze(-1) : B, left);
  if (vector) result = result.squeeze(-1);
  torch::jit::push(*stack, result, LU, pivots, info);
}

// The sign of the permutation that LU pivots (1-based row swaps) describe, as A's real dtype.
Tensor permutationSign(const Tensor& pivots, const Tensor& like) {
  const Tensor rows = at::arange(1, pivots.size(-1) + 1, pivots.options());
  const Tensor swaps = pivots.ne(rows).sum(-1);
  return at::ones_like(swaps, like.options()).sub(swaps.remainder(2).mul(2).to(like.scalar_type()));
}

// _linalg_det(A) -> (det, LU, pivots) and _linalg_slogdet(A) -> (sign, logabsdet, LU, pivots):
// torch's forward formulas read LU as a constant too (so det, slogdet and logdet were wrong at
// second order); from lu_factor_ex's differentiable factors: det = sign(P) prod(diag(U)).
void linalgDet(Stack* stack) {
  const Tensor A = torch::jit::pop(*stack).toTensor();
  auto [LU, pivots, info] = at::linalg_lu_factor_ex(A, /*pivot=*/true, /*check_errors=*/false);
  const Tensor det = LU.diagonal(0, -2, -1).prod(-1).mul(permutationSign(pivots, A));
  torch::jit::push(*stack, det, LU, pivots);
}

void linalgSlogdet(Stack* stack) {
  const Tensor A = torch::jit::pop(*stack).toTensor();
  auto [LU, pivots, info] = at::linalg_lu_factor_ex(A, /*pivot=*/true, /*check_errors=*/false);
  const Tensor diag = LU.diagonal(0, -2, -1);
  const Tensor logabsdet = diag.abs().log().sum(-1);
  const Tensor sign = diag.sign().prod(-1).mul(permutationSign(pivots, A)).detach();
  torch::jit::push(*stack, sign, logabsdet, LU, pivots);
}

// cholesky_inverse(L, upper) = (L L^H)^-1 = L^-H L^-1 (U^-1 U^-H for upper): torch's forward
// formula is wrong already at first order (jvp off by ~1e-2 against differences, where its
// backward formula is right); triangular solves carry every tangent. At every jvp level.
void choleskyInverse(Stack* stack) {
  auto a = torch::jit::pop(*stack, 2);
  const Tensor L = a[0].toTensor();
  const bool upper = a[1].toBool();
  const Tensor eye = at::eye(L.size(-1), L.options()).expand(L.sizes());
  const Tensor inv = at::linalg_solve_triangular(L, eye, upper, /*left=*/true);
  torch::jit::push(*stack, upper ? inv.matmul(inv.mH()) : inv.mH().matmul(inv));
}

// copy(self, src, non_blocking): copy_ without the write, which functionalization makes of copy_
// (`y[0] = v`, `y.copy_(v)` inside functionalize). torch has a forward formula for copy_ but none
// for copy, so jvp/jacfwd of such a function failed (in torch.func too). A fresh tensor like self
// with src copied into it is the same value, and copy_'s formula gives its tangent.
void functionalCopy(Stack* stack) {
  auto a = torch::jit::pop(*stack, 3);
  Tensor out = at::empty_like(a[0].toTensor());
  out.copy_(a[1].toTensor(), a[2].toBool());
  torch::jit::push(*stack, out);
}

// A decomposition may decline: it then leaves the stack alone and torch's formula runs.
using Applies = bool (*)(const Stack&);

// The second-order fixes only matter when the jvp level's formula is itself differentiated by
// another grad/jvp level; alone, torch's own first-order formula is right (and it treats singular
// matrices with more care than a product of pivots does).
bool differentiatedTwice() {
  // all levels, hidden ones too: the wrong formula is the one an outer level runs on the primal
  // op while the inner level's tangent computation (which reads LU) still has to reach it
  const auto& levels = levelStack();
  int n = 0;
  for (size_t i = 0; i < levels.size(); ++i)
    if (levels.at(i).kind != LevelKind::Vmap) ++n;
  return n > 1;
}

bool nested(const Stack&) {
  return differentiatedTwice();
}

// det/slogdet/cholesky_inverse: real dtypes (the sign of a complex determinant is a phase).
bool realInput(const Stack& stack) {
  const auto& A = stack.back().isTensor() ? stack.back().toTensor() : stack[stack.size() - 2].toTensor();
  return !A.is_complex() && A.dim() >= 2;
}

bool nestedReal(const Stack& stack) {
  return realInput(stack) && differentiatedTwice();
}

using Decomposition = void (*)(Stack*);

struct Entry {
  Decomposition run;
  Applies applies;   // nullptr: always
  bool grad_levels;  // also at grad levels (second-order fixes), not only at jvp levels
};

const std::unordered_map<std::string, Entry>& decompositions() {
  static const std::unordered_map<std::string, Entry> table = {
      {"aten::_linalg_det", {&linalgDet, &nestedReal, true}},
      {"aten::_linalg_slogdet", {&linalgSlogdet, &nestedReal, true}},
      {"aten::_linalg_solve_ex", {&linalgSolveEx, &nested, true}},
      {"aten::cholesky_inverse", {&choleskyInverse, &realInput, false}},
      {"aten::copy", {&functionalCopy, nullptr, false}},
      {"aten::huber_loss_backward", {&huberLossBackward, nullptr, false}},
      {"aten::soft_margin_loss_backward", {&softMarginLossBackward, nullptr, false}},
  };
  return table;
}

}  // namespace

bool runJvpDecomposition(const c10::OperatorHandle& op, Stack* stack, LevelKind kind) {
  if (kind == LevelKind::Vmap) return false;
  const auto& name = op.operator_name();
  if (!name.overload_name.empty()) return false;  // out= overloads: not differentiable anyway
  const auto& table = decompositions();
  auto it = table.find(name.name);
  if (it == table.end() || (kind == LevelKind::Grad && !it->second.grad_levels)) return false;
  if (it->second.applies && !it->second.applies(*stack)) return false;
  it->second.run(stack);
  return true;
}

}  // namespace ftl
