"""ft.grad, ft.grad_and_value and ft.vjp: grad levels that run torch's own autograd on our
wrappers (see docs/design.md). Entering/leaving levels and wrapping happen in C++ (_C)."""

import contextlib

import torch
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map, tree_unflatten
from torch.utils.checkpoint import CheckpointError

from . import _guards
from ._call import call_transformed
from ._compile import Transformed, _is_compiling, eager, skip_wrappers
from ._levels import _batched_like
from ._load import _C
from ._repr import _torch_requires_grad_ as _torch_requires_grad

# torch.Tensor.requires_grad_ refuses calls inside transforms (as torch.func's does); the
# transforms mark their own inputs with torch's method itself (captured in _repr.py). A user's
# TorchFunctionMode would turn that call into one of the refusing public method: the mode does not
# see it.


def _requires_grad(t):
    if torch._C._is_torch_function_mode_enabled():
        with torch._C.DisableTorchFunction():
            return _torch_requires_grad(t)
    return _torch_requires_grad(t)


def _fn_name(func):
    return getattr(func, "__name__", repr(func))


def _normalize_argnums(argnums, nargs, api):
    # RuntimeError throughout, as torch.func raises for every argnums misuse.
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise RuntimeError(
            f"{api}: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got {argnums!r}."
        )
    items = argnums if isinstance(argnums, tuple) else (argnums,)
    if len(items) == 0:
        raise RuntimeError(f"{api}: argnums must be non-empty")
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int):
            raise RuntimeError(
                f"{api}: argnums must be int or Tuple[int, ...] (an int or a tuple of ints), got {argnums!r}."
            )
        if not -nargs <= a < nargs:
            raise RuntimeError(
                f"{api}: got argnums={argnums!r}, but only {nargs} positional inputs, so each "
                f"argnum must be in [{-nargs}, {nargs})."
            )
        out.append(a % nargs)
    if len(set(out)) != len(out):
        raise RuntimeError(f"{api}: argnums elements must be unique, got {argnums!r}")
    return out


def _refuse_nested(api, tree):
    """Called when wrapping the inputs failed: a nested tensor (torch.nested) is a Python tensor
    subclass, which the C++ side takes for a tensor of another transform library; say what it is."""
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor) and t.is_nested:
            raise RuntimeError(
                f"{api}: got a nested tensor (torch.nested, layout={t.layout}), which "
                f"functorch_lite's transforms do not support (a known limitation). Differentiate "
                f"with respect to its components (t.unbind()) or a padded dense tensor "
                f"(t.to_padded_tensor(0.0))."
            )


def _wrap(x, level):
    return _C._wrap_for_grad(x, level) if isinstance(x, torch.Tensor) else x


def _unwrap(x, level):
    return _C._unwrap_for_grad(x, level) if isinstance(x, torch.Tensor) else x


# Layouts the reverse-mode transforms differentiate: grad wrappers keep a sparse value's layout
# (NOTE [Sparse grad wrappers] in csrc/core/tensors.h), so torch's sparse formulas run and the
# gradient comes back sparse, as in torch.func.
_REVERSE_LAYOUTS = (torch.strided, torch.sparse_coo)


def _refuse_sparse(api, tree, what, allowed=(torch.strided,)):
    """Differentiated inputs must have a layout in `allowed`. grad and vjp accept sparse COO
    tensors (as torch.func does); the forward-mode transforms and the Jacobians, which torch.func
    cannot run on sparse inputs either (they need strides or views of them), refuse them with a
    clear error instead of torch's internal one. Captured sparse tensors (constants) are fine."""
    for path, t in tree_flatten_with_path(tree)[0]:
        if isinstance(t, torch.Tensor) and t.layout not in allowed and not t.is_nested:
            where = what + (f" at {keystr(path)}" if path else "")
            ok = " and ".join(str(a) for a in allowed)
            raise RuntimeError(
                f"{api}: {where} has layout {t.layout}; {api} differentiates tensors of layout "
                f"{ok} only (as torch.func, whose {api} fails on it too). Pass t.to_dense(), or "
                f"differentiate the values of the sparse tensor and build it inside the function "
                f"(torch.sparse_coo_tensor(indices, values, size))."
            )


