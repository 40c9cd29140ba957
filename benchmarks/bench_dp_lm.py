"""Whole DP training steps of language models from transformers: GPT-2 and a BERT-shaped encoder.

What. Every row times one whole training step of the same model copy (same initial weights,
same batch), CPU, float32, one intra-op thread by default:

- ``non-private``: forward, mean loss, backward, AdamW step (the floor);
- ``ft.dp auto``: ``ft.dp.PrivateTrainer(clipping="auto")`` with AdamW: every example's gradient
  clipped to norm C = 1 on the per-layer path, summed, Philox noise of std sigma * C (sigma = 1),
  divided by B, AdamW step; the note says whether every parameter was on a per-layer rule;
- ``Opacus ghost``: Opacus' ghost clipping (``GradSampleModuleFastGradientClipping`` with
  ``DPOptimizerFastGradientClipping`` over AdamW and ``DPLossFastGradientClipping``: two
  backwards, as bench_dp_steps.py's "Opacus ghost" row) on the very same model. Where it raises,
  the note gives the first line of the error and what Opacus would need, and
- ``Opacus ghost (adapted model)``: the same on the model changed as Opacus needs it (GPT-2: the
  lm_head untied from wte, a second vocab x d matrix, and position ids passed as a (B, T)
  tensor; BERT: position and token-type ids passed as (B, T) tensors, the same function). Only
  where the plain row failed; its time is of a different (GPT-2: larger) model.

Models (from configs, random initialisation, nothing downloaded; dropout 0):

- GPT-2 (``GPT2LMHeadModel``) with 2 layers, d=768, 12 heads, vocab 50,257 (lm_head tied to
  wte), T=128, B=8; per-example loss the mean token cross-entropy of the logits;
- a BERT-shaped encoder (``BertForSequenceClassification``, 4 layers, d=256, 4 heads, ff 1024,
  vocab 30,522, 2 labels), T=128, B=16; per-example loss the cross-entropy of the logits. It is
  called with an all-ones attention mask of the ids' shape (no padding): without one,
  transformers checks the ids for padding tokens with a Python ``if`` on a tensor, which a
  per-example (vmapped) forward cannot evaluate;
- with ``big``: GPT-2 with 12 layers (GPT-2 small's shape) at T=128, B=8, and the 2-layer GPT-2
  at T=512, B=8 (minutes per step on a CPU).

``quick`` gives tiny configs (vocab 100, d 32, 2 layers, T 16, B 4; the big ones 3 layers or
T 32): the smoke test.

How. Each row is built and stepped once (the warm-up; a row that raises gets a note and no
time), then ``rounds`` interleaved rounds time one step of every row, in an order that rotates
from round to round; time = median over rounds, ratio = median over rounds of the row's time /
the non-private step's time in the same round (paired, so that drifting load cancels). The steps
take seconds, so there are few rounds. ``memory``: each row (that ran) in a fresh process (peak
RSS is per process): the model built from its config, the row built, the peak RSS reset
(/proc/self/clear_refs, as bench_dp_clip.peak_rss_child), two steps (the first allocates AdamW's
state); reported are the peak RSS of the process and the peak over the RSS before the steps, MB,
with ratios to the non-private row.

A module of benchmarks/run.py (`python benchmarks/run.py --only dp_lm [--big] [--no-memory]`),
which writes the tables into docs/performance.md. Needs transformers (a test-only dependency of
the project; without it the section says so); the Opacus rows only where opacus imports.
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import time

import bench_dp_clip
import torch
import torch.nn.functional as F
from bench_dp_steps import _first_line, _PerExample, plain_step, private_step
from bench_scaling import _opacus
from torch import nn

import functorch_lite as ft

MAX_NORM = 1.0
SIGMA = 1.0
LR = 1e-4
MEMORY_STEPS = 2
NON_PRIVATE = "non-private"
FT_AUTO = "ft.dp auto"
OPACUS = "Opacus ghost"
OPACUS_ADAPTED = "Opacus ghost (adapted model)"


def _transformers():
    try:
        import transformers  # test-only dependency of the project, never imported by the package
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    return transformers


class Logits(nn.Module):
    """forward(ids) -> the logits of a transformers model. ``bert``: an all-ones attention mask of
    the ids' shape (no padding; it skips transformers' padding check, a Python ``if`` on the ids).
    ``explicit_ids``: position ids (and BERT's token-type ids) passed as contiguous (B, T)
    tensors instead of the model's (1, T) / expanded buffers, as Opacus' ghost clipping needs."""

    def __init__(self, model, bert=False, explicit_ids=False):
        super().__init__()
        self.model = model
        self.bert = bert
        self.explicit_ids = explicit_ids

    def forward(self, ids):
        kw = {}
        if self.bert:
            kw["attention_mask"] = torch.ones(ids.shape, dtype=torch.long)
        if self.explicit_ids:
            B, T = ids.shape
            kw["position_ids"] = torch.arange(T).expand(B, T).contiguous()
            if self.bert:
                kw["token_type_ids"] = torch.zeros_like(ids)
        return self.model(input_ids=ids, **kw).logits


def _token_ce(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _n_params(model):
    return sum(p.numel() for p in model.parameters())  # a tied weight once


def _count(n):
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


# --------------------------------------------------------------------------------------------
# models: make(quick) -> dict(title, model, ids, y, loss_fn, adapt, needs)


def _untie_for_opacus(model):
    """GPT-2 as Opacus' ghost clipping can run it (in place): lm_head its own copy of wte's
    weight, position ids as a (B, T) tensor."""
    lm = model.model
    lm.config.tie_word_embeddings = False
    lm.lm_head.weight = nn.Parameter(lm.transformer.wte.weight.detach().clone())
    model.explicit_ids = True
    return model


def _explicit_ids(model):
    model.explicit_ids = True
    return model


def gpt2(n_layer, T, B):
    def make(quick=False):
        tr = _transformers()
        vocab, d, heads, layers, t, b = (50257, 768, 12, n_layer, T, B)
        if quick:  # tiny, but the big models stay deeper / longer than the default one
            vocab, d, heads, layers, t, b = 100, 32, 2, min(n_layer, 3), 16 * min(T // 128, 2), 4
        cfg = tr.GPT2Config(
            vocab_size=vocab,
            n_positions=max(t, 16) if quick else 1024,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        torch.manual_seed(0)
        model = Logits(tr.GPT2LMHeadModel(cfg))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (b, t), generator=g)
        y = torch.randint(0, vocab, (b, t), generator=g)
        title = (
            f"GPT-2, {layers} layers, d={d}, {heads} heads, vocab {vocab:,} (lm_head tied to wte), "
            f"T={t}, B={b}; {_count(_n_params(model))} parameters"
        )
        needs = (
            "lm_head untied from wte (a second vocab x d weight) and position_ids passed as a (B, T) "
            "tensor (Opacus' per-example gradients of wpe's shared (1, T) positions have batch 1)"
        )
        return dict(
            title=title, model=model, ids=ids, y=y, loss_fn=_token_ce, adapt=_untie_for_opacus, needs=needs
        )

    return make


def bert(quick=False):
    tr = _transformers()
    vocab, d, layers, heads, ff, t, b = (
        (100, 32, 2, 2, 64, 16, 4) if quick else (30522, 256, 4, 4, 1024, 128, 16)
    )
    cfg = tr.BertConfig(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ff,
        vocab_size=vocab,
        max_position_embeddings=max(t, 16) if quick else 512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = Logits(tr.BertForSequenceClassification(cfg), bert=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    y = torch.randint(0, 2, (b,), generator=g)
    title = (
        f"BERT-shaped encoder for classification, {layers} layers, d={d}, {heads} heads, ff {ff}, "
        f"vocab {vocab:,}, 2 labels, T={t}, B={b}; {_count(_n_params(model))} parameters"
    )
    needs = (
        "position_ids and token_type_ids passed as contiguous (B, T) tensors (Opacus' embedding norm "
        "views the expanded token-type buffer, and the shared (1, T) position ids give a batch of 1)"
    )
    return dict(title=title, model=model, ids=ids, y=y, loss_fn=_ce, adapt=_explicit_ids, needs=needs)


MODELS = {"GPT-2 2L T=128": gpt2(2, 128, 8), "BERT 4L d=256 cls": bert}
BIG_MODELS = {"GPT-2 12L T=128": gpt2(12, 128, 8), "GPT-2 2L T=512": gpt2(2, 512, 8)}
ALL_MODELS = {**MODELS, **BIG_MODELS}


# --------------------------------------------------------------------------------------------
# one whole step per row: build(model, ids, y, loss_fn) -> zero-argument callable. The builders
# train the model they are given: the caller passes its own copy.


def _adamw(module):
    return torch.optim.AdamW(module.parameters(), lr=LR)


def _non_private(m, ids, y, loss_fn):
    return plain_step(m, _adamw(m), ids, y, loss_fn)


def _ft_auto(m, ids, y, loss_fn):
    return private_step(m, _adamw(m), ids, y, loss_fn, max_grad_norm=MAX_NORM, noise_multiplier=SIGMA)


def _opacus_ghost(m, ids, y, loss_fn):
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = wrap_model(m, "ghost", max_grad_norm=MAX_NORM)
    opt = DPOptimizerFastGradientClipping(
        _adamw(gsm), noise_multiplier=SIGMA, max_grad_norm=MAX_NORM, expected_batch_size=ids.shape[0]
    )
    crit = DPLossFastGradientClipping(gsm, opt, _PerExample(loss_fn), "mean")

    def step():
        opt.zero_grad(set_to_none=True)
        crit(gsm(ids), y).backward()
        opt.step()

    return step


def builders(spec, opacus=True):
    """Row name -> build(model, ids, y, loss_fn), in the tables' order; the adapted Opacus row
    applies the model's adaptation to the model it is given."""
    out = {NON_PRIVATE: _non_private, FT_AUTO: _ft_auto}
    if opacus and _opacus() is not None:
        out[OPACUS] = _opacus_ghost
        out[OPACUS_ADAPTED] = lambda m, ids, y, loss_fn: _opacus_ghost(spec["adapt"](m), ids, y, loss_fn)
    return out


def _ft_note():
    from functorch_lite.dp import _ghost  # what the last clipped_grad_module call did

    reason = _ghost.last_fallback_reason()
    if reason:
        return f"whole-model vmap path: {_first_line(reason)}"
    plan = _ghost.last_plan()
    if plan and plan[1]:
        return f"per-layer vmap(grad) for {len(plan[1])} module(s)"
    return "every parameter on a per-layer rule"


def bench(key, rounds, quick=False, log=None):
    """dict(key, title, params, rows=[dict(method, ms, ratio, note)]) for one model."""
    t0 = time.perf_counter()
    spec = ALL_MODELS[key](quick)
    fns, notes = {}, {}
    for k, build in builders(spec).items():
        if k == OPACUS_ADAPTED and OPACUS in fns:
            continue  # Opacus ran the model as it is
        try:
            fn = build(copy.deepcopy(spec["model"]), spec["ids"], spec["y"], spec["loss_fn"])
            fn()  # the warm-up; a row that cannot run is a note, not a crash
        except Exception as e:  # noqa: BLE001
            notes[k] = f"failed: {type(e).__name__}: {_first_line(e)}"
            if k == OPACUS:
                notes[k] += "; the next row adapts the model as Opacus needs"
            continue
        fns[k], notes[k] = fn, ""
        if k == FT_AUTO:
            notes[k] = _ft_note()
        elif k == OPACUS_ADAPTED:
            notes[k] = f"model adapted: {spec['needs']}"
    if log:
        log(f"[{time.perf_counter() - t0:6.1f} s] dp_lm {key}: built and warmed up {', '.join(fns)}")
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t1 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t1)
    base = times.get(NON_PRIVATE)
    rows = []
    for k, note in notes.items():
        if k in times and base:
            ratio = statistics.median(t / b for t, b in zip(times[k], base))
            rows.append(dict(method=k, ms=statistics.median(times[k]) * 1e3, ratio=ratio, note=note))
        else:
            rows.append(dict(method=k, ms=float("nan"), ratio=float("nan"), note=note))
    if log:
        log(f"[{time.perf_counter() - t0:6.1f} s] dp_lm {key}: timed")
    return dict(key=key, title=spec["title"], params=_n_params(spec["model"]), rows=rows)


