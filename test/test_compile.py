"""torch.compile and functorch_lite (issue 21, docs/compile.md).

vmap, grad, grad_and_value, jvp, jacrev, jacfwd and hessian are recorded by Dynamo as one call
each (NOTE [Dynamo sees a transform call as one opaque call] in functorch_lite/_compile.py) and
traced through by AOTAutograd: fullgraph=True compiles, on the eager, aot_eager and inductor
backends, with results equal to eager (float64); so are vjp's vjp_fn and linearize's jvp_fn
(recorded calls that recompute, NOTE [vjp and linearize under torch.compile]). functional_call
and stack_module_state at the top level of a compiled function, the DP entry points, and
transforms of closures defined inside the compiled function keep one graph break per call. torch.compile'd functions inside transforms run eagerly."""

import warnings

import pytest
import torch
import torch._dynamo
import torch.func as tf
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import functorch_lite as ft

_SKIPPED = "Skip inlining `torch.compiler.disable()`d function"
_F64 = torch.float64


def _f(x):
    return (x.sin() ** 2).sum()


def _fv(x):
    return x.sin() * 2


def _loss(w, b, x):
    return ((x @ w + b).tanh() ** 2).sum()


def _aux(x):
    return (x**2).sum(), x.cos()


def _two(d):
    return {"s": d["a"].sin() + d["b"], "c": d["a"].cos()}


def _inner_grad_sum(y):
    return ft.grad(_f)(y).sum()


def _x():
    return torch.randn(4, dtype=_F64)


def _xs():
    return torch.randn(5, 4, dtype=_F64)


