"""Per-sample gradients and whole DP-SGD steps against the batch size, one line per library.

Model: the MLP 784-512-10 of the other benchmarks (nn.Sequential of Linear, ReLU, Linear),
cross-entropy loss. For every batch size B:

- per-sample gradients (every example's gradient of every parameter, materialised):
  functorch_lite and torch.func `vmap(grad(loss of one example via functional_call))`, Opacus'
  hooks (`GradSampleModule`, `p.grad_sample`) and JAX `jit(vmap(grad(loss)))`; the first call of
  each is checked against torch.func (`MISMATCH` in the notes otherwise);
- one DP-SGD step (clip every example's gradient to norm 1, sum, add Gaussian noise of std 1,
  divide by B, SGD step): functorch_lite's `ft.dp.PrivateTrainer` (clipping "auto": ghost norms
  where cheaper), torch.func `vmap(grad)` + clip + noise by hand, Opacus' `DPOptimizer` over a
  `GradSampleModule` (hooks) and over `GradSampleModuleFastGradientClipping` (ghost clipping), a
  jitted JAX step, and the non-private step (forward, backward, SGD) as the floor.

Opacus and JAX rows appear only when the package imports. All libraries at one B are timed in
interleaved rounds (the order rotates each round; each measurement repeats a call until it lasts
min_time); times are medians over rounds, ratios medians of the per-round ratios to torch.func.

JAX runs on its own CPU thread pool: with one thread requested, XLA_FLAGS is set (before jax is
imported) to single-threaded Eigen, the closest match to torch.set_num_threads(1).
"""

import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft

MAX_NORM = 1.0
SIGMA = 1.0
LR = 0.05
TORCH_FUNC = "torch.func"


