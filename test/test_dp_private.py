"""ft.dp.make_private (issue 20, item 5): an unchanged training loop (forward, mean loss,
loss.backward(), optimizer.step()) does DP-SGD steps with the per-layer fast path, with the same
numbers as PrivateTrainer on the same batches and noise generator."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft

DT = torch.float64


def _data(n=24, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randn(n, d, dtype=DT, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


class SeqFirst(nn.Module):
    """A seq-first encoder layer with T == B (the layout that defeated size-based guessing)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(5, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x):  # x: (B, 20), four positions of 5 features; T == B == 4
        h = self.inp(x.view(x.shape[0], 4, 5)).transpose(0, 1)
        return self.head(self.layer(h).transpose(0, 1).mean(1))


def _run_make_private(module, dataset, batch_size, steps_per_update=1, loss_reduction="mean", **kw):
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    model, optimizer, loader = ft.dp.make_private(
        module,
        opt,
        loader,
        max_grad_norm=0.3,
        noise_multiplier=0.7,
        poisson_sampling=False,
        generator=torch.Generator().manual_seed(5),
        loss_reduction=loss_reduction,
        **kw,
    )
    batches = list(loader)
    for i in range(0, len(batches), steps_per_update):
        optimizer.zero_grad()
        for x, y in batches[i : i + steps_per_update]:
            out = model(x)
            loss = F.cross_entropy(out, y, reduction=loss_reduction)
            loss.backward()
        optimizer.step()
    return optimizer


def _run_trainer(module, dataset, batch_size, steps_per_update=1, **kw):
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    n = len(dataset)
    trainer = ft.dp.PrivateTrainer(
        module,
        opt,
        lambda out, y: F.cross_entropy(out, y, reduction="none"),
        max_grad_norm=0.3,
        noise_multiplier=0.7,
        sample_rate=1 / len(loader),
        expected_batch_size=n / len(loader),
        generator=torch.Generator().manual_seed(5),
        **kw,
    )
    batches = list(loader)
    for i in range(0, len(batches), steps_per_update):
        for x, y in batches[i : i + steps_per_update]:
            trainer.accumulate(x, y)
        trainer.step()
    return trainer


@pytest.mark.parametrize("factory, width", [(_mlp, 5), (SeqFirst, 20)])
@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
@pytest.mark.parametrize("steps_per_update", [1, 2])
def test_same_numbers_as_private_trainer(factory, width, loss_reduction, steps_per_update):
    ds = _data(d=width)
    a, b = factory(), factory()
    optimizer = _run_make_private(a, ds, 4, steps_per_update, loss_reduction)
    trainer = _run_trainer(b, ds, 4, steps_per_update)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert optimizer.trainer.steps == trainer.steps
    assert optimizer.trainer.accountant.history == trainer.accountant.history


def test_poisson_loader_and_empty_batches():
    ds = _data(n=12)
    module = _mlp()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    model, optimizer, loader = ft.dp.make_private(
        module,
        opt,
        torch.utils.data.DataLoader(ds, batch_size=3),
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    assert isinstance(loader.batch_sampler, ft.dp.PoissonSampler) and len(loader) == 4
    sizes = []
    for _ in range(5):
        for x, y in loader:
            sizes.append(len(x))
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert len(set(sizes)) > 1 and optimizer.trainer.steps == 20
    # an empty batch: a noise-only step
    before = [p.clone() for p in module.parameters()]
    x0 = ds.tensors[0][:0]
    empty = loader.collate_fn([])
    assert empty[0].shape == (0, 5) and empty[1].shape == (0,)
    optimizer.zero_grad()
    model(x0)
    optimizer.step()
    assert optimizer.trainer.steps == 21
    assert any(not torch.equal(p, q) for p, q in zip(before, module.parameters()))
    assert 0 < optimizer.get_epsilon(1e-5) < float("inf")


def test_eval_mode_is_the_plain_forward_and_step_needs_a_backward():
    module = _mlp()
    model, optimizer, _ = ft.dp.make_private(
        module,
        torch.optim.SGD(module.parameters(), lr=0.1),
        torch.utils.data.DataLoader(_data(), batch_size=4),
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )
    x = _data().tensors[0][:4]
    torch.testing.assert_close(model.eval()(x), module(x))
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), module(x))
    with pytest.raises(RuntimeError, match="without a forward and loss.backward"):
        optimizer.step()
    model(x)  # a forward in training mode but no backward
    with pytest.raises(RuntimeError, match="without a forward and loss.backward"):
        optimizer.step()


class SharedOutput(nn.Module):
    """A module without a rule whose output is shared by all examples: the per-layer path cannot
    read its per-example gradients."""

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(5, dtype=DT))

        def forward(self):
            return self.table.tanh()

    def __init__(self):
        super().__init__()
        self.tab = self.Table()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(x + self.tab())


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.lin(x).T  # examples along dim 1


@pytest.mark.parametrize(
    "module, match",
    [
        (SharedOutput(), "per-layer path cannot read this model.*PrivateTrainer"),
        (Transposed(), "examples along dim 0"),
    ],
)
def test_models_it_cannot_read_are_refused_with_the_reason(module, match):
    model, optimizer, _ = ft.dp.make_private(
        module,
        torch.optim.SGD(module.parameters(), lr=0.1),
        torch.utils.data.DataLoader(_data(), batch_size=4),
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )
    x, y = _data().tensors
    with pytest.raises(ValueError, match=match):  # at the forward, or at the step it needs
        F.cross_entropy(model(x[:4]), y[:4]).backward()
        optimizer.step()
    assert optimizer.trainer.steps == 0  # nothing was applied or counted


def test_bad_arguments():
    module = _mlp()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(_data(), batch_size=4)
    ok = dict(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        ft.dp.make_private(lambda x: x, opt, loader, **ok)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        ft.dp.make_private(module, "sgd", loader, **ok)
    with pytest.raises(TypeError, match="data_loader must be a torch.utils.data.DataLoader"):
        ft.dp.make_private(module, opt, [1, 2], **ok)
    with pytest.raises(ValueError, match="loss_reduction must be 'mean' or 'sum'"):
        ft.dp.make_private(module, opt, loader, loss_reduction="none", **ok)
    with pytest.raises(ValueError, match="clipping must be 'auto' or 'ghost'"):
        ft.dp.make_private(module, opt, loader, clipping="vmap", **ok)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0 and finite"):
        ft.dp.make_private(module, opt, loader, max_grad_norm=float("inf"), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_epsilon needs epochs"):
        ft.dp.make_private(module, opt, loader, max_grad_norm=1.0, target_epsilon=3.0)


def test_reachable_from_the_package():
    assert {"make_private", "PrivateModule", "DPOptimizer"} <= set(ft.dp.__all__)
