"""Whole DP-SGD steps, one row per library, and the speed of the Gaussian noise generators.

Steps. Every row times one whole optimizer step: the forward, every example's gradient clipped to
norm C = 1, the clipped sum, Gaussian noise of std sigma * C (sigma = 1), the division by the
batch size B and an SGD step (lr 0.05). Models (bench_dp_clip.py's): the MLP 784-512-10 at B=64
and B=256, the CNN (2 conv + 2 linear, 28x28) at B=256 and the transformer (2 pre-LN blocks,
d=128, seq 64) at B=64. Every row gets its own copy of the same initial model and the same batch:

- ``non-private``: forward, mean loss, backward, SGD step (the floor);
- ``torch.func vmap(grad)+clip``: per-example gradients by torch.func, clipped and summed by
  hand (bench_dp_clip.py's row), noise by ``torch.randn_like``, ``.grad`` set, SGD step;
- ``Opacus hooks`` / ``Opacus ghost`` / ``Opacus ew``: Opacus' ``DPOptimizer`` over the module
  wrapped with grad_sample_mode "hooks" (GradSampleModule), "ghost"
  (GradSampleModuleFastGradientClipping with DPOptimizerFastGradientClipping and
  DPLossFastGradientClipping: two backwards) and "ew" (torch's ExpandedWeights); the model goes
  through ``ModuleValidator.fix`` first (the transformer's nn.MultiheadAttention becomes
  DPMultiheadAttention). Only when opacus imports; a mode that fails on a model is a note;
- ``ft.dp auto (torch noise)``, ``ft.dp auto``, ``ft.dp secure_mode``:
  ``ft.dp.PrivateTrainer(clipping="auto").step(x, y)`` with ``noise_generator="torch"``
  (torch.randn), the default ``"philox"`` (C++ Philox fused with the clipped sum, the division
  and the ``.grad`` write) and ``secure_mode=True`` (ChaCha20 keyed by the OS, float64, snapped).

The steps add random noise, so their results are not compared (bench_dp_clip.py checks the
clipped sums). Timing as bench_dp_clip.py: every row once (a row that raises gets a note and no
time), then interleaved rounds in a rotating order, each measurement repeating the step until it
lasts min_time (bench_scaling.interleaved); ms = median over rounds, ratio = median over rounds of
row time / the non-private step's time in the same round. ``memory`` gives each row's peak extra
RSS in a fresh process.

Noise. ``noise_table`` times, at 1e5, 407050 (the MLP's parameter count) and 1e7 values:
``torch.Tensor.normal_`` in float32 and float64, ``ft.dp.gaussian_noise_`` with the Philox
generator in float32 and float64 and in secure mode on a float32 tensor (gaussian_noise_ adds the
noise in place, so it reads and writes the tensor where normal_ only writes it). Speedup = torch
normal_'s time of the same dtype / the row's, paired per round.

A module of benchmarks/run.py (`python benchmarks/run.py --only dp_steps [--memory]`), which
writes the tables into docs/performance.md; ``quick`` gives tiny sizes (the smoke test).
"""

import copy
import os
import statistics
import time

import bench_dp_clip
import torch
from bench_scaling import LR, MAX_NORM, SIGMA, _opacus, interleaved
from torch import nn

import functorch_lite as ft

NON_PRIVATE = "non-private"


