"""OpInfo sweep: ft.vmap over every op of torch's op_db, on float32 CPU samples.

For each op, the first SAMPLES_PER_OP sample inputs are batched by stacking BATCH perturbed copies
of every tensor argument along dim 0. torch.func.vmap is the oracle (samples it cannot run are
skipped; where it disagrees with a plain for-loop, the for-loop decides). Each op is classified:

  rule      every sample correct, none through the for-loop fallback
  fallback  every sample correct, some through the for-loop fallback (ft._C._fallback_ops_seen())
  failure   some sample raised or gave a different result
  skipped   random or nondeterministic op, or no sample that torch.func can vmap

The test checks that the fraction of correct samples stays >= MIN_CORRECT_FRACTION and that
XFAIL lists exactly the failing ops. FT_SWEEP_REPORT=1 writes test/opinfo_sweep_report.md.
"""
import collections
import os
import time
import warnings
import zlib

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import functorch_lite as ft

# Measured: see the report (FT_SWEEP_REPORT=1). Set just below the measured value so that a
# regression fails the test; raise it when rules are added.
MIN_CORRECT_FRACTION = 0.99
SAMPLES_PER_OP = 4
BATCH = 3
RTOL = ATOL = 1e-4
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opinfo_sweep_report.md")

# Ops that draw random numbers: vmap's randomness is tested in test_vmap.py, and their results
# cannot be compared with an oracle's.
RANDOM_OPS = {
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal",
    "normal.in_place", "normal.number_mean", "uniform", "rand_like", "randint", "randint_like",
    "randn", "randn_like", "randperm", "nn.functional.dropout", "nn.functional.dropout2d",
    "nn.functional.dropout3d", "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout",
    "nn.functional.feature_alpha_dropout.with_train", "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
}

MATRIX_RANK_REASON = (
    "the CompositeImplicit linalg_matrix_rank calls sum(out=...) into an unbatched tensor it "
    "allocated itself; the for-loop fallback refuses writing batched values into an unbatched "
    "out= argument")

# op name -> why ft.vmap fails on it. Must list exactly the ops classified 'failure'.
XFAIL = {
    "argwhere": "decomposes into aten::nonzero, rejected as data-dependent; torch.func runs it "
                "through its for-loop when every element has as many nonzeros",
    "resize_": "no batching rule; the for-loop fallback refuses in-place shape changes (a clear "
               "error, by design)",
}


