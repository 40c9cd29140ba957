"""ft.dp's recurrent rule (issue 20, NOTE [Recurrent layers: the gates are Linear uses over the
time steps] in functorch_lite/dp/_ghost.py): nn.LSTM, nn.GRU and nn.RNN (tanh and relu) seq-first
and batch_first, one layer or two bidirectional ones, with and without h0/c0, with the output
sequence and h_n reaching the loss; per-example norms and clipped sums against a per-example
autograd loop in float64, and the rule (not a per-layer vmap, not the whole-model path) doing it.
Layers the rule does not take (proj_size, dropout drawn between layers) stay exact on the
per-layer vmap."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft
from functorch_lite.dp import _ghost

_F64 = torch.float64
B, T, D, H = 4, 6, 5, 6


class Model(nn.Module):
    """Examples along dim 0 of both inputs: x (B, T, D), h0 (B, layers * dirs, H)."""

    def __init__(self, cls, batch_first, use_hn, given_h0, **kw):
        super().__init__()
        self.rnn = cls(D, H, batch_first=batch_first, **kw)
        self.cls, self.batch_first, self.use_hn, self.given_h0 = cls, batch_first, use_hn, given_h0
        self.head = nn.Linear(H * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x, h0):
        x = x if self.batch_first else x.transpose(0, 1)
        h0 = h0.transpose(0, 1).contiguous()
        state = ((h0, h0.tanh()) if self.cls is nn.LSTM else h0) if self.given_h0 else None
        out, hn = self.rnn(x, state)
        logits = self.head(out.mean(1 if self.batch_first else 0))
        if self.use_hn:
            last = (hn[0] if self.cls is nn.LSTM else hn)[-1]
            logits = logits + self.head(torch.cat([last] * (2 if self.rnn.bidirectional else 1), -1))
        return logits


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _reference(model, x, h0, y, max_norm):
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    per = [
        torch.autograd.grad(_ce(model(x[i : i + 1], h0[i : i + 1]), y[i : i + 1]).sum(), params)
        for i in range(len(y))
    ]
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gs)) for gs in per])
    c = (max_norm / (norms + 1e-6)).clamp(max=1)
    return {n: sum(c[i] * per[i][k] for i in range(len(per))) for k, n in enumerate(names)}, norms


def _data(layers):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, dtype=_F64)
    h0 = torch.randn(B, layers, H, generator=g, dtype=_F64)
    return x, h0, torch.randint(0, 3, (B,), generator=g)


def _check(model, layers, method):
    x, h0, y = _data(layers)
    _, ref_norms = _reference(model, x, h0, y, 1.0)
    max_norm = float(ref_norms.median())  # binds for some examples, not for others
    ref, ref_norms = _reference(model, x, h0, y, max_norm)
    got, norms = ft.dp.clipped_grad_module(
        model, _ce, (x, h0), y, max_norm=max_norm, method=method, return_norms=True
    )
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    return _ghost.last_plan(), _ghost.last_fallback_reason()


CONFIGS = list(
    itertools.product(
        [nn.LSTM, nn.GRU, nn.RNN, "rnn_relu"],
        [False, True],  # batch_first
        [False, True],  # h_n reaches the loss
        [False, True],  # h0 (and c0) given
        [{}, {"num_layers": 2, "bidirectional": True}],
    )
)


def _ids(c):
    cls, bf, hn, h0, kw = c
    name = cls if isinstance(cls, str) else cls.__name__
    return f"{name}-{'bf' if bf else 'seq'}-{'hn' if hn else 'out'}-{'h0' if h0 else 'zeros'}-{'2bi' if kw else '1'}"


@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_recurrent_rule_equals_a_per_example_loop(config, method):
    cls, batch_first, use_hn, given_h0, kw = config
    if cls == "rnn_relu":
        cls, kw = nn.RNN, {**kw, "nonlinearity": "relu"}
    torch.manual_seed(0)
    model = Model(cls, batch_first, use_hn, given_h0, **kw).to(_F64)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    plan, reason = _check(model, layers, method)
    assert reason is None
    assert plan[1] == [] and model.rnn in plan[0]  # the rule, not a per-layer vmap


class Projected(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(D, H, batch_first=True, proj_size=3)
        self.head = nn.Linear(3, 3)

    def forward(self, x, h0):
        return self.head(self.rnn(x)[0].mean(1))


def test_a_layer_without_the_rule_stays_exact():
    torch.manual_seed(0)
    model = Projected().to(_F64)  # proj_size: the per-layer vmap takes it
    plan, reason = _check(model, 1, "ghost")
    assert reason is None and plan[1] == [model.rnn]
    # dropout drawn between layers is not re-run by the rule either
    assert _ghost._rule_for(nn.LSTM(3, 4, num_layers=2, dropout=0.5).train()) is None
    assert _ghost._rule_for(nn.LSTM(3, 4, num_layers=2, dropout=0.5).eval()) is _ghost._rnn
