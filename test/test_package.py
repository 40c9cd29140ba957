"""Import-level behaviour of functorch_lite: version, show_config, the vmap fallback switch (and its
environment variable), repr/.data/.detach() of the wrapper tensors, and living next to torch.func
in one process (and refusing to be mixed with it)."""

import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.func as tf

import functorch_lite as ft


def _run_python(code, **env):
    """Runs `code` in a fresh interpreter (with functorch_lite importable) and returns it."""
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


# ------------------------------------------------------------------------------------------------
# version and configuration


def test_version_is_a_string():
    assert isinstance(ft.__version__, str)
    assert ft.__version__
    assert all(part.isdigit() for part in ft.__version__.split("+")[0].split(".")[:2])


def test_public_api_is_exported():
    for name in ft.__all__:
        assert hasattr(ft, name), name
    for name in (
        "vmap",
        "grad",
        "grad_and_value",
        "vjp",
        "show_config",
        "set_vmap_fallback",
        "get_vmap_fallback",
    ):
        assert callable(getattr(ft, name))


def test_show_config_returns_and_prints(capsys):
    cfg = ft.show_config()
    assert isinstance(cfg, dict)
    for key in (
        "functorch_lite",
        "built with torch",
        "running with torch",
        "dispatch keys used",
        "vmap fallback mode",
    ):
        assert key in cfg, key
    assert cfg["functorch_lite"] == ft.__version__
    assert cfg["running with torch"] == torch.__version__
    assert cfg["built with torch"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert isinstance(cfg["dispatch keys used"], str) and cfg["dispatch keys used"]
    assert cfg["vmap fallback mode"] == ft.get_vmap_fallback()
    out = capsys.readouterr().out
    for key, value in cfg.items():
        line = next((ln for ln in out.splitlines() if ln.startswith(key)), None)
        assert line is not None, f"{key!r} not printed:\n{out}"
        assert line.rstrip().endswith(str(value)), line


def test_show_config_file_argument():
    buf = io.StringIO()
    cfg = ft.show_config(file=buf)
    assert "built with torch" in buf.getvalue()
    assert "dispatch keys used" in buf.getvalue()
    assert str(cfg["dispatch keys used"]) in buf.getvalue()


# ------------------------------------------------------------------------------------------------
# vmap fallback switch


def test_set_get_vmap_fallback_round_trip():
    old = ft.get_vmap_fallback()
    try:
        for mode in ("error", "quiet", "warn", "error"):
            ft.set_vmap_fallback(mode)
            assert ft.get_vmap_fallback() == mode
            assert ft.show_config(file=io.StringIO())["vmap fallback mode"] == mode
    finally:
        ft.set_vmap_fallback(old)
    assert ft.get_vmap_fallback() == old


def test_set_vmap_fallback_rejects_bad_modes():
    old = ft.get_vmap_fallback()
    with pytest.raises(ValueError, match="'warn', 'error' or 'quiet'"):
        ft.set_vmap_fallback("loud")
    with pytest.raises(TypeError, match="must be a str"):
        ft.set_vmap_fallback(None)
    assert ft.get_vmap_fallback() == old


_FALLBACK_PROBE = """
    import warnings
    import torch
    import functorch_lite as ft

    # a custom operator can have no batching rule: vmap must use (or refuse) the fallback
    @torch.library.custom_op("ftl_test_pkg::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    print("mode", ft.get_vmap_fallback())
    x = torch.arange(6.0).reshape(3, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ft.vmap(twice)(x)
        print("result", bool(torch.equal(out, 2 * x)))
    except RuntimeError as e:
        print("raised", str(e).splitlines()[0])
"""


def test_env_var_fallback_error_is_honoured():
    proc = _run_python(_FALLBACK_PROBE, FUNCTORCH_LITE_VMAP_FALLBACK="error")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mode error"
    assert lines[1].startswith(
        "raised functorch_lite.vmap: Batching rule not implemented for ftl_test_pkg::twice"
    ), lines[1]


@pytest.mark.parametrize(
    "value",
    [
        "quiet",
        "warn",
    ],
)
def test_env_var_fallback_other_modes(value):
    proc = _run_python(_FALLBACK_PROBE, FUNCTORCH_LITE_VMAP_FALLBACK=value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"mode {value}", "result True"]


def test_warn_mode_fallback_of_custom_op_runs():
    @torch.library.custom_op("ftl_test_pkg::thrice_in_process", mutates_args=())
    def thrice(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    x = torch.arange(6.0).reshape(3, 2)
    old = ft.get_vmap_fallback()
    ft.set_vmap_fallback("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = ft.vmap(thrice)(x)  # first fallback of this op: the warning is emitted here
    finally:
        ft.set_vmap_fallback(old)
    torch.testing.assert_close(out, 3 * x)


def test_default_fallback_mode_without_env_var():
    env = {k: v for k, v in os.environ.items() if k != "FUNCTORCH_LITE_VMAP_FALLBACK"}
    proc = subprocess.run(
        [sys.executable, "-c", "import functorch_lite as ft; print(ft.get_vmap_fallback())"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "warn"


# ------------------------------------------------------------------------------------------------
# repr, .data, .detach() of wrapper tensors


def test_repr_of_batched_tensor():
    seen = []

    def f(r):
        seen.append(repr(r))
        seen.append(str(r * 2))
        return r

    x = torch.arange(6.0).reshape(2, 3)
    ft.vmap(f, in_dims=1)(x)
    assert seen[0].startswith("BatchedTensor(lvl=") and "bdim=1" in seen[0], seen[0]
    assert "BatchedTensor(lvl=" in seen[1] and "bdim=" in seen[1]
    assert "tensor([[0., 1., 2.]," in seen[0]  # the underlying value is shown


def test_repr_of_nested_batched_tensor():
    seen = []
    ft.vmap(ft.vmap(lambda r: seen.append(repr(r)) or r))(torch.zeros(2, 3))
    assert seen[0].count("BatchedTensor(lvl=") == 2, seen[0]
    assert seen[0].count("bdim=") == 2


def test_repr_of_grad_level_scalar():
    seen = []

    def f(r):
        seen.append(repr(r))
        return r.sin()

    ft.grad(f)(torch.tensor(0.5))
    assert seen[0].startswith("GradTrackingTensor(lvl="), seen[0]
    assert "tensor(0.5000" in seen[0]


def test_repr_of_grad_level_tensor():
    seen = []

    def f(r):
        seen.append(repr(r))
        return r.sin().sum()

    ft.grad(f)(torch.arange(3.0))
    assert seen[0].startswith("GradTrackingTensor(lvl="), seen[0]


def test_repr_of_plain_tensor_inside_grad():
    seen = []

    def f(r):
        seen.append(repr(torch.ones(2)))
        return r.sum()

    ft.grad(f)(torch.arange(3.0))
    # A factory inside grad makes a tensor of the grad level, as in torch.func.
    assert seen[0].startswith("GradTrackingTensor(lvl=") and "tensor([1., 1.])" in seen[0], seen[0]


def test_tolist_inside_grad():
    seen = []

    def f(r):
        seen.append(r.tolist())
        return r.sum()

    ft.grad(f)(torch.arange(3.0))
    assert seen == [[0.0, 1.0, 2.0]]


def test_repr_inside_vmap_of_grad():
    seen = []

    def f(r):
        seen.append(repr(r))
        return r.sum()

    ft.vmap(ft.grad(f))(torch.zeros(2, 3))
    assert "GradTrackingTensor(lvl=" in seen[0] and "BatchedTensor(lvl=" in seen[0]


def test_repr_of_dead_wrapper_after_transform():
    store = {}

    def f(r):
        store["r"] = r
        return r.sum()

    ft.grad(f)(torch.arange(3.0))
    text = repr(store["r"])
    assert "GradTrackingTensor(lvl=" in text and "dead" in text
    assert "tensor([0., 1., 2.])" in text


def test_data_and_detach_inside_vmap():
    """detach() of a batched tensor is a batched tensor without history; reading .data is refused
    as in torch.func (it would hand one example's code the whole batch)."""
    X = torch.randn(3, 4)
    out = {}

    def f(r):
        e = r.detach()
        out["shape"], out["repr"], out["requires_grad"] = e.shape, repr(e), e.requires_grad
        return r * 2, e + 1

    a, c = ft.vmap(f)(X)
    assert out["shape"] == torch.Size([4]) and "BatchedTensor(lvl=" in out["repr"]
    assert out["requires_grad"] is False
    torch.testing.assert_close(a, 2 * X)
    torch.testing.assert_close(c, X + 1)
    with pytest.raises(RuntimeError, match="reading `.data` of a batched tensor inside vmap"):
        ft.vmap(lambda r: r.data * 3)(X)
    with pytest.raises(RuntimeError):
        torch.func.vmap(lambda r: r.data * 3)(X)


def test_data_and_detach_inside_grad():
    x = torch.tensor(2.0)
    info = {}

    def f(r):
        d, e = r.data, r.detach()
        info["requires_grad"] = (r.requires_grad, d.requires_grad, e.requires_grad)
        info["repr"] = repr(e)
        return (r * d) + (r * e) + r**2

    g = ft.grad(f)(x)
    assert info["requires_grad"] == (True, False, False)
    assert "GradTrackingTensor(lvl=" in info["repr"]
    torch.testing.assert_close(g, torch.tensor(8.0))  # d + e + 2r, with d = e = r = 2


@pytest.mark.parametrize("use", ["data", "detach"])
def test_data_and_detach_are_constants_like_torch_func(use):
    X = torch.randn(3, 4)

    def f(r):
        c = r.data if use == "data" else r.detach()
        return (r * c).sum() + (c * c).sum()

    torch.testing.assert_close(ft.grad(f)(X[0]), tf.grad(f)(X[0]))
    torch.testing.assert_close(ft.vmap(ft.grad(f))(X), tf.vmap(tf.grad(f))(X))
    torch.testing.assert_close(
        ft.grad(ft.grad(lambda t: f(t.expand(4)) * t))(X[0, 0]),
        tf.grad(tf.grad(lambda t: f(t.expand(4)) * t))(X[0, 0]),
    )


# ------------------------------------------------------------------------------------------------
# coexistence with torch.func


def test_coexists_with_torch_func_in_one_process():
    x = torch.randn(4)
    X = torch.randn(3, 4)
    f = lambda t: (t.sin() * t).sum()  # noqa: E731
    ref_grad = x.sin() + x * x.cos()
    ref_vgrad = X.sin() + X * X.cos()
    for _ in range(2):
        torch.testing.assert_close(ft.grad(f)(x), ref_grad)
        torch.testing.assert_close(ft.vmap(ft.grad(f))(X), ref_vgrad)
        torch.testing.assert_close(tf.grad(f)(x), ref_grad)
        torch.testing.assert_close(tf.vmap(tf.grad(f))(X), ref_vgrad)
        torch.testing.assert_close(ft.vjp(torch.sin, x)[1](torch.ones(4))[0], x.cos())
        torch.testing.assert_close(tf.vjp(torch.sin, x)[1](torch.ones(4))[0], x.cos())
        torch.testing.assert_close(ft.vmap(torch.sum)(X), X.sum(1))
        torch.testing.assert_close(tf.vmap(torch.sum)(X), X.sum(1))
    assert ft._C._stack_depth() == 0
    assert torch._C._functorch.maybe_current_level() is None


def test_torch_func_inside_functorch_lite_is_correct():
    """torch.func transforms of functorch_lite tensors: not required to work, but they must not
    return wrong values: either the right result or a clear error."""
    X = torch.randn(3, 4)
    cases = [
        (lambda: ft.vmap(lambda r: tf.vmap(torch.sin)(r.unsqueeze(0)))(X), X.sin().unsqueeze(1)),
        (lambda: ft.vmap(tf.grad(lambda r: r.sin().sum()))(X), X.cos()),
        (lambda: ft.grad(lambda r: tf.grad(lambda q: q.sin().sum())(r).sum())(X[0]), -X[0].sin()),
        (lambda: ft.vmap(lambda r: tf.vmap(lambda q: q * r)(X))(X), X[:, None] * X[None]),
    ]
    for run, expected in cases:
        try:
            got = run()
        except RuntimeError as e:
            assert "torch.func" in str(e) and "mixed" in str(e), str(e)
        else:
            torch.testing.assert_close(got, expected)


MIXING = r"functorch_lite and torch\.func cannot be mixed|two libraries cannot be mixed"


def test_functorch_lite_vmap_inside_torch_func_vmap_raises():
    X = torch.randn(3, 2, 4)
    with pytest.raises(RuntimeError, match=MIXING):
        tf.vmap(lambda r: ft.vmap(torch.sin)(r))(X)
    with pytest.raises(RuntimeError, match=MIXING):
        tf.vmap(lambda r: ft.vmap(lambda q: q + r[0])(torch.ones(2, 4)))(X)
    with pytest.raises(RuntimeError, match=MIXING):
        tf.vmap(ft.grad(lambda r: r.sum()))(X[:, 0])
    with pytest.raises(RuntimeError, match=MIXING):
        tf.grad(lambda r: ft.vmap(torch.sin)(r.unsqueeze(0)).sum())(X[0, 0])
    assert ft._C._stack_depth() == 0
    # both libraries still work afterwards
    torch.testing.assert_close(ft.vmap(torch.sin)(X), X.sin())
    torch.testing.assert_close(tf.vmap(torch.sin)(X), X.sin())


def test_functorch_lite_on_escaped_torch_func_tensors_raises():
    X = torch.randn(3, 4)
    store = {}

    def keep(r):
        store["batched"] = r
        return r

    tf.vmap(keep)(X)

    def keep_grad(r):
        store["grad"] = r
        return r.sum()

    tf.grad(keep_grad)(X[0])
    with pytest.raises(RuntimeError, match=MIXING):
        ft.vmap(torch.sin)(store["batched"])
    with pytest.raises(RuntimeError, match=MIXING):
        ft.grad(lambda r: r.sum())(store["batched"])
    with pytest.raises(RuntimeError, match=MIXING):
        ft.vmap(torch.sin)(store["grad"])
    with pytest.raises(RuntimeError, match=MIXING):
        ft.grad(lambda r: (r * store["grad"]).sum())(X[0])
    assert ft._C._stack_depth() == 0


def test_dp_has_no_import_cycles():
    """functorch_lite.dp: entry points (_clip, _engine, _private, _validate) above the fast path
    (_ghost) and the per-example path (_per_example), shared helpers (_common) below them all."""
    import ast
    import pathlib

    root = pathlib.Path(ft.__file__).parent / "dp"
    graph = {}
    for f in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
        graph[f.stem] = deps

    def reaches(start, target, seen=()):
        return any(
            n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph.get(start, ())
        )

    assert not [m for m in graph if reaches(m, m)], graph
    assert (
        graph["_common"] == set() and graph["_ghost"] == {"_common"} and graph["_per_example"] == {"_common"}
    )
