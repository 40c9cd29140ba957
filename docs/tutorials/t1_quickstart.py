"""
Quick start and whirlwind tour
==============================

functorch_lite gives PyTorch JAX-like *composable function transforms*: a transform takes a
numerical function and returns a new function that computes something else about it.
:func:`~functorch_lite.grad` returns a function computing the gradient,
:func:`~functorch_lite.vmap` one that runs on a batch of inputs, and so on, and they compose
in any order. ``vmap(grad(f))`` computes per-sample gradients, which plain PyTorch cannot do
efficiently.

Composable transforms cover, without a separate subsystem for each:

- per-sample gradients (or other per-sample quantities),
- running an ensemble of models on one machine,
- batching the tasks of MAML's inner loop,
- Jacobians and Hessians, batched or not.

The API is ``torch.func``'s (see :doc:`/migration`): replace ``torch.func`` with
``functorch_lite``.
"""

import torch

import functorch_lite as ft

torch.manual_seed(0)

# %%
# grad: gradients
# ---------------
# ``grad(func)`` returns a function computing the gradient of ``func``, which must return a
# single-element tensor, with respect to its first argument (``argnums`` chooses others).
# Nesting it gives higher derivatives.

x = torch.randn([])
cos_x = ft.grad(torch.sin)(x)
assert torch.allclose(cos_x, x.cos())

neg_sin_x = ft.grad(ft.grad(torch.sin))(x)  # second derivative
assert torch.allclose(neg_sin_x, -x.sin())
print(f"x = {x.item():.4f}: sin'(x) = {cos_x.item():.4f}, sin''(x) = {neg_sin_x.item():.4f}")

# %%
# vmap: auto-vectorization
# ------------------------
# ``vmap(func)`` maps ``func`` over a dimension (default: 0) of its inputs. Write ``func`` for
# one example and vmap runs it on the batch in one call, with batching rules (no Python loop).

batch_size, feature_size = 3, 5
weights = torch.randn(feature_size, requires_grad=True)


def model(feature_vec):
    # a very simple linear model with an activation, written for ONE example
    assert feature_vec.dim() == 1
    return feature_vec.dot(weights).relu()


examples = torch.randn(batch_size, feature_size)
result = ft.vmap(model)(examples)
print("vmap(model) on a batch:", result.shape)

# %%
# Composing them: per-sample gradients
# ------------------------------------
# ``grad`` inside ``vmap`` gives one gradient per example. ``in_dims=(None, 0, 0)`` maps the
# examples and targets, and shares the weights.


def model2(weights, feature_vec):
    return feature_vec.dot(weights).relu()


def compute_loss(weights, example, target):
    y = model2(weights, example)
    return ((y - target) ** 2).mean()  # MSE loss of one example


weights = torch.randn(feature_size)
targets = torch.randn(batch_size)
per_example = ft.vmap(ft.grad(compute_loss), in_dims=(None, 0, 0))(weights, examples, targets)
print("per-sample gradients:", per_example.shape)

loop = torch.stack([ft.grad(compute_loss)(weights, e, t) for e, t in zip(examples, targets)])
assert torch.allclose(per_example, loop, atol=1e-6)

# %%
# vjp and jvp
# -----------
# ``vjp`` applies ``func`` and returns a function computing vector-Jacobian products
# (reverse mode); ``jvp`` computes Jacobian-vector products (forward mode) along with the output.

inputs = torch.randn(3)
cotangents = (torch.randn(3),)
outputs, vjp_fn = ft.vjp(torch.sin, inputs)
(vjps,) = vjp_fn(*cotangents)
assert torch.allclose(vjps, cotangents[0] * inputs.cos())

x, y = torch.randn(5), torch.randn(5)
_, jvp_out = ft.jvp(lambda x, y: x * y, (x, y), (torch.ones(5), torch.ones(5)))
assert torch.allclose(jvp_out, x + y)

# %%
# jacrev, jacfwd and hessian
# --------------------------
# ``jacrev`` computes a Jacobian by reverse mode (``vmap`` over ``vjp``), ``jacfwd`` by
# forward mode (``vmap`` over ``jvp``); both compose with ``vmap`` for batched Jacobians.
# ``hessian`` is ``jacfwd(jacrev(f))``.

x = torch.randn(5)
assert torch.allclose(ft.jacrev(torch.sin)(x), torch.diag(x.cos()))
assert torch.allclose(ft.jacfwd(torch.sin)(x), torch.diag(x.cos()))

batch_jacobian = ft.vmap(ft.jacrev(torch.sin))(torch.randn(64, 5))
print("batched Jacobians:", batch_jacobian.shape)


def f(x):
    return x.sin().sum()


hessian0 = ft.jacrev(ft.jacrev(f))(x)
hessian1 = ft.jacfwd(ft.jacrev(f))(x)
hess = ft.hessian(f)(x)
assert torch.allclose(hess, torch.diag(-x.sin())) and torch.allclose(hess, hessian0)
assert torch.allclose(hess, hessian1)
print("hessian:", hess.shape)

# %%
# Working with modules
# --------------------
# :func:`~functorch_lite.functional_call` runs an ``nn.Module`` with the parameters you give
# it, so transforms can differentiate or batch over them. (functorch 0.2's
# ``make_functional`` is also there.)

net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
params = {k: v.detach() for k, v in net.named_parameters()}


def net_loss(params, x, t):
    return (ft.functional_call(net, params, (x,)) - t).pow(2).sum()


grads = ft.vmap(ft.grad(net_loss), in_dims=(None, 0, 0))(params, torch.randn(4, 5), torch.randn(4, 1))
print({name: tuple(g.shape) for name, g in grads.items()})

# %%
# What ran
# --------
# :func:`~functorch_lite.show_config` prints how the extension was built and the vmap fallback
# mode: ops without a batching rule run as a for-loop (correct, slower) and warn once;
# ``ft.set_vmap_fallback("error")`` turns that into an error.

cfg = ft.show_config()
