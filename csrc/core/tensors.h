#pragma once
// Our two TensorImpls: BatchedTensorImpl (vmap) and GradWrapperImpl (grad).
//
// NOTE [What our tensors hold]
// Both wrap a `value`: a tensor of the level below (a plain tensor, or another of our wrappers of
// an outer level). They record the id of the level that created them and share that level's
// `alive` flag (NOTE [Levels] in levels.h).
// - BatchedTensorImpl(value, bdim, level): the value has one extra dimension, `bdim`, of size
//   batch_size; the BatchedTensor reports the *logical* sizes and strides, i.e. the value's with
//   bdim removed. It has no storage; anything that reads storage raises.
// - GradWrapperImpl(value, level): same sizes, strides, dtype and device as its value; it carries
//   its own autograd meta (requires_grad, grad_fn) for its level's graph, which is how torch's own
//   VariableType kernels record a separate graph per grad level.
//
// NOTE [Dispatch keys of our tensors]
// Both carry {DeferredInit, Batched, AutogradPrivateUse3, ADInplaceOrView, PrivateUse3}:
// - DeferredInit: the "front" key (dispatch.h). It is also in the TLS included set while any
//   level is live, so tensors that escaped their transform still reach our code and can be
//   unwrapped (grad) or rejected with a clear error (vmap) instead of reading missing storage.
// - AutogradPrivateUse3 + ADInplaceOrView: so torch's autograd and view tracking run on grad
//   wrappers, and so batched tensors are never mistaken for inference tensors.
// - PrivateUse3 (Dense): the "back" key. After autograd, grad wrappers reach our per-op PrivateUse3
//   kernel, which unwraps them and hands the op to the level below.
// - Batched: a marker, never dispatched to (its kernels are torch's legacy vmap). torch's autograd
//   formulas choose between an in-place/.item() fast path and a composite-compliant path with
//   at::isTensorSubclassLike(), which recognises tensor-wrapping transforms by this key among
//   others; without it, backward of prod/max/median and the forward-mode formulas of softmax,
//   logsumexp, layer_norm... would write into or read the data of our wrappers. Every dispatch on
//   our tensors lands on DeferredInit first (it is higher), and Batched is in the TLS excluded set
//   while any level is live and wherever DeferredInit is excluded (kFrontKeys), so the legacy
//   kernels are never reached.
// Device and dtype are the value's: a wrapper of a CUDA tensor reports device cuda:N.
//
// NOTE [Recognising our tensors]
// DeferredInit on a tensor does not make it ours: torch's FunctionalTensorWrapper copies every key
// of the tensor it wraps (so a functional tensor around one of ours carries DeferredInit and
// PrivateUse3), and a Python wrapper subclass can ask for any keys (_extra_dispatch_keys). Such an
// impl has none of our fields, so reading it as one of ours reads unrelated memory. The key is
// therefore only the cheap first filter (most tensors fail it), and the impl's dynamic type
// decides: both classes are final, so comparing typeid(*impl) with theirs is exact and reads only
// the vtable, which every TensorImpl has. The classes are exported so that extensions compiled
// against these headers compare with the same type_info objects as _C. What the front kernel does
// with a foreign impl that carries our key is NOTE [Foreign wrappers of our tensors] in dispatch.h.
//
// NOTE [Autocast and levels]
// torch.autocast works through functionality keys (AutocastCPU, AutocastCUDA, ...) that tensors
// carry by backend and that are "on" while the thread does not exclude them. A grad wrapper
// carries its value's autocast keys, so an op on grad wrappers is cast at the grad level, after
// our front kernel lifted it and before autograd records it, as torch.func's wrappers are: the
// level's graph holds the casts, and gradients come back in the inputs' dtypes. Batched tensors
// carry none: a batching rule runs first and hands the op down, and handing down keeps the
// autocast state of the moment (HandDownGuard), so the level below (a grad level, or the plain
// tensors at the bottom) casts. An autocast entered inside the transformed function therefore
// applies to every level, as one entered around the transform does.
//
// NOTE [Sparse grad wrappers]
// A grad wrapper keeps its value's layout, as torch.func's do, because torch's sparse autograd
// formulas (to_dense, sparse_mask, sparse.mm, ...) read the layout of their inputs and the engine
// checks that a gradient's layout matches its input's. The layout of a TensorImpl comes from its
// key set, so a wrapper of a sparse COO value carries SparsePrivateUse3 instead of PrivateUse3 (a
// sparse compressed one SparseCsrPrivateUse3, and reports the value's exact layout through
// layout_impl()); the back kernels are registered on those keys too (dispatch.cpp). Such a wrapper
// has sizes but no strides, like the sparse tensor it wraps. Batched tensors stay strided only.
//
// NOTE [Lifetime of wrappers]
// A wrapper owns a strong reference to its value; the level owns nothing. When a level is popped
// its wrappers become dead: a dead grad wrapper is silently replaced by its value when it is next
// used (it is a constant from then on, like torch.func), and a dead batched tensor raises, because
// it has no meaning outside its vmap. Outputs of a transform are unwrapped on the way out.
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>

