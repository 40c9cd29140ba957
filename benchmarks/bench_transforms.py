"""functorch_lite vs torch.func, side by side in one process, on the same inputs.

Every workload is one row. For each row the runner

  1. builds the inputs once (fixed seed) and the functorch_lite (ft), torch.func (tf) and, where
     it makes sense, a direct batched call ("direct", e.g. torch.bmm);
  2. runs ft and tf once and checks that they agree (torch.allclose over every leaf of the output
     pytree); 'MISMATCH' goes into the notes otherwise;
  3. records which ops took functorch_lite's for-loop vmap fallback during that run
     (ft._C._fallback_ops_seen()); they go into the notes as 'fallback: ...';
  4. times ft, tf and direct with torch.utils.benchmark.Timer.blocked_autorange, interleaved
     over many short rounds (ft, tf, direct, then the next round in rotated order), and keeps
     per-round medians; the times shown are medians over the rounds and the ratios are medians
     of the per-round ratios (paired, so load that drifts between rounds cancels). The Timer
     synchronizes the accelerator before reading the clock, so CUDA timings include kernels.

ratio = ft time / torch.func time (lower is better). The transformed functions are built once
(f = ft.vmap(g)) and only the calls are timed: "end to end" means from the Python call to the
finished output, including argument checking, level bookkeeping and unwrapping.

If ft raises on a workload, the first line of the error goes into the notes and the run goes on.
The vmap fallback is set to 'quiet' for the whole run (and restored at the end).

A module of benchmarks/run.py (`python benchmarks/run.py --only transforms`), which describes
the machine, writes docs/performance.md and draws the charts. Every workload takes
(device, quick): quick=True gives tiny sizes for the smoke test.
"""

import math
import statistics
import time
import traceback

import torch
import torch.func as tf
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch.utils._pytree import tree_flatten

import functorch_lite as ft

# --------------------------------------------------------------------------------------------
# helpers


def _first_line(exc):
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()


def _reset_fallbacks():
    fn = getattr(ft._C, "_reset_fallback_ops_seen", None)
    if fn is not None:
        fn()


