#include "core/tensors.h"

#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/WrapDimUtils.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace ftl {

c10::DispatchKeySet wrapperKeySet() {
  static const c10::DispatchKeySet ks = c10::DispatchKeySet({
      c10::DispatchKey::DeferredInit,
      c10::DispatchKey::Batched,
      c10::DispatchKey::AutogradPrivateUse3,
      c10::DispatchKey::ADInplaceOrView,
      c10::DispatchKey::PrivateUse3,
  });
  return ks;
}

c10::DispatchKeySet gradWrapperKeySet(const at::Tensor& value) {
  // The value's autocast keys (AutocastCPU for a CPU value, ...): NOTE [Autocast and levels].
  const auto autocast = value.key_set() & c10::autocast_dispatch_keyset;
  switch (value.layout()) {
    case c10::kStrided:
      return wrapperKeySet() | autocast;
    case c10::kSparse: {
      static const auto ks = wrapperKeySet().remove(c10::DispatchKey::Dense).add(c10::DispatchKey::Sparse);
      return ks;
    }
    case c10::kSparseCsr:
    case c10::kSparseCsc:
    case c10::kSparseBsr:
    case c10::kSparseBsc: {
      static const auto ks = wrapperKeySet().remove(c10::DispatchKey::Dense).add(c10::DispatchKey::SparseCsr);
      return ks;
    }
    default:
      TORCH_CHECK(false, "functorch_lite: cannot track gradients of a tensor with layout ", value.layout(),
                  " (strided, sparse COO and sparse compressed layouts are supported); convert it with "
                  ".to_dense() first");
  }
}

FtTensorImplBase::FtTensorImplBase(WrapperKind kind, at::Tensor value, int64_t level,
                                   std::shared_ptr<bool> alive, c10::DispatchKeySet keys)
    : c10::TensorImpl(keys, value.dtype(), value.device()),
      kind_(kind),
      value_(std::move(value)),
      level_(level),
      alive_(std::move(alive)) {
  // Nothing of ours has storage of its own; reading it must raise, never return garbage.
  set_storage_access_should_throw();
}

// NOTE [Symbolic batch sizes] in levels.h: a traced value whose sizes hold symbols (a size the
// tracer specialized is a SymInt with a known value, and stays on the int path).
static bool needsSymbolicMetadata(const c10::TensorImpl& self, const at::Tensor& value) {
  if (self.has_symbolic_sizes_strides()) return true;
  const auto* v = value.unsafeGetTensorImpl();
  if (C10_LIKELY(!v->has_symbolic_sizes_strides())) return false;
  auto symbolic = [](const c10::SymInt& s) { return !s.maybe_as_int().has_value(); };
  const auto sizes = value.sym_sizes();
  const auto strides = value.sym_strides();
  return std::any_of(sizes.begin(), sizes.end(), symbolic) ||
         std::any_of(strides.begin(), strides.end(), symbolic) || symbolic(value.sym_storage_offset());
}

// ---------------------------------------------------------------------------------------------
BatchedTensorImpl::BatchedTensorImpl(at::Tensor value, int64_t bdim, int64_t level,
                                     std::shared_ptr<bool> alive)
    : FtTensorImplBase(WrapperKind::Batched, std::move(value), level, std::move(alive)), bdim_(bdim) {
  TORCH_INTERNAL_ASSERT(value_.defined());
  refreshMetadata();
}

void BatchedTensorImpl::refreshMetadata() {
  const auto sizes = value_.sym_sizes();
  const auto strides = value_.sym_strides();
  const int64_t ndim = static_cast<int64_t>(sizes.size()) - 1;
  TORCH_INTERNAL_ASSERT(bdim_ >= 0 && bdim_ <= ndim);
  if (C10_UNLIKELY(needsSymbolicMetadata(*this, value_))) {
    c10::SymDimVector sym_sizes, sym_strides;
    for (int64_t i = 0; i <= ndim; ++i) {
      if (i == bdim_) continue;
      sym_sizes.push_back(sizes[i]);
      sym_strides.push_back(strides[i]);
    }
    set_sizes_and_strides(sym_sizes, sym_strides, value_.sym_storage_offset());
    return;
  }
  sizes_and_strides_.resize(ndim);
  for (int64_t i = 0, j = 0; i <= ndim; ++i) {
    if (i == bdim_) continue;
    sizes_and_strides_.size_at_unchecked(j) = sizes[i].expect_int();
    sizes_and_strides_.stride_at_unchecked(j) = strides[i].expect_int();
    ++j;
  }
  // The offset of batch element 0: with tangents laid out batch-outermost (rules_factory.cpp),
  // views of a batched tangent then report the same offset as the same views of the primal.
  storage_offset_ = value_.sym_storage_offset().expect_int();
  refresh_numel();
  refresh_contiguous();
}

c10::intrusive_ptr<c10::TensorImpl> BatchedTensorImpl::shallow_copy_and_detach(
    const c10::VariableVersion& version_counter, bool allow_tensor_metadata_change) const {
  return finishDetachedCopy(c10::make_intrusive<BatchedTensorImpl>(value_, bdim_, level_, alive_), this,
                            version_counter, allow_tensor_metadata_change);
}

c10::intrusive_ptr<c10::TensorImpl> BatchedTensorImpl::shallow_copy_and_detach(
    c10::VariableVersion&& version_counter, bool allow_tensor_metadata_change) const {
  return finishDetachedCopy(c10::make_intrusive<BatchedTensorImpl>(value_, bdim_, level_, alive_), this,
                            std::move(version_counter), allow_tensor_metadata_change);
}

