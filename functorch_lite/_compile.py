"""torch.compile and functorch_lite's transforms (docs/compile.md).

Two mechanisms. The first, NOTE [Dynamo sees a transform call as one opaque call] below, is the
normal path: a call of what ft.vmap/grad/jvp/jacrev/jacfwd/hessian return is recorded by Dynamo
as one call that AOTAutograd traces through our levels, so it compiles into the graph. The
second is the fallback wherever a call is not recorded that way (vjp/linearize and the other
`eager` entry points, a closure Dynamo cannot describe): the call graph-breaks and runs eagerly.

NOTE [Dynamo skips the transforms]
Run eagerly inside a compiled region, a transform must not let Dynamo trace the user's function
through our wrapper tensors (they have no storage, Dynamo cannot fake them). So every public
entry point that runs a transform is wrapped by `eager`, which does what torch.compiler.disable
does, without importing torch._dynamo (about a second) at `import functorch_lite`:

- the wrapper carries `_torchdynamo_disable`, the mark Dynamo checks before tracing a call: a
  compiled function that calls such an entry point graph-breaks once there and runs it eagerly,
  with no warning about untraceable builtins;
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

import contextlib
import functools
import logging
import sys
import threading
import types
import warnings

import torch
from torch._C import _get_dispatch_mode
from torch._C import _TorchDispatchModeKey as _ModeKey
from torch._C._dynamo import eval_frame as _eval_frame
from torch.compiler import is_compiling as _is_compiling

_set_eval_frame = _eval_frame.set_eval_frame
_FAKE = _ModeKey.FAKE
_FUNCTIONAL = _ModeKey.FUNCTIONAL

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


# ------------------------------------------------------------------------------------------------
# NOTE [Dynamo sees a transform call as one opaque call]
# What ft.vmap/grad/grad_and_value/jacrev/jacfwd/hessian return is a `Transformed`: a callable
# object that remembers the factory that made it, the factory's options (constants) and the
# function it transforms. Calling it calls `_traced_call(_Callee(t), args, kwargs)`. Eagerly that
# is two Python calls in front of the transform's entry point. Under torch.compile:
#
# - `_traced_call` is registered with Dynamo as nonstrict-traceable (what
#   torch._dynamo.nonstrict_trace does): Dynamo does not trace into it; it records one call in
#   the graph, with the tensors of args/kwargs as graph inputs and everything else flattened by
#   pytree into constants.
# - `_Callee` is a pytree node with no children whose context *describes* the transformed
#   function: (factory, options, description of the inner function), down to the user's own
#   function, which must be a constant to Dynamo (a module-level function, a builtin, a method
#   of a module-level object). A transform built inside the compiled function is described as
#   well as one built outside: Dynamo traces the factories, which are plain Python.
# - AOTAutograd then traces the recorded call: flat_apply rebuilds the transform from its
#   description and runs it on FakeTensors/FunctionalTensors (SymInts with dynamic=True) under
#   make_fx; our C++ levels wrap those like any tensor, the batching rules and torch's autograd
#   formulas run on them, and what reaches the graph is plain aten ops. Inductor compiles that.
#   With backend="eager" the recorded call runs the transform eagerly.
# - Where the description fails (a lambda or a function defined inside the compiled function:
#   Dynamo cannot turn a closure it created into a constant) Dynamo graph-breaks at the call and
#   the transform runs eagerly as before (`eager` below); with fullgraph=True that is Dynamo's
#   error naming the offending input.
#
# Registering with Dynamo needs torch._dynamo, which takes about a second to import: it is done
# when torch._dynamo is imported by anything (torch.compile), through an import hook, never by
# `import functorch_lite` itself.


class Transformed:
    """A transformed function (what ft.vmap, ft.grad, ... return): call it like the function
    it transforms. It carries the function's name, docstring and signature (``__wrapped__``)."""

    def __init__(self, factory, options, func, run, wraps=True):
        if wraps and not _is_compiling():  # Dynamo traces this: the metadata is for eager users
            try:
                functools.update_wrapper(self, func)
            except (AttributeError, TypeError):  # a callable object without the usual attributes
                pass
        # after update_wrapper, which copies func's __dict__ (another Transformed's attributes)
        self._ft_factory = factory  # the public factory: rebuilds this from its description
        self._ft_options = options  # ((name, value), ...): the factory's other arguments
        self._ft_func = func
        self._ft_run = run  # run(args, kwargs): the transform's eager entry point

    def __call__(self, *args, **kwargs):
        return _traced_call(_Callee(self), args, kwargs)

    def __get__(self, obj, objtype=None):
        # as a class attribute it binds like the function it replaces
        return self if obj is None else functools.partial(self, obj)

    def __repr__(self):
        name = getattr(self._ft_factory, "__name__", "transform")
        return f"<functorch_lite.{name} of {self._ft_func!r}>"


