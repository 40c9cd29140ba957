// Random ops at a vmap level. They reach vmapBoxed whether or not their arguments are batched
// (DeferredInit is in the TLS include set while a level is live), so factories and draws into
// tensors that do not depend on the mapped inputs follow the level's randomness too.
//
// NOTE [Randomness under vmap]
// 'error'     every draw raises, batched arguments or not.
// 'same'      one draw of the logical shape, shared by every batch element. A draw whose
//             parameters differ between elements (a batched probability, mean, count, ...) cannot
//             be shared: it raises. An in-place draw into a batched tensor draws once into a fresh
//             contiguous tensor of the logical shape and copies that into every element.
// 'different' one draw of the batched shape [B, *logical shape], batch dim in front; unbatched
//             arguments are expanded to it first. An in-place draw goes into the batched tensor
//             with its batch dim moved in front (a view); into an unbatched tensor it raises, as
//             one tensor cannot hold B different draws.
//
// Same seed, same numbers as torch.func: which generator output lands in which element depends on
// the shape, dtype and memory layout of the tensor a kernel draws into (CPU normal_ draws in
// blocks of 16, bernoulli_ follows memory order, ...). Every rule below therefore hands the kernel
// exactly the tensor torch.func's rule for that op does (aten/src/ATen/functorch/
// BatchRulesRandomness.cpp, BatchRulesBinaryOps.cpp): the value with its batch dim moved in front
// as a view, or an unbatched value expanded to [B, ...], or a fresh contiguous tensor for 'same'.
// Where torch.func has no rule for an overload and so breaks its own contract (the *_like
// overloads that take a generator and bernoulli.Tensor loop over the batch under 'same', or draw
// once under 'different' when nothing is batched), the rule of the sibling overload applies.
#include "vmap/random.h"

#include <ATen/ExpandUtils.h>
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <unordered_map>
#include <unordered_set>

#include "core/dispatch.h"
#include "core/tensors.h"
#include "vmap/plumbing.h"

