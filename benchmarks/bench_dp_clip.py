"""Clipped per-example gradient sums, side by side in one process (CPU, 1 thread by default).

Rows per model: a plain non-private forward + backward of the mean loss (the baseline), torch.func
vmap(grad) + clip by hand, ft.dp.clipped_grad through functional_call, and
ft.dp.clipped_grad_module with method auto / ghost / vmap; Opacus' hooks (GradSampleModule) and
ghost clipping rows only if opacus is importable. Every row computes the same clipped sum (checked
once against clipped_grad_module's auto result before timing; noise and the optimizer step are
not included: whole DP-SGD steps are in bench_scaling.py). Times are medians over interleaved
rounds; ratio = median over rounds of row / non-private in the same round.

A module of benchmarks/run.py (`python benchmarks/run.py --only dp_clip [--memory]`), which
writes the tables into docs/performance.md. Every model takes `quick` (tiny sizes for the smoke
test).
"""

import os
import statistics
import time

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft

MAX_NORM = 1.0


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _token_ce(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def mlp(quick=False):
    hidden, B = (32, 8) if quick else (512, 256)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    return f"MLP 784-{hidden}-10, B={B}", model, torch.randn(B, 784), torch.randint(0, 10, (B,)), _ce


def cnn(quick=False):
    c1, c2, side, B = (4, 8, 8, 8) if quick else (32, 64, 28, 256)
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (side // 4) ** 2, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    return (
        f"CNN {side}x{side} (2 conv + 2 linear), B={B}",
        model,
        torch.randn(B, 1, side, side),
        torch.randint(0, 10, (B,)),
        _ce,
    )


def transformer(quick=False):
    vocab, d, heads, ff, seq, B = (50, 16, 2, 32, 8, 4) if quick else (1000, 128, 4, 2048, 64, 64)

    def layer():
        return nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=ff, dropout=0.0, batch_first=True, norm_first=True
        )

    model = nn.Sequential(nn.Embedding(vocab, d), layer(), layer(), nn.Linear(d, vocab))
    return (
        f"transformer (emb {vocab}x{d}, 2 pre-LN blocks, {heads} heads, ff {ff}, seq {seq}), B={B}",
        model,
        torch.randint(0, vocab, (B, seq)),
        torch.randint(0, vocab, (B, seq)),
        _token_ce,
    )


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def _params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rows(model, x, y, loss_fn, opacus=True):
    """name -> zero-argument callable returning name -> clipped sum (or None for the baseline)."""
    params = _params(model)
    detached = {n: p.detach() for n, p in params.items()}

    def non_private():
        for p in params.values():
            p.grad = None
        loss_fn(model(x), y).mean().backward()

    def one(p, xi, yi):
        return loss_fn(tf.functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    def torch_func():
        per = tf.vmap(tf.grad(one), in_dims=(None, 0, 0))(detached, x, y)
        n = x.shape[0]
        norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in per.values()]).norm(dim=0)
        c = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
        return {k: torch.tensordot(c, g, dims=1) for k, g in per.items()}

    def ft_one(p, xi, yi):
        return loss_fn(ft.functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    ft_clipped = ft.dp.clipped_grad(ft_one, max_norm=MAX_NORM, batch_argnums=(1, 2))

    out = {
        "non-private fwd+bwd": non_private,
        "torch.func vmap(grad)+clip": torch_func,
        "ft.dp.clipped_grad": lambda: ft_clipped(detached, x, y),
    }
    for method in ("auto", "ghost", "vmap"):
        out[f"clipped_grad_module {method}"] = lambda m=method: ft.dp.clipped_grad_module(
            model, loss_fn, x, y, max_norm=MAX_NORM, method=m
        )
    if opacus:
        out.update(_opacus_rows(model, x, y, loss_fn))
    return out


def _opacus_rows(model, x, y, loss_fn):
    """Opacus 1.6: per-sample gradients by hooks, and ghost clipping (two backwards)."""
    try:
        from opacus import GradSampleModule  # optional benchmark dependency
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.validators import ModuleValidator
    except ImportError:
        return {}
    import copy

    def opacus_model():  # nn.MultiheadAttention becomes Opacus' DPMultiheadAttention
        return ModuleValidator.fix(copy.deepcopy(model))

    def clipped_sum(per, n):
        norms = torch.stack([g.reshape(n, -1).norm(dim=1) for g in per.values()]).norm(dim=0)
        c = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
        return {k.removeprefix("_module."): torch.tensordot(c, g, dims=1) for k, g in per.items()}

    rows = {}
    try:
        hooks = GradSampleModule(opacus_model())
        ghost = GradSampleModuleFastGradientClipping(
            opacus_model(), max_grad_norm=MAX_NORM, loss_reduction="sum"
        )
    except Exception as e:  # noqa: BLE001  (an unsupported model is a row note, not a crash)
        return {"Opacus": _failed(e)}

    def opacus_hooks():
        hooks.zero_grad(set_to_none=True)
        loss_fn(hooks(x), y).sum().backward()
        return clipped_sum({n: p.grad_sample for n, p in hooks.named_parameters()}, x.shape[0])

    def opacus_ghost():  # what DPLossFastGradientClipping.backward does, with loss_reduction="sum"
        ghost.zero_grad(set_to_none=True)
        losses = loss_fn(ghost(x), y)
        losses.sum().backward(retain_graph=True)
        ghost.zero_grad(set_to_none=True)
        coeff = ghost.get_clipping_coef()
        ghost.disable_hooks()
        (coeff * losses).sum().backward()
        ghost.enable_hooks()
        return {n.removeprefix("_module."): p.grad for n, p in ghost.named_parameters()}

    rows["Opacus hooks (GradSampleModule)"] = opacus_hooks
    rows["Opacus ghost clipping"] = opacus_ghost
    return rows


def _failed(exc):
    def fail():
        raise exc

    return fail


def _check(results, reference):
    common = [k for k in reference if k in results]
    if len(common) < len(reference):  # Opacus' ModuleValidator.fix made new attention layers
        return "DPMultiheadAttention in place of nn.MultiheadAttention: values not compared"
    # one relative difference over all parameters together: a float32 sum of 64-256 clipped
    # gradients that nearly cancel (a bias at initialisation) differs by summation order alone
    diff = sum((results[k] - reference[k]).double().square().sum() for k in common).sqrt()
    size = sum(reference[k].double().square().sum() for k in common).sqrt()
    rel = (diff / size.clamp(min=1e-30)).item()
    return f"rel. diff {rel:.1e}" if rel > 1e-4 else ""


def bench(name_fn, rounds, min_time, quick=False):
    title, model, x, y, loss_fn = name_fn(quick)
    torch.manual_seed(0)
    fns = rows(model, x, y, loss_fn)
    reference = ft.dp.clipped_grad_module(model, loss_fn, x, y, max_norm=MAX_NORM)
    notes = {}
    for k, fn in list(fns.items()):
        try:
            out = fn()  # warm-up and check
        except Exception as e:  # noqa: BLE001
            notes[k] = f"failed: {str(e).strip().splitlines()[0][:80]}"
            del fns[k]
            continue
        notes[k] = "" if out is None else _check(out, reference)
    repeats = {}
    for k, fn in fns.items():  # enough calls per measurement to last min_time
        t0 = time.perf_counter()
        fn()
        repeats[k] = max(1, round(min_time / (time.perf_counter() - t0)))
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            for _ in range(repeats[k]):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / repeats[k])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = times["non-private fwd+bwd"]
    # paired: each round's time over the same round's baseline, so drifting load cancels
    ratio = {k: statistics.median(t / b for t, b in zip(v, base)) for k, v in times.items()}
    return title, [
        (k, med[k] * 1e3 if k in med else float("nan"), ratio.get(k, float("nan")), notes[k]) for k in notes
    ]


