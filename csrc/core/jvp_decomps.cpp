// Decompositions of backward ops that have no forward-AD formula in torch (NOTE [Decompositions
// for forward AD] in jvp_decomps.h). Each is the op's math in differentiable at:: ops, with the
// op's own result shape and dtype.
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

using Decomposition = void (*)(Stack*);

const std::unordered_map<std::string, Decomposition>& decompositions() {
  static const std::unordered_map<std::string, Decomposition> table = {
      {"aten::huber_loss_backward", &huberLossBackward},
      {"aten::soft_margin_loss_backward", &softMarginLossBackward},
  };
  return table;
}

}  // namespace

bool runJvpDecomposition(const c10::OperatorHandle& op, Stack* stack) {
  const auto& name = op.operator_name();
  if (!name.overload_name.empty()) return false;  // out= overloads: not differentiable anyway
  const auto& table = decompositions();
  auto it = table.find(name.name);
  if (it == table.end()) return false;
  it->second(stack);
  return true;
}

}  // namespace ftl
