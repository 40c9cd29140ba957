"""ft.dp's per-layer path on weights used several times and on language-model layers (issue 24):
tied embeddings and output layers, a module called twice, transformers' Conv1D, layers of inputs
shared by all examples (position embeddings), GPT-2 from a config. Every case against a
per-example torch.autograd loop in float64, for the ghost and auto methods, and the path taken
is checked: cross terms of the factored uses, no per-example gradient of a tied weight
materialised (NOTE [Ghost norms of a weight used several times] in functorch_lite/dp/_ghost.py).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft
from functorch_lite.dp import _ghost

_F64 = torch.float64


def _token_loss(out, y):
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def _reference(model, loss_fn, x, y, max_norm):
    """Clipped sum and per-example norms from one autograd.grad per example (float64)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    per = []
    for i in range(len(y)):
        xi = tuple(t[i : i + 1] for t in x) if isinstance(x, tuple) else x[i : i + 1]
        xi = xi if isinstance(xi, tuple) else (xi,)
        per.append(torch.autograd.grad(loss_fn(model(*xi), y[i : i + 1]).sum(), params, allow_unused=True))
    per = [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in per]
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gs)) for gs in per])
    c = (max_norm / (norms + 1e-6)).clamp(max=1)
    return {n: sum(c[i] * per[i][k] for i in range(len(per))) for k, n in enumerate(names)}, norms


def _check(model, loss_fn, x, y, method, max_norm=1.0):
    ref, ref_norms = _reference(model, loss_fn, x, y, max_norm)
    got, norms = ft.dp.clipped_grad_module(
        model, loss_fn, x, y, max_norm=max_norm, method=method, return_norms=True
    )
    assert _ghost.last_fallback_reason() is None, _ghost.last_fallback_reason()
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    return _ghost.last_plan()


class TiedLM(nn.Module):
    def __init__(self, vocab=50, d=16, padding_idx=None):
        super().__init__()
        self.wte = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.wte(ids))))