def _jax(threads):
    """jax and jax.numpy, or None when jax is not installed."""
    if "jax" not in sys.modules:  # both are read when jax initialises its backend
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the torch side runs on the CPU too
        if threads == 1:
            os.environ.setdefault(
                "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            )
    try:
        import jax  # optional benchmark dependency
        import jax.numpy as jnp
    except ImportError:
        return None
    return jax, jnp


def _opacus():
    try:
        import opacus  # optional benchmark dependency
    except ImportError:
        return None
    return opacus


def make_model(hidden):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def make_batch(B):
    g = torch.Generator().manual_seed(B)
    return torch.randn(B, 784, generator=g), torch.randint(0, 10, (B,), generator=g)


def _one_example_loss(functional_call, model):
    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return loss


# --------------------------------------------------------------------------------------------
# JAX versions of the same MLP (torch's Linear layout: weight (out, in), y = x W^T + b)


def _jax_params(jnp, model):
    return {n: jnp.asarray(p.detach().numpy()) for n, p in model.named_parameters()}


def _jax_loss(jax, jnp):
    def loss(p, xi, yi):
        h = jax.nn.relu(xi @ p["0.weight"].T + p["0.bias"])
        logits = h @ p["2.weight"].T + p["2.bias"]
        return -jax.nn.log_softmax(logits)[yi]

    return loss


# --------------------------------------------------------------------------------------------
# per-sample gradients


def psg_fns(model, x, y, threads):
    """name -> zero-argument callable returning name -> per-sample gradient tensor (torch)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    f_tf = tf.vmap(tf.grad(_one_example_loss(tf.functional_call, model)), in_dims=(None, 0, 0))
    f_ft = ft.vmap(ft.grad(_one_example_loss(ft.functional_call, model)), in_dims=(None, 0, 0))
    fns = {TORCH_FUNC: lambda: f_tf(params, x, y), "functorch_lite": lambda: f_ft(params, x, y)}

    if _opacus() is not None:
        from opacus import GradSampleModule

        gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

        def opacus_hooks():
            gsm.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
            return {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}

        fns["Opacus (hooks)"] = opacus_hooks

    jx = _jax(threads)
    if jx is not None:
        jax, jnp = jx
        pj, xj, yj = _jax_params(jnp, model), jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
        f_jax = jax.jit(jax.vmap(jax.grad(_jax_loss(jax, jnp)), in_axes=(None, 0, 0)))

        def jax_psg():
            return jax.block_until_ready(f_jax(pj, xj, yj))

        fns["JAX"] = jax_psg
    return fns


def _to_torch(tree):
    """JAX arrays -> torch tensors (by way of numpy), tensors unchanged."""
    import numpy as np

    return {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)) for k, v in tree.items()}


def _check_psg(out, ref):
    out = _to_torch(out)
    if set(out) != set(ref):
        return f"MISMATCH (parameters {sorted(out)})"
    worst = max((out[k] - ref[k]).abs().max().item() for k in ref)
    return (
        ""
        if all(torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-5) for k in ref)
        else f"MISMATCH ({worst:.2g})"
    )


# --------------------------------------------------------------------------------------------
# DP-SGD steps


def _ce_none(out, y):
    return F.cross_entropy(out, y, reduction="none")


def dp_step_fns(model, x, y, threads):
    """name -> zero-argument callable doing one optimizer step (every library on its own copy)."""
    B = x.shape[0]
    fns = {}

    base = copy.deepcopy(model)
    base_opt = torch.optim.SGD(base.parameters(), lr=LR)

    def non_private():
        base_opt.zero_grad(set_to_none=True)
        F.cross_entropy(base(x), y).backward()
        base_opt.step()

    fns["non-private (torch)"] = non_private

    m_tf = copy.deepcopy(model)
    opt_tf = torch.optim.SGD(m_tf.parameters(), lr=LR)
    live = dict(m_tf.named_parameters())
    per_example = tf.vmap(tf.grad(_one_example_loss(tf.functional_call, m_tf)), in_dims=(None, 0, 0))

    def torch_func():
        per = per_example({n: p.detach() for n, p in live.items()}, x, y)
        norms = torch.stack([g.reshape(B, -1).norm(dim=1) for g in per.values()]).norm(dim=0)
        c = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
        for n, p in live.items():
            s = torch.tensordot(c, per[n], dims=1)
            p.grad = (s + torch.randn_like(s) * (SIGMA * MAX_NORM)) / B
        opt_tf.step()

    fns[TORCH_FUNC] = torch_func

    m_ft = copy.deepcopy(model)
    trainer = ft.dp.PrivateTrainer(
        m_ft,
        torch.optim.SGD(m_ft.parameters(), lr=LR),
        _ce_none,
        max_grad_norm=MAX_NORM,
        sample_rate=0.01,
        expected_batch_size=B,
        noise_multiplier=SIGMA,
    )
    fns["functorch_lite"] = lambda: trainer.step(x, y)

    if _opacus() is not None:
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModule(copy.deepcopy(model))
        opt_op = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=MAX_NORM,
            expected_batch_size=B,
        )

        def opacus_hooks():
            opt_op.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            opt_op.step()

        fns["Opacus (hooks)"] = opacus_hooks

        ghost = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=MAX_NORM)
        opt_gh = DPOptimizerFastGradientClipping(
            torch.optim.SGD(ghost.parameters(), lr=LR),
            noise_multiplier=SIGMA,
            max_grad_norm=MAX_NORM,
            expected_batch_size=B,
        )
        crit = DPLossFastGradientClipping(ghost, opt_gh, nn.CrossEntropyLoss(), "mean")

        def opacus_ghost():
            opt_gh.zero_grad(set_to_none=True)
            crit(ghost(x), y).backward()
            opt_gh.step()

        fns["Opacus (ghost clipping)"] = opacus_ghost

    jx = _jax(threads)
    if jx is not None:
        jax, jnp = jx
        per_ex = jax.vmap(jax.grad(_jax_loss(jax, jnp)), in_axes=(None, 0, 0))

        @jax.jit
        def step(p, key, xb, yb):
            g = per_ex(p, xb, yb)
            leaves = jax.tree_util.tree_leaves(g)
            norms = jnp.sqrt(sum(jnp.sum(leaf.reshape(B, -1) ** 2, axis=1) for leaf in leaves))
            c = jnp.minimum(MAX_NORM / (norms + 1e-6), 1.0)
            key, sub = jax.random.split(key)
            keys = dict(zip(g, jax.random.split(sub, len(g))))
            new = {
                n: p[n]
                - LR
                * (jnp.tensordot(c, g[n], axes=1) + SIGMA * MAX_NORM * jax.random.normal(keys[n], p[n].shape))
                / B
                for n in p
            }
            return new, key

        state = {"p": _jax_params(jnp, model), "key": jax.random.PRNGKey(0)}
        xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

        def jax_step():
            state["p"], state["key"] = jax.block_until_ready(step(state["p"], state["key"], xj, yj))

        fns["JAX"] = jax_step
    return fns


# --------------------------------------------------------------------------------------------


def interleaved(fns, rounds, min_time):
    """name -> per-round seconds per call: each round times every callable once (repeated to last
    min_time), in an order that rotates from round to round."""
    repeats = {}
    for k, fn in fns.items():
        fn()  # warm-up (jit compilation, allocator, first-call caches)
        t0 = time.perf_counter()
        fn()
        repeats[k] = max(1, round(min_time / max(time.perf_counter() - t0, 1e-9)))
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            for _ in range(repeats[k]):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / repeats[k])
    return times


def _sweep(kind, make_fns, batch_sizes, hidden, rounds, min_time, threads, log):
    """Rows: dict(B, times: name -> median s, ratio: name -> paired ratio to torch.func, notes)."""
    rows = []
    for B in batch_sizes:
        t1 = time.perf_counter()
        model = make_model(hidden)
        x, y = make_batch(B)
        fns = make_fns(model, x, y, threads)
        notes = {}
        if kind == "psg":
            ref = fns[TORCH_FUNC]()
            for k, fn in list(fns.items()):
                if k == TORCH_FUNC:
                    continue
                try:
                    notes[k] = _check_psg(fn(), ref)
                except Exception as e:  # noqa: BLE001  (a library failing is a note, not a crash)
                    notes[k] = f"failed: {str(e).strip().splitlines()[0][:80]}"
                    del fns[k]
            del ref
        else:
            for k, fn in list(fns.items()):
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    notes[k] = f"failed: {str(e).strip().splitlines()[0][:80]}"
                    del fns[k]
        times = interleaved(fns, rounds, min_time)
        base = times[TORCH_FUNC]
        rows.append(
            dict(
                B=B,
                times={k: statistics.median(v) for k, v in times.items()},
                ratio={k: statistics.median(t / b for t, b in zip(v, base)) for k, v in times.items()},
                notes={k: v for k, v in notes.items() if v},
            )
        )
        if log:
            log(
                f"[{time.perf_counter() - t1:6.1f} s] {kind} B={B}: "
                + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in rows[-1]["times"].items())
            )
    return rows


def run(quick=False, threads=1, log=None):
    """Both sweeps; returns dict(model=..., psg=rows, dp_step=rows, how=...)."""
    hidden, sizes, rounds, min_time = (
        (32, (2, 4, 8), 3, 0.005) if quick else (512, (16, 32, 64, 128, 256), 5, 0.1)
    )
    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    try:
        psg = _sweep("psg", psg_fns, sizes, hidden, rounds, min_time, threads, log)
        dp = _sweep("dp_step", dp_step_fns, sizes, hidden, rounds, min_time, threads, log)
    finally:
        ft.set_vmap_fallback(old_mode)
    return dict(
        model=f"MLP 784-{hidden}-10, cross-entropy",
        psg=psg,
        dp_step=dp,
        how=f"{rounds} interleaved rounds, each call repeated to last {min_time} s; medians over rounds",
    )


def _fmt_ms(t):
    return "-" if t is None or math.isnan(t) else (f"{t * 1e3:.2f}" if t < 0.1 else f"{t * 1e3:.0f}")


def markdown(rows, title):
    """One table: a row per batch size, per library the time in ms and the ratio to torch.func."""
    libs = list(dict.fromkeys(k for r in rows for k in r["times"]))
    lines = [
        f"**{title}** (ms; ratio to torch.func at the same batch size)",
        "",
        "| B | " + " | ".join(libs) + " | notes |",
        "| ---: | " + " | ".join("---:" for _ in libs) + " | --- |",
    ]
    for r in rows:
        cells = []
        for k in libs:
            t = r["times"].get(k)
            cells.append("-" if t is None else f"{_fmt_ms(t)} ({r['ratio'][k]:.2f}x)")
        notes = "; ".join(f"{k}: {v}" for k, v in r["notes"].items()).replace("|", "\\|")
        lines.append(f"| {r['B']} | " + " | ".join(cells) + f" | {notes} |")
    return "\n".join(lines) + "\n"
