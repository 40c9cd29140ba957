"""ft.jvp (forward-mode levels), and the Jacobian builders jacrev, jacfwd, hessian.

jvp levels run torch's own forward-mode AD formulas on our wrappers. torch allows one forward-AD
(dual) level at a time; as each of our jvp levels has its own wrappers, all of them can share
torch's dual level: it is entered by the outermost jvp and left when that one returns.
"""

import functools
import threading

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._call import call_transformed
from ._compile import Transformed, call_eagerly, eager, skip_wrappers
from ._functionalize import _functionalizing
from ._grad import _check_differentiable, _normalize_argnums, _refuse_sparse, _split_aux, vjp
from ._levels import _batched_like
from ._load import _C
from ._vmap import vmap

_state = threading.local()


def _jvp_nesting():
    return getattr(_state, "jvp_nesting", 0)


_decompositions_loaded = False


class _DualLevel:
    """Enters torch's dual level for the outermost jvp of this thread only. torch's dual levels
    are process-wide (a second enter_dual_level raises "Nested forward mode AD is not supported"
    even on another thread), so concurrent threads share one, entered by the first and exited by
    the last; tangents live on each thread's own tensors, so sharing mixes nothing."""

    def __enter__(self):
        global _decompositions_loaded
        if not _decompositions_loaded:
            # fwAD.make_dual does this on every call; jvp calls torch._make_dual directly (it
            # skips that and an export-mode lookup, ~3 us per tensor), so it loads them once.
            # Without them, forward AD of ops that rely on jvp decompositions would fail.
            fwAD._maybe_load_decompositions()
            _decompositions_loaded = True
        self.outer = _jvp_nesting() == 0
        _state.jvp_nesting = _jvp_nesting() + 1
        if self.outer:
            with _shared_lock:
                if _shared["users"] == 0:
                    try:
                        _shared["level"] = fwAD.enter_dual_level()
                    except Exception:
                        _state.jvp_nesting -= 1
                        raise
                _shared["users"] += 1
                self.level = _state.dual_level = _shared["level"]
        else:
            self.level = _state.dual_level
        return self

    def __exit__(self, *exc):
        _state.jvp_nesting -= 1
        if self.outer:
            with _shared_lock:
                _shared["users"] -= 1
                if _shared["users"] == 0:
                    fwAD.exit_dual_level(level=self.level)
        return False


# The dual level shared by the outermost jvps of all threads, and how many are inside it.
_shared_lock = threading.Lock()
_shared = {"users": 0, "level": None}


def _check_tuple(x, what, api):
    if not isinstance(x, tuple):
        raise RuntimeError(
            f"{api}(f, primals, tangents): Expected {what} to be a tuple (f is called as "
            f"f(*primals)), got {type(x).__name__}."
        )


def jvp(func, primals, tangents, *, strict=False, has_aux=False):
    """Jacobian-vector product (forward mode): returns ``(func(*primals), J @ tangents)``, or with
    ``has_aux=True`` ``(func(*primals), J @ tangents, aux)``.

    Args:
        func: a function of the primals returning a tensor or a pytree of tensors (or
            ``(output, aux)`` with ``has_aux=True``).
        primals: a tuple of the arguments of ``func`` (tensors or pytrees of tensors).
        tangents: a tuple of the same structure, shapes and dtypes as ``primals``.
        strict: raise if an output does not depend on the inputs (default: its tangent is zeros).
        has_aux: ``func`` returns ``(output, aux)``; ``aux`` is returned, not differentiated.

    Example:
        >>> import torch, functorch_lite as ft
        >>> x = torch.tensor([1.0, 2.0, 3.0])
        >>> out, tangent_out = ft.jvp(lambda x: x**2, (x,), (torch.ones(3),))
        >>> tangent_out
        tensor([2., 4., 6.])
        >>> f = lambda x: x.sin().sum()
        >>> _, hvp = ft.jvp(ft.grad(f), (x,), (torch.ones(3),))  # Hessian-vector product
        >>> torch.allclose(hvp, -x.sin())
        True
    """
    return _jvp_of(func, strict=strict, has_aux=has_aux)(primals, tangents)


def _jvp_of(func, strict, has_aux):
    """jvp as a Transformed of (primals, tangents), so that torch.compile records it as one
    call (NOTE [Dynamo sees a transform call as one opaque call])."""

    def run(args, kwargs):
        return _jvp(func, *args, strict=strict, has_aux=has_aux)

    return Transformed(_jvp_of, (("strict", strict), ("has_aux", has_aux)), func, run, wraps=False)


