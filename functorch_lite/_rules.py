"""Batching rules written in Python: ft.register_vmap, and the rules users gave
torch.library.register_vmap (NOTE [User batching rules] in csrc/vmap/fallback.h).

Only ops that have such a rule are routed here by the C++ boxed path, so ops without one keep
their C++ rule or the for-loop fallback at unchanged cost. A rule has torch.library.register_vmap's
signature, rule(info, in_dims, *args, **kwargs) -> (output, out_dims), and runs at the level below
the vmap level that met the op, as a C++ batching rule does.
"""

import gc
from typing import NamedTuple

import torch
import torch.library
from torch._library import custom_ops as _custom_ops
from torch._library import utils as _library_utils
from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_unflatten

from ._load import _C


class VmapInfo(NamedTuple):
    """The `info` argument of a vmap rule (torch.func's VmapInfo)."""

    batch_size: int
    randomness: str


# op name ("ns::op" or "ns::op.overload", as the dispatcher prints it) -> (OpOverload, rule)
_ft_rules = {}
# Rules given to torch.library.register_vmap for ops that are not torch.library.custom_ops (those
# keep theirs on CustomOpDef._vmap_fn, read at call time).
_torch_rules = {}


def _resolve(op, api):
    if isinstance(op, _custom_ops.CustomOpDef):
        return op._opoverload
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op.default
    if isinstance(op, torch._ops.OpOverload):
        return op
    if isinstance(op, str):
        if "::" not in op:
            raise ValueError(f"{api}(op): expected op as 'namespace::name[.overload]', got {op!r}.")
        try:
            return _library_utils.lookup_op(op)
        except (AttributeError, RuntimeError) as e:
            raise ValueError(f"{api}(op): there is no operator {op!r}.") from e
    raise TypeError(
        f"{api}(op): expected an OpOverload, an OpOverloadPacket, a 'namespace::name' string or a "
        f"torch.library.custom_op, got {type(op).__name__}."
    )


def _name(opov):
    schema = opov._schema
    return schema.name + (f".{schema.overload_name}" if schema.overload_name else "")


def register_vmap(op, func=None, /):
    """Registers a batching rule for `op` under functorch_lite.vmap (torch.library.register_vmap's
    signature; also usable as a decorator).

    op: an OpOverload (torch.ops.ns.name.overload), an OpOverloadPacket (its default overload), a
      "ns::name[.overload]" string, or a torch.library.custom_op.
    ``func(info, in_dims, *args, **kwargs) -> (output, out_dims)``: `in_dims` has one entry per
      positional argument (a list for a Tensor[] argument): the batch dim of that tensor, or None.
      `info.batch_size` and `info.randomness` describe the vmap. It runs with the vmap level
      removed, on the plain (or outer-level) tensors, and returns the op's output with one out_dim
      per output (int, or None for an output without the batch dim).

    The rule wins over functorch_lite's own C++ rule and over the for-loop fallback; it is called
    only when something is batched at the vmap level. At grad/jvp levels the op's autograd
    formula runs as usual. Returns func. See docs/extending.md.

    Example:
        >>> import torch, functorch_lite as ft
        >>> @torch.library.custom_op("doc_example::twice", mutates_args=())
        ... def twice(x: torch.Tensor) -> torch.Tensor:
        ...     return x * 2
        >>> @ft.register_vmap(twice)
        ... def twice_rule(info, in_dims, x):
        ...     return twice(x), in_dims[0]  # elementwise: the batch dim stays where it is
        >>> ft.vmap(twice)(torch.ones(4, 3)).shape
        torch.Size([4, 3])
    """
    opov = _resolve(op, "register_vmap")
    if _library_utils.has_kwarg_only_tensors(opov._schema):
        raise NotImplementedError(
            f"register_vmap with kwarg-only Tensor args. In the original definition of the op, "
            f"please make your tensors not kwarg-only. Got: {opov._schema}"
        )

    def register(func):
        if not callable(func):
            raise TypeError(f"register_vmap({_name(opov)}): the rule must be callable, got {func!r}.")
        name = _name(opov)
        _ft_rules[name] = (opov, func)
        _C._add_user_rule_op(name)
        return func

    return register if func is None else register(func)