namespace ftl {

namespace {

enum class Kind : uint8_t {
  Factory,          // a `size` argument: rand, randn, randint, normal.float_float
  Randperm,         // one permutation per element
  Inplace,          // draws into `self`: uniform_, normal_, random_, bernoulli_, ...
  Pointwise,        // one tensor gives shape and parameters: bernoulli, poisson, normal(T, float)
  Binary,           // two broadcast tensors: normal(Tensor, Tensor), binomial
  Like,             // rand_like, randn_like, randint_like, bernoulli.p: only self's shape matters
  BernoulliTensor,  // bernoulli.Tensor: the shape of `self`, the probabilities of `p`
  Multinomial,
  NativeDropout,
  Other,  // rrelu_with_noise, out= overloads, other libraries' ops: see otherRule
};

const std::unordered_map<std::string, Kind>& kinds() {
  static const std::unordered_map<std::string, Kind> k = {
      {"aten::rand", Kind::Factory},
      {"aten::rand.generator", Kind::Factory},
      {"aten::rand.names", Kind::Factory},
      {"aten::rand.generator_with_names", Kind::Factory},
      {"aten::randn", Kind::Factory},
      {"aten::randn.generator", Kind::Factory},
      {"aten::randn.names", Kind::Factory},
      {"aten::randn.generator_with_names", Kind::Factory},
      {"aten::randint", Kind::Factory},
      {"aten::randint.generator", Kind::Factory},
      {"aten::randint.low", Kind::Factory},
      {"aten::randint.low_generator", Kind::Factory},
      {"aten::normal.float_float", Kind::Factory},
      {"aten::randperm", Kind::Randperm},
      {"aten::randperm.generator", Kind::Randperm},
      {"aten::uniform_", Kind::Inplace},
      {"aten::normal_", Kind::Inplace},
      {"aten::random_", Kind::Inplace},
      {"aten::random_.from", Kind::Inplace},
      {"aten::random_.to", Kind::Inplace},
      {"aten::cauchy_", Kind::Inplace},
      {"aten::exponential_", Kind::Inplace},
      {"aten::geometric_", Kind::Inplace},
      {"aten::log_normal_", Kind::Inplace},
      {"aten::bernoulli_.float", Kind::Inplace},
      {"aten::bernoulli_.Tensor", Kind::Inplace},
      {"aten::bernoulli", Kind::Pointwise},
      // Only the shape of `self` matters: 'same' can share one draw also when it is batched
      // (torch.func refuses that; one draw per call is what a for-loop would see too).
      {"aten::bernoulli.p", Kind::Like},
      {"aten::normal.Tensor_float", Kind::Pointwise},
      {"aten::normal.float_Tensor", Kind::Pointwise},
      {"aten::poisson", Kind::Pointwise},
      {"aten::_standard_gamma", Kind::Pointwise},
      {"aten::_sample_dirichlet", Kind::Pointwise},
      {"aten::normal.Tensor_Tensor", Kind::Binary},
      {"aten::binomial", Kind::Binary},
      {"aten::rand_like", Kind::Like},
      {"aten::rand_like.generator", Kind::Like},
      {"aten::randn_like", Kind::Like},
      {"aten::randn_like.generator", Kind::Like},
      {"aten::randint_like", Kind::Like},
      {"aten::randint_like.generator", Kind::Like},
      {"aten::randint_like.low_dtype", Kind::Like},
      {"aten::randint_like.low_generator_dtype", Kind::Like},
      {"aten::randint_like.Tensor", Kind::Like},
      {"aten::randint_like.Tensor_generator", Kind::Like},
      {"aten::bernoulli.Tensor", Kind::BernoulliTensor},
      {"aten::multinomial", Kind::Multinomial},
      {"aten::native_dropout", Kind::NativeDropout},
  };
  return k;
}

std::string overloadKey(const c10::FunctionSchema& s) {
  return s.overload_name().empty() ? s.name() : s.name() + "." + s.overload_name();
}

bool hasGeneratorArg(const c10::FunctionSchema& schema) {
  for (const auto& arg : schema.arguments()) {
    const auto& type = arg.type();
    if (type->kind() == c10::TypeKind::GeneratorType) return true;
    if (type->kind() == c10::TypeKind::OptionalType &&
        type->castRaw<c10::OptionalType>()->getElementType()->kind() == c10::TypeKind::GeneratorType) {
      return true;
    }
  }
  return false;
}

// Ops taking a Generator, plus those (and the overloads) that draw without taking one.
bool isRandomOp(const c10::FunctionSchema& schema) {
  if (hasGeneratorArg(schema)) return true;
  static const std::unordered_set<std::string> names = {"aten::rand",
                                                        "aten::randn",
                                                        "aten::randint",
                                                        "aten::randperm",
                                                        "aten::rand_like",
                                                        "aten::randn_like",
                                                        "aten::randint_like",
                                                        "aten::native_dropout",
                                                        "aten::bernoulli",
                                                        "aten::normal",
                                                        "aten::poisson",
                                                        "aten::multinomial",
                                                        "aten::random_",
                                                        "aten::uniform_",
                                                        "aten::normal_",
                                                        "aten::bernoulli_",
                                                        "aten::exponential_",
                                                        "aten::geometric_",
                                                        "aten::log_normal_",
                                                        "aten::cauchy_",
                                                        "aten::rrelu",
                                                        "aten::rrelu_with_noise",
                                                        "aten::_standard_gamma",
                                                        "aten::_sample_dirichlet",
                                                        "aten::binomial"};
  return names.count(schema.name()) > 0;
}

// rrelu(_with_noise)(training=False) and native_dropout(train=False) draw nothing: randomness
// 'error' must let them run (torch.func does).
bool inEvalMode(const c10::FunctionSchema& schema, const torch::jit::Stack& stack, size_t begin) {
  const auto& args = schema.arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].name() != "training" && args[i].name() != "train") continue;
    const auto& iv = stack[begin + i];
    if (iv.isBool() && !iv.toBool()) return true;
  }
  return false;
}

