"""ft.linearize: the value of a function and its linear map t -> J t at given primals.

torch.func traces the jvp with make_fx and replays the graph. Here the linear map is the transpose
of the vjp's: vjp_fn(ct) = J^T ct is linear in ct, so the vjp of ct -> vjp_fn(ct) (at any ct,
zeros here) maps a tangent t to J t. Both vjps run once, in linearize; jvp_fn then runs one
backward pass through the graph they recorded, so repeated calls reuse the forward's work, and
jvp_fn composes with vmap (vmap(jvp_fn)(basis) gives Jacobian columns) as any vjp_fn does.

An op whose backward has no derivative of its own (a double backward torch does not implement)
cannot be transposed; jvp_fn then falls back to forward mode (ft.jvp of func at the primals,
running func again per call), which is what torch.func's linearize computes. So does a graph with
a torch.autograd.Function node, whose backward may not be differentiable without saying so.
"""

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._compile import Transformed, _is_compiling, eager
from ._grad import _BindPrimals, _vjp, vjp
from ._jac import jvp


def _differentiable(t):
    return t.is_floating_point() or t.is_complex()


def _check_primals(flat_primals):
    # The exception types and phrases are torch.func's for the same misuse.
    for i, p in enumerate(flat_primals):
        if not isinstance(p, torch.Tensor):
            raise AttributeError(
                f"linearize(func, *primals): primals must be Tensors (or pytrees of Tensors); "
                f"flattened primal {i} is a {type(p).__name__}: '{type(p).__name__}' object has "
                f"no attribute 'new_empty'."
            )
        if not _differentiable(p):
            raise ValueError(
                f"linearize(func, *primals): Expected primal to be floating point or complex, but "
                f"got: {p.dtype} (flattened primal {i})."
            )


def _tangent_checks(flat_tangents, flat_primals):
    for idx, (t, p) in enumerate(zip(flat_tangents, flat_primals)):
        if not isinstance(t, torch.Tensor):
            raise AttributeError(
                f"jvp_fn: tangents must be Tensors; flattened tangent {idx} is a "
                f"{type(t).__name__}: '{type(t).__name__}' object has no attribute 'shape'."
            )
        for what in ("shape", "device", "dtype"):
            got, want = getattr(t, what), getattr(p, what)
            if got != want:
                raise RuntimeError(
                    f"tangent:{idx} with {what} {got} in flattened pytree doesn't match the "
                    f"{what} {want} of the corresponding primal."
                )


_NOT_IMPLEMENTED = "not implemented"


