// Batching rules: indexing ops. Embedding and its backward; advanced indexing (index, index_put
// and the ops built on it: index_select, index_add, index_copy, index_fill, masked_select with an
// unbatched mask); gather and the scatter family.
#include <ATen/ExpandUtils.h>
#include <ATen/Functions.h>
#include <ATen/Operators.h>
#include <ATen/WrapDimUtils.h>

#include <numeric>

#include "vmap/plumbing.h"

namespace ftl {
namespace {

// These rules count in numbers: a symbolic batch size is specialized here (guard_int), which
// recompiles per batch size (NOTE [Symbolic batch sizes] in levels.h).

// ---- embedding
// A batched table [B, V, D] is looked up as one flat table [B*V, D] with each element's indices
// shifted by b*V, which also gives per-element gradients from one embedding_dense_backward.

// indices [B, ...] + b*V, so that element b addresses rows [b*V, (b+1)*V) of a flat table.
Tensor offsetIndices(const Tensor& idx, int64_t V) {
  const int64_t B = idx.size(0);
  c10::SmallVector<int64_t, 6> shape(idx.dim(), 1);
  shape[0] = B;
  return idx.add(at::arange(B, idx.options()).mul(V).view(shape));
}

std::tuple<Tensor, bdim_t> embeddingRule(const Tensor& weight, bdim_t wbd, const Tensor& indices, bdim_t ibd,
                                         c10::SymInt padding_idx, bool scale_grad_by_freq, bool sparse) {
  if (!wbd) {
    return {at::embedding_symint(weight, indices, padding_idx, scale_grad_by_freq, sparse), ibd};
  }
  Tensor w = moveBdimToFront(weight, wbd);  // [B, V, D]
  const int64_t B = w.size(0), V = w.size(1);
  Tensor idx = offsetIndices(materializeBdimFront(indices, ibd, B), V);
  return {at::embedding(w.reshape({B * V, w.size(2)}), idx, -1, scale_grad_by_freq, sparse), 0};
}

std::tuple<Tensor, bdim_t> embeddingDenseBackwardRule(const Tensor& grad, bdim_t gbd, const Tensor& indices,
                                                      bdim_t ibd, c10::SymInt num_weights,
                                                      c10::SymInt padding_idx, bool scale_grad_by_freq) {
  const int64_t B = batchSizeOf({{&grad, gbd}, {&indices, ibd}}).guard_int(__FILE__, __LINE__);
  const int64_t V = num_weights.expect_int();
  Tensor g = materializeBdimFront(grad, gbd, B);       // [B, ..., D]
  Tensor idx = materializeBdimFront(indices, ibd, B);  // [B, ...]
  const int64_t pad = padding_idx.expect_int();
  if (pad >= 0) g = g.mul(idx.ne(pad).unsqueeze(-1).to(g.scalar_type()));
  Tensor flat = at::embedding_dense_backward(g, offsetIndices(idx, V), B * V, -1, scale_grad_by_freq);
  return {flat.view({B, V, flat.size(1)}), 0};
}

// ---- advanced indexing
// NOTE [Batched advanced indexing]
// Every case is brought to one layout: self with the batch dim first and the logically indexed
// dims right after it (a permuted view, so in-place writes land in the original), and an index
// list that starts with arange(B), so each batch element reads and writes only its own slice.
// The indices are then adjacent and leading, and the physical result is
// [B, broadcast of the logical index shapes (rank r), the other dims in order]. torch puts the
// broadcast dims first when the indexed dims are not adjacent, and where the first indexed dim
// was (k) when they are; only "adjacent at k > 0" differs from our layout, by one movedim.
using IndexList = std::vector<std::optional<Tensor>>;
using BdimList = std::vector<bdim_t>;

struct IndexPlan {
  Tensor self;  // [B, indexed dims..., other dims...]
  c10::List<std::optional<Tensor>> indices;
  int64_t r = 0;                     // rank of the broadcast logical index shape
  int64_t k = 0;                     // where torch puts the broadcast dims in the logical result
  std::vector<int64_t> index_shape;  // the broadcast logical index shape
  std::vector<int64_t> perm;         // self = materialized self.permute(perm)
};

int64_t batchSizeOfIndexing(const Tensor& self, bdim_t sbd, const IndexList& idx, const BdimList& ibd) {
  if (sbd) return self.size(*sbd);
  for (size_t i = 0; i < idx.size(); ++i)
    if (ibd[i]) return idx[i]->size(*ibd[i]);
  TORCH_INTERNAL_ASSERT(false, "indexing rule called with nothing batched");
}

IndexPlan planIndex(const Tensor& self, bdim_t sbd, const IndexList& idx, const BdimList& ibd, int64_t B,
                    const char* op) {
  Tensor s = materializeBdimFront(self, sbd, B);
  const int64_t L = s.dim() - 1;
  struct Item {
    int64_t pos;
    Tensor t;
    bdim_t bd;
  };
  std::vector<Item> items;
  int64_t pos = 0;
  for (size_t i = 0; i < idx.size(); ++i) {
    if (!idx[i].has_value() || !idx[i]->defined()) {
      ++pos;
      continue;
    }
    const Tensor& t = *idx[i];
    if (t.scalar_type() == at::kBool || t.scalar_type() == at::kByte) {
      TORCH_CHECK(!ibd[i], "functorch_lite.vmap: ", op,
                  " with a boolean mask that differs per "
                  "batch element: the result's shape would depend on the data of each element, "
                  "which vmap cannot batch. Use torch.where(mask, x, other), or multiply by the "
                  "mask, instead.");
      // An unbatched mask is the same for every element: its nonzero() positions are ordinary
      // integer indices into the dims it covers (exactly what torch does with a mask).
      Tensor nz = t.nonzero();
      for (int64_t j = 0; j < t.dim(); ++j) items.push_back({pos + j, nz.select(1, j), {}});
      pos += t.dim();
    } else {
      items.push_back({pos, t, ibd[i]});
      ++pos;
    }
  }
  // torch's IndexError and message (for one element's dims, which is what the user indexes)
  TORCH_CHECK_INDEX(pos <= L, "too many indices for tensor of dimension ", L, " (got ", pos, ")");

  IndexPlan plan;
  bool adjacent = true;
  for (size_t j = 1; j < items.size(); ++j) adjacent &= items[j].pos == items[j - 1].pos + 1;
  plan.k = adjacent && !items.empty() ? items.front().pos : 0;

  std::vector<int64_t> perm{0};
  std::vector<bool> indexed(L, false);
  for (const auto& it : items) {
    perm.push_back(it.pos + 1);
    indexed[it.pos] = true;
  }
  for (int64_t d = 0; d < L; ++d)
    if (!indexed[d]) perm.push_back(d + 1);
  plan.self = s.permute(perm);
  plan.perm = std::move(perm);

  for (size_t j = 0; j < items.size(); ++j) {
    auto sizes = items[j].t.sizes().vec();
    if (items[j].bd) sizes.erase(sizes.begin() + *items[j].bd);
    plan.r = std::max<int64_t>(plan.r, sizes.size());
    plan.index_shape = j == 0 ? sizes : at::infer_size(plan.index_shape, sizes);
  }
  std::vector<int64_t> ar_shape(plan.r + 1, 1);
  ar_shape[0] = B;
  plan.indices.push_back(
      at::arange(B, at::TensorOptions().dtype(at::kLong).device(s.device())).view(ar_shape));
  for (const auto& it : items) {
    plan.indices.push_back(it.bd ? padToLogicalRank(moveBdimToFront(it.t, it.bd), true, plan.r) : it.t);
  }
  return plan;
}

std::vector<int64_t> iota(int64_t from, int64_t n) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), from);
  return v;
}