def _fallbacks_seen():
    fn = getattr(ft._C, "_fallback_ops_seen", None)
    return sorted(set(fn())) if fn is not None else []


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _compare(a, b, rtol, atol):
    """True / False / a string saying why the structures differ."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb:
        return f"structure differs: {sa} vs {sb}"
    worst = 0.0
    ok = True
    for x, y in zip(la, lb):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x != y:
                return False
            continue
        if x.shape != y.shape:
            return f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not torch.allclose(x, y, rtol=rtol, atol=atol):
            ok = False
            worst = max(worst, (x - y).abs().max().item())
    return True if ok else f"max abs diff {worst:.3g}"


def _fmt_time(t):
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def _fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


class Timing:
    def __init__(self, rounds, min_run_time, device):
        self.rounds = rounds
        self.min_run_time = min_run_time
        self.device = device

    def _timer(self):
        if self.device == "cuda":

            def t():
                torch.cuda.synchronize()
                return time.perf_counter()

            return t
        return time.perf_counter

    def run(self, fns):
        """fns: dict name -> zero-arg callable (or None).

        Many short rounds; in each round every callable gets one blocked_autorange (the order
        rotates from round to round). Returns name -> list of per-round medians."""
        names = [n for n, f in fns.items() if f is not None]
        per_round = {n: [] for n in names}
        for n in names:  # warm-up (allocator, lazy init, first-call caches)
            for _ in range(2):
                fns[n]()
            _sync(self.device)
        for r in range(self.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for n in order:
                t = benchmark.Timer(
                    stmt="fn()",
                    globals={"fn": fns[n]},
                    timer=self._timer(),
                    num_threads=torch.get_num_threads(),
                )
                per_round[n].append(t.blocked_autorange(min_run_time=self.min_run_time).median)
        return per_round


def paired_ratio(num, den):
    """Median over rounds of num[r] / den[r]: the two were measured back to back in each round,
    so load that drifts between rounds cancels out."""
    return statistics.median(a / b for a, b in zip(num, den))


# --------------------------------------------------------------------------------------------
# workloads: each returns a dict with
#   name, ft (callable), tf (callable), direct (callable or None), rtol, atol, note (str)


def wl_vmap_sin(device, quick=False):
    x = torch.randn(3, device=device)
    f_ft, f_tf = ft.vmap(torch.sin), tf.vmap(torch.sin)
    return dict(
        name="vmap(torch.sin), 3 elements, end to end",
        ft=lambda: f_ft(x),
        tf=lambda: f_tf(x),
        direct=lambda: torch.sin(x),
        rtol=1e-6,
        atol=1e-6,
        kind="overhead",
    )


def wl_grad_sin(device, quick=False):
    x = torch.tensor(0.3, device=device)
    f_ft, f_tf = ft.grad(torch.sin), tf.grad(torch.sin)
    return dict(
        name="grad(torch.sin), scalar, end to end",
        ft=lambda: f_ft(x),
        tf=lambda: f_tf(x),
        direct=None,
        rtol=1e-6,
        atol=1e-6,
        kind="overhead",
    )


def wl_vmap_mm(device, quick=False):
    n, d = (4, 8) if quick else (64, 128)
    a = torch.randn(n, d, d, device=device)
    b = torch.randn(n, d, d, device=device)
    f_ft, f_tf = ft.vmap(torch.mm), tf.vmap(torch.mm)
    return dict(
        name=f"vmap(torch.mm), {n} x ({d}x{d} @ {d}x{d})",
        ft=lambda: f_ft(a, b),
        tf=lambda: f_tf(a, b),
        direct=lambda: torch.bmm(a, b),
        direct_name="torch.bmm",
        rtol=1e-4,
        atol=1e-4,
        kind="large",
    )


def wl_vmap_conv(device, quick=False):
    n, hw = (4, 8) if quick else (64, 32)
    x = torch.randn(n, 3, hw, hw, device=device)
    w = torch.randn(16, 3, 3, 3, device=device)

    def one(img):
        return F.conv2d(img[None], w)[0]

    f_ft, f_tf = ft.vmap(one), tf.vmap(one)
    return dict(
        name=f"vmap(conv2d), {n} x 3x{hw}x{hw}, 16 filters 3x3",
        ft=lambda: f_ft(x),
        tf=lambda: f_tf(x),
        direct=lambda: F.conv2d(x, w),
        direct_name="F.conv2d on the batch",
        rtol=1e-4,
        atol=1e-4,
        kind="large",
    )


def mlp_params(device, hidden=512):
    g = torch.Generator().manual_seed(1)

    def init(*shape):
        fan_in = shape[-1] if len(shape) > 1 else shape[0]
        return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(device)

    return {"w1": init(hidden, 784), "b1": init(hidden) * 0.1, "w2": init(10, hidden), "b2": init(10) * 0.1}


def mlp_loss(params, x, y):
    """Loss of ONE example: x (784,), y () int64."""
    h = F.relu(F.linear(x, params["w1"], params["b1"]))
    logits = F.linear(h, params["w2"], params["b2"])
    return F.cross_entropy(logits[None], y[None])


def _wl_psg_mlp(device, B, quick):
    hidden, B = (32, B // 16) if quick else (512, B)
    params = mlp_params(device, hidden)
    x = torch.randn(B, 784, device=device)
    y = torch.randint(0, 10, (B,), device=device)
    f_ft = ft.vmap(ft.grad(mlp_loss), in_dims=(None, 0, 0))
    f_tf = tf.vmap(tf.grad(mlp_loss), in_dims=(None, 0, 0))
    return dict(
        name=f"per-sample grads, MLP 784-{hidden}-10, B={B}",
        ft=lambda: f_ft(params, x, y),
        tf=lambda: f_tf(params, x, y),
        direct=None,
        rtol=1e-4,
        atol=1e-5,
        kind="psg",
    )


def wl_psg_mlp64(device, quick=False):
    return _wl_psg_mlp(device, 64, quick)


def wl_psg_mlp256(device, quick=False):
    return _wl_psg_mlp(device, 256, quick)


def _cnn_params(device, side):
    g = torch.Generator().manual_seed(2)

    def init(shape, fan_in):
        return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(device)

    flat = 16 * (side - 4) ** 2
    return {
        "c1w": init((8, 1, 3, 3), 9),
        "c1b": init((8,), 9) * 0.1,
        "c2w": init((16, 8, 3, 3), 72),
        "c2b": init((16,), 72) * 0.1,
        "fw": init((10, flat), flat),
        "fb": init((10,), flat) * 0.1,
    }


def cnn_loss(params, x, y):
    """Loss of ONE example: x (1, side, side), y () int64."""
    h = F.relu(F.conv2d(x[None], params["c1w"], params["c1b"]))
    h = F.relu(F.conv2d(h, params["c2w"], params["c2b"]))
    logits = F.linear(h.flatten(1), params["fw"], params["fb"])
    return F.cross_entropy(logits, y[None])


def wl_psg_cnn(device, quick=False):
    B, side = (4, 8) if quick else (64, 28)
    params = _cnn_params(device, side)
    x = torch.randn(B, 1, side, side, device=device)
    y = torch.randint(0, 10, (B,), device=device)
    f_ft = ft.vmap(ft.grad(cnn_loss), in_dims=(None, 0, 0))
    f_tf = tf.vmap(tf.grad(cnn_loss), in_dims=(None, 0, 0))
    return dict(
        name=f"per-sample grads, CNN (2 conv + linear), B={B}, {side}x{side}",
        ft=lambda: f_ft(params, x, y),
        tf=lambda: f_tf(params, x, y),
        direct=None,
        rtol=1e-4,
        atol=1e-5,
        kind="psg",
    )


# seed 002 (the Jacobians/Hessians tutorial): predict(weight, bias, x) = tanh(x @ weight.T + bias)
# with weight of shape (Dout, Din), differentiated w.r.t. x (argnums=2) at the seed's sizes
# (divided by 64 in quick mode).


def predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()


def _predict_inputs(device, dout, din, batch=None):
    weight = torch.randn(dout, din, device=device)
    bias = torch.randn(dout, device=device)
    x = torch.randn(din, device=device) if batch is None else torch.randn(batch, din, device=device)
    return weight, bias, x


def _wl_jac(device, api, dout, din, what, quick):
    if quick:
        dout, din = max(dout // 64, 2), max(din // 64, 2)
    weight, bias, x = _predict_inputs(device, dout, din)
    f_ft = getattr(ft, api)(predict, argnums=2)
    f_tf = getattr(tf, api)(predict, argnums=2)
    return dict(
        name=f"{api}(predict), {what}Din={din}, Dout={dout} (weight {dout}x{din})",
        ft=lambda: f_ft(weight, bias, x),
        tf=lambda: f_tf(weight, bias, x),
        direct=None,
        rtol=1e-4,
        atol=1e-5,
        kind="jac",
    )


def wl_jacrev_d16(device, quick=False):
    return _wl_jac(device, "jacrev", 16, 16, "", quick)


def wl_jacfwd_tall(device, quick=False):
    return _wl_jac(device, "jacfwd", 2048, 32, "tall, ", quick)


def wl_jacrev_tall(device, quick=False):
    return _wl_jac(device, "jacrev", 2048, 32, "tall, ", quick)


def wl_jacfwd_wide(device, quick=False):
    return _wl_jac(device, "jacfwd", 32, 2048, "wide, ", quick)


def wl_jacrev_wide(device, quick=False):
    return _wl_jac(device, "jacrev", 32, 2048, "wide, ", quick)


def wl_hessian_512(device, quick=False):
    dout, din = (4, 8) if quick else (32, 512)
    weight, bias, x = _predict_inputs(device, dout, din)
    f_ft = ft.hessian(predict, argnums=2)
    f_tf = tf.hessian(predict, argnums=2)
    return dict(
        name=f"hessian(predict), Din={din}, Dout={dout}",
        ft=lambda: f_ft(weight, bias, x),
        tf=lambda: f_tf(weight, bias, x),
        direct=None,
        rtol=1e-3,
        atol=1e-4,
        kind="jac",
    )


def _wl_batched_jac(device, api, quick):
    B, dout, din = (4, 5, 3) if quick else (64, 33, 31)
    weight, bias, x = _predict_inputs(device, dout, din, batch=B)
    f_ft = ft.vmap(getattr(ft, api)(predict, argnums=2), in_dims=(None, None, 0))
    f_tf = tf.vmap(getattr(tf, api)(predict, argnums=2), in_dims=(None, None, 0))
    return dict(
        name=f"vmap({api}(predict)), B={B}, Din={din}, Dout={dout}",
        ft=lambda: f_ft(weight, bias, x),
        tf=lambda: f_tf(weight, bias, x),
        direct=None,
        rtol=1e-3,
        atol=1e-4,
        kind="jac",
    )


def wl_vmap_jacrev_b64(device, quick=False):
    return _wl_batched_jac(device, "jacrev", quick)


def wl_vmap_hessian_b64(device, quick=False):
    return _wl_batched_jac(device, "hessian", quick)


def _sin_sum(x):
    return x.sin().sum()


def wl_hvp_2048(device, quick=False):
    n = 32 if quick else 2048
    x = torch.randn(n, device=device)
    t = torch.randn(n, device=device)
    g_ft, g_tf = ft.grad(_sin_sum), tf.grad(_sin_sum)
    return dict(
        name=f"hvp = jvp(grad(sin().sum())), {n} elements",
        ft=lambda: ft.jvp(g_ft, (x,), (t,))[1],
        tf=lambda: tf.jvp(g_tf, (x,), (t,))[1],
        direct=None,
        rtol=1e-4,
        atol=1e-5,
        kind="jac",
    )


WORKLOADS = [
    wl_vmap_sin,
    wl_grad_sin,
    wl_vmap_mm,
    wl_vmap_conv,
    wl_psg_mlp64,
    wl_psg_mlp256,
    wl_psg_cnn,
    wl_jacrev_d16,
    wl_jacfwd_tall,
    wl_jacrev_tall,
    wl_jacfwd_wide,
    wl_jacrev_wide,
    wl_hessian_512,
    wl_vmap_jacrev_b64,
    wl_vmap_hessian_b64,
    wl_hvp_2048,
]


# --------------------------------------------------------------------------------------------


def run_workload(make, device, timing, quick=False):
    row = dict(name=make.__name__, key=make.__name__[3:], tf=None, ft=None, direct=None, ratio=None, notes=[])
    try:
        w = make(device, quick)
    except Exception as e:  # building inputs should not fail, but never crash the table
        row["notes"].append(f"setup failed: {_first_line(e)}")
        return row
    row["name"] = w["name"]
    row["kind"] = w["kind"]

    tf_out = w["tf"]()
    _sync(device)

    ft_fn = w["ft"]
    _reset_fallbacks()
    try:
        ft_out = ft_fn()
        _sync(device)
    except Exception as e:
        row["notes"].append(f"ft error: {_first_line(e)}")
        ft_fn = None
    fb = _fallbacks_seen()
    if fb:
        row["notes"].append("fallback: " + ", ".join(fb))
    if ft_fn is not None:
        cmp = _compare(ft_out, tf_out, w["rtol"], w["atol"])
        if cmp is not True:
            row["notes"].append("MISMATCH" + (f" ({cmp})" if isinstance(cmp, str) else ""))
    del tf_out

    try:
        rounds = timing.run({"ft": ft_fn, "tf": w["tf"], "direct": w.get("direct")})
    except Exception as e:
        row["notes"].append(f"timing failed: {_first_line(e)}")
        return row
    med = {n: statistics.median(v) for n, v in rounds.items()}
    row["tf"] = med.get("tf")
    row["ft"] = med.get("ft")
    row["direct"] = med.get("direct")
    if row["ft"] is not None:
        row["ratio"] = paired_ratio(rounds["ft"], rounds["tf"])
    if row["direct"] is not None:
        dn = w.get("direct_name", "direct call")
        parts = [f"{dn}: {_fmt_time(row['direct'])}"]
        if row["ft"] is not None:
            parts.append(f"ft/direct {paired_ratio(rounds['ft'], rounds['direct']):.2f}x")
        parts.append(f"torch.func/direct {paired_ratio(rounds['tf'], rounds['direct']):.2f}x")
        row["notes"].insert(0, "; ".join(parts))
    return row


def render(rows):
    """The markdown table of `run` (the machine and the timing method are described by the caller)."""
    lines = [
        "| workload | torch.func | functorch_lite | ratio | notes |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        notes = "; ".join(r["notes"]).replace("|", "\\|")
        lines.append(
            f"| {r['name']} | {_fmt_time(r['tf'])} | {_fmt_time(r['ft'])} | {_fmt_ratio(r['ratio'])} | {notes} |"
        )
    lines.append("")
    lines.append("ratio = functorch_lite time / torch.func time (lower is better).")
    return "\n".join(lines)


def run(device, quick=False, only=None, log=None):
    """Every workload (or those whose wl_ name contains one of the substrings in `only`); returns
    (rows, timing description). The vmap fallback is 'quiet' during the run (restored after)."""
    rounds, min_run_time = (3, 0.005) if quick else (25, 0.05)
    timing = Timing(rounds, min_run_time, device)
    torch.manual_seed(0)
    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("quiet")
    rows = []
    try:
        for make in WORKLOADS:
            if only and not any(o in make.__name__ for o in only):
                continue
            t1 = time.perf_counter()
            try:
                row = run_workload(make, device, timing, quick)
            except Exception as e:  # torch.func itself failed: still keep going
                traceback.print_exc()
                row = dict(
                    name=make.__name__,
                    key=make.__name__[3:],
                    tf=None,
                    ft=None,
                    direct=None,
                    ratio=None,
                    notes=[f"benchmark error: {_first_line(e)}"],
                )
            rows.append(row)
            if log:
                log(
                    f"[{time.perf_counter() - t1:6.1f} s] {row['name']}: "
                    f"torch.func {_fmt_time(row['tf'])}, functorch_lite {_fmt_time(row['ft'])}"
                    + (f"  ({'; '.join(row['notes'])})" if row["notes"] else "")
                )
    finally:
        ft.set_vmap_fallback(old_mode)
    how = (
        f"{rounds} interleaved rounds x blocked_autorange(min_run_time={min_run_time} s) each; times are "
        "medians over rounds, ratios are medians of the per-round ratios"
    )
    return rows, how
