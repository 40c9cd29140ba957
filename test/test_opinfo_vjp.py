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
test/opinfo_vjp_report.md. Runs in about 40 seconds on 2 cores. The loop over op_db, the
comparison, the report and the tests are _opinfo_common.py's, shared with the other sweeps; this
file says what runs on a sample and what is expected.
"""

import os

import _opinfo_common as common
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

import functorch_lite as ft

# Measured (torch 2.13 CPU): vjp 1383/1383 = 100.00%, vmap_vjp 1383/1383 = 100.00%; see the
# report (FT_SWEEP_REPORT=1). Set just below the measured values so that a regression fails
# the test; the exact xfail lists catch any single new failure anyway.
MIN_CORRECT = {"vjp": 0.995, "vmap_vjp": 0.995}
SAMPLES_PER_OP = 3
BATCH = 2
RTOL = ATOL = 1e-4
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opinfo_vjp_report.md")

# Ops that draw random numbers: their results cannot be compared with an oracle's (the same list
# as test_opinfo_sweep.py; ops whose name contains "empty" are skipped by random_reason in
# _opinfo_common.py).
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
    "nn.functional.scaled_dot_product_attention",
}

# op name -> why ft.vjp fails on it. Must list exactly the ops classified 'failure'.
XFAIL_VJP = {}

# op name -> why ft.vmap(vjp_fn) over a batch of cotangents fails on it (jacrev's building
# block). Must list exactly the ops classified 'failure' in the vmap_vjp mode.
XFAIL_VMAP_VJP = {}

XFAILS = {"vjp": XFAIL_VJP, "vmap_vjp": XFAIL_VMAP_VJP}
XFAIL_NAMES = {"vjp": "XFAIL_VJP", "vmap_vjp": "XFAIL_VMAP_VJP"}

MODES = ("vjp", "vmap_vjp")
TITLES = {
    "vjp": "ft.vjp(f, *primals) and its vjp_fn(cotangents)",
    "vmap_vjp": f"ft.vmap of ft.vjp's vjp_fn over a batch of {BATCH} cotangents (jacrev's "
    "building block; vmap for-loop fallback allowed)",
}


def _close(a, b):
    return common.close(a, b, RTOL, ATOL)


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
        r = common.failure(e, "ft.vjp: ")
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
                res["vjp"] = (
                    ("failure", f"gradient mismatch: {diff}") if diff is not None else ("correct", "")
                )
        except Exception as e:  # noqa: BLE001
            res["vjp"] = common.failure(e, "vjp_fn: ")

    if "vmap_vjp" not in res:
        bl, bspec = tree_flatten(batched)
        res["vmap_vjp"] = common.check_vmapped(
            lambda: ft.vmap(actual_fn)(batched),
            expected_vmap,
            lambda: [
                expected_fn(tree_unflatten([t[b] if isinstance(t, torch.Tensor) else t for t in bl], bspec))
                for b in range(BATCH)
            ],
            _close,
            "vmap(vjp_fn)",
        )
    return res


SWEEP = common.Sweep(
    file="test/test_opinfo_vjp.py",
    report_path=REPORT_PATH,
    title="functorch_lite OpInfo sweep: reverse mode",
    description="every floating-point positional tensor a primal (kwargs constant), random "
    "cotangents; oracle torch.func.",
    modes={m: common.Mode(TITLES[m], MIN_CORRECT[m], XFAILS[m], XFAIL_NAMES[m]) for m in MODES},
    run_sample=common.on_primals(MODES, _run_sample),
    close=_close,
    random_ops=RANDOM_OPS,
    samples_per_op=SAMPLES_PER_OP,
    min_samples=1000,
    swept="supports_autograd",
)  # torch has no backward formula for the others

# pytest collects the fixture and the tests under these names
sweep, test_sweep_correct_fraction, test_sweep_xfail_list_is_exact = common.define_tests(SWEEP)
