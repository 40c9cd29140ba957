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


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "run_first: run before every other test of the session (for checks of once-per-process "
        "state, such as the vmap fallback warning, which is only emitted the first time an op "
        "falls back)",
    )


def pytest_collection_modifyitems(config, items):
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
