"""
MAML: batching the inner loop over tasks
========================================

Model-agnostic meta-learning learns an initialization of a model that adapts to a new task in a
few gradient steps. Each task here is a sine wave ``y = A sin(x + phase)``: the *inner loop*
adapts the parameters to the task's support set with a couple of SGD steps, and the *outer loop*
updates the shared initialization so that the adapted parameters do well on the task's query
set, which means differentiating *through* the inner steps.

With functorch_lite the inner loop is written for one task (``grad`` inside), ``vmap`` runs it
for all the tasks of a meta-batch at once, and ``grad`` of the mean query loss differentiates
through it all: ``grad(vmap(grad))``.
"""

import math

import matplotlib.pyplot as plt
import torch
import torch.nn as nn

import functorch_lite as ft

torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
INNER_LR, INNER_STEPS, SHOTS, TASKS = 0.05, 2, 10, 8


def sample_tasks(n_tasks, generator):
    """Support and query sets, each (n_tasks, SHOTS, 1), of random sine waves."""
    amp = torch.rand(n_tasks, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=generator) * math.pi
    xs = torch.rand(n_tasks, 2 * SHOTS, 1, generator=generator) * 10 - 5
    ys = amp * torch.sin(xs + phase)
    return xs[:, :SHOTS], ys[:, :SHOTS], xs[:, SHOTS:], ys[:, SHOTS:]


model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
params = {k: v.detach().clone() for k, v in model.named_parameters()}

# %%
# One task: adapt, then evaluate
# ------------------------------


def loss(params, x, y):
    return (ft.functional_call(model, params, (x,)) - y).pow(2).mean()


def adapt(params, x, y):
    """The inner loop for ONE task: a few SGD steps on its support set."""
    for _ in range(INNER_STEPS):
        grads = ft.grad(loss)(params, x, y)
        params = {k: p - INNER_LR * grads[k] for k, p in params.items()}
    return params


def query_loss(params, x_support, y_support, x_query, y_query):
    return loss(adapt(params, x_support, y_support), x_query, y_query)


# %%
# All tasks at once, and the meta-gradient
# ----------------------------------------
# ``vmap`` maps over the task dimension of the data (the initialization is shared:
# ``in_dims=None``); ``grad_and_value`` of the mean gives the meta-gradient and the loss.


def meta_loss(params, *tasks):
    return ft.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, *tasks).mean()


meta_grad = ft.grad_and_value(meta_loss)

# %%
# The meta-gradient is checked against a Python loop over the tasks with plain
# ``torch.autograd`` (``create_graph=True`` to differentiate through the inner steps).

tasks = sample_tasks(TASKS, gen)
g, value = meta_grad(params, *tasks)

leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
total = 0.0
for xs, ys, xq, yq in zip(*tasks):
    adapted = leaves
    for _ in range(INNER_STEPS):
        inner = (torch.func.functional_call(model, adapted, (xs,)) - ys).pow(2).mean()
        grads = torch.autograd.grad(inner, list(adapted.values()), create_graph=True)
        adapted = {k: p - INNER_LR * gk for (k, p), gk in zip(adapted.items(), grads)}
    total = total + (torch.func.functional_call(model, adapted, (xq,)) - yq).pow(2).mean()
reference = dict(zip(leaves, torch.autograd.grad(total / TASKS, list(leaves.values()))))
for k in params:
    torch.testing.assert_close(g[k], reference[k], atol=1e-5, rtol=1e-4)
print(f"meta-loss {value.item():.3f}; meta-gradient equal to the for-loop over tasks")

# %%
# Meta-training
# -------------
# A few Adam steps on the initialization; the query loss after adaptation on held-out tasks
# goes down.

init = {k: v.clone().requires_grad_() for k, v in params.items()}
opt = torch.optim.Adam(init.values(), lr=3e-3)
held_out = sample_tasks(32, torch.Generator().manual_seed(123))
history = [meta_loss(init, *held_out).item()]
for step in range(60):
    g, _ = meta_grad({k: v.detach() for k, v in init.items()}, *sample_tasks(TASKS, gen))
    for k, v in init.items():
        v.grad = g[k]
    opt.step()
    if step % 10 == 9:
        history.append(meta_loss(init, *held_out).item())
print("held-out query loss every 10 meta-steps:", [round(h, 3) for h in history])
assert history[-1] < history[0]

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(0, 61, 10), history, marker="o")
ax.set_xlabel("meta-step")
ax.set_ylabel("query loss after adaptation")
fig.tight_layout()
