"""The DP fast path knows the example dim of every layer input by construction (issue 20).

Every model here has a layer whose input has the batch size B along a dim that is not the
example dim, or a tensor of B rows shared by all examples (T == B, seq-first layouts, parameter
tables), the layouts where guessing the example dim from sizes goes silently wrong. Oracle: a
per-example torch.autograd.grad loop over ONE batched forward, in float64, for every method;
where the fast path can read every layer it must not fall back to the whole-model vmap path,
and where it cannot (a layer whose output is shared by all examples) it must fall back, never
answer from a wrong layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft
from functorch_lite.dp import _clip, _ghost

B = T = 6
E = 8


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class SeqFirstAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2)  # batch_first=False
        self.head = nn.Linear(E, 3)

    def forward(self, x):  # x: (B, T, E)
        h = x.transpose(0, 1)  # (T, B, E), T == B
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.transpose(0, 1).mean(1))


class SeqFirstCrossAttention(nn.Module):
    """Seq-first cross-attention with a per-example key padding mask and a shared causal mask."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2)
        self.mem = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        q = x.transpose(0, 1)
        kv = self.mem(x).transpose(0, 1)
        pad = x[:, :, 0] > 0.5
        pad[:, 0] = False
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        a, _ = self.attn(q, kv, kv, key_padding_mask=pad, attn_mask=mask, need_weights=False)
        return self.head(a.transpose(0, 1).mean(1))


class EncoderSeqFirst(nn.Module):
    """The issue's model: a batch_first=False encoder layer on x.transpose(0, 1), T == B."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, 2, 16, dropout=0.0)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1).mean(1))


class DecoderSeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, 2, 16, dropout=0.0)
        self.mem = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        t = x.transpose(0, 1)
        return self.head(self.layer(t, self.mem(t).tanh()).transpose(0, 1).mean(1))


class WholeTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.tr = nn.Transformer(E, 2, 1, 1, 16, dropout=0.0)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        t = x.transpose(0, 1)
        return self.head(self.tr(t, t[:-1]).transpose(0, 1).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cls, batch_first, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(E, 5, batch_first=batch_first, **kw)
        self.head = nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x):
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


class RootParameters(nn.Module):
    """Parameters of the root module used through F.linear in a custom forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, E) / 3)
        self.b = nn.Parameter(torch.randn(4) / 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.linear(x.transpose(0, 1), self.w, self.b).tanh().mean(0))


class SharedTable(nn.Module):
    """A parameter table of T == B rows through a Linear shared by all examples: that Linear's
    output is the same for every example, so the recording makes it per-example (NOTE [Shared
    outputs of layers with a rule]) and the Linear rule reads the table as repeated; the table
    itself, the root's own parameter, gets the root's per-layer vmap(grad)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, 4))
        self.pos_proj = nn.Linear(4, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head((x + self.pos_proj(self.pos)[None]).tanh().mean(1))


class PerExampleAndShared(nn.Module):
    """One Linear called on a per-example input and on a shared table of B rows in one forward."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(T, E) / 3)
        self.lin = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head((self.lin(x) * self.lin(self.table)).tanh().mean(1))


class SharedOutputModule(nn.Module):
    """A module without a rule whose output is shared by all examples (a table it transforms,
    called without inputs): its per-example gradients cannot be read at its output, so the fast
    path hands the model to the vmap path."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(T, E) / 3)

        def forward(self):
            return self.table.tanh()

    def __init__(self):
        super().__init__()
        self.tab = self.Table()
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head((x + self.tab()).tanh().mean(1))


class ConstantTable(nn.Module):
    """A buffer of B rows added to every example, then a Linear: the Linear's input is
    per-example (its own batch dim), the buffer's rows are not examples."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(T, E))
        self.lin = nn.Linear(E, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.lin(x + self.table).tanh().mean(1))