@eager
def _jvp(func, primals, tangents, *, strict=False, has_aux=False):
    api = "jvp"
    _check_tuple(primals, "primals", api)
    _check_tuple(tangents, "tangents", api)
    if not tree_flatten(primals)[0]:
        raise RuntimeError("jvp(f, primals, tangents): Expected primals to contain at least one Tensor.")
    flat_p, p_spec = tree_flatten(primals)
    flat_t, t_spec = tree_flatten(tangents)
    if p_spec != t_spec:
        raise RuntimeError(
            f"jvp(f, primals, tangents): Expected primals and tangents to have the same python "
            f"structure, got {p_spec} and {t_spec}."
        )
    for i, (p, t) in enumerate(zip(flat_p, flat_t)):
        if not isinstance(p, torch.Tensor) or not isinstance(t, torch.Tensor):
            raise RuntimeError(
                f"jvp(f, primals, tangents): primals and tangents must be Tensors or pytrees of "
                f"Tensors; entry {i} is a {type(p).__name__} / {type(t).__name__}."
            )
        if p.is_nested:
            raise RuntimeError(
                f"jvp(f, primals, tangents): primal {i} is a nested tensor (torch.nested, "
                f"layout={p.layout}), which functorch_lite's transforms do not support (a known "
                f"limitation). Use its components (p.unbind()) or a padded dense tensor."
            )
        _refuse_sparse("jvp(f, primals, tangents)", p, f"primal {i}")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(
                f"jvp(f, primals, tangents): primal {i} must be a floating-point or complex "
                f"Tensor, got dtype {p.dtype}."
            )
        if not (t.is_floating_point() or t.is_complex()):
            # torch's forward AD would stop at an internal assert.
            raise ValueError(
                f"jvp(f, primals, tangents): Expected tangent to be floating point or complex, "
                f"but tangent {i} has dtype {t.dtype}."
            )
        if p.shape != t.shape:
            raise RuntimeError(
                f"jvp(f, primals, tangents): primal {i} has shape {tuple(p.shape)} but its "
                f"tangent has shape {tuple(t.shape)}; they must match."
            )
    # A tangent of another floating dtype is kept (torch's forward AD accepts it, as torch.func
    # does); a complex tangent of a real primal is cast to the primal's dtype, as torch.func's is.
    flat_t = [t.to(p.dtype) if t.is_complex() and not p.is_complex() else t for p, t in zip(flat_p, flat_t)]
    flat_t = [_batched_like(p, t) for p, t in zip(flat_p, flat_t)]
    if _functionalizing():
        # NOTE [Tangents inside functionalize]: forward AD writes the tangent of a primal that f
        # changes in place. Inside functionalize the primals are functional tensors and so is
        # everything computed from them; a plain tangent from outside would be written with a
        # functional value, which torch's functionalization refuses. It becomes functional too
        # (and so is not written in place: the caller's tensor keeps its value).
        flat_t = [
            torch._to_functional_tensor(t)
            if not torch._is_functional_tensor(t) and _C._wrapper_info(t) is None
            else t
            for t in flat_t
        ]
    with _DualLevel() as dual:
        dual_level = dual.level
        level = _C._push_jvp()
        try:
            with fwAD._set_fwd_grad_enabled(True):
                duals = [
                    torch._make_dual(
                        _C._wrap_for_grad(p, level), _C._wrap_for_grad(t, level), level=dual_level
                    )
                    for p, t in zip(flat_p, flat_t)
                ]
                result = call_transformed(func, tree_unflatten(duals, p_spec), {}, api)
                output, aux = _split_aux(result, has_aux, api)
                flat_out, out_spec = tree_flatten(output)
                if not flat_out:
                    raise RuntimeError(
                        f"jvp(f, primals, tangents): f(*primals) returned an empty output "
                        f"({type(output).__name__} with no tensors): there is nothing to push "
                        f"the tangents to."
                    )
                primals_out, tangents_out = [], []
                for o in flat_out:
                    if not isinstance(o, torch.Tensor):
                        raise RuntimeError(
                            f"jvp(f, primals, tangents): expected f(*primals) to return only "
                            f"tensors (a Tensor or a pytree of Tensors), got a "
                            f"{type(o).__name__} in its output."
                        )
                    primal, tangent = torch._unpack_dual(o, level=dual_level)
                    if tangent is None and strict:
                        raise RuntimeError(
                            "jvp(f, primals, tangents, strict=True): The output of f is "
                            "independent of the inputs. This is not allowed with strict=True."
                        )
                    if tangent is None:
                        tangent = torch.zeros_like(primal)
                    primals_out.append(_C._unwrap_for_grad(primal, level))
                    tangents_out.append(_C._unwrap_for_grad(tangent, level))
                if has_aux:
                    aux = tree_map(
                        lambda x: _C._unwrap_for_grad(x, level) if isinstance(x, torch.Tensor) else x, aux
                    )
        finally:
            _C._pop(level)
    out = (tree_unflatten(primals_out, out_spec), tree_unflatten(tangents_out, out_spec))
    return (*out, aux) if has_aux else out


