"""Batching rules written in C++ by a user: examples/cpp_extension (myext::scaled_add) is built
against the installed headers and the CMake package (find_package(FunctorchLite), the target
functorch_lite::rules), loaded, and its rule checked under ft.vmap against a for-loop, with the
for-loop fallback disabled so that only the rule can have run (docs/extending_cpp.md).

The build goes to build/test_cpp_extension/<key> (ignored by git) and is incremental: CI and
repeated local runs pay for the compile once."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.utils

import functorch_lite as ft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cpp_extension")


def _build_dir():
    key = hashlib.sha1(f"{sys.executable}|{torch.__version__}|{ft.library_path()}".encode()).hexdigest()[:12]
    base = os.path.join(ROOT, "build")
    if not os.access(ROOT, os.W_OK):
        base = tempfile.gettempdir()
    return os.path.join(base, "test_cpp_extension", key)


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def myext():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake ninja)")
    build = _build_dir()
    os.makedirs(build, exist_ok=True)
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        cfg = [
            cmake,
            "-S",
            EXAMPLE,
            "-B",
            build,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{ft.cmake_prefix_path}",
        ]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        if shutil.which("ccache"):
            cfg += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        _run(cfg, ROOT)
    _run([cmake, "--build", build, "-j", str(min(os.cpu_count() or 1, 2))], ROOT)
    torch.ops.load_library(os.path.join(build, "libmyext.so"))
    return torch.ops.myext.scaled_add


def loop(f, in_dims, *args):
    """vmap by definition: f on each batch element, results stacked at dim 0."""
    sizes = {a.shape[d] for a, d in zip(args, in_dims) if d is not None}
    (B,) = sizes
    rows = [f(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]) for i in range(B)]
    return torch.stack(rows)


# (x shape, y shape, in_dims): the batch dim anywhere, unbatched arguments, and broadcasting of
# logical ranks (a batched y of lower rank, a logical scalar y) that the rule must align.
CASES = [
    ((5, 3, 4), (5, 3, 4), (0, 0)),
    ((3, 5, 4), (5, 3, 4), (1, 0)),
    ((3, 4, 5), (4, 5), (2, 1)),
    ((5, 3, 4), (5, 4), (0, 0)),
    ((5, 3), (5,), (0, 0)),
    ((5,), (5, 3, 2), (0, 0)),
    ((3, 4), (5, 4), (None, 0)),
    ((5, 2, 3), (3,), (0, None)),
    ((5, 2, 3), (2, 1), (0, None)),
]


@pytest.mark.parametrize("xs,ys,in_dims", CASES)
def test_vmap_runs_the_rule_and_matches_a_loop(myext, fallback_mode, xs, ys, in_dims):
    x, y = torch.randn(xs), torch.randn(ys)
    with fallback_mode("error"):
        got = ft.vmap(myext, in_dims=(*in_dims, None))(x, y, 0.5)
    expected = loop(lambda a, b: myext(a, b, 0.5), in_dims, x, y)
    torch.testing.assert_close(got, expected)


def test_out_dims_and_alpha(myext, fallback_mode):
    x, y = torch.randn(3, 5), torch.randn(5, 3)
    with fallback_mode("error"):
        got = ft.vmap(myext, in_dims=(1, 0, None), out_dims=1)(x, y, -2.0)
    torch.testing.assert_close(got, (x.t() - 2.0 * y).t())


def test_the_kill_switch_catches_an_op_without_a_rule(fallback_mode):
    # Proves the tests above are not vacuous: a custom op with no rule goes to the fallback, which
    # 'error' refuses.
    lib = torch.library.Library("ftl_cppext_norule", "DEF")
    lib.define("scaled_add(Tensor x, Tensor y, float alpha) -> Tensor")
    lib.impl("scaled_add", lambda x, y, alpha: x + alpha * y, "CPU")
    op = torch.ops.ftl_cppext_norule.scaled_add
    with fallback_mode("error"), pytest.raises(RuntimeError, match="Batching rule not implemented"):
        ft.vmap(op, in_dims=(0, 0, None))(torch.randn(3, 2), torch.randn(3, 2), 1.0)


def test_nested_vmap(myext, fallback_mode):
    x, y = torch.randn(4, 3), torch.randn(6, 3)
    with fallback_mode("error"):
        # outer over y's rows, inner over x's rows: every pair.
        got = ft.vmap(ft.vmap(myext, in_dims=(0, None, None)), in_dims=(None, 0, None))(x, y, 3.0)
    expected = torch.stack([torch.stack([myext(x[n], y[m], 3.0) for n in range(4)]) for m in range(6)])
    torch.testing.assert_close(got, expected)


def test_nested_vmap_both_batched_matches_loop(myext, fallback_mode):
    x, y = torch.randn(2, 4, 3), torch.randn(4, 3, 2)
    with fallback_mode("error"):
        got = ft.vmap(ft.vmap(myext, in_dims=(1, 1, None)), in_dims=(0, 2, None))(x, y, 1.5)
    expected = torch.stack(
        [torch.stack([myext(x[i, :, j], y[:, j, i], 1.5) for j in range(3)]) for i in range(2)]
    )
    torch.testing.assert_close(got, expected)


def test_grad_uses_the_extensions_autograd_formula(myext):
    x, y = torch.randn(3, 4), torch.randn(4)
    gx, gy = ft.grad(lambda a, b: myext(a, b, 0.5).pow(2).sum(), argnums=(0, 1))(x, y)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    ex, ey = torch.autograd.grad(myext(xr, yr, 0.5).pow(2).sum(), (xr, yr))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gy, ey)


def test_per_sample_grads_through_the_rule(myext, fallback_mode):
    x, y = torch.randn(5, 3), torch.randn(3)

    def loss(a, b):
        return myext(a, b, 2.0).sin().sum()

    with fallback_mode("error"):
        got = ft.vmap(ft.grad(loss, argnums=1), in_dims=(0, None))(x, y)
    rows = []
    for i in range(5):
        yr = y.clone().requires_grad_()
        rows.append(torch.autograd.grad(loss(x[i], yr), yr)[0])
    torch.testing.assert_close(got, torch.stack(rows))


def test_grad_of_vmap(myext, fallback_mode):
    x, y = torch.randn(5, 3), torch.randn(3)

    def f(b):
        return ft.vmap(myext, in_dims=(0, None, None))(x, b, -1.0).pow(2).sum()

    with fallback_mode("error"):
        got = ft.grad(f)(y)
    yr = y.clone().requires_grad_()
    (expected,) = torch.autograd.grad(myext(x, yr, -1.0).pow(2).sum(), yr)
    torch.testing.assert_close(got, expected)


def test_install_locations():
    assert os.path.isfile(os.path.join(ft.get_include(), "functorch_lite", "rules.h"))
    assert os.path.isfile(os.path.join(ft.cmake_prefix_path, "FunctorchLite", "FunctorchLiteConfig.cmake"))
    assert os.path.samefile(ft.library_path(), ft._C.__file__)


def _public_header_closure(inc):
    """rules.h and every project header it includes, transitively, relative to `inc`."""
    todo, seen = ["functorch_lite/rules.h"], set()
    while todo:
        rel = os.path.normpath(todo.pop())
        if rel in seen:
            continue
        seen.add(rel)
        with open(os.path.join(inc, rel)) as f:
            for inner in re.findall(r'^#include "([^"]+)"', f.read(), flags=re.M):
                todo.append(os.path.join(os.path.dirname(rel), inner))
    return seen


def test_package_data_ships_every_header_the_public_one_includes(tmp_path):
    # In a checkout the headers are symlinks into csrc/; a wheel gets what setup.py's package_data
    # globs pick up. Every header reachable from rules.h must be among them, as a plain file, or an
    # installed package would fail to compile extensions that a checkout compiles.
    headers = _public_header_closure(ft.get_include())
    assert "functorch_lite/vmap/plumbing.h" in headers
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pkg = tmp_path / "functorch_lite"
    for rel in sorted(headers):
        shipped = pkg / "include" / rel
        assert shipped.is_file() and not shipped.is_symlink(), rel
        with open(os.path.join(ft.get_include(), rel)) as a:
            assert shipped.read_text() == a.read(), rel
    assert (pkg / "share" / "cmake" / "FunctorchLite" / "FunctorchLiteConfig.cmake").is_file()