class TransposedConv(nn.Module):
    """Conv1d over a (B, E, T) view of (B, T, E) data and a GroupNorm, channels == B."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(E, B, 3, padding=1)
        self.norm = nn.GroupNorm(2, B)
        self.head = nn.Linear(B, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x.transpose(1, 2))).mean(-1))


class TimeMajorEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, E)
        self.head = nn.Linear(E, 3)

    def forward(self, ids):
        return self.head(self.emb(ids.t()).mean(0))


# (name, factory, ids?, whether the fast path reads every layer itself)
MODELS = [
    ("seq_first_attention", SeqFirstAttention, False, True),
    ("seq_first_cross_attention", SeqFirstCrossAttention, False, True),
    ("encoder_seq_first", EncoderSeqFirst, False, True),
    ("decoder_seq_first", DecoderSeqFirst, False, True),
    ("transformer", WholeTransformer, False, True),
    ("lstm_seq_first", lambda: Recurrent(nn.LSTM, False), False, True),
    ("lstm_batch_first_2_layers", lambda: Recurrent(nn.LSTM, True, num_layers=2), False, True),
    ("lstm_bidirectional", lambda: Recurrent(nn.LSTM, False, bidirectional=True), False, True),
    ("gru_seq_first", lambda: Recurrent(nn.GRU, False), False, True),
    ("gru_batch_first", lambda: Recurrent(nn.GRU, True), False, True),
    ("rnn_seq_first", lambda: Recurrent(nn.RNN, False), False, True),
    ("rnn_relu_batch_first", lambda: Recurrent(nn.RNN, True, nonlinearity="relu"), False, True),
    ("root_parameters", RootParameters, False, True),
    ("shared_table", SharedTable, False, True),
    ("per_example_and_shared", PerExampleAndShared, False, True),
    ("shared_output_module", SharedOutputModule, False, False),
    ("constant_table", ConstantTable, False, True),
    ("transposed_conv", TransposedConv, False, True),
    ("time_major_embedding", TimeMajorEmbedding, True, True),
]


def _data(ids):
    g = torch.Generator().manual_seed(11)
    x = (
        torch.randint(0, 11, (B, T), generator=g)
        if ids
        else torch.randn(B, T, E, generator=g, dtype=torch.float64)
    )
    return x, torch.randint(0, 3, (B,), generator=g)


def _loop(model, x, y, max_norm):
    """Per-example gradients by torch.autograd.grad over ONE batched forward, clipped by hand."""
    params = dict(model.named_parameters())
    losses = _ce(model(x), y)
    per = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True) for i in range(B)]
    per = {n: torch.stack([g[j] for g in per]) for j, n in enumerate(params)}
    norms = torch.stack([g.reshape(B, -1).pow(2).sum(1) for g in per.values()]).sum(0).sqrt()
    c = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", c, g) for n, g in per.items()}, norms


@pytest.mark.parametrize("method", ["vmap", "ghost", "auto"])
@pytest.mark.parametrize("name,factory,ids,fast", MODELS, ids=[m[0] for m in MODELS])
def test_every_method_equals_a_per_example_loop(name, factory, ids, fast, method, monkeypatch):
    torch.manual_seed(0)
    model = factory().double().eval()
    x, y = _data(ids)
    _, ref_norms = _loop(model, x, y, 1.0)
    max_norm = float(ref_norms.median())  # binds for some examples, not for others
    ref, ref_norms = _loop(model, x, y, max_norm)
    fell_back = []
    real = _clip.vmap_clipped_grad
    monkeypatch.setattr(_clip, "vmap_clipped_grad", lambda *a: fell_back.append(1) or real(*a))
    got, norms = ft.dp.clipped_grad_module(
        model, _ce, x, y, max_norm=max_norm, method=method, return_norms=True
    )
    scale = ref_norms.max()
    assert (norms - ref_norms).abs().max() <= 1e-9 * scale
    for n in ref:
        assert (got[n] - ref[n]).abs().max() <= 1e-9 * max(1.0, float(ref[n].abs().max())), n
    if method != "vmap":
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # a fresh model's first "auto" step runs the per-layer path whatever its modules (NOTE
        # [auto and models mostly without rules]): the root parameters used through F.linear get
        # the Linear rule there (NOTE [Weights that enter through F.linear or matmul])
        if method == "auto":  # learned from this step's plan where it was not known before
            assert _clip._auto_path(model, params) in ("layers", "vmap")
        assert bool(fell_back) == (not fast), "fell back" if fell_back else "did not fall back"


def test_rule_layers_read_seq_first_layouts_without_the_per_layer_vmap(monkeypatch):
    """Seq-first attention and encoder layers are read by the layer rules themselves."""
    monkeypatch.setattr(_ghost, "_generic_contributions", None)
    monkeypatch.setattr(_clip, "vmap_clipped_grad", None)
    for factory in (SeqFirstAttention, SeqFirstCrossAttention, EncoderSeqFirst, TransposedConv):
        model = factory().double().eval()
        x, y = _data(False)
        ref, ref_norms = _loop(model, x, y, 0.5)
        got, norms = ft.dp.clipped_grad_module(model, _ce, x, y, max_norm=0.5, return_norms=True)
        assert (norms - ref_norms).abs().max() <= 1e-9 * ref_norms.max()


def test_inputs_modified_in_place_after_the_call_fall_back(monkeypatch):
    """A module input changed in place after the module ran (legal when the module saved a copy
    of it for backward): the recorded input is stale, so the per-layer vmap(grad), which re-runs
    the module from it, must not be used; the model takes the whole-model path."""

    class ScaleCopy(nn.Module):  # no rule: the per-layer vmap(grad) re-runs it from its input
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, E))

        def forward(self, x):
            return x.clone() * self.scale

    class Stale(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(E, E)
            self.mid = ScaleCopy()
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            h = self.inp(x)  # Linear does not save its output: the in-place write is legal
            out = self.mid(h)
            h.mul_(2)  # after mid has run
            return self.head((out + h).tanh().mean(1))

    model = Stale().double()
    x, y = _data(False)
    ref, ref_norms = _loop(model, x, y, 0.5)
    fell_back = []
    real = _clip.vmap_clipped_grad
    monkeypatch.setattr(_clip, "vmap_clipped_grad", lambda *a: fell_back.append(1) or real(*a))
    got, norms = ft.dp.clipped_grad_module(model, _ce, x, y, max_norm=0.5, return_norms=True, method="ghost")
    assert fell_back
    assert (norms - ref_norms).abs().max() <= 1e-9 * ref_norms.max()
    for n in ref:
        assert (got[n] - ref[n]).abs().max() <= 1e-9 * max(1.0, float(ref[n].abs().max()))


# ------------------------------------------------------------------------------------------------
# vmap(grad) through recurrent layers, the per-example path of every method


def _rnn_cases():
    for cls in (nn.LSTM, nn.GRU, nn.RNN):
        for batch_first in (False, True):
            for kw in ({}, {"num_layers": 2}, {"bidirectional": True}):
                for given_h0 in (False, True):
                    for dtype in (torch.float64, torch.float32):
                        yield cls, batch_first, kw, given_h0, dtype


@pytest.mark.parametrize(
    "cls,batch_first,kw,given_h0,dtype",
    list(_rnn_cases()),
    ids=lambda v: getattr(v, "__name__", None) or str(v).replace(" ", ""),
)
def test_vmap_grad_through_recurrent_layers_equals_a_loop(cls, batch_first, kw, given_h0, dtype):
    """ft.vmap(ft.grad(f)) through nn.LSTM/GRU/RNN (the issue's LSTM case: one example of shape
    (T, 1, F)) against a per-example loop of torch.autograd.grad; torch.func where it runs."""
    torch.manual_seed(0)
    rnn = cls(5, 7, batch_first=batch_first, **kw).to(dtype)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    x = torch.randn(4, 3, 1, 5, dtype=dtype)  # 4 examples of (T=3, N=1, F) (or (N=3, T=1, F))
    h0 = torch.randn(4, layers, 1 if not batch_first else 3, 7, dtype=dtype)
    if batch_first:
        x = x.transpose(1, 2)  # (N=1, T=3, F)
        h0 = h0[:, :, :1]
    params = {n: p.detach() for n, p in rnn.named_parameters()}

    def f(p, xi, hi):
        state = None
        if given_h0:
            state = (hi, hi.tanh()) if cls is nn.LSTM else hi
        out, _ = ft.functional_call(rnn, p, (xi, state))
        return out.pow(2).sum()

    mkldnn = torch.backends.mkldnn.enabled
    old_mode = ft.get_vmap_fallback()
    ft.set_vmap_fallback("error")  # batched all the way, float32 LSTM included (no oneDNN layer)
    try:
        got = ft.vmap(ft.grad(f), in_dims=(None, 0, 0))(params, x, h0)
    finally:
        ft.set_vmap_fallback(old_mode)
    assert torch.backends.mkldnn.enabled == mkldnn  # NOTE [LSTM under vmap without oneDNN]
    for i in range(x.shape[0]):
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        state = None
        if given_h0:
            state = (h0[i], h0[i].tanh()) if cls is nn.LSTM else h0[i]
        out, _ = torch.func.functional_call(rnn, p, (x[i], state))
        ref = torch.autograd.grad(out.pow(2).sum(), list(p.values()))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for n, r in zip(p, ref):
            assert (got[n][i] - r).abs().max() <= tol * max(1.0, float(r.abs().max())), n
