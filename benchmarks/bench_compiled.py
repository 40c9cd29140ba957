"""torch.compile of steps that call the transforms: functorch_lite vs torch.func, eager and
compiled (fullgraph=True), side by side in one process on the same inputs.

Each workload is one step function written once and called with either library's module (`lib`
is torch.func or functorch_lite), so both compile the same code. Four contenders per row:
torch.func eager, functorch_lite eager, torch.compile of the torch.func step and of the
functorch_lite step. All four must agree (checked once before timing); times are medians over
interleaved rounds (bench_transforms.Timing) and ratios are paired per round, against torch.func
eager. Compile time is not timed (each compiled step is warmed up first).

A module of benchmarks/run.py (`python benchmarks/run.py --only compiled`); quick=True uses tiny
sizes, one workload and the aot_eager backend (the smoke test must not spend minutes in
Inductor).
"""

import time

import torch
import torch._dynamo
import torch.func as tf
import torch.nn.functional as F
from bench_transforms import Timing, _fmt_ratio, _fmt_time, paired_ratio
from torch.utils._pytree import tree_flatten

import functorch_lite as ft

# --------------------------------------------------------------------------------------------
# steps (module-level functions: a transform of a function defined inside the compiled step that
# captures its variables would run eagerly, see docs/compile.md)


def _mlp_loss(p, xi, yi):
    w1, b1, w2, b2 = p
    h = torch.tanh(xi @ w1.T + b1)
    return F.cross_entropy((h @ w2.T + b2)[None], yi[None])


def _psg_clip_step(lib):
    def step(p, x, y):
        g = lib.vmap(lib.grad(_mlp_loss), in_dims=(None, 0, 0))(p, x, y)
        n = x.shape[0]
        norms = torch.stack([gi.reshape(n, -1).norm(dim=1) for gi in g]).norm(dim=0)
        c = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        return [torch.tensordot(c, gi, dims=1) for gi in g]

    return step


def wl_psg_clip(quick):
    torch.manual_seed(0)
    din, hidden, B = (8, 16, 4) if quick else (64, 128, 32)
    p = (torch.randn(hidden, din) * 0.1, torch.zeros(hidden), torch.randn(10, hidden) * 0.1, torch.zeros(10))
    x, y = torch.randn(B, din), torch.randint(0, 10, (B,))
    return f"per-example grads + clip, MLP {din}-{hidden}-10, B={B}", _psg_clip_step, (p, x, y)


def _predict(w, b, x):
    return torch.tanh(w @ x + b)


def _vmap_jacrev_step(lib):
    def step(w, b, xs):
        return lib.vmap(lib.jacrev(_predict, argnums=2), in_dims=(None, None, 0))(w, b, xs).sum(0)

    return step


def wl_vmap_jacrev(quick):
    torch.manual_seed(0)
    B, dout, din = (4, 5, 3) if quick else (64, 33, 31)
    return (
        f"vmap(jacrev(predict)), B={B}, Din={din}, Dout={dout}",
        _vmap_jacrev_step,
        (torch.randn(dout, din), torch.randn(dout), torch.randn(B, din)),
    )


def _sin_sum(x):
    return x.sin().sum()


def _hvp_step(lib):
    def step(x, t):
        return lib.jvp(lib.grad(_sin_sum), (x,), (t,))[1] * 2

    return step


def wl_hvp(quick):
    n = 32 if quick else 2048
    torch.manual_seed(0)
    return f"hvp = jvp(grad(sin().sum())), {n} elements", _hvp_step, (torch.randn(n), torch.randn(n))


def _hessian_loss(x):
    return (x.sin() * x.cos().sum()).sum()


def _hessian_step(lib):
    def step(x):
        return lib.hessian(_hessian_loss)(x)

    return step


def wl_hessian(quick):
    n = 8 if quick else 128
    torch.manual_seed(0)
    return f"hessian, {n} inputs", _hessian_step, (torch.randn(n),)


def _dp_step(lib):
    """A whole DP-SGD step: per-example grads, clip, one noise draw, the SGD update."""
    inner = _psg_clip_step(lib)

    def step(p, x, y, noise):
        g = inner(p, x, y)
        return [w - 0.1 * (gi + 1.1 * n) / x.shape[0] for w, gi, n in zip(p, g, noise)]

    return step


def wl_dp_step(quick):
    title, _, (p, x, y) = wl_psg_clip(quick)
    noise = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i, w in enumerate(p)]
    return (
        title.replace("per-example grads + clip", "DP-SGD step (clip, noise, update)"),
        _dp_step,
        (p, x, y, noise),
    )


WORKLOADS = [wl_psg_clip, wl_dp_step, wl_vmap_jacrev, wl_hvp, wl_hessian]
NAMES = ("torch.func eager", "functorch_lite eager", "torch.func compiled", "functorch_lite compiled")


