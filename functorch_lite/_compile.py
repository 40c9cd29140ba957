"""torch.compile and functorch_lite's transforms (docs/compile.md).

NOTE [Dynamo skips the transforms]
Dynamo cannot trace our transforms: they call into _C (level stack, wrapper tensors) and make
tensors it cannot fake (our TensorImpls have no storage). So every public entry point that runs a
transform is wrapped by `eager`, which does what torch.compiler.disable does, without importing
torch._dynamo (2-3 s) at `import functorch_lite`:

- the wrapper carries `_torchdynamo_disable`, the mark Dynamo checks before tracing a call: a
  compiled function that calls a transform graph-breaks once there and runs it eagerly, with no
  warning about untraceable builtins;
- while the wrapped function runs, Dynamo's frame callback is off (set_eval_frame(None)), so the
  user's function inside the transform is not traced either;
- the wrapper's own code is marked SKIP for Dynamo's frame evaluator (its frame would otherwise be
  traced, as torch.compiler.disable's is not only because it lives in torch/_dynamo);
- while a transform runs, torch.compile'd functions called inside it (ft.vmap(torch.compile(f)))
  run eagerly: their inputs are our wrapper tensors, which Dynamo cannot fake. That is the
  "force_eager" stance of torch.compiler.set_stance, which is process-wide: set when the first
  transform starts (in any thread) and restored when the last one ends, and only when
  torch._dynamo is loaded (nothing was compiled before otherwise). Compiled code running in
  other threads meanwhile runs eagerly too.
"""

import functools
import sys
import threading

from torch._C._dynamo import eval_frame as _eval_frame

_set_eval_frame = _eval_frame.set_eval_frame

_lock = threading.Lock()
_active = 0  # transforms running (all threads) while the force_eager stance is ours
_prior = None  # the stance to restore when the last one ends
_force_eager = None


def _enter_eager_stance(ef):
    # Sets the stance as torch.compiler.set_stance("force_eager") would, without its ~10 us of
    # checks per call (this runs at every transform call once torch._dynamo is loaded).
    global _active, _prior, _force_eager
    with _lock:
        if _active == 0:
            if _force_eager is None:
                _force_eager = ef.DynamoStance("force_eager")
            _prior, ef._stance = ef._stance, _force_eager
        _active += 1


def _exit_eager_stance(ef):
    global _active, _prior
    with _lock:
        _active -= 1
        if _active == 0:
            ef._stance, _prior = _prior, None


def eager(fn):
    """fn, skipped by Dynamo (one graph break per call) and run eagerly (see the NOTE above)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        prior = _set_eval_frame(None)
        ef = sys.modules.get("torch._dynamo.eval_frame")
        if ef is not None:
            _enter_eager_stance(ef)
        try:
            return fn(*args, **kwargs)
        finally:
            if ef is not None:
                _exit_eager_stance(ef)
            _set_eval_frame(prior)

    run._torchdynamo_disable = True
    run._torchdynamo_disable_msg = "functorch_lite transforms run eagerly (docs/compile.md)"
    run._torchdynamo_orig_callable = fn
    return run


_SKIP = _eval_frame._FrameExecStrategy(_eval_frame._FrameAction.SKIP, _eval_frame._FrameAction.DEFAULT)
_eval_frame.set_code_exec_strategy(eager(lambda: None).__code__, _SKIP)


@eager
def call_eagerly(fn, args, kwargs):
    """fn(*args, **kwargs) as the body of a transform's wrapper (a closure Dynamo may have
    created while tracing the transform's factory): one graph break, then eager."""
    return fn(*args, **kwargs)


def skip_wrappers(factory):
    """Marks the functions defined inside `factory` (the wrappers a transform returns) SKIP for
    Dynamo's frame evaluator. A compiled function calling such a wrapper graph-breaks at that
    call (Dynamo inlines the wrapper up to the `eager` entry point it calls); without the mark,
    the wrapper's own frame would then be traced too, for a second graph break before that
    entry point."""
    codes = [c for c in factory.__code__.co_consts if isinstance(c, type(factory.__code__))]
    for code in codes:
        _eval_frame.set_code_exec_strategy(code, _SKIP)
    return factory
