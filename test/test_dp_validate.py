"""ft.dp.validate and ft.dp.fix (issue 20, item 3): what would break DP-SGD, named per module,
found on a small batch before training; fix() swaps batch norm for group norm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _batch(n=8, shape=(4,), classes=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


class Center(nn.Module):
    def forward(self, h):
        return h - h.mean(0)  # statistics over the batch: mixes examples


class MixesInRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0))


class MixesInChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.center = Center()
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.center(self.a(x)))


class BatchAttention(nn.Module):
    """Softmax over the batch dim: each output row is a mixture of all examples."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        w = torch.softmax(h @ h.T, dim=0)
        return self.b(w @ h)


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x * self.scale)


class SharedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(8, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head((x + self.proj(self.pos).mean(0)).tanh())


class SharedOutput(nn.Module):
    """A module without a rule whose output is shared by all examples."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4))

        def forward(self):
            return self.table.tanh()

    def __init__(self):
        super().__init__()
        self.tab = self.Table()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head((x + self.tab()).tanh())


def _cnn_bn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    )


def test_batch_norm_in_training_is_an_error_and_fix_makes_the_model_valid():
    model = _cnn_bn()
    x, y = _batch(shape=(1, 6, 6))
    report = ft.dp.validate(model, _ce, x, y)
    assert not report.ok and [e.module for e in report.errors] == ["1"]
    assert "BatchNorm2d in training mode" in report.errors[0].problem
    assert "ft.dp.fix" in report.errors[0].fix
    with pytest.raises(ValueError, match="(?s)not ready for DP-SGD.*BatchNorm2d"):
        report.raise_if_errors()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    w = model[1].weight.clone()
    fixed = ft.dp.fix(model)
    assert fixed is model and isinstance(model[1], nn.GroupNorm)
    assert model[1].num_groups == 4 and torch.equal(model[1].weight, w)
    assert ft.dp.validate(model, _ce, x, y).ok
    # without running statistics batch norm mixes examples in eval mode too
    stateless = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).eval()
    r = ft.dp.validate(stateless, _ce, *_batch())
    assert [e.module for e in r.errors] == ["0"] and "without running statistics" in r.errors[0].problem


def test_fix_keeps_dtype_device_and_nested_modules():
    model = nn.Sequential(nn.Linear(4, 64), nn.Sequential(nn.BatchNorm1d(64, affine=False))).double()
    ft.dp.fix(model)
    gn = model[1][0]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32 and not gn.affine
    assert isinstance(ft.dp.fix(nn.BatchNorm2d(6)), nn.GroupNorm)
    with pytest.raises(TypeError, match="fix: model must be a torch.nn.Module"):
        ft.dp.fix("model")


@pytest.mark.parametrize(
    "factory, where",
    [(MixesInRoot, ""), (MixesInChild, "center"), (BatchAttention, "")],
)
def test_ops_that_mix_examples_are_errors_named_by_module(factory, where):
    torch.manual_seed(0)
    report = ft.dp.validate(factory(), _ce, *_batch())
    assert [(e.module, e.kind) for e in report.errors] == [(where, "error")]
    assert "mixes examples" in report.errors[0].problem


def test_slow_paths_are_reported_not_errors():
    torch.manual_seed(0)
    r = ft.dp.validate(OwnParameter(), _ce, *_batch())
    assert r.ok and [(i.module, i.kind) for i in r.issues] == [("", "slow")]
    assert "per-layer vmap(grad)" in r.issues[0].problem
    r = ft.dp.validate(SharedOutput(), _ce, *_batch())
    assert r.ok and len(r.slow) == 1 and "whole-model vmap path" in r.slow[0].problem
    assert "shared by all examples" in r.slow[0].problem  # the reason the fast path gave
    # a Linear of a table shared by all examples has its rule (its output is made per-example);
    # the table, the root's own parameter, gets the root's per-layer vmap(grad)
    r = ft.dp.validate(SharedTable(), _ce, *_batch())
    assert r.ok and len(r.slow) == 1 and "per-layer vmap(grad)" in r.slow[0].problem
    assert ft.dp.validate(OwnParameter(), _ce, *_batch(), method="vmap").issues == []
    attn = nn.Sequential(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1, batch_first=True), nn.Flatten())
    r = ft.dp.validate(nn.Sequential(attn, nn.Linear(20, 3)), _ce, *_batch(shape=(5, 4)))
    assert r.ok and [i.module for i in r.slow] == ["0.0.self_attn"]
    assert "attention dropout in training" in r.slow[0].problem


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)), (4,)),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 3)),
            (1, 6, 6),
        ),
        (
            lambda: nn.Sequential(
                nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
                nn.Flatten(),
                nn.Linear(20, 3),
            ),
            (5, 4),
        ),
    ],
)
def test_clean_models_have_no_issues_and_are_left_untouched(factory, shape):
    torch.manual_seed(0)
    model = factory().train()
    x, y = _batch(shape=shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = ft.dp.validate(model, _ce, x, y)
    assert report.issues == [], str(report)
    assert "no issues" in str(report)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments():
    x, y = _batch()
    model = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="validate: model must be a torch.nn.Module"):
        ft.dp.validate(lambda t: t, _ce, x, y)
    with pytest.raises(ValueError, match="examples must be an int >= 2"):
        ft.dp.validate(model, _ce, x, y, examples=1)
    with pytest.raises(ValueError, match="method must be one of"):
        ft.dp.validate(model, _ce, x, y, method="fast")
    with pytest.raises(ValueError, match="at least 2 examples"):
        ft.dp.validate(model, _ce, x[:1], y[:1])
    with pytest.raises(ValueError, match="same batch size"):
        ft.dp.validate(model, _ce, x, y[:3])
    with pytest.raises(ValueError, match=r"loss_fn must return the per-example losses"):
        ft.dp.validate(model, F.cross_entropy, x, y)


def test_reachable_from_the_package():
    assert {"validate", "fix", "ValidationReport", "Issue"} <= set(ft.dp.__all__)
