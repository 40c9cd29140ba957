#pragma once
// NOTE [Decompositions for forward AD]
// torch has no forward-AD formula for a few backward ops (huber_loss_backward, ...), so forward
// AD through them (ft.hessian, ft.jacfwd(ft.jacrev(f))) raises torch's "Trying to use forward AD
// with ... not implemented". torch.func gets around it because its vmap decomposes them before
// any jvp level sees them (and torch's VariableType decomposes a few others itself, with the
// decompositions functorch_lite/_jac.py loads through torch.autograd.forward_ad). Ours runs them
// with a vmap rule, so the jvp level below meets them: gradProcess asks runJvpDecomposition, which
// runs the op as ordinary differentiable at:: ops instead. The pieces come back through the front
// kernel one by one, at the same level, and forward AD sees only ops it has formulas for.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

namespace ftl {

// Runs the decomposition of `op` on the stack's arguments and leaves its results there, if `op`
// has one here (returns false and leaves the stack alone otherwise).
bool runJvpDecomposition(const c10::OperatorHandle& op, torch::jit::Stack* stack);

}  // namespace ftl
