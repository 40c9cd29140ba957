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
// The same mechanism replaces ops whose forward formula is right at first order but wrong when
// differentiated again: _linalg_solve_ex reads its LU factors as constants, so when an outer level
// (jvp or grad) differentiates the inner jvp level's tangent, its own formula for the primal op
// gives LU no derivative. Those run at grad levels too, and only under two or more
// differentiating levels (one level alone gets torch's formula, which is right at first order).
// The cases found and the ones left are listed in docs/reliability.md.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "levels.h"

namespace ftl {

// Runs the decomposition of `op` on the stack's arguments and leaves its results there, if `op`
// has one for a level of this kind here (returns false and leaves the stack alone otherwise).
bool runJvpDecomposition(const c10::OperatorHandle& op, torch::jit::Stack* stack, LevelKind kind);

}  // namespace ftl
