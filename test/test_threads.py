"""Transforms on several threads and in DataLoader worker processes (issue 13).

Each thread has its own level stack (docs/design.md, "What is thread-local, what is global"):
8 threads running transforms at once give the serial results, a tensor of a transform running on
one thread cannot be used on another, and DataLoader workers (forked or spawned processes) can
feed transforms and run them.
"""

import threading

import pytest
import torch
import torch.func as tf
from torch.utils.data import DataLoader, Dataset

import functorch_lite as ft

N_THREADS = 8
ITERS_PER_THREAD = 125  # 1,000 transform calls in all


def _loss(t):
    return (t.sin() * t).sum()


def _depth_checked(expected):
    """A function that records the stack depth it sees: other threads' levels must not show."""

    def f(t):
        depth = ft._C._stack_depth()
        if depth != expected:
            raise AssertionError(f"stack depth {depth} inside, expected {expected}")
        return _loss(t)

    return f


# name -> call(lib, a) with a of shape [2, 3]
PROGRAMS = {
    "vmap": lambda L, a: L.vmap(torch.sin)(a),
    "grad": lambda L, a: L.grad(_loss)(a[0]),
    "vjp": lambda L, a: L.vjp(torch.sin, a[0])[1](a[1]),
    "jvp": lambda L, a: L.jvp(torch.sin, (a[0],), (a[1],)),
    "jacrev": lambda L, a: L.jacrev(torch.sin)(a[0]),
    "jacfwd": lambda L, a: L.jacfwd(torch.sin)(a[0]),
    "hessian": lambda L, a: L.hessian(_loss)(a[0]),
    "vmap_grad": lambda L, a: L.vmap(L.grad(_loss))(a),
    "vmap_chunked": lambda L, a: L.vmap(torch.cos, chunk_size=1)(a),
    "depth_vmap_grad": lambda L, a: L.vmap(L.grad(_depth_checked(2)))(a),
    "depth_grad_grad": lambda L, a: L.grad(lambda t: L.grad(_depth_checked(2))(t).sum())(a[0]),
}
NAMES = sorted(PROGRAMS)


def _inputs(thread):
    g = torch.Generator().manual_seed(1000 + thread)
    return [torch.randn(2, 3, generator=g) for _ in range(4)]


def _job(thread, k):
    return NAMES[(thread + k) % len(NAMES)], k % 4


def test_programs_agree_with_torch_func():
    a = _inputs(0)[0]
    for name in NAMES:
        if not name.startswith("depth"):
            torch.testing.assert_close(PROGRAMS[name](ft, a), PROGRAMS[name](tf, a))


def test_eight_threads_at_once_equal_the_serial_results():
    inputs = [_inputs(i) for i in range(N_THREADS)]
    expected = {}
    for i in range(N_THREADS):
        for k in range(len(NAMES) * 4):
            name, j = _job(i, k)
            expected[(i, name, j)] = PROGRAMS[name](ft, inputs[i][j])

    start = threading.Barrier(N_THREADS)
    errors, done = [], [0] * N_THREADS

    def run(i):
        try:
            start.wait()
            for k in range(ITERS_PER_THREAD):
                name, j = _job(i, k)
                got = PROGRAMS[name](ft, inputs[i][j])
                torch.testing.assert_close(got, expected[(i, name, j)], rtol=0, atol=0)
                assert ft._C._stack_depth() == 0
                done[i] += 1
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[0]
    assert done == [ITERS_PER_THREAD] * N_THREADS
    assert ft._C._stack_depth() == 0


def test_an_exception_on_one_thread_leaves_the_others_running():
    start = threading.Barrier(4)
    results = {}

    def run(i):
        start.wait()
        try:
            for _ in range(20):
                if i == 0:
                    with pytest.raises(ValueError):
                        ft.vmap(ft.grad(lambda t: (_ for _ in ()).throw(ValueError("x"))))(torch.ones(2, 3))
                else:
                    ft.vmap(ft.grad(_loss))(torch.ones(2, 3))
                assert ft._C._stack_depth() == 0
            results[i] = "ok"
        except BaseException as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == {i: "ok" for i in range(4)}