def mlp(B):
    """bench_dp_clip's MLP at batch size B (quick: B // 32)."""

    def make(quick=False):
        title, model, _, _, loss_fn = bench_dp_clip.mlp(quick)
        n = max(2, B // 32) if quick else B
        x, y = torch.randn(n, 784), torch.randint(0, 10, (n,))
        return f"{title.split(', B=')[0]}, B={n}", model, x, y, loss_fn

    return make


class _RecurrentClassifier(nn.Module):
    def __init__(self, cls, d, hidden, classes):
        super().__init__()
        self.rnn = cls(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def recurrent(cls):
    """A cls(16, 64) sequence classifier (5 classes) on T=20 steps: Opacus' rows run its
    DPLSTM/DPGRU (ModuleValidator.fix swaps them in), ft.dp its recurrent rule."""

    def make(quick=False):
        d, hidden, t, n = (4, 8, 5, 4) if quick else (16, 64, 20, 64)
        torch.manual_seed(0)
        model = _RecurrentClassifier(cls, d, hidden, 5)
        x, y = torch.randn(n, t, d), torch.randint(0, 5, (n,))
        return f"{cls.__name__}({d}, {hidden}) classifier, T={t}, B={n}", model, x, y, bench_dp_clip._ce

    return make


MODELS = {
    "MLP B=64": mlp(64),
    "MLP B=256": mlp(256),
    "CNN B=256": bench_dp_clip.cnn,
    "transformer B=64": bench_dp_clip.transformer,
    "LSTM B=64": recurrent(nn.LSTM),
    "GRU B=64": recurrent(nn.GRU),
}

# --------------------------------------------------------------------------------------------
# one whole step per row: builder(model, x, y, loss_fn) -> zero-argument callable


def _sgd(module):
    return torch.optim.SGD(module.parameters(), lr=LR)


def plain_step(m, opt, x, y, loss_fn):
    """The non-private step of module m with optimizer opt: forward, mean loss, backward, step."""

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(m(x), y).mean().backward()
        opt.step()

    return step


def private_step(m, opt, x, y, loss_fn, max_grad_norm=MAX_NORM, noise_multiplier=SIGMA, **kw):
    """The ft.dp step (clipping "auto") of module m with optimizer opt, as plain_step is the
    non-private one; kw are PrivateTrainer's other options (noise_generator, secure_mode)."""
    trainer = ft.dp.PrivateTrainer(
        m,
        opt,
        loss_fn,
        max_grad_norm=max_grad_norm,
        sample_rate=0.01,  # the accountant's; the step does not sample
        expected_batch_size=x.shape[0],
        noise_multiplier=noise_multiplier,
        clipping="auto",
        **kw,
    )
    return lambda: trainer.step(x, y)


def _non_private(model, x, y, loss_fn):
    m = copy.deepcopy(model)
    return plain_step(m, _sgd(m), x, y, loss_fn)


def _torch_func(model, x, y, loss_fn):
    m = copy.deepcopy(model)
    opt = _sgd(m)
    clipped_sum = bench_dp_clip.rows(m, x, y, loss_fn, opacus=False)["torch.func vmap(grad)+clip"]
    params = dict(m.named_parameters())
    B = x.shape[0]

    def step():
        for n, s in clipped_sum().items():
            params[n].grad = (s + torch.randn_like(s) * (SIGMA * MAX_NORM)) / B
        opt.step()

    return step


class _PerExample:
    """A criterion for Opacus' DPLossFastGradientClipping: the per-example losses whatever its
    `reduction` (the benchmarks' loss functions already reduce a sequence to one loss)."""

    reduction = "mean"

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __call__(self, out, y):
        return self.loss_fn(out, y)


def _opacus_step(mode):
    def build(model, x, y, loss_fn):
        from opacus.grad_sample.utils import wrap_model
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        from opacus.validators import ModuleValidator

        m = ModuleValidator.fix(copy.deepcopy(model))
        dp = dict(noise_multiplier=SIGMA, max_grad_norm=MAX_NORM, expected_batch_size=x.shape[0])
        if mode == "ghost":
            gsm = wrap_model(m, "ghost", max_grad_norm=MAX_NORM)
            opt = DPOptimizerFastGradientClipping(_sgd(gsm), **dp)
            crit = DPLossFastGradientClipping(gsm, opt, _PerExample(loss_fn), "mean")
            loss = lambda: crit(gsm(x), y)
        else:
            gsm = wrap_model(m, mode)
            opt = DPOptimizer(_sgd(gsm), **dp)
            loss = lambda: loss_fn(gsm(x), y).mean()

        def step():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        return step

    return build


def _trainer(**kw):
    def build(model, x, y, loss_fn):
        m = copy.deepcopy(model)
        return private_step(m, _sgd(m), x, y, loss_fn, **kw)

    return build


def builders(opacus=True):
    """Row name -> builder, in the tables' order (Opacus rows only where opacus imports)."""
    out = {NON_PRIVATE: _non_private, "torch.func vmap(grad)+clip": _torch_func}
    if opacus and _opacus() is not None:
        for mode in ("hooks", "ghost", "ew"):
            out[f"Opacus {mode}"] = _opacus_step(mode)
    out["ft.dp auto (torch noise)"] = _trainer(noise_generator="torch")
    out["ft.dp auto"] = _trainer()
    out["ft.dp secure_mode"] = _trainer(secure_mode=True)
    return out


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:100].replace("|", "\\|")


def bench(make, rounds, min_time, quick=False):
    """(title, [(row, ms, ratio to non-private, note)]) for one model."""
    torch.manual_seed(0)
    title, model, x, y, loss_fn = make(quick)
    fns, notes = {}, {}
    for k, build in builders().items():
        try:
            fn = build(model, x, y, loss_fn)
            fn()  # a row that cannot run is a note, not a crash
        except Exception as e:  # noqa: BLE001
            notes[k] = f"failed: {type(e).__name__}: {_first_line(e)}"
            continue
        fns[k], notes[k] = fn, ""
        if k.startswith("Opacus") and any(
            isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()
        ):
            notes[k] = "Opacus' DPMultiheadAttention in place of nn.MultiheadAttention"
    times = interleaved(fns, rounds, min_time)
    base = times[NON_PRIVATE]
    # paired: each round's time over the same round's non-private step, so drifting load cancels
    rows = []
    for k, note in notes.items():
        if k in times:
            ratio = statistics.median(t / b for t, b in zip(times[k], base))
            rows.append((k, statistics.median(times[k]) * 1e3, ratio, note))
        else:
            rows.append((k, float("nan"), float("nan"), note))
    return title, rows


# --------------------------------------------------------------------------------------------
# peak memory, one process per row


def peak_rss_child(model_key, row, quick=False):
    """In a fresh process: peak RSS (VmHWM, reset first) over three steps of one row, minus the
    RSS before them, in MB (as bench_dp_clip.peak_rss_child)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ft.set_vmap_fallback("quiet")
    _, model, x, y, loss_fn = MODELS[model_key](quick)
    step = builders()[row](model, x, y, loss_fn)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS
    base = bench_dp_clip._status_mb("VmRSS")
    for _ in range(3):
        step()
    return bench_dp_clip._status_mb("VmHWM") - base


def memory(model_keys, quick=False, log=None):
    """Model -> row -> peak extra MB (None where the row failed), each row in its own process."""
    import subprocess
    import sys

    out = {}
    for m in model_keys:
        t0 = time.perf_counter()
        out[m] = {}
        for row in builders():
            code = (
                f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import bench_dp_steps as b; print(b.peak_rss_child({m!r}, {row!r}, {quick!r}))"
            )
            proc = subprocess.run(
                [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True
            )
            out[m][row] = float(proc.stdout.split()[-1]) if proc.returncode == 0 and proc.stdout else None
        if log:
            log(f"[{time.perf_counter() - t0:6.1f} s] dp_steps memory {m}")
    return out


# --------------------------------------------------------------------------------------------
# the noise generators

NOISE_SIZES = (100_000, 407_050, 10_000_000)
NOISE_SIZES_QUICK = (1_000, 10_000)
NOISE_ROWS = (  # (row, dtype, how); speedups are to torch normal_ of the same dtype
    ("torch normal_", torch.float32, lambda t: t.normal_()),
    ("torch normal_", torch.float64, lambda t: t.normal_()),
    ("ft Philox", torch.float32, lambda t: ft.dp.gaussian_noise_(t, 1.0, noise_generator="philox")),
    ("ft Philox", torch.float64, lambda t: ft.dp.gaussian_noise_(t, 1.0, noise_generator="philox")),
    ("ft secure_mode", torch.float32, lambda t: ft.dp.gaussian_noise_(t, 1.0, secure_mode=True)),
)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def noise_table(sizes, rounds, min_time, log=None):
    """[dict(generator, dtype, n, ns, per_s, speedup)]: one interleaved timing per size."""
    out = []
    for n in sizes:
        t0 = time.perf_counter()
        fns = {}
        for name, dtype, fill in NOISE_ROWS:
            t = torch.zeros(n, dtype=dtype)  # each row its own tensor
            fns[f"{name} {_dtype_name(dtype)}"] = lambda fill=fill, t=t: fill(t)
        times = interleaved(fns, rounds, min_time)
        for name, dtype, _ in NOISE_ROWS:
            k, ref = f"{name} {_dtype_name(dtype)}", f"torch normal_ {_dtype_name(dtype)}"
            sec = statistics.median(times[k])
            speedup = statistics.median(r / t for r, t in zip(times[ref], times[k]))
            out.append(
                dict(
                    generator=name,
                    dtype=_dtype_name(dtype),
                    n=n,
                    ns=sec / n * 1e9,
                    per_s=n / sec,
                    speedup=speedup,
                )
            )
        if log:
            log(f"[{time.perf_counter() - t0:6.1f} s] dp_steps noise n={n}")
    return out


# --------------------------------------------------------------------------------------------
# markdown


def _ms(v):
    return "-" if v != v else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}")


def markdown(models, noise, mem=None):
    """The steps table (a column per model: ms and ratio to the non-private step), the memory
    table where measured, and the noise table. `models`: [dict(key, title, rows=[dict(method,
    ms, ratio, note)])], `mem`: memory()'s result, `noise`: noise_table()'s."""
    methods = list(dict.fromkeys(r["method"] for m in models for r in m["rows"]))
    lines = [
        "**One whole DP-SGD step** (forward, clip every example's gradient to norm 1, sum, "
        "noise of std 1, divide by B, SGD step; ms, and ratio to the non-private step of the "
        "same round)",
        "",
        "| method | " + " | ".join(m["key"] for m in models) + " |",
        "|---" + "|---:" * len(models) + "|",
    ]
    for k in methods:
        cells = []
        for m in models:
            r = next((r for r in m["rows"] if r["method"] == k), None)
            cells.append("-" if r is None or r["ms"] != r["ms"] else f"{_ms(r['ms'])} ({r['ratio']:.2f}x)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "Models: " + "; ".join(f"{m['key']}: {m['title']}" for m in models) + "."]
    notes = [(m["key"], r["method"], r["note"]) for m in models for r in m["rows"] if r["note"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {key}, {k}: {note}" for key, k, note in notes]
    if mem:
        keys = [m["key"] for m in models if m["key"] in mem]
        lines += [
            "",
            "Peak extra memory of a step (peak RSS over three steps minus the RSS before them, each "
            "row in a fresh process; MB, and in brackets MB over the non-private step):",
            "",
            "| method | " + " | ".join(keys) + " |",
            "|---" + "|---:" * len(keys) + "|",
        ]
        for k in methods:
            cells = []
            for key in keys:
                v, base = mem[key].get(k), mem[key].get(NON_PRIVATE)
                cells.append(
                    "failed"
                    if v is None
                    else f"{v:.0f}"
                    if base is None
                    else f"{v:.0f} ({round(v - base):+d})"
                )
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**The Gaussian noise generators** (one thread; ns per value, values per second, and speedup "
        "over torch's `normal_` of the same dtype; ft's rows are `ft.dp.gaussian_noise_`, which adds "
        "the noise in place)",
        "",
        "| generator | dtype | values | ns/value | values/s | speedup |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['generator']} | {r['dtype']} | {r['n']:,} | {r['ns']:.2f} | {r['per_s']:.3g} | {r['speedup']:.2f}x |"
        for r in noise
    ]
    return "\n".join(lines) + "\n"