# name -> (step, make args): every one compiles with fullgraph=True
_TRACED = {
    "vmap": (lambda xs: ft.vmap(_fv)(xs).cos(), lambda: (_xs(),)),
    "vmap_in_dims": (lambda xs, x: ft.vmap(torch.mul, in_dims=(0, None))(xs, x) + 1, lambda: (_xs(), _x())),
    "vmap_pytrees": (
        lambda d: ft.vmap(_two, in_dims=({"a": 0, "b": None},), out_dims={"s": 1, "c": 0})(d),
        lambda: ({"a": _xs(), "b": _x()},),
    ),
    "vmap_chunk_size": (lambda xs: ft.vmap(_fv, chunk_size=2)(xs), lambda: (_xs(),)),
    "grad": (lambda x: ft.grad(_f)(x) * 2, lambda: (_x(),)),
    "grad_argnums": (
        lambda w, b, x: ft.grad(_loss, argnums=(0, 1))(w, b, x),
        lambda: (torch.randn(4, 2, dtype=_F64), torch.randn(2, dtype=_F64), _x()),
    ),
    "grad_has_aux": (lambda x: ft.grad(_aux, has_aux=True)(x), lambda: (_x(),)),
    "grad_and_value": (lambda x: ft.grad_and_value(_f)(x)[0] + 1, lambda: (_x(),)),
    "grad_grad": (lambda x: ft.grad(_inner_grad_sum)(x), lambda: (_x(),)),
    "jvp": (lambda x: ft.jvp(_fv, (x,), (torch.ones_like(x),))[1] + 1, lambda: (_x(),)),
    "jvp_of_grad": (lambda x: ft.jvp(ft.grad(_f), (x,), (torch.ones_like(x),)), lambda: (_x(),)),
    "jacrev": (lambda x: ft.jacrev(_fv)(x) + 1, lambda: (_x(),)),
    "jacrev_chunk_size": (lambda x: ft.jacrev(_fv, chunk_size=2)(x), lambda: (_x(),)),
    "jacfwd": (lambda x: ft.jacfwd(_fv)(x) + 1, lambda: (_x(),)),
    "jacfwd_jacrev": (lambda x: ft.jacfwd(ft.jacrev(_fv))(x), lambda: (_x(),)),
    "hessian": (lambda x: ft.hessian(_f)(x) + 1, lambda: (_x(),)),
    "vmap_grad": (lambda xs: ft.vmap(ft.grad(_f))(xs) + 1, lambda: (_xs(),)),
    "vmap_jacrev": (lambda xs: ft.vmap(ft.jacrev(_fv))(xs), lambda: (_xs(),)),
    "vmap_hessian": (lambda xs: ft.vmap(ft.hessian(_f))(xs), lambda: (_xs(),)),
    "per_sample_grads": (
        lambda w, b, xs: ft.vmap(ft.grad(_loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, xs),
        lambda: (torch.randn(4, 2, dtype=_F64), torch.randn(2, dtype=_F64), _xs()),
    ),
    # functions returned by a transform: each call of them is recorded too (NOTE [vjp and
    # linearize under torch.compile])
    "vjp": (lambda x: ft.vjp(_fv, x)[1](torch.ones_like(x))[0] + 1, lambda: (_x(),)),
    "vjp_value_and_two_calls": (
        lambda x: (lambda out, fn: (out, fn(torch.ones_like(x)), fn(x)))(*ft.vjp(_fv, x)),
        lambda: (_x(),),
    ),
    "vjp_has_aux": (
        lambda x: (lambda o, fn, aux: (o, fn(o)[0], aux))(*ft.vjp(_aux, x, has_aux=True)),
        lambda: (_x(),),
    ),
    "vjp_two_primals": (
        lambda w, b, x: ft.vjp(_loss, w, b, x)[1](torch.tensor(1.0, dtype=_F64)),
        lambda: (torch.randn(4, 2, dtype=_F64), torch.randn(2, dtype=_F64), _x()),
    ),
    "vmap_of_vjp_fn": (lambda x: ft.vmap(ft.vjp(_fv, x)[1])(torch.eye(4, dtype=_F64))[0], lambda: (_x(),)),
    "linearize": (lambda x: ft.linearize(_fv, x)[1](torch.ones_like(x)) + 1, lambda: (_x(),)),
    "vmap_of_jvp_fn": (lambda x: ft.vmap(ft.linearize(_fv, x)[1])(torch.eye(4, dtype=_F64)), lambda: (_x(),)),
    "linearize_value_and_two_calls": (
        lambda x: (lambda out, fn: (out, fn(torch.ones_like(x)), fn(x)))(*ft.linearize(_fv, x)),
        lambda: (_x(),),
    ),
}

_LINEAR = nn.Linear(4, 2)
# one graph break per call: top-level calls of these, and transforms of closures made inside
_BREAKS = {
    "stack_module_state": lambda x: ft.stack_module_state([_LINEAR, _LINEAR])[0]["bias"] + x[:2],
}


def test_functional_call_at_the_top_level_is_traced():
    """ft.functional_call called by the compiled function itself is traced (one graph, every
    backend); the module keeps its own parameters afterwards, and torch.autograd through the
    compiled call gives eager's gradients."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    own = [p for p in model.parameters()]
    params = {k: torch.randn_like(v, requires_grad=True) for k, v in model.named_parameters()}
    x = torch.randn(5, 4, dtype=_F64)

    def step(params, x):
        return ft.functional_call(model, params, (x,)).square().sum()

    for backend in ("eager", "aot_eager", "inductor"):
        expected, got, caught, breaks = _compile_and_count(step, params, x, backend=backend, fullgraph=True)
        _assert_close(got, expected)
        assert breaks == {} and [str(w.message) for w in caught if "functorch_lite" in str(w.message)] == []
        assert [p for p in model.parameters()] == own
        (g_compiled,) = torch.autograd.grad(
            torch.compile(step, backend=backend)(params, x), params["0.weight"]
        )
        (g_eager,) = torch.autograd.grad(step(params, x), params["0.weight"])
        _assert_close(g_compiled, g_eager)


def _compile_and_count(fn, *args, backend="eager", fullgraph=False):
    """Runs fn eagerly (which also loads what torch loads once per process), then compiled;
    returns (eager result, compiled result, warnings, graph breaks by reason)."""
    expected = fn(*args)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(fn, backend=backend, fullgraph=fullgraph)(*args)
    return expected, got, caught, _breaks()


def _breaks():
    """Graph breaks by reason (the first line of Dynamo's message)."""
    out = {}
    for k, v in counters["graph_break"].items():
        out[k.split("\n")[0]] = out.get(k.split("\n")[0], 0) + v
    return out


def _assert_close(a, b):
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", sorted(_TRACED))
def test_transforms_compile_with_fullgraph(name, backend):
    fn, make = _TRACED[name]
    args = make()
    expected, got, caught, breaks = _compile_and_count(fn, *args, backend=backend, fullgraph=True)
    _assert_close(got, expected)
    assert [str(w.message) for w in caught] == []
    assert breaks == {}


@pytest.mark.parametrize(
    "name", ["per_sample_grads", "hessian", "jvp_of_grad", "vmap_pytrees", "vjp", "linearize"]
)
def test_inductor_compiles_the_transforms(name):
    fn, make = _TRACED[name]
    args = make()
    expected, got, _, breaks = _compile_and_count(fn, *args, backend="inductor", fullgraph=True)
    _assert_close(got, expected)
    assert breaks == {}


def _capturing_backend():
    """A backend that keeps the forward graphs AOTAutograd traces (and runs them as they are)."""
    graphs = []

    def backend(gm, inputs):
        from torch._functorch.aot_autograd import aot_module_simplified

        def fw(g, _):
            graphs.append(g)
            return g

        return aot_module_simplified(gm, inputs, fw_compiler=fw)

    return graphs, backend


def _predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()


def _predict_sum(weight, bias, x):
    return _predict(weight, bias, x).sum()


# forward mode with an operand that is not differentiated: torch's formula makes a zero tangent for
# it out of the tracer's sight (NOTE [Constants made out of a tracer's sight] in csrc/core/dispatch.cpp)
_FORWARD_WITH_CONSTANT_OPERAND = {
    "jacfwd_argnums_2": lambda w, b, x: ft.jacfwd(_predict, argnums=2)(w, b, x),
    "hessian_argnums_2": lambda w, b, x: ft.hessian(_predict_sum, argnums=2)(w, b, x),
    "vmap_hessian": lambda w, b, xs: ft.vmap(ft.hessian(_predict_sum, argnums=2), in_dims=(None, None, 0))(
        w, b, xs
    ),
    "vmap_jacfwd": lambda w, b, xs: ft.vmap(ft.jacfwd(_predict, argnums=2), in_dims=(None, None, 0))(
        w, b, xs
    ),
}


def _forward_args(name):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 5, generator=g, dtype=_F64), torch.randn(6, generator=g, dtype=_F64)
    x = (
        torch.randn(3, 5, generator=g, dtype=_F64)
        if name.startswith("vmap")
        else torch.randn(5, generator=g, dtype=_F64)
    )
    return w, b, x


@pytest.mark.parametrize("name", sorted(_FORWARD_WITH_CONSTANT_OPERAND))
def test_forward_mode_graphs_hold_no_real_constants(name):
    """The zero tangent of the undifferentiated weight is an op of the graph (aten.zeros), not a
    real tensor baked in as a constant (which Inductor refused)."""
    graphs, backend = _capturing_backend()

    fn, args = _FORWARD_WITH_CONSTANT_OPERAND[name], _forward_args(name)
    torch._dynamo.reset()
    _assert_close(torch.compile(fn, backend=backend, fullgraph=True)(*args), fn(*args))
    constants = [n.target for g in graphs for n in g.graph.nodes if n.op == "get_attr"]
    assert constants == [], constants
    # an expanded zero stays a 0-d tensor and an expand (a dense zeros would be filled and
    # multiplied through), and the basis is not aten.eye (an unvectorized loop in Inductor)
    nodes = [n for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    zero_d = [n for n in nodes if str(n.target) == "aten.scalar_tensor.default" and n.args[0] == 0]
    assert any(str(u.target) == "aten.expand.default" for n in zero_d for u in n.users), nodes
    assert not any(str(n.target) == "aten.eye.default" for n in nodes), nodes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["jacfwd_argnums_2", "vmap_hessian"])
def test_inductor_compiles_forward_mode_with_a_constant_operand(name):
    fn, args = _FORWARD_WITH_CONSTANT_OPERAND[name], _forward_args(name)
    expected, got, _, breaks = _compile_and_count(fn, *args, backend="inductor", fullgraph=True)
    _assert_close(got, expected)
    assert breaks == {}


def _max_then_tensordot(x, y):
    z = torch.maximum(x, y.reshape(2, 1))
    return torch.tensordot(z, y[:1], dims=1).sum()


def _jvp_of_hessian(x, y):
    h = ft.hessian(_max_then_tensordot, argnums=1)
    return ft.jvp(h, (x, y), (x.sin(), y.cos()))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_formula_constants_are_traced(backend):
    """maximum's forward formula makes a 0-d constant (scalar_tensor(0.5)) out of the tracer's
    sight: fake mode refused it as a real input, so jvp(hessian(f)) graph-broke (fullgraph:
    an error), and torch's error path then left its TLS exclude set behind, breaking every
    later forward-AD call in the process. It is now remade under the tracer."""
    x, y = torch.randn(2, 1, dtype=_F64), torch.randn(2, dtype=_F64)
    expected = tf.jvp(tf.hessian(_max_then_tensordot, argnums=1), (x, y), (x.sin(), y.cos()))
    got, _, _, breaks = _compile_and_count(_jvp_of_hessian, x, y, backend=backend, fullgraph=True)
    _assert_close(got, expected)
    assert breaks == {}


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_make_fx_of_forward_over_reverse(mode):
    """Under a real-mode trace every tensor is real: remaking zero-valued ones (as fake mode
    needs) cut a tracked intermediate from its autograd history and hit torch's internal
    assert on a view's tangent."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, y = torch.randn(2, 1, dtype=_F64), torch.randn(2, dtype=_F64)
    graph = make_fx(_jvp_of_hessian, tracing_mode=mode)(x, y)
    _assert_close(graph(x, y), _jvp_of_hessian(x, y))
    _assert_close(graph(x, y), tf.jvp(tf.hessian(_max_then_tensordot, argnums=1), (x, y), (x.sin(), y.cos())))


def _cosine(x, y):
    return F.cosine_similarity(x, y + 1, dim=-1)


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_composite_kernels_constants_are_traced(mode):
    """cosine_similarity's composite kernel makes its eps a 0-d tensor inside the level's front
    region, out of the tracer's sight; clamp_min's forward formula then compares against it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, y = torch.randn(3, 3, dtype=_F64), torch.randn(3, 3, dtype=_F64)
    graph = make_fx(lambda x, y: ft.jacfwd(_cosine)(x, y), tracing_mode=mode)(x, y)
    _assert_close(graph(x, y), tf.jacfwd(_cosine)(x, y))


def test_a_refused_call_under_forward_ad_leaves_no_dispatch_state_behind():
    """FakeTensorMode prints the call it refuses from inside its dispatch; under a live
    forward-AD level torch's printer failed there, and collecting what that failure left behind
    (pytest keeps the exception) restored a stale TLS exclude set: every later gradient in the
    process came out zero. Our repr describes such a tensor without its values."""
    import gc

    import torch.autograd.forward_ad as fwAD
    from torch._subclasses.fake_tensor import FakeTensorMode

    before = torch._C._dispatch_tls_local_exclude_set()
    mode = FakeTensorMode()
    with mode:
        fake = torch.empty(3)
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(3), torch.ones(3))
        with pytest.raises(AssertionError, match="not printable") as info, mode:
            torch.add(fake, dual)
    del info
    gc.collect()
    assert torch._C._dispatch_tls_local_exclude_set() == before
    w, x = torch.randn(3, dtype=_F64), torch.randn(3, dtype=_F64)
    _assert_close(ft.grad(lambda w: (x @ w).sin())(w), (x @ w).cos() * x)
    _assert_close(ft.jvp(torch.sin, (x,), (torch.ones_like(x),))[1], x.cos())


