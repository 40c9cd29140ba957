"""Loads functorch_lite._C and checks that it can work in this process, or raises ImportError."""

import torch

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        f"functorch_lite: the C++ extension functorch_lite._C could not be loaded ({e}). It is "
        "compiled against the torch installed at build time: install torch first, then "
        "`pip install --no-build-isolation .` in the functorch_lite checkout."
    ) from e


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


if _major_minor(torch.__version__) != _major_minor(_C._built_with_torch):
    raise ImportError(
        f"functorch_lite was built against torch {_C._built_with_torch} but torch "
        f"{torch.__version__} is installed; rebuild it with `pip install --no-build-isolation .`"
    )

try:
    _C._initialize()
except RuntimeError as e:
    raise ImportError(
        f"functorch_lite cannot run with torch {torch.__version__}: {e} "
        f"(functorch_lite relies on the dispatch keys {', '.join(_C._used_keys)})"
    ) from None
