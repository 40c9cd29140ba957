"""Python-level methods that read raw storage and so cannot work on our wrapper tensors as they
are: repr() shows the level structure instead; tolist()/numpy() work on grad-level tensors (they
read the value) and raise a clear error on batched ones; deepcopy raises a clear error."""
import torch

from ._load import _C

_torch_repr = torch.Tensor.__repr__
_torch_tolist = torch.Tensor.tolist
_torch_numpy = torch.Tensor.numpy
_torch_deepcopy = torch.Tensor.__deepcopy__

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
    dead = "" if alive else ", dead"
    if kind == "batched":
        return f"BatchedTensor(lvl={level}, bdim={bdim}{dead}, value=\n    {inner}\n)"
    return f"GradTrackingTensor(lvl={level}{dead}, value=\n    {inner}\n)"


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


def _repr(self, *args, **kwargs):
    if _C._wrapper_info(self) is None:
        if _C._stack_depth() == 0:
            return _torch_repr(self, *args, **kwargs)
        return _plain_repr(self, *args, **kwargs)
    return _describe(self)


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


def install():
    if torch.Tensor.__repr__ is not _repr:
        torch.Tensor.__repr__ = _repr
        torch.Tensor.tolist = _tolist
        torch.Tensor.numpy = _numpy
        torch.Tensor.__deepcopy__ = _deepcopy
