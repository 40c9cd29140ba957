#pragma once
// Generic plumbing between torch's dispatcher and our batching rules.
//
// NOTE [Batching rules]
// A batching rule is a small pure function of an op's arguments where every tensor argument
// `const Tensor& x` (or `const optional<Tensor>& x`) becomes two: the physical tensor and its batch
// dim (`std::optional<int64_t>`, nullopt when that argument is not batched). It returns the result
// and its batch dim: `std::tuple<Tensor, std::optional<int64_t>>`, or one such pair per output for
// ops with several outputs, or `std::tuple<std::vector<Tensor>, std::optional<int64_t>>` for ops
// returning Tensor[]. Rules never see levels or wrappers: detail::VmapKernelImpl<Op, Rule>::fn,
// registered on DeferredInit for op `Op` (an at::_ops:: struct, or a user op's ftl::CustomOp, see
// NOTE [Public C++ API] in rules.h) by registerVmapRule, does that:
//   1. if the top level is not a vmap level, the op goes to the boxed front kernel (grad levels);
//   2. if no argument is batched at the top level, the op is handed down unchanged;
//   3. otherwise it unwraps, runs the rule with the level hidden (so the rule's own ops run at the
//      level below), and wraps the results at the top level.
// In-place rules (registerVmapInplaceRule) receive the unwrapped `self` and mutate it; they return
// nothing, or the new batch dim for in-place shape ops. The plumbing rejects writing batched
// values into an unbatched `self`. A family of ops sharing one rule template is registered in
// one line: registerFamily<Unary, at::_ops::sin, at::_ops::cos, ...>(m).
#include <ATen/core/Tensor.h>
#include <ATen/core/boxing/impl/boxing.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../core/dispatch.h"
#include "../core/levels.h"
#include "../core/tensors.h"

