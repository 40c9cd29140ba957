"""repr() for our wrapper tensors: torch's printer reads raw storage, which they do not have."""
import torch

from ._load import _C

_torch_repr = torch.Tensor.__repr__


def _describe(t):
    info = _C._wrapper_info(t)
    if info is None:
        return _torch_repr(t)
    kind, level, bdim, value, alive = info
    inner = _describe(value).replace("\n", "\n    ")
    dead = "" if alive else ", dead"
    if kind == "batched":
        return f"BatchedTensor(lvl={level}, bdim={bdim}{dead}, value=\n    {inner}\n)"
    return f"GradTrackingTensor(lvl={level}{dead}, value=\n    {inner}\n)"


def _repr(self, *args, **kwargs):
    if _C._wrapper_info(self) is None:
        return _torch_repr(self, *args, **kwargs)
    return _describe(self)


def install():
    if torch.Tensor.__repr__ is not _repr:
        torch.Tensor.__repr__ = _repr
