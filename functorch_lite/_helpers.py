"""torch.func's remaining public helpers: debug_unwrap and replace_all_batch_norm_modules_."""

import torch
from torch import nn

from ._compile import eager
from ._load import _C


@eager
def debug_unwrap(tensor, *, recurse=True):
    """The plain tensor under functorch_lite's wrappers (BatchedTensor, grad wrappers): with its
    batch dims, without any transform's tracking. For debugging only (printing a value inside a
    transformed function): using the result in the computation escapes the transforms. A tensor
    that is not ours is returned as it is; recurse=False unwraps one level.

    Example:
        >>> import torch, functorch_lite as ft
        >>> seen = []
        >>> def f(x):
        ...     seen.append(ft.debug_unwrap(x).shape)  # the plain value, batch dim included
        ...     return x.sum()
        >>> _ = ft.vmap(f)(torch.ones(4, 3))
        >>> seen
        [torch.Size([4, 3])]
    """
    if not isinstance(tensor, torch.Tensor):
        return tensor
    info = _C._wrapper_info(tensor)
    while info is not None:
        tensor = info[3]
        if not recurse:
            break
        info = _C._wrapper_info(tensor)
    return tensor


def _batch_norm_without_running_stats(module):
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        module.running_mean = None
        module.running_var = None
        module.num_batches_tracked = None
        module.track_running_stats = False


def replace_all_batch_norm_modules_(root):
    """In place: every batch norm module of `root` (root included) stops tracking running stats
    (running_mean, running_var and num_batches_tracked become None), so that vmap over it uses
    the batch statistics and updates no shared buffer. Returns root, as torch.func does.

    Example:
        >>> import torch, functorch_lite as ft
        >>> net = ft.replace_all_batch_norm_modules_(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
        >>> net[0].running_mean is None
        True
    """
    for module in root.modules():
        _batch_norm_without_running_stats(module)
    return root