def op_name(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def _batch(t):
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_floating_point() or t.is_complex():
        # scaled copies keep every structural property (symmetry, triangularity, sign, zeros)
        return torch.stack([t * (1 + 0.1 * k) for k in range(BATCH)])
    return torch.stack([t] * BATCH)  # indices, masks, sizes: identical copies stay valid


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
            return f"output {i}: a functorch_lite wrapper escaped vmap"
        if x.layout != torch.strided or y.layout != torch.strided:
            x, y = x.to_dense(), y.to_dense()
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if not torch.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
            return f"output {i}: values differ (max abs diff {(x - y).abs().max().item():.3g})"
    return None


def _loop(fn, bargs, in_dims):
    flat, spec = tree_flatten(bargs)
    flat_dims, _ = tree_flatten(in_dims, is_leaf=lambda x: x is None)
    outs = []
    for b in range(BATCH):
        # clone: each element is a tensor of its own, as vmap promises (as_strided offsets are
        # relative to the element, not to the stacked batch)
        sliced = [t[b].clone() if d == 0 else t for t, d in zip(flat, flat_dims)]
        outs.append(fn(*tree_unflatten(sliced, spec)))
    flat0, ospec = tree_flatten(outs[0])
    leaves = list(zip(*[tree_flatten(o)[0] for o in outs]))
    return tree_unflatten(
        [torch.stack(ls) if isinstance(ls[0], torch.Tensor) else ls[0] for ls in leaves], ospec)


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
        if _close(r1, r2) is not None or _close(r1, r3) is not None:
            return "output differs between runs (random, or uninitialized memory)"
    except Exception:  # noqa: BLE001  (the sample itself fails: _run_sample will tell)
        return None
    return None


def _run_sample(op, sample):
    """Returns ('rule' | 'fallback' | 'failure' | 'oracle', detail)."""
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided
           for t in tree_flatten((args, kwargs))[0]):
        return "oracle", "non-strided (sparse) input"
    try:
        bargs = tree_map(_batch, args)
    except Exception as e:  # noqa: BLE001
        return "oracle", f"cannot batch the sample: {e}"
    in_dims = tuple(tree_map(lambda t: 0 if isinstance(t, torch.Tensor) else None, args))

    def fn(*a):
        return op(*a, **kwargs)

    try:
        expected = torch.func.vmap(fn, in_dims)(*bargs)
    except Exception as e:  # noqa: BLE001
        return "oracle", f"torch.func.vmap fails: {type(e).__name__}"
    ft._C._reset_fallback_ops_seen()
    try:
        actual = ft.vmap(fn, in_dims)(*bargs)
    except Exception as e:  # noqa: BLE001
        return "failure", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    fallback = ft._C._fallback_ops_seen()
    diff = _close(actual, expected)
    note = ""
    if diff is not None:
        # torch.func is wrong now and then (e.g. argmax(keepdim=True) with dim=None): the
        # for-loop, which is vmap's definition, breaks the tie.
        try:
            loop_diff = _close(actual, _loop(fn, bargs, in_dims))
        except Exception:  # noqa: BLE001
            loop_diff = diff
        if loop_diff is not None:
            return "failure", f"mismatch: {diff}"
        note = f" (torch.func disagrees with the for-loop: {diff})"
    if fallback:
        return "fallback", ", ".join(fallback) + note
    return "rule", note.strip()


def run_sweep():
    results = collections.OrderedDict()  # name -> (status, [(sample status, detail)], reason)
    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    start = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for op in op_db:
                name = op_name(op)
                if name in results:
                    continue
                if torch.float32 not in op.supported_dtypes("cpu"):
                    results[name] = ("skipped", [], "no float32 on CPU")
                    continue
                if name in RANDOM_OPS or name.split(".")[0] in RANDOM_OPS:
                    results[name] = ("skipped", [], "random op")
                    continue
                torch.manual_seed(zlib.crc32(name.encode()))
                try:
                    samples = []
                    for s in op.sample_inputs("cpu", torch.float32, requires_grad=False):
                        samples.append(s)
                        if len(samples) == SAMPLES_PER_OP:
                            break
                except Exception as e:  # noqa: BLE001
                    results[name] = ("skipped", [], f"sample_inputs fails: {type(e).__name__}")
                    continue
                random_reason = next((r for r in map(lambda s: _is_random(op, s), samples) if r),
                                     None)
                if random_reason:
                    results[name] = ("skipped", [], random_reason)
                    continue
                per_sample = []
                for s in samples:
                    torch.manual_seed(0)
                    per_sample.append(_run_sample(op, s))
                statuses = {st for st, _ in per_sample if st != "oracle"}
                if not statuses:
                    results[name] = ("skipped", per_sample, "torch.func cannot vmap any sample")
                elif "failure" in statuses:
                    results[name] = ("failure", per_sample, "")
                elif "fallback" in statuses:
                    results[name] = ("fallback", per_sample, "")
                else:
                    results[name] = ("rule", per_sample, "")
    finally:
        ft.set_vmap_fallback(old_mode)
    return results, time.time() - start


def summarize(results):
    counts = collections.Counter(st for st, _, _ in results.values())
    samples = collections.Counter(s for _, ps, _ in results.values() for s, _ in ps)
    tried = samples["rule"] + samples["fallback"] + samples["failure"]
    correct = samples["rule"] + samples["fallback"]
    return counts, samples, (correct / tried if tried else 0.0)