// Everything a rule needs about one call.
struct Call {
  const c10::OperatorHandle& op;
  torch::jit::Stack* stack;
  const Level& top;
  size_t begin;  // index of the first argument on the stack

  const c10::FunctionSchema& schema() const { return op.schema(); }
  c10::IValue& arg(size_t i) { return (*stack)[begin + i]; }
  std::pair<Tensor, bdim_t> unwrap(size_t i) { return unwrapAt(arg(i).toTensor(), top.id); }
  bool same() const { return top.randomness == Randomness::Same; }
  int64_t B() const { return top.concreteBatchSize("a random op"); }
  size_t nrets() const { return schema().returns().size(); }

  bool anyBatched(size_t from) const {
    bool any = false;
    forEachTensor(*stack, begin + from, stack->size(),
                  [&](const Tensor& t) { any |= batchedAt(t, top.id) != nullptr; });
    return any;
  }
  // The op on the stack as it is now, with this level hidden.
  void callBelow() {
    HandDownGuard guard;
    op.callBoxed(stack);
  }
  // Every return, which are all tensors, becomes batched at dim 0 of this level.
  void returnsBatchedAtFront() {
    for (size_t r = stack->size() - nrets(); r < stack->size(); ++r)
      (*stack)[r] = makeBatched((*stack)[r].toTensor(), 0, top);
  }
  // An in-place op: give back the caller's `self`, not the value it was run on.
  void returnSelf(const Tensor& self) {
    const size_t n = nrets();
    torch::jit::drop(*stack, n);
    for (size_t r = 0; r < n; ++r) stack->push_back(self);
  }

  [[noreturn]] void failSameWithBatchedInputs() {
    TORCH_CHECK(false, "functorch_lite.vmap: randomness='same' cannot be honoured by ",
                schema().operator_name(),
                " when its inputs differ between batch elements. Use "
                "randomness='different', or draw outside of vmap.");
  }
  void checkDifferentIntoBatched(bool self_batched) {
    TORCH_CHECK(same() || self_batched,
                "functorch_lite.vmap: randomness='different' needs one "
                "draw per batch element, but ",
                schema().operator_name(),
                " draws in place into a "
                "tensor that is not batched (it was created outside vmap or does not depend on the "
                "mapped inputs), which can hold only one. Draw into a batched tensor (e.g. "
                "torch.empty_like of a mapped input), or use randomness='same'.");
  }
};

int64_t firstTensorArg(const c10::FunctionSchema& schema) {
  const auto& args = schema.arguments();
  for (size_t i = 0; i < args.size(); ++i)
    if (args[i].type()->kind() == c10::TypeKind::TensorType) return i;
  return -1;
}

// A fresh contiguous tensor of one element's logical shape, still batched at outer levels like
// `front` (batch dim of this level in front): what a 'same' draw goes into.
Tensor oneElementLike(const Tensor& front) {
  return at::empty_like(front.select(0, 0), at::MemoryFormat::Contiguous);
}

void factoryRule(Call& c) {
  if (c.same()) return c.callBelow();
  const auto& args = c.schema().arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].name() != "size") continue;
    std::vector<int64_t> size{c.B()};
    for (const auto& d : c.arg(i).toListRef()) size.push_back(d.toInt());
    c.arg(i) = c10::IValue(size);
  }
  c.callBelow();
  c.returnsBatchedAtFront();
}

void randpermRule(Call& c) {
  // One permutation per element: B separate draws (torch.func loops too).
  if (c.same()) return c.callBelow();
  vmapForLoop(c.op, c.stack, c.top);
}

