"""
Model ensembling
================

An ensemble averages the predictions of several models of one architecture. Running them one
after another is a Python loop of small calls; functorch_lite stacks their weights
(:func:`~functorch_lite.stack_module_state`) and runs all of them in one batched call
(:func:`~functorch_lite.vmap` over :func:`~functorch_lite.functional_call`).
"""

import copy
import time

import torch
import torch.nn as nn

import functorch_lite as ft

torch.manual_seed(0)


def make_model():
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


num_models, batch = 8, 64
models = [make_model() for _ in range(num_models)]

# %%
# Stack the weights
# -----------------
# ``stack_module_state`` returns dicts name -> tensor with a new leading dim of size
# ``num_models``. The module to call only provides the structure, so a copy on the ``meta``
# device (no memory) is enough.

params, buffers = ft.stack_module_state(models)
print({k: tuple(v.shape) for k, v in params.items()})
base = copy.deepcopy(models[0]).to("meta")


def fmodel(params, buffers, x):
    return ft.functional_call(base, (params, buffers), (x,))


# %%
# Every model on the same minibatch
# ---------------------------------
# ``in_dims=(0, 0, None)``: map over the models' weights, share the data.

minibatch = torch.randn(batch, 32)
ensemble = ft.vmap(fmodel, in_dims=(0, 0, None))


def loop(x):
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


def timed(fn, *args):
    """(result, milliseconds) of the second call: the first one warms up."""
    fn(*args)
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)


predictions, t_vmap = timed(ensemble, params, buffers, minibatch)
expected, t_loop = timed(loop, minibatch)
torch.testing.assert_close(predictions, expected, atol=1e-5, rtol=1e-4)
print(f"predictions {tuple(predictions.shape)}: vmap {t_vmap:.2f} ms, loop {t_loop:.2f} ms")
print("ensemble prediction:", predictions.mean(0).argmax(-1)[:10].tolist())

# %%
# Each model on its own minibatch
# -------------------------------
# ``in_dims=(0, 0, 0)``: the data has a model dimension too (e.g. bootstrapped samples).

minibatches = torch.randn(num_models, batch, 32)
predictions2 = ft.vmap(fmodel)(params, buffers, minibatches)
with torch.no_grad():
    expected2 = torch.stack([m(x) for m, x in zip(models, minibatches)])
torch.testing.assert_close(predictions2, expected2, atol=1e-5, rtol=1e-4)
print("different minibatches:", tuple(predictions2.shape))

# %%
# Training the ensemble
# ---------------------
# The stacked parameters are ordinary leaf tensors: one optimizer trains all the models at
# once, each on its own loss (the losses are summed, their gradients do not mix).

opt = torch.optim.SGD(params.values(), lr=0.1)
targets = torch.randint(10, (num_models, batch))
for step in range(3):
    logits = ft.vmap(fmodel)(params, buffers, minibatches)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / batch
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: mean loss per model {loss.item() / num_models:.4f}")
