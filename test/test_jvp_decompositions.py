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


# ------------------------------------------------------------------------------------------------
# second-order fixes (issue 22, item 7): torch's forward formulas of _linalg_solve_ex,
# _linalg_det, _linalg_slogdet and cholesky_inverse are right at first order but read their LU
# (or Cholesky) factors as constants, so differentiating them again (forward-over-forward,
# reverse-over-forward) was off by O(1), in torch.func too. Under two differentiating levels they
# run as lu_factor/lu_solve and triangular solves, whose formulas are right at every order.

_RHS = torch.randn(3, 2, dtype=DT, generator=torch.Generator().manual_seed(1))


def _spd(h):
    return h @ h.mT + 3 * torch.eye(h.shape[-1], dtype=DT)


LINALG = {
    "solve": lambda h: torch.linalg.solve(_spd(h), _RHS),
    "solve_vector_rhs": lambda h: torch.linalg.solve(_spd(h), _RHS[:, 0]),
    "solve_left_false": lambda h: torch.linalg.solve(_spd(h), _RHS.mT, left=False),
    "solve_ex": lambda h: torch.linalg.solve_ex(_spd(h), _RHS)[0],
    "tensorsolve": lambda h: torch.linalg.tensorsolve(_spd(h), _RHS[:, 0]),
    "det": lambda h: torch.linalg.det(_spd(h) - 2 * torch.eye(3, dtype=DT)),
    "slogdet": lambda h: torch.linalg.slogdet(_spd(h))[1],
    "logdet": lambda h: torch.logdet(_spd(h)),
    "cholesky_inverse": lambda h: torch.cholesky_inverse(torch.linalg.cholesky(_spd(h))),
    "cholesky_inverse_upper": lambda h: torch.cholesky_inverse(torch.linalg.cholesky(_spd(h)).mT, upper=True),
}


def _h_t():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, dtype=DT, generator=g), torch.randn(3, 3, dtype=DT, generator=g)


def _fd_of_jacobian(f, h, t, eps=1e-6):
    """Central differences of the exact Jacobian (reverse mode, right at first order)."""
    jac = torch.func.jacrev(f)
    return (jac(h + eps * t) - jac(h - eps * t)) / (2 * eps)


@pytest.mark.parametrize("name", sorted(LINALG))
def test_forward_over_forward_of_linalg_equals_differences(name):
    f = LINALG[name]
    h, t = _h_t()
    ref = _fd_of_jacobian(f, h, t)
    tol = 1e-7 * max(1.0, float(ref.abs().max()))
    got = ft.jvp(ft.jacfwd(f), (h,), (t,))[1]
    assert (got - ref).abs().max() <= tol
    # under an outer vmap (torch.func raises or is wrong there)
    hs, ts = torch.stack([h, h + 0.1]), torch.stack([t, -t])
    got = ft.vmap(lambda a, b: ft.jvp(ft.jacfwd(f), (a,), (b,))[1])(hs, ts)
    for i in range(2):
        ref_i = _fd_of_jacobian(f, hs[i], ts[i])
        assert (got[i] - ref_i).abs().max() <= 1e-7 * max(1.0, float(ref_i.abs().max()))


@pytest.mark.parametrize(
    "composition", ["jacfwd(jacfwd)", "jacrev(jacfwd)", "jacfwd(jacrev)", "jacrev(jacrev)"]
)
@pytest.mark.parametrize("name", sorted(LINALG))
def test_second_derivatives_of_linalg_in_every_composition(name, composition):
    f = LINALG[name]
    h, _ = _h_t()
    scalar = lambda a: (f(a) * torch.linspace(0.5, 1.5, f(a).numel(), dtype=DT).view(f(a).shape)).sum()  # noqa: E731
    ref = torch.autograd.functional.hessian(scalar, h)
    outer, inner = composition[:-1].split("(")
    got = getattr(ft, outer)(getattr(ft, inner)(scalar))(h)
    assert (got - ref).abs().max() <= 1e-8 * max(1.0, float(ref.abs().max()))


def test_first_order_keeps_torchs_formula():
    """One differentiating level: torch's own formula (the decomposition is for nesting only),
    equal to torch.func and to reverse mode; except cholesky_inverse, whose forward formula is
    wrong already at first order in torch (torch.func's jvp disagrees with differences there)."""
    h, t = _h_t()
    for name, f in LINALG.items():
        got = ft.jvp(f, (h,), (t,))[1]
        eps = 1e-6
        diff = (f(h + eps * t) - f(h - eps * t)) / (2 * eps)
        torch.testing.assert_close(got, diff, rtol=1e-7, atol=1e-8, msg=name)
        torch.testing.assert_close(ft.jacfwd(f)(h), torch.func.jacrev(f)(h), rtol=1e-9, atol=1e-11, msg=name)
        theirs = torch.func.jvp(f, (h,), (t,))[1]
        if name.startswith("cholesky_inverse"):
            assert (theirs - diff).abs().max() > 1e-4  # torch's formula; ours is the decomposition
        else:
            torch.testing.assert_close(got, theirs, rtol=1e-10, atol=1e-12, msg=name)


def test_issue_example_linalg_solve():
    """The issue's case: h (3, 1, 3), rhs (1, 2); torch.func's forward-over-forward is off by 0.04."""
    g = torch.Generator().manual_seed(0)
    rhs = torch.randn(1, 2, dtype=DT, generator=g)
    f = lambda h: torch.linalg.solve(h @ h.mT + 3 * torch.eye(1, dtype=DT), rhs)  # noqa: E731
    h, t = torch.randn(3, 1, 3, dtype=DT, generator=g), torch.randn(3, 1, 3, dtype=DT, generator=g)
    ref = _fd_of_jacobian(f, h, t)
    got = ft.jvp(ft.jacfwd(f), (h,), (t,))[1]
    assert (got - ref).abs().max() <= 1e-8
    rr = torch.func.jvp(torch.func.jacrev(f), (h,), (t,))[1]  # forward-over-reverse: right in both
    assert (rr - ref).abs().max() <= 1e-8
