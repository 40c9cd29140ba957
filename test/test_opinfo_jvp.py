"""OpInfo sweep: forward mode (ft.jvp) over torch's op_db, on float32 CPU samples.

For every op with supports_forward_ad=True, the first SAMPLES_PER_OP sample inputs are run with
every floating-point tensor among the sample's positional arguments (input and args; kwargs stay
constant) as primals and random tangents, in two modes:

  jvp        ft.jvp(f, primals, tangents)                        oracle torch.func.jvp
  vmap_jvp   ft.vmap(lambda t: ft.jvp(f, primals, t))(batch of BATCH tangents), i.e. jacfwd's
             building block (unbatched primals, batched tangents); vmap's for-loop fallback is
             allowed (quietly)                                   oracle torch.func, and where it
             disagrees with a for-loop of torch.func.jvp, the for-loop

Samples torch.func cannot run are skipped. Each op is classified per mode:

  correct   every sample gives torch.func's primal and tangent outputs
  failure   some sample raised, leaked a level or gave a different result
  skipped   random or nondeterministic op, no differentiable sample, or no sample that
            torch.func can run

The tests check that the fraction of correct samples stays >= MIN_CORRECT[mode] and that
XFAIL / XFAIL_VMAP_JVP list exactly the failing ops. FT_SWEEP_REPORT=1 writes
test/opinfo_jvp_report.md. Runs in about 2 minutes on 2 cores.
"""
import collections
import os
import time
import warnings
import zlib

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_unflatten

import functorch_lite as ft

# Measured (torch 2.13 CPU): jvp 1375/1375 = 100.00%, vmap_jvp 1275/1364 = 93.48%; see the report
# (FT_SWEEP_REPORT=1). Set just below the measured values so that a regression fails the test;
# raise them when bugs are fixed.
MIN_CORRECT = {"jvp": 0.995, "vmap_jvp": 0.93}
SAMPLES_PER_OP = 3
BATCH = 2
RTOL = ATOL = 1e-4
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opinfo_jvp_report.md")

# Ops that draw random numbers: their results cannot be compared with an oracle's.
RANDOM_OPS = {
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal",
    "uniform", "rand_like", "randint", "randint_like", "randn", "randn_like", "randperm",
    "nn.functional.dropout", "nn.functional.dropout2d", "nn.functional.dropout3d",
    "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout",
    "nn.functional.rrelu", "nn.functional.fractional_max_pool2d",
    "nn.functional.fractional_max_pool3d", "nn.functional.scaled_dot_product_attention",
}

# op name -> why ft.jvp fails on it. Must list exactly the ops classified 'failure'.
XFAIL = {
}

# op name -> why ft.vmap(lambda t: ft.jvp(f, primals, t)) fails on it (the same list for jacfwd).
# Must list exactly the ops classified 'failure' in the vmap_jvp mode.
XFAIL_VMAP_JVP = {
}

XFAILS = {"jvp": XFAIL, "vmap_jvp": XFAIL_VMAP_JVP}
XFAIL_NAMES = {"jvp": "XFAIL", "vmap_jvp": "XFAIL_VMAP_JVP"}


def op_name(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def _is_diff(t):
    return (isinstance(t, torch.Tensor) and t.layout == torch.strided
            and (t.is_floating_point() or t.is_complex()))


def _close(a, b):
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb:
        return f"output structure {sa} != {sb}"
    for i, (x, y) in enumerate(zip(fa, fb)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"output {i}: {type(x).__name__} vs {type(y).__name__}"
        if not isinstance(x, torch.Tensor):
            if x != y:
                return f"output {i}: {x!r} != {y!r}"
            continue
        if ft._C._wrapper_info(x) is not None:
            return f"output {i}: a functorch_lite wrapper escaped jvp"
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if not torch.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
            diff = (x.double() - y.double()).abs()
            return f"output {i}: values differ (max abs diff {diff.nan_to_num(0).max().item():.3g})"
    return None


def _is_random(op, sample):
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    try:
        torch.manual_seed(0)
        r1 = op(*args, **kwargs)
        torch.manual_seed(0)
        r2 = op(*args, **kwargs)
        torch.manual_seed(1)
        r3 = op(*args, **kwargs)
    except Exception:  # noqa: BLE001
        return None
    if _close(r1, r2) is not None:
        return "nondeterministic output (uninitialized memory)"
    if _close(r1, r3) is not None:
        return "random op (output depends on the RNG seed)"
    return None


def _prepare(op, sample, seed):
    """(fn, primals, tangents, batched tangents) or (None, reason)."""
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    flat, spec = tree_flatten(args)
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided
           for t in flat + tree_flatten(kwargs)[0]):
        return None, "non-strided (sparse) input"
    pos = [i for i, t in enumerate(flat) if _is_diff(t)]
    if not pos:
        return None, "no floating-point tensor argument"
    primals = tuple(flat[i].detach().clone() for i in pos)
    gen = torch.Generator().manual_seed(seed)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    batched = tuple(torch.randn((BATCH, *p.shape), dtype=p.dtype, generator=gen)
                    for p in primals)

    def fn(*ps):
        full = list(flat)
        for i, p in zip(pos, ps):
            full[i] = p
        return op(*tree_unflatten(full, spec), **kwargs)

    return (fn, primals, tangents, batched), None


def _failure(e):
    depth = ft._C._stack_depth()
    leak = f" (and left {depth} level(s) on the stack)" if depth else ""
    return "failure", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}{leak}"