def _has_custom_function(outputs):
    """Whether the autograd graph of outputs has a node of a torch.autograd.Function. Its backward
    may be non-differentiable (once_differentiable, or computed outside autograd) without saying
    so: transposing it would give zero silently, so linearize uses forward mode (its jvp
    staticmethod, as torch.func does) instead."""
    seen, stack = set(), [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def linearize(func, *primals):
    """Returns ``(func(*primals), jvp_fn)``, ``jvp_fn(*tangents)`` being the jvp of func at primals.

    As torch.func.linearize: tangents have the structure, shapes, dtypes and devices of the
    primals; jvp_fn may be called many times and composes with vmap. Outputs of func that are not
    floating-point or complex Tensors get zero tangents (non-Tensors are returned as they are).

    Example:
        >>> import torch, functorch_lite as ft
        >>> x = torch.tensor([0.0, 1.0, 2.0])
        >>> out, jvp_fn = ft.linearize(torch.sin, x)
        >>> torch.allclose(jvp_fn(torch.ones(3)), torch.cos(x))  # reusable: one backward each
        True
        >>> ft.vmap(jvp_fn)(torch.eye(3)).shape  # the Jacobian's columns
        torch.Size([3, 3])
    """
    if _is_compiling():  # NOTE [vjp and linearize under torch.compile] in _grad.py
        return _linearize_value_of(func)(*primals), _RecordedJvpFn(func, primals)
    return _linearize(func, *primals)


def _linearize_value_of(func):
    def run(args, kwargs):
        return _linearize(func, *args)[0]

    return Transformed(_linearize_value_of, (), func, run, wraps=False)


class _RecordedJvpFn:
    """jvp_fn of a linearize traced by Dynamo: each call is one recorded jvp at the primals."""

    def __init__(self, func, primals):
        self.func, self.primals = func, primals

    def __call__(self, *tangents):
        return _jvp_tangent_of(self.func)(self.primals, tangents)

    def _ft_vmap_recorded(self, in_dims, out_dims, randomness, chunk_size):
        """vmap(jvp_fn): one recorded vmap over the tangents of the recorded jvp."""
        from ._vmap import vmap

        d = tuple(in_dims) if isinstance(in_dims, list) else in_dims
        mapped = vmap(_jvp_tangent_of(self.func), (None, d), out_dims, randomness, chunk_size=chunk_size)
        return _BindPrimals(lambda primals, *tangents: mapped(primals, tangents), self.primals)


def _jvp_tangent_of(func):
    def run(args, kwargs):
        primals, tangents = args
        return jvp(func, primals, tangents)[1]

    return Transformed(_jvp_tangent_of, (), func, run, wraps=False)


@eager
def _linearize(func, *primals):
    flat_primals, primals_spec = tree_flatten(primals)
    _check_primals(flat_primals)
    meta = {}

    def tensor_outputs(*args):
        out = func(*args)
        leaves, meta["spec"] = tree_flatten(out)
        meta["is_tensor"] = [isinstance(x, torch.Tensor) for x in leaves]
        meta["others"] = [None if isinstance(x, torch.Tensor) else x for x in leaves]
        tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
        meta.setdefault("custom", _has_custom_function(tensors))
        return tensors

    if flat_primals:
        outs, vjp_fn = _vjp(tensor_outputs, primals, False, int_outputs=True)
    else:
        outs, vjp_fn = tensor_outputs(), None
    diff = [i for i, o in enumerate(outs) if _differentiable(o)]
    state = {"forward": meta.get("custom", False)}
    if not flat_primals or not diff or state["forward"]:
        transpose_vjp = None
    else:

        def transpose(*diff_cotangents):
            cts = [torch.zeros_like(o) for o in outs]
            for i, c in zip(diff, diff_cotangents):
                cts[i] = c
            return vjp_fn(tuple(cts))

        transpose_vjp = vjp(transpose, *(torch.zeros_like(outs[i]) for i in diff))[1]

    def assemble(diff_tangents):
        tangents = [torch.zeros_like(o) for o in outs]
        for i, t in zip(diff, diff_tangents):
            tangents[i] = t
        return _rebuild(tangents, meta)

    def forward_mode(tangents):
        # func again, in forward mode (jvp's own tangent checks were done by jvp_fn).
        out = jvp(tensor_outputs, primals, tangents)[1]
        return [out[i] for i in diff]

    def jvp_fn(*tangents):
        flat_tangents, tangents_spec = tree_flatten(tangents)
        if tangents_spec != primals_spec:
            raise RuntimeError(
                f"Expected the tangents {tangents_spec} to have the same argspec as the primals "
                f"{primals_spec}"
            )
        _tangent_checks(flat_tangents, flat_primals)
        if not diff or not flat_primals:
            return assemble([])
        if not state["forward"]:
            try:
                return assemble(transpose_vjp(tangents))
            except (RuntimeError, NotImplementedError) as e:
                if _NOT_IMPLEMENTED not in str(e):
                    raise
                state["forward"] = True
        return assemble(forward_mode(tangents))

    return _rebuild(outs, meta), eager(jvp_fn)


def _rebuild(tensors, meta):
    """func's output structure, with `tensors` for its Tensor leaves."""
    it = iter(tensors)
    leaves = [next(it) if is_t else other for is_t, other in zip(meta["is_tensor"], meta["others"])]
    return tree_unflatten(leaves, meta["spec"])
