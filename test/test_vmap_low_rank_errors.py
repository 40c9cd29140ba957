"""Batching rules outside linear algebra on per-example inputs of too few dims (issue 12, item 2's
audit of the other families).

An OpInfo sweep giving every op 0-d and 1-d per-example inputs found rules that assumed a
minimum logical rank: they returned a result where torch raises (softmax/sort/max/logsumexp/
transpose/squeeze with a dim a scalar does not have, max_pool1d of a vector, layer_norm of a
scalar, soft_margin_loss with a larger target, index_add with a source of another shape), or
raised another exception type than torch (permute, split, narrow, unbind, batch/group norm, mv,
trace, embedding, nll_loss, index_copy, index_put, convolution with a scalar weight, gather and
scatter, max_unpool with scalar indices; layer_norm and conv3d accepted a scalar weight or bias). Each case runs vmap over a batch of
such inputs and checks it raises what the unbatched call on one example raises: same type, same
first line, never an internal assert; with the for-loop fallback set to 'error'.
"""

import pytest
import torch
import torch.nn.functional as F
from test_vmap_linalg_ranks import _error_of

import functorch_lite as ft

DT = torch.float64


def _s():  # one example: a scalar
    return torch.tensor(0.5, dtype=DT)


def _v(n=4):  # one example: a vector
    return torch.arange(1.0, n + 1, dtype=DT)