def test_the_graph_holds_plain_aten_ops():
    """What AOTAutograd traces through our levels is the batched computation itself."""
    graphs, backend = _capturing_backend()

    w, xs = torch.randn(3, dtype=_F64), torch.randn(6, 3, dtype=_F64)
    step = lambda w, xs: ft.vmap(ft.grad(lambda w, x: (x @ w).sin()), in_dims=(None, 0))(w, xs)  # noqa: E731
    torch._dynamo.reset()
    _assert_close(torch.compile(step, backend=backend, fullgraph=True)(w, xs), step(w, xs))
    ops = {n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    names = {str(t) for t in ops}
    assert "aten.mv.default" in names and "aten.cos.default" in names, [g.code for g in graphs]
    assert not any("flat_apply" in n for n in names), names


@pytest.mark.parametrize("name", sorted(_BREAKS))
def test_one_graph_break_per_call_where_not_traced(name):
    x = torch.randn(4)
    expected, got, caught, breaks = _compile_and_count(_BREAKS[name], x)
    _assert_close(got, expected)
    assert [str(w.message) for w in caught] == []
    assert breaks == {_SKIPPED: 1}, breaks


def test_transform_made_outside_called_inside():
    g = ft.vmap(ft.grad(_f))
    xs = _xs()
    expected, got, caught, breaks = _compile_and_count(lambda xs: g(xs + 1) * 2, xs, fullgraph=True)
    _assert_close(got, expected)
    assert caught == [] and breaks == {}


@pytest.mark.parametrize(
    "transformed, arg",
    [
        (ft.vmap(_fv), torch.randn(5, 3, dtype=_F64)),
        (ft.grad(_f), torch.randn(3, dtype=_F64)),
        (ft.jacrev(_fv), torch.randn(3, dtype=_F64)),
    ],
)
def test_compiling_the_transformed_function_itself(transformed, arg):
    """torch.compile(ft.vmap(f)) is traced: one graph, no break."""
    cnt = CompileCounterWithBackend("aot_eager")
    expected = transformed(arg)
    torch._dynamo.reset()
    _assert_close(torch.compile(transformed, backend=cnt, fullgraph=True)(arg), expected)
    assert cnt.frame_count == 1


def _closure_step(xs):
    y = xs.sum()
    return ft.vmap(lambda x: x.sin() * y)(xs) + 1  # a closure over a traced value


def test_a_closure_made_inside_the_compiled_function_runs_eagerly():
    """Dynamo cannot turn such a closure into a constant: a graph break (our reason in the log),
    the transform runs eagerly, the result is eager's; with fullgraph=True an error naming it."""
    xs = _xs()
    expected, got, caught, breaks = _compile_and_count(_closure_step, xs)
    _assert_close(got, expected)
    # after the break Dynamo sees the closure as a real function whose cell holds a tensor: y
    # becomes a graph input of the recorded call (never a stale constant, as the loop checks)
    compiled = torch.compile(_closure_step, backend="eager")
    for _ in range(2):  # new inputs, new y: the results follow
        xs = _xs() + 1
        _assert_close(compiled(xs), _closure_step(xs))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="defined inside the compiled function and captures"):
        torch.compile(_closure_step, backend="eager", fullgraph=True)(xs)


