"""vmap over nested tensors (issue 22 item 5, NOTE [vmap over nested tensors] in
functorch_lite/_vmap.py): mapped over the components as torch.func does, for the jagged and the
strided layout, alone and with dense inputs, against torch.func and a for-loop over the
components."""

import warnings

import pytest
import torch
import torch.func as tf

import functorch_lite as ft

_LAYOUTS = [torch.jagged, torch.strided]


def _nt(layout, requires_grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    comps = [torch.randn(n, 4, generator=g, dtype=dtype) for n in (3, 5, 2)]
    nt = torch.nested.nested_tensor(comps, layout=layout)
    return nt.requires_grad_(requires_grad) if requires_grad else nt


def _same(a, b):
    assert a.is_nested and b.is_nested and a.layout == b.layout == torch.strided
    for x, y in zip(a.unbind(), b.unbind(), strict=True):
        torch.testing.assert_close(x, y)


def _tf(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func's fallback warns about performance
        return tf.vmap(fn, **kw)(*args)


FUNCS = {
    "sin": torch.sin,
    "sum0": lambda x: x.sum(0),
    "matmul_dense": lambda x: x @ torch.ones(4, 2, dtype=x.dtype),
    "softmax": lambda x: x.softmax(-1),
    "grad_inside": lambda x: ft.grad(lambda y: (y.sin() ** 2).sum())(x),
}


@pytest.mark.parametrize("layout", _LAYOUTS)
@pytest.mark.parametrize("name", sorted(FUNCS))
def test_maps_over_the_components(layout, name):
    nt = _nt(layout)
    got = ft.vmap(FUNCS[name])(nt)
    loop = torch.nested.as_nested_tensor([FUNCS[name](c) for c in nt.unbind()])
    _same(got, loop)
    if name != "grad_inside":  # torch.func's own grad is the oracle's business, not ours
        _same(got, _tf(FUNCS[name], nt))


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_nested_with_dense_and_unmapped_inputs(layout):
    nt = _nt(layout)
    dense = torch.randn(3, 4, dtype=torch.float64)  # one row per component
    scale = torch.tensor(2.0, dtype=torch.float64)

    def f(x, row, s):
        return (x * row + s).sum(-1), row.sum()

    got = ft.vmap(f, in_dims=(0, 0, None))(nt, dense, scale)
    ref = _tf(f, nt, dense, scale, in_dims=(0, 0, None))
    _same(got[0], ref[0])
    # an output that does not depend on the nested input is batched like any vmap output
    assert not got[1].is_nested and not ref[1].is_nested
    torch.testing.assert_close(got[1], ref[1])


def test_autograd_flows_through_the_components():
    nt = _nt(torch.strided, requires_grad=True)
    out = ft.vmap(lambda x: (x.sin() * 3).sum())(nt)
    total = sum(c for c in out.unbind())
    (g,) = torch.autograd.grad(total, nt)
    for gc, c in zip(g.unbind(), nt.unbind()):
        torch.testing.assert_close(gc, 3 * c.detach().cos())


def test_randomness():
    nt = _nt(torch.jagged)
    with pytest.raises(RuntimeError, match="randomness"):
        ft.vmap(lambda x: x + torch.rand(()))(nt)
    torch.manual_seed(0)
    same = ft.vmap(lambda x: torch.rand(()) + 0 * x.sum(), randomness="same")(nt)
    assert len({float(v) for v in same.unbind()}) == 1
    different = ft.vmap(lambda x: torch.rand(()) + 0 * x.sum(), randomness="different")(nt)
    assert len({float(v) for v in different.unbind()}) == 3


def test_refusals_name_the_argument():
    nt = _nt(torch.strided)
    with pytest.raises(RuntimeError, match="in_dim 0 only"):
        ft.vmap(torch.sin, in_dims=1)(nt)
    with pytest.raises(ValueError, match="out_dim 0"):
        ft.vmap(torch.sin, out_dims=1)(nt)
    with pytest.raises(ValueError, match="same size in the mapped dim"):
        ft.vmap(torch.mul)(nt, torch.randn(5, 4, dtype=torch.float64))
