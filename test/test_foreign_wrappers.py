"""Tensors of other libraries that wrap functorch_lite's tensors (NOTE [Recognising our tensors]
in csrc/core/tensors.h, NOTE [Foreign wrappers of our tensors] in csrc/core/dispatch.h).

torch's FunctionalTensorWrapper copies every dispatch key of the tensor it wraps, so a functional
tensor around one of ours carries our front key (DeferredInit); a Python wrapper subclass can copy
them too. Such an impl was once taken for one of ours and read as one (a segfault). Every wrapper
subclass torch has is crossed here with every transform and with repr() inside the transformed
function, and compared with torch.func:
- where torch.func returns, functorch_lite returns the same values, or raises a RuntimeError that
  says what it cannot do (naming the foreign tensor's type, or functorch_lite's own limits);
- where torch.func raises, functorch_lite raises too, or returns the values of the same
  computation without the wrapper;
- nothing crashes the interpreter.

Each wrapper runs in a subprocess of its own (this file run as a script), so that a regression
that crashes fails its tests instead of killing pytest.
"""

import json
import os
import subprocess
import sys

import pytest

TRANSFORMS = ["vmap", "grad", "vjp", "jvp", "jacrev", "jacfwd", "hessian"]
WRAPPERS = [
    "functionalize",  # torch.func.functionalize inside our transform
    "to_functional",  # torch._to_functional_tensor: a FunctionalTensorWrapper, no torch.func layer
    "functional_tensor",  # torch._subclasses.functional_tensor.FunctionalTensor + its mode
    "fake_tensor_mode",  # FakeTensorMode active around ops on our tensors
    "fake_from_tensor",  # FakeTensorMode.from_tensor of our tensor
    "wrapper_subclass",  # _make_wrapper_subclass + __torch_dispatch__
    "wrapper_subclass_keys",  # the same, copying the wrapped tensor's dispatch keys
    "dtensor",  # DTensor.from_local on a single-process gloo world
]
# Combinations where torch raises its own exception on our tensors before any of our code runs:
# (wrapper, transform or None for all) -> why.
TORCH_OWN_ERRORS = {
    ("fake_from_tensor", None): (
        "torch's meta converter (FakeTensorMode.from_tensor) does not know functorch_lite's "
        "tensors: it refuses them (UnsupportedFakeTensorException, a RuntimeError) or, for the "
        "views forward AD makes, fails inside meta_utils; ops under an active FakeTensorMode work"
    ),
}


# ------------------------------------------------------------------------------------------------
# The worker: python test_foreign_wrappers.py WRAPPER prints one JSON line per combination.


