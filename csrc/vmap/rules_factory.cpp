// Batching rules: factory-like ops that take a tensor for its options (new_empty, new_zeros,
// new_ones, new_full, new_empty_strided) and the layout helpers torch's forward-mode AD uses on
// tangents (_new_zeros_with_same_feature_meta, _has_same_storage_numel, is_same_size).
//
// NOTE [Tangent layouts under vmap]
// torch's forward AD requires a view's tangent to have exactly the view's sizes, strides and
// storage offset. It gets there by re-allocating tangents with new_empty_strided(primal sizes,
// primal strides). For a batched tangent we therefore allocate the physical tensor with the batch
// dim outermost, strided by the size of one logical element's storage (plus the primal's storage
// offset, which element 0 starts at): then the logical strides and offsets of every view equal
// the primal's, and the layout checks pass.
#include <ATen/Functions.h>
#include <ATen/Operators.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

using OptDtype = std::optional<c10::ScalarType>;
using OptLayout = std::optional<c10::Layout>;
using OptDevice = std::optional<c10::Device>;

c10::SmallVector<c10::SymInt, 8> prependBatch(int64_t B, c10::SymIntArrayRef size) {
  c10::SmallVector<c10::SymInt, 8> out{c10::SymInt(B)};
  out.append(size.begin(), size.end());
  return out;
}

// Storage (in elements) needed by one tensor of these sizes and strides.
c10::SymInt storageSize(c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  c10::SymInt n = 1;
  for (size_t i = 0; i < size.size(); ++i) {
    if (size[i] == 0) return 0;
    n += (size[i] - 1) * stride[i];
  }
  return n;
}

std::tuple<Tensor, bdim_t> newEmptyStridedRule(const Tensor& self, bdim_t bd, c10::SymIntArrayRef size,
                                               c10::SymIntArrayRef stride, OptDtype dt, OptLayout l,
                                               OptDevice d, std::optional<bool> pin) {
  const int64_t B = self.size(*bd);
  auto phys_stride = prependBatch(0, stride);
  phys_stride[0] = storageSize(size, stride);
  return {at::_ops::new_empty_strided::call(self, prependBatch(B, size), phys_stride, dt, l, d, pin), 0};
}

template <class Op>
struct NewFactory {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& self, bdim_t bd, c10::SymIntArrayRef size, OptDtype dt,
                                         OptLayout l, OptDevice d, std::optional<bool> pin) {
    return {Op::call(self, prependBatch(self.size(*bd), size), dt, l, d, pin), 0};
  }
};

std::tuple<Tensor, bdim_t> newFullRule(const Tensor& self, bdim_t bd, c10::SymIntArrayRef size,
                                       const c10::Scalar& fill, OptDtype dt, OptLayout l, OptDevice d,
                                       std::optional<bool> pin) {
  return {at::_ops::new_full::call(self, prependBatch(self.size(*bd), size), fill, dt, l, d, pin), 0};
}

// Zeros with the (logical) layout of `other`, batched like `self`; see the NOTE above.
std::tuple<Tensor, bdim_t> newZerosSameFeatureMetaRule(const Tensor& self, bdim_t sbd, const Tensor& other,
                                                       bdim_t obd, int64_t self_num_batch_dims) {
  if (obd) {
    // Only `other`'s logical sizes and strides matter, and every element has the same: any one
    // element stands for all (a view with exactly the logical layout).
    TORCH_CHECK(other.size(*obd) > 0,
                "functorch_lite.vmap: _new_zeros_with_same_feature_meta "
                "over an empty batch is not supported");
    Tensor one = other.select(*obd, 0);
    if (!sbd) {
      return {at::_ops::_new_zeros_with_same_feature_meta::call(self, one, self_num_batch_dims),
              std::nullopt};
    }
    return newZerosSameFeatureMetaRule(self, sbd, one, std::nullopt, self_num_batch_dims);
  }
  TORCH_CHECK(self_num_batch_dims == 0,
              "functorch_lite.vmap: _new_zeros_with_same_feature_meta "
              "with batch dims is not supported (please report this use)");
  // `other`'s storage offset is part of the layout forward AD compares (a primal that is a slice,
  // such as one chunk of a chunked vmap, has a nonzero one): every element gets a slot of
  // offset + storage size, and element 0 starts at the offset, which is what the batched tensor
  // reports as its own (tensors.cpp).
  const int64_t B = self.size(*sbd);
  auto sizes = other.sym_sizes();
  auto strides = other.sym_strides();
  const c10::SymInt offset = other.sym_storage_offset();
  auto phys_stride = prependBatch(0, strides);
  phys_stride[0] = storageSize(sizes, strides) + offset;
  // Zeros over the whole storage, like torch's own: zero_() on the strided view would leave the
  // gaps between its elements uninitialised, and forward AD may view that storage again.
  Tensor flat = at::_ops::new_zeros::call(self, {phys_stride[0] * B}, self.scalar_type(), std::nullopt,
                                          std::nullopt, std::nullopt);
  return {flat.as_strided_symint(prependBatch(B, sizes), phys_stride, offset), 0};
}

// Asked by forward AD whether a tangent can share its primal's storage layout. A batched tangent
// lives in a larger physical storage by construction (NOTE above); its logical layout is what
// counts, and the size and stride checks that follow compare exactly that.
bool hasSameStorageNumelKernel(c10::DispatchKeySet ks, const Tensor& self, const Tensor& other) {
  std::optional<bool> done;
  if (detail::vmapPrologue<at::_ops::_has_same_storage_numel, bool, const Tensor&, const Tensor&>(
          done, ks, self, other)) {
    return true;  // a batched argument at the top vmap level: see above
  }
  return *done;
}

// Batched tensors report their logical sizes, which is what the question is about.
bool isSameSizeKernel(c10::DispatchKeySet ks, const Tensor& self, const Tensor& other) {
  std::optional<bool> done;
  if (detail::vmapPrologue<at::_ops::is_same_size, bool, const Tensor&, const Tensor&>(done, ks, self,
                                                                                       other)) {
    return self.sym_sizes() == other.sym_sizes();
  }
  return *done;
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // clang-format off
  registerFamily<NewFactory,
      at::_ops::new_empty,
      at::_ops::new_ones,
      at::_ops::new_zeros>(m);
  // clang-format on
  registerVmapRule<at::_ops::new_full, &newFullRule>(m);
  registerVmapRule<at::_ops::new_empty_strided, &newEmptyStridedRule>(m);
  registerVmapRule<at::_ops::_new_zeros_with_same_feature_meta, &newZerosSameFeatureMetaRule>(m);
  m.impl("_has_same_storage_numel", TORCH_FN(hasSameStorageNumelKernel));
  m.impl("is_same_size", TORCH_FN(isSameSizeKernel));
}

}  // namespace ftl
