"""User batching rules written in Python: ft.register_vmap and torch.library.register_vmap
(NOTE [User batching rules] in csrc/vmap/fallback.h, docs/extending.md).

The ops here compute through numpy, so nothing below them can be batched: a result that matches
a Python for-loop under set_vmap_fallback('error') proves that the rule ran (the for-loop fallback
would raise), and the rules count their calls to prove it once more."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import Tensor

import functorch_lite as ft
from functorch_lite import _rules

NS = "ftl_test_rv"
calls = {}


def _np(x):
    return x.detach().cpu().numpy()


def _count(name):
    calls[name] = calls.get(name, 0) + 1


# ---- ops


@torch.library.custom_op(f"{NS}::cube", mutates_args=())
def np_cube(x: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(_np(x) ** 3))


@np_cube.register_fake
def _(x):
    return torch.empty_like(x)


def _cube_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _cube_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * 3 * x**2


np_cube.register_autograd(_cube_backward, setup_context=_cube_setup)


@ft.register_vmap(np_cube)
def _cube_rule(info, in_dims, x):
    _count("cube")
    calls["cube_info"] = info
    return np_cube(x), in_dims[0]


@torch.library.custom_op(f"{NS}::mul", mutates_args=())
def np_mul(x: Tensor, y: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(_np(x) * _np(y)))


def _mul_rule(info, in_dims, x, y):
    # torch.library.register_vmap's documented example
    _count("mul")
    x_bdim, y_bdim = in_dims
    x = x.movedim(x_bdim, -1) if x_bdim is not None else x.unsqueeze(-1)
    y = y.movedim(y_bdim, -1) if y_bdim is not None else y.unsqueeze(-1)
    return np_mul(x, y).movedim(-1, 0), 0


# Registered with torch's own API after functorch_lite was imported.
torch.library.register_vmap(f"{NS}::mul", _mul_rule)


@torch.library.custom_op(f"{NS}::split2", mutates_args=())
def np_split2(x: Tensor) -> tuple[Tensor, Tensor]:
    a = _np(x)
    return torch.from_numpy(np.ascontiguousarray(a * 2)), torch.from_numpy(np.ascontiguousarray(a.sum(-1)))


@np_split2.register_vmap
def _split2_rule(info, in_dims, x):
    _count("split2")
    x = x.movedim(in_dims[0], 0)
    return np_split2(x), (0, 0)


@torch.library.custom_op(f"{NS}::wsum", mutates_args=())
def np_wsum(xs: list[Tensor], w: float) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(sum(_np(x) for x in xs) * w))


@ft.register_vmap(f"{NS}::wsum")
def _wsum_rule(info, in_dims, xs, w):
    _count("wsum")
    calls["wsum_in_dims"] = in_dims
    xs = [
        x.movedim(d, 0) if d is not None else x.expand(info.batch_size, *x.shape)
        for x, d in zip(xs, in_dims[0])
    ]
    return np_wsum(xs, w), 0


# An op defined with the low-level torch.library API (not a custom_op): its rule lives only in
# the closure torch registers on its FuncTorchBatched key.
_lib = torch.library.Library(NS, "DEF")
_lib.define("twice(Tensor x) -> Tensor")
_lib.impl("twice", lambda x: torch.from_numpy(np.ascontiguousarray(_np(x) * 2)), "CPU")


@torch.library.register_vmap(f"{NS}::twice")
def _twice_rule(info, in_dims, x):
    _count("twice")
    return torch.ops.ftl_test_rv.twice(x), in_dims[0]


# A mis-written rule, changed per test.
@torch.library.custom_op(f"{NS}::bad", mutates_args=())
def np_bad(x: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(_np(x) + 1))


def _loop(f, *args, in_dims=0):
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    n = next(a.size(d) for a, d in zip(args, dims) if d is not None)
    outs = [f(*[a.select(d, i) if d is not None else a for a, d in zip(args, dims)]) for i in range(n)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


@pytest.fixture(autouse=True)
def _strict(fallback_mode):
    calls.clear()
    with fallback_mode("error"):
        yield


# ---- basics


def test_register_vmap_rule_runs_instead_of_the_fallback():
    x = torch.randn(4, 3)
    out = ft.vmap(np_cube)(x)
    torch.testing.assert_close(out, x**3)
    assert calls["cube"] == 1
    assert calls["cube_info"] == (4, "error")
    assert type(calls["cube_info"]).__name__ == "VmapInfo"


def test_matches_torch_func_vmap():
    x, y = torch.randn(5, 3), torch.randn(3)
    torch.testing.assert_close(
        ft.vmap(np_mul, in_dims=(0, None))(x, y), torch.func.vmap(np_mul, in_dims=(0, None))(x, y)
    )


def test_info_randomness_and_batch_size_follow_vmap():
    x = torch.randn(2, 3)
    ft.vmap(np_cube, randomness="same")(x)
    assert calls["cube_info"] == (2, "same")
    ft.vmap(np_cube, randomness="different")(x)
    assert calls["cube_info"] == (2, "different")


def test_torch_library_register_vmap_is_honoured():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(ft.vmap(np_mul)(x, y), x * y)
    assert calls["mul"] == 1


def test_custom_op_register_vmap_method_is_honoured_and_multiple_outputs():
    x = torch.randn(4, 3)
    a, b = ft.vmap(np_split2)(x)
    assert calls["split2"] == 1
    ra, rb = torch.func.vmap(np_split2)(x)
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(b, rb)


def test_rule_of_a_library_defined_op():
    x = torch.randn(4, 3)
    torch.testing.assert_close(ft.vmap(torch.ops.ftl_test_rv.twice)(x), 2 * x)
    torch.testing.assert_close(ft.vmap(torch.ops.ftl_test_rv.twice, in_dims=1)(x), 2 * x.t())
    assert calls["twice"] == 2


def test_in_dims_none_and_negative():
    x, y = torch.randn(3, 5), torch.randn(3)
    out = ft.vmap(np_mul, in_dims=(-1, None))(x, y)
    torch.testing.assert_close(out, _loop(np_mul, x, y, in_dims=(-1, None)))
    torch.testing.assert_close(out, torch.func.vmap(np_mul, in_dims=(-1, None))(x, y))


def test_rule_not_called_when_nothing_is_batched():
    x, c = torch.randn(4, 3), torch.randn(3)

    def f(x):
        return x + np_cube(c)  # c is captured: nothing batched at this level

    torch.testing.assert_close(ft.vmap(f)(x), x + c**3)
    assert "cube" not in calls


def test_tensor_list_argument_gets_a_list_of_in_dims():
    a, b = torch.randn(4, 3), torch.randn(3)
    out = ft.vmap(lambda a: np_wsum([a, b], 0.5))(a)
    torch.testing.assert_close(out, (a + b) * 0.5)
    assert calls["wsum_in_dims"] == ([0, None], None)


def test_nested_vmap_calls_the_rule_at_each_level():
    x = torch.randn(2, 3, 4)
    out = ft.vmap(ft.vmap(np_cube))(x)
    torch.testing.assert_close(out, x**3)
    assert calls["cube"] == 2
    y = torch.randn(3, 4)
    out = ft.vmap(ft.vmap(np_mul, in_dims=(0, None)), in_dims=(None, 0))(y, x.sum(1))
    torch.testing.assert_close(
        out, torch.func.vmap(torch.func.vmap(np_mul, in_dims=(0, None)), in_dims=(None, 0))(y, x.sum(1))
    )


def test_chunked_vmap_and_out_dims():
    x = torch.randn(5, 3)
    torch.testing.assert_close(ft.vmap(np_cube, chunk_size=2, out_dims=1)(x), (x**3).t())


# ---- composition with grad / jvp


def test_vmap_of_grad_uses_the_registered_autograd_formula():
    x = torch.randn(4, 3)
    out = ft.vmap(ft.grad(lambda x: np_cube(x).sum()))(x)
    # torch.func cannot run grad over a register_autograd custom op; plain autograd per element.
    expected = _loop(lambda xi: torch.autograd.grad(np_cube(xi.requires_grad_()).sum(), xi)[0], x.clone())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, 3 * x**2)


def test_grad_of_vmap_differentiates_through_the_rule():
    x = torch.randn(4, 3)
    out = ft.grad(lambda x: ft.vmap(np_cube)(x).sum())(x)
    torch.testing.assert_close(out, 3 * x**2)
    assert calls["cube"] == 1


def test_jacrev_of_vmapped_rule_op():
    x = torch.randn(3, 2)
    jr = ft.jacrev(ft.vmap(np_cube))(x)
    torch.testing.assert_close(jr, torch.autograd.functional.jacobian(lambda x: x**3, x))


def test_second_order_with_rule_inside():
    # (custom ops get no forward-mode formula from register_autograd, so jacrev of jacrev)
    x = torch.randn(4, 3)
    h = ft.vmap(ft.jacrev(ft.jacrev(lambda x: np_cube(x).sum())))(x)
    torch.testing.assert_close(h, torch.diag_embed(6 * x))


# ---- overriding our own rules, ops given as packets / overloads / strings


def test_rule_for_an_aten_op_wins_over_the_cpp_rule_and_is_removable():
    seen = []

    def sin_rule(info, in_dims, x):
        seen.append(in_dims)
        return x.cos(), in_dims[0]  # deliberately wrong: proves it is used

    x = torch.randn(3, 2)
    ft.register_vmap(torch.ops.aten.sin.default, sin_rule)
    try:
        torch.testing.assert_close(ft.vmap(torch.sin)(x), x.cos())
        assert seen == [(0,)]
    finally:
        _rules.deregister_vmap(torch.ops.aten.sin.default)
    torch.testing.assert_close(ft.vmap(torch.sin)(x), x.sin())
    assert seen == [(0,)]


def test_op_spellings_resolve_to_the_same_rule():
    assert _rules._name(_rules._resolve(np_cube, "t")) == f"{NS}::cube"
    assert _rules._name(_rules._resolve(torch.ops.ftl_test_rv.cube, "t")) == f"{NS}::cube"
    assert _rules._name(_rules._resolve(f"{NS}::cube", "t")) == f"{NS}::cube"
    assert _rules._name(_rules._resolve("aten::add.Tensor", "t")) == "aten::add.Tensor"


def test_bad_op_arguments():
    with pytest.raises(TypeError, match="register_vmap"):
        ft.register_vmap(3, lambda *a: None)
    with pytest.raises(ValueError, match="no operator"):
        ft.register_vmap(f"{NS}::does_not_exist", lambda *a: None)
    with pytest.raises(TypeError, match="callable"):
        ft.register_vmap(np_bad, 3)


def test_decorator_returns_the_function():
    def rule(info, in_dims, x):
        return np_bad(x), in_dims[0]

    try:
        assert ft.register_vmap(np_bad)(rule) is rule
    finally:
        _rules.deregister_vmap(np_bad)


# ---- rules that return the wrong thing


@pytest.mark.parametrize(
    "rule, exc, match",
    [
        (lambda info, d, x: np_bad(x), RuntimeError, "ftl_test_rv::bad.*two returns"),
        (lambda info, d, x: (np_bad(x), 0, 0), RuntimeError, "ftl_test_rv::bad.*Got 3 returns"),
        (lambda info, d, x: ((np_bad(x), np_bad(x)), (0, 0)), RuntimeError, "ftl_test_rv::bad.*schema"),
        (lambda info, d, x: (np_bad(x), (0, 0)), RuntimeError, "ftl_test_rv::bad.*incompatible"),
        (lambda info, d, x: (np_bad(x), 5), RuntimeError, "ftl_test_rv::bad.*out_dim=5"),
        (lambda info, d, x: (np_bad(x), "0"), RuntimeError, "ftl_test_rv::bad.*int or None"),
        (lambda info, d, x: (np_bad(x)[:1], 0), RuntimeError, "ftl_test_rv::bad.*batch size 3"),
        (lambda info, d, x: (7, None), RuntimeError, "ftl_test_rv::bad"),
    ],
)
def test_wrong_structure_is_a_clear_error_naming_the_op(rule, exc, match):
    ft.register_vmap(np_bad, rule)
    try:
        with pytest.raises(exc, match=match):
            ft.vmap(np_bad)(torch.randn(3, 2))
    finally:
        _rules.deregister_vmap(np_bad)


def test_exception_in_rule_propagates_with_its_type():
    def rule(info, in_dims, x):
        raise ValueError("my rule failed")

    ft.register_vmap(np_bad, rule)
    try:
        with pytest.raises(ValueError, match="my rule failed"):
            ft.vmap(np_bad)(torch.randn(3, 2))
        assert ft._C._stack_depth() == 0
    finally:
        _rules.deregister_vmap(np_bad)


def test_rule_may_call_vmap_itself():
    def rule(info, in_dims, x):
        # A transform entered while the rule's own level is hidden.
        return ft.vmap(lambda r: r + 1, in_dims=in_dims[0])(x), 0

    ft.register_vmap(np_bad, rule)
    try:
        x = torch.randn(2, 3)
        torch.testing.assert_close(ft.vmap(np_bad, in_dims=1)(x), x.t() + 1)
        torch.testing.assert_close(ft.vmap(ft.vmap(np_bad))(x), x + 1)
    finally:
        _rules.deregister_vmap(np_bad)


def test_in_place_rule_returns_the_batched_argument():
    @torch.library.custom_op(f"{NS}::add_one_", mutates_args=("x",))
    def add_one_(x: Tensor) -> None:
        x.add_(1)

    def rule(info, in_dims, x):
        add_one_(x)
        return None, None

    ft.register_vmap(add_one_, rule)

    def f(x):
        x = x.clone()
        add_one_(x)
        return x

    x = torch.randn(3, 2)
    torch.testing.assert_close(ft.vmap(f)(x), x + 1)


# ---- rules registered with torch before functorch_lite is imported

_BEFORE_IMPORT = textwrap.dedent(
    """
    import numpy as np, torch
    lib = torch.library.Library("ftl_test_rv_pre", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: torch.from_numpy(x.numpy() * 2), "CPU")
    hits = []
    def rule(info, in_dims, x):
        hits.append(info.batch_size)
        return torch.ops.ftl_test_rv_pre.twice(x), in_dims[0]
    torch.library.register_vmap("ftl_test_rv_pre::twice", rule)

    @torch.library.custom_op("ftl_test_rv_pre::neg", mutates_args=())
    def neg(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(-x.numpy())
    neg.register_vmap(lambda info, in_dims, x: (hits.append(-1) or neg(x), in_dims[0]))

    import functorch_lite as ft
    ft.set_vmap_fallback("error")
    x = torch.randn(3, 2)
    assert torch.equal(ft.vmap(torch.ops.ftl_test_rv_pre.twice)(x), 2 * x)
    assert torch.equal(ft.vmap(neg)(x), -x)
    print(hits)
    """
)


def test_rules_registered_before_import_are_found():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", _BEFORE_IMPORT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[3, -1]"


def test_jvp_and_grad_of_vmap_differentiate_through_the_rules_ops():
    def rule(info, in_dims, x):
        return x.sin() + 1, in_dims[0]  # torch ops: the outer levels differentiate these

    ft.register_vmap(np_bad, rule)
    try:
        x, t = torch.randn(3, 2), torch.randn(3, 2)
        out, tangent = ft.jvp(ft.vmap(np_bad), (x,), (t,))
        torch.testing.assert_close(out, x.sin() + 1)
        torch.testing.assert_close(tangent, x.cos() * t)
        expected = torch.autograd.functional.jacobian(lambda x: x.sin() + 1, x)
        torch.testing.assert_close(ft.jacfwd(ft.vmap(np_bad))(x), expected)
        torch.testing.assert_close(ft.grad(lambda x: ft.vmap(np_bad)(x).sum())(x), x.cos())
    finally:
        _rules.deregister_vmap(np_bad)