// From our layout [B, index dims, others] to torch's (NOTE [Batched advanced indexing]).
Tensor toTorchLayout(const Tensor& out, const IndexPlan& p) {
  if (p.k == 0 || p.r == 0) return out;
  return out.movedim(iota(1, p.r), iota(1 + p.k, p.r));
}

std::tuple<Tensor, bdim_t> indexRule(const Tensor& self, bdim_t sbd, const IndexList& idx,
                                     const BdimList& ibd) {
  const int64_t B = batchSizeOfIndexing(self, sbd, idx, ibd);
  IndexPlan p = planIndex(self, sbd, idx, ibd, B, "aten::index");
  return {toTorchLayout(at::_ops::index_Tensor::call(p.self, p.indices), p), 0};
}

// NOTE [Out-of-place index writes]
// `values` may be batched at outer levels where self is not: torch's formulas write a tangent or a
// gradient into fresh zeros (index_put's forward-AD formula, index_select's backward), and under
// vmap(jacfwd) or vmap(hessian) that value carries the outer vmap's batch dim too. A rule for an
// out-of-place op must therefore call the out-of-place op on the level below, whose own rule
// batches self there; writing in place into a fresh copy of self would be refused below as an
// in-place write of batched values into an unbatched tensor.

// self[indices] = values (or +=) on the [B, ...] tensor `s`, `values` logically broadcastable to
// self[indices]. In place it writes into s and returns it; otherwise returns a new [B, ...] tensor.
template <class Op = at::_ops::index_put>
Tensor indexPutPhysical(const Tensor& s, const IndexList& idx, const BdimList& ibd, const Tensor& values,
                        bdim_t vbd, bool accumulate, bool inplace, const char* op) {
  const int64_t B = s.size(0);
  IndexPlan p = planIndex(s, 0, idx, ibd, B, op);
  // The logical shape of self[indices], in torch's order.
  const int64_t m = static_cast<int64_t>(p.indices.size()) - 1;
  auto others = p.self.sizes().slice(1 + m).vec();
  std::vector<int64_t> full(others.begin(), others.begin() + p.k);
  full.insert(full.end(), p.index_shape.begin(), p.index_shape.end());
  full.insert(full.end(), others.begin() + p.k, others.end());
  const int64_t rank = static_cast<int64_t>(full.size());

  Tensor v;
  if (vbd) {
    v = padToLogicalRank(moveBdimToFront(values, vbd), true, rank);
    if (p.k > 0 && p.r > 0) {
      std::vector<int64_t> bfull{B};
      bfull.insert(bfull.end(), full.begin(), full.end());
      v = v.expand(bfull).movedim(iota(1 + p.k, p.r), iota(1, p.r));
    }
  } else {
    v = values;
    if (p.k > 0 && p.r > 0) v = v.expand(full).movedim(iota(p.k, p.r), iota(0, p.r));
  }
  if (inplace) {
    at::_ops::index_put_::call(p.self, p.indices, v, accumulate);
    return s;
  }
  std::vector<int64_t> inverse(p.perm.size());
  for (size_t d = 0; d < p.perm.size(); ++d) inverse[p.perm[d]] = static_cast<int64_t>(d);
  return Op::call(p.self, p.indices, v, accumulate).permute(inverse);
}