class _Callee:
    __slots__ = ("t",)

    def __init__(self, t):
        self.t = t


class NotTraceable(RuntimeError):
    """Raised while Dynamo traces a transform call it cannot record as one call: Dynamo turns it
    into a graph break (the transform then runs eagerly), or into an error with fullgraph=True."""


def _describe(f, leaves):
    """The constant description of a transformed function (only ever run by Dynamo); the
    tensors it captures are appended to `leaves` (NOTE [Captured tensors become graph inputs])."""
    if isinstance(f, Transformed):
        return (Transformed, f._ft_factory, f._ft_options, _describe(f._ft_func, leaves))
    code = getattr(f, "__code__", None)
    if code is not None and code.co_freevars:
        try:
            f.__closure__  # noqa: B018  (readable only for functions made outside the trace)
        except AttributeError:
            raise NotTraceable(
                f"functorch_lite: the function {getattr(f, '__name__', f)!r} given to a transform "
                f"was defined inside the compiled function and captures its variables "
                f"({', '.join(code.co_freevars)}); torch.compile cannot pass such a closure "
                f"into one graph call, so this transform runs eagerly (a graph break). Define it "
                f"at module level (passing captured tensors as arguments) or outside the "
                f"compiled function to compile it."
            ) from None
    if code is None or type(f) is not _FunctionType:
        return f
    relift = _relift_of(f)
    if relift is not None:
        # a function _rebuild made: torch's flat_apply flattens the rebuilt arguments again
        # (to find modules among them), and must get the same leaves, not the module's tensors
        # as they are outside the swap
        leaves.extend(relift[1])
        return relift[0]
    try:
        namespace = f.__globals__
    except AttributeError:  # a function Dynamo made while tracing: nothing to read it by
        return f
    cells, names = [], []
    for i, cell in enumerate(f.__closure__ if code.co_freevars else ()):
        spec = _tensor_spec(cell.cell_contents, leaves)
        if spec is not None:
            cells.append((i, spec))
    for name in _tensor_globals(f):
        spec = _tensor_spec(namespace[name], leaves)
        if spec is not None:
            names.append((name, spec))
    # NOTE [Captured numbers are guarded]: a number it reads from its closure or globals is a
    # leaf too (Dynamo guards it, or makes it a symbolic input), and a string is kept in the
    # description (a constant Dynamo guards on its value): rebinding either is seen, where the
    # rebuilt function would otherwise keep the value of the first trace.
    scalars = []
    for where, key, is_str in _captured_scalars(f):
        value = f.__closure__[key].cell_contents if where == "cell" else namespace[key]
        if is_str:
            scalars.append((where, key, value))
        else:
            leaves.append(value)
            scalars.append((where, key, None))
    scalars = tuple(scalars)
    modules = _captured_modules(f)
    for (where, key), paths in modules:
        module = f.__closure__[key].cell_contents if where == "cell" else namespace[key]
        for path, kind, name in paths:
            sub = module
            for part in path:
                sub = sub._modules[part]
            leaves.append((sub._parameters if kind == "p" else sub._buffers)[name])
    if not cells and not names and not modules and not scalars:
        return f
    return (_Lifted, f, tuple(cells), tuple(names), modules, scalars)


