// Batching rules: views and shape ops (view, reshape, permute, transpose, t, squeeze/unsqueeze
// and their in-place forms, expand, select, slice, diagonal, unbind, split, flip, roll, repeat,
// unfold, diag_embed, rot90, the *_scatter ops, complex views, channel/pixel shuffles), their
// *_copy variants, and cat/stack. Almost every rule moves the batch dim to the front and shifts
// logical dims by one, so the result is a view of the physical tensor exactly when the logical op
// returns a view.
#include <ATen/Functions.h>
#include <ATen/InferSize.h>
#include <ATen/Operators.h>
#include <ATen/TensorUtils.h>
#include <ATen/WrapDimUtils.h>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

using SymIntVec = c10::SmallVector<c10::SymInt, 8>;

SymIntVec withBatch(const c10::SymInt& B, c10::SymIntArrayRef size) {
  SymIntVec out;
  out.reserve(size.size() + 1);
  out.push_back(B);
  out.append(size.begin(), size.end());
  return out;
}

// A view of the logical tensor is a view of the physical one with the batch dim kept whole: at
// the front if the strides allow it, else at the back (e.g. flattening dims in front of a trailing
// batch dim). Returns nullopt when neither layout can be viewed (then only a copy can reshape).
// Written once for int sizes (eager) and once for SymInts (NOTE [Symbolic batch sizes]).
template <class Int, class Vec, class Ref>
std::optional<std::tuple<Tensor, bdim_t>> tryViewAs(const Tensor& x, int64_t bd, Ref size, Ref x_sizes,
                                                    Ref x_strides) {
  const Int B = x_sizes[bd];
  Int numel = 1;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != bd) numel *= x_sizes[d];
  Vec logical = at::infer_size_dv(size, numel);
  Vec front{B};
  front.append(logical.begin(), logical.end());
  // the strides of the batch dim moved to the front / the back, without making the tensor
  auto moved = [&](bool to_front) {
    Vec sz, st;
    if (to_front) sz.push_back(x_sizes[bd]), st.push_back(x_strides[bd]);
    for (int64_t d = 0; d < x.dim(); ++d)
      if (d != bd) sz.push_back(x_sizes[d]), st.push_back(x_strides[d]);
    if (!to_front) sz.push_back(x_sizes[bd]), st.push_back(x_strides[bd]);
    return std::make_pair(sz, st);
  };
  auto [fs, ft] = moved(true);
  if (at::detail::computeStride(fs, ft, front)) {
    Tensor f = moveBdimToFront(x, bd);
    if constexpr (std::is_same_v<Int, int64_t>)
      return std::make_tuple(f.view(front), bdim_t(0));
    else
      return std::make_tuple(f.view_symint(front), bdim_t(0));
  }
  Vec back(logical.begin(), logical.end());
  back.push_back(B);
  auto [bs, bt] = moved(false);
  if (at::detail::computeStride(bs, bt, back)) {
    Tensor b = x.movedim(bd, -1);
    const bdim_t at = static_cast<int64_t>(logical.size());
    if constexpr (std::is_same_v<Int, int64_t>)
      return std::make_tuple(b.view(back), at);
    else
      return std::make_tuple(b.view_symint(back), at);
  }
  return std::nullopt;
}

std::optional<std::tuple<Tensor, bdim_t>> tryView(const Tensor& x, int64_t bd, c10::SymIntArrayRef size) {
  auto ints = c10::asIntArrayRefSlowOpt(size);
  if (C10_LIKELY(ints && !x.unsafeGetTensorImpl()->has_symbolic_sizes_strides()))
    return tryViewAs<int64_t, at::DimVector, c10::IntArrayRef>(x, bd, *ints, x.sizes(), x.strides());
  return tryViewAs<c10::SymInt, at::SymDimVector, c10::SymIntArrayRef>(x, bd, size, x.sym_sizes(),
                                                                       x.sym_strides());
}

std::tuple<Tensor, bdim_t> viewRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size) {
  auto r = tryView(x, *bd, size);
  TORCH_CHECK(r.has_value(),
              "view size is not compatible with input tensor's size and stride (at "
              "least one dimension spans across two contiguous subspaces). Use .reshape(...) "
              "instead.");
  return *r;
}
std::tuple<Tensor, bdim_t> unsafeViewRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size) {
  Tensor p = moveBdimToFront(x, bd);
  return {at::_ops::_unsafe_view::call(p, withBatch(p.sym_size(0), size)), 0};
}
std::tuple<Tensor, bdim_t> reshapeRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size) {
  if (auto r = tryView(x, *bd, size)) return *r;
  Tensor p = moveBdimToFront(x, bd);
  return {at::_ops::reshape::call(p, withBatch(p.sym_size(0), size)), 0};
}
// reshape's composite asks for _reshape_alias when the logical tensor can be viewed.
std::tuple<Tensor, bdim_t> reshapeAliasRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size,
                                            c10::SymIntArrayRef) {
  return reshapeRule(x, bd, size);
}

