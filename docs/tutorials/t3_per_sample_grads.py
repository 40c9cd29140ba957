"""
Per-sample gradients
====================

Differential privacy, meta-learning and optimization research need the gradient of the loss
for *each example* of a batch, not their sum. Plain PyTorch computes the sum; the naive way to
get per-sample gradients is a loop of batch size 1. With functorch_lite, write the loss for one
example and transform it: ``vmap(grad(loss))`` computes all the gradients in one batched call.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import functorch_lite as ft

torch.manual_seed(0)


class SimpleCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


model = SimpleCNN()
batch_size = 32
data = torch.randn(batch_size, 1, 14, 14)  # random "images"
targets = torch.randint(10, (batch_size,))

# %%
# The naive way: one backward pass per example
# --------------------------------------------


def per_sample_loop(data, targets):
    grads = []
    for x, t in zip(data, targets):
        loss = F.cross_entropy(model(x[None]), t[None])
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    return [torch.stack(g) for g in zip(*grads)]


def timed(fn, *args):
    """(result, milliseconds) of the second call: the first one warms up."""
    fn(*args)
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)


loop_grads, t_loop = timed(per_sample_loop, data, targets)

# %%
# The functorch_lite way
# ----------------------
# :func:`~functorch_lite.functional_call` makes the model a function of its parameters; the loss
# is written for ONE example (the model still expects a batch dimension, so add one of size 1).
# ``grad`` differentiates it with respect to the parameters (argument 0) and ``vmap`` maps it
# over the examples and targets (``in_dims=(None, 0, 0)``: the parameters are shared).

params = {k: v.detach() for k, v in model.named_parameters()}


def compute_loss(params, sample, target):
    prediction = ft.functional_call(model, params, (sample[None],))
    return F.cross_entropy(prediction, target[None])


compute_per_sample_grads = ft.vmap(ft.grad(compute_loss), in_dims=(None, 0, 0))
per_sample_grads, t_vmap = timed(compute_per_sample_grads, params, data, targets)

for (name, g), expected in zip(per_sample_grads.items(), loop_grads):
    assert g.shape == (batch_size, *params[name].shape)
    torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-4)
    print(f"{name:14s} {tuple(g.shape)}")
print(f"for-loop {t_loop:.1f} ms, vmap(grad) {t_vmap:.1f} ms: the same gradients")

# %%
# Per-sample gradient norms
# -------------------------
# What DP-SGD clips: the norm of each example's gradient over all parameters.
# (:func:`functorch_lite.dp.clipped_grad_module` computes the clipped sum directly, often without
# forming the per-sample gradients at all: see the DP-SGD tutorial.)

norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample_grads.values()]).norm(dim=0)
print("per-sample gradient norms:", norms[:6].tolist())
