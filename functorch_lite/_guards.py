"""What torch.func refuses inside its transforms and ours would otherwise accept silently
(issue 12, item 11). Each guard is a patch of a torch Python entry point that only acts while a
functorch_lite transform is active (or on our wrapper tensors), so code outside transforms runs
torch's own path unchanged:

- `tensor.data = value` on, or with, a tensor of a transform: it swaps the wrapper's contents
  behind autograd's back (a captured tensor would take in the transform's inner value), so it is
  refused as in torch.func. Reading `.data` of a batched tensor inside vmap is refused too (as in
  torch.func); elsewhere reading it stays allowed.
- an autograd.Function without setup_context (forward(ctx, ...), the old style): torch.func
  refuses it under every transform; so do we, with the same exception and first sentence.
  Functions with setup_context are run level by level as torch.func runs them
  (_autograd_function.py: the vmap staticmethod, generate_vmap_rule, backward/jvp per level).
  Inside a grad level's autograd kernels (a custom op's register_autograd formula, which torch
  implements as an old-style Function) our front is off, and apply is torch's own.
- a saved-tensor pack hook that keeps a reference to a tensor of a transform (stores it in a
  global list, say): the wrapper would outlive its transform. Unlike torch.func, which refuses
  saved-tensor hooks altogether, hooks that do not keep the tensor (torch.utils.checkpoint with
  use_reentrant=False, save_on_cpu) work under our transforms and give the right gradients.
  Checkpointing under two or more differentiating levels (grad of grad, jvp of grad) is refused:
  its recomputation gives zero higher-order gradients there.
"""

import inspect
import sys
import threading

import torch
from torch.autograd.function import _is_setup_context_defined
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import _checkpoint_hook

from . import _autograd_function
from ._load import _C

_data = torch._C.TensorBase.__dict__["data"]
_function_apply = torch.autograd.Function.__dict__["apply"].__func__
_hooks_init = saved_tensors_hooks.__init__


def _is_ours(t):
    return isinstance(t, torch.Tensor) and _C._wrapper_info(t) is not None


def _get_data(self):
    if _C._stack_depth():
        info = _C._wrapper_info(self)
        if info is not None and info[0] == "batched":
            # the value under a batched tensor holds every example: .data would hand one
            # example's code the whole batch (torch.func refuses it too)
            raise RuntimeError(
                "functorch_lite.vmap: reading `.data` of a batched tensor inside vmap is not "
                "allowed: it would expose the whole batch to code written for one example. Use "
                "the tensor itself (or .detach() for a value without gradient history)."
            )
    return _data.__get__(self, type(self))


def _set_data(self, value):
    if _C._stack_depth() and (_is_ours(self) or _is_ours(value)):
        raise RuntimeError(
            "functorch_lite: mutating directly with `.data` inside functorch transform is not "
            "allowed (here a functorch_lite transform): it would swap a tensor's contents behind "
            "autograd's back. Use an in-place operation under torch.no_grad() (e.g. "
            "t.copy_(value)) outside the transform, or return the new value."
        )
    _data.__set__(self, value)


def _apply(cls, *args, **kwargs):
    if not _C._front_active():
        return _function_apply(cls, *args, **kwargs)
    if not _is_setup_context_defined(cls.setup_context):
        raise RuntimeError(
            f"In order to use an autograd.Function with functorch transforms (vmap, grad, jvp, "
            f"jacrev, ...), it must override the setup_context staticmethod. "
            f"functorch_lite: {cls.__name__} defines forward(ctx, ...) without setup_context; "
            f"move the ctx work of forward into setup_context(ctx, inputs, output). For more "
            f"details, please see https://pytorch.org/docs/main/notes/extending.func.html"
        )
    # As torch's apply does for setup_context-style Functions: forward sees defaults filled in.
    bound = inspect.signature(cls.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return _autograd_function.custom_function_call(cls, bound.args, bound.kwargs)


def _guard_pack(pack_hook, recomputes):
    def pack(t):
        if not _is_ours(t):
            return pack_hook(t)
        if recomputes and _C._num_differentiating_levels() > 1:
            raise RuntimeError(
                "functorch_lite: torch.utils.checkpoint inside two or more nested grad/jvp "
                "transforms (e.g. grad of grad, hessian) is not supported: its recomputation "
                "would give wrong higher-order derivatives. Checkpointing works under one grad "
                "level (grad, vmap(grad)); call the function without checkpoint here."
            )
        if not recomputes:
            _packed_levels().add(_C._wrapper_info(t)[1])
        before = sys.getrefcount(t)
        packed = pack_hook(t)
        # References to t the returned object holds are the graph's own; any other new one was
        # stored elsewhere by the hook.
        held = sum(1 for leaf in tree_leaves(packed) if leaf is t)
        if sys.getrefcount(t) - held > before:
            raise RuntimeError(
                "functorch_lite: a saved-tensor pack hook kept a reference to a tensor of a "
                "functorch_lite transform (e.g. stored it in a list), which would leak the "
                "transform's wrapper out of it. Return what the hook packs instead of storing "
                "it, or store a plain copy (t.detach().clone() outside the transform)."
            )
        return packed

    pack.__wrapped__ = pack_hook
    return pack


_local = threading.local()


def _packed_levels():
    """Ids of the levels whose tensors a user's saved-tensor hook packed (this thread)."""
    levels = getattr(_local, "levels", None)
    if levels is None:
        levels = _local.levels = set()
    return levels


def hooks_packed_at(level):
    """Whether a saved-tensor hook (not checkpoint's) packed a tensor of `level`; forgets it."""
    levels = getattr(_local, "levels", None)
    if not levels or level not in levels:
        return False
    levels.discard(level)
    return True


def _is_dead_ours(t):
    info = isinstance(t, torch.Tensor) and _C._wrapper_info(t)
    return bool(info) and not info[-1]


def _guard_unpack(unpack_hook):
    # vjp_fn (so jacrev, hessian) runs the backward after vjp's level has gone: a hook that
    # computes on the saved wrapper there (save_on_cpu's t.to(device)) gets a plain tensor cut
    # from the transform's graph (or, under an outer jvp, a wrapper without its tangent), and the
    # derivatives come out wrong (zeros under hessian). Returning the packed tensor itself is fine.
    def unpack(packed):
        out = unpack_hook(packed)
        leaves = tree_leaves(packed)
        if any(_is_dead_ours(leaf) for leaf in leaves) and not any(out is leaf for leaf in leaves):
            raise RuntimeError(
                "functorch_lite: a saved-tensor unpack hook computed on a tensor of a transform "
                "that has already returned: vjp_fn (also inside jacrev and hessian) runs the "
                "backward after vjp's level is gone, so hooks that transform the saved tensor "
                "(torch.autograd.graph.save_on_cpu, say) would cut it from the graph and give "
                "wrong derivatives. Use grad (its backward runs inside the transform), or call "
                "the function without the hook."
            )
        return out

    unpack.__wrapped__ = unpack_hook
    return unpack


def _init_hooks(self, pack_hook, unpack_hook):
    recomputes = isinstance(self, _checkpoint_hook)
    _hooks_init(self, _guard_pack(pack_hook, recomputes), _guard_unpack(unpack_hook))


def install():
    if torch.autograd.Function.__dict__["apply"].__func__ is not _apply:
        torch.Tensor.data = property(_get_data, _set_data, doc=_data.__doc__)
        torch.autograd.Function.apply = classmethod(_apply)
        saved_tensors_hooks.__init__ = _init_hooks