// uniform_, normal_, ..., bernoulli_.float, and bernoulli_.Tensor with its probabilities `p`.
void inplaceRule(Call& c) {
  const Tensor self = c.arg(0).toTensor();
  auto [sv, sbd] = c.unwrap(0);
  const bool has_p = c.schema().arguments().size() > 1 && c.arg(1).isTensor();
  Tensor pv;
  bdim_t pbd;
  if (has_p) std::tie(pv, pbd) = c.unwrap(1);
  if (pbd) {
    if (c.same()) c.failSameWithBatchedInputs();
    TORCH_CHECK(sbd, "functorch_lite.vmap: ", c.schema().operator_name(),
                " writes batched "
                "values in place into 'self', which is not batched (it was created outside vmap "
                "or does not depend on the mapped inputs). Use the out-of-place version "
                "(torch.bernoulli(p)), or make 'self' batched first.");
  }
  c.checkDifferentIntoBatched(sbd.has_value());
  if (!sbd) return c.callBelow();  // 'same' into an unbatched tensor: one draw, as it is
  {
    HandDownGuard guard;
    Tensor front = moveBdimToFront(sv, sbd);
    if (c.same()) {
      Tensor one = oneElementLike(front);
      c.arg(0) = one;
      c.op.callBoxed(c.stack);
      front.copy_(one);
    } else {
      if (has_p) {
        const int64_t rank = std::max(front.dim() - 1, rankWithoutBdim(pv, pbd));
        front = padToLogicalRank(front, true, rank);
        c.arg(1) = padToLogicalRank(moveBdimToFront(pv, pbd), pbd.has_value(), rank);
      }
      c.arg(0) = front;
      c.op.callBoxed(c.stack);
    }
  }
  c.returnSelf(self);
}

void pointwiseRule(Call& c) {
  const int64_t i = firstTensorArg(c.schema());
  auto [v, bd] = c.unwrap(i);
  if (c.same()) {
    if (bd) c.failSameWithBatchedInputs();
    return c.callBelow();
  }
  {
    HandDownGuard guard;
    c.arg(i) = materializeBdimFront(v, bd, c.B());
    c.op.callBoxed(c.stack);
  }
  c.returnsBatchedAtFront();
}

// normal(Tensor mean, Tensor std), binomial(count, prob): broadcast like a binary pointwise op.
void binaryRule(Call& c) {
  auto [a, abd] = c.unwrap(0);
  auto [b, bbd] = c.unwrap(1);
  if (c.same()) {
    if (abd || bbd) c.failSameWithBatchedInputs();
    return c.callBelow();
  }
  {
    HandDownGuard guard;
    if (!abd && !bbd) {
      a = materializeBdimFront(a, abd, c.B());
      abd = 0;
    }
    const int64_t ra = rankWithoutBdim(a, abd), rb = rankWithoutBdim(b, bbd);
    Tensor a_ = moveBdimToFront(a, abd), b_ = moveBdimToFront(b, bbd);
    // A batched logical scalar is a dimensioned physical tensor: promote as the logical op would.
    const bool a_scalar = ra == 0 && abd, b_scalar = rb == 0 && bbd;
    if (a_scalar && !b_scalar) a_ = a_.to(b.scalar_type());
    if (b_scalar && !a_scalar) b_ = b_.to(a.scalar_type());
    const int64_t rank = std::max(ra, rb);
    a_ = padToLogicalRank(a_, abd.has_value(), rank);
    b_ = padToLogicalRank(b_, bbd.has_value(), rank);
    if (c.schema().name() == "aten::binomial") {
      // Its CPU kernel needs contiguous probabilities (torch.func makes them so as well), and
      // allocates its output like `count`: an unbatched count would have it resized to the
      // batch, which torch deprecates. Expanded, the draw is the same.
      b_ = b_.contiguous();
      if (!abd) a_ = a_.expand(at::infer_size(a_.sizes(), b_.sizes()));
    }
    c.arg(0) = a_;
    c.arg(1) = b_;
    c.op.callBoxed(c.stack);
  }
  c.returnsBatchedAtFront();
}

