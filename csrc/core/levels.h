#pragma once
// The level stack: one interpreter per active transform, innermost on top.
//
// NOTE [Levels]
// Every call of a transform (ft.vmap(f)(x), ft.grad(f)(x), ...) pushes one Level for the duration
// of the call of f. A Level's id is unique for the life of the process and grows with every push,
// so for two live levels the inner one always has the larger id. Wrappers (BatchedTensorImpl,
// GradWrapperImpl) record the id of the level that made them and share the level's `alive` flag:
// once the level is popped, its wrappers are dead, and an id is never reused, so a dead wrapper can
// never be mistaken for one of a newer level at the same depth.
//
// NOTE [Handing an op down]
// An op is always handled by the top level first (the DeferredInit "front" kernel, see
// dispatch.h). When that level has done its part (a batching rule unwrapped its tensors, or
// autograd recorded its node), it runs the rest of the op "at the level below" by hiding itself
// with a HandDownGuard: `depth` drops by one, the dispatch-key TLS is reset to what it was when the
// hidden level was entered (so DeferredInit is still included if levels remain, and is no longer
// included if none do) except for the keys of modes that follow the thread's current state
// (a TorchDispatchMode entered inside f, autocast: NOTE [Autocast and levels] in tensors.h), and
// for grad levels GradMode becomes (current mode && mode in force when
// the level was entered): a torch.no_grad inside f hides ops from f's level and from every level
// below it, while a torch.no_grad around the transform call only comes back into force below the
// transform (torch.func's rule). jvp levels do the same with the forward-AD grad mode. The guard
// restores all of it on exit, also on exceptions.
//
// NOTE [Functionalize entered inside a level]
// functionalize (torch's functional tensors, functorch_lite/_functionalize.py) is a thread mode,
// the Functionalize key in the TLS included set, not a level of ours. Two rules keep it on the
// functional values and off our wrappers:
// - Entered inside f (vmap(functionalize(g)), ...): the mode sits between the top level and the
//   one below it, but our front kernel, above every mode, sees each op first. An op with tensor
//   arguments is sorted out by them (a functional wrapper of the top level's tensor goes first:
//   NOTE [Foreign wrappers of our tensors]). A factory has none: g's torch.zeros (or the basis
//   jacfwd builds, or the result of a level pushed inside g handed down to here) comes to the
//   front with Functionalize included and not excluded while the top level's saved TLS lacks it,
//   and the front kernel makes its result functional once the level has processed it (dispatch.cpp,
//   frontFallback), which is where g's functionalize would have wrapped it. Handing down restores
//   the level's saved TLS, so the levels below never see the mode. An op that reaches us from
//   functionalization's own kernel (it unwrapped a functional tensor and called the op again)
//   has Functionalize excluded, and so has everything a rule or autograd runs below us.
// - Entered around a grad/jvp level (functionalize(jacfwd(g)), ...): while autograd runs on the
//   level's wrappers, Functionalize is excluded (dispatch.cpp, gradProcess). Otherwise its kernel
//   would run between autograd and our back kernel on the wrappers themselves: a tensor that a
//   derivative formula makes there (a zero tangent) would come out functional, and writing it
//   into a tangent wrapper is "mutating a non-functional tensor with a functional tensor". The
//   back kernel hands down with the level's saved TLS, where the mode is on again for the
//   functional values under the wrappers.
//
// NOTE [Inference mode around a transform]
// torch.inference_mode() around a grad or jvp transform acts like torch.no_grad() around it (the
// torch.func rule): the transform still differentiates its own function, and only the levels
// below it (outer transforms, torch's own autograd) stop recording. push() of a Grad/Jvp level
// therefore lifts inference mode while the level is live: the autograd keys leave the TLS excluded
// set and the inference-mode flag is cleared, so the level's wrappers get graphs and new tensors
// are normal tensors. saved_tls keeps the inference-mode TLS, so handing an op down restores it for
// the levels below; pop() restores the flag. An inference_mode *inside* the function is left alone:
// it hides ops from every level, as in eager torch.
//
// NOTE [Stack invariants]
// - levels_[0, depth_) are visible to dispatch; levels_[depth_, size) are hidden while an op is
//   being handed down. Only the Python entry points push and pop, always at the top of the
//   visible part. A transform entered while levels are hidden (an autograd.Function's generated
//   vmap rule, or a user batching rule that calls a transform, runs with its level hidden) sits
//   below the hidden levels until it exits, which it does before they are shown again. Levels
//   live on the heap, so a Level& held by a kernel stays valid across such a push.
// - While depth_ > 0, DeferredInit is in the TLS included set, except inside the window where a
//   grad level runs torch's autograd kernels on its wrappers (see gradProcess in dispatch.cpp).
#include <c10/core/SymInt.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "export.h"