// clone() with the batch dim at the front: clone(memory_format=contiguous), which contiguous()
// uses, then gives a logically contiguous result.
std::tuple<Tensor, bdim_t> cloneRule(const Tensor& x, bdim_t bd, std::optional<c10::MemoryFormat> fmt) {
  Tensor p = moveBdimToFront(x, bd);
  // preserve_format keeps the strides only of a dense tensor; ask the question of one logical
  // element, not of the physical tensor (which is dense with any batch dim position).
  if ((!fmt || *fmt == c10::MemoryFormat::Preserve) && p.size(0) > 0 &&
      !p.select(0, 0).is_non_overlapping_and_dense()) {
    fmt = c10::MemoryFormat::Contiguous;
  }
  return {p.clone(fmt), 0};
}

std::tuple<Tensor, bdim_t> permuteRule(const Tensor& x, bdim_t bd, c10::IntArrayRef dims) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (static_cast<int64_t>(dims.size()) != lr) {
    raiseForElement([&] { at::_ops::permute::call(exampleOf(p, 0, 0), dims); }, "permute",
                    "the number of dims must equal the tensor's");
  }
  c10::SmallVector<int64_t, 8> phys{0};
  for (int64_t d : dims) phys.push_back(physicalDim(d, lr, true));
  return {p.permute(phys), 0};
}

std::tuple<Tensor, bdim_t> transposeRule(const Tensor& x, bdim_t bd, int64_t d0, int64_t d1) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  const int64_t p0 = physicalDim(d0, lr, true), p1 = physicalDim(d1, lr, true);  // torch's check
  if (lr == 0) return {p, 0};
  return {p.transpose(p0, p1), 0};
}

std::tuple<Tensor, bdim_t> tRule(const Tensor& x, bdim_t bd) {
  Tensor p = moveBdimToFront(x, bd);
  TORCH_CHECK(p.dim() - 1 <= 2, "t() expects a tensor with <= 2 dimensions, but self is ", p.dim() - 1, "D");
  if (p.dim() < 3) return {p, 0};
  return {p.transpose(1, 2), 0};
}

std::tuple<Tensor, bdim_t> unsqueezeRule(const Tensor& x, bdim_t bd, int64_t dim) {
  Tensor p = moveBdimToFront(x, bd);
  return {p.unsqueeze(c10::maybe_wrap_dim(dim, p.dim()) + 1), 0};
}

std::tuple<Tensor, bdim_t> squeezeDimRule(const Tensor& x, bdim_t bd, int64_t dim) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  // A logical scalar has nothing to squeeze, but the dim is still checked and the result is
  // still a view (an alias), as torch.squeeze gives on a 0-dim tensor.
  if (lr == 0) {
    c10::maybe_wrap_dim(dim, 0);
    return {p.alias(), 0};
  }
  return {p.squeeze(physicalDim(dim, lr, true)), 0};
}

std::tuple<Tensor, bdim_t> squeezeDimsRule(const Tensor& x, bdim_t bd, c10::IntArrayRef dims) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (lr == 0) {
    for (int64_t d : dims) c10::maybe_wrap_dim(d, 0);
    return {p.alias(), 0};
  }
  c10::SmallVector<int64_t, 8> phys;
  for (int64_t d : dims) phys.push_back(physicalDim(d, lr, true));
  return {p.squeeze(phys), 0};
}

// squeeze() must keep the batch dim even when the batch size is 1.
std::tuple<Tensor, bdim_t> squeezeAllRule(const Tensor& x, bdim_t bd) {
  Tensor p = moveBdimToFront(x, bd);
  c10::SmallVector<int64_t, 8> phys;
  for (int64_t d = 1; d < p.dim(); ++d)
    if (p.size(d) == 1) phys.push_back(d);
  if (phys.empty()) return {p.alias(), 0};  // still a view of the input, as in torch
  return {p.squeeze(phys), 0};
}

std::tuple<Tensor, bdim_t> expandRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size, bool implicit) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  TORCH_CHECK(static_cast<int64_t>(size.size()) >= lr, "expand: the number of sizes provided (", size.size(),
              ") must be greater or equal to the number of dimensions in the tensor (", lr, ")");
  p = padToLogicalRank(p, true, static_cast<int64_t>(size.size()));
  return {at::_ops::expand::call(p, withBatch(p.sym_size(0), size), implicit), 0};
}

std::tuple<Tensor, bdim_t> selectRule(const Tensor& x, bdim_t bd, int64_t dim, c10::SymInt index) {
  Tensor p = moveBdimToFront(x, bd);
  return {at::_ops::select_int::call(p, physicalDim(dim, p.dim() - 1, true), index), 0};
}

std::tuple<Tensor, bdim_t> sliceRule(const Tensor& x, bdim_t bd, int64_t dim,
                                     std::optional<c10::SymInt> start, std::optional<c10::SymInt> end,
                                     c10::SymInt step) {
  Tensor p = moveBdimToFront(x, bd);
  return {at::_ops::slice_Tensor::call(p, physicalDim(dim, p.dim() - 1, true), start, end, step), 0};
}

std::tuple<Tensor, bdim_t> diagonalRule(const Tensor& x, bdim_t bd, int64_t offset, int64_t d1, int64_t d2) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  return {p.diagonal(offset, physicalDim(d1, lr, true), physicalDim(d2, lr, true)), 0};
}

std::tuple<std::vector<Tensor>, bdim_t> unbindRule(const Tensor& x, bdim_t bd, int64_t dim) {
  Tensor p = moveBdimToFront(x, bd);
  if (p.dim() == 1) {
    raiseForElement([&] { at::_ops::unbind_int::call(exampleOf(p, 0, 0), dim); }, "unbind",
                    "a scalar cannot be unbound");
  }
  return {p.unbind(physicalDim(dim, p.dim() - 1, true)), 0};
}

