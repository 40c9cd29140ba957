#include "core/dispatch.h"

#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/Type.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <mutex>
#include <typeinfo>
#include <unordered_map>
#include <unordered_set>

#include "core/jvp_decomps.h"
#include "core/tensors.h"

namespace ftl {

namespace {

using c10::DispatchKey;
using torch::jit::Stack;

// NOTE [Foreign transforms]
// The functionality keys above autocast are where tensor-wrapping transforms live (ours is
// DeferredInit). A tensor carrying any other of them belongs to another transform library (such
// as torch's own), whose kernels know nothing of our levels, and an included one in the TLS means
// such a transform is running. Neither can mix with ours; they are found by key position, not by
// name, so no other library's keys are spelled out here.
c10::DispatchKeySet wrapperRegionKeys(std::initializer_list<DispatchKey> except) {
  c10::DispatchKeySet ks;
  const auto first = static_cast<uint16_t>(DispatchKey::AutocastPrivateUse1) + 1;
  const auto end = static_cast<uint16_t>(DispatchKey::EndOfFunctionalityKeys);
  for (uint16_t k = first; k < end; ++k) ks = ks.add(static_cast<DispatchKey>(k));
  for (DispatchKey k : except) ks = ks.remove(k);
  return ks;
}

}  // namespace

bool isForeignTransformTensor(const at::Tensor& t) {
  // Batched is our marker on our tensors; on a tensor without DeferredInit it is torch's legacy
  // vmap, which is foreign too. PythonTLSSnapshot is carried by every tensor with the Python key
  // (FakeTensor, FunctionalTensor, subclasses): the Python dispatcher's bookkeeping, not a
  // transform. Tracing our transforms with make_fx / AOTAutograd wraps such tensors.
  static const c10::DispatchKeySet foreign =
      wrapperRegionKeys({DispatchKey::DeferredInit, DispatchKey::Batched, DispatchKey::PythonTLSSnapshot});
  if (!t.defined()) return false;
  const auto ks = t.key_set();
  return ks.has_any(foreign) || (ks.has(DispatchKey::Batched) && !ks.has(DispatchKey::DeferredInit));
}

void rejectForeignTransformTensor(const at::Tensor& t, const char* api) {
  TORCH_CHECK(!isForeignTransformTensor(t), "functorch_lite.", api,
              ": got a tensor of a "
              "torch.func transform. functorch_lite and torch.func cannot be mixed in one "
              "computation: use one library for every transform of it.");
}

namespace {
std::atomic<TensorTypeNamer> tensor_type_namer{nullptr};
}  // namespace

void setTensorTypeNamer(TensorTypeNamer namer) {
  tensor_type_namer.store(namer);
}

std::string tensorTypeName(const at::Tensor& t) {
  if (auto namer = tensor_type_namer.load()) {
    std::string name = namer(t);
    if (!name.empty()) return name;
  }
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return c10::demangle(typeid(*impl).name());
}

namespace {
// The first tensor under t's functional wrappers (t itself when it is not one). Functional
// wrappers nest (functionalize of functionalize); that tensor tells whose level the whole stack
// of them belongs to.
at::Tensor underFunctionalWrappers(const at::Tensor& t) {
  at::Tensor inner = t;
  while (auto* fw = dynamic_cast<at::FunctionalTensorWrapper*>(inner.unsafeGetTensorImpl()))
    inner = fw->value();
  return inner;
}
}  // namespace

bool functionalHoldsOurs(const at::Tensor& t) {
  const at::Tensor inner = underFunctionalWrappers(t);
  return inner.unsafeGetTensorImpl() != t.unsafeGetTensorImpl() && asFt(inner) != nullptr;
}

bool foreignGoesFirst(const at::Tensor& t) {
  const Level* top = levelStack().top();
  if (!top) return true;
  auto* ft = asFt(underFunctionalWrappers(t));
  return !ft || ft->level() >= top->id;
}

void rejectForeignTransformActive(const char* where) {
  // Python-mode keys are TLS bookkeeping of torch's Python dispatcher, not transforms.
  static const c10::DispatchKeySet foreign =
      wrapperRegionKeys({DispatchKey::DeferredInit, DispatchKey::PythonTLSSnapshot, DispatchKey::PreDispatch,
                         DispatchKey::PythonDispatcher});
  TORCH_CHECK(!c10::impl::tls_local_dispatch_key_set().included_.has_any(foreign), "functorch_lite.", where,
              " was called inside a torch.func transform. "
              "functorch_lite and torch.func cannot be mixed in one computation: use one library "
              "for every transform of it.");
}

namespace {

// NOTE [ZeroTensors do not cross levels]
// torch's derivative formulas return efficient zero tensors (_efficientzerotensor: the ZeroTensor
// key, no storage) for derivatives known to be zero. Inside one plain autograd graph they stay
// ZeroTensors and every op short-cuts them; once wrapped by a level they are ordinary values to
// the ops of that level, and the ZeroTensor fallback below materializes them as a stride-0
// expand of one zero. Forward AD then lays a tangent out like that primal
// (_new_zeros_with_same_feature_meta copies its strides) and copies into a tensor whose elements
// share memory, which torch refuses. So a ZeroTensor made below a level becomes real zeros before
// the level wraps it (still inside the level below, where the allocation belongs).
void materializeZeroTensors(Stack* stack, size_t nrets) {
  forEachTensorInplace(*stack, stack->size() - nrets, stack->size(), [](const at::Tensor& t) {
    return t.defined() && t._is_zerotensor() ? at::zeros_symint(t.sym_sizes(), t.options()) : t;
  });
}

// How many grad/jvp levels of this thread are processing an op right now (NOTE [Mutation checks
// run once per op]).
thread_local int tls_grad_processing_depth = 0;
struct GradProcessingScope {
  GradProcessingScope() { ++tls_grad_processing_depth; }
  ~GradProcessingScope() { --tls_grad_processing_depth; }
  GradProcessingScope(const GradProcessingScope&) = delete;
  GradProcessingScope& operator=(const GradProcessingScope&) = delete;
};

bool isMutatedArg(const c10::FunctionSchema& schema, size_t i) {
  const auto* alias = schema.arguments()[i].alias_info();
  return alias && alias->isWrite();
}

// NOTE [Constants made out of a tracer's sight]
// A level's front kernel runs autograd with the Python key excluded (a user's TorchDispatchMode
// must not see our wrappers). Factories called there never reach a tracer: the zero tangent
// torch's forward-AD formulas make for an operand that has none (and the ZeroTensor fallback's
// real zeros), a formula's 0-d constant (the scalar_tensor(0.5) of maximum's forward formula),
// the eps tensor of cosine_similarity's composite kernel, the ones a backward formula
// concatenates. They reach the back kernel as real tensors among fake ones: FakeTensorMode
// refuses them (a graph break, and for some of them torch's error path then left its TLS
// exclude set behind, which broke every later forward-AD call in the process), and when they
// got through, AOTAutograd baked them into the graph as constants, which Inductor refuses.
// So under FakeTensorMode (torch.compile's tracing, make_fx's "fake" and "symbolic" modes; the
// Python key is back after HandDownGuard) a real argument holding one value repeated is made
// again under the tracer, by value and with its layout: now an op of the graph (our batched
// tensors included: under vmap it meets a BatchedTensor, not a fake one). Under fake mode
// every tensor of the traced function is fake, so a real one can only be such a constant, and
// a repeated value is the same whichever it is; one with differing values stays (a graph
// break, never a wrong value). Only FakeTensorMode: under a real-mode trace (make_fx's proxy
// mode alone) every tensor is real and the graph keeps an untracked one as a constant, and
// remaking a tracked zero-valued intermediate there cut it from its autograd history
// (jvp(hessian(f)) of a maximum hit torch's internal assert on a view's tangent); a user's
// TorchDispatchMode sees the plain values as they are. Runs without a Python mode skip this
// entirely; under fake mode each real argument costs one comparison of its values.
bool tracerActive() {
  return c10::impl::TorchDispatchModeTLS::get_mode(c10::impl::TorchDispatchModeKey::FAKE).has_value();
}

// straight to the backend: no tracer, no Python dispatcher, no level, no autograd
const c10::DispatchKeySet kUntraced =
    kFrontKeys | c10::autograd_dispatch_keyset_with_ADInplaceOrView |
    c10::DispatchKeySet({DispatchKey::Python, DispatchKey::PythonTLSSnapshot, DispatchKey::PythonDispatcher,
                         DispatchKey::PreDispatch, DispatchKey::Functionalize});

// A real tensor made out of the tracer's sight, remade under it when it holds one value
// repeated (zeros, ones, a full, a formula's 0-d constant); nullopt when it is traced already or
// cannot be remade (its values differ: it stays real, and fake mode refuses it, a graph break).
std::optional<at::Tensor> remadeConstant(const at::Tensor& t) {
  // fake and functional tensors (a C++ FunctionalTensorWrapper carries Functionalize, not Python)
  static const c10::DispatchKeySet traced({DispatchKey::Python, DispatchKey::Functionalize});
  if (!t.defined() || t.key_set().has_any(traced) || asFt(t) || t.is_meta()) return std::nullopt;
  // A wrapped number (a Python scalar turned into a tensor) stays: the Python key hands it to the
  // mode as a number. One that requires grad is an outer torch.autograd's leaf, never a formula's.
  if (t.unsafeGetTensorImpl()->is_wrapped_number() || t.requires_grad()) return std::nullopt;
  if (t.numel() == 0) return at::empty_strided_symint(t.sym_sizes(), t.sym_strides(), t.options());
  at::Scalar value;
  {
    c10::impl::ExcludeDispatchKeyGuard untraced(kUntraced);
    const at::Tensor flat = t.reshape(-1);
    value = flat[0].item();
    if (t.numel() > 1 && !at::eq(flat, flat[0]).all().item<bool>()) return std::nullopt;
  }
  if (t.dim() == 0) return at::scalar_tensor(value, t.options());
  // The remade tensor keeps the original's layout: an expanded one (what the ZeroTensor
  // fallback makes) stays a 0-d tensor and an expand (a dense zeros of the full size would be
  // filled and then multiplied through by Inductor: jacfwd on a wide layer ran 1.3x slower
  // than torch.func's graph), and any other strides stay as they were (forward AD compares a
  // tangent's layout with its primal's).
  const bool expanded = std::all_of(t.strides().begin(), t.strides().end(), [](int64_t s) { return s == 0; });
  if (expanded) return at::scalar_tensor(value, t.options()).expand_symint(t.sym_sizes());
  return at::empty_strided_symint(t.sym_sizes(), t.sym_strides(), t.options()).fill_(value);
}

void retraceConstants(const c10::FunctionSchema& schema, Stack* stack, size_t begin) {
  for (size_t i = begin; i < stack->size(); ++i) {
    auto& iv = (*stack)[i];
    // A written argument keeps its identity, and so does one the op returns a view of: a
    // remade tensor there would take the writes made through the view (z.diagonal().fill_(1)
    // on zeros filled the copy and left z zero).
    if (schema.arguments()[i - begin].alias_info()) continue;
    if (iv.isTensor()) {
      if (auto r = remadeConstant(iv.toTensor())) iv = std::move(*r);
    } else if (iv.isTensorList()) {  // cat's tensors (a formula's ones beside traced ones)
      auto list = iv.toTensorList();
      for (size_t k = 0; k < list.size(); ++k)
        if (auto r = remadeConstant(list.get(k))) list.set(k, std::move(*r));
    }
  }
}

// ----------------------------------------------------------------------------------------------
// grad levels: lift, then let torch's autograd run on our wrappers.
void gradProcess(const c10::OperatorHandle& op, Stack* stack, const Level& top) {
  // Backward ops without a forward-AD formula, ops with wrong second-order formulas (NOTE
  // [Decompositions for forward AD]).
  if (runJvpDecomposition(op, stack, top.kind)) return;
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  const size_t begin = stack->size() - nargs;

  // torch.func's rule: inside a grad transform, in-place ops may only mutate tensors of the
  // transform's own level. Mutating a captured tensor would change it outside the transform
  // without its graph ever seeing the change.
  // NOTE [Mutation checks run once per op]: the check belongs to the first grad/jvp level that
  // processes an op the function called. Everything that level then runs below it (the op handed
  // down, and the ops of torch's derivative formulas, which update tangents in place) is not the
  // function mutating a capture, and the levels below skip the check: a tangent made by an outer
  // jvp level's formulas is a plain tensor to the levels between, which would refuse it.
  // detach_ changes autograd metadata only, never data.
  const bool metadata_only = schema.name() == "aten::detach_" || tls_grad_processing_depth > 0;
  for (size_t i = 0; i < nargs && !metadata_only; ++i) {
    if (!isMutatedArg(schema, i)) continue;
    const auto& iv = (*stack)[begin + i];
    if (!iv.isTensor()) continue;
    auto* gw = asGradWrapper(iv.toTensor());
    // A plain meta tensor holds no data to corrupt: torch's functionalization runs each in-place
    // op on meta copies of its arguments first, to check shapes (functionalize inside grad).
    if (!gw && iv.toTensor().is_meta()) continue;
    TORCH_CHECK(gw && gw->level() == top.id && !gw->immutable(), "functorch_lite.", levelKindName(top.kind),
                ": the function being transformed called "
                "the in-place operation ",
                schema.operator_name(),
                ", which would mutate a captured Tensor (one captured "
                "from outside the transform, or an input not being differentiated in an outer "
                "transform). This is not supported: pass the tensor as an argument of the "
                "function, or use the out-of-place version of the operation.");
  }

  GradProcessingScope processing;
  bool any_tensor = false;
  forEachTensorInplace(*stack, begin, stack->size(), [&](const at::Tensor& t) -> at::Tensor {
    if (!t.defined()) return t;
    any_tensor = true;
    auto* gw = asGradWrapper(t);
    if (gw && gw->level() == top.id) return t;
    return makeGradWrapper(t, top, /*immutable=*/true);
  });

  if (!any_tensor) {
    // A factory op: autograd has nothing to record at this level. Run it below and make the
    // result a tensor of this level, so that in-place writes into it are recorded here. torch's
    // tensor constructors from data (torch.tensor, as_tensor, ...) allocate and then fill raw
    // memory with both ADInplaceOrView and the Python key excluded (plain factories such as
    // torch.ones exclude only the former). Return the plain tensor then: the constructors lift
    // the filled tensor afterwards with lift_fresh, which comes through here and is wrapped.
    {
      HandDownGuard guard;
      op.callBoxed(stack);
      materializeZeroTensors(stack, schema.returns().size());
    }
    if (c10::impl::tls_is_dispatch_key_excluded(DispatchKey::ADInplaceOrView) &&
        c10::impl::tls_is_dispatch_key_excluded(DispatchKey::Python)) {
      return;
    }
  } else {
    // A user's TorchDispatchMode (the Python key) would otherwise get our wrappers between
    // autograd and our back kernel; the back kernel hands the op down with the level's saved TLS,
    // where the mode sees the plain values, as under torch.func. Functionalization likewise
    // belongs to the values below (NOTE [Functionalize entered inside a level] in levels.h).
    static const c10::DispatchKeySet hidden =
        kFrontKeys | c10::DispatchKeySet({DispatchKey::Python, DispatchKey::Functionalize});
    c10::impl::ExcludeDispatchKeyGuard no_front(hidden);
    op.callBoxed(stack);
  }
  const size_t nrets = schema.returns().size();
  forEachTensorInplace(*stack, stack->size() - nrets, stack->size(), [&](const at::Tensor& t) {
    if (!t.defined()) return t;
    auto* gw = asGradWrapper(t);
    if (gw && gw->level() == top.id) return t;
    return makeGradWrapper(t, top);
  });
}

// The back keys of grad wrappers: strided, sparse COO and sparse compressed values (NOTE [Sparse
// grad wrappers] in tensors.h). All three are backend keys that torch fills with composite kernels.
constexpr DispatchKey kBackKeys[] = {DispatchKey::PrivateUse3, DispatchKey::SparsePrivateUse3,
                                     DispatchKey::SparseCsrPrivateUse3};

// Whether an argument is one of our tensors whose level is on this thread's stack but hidden: the
// op reached it after that level handed an op down.
bool argOfHiddenLevel(const Stack& stack, size_t begin) {
  const auto& levels = levelStack();
  bool found = false;
  forEachTensor(stack, begin, stack.size(), [&](const at::Tensor& t) {
    auto* ft = asFt(t);
    for (size_t i = levels.depth(); ft && !found && i < levels.size(); ++i)
      found = levels.at(i).id == ft->level();
  });
  return found;
}

// PrivateUse3 kernel: after autograd ran on the top level's wrappers, unwrap and hand down.
void backKernel(const c10::OperatorHandle& op, Stack* stack) {
  const auto& schema = op.schema();
  const Level* top = levelStack().top();
  const size_t nargs = schema.arguments().size();
  const size_t begin = stack->size() - nargs;
  if (C10_UNLIKELY(!top || top->kind == LevelKind::Vmap)) {
    // torch runs __torch_dispatch__ with every transform's keys excluded: a subclass wrapping one
    // of our tensors hands it to ops that skip its level and arrive here.
    TORCH_CHECK(!argOfHiddenLevel(*stack, begin), "functorch_lite: ", schema.operator_name(),
                " received a tensor of a functorch_lite transform below that transform's own level, "
                "where the transform no longer sees its operations. torch runs __torch_dispatch__ "
                "of tensor subclasses with the dispatch keys of every transform excluded, so a "
                "__torch_dispatch__ subclass (or a wrapper such as FunctionalTensor) that wraps a "
                "tensor of a running transform gets here. Wrapping a transform's tensors in such a "
                "subclass inside the transformed function is not supported (nor is it in torch.func): "
                "create the subclass from plain tensors outside the transform.");
    // Levels are per thread: a live wrapper (batched or grad) of a transform running on another
    // thread is not lifted or unwrapped by this thread's levels and falls through to here.
    TORCH_CHECK(false, "functorch_lite: ", schema.operator_name(),
                " received a tensor of a functorch_lite transform (vmap, grad, jvp, ...) that is not "
                "running on this thread (this thread's stack: ",
                describeStack(),
                "). Each thread has its own transforms: a tensor created inside a transformed "
                "function cannot be used on another thread while that transform runs. Return it "
                "from the function and pass the result to the other thread.");
  }

  // Remember which unwrapped values belong to mutated arguments: an op that returns one of them
  // (in-place and out= ops) must return the original wrapper, not a new one. The impl pointer is
  // the one asGradWrapper checked, so refreshing it later needs no cast of its own.
  struct Mutated {
    c10::TensorImpl* value;
    at::Tensor wrapper;
    GradWrapperImpl* impl;
  };
  c10::SmallVector<Mutated, 4> mutated;
  bool views_immutable = false;  // NOTE [Immutable wrappers] in tensors.h
  for (size_t i = 0; i < nargs; ++i) {
    auto& iv = (*stack)[begin + i];
    if (!iv.isTensor()) continue;
    const auto& t = iv.toTensor();
    auto* gw = asGradWrapper(t);
    if (!gw || gw->level() != top->id) continue;
    if (isMutatedArg(schema, i)) mutated.push_back({gw->value().unsafeGetTensorImpl(), t, gw});
    const auto* alias = schema.arguments()[i].alias_info();
    if (alias && !alias->isWrite() && gw->immutable()) views_immutable = true;
  }
  // lift_fresh marks a tensor just made by torch.tensor() & co: it is the function's own.
  if (schema.name() == "aten::lift_fresh") views_immutable = false;
  forEachTensorInplace(*stack, begin, stack->size(), [&](const at::Tensor& t) -> at::Tensor {
    auto* gw = asGradWrapper(t);
    return gw && gw->level() == top->id ? gw->value() : t;
  });
  {
    HandDownGuard guard;
    if (C10_UNLIKELY(c10::impl::tls_is_dispatch_key_included(DispatchKey::Python)) && tracerActive())
      retraceConstants(schema, stack, begin);
    op.callBoxed(stack);
    materializeZeroTensors(stack, schema.returns().size());
  }
  for (auto& m : mutated) m.impl->refreshMetadata();
  const size_t nrets = schema.returns().size();
  forEachTensorInplace(*stack, stack->size() - nrets, stack->size(), [&](const at::Tensor& t) {
    if (!t.defined()) return t;
    for (auto& m : mutated)
      if (m.value == t.unsafeGetTensorImpl()) return m.wrapper;
    return makeGradWrapper(t, *top, views_immutable);
  });
}

// ----------------------------------------------------------------------------------------------
// Per-op back kernels (see NOTE [Dispatch keys we own] in dispatch.h).
struct BackKernelRegistry {
  std::mutex mutex;           // guards `pending` (the listener runs under the dispatcher's lock)
  std::mutex register_mutex;  // guards registration itself (flushes may run on several threads)
  std::vector<c10::OperatorName> pending;
  std::atomic<bool> has_pending{false};
  std::unordered_set<std::string> registered;
  // One IMPL library per (namespace, back key).
  std::unordered_map<std::string, torch::Library*> libraries;
  std::atomic<int64_t> count{0};
};

BackKernelRegistry& backRegistry() {
  static auto* r = new BackKernelRegistry();  // leaked: kernels must outlive static destruction
  return *r;
}

class Listener final : public c10::OpRegistrationListener {
 public:
  // Runs under the dispatcher's lock: only queue the name, register later.
  void onOperatorRegistered(const c10::OperatorHandle& op) override {
    auto& r = backRegistry();
    std::lock_guard<std::mutex> g(r.mutex);
    r.pending.push_back(op.operator_name());
    r.has_pending.store(true, std::memory_order_release);
  }
  void onOperatorDeregistered(const c10::OperatorHandle&) override {}
};

void registerBackKernel(const c10::OperatorName& name) {
  auto& r = backRegistry();
  std::string full = name.name + (name.overload_name.empty() ? "" : "." + name.overload_name);
  if (r.registered.count(full)) return;
  auto handle = c10::Dispatcher::singleton().findOp(name);
  if (!handle || !handle->hasSchema()) return;
  // Composite-implicit ops must keep decomposing at the autograd key: a backend kernel would stop
  // that and the op would silently lose its gradient.
  if (handle->hasKernelForDispatchKey(DispatchKey::CompositeImplicitAutograd)) return;
  auto sep = name.name.find("::");
  if (sep == std::string::npos) return;
  std::string ns = name.name.substr(0, sep);
  for (DispatchKey key : kBackKeys) {
    // On the sparse keys only ops whose composite kernels torch fills in there need ours: the
    // fallback serves the rest (CompositeExplicitAutogradNonFunctional skips sparse COO).
    const bool explicit_ = handle->hasKernelForDispatchKey(DispatchKey::CompositeExplicitAutograd);
    const bool non_functional =
        handle->hasKernelForDispatchKey(DispatchKey::CompositeExplicitAutogradNonFunctional);
    if (key == DispatchKey::SparsePrivateUse3 && !explicit_) continue;
    if (key == DispatchKey::SparseCsrPrivateUse3 && !explicit_ && !non_functional) continue;
    auto& lib = r.libraries[ns + "/" + c10::toString(key)];
    if (!lib) lib = new torch::Library(torch::Library::IMPL, ns, key, __FILE__, __LINE__);
    lib->impl(full.c_str(), torch::CppFunction::makeFromBoxedFunction<&backKernel>());
  }
  r.registered.insert(std::move(full));
  r.count.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

void flushPendingBackKernels() {
  auto& r = backRegistry();
  if (!r.has_pending.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> reg(r.register_mutex);
  std::vector<c10::OperatorName> todo;
  {
    std::lock_guard<std::mutex> g(r.mutex);
    todo.swap(r.pending);
    r.has_pending.store(false, std::memory_order_release);
  }
  for (const auto& name : todo) registerBackKernel(name);
}

int64_t numBackKernels() {
  return backRegistry().count.load();
}

namespace {

// NOTE [torch's legacy vmap]
// torch's legacy vmap (torch._vmap_internals, which torch.autograd.functional.jacobian/hessian use
// with vectorize=True) decides that a tensor is one of its own at::BatchedTensorImpl by the
// Batched key alone, and then casts it. Our tensors carry Batched as a marker (NOTE [Dispatch keys
// of our tensors]), so its entry ops would read our impl as theirs: unrelated memory, taken as
// batch-dim bookkeeping. Its kernels cannot run inside our levels anyway (Batched is excluded
// there), so its entry and exit ops are refused on our tensors and while any level is live.
bool isLegacyVmapOp(const c10::OperatorHandle& op) {
  static const auto add = c10::Dispatcher::singleton().findSchemaOrThrow("aten::_add_batch_dim", "");
  static const auto remove = c10::Dispatcher::singleton().findSchemaOrThrow("aten::_remove_batch_dim", "");
  return op == add || op == remove;
}

bool anyTensor(const Stack& stack, size_t begin) {
  bool found = false;
  forEachTensor(stack, begin, stack.size(), [&](const at::Tensor& t) { found = found || t.defined(); });
  return found;
}

// Whether the thread's functionalize mode is on for this op (called by f, not by
// functionalization's own kernel, which excludes it) and was entered after `top` was pushed.
bool functionalizeEnteredAbove(const Level& top) {
  const auto tls = c10::impl::tls_local_dispatch_key_set();
  return tls.included_.has(DispatchKey::Functionalize) && !tls.excluded_.has(DispatchKey::Functionalize) &&
         !top.saved_tls.included_.has(DispatchKey::Functionalize);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
void frontFallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks, Stack* stack) {
  flushPendingBackKernels();
  TORCH_CHECK(!isLegacyVmapOp(op), "functorch_lite: torch's legacy vmap (", op.schema().name(),
              ", used by torch.autograd.functional.jacobian/hessian with vectorize=True and by "
              "torch._vmap_internals) cannot run inside a functorch_lite transform or on its "
              "tensors. Use vectorize=False, or functorch_lite's jacrev/jacfwd/hessian/vmap.");
  const size_t nargs = op.schema().arguments().size();
  const size_t begin = stack->size() - nargs;
  // NOTE [Foreign wrappers of our tensors] in dispatch.h. The keys dropped here are ones a foreign
  // impl copied from our tensor, where they serve our levels: Batched is only our marker (on a
  // foreign impl it would select torch's legacy vmap kernels, which cast to their own type), and
  // the autograd keys would run torch's autograd on the foreign wrapper, whose kernels exclude
  // autograd for everything below them, so our grad level would record nothing when the op comes
  // back to it. Autograd runs there, on our wrappers, as for any op.
  bool foreign_first = false;
  forEachTensor(*stack, begin, stack->size(), [&](const at::Tensor& t) {
    foreign_first = foreign_first || (isForeignWithFrontKey(t) && foreignGoesFirst(t));
  });
  if (foreign_first) {
    // torch runs __torch_dispatch__ with the keys of every transform excluded, so the ops it runs
    // on the tensor it wraps would never reach our levels: grad levels would record nothing.
    forEachTensor(*stack, begin, stack->size(), [&](const at::Tensor& t) {
      TORCH_CHECK(!isForeignWithFrontKey(t) || !t.key_set().has(DispatchKey::Python),
                  "functorch_lite: ", op.schema().operator_name(), " received a tensor of type ",
                  tensorTypeName(t),
                  ", a __torch_dispatch__ subclass that carries functorch_lite's dispatch keys (copied "
                  "from the transform's tensor it wraps). torch runs __torch_dispatch__ below every "
                  "transform, so the operations it runs on the wrapped tensor would bypass the "
                  "transform. Such a subclass cannot wrap a tensor of a functorch_lite transform: "
                  "create it from plain tensors outside the transform, or do not copy the wrapped "
                  "tensor's dispatch keys.");
    });
    static const c10::DispatchKeySet below_front =
        c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, DispatchKey::DeferredInit) -
        (c10::DispatchKeySet(DispatchKey::Batched) | c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    op.redispatchBoxed(ks & below_front, stack);
    return;
  }
  forEachTensorInplace(*stack, begin, stack->size(), [&](const at::Tensor& t) {
    TORCH_CHECK(!isForeignTransformTensor(t), "functorch_lite: ", op.schema().operator_name(),
                " received a tensor of a torch.func transform inside a functorch_lite transform. "
                "The two libraries cannot be mixed in one computation: use functorch_lite (or "
                "torch.func) for every transform of it.");
    return unwrapIfDead(t);
  });
  const Level* top = levelStack().top();
  if (!top) {
    // Only escaped (dead) grad wrappers, now unwrapped, bring an op here with no level live.
    c10::impl::ExcludeDispatchKeyGuard no_front(kFrontKeys);
    op.callBoxed(stack);
    return;
  }
  // NOTE [Functionalize entered inside a level] in levels.h: a factory called inside it
  const bool functional_factory = functionalizeEnteredAbove(*top) && !anyTensor(*stack, begin);
  switch (top->kind) {
    case LevelKind::Vmap:
      vmapBoxed(op, stack, *top);
      break;
    case LevelKind::Grad:
    case LevelKind::Jvp:
      // Both run torch's own autograd kernels on wrappers of the top level: backward-mode
      // recording for grad levels, forward-mode tangent propagation for jvp levels.
      gradProcess(op, stack, *top);
      break;
  }
  if (C10_UNLIKELY(functional_factory)) {
    const size_t nrets = op.schema().returns().size();
    forEachTensorInplace(*stack, stack->size() - nrets, stack->size(), [](const at::Tensor& t) {
      return t.defined() && !at::functionalization::impl::isFunctionalTensor(t)
                 ? at::functionalization::impl::to_functional_tensor(t)
                 : t;
    });
  }
}

void checkKeysAreFree() {
  for (const char* name : {"DeferredInit", "PrivateUse3", "AutogradPrivateUse3"}) {
    DispatchKey k;
    try {
      k = c10::parseDispatchKey(name);
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "functorch_lite needs the dispatch key ", name,
                  ", which this build of torch does not have");
    }
    TORCH_CHECK(!c10::Dispatcher::singleton().hasBackendFallbackForDispatchKey(k),
                "functorch_lite needs the dispatch key ", name,
                ", but another library already registered a fallback for it");
  }
  // The sparse back keys have no parseable names; they exist wherever PrivateUse3 does.
  for (DispatchKey k : {DispatchKey::SparsePrivateUse3, DispatchKey::SparseCsrPrivateUse3}) {
    TORCH_CHECK(!c10::Dispatcher::singleton().hasBackendFallbackForDispatchKey(k),
                "functorch_lite needs the dispatch key ", c10::toString(k),
                ", but another library already registered a fallback for it");
  }
}

namespace {
std::once_flag init_once;
}

// Registers the fallbacks (after checkKeysAreFree) and the back kernels. Called once from Python
// at import; registering fallbacks statically would abort the process on a conflict instead of
// raising a clean ImportError.
void initializeDispatch() {
  std::call_once(init_once, [] {
    checkKeysAreFree();
    static auto* front =
        new torch::Library(torch::Library::IMPL, "_", DispatchKey::DeferredInit, __FILE__, __LINE__);
    front->fallback(torch::CppFunction::makeFromBoxedFunction<&frontFallback>());
    // Registrations live as long as the process: the libraries are never destroyed (their
    // destructors would deregister after the dispatcher may be gone), but stay reachable from
    // statics so that leak checkers do not report them.
    static torch::Library* back[std::size(kBackKeys)];
    for (size_t i = 0; i < std::size(kBackKeys); ++i) {
      back[i] = new torch::Library(torch::Library::IMPL, "_", kBackKeys[i], __FILE__, __LINE__);
      back[i]->fallback(torch::CppFunction::makeFromBoxedFunction<&backKernel>());
    }
    static auto* autograd =
        new torch::Library(torch::Library::IMPL, "_", DispatchKey::AutogradPrivateUse3, __FILE__, __LINE__);
    autograd->fallback(torch::autograd::basicAutogradNotImplementedFallback());
    // The listener is told about every op that already exists, then about each new one.
    static auto listener_handle =
        c10::Dispatcher::singleton().addRegistrationListener(std::make_unique<Listener>());
    (void)listener_handle;
    flushPendingBackKernels();
  });
}

}  // namespace ftl