template <class Op>
std::tuple<Tensor, bdim_t> indexPutRule(const Tensor& self, bdim_t sbd, const IndexList& idx,
                                        const BdimList& ibd, const Tensor& values, bdim_t vbd,
                                        bool accumulate) {
  const int64_t B = sbd || !vbd ? batchSizeOfIndexing(self, sbd, idx, ibd) : values.size(*vbd);
  Tensor s = materializeBdimFront(self, sbd, B);
  return {indexPutPhysical<Op>(s, idx, ibd, values, vbd, accumulate, false, Op::name), 0};
}

void indexPutInplaceRule(Tensor& self, bdim_t sbd, const IndexList& idx, const BdimList& ibd,
                         const Tensor& values, bdim_t vbd, bool accumulate) {
  indexPutPhysical(moveBdimToFront(self, sbd), idx, ibd, values, vbd, accumulate, true, "aten::index_put_");
}

void indexPutImplInplaceRule(Tensor& self, bdim_t sbd, const IndexList& idx, const BdimList& ibd,
                             const Tensor& values, bdim_t vbd, bool accumulate, bool /*unsafe*/) {
  indexPutInplaceRule(self, sbd, idx, ibd, values, vbd, accumulate);
}

// ---- index_select / index_add / index_copy / index_fill: advanced indexing along one dim.
// x.index_select(d, i) is x[(:,)*d, i] for a 1-d i; a 0-d i selects a size-1 dim.
std::pair<IndexList, BdimList> alongDim(int64_t dim, int64_t logical_rank, const Tensor& index, bdim_t ibd) {
  const int64_t d = c10::maybe_wrap_dim(dim, std::max<int64_t>(logical_rank, 1));
  Tensor i = index;
  if (index.dim() - (ibd ? 1 : 0) == 0) i = ibd ? index.unsqueeze(-1) : index.view({1});
  IndexList idx(d);
  BdimList bds(d);
  idx.emplace_back(i);
  bds.push_back(ibd);
  return {idx, bds};
}

