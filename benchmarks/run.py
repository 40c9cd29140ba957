#!/usr/bin/env python
"""The benchmark runner: every benchmark of the project, side by side with torch.func (and with
Opacus and JAX where they are installed), one table and a set of charts.

Sections (each a module next to this file):

  transforms  bench_transforms.py: vmap/grad/jacrev/jacfwd/hessian/hvp workloads, functorch_lite
              vs torch.func (and the direct batched call where there is one);
  dp_clip     bench_dp_clip.py: the clipped per-example gradient sum of a DP-SGD step on an MLP,
              a CNN and a transformer: torch.func, functorch_lite's three methods, Opacus' hooks
              and ghost clipping, against a non-private forward+backward;
  dp_steps    bench_dp_steps.py: one whole DP-SGD step (clip, noise, SGD) per library on the MLP at
              B=64 and B=256, the CNN and the transformer (torch.func, Opacus hooks/ghost/ew,
              ft.dp.PrivateTrainer with torch noise, Philox noise and secure mode), against the
              non-private step; and the noise generators' speed (torch normal_, ft Philox, secure);
  dp_lm       bench_dp_lm.py: whole training steps (AdamW) of transformers' GPT-2 (2 layers,
              d=768, vocab 50,257, T=128, B=8) and of a BERT-shaped classifier: non-private,
              ft.dp.PrivateTrainer and Opacus' ghost clipping, with each row's peak memory in a
              fresh process; --big adds GPT-2 with 12 layers and at T=512 (minutes per step);
  scaling     bench_scaling.py: per-sample gradients and whole DP-SGD steps against the batch
              size, one line per library (functorch_lite, torch.func, Opacus, JAX);
  compiled    bench_compiled.py: torch.compile(step, fullgraph=True) of steps calling the
              transforms, functorch_lite vs torch.func, eager and compiled.

Every section times its contenders in interleaved rounds (the order rotates from round to round)
and reports medians over rounds and medians of the per-round (paired) ratios, so that load
drifting between rounds hits every contender alike. One intra-op thread by default (--threads).

    python benchmarks/run.py                       # full run (~11 min on a quiet 2-core CPU)
    python benchmarks/run.py --only dp_lm [--big]  # ~4 min (--big: far longer, minutes per step)
    python benchmarks/run.py --quick --out /tmp/b  # smoke test: tiny sizes, a few rounds (<1 min)
    python benchmarks/run.py --only transforms --workloads jac,hessian

Writes OUT/performance.md (default OUT: docs/; if the file holds the markers
<!-- bench:begin --> and <!-- bench:end --> only the text between them is replaced, so the prose
around it survives; a run of some sections (--only) replaces only theirs), the charts
OUT/img/bench_*.png and, with --json, the raw results. After a run of every section into the
default OUT the headline block of README.md (between <!-- bench:headline:begin/end -->) is
refreshed too. The table also goes to stdout, progress to stderr.
"""