// One rule for split and unsafe_split (and the _with_sizes pair): `Op` is the op run below. The
// unsafe variants must stay unsafe there: an outer autograd (grad(vmap(f)), or the physical
// graph of a vmapped forward) records the op run below, and its views of a split may not be
// written in place where the unsafe outputs may (GRU/LSTM cells add_ into unsafe_chunk outputs).
template <class Op>
std::tuple<std::vector<Tensor>, bdim_t> splitRule(const Tensor& x, bdim_t bd, c10::SymInt size, int64_t dim) {
  Tensor p = moveBdimToFront(x, bd);
  if (p.dim() == 1) {
    raiseForElement([&] { Op::call(exampleOf(p, 0, 0), size, dim); }, Op::name,
                    "expects at least a 1-dimensional tensor");
  }
  return {Op::call(p, size, physicalDim(dim, p.dim() - 1, true)), 0};
}

template <class Op>
std::tuple<std::vector<Tensor>, bdim_t> splitSizesRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef sizes,
                                                       int64_t dim) {
  Tensor p = moveBdimToFront(x, bd);
  if (p.dim() == 1) {
    raiseForElement([&] { Op::call(exampleOf(p, 0, 0), sizes, dim); }, Op::name,
                    "expects at least a 1-dimensional tensor");
  }
  return {Op::call(p, sizes, physicalDim(dim, p.dim() - 1, true)), 0};
}

std::tuple<Tensor, bdim_t> flipRule(const Tensor& x, bdim_t bd, c10::IntArrayRef dims) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  c10::SmallVector<int64_t, 8> phys;
  for (int64_t d : dims) phys.push_back(physicalDim(d, lr, true));
  return {p.flip(phys), 0};
}

std::tuple<Tensor, bdim_t> rollRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef shifts,
                                    c10::IntArrayRef dims) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  if (dims.empty()) {  // roll over the flattened tensor
    Tensor flat = flattenAfterBatch(p);
    return {at::_ops::roll::call(flat, shifts, {1}).view(p.sizes()), 0};
  }
  c10::SmallVector<int64_t, 8> phys;
  for (int64_t d : dims) phys.push_back(physicalDim(d, lr, true));
  return {at::_ops::roll::call(p, shifts, phys), 0};
}

std::tuple<Tensor, bdim_t> repeatRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef repeats) {
  Tensor p = padToLogicalRank(moveBdimToFront(x, bd), true, static_cast<int64_t>(repeats.size()));
  SymIntVec reps{c10::SymInt(1)};
  reps.append(repeats.begin(), repeats.end());
  return {at::_ops::repeat::call(p, reps), 0};
}

// In-place shape ops change the value's shape; the plumbing refreshes the BatchedTensor after.
// Returns the new batch dim: inserting or removing a dim in front of it moves it.
int64_t unsqueezeInplaceRule(Tensor& x, bdim_t bd, int64_t dim) {
  const int64_t d = c10::maybe_wrap_dim(dim, x.dim());  // logical rank + 1 == physical rank
  if (d <= *bd) {
    x.unsqueeze_(d);
    return *bd + 1;
  }
  x.unsqueeze_(d + 1);
  return *bd;
}
int64_t squeezeDimInplaceRule(Tensor& x, bdim_t bd, int64_t dim) {
  const int64_t lr = x.dim() - 1;
  if (lr == 0) return *bd;
  const int64_t d = c10::maybe_wrap_dim(dim, lr);
  const int64_t pd = d < *bd ? d : d + 1;
  if (x.size(pd) != 1) return *bd;
  x.squeeze_(pd);
  return pd < *bd ? *bd - 1 : *bd;
}
// squeeze_() and squeeze_(dims): remove logical size-1 dims, never the batch dim.
int64_t squeezeDimsInplaceImpl(Tensor& x, int64_t bd, c10::IntArrayRef logical_dims) {
  c10::SmallVector<int64_t, 8> phys;
  for (int64_t d : logical_dims) {
    const int64_t pd = d < bd ? d : d + 1;
    if (x.size(pd) == 1) phys.push_back(pd);
  }
  int64_t new_bd = bd;
  for (int64_t pd : phys) new_bd -= pd < bd ? 1 : 0;
  if (!phys.empty()) x.squeeze_(phys);
  return new_bd;
}
int64_t squeezeAllInplaceRule(Tensor& x, bdim_t bd) {
  c10::SmallVector<int64_t, 8> dims;
  for (int64_t d = 0; d < x.dim() - 1; ++d) dims.push_back(d);
  return squeezeDimsInplaceImpl(x, *bd, dims);
}
int64_t squeezeDimsListInplaceRule(Tensor& x, bdim_t bd, c10::IntArrayRef dims) {
  const int64_t lr = x.dim() - 1;
  if (lr == 0) return *bd;
  c10::SmallVector<int64_t, 8> wrapped;
  for (int64_t d : dims) wrapped.push_back(c10::maybe_wrap_dim(d, lr));
  return squeezeDimsInplaceImpl(x, *bd, wrapped);
}
void tInplaceRule(Tensor& x, bdim_t bd) {
  TORCH_CHECK(x.dim() - 1 <= 2, "t_() expects a tensor with <= 2 dimensions, but self is ", x.dim() - 1, "D");
  if (x.dim() - 1 < 2) return;
  x.transpose_(0 < *bd ? 0 : 1, 1 < *bd ? 1 : 2);
}