std::tuple<Tensor, bdim_t> indexSelectRule(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                           bdim_t ibd) {
  const int64_t rank = rankWithoutBdim(self, sbd);
  if (rank == 0) {
    // torch treats a 0-d self as one element along dim 0 and returns a 0-d result.
    const int64_t B = batchSizeOf({{&self, sbd}, {&index, ibd}}).guard_int(__FILE__, __LINE__);
    auto [out, obd] = indexSelectRule(materializeBdimFront(self, sbd, B).unsqueeze(1), 0, dim, index, ibd);
    return {out.squeeze(1), 0};
  }
  if (!ibd) {
    Tensor s = moveBdimToFront(self, sbd);
    return {at::_ops::index_select::call(s, physicalDim(dim, rank, true), index), 0};
  }
  auto [idx, bds] = alongDim(dim, rank, index, ibd);
  return indexRule(self, sbd, idx, bds);
}

// self[(:,)*d, index] op= source on the [B, ...] tensor s: in place, or into a new tensor
// (NOTE [Out-of-place index writes]).
Tensor indexAlongDimPhysical(const Tensor& s, int64_t dim, const Tensor& index, bdim_t ibd,
                             const Tensor& source, bdim_t srcbd, bool accumulate, bool inplace,
                             const char* op) {
  if (s.dim() == 1) {
    // A 0-d self is one element along dim 0: write through a [B, 1] view.
    Tensor src = moveBdimToFront(source, srcbd);
    if (rankWithoutBdim(source, srcbd) == 0) src = srcbd ? src.unsqueeze(1) : src.view({1});
    Tensor out = indexAlongDimPhysical(s.unsqueeze(1), dim, index, ibd, src, srcbd ? bdim_t(0) : std::nullopt,
                                       accumulate, inplace, op);
    return inplace ? s : out.squeeze(1);
  }
  auto [idx, bds] = alongDim(dim, s.dim() - 1, index, ibd);
  return indexPutPhysical(s, idx, bds, source, srcbd, accumulate, inplace, op);
}

std::tuple<Tensor, bdim_t> alongDimIntoCopy(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                            bdim_t ibd, const Tensor& source, bdim_t srcbd, bool accumulate,
                                            const char* op) {
  const int64_t B =
      batchSizeOf({{&self, sbd}, {&index, ibd}, {&source, srcbd}}).guard_int(__FILE__, __LINE__);
  Tensor s = materializeBdimFront(self, sbd, B);
  return {indexAlongDimPhysical(s, dim, index, ibd, source, srcbd, accumulate, false, op), 0};
}

