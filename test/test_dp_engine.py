"""functorch_lite.dp.PrivateTrainer and the Poisson sampler, against a per-example loop of
torch.autograd: the step with noise off, the noise's std, the division by the expected batch size,
empty batches, virtual steps, any optimizer, accounting and bad arguments."""

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import functorch_lite.dp as dp

needs_dpa = pytest.mark.skipif(
    importlib.util.find_spec("dp_accounting") is None, reason="dp-accounting is not installed"
)
METHODS = ["auto", "ghost", "vmap"]


def per_example_loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def make_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def make_batch(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * 3, torch.randint(0, 4, (n,), generator=g)


def loop_clipped_sum(model, x, y, max_norm):
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i by a Python loop of torch.autograd, one example at a
    time (the oracle)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(per_example_loss(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, max_norm / (norm.item() + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return total


def trainer_for(model, optimizer=None, **kwargs):
    args = dict(
        max_grad_norm=0.5,
        sample_rate=0.1,
        expected_batch_size=12.5,
        noise_multiplier=0.0,
        allow_zero_noise=True,
        clipping="vmap",
    )
    args.update(kwargs)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1.0)
    return dp.PrivateTrainer(model, optimizer, per_example_loss, **args)


# ------------------------------------------------------------------------------------------------
# the step


@pytest.mark.parametrize("method", METHODS)
def test_step_equals_loop_with_noise_off(method):
    model = make_model()
    ref = copy.deepcopy(model)
    x, y = make_batch(10)
    trainer = trainer_for(model, clipping=method)
    trainer.step(x, y)
    expected = loop_clipped_sum(ref, x, y, 0.5)
    for p, p0, s in zip(model.parameters(), ref.parameters(), expected):
        # divided by the expected batch size 12.5, not the realised 10
        torch.testing.assert_close(p.grad, s / 12.5, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach(), p0.detach() - s / 12.5, rtol=1e-5, atol=1e-6)


def test_divides_by_expected_not_realised_batch_size():
    x, y = make_batch(7)
    grads = {}
    for ebs in (7.0, 20.0):
        model = make_model()
        trainer_for(model, expected_batch_size=ebs).step(x, y)
        grads[ebs] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[7.0], grads[20.0]):
        torch.testing.assert_close(a * 7.0, b * 20.0, rtol=1e-5, atol=1e-7)


def zero_gradient_loss(out, y):
    return (out * 0).sum(1)


@pytest.mark.parametrize("batch", [16, 0])
def test_noise_std_is_noise_multiplier_times_max_grad_norm(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 200), nn.Linear(200, 20))  # ~5600 noise draws per step
    sigma, clip, ebs = 1.3, 0.7, 12.5
    trainer = dp.PrivateTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        zero_gradient_loss,
        max_grad_norm=clip,
        sample_rate=0.1,
        expected_batch_size=ebs,
        noise_multiplier=sigma,
        generator=torch.Generator().manual_seed(3),
        clipping="vmap",
    )
    draws = []
    for _ in range(4):
        trainer.step(*make_batch(batch))  # batch 0: an empty batch, the update is noise only
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]) * ebs)
    noise = torch.cat(draws)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.03)
    assert abs(noise.mean().item()) < 0.05 * sigma * clip
    # the draws are fresh every step
    assert not torch.allclose(draws[0], draws[1])