def deregister_vmap(op):
    """Removes the rule ft.register_vmap gave `op` (a rule torch.library.register_vmap gave it,
    if any, applies again)."""
    opov = _resolve(op, "deregister_vmap")
    name = _name(opov)
    _ft_rules.pop(name, None)
    if _lookup(name) is None:
        _C._remove_user_rule_op(name)


def _lookup(name):
    entry = _ft_rules.get(name)
    if entry is not None:
        return entry
    entry = _torch_rules.get(name)
    if entry is not None:
        return entry
    opdef = _custom_ops.OPDEFS.get(name)
    if opdef is not None and opdef._vmap_fn is not None:
        return opdef._opoverload, opdef._vmap_fn
    return None


def _unwrap(args, level):
    flat, spec = tree_flatten(args)
    values, dims = [], []
    for a in flat:
        if isinstance(a, torch.Tensor):
            v, d = _C._unwrap_batched(a, level)
        else:
            v, d = a, None
        values.append(v)
        dims.append(d)
    return tree_unflatten(values, spec), tree_unflatten(dims, spec)


def _wrap_outputs(who, output, out_dims, unwrapped_inputs, orig_inputs, level, batch_size):
    """Adds this level's batch dim to `output` along `out_dims`; an output that is one of the
    unwrapped inputs (an in-place op, mark_dirty) is given back as the original input object."""
    originals = {
        id(u): o
        for u, o in zip(tree_flatten(unwrapped_inputs)[0], tree_flatten(orig_inputs)[0])
        if isinstance(u, torch.Tensor)
    }
    flat_out, spec = tree_flatten(output)
    flat_dims = _broadcast_to_and_flatten(out_dims, spec)
    if flat_dims is None:
        raise RuntimeError(
            f"{who} returned an incompatible (output, out_dims) tuple. Expected out_dims={out_dims} "
            f"to be compatible with the structure of `output`. out_dims has structure "
            f"{tree_flatten(out_dims)[1]} but output has structure {spec}. For more details, "
            f"please see https://pytorch.org/docs/main/notes/extending.func.html"
        )
    result = []
    for i, (o, d) in enumerate(zip(flat_out, flat_dims)):
        if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
            raise RuntimeError(f"{who} returned out_dims={out_dims!r}: every out_dim must be an int or None.")
        if not isinstance(o, torch.Tensor):
            result.append(o)
            continue
        if id(o) in originals:
            result.append(originals[id(o)])
            continue
        if d is None:
            result.append(o)
            continue
        if not -o.dim() <= d < o.dim():
            raise RuntimeError(
                f"{who} returned out_dim={d} for output {i}, a tensor with {o.dim()} dims (the "
                f"batch dim included), so out_dim must be in [{-o.dim()}, {o.dim()})."
            )
        d = d % o.dim()
        if o.size(d) != batch_size:
            raise RuntimeError(
                f"{who} returned output {i} of shape {tuple(o.shape)} with out_dim={d}, but its "
                f"size there must be the batch size {batch_size}."
            )
        result.append(_C._add_batch_dim(o, d, level))
    return tree_unflatten(result, spec)


def check_two_returns(who, result):
    base = (
        f"{who} must return (output, out_dims): Expected the vmap staticmethod to have two returns, "
        f"an output and out_dims with pytree structure compatible with the output. "
    )
    if not isinstance(result, tuple):
        raise RuntimeError(base + f"Got a {type(result)} instead")
    if len(result) != 2:
        raise RuntimeError(base + f"Got {len(result)} returns instead")


