"""OpInfo sweep: reverse mode (ft.vjp) over torch's op_db, on float32 CPU samples.

For every op with supports_autograd=True, the first SAMPLES_PER_OP sample inputs are run with
every floating-point tensor among the sample's positional arguments (input and args; kwargs stay
constant) as primals, in two modes:

  vjp        out, fn = ft.vjp(f, *primals); out and fn(cotangents) for random cotangents
                                                                 oracle torch.func.vjp
  vmap_vjp   ft.vmap(fn)(batch of BATCH cotangents per output), i.e. jacrev's building block;
             vmap's for-loop fallback is allowed (quietly)       oracle torch.func.vmap of
             torch.func.vjp's fn, and where it disagrees with a for-loop of that fn, the for-loop

Samples torch.func cannot run are skipped. Each op is classified per mode:

  correct   every sample gives torch.func's outputs and gradients
  failure   some sample raised, leaked a level or gave a different result
  skipped   random or nondeterministic op, no differentiable sample, or no sample that
            torch.func can run

The tests check that the fraction of correct samples stays >= MIN_CORRECT[mode] and that
XFAIL_VJP / XFAIL_VMAP_VJP list exactly the failing ops. FT_SWEEP_REPORT=1 writes
test/opinfo_vjp_report.md. Runs in about 40 seconds on 2 cores.
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

# Measured (torch 2.13 CPU): vjp 1382/1383 = 99.93%, vmap_vjp 1339/1383 = 96.82%; see the
# report (FT_SWEEP_REPORT=1). Set just below the measured values so that a regression fails
# the test; raise them when bugs are fixed.
MIN_CORRECT = {"vjp": 0.995, "vmap_vjp": 0.965}
SAMPLES_PER_OP = 3
BATCH = 2
RTOL = ATOL = 1e-4
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opinfo_vjp_report.md")

# Ops that draw random numbers: their results cannot be compared with an oracle's (the same list
# as test_opinfo_sweep.py; ops whose name contains "empty" are skipped by _is_random).
RANDOM_OPS = {
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal",
    "normal.in_place", "normal.number_mean", "uniform", "rand_like", "randint", "randint_like",
    "randn", "randn_like", "randperm", "nn.functional.dropout", "nn.functional.dropout2d",
    "nn.functional.dropout3d", "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout",
    "nn.functional.feature_alpha_dropout.with_train", "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
    "nn.functional.scaled_dot_product_attention",
}

# op name -> why ft.vjp fails on it. Must list exactly the ops classified 'failure'.
XFAIL_VJP = {
}

# op name -> why ft.vmap(vjp_fn) over a batch of cotangents fails on it (jacrev's building
# block). Must list exactly the ops classified 'failure' in the vmap_vjp mode.
XFAIL_VMAP_VJP = {
}

XFAILS = {"vjp": XFAIL_VJP, "vmap_vjp": XFAIL_VMAP_VJP}
XFAIL_NAMES = {"vjp": "XFAIL_VJP", "vmap_vjp": "XFAIL_VMAP_VJP"}


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
            return f"output {i}: a functorch_lite wrapper escaped"
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if x.layout != y.layout:
            return f"output {i}: layout {x.layout} vs {y.layout}"
        if x.layout != torch.strided:  # e.g. to_sparse's output
            x, y = x.to_dense(), y.to_dense()
        if not torch.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
            diff = (x.double() - y.double()).abs()
            return f"output {i}: values differ (max abs diff {diff.nan_to_num(0).max().item():.3g})"
    return None


def _is_random(op, sample):
    # Ops returning uninitialized memory cannot be compared; detecting them by running twice is
    # flaky (the allocator often hands back the same block), so name them.
    if "empty" in op.name:
        return "output is uninitialized memory"
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


def _prepare(op, sample):
    """(fn, primals) or (None, reason)."""
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    flat, spec = tree_flatten(args)
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided
           for t in flat + tree_flatten(kwargs)[0]):
        return None, "non-strided (sparse) input"
    pos = [i for i, t in enumerate(flat) if _is_diff(t)]
    if not pos:
        return None, "no floating-point tensor argument"
    primals = tuple(flat[i].detach().clone() for i in pos)

    def fn(*ps):
        full = list(flat)
        for i, p in zip(pos, ps):
            full[i] = p
        return op(*tree_unflatten(full, spec), **kwargs)

    return (fn, primals), None


def _cotangents(out, gen, batch=None):
    """Random cotangents with the structure of out (zeros for non-floating-point tensors); with
    batch, each leaf gets a leading dimension of that size."""
    leaves, spec = tree_flatten(out)
    cts = []
    for x in leaves:
        if not isinstance(x, torch.Tensor):
            cts.append(x)
            continue
        shape = x.shape if batch is None else (batch, *x.shape)
        if x.is_floating_point() or x.is_complex():
            cts.append(torch.randn(shape, dtype=x.dtype, generator=gen))
        else:
            cts.append(torch.zeros(shape, dtype=x.dtype))
    return tree_unflatten(cts, spec)


def _failure(e, what=""):
    depth = ft._C._stack_depth()
    leak = f" (and left {depth} level(s) on the stack)" if depth else ""
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return "failure", f"{what}{type(e).__name__}: {first}{leak}"


def _run_sample(fn, primals, seed):
    """{mode: (status, detail)} with status 'correct' | 'failure' | 'oracle'."""
    gen = torch.Generator().manual_seed(seed)
    try:
        expected_out, expected_fn = torch.func.vjp(fn, *primals)
    except Exception as e:  # noqa: BLE001
        why = f"torch.func.vjp fails: {type(e).__name__}"
        return {m: ("oracle", why) for m in MODES}
    cts = _cotangents(expected_out, gen)
    batched = _cotangents(expected_out, gen, BATCH)
    res = {}
    try:
        expected_grads = expected_fn(cts)
    except Exception as e:  # noqa: BLE001
        res["vjp"] = ("oracle", f"torch.func vjp_fn fails: {type(e).__name__}")
        expected_grads = None
    try:
        expected_vmap = torch.func.vmap(expected_fn)(batched)
    except Exception as e:  # noqa: BLE001
        res["vmap_vjp"] = ("oracle", f"torch.func.vmap(vjp_fn) fails: {type(e).__name__}")
        expected_vmap = None
    if len(res) == len(MODES):
        return res

    torch.manual_seed(seed)
    try:
        actual_out, actual_fn = ft.vjp(fn, *primals)
    except Exception as e:  # noqa: BLE001
        r = _failure(e, "ft.vjp: ")
        return {m: res.get(m, r) for m in MODES}
    if ft._C._stack_depth():
        return {m: res.get(m, ("failure", "ft.vjp left a level on the stack")) for m in MODES}
    diff = _close(actual_out, expected_out)
    if diff is not None:
        return {m: res.get(m, ("failure", f"primal output mismatch: {diff}")) for m in MODES}

    if "vjp" not in res:
        try:
            grads = actual_fn(cts)
            if ft._C._stack_depth():
                res["vjp"] = ("failure", "vjp_fn left a level on the stack")
            else:
                diff = _close(grads, expected_grads)
                res["vjp"] = (("failure", f"gradient mismatch: {diff}") if diff is not None
                              else ("correct", ""))
        except Exception as e:  # noqa: BLE001
            res["vjp"] = _failure(e, "vjp_fn: ")

    if "vmap_vjp" not in res:
        ft._C._reset_fallback_ops_seen()
        try:
            actual = ft.vmap(actual_fn)(batched)
        except Exception as e:  # noqa: BLE001
            res["vmap_vjp"] = _failure(e, "vmap(vjp_fn): ")
            return res
        if ft._C._stack_depth():
            res["vmap_vjp"] = ("failure", "vmap(vjp_fn) left a level on the stack")
            return res
        fallback = ", ".join(ft._C._fallback_ops_seen())
        note = f"fallback: {fallback}" if fallback else ""
        diff = _close(actual, expected_vmap)
        if diff is not None:
            try:
                bl, bspec = tree_flatten(batched)
                rows = [expected_fn(tree_unflatten(
                    [t[b] if isinstance(t, torch.Tensor) else t for t in bl], bspec))
                    for b in range(BATCH)]
                loop = tree_unflatten([torch.stack(ls) for ls in zip(
                    *[tree_flatten(r)[0] for r in rows])], tree_flatten(rows[0])[1])
                loop_diff = _close(actual, loop)
            except Exception:  # noqa: BLE001
                loop_diff = diff
            if loop_diff is not None:
                res["vmap_vjp"] = ("failure", f"mismatch: {diff}" + (f" ({note})" if note else ""))
                return res
            note = (note + "; " if note else "") + f"torch.func disagrees with the for-loop: {diff}"
        res["vmap_vjp"] = ("correct", note)
    return res


MODES = ("vjp", "vmap_vjp")


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
                if name in results["vjp"]:
                    continue
                if not op.supports_autograd:
                    continue  # not swept: torch has no backward formula for it
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
                    prepared, why = _prepare(op, s)
                    if prepared is None:
                        for m in MODES:
                            per_sample[m].append(("oracle", why))
                        continue
                    fn, primals = prepared
                    r = _run_sample(fn, primals, seed + k)
                    for m in MODES:
                        per_sample[m].append(r[m])
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
    "vjp": "ft.vjp(f, *primals) and its vjp_fn(cotangents)",
    "vmap_vjp": f"ft.vmap of ft.vjp's vjp_fn over a batch of {BATCH} cotangents (jacrev's "
                "building block; vmap for-loop fallback allowed)",
}


def write_report(all_results, seconds):
    lines = [
        "# functorch_lite OpInfo sweep: reverse mode",
        "",
        f"torch {torch.__version__}; op_db ops with supports_autograd=True, float32 CPU "
        f"samples, first {SAMPLES_PER_OP} per op, every floating-point positional tensor a "
        f"primal (kwargs constant), random cotangents; oracle torch.func. Generated by "
        f"`FT_SWEEP_REPORT=1 python -m pytest test/test_opinfo_vjp.py` in {seconds:.1f} s.",
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
                lines.append(f"| `{name}` | {xfail.get(name, '**not in the xfail dict**')} | "
                             f"{first} |")
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
    assert samples["correct"] > 1000, samples  # the sweep really ran
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
                    f"remove them from {dict_name} in test/test_opinfo_vjp.py:\n" + "\n".join(
                        f"  {n} (now {results[n][0] if n in results else 'not swept'})"
                        for n in stale))
    assert not msgs, "\n".join(msgs)
