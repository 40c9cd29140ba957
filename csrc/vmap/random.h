#pragma once
// Random ops at a vmap level (NOTE [Randomness under vmap] in random.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "core/levels.h"

namespace ftl {

// Handles `op` if it draws random numbers, following the level's randomness, batched arguments or
// not, and returns true. Returns false for ops that do not draw (including random ops in eval
// mode, and composite random ops such as rrelu, whose decomposition draws): the caller goes on.
bool vmapRandom(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top);

// The for-loop fallback (fallback.cpp): runs `op` once per batch element, batch_size times even
// when nothing is batched, and stacks the results along dim 0.
void vmapForLoop(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top);

}  // namespace ftl
