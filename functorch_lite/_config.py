"""Build information and run-time switches."""

import torch

from ._load import _C
from .version import __version__


def show_config(file=None):
    """Prints (and returns as a dict) how functorch_lite was built and what it uses.

    Args:
        file: where to print (a file-like object; default: standard output).

    Returns:
        A dict: functorch_lite's version, the torch it was built with and the one running, CUDA,
        the dispatch keys it registers on, the number of operators with a kernel and the vmap
        fallback mode.

    Example:
        >>> import io, functorch_lite as ft
        >>> cfg = ft.show_config(file=io.StringIO())
        >>> cfg["functorch_lite"] == ft.__version__, cfg["vmap fallback mode"] == ft.get_vmap_fallback()
        (True, True)
    """
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

    Args:
        mode: ``'warn'`` (default) runs a for-loop over the batch and warns once per op;
            ``'error'`` raises instead (tests use it to prove that an op has a real rule);
            ``'quiet'`` runs the for-loop silently. The environment variable
            ``FUNCTORCH_LITE_VMAP_FALLBACK`` sets the initial mode.

    Example:
        >>> import torch, functorch_lite as ft
        >>> old = ft.get_vmap_fallback()
        >>> ft.set_vmap_fallback("error")  # from here on, only real batching rules run
        >>> ft.vmap(torch.sin)(torch.zeros(2))
        tensor([0., 0.])
        >>> ft.set_vmap_fallback(old)
    """
    if not isinstance(mode, str):
        raise TypeError(f"set_vmap_fallback: mode must be a str, got {type(mode).__name__}")
    _C._set_fallback_mode(mode)


def get_vmap_fallback():
    """Returns the current vmap fallback mode (``'warn'``, ``'error'`` or ``'quiet'``).

    See :func:`set_vmap_fallback`.

    Example:
        >>> import functorch_lite as ft
        >>> ft.get_vmap_fallback() in ("warn", "error", "quiet")
        True
    """
    return _C._get_fallback_mode()
