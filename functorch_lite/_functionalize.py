"""functionalize: run a function with its mutations (and, optionally, its views) removed.

NOTE [functionalize on torch's functional tensors]
The inputs are wrapped in torch's own functional tensors (torch._to_functional_tensor) and the
Functionalize dispatch key is switched on for the call: every in-place or out= op then runs as
its out-of-place version on the wrapped values, and views are replayed from their bases
(remove="mutations") or become *_copy ops (remove="mutations_and_views"). After the call the
outputs are synced and unwrapped, and an input the function wrote into gets the new value
copied back, so the caller sees the mutation as in eager mode. Our transforms compose with it in
both orders: inside functionalize, ft.vmap/grad wrap functional tensors like any tensor; around
it, the functional wrappers hold our wrappers, and our front kernel lets such a foreign wrapper
go first (NOTE [Foreign wrappers of our tensors] in csrc/core/dispatch.h), so functionalization
turns the op functional before our level sees it. Forward mode inside it needs three more
things, each a NOTE of its own: the mode stays off our wrappers while autograd runs on them
([Functionalize entered inside a level], csrc/core/levels.h), a functional wrapper whose value
became ours in place is still seen as ours ([Functional wrappers with stale keys],
csrc/core/dispatch.h), and tangents are functional like their primals ([Tangents inside
functionalize], _jac.py). torch's functionalization runs each in-place
op on meta copies first (to check shapes); our grad levels let those through (they hold no data).
Only torch's public functional-tensor API is used. Functionalization is one mode per thread:
functionalize inside functionalize calls the inner function as it is (the outer one already
removes its mutations).
"""

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._load import _C

_REMOVE = ("mutations", "mutations_and_views")
_CAPTURED_WRITE = (
    "functionalize(f): f wrote a value computed inside functionalize in place into a tensor from "
    "outside it (one f captures rather than receives as an argument). functionalize carries "
    "in-place changes back only to f's arguments: pass that tensor to f as an argument, or write "
    "into a copy of it."
)


def _active():
    return torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.Functionalize)


def _functionalizing():
    """Whether functionalization is on for the ops this thread calls now (active, and not
    excluded by functionalization's own kernel)."""
    return _active() and not torch._C._dispatch_tls_is_dispatch_key_excluded(
        torch._C.DispatchKey.Functionalize
    )


def functionalize(func, *, remove="mutations"):
    """Returns ``func`` with its mutations removed, as ``torch.func.functionalize``: the same
    values, but tracing it (``make_fx``, ``torch.compile``) sees only out-of-place ops; with
    ``remove="mutations_and_views"`` views become ``*_copy`` ops too.

    Args:
        func: a function of tensors (or pytrees of tensors).
        remove: ``"mutations"`` or ``"mutations_and_views"``.

    Returns:
        A function with the signature of ``func``. Inputs that ``func`` writes into are updated,
        as when ``func`` runs as it is. Composes with every transform, in both orders.

    Example:
        >>> import torch, functorch_lite as ft
        >>> from functorch_lite.func import functionalize
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> def f(x):
        ...     y = x.clone()
        ...     y.add_(1)  # an in-place op
        ...     return y.view(-1)
        >>> code = make_fx(functionalize(f, remove="mutations_and_views"))(torch.ones(2, 2)).code
        >>> "add_" in code, "aten.add.Tensor" in code, "view_copy" in code
        (False, True, True)
        >>> ft.vmap(functionalize(f))(torch.zeros(3, 2, 2)).shape
        torch.Size([3, 4])
    """
    if remove not in _REMOVE:
        raise RuntimeError(
            f"functionalize(f, remove=...): remove must be 'mutations' (in-place and out= ops "
            f"become out-of-place) or 'mutations_and_views' (views become *_copy ops too), got "
            f"{remove!r}."
        )
    reapply_views = remove == "mutations"

    def run(flat, spec, write_back=True):
        wrapped = [torch._to_functional_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
        fargs, fkwargs = tree_unflatten(wrapped, spec)
        torch._enable_functionalization(reapply_views=reapply_views)
        # autograd regenerates an updated view by replaying its view ops, not as_strided, which
        # functionalization refuses (forward AD writing the tangent of a view: z[..., 0] = v
        # under jacfwd); the Functionalize key on functional tensors asks for it, but our grad
        # wrappers of them do not carry it (NOTE [Dispatch keys of our tensors])
        replay = torch._C._is_view_replay_enabled()
        torch._C._set_view_replay_enabled(True)
        try:
            out = func(*fargs, **fkwargs)
        except RuntimeError as e:
            if "mutating a non-functional tensor with a functional tensor" not in str(e):
                raise
            # torch's internal assert, for a captured tensor written in place (tangents of our
            # forward-mode levels are made functional: NOTE [Tangents inside functionalize])
            raise RuntimeError(_CAPTURED_WRITE) from None
        finally:
            torch._C._set_view_replay_enabled(replay)
            torch._disable_functionalization()
        for i, (x, w) in enumerate(zip(flat, wrapped)):
            if isinstance(x, torch.Tensor) and torch._is_functional_tensor(w):
                _write_back(x, w, i, write_back)
        return tree_map(_unwrap, out)

    def functionalized(*args, **kwargs):
        if _active():  # inside another functionalize: its mode already removes the mutations
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        diff = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]
        if diff and torch.is_grad_enabled() and not _C._stack_depth():
            return _through_vjp(run, flat, spec, diff)
        return run(flat, spec)

    functionalized.__wrapped__ = func
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        if hasattr(func, attr):
            try:
                setattr(functionalized, attr, getattr(func, attr))
            except (AttributeError, TypeError):
                pass
    return functionalized


