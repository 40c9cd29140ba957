"""
DP fine-tuning of a small GPT-2
===============================

The usual way to train a language model with differential privacy: start from a model trained
on public text, then fine-tune it with DP-SGD on the private text, so that the fine-tuned weights
reveal little about any single private example. This tutorial does it at toy scale on the CPU
with a GPT-2 from `transformers <https://huggingface.co/docs/transformers>`_, built from a
config (nothing downloaded): 2 layers, d = 64, a character-level vocabulary, 64 positions.

Both texts ship with Python: the docstrings of some standard-library modules stand in for the
public text, those of other modules for the private one (deterministic for a given Python
version). The private text is cut into windows of 64 characters; each window is one training
example, and the (epsilon, delta) guarantee is per window (a real application would make one
example of everything one person wrote).

What makes this cheap in :mod:`functorch_lite.dp` (see :doc:`/dp_clipping`): the per-example
gradient norms come from each layer's inputs and output gradients, never from per-example
gradients. GPT-2's projections are transformers' ``Conv1D`` layers, which have a rule (a Linear
with the weight transposed). The output layer ``lm_head`` shares its weight with the token
embedding ``wte``; the norm of the sum of the two uses' gradients needs their cross term
``<G_wte, G_lm_head>``, computed from ``T x T`` products per example, so no per-example copy of
the ``vocab x d`` weight is ever formed (at GPT-2's real vocabulary of 50,257 tokens that copy
would be 150 MB per example). The position embedding ``wpe`` of the position ids, which all
examples share, gets per-example gradients too.
"""

import importlib
import inspect
import logging
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import transformers

from functorch_lite import dp

torch.manual_seed(0)
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on skipped orders


def docstrings(modules):
    """The docstrings of the modules and of their public functions and classes, in order."""
    out = []
    for name in modules:
        module = importlib.import_module(name)
        out.append(inspect.getdoc(module) or "")
        for key, obj in vars(module).items():
            if key.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ == name and inspect.getdoc(obj):
                out.append(inspect.getdoc(obj))
    return "\n\n".join(out)


public = docstrings(
    ["os", "shutil", "subprocess", "logging", "inspect", "typing", "pathlib", "tempfile"]
    + ["threading", "contextlib", "collections", "functools", "dataclasses", "enum"]
)
private = docstrings(
    ["difflib", "statistics", "json", "textwrap", "configparser", "urllib.parse", "base64"]
    + ["uuid", "ipaddress", "argparse", "csv", "email.utils", "zipfile"]
)
chars = sorted(set(public + private))
index = {c: i for i, c in enumerate(chars)}
T = 64


def windows(text):
    """Non-overlapping windows of T characters (the inputs) and the same shifted by one (the
    next characters to predict)."""
    ids = torch.tensor([index[c] for c in text])
    n = (len(ids) - 1) // T
    return ids[: n * T].view(n, T), ids[1 : n * T + 1].view(n, T)


public_x, public_y = windows(public)
x, y = windows(private)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
n_test = len(x) // 10
test_x, test_y = x[perm[:n_test]], y[perm[:n_test]]
train_x, train_y = x[perm[n_test:]], y[perm[n_test:]]
print(
    f"vocabulary: {len(chars)} characters; public text: {len(public):,} characters "
    f"({len(public_x)} windows); private: {len(private):,} ({len(train_x)} training and "
    f"{len(test_x)} test windows)"
)
print(repr(private[:160]))

# %%
# The model
# ---------
# ``GPT2LMHeadModel`` from a config, dropout off (so that the private and the non-private
# fine-tuning below see the same function). The wrapper returns the logits; the per-example loss
# is the mean cross-entropy over the window's 64 next characters.


class CharGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=len(chars),
            n_positions=T,
            n_embd=64,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        self.gpt2 = transformers.GPT2LMHeadModel(config)

    def forward(self, ids):
        return self.gpt2(input_ids=ids).logits