def test_noise_is_reproducible_with_generator():
    x, y = make_batch(8)
    out = []
    for _ in range(2):
        model = make_model()
        trainer_for(
            model, noise_multiplier=1.0, allow_zero_noise=False, generator=torch.Generator().manual_seed(5)
        ).step(x, y)
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch_with_noise_off_changes_nothing():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = trainer_for(model)
    trainer.step(torch.empty(0, 6), torch.empty(0, dtype=torch.long))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, torch.zeros_like(p))
        assert torch.equal(p.detach(), b)
    assert trainer.steps == 1  # an empty batch is still a step for the accountant


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_virtual_steps_equal_one_big_batch(method):
    x, y = make_batch(11)
    results = []
    for mode in ("one", "physical", "accumulate"):
        model = make_model()
        trainer = trainer_for(
            model, clipping=method, max_physical_batch_size=3 if mode == "physical" else None
        )
        if mode == "accumulate":
            trainer.accumulate(x[:4], y[:4])
            trainer.accumulate(x[4:4], y[4:4])  # an empty physical batch
            trainer.step(x[4:], y[4:])
        else:
            trainer.step(x, y)
        results.append([p.detach().clone() for p in model.parameters()])
        assert trainer.steps == 1
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulate_then_step_without_arguments():
    x, y = make_batch(6)
    a, b = make_model(), make_model()
    trainer_for(a).step(x, y)
    t = trainer_for(b)
    t.accumulate(x, y)
    t.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    ],
    ids=["SGD-momentum", "Adam", "AdamW"],
)
def test_any_optimizer_gets_the_private_gradient(make_opt):
    model = make_model()
    ref = copy.deepcopy(model)
    trainer = trainer_for(model, optimizer=make_opt(model.parameters()))
    ref_opt = make_opt(ref.parameters())
    for seed in range(3):
        x, y = make_batch(9, seed=seed)
        expected = loop_clipped_sum(ref, x, y, 0.5)
        trainer.step(x, y)
        for p, s in zip(ref.parameters(), expected):
            p.grad = s / 12.5
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_left_alone():
    model = make_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainer_for(model, noise_multiplier=1.0, allow_zero_noise=False).step(*make_batch(5))
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    assert model[2].weight.grad is not None


def test_tuple_inputs_with_physical_batches():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(3, 4)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    x, y = make_batch(7)
    v = torch.randn(7, 3)
    out = []
    for physical in (None, 2):
        torch.manual_seed(4)
        model = TwoInputs()
        trainer_for(model, max_physical_batch_size=physical).step((x, v), y)
        out.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# accounting


@needs_dpa
def test_trainer_records_steps_for_the_accountant():
    model = make_model()
    trainer = trainer_for(
        model, noise_multiplier=1.0, allow_zero_noise=False, sample_rate=0.05, expected_batch_size=5.0
    )
    for _ in range(5):
        trainer.step(*make_batch(4))
    assert trainer.steps == 5
    assert trainer.get_epsilon(1e-5) == pytest.approx(dp.compute_epsilon(1.0, 0.05, 5, 1e-5))
    assert trainer.get_epsilon(1e-5, accountant="pld") == pytest.approx(
        dp.compute_epsilon(1.0, 0.05, 5, 1e-5, accountant="pld")
    )


@needs_dpa
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_target_epsilon_sets_the_noise_multiplier(accountant):
    trainer = trainer_for(
        make_model(),
        noise_multiplier=None,
        allow_zero_noise=False,
        target_epsilon=3.0,
        epochs=2,
        sample_rate=0.2,
        accountant=accountant,
    )
    steps = 2 * 5  # epochs * round(1 / sample_rate)
    eps = dp.compute_epsilon(trainer.noise_multiplier, 0.2, steps, 1e-5, accountant=accountant)
    assert 3.0 - 0.01 <= eps <= 3.0


@needs_dpa
def test_zero_noise_gives_infinite_epsilon():
    trainer = trainer_for(make_model())
    trainer.step(*make_batch(3))
    assert trainer.get_epsilon(1e-5) == float("inf")


