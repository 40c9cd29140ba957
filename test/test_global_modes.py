"""torch's global modes around and inside the transforms (issue 13): each behaves as in torch.func
(same values, same dtypes and devices, the mode restored afterwards) or gives a clear error.

Already covered elsewhere, not repeated here: inference_mode around and inside transforms and
anomaly detection under nested transforms (test_conformance.py), torch.utils.checkpoint and
saved-tensor hooks inside grad and vmap(grad) (test_conformance_api.py).
"""

import contextlib

import pytest
import torch
import torch.func as tf
import torch.utils.checkpoint as cp
from test_conformance_api import _loop_grads  # the per-example autograd referee

import functorch_lite as ft

x = torch.tensor([0.3, -1.2, 2.0])
X = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]])
ONES = torch.ones(3)
W = torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.75, -0.5], [0.1, 0.2, 0.3]])


def f(t):
    return (t.sin() * t).sum()


# name -> call(lib): one of each transform, and the usual nestings
CASES = {
    "vmap": lambda L: L.vmap(torch.sin)(X),
    "grad": lambda L: L.grad(f)(x),
    "grad_and_value": lambda L: L.grad_and_value(f)(x),
    "vjp": lambda L: L.vjp(torch.sin, x)[1](ONES),
    "jvp": lambda L: L.jvp(torch.sin, (x,), (ONES,)),
    "jacrev": lambda L: L.jacrev(torch.sin)(x),
    "jacfwd": lambda L: L.jacfwd(torch.sin)(x),
    "hessian": lambda L: L.hessian(f)(x),
    "vmap_grad": lambda L: L.vmap(L.grad(f))(X),
    "grad_grad": lambda L: L.grad(L.grad(lambda t: t.sin() * t))(torch.tensor(0.7)),
}


@pytest.fixture
def restore_globals():
    """Every global these tests change comes back, even when a test fails."""
    dtype = torch.get_default_dtype()
    grad = torch.is_grad_enabled()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    anomaly = torch.is_anomaly_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_default_device(None)
    torch.set_grad_enabled(grad)
    torch.use_deterministic_algorithms(det, warn_only=det_warn)
    torch.autograd.set_detect_anomaly(anomaly)


def _same(ours, theirs):
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)):
        assert (a.dtype, a.device, a.requires_grad) == (b.dtype, b.device, b.requires_grad)


# mode name -> a context manager around the transform call
AROUND = {
    "no_grad": torch.no_grad,
    "enable_grad": torch.enable_grad,
    "set_grad_enabled_false": lambda: torch.set_grad_enabled(False),
    "anomaly": lambda: torch.autograd.set_detect_anomaly(True),
    "deterministic": None,  # a global switch, set in the test
    "default_dtype_float64": None,
    "autocast_cpu_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}


@contextlib.contextmanager
def _around(mode):
    if mode == "deterministic":
        torch.use_deterministic_algorithms(True)
        yield
    elif mode == "default_dtype_float64":
        torch.set_default_dtype(torch.float64)
        yield
    else:
        with AROUND[mode]():
            yield


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", sorted(AROUND))
def test_mode_around_transform(mode, case, restore_globals):
    grad_before = torch.is_grad_enabled()
    with _around(mode):
        state = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_default_dtype())
        ours = CASES[case](ft)
        assert ft._C._stack_depth() == 0
        assert state == (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_default_dtype())
        theirs = CASES[case](tf)
    _same(ours, theirs)
    assert torch.is_grad_enabled() == grad_before


def _inside(mode):
    def g(t):
        with _around(mode):
            return (t.sin() * t).sum() + (t * t.detach()).sum()

    return g


INSIDE_APIS = {
    "vmap": lambda L, g: L.vmap(g)(X),
    "grad": lambda L, g: L.grad(g)(x),
    "vmap_grad": lambda L, g: L.vmap(L.grad(g))(X),
    "jacrev": lambda L, g: L.jacrev(g)(x),
    "jacfwd": lambda L, g: L.jacfwd(g)(x),
    "hessian": lambda L, g: L.hessian(g)(x),
}


@pytest.mark.parametrize("api", sorted(INSIDE_APIS))
@pytest.mark.parametrize("mode", sorted(set(AROUND) - {"autocast_cpu_bf16", "default_dtype_float64"}))
def test_mode_inside_transform(mode, api, restore_globals):
    # no_grad inside hides the block from the transform (zero gradient contribution), as in torch.func.
    ours = INSIDE_APIS[api](ft, _inside(mode))
    theirs = INSIDE_APIS[api](tf, _inside(mode))
    _same(ours, theirs)


