"""
Jacobians and Hessians, with timings
====================================

Computing a Jacobian row by row with ``torch.autograd.grad`` is a Python loop of backward
passes. functorch_lite vectorizes it: :func:`~functorch_lite.vmap` over
:func:`~functorch_lite.vjp` computes every row in one call, and
:func:`~functorch_lite.jacrev` / :func:`~functorch_lite.jacfwd` /
:func:`~functorch_lite.hessian` package it. This tutorial checks every route against the
others and times them (small sizes, so that it runs in seconds: the timings are illustrative,
see :doc:`/performance` for benchmarks).
"""

import time
from functools import partial

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import functorch_lite as ft

torch.manual_seed(0)
torch.set_num_threads(1)  # steadier timings on a shared machine


def predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()


def timeit(fn, repeat=10):
    """Median time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


D = 16
weight, bias, x = torch.randn(D, D), torch.randn(D), torch.randn(D)

# %%
# Row by row, then vectorized
# ---------------------------
# The Jacobian of ``predict`` with respect to ``x``: one backward pass per unit vector, then
# ``vmap(vjp_fn)`` over all unit vectors at once, then ``jacrev``.

unit_vectors = torch.eye(D)


def jacobian_loop(x):
    xp = x.clone().requires_grad_()
    out = predict(weight, bias, xp)
    return torch.stack([torch.autograd.grad(out, xp, v, retain_graph=True)[0] for v in unit_vectors])


def jacobian_vmap_vjp(x):
    _, vjp_fn = ft.vjp(partial(predict, weight, bias), x)
    return ft.vmap(vjp_fn)(unit_vectors)[0]


jacobian = jacobian_loop(x)
assert torch.allclose(jacobian_vmap_vjp(x), jacobian, atol=1e-6)
assert torch.allclose(ft.jacrev(predict, argnums=2)(weight, bias, x), jacobian, atol=1e-6)

t_loop = timeit(lambda: jacobian_loop(x))
t_vmap = timeit(lambda: jacobian_vmap_vjp(x))
t_jacrev = timeit(lambda: ft.jacrev(predict, argnums=2)(weight, bias, x))
print(f"{D}x{D} Jacobian: for-loop {t_loop:.2f} ms, vmap(vjp) {t_vmap:.2f} ms, jacrev {t_jacrev:.2f} ms")

# %%
# Jacobians of several arguments: ``argnums`` takes a tuple.

jac_weight, jac_bias = ft.jacrev(predict, argnums=(0, 1))(weight, bias, x)
print("d predict / d weight:", tuple(jac_weight.shape), " d predict / d bias:", tuple(jac_bias.shape))

# %%
# jacfwd or jacrev?
# -----------------
# Both give the same Jacobian. Reverse mode costs one pass per *output*, forward mode one per
# *input*: ``jacfwd`` suits tall Jacobians (more outputs than inputs), ``jacrev`` wide ones.

shapes = {"tall (1024 out x 8 in)": (8, 1024), "wide (8 out x 1024 in)": (1024, 8)}
timings = {}
for name, (d_in, d_out) in shapes.items():
    w, b, xi = torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(d_in)
    fwd = ft.jacfwd(predict, argnums=2)(w, b, xi)
    rev = ft.jacrev(predict, argnums=2)(w, b, xi)
    assert torch.allclose(fwd, rev, atol=1e-5)
    timings[name] = (
        timeit(lambda: ft.jacfwd(predict, argnums=2)(w, b, xi)),
        timeit(lambda: ft.jacrev(predict, argnums=2)(w, b, xi)),
    )
    print(f"{name}: jacfwd {timings[name][0]:.2f} ms, jacrev {timings[name][1]:.2f} ms")

fig, ax = plt.subplots(figsize=(6, 3))
names = list(timings)
ax.bar([i - 0.2 for i in range(len(names))], [t[0] for t in timings.values()], 0.4, label="jacfwd")
ax.bar([i + 0.2 for i in range(len(names))], [t[1] for t in timings.values()], 0.4, label="jacrev")
ax.set_xticks(range(len(names)), names)
ax.set_ylabel("ms per Jacobian")
ax.legend()
fig.tight_layout()

# %%
# Hessians
# --------
# ``hessian`` is ``jacfwd(jacrev(f))`` (forward over reverse); reverse over reverse and
# forward over forward give the same matrix.

d_in, d_out = 32, 8
w, b, xi = torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(d_in)
hess = ft.hessian(predict, argnums=2)(w, b, xi)
hess_rr = ft.jacrev(ft.jacrev(predict, argnums=2), argnums=2)(w, b, xi)
hess_ff = ft.jacfwd(ft.jacfwd(predict, argnums=2), argnums=2)(w, b, xi)
assert torch.allclose(hess, hess_rr, atol=1e-5) and torch.allclose(hess, hess_ff, atol=1e-5)
for name, fn in [
    ("hessian (fwd over rev)", lambda: ft.hessian(predict, argnums=2)(w, b, xi)),
    ("jacrev(jacrev)", lambda: ft.jacrev(ft.jacrev(predict, argnums=2), argnums=2)(w, b, xi)),
    ("jacfwd(jacfwd)", lambda: ft.jacfwd(ft.jacfwd(predict, argnums=2), argnums=2)(w, b, xi)),
]:
    print(f"{name:24s} {tuple(hess.shape)}: {timeit(fn, repeat=5):.2f} ms")

# %%
# Batched Jacobians and Hessians
# ------------------------------
# ``vmap`` over ``jacrev``/``hessian`` computes one per example. When examples are
# independent, the Jacobian of the *summed* output gives the same numbers.

batch = 16
xs = torch.randn(batch, d_in)
batch_jac = ft.vmap(ft.jacrev(predict, argnums=2), in_dims=(None, None, 0))(w, b, xs)
summed = ft.jacrev(lambda w, b, x: predict(w, b, x).sum(0), argnums=2)(w, b, xs).movedim(1, 0)
assert torch.allclose(batch_jac, summed, atol=1e-6)
batch_hess = ft.vmap(ft.hessian(predict, argnums=2), in_dims=(None, None, 0))(w, b, xs)
print("batched Jacobians:", tuple(batch_jac.shape), " batched Hessians:", tuple(batch_hess.shape))

# %%
# Hessian-vector products
# -----------------------
# Without forming the Hessian: forward over reverse (``jvp`` of ``grad``) or reverse over
# reverse (``vjp`` of ``grad``).


def f(x):
    return x.sin().sum()


xv, v = torch.randn(2048), torch.randn(2048)
hvp_fwd = ft.jvp(ft.grad(f), (xv,), (v,))[1]
_, vjp_fn = ft.vjp(ft.grad(f), xv)
hvp_rev = vjp_fn(v)[0]
assert torch.allclose(hvp_fwd, -xv.sin() * v, atol=1e-6) and torch.allclose(hvp_rev, hvp_fwd, atol=1e-6)
print(
    f"hvp on 2048 elements: jvp(grad) {timeit(lambda: ft.jvp(ft.grad(f), (xv,), (v,))):.2f} ms, "
    f"vjp(grad) {timeit(lambda: ft.vjp(ft.grad(f), xv)[1](v)):.2f} ms"
)
