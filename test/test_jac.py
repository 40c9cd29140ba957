"""Differential tests of functorch_lite.jvp / jacrev / jacfwd / hessian against torch.func.

Covers every option of the four transforms (pytree primals and outputs, has_aux, argnums
int/negative/tuple, jacrev's chunk_size), their compositions with each other and with vmap, grad
and vjp (always with closures over tensors of an outer level), perturbation confusion, the text of
their error messages (expecttest), and the seed-002 workloads (/work/shared/seeds/002*.txt) at
small sizes.

Unless a test says otherwise it runs with ft.set_vmap_fallback('error'): jacrev/jacfwd/hessian
are vmaps, and the ops used here should have batching rules, so no for-loop fallback may hide in
them.

Strict xfails mark real functorch_lite bugs; their reasons say what is wrong and how to reproduce.
"""

import expecttest
import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from conftest import vmap_fallback
from torch.utils._pytree import tree_flatten

import functorch_lite as ft

ATOL = 1e-5
RTOL = 1e-4
# second-order results (hessians, jacobians of jacobians) in float32
ATOL2 = 1e-4
RTOL2 = 1e-3


# ------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(autouse=True)
def _no_fallback(_seed_and_restore):
    """Every test starts with the vmap for-loop fallback disabled (conftest's fixture, which
    runs first, seeds, restores the mode afterwards and checks that no level leaked)."""
    ft.set_vmap_fallback("error")


fallback = vmap_fallback


def is_plain(t):
    """A tensor that carries none of functorch_lite's (or torch.func's) wrappers."""
    return (
        type(t) is torch.Tensor
        and ft._C._wrapper_info(t) is None
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def assert_tree_close(actual, expected, atol=ATOL, rtol=RTOL):
    """Same pytree structure; every tensor leaf plain, same shape/dtype, close; others equal."""
    flat_a, spec_a = tree_flatten(actual)
    flat_e, spec_e = tree_flatten(expected)
    assert spec_a == spec_e, f"structure differs:\n{spec_a}\nvs (torch.func)\n{spec_e}"
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"leaf {i}: {type(a).__name__}"
            assert is_plain(a), f"leaf {i}: a wrapper escaped the transform: {a!r}"
            assert a.shape == e.shape, f"leaf {i}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
            assert a.dtype == e.dtype, f"leaf {i}: dtype {a.dtype} vs {e.dtype}"
            torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"leaf {i}: {m}")
        else:
            assert a == e, f"leaf {i}: {a!r} vs {e!r}"


def both(fn, atol=ATOL, rtol=RTOL):
    """fn(ft) must agree with fn(torch.func); returns fn(ft)'s result."""
    expected = fn(tf)
    actual = fn(ft)
    assert_tree_close(actual, expected, atol=atol, rtol=rtol)
    return actual


def assert_clean_message(msg):
    assert "Exception raised from" not in msg, msg
    assert ".cpp" not in msg and ".h:" not in msg and "csrc/" not in msg, msg


def xf(reason, exc=Exception):
    return pytest.mark.xfail(reason=reason, raises=exc, strict=True)


# ------------------------------------------------------------------------------------------------
# Functions of x (shape 3x4) used for the transform matrix

W1 = torch.randn(5, 4)
B1 = torch.randn(5)
W2 = torch.randn(2, 5)

FUNCS = {
    "sin": torch.sin,
    "exp_tanh": lambda x: x.exp() * x.tanh(),
    "mlp": lambda x: torch.tanh(x @ W1.T + B1) @ W2.T,
    "softmax": lambda x: x.softmax(-1),
    "log_softmax": lambda x: F.log_softmax(x, 0),
    "sum": lambda x: x.sum(0),
    "mean": lambda x: x.mean(),
    "sum_sq": lambda x: (x**2).sum(-1),
    "prod": lambda x: x.prod(1),
    "amax": lambda x: x.amax(-1),
    "norm": lambda x: x.norm(),
    "var": lambda x: x.var(0),
    "logsumexp": lambda x: x.logsumexp(1),
    "slice": lambda x: x[1:, ::2],
    "select": lambda x: x.select(1, 2).exp(),
    "transpose": lambda x: x.transpose(0, 1) * x.t().exp(),
    "reshape": lambda x: x.reshape(2, 6).sin(),
    "expand": lambda x: x[:, :1].expand(3, 5) * x.sum(1, keepdim=True),
    "where": lambda x: torch.where(x > 0, x.sin(), x.cos()),
    "cat": lambda x: torch.cat([x, x.exp()], 0),
    "stack": lambda x: torch.stack([x.sin(), x.cos()], -1),
    "bmm": lambda x: torch.bmm(x.unsqueeze(0), x.t().unsqueeze(0)),
}

SOFTMAX_LIKE = {"softmax", "log_softmax", "logsumexp"}


def _scalar(f):
    return lambda x: f(x).sin().sum()


X = torch.randn(3, 4)
XB = torch.randn(2, 3, 4)
T = torch.randn(3, 4)
T2 = torch.randn(3, 4)

TRANSFORMS = {
    "jvp": lambda L, f: L.jvp(f, (X,), (T,)),
    "jacrev": lambda L, f: L.jacrev(f)(X),
    "jacfwd": lambda L, f: L.jacfwd(f)(X),
    "hessian": lambda L, f: L.hessian(_scalar(f))(X),
    "vmap_jacrev": lambda L, f: L.vmap(L.jacrev(f))(XB),
    "vmap_jacfwd": lambda L, f: L.vmap(L.jacfwd(f))(XB),
    "vmap_hessian": lambda L, f: L.vmap(L.hessian(_scalar(f)))(XB),
    "jacfwd_jacrev": lambda L, f: L.jacfwd(L.jacrev(f))(X),
    "jacrev_jacrev": lambda L, f: L.jacrev(L.jacrev(f))(X),
    "jacfwd_jacfwd": lambda L, f: L.jacfwd(L.jacfwd(f))(X),
    "jacfwd_jacfwd_scalar": lambda L, f: L.jacfwd(L.jacfwd(_scalar(f)))(X),
    "jvp_grad": lambda L, f: L.jvp(L.grad(_scalar(f)), (X,), (T,)),
    "vjp_grad": lambda L, f: L.vjp(L.grad(_scalar(f)), X)[1](T),
    "jvp_jvp": lambda L, f: L.jvp(lambda x: L.jvp(f, (x,), (T,))[1], (X,), (T2,)),
    "grad_jvp": lambda L, f: L.grad(lambda x: L.jvp(f, (x,), (T,))[1].sin().sum())(X),
}
SECOND_ORDER = {
    "hessian",
    "vmap_hessian",
    "jacfwd_jacrev",
    "jacrev_jacrev",
    "jacfwd_jacfwd",
    "jacfwd_jacfwd_scalar",
    "jvp_grad",
    "vjp_grad",
    "jvp_jvp",
    "grad_jvp",
}