_W1, _B1, _W2 = torch.randn(8, 4, dtype=_F64), torch.randn(8, dtype=_F64), torch.randn(3, 8, dtype=_F64)
_CONV = torch.randn(4, 2, 3, 3, dtype=_F64)


def _mlp_loss(p, x, y):
    out = F.linear(F.relu(F.linear(x, p[0], p[1])), p[2])
    return F.cross_entropy(out[None], y[None])


def _clipped_sum(params, xs, ys):
    g = ft.vmap(ft.grad(_mlp_loss), in_dims=(None, 0, 0))(params, xs, ys)
    norms = torch.stack([t.flatten(1).norm(dim=1) for t in g]).norm(dim=0)
    scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    return [(t * scale.view(-1, *[1] * (t.dim() - 1))).sum(0) for t in g]


def _conv_loss(w, img):
    return F.conv2d(img[None], w, padding=1).tanh().mean()


def _view_mix(x):
    return x.view(2, -1).t().reshape(-1).cumsum(0)


# name -> (step, inputs for batch size B): every transform sees the batch size as a symbol.
_DYNAMIC = {
    "per_example_clipping": (
        _clipped_sum,
        lambda B: ((_W1, _B1, _W2), torch.randn(B, 4, dtype=_F64), torch.randint(0, 3, (B,))),
    ),
    "per_example_conv": (
        lambda w, imgs: ft.vmap(ft.grad(_conv_loss), in_dims=(None, 0))(w, imgs),
        lambda B: (_CONV, torch.randn(B, 2, 4, 4, dtype=_F64)),
    ),
    "vmap_in_dims_1_out_dims_1": (
        lambda xs: ft.vmap(torch.cos, in_dims=1, out_dims=1)(xs),
        lambda B: (torch.randn(4, B, dtype=_F64),),
    ),
    "vmap_unbatched_operand": (
        lambda xs, w: ft.vmap(torch.matmul, in_dims=(0, None))(xs, w),
        lambda B: (torch.randn(B, 4, dtype=_F64), torch.randn(4, 2, dtype=_F64)),
    ),
    "vmap_reductions": (
        lambda xs: ft.vmap(lambda x: F.log_softmax(x, -1).sum() + x.mean())(xs),
        lambda B: (torch.randn(B, 4, dtype=_F64),),
    ),
    "vmap_views": (lambda xs: ft.vmap(_view_mix)(xs), lambda B: (torch.randn(B, 6, dtype=_F64),)),
    "grad_of_a_variable_length": (
        lambda x: ft.grad(lambda x: (x.sin() * x).sum())(x),
        lambda B: (torch.randn(B, dtype=_F64),),
    ),
    "jacrev_of_a_variable_length": (
        lambda x: ft.jacrev(torch.sin)(x),
        lambda B: (torch.randn(B, dtype=_F64),),
    ),
}


