"""Runs the examples (examples/*.py) at their small size: each one asserts its batched results
against a Python for-loop reference. Imported and called in-process (main(size='small')), and once
each as a script in a subprocess, the way a user runs them. The main job, examples/demo.py (DP-SGD
on scikit-learn's digits), runs as a script with one epoch."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import functorch_lite as ft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["per_sample_grads_cnn", "ensemble", "maml_sine", "jacobians_hessians"]


def load(name):
    spec = importlib.util.spec_from_file_location(
        f"_ft_example_{name}", os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_per_sample_grads_cnn(grads):
    assert grads["conv1.weight"].shape == (8, 8, 1, 3, 3)


def check_ensemble(result):
    same, different = result
    assert same.shape == different.shape == (4, 16, 3)
    assert not torch.allclose(same[0], same[1])  # different models give different outputs


def check_jacobians_hessians(result):
    jacobian, hess = result
    assert jacobian.shape == (8, 8) and hess.shape == (4, 16, 16)


def check_maml_sine(result):
    before, after = result
    assert after < before


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_main_small(name, capsys):
    mode = ft.get_vmap_fallback()
    result = load(name).main(size="small")
    assert ft.get_vmap_fallback() == mode  # the example restores the fallback mode
    globals()[f"check_{name}"](result)
    out = capsys.readouterr().out
    assert "equal" in out and out.count("\n") >= 3, out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_script(name):
    env = dict(os.environ, FUNCTORCH_LITE_VMAP_FALLBACK="warn")
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", f"{name}.py"), "--size", "small"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal" in proc.stdout, proc.stdout
    assert "UserWarning" not in proc.stderr, proc.stderr  # the examples silence the fallback


# ------------------------------------------------------------------------------------------------
# the main job: examples/demo.py (DP-SGD on scikit-learn's digits), run as `bash scripts/demo.sh`


def run_demo(*args):
    return subprocess.run(
        [sys.executable, os.path.join("examples", "demo.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_help_lists_the_options():
    proc = run_demo("--help")
    assert proc.returncode == 0, proc.stderr
    for option in (
        "--epochs",
        "--target-epsilon",
        "--noise-multiplier",
        "--max-grad-norm",
        "--batch-size",
        "--clipping",
        "--seed",
        "--device",
        "--out",
    ):
        assert option in proc.stdout, option


def test_demo_trains_privately_and_writes_the_plot(tmp_path):
    png = tmp_path / "plot.png"
    proc = run_demo("--epochs", "1", "--target-epsilon", "1.0", "--out", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "equal to a loop of torch.autograd" in out, out  # the clipping check
    private = next(ln for ln in out.splitlines() if ln.startswith("private:"))
    eps_rdp = float(private.split("epsilon ")[1].split(" (RDP)")[0])
    eps_pld = float(private.split("/ ")[1].split(" (PLD)")[0])
    # calibrated for epsilon 1 after all (here: one epoch of) steps; PLD is tighter than RDP
    assert 0.98 <= eps_rdp <= 1.0 and 0 < eps_pld < eps_rdp, private
    assert "non-private: test accuracy" in out and "time per step" in out, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