def _check_output_arity(who, opov, output):
    n = len(opov._schema.returns)
    if n == 0:
        ok = output is None or (isinstance(output, tuple) and not output)
        want = "None"
    elif n == 1:
        ok = not isinstance(output, tuple)
        want = "one output (not a tuple)"
    else:
        ok = isinstance(output, (tuple, list)) and len(output) == n
        want = f"a tuple of {n} outputs"
    if ok:
        outs = (output,) if n == 1 else tuple(output) if n else ()
        for r, o in zip(opov._schema.returns, outs):
            if isinstance(r.type, torch._C.TensorType) and not isinstance(o, torch.Tensor):
                ok, want = False, f"a Tensor for the return '{r.name or r.type}'"
    if not ok:
        raise RuntimeError(
            f"{who} returned an output that does not match the op's schema ({opov._schema}): "
            f"expected {want}, got {type(output).__name__}"
            f"{f' of length {len(output)}' if isinstance(output, (tuple, list)) else ''}."
        )


def _run_rule(name, args, kwargs, level, batch_size, randomness):
    entry = _lookup(name)
    if entry is None:
        return NotImplemented
    opov, rule = entry
    who = f"functorch_lite.vmap: the vmap rule registered for {name}"
    unwrapped, in_dims = _unwrap(tuple(args), level)
    info = VmapInfo(batch_size, randomness)
    result = _C._call_below(level, lambda: rule(info, in_dims, *unwrapped, **kwargs))
    check_two_returns(who, result)
    output, out_dims = result
    _check_output_arity(who, opov, output)
    if not opov._schema.returns:
        return None
    return _wrap_outputs(who, output, out_dims, unwrapped, tuple(args), level, batch_size)


# ---- rules given to torch.library.register_vmap


def _note_torch_rule(op, func):
    opov = _resolve(op, "register_vmap")
    name = _name(opov)
    if not isinstance(op, _custom_ops.CustomOpDef) and name not in _custom_ops.OPDEFS:
        _torch_rules[name] = (opov, func)
    _C._add_user_rule_op(name)


_torch_register_vmap = torch.library.register_vmap
_custom_register_vmap = _custom_ops.CustomOpDef.register_vmap


def _patched_register_vmap(op, func=None, /, *, lib=None):
    out = _torch_register_vmap(op, func, lib=lib)
    if func is not None:
        _note_torch_rule(op, func)
        return out

    def register(f):
        r = out(f)
        _note_torch_rule(op, f)
        return r

    return register


def _patched_custom_register_vmap(self, func=None):
    out = _custom_register_vmap(self, func)
    if func is not None:
        _C._add_user_rule_op(_name(self._opoverload))
        return out

    def register(f):
        r = out(f)
        _C._add_user_rule_op(_name(self._opoverload))
        return r

    return register


def _scan_existing_torch_rules():
    """Rules registered with torch before functorch_lite was imported."""
    for name, opdef in list(_custom_ops.OPDEFS.items()):
        if opdef._vmap_fn is not None:
            _C._add_user_rule_op(name)
    # torch.library.register_vmap on other ops keeps the rule only in a closure handed to the
    # dispatcher as a FuncTorchBatched kernel; torch.library records which ops got Python kernels
    # there, and the closures are found among live objects only when there is one.
    if not any(k.endswith("/FuncTorchBatched") for k in torch.library._impls):
        return
    for obj in gc.get_objects():
        if (
            type(obj) is type(_scan_existing_torch_rules)
            and obj.__module__ == "torch.library"
            and obj.__qualname__ == "register_vmap.<locals>.register.<locals>.wrapped_func"
        ):
            cells = dict(zip(obj.__code__.co_freevars, (c.cell_contents for c in obj.__closure__)))
            opov, func = cells.get("op_overload"), cells.get("func")
            if isinstance(opov, torch._ops.OpOverload) and callable(func):
                _torch_rules.setdefault(_name(opov), (opov, func))
                _C._add_user_rule_op(_name(opov))


def install():
    if torch.library.register_vmap is not _patched_register_vmap:
        _C._set_user_rule_callback(_run_rule)
        _scan_existing_torch_rules()
        torch.library.register_vmap = _patched_register_vmap
        _custom_ops.CustomOpDef.register_vmap = _patched_custom_register_vmap