void likeRule(Call& c) {
  if (c.anyBatched(1)) {
    // randint_like.Tensor with a batched `high`: a bound per element.
    if (c.same()) c.failSameWithBatchedInputs();
    return vmapForLoop(c.op, c.stack, c.top);
  }
  auto [v, bd] = c.unwrap(0);
  if (c.same()) {
    if (!bd) return c.callBelow();
    HandDownGuard guard;
    c.arg(0) = moveBdimToFront(v, bd).select(0, 0);
    c.op.callBoxed(c.stack);
    return;
  }
  {
    HandDownGuard guard;
    c.arg(0) = materializeBdimFront(v, bd, c.B());
    c.op.callBoxed(c.stack);
  }
  c.returnsBatchedAtFront();
}

// bernoulli.Tensor(self, p): torch.func has no rule for it (it loops over the batch, also under
// 'same', and draws once under 'different' when nothing is batched); it gets bernoulli_.Tensor's.
void bernoulliTensorRule(Call& c) {
  auto [sv, sbd] = c.unwrap(0);
  auto [pv, pbd] = c.unwrap(1);
  if (c.same()) {
    if (pbd) c.failSameWithBatchedInputs();
    if (!sbd) return c.callBelow();
    HandDownGuard guard;
    c.arg(0) = moveBdimToFront(sv, sbd).select(0, 0);
    c.op.callBoxed(c.stack);
    return;
  }
  {
    HandDownGuard guard;
    const int64_t rank = std::max(rankWithoutBdim(sv, sbd), rankWithoutBdim(pv, pbd));
    c.arg(0) = padToLogicalRank(materializeBdimFront(sv, sbd, c.B()), true, rank);
    c.arg(1) = padToLogicalRank(moveBdimToFront(pv, pbd), pbd.has_value(), rank);
    c.op.callBoxed(c.stack);
  }
  c.returnsBatchedAtFront();
}

void multinomialRule(Call& c) {
  auto [v, bd] = c.unwrap(0);
  if (c.same()) {
    if (bd) c.failSameWithBatchedInputs();
    return c.callBelow();
  }
  {
    HandDownGuard guard;
    Tensor x = materializeBdimFront(v, bd, c.B());
    // multinomial takes one or two dims: rows of a 2-D element become rows of one matrix.
    const bool two_d = x.dim() == 3;
    const int64_t rows = two_d ? x.size(1) : 0;
    if (two_d) x = x.reshape({c.B() * rows, x.size(2)});
    c.arg(0) = x;
    c.op.callBoxed(c.stack);
    if (two_d) {
      Tensor out = c.stack->back().toTensor();
      c.stack->back() = out.reshape({c.B(), rows, out.size(1)});
    }
  }
  c.returnsBatchedAtFront();
}

// native_dropout(input, p, train): what F.dropout reaches on CUDA (and other fused backends).
void nativeDropoutRule(Call& c) {
  auto [v, bd] = c.unwrap(0);
  const bool eval = inEvalMode(c.schema(), *c.stack, c.begin);
  if (eval || !c.same()) {
    if (eval && !bd) return c.callBelow();
    {
      HandDownGuard guard;
      c.arg(0) = materializeBdimFront(v, bd, c.B());
      c.op.callBoxed(c.stack);
    }
    return c.returnsBatchedAtFront();
  }
  // 'same': one mask of the logical shape, in the input's dtype, as torch.func builds it.
  const double p1m = 1. - c.arg(1).toDouble();
  const double scale = p1m == 0 ? 0. : 1. / p1m;
  Tensor out, mask;
  {
    HandDownGuard guard;
    Tensor front = moveBdimToFront(v, bd);
    mask = at::empty_like(bd ? front.select(0, 0) : front, at::MemoryFormat::Contiguous);
    mask.bernoulli_(p1m);
    out = front.mul(mask).mul_(scale);
  }
  torch::jit::drop(*c.stack, c.schema().arguments().size());
  c.stack->push_back(bd ? makeBatched(out, 0, c.top) : out);
  c.stack->push_back(mask);
}

