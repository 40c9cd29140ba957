"""ft.linearize, differential against torch.func.linearize (issue 15)."""

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

import functorch_lite as ft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch.func's const folding


def _same(a, b, atol=1e-5):
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor)
            assert x.shape == y.shape and x.dtype == y.dtype
            torch.testing.assert_close(x.detach(), y.detach(), atol=atol, rtol=1e-4)
        else:
            assert x == y


def _randn_like(tree):
    return tree_map(lambda p: torch.randn_like(p), tree)


def _mlp_params():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return m, {k: v.detach() for k, v in m.named_parameters()}


_x = torch.randn(3)
_M, _P = _mlp_params()
_CASES = {
    "sin": (torch.sin, (_x,)),
    "two_args": (lambda a, b: (a * b).sin() + a, (_x, torch.randn(3))),
    "matmul": (lambda a, b: a @ b, (torch.randn(2, 3), torch.randn(3, 4))),
    "tuple_out": (lambda a: (a.exp(), a.sum()), (_x,)),
    "dict_io": (lambda d: {"o": d["a"].sin() * d["b"], "p": d["a"]}, ({"a": _x, "b": _x * 2},)),
    "complex_nonholomorphic": (lambda z: z * z.conj() + z.abs(), (torch.randn(3, dtype=torch.complex64),)),
    "complex_holomorphic": (lambda z: z.exp() * z, (torch.randn(3, dtype=torch.complex128),)),
    "real_to_complex": (lambda a: torch.polar(a, a), (_x.abs(),)),
    "mlp": (lambda p: ft.functional_call(_M, p, (torch.ones(5, 3),)), (_P,)),
    "softmax_layernorm": (lambda a: F.layer_norm(a.softmax(-1), (3,)), (torch.randn(2, 3),)),
    "inplace": (lambda a: a.clone().mul_(2).sin_(), (_x,)),
    "float64": (lambda a: a.pow(3), (torch.randn(3, dtype=torch.float64),)),
}


def _func_for_oracle(name, func):
    if name == "mlp":  # the oracle's own functional_call, so that it does not run ours
        return lambda p: tf.functional_call(_M, p, (torch.ones(5, 3),))
    return func


@pytest.mark.parametrize("name", sorted(_CASES))
def test_matches_torch_func(name):
    func, primals = _CASES[name]
    oracle = _func_for_oracle(name, func)
    out, jvp_fn = ft.linearize(func, *primals)
    ref_out, ref_jvp_fn = tf.linearize(oracle, *primals)
    _same(out, ref_out)
    tangents = _randn_like(primals)
    _same(jvp_fn(*tangents), ref_jvp_fn(*tangents))
    # jvp_fn is reusable. torch.func's jvp_fn is not, for "inplace": its replayed graph gives
    # other values from its second call on, so every call is checked against torch.func.jvp.
    for _ in range(2):
        tangents = _randn_like(primals)
        _same(jvp_fn(*tangents), tf.jvp(oracle, primals, tangents)[1])


@pytest.mark.parametrize("name", ["sin", "two_args", "matmul", "tuple_out", "mlp"])
def test_vmap_of_jvp_fn_gives_jacobian_columns(name):
    func, primals = _CASES[name]
    _, jvp_fn = ft.linearize(func, *primals)
    _, ref_jvp_fn = tf.linearize(_func_for_oracle(name, func), *primals)
    basis = _randn_like(tree_map(lambda p: p.expand(4, *p.shape), primals))
    _same(ft.vmap(jvp_fn)(*basis), tf.vmap(ref_jvp_fn)(*basis))


def test_vmap_jvp_fn_standard_basis_is_the_jacobian():
    x = torch.randn(4)
    _, jvp_fn = ft.linearize(lambda a: a.sin() * a.sum(), x)
    cols = ft.vmap(jvp_fn)(torch.eye(4))  # row i is J e_i, a column of J
    _same(cols.T, tf.jacfwd(lambda a: a.sin() * a.sum())(x))


def test_linear_in_the_tangent():
    x, t = torch.randn(3), torch.randn(3)
    _, jvp_fn = ft.linearize(lambda a: a.sin().cumsum(0), x)
    _same(jvp_fn(2 * t), 2 * jvp_fn(t))
    _same(jvp_fn(t + t.flip(0)), jvp_fn(t) + jvp_fn(t.flip(0)))


def test_non_differentiable_and_non_tensor_outputs():
    x, t = torch.randn(3), torch.randn(3)

    def f(a):
        return a.sin(), a.argmax(), 3.0, torch.ones(2)

    out, jvp_fn = ft.linearize(f, x)
    ref_out, ref_jvp_fn = tf.linearize(f, x)
    _same(out, ref_out)
    got, ref = jvp_fn(t), ref_jvp_fn(t)
    _same(got[0], ref[0])
    assert got[2] == ref[2] == 3.0
    for g, r in ((got[1], ref[1]), (got[3], ref[3])):  # zero tangents
        assert torch.equal(g, torch.zeros_like(g)) and torch.equal(g, r.detach())


