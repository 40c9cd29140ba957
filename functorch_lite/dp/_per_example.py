"""The per-example path of functorch_lite.dp: vmap(grad) of the per-example loss, norms over
all differentiated tensors, clip factors and the weighted sum, chunk by chunk (clipped_grad, and
method="vmap" of clipped_grad_module, the fallback of the per-layer path)."""

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._compile import call_eagerly, skip_wrappers
from .._grad import grad
from .._module import functional_call
from .._vmap import vmap
from ._common import (
    _as_tuple,
    _batch_size_of,
    _check_chunk_size,
    _check_max_norm,
    check_per_example_loss,
    clip_factors,
    per_example_sq_norms,
    weighted_sum,
)


def _normalize_batch_argnums(batch_argnums, nargs, api):
    items = (batch_argnums,) if isinstance(batch_argnums, int) else batch_argnums
    if (
        not isinstance(items, (tuple, list))
        or not items
        or any(isinstance(i, bool) or not isinstance(i, int) for i in items)
    ):
        raise TypeError(
            f"{api}: batch_argnums must be an int or a non-empty tuple of ints, got {batch_argnums!r}."
        )
    out = []
    for i in items:
        if not -nargs <= i < nargs:
            raise ValueError(
                f"{api}: batch_argnums={batch_argnums!r} names argument {i}, but the "
                f"function was called with {nargs} positional arguments."
            )
        out.append(i % nargs)
    if len(set(out)) != len(out):
        raise ValueError(f"{api}: batch_argnums={batch_argnums!r} names an argument twice.")
    return tuple(sorted(out))


@skip_wrappers
def _clipped_grad(
    func, argnums, *, max_norm, batch_argnums, has_aux, chunk_size, return_norms, randomness, api
):
    max_norm = _check_max_norm(max_norm, api)
    _check_chunk_size(chunk_size, api)
    per_example_grad = grad(func, argnums, has_aux=has_aux)

    def clipped(*args):
        return call_eagerly(body, args, {})

    def body(*args):
        batched = _normalize_batch_argnums(batch_argnums, len(args), api)
        size = _batch_size_of([(f"argument {i}", args[i]) for i in batched], api, "batch_argnums names")
        in_dims = tuple(0 if i in batched else None for i in range(len(args)))
        step = size if chunk_size is None or size == 0 else min(chunk_size, size)
        total, norms, auxes = None, [], []
        for start in range(0, size, max(step, 1)):
            chunk = tuple(
                tree_map(lambda t: t[start : start + step], a) if d == 0 else a for a, d in zip(args, in_dims)
            )
            out = vmap(per_example_grad, in_dims=in_dims, randomness=randomness)(*chunk)
            grads, aux = out if has_aux else (out, None)
            leaves, spec = tree_flatten(grads)
            sq = sum(per_example_sq_norms(g) for g in leaves)
            chunk_norms = sq.sqrt()
            factors = clip_factors(chunk_norms, max_norm)
            sums = [weighted_sum(factors, g) for g in leaves]
            total = sums if total is None else [t + s for t, s in zip(total, sums)]
            norms.append(chunk_norms)
            auxes.append(aux)
        if total is None:  # an empty batch: nothing to differentiate, the sum is zero
            total, spec = _zeros_like_argnums(args, argnums)
            first = tree_flatten(args[batched[0]])[0][0]
            norms_out, aux_out = torch.zeros(0, device=first.device), None
        else:
            norms_out = torch.cat(norms)
            aux_out = (
                auxes[0] if len(auxes) == 1 or not has_aux else tree_map(lambda *xs: torch.cat(xs), *auxes)
            )
        result = (tree_unflatten(total, spec),)
        if return_norms:
            result += (norms_out,)
        if has_aux:
            result += (aux_out,)
        return result[0] if len(result) == 1 else result

    return clipped


def _zeros_like_argnums(args, argnums):
    chosen = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)
    leaves, spec = tree_flatten(chosen)
    return [torch.zeros_like(t) for t in leaves], spec


def vmap_clipped_grad(model, loss_fn, inputs, targets, params, max_norm):
    """method="vmap": the whole model per example under vmap(grad)."""
    api = "clipped_grad_module"
    inputs = _as_tuple(inputs)
    size = _batch_size_of([("inputs", inputs)], api, "")

    def one_example(p, x, y):
        x1, y1 = tree_map(lambda t: t.unsqueeze(0), (x, y))
        losses = loss_fn(functional_call(model, p, x1), y1)
        check_per_example_loss(losses, 1, api, batch_size=size)
        return losses.sum()

    clipped = _clipped_grad(
        one_example,
        0,
        max_norm=max_norm,
        batch_argnums=(1, 2),
        has_aux=False,
        chunk_size=None,
        return_norms=True,
        randomness="different",
        api=api,
    )
    detached = {n: p.detach() for n, p in params.items()}  # no graph back to the parameters
    return clipped(detached, inputs, targets)