void transposeInplaceRule(Tensor& x, bdim_t bd, int64_t d0, int64_t d1) {
  const int64_t lr = x.dim() - 1;
  if (lr == 0) return;
  const int64_t a = c10::maybe_wrap_dim(d0, lr), b = c10::maybe_wrap_dim(d1, lr);
  x.transpose_(a < *bd ? a : a + 1, b < *bd ? b : b + 1);
}

// NOTE [as_strided under vmap]
// Under vmap every batch element is a tensor of its own, and as_strided addresses that element's
// memory: storage_offset is read against element 0 (a BatchedTensor reports element 0's offset as
// its own) and element b's view starts one batch stride further, so one physical view with the
// batch dim's stride prepended serves every element. That is the per-element op only if the view
// stays inside the memory one element occupies: from its storage offset to its last element (the
// gaps between its elements included, as for the same view of a lone tensor). Anything else would
// read (through as_strided_scatter and as_strided_, write) memory that is not the element's, such
// as the elements next to it or whatever precedes the batch in a larger storage, so it is refused.
// Forward AD views batched tangents this way; they are laid out batch-outermost, one element per
// slot (NOTE [Tangent layouts under vmap] in rules_factory.cpp), and their views stay inside.
void checkAsStridedInElement(const Tensor& x, int64_t bd, c10::SymIntArrayRef size_s,
                             c10::SymIntArrayRef stride_s, const std::optional<c10::SymInt>& offset_s,
                             const char* op) {
  const auto size = C10_AS_INTARRAYREF_SLOW(size_s);
  const auto stride = C10_AS_INTARRAYREF_SLOW(stride_s);
  TORCH_CHECK(size.size() == stride.size(), "functorch_lite.vmap: ", op, ": 'size' ", size, " and 'stride' ",
              stride, " must have the same number of entries");
  // A negative stride is the op's own error, raised when the view is taken.
  for (int64_t st : stride)
    if (st < 0) return;
  // An empty view touches no memory.
  for (int64_t sz : size)
    if (sz == 0) return;
  const int64_t first = x.storage_offset();  // element 0's, as the BatchedTensor reports it
  const int64_t offset = offset_s.has_value() ? offset_s->expect_int() : first;
  int64_t view_last = offset;
  for (size_t i = 0; i < size.size(); ++i) view_last += (size[i] - 1) * stride[i];
  bool element_empty = false;
  int64_t element_last = first;
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (d == bd) continue;
    element_empty |= x.size(d) == 0;
    element_last += (x.size(d) - 1) * x.stride(d);
  }
  TORCH_CHECK(!element_empty, "functorch_lite.vmap: ", op,
              ": each batch element is empty, so a view of 'size' ", size,
              " would read memory that belongs to no element");
  TORCH_CHECK(offset >= first, "functorch_lite.vmap: ", op, ": 'storage_offset' ", offset,
              " lies before the memory of each batch element, which starts at storage offset ", first,
              ". Under vmap the offset is that of batch element 0's view (the others are shifted by the "
              "batch stride), and every element's view must stay inside that element's own memory.");
  TORCH_CHECK(view_last <= element_last, "functorch_lite.vmap: ", op, ": the view of 'size' ", size,
              " and 'stride' ", stride, " from storage offset ", offset, " reaches storage position ",
              view_last, ", past the last position of batch element 0 (", element_last,
              "). Under vmap every element's view must stay inside that element's own memory.");
}

SymIntVec withBatchStride(const Tensor& x, int64_t bd, c10::SymIntArrayRef stride) {
  SymIntVec st{x.sym_stride(bd)};
  st.append(stride.begin(), stride.end());
  return st;
}

Tensor asStridedView(const Tensor& x, int64_t bd, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                     const std::optional<c10::SymInt>& offset, const char* op) {
  checkAsStridedInElement(x, bd, size, stride, offset, op);
  return at::_ops::as_strided::call(x, withBatch(x.sym_size(bd), size), withBatchStride(x, bd, stride),
                                    offset);
}

std::tuple<Tensor, bdim_t> asStridedRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size,
                                         c10::SymIntArrayRef stride, std::optional<c10::SymInt> offset) {
  return {asStridedView(x, *bd, size, stride, offset, "as_strided"), 0};
}

std::tuple<Tensor, bdim_t> asStridedCopyRule(const Tensor& x, bdim_t bd, c10::SymIntArrayRef size,
                                             c10::SymIntArrayRef stride, std::optional<c10::SymInt> offset) {
  return {asStridedView(x, *bd, size, stride, offset, "as_strided_copy").clone(at::MemoryFormat::Contiguous),
          0};
}

// The physical value is restrided in place: element b's view starts one batch stride after
// element 0's, as for as_strided.
int64_t asStridedInplaceRule(Tensor& x, bdim_t bd, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                             std::optional<c10::SymInt> offset) {
  checkAsStridedInElement(x, *bd, size, stride, offset, "as_strided_");
  x.as_strided__symint(withBatch(x.sym_size(*bd), size), withBatchStride(x, *bd, stride), std::move(offset));
  return 0;
}

