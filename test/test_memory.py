"""Memory (issue 13): repeated transforms keep resident memory flat, nothing of a transform
(wrapper, saved tensor, level) outlives it, and no reference cycle runs through our tensors (so
freeing never waits for the cyclic garbage collector).

RSS is read from /proc/self/statm (Linux); the RSS tests are skipped elsewhere.
"""

import gc
import os
import weakref

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F

import functorch_lite as ft
from functorch_lite import dp

_STATM = "/proc/self/statm"
needs_statm = pytest.mark.skipif(not os.path.exists(_STATM), reason="needs Linux /proc/self/statm")


def _rss_bytes():
    with open(_STATM) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _flat_over(n_calls, warmup, step):
    """RSS after `warmup` calls of step() and after n_calls more: (before, after)."""
    for _ in range(warmup):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(n_calls):
        step()
    gc.collect()
    after = _rss_bytes()
    print(
        f"RSS after {warmup} warm-up calls {before / 2**20:.1f} MiB, {n_calls} calls later {after / 2**20:.1f} MiB"
    )
    return before, after


@needs_statm
def test_vmap_grad_of_an_mlp_10000_calls_keeps_rss_flat():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    def loss(p, xi, yi):
        out = ft.functional_call(model, p, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_sample = ft.vmap(ft.grad(loss), in_dims=(None, 0, 0))
    want = tf.vmap(tf.grad(lambda p, xi, yi: F.cross_entropy(tf.functional_call(model, p, (xi[None],)), yi[None])),
                   in_dims=(None, 0, 0))(params, x, y)  # fmt: skip
    torch.testing.assert_close(per_sample(params, x, y), want)

    before, after = _flat_over(10_000, 500, lambda: per_sample(params, x, y))
    assert after <= before * 1.05, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"
    assert ft._C._stack_depth() == 0


@needs_statm
def test_2000_dp_sgd_steps_keep_rss_flat():
    model = _mlp()
    trainer = dp.PrivateTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        nn.CrossEntropyLoss(reduction="none"),
        max_grad_norm=1.0,
        sample_rate=0.1,
        expected_batch_size=8,
        noise_multiplier=1.0,
        generator=torch.Generator().manual_seed(0),
        clipping="vmap",
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    before, after = _flat_over(2_000, 200, lambda: trainer.step(x, y))
    assert after <= before * 1.05, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# nothing outlives its transform


def _tracking(refs, escaped=None):
    """A function recording weakrefs to the tensors it sees and makes (wrappers, saved tensors)."""

    def f(t):
        u = t.sin()  # saved by mul's backward
        v = u * t
        w = v.exp()  # saves its output
        refs.append(weakref.ref(t))  # (its value may be the caller's input)
        for a in (u, v, w):
            refs.append(weakref.ref(a))
            info = ft._C._wrapper_info(a)
            if info is not None:
                refs.append(weakref.ref(info[3]))  # the value it wraps
        if escaped is not None:
            escaped.append(u)
        return w.sum()

    return f


TRANSFORMS = {
    "grad": lambda f, x: ft.grad(f)(x[0]),
    "vmap": lambda f, x: ft.vmap(f)(x),
    "vmap_grad": lambda f, x: ft.vmap(ft.grad(f))(x),
    "grad_vmap": lambda f, x: ft.grad(lambda t: ft.vmap(f)(t).sum())(x),
    "vjp": lambda f, x: ft.vjp(f, x[0])[1](torch.tensor(1.0)),
    "jvp": lambda f, x: ft.jvp(f, (x[0],), (torch.ones(3),)),
    "jacrev": lambda f, x: ft.jacrev(f)(x[0]),
    "jacfwd": lambda f, x: ft.jacfwd(f)(x[0]),
    "hessian": lambda f, x: ft.hessian(f)(x[0]),
    "vmap_hessian": lambda f, x: ft.vmap(ft.hessian(f))(x),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_no_tensor_of_a_transform_outlives_it(name):
    x = torch.randn(2, 3)
    # The first hessian of a process keeps its tensors in a cycle until the next gc run: torch's
    # decomposition wrappers (torch/_prims_common/wrappers.py) catch an exception on their first
    # call, whose traceback holds the frames of vjp_fn. Later calls free everything at once.
    TRANSFORMS[name](_tracking([]), x)
    refs = []
    gc.disable()
    try:
        out = TRANSFORMS[name](_tracking(refs), x)
        # freed by reference counting alone: the garbage collector is off
        alive = [r() for r in refs if r() is not None]
        assert not alive, f"{len(alive)} of {len(refs)} tensors of the transform are still alive"
    finally:
        gc.enable()
    for t in torch.utils._pytree.tree_leaves(out):
        assert ft._C._wrapper_info(t) is None
    assert ft._C._stack_depth() == 0


def test_an_escaped_tensor_keeps_nothing_but_itself_alive():
    refs, escaped = [], []
    gc.disable()
    try:
        ft.vmap(ft.grad(_tracking(refs, escaped)))(torch.randn(2, 3))
        info = ft._C._wrapper_info(escaped[0])
        assert info is not None and info[-1] is False, "the escaped tensor's level is dead"
        del info
        escaped.clear()
        alive = [r() for r in refs if r() is not None]
        assert not alive, f"{len(alive)} tensors outlived the escaped one"
    finally:
        gc.enable()


def test_vjp_fn_keeps_its_graph_until_it_is_dropped():
    refs = []
    gc.disable()
    try:
        _, vjp_fn = ft.vjp(_tracking(refs), torch.randn(3))
        assert any(r() is not None for r in refs), "vjp_fn holds the saved tensors"
        vjp_fn(torch.tensor(1.0))
        del vjp_fn
        alive = [r() for r in refs if r() is not None]
        assert not alive, f"{len(alive)} tensors outlived vjp_fn"
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------------
# no reference cycles


def _ours_in(garbage):
    found = []
    for obj in garbage:
        if isinstance(obj, torch.Tensor):
            found.append(f"tensor {tuple(obj.shape)}")
        else:
            mod = getattr(type(obj), "__module__", "") or ""
            code = getattr(obj, "f_code", None) or getattr(obj, "__code__", None)
            if mod.startswith("functorch_lite") or (
                code is not None and "functorch_lite" in code.co_filename
            ):
                found.append(repr(obj)[:100])
    return found


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_no_reference_cycles_through_our_tensors(name):
    x = torch.randn(2, 3)
    f = _tracking([])
    TRANSFORMS[name](f, x)  # first call: lazy imports and caches are not garbage
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            TRANSFORMS[name](f, x)
        gc.collect()
        ours = _ours_in(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not ours, f"reference cycles freed only by the garbage collector: {ours[:5]}"


def test_no_reference_cycles_in_a_raising_transform():
    # An exception's traceback references the frames of our entry points; nothing of ours may be
    # kept in a cycle once the exception is dropped.
    def bad(t):
        t.sin()
        raise ValueError("x")

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for api in (ft.grad, ft.vmap, ft.jacrev, ft.jacfwd):
            with pytest.raises(ValueError):
                api(bad)(torch.randn(2, 3) if api is ft.vmap else torch.randn(3))
        gc.collect()
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not tensors, f"{len(tensors)} tensors in reference cycles"


class _TiedHead(nn.Module):
    def __init__(self, vocab=23, d=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.wte(ids)))


def test_no_reference_cycles_in_the_per_layer_clipping_path():
    """The per-layer path keeps every layer's inputs and output gradients until the clipped sums
    are made; a cycle through them (a clipped-sum closure that called itself did) keeps a
    language model's (B, T, vocab) logit gradient alive until the garbage collector runs, into
    the next step's peak."""
    model = _TiedHead()
    ids, y = torch.randint(0, 23, (4, 5)), torch.randint(0, 23, (4, 5))

    def loss(out, y):
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)

    dp.clipped_grad_module(model, loss, ids, y, max_norm=1.0, method="ghost")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(2):
            dp.clipped_grad_module(model, loss, ids, y, max_norm=1.0, method="ghost")
        gc.collect()
        ours = _ours_in(gc.garbage)
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not ours and not tensors, f"freed only by the garbage collector: {ours[:5]} {len(tensors)} tensors"
