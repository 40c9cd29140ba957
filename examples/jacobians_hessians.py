"""Jacobians and Hessians with functorch_lite (the workflow of the torch.func Jacobian/Hessian
tutorial): row-by-row autograd vs vmap(vjp) vs jacrev, jacfwd vs jacrev on tall and wide
Jacobians, Hessians three ways, batched Jacobians/Hessians, and Hessian-vector products.
Every result is checked against plain autograd or another route to the same quantity.

    python examples/jacobians_hessians.py [--size small|default]
"""

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

import functorch_lite as ft


def predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()


def timed(fn, repeat=20):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main(size="default"):
    torch.manual_seed(0)
    small = size == "small"
    D = 8 if small else 16
    weight, bias, x = torch.randn(D, D), torch.randn(D), torch.randn(D)

    # Row by row with autograd, one unit vector at a time.
    xp = x.clone().requires_grad_()
    rows = [torch.autograd.grad(predict(weight, bias, xp), xp, v)[0] for v in torch.eye(D)]
    jacobian = torch.stack(rows)

    # vmap over the vector-Jacobian product, then the jacrev convenience.
    _, vjp_fn = ft.vjp(partial(predict, weight, bias), x)
    (vjp_jacobian,) = ft.vmap(vjp_fn)(torch.eye(D))
    assert torch.allclose(vjp_jacobian, jacobian, atol=1e-6)
    assert torch.allclose(ft.jacrev(predict, argnums=2)(weight, bias, x), jacobian, atol=1e-6)
    jac_w, jac_b = ft.jacrev(predict, argnums=(0, 1))(weight, bias, x)
    assert jac_w.shape == (D, D, D) and jac_b.shape == (D, D)
    print(f"jacobian {tuple(jacobian.shape)}: row-by-row autograd == vmap(vjp) == jacrev")

    # jacfwd suits tall Jacobians (few inputs), jacrev wide ones (few outputs).
    for d_in, d_out in ((8, 64), (64, 8)) if small else ((32, 2048), (2048, 32)):
        w, b, xi = torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(d_in)
        fwd = ft.jacfwd(predict, argnums=2)(w, b, xi)
        rev = ft.jacrev(predict, argnums=2)(w, b, xi)
        assert torch.allclose(fwd, rev, atol=1e-5)
        t_fwd = timed(lambda: ft.jacfwd(predict, argnums=2)(w, b, xi), 3 if small else 10)
        t_rev = timed(lambda: ft.jacrev(predict, argnums=2)(w, b, xi), 3 if small else 10)
        print(f"{d_out}x{d_in} jacobian: jacfwd {1e3 * t_fwd:.2f} ms, jacrev {1e3 * t_rev:.2f} ms")

    # Hessians: the API, forward-over-forward and reverse-over-reverse agree.
    d_in, d_out = (16, 4) if small else (512, 32)
    w, b, xi = torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(d_in)
    hess = ft.hessian(predict, argnums=2)(w, b, xi)
    hess_ff = ft.jacfwd(ft.jacfwd(predict, argnums=2), argnums=2)(w, b, xi)
    hess_rr = ft.jacrev(ft.jacrev(predict, argnums=2), argnums=2)(w, b, xi)
    assert torch.allclose(hess, hess_ff, atol=1e-5) and torch.allclose(hess, hess_rr, atol=1e-5)
    print(f"hessian {tuple(hess.shape)}: hessian == jacfwd(jacfwd) == jacrev(jacrev)")

    # Batched Jacobians and Hessians; the summed-output trick gives the same Jacobians.
    batch, d_in, d_out = (4, 5, 6) if small else (64, 31, 33)
    w, b, xs = torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(batch, d_in)
    batch_jac = ft.vmap(ft.jacrev(predict, argnums=2), in_dims=(None, None, 0))(w, b, xs)
    summed = ft.jacrev(lambda w, b, x: predict(w, b, x).sum(0), argnums=2)(w, b, xs).movedim(1, 0)
    assert torch.allclose(batch_jac, summed, atol=1e-6)
    batch_hess = ft.vmap(ft.hessian(predict, argnums=2), in_dims=(None, None, 0))(w, b, xs)
    assert batch_hess.shape == (batch, d_out, d_in, d_in)
    print(f"batched jacobians {tuple(batch_jac.shape)}, batched hessians {tuple(batch_hess.shape)}")

    # Hessian-vector products: forward-over-reverse and reverse-over-reverse.
    n = 64 if small else 2048
    xv, tangent = torch.randn(n), torch.randn(n)

    def f(x):
        return x.sin().sum()

    hvp = ft.jvp(ft.grad(f), (xv,), (tangent,))[1]
    _, vjp_fn = ft.vjp(ft.grad(f), xv)
    assert torch.allclose(hvp, vjp_fn(tangent)[0], atol=1e-6)
    assert torch.allclose(hvp, -xv.sin() * tangent, atol=1e-6)
    print(f"hvp on {n} elements: jvp(grad) == vjp(grad) == -sin(x) * v")
    print("jacobians/hessians OK: every route gives equal results")
    return jacobian, hess


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "default"], default="default")
    main(parser.parse_args().size)