Tensor scaled(const Tensor& source, const c10::Scalar& alpha) {
  return alpha.equal(1) ? source : source.mul(alpha);
}

// index_add/index_copy want source to match self outside `dim` (scalars aside); the batched
// write would broadcast instead. Other shapes run per element (torch's result or error).
bool alongDimShapesMatch(const Tensor& self, bdim_t sbd, const Tensor& source, bdim_t srcbd, int64_t dim) {
  Tensor s = sbd ? exampleOf(self, *sbd, 0) : self, src = srcbd ? exampleOf(source, *srcbd, 0) : source;
  if (s.dim() != src.dim()) return false;
  if (s.dim() == 0) return true;
  const int64_t d = c10::maybe_wrap_dim(dim, s.dim());
  for (int64_t k = 0; k < s.dim(); ++k)
    if (k != d && s.size(k) != src.size(k)) return false;
  return true;
}

template <class F>
std::tuple<Tensor, bdim_t> perElement(int64_t B, F&& call) {
  std::vector<Tensor> rows;
  for (int64_t i = 0; i < B; ++i) rows.push_back(call(i));
  return {stackRows(rows, B > 0 ? rows[0] : call(0)), 0};
}

Tensor elementOf(const Tensor& t, bdim_t bd, int64_t i) {
  return bd ? exampleOf(t, *bd, i) : t;
}

std::tuple<Tensor, bdim_t> indexAddRule(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                        bdim_t ibd, const Tensor& source, bdim_t srcbd,
                                        const c10::Scalar& alpha) {
  if (!alongDimShapesMatch(self, sbd, source, srcbd, dim)) {
    return perElement(
        batchSizeOf({{&self, sbd}, {&index, ibd}, {&source, srcbd}}).guard_int(__FILE__, __LINE__),
        [&](int64_t i) {
          return at::_ops::index_add::call(elementOf(self, sbd, i), dim, elementOf(index, ibd, i),
                                           elementOf(source, srcbd, i), alpha);
        });
  }
  return alongDimIntoCopy(self, sbd, dim, index, ibd, scaled(source, alpha), srcbd, true, "aten::index_add");
}

void indexAddInplaceRule(Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index, bdim_t ibd,
                         const Tensor& source, bdim_t srcbd, const c10::Scalar& alpha) {
  indexAlongDimPhysical(moveBdimToFront(self, sbd), dim, index, ibd, scaled(source, alpha), srcbd, true, true,
                        "aten::index_add_");
}

std::tuple<Tensor, bdim_t> indexCopyRule(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                         bdim_t ibd, const Tensor& source, bdim_t srcbd) {
  if (!alongDimShapesMatch(self, sbd, source, srcbd, dim)) {
    return perElement(
        batchSizeOf({{&self, sbd}, {&index, ibd}, {&source, srcbd}}).guard_int(__FILE__, __LINE__),
        [&](int64_t i) {
          return at::_ops::index_copy::call(elementOf(self, sbd, i), dim, elementOf(index, ibd, i),
                                            elementOf(source, srcbd, i));
        });
  }
  return alongDimIntoCopy(self, sbd, dim, index, ibd, source, srcbd, false, "aten::index_copy");
}

void indexCopyInplaceRule(Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index, bdim_t ibd,
                          const Tensor& source, bdim_t srcbd) {
  indexAlongDimPhysical(moveBdimToFront(self, sbd), dim, index, ibd, source, srcbd, false, true,
                        "aten::index_copy_");
}

std::tuple<Tensor, bdim_t> indexFillTensorRule(const Tensor& self, bdim_t sbd, int64_t dim,
                                               const Tensor& index, bdim_t ibd, const Tensor& value,
                                               bdim_t vbd) {
  return alongDimIntoCopy(self, sbd, dim, index, ibd, value.to(self.scalar_type()), vbd, false,
                          "aten::index_fill");
}