def loss_fn(logits, targets):
    """Per-example losses, shape (B,): what DP-SGD clips."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)


def test_loss(model):
    with torch.no_grad():
        return loss_fn(model(test_x), test_y).mean().item()


model = CharGPT()
print(
    f"{sum(p.numel() for p in model.parameters()):,} parameters; lm_head tied to wte:",
    model.gpt2.lm_head.weight is model.gpt2.transformer.wte.weight,
)

# %%
# Pre-training on the public text, without privacy (a stand-in for a downloaded checkpoint):

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(0)
print(f"test loss on the private text before any training: {test_loss(model):.3f}")
for _ in range(100):
    idx = torch.randint(0, len(public_x), (32,), generator=gen)
    optimizer.zero_grad()
    loss_fn(model(public_x[idx]), public_y[idx]).mean().backward()
    optimizer.step()
pretrained_loss = test_loss(model)
print(f"after pre-training on the public text: {pretrained_loss:.3f}")
pretrained = {k: v.clone() for k, v in model.state_dict().items()}

# %%
# Before training privately, :func:`~functorch_lite.dp.validate` checks that no layer mixes
# examples and says which layers would take a slower path: here none, every parameter
# (``Conv1D``, the tied ``wte``/``lm_head``, ``wpe``, the layer norms) is on a per-layer rule.

print(dp.validate(model, loss_fn, train_x[:4], train_y[:4]))

# %%
# DP fine-tuning
# --------------
# Batches are Poisson-sampled (:func:`~functorch_lite.dp.poisson_batches`: each window is in a
# batch with probability q, so batch sizes vary), and
# :class:`~functorch_lite.dp.PrivateTrainer` picks the noise multiplier that spends a target
# epsilon of 8 (delta 1e-4, below 1 / the number of windows) in 60 steps. Each step clips every
# window's gradient to norm 1, sums, adds the noise once, divides by the expected batch size and
# steps AdamW.

steps, batch_size, delta = 60, 64, 1e-4
q = batch_size / len(train_x)


def batches(generator):
    """Poisson-sampled batches of the private training windows, epoch after epoch."""
    while True:
        yield from dp.poisson_batches((train_x, train_y), q, generator=generator)


trainer = dp.PrivateTrainer(
    model,
    torch.optim.AdamW(model.parameters(), lr=3e-3),
    loss_fn,
    max_grad_norm=1.0,
    sample_rate=q,
    expected_batch_size=batch_size,
    target_epsilon=8.0,
    target_delta=delta,
    steps=steps,
)
print(
    f"sample rate q = {q:.4f}; noise multiplier {trainer.noise_multiplier:.3f} for epsilon 8 in {steps} steps"
)

dp_curve, dp_seconds = [(0, pretrained_loss)], 0.0
for step, (xb, yb) in zip(range(1, steps + 1), batches(torch.Generator().manual_seed(1))):
    t0 = time.perf_counter()
    trainer.step(xb, yb)
    dp_seconds += time.perf_counter() - t0
    if step % 10 == 0:
        dp_curve.append((step, test_loss(model)))
        print(f"step {step}: test loss {dp_curve[-1][1]:.3f}, epsilon {trainer.get_epsilon(delta):.2f}")

# %%
# The same fine-tuning without privacy, from the same pre-trained weights and on the same
# Poisson-sampled batches: the floor, both for the loss and for the time of a step.

model.load_state_dict(pretrained)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
curve, seconds = [(0, pretrained_loss)], 0.0
for step, (xb, yb) in zip(range(1, steps + 1), batches(torch.Generator().manual_seed(1))):
    t0 = time.perf_counter()
    optimizer.zero_grad()
    loss_fn(model(xb), yb).mean().backward()
    optimizer.step()
    seconds += time.perf_counter() - t0
    if step % 10 == 0:
        curve.append((step, test_loss(model)))

print(f"test loss after {steps} steps: DP {dp_curve[-1][1]:.3f}, without privacy {curve[-1][1]:.3f}")
print(
    f"time per step: DP {dp_seconds / steps * 1e3:.0f} ms, without privacy {seconds / steps * 1e3:.0f} ms "
    f"({dp_seconds / seconds:.2f}x)"
)
print(f"privacy spent: epsilon {trainer.get_epsilon(delta):.2f} at delta {delta:g}")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(*zip(*dp_curve), marker="o", label=f"DP-SGD (epsilon {trainer.get_epsilon(delta):.1f})")
ax.plot(*zip(*curve), marker="o", color="gray", linestyle="--", label="no privacy")
ax.set_xlabel("fine-tuning step")
ax.set_ylabel("test loss on the private text")
ax.legend()
fig.tight_layout()

# %%
# The DP step costs a small multiple of the non-private one (the per-example norms, the noise);
# on a model this small the fixed per-step overhead weighs most. At GPT-2's real sizes
# (50,257-token vocabulary, d = 768) the ratio is in :doc:`/performance` ("DP fine-tuning at
# language-model scale", ``python benchmarks/run.py --only dp_lm``), next to Opacus' ghost
# clipping, which does not support the tied ``wte``/``lm_head`` weight.
