"""torch.compile and functorch_lite (issue 15, docs/compile.md): Dynamo skips every transform with
one graph break per call and no warnings, results equal eager; torch.compile'd functions inside
transforms run eagerly. Backends "eager" and "aot_eager" (one inductor test)."""

import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import functorch_lite as ft

_SKIPPED = "Skip inlining `torch.compiler.disable()`d function"


def _f(x):
    return (x.sin() ** 2).sum()


def _fv(x):
    return x.sin() * 2


_LINEAR = nn.Linear(4, 2)
_STEPS = {
    "vmap": lambda x: ft.vmap(_fv)(x.unsqueeze(0).expand(3, -1)).cos(),
    "vmap_in_dims": lambda x: ft.vmap(torch.mul, in_dims=(0, None))(x.unsqueeze(0).expand(3, -1), x) + 1,
    "grad": lambda x: ft.grad(_f)(x) * 2,
    "grad_and_value": lambda x: ft.grad_and_value(_f)(x)[0] + 1,
    "jvp": lambda x: ft.jvp(_fv, (x,), (torch.ones_like(x),))[1] + 1,
    "jacrev": lambda x: ft.jacrev(_fv)(x) + 1,
    "jacfwd": lambda x: ft.jacfwd(_fv)(x) + 1,
    "hessian": lambda x: ft.hessian(_f)(x) + 1,
    "vmap_grad": lambda x: ft.vmap(ft.grad(_f))(x.unsqueeze(0).expand(3, -1)) + 1,
    "functional_call": lambda x: ft.functional_call(_LINEAR, {"weight": x.expand(2, 4), "bias": x[:2]}, (x,)),
    "stack_module_state": lambda x: ft.stack_module_state([_LINEAR, _LINEAR])[0]["bias"] + x[:2],
}
# transforms called twice per step: vjp and its vjp_fn, linearize and its jvp_fn
_TWO_CALLS = {
    "vjp": lambda x: ft.vjp(_fv, x)[1](torch.ones_like(x))[0] + 1,
    "linearize": lambda x: ft.linearize(_fv, x)[1](torch.ones_like(x)) + 1,
}


def _compile_and_count(fn, *args, backend="eager"):
    """Runs fn eagerly (which also loads what torch loads once per process), then compiled;
    returns (eager result, compiled result, warnings, graph breaks by reason)."""
    expected = fn(*args)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(fn, backend=backend)(*args)
    return expected, got, caught, _breaks()


def _breaks():
    """Graph breaks by reason (the first line of Dynamo's message)."""
    out = {}
    for k, v in counters["graph_break"].items():
        out[k.split("\n")[0]] = out.get(k.split("\n")[0], 0) + v
    return out


def _assert_close(a, b):
    torch.testing.assert_close(a, b)


_AOT = ("grad", "vmap_grad", "jacfwd", "vjp")  # aot_eager for a few: each compile takes seconds


@pytest.mark.parametrize(
    "name, backend",
    [(n, "eager") for n in sorted(_STEPS) + sorted(_TWO_CALLS)] + [(n, "aot_eager") for n in _AOT],
)
def test_one_graph_break_per_transform_call_no_warnings(name, backend):
    fn = _STEPS.get(name) or _TWO_CALLS[name]
    x = torch.randn(4)
    expected, got, caught, breaks = _compile_and_count(fn, x, backend=backend)
    _assert_close(got, expected)
    assert [str(w.message) for w in caught] == []
    assert breaks == {_SKIPPED: 1 if name in _STEPS else 2}, breaks


def test_compiled_graph_around_the_transform_runs_compiled():
    # the ops before and after the transform call are compiled (two graphs around one break)
    x = torch.randn(4)
    _compile_and_count(lambda x: ft.grad(_f)(x.exp()).cos(), x)
    assert counters["stats"]["unique_graphs"] == 2


def test_transform_made_outside_called_inside():
    g = ft.grad(_f)
    x = torch.randn(4)
    expected, got, caught, breaks = _compile_and_count(lambda x: g(x + 1) * 2, x)
    _assert_close(got, expected)
    assert caught == [] and breaks == {_SKIPPED: 1}


@pytest.mark.parametrize(
    "transformed, arg",
    [(ft.vmap(_fv), torch.randn(5, 3)), (ft.grad(_f), torch.randn(3)), (ft.jacrev(_fv), torch.randn(3))],
)
def test_compiling_the_transformed_function_itself(transformed, arg):
    # Dynamo skips the transform's frame altogether: it runs eagerly, with no graph to break
    expected, got, caught, breaks = _compile_and_count(transformed, arg)
    _assert_close(got, expected)
    assert caught == [] and breaks == {}
    assert counters["stats"]["unique_graphs"] == 0