@pytest.mark.parametrize("name", sorted(_DYNAMIC))
def test_dynamic_shapes_one_graph_for_every_batch_size(name):
    """NOTE [Symbolic batch sizes] (csrc/core/levels.h): with dynamic=True the batch size is a
    symbol through our levels, so batch sizes 5, 6, 7, 9 share one compiled graph; results
    equal eager's. (Sizes that coincide with another dim would be tied by Dynamo's duck sizing,
    for both libraries.)"""
    step, make = _DYNAMIC[name]
    cnt = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=cnt, dynamic=True, fullgraph=True)
    for b in (5, 6, 7, 9):
        torch.manual_seed(b)
        args = make(b)
        _assert_close(compiled(*args), step(*args))
    assert cnt.frame_count == 1


def test_dynamic_shapes_inductor_per_example_clipping():
    step, make = _DYNAMIC["per_example_clipping"]
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=cnt, dynamic=True, fullgraph=True)
    for b in (5, 7):
        args = make(b)
        _assert_close(compiled(*args), step(*args))
    assert cnt.frame_count == 1


def _hessian_rows(xs):
    return ft.vmap(ft.hessian(lambda x: x.sin().sum()))(xs)


def test_dynamic_shapes_specialize_where_a_number_is_needed():
    """Forward-mode formulas make zero tangents of the symbolic size where no tracer sees them
    (NOTE [Symbolic sizes, then specialized ones] in functorch_lite/_compile.py): the call is
    traced again with the sizes specialized, so it compiles once per batch size, with eager's
    results and no graph break."""
    cnt = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(_hessian_rows, backend=cnt, dynamic=True, fullgraph=True)
    for b in (5, 6, 5):
        xs = torch.randn(b, 4, dtype=_F64)
        _assert_close(compiled(xs), _hessian_rows(xs))
    assert cnt.frame_count == 2  # one per batch size, reused on the third call


