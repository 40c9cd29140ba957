// myext::scaled_add(x, y, alpha) = x + alpha * y (broadcasting): an operator of a user's own
// library, with a CPU kernel, an autograd formula, and a batching rule for functorch_lite.vmap.
// The rule is what docs/extending_cpp.md is about; the rest is ordinary torch extension code.
#include <ATen/ExpandUtils.h>
#include <functorch_lite/rules.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>

namespace {

using at::Tensor;
using ftl::bdim_t;

// Names the operator for functorch_lite's registration templates (and calls it: ScaledAdd::call).
struct ScaledAdd : ftl::CustomOp<ScaledAdd, Tensor(const Tensor&, const Tensor&, double)> {
  static constexpr const char* name = "myext::scaled_add";
  static constexpr const char* overload_name = "";
};

Tensor scaledAddCpu(const Tensor& x, const Tensor& y, double alpha) {
  return x.add(y, alpha);
}

// The batching rule: each tensor comes with its batch dim (nullopt: not batched); the result
// comes back with its own. Broadcasting aligns dims from the right, so with the batch dims moved to
// the front, a batched argument of lower logical rank gets size-1 dims after its batch dim.
std::tuple<Tensor, bdim_t> scaledAddBatchRule(const Tensor& x, bdim_t xbd, const Tensor& y, bdim_t ybd,
                                              double alpha) {
  const int64_t rank = std::max(ftl::rankWithoutBdim(x, xbd), ftl::rankWithoutBdim(y, ybd));
  Tensor x2 = ftl::padToLogicalRank(ftl::moveBdimToFront(x, xbd), xbd.has_value(), rank);
  Tensor y2 = ftl::padToLogicalRank(ftl::moveBdimToFront(y, ybd), ybd.has_value(), rank);
  return {ScaledAdd::call(x2, y2, alpha), 0};
}

// d/dx = 1, d/dy = alpha, each summed back to its input's shape over the broadcast dims.
class ScaledAddFunction : public torch::autograd::Function<ScaledAddFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& y,
                        double alpha) {
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["y_sizes"] = y.sizes().vec();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ScaledAdd::call(x, y, alpha);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Tensor& g = grads[0];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const auto y_sizes = ctx->saved_data["y_sizes"].toIntVector();
    return {at::sum_to(g, x_sizes), at::sum_to(g.mul(alpha), y_sizes), Tensor()};
  }
};

Tensor scaledAddAutograd(const Tensor& x, const Tensor& y, double alpha) {
  return ScaledAddFunction::apply(x, y, alpha);
}

}  // namespace

TORCH_LIBRARY(myext, m) {
  m.def("scaled_add(Tensor x, Tensor y, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(myext, CPU, m) {
  m.impl("scaled_add", &scaledAddCpu);
}

TORCH_LIBRARY_IMPL(myext, Autograd, m) {
  m.impl("scaled_add", &scaledAddAutograd);
}

FUNCTORCH_LITE_LIBRARY_IMPL(myext, m) {
  ftl::registerVmapRule<ScaledAdd, &scaledAddBatchRule>(m);
}