def test_vmap_of_a_compiled_function_gives_eager_results():
    torch._dynamo.reset()
    xs = torch.randn(5, 3)
    cf = torch.compile(_fv, backend="eager")
    _assert_close(ft.vmap(cf)(xs), _fv(xs))
    _assert_close(ft.grad(lambda x: cf(x).sum())(xs), 2 * xs.cos())
    _assert_close(ft.jacrev(cf)(xs[0]), torch.diag(2 * xs[0].cos()))
    _assert_close(ft.vmap(ft.grad(lambda x: cf(x).sum()))(xs), 2 * xs.cos())
    # the stance is back to what it was, and the compiled function still compiles outside
    assert torch._dynamo.eval_frame._stance.stance == "default"
    counters.clear()
    _assert_close(cf(xs), _fv(xs))
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_inside_a_transform_under_a_user_stance():
    torch._dynamo.reset()
    cf = torch.compile(_fv, backend="eager")
    with torch.compiler.set_stance("eager_on_recompile"):
        _assert_close(ft.vmap(cf)(torch.randn(5, 3)).shape, torch.Size([5, 3]))
        assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"
    assert torch._dynamo.eval_frame._stance.stance == "default"


def test_transform_errors_propagate_through_compile():
    with pytest.raises(RuntimeError, match="expected f\\(\\*args\\) to return a scalar"):
        torch.compile(lambda x: ft.grad(_fv)(x), backend="eager")(torch.randn(3))
    assert torch._dynamo.eval_frame._stance.stance == "default"


# ---- a training step with ft.dp


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _dp_step(model, x, y):
    grads = ft.dp.clipped_grad_module(model, _loss, x, y, max_norm=0.5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.sub_(0.1 * grads[n] / len(x))
    return sum(g.norm() for g in grads.values())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_dp_training_step_matches_eager(backend):
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    (eager_model, _), (compiled_model, _) = _model(), _model()
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(_dp_step, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _assert_close(step(compiled_model, x, y), _dp_step(eager_model, x, y))
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        _assert_close(a, b)
    assert [str(w.message) for w in caught] == []
    assert _breaks() == {_SKIPPED: 1}


def test_compiled_dp_clipped_grad_and_trainer_match_eager():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss(params, model, xi, yi):
        return F.cross_entropy(ft.functional_call(model, params, (xi,)), yi)

    def step(model, x, y):
        params = {k: v.detach() for k, v in model.named_parameters()}
        return ft.dp.clipped_grad(loss, max_norm=1.0, batch_argnums=(2, 3))(params, model, x, y)

    model, _ = _model()
    expected, got, caught, breaks = _compile_and_count(lambda x, y: step(model, x, y), x, y)
    _assert_close(got, expected)
    # one break in Dynamo's graph-break log; its counter counts the break in the factory's
    # closure twice (the frame is traced again from its start after the first attempt)
    assert caught == [] and set(breaks) == {_SKIPPED}

    def trainer():
        model, opt = _model()
        return model, ft.dp.PrivateTrainer(
            model,
            opt,
            _loss,
            max_grad_norm=1.0,
            sample_rate=0.5,
            expected_batch_size=8,
            noise_multiplier=0.0,
            allow_zero_noise=True,
        )

    (m1, t1), (m2, t2) = trainer(), trainer()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: t2.step(x, y), backend="eager")
    for _ in range(2):
        t1.step(x, y)
        compiled(x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        _assert_close(a, b)


def test_compiled_training_step_with_optimizer_matches_eager():
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def step(model, opt):
        opt.zero_grad()
        grads = ft.dp.clipped_grad_module(model, _loss, x, y, max_norm=0.5)
        for n, p in model.named_parameters():
            p.grad = grads[n] / len(x)
        opt.step()

    (m1, o1), (m2, o2) = _model(), _model()
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager")
    for _ in range(3):
        step(m1, o1)
        compiled(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        _assert_close(a, b)


def test_inductor_per_sample_grads():
    # one inductor compile (slow on small machines): the graph around the transform is compiled
    torch._dynamo.reset()
    w, xs = torch.randn(3), torch.randn(6, 3)

    def step(w, xs):
        g = ft.vmap(ft.grad(lambda w, x: (x @ w).tanh()), in_dims=(None, 0))(w, xs)
        return (g * 2).sum(0).relu()

    _assert_close(torch.compile(step)(w, xs), step(w, xs))