def _known_bug(transform, fname):
    """The strict xfail of (transform, function), or None. Keep in sync with reality: a strict
    xfail that passes fails the run."""
    return None


def _matrix():
    for tname in TRANSFORMS:
        for fname in FUNCS:
            mark = _known_bug(tname, fname)
            yield pytest.param(tname, fname, id=f"{tname}-{fname}", marks=[mark] if mark is not None else [])


@pytest.mark.parametrize("tname,fname", list(_matrix()))
def test_transform_matrix(tname, fname):
    """Every transform (and composition) on every function agrees with torch.func, with the
    vmap fallback disabled: the ops used here all have batching rules."""
    f, t = FUNCS[fname], TRANSFORMS[tname]
    tol = dict(atol=ATOL2, rtol=RTOL2) if tname in SECOND_ORDER else {}
    both(lambda L: t(L, f), **tol)


# ------------------------------------------------------------------------------------------------
# jvp


def test_jvp_pytree_primals_several_outputs():
    a, b, c = torch.randn(3), torch.randn(2, 3), torch.randn(3)
    ta, tb, tc = torch.randn(3), torch.randn(2, 3), torch.randn(3)

    def f(p, d):
        u = torch.tanh(d["w"] @ p[0]) + d["v"][0].sum()
        return {"u": u, "pair": (p[0] * p[1], (p[1].exp() @ d["w"].T).sin())}

    out = both(lambda L: L.jvp(f, ((a, c), {"w": b, "v": [c]}), ((ta, tc), {"w": tb, "v": [tc]})))
    assert isinstance(out, tuple) and len(out) == 2
    assert set(out[0]) == {"u", "pair"}


def test_jvp_matches_finite_difference_and_autograd():
    x, t = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    f = lambda x: torch.stack([x.sin().prod(), (x.exp() * x).sum()])  # noqa: E731
    _, jvp_out = ft.jvp(f, (x,), (t,))
    eps = 1e-6
    fd = (f(x + eps * t) - f(x - eps * t)) / (2 * eps)
    torch.testing.assert_close(jvp_out, fd, atol=1e-6, rtol=1e-6)
    jac = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(jvp_out, jac @ t)


def test_jvp_has_aux():
    x, t = torch.randn(4), torch.randn(4)

    def f(x):
        y = x.sin()
        return y * 2, {"y": y, "cos": x.cos(), "n": torch.tensor(3)}

    out, tan, aux = ft.jvp(f, (x,), (t,), has_aux=True)
    e_out, e_tan, e_aux = tf.jvp(f, (x,), (t,), has_aux=True)
    assert_tree_close((out, tan, aux), (e_out, e_tan, e_aux))


def test_jvp_has_aux_nested_under_jvp_unwraps_one_level():
    x, t, s = torch.randn(3), torch.randn(3), torch.randn(3)

    def outer(L):
        def g(y):
            o, tan, aux = L.jvp(lambda z: (z * y, z.exp() * y), (y,), (s,), has_aux=True)
            return tan + aux  # aux still carries the outer level: its tangent must flow

        return L.jvp(g, (x,), (t,))

    both(outer)


def test_jvp_multiple_primals_and_outputs_list():
    x, y = torch.randn(3, 2), torch.randn(2)
    tx, ty = torch.randn(3, 2), torch.randn(2)
    both(lambda L: L.jvp(lambda a, b: [a @ b, (a * b).tanh(), a.sum()], (x, y), (tx, ty)))


def test_jvp_output_independent_of_input_has_zero_tangent():
    x, t = torch.randn(3), torch.randn(3)
    both(lambda L: L.jvp(lambda x: (torch.ones(2), x.detach() * 2, x * 0), (x,), (t,)))


def test_jvp_returns_input_and_float64():
    x, t = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    both(lambda L: L.jvp(lambda x: (x, x.t()), (x,), (t,)))


def test_jvp_complex():
    z = torch.randn(3, dtype=torch.complex64)
    tz = torch.randn(3, dtype=torch.complex64)
    both(lambda L: L.jvp(lambda z: (z * z.conj()).real + z.abs(), (z,), (tz,)))


def test_jvp_strict_true():
    # as torch.func: strict=True refuses an output that does not depend on the inputs
    x = torch.randn(2)
    torch.testing.assert_close(
        ft.jvp(torch.sin, (x,), (x,), strict=True), tf.jvp(torch.sin, (x,), (x,), strict=True)
    )
    for lib in (ft, tf):
        with pytest.raises(RuntimeError, match="independent of the inputs"):
            lib.jvp(lambda a: torch.ones(2), (x,), (x,), strict=True)


def test_jvp_inputs_are_not_modified_and_not_wrapped():
    x, t = torch.randn(3), torch.randn(3)
    x0, t0 = x.clone(), t.clone()
    ft.jvp(lambda x: x.exp(), (x,), (t,))
    assert torch.equal(x, x0) and torch.equal(t, t0)
    assert is_plain(x) and is_plain(t) and not x.requires_grad


# ------------------------------------------------------------------------------------------------
# jacrev / jacfwd options

JAC_APIS = ["jacrev", "jacfwd"]


def _f3(a, b, c):
    return (a[:, None] * b).tanh() @ c


A3, B3, C3 = torch.randn(3), torch.randn(3, 4), torch.randn(4)


