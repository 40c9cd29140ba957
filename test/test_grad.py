"""Differential tests of functorch_lite.grad / grad_and_value / vjp against torch.func and
torch.autograd, plus their compositions with vmap and with regular autograd, and the exact text
of their error messages (TestGradErrorMessages, expecttest).

Every test compares functorch_lite with torch.func (or with torch.autograd.grad / a closed form)
on the same inputs. Strict xfails mark real bugs of functorch_lite: the reason says what is wrong.
"""

import re

import expecttest
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

import functorch_lite as ft

ATOL = 1e-5
RTOL = 1.3e-6


# ------------------------------------------------------------------------------------------------
# helpers (local to this file on purpose: test/conftest.py belongs to another suite)


@pytest.fixture(autouse=True)
def _fresh_state(_seed_and_restore):
    """vmap's for-loop fallback allowed silently (these tests are about grad semantics, not about
    which ops have batching rules). conftest's fixture, which runs first, seeds, restores the
    mode afterwards and checks that no level leaked, even from a test that raised inside a
    transform."""
    ft.set_vmap_fallback("quiet")


def is_plain(t):
    """A tensor that carries none of functorch_lite's (or torch.func's) wrappers."""
    return (
        type(t) is torch.Tensor
        and ft._C._wrapper_info(t) is None
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        and "GradTrackingTensor" not in repr(t)
        and "BatchedTensor" not in repr(t)
    )


def assert_close_tree(actual, expected, atol=ATOL, rtol=RTOL, plain=True):
    """Same pytree structure, same shapes/dtypes, close values; tensors of `actual` are plain."""
    flat_a, spec_a = tree_flatten(actual)
    flat_e, spec_e = tree_flatten(expected)
    assert spec_a == spec_e, f"structure differs:\n{spec_a}\nvs\n{spec_e}"
    for a, e in zip(flat_a, flat_e):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), type(a)
            if plain:
                assert is_plain(a), f"a wrapper escaped: {a!r}"
            assert a.shape == e.shape, (a.shape, e.shape)
            assert a.dtype == e.dtype, (a.dtype, e.dtype)
            torch.testing.assert_close(a.detach(), e.detach(), atol=atol, rtol=rtol)
        else:
            assert a == e, (a, e)


def both(fn, **kw):
    """Runs fn(ft) and fn(torch.func) and checks they agree."""
    actual = fn(ft)
    expected = fn(tf)
    assert_close_tree(actual, expected, **kw)
    return actual