# name -> (function of the per-example tensor, the per-example tensor)
CASES = {
    "softmax_dim2": (lambda x: torch.softmax(x, 2), _s),
    "log_softmax_dim2": (lambda x: torch.log_softmax(x, 2), _s),
    "softmin_dim1": (lambda x: F.softmin(x, 1), _s),
    "max_dim1": (lambda x: torch.max(x, 1), _s),
    "min_dim_neg2": (lambda x: torch.min(x, -2), _s),
    "cumsum_dim1": (lambda x: torch.cumsum(x, 1), _s),
    "logsumexp_dim1": (lambda x: torch.logsumexp(x, 1), _s),
    "sum_dims": (lambda x: x.sum((0, 1)), _s),
    "sort_dim_neg3": (lambda x: torch.sort(x, -3), _s),
    "argsort_dim_neg3": (lambda x: torch.argsort(x, -3), _s),
    "topk_dim2": (lambda x: torch.topk(x, 1, 2), _s),
    "normalize": (lambda x: F.normalize(x), _s),
    "transpose": (lambda x: x.transpose(-2, -1), _s),
    "squeeze_dim2": (lambda x: x.squeeze(2), _s),
    "squeeze_dims": (lambda x: x.squeeze((0, 1)), _s),
    "permute_scalar": (lambda x: x.permute(1, 0), _s),
    "permute_vector": (lambda x: x.permute(1, 0), _v),
    "split": (lambda x: x.split(1), _s),
    "split_sizes": (lambda x: x.split([1]), _s),
    "unbind": (lambda x: x.unbind(), _s),
    "narrow_copy": (lambda x: x.narrow_copy(0, 0, 1), _s),
    "max_pool1d_vector": (lambda x: F.max_pool1d(x, 2), _v),
    "max_pool2d_vector": (lambda x: F.max_pool2d(x, 2), _v),
    "avg_pool1d_vector": (lambda x: F.avg_pool1d(x, 2), _v),
    "pad_reflect_vector": (lambda x: F.pad(x, (1, 1), mode="reflect"), _v),
    "layer_norm_scalar": (lambda x: F.layer_norm(x, (2,)), _s),
    "layer_norm_wrong_size": (lambda x: F.layer_norm(x, (3,)), _v),
    "soft_margin_larger_target": (lambda x: F.soft_margin_loss(x, torch.ones(5, 5, dtype=DT)), _s),
    "batch_norm_scalar": (lambda x: torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5), _s),
    "batch_norm_vector": (lambda x: torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5), _v),
    "group_norm_scalar": (lambda x: torch.native_group_norm(x, None, None, 2, 2, 1, 1, 1e-5), _s),
    "trace_vector": (torch.trace, _v),
    "trace_scalar": (torch.trace, _s),
    "mv_scalar": (lambda x: torch.mv(x, _v(2)), _s),
    "matmul_size_mismatch": (lambda x: torch.matmul(x, torch.ones(3, 2, dtype=DT)), _v),
    "tril_vector": (torch.tril, _v),
    "index_put_scalar": (lambda x: torch.index_put(x, (torch.tensor([0]),), torch.tensor(1.0, dtype=DT)), _s),
    # too few dims in an argument other than the first
    "layer_norm_scalar_weight": (lambda w: F.layer_norm(torch.ones(2, 3, dtype=DT), (3,), w), _s),
    "layer_norm_scalar_bias": (lambda b: F.layer_norm(torch.ones(2, 3, dtype=DT), (3,), None, b), _s),
    "conv1d_scalar_weight": (lambda w: F.conv1d(torch.ones(1, 1, 4, dtype=DT), w), _s),
    "conv2d_vector_weight": (lambda w: F.conv2d(torch.ones(1, 1, 4, 4, dtype=DT), w), _v),
    "conv3d_scalar_bias": (
        lambda b: F.conv3d(torch.ones(1, 1, 2, 2, 2, dtype=DT), torch.ones(1, 1, 1, 1, 1, dtype=DT), b),
        _s,
    ),
    "max_unpool2d_scalar_indices": (
        lambda i: F.max_unpool2d(torch.ones(1, 1, 2, 2, dtype=DT), i.long(), 2),
        _s,
    ),
    "gather_scalar_index": (lambda i: torch.gather(torch.ones(2, 2, dtype=DT), 0, i.long()), _s),
    "scatter_scalar_src": (
        lambda s: torch.zeros(2, 2, dtype=DT).scatter(0, torch.zeros(1, 2, dtype=torch.long), s),
        _s,
    ),
    "scatter_add_vector_index": (
        lambda i: torch.zeros(2, 2, dtype=DT).scatter_add(0, i.long(), torch.ones(2, 2, dtype=DT)),
        lambda: torch.zeros(2),
    ),
    "narrow_copy_dim1": (lambda x: x.narrow_copy(1, 0, 1), _v),
    "embedding_weight_vector": (lambda w: F.embedding(torch.tensor([0, 1]), w), _v),
    "nll_loss_1d_target_size2": (lambda x: F.nll_loss(x, torch.tensor([0, 1])), _v),
    "index_add_scalar_self": (lambda x: x.index_add(0, torch.tensor([0]), torch.ones(3, dtype=DT)), _s),
    "index_add_size_mismatch": (
        lambda x: x.view(2, 2).index_add(0, torch.tensor([0]), torch.ones(1, 3, dtype=DT)),
        _v,
    ),
    "index_copy_rank_mismatch": (
        lambda x: x.index_copy(0, torch.tensor([0]), torch.ones(1, 2, dtype=DT)),
        _v,
    ),
    "geqrf_vector": (torch.geqrf, _v),
}


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_raises_what_one_example_raises(name, fallback_mode):
    fn, example = CASES[name]
    x = example()
    ref = _error_of(fn, x)
    assert ref is not None, f"{name}: torch accepts the example; the case checks nothing"
    batch = torch.stack([x, x, x])
    with fallback_mode("error"):
        got = _error_of(ft.vmap(fn), batch)
    assert got is not None, f"{name}: torch raises {ref!r}, vmap returned a result"
    assert "INTERNAL ASSERT" not in str(got), got
    assert type(got) is type(ref), f"{name}: {got!r} vs torch's {ref!r}"
    first = str(ref).strip().splitlines()[0]
    assert str(got).strip().splitlines()[0] == first, f"{name}: {got!r} vs torch's {ref!r}"


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: torch.softmax(x, 0),
        lambda x: torch.softmax(x, -1),
        lambda x: x.transpose(0, -1),
        lambda x: x.squeeze(0),
        lambda x: torch.sort(x, 0),
        lambda x: torch.max(x, -1),
        lambda x: torch.topk(x, 1, 0),
        lambda x: x.sum((-1,)),
    ],
    ids=["softmax0", "softmax-1", "transpose", "squeeze", "sort", "max", "topk", "sum"],
)
def test_dims_a_scalar_has_still_work(fn, fallback_mode):
    """dims -1 and 0 are valid on a scalar (torch wraps them): the checks must not reject them."""
    xs = torch.randn(3, dtype=DT)
    with fallback_mode("error"):
        got = ft.vmap(fn)(xs)
    rows = [fn(x) for x in xs]
    flat = torch.utils._pytree.tree_leaves(got)
    for j, g in enumerate(flat):
        torch.testing.assert_close(g, torch.stack([torch.utils._pytree.tree_leaves(r)[j] for r in rows]))


@pytest.mark.parametrize("case", ["index_add_scalar", "index_copy_scalar", "nll_1d_target_1"])
def test_shapes_torch_accepts_still_work(case, fallback_mode):
    """Shapes the new checks send per element, or let through, that torch accepts."""
    fns = {
        "index_add_scalar": lambda x: x.index_add(0, torch.tensor([0]), torch.ones((), dtype=DT)),
        "index_copy_scalar": lambda x: x.index_copy(0, torch.tensor(0), torch.full((), 2.0, dtype=DT)),
        "nll_1d_target_1": lambda x: F.nll_loss(x.log_softmax(-1), torch.tensor([1])),
    }
    fn = fns[case]
    xs = torch.randn(3, 4, dtype=DT) if case.startswith("nll") else torch.randn(3, dtype=DT)
    with fallback_mode("error"):
        got = ft.vmap(fn)(xs)
    torch.testing.assert_close(got, torch.stack([fn(x) for x in xs]))
