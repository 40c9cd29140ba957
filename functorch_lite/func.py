"""torch.func's namespace with functorch_lite's transforms:

    import functorch_lite.func as func   # instead of: import torch.func as func

Every public name of torch.func (torch 2.13) is here, functionalize included (on torch's public
functional tensors: functorch_lite/_functionalize.py).
register_vmap (torch.library's, not torch.func's) is re-exported when functorch_lite has it.
"""

from . import _helpers
from ._einops import rearrange
from ._functionalize import functionalize
from ._grad import grad, grad_and_value, vjp
from ._jac import hessian, jacfwd, jacrev, jvp
from ._linearize import linearize
from ._module import functional_call, stack_module_state
from ._vmap import vmap

debug_unwrap = _helpers.debug_unwrap
replace_all_batch_norm_modules_ = _helpers.replace_all_batch_norm_modules_


def __getattr__(name):
    # register_vmap comes from another part of functorch_lite, which may not be there.
    if name == "register_vmap":
        import functorch_lite

        if hasattr(functorch_lite, "register_vmap"):
            return functorch_lite.register_vmap
    raise AttributeError(f"module 'functorch_lite.func' has no attribute {name!r}")


__all__ = [
    "grad",
    "grad_and_value",
    "vmap",
    "replace_all_batch_norm_modules_",
    "functionalize",
    "hessian",
    "jacfwd",
    "jacrev",
    "jvp",
    "linearize",
    "rearrange",
    "vjp",
    "functional_call",
    "stack_module_state",
    "debug_unwrap",
]