def _own_args(args, idx, diff):
    """args with the differentiated ones (at idx) replaced by diff, and the others' tensors
    wrapped at the vjp/jvp level the function now runs in.

    As in torch.func, every argument of a jacrev/jacfwd'd function belongs to the transform, not
    only the differentiated ones: writing into a non-differentiated argument in place (an output
    buffer, say) is then allowed, where a captured tensor would be refused.
    """
    level = _C._top_level_id()
    own = [
        tree_map(lambda x: _C._wrap_for_grad(x, level) if isinstance(x, torch.Tensor) else x, a)
        if i not in idx
        else a
        for i, a in enumerate(args)
    ]
    return _replace_args(own, idx, diff)


def _replace_args(args, idx, values):
    new = list(args)
    for i, v in zip(idx, values):
        new[i] = v
    return new


def _check_chunk_size(chunk_size, api):
    # torch.func: TypeError for a chunk_size that is not an int, ValueError for one <= 0.
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{api}: chunk_size must be None or a positive int, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(
            f"{api}: chunk_size should be None or greater than 0 (a positive int), got {chunk_size!r}"
        )


def _basis(flat, total):
    """For each tensor t in flat, a [total, *t.shape] slice of the identity: together they are
    the standard basis of the concatenated flattened tensors. The identity is zeros with ones
    written into its diagonal view: half the time of torch.eye on CPU (which compares indices
    for every element), and under torch.compile a memset and a strided write where Inductor's
    eye is an unvectorized loop (jacfwd on a 2048-wide input ran 1.3x slower than torch.func's
    graph). Not fill_diagonal_, which writes through as_strided (functionalization refuses it)."""
    out, offset, eyes = [], 0, {}
    for t in flat:
        n = t.numel()
        key = (t.dtype, t.device)
        if key not in eyes:
            eye = torch.zeros(total, total, dtype=t.dtype, device=t.device)
            eye.diagonal().fill_(1)
            eyes[key] = eye
        out.append(eyes[key][:, offset : offset + n].reshape(total, *t.shape))
        offset += n
    return out


def _fn_name(func):
    return getattr(func, "__name__", repr(func))


def _check_diff_args(args, idx, api, name, argnums, forward):
    """jacrev/jacfwd check their inputs themselves: the vjp/jvp they are built on would name
    themselves in the error, not the transform the user called. Exception types are those of
    torch.func's vjp (reverse) or jvp (forward), on which its jacrev/jacfwd are built."""
    for i in idx:
        _check_differentiable(
            args[i],
            f"{api}({name})",
            f"argument {i} (argnums={argnums!r})",
            dtype_error=ValueError if forward else RuntimeError,
        )
    for i in idx:
        _refuse_sparse(f"{api}({name})", args[i], f"argument {i} (argnums={argnums!r})")
    flat = tree_flatten([args[i] for i in idx])[0]
    for t in flat:
        if t.is_nested:
            raise RuntimeError(
                f"{api}({name}): got a nested tensor (torch.nested, layout={t.layout}), which "
                f"functorch_lite's transforms do not support (a known limitation). Use its "
                f"components (t.unbind()) or a padded dense tensor (t.to_padded_tensor(0.0))."
            )
    _check_real(flat, api, name, "inputs")


def _check_real(flat, api, name, what):
    """torch.func's jacrev/jacfwd refuse complex inputs and outputs (the Jacobian of a function
    that is not holomorphic is not one complex matrix); so do ours."""
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise RuntimeError(
                f"{api}({name}): Expected all {what} to be real but received complex tensor at "
                f"flattened input idx: {i}. Use vjp/jvp (which accept complex tensors), or "
                f"split real and imaginary parts (torch.view_as_real)."
            )


def _checked(func, has_aux, api, name):
    """func, checking its result before vjp/jvp (or vmap) see it, for the same reason."""

    def checked(*args):
        result = func(*args)
        if not has_aux and isinstance(result, torch.Tensor):
            return result
        output, _ = _split_aux(result, has_aux, api, name)  # refuses non-tensor aux too
        for o in tree_flatten(output)[0]:
            if not isinstance(o, torch.Tensor):
                raise RuntimeError(
                    f"{api}({name}): expected {name} to return only tensors (a Tensor or a "
                    f"pytree of Tensors), got a {type(o).__name__} in its output."
                )
        return result

    return checked


