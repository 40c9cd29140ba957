"""ft.vmap: the Python face of vmap levels. Argument checking and pytree handling live here;
entering/leaving the level and moving batch dims in and out happen in C++ (_C)."""

import torch
from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_unflatten

from ._call import call_transformed
from ._compile import Transformed, eager, skip_wrappers
from ._load import _C

_RANDOMNESS = ("error", "different", "same")


def _fn_name(func):
    return getattr(func, "__name__", repr(func))


def _check_vmap_args(randomness, chunk_size):
    # The exception types are torch.func's for the same misuse.
    if randomness not in _RANDOMNESS:
        raise RuntimeError(
            f"vmap: Only allowed values for randomness are 'error', 'different', or 'same'. Got "
            f"{randomness!r}."
        )
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"vmap: chunk_size must be None or a positive int, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(
            f"vmap: chunk_size should be None or greater than 0 (a positive int), got {chunk_size!r}"
        )


@skip_wrappers
def vmap(func, in_dims=0, out_dims=0, randomness="error", *, chunk_size=None):
    """Vectorizes ``func`` over a dimension of its inputs, like ``torch.func.vmap``.

    ``func`` is written for one example; ``vmap(func)`` runs it on a whole batch in one call,
    through batching rules (an op without one runs as a for-loop over the batch: see
    :func:`set_vmap_fallback`). It nests with itself and with every other transform:
    ``vmap(grad(f))`` gives per-example gradients.

    Args:
        func: a function of tensors (or pytrees of tensors) that returns tensors.
        in_dims: an int, None, or a (nested) tuple/list/dict matching the positional arguments;
            each entry names the mapped dim of the corresponding tensor, or None to not map it.
            Keyword arguments are passed through unmapped.
        out_dims: an int, None, or a pytree matching the outputs: where the mapped dim goes in
            each output. None is only allowed for outputs that do not depend on the mapped inputs.
        randomness: ``'error'`` (random ops raise), ``'different'`` (independent draws per
            element) or ``'same'`` (one draw shared by the batch).
        chunk_size: None (one batched call), or a positive int: the batch is processed that many
            elements at a time and the results concatenated; 1 behaves like a for-loop.

    Returns:
        A function with the signature of ``func`` that takes and returns batched values.

    Example:
        >>> import torch, functorch_lite as ft
        >>> x, y = torch.randn(4, 3), torch.randn(3)
        >>> ft.vmap(torch.dot, in_dims=(0, None))(x, y).shape  # four dot products, one call
        torch.Size([4])
        >>> torch.allclose(ft.vmap(torch.dot, in_dims=(0, None))(x, y), x @ y)
        True
        >>> ft.vmap(ft.vmap(torch.outer))(torch.ones(2, 5, 3), torch.ones(2, 5, 4)).shape
        torch.Size([2, 5, 3, 4])
    """
    _check_vmap_args(randomness, chunk_size)
    recorded = getattr(func, "_ft_vmap_recorded", None)
    if (
        recorded is not None
    ):  # a vjp_fn/jvp_fn made while Dynamo traces (NOTE [vjp and linearize under torch.compile])
        return recorded(in_dims, out_dims, randomness, chunk_size)
    simple_dims = type(in_dims) is int and type(out_dims) is int and chunk_size is None

    def run(args, kwargs):
        return _vmap_entry(func, in_dims, out_dims, randomness, chunk_size, simple_dims, args, kwargs)

    options = (
        ("in_dims", in_dims),
        ("out_dims", out_dims),
        ("randomness", randomness),
        ("chunk_size", chunk_size),
    )
    return Transformed(vmap, options, func, run)


@eager
def _vmap_entry(func, in_dims, out_dims, randomness, chunk_size, simple_dims, args, kwargs):
    if simple_dims:
        out = _vmap_fast(func, in_dims, out_dims, randomness, args, kwargs)
        if out is not _SLOW:
            return out
    return _vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)


_SLOW = object()


def _vmap_fast(func, in_dim, out_dim, randomness, args, kwargs):
    """The common case without pytree work: Tensor positional arguments, int in_dims and
    out_dims, a Tensor output. Anything else (including every error) takes the general path."""
    if not args:
        return _SLOW
    batch_size = None
    for a in args:
        if not isinstance(a, torch.Tensor) or a.is_nested or a.layout is not torch.strided:
            return _SLOW
        nd = a.dim()
        if not -nd <= in_dim < nd:
            return _SLOW
        size = a.size(in_dim)
        if batch_size is None:
            batch_size = size
        elif size != batch_size:
            return _SLOW
    level = _C._push_vmap(batch_size, randomness)
    try:
        batched = _C._vmap_wrap_inputs(list(args), [in_dim] * len(args), level)
        out = call_transformed(func, batched, kwargs, "vmap")
        if not isinstance(out, torch.Tensor):
            flat_out, _, out_spec = _finish_outputs(func, out_dim, out, level, batch_size)
            return tree_unflatten(flat_out, out_spec)
        if not -(out.dim() + 1) <= out_dim <= out.dim():
            _flatten_outputs(func, out_dim, out)  # raises the out_dims error
        return _C._remove_batch_dim(out, level, batch_size, out_dim)
    finally:
        _C._pop(level)


