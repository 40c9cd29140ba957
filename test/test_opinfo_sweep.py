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
The loop over op_db, the comparison, the report and the tests are _opinfo_common.py's, shared
with the vjp and jvp sweeps; this file says what runs on a sample and what is expected.
"""

import os

import _opinfo_common as common
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import functorch_lite as ft

# Measured (torch 2.13 CPU): 2130/2136 = 99.72% (2022 by rules, 108 through the for-loop); see the
# report (FT_SWEEP_REPORT=1). Set just below the measured value so that a regression fails the
# test.
MIN_CORRECT_FRACTION = 0.99
SAMPLES_PER_OP = 4
BATCH = 3
RTOL = ATOL = 1e-4
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opinfo_sweep_report.md")

# Ops that draw random numbers: vmap's randomness is tested in test_vmap.py, and their results
# cannot be compared with an oracle's.
RANDOM_OPS = {
    "bernoulli",
    "cauchy",
    "exponential",
    "geometric",
    "log_normal",
    "multinomial",
    "normal",
    "normal.in_place",
    "normal.number_mean",
    "uniform",
    "rand_like",
    "randint",
    "randint_like",
    "randn",
    "randn_like",
    "randperm",
    "nn.functional.dropout",
    "nn.functional.dropout2d",
    "nn.functional.dropout3d",
    "nn.functional.alpha_dropout",
    "nn.functional.feature_alpha_dropout",
    "nn.functional.feature_alpha_dropout.with_train",
    "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d",
    "nn.functional.fractional_max_pool3d",
}

MATRIX_RANK_REASON = (
    "the CompositeImplicit linalg_matrix_rank calls sum(out=...) into an unbatched tensor it "
    "allocated itself; the for-loop fallback refuses writing batched values into an unbatched "
    "out= argument"
)

# op name -> why ft.vmap fails on it. Must list exactly the ops classified 'failure'.
XFAIL = {
    "argwhere": "decomposes into aten::nonzero, rejected as data-dependent; torch.func runs it "
    "through its for-loop when every element has as many nonzeros",
    "resize_": "no batching rule; the for-loop fallback refuses in-place shape changes (a clear "
    "error, by design)",
}


def _batch(t):
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_floating_point() or t.is_complex():
        # scaled copies keep every structural property (symmetry, triangularity, sign, zeros)
        return torch.stack([t * (1 + 0.1 * k) for k in range(BATCH)])
    return torch.stack([t] * BATCH)  # indices, masks, sizes: identical copies stay valid


def _close(a, b):
    return common.close(a, b, RTOL, ATOL)


def _loop(fn, bargs, in_dims):
    flat, spec = tree_flatten(bargs)
    flat_dims, _ = tree_flatten(in_dims, is_leaf=lambda x: x is None)

    def row(b):
        # clone: each element is a tensor of its own, as vmap promises (as_strided offsets are
        # relative to the element, not to the stacked batch)
        sliced = [t[b].clone() if d == 0 else t for t, d in zip(flat, flat_dims)]
        return fn(*tree_unflatten(sliced, spec))

    return [row(b) for b in range(BATCH)]


def _run_sample(op, sample):
    """Returns ('rule' | 'fallback' | 'failure' | 'oracle', detail)."""
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    if any(
        isinstance(t, torch.Tensor) and t.layout != torch.strided for t in tree_flatten((args, kwargs))[0]
    ):
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
        if not common.loop_agrees(actual, lambda: _loop(fn, bargs, in_dims), _close):
            return "failure", f"mismatch: {diff}"
        note = f" (torch.func disagrees with the for-loop: {diff})"
    if fallback:
        return "fallback", ", ".join(fallback) + note
    return "rule", note.strip()


def _run(op, sample, seed):
    torch.manual_seed(0)
    return {"vmap": _run_sample(op, sample)}


def _breakdown(sweep, mode, samples):
    return (
        f"{samples['rule']} by batching rules, {samples['fallback']} through the for-loop "
        f"fallback, {samples['failure']} failing; {samples['oracle']} samples skipped because "
        f"torch.func cannot vmap them"
    )


def _fallback_and_rules(results, h):
    lines = ["", f"{h} Through the for-loop fallback", "", "| op | fallback ops |", "|---|---|"]
    for name, (st, ps, _) in results.items():
        if st == "fallback":
            ops = sorted({o for s, d in ps if s == "fallback" for o in d.split(" (")[0].split(", ")})
            lines.append(f"| `{name}` | {', '.join(ops)} |")
    lines += ["", f"{h} By batching rules", ""]
    lines.append(", ".join(f"`{n}`" for n, (st, _, _) in results.items() if st == "rule"))
    notes = [(n, d) for n, (_, ps, _) in results.items() for s, d in ps if "torch.func disagrees" in d]
    if notes:
        lines += ["", f"{h} Samples where torch.func disagrees with the for-loop (ft matches the loop)", ""]
        lines += [
            f"- `{n}`: {d.split('(torch.func disagrees with the for-loop: ')[1][:-1]}" for n, d in notes
        ]
    return lines


SWEEP = common.Sweep(
    file="test/test_opinfo_sweep.py",
    report_path=REPORT_PATH,
    title="functorch_lite OpInfo sweep",
    description=f"batch of {BATCH} perturbed copies; oracle torch.func.vmap (for-loop on disagreement).",
    modes={"vmap": common.Mode("ft.vmap", MIN_CORRECT_FRACTION, XFAIL, "XFAIL")},
    run_sample=_run,
    close=_close,
    random_ops=RANDOM_OPS,
    samples_per_op=SAMPLES_PER_OP,
    min_samples=1000,
    correct=("rule", "fallback"),
    # the variants of an op in RANDOM_OPS are swept, unless named too (a variant may not draw)
    is_random_op=lambda op, name: name in RANDOM_OPS or name.split(".")[0] in RANDOM_OPS,
    random_all_samples=True,
    random_one_reason="output differs between runs (random, or uninitialized memory)",
    no_sample=lambda per_sample: "torch.func cannot vmap any sample",
    breakdown=_breakdown,
    middle=_fallback_and_rules,
)

# pytest collects the fixture and the tests under these names
sweep, test_sweep_correct_fraction, test_sweep_xfail_list_is_exact = common.define_tests(SWEEP)
