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
#include <cstdint>
#include <string>
#include <vector>

namespace ftl {

enum class FallbackMode : uint8_t { Warn, Error, Quiet };

FallbackMode fallbackMode();
void setFallbackMode(FallbackMode mode);
// Ops that went through the for-loop fallback since the last reset (for the OpInfo sweep).
std::vector<std::string> fallbackOpsSeen();
void resetFallbackOpsSeen();

}  // namespace ftl
