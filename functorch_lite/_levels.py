"""Questions about the levels a tensor is wrapped at, shared by the transforms."""

import torch

from ._load import _C


def _vmap_levels(t):
    """The ids of the live vmap levels at which the tensor t is batched (empty for a plain one)."""
    levels = set()
    while isinstance(t, torch.Tensor):
        info = _C._wrapper_info(t)
        if info is None:
            if torch._is_functional_tensor(t):  # functionalize's wrapper of one of ours
                t = torch._from_functional_tensor(t)
                continue
            break
        kind, level, _bdim, value, alive = info
        if kind == "batched" and alive:
            levels.add(level)
        t = value
    return levels


def _batched_like(reference, t):
    """t, batched at least wherever `reference` is (torch.func's invariant for tangents and
    cotangents).

    Under vmap(jacfwd(f)) or vmap(jacrev(f)) a primal or output is batched by the outer vmap, but
    the basis vector paired with it only by the jacobian's own vmap. The derivative formulas then
    write values batched by the outer vmap in place into buffers made from the basis vector
    (a fresh tangent; the gradient of a base tensor after an in-place view update, in torch's
    CopySlices), which no in-place rule can do. torch.func's bases are made with new_zeros of the
    primal or output, batched like it; adding zeros like `reference` does the same here, and only
    where it is needed.
    """
    plain = _C._wrapper_info(reference) is None and not torch._is_functional_tensor(reference)
    if plain or _vmap_levels(reference) <= _vmap_levels(t):
        return t
    return t + torch.zeros_like(reference)
