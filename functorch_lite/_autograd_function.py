"""torch.autograd.Function under functorch_lite's transforms, as torch.func runs it.

autograd.Function.apply sits above the dispatcher, so our levels never see the Function itself,
only the ops of its forward. While our front kernel is active (a transform is running and we are
not inside a grad level's autograd kernels), _guards.py hands apply here, which processes the
Function one level at a time, innermost first, like an op:

- vmap level: the `vmap` staticmethod (info, in_dims, *args) -> (output, out_dims) runs with the
  level hidden, or, with generate_vmap_rule=True, a Function whose forward/setup_context/backward/
  jvp are the original ones under a fresh vmap of the same size (so levels below record this
  Function with a batched backward, not the forward's ops). Neither: torch.func's error.
- grad/jvp level: a single-level Function is applied to the level's wrappers. Its forward runs the
  original Function at the level below; its backward/jvp are the user's, so this level
  differentiates through them (and raises torch's error when the needed one is missing).
When nothing is batched at a vmap level, the Function goes to the level below unchanged.
"""

import torch
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_map_only, tree_unflatten

from . import _rules
from ._load import _C

_EXTENDING = "For more details, please see https://pytorch.org/docs/main/notes/extending.func.html"


def _has_overridden_vmap(cls):
    return cls.vmap is not torch.autograd.Function.vmap


def custom_function_call(cls, args, kwargs):
    level, kind, batch_size, randomness = _C._top_level_info()
    if kind == "vmap":
        return _vmap_call(cls, level, batch_size, randomness, args, kwargs)
    return _single_level_call(cls, level, args, kwargs)


# ---- vmap levels


def _vmap_call(cls, level, batch_size, randomness, args, kwargs):
    if any(isinstance(v, torch.Tensor) for v in tree_flatten(kwargs)[0]):
        raise NotImplementedError(
            f"Run vmap on autograd.Function with kwarg-only Tensor args. Please do not pass "
            f"kwarg-only Tensors to autograd.Function. Got: {kwargs}"
        )
    name = cls.__name__
    if cls.generate_vmap_rule:
        if _has_overridden_vmap(cls):
            raise RuntimeError(
                f"You tried to vmap over {name}, but it has both generate_vmap_rule=True and an "
                f"overridden vmap staticmethod. Please set generate_vmap_rule=False or delete the "
                f"overridden vmap staticmethod to avoid ambiguity. {_EXTENDING}"
            )
        return _generated_vmap_call(cls, level, batch_size, randomness, args)
    if not _has_overridden_vmap(cls):
        raise RuntimeError(
            f"You tried to vmap over {name}, but it does not have vmap support. Please override "
            f"and implement the vmap staticmethod or set generate_vmap_rule=True. {_EXTENDING}"
        )
    unwrapped, in_dims = _rules._unwrap(args, level)
    if all(d is None for d in tree_flatten(in_dims)[0]):
        return _C._call_below(level, lambda: cls.apply(*args, **kwargs))
    info = _rules.VmapInfo(batch_size, randomness)
    result = _C._call_below(level, lambda: cls.vmap(info, in_dims, *unwrapped, **kwargs))
    who = f"The vmap staticmethod of the autograd.Function {name}"
    _rules.check_two_returns(who, result)
    output, out_dims = result
    return _rules._wrap_outputs(who, output, out_dims, unwrapped, args, level, batch_size)


def _restore_vmap(func, in_dims, batch_size, randomness):
    """func under a fresh vmap level of the same size, returning (outputs, out_dims) with the
    batch dims left where func put them (torch.func's restore_vmap)."""

    def inner(*args):
        level = _C._push_vmap(batch_size, randomness)
        try:
            flat, spec = tree_flatten(args)
            flat_dims = _broadcast_to_and_flatten(in_dims, spec)
            batched = _C._vmap_wrap_inputs(flat, flat_dims, level)
            out = func(*tree_unflatten(batched, spec))
            return _rules._unwrap(out, level)
        finally:
            _C._pop(level)

    return inner


def _unpack(outputs):
    out_dims = outputs[-1]
    if isinstance(out_dims, tuple):
        return outputs[:-1], out_dims
    return outputs[0], out_dims