// as_strided_scatter(self, src, ...) is self with the as_strided view of it replaced by src; like
// torch's kernel, the result keeps self's layout and storage offset, and a copy of the memory
// around self's elements (the gaps between them), so that its own views read what self's would.
// Each batch element gets a slot holding a copy of its memory range, element 0's at self's storage
// offset, and the view (NOTE [as_strided under vmap]) is written into all slots at once.
std::tuple<Tensor, bdim_t> asStridedScatterRule(const Tensor& self, bdim_t sbd, const Tensor& src,
                                                bdim_t srcbd, c10::SymIntArrayRef size,
                                                c10::SymIntArrayRef stride,
                                                std::optional<c10::SymInt> offset) {
  // raw storage arithmetic: a number (NOTE [Symbolic batch sizes] in levels.h)
  const int64_t B = batchSizeOf({{&self, sbd}, {&src, srcbd}}).guard_int(__FILE__, __LINE__);
  const Tensor x = sbd ? self : self.unsqueeze(0).expand_symint(withBatch(B, self.sym_sizes()));
  const int64_t bd = sbd ? *sbd : 0;
  checkAsStridedInElement(x, bd, size, stride, offset, "as_strided_scatter");
  const Tensor s = moveBdimToFront(src, srcbd);
  const auto src_sizes = s.sizes().slice(srcbd ? 1 : 0);
  TORCH_CHECK(C10_AS_INTARRAYREF_SLOW(size) == src_sizes,
              "functorch_lite.vmap: as_strided_scatter: 'src' of shape ", src_sizes,
              " does not match the view's 'size' ", size);
  const Tensor elems = moveBdimToFront(x, bd);  // [B, *element sizes], element strides kept
  const auto sizes = elems.sizes().slice(1);
  const auto strides = elems.strides().slice(1);
  const int64_t first = x.storage_offset();
  int64_t slot = elems.numel() == 0 ? 0 : 1;
  for (size_t i = 0; i < sizes.size() && slot; ++i) slot += (sizes[i] - 1) * strides[i];
  Tensor storage = at::empty({first + B * slot}, elems.options());
  storage.as_strided({B, slot}, {slot, 1}, first).copy_(x.as_strided({B, slot}, {x.stride(bd), 1}, first));
  c10::SmallVector<int64_t, 8> out_stride{slot};
  out_stride.append(strides.begin(), strides.end());
  Tensor out = storage.as_strided(elems.sizes(), out_stride, first);
  storage.as_strided_symint(withBatch(B, size), withBatchStride(out, 0, stride), offset.value_or(first))
      .copy_(s);
  return {out, 0};
}

// ---- backward ops of views: scatter the batched gradient into zeros of [B, *input_sizes].
std::tuple<Tensor, bdim_t> selectBackwardRule(const Tensor& g, bdim_t bd, c10::SymIntArrayRef sizes,
                                              int64_t dim, c10::SymInt index) {
  Tensor p = moveBdimToFront(g, bd);
  const int64_t lr = static_cast<int64_t>(sizes.size());
  return {
      at::_ops::select_backward::call(p, withBatch(p.sym_size(0), sizes), physicalDim(dim, lr, true), index),
      0};
}
std::tuple<Tensor, bdim_t> sliceBackwardRule(const Tensor& g, bdim_t bd, c10::SymIntArrayRef sizes,
                                             int64_t dim, c10::SymInt start, c10::SymInt end,
                                             c10::SymInt step) {
  Tensor p = moveBdimToFront(g, bd);
  const int64_t lr = static_cast<int64_t>(sizes.size());
  return {at::_ops::slice_backward::call(p, withBatch(p.sym_size(0), sizes), physicalDim(dim, lr, true),
                                         start, end, step),
          0};
}
std::tuple<Tensor, bdim_t> diagonalBackwardRule(const Tensor& g, bdim_t bd, c10::SymIntArrayRef sizes,
                                                int64_t offset, int64_t d1, int64_t d2) {
  Tensor p = moveBdimToFront(g, bd);
  const int64_t lr = static_cast<int64_t>(sizes.size());
  return {at::_ops::diagonal_backward::call(p, withBatch(p.sym_size(0), sizes), offset,
                                            physicalDim(d1, lr, true), physicalDim(d2, lr, true)),
          0};
}

std::tuple<Tensor, bdim_t> identityRule(const Tensor& x, bdim_t bd) {
  return {x, bd};
}

// narrow is composite (it becomes slice); this rule only serves narrow_copy below.
std::tuple<Tensor, bdim_t> narrowRule(const Tensor& x, bdim_t bd, int64_t dim, c10::SymInt start,
                                      c10::SymInt length) {
  Tensor p = moveBdimToFront(x, bd);
  if (p.dim() == 1 || dim >= p.dim() - 1 || dim < -(p.dim() - 1)) {
    raiseForElement([&] { at::_ops::narrow_copy::call(exampleOf(p, 0, 0), dim, start, length); }, "narrow",
                    "dim out of range for the input");
  }
  return {at::_ops::narrow::call(p, physicalDim(dim, p.dim() - 1, true), start, length), 0};
}

