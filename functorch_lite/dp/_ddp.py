"""torch.distributed support for PrivateTrainer.

Every rank clips its own examples; the clipped sums are all-reduced by us, not by
DistributedDataParallel: the trainer runs the wrapped `.module` functionally, so DDP's gradient
hooks never fire and nothing is averaged twice. The noise must be added exactly once with std
sigma * C: rank 0 adds it before the all-reduce. (Every rank adding full-std noise from the same
seed, the classic bug, would make it world_size times too big.)
"""

import torch
import torch.distributed as dist


def unwrap(model):
    """The module to run functionally: DDP's wrapped module, else the model itself."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def is_distributed(min_world_size=2):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() >= min_world_size


def rank():
    """This process's rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if is_distributed(min_world_size=1) else 0


def adds_noise():
    """Whether this process adds the step's noise: rank 0 only, so it is added once."""
    return not is_distributed(min_world_size=1) or dist.get_rank() == 0


def all_reduce_sum(tensors):
    """The sum over ranks of `tensors`, by one all-reduce of a flat buffer."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out