def _ids(n=6, t=9, vocab=50, padding_idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    ids[:, :3] = ids[:, 3:6]  # repeated tokens within each example
    ids[1] = ids[0]  # and two identical examples
    if padding_idx is not None:
        ids[:, -2:] = padding_idx
    return ids, torch.randint(0, vocab, (n, t), generator=g)


@pytest.fixture
def no_materialized_uses(monkeypatch):
    """Fails if a use of a tied weight is materialised, and counts the cross terms."""
    calls = []

    def refuse(*a, **k):
        raise AssertionError("a use of a weight used several times was materialised")

    real = _ghost._cross_sq
    monkeypatch.setattr(_ghost, "_materialize", refuse)
    monkeypatch.setattr(_ghost, "_cross_sq", lambda f1, f2: calls.append(1) or real(f1, f2))
    return calls


@pytest.mark.parametrize("method", ["ghost", "auto"])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_tied_embedding_and_output_layer(method, padding_idx, no_materialized_uses):
    torch.manual_seed(0)
    model = TiedLM(padding_idx=padding_idx).to(_F64)
    ids, y = _ids(padding_idx=padding_idx)
    plan = _check(model, _token_loss, ids, y, method)
    assert plan[1] == []  # every parameter on a rule
    assert no_materialized_uses  # the embedding x output-layer cross term was used


class TwiceLinear(nn.Module):
    """One Linear on two inputs of different lengths (a weight shared by two calls)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 4)

    def forward(self, a, b):
        return self.proj(a).tanh().sum(1) + self.proj(b).sin().mean(1)


@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_a_module_called_twice(method):
    torch.manual_seed(1)
    model = TwiceLinear().to(_F64)
    x = (torch.randn(5, 3, 5, dtype=_F64), torch.randn(5, 7, 5, dtype=_F64))
    y = torch.randn(5, 4, dtype=_F64)
    _check(model, lambda out, y: ((out - y) ** 2).sum(1), x, y, method)


def test_a_module_called_twice_with_one_use_materialised_by_cost(monkeypatch):
    # a 2-position use is ghosted, a 40-position one costs less materialised (2 T^2 > p d): the
    # ghosted use is then materialised too and summed with the other (exact either way)
    torch.manual_seed(2)
    model = TwiceLinear().to(_F64)
    x = (torch.randn(4, 2, 5, dtype=_F64), torch.randn(4, 40, 5, dtype=_F64))
    y = torch.randn(4, 4, dtype=_F64)
    seen = []
    real = _ghost._materialize
    monkeypatch.setattr(_ghost, "_materialize", lambda f, s: seen.append(1) or real(f, s))
    _check(model, lambda out, y: ((out - y) ** 2).sum(1), x, y, "auto")
    assert seen


class TwiceConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)[:, :2])).mean((1, 2, 3))


def test_a_convolution_called_twice():
    torch.manual_seed(3)
    model = TwiceConv().to(_F64)
    x, y = torch.randn(4, 2, 6, 6, dtype=_F64), torch.randn(4, dtype=_F64)
    _check(model, lambda out, y: (out - y) ** 2, x, y, "ghost")


class SharedTable(nn.Module):
    """A parameter table (T, 4) through a Linear shared by all examples, plus per-example input."""

    def __init__(self, t=6):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(t, 4))
        self.pos_proj = nn.Linear(4, 4)
        self.inp = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head((self.inp(x) + self.pos_proj(self.pos)[None]).tanh().mean(1))


@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_a_layer_of_a_shared_input_gets_per_example_gradients(method):
    # NOTE [Shared outputs of layers with a rule]: T == B too, the coincidence of issue 20
    torch.manual_seed(4)
    model = SharedTable().to(_F64)
    x, y = torch.randn(6, 6, 3, dtype=_F64), torch.randint(0, 2, (6,))
    plan = _check(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), x, y, method)
    assert model.pos_proj in plan[0]


# ---- transformers (a test-only dependency, like Opacus)


def test_transformers_conv1d():
    pu = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(5)
    model = nn.Sequential(pu.Conv1D(6, 5), nn.Tanh(), pu.Conv1D(3, 6)).to(_F64)
    x, y = torch.randn(4, 7, 5, dtype=_F64), torch.randn(4, 7, 3, dtype=_F64)
    for method in ("ghost", "auto"):
        plan = _check(model, lambda out, y: ((out - y) ** 2).sum((1, 2)), x, y, method)
        assert plan[1] == []


class _GPT2(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_gpt2_from_a_config(method, no_materialized_uses):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(
        vocab_size=97,
        n_positions=32,
        n_embd=24,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = _GPT2(transformers.GPT2LMHeadModel(cfg)).to(_F64)
    assert model.model.lm_head.weight is model.model.transformer.wte.weight
    ids, y = _ids(n=4, t=12, vocab=97, seed=7)
    plan = _check(model, _token_loss, ids, y, method)
    assert plan[1] == []  # Conv1D, the tied lm_head/wte, wpe of the shared positions, LayerNorm: rules
    assert no_materialized_uses


class TwiceAttention(nn.Module):
    """One MultiheadAttention called twice (self-attention, then cross-attention)."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x, m):
        h = self.att(x, x, x, need_weights=False)[0]
        return self.att(h, m, m, need_weights=False)[0].mean((1, 2))


@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_attention_called_twice(method):
    torch.manual_seed(8)
    model = TwiceAttention().to(_F64)
    x = (torch.randn(3, 5, 8, dtype=_F64), torch.randn(3, 4, 8, dtype=_F64))
    y = torch.randn(3, dtype=_F64)
    _check(model, lambda out, y: (out - y) ** 2, x, y, method)


# NOTE [Weights that enter through F.linear or matmul]: a trainable weight that a module without
# a rule passes to F.linear, addmm or matmul gets the Linear rule from the recorded call.
class _Projection(nn.Module):
    def __init__(self, d, p, form, bias=True):
        super().__init__()
        self.form = form
        shape = (p, d) if form == "linear" else (d, p)
        self.w = nn.Parameter(torch.randn(*shape) / d**0.5)
        self.b = nn.Parameter(torch.randn(p) / 3) if bias else None

    def forward(self, x):
        if self.form == "linear":
            return F.linear(x, self.w, self.b)
        if self.form == "addmm":
            return torch.addmm(self.b, x.reshape(-1, x.shape[-1]), self.w).reshape(*x.shape[:-1], -1)
        out = x @ self.w if self.form == "@" else torch.matmul(x, self.w)
        return out if self.b is None else out + self.b


class _FunctionalTiedLM(nn.Module):
    """The output layer tied to the embedding through F.linear, and a mixing weight used with @."""

    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Parameter(torch.randn(d, d) / 4)
        self.norm = nn.LayerNorm(d)

    def forward(self, ids):
        h = self.wte(ids)
        return F.linear(self.norm(h + torch.tanh(h @ self.mix)), self.wte.weight)


@pytest.mark.parametrize("method", ["auto", "ghost"])
@pytest.mark.parametrize(
    "form,bias", [("linear", True), ("linear", False), ("addmm", True), ("@", False), ("matmul", False)]
)
def test_weights_entering_through_linear_or_matmul_get_the_linear_rule(form, bias, method):
    model = nn.Sequential(_Projection(5, 8, form, bias), nn.Tanh(), _Projection(8, 4, form, bias)).double()
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (6, 7))
    rule_layers, per_layer_vmap = _check(model, _token_loss, x, y, method)
    assert per_layer_vmap == [] and len(rule_layers) == 2, (rule_layers, per_layer_vmap)
    assert all(type(m).__name__ == "_MatmulUse" for m in rule_layers)