import argparse
import json
import math
import os
import platform
import sys
import textwrap
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import functorch_lite as ft  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEAD_BEGIN, HEAD_END = "<!-- bench:headline:begin -->", "<!-- bench:headline:end -->"
SECTIONS = ("transforms", "compiled", "dp_clip", "dp_steps", "dp_lm", "scaling")
CHARTS = {
    "ratios": "bench_ratios.png",
    "dp_clip": "bench_dp_clip.png",
    "psg": "bench_scaling_psg.png",
    "dp_step": "bench_scaling_dp_step.png",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# the machine


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _physical_cores():
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; None where it does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            blocks = f.read().split("\n\n")
    except OSError:
        return None
    cores = set()
    for b in blocks:
        kv = dict(ln.split(":", 1) for ln in b.splitlines() if ":" in ln)
        kv = {k.strip(): v.strip() for k, v in kv.items()}
        if "core id" in kv:
            cores.add((kv.get("physical id"), kv["core id"]))
    return len(cores) or None


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine(device):
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return dict(
        cpu=_cpu_model(),
        physical_cores=_physical_cores(),
        logical_cpus=os.cpu_count(),
        usable_cpus=usable,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        functorch_lite=ft.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        libraries=_libraries(),
        date=time.strftime("%Y-%m-%d"),
    )


def _libraries():
    """Versions of the optional contenders, from package metadata: importing jax here would
    start it before bench_scaling sets its thread flags."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("opacus", "jax"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def describe(m):
    cores = f"{m['physical_cores']} cores, " if m["physical_cores"] else ""
    libs = ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in m["libraries"].items())
    return (
        f"{m['cpu']} ({cores}{m['logical_cpus']} logical CPUs, {m['usable_cpus']} usable); "
        f"{m['threads']} intra-op thread(s); torch {m['torch']}, functorch_lite {m['functorch_lite']}, "
        f"Python {m['python']}; {libs}; device: {m['device']}; measured {m['date']}, "
        f"1-minute load average {m['load_before']} before / {m['load_after']} after the run"
    )


# --------------------------------------------------------------------------------------------
# sections


def run_transforms(args):
    import bench_transforms

    only = args.workloads.split(",") if args.workloads else None
    rows, how = bench_transforms.run(args.device, quick=args.quick, only=only, log=log)
    return dict(rows=rows, how=how, table=bench_transforms.render(rows))


def run_dp_clip(args):
    import bench_dp_clip

    rounds, min_time = (2, 0.005) if args.quick else (7, 0.3)
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        results = []
        for name, make in bench_dp_clip.MODELS.items():
            t0 = time.perf_counter()
            results.append(bench_dp_clip.bench(make, rounds, min_time, quick=args.quick))
            log(f"[{time.perf_counter() - t0:6.1f} s] dp_clip {name}")
    finally:
        ft.set_vmap_fallback(old)
    table = bench_dp_clip.markdown(results)
    if args.memory:
        t0 = time.perf_counter()
        table += "\n" + bench_dp_clip.memory(list(bench_dp_clip.MODELS), quick=args.quick)
        log(f"[{time.perf_counter() - t0:6.1f} s] dp_clip memory")
    how = (
        f"{rounds} interleaved rounds, each call repeated to last {min_time} s; ratio = time / "
        "non-private forward+backward of the same model in the same round (median)"
    )
    results = [
        dict(title=t, rows=[dict(method=k, ms=ms, ratio=r, note=n) for k, ms, r, n in rows])
        for t, rows in results
    ]
    return dict(models=results, how=how, table=table)


def run_dp_steps(args):
    import bench_dp_steps

    rounds, min_time, noise_time = (2, 0.005, 0.002) if args.quick else (7, 0.3, 0.1)
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        models = []
        for key, make in bench_dp_steps.MODELS.items():
            t0 = time.perf_counter()
            title, rows = bench_dp_steps.bench(make, rounds, min_time, quick=args.quick)
            rows = [dict(method=k, ms=ms, ratio=r, note=n) for k, ms, r, n in rows]
            models.append(dict(key=key, title=title, rows=rows))
            log(f"[{time.perf_counter() - t0:6.1f} s] dp_steps {key}")
        sizes = bench_dp_steps.NOISE_SIZES_QUICK if args.quick else bench_dp_steps.NOISE_SIZES
        noise = bench_dp_steps.noise_table(sizes, rounds, noise_time, log=log)
        mem = bench_dp_steps.memory(list(bench_dp_steps.MODELS), args.quick, log=log) if args.memory else None
    finally:
        ft.set_vmap_fallback(old)
    how = (
        f"{rounds} interleaved rounds, each step repeated to last {min_time} s; ratio = time / "
        "the non-private step (forward, backward, SGD) of the same model in the same round (median); "
        f"noise: {rounds} interleaved rounds, {noise_time} s each, speedup paired per round"
    )
    table = bench_dp_steps.markdown(models, noise, mem)
    return dict(models=models, noise=noise, memory=mem, how=how, table=table)


def run_dp_lm(args):
    import bench_dp_lm

    rounds = 2 if args.quick else 3
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        res = bench_dp_lm.run(
            quick=args.quick,
            big=args.big,
            rounds=rounds,
            memory_rows=args.memory,
            threads=args.threads,
            log=log,
        )
    finally:
        ft.set_vmap_fallback(old)
    how = (
        f"every row stepped once (warm-up), then {rounds} interleaved rounds of one step per row; "
        "time = median over rounds, ratio = time / the non-private step of the same model in the "
        "same round (median)" + ("" if args.big else "; the 12-layer and T=512 GPT-2 rows need --big")
    )
    res["how"] = how
    res["table"] = bench_dp_lm.markdown(res["models"], res["note"])
    return res


def run_compiled(args):
    import bench_compiled

    results = bench_compiled.run(quick=args.quick, log=log)
    how = (
        "interleaved rounds; ratio = time / torch.func eager in the same round (median); "
        "compile time not included"
    )
    return dict(models=results, how=how, table=bench_compiled.markdown(results))


def run_scaling(args):
    import bench_scaling

    res = bench_scaling.run(quick=args.quick, threads=args.threads, log=log)
    res["table"] = (
        bench_scaling.markdown(res["psg"], f"Per-sample gradients, {res['model']}")
        + "\n"
        + bench_scaling.markdown(res["dp_step"], f"One DP-SGD step, {res['model']}")
    )
    return res


# --------------------------------------------------------------------------------------------
# charts


COLORS = {
    "functorch_lite": "tab:blue",
    "torch.func": "tab:orange",
    "Opacus (hooks)": "tab:green",
    "Opacus (ghost clipping)": "tab:olive",
    "JAX": "tab:red",
    "non-private (torch)": "tab:gray",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_ratios(rows, path, subtitle):
    plt = _plt()
    rows = [r for r in rows if r.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    names = [r["name"] for r in rows][::-1]
    ratios = [r["ratio"] for r in rows][::-1]
    bars = ax.barh(names, ratios, color=["tab:blue" if v <= 1.0 else "tab:red" for v in ratios])
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    for b, v in zip(bars, ratios):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("functorch_lite time / torch.func time (lower is better)")
    ax.set_xlim(0, max(ratios + [1.0]) * 1.15)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"functorch_lite vs torch.func per workload\n{subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_dp_clip(models, path, subtitle):
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    methods = list(dict.fromkeys(r["method"] for m in models for r in m["rows"]))
    methods = [k for k in methods if k != "non-private fwd+bwd"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(models) + 0.12 * len(methods) * len(models)))
    height = 0.8 / max(len(methods), 1)
    cmap = plt.get_cmap("tab10")
    for j, meth in enumerate(methods):
        ys, vals = [], []
        for i, m in enumerate(models):
            r = next((r for r in m["rows"] if r["method"] == meth), None)
            if r is not None and math.isfinite(r["ratio"]):
                ys.append(len(models) - 1 - i + ((len(methods) - 1) / 2 - j) * height)
                vals.append(r["ratio"])
        ax.barh(ys, vals, height=height, label=meth, color=cmap(j % 10))
    ax.set_yticks(range(len(models)))
    ax.set_yticklabels([textwrap.fill(m["title"], 24) for m in models][::-1], fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("time / non-private forward+backward (log scale, lower is better)")
    ax.set_title(f"Clipped per-example gradient sum (one DP-SGD step's clipping)\n{subtitle}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_scaling(rows, path, title, subtitle):
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    libs = list(dict.fromkeys(k for r in rows for k in r["times"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in libs:
        pts = [(r["B"], r["times"][k] * 1e3) for r in rows if k in r["times"]]
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=k,
            color=COLORS.get(k),
            ls="--" if k.startswith("non-private") else "-",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([r["B"] for r in rows])
    ax.set_xticklabels([str(r["B"]) for r in rows])
    ax.set_xlabel("batch size B")
    ax.set_ylabel("ms per call (log scale)")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.set_title(f"{title}\n{subtitle}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# markdown


def section_text(name, r, meta):
    """One section of the results block (the caller wraps it in its own markers)."""
    mode = f"Mode: {meta['mode']} ({r['how']})."
    if name == "transforms":
        return "\n".join(
            [
                "### Transforms: functorch_lite vs torch.func",
                "",
                mode,
                "",
                f"![functorch_lite / torch.func per workload](img/{CHARTS['ratios']})",
                "",
                r["table"],
            ]
        )
    if name == "compiled":
        return "\n".join(["### torch.compile: compiled steps", "", mode, "", r["table"]])
    if name == "dp_clip":
        return "\n".join(
            [
                "### Clipped per-example gradient sums (DP-SGD clipping)",
                "",
                mode,
                "",
                f"![time / non-private forward+backward per method](img/{CHARTS['dp_clip']})",
                "",
                r["table"],
            ]
        )
    if name == "dp_steps":
        return "\n".join(["### Whole DP-SGD steps and the noise generator", "", mode, "", r["table"]])
    if name == "dp_lm":
        return "\n".join(["### DP fine-tuning at language-model scale", "", mode, "", r["table"]])
    return "\n".join(
        [
            "### Scaling with the batch size",
            "",
            mode,
            "",
            f"![per-sample gradient time against B](img/{CHARTS['psg']})",
            f"![DP-SGD step time against B](img/{CHARTS['dp_step']})",
            "",
            r["table"],
        ]
    )


def _markers(name):
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def block(results, meta):
    """The whole results block: the machine, then each section between its own markers (so that
    a later run of some sections can replace just those)."""
    out = [f"Machine: {describe(meta)}.", ""]
    for name in SECTIONS:
        if name in results:
            b, e = _markers(name)
            out += [b, section_text(name, results[name], meta).rstrip(), e, ""]
    return "\n".join(out).rstrip() + "\n"


def write_page(path, results, meta, partial):
    """A full run rewrites the results block; a partial run (--only) replaces only its sections
    when the page already has their markers, noting that they come from a separate run."""
    if partial and os.path.exists(path):
        with open(path) as f:
            doc = f.read()
        if all(m in doc for name in results for m in _markers(name)):
            for name in results:
                text = f"Measured in a separate run: {describe(meta)}.\n\n" + section_text(
                    name, results[name], meta
                )
                replace_between(path, *_markers(name), text.rstrip() + "\n")
            return f"updated the {', '.join(results)} section(s) between their markers"
    return replace_between(path, BEGIN, END, block(results, meta), fallback_title="Performance")


def headline(results, meta):
    """A few lines for the README: the numbers a reader looks for first."""
    lines = []
    t = results.get("transforms")
    if t:
        ratios = sorted(r["ratio"] for r in t["rows"] if r.get("ratio") is not None)
        if ratios:
            med = ratios[len(ratios) // 2]
            lines.append(
                f"- Transforms ({len(ratios)} workloads: vmap, grad, per-sample gradients, jacrev, jacfwd, "
                f"hessian, hvp): functorch_lite takes {ratios[0]:.2f}x to {ratios[-1]:.2f}x torch.func's "
                f"time (median {med:.2f}x)."
            )
    s = results.get("scaling")
    if s and s["psg"] and s["dp_step"]:
        for key, what in (("psg", "Per-sample gradients"), ("dp_step", "One DP-SGD step")):
            last = s[key][-1]
            parts = [
                f"{k} {last['times'][k] * 1e3:.1f} ms"
                for k in last["times"]
                if not k.startswith("non-private")
            ]
            lines.append(f"- {what}, {s['model']}, B={last['B']}: " + ", ".join(parts) + ".")
    d = results.get("dp_clip")
    if d:
        for m in d["models"][:1]:
            auto = next((r for r in m["rows"] if r["method"] == "clipped_grad_module auto"), None)
            if auto:
                others = ", ".join(
                    f"{r['method']} {r['ratio']:.2f}x"
                    for r in m["rows"]
                    if r["method"] in ("torch.func vmap(grad)+clip", "Opacus ghost clipping")
                )
                lines.append(
                    f"- Clipped per-example gradient sum, {m['title']}: `ft.dp.clipped_grad_module` "
                    f"{auto['ratio']:.2f}x a non-private forward+backward ({others})."
                )
    lines.append(
        f"- Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, "
        f"measured {meta['date']}, load average {meta['load_before']} / {meta['load_after']} before / after "
        "(a shared machine: absolute times are noisy, the paired ratios much less)."
    )
    return "\n".join(lines) + "\n"


def replace_between(path, begin, end, text, fallback_title=None):
    """Replace the text between the markers in `path`. Without fallback_title a file without the
    markers is left alone; with it, a missing file is created (with that title) and a file
    without the markers gets the block appended. Returns what it did."""
    body = f"{begin}\n{text}{end}"
    doc = None
    if os.path.exists(path):
        with open(path) as f:
            doc = f.read()
        if begin in doc and end in doc and doc.index(begin) < doc.index(end):
            with open(path, "w") as f:
                f.write(doc[: doc.index(begin)] + body + doc[doc.index(end) + len(end) :])
            return "updated between the markers"
    if fallback_title is None:
        return "no markers: left alone"
    with open(path, "w") as f:
        f.write(f"{doc.rstrip()}\n\n{body}\n" if doc else f"# {fallback_title}\n\n{body}\n")
    return "appended" if doc else "written"


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few rounds: a smoke test (< 1 min)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="directory for performance.md and img/")
    p.add_argument("--only", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--workloads", metavar="SUBSTR[,...]", help="transforms: only wl_ names containing one")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of the transforms section (the dp_* and scaling sections run on the CPU)",
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dp_clip, dp_steps, dp_lm: also measure peak memory, one process per row (default: on in full mode)",
    )
    p.add_argument(
        "--big",
        action="store_true",
        help="dp_lm: also GPT-2 with 12 layers (T=128) and with 2 layers at T=512 (minutes per step)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    args = p.parse_args(argv)
    sections = args.only.split(",") if args.only else list(SECTIONS)
    for s in sections:
        if s not in SECTIONS:
            p.error(f"--only: unknown section {s!r} (choose from {', '.join(SECTIONS)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch")
    if args.memory is None:
        args.memory = not args.quick
    torch.set_num_threads(args.threads)
    # Opacus' hooks warn on every call that no input requires grad (true and harmless here).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", module="opacus")
    # torch.func's own for-loop fallback (SDPA in the transformer rows) warns on every call.
    warnings.filterwarnings("ignore", message="There is a performance drop")

    meta = machine(args.device)
    meta["mode"] = "quick" if args.quick else "full"
    meta["load_before"] = _loadavg()
    log(f"machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}")
    results = {}
    t0 = time.perf_counter()
    runners = {
        "transforms": run_transforms,
        "compiled": run_compiled,
        "dp_clip": run_dp_clip,
        "dp_steps": run_dp_steps,
        "dp_lm": run_dp_lm,
        "scaling": run_scaling,
    }
    for s in sections:
        t1 = time.perf_counter()
        results[s] = runners[s](args)
        log(f"== {s}: {time.perf_counter() - t1:.1f} s")
    meta["load_after"] = _loadavg()
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"total {meta['seconds']} s")

    os.makedirs(os.path.join(args.out, "img"), exist_ok=True)
    sub = f"{meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, {meta['date']}, {meta['mode']}"
    img = lambda key: os.path.join(args.out, "img", CHARTS[key])
    if "transforms" in results:
        chart_ratios(results["transforms"]["rows"], img("ratios"), sub)
    if "dp_clip" in results:
        chart_dp_clip(results["dp_clip"]["models"], img("dp_clip"), sub)
    if "scaling" in results:
        s = results["scaling"]
        chart_scaling(s["psg"], img("psg"), f"Per-sample gradients, {s['model']}", sub)
        chart_scaling(s["dp_step"], img("dp_step"), f"One DP-SGD step (clip, noise, SGD), {s['model']}", sub)

    print(block(results, meta))
    md = os.path.join(args.out, "performance.md")
    log(f"{md}: {write_page(md, results, meta, partial=set(sections) != set(SECTIONS))}")
    if os.path.abspath(args.out) == os.path.join(ROOT, "docs") and set(sections) == set(SECTIONS):
        readme = os.path.join(ROOT, "README.md")
        log(f"{readme}: {replace_between(readme, HEAD_BEGIN, HEAD_END, headline(results, meta))}")
    if args.json:
        for r in results.get("transforms", {}).get("rows", []):
            r.pop("kind", None)
        with open(args.json, "w") as f:
            json.dump(dict(machine=meta, results=results), f, indent=1, default=str)
    bad = [r["name"] for r in results.get("transforms", {}).get("rows", []) if not _finite(r.get("ratio"))]
    if bad:
        log(f"no ratio (functorch_lite failed?) for: {', '.join(bad)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
