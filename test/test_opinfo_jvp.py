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
test/opinfo_jvp_report.md. Runs in about 2 minutes on 2 cores. The loop over op_db, the
comparison, the report and the tests are _opinfo_common.py's, shared with the other sweeps; this
file says what runs on a sample and what is expected.
"""

import os

import _opinfo_common as common
import torch

import functorch_lite as ft

# Measured (torch 2.13 CPU): jvp 1375/1375 = 100.00%, vmap_jvp 1364/1364 = 100.00%; see the
# report (FT_SWEEP_REPORT=1). Set just below the measured values so that a regression fails the
# test; the exact xfail lists catch any single new failure anyway.
MIN_CORRECT = {"jvp": 0.995, "vmap_jvp": 0.995}
SAMPLES_PER_OP = 3
BATCH = 2
RTOL = ATOL = 1e-4
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opinfo_jvp_report.md")

# Ops that draw random numbers: their results cannot be compared with an oracle's.
RANDOM_OPS = {
    "bernoulli",
    "cauchy",
    "exponential",
    "geometric",
    "log_normal",
    "multinomial",
    "normal",
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
    "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d",
    "nn.functional.fractional_max_pool3d",
    "nn.functional.scaled_dot_product_attention",
}

# op name -> why ft.jvp fails on it. Must list exactly the ops classified 'failure'.
XFAIL = {}

# op name -> why ft.vmap(lambda t: ft.jvp(f, primals, t)) fails on it (the same list for jacfwd).
# Must list exactly the ops classified 'failure' in the vmap_jvp mode.
XFAIL_VMAP_JVP = {}

XFAILS = {"jvp": XFAIL, "vmap_jvp": XFAIL_VMAP_JVP}
XFAIL_NAMES = {"jvp": "XFAIL", "vmap_jvp": "XFAIL_VMAP_JVP"}

MODES = ("jvp", "vmap_jvp")
TITLES = {
    "jvp": "ft.jvp(f, primals, tangents)",
    "vmap_jvp": f"ft.vmap over a batch of {BATCH} tangents of ft.jvp at fixed primals (jacfwd's "
    "building block; vmap for-loop fallback allowed)",
}


def _close(a, b):
    return common.close(a, b, RTOL, ATOL)


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
        return common.failure(e)
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
    return common.check_vmapped(
        lambda: vj(ft),
        expected,
        lambda: [torch.func.jvp(fn, primals, tuple(t[b] for t in batched)) for b in range(BATCH)],
        _close,
    )


def _run(fn, primals, seed):
    gen = torch.Generator().manual_seed(seed)
    tangents = tuple(torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in primals)
    batched = tuple(torch.randn((BATCH, *p.shape), dtype=p.dtype, generator=gen) for p in primals)
    torch.manual_seed(seed)
    res = {"jvp": _run_jvp(fn, primals, tangents)}
    torch.manual_seed(seed)
    res["vmap_jvp"] = _run_vmap_jvp(fn, primals, batched)
    return res


SWEEP = common.Sweep(
    file="test/test_opinfo_jvp.py",
    report_path=REPORT_PATH,
    title="functorch_lite OpInfo sweep: forward mode",
    description="random tangents for every floating-point positional tensor (kwargs "
    "constant); oracle torch.func.",
    modes={m: common.Mode(TITLES[m], MIN_CORRECT[m], XFAILS[m], XFAIL_NAMES[m]) for m in MODES},
    run_sample=common.on_primals(MODES, _run),
    close=_close,
    random_ops=RANDOM_OPS,
    samples_per_op=SAMPLES_PER_OP,
    min_samples=800,
    swept="supports_forward_ad",
)  # torch has no forward-mode formula for the others

# pytest collects the fixture and the tests under these names
sweep, test_sweep_correct_fraction, test_sweep_xfail_list_is_exact = common.define_tests(SWEEP)