def autograd_grad(f, x, order=1, vs=()):
    """Reference: the `order`-th derivative of scalar f at x with plain torch.autograd.grad.
    For order > 1 the k-th step differentiates sum(g * vs[k-1]) (Hessian-vector products)."""
    x = x.detach().clone().requires_grad_()
    with torch.enable_grad():
        out = f(x)
        (g,) = torch.autograd.grad(out, x, create_graph=True, allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        for k in range(order - 1):
            s = (g * vs[k]).sum()
            if not s.requires_grad:
                g = torch.zeros_like(x)
                continue
            (g,) = torch.autograd.grad(s, x, create_graph=True, allow_unused=True)
            g = torch.zeros_like(x) if g is None else g
    return g.detach()


def nth_grad(m, f, order, vs=()):
    """grad(grad(grad(f))) in the style of module m (ft or torch.func), contracting each
    intermediate gradient with vs[k] so that every level has a scalar output."""
    g = m.grad(f)
    for k in range(order - 1):
        g = (lambda g, v: m.grad(lambda x: (g(x) * v).sum()))(g, vs[k])
    return g


# ------------------------------------------------------------------------------------------------
# functions under test: name -> (f, usable under vmap); inputs are vectors of 4 elements

_gen = torch.Generator().manual_seed(1234)
W = torch.randn(3, 4, generator=_gen)
B = torch.randn(3, generator=_gen)
TARGET = torch.tensor([2])


def f_sin(x):
    return x.sin().sum()


def f_poly(x):
    return (3 * x**4 - 2 * x**3 + x**2 - 5 * x).sum()


def f_explog(x):
    return (x.exp() * (x**2 + 1).log() + torch.log1p(x.exp())).sum()


def f_mlp(x):
    h = torch.tanh(W @ x + B)
    return ((h - 0.5) ** 2).mean()


def f_cross_entropy(x):
    logits = (W @ x + B).unsqueeze(0)
    return F.cross_entropy(logits, TARGET) + F.log_softmax(logits, dim=-1).exp().pow(3).sum()


def f_reductions(x):
    return x.norm() + x.var() + x.logsumexp(0) + x.amax() + x.mean() * x.std() + x.abs().sum()


def f_max_prod(x):
    return x.max() + x.min() + x.prod()


def f_views(x):
    m = x.view(2, 2)
    return (
        (m.t()[0] * x[1:3]).sum()
        + x[::2].pow(3).sum()
        + x.unsqueeze(1).expand(4, 3).sin().sum()
        + m.diagonal().exp().sum()
        + x.flip(0).cumsum(0).pow(2).sum()
    )


def f_indexing(x):
    idx = torch.tensor([0, 2, 2, 3])
    return x[idx].pow(2).sum() + x.gather(0, idx).sin().sum() + x[x > 0].exp().sum()


def f_inplace_intermediate(x):
    y = x.clone()
    y.mul_(2).add_(x).sin_()
    z = torch.zeros(4)
    z[0:2] = x[1:3] ** 2
    z[0] += x[3] * 3
    z.narrow(0, 0, 3).mul_(y[:3])
    return (y * z).sum() + y.sum()


def f_inplace_offset_view(x):
    # writes into a view with a non-zero storage offset of a tensor created inside f
    z = torch.zeros(4)
    z[1:3] = x[:2] ** 2
    z[3] = x[3]
    return (z * z).sum() + (z.pow(3) * x).sum()


def f_where(x):
    return (
        torch.where(x > 0, x**3, -x.sin()).sum()
        + torch.where(x < 0.5, x, 2 * x).pow(2).exp().sum()
        + torch.where(x > 0, x, torch.zeros(())).sum()
    )


def f_softmax(x):
    return F.softmax(x, dim=0)[1] + F.relu(x).pow(2).sum() + torch.sigmoid(x).sum()


FUNCS = {
    "sin": (f_sin, True),
    "poly": (f_poly, True),
    "explog": (f_explog, True),
    "mlp": (f_mlp, True),
    "cross_entropy": (f_cross_entropy, True),
    "reductions": (f_reductions, True),
    "views": (f_views, True),
    "indexing": (f_indexing, False),  # x[mask] has a data-dependent shape: not vmappable
    # both write batched values into a tensor created by torch.zeros (not batched): torch.func's
    # vmap refuses that as well
    "inplace_intermediate": (f_inplace_intermediate, False),
    "inplace_offset_view": (f_inplace_offset_view, False),
    "where": (f_where, True),
    "softmax": (f_softmax, True),
    "max_prod": (f_max_prod, True),
}


def _x():
    return torch.randn(4)


# ------------------------------------------------------------------------------------------------
# first to third order, against torch.func and torch.autograd.grad


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", list(FUNCS))
def test_nth_order_matches_torch_func_and_autograd(name, order):
    f, _ = FUNCS[name]
    x = _x()
    vs = [torch.randn(4) for _ in range(order - 1)]
    actual = nth_grad(ft, f, order, vs)(x)
    expected_func = nth_grad(tf, f, order, vs)(x)
    expected_autograd = autograd_grad(f, x, order, vs)
    assert_close_tree(actual, expected_func, atol=1e-4, rtol=1e-4)
    assert_close_tree(actual, expected_autograd, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("point", [-1.7, -0.3, 0.0, 0.4, 2.5])
def test_scalar_third_order_chain_closed_forms(point):
    x = torch.tensor(point, dtype=torch.float64)
    torch.testing.assert_close(ft.grad(ft.grad(ft.grad(torch.sin)))(x), -x.cos())
    torch.testing.assert_close(ft.grad(ft.grad(ft.grad(torch.exp)))(x), x.exp())
    torch.testing.assert_close(ft.grad(ft.grad(ft.grad(lambda t: t**5)))(x), 60 * x**2)
    torch.testing.assert_close(ft.grad(ft.grad(lambda t: t.tanh()))(x), -2 * x.tanh() * (1 - x.tanh() ** 2))
    fourth = ft.grad(ft.grad(ft.grad(ft.grad(lambda t: t.sin() * t))))(x)
    torch.testing.assert_close(fourth, tf.grad(tf.grad(tf.grad(tf.grad(lambda t: t.sin() * t))))(x))


@pytest.mark.parametrize("index", [0, 1, slice(1, 2), slice(2, 4)])
def test_write_into_offset_view_second_order(index):
    """Regression: grad(grad(f)) used to lose the second-order terms (0 instead of 2) when f
    wrote into a view with a non-zero storage offset (grad-of-grad wrappers reported offset 0)."""
    x = torch.tensor(1.5)

    def f(t):
        z = torch.zeros(4)
        z[index] = t
        return (z * z).sum()

    torch.testing.assert_close(ft.grad(f)(x), tf.grad(f)(x))
    torch.testing.assert_close(ft.grad(ft.grad(f))(x), tf.grad(tf.grad(f))(x))
    torch.testing.assert_close(
        ft.grad(ft.grad(ft.grad(lambda t: f(t) * t)))(x), tf.grad(tf.grad(tf.grad(lambda t: f(t) * t)))(x)
    )


@pytest.mark.parametrize("name", ["sin", "poly", "mlp", "where", "inplace_intermediate"])
def test_grad_and_value(name):
    f, _ = FUNCS[name]
    x = _x()
    g, v = both(lambda m: m.grad_and_value(f)(x))
    torch.testing.assert_close(v, f(x))
    assert v.dim() == 0 and is_plain(v) and is_plain(g)


def test_dtypes_float64_and_complex():
    x64 = torch.randn(5, dtype=torch.float64)
    g = both(lambda m: m.grad(lambda t: (t.sin() * t.exp()).sum())(x64))
    assert g.dtype == torch.float64
    z = torch.randn(3, dtype=torch.cfloat)
    both(lambda m: m.grad(lambda t: (t * t.conj()).real.sum() + t.sin().abs().sum())(z))
    both(lambda m: m.grad(lambda t: (t.abs() ** 3).sum())(z))


def test_output_not_depending_on_input_gives_zeros():
    x = _x()
    g, v = both(lambda m: m.grad_and_value(lambda t: torch.tensor(3.0))(x))
    assert torch.equal(g, torch.zeros(4)) and v.item() == 3.0
    both(lambda m: m.grad(lambda a, b: (b * 2).sum())(x, x))
    both(lambda m: m.grad(lambda t: (t > 0).sum().float())(x))
    both(lambda m: m.grad(m.grad(lambda t: 2 * t))(torch.tensor(1.0)))


def test_grad_of_input_returned_directly():
    both(lambda m: m.grad(lambda t: t)(torch.tensor(2.0)))
    x = torch.randn(2, 3)
    both(lambda m: m.grad(lambda t: t.sum())(x))


def test_inplace_on_differentiated_input_matches_torch_func():
    for m in (ft, tf):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            m.grad(lambda t: t.mul_(2).sum())(_x())


def test_inplace_on_nondifferentiated_argument_is_allowed():
    x, y = _x(), _x()

    def f(a, b):
        b.mul_(2).add_(a)
        return (a * b).sum()

    both(lambda m: m.grad(f)(x, y.clone()))


# ------------------------------------------------------------------------------------------------
# argnums, pytrees, has_aux, kwargs


def f2(x, y, z):
    return (x.sin() * y.exp() + z * x * y).sum()


@pytest.mark.parametrize(
    "argnums", [0, 1, 2, -1, -2, -3, (0,), (0, 1), (2, 0), (-1, 1), (0, 1, 2), (-3, -2, -1)]
)
def test_argnums(argnums):
    x, y, z = _x(), _x(), _x()
    g = both(lambda m: m.grad(f2, argnums=argnums)(x, y, z))
    gv = both(lambda m: m.grad_and_value(f2, argnums=argnums)(x, y, z))
    assert_close_tree(gv[0], g)
    assert isinstance(g, tuple) == isinstance(argnums, tuple)
    if isinstance(argnums, tuple):
        assert len(g) == len(argnums)
    # against autograd
    xs = [t.clone().requires_grad_() for t in (x, y, z)]
    ref = torch.autograd.grad(f2(*xs), xs)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    got = g if isinstance(argnums, tuple) else (g,)
    for a, r in zip(got, [ref[n] for n in nums]):
        torch.testing.assert_close(a, r)


def test_same_tensor_passed_twice_gets_separate_gradients():
    x = _x()
    g = both(lambda m: m.grad(lambda a, b: (a * b.sin()).sum(), argnums=(0, 1))(x, x))
    torch.testing.assert_close(g[0], x.sin())
    torch.testing.assert_close(g[1], x * x.cos())


def test_pytree_arguments_mirror_structure():
    x, y, z = _x(), _x(), torch.randn(2, 2)
    params = {"w": x, "inner": (y, [z, {"b": x * 2}])}

    def f(p, scale):
        return (
            (p["w"] * p["inner"][0]).sin().sum()
            + p["inner"][1][0].exp().sum()
            + (p["inner"][1][1]["b"] ** 2).sum() * scale
        )

    g = both(lambda m: m.grad(f)(params, 3.0))
    assert isinstance(g, dict) and set(g) == {"w", "inner"}
    assert isinstance(g["inner"], tuple) and isinstance(g["inner"][1], list)
    assert isinstance(g["inner"][1][1], dict)
    assert g["inner"][1][0].shape == (2, 2)
    torch.testing.assert_close(g["inner"][1][1]["b"], 6.0 * params["inner"][1][1]["b"])
    g2 = both(lambda m: m.grad(lambda a, p: f(p, 1.0) * a.sum(), argnums=(0, 1))(y, params))
    assert isinstance(g2, tuple) and isinstance(g2[1], dict)
    gv = both(lambda m: m.grad_and_value(f)(params, 2.0))
    assert isinstance(gv[0], dict)


def test_pytree_tuple_and_list_args():
    a, b = _x(), _x()
    g = both(lambda m: m.grad(lambda t: (t[0] * t[1]).sum())((a, b)))
    assert isinstance(g, tuple) and len(g) == 2
    g = both(lambda m: m.grad(lambda t: (t[0] * t[1]).sum())([a, b]))
    assert isinstance(g, list) and len(g) == 2
    torch.testing.assert_close(g[0], b)


def test_has_aux_returns_unwrapped_aux():
    x = _x()

    def f(t):
        y = t.sin()
        return y.sum(), {"cos": t.cos(), "y": y, "pair": (y * 2, t)}

    g, aux = both(lambda m: m.grad(f, has_aux=True)(x))
    torch.testing.assert_close(g, x.cos())
    for leaf in tree_flatten(aux)[0]:
        assert is_plain(leaf), repr(leaf)
        assert "GradTrackingTensor" not in repr(leaf)
    torch.testing.assert_close(aux["pair"][1], x)
    (g2, (value, aux2)) = both(lambda m: m.grad_and_value(f, has_aux=True)(x))
    torch.testing.assert_close(value, x.sin().sum())
    assert is_plain(value) and all(is_plain(t) for t in tree_flatten(aux2)[0])


@pytest.mark.parametrize("api", ["grad", "grad_and_value"])
def test_has_aux_non_tensor_aux_is_refused_as_torch_func(api):
    # clients (posteriors) turn torch.func's refusal into their own error: a None, a number or
    # a string in aux is a RuntimeError naming its type, in both libraries
    f = lambda t: (t.sum(), {"n": None, "t": t})  # noqa: E731
    with pytest.raises(RuntimeError, match="aux output of .* may hold only tensors.*NoneType"):
        getattr(ft, api)(f, has_aux=True)(_x())
    with pytest.raises(RuntimeError):
        getattr(tf, api)(f, has_aux=True)(_x())


def test_has_aux_nested():
    x = _x()

    def outer(m):
        def f(r):
            g, a = m.grad(lambda s: ((s * r).sin().sum(), s.cos() * r), has_aux=True)(r)
            return (g * a).sum(), a

        return m.grad(f, has_aux=True)(x)

    both(outer)


def test_kwargs_passed_through_and_not_differentiated():
    x, y = _x(), _x()

    def f(a, *, scale, shift=0.0):
        return (a * scale + shift).pow(2).sum()

    g = both(lambda m: m.grad(f)(x, scale=y, shift=1.5))
    torch.testing.assert_close(g, 2 * (x * y + 1.5) * y)
    both(lambda m: m.grad_and_value(f)(x, scale=y))
    both(lambda m: m.grad(lambda a, b=None: (a * b).sum())(x, b=y))
    X = torch.randn(3, 4)
    both(lambda m: m.vmap(m.grad(lambda a, b=None: (a * b).sin().sum()))(X, b=y))


# ------------------------------------------------------------------------------------------------
# vjp

VJP_FUNCS = {
    "sin": lambda x: x.sin(),
    "matmul_tanh": lambda x: torch.tanh(W @ x + B),
    "views": lambda x: x.view(2, 2).t() * x[:2],
    "reduce_and_expand": lambda x: x.softmax(0) * x.sum(),
    "inplace": lambda x: x.clone().mul_(x).add_(1).log_(),
    "where": lambda x: torch.where(x > 0, x.exp(), x**2),
}


@pytest.mark.parametrize("name", list(VJP_FUNCS))
def test_vjp_matches_torch_func(name):
    f = VJP_FUNCS[name]
    x = _x()
    out_ft, fn_ft = ft.vjp(f, x)
    out_tf, fn_tf = tf.vjp(f, x)
    assert_close_tree(out_ft, out_tf)
    ct = torch.randn_like(out_tf)
    assert_close_tree(fn_ft(ct), fn_tf(ct))
    # called twice, with another cotangent: same graph, independent results
    ct2 = torch.randn_like(out_tf)
    assert_close_tree(fn_ft(ct2), fn_tf(ct2))
    assert_close_tree(fn_ft(ct), fn_tf(ct))


def test_vjp_multiple_primals_and_pytree_outputs():
    x, y = _x(), _x()

    def f(d, t):
        return {"prod": d["a"] * t[0], "sum": (t[1] + d["a"]).sum()}, d["a"].sin()

    out_ft, fn_ft = ft.vjp(f, {"a": x}, (y, x))
    out_tf, fn_tf = tf.vjp(f, {"a": x}, (y, x))
    assert_close_tree(out_ft, out_tf)
    ct = ({"prod": torch.randn(4), "sum": torch.tensor(1.5)}, torch.randn(4))
    r = fn_ft(ct)
    assert_close_tree(r, fn_tf(ct))
    assert isinstance(r, tuple) and isinstance(r[0], dict) and isinstance(r[1], tuple)


def test_vjp_has_aux():
    x = _x()
    out, fn, aux = ft.vjp(lambda a: (a.sin(), {"c": a.cos()}), x, has_aux=True)
    out_e, fn_e, aux_e = tf.vjp(lambda a: (a.sin(), {"c": a.cos()}), x, has_aux=True)
    assert_close_tree(aux, aux_e)
    assert_close_tree(out, out_e)
    assert "GradTrackingTensor" not in repr(aux["c"]) and is_plain(aux["c"])
    ct = torch.randn(4)
    assert_close_tree(fn(ct), fn_e(ct))


def test_vjp_output_independent_of_input_gives_zeros():
    x = _x()
    ct = torch.randn(4)
    both(lambda m: m.vjp(lambda t: torch.ones(4), x)[1](ct))
    both(lambda m: m.vjp(lambda t: t, x)[1](torch.ones(4)))


def test_vmap_over_vjp_fn_gives_jacobian_rows():
    x = _x()
    f = VJP_FUNCS["matmul_tanh"]
    _, fn = ft.vjp(f, x)
    (jac,) = ft.vmap(fn)(torch.eye(3))
    expected = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(jac, expected)
    assert is_plain(jac)
    _, fn_e = tf.vjp(f, x)
    torch.testing.assert_close(jac, tf.vmap(fn_e)(torch.eye(3))[0])
    # vjp_fn still usable after having been vmapped, and vmapped twice
    torch.testing.assert_close(fn(torch.ones(3))[0], expected.sum(0))
    torch.testing.assert_close(ft.vmap(fn)(2 * torch.eye(3))[0], 2 * expected)


def test_vjp_of_grad_is_hvp():
    x, v = _x(), _x()
    f = FUNCS["mlp"][0]
    hvp = both(lambda m: m.vjp(m.grad(f), x)[1](v))
    H = torch.autograd.functional.hessian(f, x)
    torch.testing.assert_close(hvp[0], H @ v, atol=1e-5, rtol=1e-5)


def test_grad_of_vjp_fn():
    x = _x()
    both(lambda m: m.grad(lambda r: m.vjp(lambda s: s.sin() * r, r)[1](r)[0].sum())(x))
    both(lambda m: m.grad(lambda r: m.vjp(torch.sin, r)[1](torch.ones(4))[0].sum())(x))
    both(lambda m: m.grad(lambda r: m.vjp(lambda s: (s * r, (s * r).sum()), r, has_aux=True)[2])(x))


# ------------------------------------------------------------------------------------------------
# compositions with vmap


@pytest.mark.parametrize(
    "name",
    [n for n, (_, v) in FUNCS.items() if v],
)
def test_vmap_of_grad_per_sample(name):
    f, _ = FUNCS[name]
    X = torch.randn(5, 4)
    both(lambda m: m.vmap(m.grad(f))(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "reduction",
    [
        pytest.param(lambda x: x.max(), id="max"),
        pytest.param(lambda x: x.min(), id="min"),
        pytest.param(lambda x: x.prod(), id="prod"),
        pytest.param(lambda x: x.median(), id="median"),
        pytest.param(lambda x: x.max(0).values, id="max_dim"),
        pytest.param(lambda x: x.amax(), id="amax"),
        pytest.param(lambda x: x.norm(), id="norm"),
    ],
)
def test_vmap_of_grad_reductions(reduction):
    X = torch.randn(3, 4)
    both(lambda m: m.vmap(m.grad(reduction))(X))


def test_vmap_of_grad_in_dims_per_sample_loss():
    w = torch.randn(4)
    X, Y = torch.randn(6, 4), torch.randn(6)

    def loss(w, x, y):
        return ((x.dot(w).tanh() - y) ** 2).mean()

    g = both(lambda m: m.vmap(m.grad(loss), in_dims=(None, 0, 0))(w, X, Y))
    loop = torch.stack([autograd_grad(lambda t: loss(t, x, y), w) for x, y in zip(X, Y)])
    torch.testing.assert_close(g, loop)
    both(lambda m: m.vmap(m.grad_and_value(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(w, X, Y))


def test_grad_of_vmap():
    X = torch.randn(5, 4)
    both(lambda m: m.grad(lambda x: m.vmap(lambda r: r.sin().sum() * r[0])(x).sum())(X))
    both(lambda m: m.grad(lambda x: m.vmap(f_mlp)(x).mean())(X))
    both(lambda m: m.grad(lambda w, x: m.vmap(lambda r: (r * w).exp().sum(), in_dims=0)(x).sum())(X[0], X))


def test_vmap_of_grad_of_vmap():
    X = torch.randn(3, 2, 4)
    both(lambda m: m.vmap(m.grad(lambda x: m.vmap(torch.sin)(x).pow(2).sum()))(X))
    both(lambda m: m.vmap(m.grad(lambda x: m.vmap(f_mlp)(x).sum()))(X))


def test_vmap_of_grad_of_grad():
    X = torch.randn(5)
    both(lambda m: m.vmap(m.grad(m.grad(lambda t: t.sin() * t**2)))(X))
    both(lambda m: m.vmap(m.grad(m.grad(m.grad(lambda t: t.exp() * t))))(X))


def test_grad_of_vmap_of_grad():
    X = torch.randn(3, 4)
    both(lambda m: m.grad(lambda x: m.vmap(m.grad(f_mlp))(x).pow(2).sum())(X), atol=1e-4, rtol=1e-4)


def test_vmap_of_vjp_minimal():
    X, CT = torch.randn(5, 4), torch.randn(5, 4)
    both(lambda m: m.vmap(lambda x, c: m.vjp(torch.sin, x)[1](c)[0])(X, CT))


def test_vmap_of_vjp():
    X = torch.randn(5, 4)
    CT = torch.randn(5, 3)

    def per_sample(m):
        def one(x, ct):
            out, fn = m.vjp(VJP_FUNCS["matmul_tanh"], x)
            return out, fn(ct)[0]

        return m.vmap(one)(X, CT)

    both(per_sample)


def test_vjp_of_vmap():
    X = torch.randn(5, 4)
    CT = torch.randn(5, 3)
    both(lambda m: m.vjp(m.vmap(VJP_FUNCS["matmul_tanh"]), X)[1](CT))
    both(lambda m: m.vjp(m.vmap(torch.sin), X)[1](CT[:, :1].expand(5, 4)))


def test_nested_vmap_over_vjp_fn_batched_jacobians():
    X = torch.randn(5, 4)
    f = VJP_FUNCS["matmul_tanh"]

    def jac(m):
        def one(x):
            _, fn = m.vjp(f, x)
            return m.vmap(fn)(torch.eye(3))[0]

        return m.vmap(one)(X)

    J = both(jac)
    assert J.shape == (5, 3, 4)


# ------------------------------------------------------------------------------------------------
# perturbation confusion


@pytest.mark.parametrize("point", [-2.5, -1.0, 0.0, 0.5, 3.0])
def test_perturbation_confusion(point):
    x = torch.tensor(point)
    # d/dx [x * (d/dy (x + y))] = d/dx [x * 1] = 1   (Siskind & Pearlmutter)
    r = ft.grad(lambda x: x * ft.grad(lambda y: x + y)(x))(x)
    assert r.item() == 1.0
    both(lambda m: m.grad(lambda x: x * m.grad(lambda y: x + y)(x))(x))
    # d/dx [x * (d/dy (x * y))] = d/dx [x * x] = 2x
    r = ft.grad(lambda x: x * ft.grad(lambda y: x * y)(x))(x)
    torch.testing.assert_close(r, 2 * x)
    # d/dx [d/dy (x * y * y)]|_{y=x} = d/dx [2 x y]|_{y=x} = 4x
    torch.testing.assert_close(ft.grad(lambda x: ft.grad(lambda y: x * y * y)(x))(x), 4 * x)
    # inner closes over x and differentiates w.r.t. a different constant point
    c = torch.tensor(1.5)
    torch.testing.assert_close(
        ft.grad(lambda x: ft.grad(lambda y: (x * y).sin())(c) * x)(x),
        tf.grad(lambda x: tf.grad(lambda y: (x * y).sin())(c) * x)(x),
    )

    # three levels, each closing over the outer ones
    def g3(m):
        return m.grad(lambda a: m.grad(lambda b: m.grad(lambda c: a * b * c * c)(b) * a)(a))(x)

    # d/dc (a b c^2)|_{c=b} = 2 a b^2; d/db (2 a b^2 * a)|_{b=a} = 4 a^3; d/da 4 a^3 = 12 a^2
    torch.testing.assert_close(g3(ft), 12 * x**2)
    torch.testing.assert_close(g3(ft), g3(tf))
    # vjp inside grad, closing over the outer variable
    both(lambda m: m.grad(lambda x: x * m.vjp(lambda y: x * y, x)[1](torch.tensor(1.0))[0])(x))


# ------------------------------------------------------------------------------------------------
# regular autograd through the transforms


def _loss_with_captured(w):
    def loss(x):
        return (torch.tanh(x * w).sum()) ** 2 + (x * w.exp()).sum()

    return loss


def test_backward_through_vmap_of_grad_into_captured_weights():
    X = torch.randn(5, 4)
    w0 = torch.randn(4)
    results = {}
    for m in (ft, tf):
        w = w0.clone().requires_grad_()
        out = m.vmap(m.grad(_loss_with_captured(w)))(X)
        assert out.requires_grad
        out.pow(2).sum().backward()
        results[m.__name__] = (out.detach(), w.grad.clone())
    assert_close_tree(results["functorch_lite"], results["torch.func"], atol=1e-4, rtol=1e-4)


def test_backward_through_grad_into_captured_weights_and_inputs():
    x0, w0 = torch.randn(4), torch.randn(4)
    results = {}
    for m in (ft, tf):
        w = w0.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        g, v = m.grad_and_value(_loss_with_captured(w))(x)
        (g.sum() + v).backward()
        results[m.__name__] = (g.detach(), v.detach(), w.grad.clone(), x.grad.clone())
    assert_close_tree(results["functorch_lite"], results["torch.func"], atol=1e-4, rtol=1e-4)


def test_backward_through_vmap_of_grad_with_unbatched_weight_argument():
    X = torch.randn(5, 4)
    w0 = torch.randn(4)
    results = {}
    for m in (ft, tf):
        w = w0.clone().requires_grad_()
        out = m.vmap(m.grad(lambda w, x: (torch.tanh(x * w).sum()) ** 2), in_dims=(None, 0))(w, X)
        out.sum().backward()
        results[m.__name__] = (out.detach(), w.grad.clone())
    assert_close_tree(results["functorch_lite"], results["torch.func"], atol=1e-4, rtol=1e-4)


def test_backward_through_vjp_into_captured_weights():
    x0, w0 = torch.randn(4), torch.randn(4)
    ct = torch.randn(4)
    results = {}
    for m in (ft, tf):
        w = w0.clone().requires_grad_()
        out, fn = m.vjp(lambda x: (x * w).sin(), x0)
        (g,) = fn(ct)
        (g.sum() + out.sum()).backward()
        results[m.__name__] = (g.detach(), w.grad.clone())
    assert_close_tree(results["functorch_lite"], results["torch.func"], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# torch.no_grad


def test_no_grad_inside_f_is_respected():
    x = _x()

    def f(t):
        with torch.no_grad():
            c = t**2
        return (t - c).sum() + (t * t.detach()).sum()

    g = both(lambda m: m.grad(f)(x))
    torch.testing.assert_close(g, 1 + x)

    def f2(t):
        with torch.set_grad_enabled(False):
            c = t.exp()
        return (c * t).sum()

    torch.testing.assert_close(both(lambda m: m.grad(f2)(x)), x.exp())


def test_no_grad_around_transform_is_ignored():
    x = _x()
    for m in (ft, tf):
        with torch.no_grad():
            g = m.grad(lambda t: (t**3).sum())(x)
            gg = m.grad(m.grad(lambda t: t**3))(torch.tensor(2.0))
            gv = m.grad_and_value(lambda t: (t**3).sum())(x)
            _, fn = m.vjp(lambda t: t**3, x)
            (v,) = fn(torch.ones(4))
            vg = m.vmap(m.grad(lambda t: t.sin()))(x)
        torch.testing.assert_close(g, 3 * x**2)
        torch.testing.assert_close(gg, torch.tensor(12.0))
        torch.testing.assert_close(gv[0], 3 * x**2)
        torch.testing.assert_close(v, 3 * x**2)
        torch.testing.assert_close(vg, x.cos())


def test_no_grad_around_transform_with_requires_grad_input_matches_torch_func():
    x0 = _x()
    flags = {}
    for m in (ft, tf):
        x = x0.clone().requires_grad_()
        with torch.no_grad():
            g = m.grad(lambda t: (t**3).sum())(x)
        flags[m.__name__] = (g.requires_grad, g.detach())
    assert flags["functorch_lite"][0] == flags["torch.func"][0]
    torch.testing.assert_close(flags["functorch_lite"][1], flags["torch.func"][1])


def test_no_grad_inside_nested_levels_is_respected_by_outer_levels():
    x = torch.tensor(1.5)

    def mk(m):
        def f(x):
            def g(y):
                with torch.no_grad():
                    c = x * x
                return c * y

            return m.grad(g)(x)

        return f

    assert tf.grad(mk(tf))(x).item() == 0.0
    assert ft.grad(mk(ft))(x).item() == 0.0


def test_no_grad_inside_nested_levels():
    def outer(m):
        def f(x):
            def g(y):
                with torch.no_grad():
                    c = x * y  # constant for both levels
                return c * y + y * y * x

            return m.grad(g)(x) * x

        return m.grad(f)(torch.tensor(1.5))

    both(outer)


def test_no_grad_around_inner_transform_inside_f():
    def outer2(m):
        def f(x):
            with torch.no_grad():
                inner = m.grad(lambda y: (y * x) ** 2)(x)  # grad still works under no_grad
            return inner * x

        return m.grad(f)(torch.tensor(0.7))

    both(outer2)


# ------------------------------------------------------------------------------------------------
# wrappers escaping the transform


def test_escaped_grad_tensors_behave_as_plain_tensors():
    store = {}
    x = _x()

    def f(t):
        y = t.sin()
        store["y"], store["t"] = y, t
        return y.sum()

    ft.grad(f)(x)
    y, t = store["y"], store["t"]
    # each use either works as the plain value, or raises a clear error; never crashes
    checks = [
        lambda: torch.testing.assert_close(y + 1, x.sin() + 1),
        lambda: torch.testing.assert_close(t * 2, x * 2),
        lambda: torch.testing.assert_close(torch.cat([y, x]), torch.cat([x.sin(), x])),
        lambda: torch.testing.assert_close(torch.tensor(y.tolist()), x.sin()),
        lambda: torch.testing.assert_close(y.detach().clone(), x.sin()),
        lambda: torch.testing.assert_close(ft.grad(lambda a: (a * y).sum())(x), x.sin()),
        lambda: torch.testing.assert_close(ft.vmap(lambda a: a * y)(torch.ones(2, 4)), x.sin().expand(2, 4)),
        lambda: torch.testing.assert_close(tf.grad(lambda a: (a * y).sum())(x), x.sin()),
        lambda: repr(y),
        lambda: y[0].item(),
    ]
    for check in checks:
        try:
            check()
        except RuntimeError as e:
            assert "functorch_lite" in str(e) and "Exception raised from" not in str(e), str(e)


def test_escaped_from_inner_grad_used_in_outer_level():
    store = {}

    def g(x):
        def h(z):
            store["z"] = z * x
            return store["z"].sum()

        # after the inner grad returns, store["z"] holds the outer-level value x * x
        return ft.grad(h)(x).sum() + (store["z"] * 2).sum()

    x = _x()
    torch.testing.assert_close(ft.grad(g)(x), 1 + 4 * x)


def test_escaped_from_vmap_of_grad_raises_clear_error():
    store = {}

    def f(t):
        store["y"] = t.sin()
        return store["y"].sum()

    ft.vmap(ft.grad(f))(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="created inside a vmap'd function was used after"):
        store["y"] + 1
    assert "dead" in repr(store["y"])


# ------------------------------------------------------------------------------------------------
# in-place on captured tensors; .backward() inside f


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c, x: c.add_(x), id="add_"),
        pytest.param(lambda c, x: c.copy_(x), id="copy_"),
        pytest.param(lambda c, x: c.mul_(x).sin_(), id="mul_"),
        pytest.param(lambda c, x: torch.add(x, 1, out=c), id="out="),
    ],
)
def test_inplace_on_captured_tensor_raises(mutate):
    x = _x()
    for m in (ft, tf):
        c = torch.zeros(4)

        def f(t):
            mutate(c, t)
            return t.sum()

        # torch.func refuses out= on a tensor that requires grad with another message
        with pytest.raises(RuntimeError, match="captured" if m is ft else None):
            m.grad(f)(x)
        assert torch.equal(c, torch.zeros(4)), f"{m.__name__} mutated the captured tensor"


def test_inplace_on_captured_tensor_raises_in_vjp_and_nested():
    x = _x()
    c = torch.zeros(4)
    with pytest.raises(RuntimeError, match="captured"):
        ft.vjp(lambda t: c.add_(t) * t, x)
    with pytest.raises(RuntimeError, match="captured"):
        ft.vmap(ft.grad(lambda t: c.add_(t).sum()))(torch.randn(3, 4))
    # a tensor of an outer grad level is captured for the inner one
    with pytest.raises(RuntimeError, match="captured"):
        ft.grad(lambda b: ft.grad(lambda a: (b.add_(a), a.sum())[1])(x).sum())(x.clone())
    assert torch.equal(c, torch.zeros(4))


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c, x: c.__setitem__(0, x[0]), id="setitem"),
        pytest.param(lambda c, x: c[0].add_(1), id="select_add_"),
        pytest.param(lambda c, x: c.view(2, 2).mul_(x[0]), id="view_mul_"),
    ],
)
def test_inplace_on_view_of_captured_tensor_raises(mutate):
    x = _x()
    c = torch.ones(4)

    def f(t):
        mutate(c, t)
        return t.sum()

    with pytest.raises(RuntimeError, match="captured"):
        tf.grad(f)(x)  # torch.func's behaviour
    assert torch.equal(c, torch.ones(4))
    with pytest.raises(RuntimeError, match="captured"):
        ft.grad(f)(x)
    assert torch.equal(c, torch.ones(4)), "the captured tensor was mutated"