def _positive(argnums, n):
    return tuple(a % n for a in argnums) if isinstance(argnums, tuple) else argnums % n


@pytest.mark.parametrize("api", JAC_APIS)
@pytest.mark.parametrize("argnums", [0, 1, 2, -1, -3, (0,), (2, 0), (0, 1, 2), (-1, 1)])
def test_jac_argnums(api, argnums):
    """Negative argnums are compared with torch.func given the equivalent positive ones:
    torch.func.jacfwd returns zeros for negative argnums (torch 2.13: tf.jacfwd(lambda a, b:
    a * b.exp(), argnums=-1)(a, b) is all zeros), functorch_lite gets them right."""
    expected = getattr(tf, api)(_f3, argnums=_positive(argnums, 3))(A3, B3, C3)
    assert_tree_close(getattr(ft, api)(_f3, argnums=argnums)(A3, B3, C3), expected)
    if api == "jacrev":  # torch.func.jacrev handles negative argnums itself
        both(lambda L: L.jacrev(_f3, argnums=argnums)(A3, B3, C3))


def test_torch_func_jacfwd_negative_argnums_is_wrong():
    """Documents why test_jac_argnums normalises argnums for the oracle (fails, and can be
    removed, once torch.func is fixed)."""
    a, b = torch.randn(2), torch.randn(2)
    f = lambda a, b: a * b.exp()  # noqa: E731
    assert torch.count_nonzero(tf.jacfwd(f, argnums=-1)(a, b)) == 0
    torch.testing.assert_close(ft.jacfwd(f, argnums=-1)(a, b), torch.diag(a * b.exp()))


@pytest.mark.parametrize("api", JAC_APIS)
@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)])
def test_jac_pytree_inputs_and_outputs(api, argnums):
    """Output structure outside, argnums structure inside: jac['u'][1]['w'] is d u / d p1['w']."""
    p0 = torch.randn(3)
    p1 = {"w": torch.randn(2, 3), "b": [torch.randn(2), torch.randn(1)]}

    def f(x, params):
        h = params["w"] @ x + params["b"][0]
        return {"u": h.tanh(), "v": (x.sum() * params["b"][1], [h.exp().sum(), x[:2] * h])}

    out = both(lambda L: getattr(L, api)(f, argnums=argnums)(p0, p1))
    if argnums == (0, 1):
        assert out["v"][1][1][1]["w"].shape == (2, 2, 3)
        assert out["u"][0].shape == (2, 3)


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_has_aux(api):
    x = torch.randn(4)

    def f(x, w):
        y = torch.tanh(w @ x)
        return y, {"y": y, "norm": x.norm(), "const": torch.ones(2)}

    w = torch.randn(3, 4)
    jac, aux = both(lambda L: getattr(L, api)(f, argnums=(0, 1), has_aux=True)(x, w))
    torch.testing.assert_close(aux["y"], torch.tanh(w @ x))


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_scalar_input_vector_output(api):
    both(lambda L: getattr(L, api)(lambda x: x * torch.arange(3.0))(torch.tensor(2.0)))
    both(lambda L: getattr(L, api)(lambda x: (x * x).expand(2, 2))(torch.tensor(2.0)))


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_vector_input_scalar_output(api):
    x = torch.randn(3)
    both(lambda L: getattr(L, api)(lambda x: (x**3).sum())(x))


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_scalar_input_scalar_output(api):
    both(lambda L: getattr(L, api)(lambda x: x**3)(torch.tensor(2.0)))


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_zero_dim_leaf_in_pytree(api):
    p = {"w": torch.randn(3), "s": torch.tensor(0.5)}
    both(lambda L: getattr(L, api)(lambda p: (p["w"] * p["s"]).sum())(p))


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_output_independent_of_input(api):
    x = torch.randn(3)
    both(lambda L: getattr(L, api)(lambda x: (torch.ones(2), x.sin()))(x))


@pytest.mark.parametrize("api", JAC_APIS)
def test_jac_non_differentiated_integer_argument(api):
    x = torch.randn(3)
    both(lambda L: getattr(L, api)(lambda x, n: x * n)(x, torch.arange(3)))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 7, 8, 1000])
def test_jacrev_chunk_size(chunk_size):
    """7 output rows in total (5 + 2 across a pytree output): chunk sizes that divide, don't
    divide, equal and exceed it."""
    x, w = torch.randn(3), torch.randn(5, 3)

    def f(x, w):
        return {"a": torch.tanh(w @ x), "b": (x[:2] * w[0, :2]).exp()}

    both(lambda L: L.jacrev(f, argnums=(0, 1), chunk_size=chunk_size)(x, w))


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_jacrev_chunk_size_has_aux(chunk_size):
    x = torch.randn(4)
    both(lambda L: L.jacrev(lambda x: (x.sin() * x.sum(), x.cos()), has_aux=True, chunk_size=chunk_size)(x))


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_jacrev_chunk_size_under_vmap_linear(chunk_size):
    # a function with a linear backward
    X_ = torch.randn(4, 5)
    both(lambda L: L.vmap(L.jacrev(lambda x: x[1:] * 3 + x.sum(), chunk_size=chunk_size))(X_))


def test_jacrev_empty_output():
    both(lambda L: L.jacrev(lambda x: x[:0])(torch.randn(3)))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_jacrev_invalid_chunk_size(bad):
    # torch.func's types: TypeError for a non-int, ValueError for an int <= 0
    exc = ValueError if type(bad) is int else TypeError
    with pytest.raises(exc) as info:
        ft.jacrev(torch.sin, chunk_size=bad)
    msg = str(info.value)
    assert msg.startswith("jacrev: chunk_size")
    assert repr(bad) in msg
    assert_clean_message(msg)
    with pytest.raises(exc):
        tf.jacrev(torch.sin, chunk_size=bad)(torch.randn(3))


# ------------------------------------------------------------------------------------------------
# hessian


def _h(x, w, b):
    return (torch.tanh(w @ x + b) ** 2).sum() + (x * b[:3]).prod()