std::tuple<Tensor, bdim_t> indexFillScalarRule(const Tensor& self, bdim_t sbd, int64_t dim,
                                               const Tensor& index, bdim_t ibd, const c10::Scalar& value) {
  return alongDimIntoCopy(self, sbd, dim, index, ibd, at::scalar_tensor(value, self.options()), std::nullopt,
                          false, "aten::index_fill");
}

// masked_select with one mask for the whole batch selects the same positions of every element.
std::tuple<Tensor, bdim_t> maskedSelectRule(const Tensor& self, bdim_t sbd, const Tensor& mask, bdim_t mbd) {
  TORCH_CHECK(!mbd,
              "functorch_lite.vmap: aten::masked_select with a mask that differs per batch "
              "element returns a result whose shape depends on the data of each element, which "
              "vmap cannot batch. Use torch.where(mask, x, 0), or multiply by the mask, instead.");
  Tensor s = moveBdimToFront(self, sbd);
  auto shape = at::infer_size(s.sizes().slice(1), mask.sizes());
  s = padToLogicalRank(s, true, static_cast<int64_t>(shape.size()));
  std::vector<int64_t> bshape{s.size(0)};
  bshape.insert(bshape.end(), shape.begin(), shape.end());
  c10::List<std::optional<Tensor>> idx;
  idx.push_back(std::nullopt);
  idx.push_back(mask.expand(shape));
  return {at::_ops::index_Tensor::call(s.expand(bshape), idx), 0};
}

// ---- gather / scatter: every tensor argument brought to [B, ...] (unbatched ones expanded, never
// copied), dim shifted past the batch dim; logical 0-dim tensors become [B, 1].
struct GatherArgs {
  Tensor self, index, src;
  int64_t dim;
  bool scalar;
};

GatherArgs prepGather(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index, bdim_t ibd,
                      const Tensor* src, bdim_t srcbd, int64_t B, bool self_view) {
  GatherArgs a;
  a.self = self_view ? moveBdimToFront(self, sbd) : materializeBdimFront(self, sbd, B);
  a.index = materializeBdimFront(index, ibd, B);
  if (src) a.src = materializeBdimFront(*src, srcbd, B);
  const int64_t rank = a.self.dim() - 1;
  a.scalar = rank == 0;
  if (a.scalar) {
    a.self = a.self.unsqueeze(1);
    if (a.index.dim() == 1) a.index = a.index.unsqueeze(1);
    if (src && a.src.dim() == 1) a.src = a.src.unsqueeze(1);
  }
  a.dim = physicalDim(dim, std::max<int64_t>(rank, 1), true);
  return a;
}

// torch's gather/scatter want self, index (and src) of one rank, a scalar counting as 1-d.
bool sameGatherRank(std::initializer_list<std::pair<const Tensor*, bdim_t>> ts) {
  std::optional<int64_t> r;
  for (const auto& [t, bd] : ts) {
    const int64_t k = std::max<int64_t>(rankWithoutBdim(*t, bd), 1);
    if (r && *r != k) return false;
    r = k;
  }
  return true;
}

Tensor one(const Tensor& t, bdim_t bd) {
  return bd ? exampleOf(t, *bd, 0) : t;
}