def jacrev(func, argnums=0, *, has_aux=False, chunk_size=None, _preallocate_and_copy=False):
    """Jacobian of ``func`` w.r.t. the arguments ``argnums``, by reverse mode (:func:`vjp` +
    :func:`vmap`): cheap when the output is small.

    Args:
        func: a function returning a tensor or a pytree of tensors (or ``(output, aux)`` with
            ``has_aux=True``).
        argnums: an int or a tuple of ints: the positional arguments to differentiate.
        has_aux: ``func`` returns ``(output, aux)``; the Jacobian function then returns
            ``(jacobian, aux)``.
        chunk_size: None: one vmap over all rows; 1: row by row without vmap; k: k rows per
            vmap (bounds memory).

    Returns:
        A function with the arguments of ``func`` returning the Jacobian, of shape
        ``output.shape + input.shape``. The result has the structure of func's output on the
        outside and of ``argnums`` inside.

    Example:
        >>> import torch, functorch_lite as ft
        >>> x = torch.tensor([0.0, 1.0, 2.0])
        >>> torch.allclose(ft.jacrev(torch.sin)(x), torch.diag(x.cos()))
        True
        >>> w, b = torch.randn(2, 3), torch.randn(2)
        >>> jw, jb = ft.jacrev(lambda w, b, x: w @ x + b, argnums=(0, 1))(w, b, x)
        >>> jw.shape, jb.shape
        (torch.Size([2, 2, 3]), torch.Size([2, 2]))
        >>> ft.vmap(ft.jacrev(torch.sin))(torch.randn(5, 3)).shape  # batched Jacobians
        torch.Size([5, 3, 3])
    """
    _check_chunk_size(chunk_size, "jacrev")
    wrapper = _jacrev(func, argnums, has_aux, chunk_size, "jacrev", _fn_name(func))
    options = (("argnums", argnums), ("has_aux", has_aux), ("chunk_size", chunk_size))
    return Transformed(jacrev, options, func, _runner(wrapper))


def _runner(wrapper):
    """run(args, kwargs) for a Transformed, from a wrapper taking positional arguments only."""

    def run(args, kwargs):
        return wrapper(*args, **kwargs)

    return run


@skip_wrappers
def _jacrev(func, argnums, has_aux, chunk_size, api, name):
    checked_func = _checked(func, has_aux, api, name)

    @functools.wraps(func)
    def wrapper(*args):
        return call_eagerly(body, args, {})

    def body(*args):
        idx = _normalize_argnums(argnums, len(args), api)

        def f_diff(*diff):
            return checked_func(*_own_args(args, idx, diff))

        flat_primals, primals_spec = tree_flatten(tuple(args[i] for i in idx))
        _check_diff_args(args, idx, api, name, argnums, forward=False)
        vjp_out = vjp(f_diff, *(args[i] for i in idx), has_aux=has_aux)
        output, vjp_fn = vjp_out[0], vjp_out[1]
        flat_out, out_spec = tree_flatten(output)
        _check_real(flat_out, api, name, "outputs")
        total = sum(o.numel() for o in flat_out)
        basis = tree_unflatten(_basis(flat_out, total), out_spec)

        if chunk_size == 1:
            rows = [vjp_fn(tree_map(lambda b: b[r], basis)) for r in range(total)]
            flat_rows = [tree_flatten(r)[0] for r in rows]
            stacked = [
                torch.stack([fr[k] for fr in flat_rows]) if total else p.new_zeros((0, *p.shape))
                for k, p in enumerate(flat_primals)
            ]
        else:
            res = vmap(vjp_fn, chunk_size=chunk_size)(basis) if total else None
            stacked = tree_flatten(res)[0] if total else [p.new_zeros((0, *p.shape)) for p in flat_primals]

        # Split the rows per output: jac[out j][primal k] has shape out_j.shape + primal_k.shape.
        per_out, offset = [], 0
        for o in flat_out:
            n = o.numel()
            blocks = [
                s[offset : offset + n].view(tuple(o.shape) + tuple(p.shape))
                for s, p in zip(stacked, flat_primals)
            ]
            blocks_tree = tree_unflatten(blocks, primals_spec)  # tuple over argnums
            per_out.append(blocks_tree if isinstance(argnums, tuple) else blocks_tree[0])
            offset += n
        jac = tree_unflatten(per_out, out_spec)
        if has_aux:
            return jac, vjp_out[2]
        return jac

    return wrapper


