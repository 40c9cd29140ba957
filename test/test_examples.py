"""Runs the examples (examples/*.py) at their small size: each one asserts its batched results
against a Python for-loop reference. Imported and called in-process (main(size='small')), and once
each as a script in a subprocess, the way a user runs them."""
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
        f"_ft_example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
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
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal" in proc.stdout, proc.stdout
    assert "UserWarning" not in proc.stderr, proc.stderr  # the examples silence the fallback