// unfold of a logical scalar gives one window of size 1: shape [1], not [1, 1].
std::tuple<Tensor, bdim_t> unfoldRule(const Tensor& x, bdim_t bd, int64_t dim, int64_t size, int64_t step) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  const int64_t pd = physicalDim(dim, lr, true);
  if (lr == 0) return {p.unsqueeze(-1).unfold(1, size, step).squeeze(1), 0};
  return {p.unfold(pd, size, step), 0};
}
std::tuple<Tensor, bdim_t> unfoldBackwardRule(const Tensor& g, bdim_t bd, c10::SymIntArrayRef sizes,
                                              int64_t dim, int64_t size, int64_t step) {
  Tensor p = moveBdimToFront(g, bd);
  const int64_t lr = static_cast<int64_t>(sizes.size());
  if (lr == 0) {
    const SymIntVec one{c10::SymInt(p.size(0)), c10::SymInt(1)};
    return {at::_ops::unfold_backward::call(p.unsqueeze(1), one, 1, size, step).squeeze(1), 0};
  }
  return {at::_ops::unfold_backward::call(p, withBatch(p.sym_size(0), sizes), physicalDim(dim, lr, true),
                                          size, step),
          0};
}

// diag_embed's dims index its output, one rank above the input.
std::tuple<Tensor, bdim_t> diagEmbedRule(const Tensor& x, bdim_t bd, int64_t offset, int64_t d1, int64_t d2) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t out_rank = p.dim();
  return {
      at::_ops::diag_embed::call(p, offset, physicalDim(d1, out_rank, true), physicalDim(d2, out_rank, true)),
      0};
}

std::tuple<Tensor, bdim_t> rot90Rule(const Tensor& x, bdim_t bd, int64_t k, c10::IntArrayRef dims) {
  Tensor p = moveBdimToFront(x, bd);
  const int64_t lr = p.dim() - 1;
  TORCH_CHECK(dims.size() == 2, "expected total rotation dims == 2, but got dims = ", dims.size());
  TORCH_CHECK(lr >= 2, "expected total dims >= 2, but got total dims = ", lr);
  const int64_t phys[] = {physicalDim(dims[0], lr, true), physicalDim(dims[1], lr, true)};
  return {at::_ops::rot90::call(p, k, phys), 0};
}

// ---- *_scatter: the result is a new batched self with src written into one of its views, so
// both are brought to [B, ...] (the op clones self itself) and the view's dims shift by one.
std::tuple<Tensor, Tensor> scatterOperands(const Tensor& self, bdim_t sbd, const Tensor& src, bdim_t cbd) {
  const c10::SymInt B = batchSizeOf({{&self, sbd}, {&src, cbd}});
  return {materializeBdimFront(self, sbd, B), materializeBdimFront(src, cbd, B)};
}
std::tuple<Tensor, bdim_t> sliceScatterRule(const Tensor& self, bdim_t sbd, const Tensor& src, bdim_t cbd,
                                            int64_t dim, std::optional<c10::SymInt> start,
                                            std::optional<c10::SymInt> end, c10::SymInt step) {
  auto [s, c] = scatterOperands(self, sbd, src, cbd);
  return {at::_ops::slice_scatter::call(s, c, physicalDim(dim, s.dim() - 1, true), start, end, step), 0};
}
std::tuple<Tensor, bdim_t> selectScatterRule(const Tensor& self, bdim_t sbd, const Tensor& src, bdim_t cbd,
                                             int64_t dim, c10::SymInt index) {
  auto [s, c] = scatterOperands(self, sbd, src, cbd);
  return {at::_ops::select_scatter::call(s, c, physicalDim(dim, s.dim() - 1, true), index), 0};
}
std::tuple<Tensor, bdim_t> diagonalScatterRule(const Tensor& self, bdim_t sbd, const Tensor& src, bdim_t cbd,
                                               int64_t offset, int64_t d1, int64_t d2) {
  auto [s, c] = scatterOperands(self, sbd, src, cbd);
  const int64_t lr = s.dim() - 1;
  return {
      at::_ops::diagonal_scatter::call(s, c, offset, physicalDim(d1, lr, true), physicalDim(d2, lr, true)),
      0};
}

// ---- complex views. view_as_real appends a dim, so the batch dim keeps its index.
std::tuple<Tensor, bdim_t> viewAsRealRule(const Tensor& x, bdim_t bd) {
  return {at::_ops::view_as_real::call(x), bd};
}
// view_as_complex consumes the physical last dim (size 2, stride 1), which must be the logical
// last dim: a trailing batch dim goes to the front first.
std::tuple<Tensor, bdim_t> viewAsComplexRule(const Tensor& x, bdim_t bd) {
  TORCH_CHECK(x.dim() > 1, "Input tensor must have one or more dimensions");
  if (*bd != x.dim() - 1) return {at::_ops::view_as_complex::call(x), bd};
  return {at::_ops::view_as_complex::call(moveBdimToFront(x, bd)), 0};
}

// ---- channel/pixel shuffles. channel_shuffle's channels are dim 1 of (N, C, *): the batch dim
// folds into N. pixel_(un)shuffle take any number of leading dims, so the batch dim in front is
// one more; only their rank check has to see the logical rank.
std::tuple<Tensor, bdim_t> channelShuffleRule(const Tensor& x, bdim_t bd, c10::SymInt groups) {
  Tensor p = moveBdimToFront(x, bd);
  TORCH_CHECK(p.dim() > 3, "channel_shuffle expects input with > 2 dims, but got input with sizes ",
              p.sizes().slice(1));
  Tensor r = at::_ops::channel_shuffle::call(p.flatten(0, 1), groups);
  return {r.unflatten(0, {p.size(0), p.size(1)}), 0};
}
template <class Op>
struct PixelShuffleLike {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& x, bdim_t bd, int64_t factor) {
    Tensor p = moveBdimToFront(x, bd);
    TORCH_CHECK(p.dim() > 3, std::string(Op::name).substr(6),
                " expects input to have at least 3 "
                "dimensions, but got input with ",
                p.dim() - 1, " dimension(s)");
    return {Op::call(p, factor), 0};
  }
};