# --------------------------------------------------------------------------------------------
# peak memory, one process per row


def peak_rss_child(key, row, quick=False, threads=1):
    """In a fresh process: dict(peak, extra) in MB: the peak RSS (VmHWM, reset just before the
    steps) over MEMORY_STEPS steps of one row, and that peak minus the RSS before the steps
    (which holds the interpreter, torch and the model)."""
    torch.set_num_threads(threads)
    ft.set_vmap_fallback("quiet")
    spec = ALL_MODELS[key](quick)
    step = builders(spec)[row](spec["model"], spec["ids"], spec["y"], spec["loss_fn"])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS to the current RSS
    base = bench_dp_clip._status_mb("VmRSS")
    for _ in range(MEMORY_STEPS):
        step()
    peak = bench_dp_clip._status_mb("VmHWM")
    return dict(peak=peak, extra=peak - base)


def memory(result, quick=False, threads=1, log=None):
    """Adds peak_mb / extra_mb to every row of `result` (bench()'s) that ran, each row measured
    in its own process (None where the child failed)."""
    t0 = time.perf_counter()
    for r in result["rows"]:
        if r["ms"] != r["ms"]:  # the row failed: nothing to measure
            continue
        code = (
            f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_dp_lm as b; "
            f"print(json.dumps(b.peak_rss_child({result['key']!r}, {r['method']!r}, {quick!r}, {threads!r})))"
        )
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
        out = json.loads(proc.stdout.splitlines()[-1]) if proc.returncode == 0 and proc.stdout else None
        r["peak_mb"] = out and out["peak"]
        r["extra_mb"] = out and out["extra"]
        if out is None and log:
            log(f"dp_lm memory {result['key']} {r['method']}: child failed: {proc.stderr.strip()[-300:]}")
    if log:
        log(f"[{time.perf_counter() - t0:6.1f} s] dp_lm memory {result['key']}")
    return result