namespace ftl {

enum class LevelKind : uint8_t { Vmap, Grad, Jvp };
enum class Randomness : uint8_t { Error, Same, Different };

const char* levelKindName(LevelKind k);

// NOTE [Symbolic batch sizes]
// Under torch.compile with dynamic shapes the batch size a vmap level maps over is a SymInt of
// the tracer's ShapeEnv (eagerly, and in static traces, it is a plain int inside a SymInt, at
// no cost). Rules build sizes from it with the *_symint ops, so what reaches the graph is
// symbolic in it and one compiled graph serves every batch size. A path that needs a number
// (the for-loop fallback runs the op batch_size times; randomness="different" draws per
// element) asks for concreteBatchSize(), which raises NotImplementedError when it is symbolic:
// the recorded call then specializes the sizes and traces again (NOTE [Symbolic sizes, then
// specialized ones] in functorch_lite/_compile.py), so such a step compiles once per batch size,
// as all of them did before.
struct Level {
  int64_t id;
  LevelKind kind;
  c10::SymInt batch_size;                    // vmap only (NOTE [Symbolic batch sizes])
  Randomness randomness;                     // vmap only
  bool prev_grad_mode;                       // GradMode in force when the level was entered
  bool prev_fw_grad_mode;                    // forward-AD grad mode in force when the level was entered
  c10::impl::LocalDispatchKeySet saved_tls;  // dispatch-key TLS in force when the level was entered
  bool lifted_inference_mode;                // NOTE [Inference mode around a transform]
  std::shared_ptr<bool> alive;

  // batch_size as a number, for the paths that need one; raises NotImplementedError naming
  // `what` when it is symbolic.
  FTL_API int64_t concreteBatchSize(const char* what) const;
};

class LevelStack {
 public:
  const Level* top() const { return depth_ ? levels_[depth_ - 1].get() : nullptr; }
  size_t depth() const { return depth_; }
  size_t size() const { return levels_.size(); }
  const Level& at(size_t i) const { return *levels_.at(i); }
  // Finds a visible level by id; nullptr if it is not on the visible part of the stack.
  const Level* find(int64_t id) const;

  int64_t push(LevelKind kind, c10::SymInt batch_size, Randomness randomness);
  // Pops the top level, which must have id `id`; restores the TLS saved at push.
  void pop(int64_t id);

 private:
  friend class HandDownGuard;
  std::vector<std::unique_ptr<Level>> levels_;
  size_t depth_ = 0;
};

// The stack that dispatch on this thread must use: the thread's own, or, on one of autograd's
// device threads running the backward of a transform started elsewhere, that thread's stack
// (NOTE [The stack on autograd's device threads] in levels.cpp).
FTL_API LevelStack& levelStack();
// The calling thread's own stack: transforms entered on this thread push and pop here.
LevelStack& ownLevelStack();

// See NOTE [Handing an op down]. Requires a visible level.
class FTL_API HandDownGuard {
 public:
  HandDownGuard();
  ~HandDownGuard();
  HandDownGuard(const HandDownGuard&) = delete;
  HandDownGuard& operator=(const HandDownGuard&) = delete;

 private:
  LevelStack& stack_;
  c10::impl::LocalDispatchKeySet prev_tls_;
  bool prev_grad_mode_;
  bool prev_fw_grad_mode_;
};

// Describes the visible stack, innermost last, for error messages and debugging.
std::string describeStack();

}  // namespace ftl