# NOTE [Captured tensors become graph inputs]
# A recorded call rebuilds the user's function from its description, so a tensor the function
# reads from its closure or its module's globals would otherwise be baked into the graph as a
# constant (unguarded, and refused by Inductor). While Dynamo flattens the call's arguments (it
# traces this pytree flatten), such tensors (directly, or in a list/tuple/dict of tensors) are
# read from the function's closure cells and globals and returned as extra leaves: Dynamo turns
# them into graph inputs with guards, like any tensor the compiled function reads. At trace time
# the function is rebuilt around them: its code with new closure cells, and a copy of its
# globals with the lifted names replaced. A module it reads the same way (the `model` of
# `functional_call(model, params, x)` in torch.func's tutorials) stays the same object, and each
# of its parameters and buffers becomes a leaf, read through the module's own dicts so that
# Dynamo guards each of them: the recorded call then runs with the module's tensors swapped for
# those inputs (as functional_call swaps them) and restored afterwards. torch's flat_apply
# flattens the rebuilt arguments once more (looking for modules among them) before the call: a
# rebuilt function therefore remembers its description and leaves (_ft_relift) and flattens to
# them, not to the module's own tensors of that moment. Tensors and modules read by the
# functions it calls by name are still refused (_refuse_captured_tensors): the call then runs
# eagerly.
_FunctionType = type(_describe)


class _Lifted:
    """Marker of a description of a function whose captured tensors were lifted."""


def _relift_of(f):
    """(description, leaves) of a function _rebuild made, else None. Only functions made at trace
    time carry it (Dynamo sees user functions here, which never do)."""
    return f.__dict__.get("_ft_relift")


def _tensor_globals(f):
    """The names of f's globals that hold tensors now. Dynamo calls this without tracing it and
    takes the result as a constant (the mark below is what torch._dynamo.assume_constant_result
    sets): traced, the lookups would guard on the size of the module's globals dict, so any new
    global in the user's module would recompile. Reading each name then guards on its value."""
    return tuple(
        key for where, key, value in _captured(f) if where == "global" and _tensor_spec(value, []) is not None
    )


_tensor_globals._dynamo_marked_constant = True

_SCALARS = (bool, int, float, str)


def _captured_scalars(f):
    """("cell", index, is a string) and ("global", name, is a string) for the numbers and strings
    f reads from its closure and globals now. A constant to Dynamo, like _tensor_globals: the
    values are read again in _describe, in Dynamo's trace, which guards them."""
    return tuple(
        (where, key, type(value) is str) for where, key, value in _captured(f) if type(value) in _SCALARS
    )


def _captured(f):
    """("cell", index, value) for f's closure cells and ("global", name, value) for the globals
    its code names (outside Dynamo's trace: the callers are constants to it)."""
    for i, cell in enumerate(f.__closure__ or ()):
        try:
            yield "cell", i, cell.cell_contents
        except ValueError:  # an empty cell
            continue
    namespace = f.__globals__
    for name in _global_names(f.__code__):
        yield "global", name, namespace.get(name)


_captured_scalars._dynamo_marked_constant = True


def _concrete(v):
    """A number a recorded call received as a leaf, as a Python number (a symbolic one is
    specialized, which guards the graph on it)."""
    if isinstance(v, torch.SymBool):
        return bool(v)
    if isinstance(v, torch.SymInt):
        return int(v)
    if isinstance(v, torch.SymFloat):
        return float(v)
    return v


def _captured_modules(f):
    """(("cell", index) or ("global", name), paths) for each nn.Module f reads from its closure
    or globals, with the path (submodule names, "p" or "b", tensor name) of every parameter and
    buffer in it. A constant to Dynamo, like _tensor_globals (a module's structure, not its
    tensors: those are read and guarded in _describe)."""
    from torch import nn

    return tuple(
        ((where, key), _tensor_paths(value))
        for where, key, value in _captured(f)
        if isinstance(value, nn.Module)
    )


_captured_modules._dynamo_marked_constant = True


def _tensor_paths(module):
    paths = []
    for qualname, sub in module.named_modules():
        path = tuple(qualname.split(".")) if qualname else ()
        for kind, table in (("p", sub._parameters), ("b", sub._buffers)):
            paths.extend((path, kind, name) for name, t in table.items() if t is not None)
    return tuple(paths)