XH, WH, BH = torch.randn(3), torch.randn(4, 3), torch.randn(4)


@pytest.mark.parametrize("argnums", [0, 1, 2, -1, -3, (0, 2), (1, 0), (-1, 0)])
def test_hessian_argnums(argnums):
    # torch.func.hessian is jacfwd(jacrev): wrong for negative argnums, see test_jac_argnums
    expected = tf.hessian(_h, argnums=_positive(argnums, 3))(XH, WH, BH)
    assert_tree_close(ft.hessian(_h, argnums=argnums)(XH, WH, BH), expected, atol=ATOL2, rtol=RTOL2)


def test_hessian_pytree_input():
    p = {"x": torch.randn(3), "w": [torch.randn(2, 3)]}
    both(
        lambda L: L.hessian(lambda p: torch.tanh(p["w"][0] @ p["x"]).pow(2).sum())(p), atol=ATOL2, rtol=RTOL2
    )


def test_hessian_matches_double_autograd():
    x = torch.randn(5, dtype=torch.float64)
    f = lambda x: (x.sin() * x.exp()).sum() + x.norm()  # noqa: E731
    torch.testing.assert_close(ft.hessian(f)(x), torch.autograd.functional.hessian(f, x))


def test_hessian_of_non_scalar_function_is_like_torch_func():
    """torch.func.hessian accepts non-scalar outputs (a jacobian of the jacobian): same here."""
    x = torch.randn(3)
    out = both(lambda L: L.hessian(torch.sin)(x), atol=ATOL2)
    assert out.shape == (3, 3, 3)
    out = both(lambda L: L.hessian(lambda x: torch.outer(x, x.exp()))(x), atol=ATOL2)
    assert out.shape == (3, 3, 3, 3)


def test_hessian_fwdfwd_revrev_agree():
    x = torch.randn(6)
    w = torch.randn(4, 6)
    f = lambda x: torch.tanh(w @ x).sum()  # noqa: E731
    h = ft.hessian(f)(x)
    torch.testing.assert_close(ft.jacrev(ft.jacrev(f))(x), h, atol=ATOL2, rtol=RTOL2)
    torch.testing.assert_close(ft.jacfwd(ft.jacfwd(f))(x), h, atol=ATOL2, rtol=RTOL2)
    torch.testing.assert_close(h, h.T, atol=ATOL2, rtol=RTOL2)


# ------------------------------------------------------------------------------------------------
# compositions with closures over tensors of an outer level: the inner transform differentiates
# w.r.t. x while closing over w, which belongs to (is batched by / differentiated by) the outer one

XC = torch.randn(4)
WC = torch.randn(3, 4)
WCB = torch.randn(5, 3, 4)
TW = torch.randn(3, 4)
TX = torch.randn(4)


def _net(w, x):
    return torch.tanh(w @ x).exp() * (w @ x.sin())


COMPOSITIONS = {
    "vmap_jacrev": (lambda L: L.vmap(lambda w: L.jacrev(lambda x: _net(w, x))(XC))(WCB), None),
    # the backward saves no tensor; w enters as a batched constant
    "vmap_jacrev_saves_nothing": (
        lambda L: L.vmap(lambda w: L.jacrev(lambda x: x[1:] * 2 + x.sum() + w.sum(1))(XC))(WCB),
        None,
    ),
    "vmap_jacfwd": (lambda L: L.vmap(lambda w: L.jacfwd(lambda x: _net(w, x))(XC))(WCB), None),
    "vmap_hessian": (lambda L: L.vmap(lambda w: L.hessian(lambda x: _net(w, x).sum())(XC))(WCB), None),
    "vmap_jvp": (lambda L: L.vmap(lambda w: L.jvp(lambda x: _net(w, x), (XC,), (TX,)))(WCB), None),
    "jacfwd_jacrev": (lambda L: L.jacfwd(lambda w: L.jacrev(lambda x: _net(w, x).sum())(XC))(WC), None),
    "jacrev_jacrev": (lambda L: L.jacrev(lambda w: L.jacrev(lambda x: _net(w, x))(XC))(WC), None),
    "jacfwd_jacfwd": (lambda L: L.jacfwd(lambda w: L.jacfwd(lambda x: _net(w, x).sum())(XC))(WC), None),
    "jacrev_jacfwd": (lambda L: L.jacrev(lambda w: L.jacfwd(lambda x: _net(w, x))(XC))(WC), None),
    "jvp_grad": (lambda L: L.jvp(lambda w: L.grad(lambda x: _net(w, x).sum())(XC), (WC,), (TW,)), None),
    "vjp_grad": (lambda L: L.vjp(lambda w: L.grad(lambda x: _net(w, x).sum())(XC), WC)[1](TX), None),
    "jvp_jvp": (lambda L: L.jvp(lambda w: L.jvp(lambda x: _net(w, x), (XC,), (TX,)), (WC,), (TW,)), None),
    "grad_jvp": (lambda L: L.grad(lambda w: L.jvp(lambda x: _net(w, x), (XC,), (TX,))[1].sum())(WC), None),
    "jvp_vjp": (
        lambda L: L.jvp(lambda w: L.vjp(lambda x: _net(w, x), XC)[1](torch.ones(3))[0], (WC,), (TW,)),
        None,
    ),
    "jvp_vmap": (
        lambda L: L.jvp(lambda w: L.vmap(lambda x: _net(w, x))(XC.expand(2, 4) * 1), (WC,), (TW,)),
        None,
    ),
    "vmap_jvp_grad": (
        lambda L: L.vmap(lambda w: L.jvp(L.grad(lambda x: _net(w, x).sum()), (XC,), (TX,)))(WCB),
        None,
    ),
    "vmap_jvp_grad_elementwise": (
        lambda L: L.vmap(lambda w: L.jvp(L.grad(lambda x: (w[0] * x).sin().sum()), (XC,), (TX,)))(WCB),
        None,
    ),
    "jacrev_hessian": (lambda L: L.jacrev(lambda w: L.hessian(lambda x: _net(w, x).sum())(XC))(WC), None),
    "jvp_hessian": (lambda L: L.jvp(lambda w: L.hessian(lambda x: _net(w, x).sum())(XC), (WC,), (TW,)), None),
    "jacfwd_outer_weight_jvp_inner": (
        lambda L: L.jacfwd(lambda w: L.jvp(lambda x: _net(w, x), (XC,), (TX,))[1])(WC),
        None,
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[m] if m is not None else []) for n, (_, m) in COMPOSITIONS.items()]
)
def test_composition_with_outer_closure(name):
    both(COMPOSITIONS[name][0], atol=ATOL2, rtol=RTOL2)


