#pragma once
// How functorch_lite plugs into torch's dispatcher.
//
// NOTE [Dispatch keys we own]
// torch's own transform keys are not ours; we never register on them. We use keys that
// torch leaves without a fallback (checked at import, see checkKeysAreFree):
// - DeferredInit ("front"): a functionality key above autograd. It is in the TLS included set while
//   any level is live and is carried by our wrappers. Its kernel runs the top level's logic first:
//   vmap levels run a batching rule (unboxed per-op kernels registered on DeferredInit, one
//   registration per op family) or, in the boxed fallback, decompose CompositeImplicitAutograd ops
//   or loop over the batch; grad levels lift every tensor argument to a wrapper of the top level
//   and run torch's autograd on those wrappers. Composite kernels are never filled in for a
//   functionality key, so nothing shadows our fallback here.
// - AutogradPrivateUse3: torch's VariableType kernels run here on grad wrappers; we only add torch's
//   "autograd not implemented" fallback for ops that have no autograd kernel (custom ops).
// - PrivateUse3 ("back"): a backend key, so torch fills its dispatch table with
//   CompositeExplicitAutograd(NonFunctional) kernels that would run on our wrappers and silently
//   compute on nothing. We therefore register our back kernel for every operator that has no
//   CompositeImplicitAutograd kernel (those must keep decomposing at the autograd key), for ops
//   that exist at import and, through a registration listener, for ops defined later. The back
//   kernel unwraps the top grad level's wrappers and hands the op down (HandDownGuard).
//   SparsePrivateUse3 and SparseCsrPrivateUse3 get the same kernel and fallback: they are the back
//   keys of wrappers of sparse values (NOTE [Sparse grad wrappers] in tensors.h).
//
// NOTE [Why lift before autograd]
// torch's autograd records on whichever autograd meta it finds. If a grad wrapper of an outer
// level reached autograd inside an inner grad level, it would get an edge in the inner graph. The
// front kernel therefore replaces every argument that is not a wrapper of the top grad level by a
// fresh wrapper of that level (a constant there) before autograd sees anything.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <string>

#include "levels.h"

namespace ftl {

// NOTE [Foreign wrappers of our tensors]
// Some TensorImpls of other libraries copy the keys of the tensor they wrap (torch's
// FunctionalTensorWrapper; a Python wrapper subclass may ask for them), so a wrapper of one of our
// tensors carries DeferredInit and reaches our front kernel before its own kernel (Functionalize,
// Python) has unwrapped it. It is not ours (NOTE [Recognising our tensors] in tensors.h), and who
// handles the op first depends on nesting: a wrapper made inside the function of the top level
// wraps a tensor of that level and is an inner transform, so it goes first. The front kernel then
// redispatches the op below DeferredInit with the key set of the call (the TLS is left alone): the
// foreign kernel unwraps and calls the op again on our tensor, which comes back to the front. A
// wrapper of an outer level's tensor (seen through functional wrappers) is a value from outside,
// like any plain tensor: the top level lifts it or hands it down, and it goes first once the
// level it belongs to is on top. A foreign wrapper we cannot see into always goes first. Every
// kernel on DeferredInit, boxed or unboxed, makes this decision before reading its arguments.
FTL_API bool foreignGoesFirst(const at::Tensor& t);

// NOTE [Functional wrappers with stale keys]
// A FunctionalTensorWrapper takes its key set from the tensor it wraps when it is made, and keeps
// it when an in-place op replaces its value. Inside functionalize, forward AD writes a tangent in
// place: a functional wrapper of a plain tangent (a jacfwd basis) then holds a batched or grad
// tensor of ours while carrying only the plain tensor's keys. Dispatch still reaches our front
// kernel (DeferredInit is in the TLS while any level is live), but a test of the tensor's own keys
// would take it for a plain tensor and hand it down past the level its value belongs to. So a
// tensor with the Functionalize key counts as a foreign wrapper when the value under its
// functional wrappers is ours (isForeignWithFrontKey in tensors.h), and goes first like one.

// The type of a tensor for error messages: a Python subclass's qualified name when the Python
// bindings installed a namer (setTensorTypeNamer), the C++ TensorImpl type otherwise.
using TensorTypeNamer = std::string (*)(const at::Tensor&);
void setTensorTypeNamer(TensorTypeNamer namer);
std::string tensorTypeName(const at::Tensor& t);

// DeferredInit boxed kernel: the entry for every op while any level is live. `ks` is the key set
// of the call, used to redispatch below us (NOTE [Foreign wrappers of our tensors]).
FTL_API void frontFallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack);

// Boxed processing of an op whose top level is a vmap level and that has no unboxed rule
// (vmap/fallback.cpp): randomness, data-dependent ops, composite decomposition, for-loop.
void vmapBoxed(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top);

// NOTE [Foreign transforms] in dispatch.cpp: our transforms refuse tensors of another transform
// library and refuse to start inside one of its transforms, with a clear error.
bool isForeignTransformTensor(const at::Tensor& t);
void rejectForeignTransformTensor(const at::Tensor& t, const char* api);
void rejectForeignTransformActive(const char* where);

// Registers back kernels for ops defined since the last call. Cheap when there is nothing new.
void flushPendingBackKernels();
// Number of operators that carry our PrivateUse3 back kernel (for show_config and tests).
int64_t numBackKernels();

// Checks the keys (checkKeysAreFree), then registers our fallbacks and back kernels. Idempotent.
void initializeDispatch();

// Raises ImportError-worthy c10::Error if a key we rely on is already claimed by someone else.
void checkKeysAreFree();

// Calls `f(tensor)` for every tensor in stack[begin, end), replacing it by the result. Handles
// Tensor, Tensor?, Tensor[] and Tensor?[] arguments.
template <class F>
void forEachTensorInplace(torch::jit::Stack& stack, size_t begin, size_t end, F&& f) {
  for (size_t i = begin; i < end; ++i) {
    auto& iv = stack[i];
    if (iv.isTensor()) {
      iv = f(iv.toTensor());
    } else if (iv.isTensorList()) {
      // Lists have reference semantics: build a new one rather than edit the caller's.
      auto old = iv.toTensorList();
      c10::List<at::Tensor> list;
      list.reserve(old.size());
      for (const at::Tensor& t : old) list.push_back(f(t));
      iv = std::move(list);
    } else if (iv.isList()) {
      auto old = iv.toList();
      bool has_tensor = false;
      for (const c10::IValue& e : old) has_tensor |= e.isTensor();
      if (!has_tensor) continue;
      auto list = old.copy();
      for (size_t j = 0; j < list.size(); ++j) {
        c10::IValue e = list.get(j);
        if (e.isTensor()) list.set(j, f(e.toTensor()));
      }
      iv = std::move(list);
    }
  }
}

// Calls `f(tensor)` for every tensor in stack[begin, end) without modifying it.
template <class F>
void forEachTensor(const torch::jit::Stack& stack, size_t begin, size_t end, F&& f) {
  for (size_t i = begin; i < end; ++i) {
    const auto& iv = stack[i];
    if (iv.isTensor()) {
      f(iv.toTensor());
    } else if (iv.isTensorList()) {
      for (const at::Tensor& t : iv.toTensorList()) f(t);
    } else if (iv.isList()) {
      for (const c10::IValue& e : iv.toListRef())
        if (e.isTensor()) f(e.toTensor());
    }
  }
}

}  // namespace ftl