@pytest.mark.parametrize("kind", ["vmap", "grad", "jvp"])
@pytest.mark.parametrize("user", ["plain", "in_vmap", "in_grad"])
def test_a_tensor_of_another_threads_transform_is_a_clear_error(kind, user):
    box, ready, done = {}, threading.Event(), threading.Event()
    x, X = torch.randn(3), torch.randn(2, 3)

    def owner():
        def f(t):
            box["t"] = t * 2
            ready.set()
            done.wait(60)
            return t.sum() if kind == "grad" else t

        try:
            {
                "vmap": lambda: ft.vmap(f)(X),
                "grad": lambda: ft.grad(f)(x),
                "jvp": lambda: ft.jvp(f, (x,), (x,)),
            }[kind]()
        except BaseException as e:  # noqa: BLE001
            box["owner_error"] = e
            ready.set()

    def other():
        ready.wait(60)
        use = lambda u: box["t"] + u  # noqa: E731
        try:
            if user == "plain":
                use(1)
            elif user == "in_vmap":
                ft.vmap(use)(torch.randn(2, 3))
            else:
                ft.grad(lambda u: use(u).sum())(torch.randn(3))
        except Exception as e:  # noqa: BLE001
            box["error"] = e
        box["depth"] = ft._C._stack_depth()
        done.set()

    threads = [threading.Thread(target=owner), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert "owner_error" not in box, box["owner_error"]
    assert isinstance(box.get("error"), RuntimeError), box.get("error")
    assert "not running on this thread" in str(box["error"]), box["error"]
    assert "INTERNAL ASSERT" not in str(box["error"])
    assert box["depth"] == 0
    assert ft._C._stack_depth() == 0
    # the owner's transform finished normally; after it, a grad-level tensor is a plain constant
    # on any thread, and a batched one still says it escaped.
    if kind == "vmap":
        with pytest.raises(RuntimeError, match="used after that vmap returned"):
            box["t"] + 1
    else:
        box["t"] + 1


# ------------------------------------------------------------------------------------------------
# DataLoader worker processes


class _Examples(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, generator=g), torch.randn(1, generator=g)


class _PerExampleGrads(Dataset):
    """Runs a transform inside the worker process: each example is its own gradient."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        x, _ = _Examples()[i]
        return ft.vmap(ft.grad(_loss))(torch.stack([x, 2 * x]))


def _mse(w, x, y):
    return ((x @ w - y) ** 2).sum()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_with_worker_processes_feeds_a_transform(context):
    w = torch.randn(3, 1)
    loader = DataLoader(_Examples(), batch_size=4, num_workers=2, multiprocessing_context=context)
    n = 0
    for xb, yb in loader:
        got = ft.vmap(ft.grad(_mse), in_dims=(None, 0, 0))(w, xb, yb)
        torch.testing.assert_close(got, tf.vmap(tf.grad(_mse), in_dims=(None, 0, 0))(w, xb, yb))
        n += len(xb)
    assert n == 16
    assert ft._C._stack_depth() == 0

    if context == "fork":
        # transforms inside the workers too (the fork copies this thread's empty level stack)
        batches = list(DataLoader(_PerExampleGrads(), batch_size=4, num_workers=2))
        got = torch.cat(batches)
        xs = [_Examples()[i][0] for i in range(8)]
        want = torch.stack([tf.vmap(tf.grad(_loss))(torch.stack([x, 2 * x])) for x in xs])
        torch.testing.assert_close(got, want)


def test_jvp_on_two_threads_at_once():
    # torch's dual levels are process-wide: the second thread's jvp raised "Nested forward mode
    # AD is not supported at the moment" while the first one was inside its function.
    inside = threading.Barrier(2, timeout=120)
    x = torch.tensor([0.3, -1.2, 2.0])

    def f(t):
        inside.wait()
        return t.sin() * t

    results, errors = {}, []

    def run(i):
        try:
            results[i] = ft.jvp(f, (x * (i + 1),), (torch.ones(3),))
            results[(i, "hessian")] = ft.hessian(_loss)(x * (i + 1))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            inside.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    for i in range(2):
        t = x * (i + 1)
        torch.testing.assert_close(results[i], (t.sin() * t, t.cos() * t + t.sin()))
        torch.testing.assert_close(results[(i, "hessian")], tf.hessian(_loss)(t))
    assert ft._C._stack_depth() == 0
