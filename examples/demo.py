"""functorch_lite's main job: differentially private training (DP-SGD) on a real data set.

Trains a small CNN (conv + GroupNorm + linear) on scikit-learn's handwritten digits (8x8 images,
1797 examples, shipped inside scikit-learn: no download) with functorch_lite.dp: Poisson-sampled
batches, per-example gradients clipped to --max-grad-norm without materialising them where a
layer allows it, Gaussian noise, and the privacy spent (epsilon at delta=1e-5) from
dp-accounting's RDP and PLD accountants. Then the same model without privacy, for comparison.
Prints per-epoch loss, test accuracy and epsilon, the time per step of both runs, and writes a PNG
of test accuracy against epsilon.

    python examples/demo.py [--epochs 20] [--target-epsilon 2 | --noise-multiplier 3]
                            [--clipping auto|ghost|vmap] [--out build/dp_digits.png] ...

Before training, the clipped gradient sum is checked against a per-example loop of plain
torch.autograd on one batch.
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import functorch_lite.dp as dp

DELTA = 1e-5


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="DP-SGD on scikit-learn's digits with functorch_lite.dp, compared with "
        "non-private training."
    )
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    noise = p.add_mutually_exclusive_group()
    noise.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="epsilon at delta=1e-5 to reach after --epochs; the noise multiplier "
        "is calibrated for it (default 2.0)",
    )
    noise.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="noise std / max grad norm (instead of --target-epsilon)",
    )
    p.add_argument(
        "--accountant",
        choices=["rdp", "pld"],
        default="rdp",
        help="accountant used to calibrate --target-epsilon (both are printed)",
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="per-example gradient clipping norm C (default 1.0)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="expected (Poisson) batch size; sample rate = batch size / training examples (default 128)",
    )
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument(
        "--clipping",
        choices=["auto", "ghost", "vmap"],
        default="auto",
        help="how per-example gradients are clipped (default auto: per layer, ghost "
        "norms or per-example gradients, whichever is cheaper)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: this model is too small to gain from more)",
    )
    p.add_argument(
        "--out",
        default=os.path.join("build", "dp_digits.png"),
        help="PNG of test accuracy against epsilon (default build/dp_digits.png)",
    )
    args = p.parse_args(argv)
    if args.noise_multiplier is None and args.target_epsilon is None:
        args.target_epsilon = 2.0
    return args


def load_data(device, seed):
    """The digits, split 80/20 (fixed by seed), pixels standardised with the training set's
    statistics."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    train, test = perm[:n_train], perm[n_train:]
    mean, std = x[train].mean(0), x[train].std(0) + 0.1
    x = (x - mean) / std
    return [t.to(device) for t in (x[train], y[train], x[test], y[test])]