// Random ops without a rule of their own: 'same' draws once when nothing is batched, and into a
// batched `self` once for one element; 'different' runs the for-loop (batch_size draws).
void otherRule(Call& c) {
  const auto& schema = c.schema();
  const bool inplace = !schema.arguments().empty() && schema.arguments()[0].alias_info() &&
                       schema.arguments()[0].alias_info()->isWrite() && c.arg(0).isTensor();
  auto* self_batched = inplace ? batchedAt(c.arg(0).toTensor(), c.top.id) : nullptr;
  const bool others_batched = c.anyBatched(inplace ? 1 : 0);
  if (c.same()) {
    if (!self_batched && !others_batched) return c.callBelow();
    if (!self_batched || others_batched) c.failSameWithBatchedInputs();
    const Tensor self = c.arg(0).toTensor();
    {
      HandDownGuard guard;
      Tensor front = moveBdimToFront(self_batched->value(), self_batched->bdim());
      Tensor one = oneElementLike(front);
      c.arg(0) = one;
      c.op.callBoxed(c.stack);
      front.copy_(one);
    }
    return c.returnSelf(self);
  }
  if (inplace) c.checkDifferentIntoBatched(self_batched != nullptr);
  vmapForLoop(c.op, c.stack, c.top);
}

// ---- The dropout family under vmap.
//
// torch's own decomposition of dropout draws in place into `empty_like(input)`: into an unbatched
// tensor when the input does not depend on the mapped inputs (which 'different' must refuse), and
// in the input's memory layout otherwise. torch.func replaces the decomposition while a transform
// is live (aten/src/ATen/functorch/PyTorchOperatorHacks.cpp): the mask is an out-of-place
// bernoulli of a fresh tensor of the logical shape (the feature-noise shape for feature dropout),
// which the bernoulli rule above turns into one [B, ...] draw or one shared draw. We decompose the
// same way while a vmap level is live, at every level kind (so vmap(grad(f)) draws alike), and
// leave it to torch otherwise, where it matches eager mode.

bool vmapLevelLive() {
  const LevelStack& levels = levelStack();
  for (size_t i = 0; i < levels.depth(); ++i)
    if (levels.at(i).kind == LevelKind::Vmap) return true;
  return false;
}

template <bool feature, bool alpha, bool inplace>
Tensor dropoutDecomposed(const Tensor& input, double p, bool train) {
  TORCH_CHECK(p >= 0 && p <= 1, "dropout probability has to be between 0 and 1, but got ", p);
  if (!inplace && !feature && !alpha && train && p > 0 && p < 1 && input.sym_numel() > 0 &&
      (input.is_cuda() || input.is_xpu() || input.is_lazy())) {
    return std::get<0>(at::native_dropout(input, p, train));  // the fused kernel, as torch does
  }
  if (p == 0 || !train || input.sym_numel() == 0) return input;
  auto mul = [&](const Tensor& noise) { return inplace ? input.mul_(noise) : input.mul(noise); };
  // The mask is real-valued also for complex inputs (bernoulli has no complex kernel).
  const auto options = input.options().dtype(c10::toRealValueType(input.scalar_type()));
  if (p == 1) return mul(at::zeros({}, options));
  Tensor empty;
  if (feature) {
    TORCH_CHECK(input.dim() >= 2, "Feature dropout requires at least 2 dimensions in the input");
    std::vector<int64_t> sizes(input.dim(), 1);
    sizes[0] = input.size(0);
    sizes[1] = input.size(1);
    empty = at::empty(sizes, options);
  } else {
    empty = at::empty({}, options).expand(input.sizes());
  }
  Tensor noise = at::bernoulli(empty, 1 - p);
  if (!alpha) return mul(noise.div_(1 - p));
  constexpr double kAlpha = 1.7580993408473766;
  const double a = 1. / std::sqrt((kAlpha * kAlpha * p + 1) * (1 - p));
  Tensor b = noise.add(-1).mul_(kAlpha * a).add_(kAlpha * a * p);
  noise.mul_(a);
  return mul(noise).add_(b);
}

