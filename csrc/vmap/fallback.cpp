// The boxed path of a vmap level: ops without an unboxed batching rule come here (from the
// DeferredInit fallback). In order: random ops follow the level's randomness (random.cpp; even
// when nothing is batched: a factory draw must honour 'different'); ops with nothing batched at
// this level are handed down (composite ones decompose unless randomness is 'same': their pieces
// may draw); data-dependent ops raise; CompositeImplicitAutograd ops are decomposed so that their
// pieces are batched; everything else runs the for-loop fallback.
#include "vmap/fallback.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/select_ops.h>
#include <ATen/ops/stack_ops.h>
#include <c10/util/Exception.h>

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "core/dispatch.h"
#include "core/tensors.h"
#include "vmap/random.h"

namespace ftl {

namespace {

FallbackMode initialMode() {
  const char* env = std::getenv("FUNCTORCH_LITE_VMAP_FALLBACK");
  if (!env) return FallbackMode::Warn;
  std::string v(env);
  if (v == "error") return FallbackMode::Error;
  if (v == "quiet") return FallbackMode::Quiet;
  return FallbackMode::Warn;
}

std::atomic<FallbackMode>& modeRef() {
  static std::atomic<FallbackMode> mode{initialMode()};
  return mode;
}

struct Seen {
  std::mutex mutex;
  std::set<std::string> ops;     // since the last reset (sweep bookkeeping)
  std::set<std::string> warned;  // warned once per op per process
};
Seen& seen() {
  static auto* s = new Seen();
  return *s;
}

// The process-wide default warning handler, read while the library loads (no Python handler is
// installed then).
c10::WarningHandler* baseWarningHandler() {
  static c10::WarningHandler* const base = c10::WarningUtils::get_warning_handler();
  return base;
}
[[maybe_unused]] const bool base_handler_read_at_load = (baseWarningHandler(), true);

void noteFallback(const c10::OperatorName& name) {
  std::string op = c10::toString(name);
  const auto mode = fallbackMode();
  // "Batching rule not implemented": torch.func's phrase for a missing rule, so that code
  // matching its errors matches ours.
  TORCH_CHECK(mode != FallbackMode::Error,
              "functorch_lite.vmap: Batching rule not implemented "
              "for ",
              op,
              ", and the for-loop fallback is disabled (set_vmap_fallback('error') or "
              "FUNCTORCH_LITE_VMAP_FALLBACK=error). Use set_vmap_fallback('warn') to allow it.");
  bool first = false;
  {
    std::lock_guard<std::mutex> g(seen().mutex);
    seen().ops.insert(op);
    // Only a warning actually shown counts: 'quiet' must not use up the one-time warning.
    if (mode == FallbackMode::Warn) first = seen().warned.insert(op).second;
  }
  if (first && mode == FallbackMode::Warn) {
    // Under Python, no C++ source location: torch's Python handler then reports the warning at
    // the user's line, with no "Triggered internally at" suffix, and warning filters apply. The
    // C++ default handler (no Python on this call path) needs a file name to print.
    const bool python_handler = c10::WarningUtils::get_warning_handler() != baseWarningHandler();
    c10::warn(c10::Warning(c10::UserWarning(),
                           {__func__, python_handler ? nullptr : __FILE__, python_handler ? 0u : __LINE__},
                           c10::str("functorch_lite.vmap: there is no batching rule for ", op,
                                    ", so it runs as a for-loop over the batch (correct, but slower). "
                                    "Silence with functorch_lite.set_vmap_fallback('quiet')."),
                           /*verbatim=*/false));
  }
}

// Ops whose output depends on tensor *values* in a way one batched computation cannot express.
void rejectDataDependent(const c10::OperatorName& name) {
  const std::string& n = name.name;
  TORCH_CHECK(n != "aten::_local_scalar_dense" && n != "aten::item",
              "functorch_lite.vmap: the function called .item() (or float(), int(), bool(), "
              ".tolist(), or Python control flow such as `if tensor:`) on a batched tensor. A "
              "batched tensor holds one value per batch element, so there is no single Python "
              "number to return. Rewrite the computation with tensor operations (e.g. "
              "torch.where instead of `if`).");
  TORCH_CHECK(n != "aten::is_nonzero",
              "functorch_lite.vmap: data-dependent control flow (`if tensor:`, `while tensor:`, "
              "bool(tensor)) is not supported on batched tensors: each batch element could take a "
              "different branch. Use torch.where or compute both branches.");
  static const std::unordered_set<std::string> dynamic_shape = {
      "aten::nonzero",  "aten::masked_select",      "aten::unique_dim",    "aten::_unique",
      "aten::_unique2", "aten::unique_consecutive", "aten::nonzero_numpy", "aten::equal"};
  TORCH_CHECK(!dynamic_shape.count(n), "functorch_lite.vmap: ", c10::toString(name),
              " returns a result whose shape (or Python value) depends on the data of each batch "
              "element, which vmap cannot batch. Boolean-mask indexing (x[mask]) is the usual "
              "cause: use torch.where(mask, x, 0) or multiply by the mask instead.");
}

bool isMutated(const c10::FunctionSchema& schema, size_t i) {
  const auto* alias = schema.arguments()[i].alias_info();
  return alias && alias->isWrite();
}

// Runs `op` once per batch element and stacks the results along dim 0 (batch_size times even when
// nothing is batched: randomness='different' uses that for independent draws).
void forLoop(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top) {
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  const size_t nrets = schema.returns().size();
  const int64_t lvl = top.id;
  const int64_t B = top.concreteBatchSize(schema.name().c_str());
  std::vector<c10::IValue> args(stack->end() - nargs, stack->end());
  torch::jit::drop(*stack, nargs);

  // A mutated argument must be batched: one unbatched tensor cannot hold batch_size results.
  for (size_t i = 0; i < nargs; ++i) {
    if (!isMutated(schema, i) || !args[i].isTensor()) continue;
    TORCH_CHECK(batchedAt(args[i].toTensor(), lvl), "functorch_lite.vmap: ", schema.operator_name(),
                " writes in place into its argument '", schema.arguments()[i].name(),
                "', which is not batched, while other arguments "
                "are. The result would need one value per batch element. Use the out-of-place "
                "version of the operation, or make '",
                schema.arguments()[i].name(),
                "' batched first (e.g. expand it over the batch and clone it).");
  }

  std::vector<std::vector<c10::IValue>> results(nrets);
  for (auto& r : results) r.reserve(B);
  {
    HandDownGuard guard;
    for (int64_t b = 0; b < B; ++b) {
      torch::jit::Stack slice(args.begin(), args.end());
      forEachTensorInplace(slice, 0, nargs, [&](const at::Tensor& t) {
        if (auto* bt = batchedAt(t, lvl)) return at::_ops::select_int::call(bt->value(), bt->bdim(), b);
        return t;
      });
      // An in-place op that changes its argument's shape (squeeze_, t_, resize_, ...) would
      // change only the slice, silently: refuse instead.
      c10::SmallVector<std::pair<at::Tensor, std::vector<int64_t>>, 2> mutated_slices;
      for (size_t i = 0; i < nargs; ++i) {
        if (isMutated(schema, i) && slice[i].isTensor()) {
          const at::Tensor& t = slice[i].toTensor();
          mutated_slices.emplace_back(t, t.sizes().vec());
        }
      }
      op.callBoxed(slice);
      for (const auto& [t, sizes] : mutated_slices) {
        TORCH_CHECK(t.sizes() == c10::IntArrayRef(sizes), "functorch_lite.vmap: ", schema.operator_name(),
                    " changes the shape of its argument in place, which "
                    "has no batching rule (the for-loop fallback cannot change the shape of a "
                    "batched tensor). Use the out-of-place version (e.g. x = x.squeeze() instead "
                    "of x.squeeze_()).");
      }
      for (size_t r = 0; r < nrets; ++r) results[r].push_back(std::move(slice[r]));
    }
  }

  for (size_t r = 0; r < nrets; ++r) {
    // In-place and out= ops return their mutated argument: give back the original tensor.
    const auto* ralias = schema.returns()[r].alias_info();
    if (ralias && ralias->isWrite()) {
      bool found = false;
      for (size_t i = 0; i < nargs && !found; ++i) {
        const auto* aalias = schema.arguments()[i].alias_info();
        if (aalias && aalias->isWrite() && aalias->beforeSets() == ralias->beforeSets()) {
          if (auto* bt = batchedAt(args[i].toTensor(), lvl)) bt->refreshMetadata();
          stack->push_back(args[i]);
          found = true;
        }
      }
      if (found) continue;
    }
    auto& outs = results[r];
    if (outs.empty()) {
      TORCH_CHECK(false, "functorch_lite.vmap: cannot run ", schema.operator_name(),
                  " over an empty batch with the for-loop fallback");
    }
    auto stackTensors = [&](const std::vector<at::Tensor>& ts) {
      const auto sizes = ts.front().sizes();
      for (const auto& t : ts) {
        TORCH_CHECK(t.sizes() == sizes, "functorch_lite.vmap: ", schema.operator_name(),
                    " returned tensors of different shapes for different batch elements (", sizes, " and ",
                    t.sizes(),
                    "). vmap needs every element to produce the same "
                    "shape; operations whose output shape depends on the data cannot be batched.");
      }
      HandDownGuard guard;
      return at::_ops::stack::call(ts, 0);
    };
    bool all_undefined = true;
    for (auto& iv : outs) all_undefined &= iv.isNone() || (iv.isTensor() && !iv.toTensor().defined());
    if (all_undefined) {
      // Backward ops return undefined tensors for gradients nobody asked for.
      stack->push_back(outs.front());
      continue;
    }
    if (outs.front().isTensor()) {
      std::vector<at::Tensor> ts;
      ts.reserve(outs.size());
      for (auto& iv : outs) ts.push_back(iv.toTensor());
      stack->push_back(makeBatched(stackTensors(ts), 0, top));
    } else if (outs.front().isTensorList()) {
      const size_t n = outs.front().toTensorList().size();
      c10::List<at::Tensor> list;
      for (size_t k = 0; k < n; ++k) {
        std::vector<at::Tensor> ts;
        for (auto& iv : outs) {
          auto l = iv.toTensorList();
          TORCH_CHECK(l.size() == n, "functorch_lite.vmap: ", schema.operator_name(),
                      " returned lists of different lengths for different batch elements");
          ts.push_back(l.get(k));
        }
        list.push_back(makeBatched(stackTensors(ts), 0, top));
      }
      stack->push_back(std::move(list));
    } else {
      for (auto& iv : outs) {
        TORCH_CHECK(iv == outs.front(), "functorch_lite.vmap: ", schema.operator_name(),
                    " returned a non-tensor value that differs between batch elements; vmap can "
                    "only return such values when they are the same for the whole batch.");
      }
      stack->push_back(outs.front());
    }
  }
}

bool anyBatched(const torch::jit::Stack& stack, size_t begin, size_t end, int64_t lvl) {
  bool any = false;
  forEachTensor(stack, begin, end, [&](const at::Tensor& t) { any |= batchedAt(t, lvl) != nullptr; });
  return any;
}

// NOTE [User batching rules] in fallback.h.
struct UserRules {
  std::mutex mutex;
  std::unordered_set<std::string> ops;
  // Boxed front kernels registered over our unboxed rules, by op name; destroying one restores ours.
  std::unordered_map<std::string, std::unique_ptr<torch::Library>> overrides;
  std::atomic<bool> any{false};
  std::atomic<UserRuleHook> hook{nullptr};
};
UserRules& userRules() {
  static auto* r = new UserRules();  // leaked: kernels must outlive static destruction
  return *r;
}

struct SilentWarnings final : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

bool runUserRule(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top) {
  auto& r = userRules();
  UserRuleHook hook = r.hook.load();
  if (!hook) return false;
  {
    std::lock_guard<std::mutex> g(r.mutex);
    if (!r.ops.count(c10::toString(op.operator_name()))) return false;
  }
  const size_t begin = stack->size() - op.schema().arguments().size();
  // torch.func's rule: a user rule is only asked when something is batched at its level.
  if (!anyBatched(*stack, begin, stack->size(), top.id)) return false;
  return hook(op, stack, top);
}

}  // namespace

void setUserRuleHook(UserRuleHook hook) {
  userRules().hook.store(hook);
}

void addUserRuleOp(const std::string& name) {
  auto& r = userRules();
  std::lock_guard<std::mutex> g(r.mutex);
  r.ops.insert(name);
  r.any.store(true);
  if (r.overrides.count(name)) return;
  const auto dot = name.find('.', name.find("::"));
  c10::OperatorName opname(name.substr(0, dot), dot == std::string::npos ? "" : name.substr(dot + 1));
  auto handle = c10::Dispatcher::singleton().findOp(opname);
  if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::DeferredInit)) return;
  const auto sep = name.find("::");
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, name.substr(0, sep),
                                              c10::DispatchKey::DeferredInit, __FILE__, __LINE__);
  // The dispatcher warns about overriding a kernel; here that is the point.
  SilentWarnings silent;
  c10::WarningUtils::WarningHandlerGuard quiet(&silent);
  lib->impl(name.substr(sep + 2).c_str(), torch::CppFunction::makeFromBoxedFunction<&frontFallback>());
  r.overrides.emplace(name, std::move(lib));
}