# ------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be > 0"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm must be > 0 and finite"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be > 0 and finite"),
        (dict(allow_zero_noise=False), "noise_multiplier must be > 0.*allow_zero_noise=True"),
        (dict(noise_multiplier=-0.5), "noise_multiplier must be > 0"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
        (dict(sample_rate=1.01), r"sample_rate must be in \(0, 1\]"),
        (dict(expected_batch_size=0), "expected_batch_size must be > 0"),
        (dict(clipping="per_layer"), "clipping must be 'auto', 'ghost' or 'vmap'"),
        (dict(max_physical_batch_size=0), "max_physical_batch_size must be a positive int"),
        (dict(target_epsilon=2.0, epochs=1), "exactly one of noise_multiplier and target_epsilon"),
        (dict(noise_multiplier=None), "exactly one of noise_multiplier and target_epsilon"),
        (dict(accountant="prv"), "accountant must be 'rdp' or 'pld'"),
        (dict(distributed=True), "distributed=True needs an initialised torch.distributed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer_for(make_model(), **kwargs)


@needs_dpa
def test_unreachable_target_epsilon():
    with pytest.raises(ValueError, match="target_epsilon=1e-06 cannot be reached"):
        trainer_for(
            make_model(),
            noise_multiplier=None,
            target_epsilon=1e-6,
            target_delta=1e-10,
            sample_rate=1.0,
            steps=100000,
        )


def test_step_with_targets_but_no_inputs():
    with pytest.raises(ValueError, match="targets given without inputs"):
        trainer_for(make_model()).step(None, torch.zeros(3, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# Poisson sampling


def test_poisson_batches_of_tensors():
    x, y = torch.randn(500, 3, 2), torch.arange(500)
    q = 0.04
    batches = list(dp.poisson_batches((x, y), q, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 25  # round(1 / q) batches per epoch
    sizes = torch.tensor([len(b[1]) for b in batches], dtype=torch.float)
    assert len(set(sizes.tolist())) > 1  # variable batch sizes
    assert sizes.mean().item() == pytest.approx(q * 500, rel=0.2)
    for bx, by in batches:
        assert torch.equal(bx, x[by])  # the rows of one example stay together
        assert len(set(by.tolist())) == len(by)  # without replacement inside a batch


def test_poisson_inclusion_rate():
    n, q = 200, 0.1
    counts = torch.zeros(n)
    for idx in dp.PoissonSampler(n, q, num_batches=400, generator=torch.Generator().manual_seed(1)):
        counts[idx] += 1
    assert counts.mean().item() / 400 == pytest.approx(q, rel=0.03)
    assert counts.min() > 0


def test_empty_batches_have_the_right_trailing_shape():
    x, y = torch.randn(3, 4, 5, dtype=torch.float64), torch.arange(3)
    batches = list(
        dp.poisson_batches((x, y), 0.01, num_batches=50, generator=torch.Generator().manual_seed(0))
    )
    empty = [b for b in batches if len(b[0]) == 0]
    assert empty
    bx, by = empty[0]
    assert bx.shape == (0, 4, 5) and bx.dtype == torch.float64 and by.shape == (0,)
    single = next(
        b
        for b in dp.poisson_batches(x, 0.01, num_batches=50, generator=torch.Generator().manual_seed(0))
        if len(b) == 0
    )
    assert single.shape == (0, 4, 5)


def test_poisson_batches_of_a_dataset():
    x, y = torch.randn(40, 2), torch.arange(40)
    ds = torch.utils.data.TensorDataset(x, y)
    from_ds = list(dp.poisson_batches(ds, 0.1, generator=torch.Generator().manual_seed(7)))
    from_t = list(dp.poisson_batches((x, y), 0.1, generator=torch.Generator().manual_seed(7)))
    assert len(from_ds) == len(from_t) == 10
    for (a, b), (c, d) in zip(from_ds, from_t):
        assert torch.equal(a, c) and torch.equal(b, d)
    empty = next(dp.poisson_batches(ds, 1e-9, num_batches=1))
    assert empty[0].shape == (0, 2) and empty[1].shape == (0,)


def test_poisson_sampler_as_a_dataloader_batch_sampler():
    ds = torch.utils.data.TensorDataset(torch.randn(30, 2))
    sampler = dp.PoissonSampler(len(ds), 0.2, generator=torch.Generator().manual_seed(0))
    assert len(sampler) == 5
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    assert sum(len(b[0]) for b in loader) > 0


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((10, 0.0), ValueError, "sample_rate"),
        ((10, 2.0), ValueError, "sample_rate"),
        ((0, 0.5), ValueError, "num_examples"),
    ],
)
def test_poisson_sampler_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        dp.PoissonSampler(*args)


def test_poisson_batches_bad_data():
    with pytest.raises(ValueError, match="same first dimension"):
        next(dp.poisson_batches((torch.zeros(3), torch.zeros(4)), 0.5))