def test_symbolic_failures_name_their_cause():
    """What forces the specialization is an error of the symbolic attempt; the debugging switch
    raises it instead."""
    from functorch_lite import _compile

    torch._dynamo.reset()
    _compile._RAISE_SYMBOLIC_FAILURES = True
    try:
        with pytest.warns(UserWarning, match="cannot trace this vmap call"), pytest.raises(Exception):
            torch.compile(_hessian_rows, backend="aot_eager", dynamic=True, fullgraph=True)(torch.randn(5, 4))
    finally:
        _compile._RAISE_SYMBOLIC_FAILURES = False


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_randomness_under_compile(randomness):
    torch._dynamo.reset()
    f = torch.compile(
        lambda xs: ft.vmap(lambda x: F.dropout(x, 0.5), randomness=randomness)(xs),
        backend="aot_eager",
        fullgraph=True,
    )
    out = f(torch.ones(6, 200, dtype=_F64))
    rows_equal = bool((out == out[0]).all())
    assert rows_equal == (randomness == "same")
    assert 0.3 < float((out == 0).double().mean()) < 0.7
    torch._dynamo.reset()
    with pytest.raises(Exception, match="randomness"):  # randomness="error" refuses, compiled too
        torch.compile(lambda xs: ft.vmap(lambda x: F.dropout(x, 0.5))(xs), backend="aot_eager")(
            torch.ones(6, 20)
        )


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