void removeUserRuleOp(const std::string& name) {
  auto& r = userRules();
  std::unique_ptr<torch::Library> lib;
  {
    std::lock_guard<std::mutex> g(r.mutex);
    r.ops.erase(name);
    r.any.store(!r.ops.empty());
    auto it = r.overrides.find(name);
    if (it != r.overrides.end()) {
      lib = std::move(it->second);
      r.overrides.erase(it);
    }
  }
  // Deregistered outside our lock: the dispatcher takes its own.
}

FallbackMode fallbackMode() {
  return modeRef().load(std::memory_order_relaxed);
}
void setFallbackMode(FallbackMode mode) {
  modeRef().store(mode);
}

std::vector<std::string> fallbackOpsSeen() {
  std::lock_guard<std::mutex> g(seen().mutex);
  return {seen().ops.begin(), seen().ops.end()};
}
void resetFallbackOpsSeen() {
  std::lock_guard<std::mutex> g(seen().mutex);
  seen().ops.clear();
}

void vmapForLoop(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top) {
  forLoop(op, stack, top);
}

void vmapBoxed(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top) {
  // A user's rule wins over everything below, randomness included (it receives info.randomness).
  if (C10_UNLIKELY(userRules().any.load(std::memory_order_relaxed)) && runUserRule(op, stack, top)) return;
  if (vmapRandom(op, stack, top)) return;
  const auto& schema = op.schema();
  const size_t begin = stack->size() - schema.arguments().size();
  const bool batched = anyBatched(*stack, begin, stack->size(), top.id);
  // A few composite kernels read raw data (tensor lengths, a fast path); they must loop instead.
  static const std::unordered_set<std::string> no_decompose = {"aten::max_pool1d", "aten::ctc_loss",
                                                               "aten::max_pool1d_with_indices"};
  const bool decomposable = op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd) &&
                            !no_decompose.count(schema.name());
  if (!batched) {
    // A composite op may draw in its decomposition (dropout, alpha_dropout, feature_dropout, ...
    // on a tensor that does not depend on the mapped inputs). Handed down whole, its draw would
    // not see this level: 'error' would not raise and 'different' would draw once for the whole
    // batch. So it decomposes, and its pieces come back here (as under torch.func, whose vmap
    // mode key sees them). Under 'same', one draw below is exactly right.
    if (decomposable && top.randomness != Randomness::Same) {
      op.callBoxedForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd, *stack);
      return;
    }
    HandDownGuard guard;
    op.callBoxed(stack);
    return;
  }
  rejectDataDependent(schema.operator_name());
  if (decomposable) {
    op.callBoxedForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd, *stack);
    return;
  }
  noteFallback(schema.operator_name());
  forLoop(op, stack, top);
}

}  // namespace ftl