def _check_differentiable(tree, api, what, dtype_error=RuntimeError, type_error=ValueError):
    """Raises unless every leaf of `tree` is a floating-point or complex Tensor. `what` names the
    argument in the error (e.g. "argument 1 (argnums=(0, 1))"), followed by the pytree path of
    the bad leaf. The exception types are torch.func's for the same misuse: the reverse-mode
    transforms raise RuntimeError for an integer Tensor, the forward-mode ones ValueError; a
    non-Tensor is a ValueError (a RuntimeError for jvp's primals)."""
    for path, t in tree_flatten_with_path(tree)[0]:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            continue
        where = what + (f" at {keystr(path)}" if path else "")
        if not isinstance(t, torch.Tensor):
            raise type_error(
                f"{api}: {where} must be a Tensor (or a pytree of Tensors), got {_a(type(t).__name__)}."
            )
        raise dtype_error(
            f"{api}: {where} must be a floating-point or complex Tensor to be differentiated, got "
            f"a Tensor of dtype {t.dtype}."
        )


def _make_differentiable(tree, api, what):
    _check_differentiable(tree, api, what)
    return tree_map(_requires_grad, tree)


def _a(noun):
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _split_aux(output, has_aux, api, name="f"):
    if not has_aux:
        return output, None
    if not (isinstance(output, tuple) and len(output) == 2):
        raise RuntimeError(
            f"{api}({name}, has_aux=True): output of function {name} should be a tuple: "
            f"(output, aux) if has_aux is True; got {type(output).__name__}"
            + (f" of length {len(output)}" if isinstance(output, tuple) else "")
            + "."
        )
    _check_aux(output[1], api, name)
    return output


def _check_aux(aux, api, name="f"):
    """aux must be a Tensor or a pytree of them, as torch.func requires (clients turn its
    refusal into their own errors, so a None or a number must not pass silently)."""
    for a in tree_flatten(aux)[0]:
        if not isinstance(a, torch.Tensor):
            raise RuntimeError(
                f"{api}({name}, has_aux=True): the aux output of {name} may hold only tensors "
                f"(a Tensor or a pytree of Tensors), but it holds {_a(type(a).__name__)}."
            )


_ONE_TENSOR_SPEC = tree_flatten((torch.empty(0),))[1]


@skip_wrappers
def grad_and_value(func, argnums=0, has_aux=False):
    """Returns a function computing (gradient, value) of ``func`` w.r.t. the arguments ``argnums``.

    Like :func:`grad`, and also returns the value of ``func``, from the same forward pass.

    Args:
        func: a function returning a single-element Tensor (or ``(Tensor, aux)`` with
            ``has_aux=True``).
        argnums: an int or a tuple of ints: the positional arguments to differentiate. Each may
            be a tensor or a pytree of tensors.
        has_aux: ``func`` returns ``(output, aux)``; ``aux`` is returned as is, not
            differentiated.

    Returns:
        A function with the arguments of ``func`` that returns ``(gradient, value)``, or
        ``(gradient, (value, aux))`` with ``has_aux=True``. Gradients mirror the structure of the
        selected arguments; with a tuple ``argnums`` they come back as a tuple, one entry per
        argnum.

    Example:
        >>> import torch, functorch_lite as ft
        >>> g, value = ft.grad_and_value(lambda x: (x**2).sum())(torch.tensor([1.0, 2.0]))
        >>> g, value
        (tensor([2., 4.]), tensor(5.))
    """

    # (`run` must not refer to the Transformed: that would make every transformed function a
    # reference cycle, freed only by the gc; test_memory.py.)
    def run(args, kwargs):
        return _grad_and_value_entry(func, argnums, has_aux, args, kwargs)

    return Transformed(grad_and_value, (("argnums", argnums), ("has_aux", has_aux)), func, run)


