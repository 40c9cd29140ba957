"""functorch_lite: JAX-like composable function transforms for PyTorch.

    import torch
    import functorch_lite as ft
    per_sample_grads = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0))(params, x, y)

Signatures and semantics follow torch.func. The transforms are implemented by functorch_lite's
own C++ level stack and wrapper tensors (see docs/design.md); they run torch's own autograd.
"""

from . import _guards, _repr, _rules
from ._config import get_vmap_fallback, set_vmap_fallback, show_config
from ._cpp import cmake_prefix_path, get_include, library_path  # noqa: F401  (docs/extending_cpp.md)
from ._einops import rearrange
from ._grad import grad, grad_and_value, vjp
from ._helpers import debug_unwrap, replace_all_batch_norm_modules_
from ._jac import hessian, jacfwd, jacrev, jvp
from ._linearize import linearize
from ._load import _C  # noqa: F401  (loads and checks the extension first)
from ._rules import register_vmap
from ._vmap import vmap
from .version import __version__

_repr.install()
_guards.install()
_rules.install()


from . import dp  # noqa: E402  DP-SGD toolkit (functorch_lite.dp, docs/dp.md)
from ._module import (  # noqa: E402  (after the guards are installed)
    functional_call,
    make_functional,
    make_functional_with_buffers,
    stack_module_state,
)

__all__ = [
    "__version__",
    "vmap",
    "grad",
    "grad_and_value",
    "vjp",
    "jvp",
    "jacfwd",
    "jacrev",
    "hessian",
    "linearize",
    "rearrange",
    "debug_unwrap",
    "replace_all_batch_norm_modules_",
    "functional_call",
    "stack_module_state",
    "make_functional",
    "make_functional_with_buffers",
    "show_config",
    "set_vmap_fallback",
    "get_vmap_fallback",
    "register_vmap",
    "dp",
]