def test_backward_inside_f_raises_clear_error():
    x = _x()

    def f(t):
        y = (t * t).sum()
        y.backward()
        return y

    with pytest.raises(RuntimeError, match=r"backward\(\) called inside a functorch transform"):
        tf.grad(f)(x)
    with pytest.raises(RuntimeError, match=r"backward\(\).*(transform|functorch_lite)"):
        ft.grad(f)(x)


def test_backward_on_captured_inside_f_is_clear_or_correct():
    x = _x()
    w = torch.randn(4, requires_grad=True)

    def f(t):
        (w * w).sum().backward()
        return (t * t).sum()

    try:
        g = ft.grad(f)(x)
    except RuntimeError as e:
        assert re.search(r"backward\(\).*(transform|functorch_lite)", str(e)), str(e)
    else:
        torch.testing.assert_close(g, 2 * x)
        torch.testing.assert_close(w.grad, 2 * w.detach())


@pytest.mark.parametrize("transform", ["vjp", "jvp", "vmap", "vmap_grad", "grad_grad"])
def test_backward_inside_other_transforms_raises_clear_error(transform):
    x = _x()

    def f(t):
        y = (t * t).sum()
        y.backward()
        return y

    run = {
        "vjp": lambda: ft.vjp(f, x),
        "jvp": lambda: ft.jvp(f, (x,), (torch.ones(4),)),
        "vmap": lambda: ft.vmap(f)(torch.randn(3, 4, requires_grad=True)),
        "vmap_grad": lambda: ft.vmap(ft.grad(f))(torch.randn(3, 4)),
        "grad_grad": lambda: ft.grad(lambda t: ft.grad(f)(t).sum())(x),
    }[transform]
    with pytest.raises(
        RuntimeError,
        match=r"called \.backward\(\) or torch\.autograd\.grad\(\) on "
        r"tensors of the transform",
    ):
        run()
    assert ft._C._stack_depth() == 0