def _grad_and_value(func, argnums, has_aux, api, args, kwargs):
    idx = _normalize_argnums(argnums, len(args), api)
    for i in idx:
        a = args[i]
        if not (isinstance(a, torch.Tensor) and a.layout is torch.strided):
            _refuse_sparse(api, a, f"argument {i} (argnums={argnums!r})", _REVERSE_LAYOUTS)
    # The backward must be recorded by the levels below (outer grad transforms, or torch's
    # own autograd for captured tensors that require grad) whenever they record at all.
    create_graph = torch.is_grad_enabled()
    level = _C._push_grad()
    try:
        with torch.enable_grad():
            try:
                wrapped = [
                    _C._wrap_for_grad(a, level)
                    if isinstance(a, torch.Tensor)
                    else tree_map(lambda x: _wrap(x, level), a)
                    for a in args
                ]
                if kwargs:
                    kwargs = tree_map(lambda x: _wrap(x, level), kwargs)
            except RuntimeError:
                _refuse_nested(api, (args, kwargs))
                raise
            args = wrapped
            for i in idx:
                a = args[i]
                if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex()):
                    _requires_grad(a)  # the common case, without the pytree walk
                else:
                    args[i] = _make_differentiable(a, api, f"argument {i} (argnums={argnums!r})")
            diff = tuple(args[i] for i in idx)
            output = call_transformed(func, args, kwargs, api)
            output, aux = _split_aux(output, has_aux, api)
            if not isinstance(output, torch.Tensor):
                raise RuntimeError(
                    f"{api}(f)(*args): expected f(*args) to return a Tensor, got {type(output).__name__}."
                )
            if output.numel() != 1:
                raise RuntimeError(
                    f"{api}(f)(*args): expected f(*args) to return a scalar Tensor, got a "
                    f"tensor of shape {tuple(output.shape)}. Use vjp or jacrev for "
                    f"non-scalar outputs."
                )
            if len(diff) == 1 and isinstance(diff[0], torch.Tensor):
                flat_diff, spec = list(diff), _ONE_TENSOR_SPEC
            else:
                flat_diff, spec = tree_flatten(diff)
            if output.requires_grad:
                grads = _C._autograd_grad([output], flat_diff, [], None, create_graph)
            else:
                grads = (None,) * len(flat_diff)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, flat_diff)]
            grads = [_unwrap(g, level) for g in grads]
            output = _unwrap(output, level)
            if has_aux:
                aux = tree_map(lambda x: _unwrap(x, level), aux)
    finally:
        _C._pop(level)
    grad_tree = tree_unflatten(grads, spec)
    if not isinstance(argnums, tuple):
        grad_tree = grad_tree[0]
    if has_aux:
        return grad_tree, (output, aux)
    return grad_tree, output


@eager
def _grad_and_value_entry(func, argnums, has_aux, args, kwargs):
    return _grad_and_value(func, argnums, has_aux, "grad_and_value", args, kwargs)


@eager
def _grad_entry(func, argnums, has_aux, args, kwargs):
    g, value = _grad_and_value(func, argnums, has_aux, "grad", args, kwargs)
    return (g, value[1]) if has_aux else g


