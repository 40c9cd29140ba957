"""Python-level Tensor methods that cannot work on our wrapper tensors as they are: repr() shows
the level structure instead of reading raw storage; tolist()/numpy() work on grad-level tensors
(they read the value) and raise a clear error on batched ones; deepcopy raises a clear error;
new_tensor()/new() take their device from the tensor's dispatch keys, where our front key would
be mistaken for a backend, so they run on a plain prototype of the same dtype and device;
requires_grad_()/retain_grad() are refused inside a transform, as torch.func does: autograd of
the level below cannot see through a transform's tensors, so the gradients a user (or
torch.autograd.functional) asked for that way would silently be zeros."""

import torch
import torch.autograd.forward_ad as _fwAD

from ._load import _C

_AD_INPLACE = torch._C.DispatchKey.ADInplaceOrView

_torch_repr = torch.Tensor.__repr__
_torch_tolist = torch.Tensor.tolist
_torch_numpy = torch.Tensor.numpy
_torch_deepcopy = torch.Tensor.__deepcopy__
_torch_new_tensor = torch.Tensor.new_tensor
_torch_new = torch.Tensor.new
# The transforms themselves mark their inputs through these, never through the patched methods.
_torch_requires_grad_ = torch._C.TensorBase.requires_grad_
_torch_retain_grad = torch.Tensor.retain_grad
_torch_is_conj = torch.Tensor.is_conj
_torch_is_neg = torch.Tensor.is_neg
_torch_resolve_conj = torch.Tensor.resolve_conj
_torch_resolve_neg = torch.Tensor.resolve_neg
_torch_fn_is_conj = torch.is_conj
_torch_fn_is_neg = torch.is_neg
_torch_fn_resolve_conj = torch.resolve_conj
_torch_fn_resolve_neg = torch.resolve_neg

_BATCHED_VALUE_ERROR = (
    "functorch_lite.vmap: {what} was called on a batched tensor. A batched tensor holds one "
    "value per batch element, so there is no single Python value to return. Return the tensor "
    "from the vmapped function instead, or use tensor operations."
)


def _plain_repr(t, *args, **kwargs):
    # torch's printer runs ops on the tensor; inside a transform those would be lifted to our
    # wrappers, whose raw data the printer then cannot read. Print below all transforms.
    with _C._BelowTransforms():
        return _torch_repr(t, *args, **kwargs)


def _describe(t):
    info = _C._wrapper_info(t)
    if info is None:
        return _plain_repr(t)
    kind, level, bdim, value, alive = info
    inner = _describe(value).replace("\n", "\n    ")
    # torch.func's format: the level is the nesting depth (1 = outermost transform). A wrapper
    # whose transform has returned has no depth any more: its level id is shown, marked dead.
    depth = _C._level_depth(level)
    lvl = f"{depth}" if depth else f"{level}, dead" if not alive else f"{level}"
    if kind == "batched":
        return f"BatchedTensor(lvl={lvl}, bdim={bdim}, value=\n    {inner}\n)"
    return f"GradTrackingTensor(lvl={lvl}, value=\n    {inner}\n)"


def _plain_value(t, what):
    """The plain tensor under grad wrappers; raises for batched tensors."""
    info = _C._wrapper_info(t)
    while info is not None:
        kind, _, _, value, _ = info
        if kind == "batched":
            raise RuntimeError(_BATCHED_VALUE_ERROR.format(what=what))
        t = value
        info = _C._wrapper_info(t)
    return t


def _short(self, why):
    return f"tensor(<{why}>, size={tuple(self.shape)}, dtype={self.dtype})"


def _repr(self, *args, **kwargs):
    # Inside a __torch_dispatch__ (autograd's keys are excluded there) while a forward-AD level
    # is live, torch's printer calls unpack_dual, whose _fw_primal then reaches its native stub:
    # an internal assert. FakeTensorMode prints the call it refuses (a real tensor among fake
    # ones) exactly there during a traced jacfwd/hessian, and the failed printer left a
    # reference cycle whose collection, later, restored a stale TLS dispatch-key exclude set:
    # every later gradient in the process came out zero. Such a tensor is described without its
    # values.
    if _fwAD._current_level >= 0 and torch._C._dispatch_tls_is_dispatch_key_excluded(_AD_INPLACE):
        return _short(self, "not printable inside a dispatch under forward AD")
    try:
        if _C._wrapper_info(self) is None:
            if _C._stack_depth() == 0:
                return _torch_repr(self, *args, **kwargs)
            return _plain_repr(self, *args, **kwargs)
        return _describe(self)
    except Exception as e:  # noqa: BLE001 (repr runs inside error messages)
        # A description without the values keeps the first error's message.
        return _short(self, f"not printable here: {type(e).__name__}")


def _tolist(self):
    if _C._wrapper_info(self) is None:
        return _torch_tolist(self)
    value = _plain_value(self, ".tolist()")
    with _C._BelowTransforms():
        return _torch_tolist(value)