def test_autograd_grad_inside_grad_raises_clear_error():
    w = torch.randn(4, requires_grad=True)

    def f(t):
        y = (t * w).sum()
        return torch.autograd.grad(y, w)[0].sum()

    with pytest.raises(
        RuntimeError,
        match=r"functorch_lite\.grad: the function being transformed "
        r"called \.backward\(\) or torch\.autograd\.grad\(\)",
    ):
        ft.grad(f)(_x())


# ------------------------------------------------------------------------------------------------
# error messages (exact text; regenerate with EXPECTTEST_ACCEPT=1 and review)


def _f(x, y=None):
    return x.sin().sum()


class TestGradErrorMessages(expecttest.TestCase):
    def setUp(self):
        self.x = torch.randn(3)
        self.y = torch.randn(3)

    def tearDown(self):
        self.assertEqual(ft._C._stack_depth(), 0)

    def test_backward_inside_grad(self):
        def f(t):
            y = (t * t).sum()
            y.backward()
            return y

        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(f)(self.x)),
            """functorch_lite.grad: the function being transformed called .backward() or torch.autograd.grad() on tensors of the transform, which is not supported. Use functorch_lite.grad or functorch_lite.vjp instead (they compose with every transform), or call it outside the transform.""",
        )

    def msg(self, exc_type, fn):
        with self.assertRaises(exc_type) as ctx:
            fn()
        text = str(ctx.exception)
        self.assertNotIn("Exception raised from", text)
        self.assertIsNone(re.search(r"\.(cpp|h|hpp|cc):\d+", text), text)
        self.assertNotIn("csrc/", text)
        return text

    # -- argnums
    def test_argnums_wrong_type(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums="0")(x)),
            """grad: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got '0'.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=[0])(x)),
            """grad: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got [0].""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=1.0)(x, x)),
            """grad: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got 1.0.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=True)(x)),
            """grad: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got True.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad_and_value(_f, argnums=(0, "1"))(x, x)),
            """grad_and_value: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got (0, '1').""",
        )

    def test_argnums_out_of_range(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=2)(x, x)),
            """grad: got argnums=2, but only 2 positional inputs, so each argnum must be in [-2, 2).""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=-3)(x, x)),
            """grad: got argnums=-3, but only 2 positional inputs, so each argnum must be in [-2, 2).""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad_and_value(_f, argnums=(0, 5))(x, x)),
            """grad_and_value: got argnums=(0, 5), but only 2 positional inputs, so each argnum must be in [-2, 2).""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda: torch.ones(()))()),
            """grad: got argnums=0, but only 0 positional inputs, so each argnum must be in [0, 0).""",
        )

    def test_argnums_duplicate(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=(0, 0))(x, x)),
            """grad: argnums elements must be unique, got (0, 0)""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=(1, -1))(x, x)),
            """grad: argnums elements must be unique, got (1, -1)""",
        )

    def test_argnums_empty_tuple(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(_f, argnums=())(x, x)),
            """grad: argnums must be non-empty""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad_and_value(_f, argnums=())(x, x)),
            """grad_and_value: argnums must be non-empty""",
        )

    def test_argnum_points_at_non_tensor(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(ValueError, lambda: ft.grad(lambda a, b: b.sum())(1.0, x)),
            """grad: argument 0 (argnums=0) must be a Tensor (or a pytree of Tensors), got a float.""",
        )
        self.assertExpectedInline(
            self.msg(ValueError, lambda: ft.grad(lambda a, b: a.sum(), argnums=(0, 1))(x, "b")),
            """grad: argument 1 (argnums=(0, 1)) must be a Tensor (or a pytree of Tensors), got a str.""",
        )
        self.assertExpectedInline(
            self.msg(ValueError, lambda: ft.grad(lambda d: d["a"].sum())({"a": x, "n": 3})),
            """grad: argument 0 (argnums=0) at ['n'] must be a Tensor (or a pytree of Tensors), got an int.""",
        )
        self.assertExpectedInline(
            self.msg(ValueError, lambda: ft.vjp(lambda a: a, 1.0)),
            """vjp: primals[0] must be a Tensor (or a pytree of Tensors), got a float.""",
        )

    def test_argnum_points_at_integer_tensor(self):
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: a.sum())(torch.arange(3))),
            """grad: argument 0 (argnums=0) must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.""",
        )
        self.assertExpectedInline(
            self.msg(
                RuntimeError,
                lambda: ft.grad_and_value(lambda a, b: a.sum(), argnums=1)(
                    self.x, torch.ones(3, dtype=torch.bool)
                ),
            ),
            """grad_and_value: argument 1 (argnums=1) must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.bool.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(lambda a: a * 2, torch.arange(3))),
            """vjp: primals[0] must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.""",
        )

    # -- has_aux
    def test_has_aux_without_pair(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: a.sum(), has_aux=True)(x)),
            """grad(f, has_aux=True): output of function f should be a tuple: (output, aux) if has_aux is True; got Tensor.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: (a.sum(), 1, 2), has_aux=True)(x)),
            """grad(f, has_aux=True): output of function f should be a tuple: (output, aux) if has_aux is True; got tuple of length 3.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad_and_value(lambda a: [a.sum(), a], has_aux=True)(x)),
            """grad_and_value(f, has_aux=True): output of function f should be a tuple: (output, aux) if has_aux is True; got list.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(lambda a: a.sin(), x, has_aux=True)),
            """vjp(f, has_aux=True): output of function f should be a tuple: (output, aux) if has_aux is True; got Tensor.""",
        )

    # -- outputs
    def test_non_scalar_output(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: a.sin())(x)),
            """grad(f)(*args): expected f(*args) to return a scalar Tensor, got a tensor of shape (3,). Use vjp or jacrev for non-scalar outputs.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad_and_value(lambda a: a.view(3, 1) * 2)(x)),
            """grad_and_value(f)(*args): expected f(*args) to return a scalar Tensor, got a tensor of shape (3, 1). Use vjp or jacrev for non-scalar outputs.""",
        )

    def test_non_tensor_output(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: 1.0)(x)),
            """grad(f)(*args): expected f(*args) to return a Tensor, got float.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: (a.sum(),))(x)),
            """grad(f)(*args): expected f(*args) to return a Tensor, got tuple.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(lambda a: 1.0, x)),
            """vjp(f, *primals): expected f(*primals) to return only tensors (a Tensor or a pytree of Tensors), got a float in its output.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(lambda a: (a.sin(), 2), x)),
            """vjp(f, *primals): expected f(*primals) to return only tensors (a Tensor or a pytree of Tensors), got an int in its output.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(lambda a: None, x)),
            """vjp(f, *primals): expected f(*primals) to return only tensors (a Tensor or a pytree of Tensors), got a NoneType in its output.""",
        )

    # -- vjp_fn cotangents
    def test_vjp_fn_wrong_structure(self):
        x = self.x
        _, fn = ft.vjp(lambda a: a.sin(), x)
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: fn((x,))),
            """vjp_fn: Expected pytree structure of cotangents to be the same as pytree structure of outputs to the function (*), got TreeSpec(tuple, None, [*]).""",
        )
        _, fn2 = ft.vjp(lambda a: (a.sin(), {"k": a.cos()}), x)
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: fn2((x, {"j": x}))),
            """\
vjp_fn: Expected pytree structure of cotangents to be the same as pytree structure of outputs to the function (TreeSpec(tuple, None, [*,
  TreeSpec(dict, ['k'], [*])])), got TreeSpec(tuple, None, [*,
  TreeSpec(dict, ['j'], [*])]).""",
        )
        self.assertExpectedInline(
            self.msg(TypeError, lambda: fn2((x, {"k": 1.0}))),
            """vjp_fn: cotangent 1 must be a Tensor, got float""",
        )

    def test_vjp_fn_wrong_shape(self):
        x = self.x
        _, fn = ft.vjp(lambda a: a.sin(), x)
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: fn(torch.randn(4))),
            """vjp_fn: Mismatch in shape: cotangent 0 has shape (4,), but the corresponding output has shape (3,).""",
        )
        _, fn2 = ft.vjp(lambda a: (a.sin(), {"k": a.sum()}), x)
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: fn2((x, {"k": torch.ones(1)}))),
            """vjp_fn: Mismatch in shape: cotangent 1 has shape (1,), but the corresponding output has shape ().""",
        )

    # -- in-place on captured
    def test_inplace_mutation_of_captured_tensor(self):
        x = self.x
        c = torch.zeros(3)

        def f(a):
            c.add_(a)
            return a.sum()

        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(f)(x)),
            """functorch_lite.grad: the function being transformed called the in-place operation aten::add_.Tensor, which would mutate a captured Tensor (one captured from outside the transform, or an input not being differentiated in an outer transform). This is not supported: pass the tensor as an argument of the function, or use the out-of-place version of the operation.""",
        )

        def g(a):
            c.copy_(a)
            return a.sum()

        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(g, x)),
            """functorch_lite.grad: the function being transformed called the in-place operation aten::copy_, which would mutate a captured Tensor (one captured from outside the transform, or an input not being differentiated in an outer transform). This is not supported: pass the tensor as an argument of the function, or use the out-of-place version of the operation.""",
        )

    def test_which_argument_is_not_differentiable(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a, b: a.sum(), argnums=(0, 1))(x, torch.arange(3))),
            """grad: argument 1 (argnums=(0, 1)) must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.vjp(lambda a, b: a * b, x, torch.arange(3))),
            """vjp: primals[1] must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.""",
        )

    # -- messages raised in C++ (no file paths, no C++ backtrace)
    def test_tensor_of_torch_func_transform(self):
        store = {}

        def f(a):
            store["a"] = a
            return a.sum()

        tf.grad(f)(self.x)
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: a.sum())(store["a"])),
            """functorch_lite.grad: got a tensor of a torch.func transform. functorch_lite and torch.func cannot be mixed in one computation: use one library for every transform of it.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.grad(lambda a: (a * store["a"]).sum())(self.x)),
            """functorch_lite: aten::mul.Tensor received a tensor of a torch.func transform inside a functorch_lite transform. The two libraries cannot be mixed in one computation: use functorch_lite (or torch.func) for every transform of it.""",
        )
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: tf.grad(lambda a: ft.grad(lambda b: b.sum())(a))(self.x)),
            """functorch_lite.grad was called inside a torch.func transform. functorch_lite and torch.func cannot be mixed in one computation: use one library for every transform of it.""",
        )

    def test_escaped_from_vmap_of_grad(self):
        store = {}

        def f(a):
            store["y"] = a.sin()
            return store["y"].sum()

        ft.vmap(ft.grad(f))(torch.randn(2, 3))
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: store["y"] * 2),
            """functorch_lite.vmap: a tensor created inside a vmap'd function was used after that vmap returned (it was stored in a global, an attribute or a closure). Return it from the function instead: vmap adds the batch dimension to returned tensors only.""",
        )


def test_error_names_the_offending_argument():
    x = torch.randn(3)
    with pytest.raises(RuntimeError) as e1:
        ft.grad(lambda a, b: a.sum(), argnums=(0, 1))(x, torch.arange(3))
    with pytest.raises(RuntimeError) as e2:
        ft.vjp(lambda a, b: a * b, x, torch.arange(3))
    with pytest.raises(ValueError) as e3:
        ft.grad(lambda d: d["a"].sum())({"a": x, "n": 3})
    assert re.search(r"argument 1|argnums\[1\]|args\[1\]|position 1", str(e1.value)), str(e1.value)
    assert re.search(r"primal(s)?\[?\s*1|argument 1|position 1", str(e2.value)), str(e2.value)
    assert "'n'" in str(e3.value) or "[n]" in str(e3.value), str(e3.value)