def test_no_grad_inside_grad_gives_the_gradient_of_the_rest():
    def g(t):
        with torch.no_grad():
            hidden = (t**3).sum()
        return hidden + (2 * t).sum()

    torch.testing.assert_close(ft.grad(g)(x), torch.full((3,), 2.0))
    torch.testing.assert_close(ft.vmap(ft.grad(g))(X), torch.full((2, 3), 2.0))


def test_set_grad_enabled_false_around_grad_keeps_it_off_after():
    torch.set_grad_enabled(False)
    try:
        torch.testing.assert_close(ft.grad(f)(x), tf.grad(f)(x))
        assert not torch.is_grad_enabled()
        # vjp_fn called with grad disabled returns a result without a graph, as torch.func's
        _, vjp_fn = ft.vjp(torch.sin, x.clone().requires_grad_())
        assert vjp_fn(torch.ones(3))[0].grad_fn is None
    finally:
        torch.set_grad_enabled(True)


def test_default_dtype_float64_factories_inside_transforms(restore_globals):
    torch.set_default_dtype(torch.float64)
    cases = {
        "vmap_ones": lambda L: L.vmap(lambda t: t + torch.ones(3))(X),
        "vmap_full": lambda L: L.vmap(lambda t: t * torch.full((3,), 1.5))(X),
        "vmap_tensor": lambda L: L.vmap(lambda t: t * torch.tensor([1.0, 2.0, 3.0]))(X),
        "grad_arange": lambda L: L.grad(lambda t: (t * torch.arange(3.0)).sum())(x),
        "jacfwd_linspace": lambda L: L.jacfwd(lambda t: t * torch.linspace(0, 1, 3))(x),
        "hessian_ones": lambda L: L.hessian(lambda t: (t * t * torch.ones(3)).sum())(x),
        "vjp_zeros": lambda L: L.vjp(lambda t: t + torch.zeros(3), x)[1](torch.ones(3)),
    }
    for name, call in cases.items():
        ours, theirs = call(ft), call(tf)
        _same(ours, theirs)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_set_default_device(device, restore_globals):
    # set_default_device installs a torch function mode; grad's marking of its inputs used to go
    # through it into the public requires_grad_, which refuses calls inside transforms.
    torch.set_default_device(device)
    for name, call in CASES.items():
        ours, theirs = call(ft), call(tf)
        _same(ours, theirs)
    # factories inside the function follow the default device in both libraries
    for L in (ft, tf):
        if device == "meta":
            with pytest.raises(RuntimeError, match="is not on the expected device"):
                L.vmap(lambda t: t + torch.ones(3))(X)
        else:
            L.vmap(lambda t: t + torch.ones(3))(X)
    meta = torch.empty(2, 3, device="meta")
    assert ft.vmap(ft.grad(f))(meta).device.type == "meta"


