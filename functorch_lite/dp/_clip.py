"""Clipped sums of per-example gradients, the core of a DP-SGD step.

clipped_grad is a transform built on vmap(grad): per-example gradients, their norms over all
differentiated tensors together, and the sum of the gradients each scaled by
min(1, max_norm / (norm_i + 1e-6)) (Opacus' convention). With chunk_size only that many
per-example gradients exist at a time: the clipped sum is accumulated chunk by chunk.

clipped_grad_module does the same for an nn.Module and a per-example loss; method="vmap" runs the
model per example through functional_call + clipped_grad, "auto"/"ghost" take the hook-based path
of _ghost.py that never materialises per-example gradients where a layer has a ghost-norm rule.
Dim 0 of every input and target is the example dimension.
"""

import math
import numbers

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._compile import Transformed, call_eagerly, eager, skip_wrappers
from .._grad import grad
from .._module import functional_call
from .._vmap import vmap

__all__ = ["clipped_grad", "clipped_grad_module"]

_EPS = 1e-6  # Opacus' convention: factor = min(1, C / (norm + 1e-6))
_METHODS = ("auto", "ghost", "vmap")


# ------------------------------------------------------------------------------------------------
# argument checks shared by both entry points


def _check_max_norm(max_norm, api):
    if isinstance(max_norm, torch.Tensor) and max_norm.numel() == 1:
        max_norm = max_norm.item()
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(
            f"{api}: max_norm must be a positive number, got {type(max_norm).__name__} {max_norm!r}."
        )
    max_norm = float(max_norm)
    if math.isnan(max_norm) or max_norm <= 0:
        raise ValueError(f"{api}: max_norm must be > 0 (the clipping bound C), got {max_norm!r}.")
    if math.isinf(max_norm):
        # an unbounded clip bounds no example's contribution: no noise scale gives privacy
        raise ValueError(
            f"{api}: max_norm must be finite (the clipping bound C that the noise is scaled to), "
            f"got {max_norm!r}; an infinite bound clips nothing and gives no privacy."
        )
    return max_norm


def _check_chunk_size(chunk_size, api):
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"{api}: chunk_size must be None or a positive int, got {chunk_size!r}.")


def _batch_size_of(named_values, api, what):
    """The common dim-0 size of the tensors in [(label, pytree)]; errors name the argument."""
    size, first = None, None
    for label, value in named_values:
        leaves, _ = tree_flatten(value)
        if not leaves:
            raise TypeError(
                f"{api}: {what} {label} must be a tensor (or a container of tensors) "
                f"with the examples along dim 0, got {type(value).__name__}."
            )
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{api}: {what} {label} must be a tensor (or a container of "
                    f"tensors) with the examples along dim 0; it holds a "
                    f"{type(leaf).__name__} ({leaf!r:.40})."
                )
            if leaf.dim() == 0:
                raise ValueError(
                    f"{api}: {what} {label} is a 0-dim tensor; the examples must be along dim 0."
                )
            if size is None:
                size, first = leaf.shape[0], label
            elif leaf.shape[0] != size:
                raise ValueError(
                    f"{api}: the batched tensors must all have the same batch size "
                    f"(dim 0): {what} {first} has {size}, {what} {label} has "
                    f"{leaf.shape[0]}."
                )
    return size


def clip_factors(norms, max_norm):
    """min(1, max_norm / (norm + 1e-6)) per example."""
    return (max_norm / (norms + _EPS)).clamp(max=1.0)


def weighted_sum(factors, per_example):
    """sum_i factors[i] * per_example[i] as one matrix-vector product."""
    flat = per_example.reshape(per_example.shape[0], -1)
    if factors.dtype != flat.dtype:
        factors = factors.to(flat.dtype)
    return (factors @ flat).reshape(per_example.shape[1:])