std::tuple<Tensor, bdim_t> gatherRule(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                      bdim_t ibd, bool sparse_grad) {
  if (index.numel() == 0 && !sameGatherRank({{&self, sbd}, {&index, ibd}})) {
    // torch skips the rank check for an empty index: the result is an empty tensor of the
    // index's shape and self's dtype, per element
    const int64_t B = batchSizeOf({{&self, sbd}, {&index, ibd}}).guard_int(__FILE__, __LINE__);
    c10::SmallVector<int64_t, 8> shape{B};
    const Tensor idx = moveBdimToFront(index, ibd);
    for (int64_t d = ibd ? 1 : 0; d < idx.dim(); ++d) shape.push_back(idx.size(d));
    return {self.new_empty(shape), 0};
  }
  if (!sameGatherRank({{&self, sbd}, {&index, ibd}})) {
    raiseForElement([&] { at::_ops::gather::call(one(self, sbd), dim, one(index, ibd), sparse_grad); },
                    "gather", "index must have self's number of dims");
  }
  const int64_t B = batchSizeOf({{&self, sbd}, {&index, ibd}}).guard_int(__FILE__, __LINE__);
  const int64_t index_rank = rankWithoutBdim(index, ibd);
  GatherArgs a = prepGather(self, sbd, dim, index, ibd, nullptr, {}, B, false);
  Tensor out = at::_ops::gather::call(a.self, a.dim, a.index, sparse_grad);
  return {index_rank == 0 ? out.squeeze(1) : out, 0};
}

template <class Op, class Sig = typename Op::schema>
struct ScatterLike;
// scatter.src / .reduce, scatter_add, scatter_reduce.two: (self, dim, index, src, extra...)
template <class Op, class... Extra>
struct ScatterLike<Op, Tensor(const Tensor&, int64_t, const Tensor&, const Tensor&, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                         bdim_t ibd, const Tensor& src, bdim_t srcbd, Extra... extra) {
    if (index.numel() == 0 && !sameGatherRank({{&self, sbd}, {&index, ibd}, {&src, srcbd}})) {
      // an empty index writes nothing (torch skips the rank check then): self's values
      return {self.clone(), sbd};
    }
    if (!sameGatherRank({{&self, sbd}, {&index, ibd}, {&src, srcbd}})) {
      raiseForElement([&] { Op::call(one(self, sbd), dim, one(index, ibd), one(src, srcbd), extra...); },
                      Op::name, "self, index and src must have the same number of dims");
    }
    const int64_t B = batchSizeOf({{&self, sbd}, {&index, ibd}, {&src, srcbd}}).guard_int(__FILE__, __LINE__);
    GatherArgs a = prepGather(self, sbd, dim, index, ibd, &src, srcbd, B, false);
    Tensor out = Op::call(a.self, a.dim, a.index, a.src, extra...);
    return {a.scalar ? out.squeeze(1) : out, 0};
  }
};
// scatter.value / .value_reduce: (self, dim, index, Scalar value, extra...)
template <class Op, class... Extra>
struct ScatterLike<Op, Tensor(const Tensor&, int64_t, const Tensor&, const c10::Scalar&, Extra...)> {
  static std::tuple<Tensor, bdim_t> rule(const Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index,
                                         bdim_t ibd, const c10::Scalar& value, Extra... extra) {
    if (!sameGatherRank({{&self, sbd}, {&index, ibd}})) {
      raiseForElement([&] { Op::call(one(self, sbd), dim, one(index, ibd), value, extra...); }, Op::name,
                      "index must have self's number of dims");
    }
    const int64_t B = batchSizeOf({{&self, sbd}, {&index, ibd}}).guard_int(__FILE__, __LINE__);
    GatherArgs a = prepGather(self, sbd, dim, index, ibd, nullptr, {}, B, false);
    Tensor out = Op::call(a.self, a.dim, a.index, value, extra...);
    return {a.scalar ? out.squeeze(1) : out, 0};
  }
};

template <class Op, class Sig = typename Op::schema>
struct ScatterLikeInplace;
template <class Op, class... Extra>
struct ScatterLikeInplace<Op, Tensor&(Tensor&, int64_t, const Tensor&, const Tensor&, Extra...)> {
  static void rule(Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index, bdim_t ibd, const Tensor& src,
                   bdim_t srcbd, Extra... extra) {
    const int64_t B = self.size(*sbd);
    GatherArgs a = prepGather(self, sbd, dim, index, ibd, &src, srcbd, B, true);
    Op::call(a.self, a.dim, a.index, a.src, extra...);
  }
};
template <class Op, class... Extra>
struct ScatterLikeInplace<Op, Tensor&(Tensor&, int64_t, const Tensor&, const c10::Scalar&, Extra...)> {
  static void rule(Tensor& self, bdim_t sbd, int64_t dim, const Tensor& index, bdim_t ibd,
                   const c10::Scalar& value, Extra... extra) {
    const int64_t B = self.size(*sbd);
    GatherArgs a = prepGather(self, sbd, dim, index, ibd, nullptr, {}, B, true);
    Op::call(a.self, a.dim, a.index, value, extra...);
  }
};