// ---- *_copy ops: the view rule, then a copy with the batch dim in front so that every element
// comes out contiguous, as the op's own result does. One CopyOf<op, view rule> per op.
Tensor contiguousCopy(const Tensor& t, bdim_t bd) {
  return moveBdimToFront(t, bd).clone(at::MemoryFormat::Contiguous);
}
template <auto ViewRule, class Sig = decltype(ViewRule)>
struct Copied;
template <auto ViewRule, class R, class... A>
struct Copied<ViewRule, R (*)(A...)> {
  static R rule(A... a) {
    auto [v, bd] = ViewRule(a...);
    if constexpr (std::is_same_v<decltype(v), std::vector<Tensor>>) {
      for (Tensor& t : v) t = contiguousCopy(t, bd);
    } else {
      v = contiguousCopy(v, bd);
    }
    return {std::move(v), bd ? bdim_t(0) : bd};
  }
};
template <class Op, auto ViewRule>
struct CopyOf {
  static void registerIn(torch::Library& m) { registerVmapRule<Op, &Copied<ViewRule>::rule>(m); }
};
template <class... Copies>
void registerCopies(torch::Library& m) {
  (Copies::registerIn(m), ...);
}

// ---- cat / stack take a list of tensors, so they get their own plumbing.
Tensor catKernel(c10::DispatchKeySet ks, const at::ITensorListRef& tensors, int64_t dim) {
  std::optional<Tensor> done;
  const Level* top =
      detail::vmapPrologue<at::_ops::cat, Tensor, const at::ITensorListRef&, int64_t>(done, ks, tensors, dim);
  if (!top) return std::move(*done);
  const c10::SymInt& B = top->batch_size;
  std::vector<std::pair<Tensor, bdim_t>> all;
  HandDownGuard guard;
  for (const Tensor& t : tensors) all.push_back(unwrapAt(t, top->id));
  // torch.cat skips legacy empty tensors (1-d, size 0) next to others, batched or not (one
  // example's (0,) beside its (4, 5)); they still take part in the dtype promotion
  auto legacyEmpty = [](const Tensor& v, bdim_t bd) {
    return rankWithoutBdim(v, bd) == 1 && v.size(bd ? 1 - *bd : 0) == 0;
  };
  bool any_other = false;
  c10::ScalarType dtype = all.empty() ? c10::ScalarType::Float : all.front().first.scalar_type();
  for (const auto& [v, bd] : all) {
    any_other = any_other || !legacyEmpty(v, bd);
    dtype = c10::promoteTypes(dtype, v.scalar_type());
  }
  std::vector<Tensor> phys;
  int64_t lr = -1;
  for (const auto& [v, bd] : all) {
    if (any_other && legacyEmpty(v, bd)) continue;
    if (lr < 0) lr = rankWithoutBdim(v, bd);
    phys.push_back(materializeBdimFront(v, bd, B));
  }
  TORCH_CHECK(lr > 0, "torch.cat(): zero-dimensional tensor cannot be concatenated");
  Tensor out = at::_ops::cat::call(phys, physicalDim(dim, lr, true));
  return makeBatched(out.scalar_type() == dtype ? out : out.to(dtype), 0, *top);
}

