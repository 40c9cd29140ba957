"""A user's TorchFunctionMode / TorchDispatchMode around a transform, and tensor subclasses as
inputs (nn.Parameter, a __torch_function__ subclass): as in torch.func (issue 15)."""

import pytest
import torch
import torch.func as tf
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import functorch_lite as ft
from functorch_lite._load import _C


class _FunctionMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _DispatchMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.wrapped_args = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor) and (
                _C._wrapper_info(a) is not None or torch._C._functorch.is_functorch_wrapped_tensor(a)
            ):
                self.wrapped_args += 1
        return func(*args, **(kwargs or {}))


def _f(x):
    return (x.sin() * 2).sum()


def _fv(x):
    return x.sin() * 2


_TRANSFORMS = {
    "vmap": lambda L: L.vmap(_fv),
    "grad": lambda L: L.grad(_f),
    "vmap_grad": lambda L: L.vmap(L.grad(_f)),
    "vjp": lambda L: lambda x: L.vjp(_fv, x)[1](torch.ones_like(x))[0],
    "jvp": lambda L: lambda x: L.jvp(_fv, (x,), (torch.ones_like(x),))[1],
    "jacrev": lambda L: L.jacrev(_fv),
    "jacfwd": lambda L: L.jacfwd(_fv),
    "hessian": lambda L: L.hessian(_f),
    "linearize": lambda L: lambda x: L.linearize(_fv, x)[1](torch.ones_like(x)),
}


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_torch_function_mode_around_a_transform(name):
    x = torch.randn(4, 3)
    expected = _TRANSFORMS[name](tf)(x)
    ours, theirs = _FunctionMode(), _FunctionMode()
    with ours:
        got = _TRANSFORMS[name](ft)(x)
    with theirs:
        _TRANSFORMS[name](tf)(x)
    torch.testing.assert_close(got, expected)
    # the mode sees the user's torch functions, as under torch.func
    assert "sin" in ours.names and "sin" in theirs.names
    assert "requires_grad_" not in ours.names


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
def test_torch_dispatch_mode_around_a_transform_sees_plain_tensors(name):
    x = torch.randn(4, 3)
    expected = _TRANSFORMS[name](tf)(x)
    ours, theirs = _DispatchMode(), _DispatchMode()
    with ours:
        got = _TRANSFORMS[name](ft)(x)
    with theirs:
        _TRANSFORMS[name](tf)(x)
    torch.testing.assert_close(got, expected)
    assert "aten.sin.default" in ours.ops and "aten.sin.default" in theirs.ops
    # the mode sits below every transform: plain tensors only, as under torch.func
    assert ours.wrapped_args == 0 and theirs.wrapped_args == 0
    if name not in ("vmap", "jvp", "linearize"):  # the backward ran under the mode too
        assert "aten.cos.default" in ours.ops


def test_dispatch_mode_inside_the_transformed_function():
    # a mode entered inside the function also sees the ops on plain values
    mode = _DispatchMode()

    def f(x):
        with mode:
            return (x.exp() * x).sum()

    x = torch.randn(3)
    torch.testing.assert_close(ft.grad(f)(x), tf.grad(lambda x: (x.exp() * x).sum())(x))
    assert "aten.exp.default" in mode.ops and mode.wrapped_args == 0
    mode.ops.clear()
    xs = torch.randn(2, 3)
    torch.testing.assert_close(ft.vmap(f)(xs), (xs.exp() * xs).sum(1))
    assert "aten.exp.default" in mode.ops and mode.wrapped_args == 0


class _Logged(torch.Tensor):
    """A __torch_function__ subclass (no __torch_dispatch__)."""

    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        _Logged.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("name", sorted(_TRANSFORMS))
@pytest.mark.parametrize("kind", ["parameter", "torch_function_subclass"])
def test_subclass_inputs_behave_as_in_torch_func(name, kind):
    base = torch.randn(4, 3)
    x = torch.nn.Parameter(base.clone()) if kind == "parameter" else base.clone().as_subclass(_Logged)
    got = _TRANSFORMS[name](ft)(x)
    if name == "linearize" and kind == "torch_function_subclass":
        # torch.func.linearize's make_fx fails on the subclass (alias.default returns
        # NotImplemented): its definition, torch.func.jvp, is the oracle
        expected = _TRANSFORMS["jvp"](tf)(x)
    else:
        expected = _TRANSFORMS[name](tf)(x)
    assert type(got) is type(expected)
    assert got.requires_grad == expected.requires_grad
    torch.testing.assert_close(
        got.detach().as_subclass(torch.Tensor), expected.detach().as_subclass(torch.Tensor)
    )


@pytest.mark.parametrize("name", ["vmap", "grad", "jacrev", "jvp"])
def test_parameter_input_stays_differentiable_by_torch_autograd(name):
    base = torch.randn(4, 3)
    p_ours, p_ref = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    _TRANSFORMS[name](ft)(p_ours).sum().backward()
    _TRANSFORMS[name](tf)(p_ref).sum().backward()
    torch.testing.assert_close(p_ours.grad, p_ref.grad)


def _writes_zeros_through_a_view(x):
    z = torch.zeros(3, dtype=x.dtype)
    z[1:].copy_(x[:2].sin())  # a view of a tensor of zeros, written in place
    return (z * x).sum()


@pytest.mark.parametrize("name", ["grad", "jacfwd", "hessian", "jacfwd_of_identity_basis"])
def test_a_dispatch_mode_does_not_break_writes_through_views_of_zeros(name):
    """Under a Python mode our back kernel remakes real zero tensors for tracers (NOTE [Zeros made
    out of a tracer's sight]); one that an op returns a view of must keep its identity, or the
    writes through the view go to the copy (hessian under a TorchDispatchMode returned zeros)."""
    x = torch.randn(3, dtype=torch.float64)
    run = {
        "grad": lambda: ft.grad(_writes_zeros_through_a_view)(x),
        "jacfwd": lambda: ft.jacfwd(_writes_zeros_through_a_view)(x),
        "hessian": lambda: ft.hessian(_writes_zeros_through_a_view)(x),
        "jacfwd_of_identity_basis": lambda: ft.jacfwd(torch.sin)(x),
    }[name]
    expected = run()
    with _DispatchMode():
        got = run()
    torch.testing.assert_close(got, expected)


def _max_then_tensordot(x, y):
    z = torch.maximum(x, y.reshape(2, 1))
    return torch.tensordot(z, y[:1], dims=1).sum()


def test_forward_over_reverse_under_a_user_dispatch_mode():
    """A user's TorchDispatchMode is no tracer: the back kernel leaves real zeros alone under it
    (NOTE [Constants made out of a tracer's sight]). Remaking them made jvp(hessian(f)) of this f hit
    torch's internal assert on a view's tangent (found by running the fuzzer's programs under a
    no-op mode)."""
    x, y = torch.randn(2, 1, dtype=torch.float64), torch.randn(2, dtype=torch.float64)

    def run(lib):
        h = lib.hessian(_max_then_tensordot, argnums=1)
        return lib.jvp(h, (x, y), (x.sin(), y.cos()))

    expected = run(ft)
    with _DispatchMode():
        got = run(ft)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, run(tf))