def _flatten_inputs(func, in_dims, args):
    name = _fn_name(func)
    if not isinstance(in_dims, (int, tuple)) or isinstance(in_dims, bool):
        raise ValueError(
            f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): expected in_dims to be an int or a "
            f"(potentially nested) tuple matching the structure of the inputs, got "
            f"{type(in_dims).__name__}."
        )
    if len(args) == 0:
        raise ValueError(
            f"vmap({name})(<inputs>): got no inputs. vmap maps over the positional arguments, so "
            f"at least one is needed (functions of no inputs cannot be vmapped)."
        )
    flat_args, args_spec = tree_flatten(args)
    flat_in_dims = _broadcast_to_and_flatten(in_dims, args_spec)
    if flat_in_dims is None:
        raise ValueError(
            f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): in_dims is not compatible with "
            f"the structure of the inputs. in_dims has structure {tree_flatten(in_dims)[1]} but "
            f"the inputs have structure {args_spec}."
        )
    sizes = []
    for i, (arg, d) in enumerate(zip(flat_args, flat_in_dims)):
        if d is None:
            continue
        if not isinstance(d, int) or isinstance(d, bool):
            raise ValueError(
                f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): every in_dim must be an int "
                f"or None, got {d!r} for flattened input {i}."
            )
        if not isinstance(arg, torch.Tensor):
            raise ValueError(
                f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): got in_dim={d} for flattened "
                f"input {i}, which is a {type(arg).__name__}, not a Tensor. vmap can only map over "
                f"Tensors: use None as the in_dim of this input."
            )
        if arg.is_nested:
            # NOTE [vmap over nested tensors]: mapped over its components (dim 0 only)
            if d not in (0, -arg.dim()):  # RuntimeError, as torch.func
                raise RuntimeError(
                    f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): flattened input {i} is a "
                    f"nested tensor, which vmap maps over along its components (in_dim 0 only), "
                    f"got in_dim={d}."
                )
            sizes.append((i, arg.size(0)))
            continue
        if arg.layout is not torch.strided:
            # Batched tensors are strided: the batch dim is a stride trick on the value.
            raise RuntimeError(
                f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): flattened input {i} has "
                f"layout {arg.layout}, which functorch_lite.vmap cannot map over (a known "
                f"limitation; torch.func maps over sparse COO inputs). Pass it with in_dim=None "
                f"(a sparse constant works), or map over t.to_dense()."
            )
        if not -arg.dim() <= d < arg.dim():
            raise ValueError(
                f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): got in_dim={d} for flattened "
                f"input {i}, but that input is a Tensor of dimensionality {arg.dim()}, so in_dim "
                f"must be in [{-arg.dim()}, {arg.dim()})."
            )
        sizes.append((i, arg.size(d)))
    if not sizes:
        raise ValueError(
            f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): every input has in_dim=None (or "
            f"is not a Tensor), so there is nothing to map over. Give at least one Tensor input "
            f"an int in_dim."
        )
    batch_size = sizes[0][1]
    if any(s != batch_size for _, s in sizes):
        listed = ", ".join(f"input {i}: {s}" for i, s in sizes)
        raise ValueError(
            f"vmap({name}, in_dims={in_dims!r}, ...)(<inputs>): expected all mapped inputs to "
            f"have the same size in the mapped dim, got {listed}."
        )
    return flat_args, flat_in_dims, args_spec, batch_size


