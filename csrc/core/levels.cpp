#include "core/levels.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/AutogradState.h>
#include <c10/util/Exception.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <atomic>
#include <sstream>

namespace ftl {

const char* levelKindName(LevelKind k) {
  switch (k) {
    case LevelKind::Vmap:
      return "vmap";
    case LevelKind::Grad:
      return "grad";
    case LevelKind::Jvp:
      return "jvp";
  }
  return "?";
}

namespace {
// Ids start at 1 so that 0 can mean "no level" in the Python API.
std::atomic<int64_t> next_level_id{1};
}  // namespace

// NOTE [The stack on autograd's device threads]
// torch's autograd engine runs the backward of CUDA (and other device) graphs on its own device
// threads. Those threads inherit the caller's ThreadLocalState, which includes the
// ThreadLocalDebugInfo chain: pushing a pointer to the caller's stack there (while any level is
// live) lets a device thread find the stack of the transform whose backward it runs. The caller
// is blocked in torch.autograd.grad meanwhile, so the stack is never used by two threads at once.
constexpr std::string_view kStackInfoName = "functorch_lite.level_stack";
const c10::DebugInfoKind kStackInfo(&kStackInfoName);

struct StackInfo final : c10::DebugInfoBase {
  explicit StackInfo(LevelStack* s) : stack(s) {}
  LevelStack* stack;
};

LevelStack& ownLevelStack() {
  static thread_local LevelStack stack;
  return stack;
}

LevelStack& levelStack() {
  LevelStack& stack = ownLevelStack();
  if (C10_LIKELY(stack.size() > 0)) return stack;
  if (auto* info = c10::ThreadLocalDebugInfo::get(kStackInfo)) {
    return *static_cast<StackInfo*>(info)->stack;
  }
  return stack;
}

const Level* LevelStack::find(int64_t id) const {
  for (size_t i = depth_; i-- > 0;) {
    if (levels_[i]->id == id) return levels_[i].get();
  }
  return nullptr;
}

int64_t Level::concreteBatchSize(const char* what) const {
  if (auto n = batch_size.maybe_as_int()) return *n;
  TORCH_CHECK_NOT_IMPLEMENTED(false, "functorch_lite.vmap: ", what,
                              " needs a concrete batch size, and this one is symbolic (torch.compile with "
                              "dynamic shapes); the call is traced again with the sizes specialized");
}

int64_t LevelStack::push(LevelKind kind, c10::SymInt batch_size, Randomness randomness) {
  auto tls = c10::impl::tls_local_dispatch_key_set();
  Level level{next_level_id.fetch_add(1),
              kind,
              std::move(batch_size),
              randomness,
              at::GradMode::is_enabled(),
              c10::AutogradState::get_tls_state().get_fw_grad_mode(),
              tls,
              /*lifted_inference_mode=*/false,
              std::make_shared<bool>(true)};
  auto autograd_state = c10::AutogradState::get_tls_state();
  if (kind != LevelKind::Vmap && autograd_state.get_inference_mode()) {
    level.lifted_inference_mode = true;
    autograd_state.set_inference_mode(false);
    c10::AutogradState::set_tls_state(autograd_state);
    tls.excluded_ = tls.excluded_ - c10::autograd_dispatch_keyset;
    tls.included_ = tls.included_.add(c10::DispatchKey::ADInplaceOrView);
  }
  if (levels_.empty()) c10::ThreadLocalDebugInfo::_push(kStackInfo, std::make_shared<StackInfo>(this));
  // On top of the visible levels, below any hidden ones (NOTE [Stack invariants]).
  levels_.insert(levels_.begin() + static_cast<std::ptrdiff_t>(depth_),
                 std::make_unique<Level>(std::move(level)));
  ++depth_;
  tls.included_ = tls.included_.add(c10::DispatchKey::DeferredInit);
  tls.excluded_ = tls.excluded_.remove(c10::DispatchKey::DeferredInit);
  // The Batched marker on our tensors must never dispatch (NOTE [Dispatch keys of our tensors]).
  tls.excluded_ = tls.excluded_.add(c10::DispatchKey::Batched);
  c10::impl::_force_tls_local_dispatch_key_set(tls);
  return levels_[depth_ - 1]->id;
}

void LevelStack::pop(int64_t id) {
  TORCH_CHECK(depth_ > 0 && levels_[depth_ - 1]->id == id,
              "functorch_lite: transforms must exit in the reverse order they were entered "
              "(tried to exit level ",
              id, ", stack is ", describeStack(), ")");
  Level& level = *levels_[depth_ - 1];
  *level.alive = false;
  c10::impl::_force_tls_local_dispatch_key_set(level.saved_tls);
  if (level.lifted_inference_mode) {
    auto autograd_state = c10::AutogradState::get_tls_state();
    autograd_state.set_inference_mode(true);
    c10::AutogradState::set_tls_state(autograd_state);
  }
  levels_.erase(levels_.begin() + static_cast<std::ptrdiff_t>(depth_ - 1));
  --depth_;
  if (levels_.empty()) c10::ThreadLocalDebugInfo::_pop(kStackInfo);
}

HandDownGuard::HandDownGuard()
    : stack_(levelStack()),
      prev_tls_(c10::impl::tls_local_dispatch_key_set()),
      prev_grad_mode_(at::GradMode::is_enabled()),
      prev_fw_grad_mode_(c10::AutogradState::get_tls_state().get_fw_grad_mode()) {
  TORCH_INTERNAL_ASSERT(stack_.depth_ > 0);
  const Level& hidden = *stack_.levels_[--stack_.depth_];
  // A TorchDispatchMode entered inside the transformed function (its Python keys are in the TLS
  // included set now, not in the one saved at push) sees the plain ops below, as in torch.func.
  static const c10::DispatchKeySet kModeKeys({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot});
  auto below = hidden.saved_tls;
  below.included_ = below.included_ | (prev_tls_.included_ & kModeKeys);
  // Autocast is on while its keys are not excluded: the state of the moment goes down with the op,
  // whether autocast was entered around the transform or inside the function, and an autocast
  // kernel that already cast this op (it excludes its key while redispatching) is not run again
  // below (NOTE [Autocast and levels] in tensors.h).
  below.excluded_ = (below.excluded_ - c10::autocast_dispatch_keyset) |
                    (prev_tls_.excluded_ & c10::autocast_dispatch_keyset);
  c10::impl::_force_tls_local_dispatch_key_set(below);
  // A no_grad active now (inside f) stays active for every level below; a no_grad that was
  // active around the transform call comes back into force when leaving the transform.
  if (hidden.kind == LevelKind::Grad) {
    at::GradMode::set_enabled(prev_grad_mode_ && hidden.prev_grad_mode);
  }
  if (hidden.kind == LevelKind::Jvp) {
    c10::AutogradState::get_tls_state().set_fw_grad_mode(prev_fw_grad_mode_ && hidden.prev_fw_grad_mode);
  }
}

HandDownGuard::~HandDownGuard() {
  ++stack_.depth_;
  c10::impl::_force_tls_local_dispatch_key_set(prev_tls_);
  at::GradMode::set_enabled(prev_grad_mode_);
  c10::AutogradState::get_tls_state().set_fw_grad_mode(prev_fw_grad_mode_);
}

std::string describeStack() {
  const auto& s = levelStack();
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.depth(); ++i) {
    const auto& l = s.at(i);
    if (i) os << ", ";
    os << levelKindName(l.kind) << "(id=" << l.id;
    if (l.kind == LevelKind::Vmap) os << ", batch_size=" << l.batch_size;
    os << ")";
  }
  os << "]";
  return os.str();
}

}  // namespace ftl
