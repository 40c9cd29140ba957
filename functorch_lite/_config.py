"""Build information and run-time switches."""

import torch

from ._load import _C
from .version import __version__


def show_config(file=None):
    """Prints (and returns as a dict) how functorch_lite was built and what it uses."""
    cfg = {
        "functorch_lite": __version__,
        "built with torch": _C._built_with_torch,
        "running with torch": torch.__version__,
        "CUDA available in this torch": bool(torch.version.cuda) and torch.cuda.is_available(),
        "torch CUDA version": torch.version.cuda,
        "dispatch keys used": ", ".join(_C._used_keys),
        "operators with a back kernel": _C._num_back_kernels(),
        "vmap fallback mode": _C._get_fallback_mode(),
    }
    width = max(len(k) for k in cfg)
    text = "\n".join(f"{k.ljust(width)} : {v}" for k, v in cfg.items())
    print(text, file=file)
    return cfg


def set_vmap_fallback(mode):
    """Chooses what happens when vmap meets an op with no batching rule.

    'warn' (default): run a for-loop over the batch and warn once per op.
    'error': raise instead (tests use it to prove that an op has a real rule).
    'quiet': run the for-loop silently.
    The environment variable FUNCTORCH_LITE_VMAP_FALLBACK sets the initial mode.
    """
    if not isinstance(mode, str):
        raise TypeError(f"set_vmap_fallback: mode must be a str, got {type(mode).__name__}")
    _C._set_fallback_mode(mode)


def get_vmap_fallback():
    """Returns the current vmap fallback mode ('warn', 'error' or 'quiet')."""
    return _C._get_fallback_mode()