@skip_wrappers
def grad(func, argnums=0, has_aux=False):
    """Returns a function computing the gradient of ``func`` w.r.t. the arguments ``argnums``.

    Like :func:`grad_and_value`, without the value. Nests with itself (higher derivatives) and
    with :func:`vmap` (per-example gradients).

    Args:
        func: a function returning a single-element Tensor (or ``(Tensor, aux)`` with
            ``has_aux=True``).
        argnums: an int or a tuple of ints: the positional arguments to differentiate. Each may
            be a tensor or a pytree of tensors.
        has_aux: ``func`` returns ``(output, aux)``; the gradient function then returns
            ``(gradient, aux)``.

    Returns:
        A function with the arguments of ``func`` that returns the gradient: the structure of
        the selected argument, or a tuple of them for a tuple ``argnums``.

    Example:
        >>> import torch, functorch_lite as ft
        >>> x = torch.tensor(0.5)
        >>> torch.allclose(ft.grad(torch.sin)(x), x.cos())
        True
        >>> torch.allclose(ft.grad(ft.grad(torch.sin))(x), -x.sin())  # second derivative
        True
        >>> def loss(w, x):  # written for one example
        ...     return (x @ w) ** 2
        >>> w, xs = torch.ones(3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
        >>> ft.vmap(ft.grad(loss), in_dims=(None, 0))(w, xs)  # per-example gradients
        tensor([[2., 0., 0.],
                [0., 8., 0.]])
        >>> ft.grad(loss, argnums=(0, 1))(w, xs[0])  # both arguments
        (tensor([2., 0., 0.]), tensor([2., 2., 2.]))
    """

    def run(args, kwargs):
        return _grad_entry(func, argnums, has_aux, args, kwargs)

    return Transformed(grad, (("argnums", argnums), ("has_aux", has_aux)), func, run)


def vjp(func, *primals, has_aux=False):
    """Vector-Jacobian product: returns ``(func(*primals), vjp_fn)``, or with ``has_aux=True``
    ``(func(*primals), vjp_fn, aux)``.

    ``vjp_fn(cotangents)`` returns a tuple with one gradient per primal: ``cotangents`` times the
    Jacobian of ``func`` at ``primals``.

    Args:
        func: a function of the primals returning a tensor or a pytree of tensors (or
            ``(output, aux)`` with ``has_aux=True``).
        primals: the arguments of ``func`` (tensors or pytrees of tensors), all differentiated.
        has_aux: ``func`` returns ``(output, aux)``; ``aux`` is returned, not differentiated.

    ``cotangents`` must have the structure and shapes of func's output (another floating dtype is
    cast to the output's, as torch.autograd.grad does). ``vjp_fn`` may be called several times and
    composes with :func:`vmap` (that is how :func:`jacrev` batches over cotangents).

    Example:
        >>> import torch, functorch_lite as ft
        >>> x = torch.tensor([1.0, 2.0, 3.0])
        >>> out, vjp_fn = ft.vjp(lambda x: x**2, x)
        >>> vjp_fn(torch.ones(3))  # one gradient per primal
        (tensor([2., 4., 6.]),)
        >>> (jacobian,) = ft.vmap(vjp_fn)(torch.eye(3))  # every row at once
        >>> jacobian
        tensor([[2., 0., 0.],
                [0., 4., 0.],
                [0., 0., 6.]])
    """
    if _is_compiling():
        return _vjp_recorded(func, primals, has_aux)
    return _vjp_entry(func, primals, has_aux)


@eager
def _vjp_entry(func, primals, has_aux):
    return _vjp(func, primals, has_aux, int_outputs=False)


# NOTE [vjp and linearize under torch.compile]
# vjp and linearize return functions, and a function cannot leave a recorded call (Dynamo records
# a transform call as one opaque call whose outputs are tensors, NOTE [Dynamo sees a transform
# call as one opaque call] in _compile.py), nor can an autograd graph cross from one recorded
# call to the next. While Dynamo traces, vjp therefore returns the value from one recorded call
# (func run by the eager vjp, with every check of the eager path) and a vjp_fn whose calls are
# recorded calls of their own that run the whole vjp again (func's forward and the backward) for
# the given cotangents; linearize likewise, its jvp_fn running jvp at the primals. Same values as
# eager; the compiled graph recomputes func's forward once per vjp_fn/jvp_fn call (eager vjp
# keeps the first forward's graph instead). `retain_graph` and `create_graph` of vjp_fn have no
# meaning there (nothing is kept between calls; AOTAutograd differentiates the recorded call
# like any other op of the graph).
def _vjp_recorded(func, primals, has_aux):
    value = _vjp_value_of(func, has_aux=has_aux)(*primals)
    fn = _RecordedVjpFn(func, has_aux, primals)
    return (value[0], fn, value[1]) if has_aux else (value, fn)