def test_other_torch_function_modes_around_grad():
    class Counting(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        got = ft.vmap(ft.grad(f))(X)
    torch.testing.assert_close(got, tf.vmap(tf.grad(f))(X))
    assert Counting.calls > 0


def test_deterministic_algorithms_with_scatter_and_index_ops(restore_globals):
    torch.use_deterministic_algorithms(True)
    idx = torch.tensor([0, 2, 0])
    cases = {
        "vmap_grad_index_add": lambda L: L.vmap(
            L.grad(lambda t: torch.zeros(3).index_add(0, idx, t).pow(2).sum())
        )(X),
        "vmap_scatter_add": lambda L: L.vmap(lambda t: torch.zeros(3).scatter_add(0, idx, t))(X),
        "vmap_index_put_accumulate": lambda L: L.vmap(
            lambda t: torch.zeros(3).index_put((idx,), t, accumulate=True)
        )(X),
        "jacrev_gather": lambda L: L.jacrev(lambda t: t.gather(0, idx))(x),
        "hessian_indexing": lambda L: L.hessian(lambda t: (t[idx] ** 3).sum())(x),
    }
    for name, call in cases.items():
        _same(call(ft), call(tf))


# ------------------------------------------------------------------------------------------------
# autocast


def _linear_loss(t):
    return (t @ W).float().pow(2).sum()


@pytest.mark.parametrize("api", ["vmap", "jacfwd", "jacrev", "vmap_grad", "hessian"])
def test_autocast_around_transform_casts_as_torch_func(api):
    calls = {
        "vmap": lambda L: L.vmap(lambda t: t @ W)(X),
        "jacfwd": lambda L: L.jacfwd(lambda t: t @ W)(x),
        "jacrev": lambda L: L.jacrev(lambda t: t @ W)(x),
        "vmap_grad": lambda L: L.vmap(L.grad(_linear_loss))(X),
        "hessian": lambda L: L.hessian(_linear_loss)(x),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = calls[api](ft), calls[api](tf)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("api", sorted(INSIDE_APIS))
def test_autocast_inside_transform_casts_as_torch_func(api):
    # It was silently ignored, then refused: handing an op down restored the autocast state of the
    # moment the level was pushed. Now the state of the moment goes down with the op and grad
    # wrappers carry their value's autocast keys (NOTE [Autocast and levels]).
    def g(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = t @ W
        assert y.dtype == torch.bfloat16
        return y.float().pow(2).sum()

    ours, theirs = INSIDE_APIS[api](ft, g), INSIDE_APIS[api](tf, g)
    _same(ours, theirs)
    assert ft._C._stack_depth() == 0
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("api", ["vmap", "jacfwd", "jacrev"])
def test_autocast_inside_transform_output_dtype(api):
    def h(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return t @ W

    ours, theirs = INSIDE_APIS[api](ft, h), INSIDE_APIS[api](tf, h)
    assert ours.dtype == theirs.dtype == torch.bfloat16 or api == "jacrev"
    _same(ours, theirs)


def test_autocast_disabled_inside_an_autocast_around():
    def g(t):
        with torch.autocast("cpu", enabled=False):
            return (t @ W).pow(2).sum()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _same(ft.vmap(ft.grad(g))(X), tf.vmap(tf.grad(g))(X))
        _same(ft.vmap(lambda t: t @ W)(X), tf.vmap(lambda t: t @ W)(X))


def test_autocast_inside_that_changes_nothing_is_allowed():
    def g(t):
        with torch.autocast("cpu", enabled=False):
            return (t @ W).pow(2).sum()

    torch.testing.assert_close(ft.vmap(ft.grad(g))(X), tf.vmap(tf.grad(g))(X))
    with torch.autocast("cpu", dtype=torch.bfloat16):

        def h(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return t @ W

        torch.testing.assert_close(ft.vmap(h)(X), tf.vmap(h)(X))


# ------------------------------------------------------------------------------------------------
# saved-tensor hooks


def test_saved_tensor_hooks_around_transforms():
    # torch.func refuses saved-tensor hooks; ours run them (docs/index.md), with torch.autograd's
    # gradients.
    packed = []

    def pack(u):
        packed.append(1)
        return u * 1

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
        got = ft.vmap(ft.grad(f))(X)
        single = ft.grad(f)(x)
    torch.testing.assert_close(got, _loop_grads(f, X))
    torch.testing.assert_close(single, _loop_grads(f, x[None])[0])
    assert packed


def _on_cpu(t):
    with torch.autograd.graph.save_on_cpu():
        return (t.sin() * t).sum()


@pytest.mark.parametrize("api", ["vjp", "jacrev", "hessian", "vmap_jacrev"])
def test_save_on_cpu_where_the_backward_runs_after_the_transform_is_refused(api):
    # vjp_fn runs the backward after vjp's level is gone; save_on_cpu's unpack (t.to(device)) then
    # made a plain tensor cut from the graph: hessian returned zeros, jacrev a result with a
    # grad_fn of the dead level's graph.
    runs = {
        "vjp": lambda L: L.vjp(_on_cpu, x),  # vjp itself refuses, before any vjp_fn
        "jacrev": lambda L: L.jacrev(_on_cpu)(x),
        "hessian": lambda L: L.hessian(_on_cpu)(x),
        "vmap_jacrev": lambda L: L.vmap(L.jacrev(_on_cpu))(X),
    }
    # refused at vjp (inside jacrev/hessian too), when the hooks packed its tensors, as in torch.func
    with pytest.raises(RuntimeError, match="saved-tensor hooks .* saved tensors of its forward"):
        runs[api](ft)
    with pytest.raises(RuntimeError, match="saved tensor hooks"):
        runs[api](tf)
    assert ft._C._stack_depth() == 0


def test_save_on_cpu_where_the_backward_runs_inside_the_transform():
    torch.testing.assert_close(ft.grad(_on_cpu)(x), _loop_grads(f, x[None])[0])
    torch.testing.assert_close(ft.vmap(ft.grad(_on_cpu))(X), _loop_grads(f, X))
    # forward-over-reverse through grad: grad's backward runs inside its level
    want = torch.diag(2 * x.cos() - x * x.sin())
    torch.testing.assert_close(ft.jacfwd(ft.grad(_on_cpu))(x), want)


def test_checkpoint_under_modes_inside_vmap_grad(restore_globals):
    def block(t):
        return (t.sin() * t).sum()

    def loss(t):
        return cp.checkpoint(block, t, use_reentrant=False)

    torch.use_deterministic_algorithms(True)
    with torch.autograd.set_detect_anomaly(True):
        torch.testing.assert_close(ft.vmap(ft.grad(loss))(X), _loop_grads(block, X))
    torch.set_default_dtype(torch.float64)
    torch.testing.assert_close(ft.grad(loss)(x), _loop_grads(block, x[None])[0])
