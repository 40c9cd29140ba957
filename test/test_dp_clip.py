"""functorch_lite.dp.clipped_grad and clipped_grad_module: clipped sums of per-example gradients.

Oracles: a per-example Python loop of torch.autograd.grad, and torch.func's vmap(grad) with the
clip done by hand. Every method of clipped_grad_module ("vmap", "ghost", "auto") on every layer
type with a rule, on mixed and weight-tied models, and on modules that take the per-layer
vmap(grad) fallback. max_norm is chosen between the smallest and largest per-example norm, so
the clip binds for some examples and not for others."""

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

import functorch_lite as ft
from functorch_lite.dp import clipped_grad, clipped_grad_module

METHODS = ("vmap", "ghost", "auto")


def _clip_sum(per_example, max_norm):
    """Oracle clip: per_example is a list of (B, ...) tensors."""
    n = per_example[0].shape[0]
    norms = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in per_example]).sum(0).sqrt()
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [(factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) for g in per_example], norms


def _middle_norm(norms):
    """A max_norm that clips some examples and not others."""
    s = norms.sort().values
    return float((s[len(s) // 3] + s[-1]) / 2)


def _assert_close(actual, expected, rtol):
    scale = expected.abs().max().item() or 1.0
    assert (actual - expected).abs().max().item() <= rtol * scale, (
        f"max abs diff {(actual - expected).abs().max().item():.3g}, scale {scale:.3g}"
    )


# ------------------------------------------------------------------------------------------------
# clipped_grad


def _mse(w, x, y):
    return ((x @ w["a"] + w["b"]) - y).pow(2).sum()


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(5, 3, generator=g, dtype=dtype), "b": torch.randn(3, generator=g, dtype=dtype)}


def _batch(n=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def _loop_grads(func, params, x, y):
    per = {k: [] for k in params}
    for i in range(x.shape[0]):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        gs = torch.autograd.grad(func(p, x[i], y[i]), list(p.values()))
        for k, g in zip(p, gs):
            per[k].append(g)
    return {k: torch.stack(v) for k, v in per.items()}


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_clipped_grad_matches_loop_and_torch_func(dtype, rtol):
    w, (x, y) = _params(dtype), _batch(dtype=dtype)
    per = _loop_grads(_mse, w, x, y)
    _, norms = _clip_sum(list(per.values()), 1.0)
    max_norm = _middle_norm(norms)
    sums, ref_norms = _clip_sum(list(per.values()), max_norm)
    assert (ref_norms > max_norm).any() and (ref_norms < max_norm).any()
    got, got_norms = clipped_grad(_mse, max_norm=max_norm, batch_argnums=(1, 2), return_norms=True)(w, x, y)
    for k, s in zip(per, sums):
        _assert_close(got[k], s, rtol)
    _assert_close(got_norms, ref_norms, rtol)
    # torch.func as the second oracle
    tf_per = tf.vmap(tf.grad(_mse), in_dims=(None, 0, 0))(w, x, y)
    tf_sums, _ = _clip_sum([tf_per["a"], tf_per["b"]], max_norm)
    _assert_close(got["a"], tf_sums[0], rtol)
    _assert_close(got["b"], tf_sums[1], rtol)


def test_clipped_grad_argnums_tuple_and_unbatched_args():
    def f(a, scale, b, x):  # scale is shared (not batched), argnums picks a and b
        return ((x @ a) * scale + b).tanh().sum()

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    scale, x = torch.tensor(1.7, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    per = tf.vmap(tf.grad(f, argnums=(0, 2)), in_dims=(None, None, None, 0))(a, scale, b, x)
    sums, norms = _clip_sum(list(per), 0.3)
    assert (norms > 0.3).any()
    got = clipped_grad(f, argnums=(0, 2), max_norm=0.3, batch_argnums=3)(a, scale, b, x)
    assert isinstance(got, tuple) and len(got) == 2
    _assert_close(got[0], sums[0], 1e-10)
    _assert_close(got[1], sums[1], 1e-10)


def test_clipped_grad_has_aux_chunk_size_and_return_norms():
    def f(w, x, y):
        loss = _mse(w, x, y)
        return loss, {"loss": loss.detach(), "pred": (x @ w["a"]).detach()}

    w, (x, y) = _params(), _batch(n=11)
    full_g, full_n, full_aux = clipped_grad(
        f, max_norm=2.0, batch_argnums=(1, 2), has_aux=True, return_norms=True
    )(w, x, y)
    assert full_aux["pred"].shape == (11, 3) and full_aux["loss"].shape == (11,)
    for chunk in (1, 4, 11, 50):
        g, n, aux = clipped_grad(
            f, max_norm=2.0, batch_argnums=(1, 2), has_aux=True, chunk_size=chunk, return_norms=True
        )(w, x, y)
        for k in g:
            _assert_close(g[k], full_g[k], 1e-12)
        _assert_close(n, full_n, 1e-12)
        _assert_close(aux["pred"], full_aux["pred"], 0)
    g_only = clipped_grad(_mse, max_norm=2.0, batch_argnums=(1, 2), chunk_size=3)(w, x, y)
    assert set(g_only) == {"a", "b"}
    _assert_close(g_only["a"], full_g["a"], 1e-12)
    aux_only = clipped_grad(f, max_norm=2.0, batch_argnums=(1, 2), has_aux=True)(w, x, y)
    assert isinstance(aux_only, tuple) and len(aux_only) == 2


def test_clipped_grad_chunk_size_bounds_the_per_example_batch(monkeypatch):
    """With chunk_size the per-example gradients are made chunk by chunk, never all at once."""
    from functorch_lite.dp import _per_example

    seen = []
    real = _per_example.per_example_sq_norms
    monkeypatch.setattr(_per_example, "per_example_sq_norms", lambda g: seen.append(g.shape[0]) or real(g))
    w, (x, y) = _params(), _batch(n=10)
    clipped_grad(_mse, max_norm=1.0, batch_argnums=(1, 2), chunk_size=4)(w, x, y)
    assert max(seen) == 4 and sum(seen) == 2 * 10  # two leaves ("a", "b") per chunk


def test_clipped_grad_large_max_norm_is_the_plain_sum():
    w, (x, y) = _params(), _batch()
    g = clipped_grad(_mse, max_norm=1e12, batch_argnums=(1, 2))(w, x, y)
    per = _loop_grads(_mse, w, x, y)
    _assert_close(g["a"], per["a"].sum(0), 1e-10)


def test_clipped_grad_empty_batch():
    w, (x, y) = _params(), _batch(n=0)
    g, n = clipped_grad(_mse, max_norm=1.0, batch_argnums=(1, 2), return_norms=True)(w, x, y)
    assert n.shape == (0,) and torch.equal(g["a"], torch.zeros(5, 3, dtype=torch.float64))
    g, n = clipped_grad(lambda w, xy: _mse(w, *xy), max_norm=1.0, return_norms=True)(w, (x, y))
    assert n.shape == (0,) and torch.equal(g["b"], torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# clipped_grad_module: models


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _token_ce(out, y):  # (B, T, V) logits, (B, T) targets -> per-example mean over tokens
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


class SeqLinear(nn.Module):
    """Linear layers on a sequence: one cheap to ghost (p*d large), one cheap to instantiate."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(4, 24)
        self.narrow = nn.Linear(24, 3)

    def forward(self, x):
        return self.narrow(torch.tanh(self.wide(x))).sum(1)


class Scaled(nn.Module):
    """A module with a parameter of its own and no rule: the per-layer vmap(grad)."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x) * self.scale + x.pow(2) * self.scale.sum()


class TiedLM(nn.Module):
    """Embedding and output head sharing one weight, plus a module called twice."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))
        return self.head(h)


class DirectUse(nn.Module):
    """A parent that uses its child's weight directly (F.linear), besides the child's own call."""

    def __init__(self, vocab=9, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        return F.linear(self.norm(self.emb(ids)), self.emb.weight)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)

    def forward(self, x, z):
        return self.a(x) * self.b(z)


class Attention(nn.Module):
    def __init__(self, vocab=13, d=8, heads=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(a + h)


class Recurrent(nn.Module):
    """nn.GRU (per-layer vmap(grad)); its final state h_n (layers, B, H) is not batch-first but
    does not reach the loss."""

    def __init__(self, vocab=13, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.GRU(d, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1])


def _transformer(vocab=13, d=8):
    return nn.Sequential(
        nn.Embedding(vocab, d),
        nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True),
        nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True),
        nn.Linear(d, vocab),
    )


def _frozen_mlp():
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))
    m[0].weight.requires_grad_(False)
    return m


def _eval_bn():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    m[1].running_mean.uniform_(-0.5, 0.5)
    m[1].running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(m[1].weight, 0.5, 1.5)
    return m.eval()


def _ids(n, t, vocab, g):
    x = torch.randint(0, vocab, (n, t), generator=g)
    x[:, 0] = x[:, 1]  # repeated ids inside an example: the embedding's masked Gram matters
    return x


def _case(name):
    """(model, inputs, targets, loss_fn) in float64."""
    g = torch.Generator().manual_seed(3)
    n = 7
    img = lambda c, h, w: torch.randn(n, c, h, w, generator=g)  # noqa: E731
    cls = lambda k: torch.randint(0, k, (n,), generator=g)  # noqa: E731
    if name == "mlp":
        m, x, y, lf = (
            nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
            torch.randn(n, 6, generator=g),
            cls(3),
            _ce,
        )
    elif name == "linear_seq":
        m, x, y, lf = SeqLinear(), torch.randn(n, 5, 4, generator=g), cls(3), _ce
    elif name == "conv2d_groupnorm":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, groups=2),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 3),
        )
        x, y, lf = img(2, 8, 8), cls(3), _ce
    elif name == "conv2d_padding_modes":
        m = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect", dilation=2),
            nn.Tanh(),
            nn.Conv2d(3, 2, (2, 3), stride=(2, 1), padding=(1, 0), bias=False),
            nn.Flatten(),
            nn.LazyLinear(3),
        )
        x, y, lf = img(2, 7, 7), cls(3), _ce
        m(x)  # materialise the lazy layer
    elif name == "conv1d":
        m = nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv1d(4, 2, 2, stride=2, padding="valid"),
            nn.Flatten(),
            nn.Linear(2 * 5, 3),
        )
        x, y, lf = torch.randn(n, 3, 10, generator=g), cls(3), _ce
    elif name == "embedding_layernorm_seq":
        m = nn.Sequential(nn.Embedding(10, 6, padding_idx=0), nn.LayerNorm(6), nn.Linear(6, 10))
        x, y, lf = _ids(n, 5, 10, g), _ids(n, 5, 10, g), _token_ce
    elif name == "rmsnorm":
        m = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3))
        x, y, lf = torch.randn(n, 4, generator=g), cls(3), _ce
    elif name == "eval_batchnorm":
        m, x, y, lf = _eval_bn(), img(2, 6, 6), cls(4), _ce
    elif name == "generic_module":
        m = nn.Sequential(nn.Linear(4, 5), Scaled(5), nn.Linear(5, 3))
        x, y, lf = torch.randn(n, 4, generator=g), cls(3), _ce
    elif name == "multihead_attention":
        m, x, y, lf = Attention(), _ids(n, 4, 13, g), _ids(n, 4, 13, g), _token_ce
    elif name == "gru":
        m, x, y, lf = Recurrent(), _ids(n, 4, 13, g), cls(3), _ce
    elif name == "transformer_encoder":
        m, x, y, lf = _transformer(), _ids(n, 5, 13, g), _ids(n, 5, 13, g), _token_ce
    elif name == "tied_embedding_head_and_reused_module":
        m, x, y, lf = TiedLM(), _ids(n, 4, 11, g), _ids(n, 4, 11, g), _token_ce
    elif name == "parent_uses_child_weight":
        m, x, y, lf = DirectUse(), _ids(n, 3, 9, g), _ids(n, 3, 9, g), _token_ce
    elif name == "frozen_and_inplace":
        m, x, y, lf = _frozen_mlp(), torch.randn(n, 5, generator=g), cls(3), _ce
    elif name == "two_inputs":
        m = TwoInputs()
        x = (torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g))
        y, lf = cls(4), _ce
    else:
        raise KeyError(name)
    to64 = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    return m.double(), tree_map(to64, x), y, lf


CASES = [
    "mlp",
    "linear_seq",
    "conv2d_groupnorm",
    "conv2d_padding_modes",
    "conv1d",
    "embedding_layernorm_seq",
    "rmsnorm",
    "eval_batchnorm",
    "generic_module",
    "multihead_attention",
    "gru",
    "transformer_encoder",
    "tied_embedding_head_and_reused_module",
    "parent_uses_child_weight",
    "frozen_and_inplace",
    "two_inputs",
]


def _loop_reference(model, inputs, targets, loss_fn, max_norm):
    """Per-example torch.autograd.grad, clipped and summed by hand."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    per = {n: [] for n in params}
    for i in range(targets.shape[0]):
        xi = tuple(t[i : i + 1] for t in inputs)
        loss = loss_fn(model(*xi), targets[i : i + 1]).sum()
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, p, g in zip(params, params.values(), gs):
            per[n].append(torch.zeros_like(p) if g is None else g)
    per = {n: torch.stack(v) for n, v in per.items()}
    if max_norm is None:
        _, norms = _clip_sum(list(per.values()), 1.0)
        return norms
    sums, norms = _clip_sum(list(per.values()), max_norm)
    return dict(zip(per, sums)), norms


def _functional_reference(model, inputs, targets, loss_fn, max_norm):
    """clipped_grad through functional_call: what clipped_grad_module must equal."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)

    def one(p, x, y):
        x1 = tuple(t.unsqueeze(0) for t in x)
        return loss_fn(ft.functional_call(model, p, x1), y.unsqueeze(0)).sum()

    return clipped_grad(one, max_norm=max_norm, batch_argnums=(1, 2), return_norms=True)(
        params, inputs, targets
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_clipped_grad_module_matches_loop_and_clipped_grad(case, method, monkeypatch):
    model, x, y, lf = _case(case)
    from functorch_lite.dp import _clip

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # every case here stays on the per-layer path, except "auto" on a model whose parameters are
    # mostly in modules without a rule (NOTE [auto and models mostly without rules])
    if method == "ghost" or (method == "auto" and not _clip._mostly_without_rules(model, trainable)):
        monkeypatch.setattr(_clip, "vmap_clipped_grad", None)
    max_norm = _middle_norm(_loop_reference(model, x, y, lf, None))
    ref, ref_norms = _loop_reference(model, x, y, lf, max_norm)
    assert (ref_norms > max_norm).any() and (ref_norms < max_norm).any()
    got, norms = clipped_grad_module(model, lf, x, y, max_norm=max_norm, method=method, return_norms=True)
    assert list(got) == list(ref)
    for n in ref:
        assert got[n].shape == ref[n].shape and got[n].grad_fn is None, n
        _assert_close(got[n], ref[n], 1e-9)
    _assert_close(norms, ref_norms, 1e-9)
    fref, fnorms = _functional_reference(model, x, y, lf, max_norm)
    for n in ref:
        _assert_close(got[n], fref[n], 1e-9)
    _assert_close(norms, fnorms, 1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "case",
    [
        "mlp",
        "conv2d_groupnorm",
        "embedding_layernorm_seq",
        "transformer_encoder",
        "tied_embedding_head_and_reused_module",
    ],
)
def test_clipped_grad_module_float32(case, method):
    model, x, y, lf = _case(case)
    model = model.float()
    x = tree_map(lambda t: t.float() if t.is_floating_point() else t, x)
    max_norm = _middle_norm(_loop_reference(model, x, y, lf, None))
    fref, fnorms = _functional_reference(model, x, y, lf, max_norm)
    got, norms = clipped_grad_module(model, lf, x, y, max_norm=max_norm, method=method, return_norms=True)
    for n in fref:
        assert got[n].dtype == torch.float32
        _assert_close(got[n], fref[n], 1e-5)
    _assert_close(norms, fnorms, 1e-5)


def test_ghost_never_materialises_linear_weight_grads(monkeypatch):
    """method='ghost' on an MLP: no (B, p, d) tensor is formed; the per-example tensors are the
    biases' (B, p)."""
    from functorch_lite.dp import _ghost

    shapes = []
    real = _ghost.per_example_sq_norms
    monkeypatch.setattr(_ghost, "per_example_sq_norms", lambda g: shapes.append(g.shape) or real(g))
    model, x, y, lf = _case("mlp")
    clipped_grad_module(model, lf, x, y, max_norm=1.0, method="ghost")
    assert sorted(shapes) == [(7, 3), (7, 8)]


def test_auto_chooses_per_layer():
    """Mixed ghost clipping at T=5 (2T^2 = 50): a 24x4 weight (96) is ghosted, a 3x4 one (12) is
    materialised; "ghost" and "inst" override the cost model."""
    from functorch_lite.dp import _ghost

    assert _ghost._use_ghost("auto", 5, 24, 4)  # 50 < 96
    assert not _ghost._use_ghost("auto", 5, 3, 4)  # 50 > 12
    assert _ghost._use_ghost("ghost", 5, 3, 4)
    assert not _ghost._use_ghost("inst", 1, 100, 100)


class CrossAttention(nn.Module):
    """MultiheadAttention variants: cross-attention with a shorter memory, padding mask, float
    or bool masks, is_causal, attention weights returned (unused) or used in the output."""

    def __init__(self, variant, d=8):
        super().__init__()
        self.variant = variant
        self.emb = nn.Embedding(13, d)
        self.mem = nn.Linear(3, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True, bias=variant != "no_bias")
        self.head = nn.Linear(d, 13)
        self.register_buffer("float_mask", torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids, memory):
        h = self.emb(ids)
        t = ids.shape[1]
        v = self.variant
        if v == "cross":
            kv = self.mem(memory)
            pad = memory[:, :, 0] > 0.3  # per example, from the data; key 0 always attended
            pad[:, 0] = False
            a, _ = self.attn(h, kv, kv, key_padding_mask=pad)
        elif v == "float_mask":  # a constant mask (drawn in forward it would differ per example
            # under vmap's randomness="different", as torch.func's does)
            mask = self.float_mask[:t, :t].to(h.dtype)
            a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        elif v == "causal":
            mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype)
            a, _ = self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)
        elif v == "weights_used":
            a, w = self.attn(h, h, h)
            a = a + w @ h
        else:  # "no_bias": packed in_proj without biases, default need_weights=True unused
            a, _ = self.attn(h, h, h)
        return self.head(a)


@pytest.mark.parametrize("variant", ["cross", "float_mask", "causal", "weights_used", "no_bias"])
@pytest.mark.parametrize("method,seq", [("ghost", 4), ("auto", 4), ("auto", 9)])
def test_multihead_attention_rule(variant, method, seq, monkeypatch):
    """The attention rule (no per-layer vmap) on every mask/argument variant; attention weights
    that reach the loss send the model to the whole-model path instead. With 9 positions auto
    materialises out_proj's and the cross-attention blocks' per-example gradients (2*81 > 8*8),
    with 4 it ghosts them."""
    from functorch_lite.dp import _ghost

    if variant != "weights_used":
        monkeypatch.setattr(_ghost, "_generic_contributions", None)
    model = CrossAttention(variant).double()
    g = torch.Generator().manual_seed(7)
    x = (_ids(6, seq, 13, g), torch.randn(6, seq - 1, 3, generator=g, dtype=torch.float64))
    y = _ids(6, seq, 13, g)
    max_norm = _middle_norm(_loop_reference(model, x, y, _token_ce, None))
    ref, ref_norms = _loop_reference(model, x, y, _token_ce, max_norm)
    got, norms = clipped_grad_module(
        model, _token_ce, x, y, max_norm=max_norm, method=method, return_norms=True
    )
    for n in ref:
        _assert_close(got[n], ref[n], 1e-9)
    _assert_close(norms, ref_norms, 1e-9)


def test_transformer_uses_rules_only(monkeypatch):
    from functorch_lite.dp import _clip, _ghost

    monkeypatch.setattr(_ghost, "_generic_contributions", None)
    monkeypatch.setattr(_clip, "vmap_clipped_grad", None)
    model, x, y, lf = _case("transformer_encoder")
    fref, _ = _functional_reference(model, x, y, lf, 0.5)
    got = clipped_grad_module(model, lf, x, y, max_norm=0.5)
    for n in fref:
        _assert_close(got[n], fref[n], 1e-9)


def test_clipped_grad_module_empty_batch():
    model = nn.Sequential(nn.Linear(3, 2))
    g, n = clipped_grad_module(
        model, _ce, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), max_norm=1.0, return_norms=True
    )
    assert n.shape == (0,) and all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_clipped_grad_module_leaves_module_and_grads_untouched():
    model, x, y, lf = _case("transformer_encoder")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    for method in METHODS:
        clipped_grad_module(model, lf, x, y, max_norm=1.0, method=method)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


class TimeMajor(nn.Module):
    """Runs its Linear on a (T, B, d) layout, with T == B: dim 0 of the layer's input has the
    batch size but is not the example dim. The fast path knows the example dim from the
    recording under vmap (it never compares sizes), so it stays on the per-layer path."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)).transpose(0, 1).sum(1)


@pytest.mark.parametrize("method", ("ghost", "auto"))
def test_layer_that_is_not_batch_first_stays_exact(method, monkeypatch):
    from functorch_lite.dp import _clip, _ghost

    monkeypatch.setattr(_clip, "vmap_clipped_grad", None)
    monkeypatch.setattr(_ghost, "_generic_contributions", None)
    model = TimeMajor().double()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 5, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    ref, ref_norms = _loop_reference(model, x, y, _ce, 0.3)
    got, norms = clipped_grad_module(model, _ce, x, y, max_norm=0.3, method=method, return_norms=True)
    for n in ref:
        _assert_close(got[n], ref[n], 1e-9)
    _assert_close(norms, ref_norms, 1e-9)


def test_parameter_used_in_loss_fn_is_refused():
    """Per-example gradients flow through the model's forward only; a trainable parameter used
    in loss_fn would silently lose that part of its gradient, so the per-layer path refuses it."""
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    lf = lambda out, y: _ce(out, y) + model[0].bias.pow(2).sum()  # noqa: E731
    for method in ("ghost", "auto"):
        with pytest.raises(ValueError, match="'0.bias' is used in loss_fn"):
            clipped_grad_module(model, lf, x, y, max_norm=0.5, method=method)


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "bad,exc",
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),  # an unbounded clip gives no privacy
        (torch.tensor(float("inf")), ValueError),
        ("1", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_max_norm(bad, exc):
    x, y = _batch()
    with pytest.raises(exc, match="max_norm"):
        clipped_grad(_mse, max_norm=bad, batch_argnums=(1, 2))
    model = nn.Linear(5, 3)
    with pytest.raises(exc, match="max_norm"):
        clipped_grad_module(model, _ce, x.float(), y.argmax(1), max_norm=bad)


def test_bad_batch_argnums():
    w, (x, y) = _params(), _batch()
    with pytest.raises(TypeError, match="batch_argnums.*argument 1.*tensor"):
        clipped_grad(lambda w, n, y: _mse(w, y, y), batch_argnums=(1, 2), max_norm=1.0)(w, 3, y)
    with pytest.raises(ValueError, match="same batch size.*argument 1 has 12.*argument 2 has 5"):
        clipped_grad(_mse, batch_argnums=(1, 2), max_norm=1.0)(w, x, y[:5])
    with pytest.raises(ValueError, match="batch_argnums"):
        clipped_grad(_mse, batch_argnums=(1, 5), max_norm=1.0)(w, x, y)
    with pytest.raises(TypeError, match="batch_argnums"):
        clipped_grad(_mse, batch_argnums="x", max_norm=1.0)(w, x, y)
    with pytest.raises(ValueError, match="chunk_size"):
        clipped_grad(_mse, batch_argnums=(1, 2), max_norm=1.0, chunk_size=0)


def test_module_inputs_and_targets_batch_sizes():
    model = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="same batch size.*inputs.*8.*targets.*6"):
        clipped_grad_module(model, _ce, torch.randn(8, 5), torch.zeros(6, dtype=torch.long), max_norm=1.0)
    with pytest.raises(TypeError, match="inputs"):
        clipped_grad_module(model, _ce, [1.0, 2.0], torch.zeros(2, dtype=torch.long), max_norm=1.0)


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_in_training_mode_is_refused(method):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    x, y = torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="BatchNorm2d in training mode.*'1'.*mixes examples.*DP.*GroupNorm"):
        clipped_grad_module(model, _ce, x, y, max_norm=1.0, method=method)
    model.eval()  # running statistics: per-example, fine
    g = clipped_grad_module(model, _ce, x, y, max_norm=1.0, method=method)
    assert set(g) == {n for n, _ in model.named_parameters()}
    stateless = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 2)).eval()
    with pytest.raises(ValueError, match="BatchNorm1d without running statistics.*mixes examples"):
        clipped_grad_module(stateless, _ce, torch.randn(4, 3), y, max_norm=1.0, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_scalar_loss_is_refused(method):
    model = nn.Linear(5, 3)
    x, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"loss_fn.*\(B,\) = \(4,\).*scalar.*reduction='none'"):
        clipped_grad_module(model, F.cross_entropy, x, y, max_norm=1.0, method=method)
    with pytest.raises(ValueError, match=r"loss_fn.*\(4,\).*shape \(4, 3\)"):
        clipped_grad_module(model, lambda o, y: o, x, y, max_norm=1.0, method=method)


def test_bad_method():
    with pytest.raises(ValueError, match="method.*'auto', 'ghost', 'vmap'.*'fast'"):
        clipped_grad_module(
            nn.Linear(2, 2),
            _ce,
            torch.randn(3, 2),
            torch.zeros(3, dtype=torch.long),
            max_norm=1.0,
            method="fast",
        )


def test_docstring_examples_run():
    import doctest

    from functorch_lite.dp import _clip

    result = doctest.testmod(_clip)
    assert result.attempted >= 8 and result.failed == 0


def test_reachable_from_the_package():
    assert ft.dp.clipped_grad is clipped_grad
    assert ft.dp.clipped_grad_module is clipped_grad_module
    assert "clipped_grad" in ft.dp.__all__ and "clipped_grad_module" in ft.dp.__all__


@pytest.mark.parametrize("method", ("ghost", "auto"))
@pytest.mark.parametrize("need_weights", (False, True))
def test_attention_dropout_in_training_is_replayed(method, need_weights, monkeypatch):
    """MultiheadAttention with dropout in training mode: the per-layer vmap(grad) redraws the
    recording's dropout masks from the generator state kept at the call. The recording and the
    whole-model vmap path draw under the same vmap, so with the same seed they use the same
    masks: method="vmap" is the oracle, and the fast path must not fall back to it."""
    from functorch_lite.dp import _clip

    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Embedding(13, 8),
            nn.TransformerEncoderLayer(
                8, 2, dim_feedforward=16, dropout=0.3, batch_first=True, norm_first=True
            ),
            nn.Linear(8, 13),
        )
        .double()
        .train()
    )
    if need_weights:  # the explicit-softmax path of multi_head_attention_forward
        attn = model[1].self_attn
        forward = attn.forward
        attn.forward = lambda *a, **k: forward(*a, **{**k, "need_weights": True})
    g = torch.Generator().manual_seed(8)
    x, y = _ids(6, 5, 13, g), _ids(6, 5, 13, g)
    torch.manual_seed(123)
    ref, ref_norms = clipped_grad_module(
        model, _token_ce, x, y, max_norm=0.05, method="vmap", return_norms=True
    )
    monkeypatch.setattr(_clip, "vmap_clipped_grad", None)  # a failed replay would fall back
    torch.manual_seed(123)
    got, norms = clipped_grad_module(model, _token_ce, x, y, max_norm=0.05, method=method, return_norms=True)
    assert (ref_norms > 0.05).any()
    _assert_close(norms, ref_norms, 1e-9)
    for n in ref:
        _assert_close(got[n], ref[n], 1e-9)
    # and the draws matter: another seed gives other gradients
    torch.manual_seed(124)
    other = clipped_grad_module(model, _token_ce, x, y, max_norm=0.05, method=method)
    assert any((other[n] - ref[n]).abs().max() > 1e-6 for n in ref)


def test_attention_dropout_replay_is_checked(monkeypatch):
    """A replay from the wrong generator state is caught by comparing the recomputed output with
    the recorded one, and the call goes to the whole-model path instead of using other masks."""
    from functorch_lite.dp import _clip, _ghost

    real = _ghost._rng_state
    monkeypatch.setattr(
        _ghost, "_rng_state", lambda args: (real(args)[0], torch.Generator().manual_seed(99).get_state())
    )
    fell_back = []
    monkeypatch.setattr(_clip, "vmap_clipped_grad", lambda *a: fell_back.append(1) or ({}, None))
    model = nn.Sequential(
        nn.Embedding(13, 8),
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.3, batch_first=True),
        nn.Linear(8, 13),
    ).train()
    g = torch.Generator().manual_seed(8)
    clipped_grad_module(model, _token_ce, _ids(6, 5, 13, g), _ids(6, 5, 13, g), max_norm=1.0)
    assert fell_back