def per_example_sq_norms(per_example):
    """||g_i||^2 of a (B, ...) tensor of per-example gradients, without a squared copy of it."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1).square()


# ------------------------------------------------------------------------------------------------
# clipped_grad


def clipped_grad(
    func, argnums=0, *, max_norm, batch_argnums=(1,), has_aux=False, chunk_size=None, return_norms=False
):
    """Transform: the sum over examples of per-example gradients, each clipped to norm ``max_norm``.

    ``func(*args)`` is written for ONE example and returns a scalar loss (and an aux output with
    ``has_aux=True``). The returned function takes the arguments with the examples stacked along
    dim 0 of the arguments named by ``batch_argnums`` (the others are shared, not batched) and
    returns the gradient w.r.t. ``argnums`` (same structure as ``grad(func, argnums)`` would
    give)::

        sum_i g_i * min(1, max_norm / (||g_i|| + 1e-6))

    where ``||g_i||`` is the L2 norm of example i's gradient over all differentiated tensors
    together.

    Args:
        func: the per-example loss, returning a single-element tensor.
        argnums: an int or a tuple of ints: the arguments to differentiate (tensors or pytrees).
        max_norm: the clipping bound C.
        batch_argnums: the arguments whose dim 0 is the example dimension.
        has_aux: ``func`` returns ``(loss, aux)``; the per-example aux outputs are returned
            stacked along dim 0.
        chunk_size: process that many examples at a time and accumulate the clipped sum, so that
            at most ``chunk_size`` per-example gradients exist at once (same values).
        return_norms: also return the per-example gradient norms, shape ``(B,)``.

    Returns:
        ``grads``, ``(grads, norms)``, ``(grads, aux)`` or ``(grads, norms, aux)``.

    Example:
        >>> import torch, functorch_lite as ft
        >>> def loss(w, x, y):  # one example: x (3,), y ()
        ...     return (x @ w - y) ** 2
        >>> w, x, y = torch.ones(3), torch.randn(8, 3), torch.randn(8)
        >>> g, norms = ft.dp.clipped_grad(loss, max_norm=1.0, return_norms=True, batch_argnums=(1, 2))(w, x, y)
        >>> g.shape, norms.shape
        (torch.Size([3]), torch.Size([8]))
        >>> bool(g.norm() <= 8 * 1.0 + 1e-4)  # at most max_norm per example
        True
    """
    clipped = _clipped_grad(
        func,
        argnums,
        max_norm=max_norm,
        batch_argnums=batch_argnums,
        has_aux=has_aux,
        chunk_size=chunk_size,
        return_norms=return_norms,
        randomness="error",
        api="clipped_grad",
    )

    def run(args, kwargs):
        return clipped(*args, **kwargs)

    # a Transformed, so that torch.compile records the call and traces it (docs/compile.md)
    options = (
        ("argnums", argnums),
        ("max_norm", max_norm),
        ("batch_argnums", batch_argnums),
        ("has_aux", has_aux),
        ("chunk_size", chunk_size),
        ("return_norms", return_norms),
    )
    return Transformed(clipped_grad, options, func, run)


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


# ------------------------------------------------------------------------------------------------
# clipped_grad_module


def check_module_args(model, loss_fn, inputs, targets, method, api):
    """Validates the arguments of clipped_grad_module; returns the batch size."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{api}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(
            f"{api}: loss_fn must be callable (outputs, targets) -> per-example losses "
            f"of shape (B,), got {type(loss_fn).__name__}."
        )
    if method not in _METHODS:
        raise ValueError(f"{api}: method must be one of 'auto', 'ghost', 'vmap', got {method!r}.")
    for m in model.modules():
        # without running statistics batch norm uses batch statistics in eval mode too
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            name = next(n for n, q in model.named_modules() if q is m)
            mode = "in training mode" if m.training else "without running statistics"
            raise ValueError(
                f"{api}: the model has a {type(m).__name__} {mode} ({name or 'model'!r}). "
                f"Batch norm then normalises with statistics of the whole batch, so it mixes "
                f"examples and per-example gradients do not exist: it is not DP-compatible. Use "
                f"nn.GroupNorm or nn.LayerNorm instead (or a batch norm with running statistics "
                f"in eval mode, which is fine)."
            )
    return _batch_size_of([("inputs", inputs), ("targets", targets)], api, "")