def _wrapping(wrapper):
    """run(f, x): f applied to x wrapped by `wrapper`, unwrapped again; None: the wrapper is a
    transform applied to f (functionalize)."""
    import torch

    if wrapper == "functionalize":
        return None
    if wrapper == "to_functional":

        def run(f, x):
            out = f(torch._to_functional_tensor(x))
            torch._sync(out)
            return torch._from_functional_tensor(out)

        return run
    if wrapper == "functional_tensor":
        from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

        def run(f, x):
            with FunctionalTensorMode():
                out = f(FunctionalTensor.to_functional(x))
            return torch._from_functional_tensor(out.elem)

        return run
    if wrapper == "fake_tensor_mode":
        from torch._subclasses.fake_tensor import FakeTensorMode

        def run(f, x):
            with FakeTensorMode(allow_non_fake_inputs=True):
                out = f(x)
            return x * 0 + out.shape[-1] if out.dim() else x.sum() * 0 + 1

        return run
    if wrapper == "fake_from_tensor":
        from torch._subclasses.fake_tensor import FakeTensorMode

        def run(f, x):
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                out = f(mode.from_tensor(x))
            return x * 0 + out.shape[-1] if out.dim() else x.sum() * 0 + 1

        return run
    if wrapper in ("wrapper_subclass", "wrapper_subclass_keys"):
        from torch.utils._pytree import tree_map

        class Wrapper(torch.Tensor):
            @staticmethod
            def __new__(cls, elem):
                extra = {}
                if wrapper == "wrapper_subclass_keys":
                    extra["_extra_dispatch_keys"] = torch._C._dispatch_keys(elem)
                r = torch.Tensor._make_wrapper_subclass(
                    cls,
                    elem.shape,
                    strides=elem.stride(),
                    storage_offset=elem.storage_offset(),
                    dtype=elem.dtype,
                    device=elem.device,
                    **extra,
                )
                r.elem = elem
                return r

            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                def unwrap(t):
                    return t.elem if isinstance(t, Wrapper) else t

                out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
                return tree_map(lambda t: Wrapper(t) if isinstance(t, torch.Tensor) else t, out)

            def __repr__(self):
                return f"Wrapper({self.elem!r})"

        return lambda f, x: f(Wrapper(x)).elem
    if wrapper == "dtensor":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group("gloo", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        return lambda f, x: f(DTensor.from_local(x, mesh, [Replicate()], run_check=False)).to_local()
    raise AssertionError(wrapper)


def _computation(lib, wrapper, transform, with_repr, plain=False):
    """A thunk: `transform` of lib over a function that wraps its input in `wrapper`."""
    import torch
    import torch.func

    def body(t):
        if with_repr:
            text = repr(t)
            assert isinstance(text, str) and text
        out = t.sin() * t
        if with_repr:
            repr(out)
        return out.sum() if transform in ("grad", "hessian") else out

    run = None if plain else _wrapping(wrapper)
    if plain:
        inner = body
    elif run is None:
        inner = torch.func.functionalize(body)
    else:

        def inner(x):
            return run(body, x)

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T = getattr(lib, transform)
    if transform == "vmap":
        return lambda: T(inner)(x)
    if transform == "jvp":
        return lambda: T(inner, (x,), (torch.ones_like(x),))
    if transform == "vjp":

        def vjp():
            out, fn = T(inner, x)
            return out, fn(torch.ones_like(out))

        return vjp
    return lambda: T(inner)(x[0])


def _outcome(thunk):
    try:
        return thunk(), None
    except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
        return None, e


def _close(a, b):
    import torch
    from torch.utils._pytree import tree_flatten

    fa, fb = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(fa) == len(fb) and all(
        torch.is_tensor(p) and torch.is_tensor(q) and p.shape == q.shape and torch.allclose(p, q)
        for p, q in zip(fa, fb)
    )


def _clear_error(e):
    """A RuntimeError of ours (naming functorch_lite) that says what cannot be done, not an
    internal assert."""
    text = str(e)
    return isinstance(e, RuntimeError) and "functorch_lite" in text and "INTERNAL ASSERT" not in text


def _judge(wrapper, transform, with_repr):
    import torch.func as tf

    import functorch_lite as ft

    # torch.func crashes on a subclass that copies its wrappers' keys (the same confusion in torch's
    # own code): its reference is taken as refused.
    if wrapper == "wrapper_subclass_keys":
        ref, ref_exc = None, RuntimeError("not run: torch.func crashes on this subclass")
    else:
        ref, ref_exc = _outcome(_computation(tf, wrapper, transform, with_repr))
    ours, ours_exc = _outcome(_computation(ft, wrapper, transform, with_repr))
    known = TORCH_OWN_ERRORS.get((wrapper, transform)) or TORCH_OWN_ERRORS.get((wrapper, None))
    if ref_exc is None:
        if ours_exc is None:
            return ("ok", "same values as torch.func") if _close(ours, ref) else ("fail", "values differ")
        if _clear_error(ours_exc) or known:
            return "ok", f"raises where torch.func returns: {ours_exc!r}"[:400]
        return "fail", f"unclear error where torch.func returns: {ours_exc!r}"[:400]
    if ours_exc is None:
        plain, plain_exc = _outcome(_computation(tf, wrapper, transform, False, plain=True))
        if plain_exc is None and _close(ours, plain):
            return "ok", "torch.func raises; the values of the unwrapped computation"
        return "fail", f"torch.func raises ({ref_exc!r}); other values than without the wrapper"[:400]
    if "INTERNAL ASSERT" in str(ours_exc):
        return "fail", f"internal assert: {ours_exc!r}"[:400]
    return "ok", f"both raise: {type(ours_exc).__name__}"


def _worker(wrapper):
    try:
        _wrapping(wrapper)
    except Exception as e:  # noqa: BLE001 - reported as a skip
        print(json.dumps({"skip": f"{wrapper} is not available here: {e!r}"[:300]}), flush=True)
        return
    for transform in TRANSFORMS:
        for with_repr in (False, True):
            key = f"{transform}-{'repr' if with_repr else 'plain'}"
            print(json.dumps({"start": key}), flush=True)
            status, detail = _judge(wrapper, transform, with_repr)
            print(json.dumps({"key": key, "status": status, "detail": detail}), flush=True)


# ------------------------------------------------------------------------------------------------
# The tests: one subprocess per wrapper, one test per (wrapper, transform, repr).

_RESULTS = {}


def _results(wrapper):
    if wrapper not in _RESULTS:
        env = dict(os.environ, PYTHONWARNINGS="ignore", FUNCTORCH_LITE_VMAP_FALLBACK="quiet")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), wrapper],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        started = [d["start"] for d in lines if "start" in d]
        _RESULTS[wrapper] = {
            "returncode": proc.returncode,
            "stderr": proc.stderr[-3000:],
            "skip": next((d["skip"] for d in lines if "skip" in d), None),
            "done": {d["key"]: (d["status"], d["detail"]) for d in lines if "key" in d},
            "last_started": started[-1] if started else None,
        }
    return _RESULTS[wrapper]