def _flatten_outputs(func, out_dims, out):
    name = _fn_name(func)
    flat_out, out_spec = tree_flatten(out)
    if not isinstance(out_dims, (int, tuple, list, dict)) and out_dims is not None:
        raise ValueError(
            f"vmap({name}, ..., out_dims={out_dims!r}): expected out_dims to be an int, None, or a "
            f"pytree matching the outputs, got {type(out_dims).__name__}."
        )
    flat_out_dims = _broadcast_to_and_flatten(out_dims, out_spec)
    if (
        flat_out_dims is None
        and isinstance(out, torch.Tensor)
        and isinstance(out_dims, tuple)
        and len(out_dims) == 1
    ):
        # torch.func accepts out_dims=(d,) for a function returning one Tensor.
        flat_out_dims = [out_dims[0]]
    if flat_out_dims is None:
        raise ValueError(
            f"vmap({name}, ..., out_dims={out_dims!r}): out_dims is not compatible with the "
            f"structure of the outputs. out_dims has structure {tree_flatten(out_dims)[1]} but "
            f"the outputs have structure {out_spec}."
        )
    for i, (o, d) in enumerate(zip(flat_out, flat_out_dims)):
        if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
            raise ValueError(
                f"vmap({name}, ..., out_dims={out_dims!r}): every out_dim must be an int or None, "
                f"got {d!r} for flattened output {i}."
            )
        if not isinstance(o, torch.Tensor):
            if d is None:
                continue
            raise ValueError(
                f"vmap({name}, ...): `{name}` must only return Tensors, got a "
                f"{type(o).__name__} as flattened output {i}. Return it as a Tensor, or set its "
                f"out_dim to None if it is the same for the whole batch."
            )
        if d is not None and not -(o.dim() + 1) <= d <= o.dim():
            # IndexError, as torch.func (torch's own "Dimension out of range" error).
            raise IndexError(
                f"vmap({name}, ..., out_dims={out_dims!r}): Dimension out of range: got "
                f"out_dim={d} for flattened output "
                f"{i}, a Tensor of dimensionality {o.dim()} per batch element, so out_dim must be "
                f"in [{-(o.dim() + 1)}, {o.dim()}]."
            )
    return flat_out, flat_out_dims, out_spec


def _vmap_once(func, flat_args, flat_in_dims, args_spec, batch_size, out_dims, randomness, kwargs):
    level = _C._push_vmap(batch_size, randomness)
    try:
        batched = _C._vmap_wrap_inputs(flat_args, flat_in_dims, level)
        out = call_transformed(func, tree_unflatten(batched, args_spec), kwargs, "vmap")
        return _finish_outputs(func, out_dims, out, level, batch_size)
    finally:
        _C._pop(level)


def _finish_outputs(func, out_dims, out, level, batch_size):
    """Checks the outputs against out_dims and removes this level's batch dims (level live)."""
    flat_out, flat_out_dims, out_spec = _flatten_outputs(func, out_dims, out)
    for i, (o, d) in enumerate(zip(flat_out, flat_out_dims)):
        if d is None and isinstance(o, torch.Tensor) and _C._is_batched_at(o, level):
            raise ValueError(
                f"vmap({_fn_name(func)}, ..., out_dims={out_dims!r}): flattened output {i} "
                f"depends on the mapped inputs, so it needs an int out_dim; out_dims=None is "
                f"only for outputs that are the same for the whole batch."
            )
    tensor_idx = [i for i, o in enumerate(flat_out) if isinstance(o, torch.Tensor)]
    unwrapped = _C._vmap_unwrap_outputs(
        [flat_out[i] for i in tensor_idx],
        [flat_out_dims[i] for i in tensor_idx],
        level,
        batch_size,
    )
    for i, u in zip(tensor_idx, unwrapped):
        flat_out[i] = u
    return flat_out, flat_out_dims, out_spec


def _vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs):
    flat_args, flat_in_dims, args_spec, batch_size = _flatten_inputs(func, in_dims, args)
    if any(d is not None and a.is_nested for a, d in zip(flat_args, flat_in_dims)):
        return _vmap_nested(
            func, flat_args, flat_in_dims, args_spec, batch_size, out_dims, randomness, kwargs
        )
    if chunk_size is None or chunk_size >= batch_size:
        flat_out, _, out_spec = _vmap_once(
            func, flat_args, flat_in_dims, args_spec, batch_size, out_dims, randomness, kwargs
        )
        return tree_unflatten(flat_out, out_spec)
    return _chunked(
        func, flat_args, flat_in_dims, args_spec, batch_size, out_dims, randomness, chunk_size, kwargs
    )


def _rng_replay(randomness):
    """For a vmap run in pieces (chunks, nested components): randomness='same' means one draw for
    the whole batch, so every piece replays the generators' state from before the first; the
    returned function restores it (and does nothing for the other modes)."""
    if randomness != "same":
        return lambda: None
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay():
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return replay


