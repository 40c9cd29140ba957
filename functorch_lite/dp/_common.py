"""Helpers shared by functorch_lite.dp's entry points (_clip), its per-layer fast path (_ghost)
and its per-example path (_per_example): argument checks, the clip factors and weighted sums.
Nothing here imports the other modules, so dp/ has no import cycle."""

import math
import numbers

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

_EPS = 1e-6  # Opacus' convention: factor = min(1, C / (norm + 1e-6))


_METHODS = ("auto", "ghost", "vmap")


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


def _as_tuple(inputs):
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
