#pragma once
// functorch_lite/rules.h: batching rules for a user's own operators, written in C++.
// Installed as <functorch_lite/rules.h>; build against it with the CMake target functorch_lite::rules
// (docs/extending_cpp.md).
//
// NOTE [Public C++ API]
// What is public, and kept source-compatible across patch releases of functorch_lite:
// - FUNCTORCH_LITE_LIBRARY_IMPL(ns, m): the block that registers rules for the ops of namespace
//   `ns` (TORCH_LIBRARY_IMPL on the dispatch key functorch_lite runs its vmap kernels from).
// - ftl::CustomOp<Self, Sig>: makes a struct naming a user operator usable as the `Op` of the
//   registration templates, like the generated at::_ops:: structs are.
// - ftl::registerVmapRule, registerVmapInplaceRule, registerFamily, registerInplaceFamily,
//   registerBatchNative (with the specs RankIn/R/CoreRanks), and the rule signature of
//   NOTE [Batching rules] in vmap/plumbing.h.
// - The helpers declared under "Helpers shared by rules" in vmap/plumbing.h (bdim_t,
//   rankWithoutBdim, moveBdimToFront, padToLogicalRank, physicalDim, materializeBdimFront,
//   flattenAfterBatch, batchSizeOf, exampleOf, stackRows, raiseForElement).
// Everything else these headers declare (ftl::detail, the core/ headers: levels, wrappers,
// dispatch) is implementation, visible only because the templates need it; it may change in any
// release. The templates are compiled into the user's extension and call into functorch_lite._C,
// so an extension is tied to the functorch_lite (and torch) build it was compiled against:
// rebuild it for each one (NOTE [One copy of the core] in core/export.h says why it links _C).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "vmap/plumbing.h"

// Incremented when something public above changes incompatibly.
#define FUNCTORCH_LITE_RULES_API 1

#define FUNCTORCH_LITE_LIBRARY_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, DeferredInit, m)

namespace ftl {

// struct MyOp : ftl::CustomOp<MyOp, at::Tensor(const at::Tensor&, double)> {
//   static constexpr const char* name = "myext::my_op";
//   static constexpr const char* overload_name = "";
// };
// `Sig` is the op's unboxed C++ signature, as its kernels take it (float -> double, int ->
// int64_t, Tensor -> const at::Tensor&, Tensor(a!) -> at::Tensor&); MyOp::call dispatches the op.
template <class Self, class Sig>
struct CustomOp;
template <class Self, class Ret, class... Args>
struct CustomOp<Self, Ret(Args...)> {
  using schema = Ret(Args...);
  static Ret call(Args... args) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(Self::name, Self::overload_name)
                               .template typed<schema>();
    return op.call(std::forward<Args>(args)...);
  }
};

}  // namespace ftl
