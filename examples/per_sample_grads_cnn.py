"""Per-sample gradients of a small CNN with functorch_lite.

One gradient per example in one batched call: ft.vmap(ft.grad(loss)) over ft.functional_call,
where `loss` is written for a single example. Checked against a Python for-loop of
torch.autograd.grad, one example at a time.

    python examples/per_sample_grads_cnn.py [--size small|default]
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import functorch_lite as ft

SIZES = {"small": dict(batch=8, image=12), "default": dict(batch=64, image=28)}


class SmallCNN(nn.Module):
    def __init__(self, image):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * ((image + 1) // 2) ** 2, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def main(size="default"):
    cfg = SIZES[size]
    torch.manual_seed(0)
    model = SmallCNN(cfg["image"])
    x = torch.randn(cfg["batch"], 1, cfg["image"], cfg["image"])
    y = torch.randint(0, 10, (cfg["batch"],))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params, xi, yi):
        # one example: add a batch dim of 1 for the module, as a training loop would have
        logits = ft.functional_call(model, params, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")  # ops without a batching rule run as a for-loop; list them below
    ft._C._reset_fallback_ops_seen()
    try:
        t0 = time.perf_counter()
        per_sample = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0))(params, x, y)
        t1 = time.perf_counter()
    finally:
        ft.set_vmap_fallback(old_mode)
    fallback_ops = ft._C._fallback_ops_seen()

    # reference: a for-loop of torch.autograd.grad, one example at a time
    t2 = time.perf_counter()
    ref = []
    for i in range(len(x)):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
        )
        ref.append(dict(zip(params, grads)))
    t3 = time.perf_counter()
    for k in params:
        expected = torch.stack([r[k] for r in ref])
        assert per_sample[k].shape == (len(x), *params[k].shape)
        torch.testing.assert_close(per_sample[k], expected, atol=1e-5, rtol=1e-4)

    print(f"per-sample gradients of a CNN for {len(x)} examples:")
    for k, v in per_sample.items():
        print(f"  {k:12s} {tuple(v.shape)}")
    print(
        f"vmap(grad): {1e3 * (t1 - t0):.1f} ms, for-loop of autograd.grad: "
        f"{1e3 * (t3 - t2):.1f} ms; equal to the for-loop (atol 1e-5)"
    )
    print(f"ops run by vmap's for-loop fallback: {', '.join(fallback_ops) or 'none'}")
    return per_sample


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    main(parser.parse_args().size)