def run(quick=False, big=False, rounds=3, memory_rows=True, threads=1, log=None):
    """dict(models=[bench()'s results, with memory where measured], note) for the section."""
    if _transformers() is None:
        return dict(models=[], note="transformers is not installed: no language-model rows")
    keys = list(MODELS) + (list(BIG_MODELS) if big else [])
    models = []
    for key in keys:
        r = bench(key, rounds, quick=quick, log=log)
        if memory_rows:
            memory(r, quick=quick, threads=threads, log=log)
        models.append(r)
    return dict(models=models, note="")


# --------------------------------------------------------------------------------------------
# markdown


def _time(ms):
    if ms != ms:
        return "-"
    if ms >= 1e3:
        return f"{ms / 1e3:.2f} s"
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def _mb(v, base):
    if v is None:
        return "failed"
    return f"{v:,.0f} ({v / base:.2f}x)" if base else f"{v:,.0f}"


def markdown(models, note=""):
    """One table per model: time per step and ratio to the non-private step (paired per round),
    and where measured the peak RSS and the peak over the RSS before the steps (MB, ratio to the
    non-private row)."""
    if not models:
        return (note or "no models") + "\n"
    with_mem = any("peak_mb" in r for m in models for r in m["rows"])
    head = "| method | time per step | ratio |"
    rule = "|---|---:|---:|"
    if with_mem:
        head += " peak RSS, MB | peak over the RSS before the steps, MB |"
        rule += "---:|---:|"
    lines = [
        "One whole training step per row (forward, backward, AdamW with lr 1e-4; the private rows clip "
        f"every example's gradient to norm {MAX_NORM:g} and add Gaussian noise of std {SIGMA:g} before "
        "dividing by B), same initial weights and batch for every row; ratio = time / the non-private "
        "step of the same round"
        + (
            f"; memory: each row in a fresh process, {MEMORY_STEPS} steps, ratio to the non-private row"
            if with_mem
            else ""
        )
        + ".",
        "",
    ]
    for m in models:
        lines += [f"**{m['title']}**", "", head + " note |", rule + "---|"]
        base = next((r for r in m["rows"] if r["method"] == NON_PRIVATE), {})
        for r in m["rows"]:
            ratio = "-" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}x"
            cells = [r["method"], _time(r["ms"]), ratio]
            if with_mem:
                if "peak_mb" in r:
                    cells += [
                        _mb(r["peak_mb"], base.get("peak_mb")),
                        _mb(r["extra_mb"], base.get("extra_mb")),
                    ]
                else:
                    cells += ["-", "-"]
            cells.append(r["note"])  # _first_line escaped any | of an error message
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
