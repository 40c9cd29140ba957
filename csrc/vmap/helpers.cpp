// Shape helpers shared by batching rules (declared in plumbing.h).
#include <ATen/WrapDimUtils.h>
#include <ATen/ops/movedim_ops.h>
#include <ATen/ops/new_zeros_ops.h>
#include <ATen/ops/select_ops.h>
#include <ATen/ops/stack_ops.h>
#include <ATen/ops/unsqueeze_ops.h>
#include <ATen/ops/view_ops.h>

#include "vmap/plumbing.h"

namespace ftl {

Tensor moveBdimToFront(const Tensor& t, bdim_t bd) {
  if (!bd || *bd == 0) return t;
  return at::_ops::movedim_int::call(t, *bd, 0);
}

Tensor padToLogicalRank(const Tensor& t, bool batched, int64_t logical_rank) {
  if (!batched) return t;
  const int64_t have = t.dim() - 1;
  if (have >= logical_rank) return t;
  c10::SmallVector<c10::SymInt, 8> sizes(t.sym_sizes().begin(), t.sym_sizes().end());
  sizes.insert(sizes.begin() + 1, logical_rank - have, c10::SymInt(1));
  return at::_ops::view::call(t, sizes);
}

Tensor materializeBdimFront(const Tensor& t, bdim_t bd, const c10::SymInt& batch_size) {
  if (bd) return moveBdimToFront(t, bd);
  c10::SymDimVector sizes(t.sym_sizes().begin(), t.sym_sizes().end());
  sizes.insert(sizes.begin(), batch_size);
  return t.unsqueeze(0).expand_symint(sizes);
}

Tensor flattenAfterBatch(const Tensor& p) {
  // SymInts: a traced p's sizes stay symbolic (NOTE [Symbolic batch sizes])
  const auto sizes = p.sym_sizes();
  c10::SymInt n = 1;
  for (size_t d = 1; d < sizes.size(); ++d) n *= sizes[d];
  return p.reshape_symint({sizes[0], n});
}

int64_t physicalDim(int64_t dim, int64_t logical_rank, bool bdim_at_front) {
  int64_t d = c10::maybe_wrap_dim(dim, logical_rank);
  return bdim_at_front ? d + 1 : d;
}

c10::SymInt batchSizeOf(std::initializer_list<std::pair<const Tensor*, bdim_t>> ts) {
  for (const auto& [t, bd] : ts)
    if (bd) return t->sym_size(*bd);
  TORCH_INTERNAL_ASSERT(false, "batchSizeOf: no batched tensor");
}

Tensor exampleOf(const Tensor& value, int64_t bdim, int64_t i) {
  if (i < value.size(bdim)) return value.select(bdim, i);
  c10::SmallVector<int64_t, 8> sizes(value.sizes().begin(), value.sizes().end());
  sizes.erase(sizes.begin() + bdim);
  return value.new_zeros(sizes);
}

Tensor stackRows(const std::vector<Tensor>& rows, const Tensor& like) {
  if (!like.defined()) return like;
  if (rows.empty()) return like.unsqueeze(0).narrow(0, 0, 0).contiguous();
  return at::_ops::stack::call(rows, 0);
}

void checkResultBdim(const Tensor& t, bdim_t bd, const char* op) {
  if (!bd || !t.defined()) return;
  TORCH_CHECK(*bd >= 0 && *bd < t.dim(), "functorch_lite.vmap: the batching rule of ", op,
              " returned batch dim ", *bd, " for a result with ", t.dim(), " dims (sizes ", t.sizes(),
              "). This is a bug in functorch_lite's rule for this op; please report "
              "it.");
}

}  // namespace ftl