@pytest.mark.parametrize("method", ["auto", "ghost"])
def test_an_output_layer_tied_through_f_linear(method, no_materialized_uses):
    """The tied weight's uses (the embedding's lookup, F.linear's product) get ghost cross terms."""
    model = _FunctionalTiedLM().double()
    ids, y = _ids()
    rule_layers, per_layer_vmap = _check(model, _token_loss, ids, y, method)
    assert per_layer_vmap == [] and no_materialized_uses  # the cross term was formed
    assert sorted(type(m).__name__ for m in rule_layers) == [
        "Embedding",
        "LayerNorm",
        "_MatmulUse",
        "_MatmulUse",
    ]


def test_a_bias_added_after_a_matmul_stays_with_its_module():
    """x @ W + b: W gets the rule; b's use is an add, so its module's per-layer vmap takes it."""
    model = nn.Sequential(_Projection(5, 8, "@", True), nn.Tanh(), _Projection(8, 4, "@", True)).double()
    x, y = torch.randn(6, 7, 5, dtype=torch.float64), torch.randint(0, 4, (6, 7))
    rule_layers, per_layer_vmap = _check(model, _token_loss, x, y, "ghost")
    assert [type(m).__name__ for m in rule_layers] == ["_MatmulUse", "_MatmulUse"]
    assert [type(m).__name__ for m in per_layer_vmap] == ["_Projection", "_Projection"]


class _MixedUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5) / 3)

    def forward(self, x):
        return F.linear(x, self.w) + self.w.sum()  # a second, elementwise use


def test_a_weight_with_another_use_stays_with_its_module():
    model = nn.Sequential(_MixedUse(), nn.Tanh()).double()
    x, y = torch.randn(5, 3, 5, dtype=torch.float64), torch.randint(0, 4, (5, 3))
    rule_layers, per_layer_vmap = _check(model, _token_loss, x, y, "ghost")
    assert rule_layers == [] and [type(m).__name__ for m in per_layer_vmap] == ["_MixedUse"]


def test_auto_learns_its_path_from_the_first_plan():
    """NOTE [auto and models mostly without rules]: a model whose rule-less modules hold most of
    the parameters runs its first auto step on the per-layer path; its plan decides the next."""
    from functorch_lite.dp import _clip

    x, y = torch.randn(5, 3, 5, dtype=torch.float64), torch.randint(0, 4, (5, 3))
    through_linear = nn.Sequential(_Projection(5, 4, "linear"), nn.Tanh()).double()
    mixed = nn.Sequential(_MixedUse(), nn.Tanh()).double()
    for model, learned in ((through_linear, "layers"), (mixed, "vmap")):
        params = dict(model.named_parameters())
        assert _clip._auto_path(model, params) is None  # rule-less modules hold most parameters
        _check(model, _token_loss, x, y, "auto")
        assert _clip._auto_path(model, params) == learned
        _check(model, _token_loss, x, y, "auto")  # the learned path gives the same values


class _Head(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.wte(ids)))


def test_an_output_gradient_read_as_vocab_by_positions_is_not_copied(monkeypatch):
    """A loss that reads the logits as (vocab, T) (cross_entropy of logits.transpose(1, 2), as
    language models are trained) leaves their gradient strided: the head's clipped sum is then
    one product per example accumulated in place, not a copy of the step's largest tensor."""
    model = _Head().double()
    ids, y = _ids()
    calls = []
    addmm_ = torch.Tensor.addmm_

    def counting(self, *args, **kwargs):
        calls.append(self.shape)
        return addmm_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", counting)
    _check(model, _token_loss, ids, y, "ghost")
    assert calls.count(model.head.weight.shape) == len(y) - 1