def _generated_vmap_call(cls, level, batch_size, randomness, args):
    unwrapped, in_dims = _rules._unwrap(args, level)
    vmapped = _vmapify(cls, in_dims, batch_size, randomness)
    outputs = _C._call_below(level, lambda: vmapped.apply(*unwrapped))
    outputs, out_dims = _unpack(outputs)
    flat, spec = tree_flatten(outputs)
    flat_dims = _broadcast_to_and_flatten(out_dims, spec)
    wrapped = [
        _C._add_batch_dim(o, d, level) if isinstance(o, torch.Tensor) and d is not None else o
        for o, d in zip(flat, flat_dims)
    ]
    return tree_unflatten(wrapped, spec)


class _WrappedCtx:
    """Forwards everything to the real ctx except the attributes it reserves."""

    _reserved = ("_inner_ctx",)

    def __init__(self, ctx):
        object.__setattr__(self, "_inner_ctx", ctx)

    def __getattr__(self, name):
        return getattr(self._inner_ctx, name)

    def __setattr__(self, name, value):
        if name in type(self)._reserved:
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner_ctx, name, value)


class _CtxWithSavedTensors(_WrappedCtx):
    _reserved = ("_inner_ctx", "_saved")

    def __init__(self, ctx, saved):
        super().__init__(ctx)
        object.__setattr__(self, "_saved", saved)

    @property
    def saved_tensors(self):
        return self._saved


class _CtxCustomSave(_WrappedCtx):
    """Saves the physical tensors of the generated vmap level and remembers their batch dims."""

    _reserved = ("_inner_ctx", "_level", "saved_bdims")

    def __init__(self, ctx, level):
        super().__init__(ctx)
        object.__setattr__(self, "_level", level)
        object.__setattr__(self, "saved_bdims", ())

    def save_for_backward(self, *tensors):
        values, bdims = _rules._unwrap(tensors, self._level)
        self._inner_ctx.save_for_backward(*values)
        object.__setattr__(self, "saved_bdims", bdims)

    def save_for_forward(self, *tensors):
        values, bdims = _rules._unwrap(tensors, self._level)
        self._inner_ctx.save_for_forward(*values)
        object.__setattr__(self, "saved_bdims", bdims)


def _reductify_leaf(grad, grad_bdim, input_bdim, batch_size, input_shape):
    if grad is None:
        return None
    if grad_bdim is None and input_bdim is None:
        return grad
    if input_bdim is None:
        return grad.sum(grad_bdim)
    if grad_bdim is None:
        grad = grad.unsqueeze(input_bdim)
        shape = list(grad.shape)
        shape[input_bdim] = batch_size
        grad = grad.expand(shape)
        grad_bdim = input_bdim
    if input_shape is not None:
        # A gradient broadcast against the input: reduce it per element (autograd cannot, the
        # batch dim is in the way).
        from ._vmap import vmap

        return vmap(torch.Tensor.sum_to_size, in_dims=(grad_bdim, None), out_dims=input_bdim)(
            grad, input_shape
        )
    return grad if grad_bdim == input_bdim else grad.movedim(grad_bdim, input_bdim)


def _reductify(grads, grad_bdims, input_bdims, batch_size, input_shapes=None):
    if not isinstance(grads, tuple):
        grads = (grads,)
    if not isinstance(grad_bdims, tuple):
        grad_bdims = (grad_bdims,)
    if not isinstance(input_bdims, tuple):
        input_bdims = (input_bdims,)
    if input_shapes is None:
        input_shapes = (None,) * len(grads)
    return tuple(
        _reductify_leaf(g, gd, d, batch_size, s)
        for g, gd, d, s in zip(grads, grad_bdims, input_bdims, input_shapes)
    )


def _ctx_dict(ctx, name):
    # Nested generated Functions (vmap of vmap) share one ctx: each keeps its entries under its
    # own class, as torch.func does.
    d = getattr(ctx, name, None)
    if d is None:
        d = {}
        setattr(ctx, name, d)
    return d