def _numpy(self, *args, **kwargs):
    if _C._wrapper_info(self) is None:
        return _torch_numpy(self, *args, **kwargs)
    value = _plain_value(self, ".numpy()")
    with _C._BelowTransforms():
        return _torch_numpy(value.detach(), *args, **kwargs)


def _deepcopy(self, memo):
    if _C._wrapper_info(self) is None:
        return _torch_deepcopy(self, memo)
    raise RuntimeError(
        "functorch_lite: a tensor of an active transform (vmap/grad/jvp) cannot be deep-copied. "
        "Use .clone() inside the transform, or copy the inputs before calling it."
    )


def _prototype(self):
    """An empty plain tensor with self's dtype and device. torch's legacy constructors derive the
    backend from the tensor's highest dispatch key, which on our wrappers is the front key, not a
    backend ("DispatchKey DeferredInit doesn't correspond to a device")."""
    with _C._BelowTransforms():
        return torch.empty(0, dtype=self.dtype, device=self.device)


def _new_tensor(self, *args, **kwargs):
    # The data is filled outside of any transform logic, exactly as torch.tensor(...) would be:
    # the factories it runs still go through the live levels.
    if _C._wrapper_info(self) is not None:
        self = _prototype(self)
    return _torch_new_tensor(self, *args, **kwargs)


def _new(self, *args, **kwargs):
    if _C._wrapper_info(self) is not None:
        self = _prototype(self)
    return _torch_new(self, *args, **kwargs)


def _requires_grad_(self, requires_grad=True):
    # torch.func transforms inside ours mark their own wrappers; mixing is refused by the next op.
    if _C._stack_depth() and not _C._is_foreign_transform_tensor(self):
        raise RuntimeError(
            "functorch_lite: you are attempting to call Tensor.requires_grad_() (or perhaps using "
            "torch.autograd.functional.* APIs) inside of a function being transformed by a "
            "functorch_lite transform. This is unsupported: use the transforms (grad, vjp, jacrev, "
            "jacfwd, hessian) to differentiate, or call requires_grad_() outside of the function "
            "being transformed."
        )
    return _torch_requires_grad_(self, requires_grad)


def _retain_grad(self):
    if _C._stack_depth():
        raise RuntimeError(
            "functorch_lite: you are attempting to call Tensor.retain_grad() inside of a function "
            "being transformed by a functorch_lite transform. This is unsupported: use grad or vjp "
            "with has_aux=True to return the intermediate gradient you need."
        )
    return _torch_retain_grad(self)


def _innermost(self):
    info = _C._wrapper_info(self)
    while info is not None:
        self = info[3]
        info = _C._wrapper_info(self)
    return self


def _bit_query(torch_query):
    """is_conj/is_neg: the conjugate and negative bits live on the plain tensor under our
    wrappers (its kernels honour them); the wrappers carry no such key, so ask the plain tensor."""

    def query(self):
        return torch_query(_innermost(self))

    return query


def _bit_resolver(torch_resolve, query):
    """resolve_conj/resolve_neg: torch's asks the wrapper, which has no such key, and returns it
    as it is; an arithmetic no-op materialises the bit of the plain tensor underneath instead."""

    def resolve(self):
        if _C._wrapper_info(self) is None or not query(self):
            return torch_resolve(self)
        return self * 1

    return resolve


_is_conj = _bit_query(_torch_is_conj)
_is_neg = _bit_query(_torch_is_neg)
_resolve_conj = _bit_resolver(_torch_resolve_conj, _is_conj)
_resolve_neg = _bit_resolver(_torch_resolve_neg, _is_neg)


def _fn(method, torch_fn):
    """The torch.* function form of a patched method: same answer on our wrappers."""

    def fn(input):
        if isinstance(input, torch.Tensor) and _C._wrapper_info(input) is not None:
            return method(input)
        return torch_fn(input)

    fn.__name__ = torch_fn.__name__
    fn.__doc__ = torch_fn.__doc__
    return fn


def install():
    if torch.Tensor.__repr__ is not _repr:
        torch.Tensor.__repr__ = _repr
        torch.Tensor.tolist = _tolist
        torch.Tensor.numpy = _numpy
        torch.Tensor.__deepcopy__ = _deepcopy
        torch.Tensor.new_tensor = _new_tensor
        torch.Tensor.new = _new
        torch.Tensor.requires_grad_ = _requires_grad_
        torch.Tensor.retain_grad = _retain_grad
        torch.Tensor.is_conj = _is_conj
        torch.Tensor.is_neg = _is_neg
        torch.Tensor.resolve_conj = _resolve_conj
        torch.Tensor.resolve_neg = _resolve_neg
        torch.is_conj = _fn(_is_conj, _torch_fn_is_conj)
        torch.is_neg = _fn(_is_neg, _torch_fn_is_neg)
        torch.resolve_conj = _fn(_resolve_conj, _torch_fn_resolve_conj)
        torch.resolve_neg = _fn(_resolve_neg, _torch_fn_resolve_neg)
