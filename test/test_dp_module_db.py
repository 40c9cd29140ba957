"""Every layer family of torch's module_db that has parameters, through every DP method
(issue 20): the per-example gradient norms and clipped sums of clipped_grad_module ("vmap",
"ghost", "auto") equal a per-example loop of torch.autograd.grad, in float64.

The samples are module_db's own (constructor and forward arguments), eval mode (no dropout
draws), those whose positional tensor inputs share a batch dim of at least 2; the loss of one
example is the sum of squares of every floating-point output. A sample whose forward fails on one
example on its own (an input the module reads as unbatched) has no per-example meaning and is
skipped with that reason."""

import warnings

import pytest
import torch
from torch.testing._internal.common_modules import module_db
from torch.utils._pytree import tree_flatten

import functorch_lite as ft


def _loss(out, y):
    """One example's loss (the methods call it on a batch of one): sum of squares of the outputs."""
    leaves = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return sum((o**2).sum() for o in leaves).reshape(1)


def _cases():
    out = []
    for info in module_db:
        try:
            samples = info.module_inputs_func(
                info, device="cpu", dtype=torch.float64, requires_grad=False, training=False
            )
        except Exception:  # a sample generator that needs something this machine lacks
            continue
        for k, sample in enumerate(samples[:3]):
            out.append(pytest.param(info, sample, id=f"{info.name}-{k}"))
    return out


def _build(info, sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
    return model.double().eval()


@pytest.mark.parametrize("info, sample", _cases())
def test_every_method_equals_a_per_example_loop(info, sample):
    try:
        model = _build(info, sample)
    except Exception as e:
        pytest.skip(f"constructor fails on this machine: {type(e).__name__}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    if not params:
        pytest.skip("no trainable parameters")
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        pytest.skip("forward takes keyword or non-tensor arguments")
    n = args[0].shape[0] if args[0].dim() else 0
    if n < 2 or any(a.dim() == 0 or a.shape[0] != n for a in args):
        pytest.skip("no batch dim of at least 2 shared by the inputs")
    per = []
    for i in range(n):
        try:
            out = model(*[a[i : i + 1] for a in args])
        except RuntimeError as e:
            pytest.skip(f"one example alone is not a valid input: {str(e)[:60]}")
        gs = torch.autograd.grad(_loss(out, None).sum(), list(params.values()), allow_unused=True)
        per.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params.values())])
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in row)) for row in per])
    max_norm = float(norms.median()) or 1.0  # clips some examples and not others
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    ref = {name: sum(f * row[j] for f, row in zip(factors, per)) for j, name in enumerate(params)}
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        for method in ("vmap", "ghost", "auto"):
            got, got_norms = ft.dp.clipped_grad_module(
                model, _loss, args, torch.zeros(n), max_norm=max_norm, method=method, return_norms=True
            )
            scale = max(1.0, float(norms.max()))
            assert (got_norms - norms).abs().max() <= 1e-8 * scale, method
            for name, r in ref.items():
                assert (got[name] - r).abs().max() <= 1e-8 * max(1.0, float(r.abs().max())), (method, name)
    finally:
        ft.set_vmap_fallback(old)
