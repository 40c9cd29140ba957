"""Shared pytest fixtures for functorch_lite's tests (generic: used by every test file)."""

import contextlib

import pytest
import torch

import functorch_lite as ft

# The OpInfo sweeps' checks assert in this helper module: rewritten, their failures show the
# compared values as they did when the checks lived in the test files.
pytest.register_assert_rewrite("_opinfo_common")
# Likewise for the placements harness of the batching-rule case tables.
pytest.register_assert_rewrite("_placements")


def pytest_addoption(parser):
    parser.addoption(
        "--skip-slow",
        action="store_true",
        help="skip the tests marked slow (OpInfo sweeps, fuzzer, extension build, benchmark smoke "
        "test, memory soak): a quick local loop; CI runs everything",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: a long sweep or soak; CI runs it, `pytest --skip-slow` leaves it out locally",
    )
    config.addinivalue_line(
        "markers",
        "run_first: run before every other test of the session (for checks of once-per-process "
        "state, such as the vmap fallback warning, which is only emitted the first time an op "
        "falls back)",
    )


# The long sweeps and soaks, marked here in one place (a file-level mark each would be scattered).
SLOW_FILES = {
    "test_opinfo_sweep.py",
    "test_opinfo_vjp.py",
    "test_opinfo_jvp.py",
    "test_fuzz.py",
    "test_benchmarks_quick.py",
    "test_cpp_extension.py",
    "test_memory.py",
}


def pytest_collection_modifyitems(config, items):
    for it in items:
        if it.path.name in SLOW_FILES:
            it.add_marker(pytest.mark.slow)
    if config.getoption("--skip-slow"):
        skip = pytest.mark.skip(reason="slow: run without --skip-slow (CI does)")
        for it in items:
            if it.get_closest_marker("slow"):
                it.add_marker(skip)
    first = [it for it in items if it.get_closest_marker("run_first")]
    if first:
        rest = [it for it in items if not it.get_closest_marker("run_first")]
        items[:] = first + rest


@contextlib.contextmanager
def vmap_fallback(mode):
    """Sets ft.set_vmap_fallback(mode) for the duration of the block, then restores the mode."""
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback(mode)
    try:
        yield
    finally:
        ft.set_vmap_fallback(old)


def outcome(run):
    """(run(), None), or (None, the exception run() raised): for tests that compare failures too."""
    try:
        return run(), None
    except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
        return None, e


@pytest.fixture
def fallback_mode():
    """`with fallback_mode('error'): ...` runs the block with that vmap fallback mode."""
    return vmap_fallback


@pytest.fixture(autouse=True)
def _seed_and_restore():
    """Every test starts from seed 0 and the same fallback mode, and may not leak levels."""
    torch.manual_seed(0)
    mode = ft.get_vmap_fallback()
    yield
    ft.set_vmap_fallback(mode)
    depth = ft._C._stack_depth()
    assert depth == 0, f"the test left {depth} functorch_lite level(s) on the stack: " + (
        ft._C._describe_stack()
    )