def test_hvp_jvp_grad_equals_vjp_grad_and_closed_form():
    x, v = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    f = lambda x: x.sin().sum()  # noqa: E731
    fwd = ft.jvp(ft.grad(f), (x,), (v,))[1]
    rev = ft.vjp(ft.grad(f), x)[1](v)[0]
    torch.testing.assert_close(fwd, -x.sin() * v)
    torch.testing.assert_close(rev, -x.sin() * v)


def test_closure_over_outer_primal_in_jacfwd_inside_jacrev():
    """d/dw of jacfwd_x(f(w, x)): the inner jvp's tangents must not be mixed up with w's."""
    both(
        lambda L: L.jacrev(lambda w: L.jacfwd(lambda x: (w * x).sin())(XC))(XC.cos()), atol=ATOL2, rtol=RTOL2
    )


# ------------------------------------------------------------------------------------------------
# perturbation confusion (Siskind & Pearlmutter): nested derivatives must keep their levels apart

ONE = torch.tensor(1.0)


@pytest.mark.parametrize("lib", [ft, tf], ids=["ft", "torch.func"])
def test_perturbation_confusion_jvp_jvp(lib):
    """d/dx [x * d/dy (x + y)] = d/dx [x * 1] = 1 (2 if the inner jvp sees the outer tangent)."""

    def f(x):
        return x * lib.jvp(lambda y: x + y, (ONE,), (ONE,))[1]

    assert lib.jvp(f, (ONE,), (ONE,))[1].item() == 1.0


@pytest.mark.parametrize("lib", [ft, tf], ids=["ft", "torch.func"])
def test_perturbation_confusion_grad_jvp(lib):
    def f(x):
        return x * lib.jvp(lambda y: x + y, (ONE,), (ONE,))[1]

    assert lib.grad(f)(ONE).item() == 1.0


@pytest.mark.parametrize("lib", [ft, tf], ids=["ft", "torch.func"])
def test_perturbation_confusion_jvp_grad(lib):
    def f(x):
        return x * lib.grad(lambda y: x + y)(ONE)

    assert lib.jvp(f, (ONE,), (ONE,))[1].item() == 1.0


@pytest.mark.parametrize("lib", [ft, tf], ids=["ft", "torch.func"])
def test_perturbation_confusion_jacfwd_jacfwd(lib):
    one = torch.ones(1)

    def f(x):
        return x * lib.jacfwd(lambda y: x + y)(one)[0]

    assert lib.jacfwd(f)(one).item() == 1.0


@pytest.mark.parametrize("lib", [ft, tf], ids=["ft", "torch.func"])
def test_perturbation_confusion_jacrev_jacfwd(lib):
    one = torch.ones(1)

    def f(x):
        return (x * lib.jacfwd(lambda y: x * 3 + y)(one)[0]).sum()

    assert lib.jacrev(f)(one).item() == 1.0


@pytest.mark.parametrize("lib", [ft, tf], ids=["ft", "torch.func"])
def test_perturbation_confusion_vmap_jvp_jvp(lib):
    xs = torch.arange(1.0, 4.0)

    def f(x):
        return x * lib.jvp(lambda y: x + y, (ONE,), (ONE,))[1]

    out = lib.vmap(lambda x: lib.jvp(f, (x,), (ONE,))[1])(xs)
    assert out.tolist() == [1.0, 1.0, 1.0]


def test_perturbation_confusion_jacfwd_jacfwd_zero_dim():
    def f(x):
        return x * ft.jacfwd(lambda y: x + y)(ONE)

    assert ft.jacfwd(f)(ONE).item() == 1.0


def test_nested_jvp_mixed_partial():
    """jvp_x jvp_y (x * y) = tx * ty, and the inner primal tangent is x * ty."""
    x, y, tx, ty = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0), torch.tensor(7.0)

    def inner(x):
        return ft.jvp(lambda y: x * y, (y,), (ty,))

    (p, t), (dp, dt) = ft.jvp(inner, (x,), (tx,))
    assert (p.item(), t.item(), dp.item(), dt.item()) == (6.0, 14.0, 15.0, 35.0)


def test_nested_jvp_same_input_both_levels():
    """f(x) = x^3: jvp(jvp) with the same primal at both levels gives f'' t1 t2 = 6 x t1 t2."""
    x, t1, t2 = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    out = ft.jvp(lambda x: ft.jvp(lambda z: z**3, (x,), (t1,))[1], (x,), (t2,))[1]
    assert out.item() == 6 * 2.0 * 3.0 * 5.0