void BatchedTensorImpl::shallow_copy_from(const c10::intrusive_ptr<c10::TensorImpl>& impl) {
  auto* other = dynamic_cast<BatchedTensorImpl*>(impl.get());
  TORCH_CHECK(other,
              "functorch_lite: cannot copy another kind of tensor into a BatchedTensor "
              "(did you assign `.data` across a vmap boundary?)");
  value_ = other->value_;
  bdim_ = other->bdim_;
  level_ = other->level_;
  alive_ = other->alive_;
  refreshMetadata();
}

// ---------------------------------------------------------------------------------------------
GradWrapperImpl::GradWrapperImpl(at::Tensor value, int64_t level, std::shared_ptr<bool> alive, bool immutable)
    : FtTensorImplBase(WrapperKind::Grad, value, level, std::move(alive), gradWrapperKeySet(value)),
      immutable_(immutable) {
  TORCH_INTERNAL_ASSERT(value_.defined());
  // Sparse wrappers have no strides (NOTE [Sparse grad wrappers]): asking raises, as on the value.
  if (value_.layout() != c10::kStrided) set_custom_sizes_strides(SizesStridesPolicy::CustomStrides);
  refreshMetadata();
  // A wrapped Python number keeps its weak type-promotion category through the wrapper.
  if (value_.unsafeGetTensorImpl()->is_wrapped_number()) set_wrapped_number(true);
}

void GradWrapperImpl::refreshMetadata() {
  if (value_.layout() != c10::kStrided) {
    const auto sizes = value_.sizes();
    sizes_and_strides_.set_sizes(sizes);
    refresh_numel();
    return;
  }
  const auto sizes = value_.sym_sizes();
  const auto strides = value_.sym_strides();
  if (C10_UNLIKELY(needsSymbolicMetadata(*this, value_))) {
    set_sizes_and_strides(sizes, strides, value_.sym_storage_offset());
    return;
  }
  sizes_and_strides_.resize(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    sizes_and_strides_.size_at_unchecked(i) = sizes[i].expect_int();
    sizes_and_strides_.stride_at_unchecked(i) = strides[i].expect_int();
  }
  storage_offset_ = value_.sym_storage_offset().expect_int();
  refresh_numel();
  refresh_contiguous();
}

c10::intrusive_ptr<c10::TensorImpl> GradWrapperImpl::shallow_copy_and_detach(
    const c10::VariableVersion& version_counter, bool allow_tensor_metadata_change) const {
  return finishDetachedCopy(c10::make_intrusive<GradWrapperImpl>(value_, level_, alive_, immutable_), this,
                            version_counter, allow_tensor_metadata_change);
}

c10::intrusive_ptr<c10::TensorImpl> GradWrapperImpl::shallow_copy_and_detach(
    c10::VariableVersion&& version_counter, bool allow_tensor_metadata_change) const {
  return finishDetachedCopy(c10::make_intrusive<GradWrapperImpl>(value_, level_, alive_, immutable_), this,
                            std::move(version_counter), allow_tensor_metadata_change);
}

void GradWrapperImpl::shallow_copy_from(const c10::intrusive_ptr<c10::TensorImpl>& impl) {
  auto* other = dynamic_cast<GradWrapperImpl*>(impl.get());
  TORCH_CHECK(other,
              "functorch_lite: cannot copy another kind of tensor into a grad-level tensor "
              "(did you assign `.data` across a transform boundary?)");
  value_ = other->value_;
  level_ = other->level_;
  alive_ = other->alive_;
  immutable_ = other->immutable_;
  refreshMetadata();
}

// ---------------------------------------------------------------------------------------------
at::Tensor makeBatched(at::Tensor value, std::optional<int64_t> bdim, const Level& level) {
  if (!bdim.has_value()) return value;
  return at::Tensor(c10::make_intrusive<BatchedTensorImpl>(std::move(value), *bdim, level.id, level.alive));
}

at::Tensor makeGradWrapper(at::Tensor value, const Level& level, bool immutable) {
  return at::Tensor(c10::make_intrusive<GradWrapperImpl>(std::move(value), level.id, level.alive, immutable));
}

std::pair<at::Tensor, std::optional<int64_t>> unwrapAt(const at::Tensor& t, int64_t level) {
  if (auto* b = batchedAt(t, level)) return {b->value(), b->bdim()};
  return {t, std::nullopt};
}

at::Tensor unwrapIfDead(const at::Tensor& t) {
  auto* ft = asFt(t);
  if (!ft || ft->isAlive()) return t;
  TORCH_CHECK(ft->wrapperKind() == WrapperKind::Grad,
              "functorch_lite.vmap: a tensor created inside a vmap'd function was used after that "
              "vmap returned (it was stored in a global, an attribute or a closure). Return it "
              "from the function instead: vmap adds the batch dimension to returned tensors only.");
  at::Tensor value = ft->value();
  // NOTE [Dead wrappers of functional tensors]: a grad level entered inside functionalize wraps
  // functional tensors. Its dead wrapper reached from inside functionalization's own kernel (the
  // backward of vjp_fn, run after vjp returned, is functionalized op by op) stands for a value
  // the kernel has already unwrapped everywhere else: with the mode excluded, nothing below
  // could unwrap it, so it is unwrapped here too (after applying its pending updates).
  while (at::functionalization::impl::isFunctionalTensor(value) &&
         c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::Functionalize)) {
    at::functionalization::impl::sync(value);
    value = at::functionalization::impl::from_functional_tensor(value);
  }
  return unwrapIfDead(value);
}

}  // namespace ftl