template <class Op>
using Scatter = ScatterLike<Op>;
template <class Op>
using ScatterInplace = ScatterLikeInplace<Op>;

// one_hot appends the class dim, so the batch dim stays where it is. torch's kernel checks the
// class values with .item(), which is fine on the physical tensor (below this level); torch.func
// skips that check under vmap and silently returns all-zero rows for out-of-range values, so here
// the for-loop's errors are kept. num_classes=-1 would need the maximum of every element at once.
std::tuple<Tensor, bdim_t> oneHotRule(const Tensor& self, bdim_t bd, int64_t num_classes) {
  TORCH_CHECK(num_classes != -1,
              "When vmap-ing torch.nn.functional.one_hot, please provide an "
              "explicit positive num_classes argument (functorch_lite.vmap cannot infer it from "
              "the data of all batch elements at once).");
  return {at::one_hot(self, num_classes), bd};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  // a weight that is not a matrix runs per element: torch raises its own error
  registerVmapRule<at::_ops::embedding, &embeddingRule, RankIn<R<2>, R<0, kAnyRank>>>(m);
  registerVmapRule<at::_ops::one_hot, &oneHotRule>(m);
  registerVmapRule<at::_ops::embedding_dense_backward, &embeddingDenseBackwardRule>(m);

  registerVmapRule<at::_ops::index_Tensor, &indexRule>(m);
  registerVmapRule<at::_ops::_unsafe_index_Tensor, &indexRule>(m);
  registerVmapRule<at::_ops::index_put, &indexPutRule<at::_ops::index_put>>(m);
  registerVmapRule<at::_ops::_unsafe_index_put, &indexPutRule<at::_ops::_unsafe_index_put>>(m);
  registerVmapInplaceRule<at::_ops::index_put_, &indexPutInplaceRule>(m);
  registerVmapInplaceRule<at::_ops::_index_put_impl_, &indexPutImplInplaceRule>(m);

  registerVmapRule<at::_ops::index_select, &indexSelectRule>(m);
  registerVmapRule<at::_ops::index_add, &indexAddRule>(m);
  registerVmapInplaceRule<at::_ops::index_add_, &indexAddInplaceRule>(m);
  registerVmapRule<at::_ops::index_copy, &indexCopyRule>(m);
  registerVmapInplaceRule<at::_ops::index_copy_, &indexCopyInplaceRule>(m);
  registerVmapRule<at::_ops::index_fill_int_Tensor, &indexFillTensorRule>(m);
  registerVmapRule<at::_ops::index_fill_int_Scalar, &indexFillScalarRule>(m);

  registerVmapRule<at::_ops::masked_select, &maskedSelectRule>(m);
  registerVmapRule<at::_ops::gather, &gatherRule>(m);
  // clang-format off
  registerFamily<Scatter,
      at::_ops::scatter_add,
      at::_ops::scatter_reduce,
      at::_ops::scatter_reduce_two,
      at::_ops::scatter_src,
      at::_ops::scatter_value,
      at::_ops::scatter_value_reduce>(m);
  // clang-format on
  registerInplaceFamily<ScatterInplace, at::_ops::scatter__src, at::_ops::scatter__value,
                        at::_ops::scatter__reduce, at::_ops::scatter__value_reduce, at::_ops::scatter_add_,
                        at::_ops::scatter_reduce__two>(m);
}

}  // namespace ftl
