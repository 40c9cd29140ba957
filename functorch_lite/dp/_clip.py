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

import weakref

import torch

from .._compile import Transformed, eager
from ._common import (
    _as_tuple,
    _check_max_norm,
    check_module_args,
    check_per_example_loss,
    trainable_parameters,
)
from ._ghost import _rule_for, ghost_clipped_grad, last_plan
from ._per_example import _clipped_grad, vmap_clipped_grad

__all__ = ["clipped_grad", "clipped_grad_module"]


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
    learn = False
    if method == "auto":  # NOTE [auto and models mostly without rules]
        decided = _auto_path(model, params)
        learn = decided is None
        if decided == "vmap":
            method = "vmap"
    if method != "vmap":
        result = ghost_clipped_grad(
            model, loss_fn, inputs, targets, params, max_norm, size, force_ghost=(method == "ghost")
        )
        if learn:
            _learn_auto_path(model, params, result is not None)
        if result is not None:
            grads, norms = result
            return (grads, norms) if return_norms else grads
    grads, norms = vmap_clipped_grad(model, loss_fn, inputs, targets, params, max_norm)
    return (grads, norms) if return_norms else grads


# NOTE [auto and models mostly without rules]
# The per-layer path records a forward and a backward of the whole model, then runs a per-layer
# vmap(grad) (its forward and backward again) for every module without a rule. When such modules
# hold most of the trainable parameters (a custom recurrent cell with a small head), that is about
# twice the whole-model vmap path's work for the same values (measured: 204 ms against 60 ms for
# an LSTM(16, 64) classifier at B=64 before LSTMs had a rule), so "auto" takes the vmap path
# there. Which modules have a rule is known before the step, but not which of their weights the
# recording gives a rule anyway (NOTE [Weights that enter through F.linear or matmul] in
# _ghost.py): a model whose rule-less modules hold most of the parameters runs its first step on
# the per-layer path, and the plan of that step decides for the following ones (remembered per
# model and set of trainable parameters). "ghost" keeps the per-layer path (it is what it asks
# for).
_AUTO_PATHS = weakref.WeakKeyDictionary()  # model -> (ids of the trainable parameters, path)


def _auto_path(model, params):
    """ "layers", "vmap", or None where the first step's plan must decide."""
    ids = tuple(id(p) for p in params.values())
    known = _AUTO_PATHS.get(model)
    if known is not None and known[0] == ids:
        return known[1]
    if not _mostly_without_rules(model, params):
        return "layers"
    return None


def _learn_auto_path(model, params, planned):
    """Remembers the path for this model from the plan of the step that just ran."""
    ids = {id(p): p.numel() for p in params.values()}
    plan = last_plan() if planned else None
    if plan is None:
        path = "vmap"  # the per-layer path gave up (it fell back to the vmap path)
    else:
        generic = sum(ids.get(id(p), 0) for m in plan[1] for p in m.parameters())
        path = "vmap" if 2 * generic > sum(ids.values()) else "layers"
    try:
        _AUTO_PATHS[model] = (tuple(ids), path)
    except TypeError:  # a model that cannot be weakly referenced: decide again next time
        pass


def _mostly_without_rules(model, params):
    ids = {id(p): p.numel() for p in params.values()}
    total = sum(ids.values())
    without = 0
    for m in model.modules():
        own = [p for p in m._parameters.values() if p is not None and id(p) in ids]
        if own and _rule_for(m) is None:
            without += sum(p.numel() for p in own)
    return 2 * without > total
