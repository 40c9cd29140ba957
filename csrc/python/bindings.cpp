// functorch_lite._C: the Python entry points. Entering and leaving levels and moving batch dims
// in and out happen here, in C++, for a whole flattened argument list per call.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/headeronly/version.h>

#include <ATen/Functions.h>

#include "core/dispatch.h"
#include "core/levels.h"
#include "core/tensors.h"
#include "dp/noise.h"
#include "vmap/fallback.h"

namespace py = pybind11;

namespace ftl {
namespace {

const Level& liveLevel(int64_t id) {
  const Level* level = levelStack().find(id);
  TORCH_CHECK(level, "functorch_lite: level ", id, " is not active on this thread (stack ", describeStack(),
              ")");
  return *level;
}

Randomness parseRandomness(const std::string& r) {
  if (r == "error") return Randomness::Error;
  if (r == "same") return Randomness::Same;
  if (r == "different") return Randomness::Different;
  TORCH_CHECK_VALUE(false, "vmap: randomness must be 'error', 'different' or 'same', got '", r, "'");
}

// Wraps flat_args[i] in a BatchedTensor at `level` along flat_in_dims[i] (None: unbatched).
py::list vmapWrapInputs(const py::list& flat_args, const py::list& flat_in_dims, int64_t level_id) {
  const Level& level = liveLevel(level_id);
  py::list out(flat_args.size());
  for (size_t i = 0; i < flat_args.size(); ++i) {
    py::handle arg = flat_args[i];
    py::handle d = flat_in_dims[i];
    if (d.is_none() || !THPVariable_Check(arg.ptr())) {
      out[i] = arg;
      continue;
    }
    const at::Tensor& t = THPVariable_Unpack(arg.ptr());
    rejectForeignTransformTensor(t, "vmap");
    int64_t bdim = d.cast<int64_t>();
    // A tensor of an enclosing vmap counts its logical dims; the value's extra dim is not ours.
    if (bdim < 0) bdim += t.dim();
    // _vmap.py validates in_dims first; this keeps BatchedTensorImpl's invariant unreachable
    TORCH_CHECK(bdim >= 0 && bdim < t.dim(), "functorch_lite.vmap: in_dim ", d.cast<int64_t>(),
                " is out of range for an input with ", t.dim(), " dims");
    out[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(makeBatched(t, bdim, level)));
  }
  return out;
}

at::Tensor removeBatchDim(const at::Tensor& t, int64_t level_id, const c10::SymInt& batch_size,
                          std::optional<int64_t> out_dim) {
  if (auto* b = batchedAt(t, level_id)) {
    TORCH_CHECK(out_dim.has_value(), "vmap: out_dims is None for an output that is batched");
    const at::Tensor& v = b->value();
    const int64_t d = c10::maybe_wrap_dim(*out_dim, v.dim());
    return d == b->bdim() ? v : v.movedim(b->bdim(), d);
  }
  if (!out_dim.has_value()) return t;
  // Not batched at this level: every batch element produced the same tensor.
  const int64_t d = c10::maybe_wrap_dim(*out_dim, t.dim() + 1);
  c10::SymDimVector sizes(t.sym_sizes().begin(), t.sym_sizes().end());
  sizes.insert(sizes.begin() + d, batch_size);
  return t.unsqueeze(d).expand_symint(sizes);
}

const char* randomnessName(Randomness r) {
  switch (r) {
    case Randomness::Error:
      return "error";
    case Randomness::Same:
      return "same";
    case Randomness::Different:
      return "different";
  }
  return "error";
}

// NOTE [User batching rules] in vmap/fallback.h: the Python side (functorch_lite/_rules.py)
// receives the op's name, its arguments as torch would pass them to a Python kernel, and the
// level; it returns the op's result, or NotImplemented to decline.
py::object& userRuleCallback() {
  static auto* cb = new py::object();  // leaked: must not be destroyed after the interpreter
  return *cb;
}

bool pyUserRule(const c10::OperatorHandle& op, torch::jit::Stack* stack, const Level& top) {
  py::gil_scoped_acquire gil;
  if (!userRuleCallback()) return false;
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  const size_t begin = stack->size() - nargs;
  // Positional arguments in a tuple, keyword-only ones in a dict, as torch calls Python kernels.
  py::list args;
  py::dict kwargs;
  for (size_t i = 0; i < nargs; ++i) {
    const auto& arg = schema.arguments()[i];
    py::object v = torch::jit::toPyObject((*stack)[begin + i]);
    if (arg.kwarg_only())
      kwargs[py::str(arg.name())] = v;
    else
      args.append(v);
  }
  py::object out = userRuleCallback()(c10::toString(op.operator_name()), py::tuple(args), kwargs, top.id,
                                      top.batch_size, randomnessName(top.randomness));
  if (out.ptr() == Py_NotImplemented) return false;
  torch::jit::drop(*stack, nargs);
  // _rules.py has checked the structure against the schema.
  const auto& returns = schema.returns();
  if (returns.size() == 1) {
    stack->push_back(torch::jit::toIValue(out, returns[0].real_type()));
  } else if (returns.size() > 1) {
    auto seq = py::cast<py::sequence>(out);
    for (size_t i = 0; i < returns.size(); ++i)
      stack->push_back(torch::jit::toIValue(seq[i], returns[i].real_type()));
  }
  return true;
}

// Context manager: runs Python code with our front key excluded, so torch functions that read raw
// memory (tolist, numpy) see plain tensors and nothing gets wrapped on the way.
struct BelowTransforms {
  std::optional<c10::impl::ExcludeDispatchKeyGuard> guard;
  void enter() { guard.emplace(kFrontKeys); }
  void exit(const py::args&) { guard.reset(); }
};

// tensorTypeName() for tensors with a Python subclass: their class, which the C++ type (a plain
// TensorImpl) does not tell. Errors may be raised on threads that do not hold the GIL.
std::string pythonTypeName(const at::Tensor& t) {
  if (!t.defined() || !t.unsafeGetTensorImpl()->key_set().has(c10::DispatchKey::Python)) return {};
  py::gil_scoped_acquire gil;
  try {
    py::object obj = py::reinterpret_steal<py::object>(THPVariable_Wrap(t));
    py::handle type(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())));
    return py::str(type.attr("__module__")).cast<std::string>() + "." +
           py::str(type.attr("__qualname__")).cast<std::string>();
  } catch (const std::exception&) {
    return {};  // error_already_set took the Python error with it
  }
}

}  // namespace
}  // namespace ftl