def check_per_example_loss(losses, size, api, batch_size=None):
    """Raises unless `losses` has shape (size,); batch_size is the B to name in the message."""
    if isinstance(losses, torch.Tensor) and losses.shape == (size,):
        return
    b = size if batch_size is None else batch_size
    if isinstance(losses, torch.Tensor) and losses.dim() == 0:
        got = (
            "a scalar: the loss was reduced over the batch; use reduction='none' "
            "(e.g. F.cross_entropy(out, y, reduction='none'))"
        )
    elif isinstance(losses, torch.Tensor):
        # under vmap the loss of one example is seen with a batch of 1: report it as (B, ...)
        shape = tuple(losses.shape) if batch_size is None else (b,) + tuple(losses.shape[1:])
        got = f"shape {shape}"
    else:
        got = f"a {type(losses).__name__}"
    raise ValueError(
        f"{api}: loss_fn must return the per-example losses, a tensor of shape "
        f"(B,) = ({b},); it returned {got}."
    )


def trainable_parameters(model):
    """name -> parameter for the trainable parameters (a tied parameter once, first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@eager
def clipped_grad_module(model, loss_fn, inputs, targets, *, max_norm, method="auto", return_norms=False):
    """The clipped sum of per-example gradients of ``loss_fn(model(inputs), targets)``.

    Returns a dict parameter-name -> ``sum_i g_i * min(1, max_norm / (||g_i|| + 1e-6))`` over the
    trainable parameters (named as in ``model.named_parameters()``; a tied parameter once).

    Args:
        model: an ``nn.Module``. Any layout inside it (seq-first layers, transposes): every
            method runs it one example at a time, as a batch of one, and ``"auto"``/``"ghost"``
            know each layer's example dim from that run, never from sizes.
        loss_fn: ``loss_fn(outputs, targets)`` returns the per-example losses, shape ``(B,)``
            (e.g. ``F.cross_entropy(..., reduction="none")``).
        inputs: a tensor, or a tuple of tensors passed as ``model(*inputs)``; dim 0: examples.
        targets: a tensor (or a container of tensors) passed to ``loss_fn``; dim 0: examples.
        max_norm: the clipping bound C.
        method: ``"vmap"`` runs the model per example (functional_call + clipped_grad);
            ``"ghost"`` computes per-example gradient norms from layer inputs and output
            gradients wherever a layer has a ghost rule (Linear, Conv1d/2d, Embedding,
            MultiheadAttention's projections) and the clipped sum by one reweighted product per
            layer, never materialising those layers' per-example gradients; ``"auto"`` chooses
            per layer between ghost norms and materialised per-example gradients by their cost.
            Norm layers (LayerNorm, RMSNorm, GroupNorm, eval-mode BatchNorm) form their small
            per-example gradients directly; any other module with trainable parameters gets a
            per-layer vmap(grad). All methods give the same result (see :doc:`dp_clipping`).
            Batch norm in training mode is refused (it mixes examples).
        return_norms: also return the per-example gradient norms ``(B,)``: ``(grads, norms)``.

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, functorch_lite as ft
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = lambda out, y: F.cross_entropy(out, y, reduction="none")
        >>> grads, norms = ft.dp.clipped_grad_module(model, loss, x, y, max_norm=0.5, return_norms=True)
        >>> sorted(grads) == sorted(n for n, _ in model.named_parameters()), norms.shape
        (True, torch.Size([16]))
    """
    api = "clipped_grad_module"
    max_norm = _check_max_norm(max_norm, api)
    size = check_module_args(model, loss_fn, inputs, targets, method, api)
    params = trainable_parameters(model)
    if size == 0 or not params:
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        if size != 0:  # still check the loss, so a wrong loss_fn fails on every batch
            with torch.no_grad():
                check_per_example_loss(loss_fn(model(*_as_tuple(inputs)), targets), size, api)
        first = next(iter(params.values()), None)
        norms = torch.zeros(size, device=None if first is None else first.device)
        return (grads, norms) if return_norms else grads
    if method != "vmap":
        from ._ghost import ghost_clipped_grad

        result = ghost_clipped_grad(
            model, loss_fn, inputs, targets, params, max_norm, size, force_ghost=(method == "ghost")
        )
        if result is not None:
            grads, norms = result
            return (grads, norms) if return_norms else grads
    grads, norms = vmap_clipped_grad(model, loss_fn, inputs, targets, params, max_norm)
    return (grads, norms) if return_norms else grads


def _as_tuple(inputs):
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


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
