"""Jacobians and Hessians of batch norm in training mode (issue 12, item 14).

ft.jacrev(lambda h: F.batch_norm(h, None, None, training=True))(torch.randn(4, 1)) returned
uninitialised memory in half of its rows: under vmap, native_batch_norm_backward got the saved
per-channel statistics (unbatched, C == 1) expanded to the batch as a stride-0 view, and torch's
CPU kernel reads them as a dense buffer, past their one element. Every transform below is
compared exactly (float64 tolerances) with torch.func and with torch.autograd.functional, over
N and C including 1, spatial dims or none, with and without weight/bias and running stats.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import functorch_lite as ft

DT = torch.float64

SHAPES = [
    (n, c, *sp)
    for n, c, sp in itertools.product((1, 2, 4), (1, 3), ((), (2,)))
    if n * (sp[0] if sp else 1) > 1
]  # training needs more than one value per channel


def _setup(shape, affine, running):
    x = torch.randn(*shape, dtype=DT)
    c = shape[1]
    w = torch.randn(c, dtype=DT) if affine else None
    b = torch.randn(c, dtype=DT) if affine else None

    def stats():
        # fresh buffers per call: training mode updates them in place
        if not running:
            return None, None
        return torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT)

    def f(h, w=w, b=b):
        rm, rv = stats()
        return F.batch_norm(h, rm, rv, weight=w, bias=b, training=True)

    return x, w, b, f


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("running", [False, True], ids=["nostats", "stats"])
def test_jacobians_match_torch_func_and_autograd(shape, affine, running):
    x, w, b, f = _setup(shape, affine, running)
    ref = torch.autograd.functional.jacobian(f, x)
    for name, ours, theirs in [
        ("jacrev", ft.jacrev, torch.func.jacrev),
        ("jacfwd", ft.jacfwd, torch.func.jacfwd),
    ]:
        got = ours(f)(x)
        torch.testing.assert_close(got, theirs(f)(x), msg=lambda m: f"{name} vs torch.func: {m}")
        torch.testing.assert_close(got, ref, msg=lambda m: f"{name} vs autograd: {m}")
    if affine:
        # the per-channel weight and bias gradients come back per batch element of the basis
        got = ft.jacrev(f, argnums=(0, 1, 2))(x, w, b)
        ref = torch.autograd.functional.jacobian(f, (x, w, b))
        for i, (g, r) in enumerate(zip(got, ref)):
            torch.testing.assert_close(g, r, msg=lambda m: f"jacrev argnum {i}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_hessian_and_per_sample_grad(shape, affine):
    x, w, b, f = _setup(shape, affine, running=False)
    proj = torch.randn(*shape, dtype=DT)

    def loss(h):
        return (f(h) * proj).sum()

    torch.testing.assert_close(ft.hessian(loss)(x), torch.func.hessian(loss)(x))
    torch.testing.assert_close(ft.hessian(loss)(x), torch.autograd.functional.hessian(loss, x))
    xs = torch.randn(3, *shape, dtype=DT)
    torch.testing.assert_close(ft.vmap(ft.grad(loss))(xs), torch.func.vmap(torch.func.grad(loss))(xs))


def test_issue_example():
    x = torch.randn(4, 1, dtype=DT)

    def f(h):
        return F.batch_norm(h, None, None, training=True)

    torch.testing.assert_close(ft.jacrev(f)(x), torch.func.jacrev(f)(x))
