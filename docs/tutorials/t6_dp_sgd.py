"""
Differentially private training (DP-SGD)
========================================

DP-SGD trains a model so that its weights reveal little about any single training example: each
example's gradient is clipped to a norm C, the clipped gradients are summed, Gaussian noise of
std sigma * C is added, and batches are Poisson-sampled so that the privacy spent can be
accounted as (epsilon, delta). :mod:`functorch_lite.dp` does all of it on functorch_lite's
transforms (see :doc:`/dp` and :doc:`/dp_clipping`).

This tutorial trains a small model on scikit-learn's handwritten digits (shipped with
scikit-learn, no download) for a few epochs; ``bash scripts/demo.sh`` runs the full version.
"""

import logging

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import functorch_lite as ft
from functorch_lite import dp

torch.manual_seed(0)
torch.set_num_threads(1)
# dp-accounting logs a warning for each Renyi order it cannot evaluate and leaves out of the
# bound (harmless: epsilon is the minimum over the other orders).
logging.getLogger("absl").setLevel(logging.ERROR)

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).flatten(1) / 16.0  # (1797, 64)
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
mean, std = x[train].mean(0), x[train].std(0) + 0.1
x = (x - mean) / std
train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]

# %%
# Clipped per-example gradients
# -----------------------------
# The core of a DP-SGD step: the sum over the batch of per-example gradients, each clipped to
# norm C. :func:`~functorch_lite.dp.clipped_grad_module` computes it (for linear layers from
# norms of layer inputs and output gradients, never forming the per-example gradients); here it
# is checked against ``vmap(grad)`` and explicit clipping.


def make_model():
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


model = make_model()


def loss_fn(out, target):
    return F.cross_entropy(out, target, reduction="none")  # per-example losses


C = 1.0
xb, yb = train_x[:32], train_y[:32]
clipped_sum = dp.clipped_grad_module(model, loss_fn, xb, yb, max_norm=C)

params = {k: v.detach() for k, v in model.named_parameters()}


def one_example(params, xi, yi):
    return F.cross_entropy(ft.functional_call(model, params, (xi[None],)), yi[None])


per_example = ft.vmap(ft.grad(one_example), in_dims=(None, 0, 0))(params, xb, yb)
norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example.values()]).norm(dim=0)
factors = (C / (norms + 1e-6)).clamp(max=1.0)
for name, g in per_example.items():
    expected = (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0)
    torch.testing.assert_close(clipped_sum[name], expected, atol=1e-5, rtol=1e-4)
print(f"clipped sum equals vmap(grad) + clipping; {int((norms > C).sum())} of 32 examples were clipped")

# %%
# Training
# --------
# :class:`~functorch_lite.dp.PrivateTrainer` does the whole step: clip, sum, add noise once,
# divide by the *expected* batch size, step the optimizer, record the step for the accountant.
# The noise multiplier is calibrated so that epsilon reaches 4 at delta 1e-5 after 5 epochs.

epochs, batch_size, delta = 5, 128, 1e-5
q = batch_size / len(train_x)  # Poisson sampling rate
model = make_model()
trainer = dp.PrivateTrainer(
    model,
    torch.optim.Adam(model.parameters(), lr=0.01),
    loss_fn,
    max_grad_norm=C,
    sample_rate=q,
    expected_batch_size=batch_size,
    target_epsilon=4.0,
    target_delta=delta,
    epochs=epochs,
)
print(f"noise multiplier {trainer.noise_multiplier:.3f} for epsilon 4 after {epochs} epochs")


def accuracy(model):
    with torch.no_grad():
        return (model(test_x).argmax(-1) == test_y).float().mean().item()


gen = torch.Generator().manual_seed(0)
curve = []
for epoch in range(epochs):
    for xb, yb in dp.poisson_batches((train_x, train_y), q, generator=gen):
        trainer.step(xb, yb)
    eps = trainer.get_epsilon(delta)
    curve.append((eps, accuracy(model)))
    print(f"epoch {epoch + 1}: {trainer.steps} steps, epsilon {eps:.2f}, test accuracy {curve[-1][1]:.3f}")

# %%
# The same model trained without privacy, for comparison:

baseline = make_model()
opt = torch.optim.Adam(baseline.parameters(), lr=0.01)
for _ in range(epochs):
    for xb, yb in dp.poisson_batches((train_x, train_y), q, generator=gen):
        opt.zero_grad()
        F.cross_entropy(baseline(xb), yb).backward()
        opt.step()
print(f"without privacy: test accuracy {accuracy(baseline):.3f}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([e for e, _ in curve], [a for _, a in curve], marker="o", label="DP-SGD")
ax.axhline(accuracy(baseline), color="gray", linestyle="--", label="no privacy")
ax.set_xlabel(f"epsilon (delta = {delta:g})")
ax.set_ylabel("test accuracy")
ax.legend()
fig.tight_layout()