def _run_jvp(fn, primals, tangents):
    """ft.jvp(fn, primals, tangents) vs torch.func.jvp: ('correct' | 'failure' | 'oracle',
    detail)."""
    try:
        expected = torch.func.jvp(fn, primals, tangents)
    except Exception as e:  # noqa: BLE001
        return "oracle", f"torch.func.jvp fails: {type(e).__name__}"
    try:
        actual = ft.jvp(fn, primals, tangents)
    except Exception as e:  # noqa: BLE001
        return _failure(e)
    if ft._C._stack_depth():
        return "failure", "left a level on the stack"
    diff = _close(actual[0], expected[0])
    if diff is not None:
        return "failure", f"primal mismatch: {diff}"
    diff = _close(actual[1], expected[1])
    if diff is not None:
        return "failure", f"tangent mismatch: {diff}"
    return "correct", ""


def _run_vmap_jvp(fn, primals, batched):
    """vmap over a batch of tangents of jvp at fixed (unbatched) primals: jacfwd's building
    block. The for-loop fallback is allowed; torch.func is the oracle, and where it disagrees
    with a for-loop of torch.func.jvp, the for-loop decides."""
    def vj(lib):
        return lib.vmap(lambda *t: lib.jvp(fn, primals, t))(*batched)

    try:
        expected = vj(torch.func)
    except Exception as e:  # noqa: BLE001
        return "oracle", f"torch.func.vmap(jvp) fails: {type(e).__name__}"
    ft._C._reset_fallback_ops_seen()
    try:
        actual = vj(ft)
    except Exception as e:  # noqa: BLE001
        return _failure(e)
    if ft._C._stack_depth():
        return "failure", "left a level on the stack"
    fallback = ", ".join(ft._C._fallback_ops_seen())
    note = f"fallback: {fallback}" if fallback else ""
    diff = _close(actual, expected)
    if diff is not None:
        try:
            rows = [torch.func.jvp(fn, primals, tuple(t[b] for t in batched))
                    for b in range(BATCH)]
            loop = tree_unflatten([torch.stack(ls) for ls in zip(
                *[tree_flatten(r)[0] for r in rows])], tree_flatten(rows[0])[1])
            loop_diff = _close(actual, loop)
        except Exception:  # noqa: BLE001
            loop_diff = diff
        if loop_diff is not None:
            return "failure", f"mismatch: {diff}" + (f" ({note})" if note else "")
        note = (note + "; " if note else "") + f"torch.func disagrees with the for-loop: {diff}"
    return "correct", note


MODES = ("jvp", "vmap_jvp")


def run_sweep():
    """{mode: {op name: (status, [(sample status, detail)], reason)}}, seconds."""
    results = {m: collections.OrderedDict() for m in MODES}

    def skip(name, reason, per_sample=()):
        for m in MODES:
            results[m][name] = ("skipped", list(per_sample), reason)

    start = time.time()
    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for op in op_db:
                name = op_name(op)
                if name in results["jvp"]:
                    continue
                if not op.supports_forward_ad:
                    continue  # not swept: torch has no forward-mode formula for it
                if torch.float32 not in op.supported_dtypes("cpu"):
                    skip(name, "no float32 on CPU")
                    continue
                if op.name in RANDOM_OPS or name in RANDOM_OPS:
                    skip(name, "random op")
                    continue
                seed = zlib.crc32(name.encode())
                torch.manual_seed(seed)
                try:
                    samples = []
                    for s in op.sample_inputs("cpu", torch.float32, requires_grad=False):
                        samples.append(s)
                        if len(samples) == SAMPLES_PER_OP:
                            break
                except Exception as e:  # noqa: BLE001
                    skip(name, f"sample_inputs fails: {type(e).__name__}")
                    continue
                random_reason = next(
                    (r for r in (_is_random(op, s) for s in samples[:1]) if r), None)
                if random_reason:
                    skip(name, random_reason)
                    continue
                per_sample = {m: [] for m in MODES}
                for k, s in enumerate(samples):
                    prepared, why = _prepare(op, s, seed + k)
                    if prepared is None:
                        for m in MODES:
                            per_sample[m].append(("oracle", why))
                        continue
                    fn, primals, tangents, batched = prepared
                    torch.manual_seed(seed + k)
                    per_sample["jvp"].append(_run_jvp(fn, primals, tangents))
                    torch.manual_seed(seed + k)
                    per_sample["vmap_jvp"].append(_run_vmap_jvp(fn, primals, batched))
                for m in MODES:
                    ps = per_sample[m]
                    statuses = {st for st, _ in ps if st != "oracle"}
                    if not statuses:
                        results[m][name] = ("skipped", ps, "no sample that torch.func can run: "
                                            + "; ".join(sorted({d for _, d in ps})))
                    elif "failure" in statuses:
                        results[m][name] = ("failure", ps, "")
                    else:
                        results[m][name] = ("correct", ps, "")
    finally:
        ft.set_vmap_fallback(old_mode)
    return results, time.time() - start


