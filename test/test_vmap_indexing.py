"""vmap batching rules for indexing: advanced indexing (index, index_put and __setitem__),
index_select/index_add/index_copy/index_fill, gather and the scatter family.

Every case runs under ft.set_vmap_fallback('error') (so a real rule must have run) and is compared
with a Python for-loop and with torch.func.vmap, for each placement of the batch dim over the
arguments (0, -1, a middle dim, and None for each argument in turn)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from _placements import F_, I_, case_params, run, torch_func_agrees
from test_vmap import B, assert_same

import functorch_lite as ft

# ------------------------------------------------------------------------------------------------
# Argument specs (see _placements): F_(*shape) a float tensor, I_(high, *shape) integer indices in
# [0, high), ("mask", shape) a boolean mask (never batched).


def _setitem(idx, value_from_arg=True):
    def f(a, *rest):
        a = a.clone()
        key = idx(*rest[:-1]) if value_from_arg else idx(*rest)
        a[key] = rest[-1] if value_from_arg else 0.5
        return a

    return f


CASES = {
    # advanced indexing: reads
    "index_1d": (lambda a, i: a[i], [F_(5, 4), I_(5, 3)]),
    "index_2d_idx": (lambda a, i: a[i], [F_(5, 4), I_(5, 2, 3)]),
    # (a[i] with a 0-d tensor i is a[int(i)] in Python: data-dependent, like under torch.func)
    "index_0d_idx": (lambda a, i: torch.ops.aten.index(a, [i]), [F_(5, 4), I_(5)]),
    "index_dim1": (lambda a, i: a[:, i], [F_(3, 5, 4), I_(5, 2)]),
    "index_last": (lambda a, i: a[..., i], [F_(3, 4, 5), I_(5, 2, 2)]),
    "index_two_broadcast": (lambda a, i, j: a[i, j], [F_(5, 4), I_(5, 3, 1), I_(4, 2)]),
    "index_adjacent_at_1": (lambda a, i, j: a[:, i, j], [F_(2, 5, 4, 3), I_(5, 3), I_(4, 3)]),
    "index_non_adjacent": (lambda a, i, j: a[i, :, j], [F_(5, 2, 4), I_(5, 3), I_(4, 3)]),
    "index_none_then_idx": (lambda a, i: a[None, :, i], [F_(3, 5), I_(5, 2)]),
    "index_slice_and_idx": (lambda a, i: a[1:, i], [F_(4, 5), I_(5, 3)]),
    "index_unbatched_mask": (lambda a, m: a[m], [F_(4, 5), ("mask", (4, 5))]),
    "index_mask_rows": (lambda a, m: a[m], [F_(4, 5), ("mask", (4,))]),
    "index_mask_then_idx": (lambda a, m, i: a[m, i], [F_(4, 5), ("mask", (4,)), I_(5, 1)]),
    "masked_select": (lambda a, m: torch.masked_select(a, m), [F_(4, 5), ("mask", (4, 5))]),
    "masked_select_broadcast": (lambda a, m: a.masked_select(m), [F_(4, 5), ("mask", (5,))]),
    "masked_select_mask_of_higher_rank": (lambda a, m: a.masked_select(m), [F_(5), ("mask", (4, 5))]),
    # writes
    "setitem_1d": (_setitem(lambda i: i), [F_(5, 4), I_(5, 3), F_(4)]),
    "setitem_dim1": (_setitem(lambda i: (slice(None), i)), [F_(3, 5), I_(5, 2), F_(3, 2)]),
    "setitem_adjacent_at_1": (
        _setitem(lambda i, j: (slice(None), i, j)),
        [F_(2, 5, 4, 3), I_(5, 2), I_(4, 2), F_(2, 2, 3)],
    ),
    "setitem_non_adjacent": (
        _setitem(lambda i, j: (i, slice(None), j)),
        [F_(5, 2, 4), I_(5, 3), I_(4, 3), F_(3, 2)],
    ),
    "setitem_scalar_value": (_setitem(lambda i: i, value_from_arg=False), [F_(5, 4), I_(5, 3)]),
    "index_put_accumulate": (
        lambda a, i, v: a.clone().index_put_((i,), v, accumulate=True),
        [F_(5, 4), I_(2, 6), F_(6, 4)],
    ),
    "index_put_out_of_place": (lambda a, i, v: torch.index_put(a, (i,), v), [F_(5, 4), I_(5, 3), F_(3, 4)]),
    "index_put_out_of_place_acc_dim1": (
        lambda a, i, v: torch.ops.aten.index_put(a, [None, i], v, True),
        [F_(3, 5), I_(5, 4), F_(3, 4)],
    ),
    # along one dim
    "index_select_0": (lambda a, i: a.index_select(0, i), [F_(5, 4), I_(5, 3)]),
    "index_select_1": (lambda a, i: a.index_select(1, i), [F_(3, 5), I_(5, 4)]),
    "index_select_neg": (lambda a, i: a.index_select(-1, i), [F_(2, 3, 5), I_(5, 2)]),
    "index_select_0d_idx": (lambda a, i: a.index_select(1, i), [F_(3, 5), I_(5)]),
    "index_add": (lambda a, i, s: a.index_add(1, i, s), [F_(3, 5), I_(5, 4), F_(3, 4)]),
    "index_add_alpha": (
        lambda a, i, s: torch.index_add(a, 0, i, s, alpha=-2.0),
        [F_(5, 3), I_(2, 4), F_(4, 3)],
    ),
    "index_add_inplace": (lambda a, i, s: a.clone().index_add_(0, i, s), [F_(5, 3), I_(5, 4), F_(4, 3)]),
    "index_copy": (lambda a, s: a.index_copy(1, torch.tensor([4, 0, 2]), s), [F_(3, 5), F_(3, 3)]),
    "index_copy_inplace": (
        lambda a, s: a.clone().index_copy_(0, torch.tensor([1, 3]), s),
        [F_(5, 3), F_(2, 3)],
    ),
    "index_fill_scalar": (lambda a, i: a.index_fill(1, i, -1.0), [F_(3, 5), I_(5, 2)]),
    "index_fill_tensor": (lambda a, i, v: a.index_fill(1, i, v), [F_(3, 5), I_(5, 2), F_()]),
    # gather / scatter
    "gather_1": (lambda a, i: a.gather(1, i), [F_(4, 5), I_(5, 4, 3)]),
    "gather_0": (lambda a, i: torch.gather(a, 0, i), [F_(4, 5), I_(4, 2, 5)]),
    "gather_neg": (lambda a, i: a.gather(-1, i), [F_(2, 4, 5), I_(5, 2, 4, 2)]),
    "gather_0d": (lambda a, i: a.gather(0, i), [F_(), I_(1)]),
    "take_along_dim": (lambda a, i: torch.take_along_dim(a, i, 1), [F_(4, 5), I_(5, 4, 2)]),
    "scatter_src": (lambda a, i, s: a.scatter(1, i, s), [F_(4, 5), I_(5, 4, 2), F_(4, 3)]),
    "scatter_value": (lambda a, i: a.scatter(0, i, 2.5), [F_(4, 5), I_(4, 2, 5)]),
    "scatter_reduce_str": (
        lambda a, i, s: a.scatter(1, i, s, reduce="multiply"),
        [F_(4, 5), I_(5, 4, 2), F_(4, 2)],
    ),
    "scatter_value_reduce": (lambda a, i: a.scatter(1, i, 2.0, reduce="add"), [F_(4, 5), I_(5, 4, 2)]),
    "scatter_add": (lambda a, i, s: a.scatter_add(1, i, s), [F_(4, 5), I_(5, 4, 6), F_(4, 6)]),
    "scatter_add_inplace": (
        lambda a, i, s: a.clone().scatter_add_(0, i, s),
        [F_(4, 5), I_(4, 6, 5), F_(6, 5)],
    ),
    "scatter_inplace": (lambda a, i, s: a.clone().scatter_(1, i, s), [F_(4, 5), I_(5, 4, 2), F_(4, 2)]),
    "scatter_value_inplace": (lambda a, i: a.clone().scatter_(1, i, -3.0), [F_(4, 5), I_(5, 4, 2)]),
    **{
        f"scatter_reduce_{r}_{inc}": (
            (lambda r, inc: lambda a, i, s: a.scatter_reduce(1, i, s, r, include_self=inc))(r, inc),
            [F_(4, 5), I_(5, 4, 6), F_(4, 6)],
        )
        for r, inc in itertools.product(("sum", "prod", "mean", "amax", "amin"), (True, False))
    },
    "scatter_reduce_inplace": (
        lambda a, i, s: a.clone().scatter_reduce_(0, i, s, "amax"),
        [F_(4, 5), I_(4, 3, 5), F_(3, 5)],
    ),
}

# In-place writes into a clone of argument 0: with argument 0 unbatched the write of batched values
# into an unbatched tensor is an error (tested below), as under torch.func.
_INPLACE_INTO_ARG0 = {
    "setitem_1d",
    "setitem_dim1",
    "setitem_adjacent_at_1",
    "setitem_non_adjacent",
    "setitem_scalar_value",
    "index_put_accumulate",
    "index_add_inplace",
    "index_copy_inplace",
    "scatter_add_inplace",
    "scatter_inplace",
    "scatter_value_inplace",
    "scatter_reduce_inplace",
}


# Cases where torch.func.vmap itself disagrees with the for-loop (ours is compared with the loop
# only there): name -> (placements or None for all, what torch.func does).
TORCH_FUNC_WRONG = {
    "setitem_dim1": (
        None,
        "raises 'shape mismatch: value tensor of shape [3, 3, 2] cannot be "
        "broadcast to indexing result of shape [3, 2, 3]' when the index is batched",
    ),
    "setitem_adjacent_at_1": (None, "same shape mismatch as setitem_dim1"),
    "index_select_0d_idx": (None, "returns shape [B, 3, 5] instead of [B, 3, 1]"),
    "index_fill_tensor": ({"None@0"}, "wrong values when self is unbatched and index and value are batched"),
}


@pytest.mark.parametrize(
    "name,pname,in_dims",
    list(case_params(CASES, skip=lambda name, pname: name in _INPLACE_INTO_ARG0 and pname == "None@0")),
)
def test_indexing_rule(name, pname, in_dims):
    fn, specs = CASES[name]
    run(fn, specs, in_dims, torch_func=torch_func_agrees(TORCH_FUNC_WRONG, name, pname))


def test_nested_vmap_index():
    x = torch.randn(2, 3, 5, 4)
    i = torch.randint(0, 5, (3, 2))
    f = lambda a, j: a[j].sum(-1)
    with_err = ft.vmap(ft.vmap(f, in_dims=(0, 0)), in_dims=(0, None))
    ft.set_vmap_fallback("error")
    out = with_err(x, i)
    expected = torch.func.vmap(torch.func.vmap(f, in_dims=(0, 0)), in_dims=(0, None))(x, i)
    assert_same(out, expected)


# ------------------------------------------------------------------------------------------------
# Errors


def test_batched_mask_index_is_a_clear_error():
    x = torch.randn(B, 4)
    ft.set_vmap_fallback("error")
    with pytest.raises(RuntimeError, match=r"boolean mask that differs per batch element"):
        ft.vmap(lambda a: a[a > 0])(x)


def test_batched_mask_masked_select_is_a_clear_error():
    x = torch.randn(B, 4)
    with pytest.raises(RuntimeError, match=r"masked_select with a mask that differs per batch"):
        ft.vmap(lambda a: a.masked_select(a > 0))(x)


def test_setitem_batched_value_into_unbatched_tensor_is_a_clear_error():
    base = torch.zeros(5, 4)

    def f(v):
        base[torch.tensor([0, 2])] = v
        return v

    with pytest.raises(
        RuntimeError,
        match=r"writes batched values in place into 'self', which "
        r"is not batched",
    ):
        ft.vmap(f)(torch.randn(B, 2, 4))
    assert torch.equal(base, torch.zeros(5, 4)), "the unbatched tensor was modified"


def test_too_many_indices_is_a_clear_error():
    with pytest.raises(IndexError, match="too many indices"):
        ft.vmap(lambda a, i: a[i, i, i])(torch.randn(B, 4, 5), torch.zeros(B, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Transforms through the indexing ops: their backward/forward formulas use index_put, scatter_add,
# index_add, gather... under vmap.

IDX = torch.tensor([0, 2, 2, 3])
GIDX = torch.tensor([[0, 1], [3, 3], [2, 0]])

DIFF_FUNCS = {
    "index": lambda x: x[IDX].sin(),
    "index_dim1": lambda x: x[:, torch.tensor([1, 1, 0])].exp(),
    "index_select": lambda x: x.index_select(1, torch.tensor([3, 0])).sin(),
    "gather": lambda x: x.gather(1, GIDX).exp(),
    "scatter": lambda x: torch.zeros(3, 5).scatter(1, GIDX, x[:, :2]),
    "scatter_add": lambda x: x.scatter_add(1, GIDX, x[:, :2].exp()),
    "index_add": lambda x: x.index_add(0, torch.tensor([2, 0]), x[:2].sin()),
    "index_put": lambda x: torch.index_put(x, (torch.tensor([1, 1]),), x[0:2].exp(), accumulate=True),
    "max_dim": lambda x: x.max(1).values,
    "median_dim": lambda x: x.median(0).values,
    "take_along_dim": lambda x: torch.take_along_dim(x, GIDX, 1),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.tensor([0, 3, 1]), reduction="none"),
}
TRANSFORMS = {
    "jacrev": lambda L, f, x: L.jacrev(f)(x),
    "jacfwd": lambda L, f, x: L.jacfwd(f)(x),
    "vmap_grad": lambda L, f, x: L.vmap(L.grad(lambda y: f(y).sum()))(
        x.unsqueeze(0).repeat(2, 1, 1) * torch.tensor([1.0, -0.5]).view(2, 1, 1)
    ),
    "hessian": lambda L, f, x: L.hessian(lambda y: f(y).sin().sum())(x),
}


@pytest.mark.parametrize("tname", list(TRANSFORMS))
@pytest.mark.parametrize("fname", list(DIFF_FUNCS))
def test_transforms_through_indexing(fname, tname):
    x = torch.randn(3, 5) if fname != "index" else torch.randn(4, 5)
    f, t = DIFF_FUNCS[fname], TRANSFORMS[tname]
    ft._C._reset_fallback_ops_seen()
    ft.set_vmap_fallback("error")
    actual = t(ft, f, x)
    ft.set_vmap_fallback("warn")
    expected = t(torch.func, f, x)
    assert_same(actual, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# _linalg_check_errors (lives in rules_linalg.cpp; tested here with the other rules that return
# errors): a singular batch element is named like torch names it for batched input.


def test_inv_of_singular_batch_element_names_it():
    x = torch.eye(4).repeat(B, 1, 1)
    x[1] = 0
    ft.set_vmap_fallback("error")
    with pytest.raises(
        RuntimeError,
        match=r"linalg.inv: \(Batch element 1\): The diagonal "
        r"element 1 is zero",
    ):
        ft.vmap(torch.linalg.inv)(x)


def test_gather_and_scatter_with_an_empty_index_of_another_rank():
    """torch skips gather/scatter's rank check for an empty index (the result is empty, or self):
    a regression of issue 22 item 5 (it worked on 2026-11-30). Against torch.func and a loop."""
    x = torch.randn(3, 4)
    empty = torch.empty(0, 2, dtype=torch.long)
    cases = {
        "gather": lambda t: torch.gather(t, 0, empty),
        "gather_batched_index": None,
        "scatter": lambda t: torch.scatter(t, 0, empty, torch.ones(0, 2)),
        "scatter_add": lambda t: torch.scatter_add(t, 0, empty, torch.ones(0, 2)),
        "scatter_reduce": lambda t: torch.scatter_reduce(t, 0, empty, torch.ones(0, 2), "sum"),
    }
    for name, f in cases.items():
        if f is None:
            idx = torch.empty(3, 0, 2, dtype=torch.long)
            got = ft.vmap(lambda t, i: torch.gather(t, 0, i))(x, idx)
            ref = torch.func.vmap(lambda t, i: torch.gather(t, 0, i))(x, idx)
        else:
            got, ref = ft.vmap(f)(x), torch.func.vmap(f)(x)
            loop = torch.stack([f(t) for t in x])
            assert got.shape == loop.shape and torch.equal(got, loop), name
        assert got.shape == ref.shape and got.dtype == ref.dtype and torch.equal(got, ref), name
    g = ft.vmap(ft.grad(lambda t: torch.gather(t, 0, empty).sum()))(x)
    assert torch.equal(g, torch.zeros_like(x))