Tensor stackKernel(c10::DispatchKeySet ks, at::TensorList tensors, int64_t dim) {
  std::optional<Tensor> done;
  const Level* top =
      detail::vmapPrologue<at::_ops::stack, Tensor, at::TensorList, int64_t>(done, ks, tensors, dim);
  if (!top) return std::move(*done);
  const c10::SymInt& B = top->batch_size;
  std::vector<Tensor> phys;
  phys.reserve(tensors.size());
  HandDownGuard guard;
  for (const Tensor& t : tensors) {
    auto [v, bd] = unwrapAt(t, top->id);
    phys.push_back(materializeBdimFront(v, bd, B));
  }
  const int64_t lr = phys.front().dim() - 1;
  return makeBatched(at::_ops::stack::call(phys, c10::maybe_wrap_dim(dim, lr + 1) + 1), 0, *top);
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  registerVmapRule<at::_ops::view, &viewRule>(m);
  registerVmapRule<at::_ops::_unsafe_view, &unsafeViewRule>(m);
  registerVmapRule<at::_ops::reshape, &reshapeRule>(m);
  registerVmapRule<at::_ops::_reshape_alias, &reshapeAliasRule>(m);
  registerVmapRule<at::_ops::clone, &cloneRule>(m);
  registerVmapRule<at::_ops::permute, &permuteRule>(m);
  registerVmapRule<at::_ops::transpose_int, &transposeRule>(m);
  registerVmapRule<at::_ops::t, &tRule>(m);
  registerVmapRule<at::_ops::unsqueeze, &unsqueezeRule>(m);
  registerVmapRule<at::_ops::squeeze_dim, &squeezeDimRule>(m);
  registerVmapRule<at::_ops::squeeze_dims, &squeezeDimsRule>(m);
  registerVmapRule<at::_ops::squeeze, &squeezeAllRule>(m);
  registerVmapRule<at::_ops::expand, &expandRule>(m);
  registerVmapRule<at::_ops::select_int, &selectRule>(m);
  registerVmapRule<at::_ops::slice_Tensor, &sliceRule>(m);
  registerVmapRule<at::_ops::diagonal, &diagonalRule>(m);
  registerVmapRule<at::_ops::unbind_int, &unbindRule>(m);
  registerVmapRule<at::_ops::split_Tensor, &splitRule<at::_ops::split_Tensor>>(m);
  registerVmapRule<at::_ops::split_with_sizes, &splitSizesRule<at::_ops::split_with_sizes>>(m);
  registerVmapRule<at::_ops::unsafe_split_Tensor, &splitRule<at::_ops::unsafe_split_Tensor>>(m);
  registerVmapRule<at::_ops::unsafe_split_with_sizes, &splitSizesRule<at::_ops::unsafe_split_with_sizes>>(m);
  registerVmapRule<at::_ops::flip, &flipRule>(m);
  registerVmapRule<at::_ops::roll, &rollRule>(m);
  registerVmapRule<at::_ops::repeat, &repeatRule>(m);
  registerVmapInplaceRule<at::_ops::unsqueeze_, &unsqueezeInplaceRule>(m);
  registerVmapInplaceRule<at::_ops::squeeze__dim, &squeezeDimInplaceRule>(m);
  registerVmapInplaceRule<at::_ops::transpose_, &transposeInplaceRule>(m);
  registerVmapInplaceRule<at::_ops::squeeze_, &squeezeAllInplaceRule>(m);
  registerVmapInplaceRule<at::_ops::squeeze__dims, &squeezeDimsListInplaceRule>(m);
  registerVmapInplaceRule<at::_ops::t_, &tInplaceRule>(m);
  registerVmapRule<at::_ops::as_strided, &asStridedRule>(m);
  registerVmapRule<at::_ops::as_strided_copy, &asStridedCopyRule>(m);
  registerVmapInplaceRule<at::_ops::as_strided_, &asStridedInplaceRule>(m);
  registerVmapRule<at::_ops::as_strided_scatter, &asStridedScatterRule>(m);
  registerVmapRule<at::_ops::select_backward, &selectBackwardRule>(m);
  registerVmapRule<at::_ops::slice_backward, &sliceBackwardRule>(m);
  registerVmapRule<at::_ops::diagonal_backward, &diagonalBackwardRule>(m);
  registerVmapRule<at::_ops::unfold, &unfoldRule>(m);
  registerVmapRule<at::_ops::unfold_backward, &unfoldBackwardRule>(m);
  registerVmapRule<at::_ops::diag_embed, &diagEmbedRule>(m);
  registerVmapRule<at::_ops::rot90, &rot90Rule>(m);
  registerVmapRule<at::_ops::slice_scatter, &sliceScatterRule>(m);
  registerVmapRule<at::_ops::select_scatter, &selectScatterRule>(m);
  registerVmapRule<at::_ops::diagonal_scatter, &diagonalScatterRule>(m);
  registerVmapRule<at::_ops::view_as_real, &viewAsRealRule>(m);
  registerVmapRule<at::_ops::view_as_complex, &viewAsComplexRule>(m);
  registerVmapRule<at::_ops::channel_shuffle, &channelShuffleRule>(m);
  // clang-format off
  registerFamily<PixelShuffleLike,
      at::_ops::pixel_shuffle,
      at::_ops::pixel_unshuffle>(m);
  // clang-format on
  // view_copy is reshape-then-copy when the element cannot be viewed (torch does the same).
  registerCopies<
      CopyOf<at::_ops::view_copy, &reshapeRule>, CopyOf<at::_ops::unsqueeze_copy, &unsqueezeRule>,
      CopyOf<at::_ops::squeeze_copy, &squeezeAllRule>, CopyOf<at::_ops::squeeze_copy_dim, &squeezeDimRule>,
      CopyOf<at::_ops::squeeze_copy_dims, &squeezeDimsRule>,
      CopyOf<at::_ops::transpose_copy_int, &transposeRule>, CopyOf<at::_ops::t_copy, &tRule>,
      CopyOf<at::_ops::permute_copy, &permuteRule>, CopyOf<at::_ops::expand_copy, &expandRule>,
      CopyOf<at::_ops::alias_copy, &identityRule>, CopyOf<at::_ops::detach_copy, &identityRule>,
      CopyOf<at::_ops::narrow_copy, &narrowRule>, CopyOf<at::_ops::unbind_copy_int, &unbindRule>,
      CopyOf<at::_ops::split_copy_Tensor, &splitRule<at::_ops::split_Tensor>>,
      CopyOf<at::_ops::split_with_sizes_copy, &splitSizesRule<at::_ops::split_with_sizes>>,
      CopyOf<at::_ops::unfold_copy, &unfoldRule>, CopyOf<at::_ops::diagonal_copy, &diagonalRule>,
      CopyOf<at::_ops::select_copy_int, &selectRule>, CopyOf<at::_ops::slice_copy_Tensor, &sliceRule>>(m);
  m.impl("cat", TORCH_FN(catKernel));
  m.impl("stack", TORCH_FN(stackKernel));
}

}  // namespace ftl
