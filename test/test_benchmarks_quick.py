"""Smoke test of the benchmark runner: `benchmarks/run.py --quick` runs every section end to end
(tiny sizes, a few rounds) into a temporary directory and writes the markdown table, the charts
and finite ratios. Times are never asserted: they depend on the machine and its load."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="the runner draws its charts with matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "run.py"),
            "--quick",
            "--out",
            str(out),
            "--json",
            str(out / "results.json"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, proc, results


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_writes_table_and_charts(quick_run):
    out, proc, _ = quick_run
    md = (out / "performance.md").read_text()
    assert "<!-- bench:begin -->" in md and "<!-- bench:end -->" in md
    for heading in (
        "### Transforms",
        "### Clipped per-example",
        "### Whole DP-SGD steps and the noise generator",
        "### DP fine-tuning at language-model scale",
        "### Scaling with the batch size",
    ):
        assert heading in md, heading
    assert "| workload | torch.func | functorch_lite | ratio | notes |" in md
    assert "Machine: " in md and "torch " in md and "thread" in md
    # every chart the page links exists and is a non-empty PNG
    for name in (
        "bench_ratios.png",
        "bench_dp_clip.png",
        "bench_scaling_psg.png",
        "bench_scaling_dp_step.png",
    ):
        assert f"img/{name}" in md
        data = (out / "img" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    # the table also goes to stdout
    assert "| workload | torch.func | functorch_lite | ratio | notes |" in proc.stdout


def test_transform_ratios_finite_and_results_agree(quick_run):
    _, _, results = quick_run
    rows = results["results"]["transforms"]["rows"]
    assert len(rows) >= 16
    for r in rows:
        assert _finite(r["ratio"]) and r["ratio"] > 0, r
        # ft ran and matched torch.func (a for-loop fallback is only reported in the notes)
        assert not any(n.startswith(("ft error", "MISMATCH", "timing failed")) for n in r["notes"]), r


def test_dp_clip_ratios_finite(quick_run):
    _, _, results = quick_run
    models = results["results"]["dp_clip"]["models"]
    assert len(models) == 3
    for m in models:
        methods = {r["method"]: r for r in m["rows"]}
        for k in ("non-private fwd+bwd", "torch.func vmap(grad)+clip", "clipped_grad_module auto"):
            assert k in methods, (m["title"], k)
        for r in m["rows"]:
            assert _finite(r["ratio"]) and r["ratio"] > 0, (m["title"], r)
            assert "failed" not in r["note"] and "rel. diff" not in r["note"], (m["title"], r)


def test_dp_steps_ratios_finite(quick_run):
    _, _, results = quick_run
    r = results["results"]["dp_steps"]
    assert [m["key"] for m in r["models"]] == [
        "MLP B=64",
        "MLP B=256",
        "CNN B=256",
        "transformer B=64",
        "LSTM B=64",
        "GRU B=64",
    ]
    for m in r["models"]:
        methods = {row["method"]: row for row in m["rows"]}
        # torch.func's vmap cannot run a GRU with its default h0: that row fails with a note
        assert "torch.func vmap(grad)+clip" in methods
        for k in (
            "non-private",
            "ft.dp auto (torch noise)",
            "ft.dp auto",
            "ft.dp secure_mode",
        ):
            assert k in methods and _finite(methods[k]["ratio"]) and methods[k]["ratio"] > 0, (m["key"], k)
            assert "failed" not in methods[k]["note"], (m["key"], methods[k])
        for row in m["rows"]:  # an Opacus mode may fail on a model: then a note says why
            assert (_finite(row["ratio"]) and row["ratio"] > 0) or row["note"].startswith("failed"), row
    noise = r["noise"]
    assert {(n["generator"], n["dtype"]) for n in noise} == {
        ("torch normal_", "float32"),
        ("torch normal_", "float64"),
        ("ft Philox", "float32"),
        ("ft Philox", "float64"),
        ("ft secure_mode", "float32"),
    }
    for n in noise:
        assert all(_finite(n[k]) and n[k] > 0 for k in ("ns", "per_s", "speedup")), n


def test_dp_lm_ratios_finite(quick_run):
    pytest.importorskip("transformers", reason="the dp_lm section's models come from transformers")
    _, _, results = quick_run
    r = results["results"]["dp_lm"]
    assert [m["key"] for m in r["models"]] == ["GPT-2 2L T=128", "BERT 4L d=256 cls"]
    for m in r["models"]:
        methods = {row["method"]: row for row in m["rows"]}
        for k in ("non-private", "ft.dp auto"):
            assert k in methods and _finite(methods[k]["ratio"]) and methods[k]["ratio"] > 0, (m["key"], k)
            assert "failed" not in methods[k]["note"], (m["key"], methods[k])
        # GPT-2 and BERT as transformers builds them: every parameter on a per-layer rule
        assert methods["ft.dp auto"]["note"] == "every parameter on a per-layer rule", methods["ft.dp auto"]
        for row in m["rows"]:  # Opacus may fail on a model: then a note says why
            assert (_finite(row["ratio"]) and row["ratio"] > 0) or row["note"].startswith("failed"), row


def test_scaling_ratios_finite(quick_run):
    _, _, results = quick_run
    s = results["results"]["scaling"]
    for key in ("psg", "dp_step"):
        assert len(s[key]) >= 2
        for row in s[key]:
            assert {"torch.func", "functorch_lite"} <= set(row["ratio"]), row
            assert all(_finite(v) and v > 0 for v in row["ratio"].values()), row
            assert not row["notes"], row  # no library failed or mismatched torch.func


def test_partial_run_replaces_only_its_section(quick_run, tmp_path):
    out, _, _ = quick_run
    page = tmp_path / "performance.md"
    page.write_text("# prose kept\n\n" + (out / "performance.md").read_text() + "\nmore prose\n")
    before = page.read_text()
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "run.py"),
            "--quick",
            "--only",
            "transforms",
            "--workloads",
            "vmap_sin",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = page.read_text()
    assert after.startswith("# prose kept\n") and after.endswith("more prose\n")
    begin, end = "<!-- bench:transforms:begin -->", "<!-- bench:transforms:end -->"
    section = after[after.index(begin) : after.index(end)]
    assert "Measured in a separate run" in section and "vmap(torch.sin)" in section
    assert "grad(torch.sin)" not in section  # only the workload asked for
    # the other sections are untouched, byte for byte
    for name in ("dp_clip", "dp_steps", "dp_lm", "scaling"):
        b, e = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
        assert after[after.index(b) : after.index(e)] == before[before.index(b) : before.index(e)]