# ------------------------------------------------------------------------------------------------
# indexing, reductions that select, and losses: their derivative formulas use gather, scatter,
# index_put and the loss backward ops under vmap, which must all have batching rules
INDEXING_CASES = {
    "index_list-jacrev": (lambda L: L.jacrev(lambda x: x[[0, 2]].sin())(X), None),
    "index_list-jacfwd": (lambda L: L.jacfwd(lambda x: x[[0, 2]].sin())(X), None),
    "index_list-vmap_jvp": (
        lambda L: L.vmap(lambda t: L.jvp(lambda x: x[[0, 2]].sin(), (X,), (t,))[1])(XB),
        None,
    ),
    "mask-jacfwd": (lambda L: L.jacfwd(lambda x: x[x > 0].exp().sum())(X), None),
    "mask-jacrev": (lambda L: L.jacrev(lambda x: x[x > 0].exp().sum())(X), None),
    "index_select-jacrev": (
        lambda L: L.jacrev(lambda x: x.index_select(0, torch.tensor([0, 2])).sin())(X),
        None,
    ),
    "index_select-jacfwd": (
        lambda L: L.jacfwd(lambda x: x.index_select(0, torch.tensor([0, 2])).sin())(X),
        None,
    ),
    "index_select-hessian": (
        lambda L: L.hessian(lambda x: x.index_select(0, torch.tensor([0, 2])).sin().sum())(X),
        None,
    ),
    "gather-jacfwd": (
        lambda L: L.jacfwd(lambda x: x.gather(1, torch.tensor([[0], [1], [3]])).exp())(X),
        None,
    ),
    "gather-jacrev": (
        lambda L: L.jacrev(lambda x: x.gather(1, torch.tensor([[0], [1], [3]])).exp())(X),
        None,
    ),
    "max_dim-jacfwd": (lambda L: L.jacfwd(lambda x: x.max(1).values)(X), None),
    "max_dim-jacrev": (lambda L: L.jacrev(lambda x: x.max(1).values)(X), None),
    "max_dim-jvp_grad": (lambda L: L.jvp(L.grad(lambda x: x.max(1).values.sin().sum()), (X,), (T,)), None),
    "mse_loss-jacrev": (
        lambda L: L.jacrev(lambda x: F.mse_loss(x, torch.zeros(3, 4), reduction="none").sum(1))(X),
        None,
    ),
    "mse_loss-jacfwd": (lambda L: L.jacfwd(lambda x: F.mse_loss(x, torch.ones(3, 4)))(X), None),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[m] if m is not None else []) for n, (_, m) in INDEXING_CASES.items()]
)
def test_indexing_and_loss_ops_have_rules_under_jacobians(name):
    ft._C._reset_fallback_ops_seen()
    with fallback("error"):
        both(INDEXING_CASES[name][0], atol=ATOL2, rtol=RTOL2)
    assert ft._C._fallback_ops_seen() == []


def test_fallback_disabled_raises_clear_error():
    with pytest.raises(RuntimeError) as info:
        ft.jacfwd(lambda x: torch.take(x, torch.tensor([0, 2])))(X)
    msg = str(info.value)
    assert "Batching rule not implemented for aten::take" in msg and "set_vmap_fallback" in msg
    assert_clean_message(msg)


# Further bugs found around these transforms (ops outside the core list)


def test_jacrev_gelu():
    both(lambda L: L.jacrev(F.gelu)(X))


def test_jacfwd_layer_norm():
    both(lambda L: L.jacfwd(lambda x: F.layer_norm(x, (4,)))(X))


def test_jacrev_layer_norm_with_fallback():
    with fallback("quiet"):
        both(lambda L: L.jacrev(lambda x: F.layer_norm(x, (4,)))(X))


def test_hessian_mse_loss_with_fallback():
    with fallback("quiet"):
        both(lambda L: L.hessian(lambda x: F.mse_loss(x, torch.zeros(3, 4)))(X))


def test_jacfwd_cross_entropy():
    both(lambda L: L.jacfwd(lambda x: F.cross_entropy(x, torch.tensor([0, 1, 3])))(X))


def test_jacrev_cross_entropy():
    both(lambda L: L.jacrev(lambda x: F.cross_entropy(x, torch.tensor([0, 1, 3])))(X))


# ------------------------------------------------------------------------------------------------
# error messages