@pytest.mark.parametrize("with_repr", [False, True], ids=["plain", "repr"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_foreign_wrapper_of_transform_tensor(wrapper, transform, with_repr):
    r = _results(wrapper)
    if r["skip"]:
        pytest.skip(r["skip"])
    key = f"{transform}-{'repr' if with_repr else 'plain'}"
    if key not in r["done"]:
        pytest.fail(
            f"the worker for {wrapper} died (exit code {r['returncode']}) while running "
            f"{r['last_started']}; stderr:\n{r['stderr']}"
        )
    status, detail = r["done"][key]
    assert status == "ok", detail


# ------------------------------------------------------------------------------------------------
# The reported repros and the cheap checks behind them, each in a subprocess of its own too.

SNIPPETS = {
    # vmap over functionalize, repr() of the functional tensor inside: torch.func's output
    "repro_repr": """
def g(x, t):
    text = repr(x)
    assert "FunctionalTensor" in text and "BatchedTensor" in text, text
    return x * 2 + t
got = ft.vmap(torch.func.functionalize(g))(X, T)
torch.testing.assert_close(got, tf.vmap(tf.functionalize(g))(X, T))
""",
    # ... and a jvp of functorch_lite inside torch.func.functionalize: torch.func's functionalize
    # is a torch.func transform, inside which functorch_lite's transforms refuse to start (its
    # dispatch key sits above ours, so it would see the ops of the inner jvp first)
    "repro_jvp": """
def g(lib):
    return lambda x, t: lib.jvp(torch.sin, (x,), (t,))[1]
expected = tf.vmap(tf.functionalize(g(tf)))(X, T)
torch.testing.assert_close(expected, X.cos() * T)
try:
    ft.vmap(torch.func.functionalize(g(ft)))(X, T)
except RuntimeError as e:
    assert "inside a torch.func transform" in str(e), e
else:
    raise AssertionError("expected a RuntimeError")
""",
    # the same computation, functionalized without a torch.func layer, is right
    "jvp_of_functional_tensor": """
def g(x, t):
    fx, ft_ = torch._to_functional_tensor(x), torch._to_functional_tensor(t)
    out = ft.jvp(torch.sin, (fx,), (ft_,))[1]
    torch._sync(out)
    return torch._from_functional_tensor(out)
torch.testing.assert_close(ft.vmap(g)(X, T), X.cos() * T)
""",
    # a functional tensor around our tensor is not ours: nothing reads it as one
    "wrapper_info_is_none": """
def g(x):
    fx = torch._to_functional_tensor(x)
    assert ft._C._wrapper_info(fx) is None
    assert ft._C._wrapper_info(x) is not None
    assert not ft._C._is_foreign_transform_tensor(fx)
    return x
ft.vmap(g)(X)
ft.grad(lambda x: g(x).sum())(X[0])
""",
    # gradients through a functional tensor of a grad level are recorded by that level
    "grad_through_functional_tensor": """
def f(x):
    fx = torch._to_functional_tensor(x)
    out = (fx.sin() * fx).sum()
    torch._sync(out)
    return torch._from_functional_tensor(out)
torch.testing.assert_close(ft.grad(f)(X[0]), X[0].cos() * X[0] + X[0].sin())
torch.testing.assert_close(ft.vmap(ft.grad(f))(X), X.cos() * X + X.sin())
""",
    # a functional tensor made of an outer level's tensor is a value from outside to an inner one
    "outer_functional_tensor_in_inner_grad": """
def outer(x):
    fx = torch._to_functional_tensor(x)
    inner = ft.grad(lambda y: (y * fx).sum())(torch.ones(4, dtype=X.dtype))
    torch._sync(inner)
    return torch._from_functional_tensor(inner)
torch.testing.assert_close(ft.vmap(outer)(X), X)
""",
    # a __torch_dispatch__ subclass that copied our keys is refused, naming its type
    "subclass_with_our_keys_is_named": """
from torch.utils._pytree import tree_map
class CopiesKeys(torch.Tensor):
    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device,
                                                _extra_dispatch_keys=torch._C._dispatch_keys(elem))
        r.elem = elem
        return r
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        un = lambda t: t.elem if isinstance(t, CopiesKeys) else t
        return tree_map(lambda t: CopiesKeys(t) if isinstance(t, torch.Tensor) else t,
                        func(*tree_map(un, args), **tree_map(un, kwargs or {})))
for run in (lambda: ft.vmap(lambda x: CopiesKeys(x).sin().elem)(X),
            lambda: ft.grad(lambda x: CopiesKeys(x).sin().elem.sum())(X[0])):
    try:
        run()
    except RuntimeError as e:
        assert "CopiesKeys" in str(e) and "__torch_dispatch__" in str(e), e
    else:
        raise AssertionError("expected a RuntimeError")
""",
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_foreign_wrapper_scenario(name):
    code = (
        "import torch, torch.func as tf, functorch_lite as ft\n"
        "X = torch.randn(3, 4, dtype=torch.float64)\n"
        "T = torch.randn(3, 4, dtype=torch.float64)\n" + SNIPPETS[name] + "\nprint('SCENARIO OK')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0 and "SCENARIO OK" in proc.stdout, (
        f"exit code {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


if __name__ == "__main__":
    _worker(sys.argv[1])