def make_model(seed):
    # GroupNorm, not BatchNorm: batch norm mixes the examples of a batch (not DP-compatible).
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def per_example_loss(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def check_clipping(model, x, y, max_norm, method):
    """The clipped sum equals a per-example loop of torch.autograd (Opacus' clip factor)."""
    fast = dp.clipped_grad_module(model, per_example_loss, x, y, max_norm=max_norm, method=method)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        grads = torch.autograd.grad(
            per_example_loss(model(x[i : i + 1]), y[i : i + 1]).sum(), list(params.values())
        )
        factor = (max_norm / (torch.sqrt(sum(g.square().sum() for g in grads)) + 1e-6)).clamp(max=1)
        for n, g in zip(params, grads):
            expected[n] += factor * g
    err = max(((fast[n] - expected[n]).norm() / expected[n].norm()).item() for n in params)
    assert err < 1e-4, f"clipped gradient sum differs from the per-example loop: {err:.2e}"
    print(
        f"clipped per-example gradients ({method}) of {len(x)} examples: equal to a loop of "
        f"torch.autograd (max relative error {err:.1e})"
    )


@torch.no_grad()
def evaluate(model, x_train, y_train, x_test, y_test):
    loss = F.cross_entropy(model(x_train), y_train).item()
    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    return loss, acc


def train_private(args, data, progress):
    x_train, y_train, x_test, y_test = data
    model = make_model(args.seed).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    q = args.batch_size / len(x_train)
    trainer = dp.PrivateTrainer(
        model,
        optimizer,
        per_example_loss,
        max_grad_norm=args.max_grad_norm,
        sample_rate=q,
        expected_batch_size=q * len(x_train),
        noise_multiplier=args.noise_multiplier,
        target_epsilon=args.target_epsilon,
        target_delta=DELTA,
        epochs=args.epochs,
        accountant=args.accountant,
        clipping=args.clipping,
        generator=torch.Generator().manual_seed(args.seed + 1),
    )
    how = (
        f"calibrated with {args.accountant.upper()} for epsilon {args.target_epsilon:g}"
        if args.target_epsilon is not None
        else "given"
    )
    print(
        f"\nprivate training: sample rate {q:.4f} (expected batch {args.batch_size}), "
        f"noise multiplier {trainer.noise_multiplier:.3f} ({how}), max grad norm "
        f"{args.max_grad_norm:g}, clipping={args.clipping}"
    )
    batches = torch.Generator().manual_seed(args.seed + 2)
    history, step_times = [], []
    for epoch in range(1, args.epochs + 1):
        for x, y in progress(
            dp.poisson_batches((x_train, y_train), q, generator=batches), f"private {epoch}/{args.epochs}"
        ):
            t0 = time.perf_counter()
            trainer.step(x, y)
            step_times.append(time.perf_counter() - t0)
        loss, acc = evaluate(model, *data)
        eps_rdp = trainer.get_epsilon(DELTA, accountant="rdp")
        eps_pld = trainer.get_epsilon(DELTA, accountant="pld")
        history.append((eps_rdp, eps_pld, acc))
        print(
            f"  epoch {epoch:3d}  train loss {loss:.3f}  test acc {100 * acc:5.1f}%  "
            f"epsilon {eps_rdp:.2f} (RDP) {eps_pld:.2f} (PLD) at delta {DELTA:g}"
        )
    return history, step_times, trainer


def train_non_private(args, data, progress):
    x_train, y_train, x_test, y_test = data
    model = make_model(args.seed).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(args.seed + 2)
    print(f"\nnon-private training: shuffled batches of {args.batch_size}, no clipping, no noise")
    history, step_times = [], []
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x_train), generator=shuffle).to(x_train.device)
        for idx in progress(perm.split(args.batch_size), f"non-private {epoch}/{args.epochs}"):
            t0 = time.perf_counter()
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
        loss, acc = evaluate(model, *data)
        history.append(acc)
        print(f"  epoch {epoch:3d}  train loss {loss:.3f}  test acc {100 * acc:5.1f}%")
    return history, step_times


def plot(path, private, non_private_acc, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps_rdp, eps_pld, acc = zip(*private)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(eps_rdp, [100 * a for a in acc], "o-", label="DP-SGD, epsilon from RDP")
    ax.plot(eps_pld, [100 * a for a in acc], "s--", alpha=0.7, label="DP-SGD, epsilon from PLD")
    ax.axhline(
        100 * non_private_acc,
        color="gray",
        linestyle=":",
        label=f"non-private ({100 * non_private_acc:.1f}%, epsilon = inf)",
    )
    ax.set_xlabel(f"epsilon (delta = {DELTA:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits, small CNN, {args.epochs} epochs, one point per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    def progress(iterable, desc):
        return tqdm(iterable, desc=desc, leave=False, unit="step", dynamic_ncols=True)

    start = time.perf_counter()
    data = load_data(args.device, args.seed)
    print(f"digits: {len(data[0])} training, {len(data[2])} test examples, device {args.device}")
    check_clipping(
        make_model(args.seed).to(args.device), data[0][:32], data[1][:32], args.max_grad_norm, args.clipping
    )

    private, private_times, trainer = train_private(args, data, progress)
    public, public_times = train_non_private(args, data, progress)
    plot(args.out, private, public[-1], args)

    eps_rdp, eps_pld, acc = private[-1]
    t_priv, t_pub = (1e3 * statistics.median(t) for t in (private_times, public_times))
    print(
        f"\nprivate:     test accuracy {100 * acc:.1f}% at epsilon {eps_rdp:.2f} (RDP) / "
        f"{eps_pld:.2f} (PLD), delta {DELTA:g}, after {trainer.steps} steps"
    )
    print(f"non-private: test accuracy {100 * public[-1]:.1f}%")
    print(
        f"time per step (median): private {t_priv:.2f} ms, non-private {t_pub:.2f} ms ({t_priv / t_pub:.1f}x)"
    )
    print(f"plot of test accuracy against epsilon: {args.out}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    return dict(private=private, non_private=public, step_ms=(t_priv, t_pub))


if __name__ == "__main__":
    main()