def summarize(results):
    counts = collections.Counter(st for st, _, _ in results.values())
    samples = collections.Counter(s for _, ps, _ in results.values() for s, _ in ps)
    tried = samples["correct"] + samples["failure"]
    return counts, samples, (samples["correct"] / tried if tried else 0.0)


TITLES = {
    "jvp": "ft.jvp(f, primals, tangents)",
    "vmap_jvp": f"ft.vmap over a batch of {BATCH} tangents of ft.jvp at fixed primals (jacfwd's "
                "building block; vmap for-loop fallback allowed)",
}


def write_report(all_results, seconds):
    lines = [
        "# functorch_lite OpInfo sweep: forward mode",
        "",
        f"torch {torch.__version__}; op_db ops with supports_forward_ad=True, float32 CPU "
        f"samples, first {SAMPLES_PER_OP} per op, random tangents for every floating-point "
        f"positional tensor (kwargs constant); oracle torch.func. Generated by "
        f"`FT_SWEEP_REPORT=1 python -m pytest test/test_opinfo_jvp.py` in {seconds:.1f} s.",
    ]
    for mode in MODES:
        results, xfail = all_results[mode], XFAILS[mode]
        counts, samples, fraction = summarize(results)
        lines += [
            "", f"## {TITLES[mode]}", "",
            f"**Correct samples: {samples['correct']} / "
            f"{samples['correct'] + samples['failure']} = {100 * fraction:.2f}%** (threshold "
            f"{100 * MIN_CORRECT[mode]:.2f}%; {samples['failure']} failing; {samples['oracle']} "
            f"samples skipped because torch.func cannot run them or they have nothing to "
            f"differentiate).",
            "",
            "| ops | count |", "|---|---|",
        ]
        for k in ("correct", "failure", "skipped"):
            lines.append(f"| {k} | {counts[k]} |")
        lines += ["", "### Failures", "", "| op | xfail reason | first failing sample |",
                  "|---|---|---|"]
        for name, (st, ps, _) in results.items():
            if st == "failure":
                first = next(d for s, d in ps if s == "failure").replace("|", "\\|")
                lines.append(f"| `{name}` | {xfail.get(name, '**not in XFAIL**')} | {first} |")
        notes = collections.OrderedDict()
        for n, (st, ps, _) in results.items():
            for s, d in ps:
                if s == "correct" and d and d not in notes.setdefault(n, []):
                    notes[n].append(d)
        notes = {n: ds for n, ds in notes.items() if ds}
        if notes:
            lines += ["", "### Correct samples with notes (ops that ran through the for-loop "
                      "fallback; torch.func disagreeing with the for-loop)", ""]
            lines += [f"- `{n}`: {'; '.join(ds)}" for n, ds in notes.items()]
        lines += ["", "### Correct", ""]
        lines.append(", ".join(f"`{n}`" for n, (st, _, _) in results.items() if st == "correct"))
        lines += ["", "### Skipped", "", "| op | reason |", "|---|---|"]
        for name, (st, _, reason) in results.items():
            if st == "skipped":
                lines.append(f"| `{name}` | {reason.replace('|', '/')} |")
    with open(REPORT_PATH, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sweep():
    results, seconds = run_sweep()
    if os.environ.get("FT_SWEEP_REPORT") == "1":
        write_report(results, seconds)
    return results


@pytest.mark.parametrize("mode", MODES)
def test_sweep_correct_fraction(sweep, mode):
    counts, samples, fraction = summarize(sweep[mode])
    assert samples["correct"] > 800, samples  # the sweep really ran
    assert fraction >= MIN_CORRECT[mode], (
        f"{100 * fraction:.2f}% of OpInfo samples are correct under {TITLES[mode]}, below the "
        f"{100 * MIN_CORRECT[mode]:.2f}% threshold ({samples})")


@pytest.mark.parametrize("mode", MODES)
def test_sweep_xfail_list_is_exact(sweep, mode):
    results, xfail, dict_name = sweep[mode], XFAILS[mode], XFAIL_NAMES[mode]
    failing = {n for n, (st, _, _) in results.items() if st == "failure"}
    unexpected = {n: next(d for s, d in results[n][1] if s == "failure")
                  for n in sorted(failing - set(xfail))}
    stale = sorted(set(xfail) - failing)
    msgs = []
    if unexpected:
        msgs.append(f"ops failing under {TITLES[mode]} that are not in {dict_name} (fix them or "
                    f"add them with a reason):\n" + "\n".join(
                        f"  {n}: {d}" for n, d in unexpected.items()))
    if stale:
        msgs.append(f"stale {dict_name} entries: these ops now pass (or are no longer swept), "
                    f"remove them from {dict_name} in test/test_opinfo_jvp.py:\n" + "\n".join(
                        f"  {n} (now {results[n][0] if n in results else 'not swept'})"
                        for n in stale))
    assert not msgs, "\n".join(msgs)
