"""The differential fuzzer (test/_fuzz.py) under hypothesis.

CI profile (default): a fixed seed (derandomize) and a fixed budget of CI_EXAMPLES programs; a
failure is shrunk by hypothesis and reported with the program that shows it.

Long profile, on demand: FUNCTORCH_LITE_FUZZ_EXAMPLES=N runs N programs, keeps going past
failures, prints a summary (programs run, agreed, both raised, ours right where torch.func is
wrong, failures with shrunk reproducers) and then fails if anything failed. Set
FUNCTORCH_LITE_FUZZ_SEED to draw other programs than the CI profile does.

    FUNCTORCH_LITE_FUZZ_EXAMPLES=5000 python -m pytest test/test_fuzz.py -q -s
"""

import contextlib
import os
import warnings

import pytest
import torch

import functorch_lite as ft

hypothesis = pytest.importorskip("hypothesis")
import _fuzz  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CI_EXAMPLES = 1500
LONG = int(os.environ.get("FUNCTORCH_LITE_FUZZ_EXAMPLES", "0"))
SEED = int(os.environ.get("FUNCTORCH_LITE_FUZZ_SEED", "0"))


@st.composite
def programs(draw):
    return _fuzz.make_program(
        lambda lo, hi: draw(st.integers(lo, hi)), lambda: draw(st.sampled_from(_fuzz.OP_NAMES))
    )


@contextlib.contextmanager
def _quiet():
    """The vmap fallback's and torch's warnings off: a fuzzed program may trigger many."""
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        ft.set_vmap_fallback(old)


_settings = dict(deadline=None, database=None, print_blob=False, suppress_health_check=list(HealthCheck))


def test_catalogue_size():
    assert len(_fuzz.CATALOGUE) >= 80
    # Every op runs on a few shapes outside any transform (a typo in an op would otherwise only
    # show up as "both raise").
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    for name, op in _fuzz.CATALOGUE.items():
        if name == "masked_select":
            continue
        for shape in ((3,), (2, 3), (1, 2, 2)):
            out = _fuzz.chain(((name, 5),))(torch.randn(shape, dtype=torch.float64), y)
            assert out.dtype == torch.float64 and 1 <= out.dim() <= 4, name
    del x


@pytest.mark.skipif(LONG > 0, reason="the long profile runs instead")
@seed(SEED)
@settings(max_examples=CI_EXAMPLES, derandomize=True, **_settings)
@given(programs())
def test_fuzz_ci(prog):
    with _quiet():
        out = _fuzz.run_case(prog)
    assert out.kind != "failure", f"{prog}\n{out.detail}"


@pytest.mark.skipif(LONG == 0, reason="set FUNCTORCH_LITE_FUZZ_EXAMPLES=N for the long profile")
def test_fuzz_long(capsys):
    stats = _fuzz.Stats()

    @seed(SEED)
    @settings(max_examples=LONG, derandomize=SEED == 0, **_settings)
    @given(programs())
    def one(prog):
        with _quiet():
            stats.add(prog, _fuzz.run_case_limited(prog, 60))

    one()
    report = [stats.summary()]
    for sig, (prog, out) in stats.failures.items():
        with _quiet():
            small, sout = _fuzz.shrink(prog, out)
        report.append(f"SHRUNK {sig}\n  {small}\n  {sout.detail[:600]}")
    with capsys.disabled():
        print("\n" + "\n\n".join(report))
    assert not stats.failures, "\n\n".join(report)
