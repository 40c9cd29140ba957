"""Forward AD over backward ops that torch has no forward-AD formula for (issue 12, item 17).

ft.hessian / ft.jacfwd(ft.jacrev(f)) of huber_loss raised torch's "Trying to use forward AD with
huber_loss_backward that does not support it": our vmap runs huber_loss_backward with a rule, so
the jvp level below meets it (torch.func's vmap decomposes it first). A jvp level now runs such
ops as their decomposition (NOTE [Decompositions for forward AD] in csrc/core/jvp_decomps.h).
Each op is checked against torch.func (hessian, jacfwd(jacrev)) in both argument positions, and
ft.jvp(ft.grad(f)) (no vmap in between, which torch.func cannot run) against
torch.autograd.functional.hessian.
"""

import pytest
import torch
import torch.nn.functional as F

import functorch_lite as ft

DT = torch.float64


def _huber(reduction, delta):
    return lambda x, t: F.huber_loss(x, t, reduction=reduction, delta=delta)


# name -> (loss(input, target), input, target). Inputs straddle delta (both branches).
def _cases():
    x = torch.tensor([[-3.0, -0.8, -0.2], [0.1, 0.6, 2.5]], dtype=DT)
    t = torch.tensor([[0.5, 0.1, -0.4], [0.3, -1.2, 0.2]], dtype=DT)
    cases = {}
    for reduction in ("mean", "sum", "none"):
        for delta in (0.5, 1.0, 2.0):
            cases[f"huber_{reduction}_{delta}"] = (_huber(reduction, delta), x, t)
    cases["huber_broadcast_target"] = (_huber("mean", 1.0), x, t[0])
    return cases


CASES = _cases()


def _scalar(loss):
    # a scalar of the loss that weighs every element differently (reduction='none' too)
    return lambda x, t: (
        loss(x, t) * torch.linspace(0.5, 1.5, loss(x, t).numel(), dtype=DT).reshape(loss(x, t).shape)
    ).sum()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("argnums", [0, 1, (0, 1)], ids=["input", "target", "both"])
def test_hessian_and_jacfwd_jacrev_match_torch_func(name, argnums):
    loss, x, t = CASES[name]
    s = _scalar(loss)
    torch.testing.assert_close(
        ft.hessian(s, argnums=argnums)(x, t), torch.func.hessian(s, argnums=argnums)(x, t)
    )
    torch.testing.assert_close(
        ft.jacfwd(ft.jacrev(loss, argnums=argnums), argnums=argnums)(x, t),
        torch.func.jacfwd(torch.func.jacrev(loss, argnums=argnums), argnums=argnums)(x, t),
    )


@pytest.mark.parametrize("name", list(CASES))
def test_jvp_of_grad_without_vmap(name):
    loss, x, t = CASES[name]
    s = _scalar(loss)
    v = torch.randn_like(x)
    _, hvp = ft.jvp(lambda x: ft.grad(s)(x, t), (x,), (v,))
    ref = torch.autograd.functional.hessian(lambda x: s(x, t), x)
    torch.testing.assert_close(hvp, (ref.reshape(x.numel(), x.numel()) @ v.reshape(-1)).reshape(x.shape))


def test_issue_example():
    x, t = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    f = lambda x: F.huber_loss(x, t)  # noqa: E731
    torch.testing.assert_close(ft.hessian(f)(x), torch.func.hessian(f)(x))