def _global_names(code):
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, type(code)):
            names |= _global_names(c)
    return sorted(names)


def _tensor_spec(value, leaves):
    """The pytree spec of `value` if it is a tensor or a list/tuple/dict holding only tensors
    (its tensors are appended to leaves), else None."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return "tensor"
    if isinstance(value, (list, tuple, dict)) and value:
        items = value.values() if isinstance(value, dict) else value
        if all(isinstance(v, torch.Tensor) for v in items):
            leaves.extend(items)
            return (type(value), tuple(value.keys()) if isinstance(value, dict) else len(value))
    return None


def _take(spec, it):
    if spec == "tensor":
        return next(it)
    kind, shape = spec
    if kind is dict:
        return {k: next(it) for k in shape}
    return kind(next(it) for _ in range(shape))


def _rebuild(d, it):
    if type(d) is tuple and len(d) == 4 and d[0] is Transformed:
        return d[1](_rebuild(d[3], it), **dict(d[2]))
    if type(d) is tuple and len(d) == 6 and d[0] is _Lifted:
        taken = []
        it = _Recording(it, taken)
        _, f, cells, names, modules, scalars = d
        closure = list(f.__closure__ or ())
        for i, spec in cells:
            closure[i] = types.CellType(_take(spec, it))
        namespace = f.__globals__
        if names or any(where == "global" for where, _, _ in scalars):
            namespace = dict(namespace)
            for name, spec in names:
                namespace[name] = _take(spec, it)
        for where, key, value in scalars:
            value = _concrete(next(it)) if value is None else value
            if where == "cell":
                closure[key] = types.CellType(value)
            else:
                namespace[key] = value
        g = _FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, tuple(closure) or None)
        g.__kwdefaults__ = f.__kwdefaults__
        g.__qualname__ = f.__qualname__
        g._ft_swaps = []
        for (where, key), paths in modules:
            module = f.__closure__[key].cell_contents if where == "cell" else f.__globals__[key]
            named = {".".join((*path, name)): next(it) for path, _, name in paths}
            g._ft_swaps.append((module, named))
        g._ft_lifted = (
            {f.__code__.co_freevars[i] for i, _ in cells}
            | {n for n, _ in names}
            | {f.__code__.co_freevars[key] if where == "cell" else key for (where, key), _ in modules}
        )
        g._ft_relift = (d, taken)
        return g
    return d


class _Recording:
    """An iterator that keeps what it hands out."""

    def __init__(self, it, taken):
        self.it, self.taken = it, taken

    def __iter__(self):
        return self

    def __next__(self):
        x = next(self.it)
        self.taken.append(x)
        return x


def _swaps_of(t):
    while isinstance(t, Transformed):
        t = t._ft_func
    return getattr(t, "_ft_swaps", ())


@contextlib.contextmanager
def _modules_swapped(swaps):
    """The captured modules with their lifted inputs in place of their tensors (NOTE [Captured
    tensors become graph inputs]), put back afterwards."""
    if not swaps:
        yield
        return
    from ._module import _Swapper

    swappers = []
    try:
        for module, named in swaps:
            swapper = _Swapper(module, "torch.compile")
            swappers.append(swapper)
            for name, value in named.items():
                swapper.swap(name, value)
        yield
    finally:
        for swapper in reversed(swappers):
            swapper.restore()


def _traced_call(callee, args, kwargs):
    if _get_dispatch_mode(_FAKE) is None:
        return callee.t._ft_run(args, kwargs)
    # traced by Dynamo/AOTAutograd on FakeTensors
    outer = not getattr(_tracing, "inside", False)
    try:
        if outer:  # the recorded call itself, not the ones a transform makes inside it
            _refuse_captured_tensors(callee.t)
            _refuse_constant_arguments((args, kwargs))
        _tracing.inside = True
        try:
            with _modules_swapped(_swaps_of(callee.t) if outer else ()):
                if not outer:
                    return callee.t._ft_run(args, kwargs)
                with _no_fresh_unbacked_sizes():
                    if not _symbolic_sizes((args, kwargs)):
                        return callee.t._ft_run(args, kwargs)
                    try:
                        return callee.t._ft_run(args, kwargs)
                    except Exception as e:  # noqa: BLE001 (NOTE [Symbolic sizes, then specialized ones])
                        if _RAISE_SYMBOLIC_FAILURES or _get_dispatch_mode(_FUNCTIONAL) is not None:
                            raise
                        _log.debug("functorch_lite: symbolic sizes failed (%s); specializing", e)
                        _specialize_sizes((args, kwargs))
                        return callee.t._ft_run(args, kwargs)
        finally:
            _tracing.inside = not outer
    except Exception as e:
        if not outer:
            raise
        # Dynamo turns the failure into a graph break (the transform then runs eagerly) or, with
        # fullgraph=True, into an error about the call's "output type": say why, in one line
        name = getattr(callee.t._ft_factory, "__name__", "transform").lstrip("_")
        first = str(e).strip().split("\n")[0][:200]
        warnings.warn(
            f"functorch_lite: torch.compile cannot trace this {name} call ({type(e).__name__}: "
            f"{first}); it runs eagerly there (a graph break).",
            stacklevel=2,
        )
        raise


@contextlib.contextmanager
def _no_fresh_unbacked_sizes():
    """A size that depends on values (nonzero, boolean indexing) is a fresh unbacked symbol of the
    tracer's ShapeEnv; one made inside the recorded call and not bound by its outputs is left
    pending, and Dynamo fails on it with an internal error. Such a call is refused (a graph
    break, the transform runs eagerly) with a reason, and the symbols it left are dropped."""
    mode = _get_dispatch_mode(_FAKE)
    env = getattr(mode, "shape_env", None)
    pending = getattr(env, "pending_fresh_unbacked_symbols", None)
    before = len(pending) if pending is not None else 0
    try:
        yield
    finally:
        fresh = pending is not None and len(pending) > before
        if fresh:
            del pending[before:]
    if fresh:
        raise NotTraceable(
            "a size inside the transform depends on tensor values (nonzero, boolean indexing, "
            "...), which the recorded call cannot return"
        )


def _refuse_captured_tensors(t):
    """A recorded call runs the user's function from a description: tensors and modules it
    reads from its globals or its closure (directly, or through the functions it calls by name)
    would become constants of the graph, with no guard on them. A global rebound to another
    tensor would then be silently ignored by the compiled graph (and Inductor refuses such
    constants outright). Such functions are not recorded: they run eagerly, as before."""
    while isinstance(t, Transformed):
        t = t._ft_func
    names = _captures(t, 0, set())
    if names:
        raise NotTraceable(
            f"the function {getattr(t, '__name__', t)!r} reads tensors or modules from outside "
            f"its arguments ({', '.join(sorted(set(names))[:5])}); a compiled graph would hold "
            f"them as constants without a guard. Pass them as arguments to compile the call."
        )


def _refuse_constant_arguments(tree):
    """Dynamo passes a tensor that the compiled function reads from its own globals or closure
    into the recorded call as a constant (a real tensor among the fake ones): the same staleness
    as above, and Inductor refuses it. Such calls run eagerly."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._pytree import tree_leaves

    if any(isinstance(t, torch.Tensor) and not is_fake(t) for t in tree_leaves(tree)):
        raise NotTraceable(
            "a tensor argument of the transformed function is read from the compiled function's "
            "globals or closure, which makes it a constant of the graph without a guard. Pass it "
            "as an argument of the compiled function to compile the call."
        )


