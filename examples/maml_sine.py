"""MAML on sine-wave regression with functorch_lite, batched over tasks.

Each task is a sine wave y = A sin(x + phase). MAML's inner loop adapts the parameters to a task
with a few gradient steps on its support set; the outer loop updates the shared initialization
so that the adapted parameters do well on the task's query set. With functorch_lite the inner
loop is written for one task (ft.grad inside), ft.vmap runs it for all tasks at once, and ft.grad
of the mean query loss differentiates through the inner steps: grad(vmap(grad)).

The meta-gradient is checked against a Python for-loop over tasks with torch.autograd.grad
(create_graph=True); then a few meta-training steps run and the query loss goes down.

    python examples/maml_sine.py [--size small|default]
"""

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import functorch_lite as ft

SIZES = {
    "small": dict(tasks=4, shots=10, inner_steps=2, meta_steps=30, hidden=32),
    "default": dict(tasks=8, shots=10, inner_steps=2, meta_steps=50, hidden=40),
}
INNER_LR = 0.05


def make_model(hidden):
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def reference_forward(p, x):
    """The model's forward written out with torch.nn.functional (for the for-loop reference)."""
    h = F.relu(F.linear(x, p["0.weight"], p["0.bias"]))
    h = F.relu(F.linear(h, p["2.weight"], p["2.bias"]))
    return F.linear(h, p["4.weight"], p["4.bias"])


def sample_tasks(n_tasks, shots, generator):
    """Support and query sets (n_tasks, shots, 1) of random sine waves."""
    amp = torch.rand(n_tasks, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=generator) * math.pi
    xs = torch.rand(n_tasks, 2 * shots, 1, generator=generator) * 10 - 5
    ys = amp * torch.sin(xs + phase)
    return xs[:, :shots], ys[:, :shots], xs[:, shots:], ys[:, shots:]


def main(size="default"):
    cfg = SIZES[size]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = make_model(cfg["hidden"])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(params, x, y):
        return (ft.functional_call(model, params, (x,)) - y).pow(2).mean()

    def adapt(params, x, y):
        """The inner loop, for one task: a few SGD steps on the support set."""
        for _ in range(cfg["inner_steps"]):
            grads = ft.grad(loss)(params, x, y)
            params = {k: p - INNER_LR * grads[k] for k, p in params.items()}
        return params

    def query_loss(params, xs, ys, xq, yq):
        return loss(adapt(params, xs, ys), xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        # all tasks at once: vmap over the task dim of the data, the initialization is shared
        return ft.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    meta_grad = ft.grad_and_value(meta_loss)

    # --- check: the meta-gradient equals a for-loop over tasks with plain autograd
    tasks = sample_tasks(cfg["tasks"], cfg["shots"], gen)
    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")  # ops without a batching rule run as a for-loop; list them below
    ft._C._reset_fallback_ops_seen()
    try:
        t0 = time.perf_counter()
        g, value = meta_grad(params, *tasks)
        t1 = time.perf_counter()
    finally:
        ft.set_vmap_fallback(old_mode)
    fallback_ops = ft._C._fallback_ops_seen()

    t2 = time.perf_counter()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = 0.0
    for xs, ys, xq, yq in zip(*tasks):
        adapted = leaves
        for _ in range(cfg["inner_steps"]):
            inner = (reference_forward(adapted, xs) - ys).pow(2).mean()
            grads = torch.autograd.grad(inner, list(adapted.values()), create_graph=True)
            adapted = {k: p - INNER_LR * gk for (k, p), gk in zip(adapted.items(), grads)}
        total = total + (reference_forward(adapted, xq) - yq).pow(2).mean()
    ref_value = total / cfg["tasks"]
    ref = dict(zip(leaves, torch.autograd.grad(ref_value, list(leaves.values()))))
    t3 = time.perf_counter()
    torch.testing.assert_close(value, ref_value.detach(), atol=1e-5, rtol=1e-4)
    for k in params:
        torch.testing.assert_close(g[k], ref[k], atol=1e-5, rtol=1e-4)
    print(
        f"MAML meta-gradient over {cfg['tasks']} tasks, {cfg['inner_steps']} inner steps: "
        f"grad(vmap(grad)) {1e3 * (t1 - t0):.1f} ms, for-loop over tasks {1e3 * (t3 - t2):.1f} "
        f"ms; equal (atol 1e-5)"
    )
    print(f"ops run by vmap's for-loop fallback: {', '.join(fallback_ops) or 'none'}")

    # --- a few meta-training steps (Adam on the shared initialization)
    init = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(init.values(), lr=3e-3)
    eval_tasks = sample_tasks(32, cfg["shots"], torch.Generator().manual_seed(123))
    ft.set_vmap_fallback("quiet")
    try:
        before = meta_loss(init, *eval_tasks).item()
        for _ in range(cfg["meta_steps"]):
            g, _ = meta_grad(
                {k: v.detach() for k, v in init.items()}, *sample_tasks(cfg["tasks"], cfg["shots"], gen)
            )
            for k, v in init.items():
                v.grad = g[k]
            opt.step()
        after = meta_loss(init, *eval_tasks).item()
    finally:
        ft.set_vmap_fallback(old_mode)
    print(
        f"query loss after adaptation on 32 held-out tasks: {before:.3f} before, {after:.3f} "
        f"after {cfg['meta_steps']} meta-steps"
    )
    assert after < before
    return before, after


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    main(parser.parse_args().size)