def _vmapify(cls, in_dims, batch_size, randomness):
    """torch.func's vmapify_autograd_function: the Function with every staticmethod vmapped."""

    def forward(*operands):
        outputs, out_dims = _restore_vmap(cls.forward, in_dims, batch_size, randomness)(*operands)
        if isinstance(out_dims, tuple):
            # A structseq output (torch.sort's) gives structseq out_dims; the generated
            # Function's outputs are a plain tuple (torch.func fails on this).
            out_dims = tuple(out_dims)
        if isinstance(outputs, torch.Tensor):
            return outputs, out_dims
        return *outputs, out_dims

    def setup_context(ctx, inputs, outputs):
        outputs, out_dims = _unpack(outputs)

        def inner(inputs, outputs):
            wrapped = _CtxCustomSave(ctx, _C._top_level_id())
            cls.setup_context(wrapped, inputs, outputs)
            # Shapes per element, to reduce broadcast gradients to (see _reductify_leaf).
            shapes = tuple(i.shape if isinstance(i, torch.Tensor) else None for i in inputs)
            _ctx_dict(ctx, "_ftl_input_shapes")[id(vmapped)] = shapes
            _ctx_dict(ctx, "_ftl_saved_bdims")[id(vmapped)] = wrapped.saved_bdims

        # Under the vmap, so that what setup_context records (shapes, ...) is per element.
        _restore_vmap(inner, (in_dims, out_dims), batch_size, randomness)(inputs, outputs)
        _ctx_dict(ctx, "_ftl_out_dims")[id(vmapped)] = out_dims

    def jvp(ctx, *tangents):
        def jvp_no_context(saved, tangents):
            return cls.jvp(_CtxWithSavedTensors(ctx, saved), *tangents)

        # One in_dim per argument of the Function; an input without a tangent gets None.
        tangent_dims = tuple(None if t is None else d for d, t in zip(in_dims, tangents))
        out, out_bdims = _restore_vmap(
            jvp_no_context, (ctx._ftl_saved_bdims[id(vmapped)], tangent_dims), batch_size, randomness
        )(ctx.saved_tensors, tangents)
        result = _reductify(out, out_bdims, ctx._ftl_out_dims[id(vmapped)], batch_size)
        return (*result, None)

    def backward(ctx, *grad_outputs):
        grads = grad_outputs[:-1]
        grad_dims = ctx._ftl_out_dims[id(vmapped)]
        if not isinstance(grad_dims, tuple):
            grad_dims = (grad_dims,)
        grad_dims = tuple(d if g is not None else None for g, d in zip(grads, grad_dims))

        def backward_no_context(inputs):
            saved, grads = inputs
            return cls.backward(_CtxWithSavedTensors(ctx, saved), *grads)

        grad_ins, grad_in_dims = _restore_vmap(
            backward_no_context, ((ctx._ftl_saved_bdims[id(vmapped)], grad_dims),), batch_size, randomness
        )((ctx.saved_tensors, grads))
        shapes = ctx._ftl_input_shapes[id(vmapped)]
        return _reductify(grad_ins, grad_in_dims, in_dims, batch_size, shapes)

    vmapped = type(
        f"Vmapped{cls.__name__}",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        },
    )
    return vmapped


# ---- grad and jvp levels


def _is_grad_wrapper_at(t, level):
    info = _C._wrapper_info(t)
    return info is not None and info[0] == "grad" and info[1] == level


def _single_level_call(cls, level, args, kwargs):
    # Lift captured tensors to this level first, as for any op: autograd must not give this
    # level's node edges into an outer level's graph.
    args = tree_map_only(
        torch.Tensor, lambda t: t if _is_grad_wrapper_at(t, level) else _C._wrap_for_grad(t, level), args
    )

    def forward(*operands):
        unwrapped = tree_map_only(torch.Tensor, lambda t: _C._unwrap_for_grad(t, level), operands)
        # apply turned off both gradient modes for this level; the levels below must record.
        with torch.enable_grad(), _set_fwd_grad_enabled(True):
            out = _C._call_below(level, lambda: cls.apply(*unwrapped))
        originals = {id(u): o for u, o in zip(unwrapped, operands) if isinstance(u, torch.Tensor)}
        # An output that is an input (mark_dirty, or returned as is) must stay that object.
        return tree_map_only(
            torch.Tensor,
            lambda o: originals[id(o)] if id(o) in originals else _C._wrap_for_grad(o, level),
            out,
        )

    def setup_context(ctx, inputs, output):
        return cls.setup_context(ctx, inputs, output)

    def backward(ctx, *grads):
        return cls.backward(ctx, *grads)

    def jvp(ctx, *tangents):
        return cls.jvp(ctx, *tangents)

    generated = type(
        f"{cls.__name__}Generated",
        (torch.autograd.function._SingleLevelFunction,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )
    # Applied as torch.func does (its grad_fn is FooGeneratedBackward there too).
    return generated.apply(*args, **kwargs)