template <bool feature, bool alpha, bool inplace>
void dropoutKernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const size_t n = stack->size();
  const Tensor& arg = (*stack)[n - 3].toTensor();
  if (!vmapLevelLive() || isForeignTransformTensor(arg) || isForeignWithFrontKey(arg))
    return frontFallback(op, ks, stack);
  const Tensor input = unwrapIfDead((*stack)[n - 3].toTensor());
  const double p = (*stack)[n - 2].toDouble();
  const bool train = (*stack)[n - 1].toBool();
  Tensor out = dropoutDecomposed<feature, alpha, inplace>(input, p, train);
  torch::jit::drop(*stack, 3);
  stack->push_back(inplace ? input : out);
}

template <bool feature, bool alpha, bool inplace>
torch::CppFunction dropoutFn() {
  return torch::CppFunction::makeFromBoxedFunction<&dropoutKernel<feature, alpha, inplace>>();
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, DeferredInit, m) {
  m.impl("dropout", dropoutFn<false, false, false>());
  m.impl("dropout_", dropoutFn<false, false, true>());
  m.impl("feature_dropout", dropoutFn<true, false, false>());
  m.impl("feature_dropout_", dropoutFn<true, false, true>());
  m.impl("alpha_dropout", dropoutFn<false, true, false>());
  m.impl("alpha_dropout_", dropoutFn<false, true, true>());
  m.impl("feature_alpha_dropout", dropoutFn<true, true, false>());
  m.impl("feature_alpha_dropout_", dropoutFn<true, true, true>());
}

bool vmapRandom(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top) {
  const auto& schema = op.schema();
  if (!isRandomOp(schema)) return false;
  auto it = kinds().find(overloadKey(schema));
  const Kind kind = it == kinds().end() ? Kind::Other : it->second;
  Call c{op, stack, top, stack->size() - schema.arguments().size()};
  if (kind == Kind::NativeDropout && inEvalMode(schema, *stack, c.begin)) {
    nativeDropoutRule(c);
    return true;
  }
  if (inEvalMode(schema, *stack, c.begin)) return false;
  // A composite random op (rrelu) draws in its decomposition, whose pieces come back here.
  if (kind == Kind::Other && op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd)) {
    return false;
  }
  TORCH_CHECK(top.randomness != Randomness::Error,
              "functorch_lite.vmap: called random "
              "operation ",
              schema.operator_name(),
              " while in randomness error mode "
              "(randomness='error'). Pass randomness='different' (independent draws per batch element) or "
              "randomness='same' (one draw shared by the batch) to vmap, or draw the random "
              "values outside of vmap.");
  switch (kind) {
    case Kind::Factory:
      factoryRule(c);
      break;
    case Kind::Randperm:
      randpermRule(c);
      break;
    case Kind::Inplace:
      inplaceRule(c);
      break;
    case Kind::Pointwise:
      pointwiseRule(c);
      break;
    case Kind::Binary:
      binaryRule(c);
      break;
    case Kind::Like:
      likeRule(c);
      break;
    case Kind::BernoulliTensor:
      bernoulliTensorRule(c);
      break;
    case Kind::Multinomial:
      multinomialRule(c);
      break;
    case Kind::NativeDropout:
      nativeDropoutRule(c);
      break;
    case Kind::Other:
      otherRule(c);
      break;
  }
  return true;
}

}  // namespace ftl