# NOTE [vmap over nested tensors]
# A nested tensor has no size for its ragged dim, so it cannot be the value of a BatchedTensor.
# As torch.func does, vmap maps over its components: the function runs once per component (under
# a vmap level of size 1, so randomness, nested transforms and the error checks behave as in any
# vmap), the other mapped inputs give their slice, and each output becomes a nested tensor of the
# components' outputs, strided as torch.func returns them whatever the input's layout, built with
# as_nested_tensor so that autograd flows through. out_dims must be 0 for those outputs. A loop:
# correct, not fast (torch.func's fallback loops too).
def _vmap_nested(func, flat_args, flat_in_dims, args_spec, batch_size, out_dims, randomness, kwargs):
    parts = [a.unbind() if d is not None and a.is_nested else None for a, d in zip(flat_args, flat_in_dims)]
    replay = _rng_replay(randomness)
    results, dims, spec = [], None, None
    for i in range(batch_size):
        args_i, dims_i = [], []
        for a, d, comp in zip(flat_args, flat_in_dims, parts):
            if comp is not None:
                args_i.append(comp[i].unsqueeze(0))
                dims_i.append(0)
            else:
                args_i.append(a.narrow(d, i, 1) if d is not None else a)
                dims_i.append(d)
        replay()
        flat_out, dims, spec = _vmap_once(func, args_i, dims_i, args_spec, 1, out_dims, randomness, kwargs)
        results.append(flat_out)
    nested_out = _depends_on_nested(
        func, flat_args, flat_in_dims, parts, args_spec, out_dims, randomness, kwargs
    )
    merged = []
    for j, d in enumerate(dims):
        first = results[0][j]
        if d is None or not isinstance(first, torch.Tensor):
            merged.append(first)
            continue
        shapes = {r[j].shape for r in results}
        if not nested_out[j] and len(shapes) == 1:  # as any vmap output
            merged.append(torch.cat([r[j] for r in results], dim=d))
            continue
        if d not in (0, -(first.dim())):
            raise ValueError(
                f"vmap({_fn_name(func)}, ..., out_dims={out_dims!r}): got out_dim={d} for flattened "
                f"output {j}, but vmap over a nested tensor returns nested tensors, which hold their "
                f"components along dim 0 only: use out_dim 0."
            )
        merged.append(torch.nested.as_nested_tensor([r[j].select(0, 0) for r in results]))
    return tree_unflatten(merged, spec)


def _depends_on_nested(func, flat_args, flat_in_dims, parts, args_spec, out_dims, randomness, kwargs):
    """Which outputs depend on a nested input (those are nested tensors; the others are batched
    like any vmap output, as in torch.func): the first component is run once more with the
    nested inputs' components as fresh leaves, and each output's autograd graph is searched for
    them (random draws are redrawn: dependence does not depend on the values)."""
    probes, args0, dims0 = [], [], []
    for a, d, comp in zip(flat_args, flat_in_dims, parts):
        if comp is not None:
            leaf = (
                comp[0]
                .detach()
                .unsqueeze(0)
                .requires_grad_(comp[0].is_floating_point() or comp[0].is_complex())
            )
            probes.append(leaf)
            args0.append(leaf)
            dims0.append(0)
        else:
            args0.append(a.narrow(d, 0, 1) if d is not None else a)
            dims0.append(d)
    with torch.enable_grad():
        flat_out, _, _ = _vmap_once(func, args0, dims0, args_spec, 1, out_dims, randomness, kwargs)
    targets = {id(p) for p in probes if p.requires_grad}

    def reaches(t):
        if not isinstance(t, torch.Tensor):
            return False
        if id(t) in targets:
            return True
        seen, stack = set(), [t.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            var = getattr(fn, "variable", None)  # AccumulateGrad of a leaf
            if var is not None and id(var) in targets:
                return True
            stack.extend(f for f, _ in fn.next_functions)
        return False

    # an integer nested input cannot be a leaf of autograd: its outputs are taken as dependent
    if len(targets) < len(probes):
        return [True] * len(flat_out)
    return [reaches(o) for o in flat_out]


def _chunked(func, flat_args, flat_in_dims, args_spec, batch_size, out_dims, randomness, chunk_size, kwargs):
    starts = range(0, batch_size, chunk_size)
    replay = _rng_replay(randomness)
    results, spec, dims = [], None, None
    for start in starts:
        n = min(chunk_size, batch_size - start)
        chunk_args = [a.narrow(d, start, n) if d is not None else a for a, d in zip(flat_args, flat_in_dims)]
        replay()
        flat_out, dims, spec = _vmap_once(
            func, chunk_args, flat_in_dims, args_spec, n, out_dims, randomness, kwargs
        )
        results.append(flat_out)
    merged = []
    for i, d in enumerate(dims):
        if d is None or not isinstance(results[0][i], torch.Tensor):
            merged.append(results[0][i])
        else:
            merged.append(torch.cat([r[i] for r in results], dim=d))
    return tree_unflatten(merged, spec)