namespace ftl {

using at::Tensor;
using bdim_t = std::optional<int64_t>;

template <class Op>
std::string opName() {
  std::string n = Op::name;
  if (Op::overload_name[0] != '\0') n += std::string(".") + Op::overload_name;
  return n;
}

// ------------------------------------------------------------------------------------------------
// Helpers shared by rules.
inline int64_t rankWithoutBdim(const Tensor& t, bdim_t bd) {
  return t.dim() - (bd ? 1 : 0);
}

// Moves the batch dim to the front; unbatched tensors are returned as they are.
FTL_API Tensor moveBdimToFront(const Tensor& t, bdim_t bd);
// Pads a batch-dim-at-front tensor with size-1 dims right after the batch dim up to logical rank.
FTL_API Tensor padToLogicalRank(const Tensor& t, bool batched, int64_t logical_rank);
// Wraps a logical dim (may be negative) against a logical rank and shifts it past a leading bdim.
FTL_API int64_t physicalDim(int64_t dim, int64_t logical_rank, bool bdim_at_front);
// Batch dim at the front; an unbatched tensor is expanded (not copied) to `batch_size` there.
FTL_API Tensor materializeBdimFront(const Tensor& t, bdim_t bd, const c10::SymInt& batch_size);
// [B, ...] -> [B, prod(...)], also for B == 0 or empty logical tensors.
FTL_API Tensor flattenAfterBatch(const Tensor& p);
// Batch size of the first batched tensor.
FTL_API c10::SymInt batchSizeOf(std::initializer_list<std::pair<const Tensor*, bdim_t>> ts);
// Batch element i of a physical tensor; for an empty batch (no element i), zeros of the logical
// shape, so that an op can still be run on "one example" to raise torch's own error.
FTL_API Tensor exampleOf(const Tensor& value, int64_t bdim, int64_t i);
// Per-element results stacked at dim 0; undefined results stay undefined. With no rows, `like`
// (a result for one example) gives the shape: [0, *like.shape].
FTL_API Tensor stackRows(const std::vector<Tensor>& rows, const Tensor& like);

// For a rule that finds arguments its op rejects for one batch element (too few dims, say): the
// op on element 0 (`call`) raises torch's own error, type and message; should torch accept it
// after all, the rule's own reason (`what`) is raised.
template <class F>
[[noreturn]] void raiseForElement(F&& call, const char* op, const char* what) {
  call();
  TORCH_CHECK(false, "functorch_lite.vmap: ", op, ": ", what);
}

// NOTE [Result batch dims]
// A rule's result batch dim must name a dim of its physical result. BatchedTensorImpl asserts it
// (an internal invariant); the plumbing checks it first, so that a rule bug reaches the user as
// an error naming the op, never as an internal assert. Rules themselves check the logical ranks
// they need (and raise torch's own error) before computing anything.
FTL_API void checkResultBdim(const Tensor& t, bdim_t bd, const char* op);

namespace detail {

template <class T>
using bare_t = std::remove_cv_t<std::remove_reference_t<T>>;

template <class T>
constexpr bool is_tensor_v = std::is_same_v<bare_t<T>, at::Tensor>;
template <class T>
constexpr bool is_opt_tensor_v = std::is_same_v<bare_t<T>, std::optional<at::Tensor>>;
// `Tensor?[]` (the indices of index/index_put): rules receive it as two vectors, the physical
// tensors and their batch dims.
template <class T>
constexpr bool is_opt_tensor_list_v = std::is_same_v<bare_t<T>, c10::List<std::optional<at::Tensor>>>;

// Whether `pred` holds for any tensor in an argument (Tensor, Tensor?, or a list of tensors).
template <class T, class Pred>
bool anyTensorIn(const T& arg, Pred&& pred) {
  if constexpr (is_tensor_v<T>) {
    return pred(arg);
  } else if constexpr (is_opt_tensor_v<T>) {
    return arg.has_value() && pred(*arg);
  } else if constexpr (std::is_same_v<bare_t<T>, at::ITensorListRef> ||
                       std::is_same_v<bare_t<T>, at::TensorList>) {
    for (const at::Tensor& t : arg)
      if (pred(t)) return true;
    return false;
  } else if constexpr (is_opt_tensor_list_v<T>) {
    for (const std::optional<at::Tensor>& t : arg)
      if (t.has_value() && t->defined() && pred(*t)) return true;
    return false;
  } else {
    return false;
  }
}

template <class T>
bool isBatchedArg(const T& arg, int64_t lvl) {
  return anyTensorIn(arg, [lvl](const at::Tensor& t) { return batchedAt(t, lvl) != nullptr; });
}

// Dead wrappers (of transforms that already returned, e.g. the graph a vjp_fn runs) must become
// their values before anything looks at levels: their values may be batched at the top level.
inline bool isDeadTensor(const at::Tensor& t) {
  auto* ft = asFt(t);
  return ft && !ft->isAlive();
}
template <class T>
bool isDeadArg(const T& arg) {
  return anyTensorIn(arg, [](const at::Tensor& t) { return isDeadTensor(t); });
}
// One cheap test for both unusual cases, so that the common path pays for a single scan: a dead
// wrapper of ours, or a foreign impl that carries our front key (NOTE [Foreign wrappers of our
// tensors] in dispatch.h).
inline bool isUnusualTensor(const at::Tensor& t) {
  static constexpr c10::DispatchKeySet kMaybe(
      {c10::DispatchKey::DeferredInit, c10::DispatchKey::Functionalize});
  if (!t.defined() || !t.unsafeGetTensorImpl()->key_set().has_any(kMaybe)) return false;
  auto* ft = asFt(t);
  if (ft) return !ft->isAlive();
  return isForeignWithFrontKey(t);
}
template <class T>
bool isUnusualArg(const T& arg) {
  return anyTensorIn(arg, [](const at::Tensor& t) { return isUnusualTensor(t); });
}
template <class T>
bool isForeignFirstArg(const T& arg) {
  return anyTensorIn(arg,
                     [](const at::Tensor& t) { return isForeignWithFrontKey(t) && foreignGoesFirst(t); });
}
template <class T>
decltype(auto) reviveArg(const T& arg) {
  if constexpr (is_tensor_v<T>) {
    return unwrapIfDead(arg);
  } else if constexpr (is_opt_tensor_v<T>) {
    return arg.has_value() ? std::optional<at::Tensor>(unwrapIfDead(*arg)) : arg;
  } else if constexpr (std::is_same_v<bare_t<T>, at::ITensorListRef> ||
                       std::is_same_v<bare_t<T>, at::TensorList>) {
    std::vector<at::Tensor> out;
    for (const at::Tensor& t : arg) out.push_back(unwrapIfDead(t));
    return out;
  } else if constexpr (is_opt_tensor_list_v<T>) {
    c10::List<std::optional<at::Tensor>> out;
    for (const std::optional<at::Tensor>& t : arg)
      out.push_back(t.has_value() ? std::optional<at::Tensor>(unwrapIfDead(*t)) : t);
    return out;
  } else {
    return (const T&)arg;
  }
}

template <class T>
auto unwrapArg(const T& arg, int64_t lvl) {
  if constexpr (is_tensor_v<T>) {
    auto [v, bd] = unwrapAt(arg, lvl);
    return std::make_tuple(std::move(v), bd);
  } else if constexpr (is_opt_tensor_v<T>) {
    if (!arg.has_value()) return std::make_tuple(std::optional<at::Tensor>(), bdim_t());
    auto [v, bd] = unwrapAt(*arg, lvl);
    return std::make_tuple(std::optional<at::Tensor>(std::move(v)), bd);
  } else if constexpr (is_opt_tensor_list_v<T>) {
    std::vector<std::optional<at::Tensor>> values;
    std::vector<bdim_t> bdims;
    for (const std::optional<at::Tensor>& t : arg) {
      if (!t.has_value() || !t->defined()) {
        values.emplace_back();
        bdims.emplace_back();
        continue;
      }
      auto [v, bd] = unwrapAt(*t, lvl);
      values.emplace_back(std::move(v));
      bdims.push_back(bd);
    }
    return std::make_tuple(std::move(values), std::move(bdims));
  } else {
    return std::tuple<const T&>(arg);
  }
}

// `ks` is the key set the dispatcher computed for the call: the boxed kernel redispatches below
// our front with it when a foreign wrapper goes first.
template <class Op, class Ret, class... Args>
Ret redirectToFront(c10::DispatchKeySet ks, Args... args) {
  static const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow(Op::name, Op::overload_name);
  static const c10::BoxedKernel boxed = c10::BoxedKernel::makeFromFunction<&frontFallback>();
  return c10::impl::BoxedKernelWrapper<Ret(Args...)>::call(boxed, handle, ks, args...);
}

template <class Op>
at::Tensor makeBatchedChecked(at::Tensor value, bdim_t bd, const Level& lvl) {
  checkResultBdim(value, bd, Op::name);
  return makeBatched(std::move(value), bd, lvl);
}

template <class Op, class Ret, class Res, size_t... I>
Ret wrapTuple(Res&& res, const Level& lvl, std::index_sequence<I...>) {
  return Ret(makeBatchedChecked<Op>(std::move(std::get<2 * I>(res)), std::get<2 * I + 1>(res), lvl)...);
}

template <class Op, class Ret, class Res>
Ret wrapResult(Res&& res, const Level& lvl) {
  if constexpr (std::is_same_v<Ret, at::Tensor>) {
    return makeBatchedChecked<Op>(std::move(std::get<0>(res)), std::get<1>(res), lvl);
  } else if constexpr (std::is_same_v<Ret, std::vector<at::Tensor>>) {
    auto& [values, bd] = res;
    std::vector<at::Tensor> out;
    out.reserve(values.size());
    for (auto& v : values) out.push_back(makeBatchedChecked<Op>(std::move(v), bd, lvl));
    return out;
  } else {
    return wrapTuple<Op, Ret>(std::forward<Res>(res), lvl,
                              std::make_index_sequence<std::tuple_size_v<Ret>>());
  }
}

// The prologue shared by unboxed vmap kernels (`ks`: the key set the kernel was called with).
// Returns the top vmap level when the kernel's rule must run; otherwise stores the op's result in
// `done` and returns nullptr: a foreign wrapper that goes first sends the op to the boxed front
// kernel, dead wrappers are revived and the op re-dispatched, non-vmap top levels go to the boxed
// front kernel, and an op with nothing batched at the top level is handed down unchanged.
template <class Op, class Ret, class... Args>
const Level* vmapPrologue(std::optional<Ret>& done, c10::DispatchKeySet ks, Args... args) {
  if (C10_UNLIKELY((isUnusualArg(args) || ...))) {
    if ((isForeignFirstArg(args) || ...)) {
      done.emplace(redirectToFront<Op, Ret, Args...>(ks, args...));
      return nullptr;
    }
    if ((isDeadArg(args) || ...)) {
      done.emplace(Op::call(reviveArg(args)...));
      return nullptr;
    }
  }
  const Level* top = levelStack().top();
  if (C10_UNLIKELY(!top || top->kind != LevelKind::Vmap)) {
    done.emplace(redirectToFront<Op, Ret, Args...>(ks, args...));
    return nullptr;
  }
  if (!(isBatchedArg(args, top->id) || ...)) {
    HandDownGuard guard;
    done.emplace(Op::call(args...));
    return nullptr;
  }
  return top;
}

// NOTE [Batch-native ops and logical ranks] is below, with the batch-native kernel.
template <int... R>
struct CoreRanks {
  static constexpr bool always = false;
  static bool fast(const std::vector<const at::Tensor*>& ts) {
    constexpr int r[] = {R...};
    std::optional<int64_t> batch_rank;
    for (size_t i = 0; i < ts.size() && i < sizeof...(R); ++i) {
      if (!ts[i] || r[i] < 0) continue;
      const int64_t k = ts[i]->dim() - r[i];  // wrappers report logical dims
      if (k < 0 || (batch_rank && *batch_rank != k)) return false;
      batch_rank = k;
    }
    return true;
  }
};

template <class T>
void collectTensor(std::vector<const at::Tensor*>& out, const T& arg) {
  if constexpr (is_tensor_v<T>) {
    out.push_back(arg.defined() ? &arg : nullptr);
  } else if constexpr (is_opt_tensor_v<T>) {
    out.push_back(arg.has_value() && arg->defined() ? &*arg : nullptr);
  }
}

template <class... Args>
std::vector<const at::Tensor*> logicalTensors(const Args&... args) {
  std::vector<const at::Tensor*> out;
  (collectTensor(out, args), ...);
  return out;
}

template <class T>
decltype(auto) materializeArg(const T& arg, int64_t lvl, const c10::SymInt& B) {
  if constexpr (is_tensor_v<T>) {
    auto [v, bd] = unwrapAt(arg, lvl);
    return materializeBdimFront(v, bd, B);
  } else if constexpr (is_opt_tensor_v<T>) {
    if (!arg.has_value() || !arg->defined()) return std::optional<at::Tensor>();
    auto [v, bd] = unwrapAt(*arg, lvl);
    return std::optional<at::Tensor>(materializeBdimFront(v, bd, B));
  } else {
    return (const T&)arg;
  }
}

// Batch element i of an argument (the argument itself when it is not batched at `lvl`).
template <class T>
decltype(auto) sliceArg(const T& arg, int64_t lvl, int64_t i) {
  if constexpr (is_tensor_v<T>) {
    auto [v, bd] = unwrapAt(arg, lvl);
    return bd ? exampleOf(v, *bd, i) : v;
  } else if constexpr (is_opt_tensor_v<T>) {
    if (!arg.has_value() || !arg->defined()) return std::optional<at::Tensor>(arg);
    auto [v, bd] = unwrapAt(*arg, lvl);
    return std::optional<at::Tensor>(bd ? exampleOf(v, *bd, i) : v);
  } else {
    return (const T&)arg;
  }
}

template <class Ret, size_t... I>
Ret stackTupleRows(const std::vector<Ret>& rows, const Ret& like, std::index_sequence<I...>) {
  auto column = [&](auto index) {
    std::vector<at::Tensor> c;
    c.reserve(rows.size());
    for (const auto& r : rows) c.push_back(std::get<decltype(index)::value>(r));
    return stackRows(c, std::get<decltype(index)::value>(like));
  };
  return Ret(column(std::integral_constant<size_t, I>())...);
}

// The op once per batch element (with the level hidden), results stacked at dim 0. Over an empty
// batch it still runs once, on zeros of the logical shapes, for torch's error and the shapes.
template <class Op, class Ret, class... Args>
Ret runPerElement(int64_t lvl, int64_t B, const Args&... args) {
  std::vector<Ret> rows;
  rows.reserve(B);
  for (int64_t i = 0; i < B; ++i) rows.push_back(Op::call(sliceArg(args, lvl, i)...));
  const Ret like = B > 0 ? rows[0] : Ret(Op::call(sliceArg(args, lvl, 0)...));
  if constexpr (std::is_same_v<Ret, at::Tensor>) {
    return stackRows(rows, like);
  } else {
    return stackTupleRows(rows, like, std::make_index_sequence<std::tuple_size_v<Ret>>());
  }
}

// Batch-native outputs are [B, ...]; a placeholder torch returns whatever the batch (the empty
// eigenvectors of eigvalsh, U and Vh of svdvals) is not batched: it has no batch dim to name.
inline at::Tensor batchedAt0(at::Tensor t, const Level& lvl) {
  if (!t.defined() || t.dim() == 0 || t.sym_size(0) != lvl.batch_size) return t;
  return makeBatched(std::move(t), 0, lvl);
}

template <class Ret>
Ret wrapAllAt0(Ret r, const Level& lvl) {
  if constexpr (std::is_same_v<Ret, at::Tensor>) {
    return batchedAt0(std::move(r), lvl);
  } else if constexpr (std::is_same_v<Ret, std::vector<at::Tensor>>) {
    for (auto& t : r) t = batchedAt0(std::move(t), lvl);
    return r;
  } else {
    return std::apply([&](auto&&... ts) { return Ret(batchedAt0(std::move(ts), lvl)...); }, std::move(r));
  }
}

// Specs for rules with a fixed logical rank per tensor argument: RankIn<R<2>, R<0, 2>> says
// the first tensor argument must be a matrix and the second have at most 2 dims. The rule runs
// only when they hold; otherwise the op runs per element (and raises torch's own error there).
struct AnyRanks {
  static constexpr bool always = true;
  static bool fast(const std::vector<const at::Tensor*>&) { return true; }
};
template <int Lo, int Hi = Lo>
struct R {};
template <class... Rs>
struct RankIn;
template <int... Lo, int... Hi>
struct RankIn<R<Lo, Hi>...> {
  static constexpr bool always = false;
  static bool fast(const std::vector<const at::Tensor*>& ts) {
    constexpr int lo[] = {Lo...}, hi[] = {Hi...};
    for (size_t i = 0; i < ts.size() && i < sizeof...(Lo); ++i)
      if (ts[i] && (ts[i]->dim() < lo[i] || ts[i]->dim() > hi[i])) return false;
    return true;
  }
};
constexpr int kAnyRank = 1 << 20;

template <class Op, auto Rule, class Spec = AnyRanks, class Sig = typename Op::schema>
struct VmapKernelImpl;

template <class Op, auto Rule, class Spec, class Ret, class... Args>
struct VmapKernelImpl<Op, Rule, Spec, Ret(Args...)> {
  static Ret fn(c10::DispatchKeySet ks, Args... args) {
    std::optional<Ret> done;
    const Level* top = vmapPrologue<Op, Ret, Args...>(done, ks, args...);
    if (!top) return std::move(*done);
    const int64_t lvl = top->id;
    if constexpr (!Spec::always) {
      if (!Spec::fast(logicalTensors(args...))) {
        HandDownGuard guard;
        return wrapAllAt0<Ret>(runPerElement<Op, Ret>(lvl, top->concreteBatchSize(Op::name), args...), *top);
      }
    }
    HandDownGuard guard;
    return wrapResult<Op, Ret>(std::apply(Rule, std::tuple_cat(unwrapArg(args, lvl)...)), *top);
  }
};

template <class Op, auto Rule, class Sig = typename Op::schema>
struct VmapInplaceKernelImpl;

// Self is at::Tensor, or const at::Tensor for in-place view ops (as_strided_), whose schema says so.
template <class Op, auto Rule, class Self, class... Args>
struct VmapInplaceKernelImpl<Op, Rule, Self&(Self&, Args...)> {
  static Self& fn(c10::DispatchKeySet ks, Self& self, Args... args) {
    if (C10_UNLIKELY(isUnusualTensor(self) || (isUnusualArg(args) || ...))) {
      if (isForeignFirstArg(self) || (isForeignFirstArg(args) || ...)) {
        return redirectToFront<Op, Self&, Self&, Args...>(ks, self, args...);
      }
      if (isDeadTensor(self) || (isDeadArg(args) || ...)) {
        at::Tensor live = unwrapIfDead(self);
        Op::call(live, reviveArg(args)...);
        return self;
      }
    }
    const Level* top = levelStack().top();
    if (C10_UNLIKELY(!top || top->kind != LevelKind::Vmap)) {
      return redirectToFront<Op, Self&, Self&, Args...>(ks, self, args...);
    }
    const int64_t lvl = top->id;
    auto* bself = batchedAt(self, lvl);
    const bool others = (isBatchedArg(args, lvl) || ...);
    if (!bself && !others) {
      HandDownGuard guard;
      Op::call(self, args...);
      return self;
    }
    TORCH_CHECK(bself || top->batch_size == 1, "functorch_lite.vmap: ", Op::name,
                Op::overload_name[0] ? "." : "", Op::overload_name,
                " writes batched values in place into 'self', which is not "
                "batched (it was created outside vmap or does not depend on the mapped inputs). "
                "Use the out-of-place version (e.g. `x = x + y` instead of `x += y`), or make "
                "'self' batched first.");
    {
      HandDownGuard guard;
      // Without bself, a batch of one (a size-1 mapped dim, or chunk_size=1): the unbatched self,
      // seen as a batch of one, holds the one element's result, which is what the for-loop and
      // torch.func write into it. Only ops with other tensor arguments get here, and none of those
      // changes self's shape.
      at::Tensor value = bself ? bself->value() : self.unsqueeze(0);
      const bdim_t value_bdim = bself ? bself->bdim() : 0;
      auto call = [&] {
        return std::apply(
            Rule, std::tuple_cat(std::make_tuple(std::ref(value), value_bdim), unwrapArg(args, lvl)...));
      };
      // Rules of in-place shape ops return the new batch dim; the others return nothing.
      if constexpr (std::is_void_v<decltype(call())>) {
        call();
      } else {
        const int64_t bd = call();
        checkResultBdim(value, bd, Op::name);
        if (bself) bself->setBdim(bd);  // shape ops have no other tensor argument: bself is set
      }
    }
    if (bself) bself->refreshMetadata();
    return self;
  }
};

// ---- batch-native ops: every tensor argument takes any number of leading batch dims (linalg,
// triu/tril, ...). NOTE [Batch-native ops and logical ranks]
// Such an op works on the trailing dims of each tensor argument (its core rank: 2 for a matrix, 1
// for a vector such as pivots or tau) and broadcasts the leading (batch) dims between arguments.
// Handing it [B, *logical] tensors (unbatched ones expanded, not copied; every output batched at
// dim 0) is right only when (1) each argument has at least its core rank logically, or the vmap
// dim would silently become a matrix dim, and (2) all arguments have the same number of logical
// batch dims, or broadcasting would align the vmap dim of one argument with a logical batch dim
// of another. A Spec says when that holds (CoreRanks<r...>: one core rank per tensor argument in
// schema order, -1 for one that is not checked). Otherwise the op runs once per batch element and
// the results are stacked: that is vmap's definition, gives exactly torch's own error (raised by
// element 0) for too few dims, and torch's broadcasting of mixed batch ranks.
template <class Op, class Spec, class Sig = typename Op::schema>
struct BatchNativeKernelImpl;
template <class Op, class Spec, class Ret, class... Args>
struct BatchNativeKernelImpl<Op, Spec, Ret(Args...)> {
  static Ret fn(c10::DispatchKeySet ks, Args... args) {
    std::optional<Ret> done;
    const Level* top = vmapPrologue<Op, Ret, Args...>(done, ks, args...);
    if (!top) return std::move(*done);
    const int64_t lvl = top->id;
    const bool fast = Spec::fast(logicalTensors(args...));
    HandDownGuard guard;
    if (!fast)
      return wrapAllAt0<Ret>(runPerElement<Op, Ret>(lvl, top->concreteBatchSize(Op::name), args...), *top);
    return wrapAllAt0<Ret>(Op::call(materializeArg(args, lvl, top->batch_size)...), *top);
  }
};

// A CompositeImplicitAutograd entry point (torch.linalg.eigvals, det, ...) whose argument checks
// live in the op it decomposes into, under another API name: it is checked here, against the
// logical ranks, so that the error names the function the user called. When the Spec holds it
// decomposes as usual (the boxed front kernel); otherwise it runs once per batch element.
template <class Op, class Spec, class Sig = typename Op::schema>
struct CheckedCompositeKernelImpl;
template <class Op, class Spec, class Ret, class... Args>
struct CheckedCompositeKernelImpl<Op, Spec, Ret(Args...)> {
  static Ret fn(c10::DispatchKeySet ks, Args... args) {
    std::optional<Ret> done;
    const Level* top = vmapPrologue<Op, Ret, Args...>(done, ks, args...);
    if (!top) return std::move(*done);
    if (Spec::fast(logicalTensors(args...))) return redirectToFront<Op, Ret, Args...>(ks, args...);
    HandDownGuard guard;
    return wrapAllAt0<Ret>(runPerElement<Op, Ret>(top->id, top->concreteBatchSize(Op::name), args...), *top);
  }
};

}  // namespace detail

// registerBatchNative<CoreRanks<2, 1>, at::_ops::A, at::_ops::B>(m): ops sharing one Spec (see
// NOTE [Batch-native ops and logical ranks]).
template <class Spec, class... Ops>
void registerBatchNative(torch::Library& m) {
  (m.impl(opName<Ops>().c_str(), TORCH_FN((detail::BatchNativeKernelImpl<Ops, Spec>::fn))), ...);
}
template <class Spec, class... Ops>
void registerCheckedComposite(torch::Library& m) {
  (m.impl(opName<Ops>().c_str(), TORCH_FN((detail::CheckedCompositeKernelImpl<Ops, Spec>::fn))), ...);
}
using detail::CoreRanks;
using detail::kAnyRank;
using detail::R;
using detail::RankIn;

// Spec: see RankIn (a rule that needs fixed logical ranks) and CoreRanks.
template <class Op, auto Rule, class Spec = detail::AnyRanks>
void registerVmapRule(torch::Library& m) {
  m.impl(opName<Op>().c_str(), TORCH_FN((detail::VmapKernelImpl<Op, Rule, Spec>::fn)));
}
template <class Op, auto Rule>
void registerVmapInplaceRule(torch::Library& m) {
  m.impl(opName<Op>().c_str(), TORCH_FN((detail::VmapInplaceKernelImpl<Op, Rule>::fn)));
}

// One line per family: registerFamily<Unary, at::_ops::sin, at::_ops::cos>(m) registers
// VmapKernelImpl<at::_ops::sin, &Unary<at::_ops::sin>::rule> and so on.
template <template <class> class RuleT, class... Ops>
void registerFamily(torch::Library& m) {
  (registerVmapRule<Ops, &RuleT<Ops>::rule>(m), ...);
}
template <template <class> class RuleT, class... Ops>
void registerInplaceFamily(torch::Library& m) {
  (registerVmapInplaceRule<Ops, &RuleT<Ops>::rule>(m), ...);
}

}  // namespace ftl