class TestJacErrorMessages(expecttest.TestCase):
    def setUp(self):
        self.x = torch.randn(3)

    def msg(self, exc_type, fn):
        with self.assertRaises(exc_type) as cm:
            fn()
        m = str(cm.exception)
        assert_clean_message(m)
        self.assertEqual(ft._C._stack_depth(), 0)
        return m

    def test_jvp_primals_not_tuple(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(torch.sin, [x], (x,))),
            """jvp(f, primals, tangents): Expected primals to be a tuple (f is called as f(*primals)), got list.""",
        )  # noqa: B950
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(torch.sin, x, (x,))),
            """jvp(f, primals, tangents): Expected primals to be a tuple (f is called as f(*primals)), got Tensor.""",
        )  # noqa: B950

    def test_jvp_tangents_not_tuple(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(torch.sin, (x,), [x])),
            """jvp(f, primals, tangents): Expected tangents to be a tuple (f is called as f(*primals)), got list.""",
        )  # noqa: B950

    def test_jvp_structure_mismatch(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(lambda a, b: a + b, (x, x), (x,))),
            """\
jvp(f, primals, tangents): Expected primals and tangents to have the same python structure, got TreeSpec(tuple, None, [*,
  *]) and TreeSpec(tuple, None, [*]).""",
        )  # noqa: B950
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(lambda a: a[0], ((x, x),), ([x, x],))),
            """\
jvp(f, primals, tangents): Expected primals and tangents to have the same python structure, got TreeSpec(tuple, None, [TreeSpec(tuple, None, [*,
    *])]) and TreeSpec(tuple, None, [TreeSpec(list, None, [*,
    *])]).""",
        )  # noqa: B950

    def test_jvp_shape_mismatch(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(lambda a, b: a * b, (x, x), (x, torch.ones(4)))),
            """jvp(f, primals, tangents): primal 1 has shape (3,) but its tangent has shape (4,); they must match.""",
        )  # noqa: B950

    def test_jvp_integer_primal(self):
        i = torch.arange(3)
        self.assertExpectedInline(
            self.msg(ValueError, lambda: ft.jvp(lambda a: a * 2, (i,), (i,))),
            """jvp(f, primals, tangents): primal 0 must be a floating-point or complex Tensor, got dtype torch.int64.""",
        )  # noqa: B950

    def test_jvp_non_tensor_primal(self):
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(lambda a: a, (3.0,), (3.0,))),
            """jvp(f, primals, tangents): primals and tangents must be Tensors or pytrees of Tensors; entry 0 is a float / float.""",
        )  # noqa: B950

    def test_jvp_non_tensor_output(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(lambda a: (a, "label"), (x,), (x,))),
            """jvp(f, primals, tangents): expected f(*primals) to return only tensors (a Tensor or a pytree of Tensors), got a str in its output.""",
        )  # noqa: B950
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(lambda a: 3.0, (x,), (x,))),
            """jvp(f, primals, tangents): expected f(*primals) to return only tensors (a Tensor or a pytree of Tensors), got a float in its output.""",
        )  # noqa: B950

    def test_jvp_has_aux_without_tuple(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jvp(torch.sin, (x,), (x,), has_aux=True)),
            """jvp(f, has_aux=True): output of function f should be a tuple: (output, aux) if has_aux is True; got Tensor.""",
        )

    def test_jac_bad_argnums(self):
        x = self.x
        f = lambda a, b: a * b  # noqa: E731
        for api in ("jacrev", "jacfwd"):
            jac = getattr(ft, api)
            msgs = [
                self.msg(RuntimeError, lambda: jac(f, argnums=2)(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=-3)(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=(0, 5))(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=1.5)(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=[0])(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=True)(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=())(x, x)),
                self.msg(RuntimeError, lambda: jac(f, argnums=(0, -2))(x, x)),
            ]
            self.assertExpectedInline(
                "\n".join(msgs).replace(api, "<api>"),
                """\
<api>: got argnums=2, but only 2 positional inputs, so each argnum must be in [-2, 2).
<api>: got argnums=-3, but only 2 positional inputs, so each argnum must be in [-2, 2).
<api>: got argnums=(0, 5), but only 2 positional inputs, so each argnum must be in [-2, 2).
<api>: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got 1.5.
<api>: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got [0].
<api>: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got True.
<api>: argnums must be non-empty
<api>: argnums elements must be unique, got (0, -2)""",
            )  # noqa: B950

    def test_hessian_bad_argnums(self):
        x = self.x
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.hessian(lambda a: a.sum(), argnums=1)(x)),
            """hessian: got argnums=1, but only 1 positional inputs, so each argnum must be in [-1, 1).""",
        )  # noqa: B950

    def test_jacrev_invalid_chunk_size(self):
        self.assertExpectedInline(
            "\n".join(
                self.msg(
                    TypeError if isinstance(c, (bool, float)) else ValueError,
                    lambda: ft.jacrev(torch.sin, chunk_size=c),
                )
                for c in (0, -1, 1.5, True)
            ),
            """\
jacrev: chunk_size should be None or greater than 0 (a positive int), got 0
jacrev: chunk_size should be None or greater than 0 (a positive int), got -1
jacrev: chunk_size must be None or a positive int, got 1.5
jacrev: chunk_size must be None or a positive int, got True""",
        )

    def test_jacfwd_invalid_randomness(self):
        self.assertExpectedInline(
            self.msg(RuntimeError, lambda: ft.jacfwd(torch.sin, randomness="bad")),
            """jacfwd: Only allowed values for randomness are 'error', 'different', or 'same'. Got 'bad'.""",
        )

    def test_jac_errors_name_the_called_transform(self):
        # never the vjp/jvp/vmap they are built on, nor their internal helpers
        x, i = self.x, torch.arange(3)
        for api in ("jacrev", "jacfwd", "hessian"):
            jac = getattr(ft, api)
            kw = {} if api == "hessian" else {"has_aux": True}
            msgs = [
                self.msg(RuntimeError if api == "jacrev" else ValueError, lambda: jac(torch.sin)(i)),
                self.msg(RuntimeError, lambda: jac(lambda a: 3.0)(x)),
                self.msg(ValueError, lambda: jac(torch.sin, argnums=1)(x, 2.0)),
                self.msg(RuntimeError, lambda: jac(lambda a: a.sum(), argnums=1)(x)),
            ]
            if kw:
                msgs.append(self.msg(RuntimeError, lambda: jac(torch.sin, **kw)(x)))
            for m in msgs:
                assert m.startswith(api), m
                assert not any(s in m for s in ("vjp", "jvp", "vmap", "f_diff", "push_jvp")), m

    def test_jac_error_texts(self):
        x, i = self.x, torch.arange(3)

        def my_fn(a, b):
            return a * b

        self.assertExpectedInline(
            "\n".join(
                [
                    self.msg(RuntimeError, lambda: ft.jacrev(torch.sin, has_aux=True)(x)),
                    self.msg(RuntimeError, lambda: ft.jacfwd(torch.sin, has_aux=True)(x)),
                    self.msg(RuntimeError, lambda: ft.jacrev(lambda a: (a, a, a), has_aux=True)(x)),
                    self.msg(RuntimeError, lambda: ft.jacrev(torch.sin)(i)),
                    self.msg(ValueError, lambda: ft.jacfwd(torch.sin)(i)),
                    self.msg(ValueError, lambda: ft.hessian(torch.sin)(i)),
                    self.msg(ValueError, lambda: ft.jacrev(my_fn, argnums=1)(x, 2.0)),
                    self.msg(ValueError, lambda: ft.jacfwd(my_fn, argnums=(0, 1))(x, [x, 2.0])),
                    self.msg(RuntimeError, lambda: ft.jacrev(lambda a: 3.0)(x)),
                    self.msg(RuntimeError, lambda: ft.jacfwd(lambda a: 3.0)(x)),
                    self.msg(RuntimeError, lambda: ft.hessian(lambda a: 3.0)(x)),
                    self.msg(RuntimeError, lambda: ft.jacfwd(lambda a: (a, "label"))(x)),
                ]
            ),
            """\
jacrev(sin, has_aux=True): output of function sin should be a tuple: (output, aux) if has_aux is True; got Tensor.
jacfwd(sin, has_aux=True): output of function sin should be a tuple: (output, aux) if has_aux is True; got Tensor.
jacrev(<lambda>, has_aux=True): output of function <lambda> should be a tuple: (output, aux) if has_aux is True; got tuple of length 3.
jacrev(sin): argument 0 (argnums=0) must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.
jacfwd(sin): argument 0 (argnums=0) must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.
hessian(sin): argument 0 (argnums=0) must be a floating-point or complex Tensor to be differentiated, got a Tensor of dtype torch.int64.
jacrev(my_fn): argument 1 (argnums=1) must be a Tensor (or a pytree of Tensors), got a float.
jacfwd(my_fn): argument 1 (argnums=(0, 1)) at [1] must be a Tensor (or a pytree of Tensors), got a float.
jacrev(<lambda>): expected <lambda> to return only tensors (a Tensor or a pytree of Tensors), got a float in its output.
jacfwd(<lambda>): expected <lambda> to return only tensors (a Tensor or a pytree of Tensors), got a float in its output.
hessian(<lambda>): expected <lambda> to return only tensors (a Tensor or a pytree of Tensors), got a float in its output.
jacfwd(<lambda>): expected <lambda> to return only tensors (a Tensor or a pytree of Tensors), got a str in its output.""",
        )  # noqa: B950

    def test_jacfwd_non_tensor_aux_message(self):
        # torch.func refuses a non-Tensor aux in both; jacfwd could not return it through vmap
        self.assertExpectedInline(
            "\n".join(
                self.msg(
                    RuntimeError,
                    lambda: getattr(ft, api)(lambda a: (a.sin(), {"n": 3}), has_aux=True)(self.x),
                )
                for api in ("jacrev", "jacfwd")
            ),
            """\
jacrev(<lambda>, has_aux=True): the aux output of <lambda> may hold only tensors (a Tensor or a pytree of Tensors), but it holds an int.
jacfwd(<lambda>, has_aux=True): the aux output of <lambda> may hold only tensors (a Tensor or a pytree of Tensors), but it holds an int.""",
        )  # noqa: B950