def _holds_tensors(v):
    import torch.nn as nn

    if isinstance(v, (torch.Tensor, nn.Module)):
        return True
    if isinstance(v, (list, tuple)):
        return any(isinstance(x, (torch.Tensor, nn.Module)) for x in v)
    if isinstance(v, dict):
        return any(isinstance(x, (torch.Tensor, nn.Module)) for x in v.values())
    return False


def _captures(f, depth, seen):
    """Names of the tensors/modules f reads from outside its arguments (up to 4 calls deep)."""
    import inspect

    if depth > 4 or id(f) in seen:
        return []
    seen.add(id(f))
    if isinstance(f, functools.partial):
        found = (
            ["partial argument"] if any(_holds_tensors(v) for v in (*f.args, *f.keywords.values())) else []
        )
        return found + _captures(f.func, depth + 1, seen)
    owner = getattr(f, "__self__", None)
    if owner is not None and _holds_tensors(owner):
        return [f"{type(owner).__name__} (bound method's object)"]
    if not inspect.isfunction(f) and not inspect.ismethod(f):
        return []
    try:
        refs = inspect.getclosurevars(f)
    except (TypeError, ValueError):
        return []
    found = []
    lifted = getattr(
        f, "_ft_lifted", ()
    )  # graph inputs already (NOTE [Captured tensors become graph inputs])
    for name, v in {**refs.nonlocals, **refs.globals}.items():
        if name in lifted:
            continue
        if _holds_tensors(v):
            found.append(name)
        elif inspect.isfunction(v) or isinstance(v, functools.partial):
            found += _captures(v, depth + 1, seen)
    return found