def _vjp_value_of(func, has_aux):
    def run(args, kwargs):
        out = _vjp_entry(func, args, has_aux)
        return (out[0], out[2]) if has_aux else out[0]

    return Transformed(_vjp_value_of, (("has_aux", has_aux),), func, run, wraps=False)


def _vjp_apply_of(func, has_aux):
    def run(args, kwargs):
        primals, cotangents = args
        return _vjp_entry(func, primals, has_aux)[1](cotangents)

    return Transformed(_vjp_apply_of, (("has_aux", has_aux),), func, run, wraps=False)


class _RecordedVjpFn:
    """vjp_fn of a vjp traced by Dynamo (NOTE [vjp and linearize under torch.compile])."""

    def __init__(self, func, has_aux, primals):
        self.func, self.has_aux, self.primals = func, has_aux, primals

    def __call__(self, cotangents, *, retain_graph=True, create_graph=None):
        return _vjp_apply_of(self.func, has_aux=self.has_aux)(self.primals, cotangents)

    def _ft_vmap_recorded(self, in_dims, out_dims, randomness, chunk_size):
        """vmap(vjp_fn): one recorded vmap over the cotangents of the recomputing call."""
        from ._vmap import vmap

        d = in_dims[0] if isinstance(in_dims, (tuple, list)) and len(in_dims) == 1 else in_dims
        apply = _vjp_apply_of(self.func, has_aux=self.has_aux)
        return _BindPrimals(vmap(apply, (None, d), out_dims, randomness, chunk_size=chunk_size), self.primals)


class _BindPrimals:
    """fn(primals, *args) as a function of args (a vmap of a recorded vjp_fn or jvp_fn)."""

    def __init__(self, fn, primals):
        self.fn, self.primals = fn, primals

    def __call__(self, *args):
        return self.fn(self.primals, *args)


def _refuse_saved_tensor_hooks():
    # vjp_fn runs the backward after vjp has returned, when the hooks would unpack tensors of a
    # level that is gone (save_on_cpu's unpack then cuts them from the graph); refused at vjp,
    # where torch.func refuses it too, rather than later in vjp_fn
    raise RuntimeError(
        "vjp(f, *primals) (also inside jacrev, hessian and linearize): saved-tensor hooks "
        "(torch.autograd.graph.saved_tensors_hooks, save_on_cpu) saved tensors of its forward; "
        "its vjp_fn would run the backward through them after the transform has returned. Use "
        "them outside vjp, or use grad, whose backward runs inside the transform."
    )


