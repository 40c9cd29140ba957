"""Calling the user's function inside a transform."""

# torch's own errors for .backward() / torch.autograd.grad() called, inside a transformed
# function, on tensors of the transform. torch's Python engine entry refuses our tensors because
# they carry the Batched marker and names torch.vmap whatever the transform (docs/design.md,
# "Dispatch keys"); inside grad/vjp/jvp, captured tensors are lifted into the transform, where
# they have no grad_fn. Neither says what happened, so both are said again, in our terms, at the
# transform boundary. (Under vmap alone a missing grad_fn is an ordinary autograd error.)
_REFUSED_BY_ENGINE = "called inside torch.vmap"
_LIFTED_NO_GRAD_FN = "does not require grad and does not have a grad_fn"


def call_transformed(func, args, kwargs, api):
    try:
        return func(*args, **kwargs)
    except RuntimeError as e:
        msg = str(e)
        if _REFUSED_BY_ENGINE not in msg and (api == "vmap" or _LIFTED_NO_GRAD_FN not in msg):
            raise
        # torch's own text stays reachable as __cause__; on its own it misleads.
        raise RuntimeError(
            f"functorch_lite.{api}: the function being transformed called .backward() or "
            f"torch.autograd.grad() on tensors of the transform, which is not supported. Use "
            f"functorch_lite.grad or functorch_lite.vjp instead (they compose with every "
            f"transform), or call it outside the transform."
        ) from e