_tracing = threading.local()


# NOTE [Symbolic sizes, then specialized ones]
# With dynamic shapes (dynamic=True, or Dynamo's automatic dynamic after a size changes) the
# recorded call's inputs have symbolic sizes. Our levels carry them (NOTE [Symbolic batch sizes]
# in csrc/core/levels.h), and the rules written with SymInts turn them into a graph that serves
# every size. A path that needs numbers (the for-loop fallback, per-element random draws, a rule
# not yet written for SymInts, which raises on reading a symbolic size) fails; the call is then
# traced again with the sizes specialized: int() on each symbol guards the graph on its value,
# so that call compiles once per size, as every call did before symbolic sizes were carried.
# The failed attempt is harmless where it happens first, in Dynamo's run of the call on its
# FakeTensors, which records nothing: AOTAutograd's trace, the one that builds the graph, sees
# the sizes already specialized (the ShapeEnv replaced the symbols by their values) and runs
# the specialized path once. Only the outermost recorded call decides; transforms nested in it
# run inside its attempt. Under AOTAutograd's functionalization (a FunctionalTensorMode) a failed
# attempt may already have recorded a write into an input, which a second attempt would record
# again: there the failure is raised instead (a compile error, never a doubled write).


_RAISE_SYMBOLIC_FAILURES = False  # tests and debugging: see why a call was specialized
_log = logging.getLogger("functorch_lite.compile")


def _symbolic(s):
    return isinstance(s, torch.SymInt) and s.node.maybe_as_int() is None


def _symbolic_sizes(tree):
    from torch.utils._pytree import tree_leaves

    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor) and any(_symbolic(s) for s in (*t.shape, *t.stride())):
            return True
    return False


def _specialize_sizes(tree):
    """Specializes the symbolic sizes of the inputs to their values (a guard on each)."""
    from torch.utils._pytree import tree_leaves

    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            for s in (*t.shape, *t.stride(), t.storage_offset()):
                if isinstance(s, torch.SymInt):
                    int(s)


def _register_pytree():
    from torch.utils._pytree import register_pytree_node

    def flatten(c):
        leaves = []
        return leaves, _describe(c.t, leaves)

    register_pytree_node(
        _Callee,
        flatten,
        lambda leaves, ctx: _Callee(_rebuild(ctx, iter(leaves))),
        serialized_type_name="functorch_lite._Callee",
    )


_register_pytree()


def _register_with_dynamo(trace_rules):
    i = id(_traced_call)
    trace_rules._allowed_callable_ids.add(i)
    trace_rules._nonstrict_trace_callable_ids.add(i)


class _DynamoImportHook:
    """Registers `_traced_call` with Dynamo right after torch._dynamo.trace_rules is imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch._dynamo.trace_rules":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_with_dynamo(module)

        loader.exec_module = exec_then_register
        return spec


if "torch._dynamo.trace_rules" in sys.modules:
    _register_with_dynamo(sys.modules["torch._dynamo.trace_rules"])
else:
    sys.meta_path.insert(0, _DynamoImportHook())