#include "levels.h"

#include <memory>
#include <optional>
#include <typeinfo>

namespace ftl {

enum class WrapperKind : uint8_t { Batched, Grad };

c10::DispatchKeySet wrapperKeySet();
// The key set of a grad wrapper of `value`: wrapperKeySet() with the value's layout functionality
// (NOTE [Sparse grad wrappers]). Raises a clear error for layouts we cannot wrap (mkldnn).
c10::DispatchKeySet gradWrapperKeySet(const at::Tensor& value);

// Keys excluded together whenever code runs "below the front": DeferredInit and the Batched marker.
constexpr c10::DispatchKeySet kFrontKeys({c10::DispatchKey::DeferredInit, c10::DispatchKey::Batched});

class FTL_API FtTensorImplBase : public c10::TensorImpl {
 public:
  FtTensorImplBase(WrapperKind kind, at::Tensor value, int64_t level, std::shared_ptr<bool> alive,
                   c10::DispatchKeySet keys = wrapperKeySet());
  WrapperKind wrapperKind() const { return kind_; }
  const at::Tensor& value() const { return value_; }
  int64_t level() const { return level_; }
  bool isAlive() const { return *alive_; }
  const std::shared_ptr<bool>& aliveFlag() const { return alive_; }

 protected:
  WrapperKind kind_;
  at::Tensor value_;
  int64_t level_;
  std::shared_ptr<bool> alive_;

  // The shared tail of shallow_copy_and_detach: torch's metadata copy, then our own refresh.
  template <class Impl, class VersionCounter>
  static c10::intrusive_ptr<c10::TensorImpl> finishDetachedCopy(c10::intrusive_ptr<Impl> impl,
                                                                const c10::TensorImpl* src,
                                                                VersionCounter&& vc, bool allow) {
    copy_tensor_metadata(src, impl.get(), std::forward<VersionCounter>(vc), allow);
    impl->refreshMetadata();
    return impl;
  }
};

class FTL_API BatchedTensorImpl final : public FtTensorImplBase {
 public:
  BatchedTensorImpl(at::Tensor value, int64_t bdim, int64_t level, std::shared_ptr<bool> alive);
  int64_t bdim() const { return bdim_; }
  // Only for in-place shape ops, which can move the batch dim; call refreshMetadata() after.
  void setBdim(int64_t bdim) { bdim_ = bdim; }
  // Re-reads sizes and strides from the value (after an in-place op changed its shape).
  FTL_API void refreshMetadata();

  const char* tensorimpl_type_name() const override { return "functorch_lite.BatchedTensorImpl"; }
  c10::intrusive_ptr<c10::TensorImpl> shallow_copy_and_detach(
      const c10::VariableVersion& version_counter, bool allow_tensor_metadata_change) const override;
  c10::intrusive_ptr<c10::TensorImpl> shallow_copy_and_detach(
      c10::VariableVersion&& version_counter, bool allow_tensor_metadata_change) const override;
  void shallow_copy_from(const c10::intrusive_ptr<c10::TensorImpl>& impl) override;