def bench(make, quick, log=None):
    title, make_step, args = make(quick)
    backend = "aot_eager" if quick else "inductor"
    torch._dynamo.reset()
    steps = {
        NAMES[0]: make_step(tf),
        NAMES[1]: make_step(ft),
        NAMES[2]: torch.compile(make_step(tf), backend=backend, fullgraph=True),
        NAMES[3]: torch.compile(make_step(ft), backend=backend, fullgraph=True),
    }
    ref = tree_flatten(steps[NAMES[0]](*args))[0]
    notes, compile_s = [], {}
    for name, f in steps.items():
        t0 = time.perf_counter()
        out = tree_flatten(f(*args))[0]
        if "compiled" in name:  # the first call compiles
            compile_s[name] = time.perf_counter() - t0
            if log:
                log(f"[{compile_s[name]:6.1f} s] compiled {title}: {name} (compile + first call)")
        if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(out, ref)):
            notes.append(f"MISMATCH: {name}")
    rounds, min_time = (2, 0.005) if quick else (15, 0.05)
    times = Timing(rounds, min_time, "cpu").run({n: (lambda f=f: f(*args)) for n, f in steps.items()})
    base = times[NAMES[0]]
    rows = [
        dict(
            contender=n,
            seconds=sorted(times[n])[len(times[n]) // 2],
            ratio=paired_ratio(times[n], base),
        )
        for n in NAMES
    ]
    return dict(title=title, backend=backend, rows=rows, notes=notes, compile_s=compile_s)


def bench_transform_workload(make, quick, log=None):
    """A workload of bench_transforms (the transformed functions built once, called on fixed
    inputs), eager and compiled, both libraries; a compile that fails with fullgraph=True is
    retried without it and noted."""
    import bench_transforms

    w = make("cpu", quick)
    backend = "aot_eager" if quick else "inductor"
    torch._dynamo.reset()
    steps, notes, compile_s = {NAMES[0]: w["tf"], NAMES[1]: w["ft"]}, [], {}
    for name, fn in ((NAMES[2], w["tf"]), (NAMES[3], w["ft"])):
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        t0 = time.perf_counter()
        try:
            compiled()
        except Exception as e:  # a graph break, or a backend that refuses the graph: say so
            notes.append(f"{name}: fullgraph fails ({bench_transforms._first_line(e)[:70]})")
            torch._dynamo.reset()
            compiled = torch.compile(fn, backend=backend)
            t0 = time.perf_counter()
            try:
                compiled()
            except Exception as e2:
                notes.append(f"{name}: compile fails, eager used ({bench_transforms._first_line(e2)[:70]})")
                compiled = fn
                t0 = time.perf_counter()
                compiled()
        compile_s[name] = time.perf_counter() - t0
        steps[name] = compiled
        if log:
            log(f"[{compile_s[name]:6.1f} s] compiled {w['name']}: {name} (compile + first call)")
    ref = tree_flatten(steps[NAMES[0]]())[0]
    for name, f in steps.items():
        out = tree_flatten(f())[0]
        if not all(torch.allclose(a, b, rtol=w["rtol"] * 10, atol=w["atol"] * 10) for a, b in zip(out, ref)):
            notes.append(f"MISMATCH: {name}")
    rounds, min_time = (2, 0.005) if quick else (7, 0.05)
    times = Timing(rounds, min_time, "cpu").run(dict(steps))
    base = times[NAMES[0]]
    rows = [
        dict(contender=n, seconds=sorted(times[n])[len(times[n]) // 2], ratio=paired_ratio(times[n], base))
        for n in NAMES
    ]
    return dict(title=w["name"], backend=backend, rows=rows, notes=notes, compile_s=compile_s)


def run(quick=False, log=None):
    makes = WORKLOADS[:1] if quick else WORKLOADS
    results = [bench(m, quick, log) for m in makes]
    if not quick:  # every workload of the transforms section, compiled
        import bench_transforms

        results += [bench_transform_workload(m, quick, log) for m in bench_transforms.WORKLOADS]
    return results


def markdown(results):
    lines = [
        "| workload | backend | "
        + " | ".join(NAMES)
        + " | compile time: torch.func / functorch_lite | notes |",
        "| --- | --- |" + " ---: |" * len(NAMES) + " ---: | --- |",
    ]
    for r in results:
        cells = [f"{_fmt_time(row['seconds'])} ({_fmt_ratio(row['ratio'])})" for row in r["rows"]]
        c = r["compile_s"]
        lines.append(
            f"| {r['title']} | {r['backend']} | "
            + " | ".join(cells)
            + f" | {c[NAMES[2]]:.1f} s / {c[NAMES[3]]:.1f} s | {'; '.join(r['notes'])} |"
        )
    lines.append("")
    lines.append(
        "Time per call (ratio to torch.func eager in the same round, lower is better); compiled ="
        " torch.compile(step, fullgraph=True); compile time = the first call of each compiled step"
        " (tracing, AOTAutograd and the backend; the run's first compile also pays Inductor's"
        " start-up), not included in the time per call."
    )
    return "\n".join(lines)