def write_report(results, seconds):
    counts, samples, fraction = summarize(results)
    lines = [
        "# functorch_lite OpInfo sweep",
        "",
        f"torch {torch.__version__}; op_db float32 CPU samples, first {SAMPLES_PER_OP} per op, "
        f"batch of {BATCH} perturbed copies; oracle torch.func.vmap (for-loop on disagreement). "
        f"Generated by `FT_SWEEP_REPORT=1 python -m pytest test/test_opinfo_sweep.py` in "
        f"{seconds:.1f} s.",
        "",
        f"**Correct samples: {samples['rule'] + samples['fallback']} / "
        f"{samples['rule'] + samples['fallback'] + samples['failure']} = {100 * fraction:.2f}%** "
        f"({samples['rule']} by batching rules, {samples['fallback']} through the for-loop "
        f"fallback, {samples['failure']} failing; {samples['oracle']} samples skipped because "
        f"torch.func cannot vmap them).",
        "",
        "| ops | count |", "|---|---|",
    ]
    for k in ("rule", "fallback", "failure", "skipped"):
        lines.append(f"| {k} | {counts[k]} |")
    lines += ["", "## Failures", "", "| op | xfail reason | first failing sample |", "|---|---|---|"]
    for name, (st, ps, _) in results.items():
        if st == "failure":
            first = next(d for s, d in ps if s == "failure").replace("|", "\\|")
            lines.append(f"| `{name}` | {XFAIL.get(name, '**not in XFAIL**')} | {first} |")
    lines += ["", "## Through the for-loop fallback", "", "| op | fallback ops |", "|---|---|"]
    for name, (st, ps, _) in results.items():
        if st == "fallback":
            ops = sorted({o for s, d in ps if s == "fallback" for o in d.split(" (")[0].split(", ")})
            lines.append(f"| `{name}` | {', '.join(ops)} |")
    lines += ["", "## By batching rules", ""]
    lines.append(", ".join(f"`{n}`" for n, (st, _, _) in results.items() if st == "rule"))
    notes = [(n, d) for n, (_, ps, _) in results.items() for s, d in ps if "torch.func disagrees" in d]
    if notes:
        lines += ["", "## Samples where torch.func disagrees with the for-loop (ft matches the loop)",
                  ""]
        lines += [f"- `{n}`: {d.split('(torch.func disagrees with the for-loop: ')[1][:-1]}"
                  for n, d in notes]
    lines += ["", "## Skipped", "", "| op | reason |", "|---|---|"]
    for name, (st, _, reason) in results.items():
        if st == "skipped":
            lines.append(f"| `{name}` | {reason} |")
    with open(REPORT_PATH, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sweep():
    results, seconds = run_sweep()
    if os.environ.get("FT_SWEEP_REPORT") == "1":
        write_report(results, seconds)
    return results


def test_sweep_correct_fraction(sweep):
    counts, samples, fraction = summarize(sweep)
    assert samples["rule"] + samples["fallback"] > 1000, samples  # the sweep really ran
    assert fraction >= MIN_CORRECT_FRACTION, (
        f"{100 * fraction:.2f}% of OpInfo samples are correct under ft.vmap, below the "
        f"{100 * MIN_CORRECT_FRACTION:.2f}% threshold ({samples})")


def test_sweep_xfail_list_is_exact(sweep):
    failing = {n for n, (st, _, _) in sweep.items() if st == "failure"}
    unexpected = {n: next(d for s, d in sweep[n][1] if s == "failure")
                  for n in sorted(failing - set(XFAIL))}
    stale = sorted(set(XFAIL) - failing)
    msgs = []
    if unexpected:
        msgs.append("ops failing under ft.vmap that are not in XFAIL (fix them or add them with a "
                    "reason):\n" + "\n".join(f"  {n}: {d}" for n, d in unexpected.items()))
    if stale:
        msgs.append("stale XFAIL entries: these ops now pass (or are no longer swept), remove them "
                    "from XFAIL in test/test_opinfo_sweep.py:\n" + "\n".join(
                        f"  {n} (now {sweep[n][0] if n in sweep else 'not in op_db'})"
                        for n in stale))
    assert not msgs, "\n".join(msgs)