MEMORY_ROWS = (
    "non-private fwd+bwd",
    "clipped_grad_module auto",
    "clipped_grad_module vmap",
    "torch.func vmap(grad)+clip",
)


def _status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":")) / 1024


def peak_rss_child(model_name, row, quick=False):
    """In a fresh process: peak RSS (VmHWM, reset first) over three calls of one row, minus the
    RSS before them, in MB. (ru_maxrss would carry the parent's peak across exec.)"""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ft.set_vmap_fallback("quiet")
    _, model, x, y, loss_fn = MODELS[model_name](quick)
    fn = rows(model, x, y, loss_fn, opacus=False)[row]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS
    base = _status_mb("VmRSS")
    for _ in range(3):
        fn()
    return _status_mb("VmHWM") - base


def memory(model_names, quick=False):
    """Peak extra memory per row, each in its own process (peak RSS is per process)."""
    import subprocess
    import sys

    lines = [
        "Peak extra memory (peak RSS over three calls minus the RSS before them, each row in "
        "a fresh process; MB, and ratio to non-private):",
        "",
        "| model | " + " | ".join(MEMORY_ROWS) + " |",
        "|---" * (len(MEMORY_ROWS) + 1) + "|",
    ]
    for m in model_names:
        mb = {}
        for row in MEMORY_ROWS:
            code = (
                f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                f"import bench_dp_clip as b; print(b.peak_rss_child({m!r}, {row!r}, {quick!r}))"
            )
            out = subprocess.run(
                [sys.executable, "-W", "ignore", "-c", code], check=True, capture_output=True, text=True
            ).stdout
            mb[row] = float(out.split()[-1])
        base = mb[MEMORY_ROWS[0]]
        lines.append(
            f"| {m} | "
            + " | ".join(
                f"{mb[r]:.0f} ({mb[r] / base:.2f}x)" if base > 0 else f"{mb[r]:.0f}" for r in MEMORY_ROWS
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def markdown(results):
    """One table per model: method, time, ratio to the non-private step of the same round."""
    lines = []
    for title, table in results:
        lines += [f"**{title}**", "", "| method | ms | ratio | note |", "|---|---|---|---|"]
        lines += [f"| {k} | {ms:.1f} | {ratio:.2f}x | {note} |" for k, ms, ratio, note in table]
        lines.append("")
    return "\n".join(lines)