def test_transformed_functions_keep_the_wrapped_function_metadata():
    g = ft.vmap(ft.grad(_f))
    assert g.__name__ == "_f" and g.__wrapped__.__wrapped__ is _f and g.__doc__ == _f.__doc__
    assert "functorch_lite.vmap" in repr(g)

    class M:
        scale = 2.0

        @ft.grad  # binds like a function: argnums=0 is self, as with torch.func.grad
        def method(self, x):
            return (x * self.scale).sum()

    with pytest.raises(ValueError, match="argument 0"):
        M().method(torch.ones(3))
    M.method2 = ft.grad(lambda self, x: (x * self.scale).sum(), argnums=1)
    _assert_close(M().method2(torch.ones(3)), torch.full((3,), 2.0))


# ---- a training step with ft.dp


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _dp_step(model, x, y):
    grads = ft.dp.clipped_grad_module(model, _ce, x, y, max_norm=0.5)
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
    # clipped_grad is a transform like vmap: traced into the graph (the model as an argument)
    for backend in ("eager", "aot_eager"):
        expected, got, caught, breaks = _compile_and_count(
            lambda x, y: step(model, x, y), x, y, backend=backend, fullgraph=True
        )
        _assert_close(got, expected)
        assert caught == [] and breaks == {}

    def trainer():
        model, opt = _model()
        return model, ft.dp.PrivateTrainer(
            model,
            opt,
            _ce,
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
        grads = ft.dp.clipped_grad_module(model, _ce, x, y, max_norm=0.5)
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

    _assert_close(torch.compile(step)(w, xs), step(w, xs))  # a closure: one break, eager


def _data_dependent(x):
    return (x[x > 0] ** 2).sum()  # the shape of x[x > 0] depends on the data


def test_untraceable_transform_falls_back_with_a_one_line_reason():
    """A transform whose tracing fails (a data-dependent shape here) graph-breaks and runs eagerly,
    with a warning saying why; with fullgraph=True the compile fails, after the same warning."""
    x = torch.tensor([0.5, -1.0, 2.0, -0.1], dtype=_F64)
    step = lambda x: ft.grad(_data_dependent)(x) + 1  # noqa: E731
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="cannot trace this grad call .*DynamicOutputShape"):
        got = torch.compile(step, backend="aot_eager")(x)
    _assert_close(got, step(x))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="cannot trace this grad call"), pytest.raises(Exception):
        torch.compile(step, backend="aot_eager", fullgraph=True)(x)


_W = torch.randn(3, 4, dtype=_F64)


def _reads_global(x):
    return (x @ _W).sin()


def test_global_tensors_a_function_reads_become_graph_inputs():
    """A tensor the transformed function reads from its module's globals is lifted into a graph
    input (NOTE [Captured tensors become graph inputs] in functorch_lite/_compile.py): one graph
    with fullgraph=True, and the compiled step follows a rebinding of the global and a write
    into it, as eager does (it is never a stale constant)."""
    global _W
    xs = torch.randn(5, 3, dtype=_F64)
    vf = ft.vmap(_reads_global)
    for backend in ("aot_eager", "inductor"):
        expected, got, _, breaks = _compile_and_count(
            lambda xs: vf(xs) * 2, xs, backend=backend, fullgraph=True
        )
        _assert_close(got, expected)
        assert breaks == {}
    compiled = torch.compile(lambda xs: vf(xs) * 2, backend="aot_eager", fullgraph=True)
    old = _W
    try:
        _W = torch.randn(3, 4, dtype=_F64)
        _assert_close(compiled(xs), vf(xs) * 2)  # the new tensor
        _W.mul_(3)
        _assert_close(compiled(xs), vf(xs) * 2)  # its new values
    finally:
        _W = old


def _make_conv_closure(weight, biases):
    def one(img):  # reads a tensor and a list of tensors from its closure
        return F.conv2d(img[None], weight, biases[0])[0] + biases[1]

    return one