PYBIND11_MODULE(_C, m) {
  using namespace ftl;
  m.doc() = "functorch_lite C++ core: level stack, wrapper tensors, batching rules";
  setTensorTypeNamer(&pythonTypeName);

  m.def("_initialize", torch::wrap_pybind_function(&initializeDispatch),
        "Checks the dispatch keys are free, then registers functorch_lite's kernels.");
  m.def("_check_keys", torch::wrap_pybind_function(&checkKeysAreFree));
  m.attr("_built_with_torch") = TORCH_VERSION;
  m.attr("_used_keys") = py::make_tuple("DeferredInit", "AutogradPrivateUse3", "PrivateUse3");

  // ---- levels
  m.def("_push_vmap", torch::wrap_pybind_function([](c10::SymInt batch_size, const std::string& randomness) {
          rejectForeignTransformActive("vmap");
          return ownLevelStack().push(LevelKind::Vmap, std::move(batch_size), parseRandomness(randomness));
        }));
  m.def("_push_grad", torch::wrap_pybind_function([] {
          rejectForeignTransformActive("grad");
          return ownLevelStack().push(LevelKind::Grad, 0, Randomness::Error);
        }));
  m.def("_push_jvp", torch::wrap_pybind_function([] {
          rejectForeignTransformActive("jvp");
          return ownLevelStack().push(LevelKind::Jvp, 0, Randomness::Error);
        }));
  m.def("_pop", torch::wrap_pybind_function([](int64_t id) { ownLevelStack().pop(id); }));
  // torch.autograd.grad refuses outputs and inputs that carry the Batched key, which our tensors
  // carry as a marker (NOTE [Dispatch keys of our tensors]); the C++ entry has no such check.
  m.def("_autograd_grad",
        torch::wrap_pybind_function([](const std::vector<at::Tensor>& outputs,
                                       const std::vector<at::Tensor>& inputs,
                                       const std::vector<at::Tensor>& grad_outputs,
                                       std::optional<bool> retain_graph, bool create_graph) {
          py::gil_scoped_release no_gil;
          return torch::autograd::grad(outputs, inputs, grad_outputs, retain_graph, create_graph,
                                       /*allow_unused=*/true);
        }),
        "torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True) for our wrappers; "
        "unused inputs give None.");
  m.def("_stack_depth", torch::wrap_pybind_function([] { return levelStack().depth(); }));
  m.def("_describe_stack", torch::wrap_pybind_function(&describeStack));
  // The id of the innermost visible level (0 when none): jacrev/jacfwd wrap their
  // non-differentiated arguments at the vjp/jvp level they run in.
  m.def("_top_level_id", torch::wrap_pybind_function([] {
          const Level* top = levelStack().top();
          return top ? top->id : int64_t{0};
        }));
  // How many visible levels differentiate (grad and jvp levels).
  m.def("_num_differentiating_levels", torch::wrap_pybind_function([] {
          const auto& s = levelStack();
          int64_t n = 0;
          for (size_t i = 0; i < s.depth(); ++i) n += s.at(i).kind != LevelKind::Vmap;
          return n;
        }));
  // 1-based nesting depth of a live level (0 if it is not on the visible stack): reprs print it,
  // as torch.func prints its levels, instead of the process-wide id.
  m.def("_level_depth", torch::wrap_pybind_function([](int64_t id) -> int64_t {
          const auto& s = levelStack();
          for (size_t i = 0; i < s.depth(); ++i)
            if (s.at(i).id == id) return static_cast<int64_t>(i) + 1;
          return 0;
        }));

  // ---- vmap in/out
  m.def("_vmap_wrap_inputs", torch::wrap_pybind_function(&vmapWrapInputs));
  m.def("_vmap_unwrap_outputs",
        torch::wrap_pybind_function([](const py::list& flat_outs, const py::list& flat_out_dims,
                                       int64_t level_id, const c10::SymInt& batch_size) {
          py::list out(flat_outs.size());
          for (size_t i = 0; i < flat_outs.size(); ++i) {
            py::handle o = flat_outs[i];
            const at::Tensor& t = THPVariable_Unpack(o.ptr());
            py::handle d = flat_out_dims[i];
            std::optional<int64_t> od;
            if (!d.is_none()) od = d.cast<int64_t>();
            out[i] = py::reinterpret_steal<py::object>(
                THPVariable_Wrap(removeBatchDim(t, level_id, batch_size, od)));
          }
          return out;
        }));
  m.def("_add_batch_dim",
        torch::wrap_pybind_function([](const at::Tensor& t, int64_t bdim, int64_t level_id) {
          TORCH_CHECK(bdim >= 0 && bdim < t.dim(), "functorch_lite._add_batch_dim: batch dim ", bdim,
                      " is out of range for a tensor with ", t.dim(), " dims");
          return makeBatched(t, bdim, liveLevel(level_id));
        }));
  m.def("_remove_batch_dim", torch::wrap_pybind_function(&removeBatchDim));
  m.def("_is_batched_at", torch::wrap_pybind_function([](const at::Tensor& t, int64_t level_id) {
          return batchedAt(t, level_id) != nullptr;
        }));

  // ---- grad wrappers
  m.def("_wrap_for_grad", torch::wrap_pybind_function([](const at::Tensor& t, int64_t level_id) {
          rejectForeignTransformTensor(t, "grad");
          return makeGradWrapper(t, liveLevel(level_id));
        }));
  m.def("_unwrap_for_grad",
        torch::wrap_pybind_function([](const at::Tensor& t, int64_t level_id) -> at::Tensor {
          auto* gw = asGradWrapper(t);
          return gw && gw->level() == level_id ? gw->value() : t;
        }));

  // ---- user batching rules and autograd.Function (functorch_lite/_rules.py, _autograd_function.py)
  m.def("_set_user_rule_callback", [](py::object cb) {
    userRuleCallback() = std::move(cb);
    setUserRuleHook(&pyUserRule);
  });
  m.def("_add_user_rule_op", torch::wrap_pybind_function(&addUserRuleOp));
  m.def("_remove_user_rule_op", torch::wrap_pybind_function(&removeUserRuleOp));
  // (id, kind, batch_size, randomness) of the innermost visible level, or None.
  m.def("_top_level_info", []() -> py::object {
    const Level* top = levelStack().top();
    if (!top) return py::none();
    return py::make_tuple(top->id, levelKindName(top->kind), top->batch_size,
                          randomnessName(top->randomness));
  });
  // True while our front kernel sees ops: a level is live and we are not inside the window where
  // a grad level runs torch's autograd kernels (where autograd.Functions are autograd's own).
  m.def("_front_active", [] {
    const auto tls = c10::impl::tls_local_dispatch_key_set();
    return tls.included_.has(c10::DispatchKey::DeferredInit) &&
           !tls.excluded_.has(c10::DispatchKey::DeferredInit);
  });
  // (value, bdim) of a tensor batched at `level`; (t, None) otherwise.
  m.def("_unwrap_batched", torch::wrap_pybind_function([](const at::Tensor& t, int64_t level_id) {
          auto [value, bdim] = unwrapAt(t, level_id);
          return std::make_tuple(value, bdim);
        }));
  // Calls fn(*args) at the level below `level` (the top one), as a batching rule runs.
  m.def("_call_below", [](int64_t level_id, const py::function& fn, const py::args& args) {
    const Level* top = levelStack().top();
    TORCH_CHECK(top && top->id == level_id, "functorch_lite: level ", level_id,
                " is not the innermost level (stack ", describeStack(), ")");
    HandDownGuard guard;
    return fn(*args);
  });

  py::class_<BelowTransforms>(m, "_BelowTransforms")
      .def(py::init<>())
      .def("__enter__", &BelowTransforms::enter)
      .def("__exit__", &BelowTransforms::exit);

  // ---- introspection (repr, tests)
  m.def("_wrapper_info", torch::wrap_pybind_function([](const at::Tensor& t) -> py::object {
          auto* ft = asFt(t);
          if (!ft) return py::none();
          py::object bdim = py::none();
          if (auto* b = asBatched(t)) bdim = py::int_(b->bdim());
          return py::make_tuple(ft->wrapperKind() == WrapperKind::Batched ? "batched" : "grad", ft->level(),
                                bdim, ft->value(), ft->isAlive());
        }));

  // A tensor of another transform library (torch.func): its own checks apply to it, not ours.
  m.def("_is_foreign_transform_tensor", torch::wrap_pybind_function(&isForeignTransformTensor));

  // ---- fallback settings
  m.def("_set_fallback_mode", torch::wrap_pybind_function([](const std::string& mode) {
          if (mode == "warn")
            setFallbackMode(FallbackMode::Warn);
          else if (mode == "error")
            setFallbackMode(FallbackMode::Error);
          else if (mode == "quiet")
            setFallbackMode(FallbackMode::Quiet);
          else
            TORCH_CHECK_VALUE(false, "set_vmap_fallback: mode must be 'warn', 'error' or 'quiet', got '",
                              mode, "'");
        }));
  m.def("_get_fallback_mode", torch::wrap_pybind_function([] {
          switch (fallbackMode()) {
            case FallbackMode::Warn:
              return "warn";
            case FallbackMode::Error:
              return "error";
            case FallbackMode::Quiet:
              return "quiet";
          }
          return "warn";
        }));
  m.def("_fallback_ops_seen", torch::wrap_pybind_function(&fallbackOpsSeen));
  m.def("_reset_fallback_ops_seen", torch::wrap_pybind_function(&resetFallbackOpsSeen));
  m.def("_num_back_kernels", torch::wrap_pybind_function(&numBackKernels));

  // ---- DP-SGD noise (csrc/dp/noise.h)
  m.def("_dp_philox_noisy",
        torch::wrap_pybind_function([](const at::Tensor& out, const std::optional<at::Tensor>& sum,
                                       double std, double scale, uint64_t key, uint64_t counter0,
                                       uint32_t stream, uint32_t rank) {
          return dp::philoxNoisy(out, sum.value_or(at::Tensor()), std, scale, key, counter0, stream, rank);
        }));
  m.def("_dp_noise_isa", torch::wrap_pybind_function(&dp::noiseIsa));
  m.def("_dp_philox_block", torch::wrap_pybind_function(&dp::philoxBlock));
  m.def("_dp_chacha_block", torch::wrap_pybind_function(&dp::chachaBlock));
  py::class_<dp::SecureRandom>(m, "_SecureRandom")
      .def(py::init<>())
      .def("noisy", torch::wrap_pybind_function(
                        [](dp::SecureRandom& self, const at::Tensor& out,
                           const std::optional<at::Tensor>& sum, double std, double scale,
                           double grid) { self.noisy(out, sum.value_or(at::Tensor()), std, scale, grid); }))
      .def("bernoulli", torch::wrap_pybind_function(
                            [](dp::SecureRandom& self, int64_t n, double q) { return self.bernoulli(n, q); }))
      .def("blocks_used", &dp::SecureRandom::blocksUsed);
}