_RANDOMNESS = ("error", "different", "same")


def jacfwd(func, argnums=0, has_aux=False, *, randomness="error"):
    """Jacobian of ``func`` w.r.t. the arguments ``argnums``, by forward mode (:func:`jvp` +
    :func:`vmap`): cheap when the input is small.

    Args:
        func: a function returning a tensor or a pytree of tensors (or ``(output, aux)`` with
            ``has_aux=True``).
        argnums: an int or a tuple of ints: the positional arguments to differentiate.
        has_aux: ``func`` returns ``(output, aux)``; the Jacobian function then returns
            ``(jacobian, aux)``.
        randomness: the ``randomness`` of the :func:`vmap` over the basis vectors.

    Returns:
        A function with the arguments of ``func`` returning the Jacobian, of shape
        ``output.shape + input.shape`` (the same as :func:`jacrev`).

    Example:
        >>> import torch, functorch_lite as ft
        >>> x = torch.tensor([0.0, 1.0, 2.0])
        >>> torch.allclose(ft.jacfwd(torch.sin)(x), torch.diag(x.cos()))
        True
        >>> w = torch.randn(100, 3)  # tall: 100 outputs, 3 inputs
        >>> torch.allclose(ft.jacfwd(lambda x: w @ x)(x), w)
        True
    """
    if randomness not in _RANDOMNESS:
        raise RuntimeError(
            f"jacfwd: Only allowed values for randomness are 'error', 'different', or 'same'. "
            f"Got {randomness!r}."
        )
    wrapper = _jacfwd(func, argnums, has_aux, randomness, "jacfwd", _fn_name(func))
    options = (("argnums", argnums), ("has_aux", has_aux), ("randomness", randomness))
    return Transformed(jacfwd, options, func, _runner(wrapper))


@skip_wrappers
def _jacfwd(func, argnums, has_aux, randomness, api, name):
    checked_func = _checked(func, has_aux, api, name)

    @functools.wraps(func)
    def wrapper(*args):
        return call_eagerly(body, args, {})

    def body(*args):
        idx = _normalize_argnums(argnums, len(args), api)
        primals = tuple(args[i] for i in idx)
        flat_primals, primals_spec = tree_flatten(primals)
        _check_diff_args(args, idx, api, name, argnums, forward=True)
        total = sum(p.numel() for p in flat_primals)
        basis = tree_unflatten(_basis(flat_primals, total), primals_spec)

        def push_jvp(tangents):
            def f_diff(*diff):
                return checked_func(*_own_args(args, idx, diff))

            out = _jvp(f_diff, primals, tangents, has_aux=has_aux)
            return (out[1], out[2]) if has_aux else out[1]

        results = vmap(push_jvp, randomness=randomness)(basis)
        if has_aux:
            results, aux = results
            aux = tree_map(lambda a: a[0] if isinstance(a, torch.Tensor) else a, aux)
        flat_res, out_spec = tree_flatten(results)
        _check_real(flat_res, api, name, "outputs")
        per_out = []
        for r in flat_res:
            moved = r.movedim(0, -1)  # out.shape + (total,)
            out_shape = moved.shape[:-1]
            blocks, offset = [], 0
            for p in flat_primals:
                n = p.numel()
                blocks.append(moved[..., offset : offset + n].reshape(tuple(out_shape) + tuple(p.shape)))
                offset += n
            blocks_tree = tree_unflatten(blocks, primals_spec)
            per_out.append(blocks_tree if isinstance(argnums, tuple) else blocks_tree[0])
        jac = tree_unflatten(per_out, out_spec)
        return (jac, aux) if has_aux else jac

    return wrapper


def hessian(func, argnums=0):
    """Hessian of ``func`` w.r.t. the arguments ``argnums``: ``jacfwd(jacrev(func))``.

    Args:
        func: a function returning a single-element tensor.
        argnums: an int or a tuple of ints: the positional arguments to differentiate.

    Returns:
        A function with the arguments of ``func`` returning the Hessian, of shape
        ``input.shape + input.shape``.

    Example:
        >>> import torch, functorch_lite as ft
        >>> ft.hessian(lambda x: (x**3).sum())(torch.tensor([1.0, 2.0]))
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    name = _fn_name(func)
    wrapper = _jacfwd(
        _jacrev(func, argnums, False, None, "hessian", name), argnums, False, "error", "hessian", name
    )
    return Transformed(hessian, (("argnums", argnums),), func, _runner(wrapper))