def test_tensors_in_a_closure_become_graph_inputs():
    """A function made outside the compiled function whose closure holds tensors (or a list of
    them), as `lambda x: f(x, w)` patterns do: lifted into graph inputs, one graph on every
    backend, equal to eager; an in-place change of the captured weight is seen."""
    w = torch.randn(4, 3, 3, 3, dtype=_F64)
    biases = [torch.randn(4, dtype=_F64), torch.randn(4, 1, 1, dtype=_F64)]
    vf = ft.vmap(_make_conv_closure(w, biases))
    xs = torch.randn(2, 3, 6, 6, dtype=_F64)
    for backend in ("eager", "aot_eager", "inductor"):
        expected, got, _, breaks = _compile_and_count(vf, xs, backend=backend, fullgraph=True)
        _assert_close(got, expected)
        assert breaks == {}
    g = ft.grad(lambda x: _make_conv_closure(w, biases)(x).square().sum())
    expected, got, _, breaks = _compile_and_count(
        lambda x: ft.vmap(g)(x), xs, backend="aot_eager", fullgraph=True
    )
    _assert_close(got, expected)
    compiled = torch.compile(vf, backend="aot_eager", fullgraph=True)
    w.mul_(-2)
    _assert_close(compiled(xs), vf(xs))


_NET = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()


def _reads_module(x):
    return _NET(x[None]).sum()


def _tutorial_loss(params, x, y):  # torch.func's per-sample-gradients tutorial: a global model
    return F.cross_entropy(ft.functional_call(_NET, params, (x[None],)), y[None])


def test_modules_read_from_outside_become_graph_inputs():
    """A module the transformed function reads from its globals or closure (the tutorials'
    `functional_call(model, params, x)`, or the module called as it is): its parameters and
    buffers become guarded graph inputs and the recorded call runs with them swapped in (NOTE
    [Captured tensors become graph inputs]). One graph on every backend, eager's values, the
    module's own tensors in place afterwards, and a weight changed in place or rebound is seen."""
    global _NET
    xs, ys = torch.randn(5, 3, dtype=_F64), torch.randint(0, 2, (5,))
    params = {k: v.detach() + 0.1 for k, v in _NET.named_parameters()}
    own = {k: v for k, v in [*_NET.named_parameters(), *_NET.named_buffers()]}
    psg = ft.vmap(ft.grad(_tutorial_loss), in_dims=(None, 0, 0))
    direct = ft.vmap(ft.grad(_reads_module))
    held = (lambda net: ft.vmap(ft.grad(lambda x: net(x[None]).sum())))(_NET)  # a closure cell
    for backend in ("aot_eager", "inductor"):
        for fn, args in ((psg, (params, xs, ys)), (direct, (xs,)), (held, (xs,))):
            expected, got, _, breaks = _compile_and_count(fn, *args, backend=backend, fullgraph=True)
            torch.testing.assert_close(got, expected)
            assert breaks == {}
            assert {k: v for k, v in [*_NET.named_parameters(), *_NET.named_buffers()]} == own
    compiled = torch.compile(direct, backend="aot_eager", fullgraph=True)
    old = _NET[0].weight
    try:
        with torch.no_grad():
            _NET[0].weight.mul_(2)
        _assert_close(compiled(xs), direct(xs))
        _NET[0].weight = nn.Parameter(torch.randn(4, 3, dtype=_F64))
        _assert_close(compiled(xs), direct(xs))
    finally:
        _NET[0].weight = old


_SCALE = 2.0
_MODE = "sin"


def _reads_numbers_and_strings(x):
    return (x.sin() if _MODE == "sin" else x.cos()) * _SCALE


def test_numbers_and_strings_read_from_outside_are_guarded():
    """NOTE [Captured numbers are guarded]: a number or a string the transformed function reads
    from its globals or closure is seen again when rebound (it was the first trace's value
    before: a silently stale constant)."""
    global _SCALE, _MODE
    xs = torch.randn(4, 3, dtype=_F64)
    vf = ft.vmap(_reads_numbers_and_strings)
    held = (lambda k, name: ft.vmap(lambda x: getattr(torch, name)(x) * k))(3, "tanh")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: vf(x), backend="aot_eager", fullgraph=True)
    compiled_held = torch.compile(lambda x: held(x), backend="aot_eager", fullgraph=True)
    _assert_close(compiled_held(xs), held(xs))
    old = (_SCALE, _MODE)
    try:
        for scale, mode in ((2.0, "sin"), (5.0, "sin"), (5.0, "cos"), (-1.5, "sin")):
            _SCALE, _MODE = scale, mode
            _assert_close(compiled(xs), vf(xs))
    finally:
        _SCALE, _MODE = old