def _unwrap(x):
    if isinstance(x, torch.Tensor) and torch._is_functional_tensor(x):
        torch._sync(x)
        return torch._from_functional_tensor(x)
    return x


def _through_vjp(run, flat, spec, diff):
    """torch.autograd through a functionalized call (inputs that require grad, outside our
    transforms): the functional wrappers record no graph of their own, so the call runs under our
    vjp, and an autograd.Function hands its vjp_fn to torch's backward (double backward too)."""
    from ._grad import vjp

    def inner(*values):
        f = list(flat)
        for i, v in zip(diff, values):
            f[i] = v
        return run(f, spec, write_back=False)

    outs, vjp_fn = vjp(inner, *[flat[i].detach() for i in diff])
    flat_out, out_spec = tree_flatten(outs)
    if not all(isinstance(o, torch.Tensor) for o in flat_out):
        raise RuntimeError("functionalize(f): f must return tensors (or pytrees of tensors).")
    got = _VjpFunction.apply(vjp_fn, out_spec, len(diff), *[flat[i] for i in diff], *flat_out)
    return tree_unflatten(list(got), out_spec)


class _VjpFunction(torch.autograd.Function):
    @staticmethod
    def forward(vjp_fn, out_spec, n, *inputs_then_outputs):
        return tuple(o.detach().clone() for o in inputs_then_outputs[n:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.vjp_fn, ctx.out_spec, ctx.n = inputs[0], inputs[1], inputs[2]
        ctx.outs = inputs[3 + inputs[2] :]

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "functionalize(f): a second derivative through torch.autograd (create_graph=True) "
                "is not supported here; differentiate with functorch_lite's transforms around "
                "functionalize instead (ft.hessian, ft.grad(ft.grad(...)), which compose with it)."
            )
        cts = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, ctx.outs)]
        gs = ctx.vjp_fn(tree_unflatten(cts, ctx.out_spec))
        return (None, None, None, *gs, *([None] * len(ctx.outs)))


def _write_back(original, wrapped, index, allowed=True):
    """An input the function mutated gets its new value (as in eager mode)."""
    torch._sync(wrapped)
    if not allowed and (
        torch._functionalize_has_data_mutation(wrapped) or torch._functionalize_has_metadata_mutation(wrapped)
    ):
        raise RuntimeError(
            f"functionalize(f): f writes into its input {index} while torch.autograd records the "
            f"call (an input requires grad): the new value cannot be carried back to the caller "
            f"there. Write into a copy, or call f outside autograd (torch.no_grad())."
        )
    if torch._functionalize_has_metadata_mutation(wrapped):
        raise RuntimeError(
            "functionalize(f): f changed the shape or strides of one of its inputs in place "
            "(resize_, transpose_, ...); only changes of an input's values can be carried back "
            "to the caller. Change a copy of the input instead."
        )
    if torch._functionalize_has_data_mutation(wrapped):
        new = torch._from_functional_tensor(wrapped)
        if new is not original:
            original.copy_(new)