def test_no_primals():
    out, jvp_fn = ft.linearize(lambda: torch.ones(2))
    ref_out, ref_jvp_fn = tf.linearize(lambda: torch.ones(2))
    _same(out, ref_out)
    _same(jvp_fn(), ref_jvp_fn())


def test_composes_with_vmap_and_grad_outside():
    xs, t = torch.randn(4, 3), torch.randn(3)
    got = ft.vmap(lambda a: ft.linearize(torch.sin, a)[1](t))(xs)
    _same(got, xs.cos() * t)
    # the derivative of the jvp with respect to the primal: d/dx sum(cos(x) * t) = -sin(x) * t
    x = torch.randn(3)
    _same(ft.grad(lambda a: ft.linearize(torch.sin, a)[1](t).sum())(x), -x.sin() * t)
    _same(ft.grad(lambda tt: ft.linearize(torch.sin, x)[1](tt).sum())(t), x.cos())
    _, jvp_fn = ft.linearize(torch.sin, x)
    _same(ft.jacfwd(jvp_fn)(t), torch.diag(x.cos()))


class _OnceDifferentiable(torch.autograd.Function):
    """A backward that is not differentiable (and does not say so): transposing it would give 0."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g * 2

    @staticmethod
    def jvp(ctx, t):
        return t * 2


def test_autograd_function_uses_its_jvp():
    x, t = torch.randn(3), torch.randn(3)
    f = lambda a: _OnceDifferentiable.apply(a) + a.sin()  # noqa: E731
    _same(ft.linearize(f, x)[1](t), tf.linearize(f, x)[1](t))
    _same(ft.linearize(f, x)[1](t), 2 * t + x.cos() * t)


def test_op_without_double_backward_falls_back_to_forward_mode():
    # torch has no derivative for _cdist_backward (double backward) nor a forward-AD formula for
    # _cdist_forward: linearize then raises torch's forward-AD error, as torch.func does.
    x = torch.randn(3)
    f = lambda a: torch.cdist(a.view(3, 1), a.view(3, 1))  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward AD with _cdist_forward") as ref:
        tf.linearize(f, x)[1](x)
    with pytest.raises(type(ref.value), match="forward AD with _cdist_forward"):
        ft.linearize(f, x)[1](x)


# ---- errors: torch.func's exception types and phrases


def _errors(call_ft, call_tf):
    with pytest.raises(Exception) as ref:
        call_tf()
    with pytest.raises(Exception) as got:
        call_ft()
    assert type(got.value) is type(ref.value), (got.value, ref.value)
    return str(got.value), str(ref.value)


def test_error_integer_primal():
    got, ref = _errors(
        lambda: ft.linearize(torch.sin, torch.arange(3)), lambda: tf.linearize(torch.sin, torch.arange(3))
    )
    assert "Expected primal to be floating point or complex, but got: torch.int64" in got
    assert "Expected primal to be floating point or complex" in ref


def test_error_non_tensor_primal():
    got, _ = _errors(lambda: ft.linearize(lambda a: a * 2, 3.0), lambda: tf.linearize(lambda a: a * 2, 3.0))
    assert "primals must be Tensors" in got and "float" in got


@pytest.mark.parametrize(
    "tangents, phrase",
    [
        (
            (torch.randn(4),),
            "tangent:0 with shape torch.Size([4]) in flattened pytree doesn't match the shape",
        ),
        ((torch.randn(3, dtype=torch.float64),), "tangent:0 with dtype torch.float64 in flattened pytree"),
        ((torch.randn(3), torch.randn(3)), "Expected the tangents"),
        (((torch.randn(3),),), "to have the same argspec as the primals"),
        ((), "to have the same argspec as the primals"),
        ((1.0,), "has no attribute 'shape'"),
    ],
)
def test_error_bad_tangents(tangents, phrase):
    x = torch.randn(3)
    _, jvp_fn = ft.linearize(torch.sin, x)
    _, ref_jvp_fn = tf.linearize(torch.sin, x)
    got, ref = _errors(lambda: jvp_fn(*tangents), lambda: ref_jvp_fn(*tangents))
    assert phrase in got
    assert phrase in ref


def test_error_pytree_tangent_structure():
    d = {"a": torch.randn(3), "b": torch.randn(3)}
    f = lambda d: d["a"] * d["b"]  # noqa: E731
    got, ref = _errors(
        lambda: ft.linearize(f, d)[1]({"a": d["a"]}), lambda: tf.linearize(f, d)[1]({"a": d["a"]})
    )
    assert got == ref


def test_error_keyword_argument():
    _errors(lambda: ft.linearize(torch.sin, _x, foo=1), lambda: tf.linearize(torch.sin, _x, foo=1))