# ------------------------------------------------------------------------------------------------
# seed 002 workloads (/work/shared/seeds/002_7ded5c7210c8a2e8.txt), at small sizes


def predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()


def test_seed002_jacrev_d16():
    D = 16
    weight, bias, x = torch.randn(D, D), torch.randn(D), torch.randn(D)
    xp = x.clone().requires_grad_()
    rows = [torch.autograd.grad(predict(weight, bias, xp), xp, v)[0] for v in torch.eye(D)]
    jacobian = torch.stack(rows)
    ft_jac = ft.jacrev(predict, argnums=2)(weight, bias, x)
    torch.testing.assert_close(ft_jac, jacobian)
    _, vjp_fn = ft.vjp(lambda x: predict(weight, bias, x), x)
    (vm_jac,) = ft.vmap(vjp_fn)(torch.eye(D))
    torch.testing.assert_close(vm_jac, jacobian)
    both(lambda L: L.jacrev(predict, argnums=(0, 1))(weight, bias, x))


@pytest.mark.parametrize("dout,din", [(64, 32), (32, 64)])
@pytest.mark.parametrize("api", JAC_APIS)
def test_seed002_jac_tall_and_wide(api, dout, din):
    weight, bias, x = torch.randn(dout, din), torch.randn(dout), torch.randn(din)
    jac = both(lambda L: getattr(L, api)(predict, argnums=2)(weight, bias, x))
    assert jac.shape == (dout, din)


def test_seed002_hessian_16():
    din, dout = 16, 8
    weight, bias, x = torch.randn(dout, din), torch.randn(dout), torch.randn(din)
    h = both(lambda L: L.hessian(predict, argnums=2)(weight, bias, x), atol=ATOL2, rtol=RTOL2)
    assert h.shape == (dout, din, din)
    revrev = ft.jacrev(ft.jacrev(predict, argnums=2), argnums=2)
    torch.testing.assert_close(revrev(weight, bias, x), h, atol=ATOL2, rtol=RTOL2)
    # jacfwd(jacfwd) of this non-scalar predict: see test_seed002_hessian_fwdfwd


def test_seed002_hessian_fwdfwd():
    din, dout = 16, 8
    weight, bias, x = torch.randn(dout, din), torch.randn(dout), torch.randn(din)
    both(lambda L: L.jacfwd(L.jacfwd(predict, argnums=2), argnums=2)(weight, bias, x), atol=ATOL2, rtol=RTOL2)


def test_seed002_vmap_jacrev_b8():
    B, din, dout = 8, 7, 9
    weight, bias, x = torch.randn(dout, din), torch.randn(dout), torch.randn(B, din)
    bj = both(lambda L: L.vmap(L.jacrev(predict, argnums=2), in_dims=(None, None, 0))(weight, bias, x))
    summed = ft.jacrev(lambda w, b, x: predict(w, b, x).sum(0), argnums=2)(weight, bias, x)
    torch.testing.assert_close(bj, summed.movedim(1, 0))


def test_seed002_batch_jacobian_by_summing_outputs():
    B, din, dout = 8, 7, 9
    weight, bias, x = torch.randn(dout, din), torch.randn(dout), torch.randn(B, din)
    summed = both(lambda L: L.jacrev(lambda w, b, x: predict(w, b, x).sum(0), argnums=2)(weight, bias, x))
    expected = tf.vmap(tf.jacrev(predict, argnums=2), in_dims=(None, None, 0))(weight, bias, x)
    torch.testing.assert_close(summed.movedim(1, 0), expected)
    # the forward-mode batched jacobian works (no vjp under vmap)
    both(lambda L: L.vmap(L.jacfwd(predict, argnums=2), in_dims=(None, None, 0))(weight, bias, x))


def test_seed002_vmap_hessian_b8():
    B, din, dout = 8, 7, 9
    weight, bias, x = torch.randn(dout, din), torch.randn(dout), torch.randn(B, din)
    bh = both(
        lambda L: L.vmap(L.hessian(predict, argnums=2), in_dims=(None, None, 0))(weight, bias, x),
        atol=ATOL2,
        rtol=RTOL2,
    )
    assert bh.shape == (B, dout, din, din)


def test_seed002_hvp_64():
    x, tangent = torch.randn(64), torch.randn(64)
    f = lambda x: x.sin().sum()  # noqa: E731
    fwd = both(lambda L: L.jvp(L.grad(f), (x,), (tangent,))[1])
    revrev = both(lambda L: L.vjp(L.grad(f), x)[1](tangent))
    torch.testing.assert_close(fwd, revrev[0])
    torch.testing.assert_close(fwd, -x.sin() * tangent)