def _vjp(func, primals, has_aux, int_outputs):
    # int_outputs: linearize gives integer outputs zero tangents; vjp refuses them (torch.func).
    api = "vjp"
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        _refuse_saved_tensor_hooks()
    for i, p in enumerate(primals):
        _refuse_sparse(api, p, f"primals[{i}]", _REVERSE_LAYOUTS)
    level = _C._push_grad()
    try:
        with torch.enable_grad():
            try:
                wrapped = [tree_map(lambda x: _wrap(x, level), p) for p in primals]
            except RuntimeError:
                _refuse_nested(api, primals)
                raise
            wrapped = [_make_differentiable(p, api, f"primals[{i}]") for i, p in enumerate(wrapped)]
            output = call_transformed(func, wrapped, {}, api)
            if _guards.hooks_packed_at(level):
                _refuse_saved_tensor_hooks()
            output, aux = _split_aux(output, has_aux, api)
            flat_out, out_spec = tree_flatten(output)
            if not flat_out:
                raise RuntimeError(
                    f"vjp(f, *primals): f(*primals) returned an empty output "
                    f"({type(output).__name__} with no tensors): there is nothing to pull back."
                )
            for o in flat_out:
                if not isinstance(o, torch.Tensor):
                    raise RuntimeError(
                        f"vjp(f, *primals): expected f(*primals) to return only tensors (a "
                        f"Tensor or a pytree of Tensors), got {_a(type(o).__name__)} in its "
                        f"output."
                    )
                if not (int_outputs or o.is_floating_point() or o.is_complex()):
                    # Nothing can be differentiated through it (torch.func refuses it too).
                    raise RuntimeError(
                        f"vjp(f, ...): All outputs of f must be floating-point or complex Tensors, "
                        f"got a Tensor of dtype {o.dtype} in its output."
                    )
            flat_primals, primals_spec = tree_flatten(wrapped)
            primals_out = tree_unflatten([_unwrap(o, level) for o in flat_out], out_spec)
            if has_aux:
                aux = tree_map(lambda x: _unwrap(x, level), aux)
    finally:
        _C._pop(level)

    def vjp_fn(cotangents, *, retain_graph=True, create_graph=None):
        if create_graph is None:
            create_graph = torch.is_grad_enabled()
        if cotangents is None:
            # torch.func passes no grad_outputs then: an implicit 1 for scalar outputs.
            for i, o in enumerate(flat_out):
                if o.numel() != 1:
                    raise RuntimeError(
                        f"vjp_fn(None): grad can be implicitly created only for scalar outputs, "
                        f"but output {i} has shape {tuple(o.shape)}; pass its cotangent."
                    )
            cotangents = tree_unflatten(
                [torch.ones(o.shape, dtype=o.dtype, device=o.device) for o in flat_out], out_spec
            )
        flat_ct, ct_spec = tree_flatten(cotangents)
        if ct_spec != out_spec:
            raise RuntimeError(
                f"vjp_fn: Expected pytree structure of cotangents to be the same as pytree "
                f"structure of outputs to the function ({out_spec}), got {ct_spec}."
            )
        for i, (c, o) in enumerate(zip(flat_ct, flat_out)):
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"vjp_fn: cotangent {i} must be a Tensor, got {type(c).__name__}")
            if c.shape != o.shape:
                raise RuntimeError(
                    f"vjp_fn: Mismatch in shape: cotangent {i} has shape {tuple(c.shape)}, but the "
                    f"corresponding output has shape {tuple(o.shape)}."
                )
            # A cotangent of another dtype is cast to the output's by torch's autograd engine
            # (torch.autograd.grad and torch.func accept it); a complex/real mismatch is refused
            # there with torch's own error.
        pairs = [(o, _batched_like(o, c)) for o, c in zip(flat_out, flat_ct) if o.requires_grad]
        if pairs:
            # Under torch.inference_mode() the engine would hand back inference tensors, which
            # nothing can differentiate later; torch.func's vjp_fn returns normal tensors.
            with contextlib.ExitStack() as stack:
                if torch.is_inference_mode_enabled():
                    stack.enter_context(torch.inference_mode(False))
                try:
                    grads = _C._autograd_grad(
                        [o for o, _ in pairs],
                        flat_primals,
                        [c for _, c in pairs],
                        retain_graph,
                        create_graph,
                    )
                except CheckpointError as e:
                    # vjp_fn runs the backward after vjp's level has returned: checkpoint's
                    # recomputation then runs outside the transform and records nothing.
                    raise RuntimeError(
                        "functorch_lite.vjp: torch.utils.checkpoint inside vjp (or jacrev, "
                        "hessian) is not supported: vjp_fn runs the backward after vjp has "
                        "returned, when the checkpointed function can no longer be recomputed "
                        "inside the transform. Use grad (its backward runs inside the "
                        "transform), or call the function without checkpoint."
                    ) from e
        else:
            grads = (None,) * len(flat_primals)
        grads = [
            torch.zeros(p.shape, dtype=p.dtype, device=p.device) if g is None else g
            for g, p in zip(grads, flat_primals)
        ]
        return tuple(tree_unflatten(grads, primals_spec))

    vjp_fn = eager(vjp_fn)
    if has_aux:
        return primals_out, vjp_fn, aux
    return primals_out, vjp_fn