 private:
  int64_t bdim_;
};

class FTL_API GradWrapperImpl final : public FtTensorImplBase {
 public:
  GradWrapperImpl(at::Tensor value, int64_t level, std::shared_ptr<bool> alive, bool immutable = false);
  void refreshMetadata();
  // NOTE [Immutable wrappers]: a wrapper made by lifting a tensor captured from outside the
  // transform (and every view of one) is immutable: writing into it would change the captured
  // tensor behind the graph's back, so in-place ops on it raise, as in torch.func.
  bool immutable() const { return immutable_; }

  const char* tensorimpl_type_name() const override { return "functorch_lite.GradWrapperImpl"; }
  // Only reached for sparse compressed values (TensorImpl::layout() reads the key set otherwise).
  c10::Layout layout_impl() const override { return value_.layout(); }
  c10::intrusive_ptr<c10::TensorImpl> shallow_copy_and_detach(
      const c10::VariableVersion& version_counter, bool allow_tensor_metadata_change) const override;
  c10::intrusive_ptr<c10::TensorImpl> shallow_copy_and_detach(
      c10::VariableVersion&& version_counter, bool allow_tensor_metadata_change) const override;
  void shallow_copy_from(const c10::intrusive_ptr<c10::TensorImpl>& impl) override;

 private:
  bool immutable_;
};

// --- cheap queries: one key-set test for most tensors, a typeid comparison for the rest
// (NOTE [Recognising our tensors]).
inline BatchedTensorImpl* asBatched(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  auto* impl = t.unsafeGetTensorImpl();
  if (!impl->key_set().has(c10::DispatchKey::DeferredInit)) return nullptr;
  return typeid(*impl) == typeid(BatchedTensorImpl) ? static_cast<BatchedTensorImpl*>(impl) : nullptr;
}
inline GradWrapperImpl* asGradWrapper(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  auto* impl = t.unsafeGetTensorImpl();
  if (!impl->key_set().has(c10::DispatchKey::DeferredInit)) return nullptr;
  return typeid(*impl) == typeid(GradWrapperImpl) ? static_cast<GradWrapperImpl*>(impl) : nullptr;
}
inline FtTensorImplBase* asFt(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  auto* impl = t.unsafeGetTensorImpl();
  if (!impl->key_set().has(c10::DispatchKey::DeferredInit)) return nullptr;
  const std::type_info& type = typeid(*impl);
  if (type == typeid(BatchedTensorImpl)) return static_cast<BatchedTensorImpl*>(impl);
  if (type == typeid(GradWrapperImpl)) return static_cast<GradWrapperImpl*>(impl);
  return nullptr;
}
// Whether `t` (a tensor with the Functionalize key) is one of torch's functional wrappers that
// holds one of our tensors, directly or through more functional wrappers.
FTL_API bool functionalHoldsOurs(const at::Tensor& t);
// Another library's TensorImpl that wraps one of ours: one that carries our front key (NOTE
// [Recognising our tensors]), or a functional wrapper whose value became one of ours in place
// (NOTE [Functional wrappers with stale keys] in dispatch.h).
inline bool isForeignWithFrontKey(const at::Tensor& t) {
  if (!t.defined()) return false;
  const auto ks = t.unsafeGetTensorImpl()->key_set();
  if (ks.has(c10::DispatchKey::DeferredInit)) return !asFt(t);
  return ks.has(c10::DispatchKey::Functionalize) && functionalHoldsOurs(t);
}
// The BatchedTensorImpl of `t` if it is batched at exactly `level`.
inline BatchedTensorImpl* batchedAt(const at::Tensor& t, int64_t level) {
  auto* b = asBatched(t);
  return b && b->level() == level ? b : nullptr;
}

// --- construction. makeBatched with no bdim returns the value itself (an unbatched result).
FTL_API at::Tensor makeBatched(at::Tensor value, std::optional<int64_t> bdim, const Level& level);
at::Tensor makeGradWrapper(at::Tensor value, const Level& level, bool immutable = false);

// (value, bdim) of `t` at `level`: unbatched tensors come back as themselves with no bdim.
FTL_API std::pair<at::Tensor, std::optional<int64_t>> unwrapAt(const at::Tensor& t, int64_t level);

// Replaces dead grad wrappers by their values (recursively); raises for dead batched tensors.
FTL_API at::Tensor unwrapIfDead(const at::Tensor& t);

}  // namespace ftl
