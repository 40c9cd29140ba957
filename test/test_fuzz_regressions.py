"""Shrunk reproducers of the failures the differential fuzzer (test/_fuzz.py) found.

Each test compares functorch_lite with torch.func and, where it helps, with a for-loop or plain
torch.autograd. The strict xfails are failures not fixed yet (see docs/reliability.md); the
fuzzer counts programs that hit them as "known" instead of failing (_fuzz.KNOWN).
"""
import pytest
import torch
import torch.nn.functional as F

import functorch_lite as ft

D = dict(dtype=torch.float64)


# ---- fixed: per-channel arguments of batch/group norm with a single channel (rules_norm.cpp)
# An unbatched [C] weight or saved statistic expanded to [B, C] and flattened to [B*C] is a
# stride-0 view when C == 1; the CPU kernels read it as a dense buffer (uninitialized values).

def test_jacrev_batch_norm_training_one_channel():
    x = torch.randn(3, 1, **D)

    def f(x):
        return F.batch_norm(x, None, None, training=True)

    expected = torch.func.jacrev(f)(x)
    torch.testing.assert_close(ft.jacrev(f)(x), expected)
    # The referee: one reverse pass per output element.
    rows = []
    for k in range(3):
        xr = x.detach().requires_grad_()
        rows.append(torch.autograd.grad(f(xr).reshape(-1)[k], xr)[0])
    torch.testing.assert_close(expected, torch.stack(rows).reshape(3, 1, 3, 1))


def test_vmap_vjp_batch_norm_one_channel_batched_cotangent():
    x = torch.randn(4, 1, **D)
    cts = torch.randn(5, 4, 1, **D)

    def f(x):
        return F.batch_norm(x, None, None, training=True)

    ours = ft.vmap(ft.vjp(f, x)[1])(cts)[0]
    theirs = torch.func.vmap(torch.func.vjp(f, x)[1])(cts)[0]
    torch.testing.assert_close(ours, theirs)


def test_vmap_group_norm_one_channel_unbatched_weight():
    # fuzzer: Program(x_shape=(2,), y_shape=(1,), ops=(('group_norm', 0),),
    #                 layers=(('vmap', 0, None, 0, None, 2),))
    x = torch.randn(2, 1, 1, 2, **D)
    w = torch.randn(1, **D)

    def f(x):
        return F.group_norm(x, 1, weight=w)

    ours = ft.vmap(f)(x)
    torch.testing.assert_close(ours, torch.func.vmap(f)(x))
    torch.testing.assert_close(ours, torch.stack([f(xi) for xi in x]))


def test_vmap_batch_norm_one_channel_unbatched_weight_and_bias():
    x = torch.randn(3, 4, 1, **D)
    w, b = torch.randn(1, **D), torch.randn(1, **D)

    def f(x):
        return F.batch_norm(x, None, None, weight=w, bias=b, training=True)

    ours = ft.vmap(f)(x)
    torch.testing.assert_close(ours, torch.func.vmap(f)(x))
    torch.testing.assert_close(ours, torch.stack([f(xi) for xi in x]))
