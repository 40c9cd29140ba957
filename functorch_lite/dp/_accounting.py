"""Privacy accounting for DP-SGD, on Google's dp-accounting library (RDP and PLD).

The epsilon of a run of DP-SGD with Poisson sampling is the composition of `steps` subsampled
Gaussian mechanisms: SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps).
We build that event and let dp-accounting compute epsilon: no hand-written formulas here.
dp-accounting is an optional dependency (`pip install functorch_lite[dp]`), imported on first use
so that `import functorch_lite.dp` works without it.
"""

import contextlib
import logging
import math

ACCOUNTANTS = ("rdp", "pld")


def _dp_accounting():
    try:
        import dp_accounting
        from dp_accounting import pld, rdp  # noqa: F401  (submodules are not imported eagerly)
    except ImportError as e:
        raise ImportError(
            "functorch_lite.dp privacy accounting needs the dp-accounting package: "
            "`pip install functorch_lite[dp]` (or `pip install dp-accounting`)"
        ) from e
    return dp_accounting


def _check_accountant(accountant):
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


def _check_sample_rate(sample_rate):
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")


def _check_delta(delta):
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _epsilon(history, delta, accountant):
    """epsilon after the steps in `history` ((noise_multiplier, sample_rate, steps) entries)."""
    dpa = _dp_accounting()
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    events = [
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history
        if steps > 0
    ]
    if not events:
        return 0.0
    acc.compose(dpa.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def compute_epsilon(noise_multiplier, sample_rate, steps, delta, accountant="rdp"):
    """epsilon at ``delta`` after ``steps`` DP-SGD steps with Poisson sampling rate ``sample_rate``
    and Gaussian noise of std ``noise_multiplier * max_grad_norm``.

    Needs the optional ``dp-accounting`` package (``pip install functorch_lite[dp]``).

    Args:
        noise_multiplier: sigma (0 gives ``inf``: no privacy).
        sample_rate: q, the probability of each example being in a batch.
        steps: the number of steps taken.
        delta: the target delta.
        accountant: ``"rdp"`` (Renyi DP, Opacus' default; looser, fast) or ``"pld"`` (privacy
            loss distributions: tighter, slower).

    Example:
        >>> from functorch_lite import dp
        >>> eps = dp.compute_epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5)
        >>> round(eps, 1)
        1.7
    """
    _check_accountant(accountant)
    _check_sample_rate(sample_rate)
    _check_delta(delta)
    if noise_multiplier <= 0:
        return math.inf
    return _epsilon([(noise_multiplier, sample_rate, int(steps))], delta, accountant)


class PrivacyAccountant:
    """Records the DP-SGD steps taken and answers epsilon for a delta (Opacus' accountant API:
    ``step(noise_multiplier=, sample_rate=)``, ``get_epsilon(delta)``, ``history``, ``len()``).

    Args:
        accountant: ``"rdp"`` (Renyi DP, Opacus' default; looser, fast) or ``"pld"`` (privacy
            loss distributions: tighter, about 10x slower). :class:`RDPAccountant` and
            :class:`PLDAccountant` fix it.

    Example:
        >>> from functorch_lite import dp
        >>> acc = dp.PrivacyAccountant("rdp")
        >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=1000)
        >>> len(acc), round(acc.get_epsilon(1e-5), 1)
        (1000, 1.7)
    """

    def __init__(self, accountant="rdp"):
        _check_accountant(accountant)
        self.mechanism = accountant
        # [noise_multiplier, sample_rate, steps]; consecutive equal steps are merged.
        self.history = []

    def step(self, *, noise_multiplier, sample_rate, num_steps=1):
        """Records ``num_steps`` steps with noise multiplier sigma and Poisson sampling rate q."""
        _check_sample_rate(sample_rate)
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += num_steps
        else:
            self.history.append([noise_multiplier, sample_rate, num_steps])

    def __len__(self):
        return sum(steps for _, _, steps in self.history)

    def get_epsilon(self, delta):
        """epsilon at ``delta`` over the steps recorded (``inf`` if a step had no noise)."""
        _check_delta(delta)
        if any(sigma == 0 for sigma, _, steps in self.history if steps > 0):
            return math.inf  # a step without noise has no privacy guarantee
        return _epsilon(self.history, delta, self.mechanism)


class RDPAccountant(PrivacyAccountant):
    """A :class:`PrivacyAccountant` by Renyi DP (Opacus' default).

    Example:
        >>> from functorch_lite import dp
        >>> acc = dp.RDPAccountant()
        >>> acc.step(noise_multiplier=1.1, sample_rate=0.01)
        >>> acc.history
        [[1.1, 0.01, 1]]
    """

    def __init__(self):
        super().__init__("rdp")


class PLDAccountant(PrivacyAccountant):
    """A :class:`PrivacyAccountant` by privacy loss distributions (tighter than RDP).

    Example:
        >>> from functorch_lite import dp
        >>> pld, rdp = dp.PLDAccountant(), dp.RDPAccountant()
        >>> for acc in (pld, rdp):
        ...     acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=10)
        >>> pld.get_epsilon(1e-5) < rdp.get_epsilon(1e-5)
        True
    """

    def __init__(self):
        super().__init__("pld")


def get_noise_multiplier(
    target_epsilon,
    target_delta,
    sample_rate,
    epochs=None,
    steps=None,
    accountant="rdp",
    epsilon_tolerance=0.01,
):
    """The smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon at ``target_delta``
    after ``steps`` (or ``epochs * round(1 / sample_rate)``) steps is at most ``target_epsilon``
    (Opacus' ``get_noise_multiplier``, by bisection on the accountant).

    Args:
        target_epsilon: the epsilon to reach.
        target_delta: the delta at which epsilon is measured.
        sample_rate: q, the Poisson sampling rate.
        epochs: the number of epochs (``round(1 / q)`` steps each), or give ``steps``.
        steps: the number of steps.
        accountant: ``"rdp"`` or ``"pld"``.
        epsilon_tolerance: how far below ``target_epsilon`` the result may be.

    Example:
        >>> from functorch_lite import dp
        >>> sigma = dp.get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, epochs=5)
        >>> eps = dp.compute_epsilon(sigma, sample_rate=0.01, steps=500, delta=1e-5)
        >>> 2.0 - 0.01 <= eps <= 2.0
        True
    """
    _check_accountant(accountant)
    _check_sample_rate(sample_rate)
    _check_delta(target_delta)
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    steps = steps_for(sample_rate, epochs=epochs, steps=steps)

    def eps(sigma):
        with _quiet_absl():
            return _epsilon([(sigma, sample_rate, steps)], target_delta, accountant)

    hi_limit = 1e4
    lo, hi = 0.0, 10.0
    if accountant == "pld":
        # PLD is tighter than RDP, so RDP's sigma (found fast) bounds PLD's from above, and PLD's
        # is rarely below half of it: a short bracket for the slow PLD evaluations.
        hi = get_noise_multiplier(
            target_epsilon,
            target_delta,
            sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=epsilon_tolerance,
        )
        lo = hi / 2 if eps(hi / 2) > target_epsilon else 0.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > hi_limit:
            raise ValueError(
                f"target_epsilon={target_epsilon} cannot be reached at target_delta="
                f"{target_delta} with sample_rate={sample_rate} over {steps} steps (even "
                f"noise_multiplier={hi_limit:g} gives epsilon {eps(hi_limit):.3g}): raise "
                "target_epsilon, or lower sample_rate or the number of steps"
            )
    while True:
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - e <= epsilon_tolerance:
                return hi
        if hi - lo < 1e-6:
            return hi


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting logs a warning when an RDP order does not converge, which the extreme
    sigmas the bisection probes provoke; that order is then just left out of the minimum."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def steps_for(sample_rate, *, epochs=None, steps=None):
    """Number of steps: `steps`, or `epochs` times round(1 / sample_rate) batches per epoch."""
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    if steps is None:
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs!r}")
        steps = int(epochs * batches_per_epoch(sample_rate))
    if int(steps) != steps or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def batches_per_epoch(sample_rate):
    """round(1 / sample_rate): with Poisson sampling an epoch is that many batches, each example
    being seen once per epoch on average."""
    _check_sample_rate(sample_rate)
    return max(1, round(1 / sample_rate))
