#pragma once
// Settings of the vmap for-loop fallback.
//
// NOTE [The for-loop fallback]
// An op with batched arguments and no batching rule is run once per batch element on slices of
// its arguments, and the results are stacked along a new dim 0. This is always correct for ops
// whose outputs have the same shape for every element, but slow, so it is loud: a warning names
// the op the first time it happens (mode "warn", the default), mode "error" raises instead (tests
// use it to prove an op has a real rule), and mode "quiet" says nothing. The mode comes from the
// environment variable FUNCTORCH_LITE_VMAP_FALLBACK at import and from
// functorch_lite.set_vmap_fallback() at run time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/levels.h"

namespace ftl {

enum class FallbackMode : uint8_t { Warn, Error, Quiet };

FallbackMode fallbackMode();
void setFallbackMode(FallbackMode mode);
// Ops that went through the for-loop fallback since the last reset (for the OpInfo sweep).
std::vector<std::string> fallbackOpsSeen();
void resetFallbackOpsSeen();

// NOTE [User batching rules]
// Rules written in Python (ft.register_vmap, torch.library.register_vmap, an autograd.Function's
// vmap staticmethod is handled in Python alone) are looked up only for ops named here, so ops
// without one pay nothing: the unboxed C++ rules never see this, and the boxed path tests one
// flag. An op named here is handed to the hook (set by the Python bindings) at the start of
// vmapBoxed when something is batched at the top vmap level; the hook returns false to let the
// op take the ordinary path. An op with an unboxed C++ rule on DeferredInit gets the boxed front
// fallback registered over it while it is named, so that the user's rule wins over ours; removing
// the name restores our rule.
using UserRuleHook = bool (*)(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top);
void setUserRuleHook(UserRuleHook hook);
// `name` as c10::toString(OperatorName) prints it: "ns::op" or "ns::op.overload".
void addUserRuleOp(const std::string& name);
void removeUserRuleOp(const std::string& name);

}  // namespace ftl
