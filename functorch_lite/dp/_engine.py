"""PrivateTrainer: one DP-SGD step = clip, sum, noise once, divide by the expected batch size,
optimizer step; with accounting, gradient accumulation (virtual steps) and torch.distributed.

The clipped sum comes from clipped_grad_module (ghost norms or per-example gradients, chosen per
layer). Nothing here hooks the optimizer or the model: the trainer writes `.grad` and calls
`optimizer.step()`, so any torch.optim optimizer works unchanged.
"""

import math

import torch

from .._compile import eager
from . import _ddp
from ._accounting import PrivacyAccountant, _check_accountant, _check_sample_rate, get_noise_multiplier


class PrivateTrainer:
    """DP-SGD training of ``model`` with ``optimizer`` (parameter names follow Opacus).

    Each :meth:`step` clips every example's gradient to norm C, sums them, adds Gaussian noise
    of std sigma * C once, divides by the expected batch size, and steps the optimizer; the
    accountant records the step.

    Args:
        model: the ``nn.Module`` to train (or a ``DistributedDataParallel`` of it).
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        loss_fn: ``loss_fn(outputs, targets)`` returns the per-example losses, shape ``(B,)``
            (e.g. ``F.cross_entropy(..., reduction="none")``).
        max_grad_norm: C, every example's gradient (over all trainable parameters) is clipped to
            norm C.
        sample_rate: q, the Poisson sampling rate of the batches (see :func:`poisson_batches`);
            used by the accountant.
        expected_batch_size: q times the number of training examples (over all ranks when
            distributed). The noisy sum is divided by it, not by the realised batch size, which
            would leak the batch size.
        noise_multiplier: sigma, the noise added to the clipped sum has std sigma * C. Or give
            ``target_epsilon`` (with ``target_delta`` and ``epochs`` or ``steps``) and sigma is
            the smallest that reaches it (:func:`get_noise_multiplier`). sigma = 0 needs
            ``allow_zero_noise=True`` (debugging: no privacy).
        target_epsilon: see ``noise_multiplier``.
        target_delta: see ``noise_multiplier``.
        epochs: see ``noise_multiplier``.
        steps: see ``noise_multiplier``.
        accountant: ``"rdp"`` or ``"pld"`` (see :class:`PrivacyAccountant`), for
            ``target_epsilon`` and :meth:`get_epsilon`.
        clipping: :func:`clipped_grad_module`'s method, ``"auto"``, ``"ghost"`` or ``"vmap"``.
        max_physical_batch_size: split batches larger than this into chunks whose clipped sums
            are accumulated (bounds memory; the noise is still added once per step).
        allow_zero_noise: allow ``noise_multiplier=0`` (no privacy).
        generator: ``torch.Generator`` for the noise (default: torch's global generator).
        distributed: None (default) means True when torch.distributed is initialised with more
            than one process. Then every rank clips its own examples, the clipped sums are
            all-reduced and the noise is added once (on rank 0).

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, functorch_lite as ft
        >>> train_x, train_y = torch.randn(200, 4), torch.randint(0, 2, (200,))
        >>> model = nn.Linear(4, 2)
        >>> q = 0.1  # each example is in a batch with probability q: 20 expected
        >>> trainer = ft.dp.PrivateTrainer(
        ...     model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...     lambda out, y: F.cross_entropy(out, y, reduction="none"),
        ...     max_grad_norm=1.0, sample_rate=q, expected_batch_size=q * 200, noise_multiplier=1.1)
        >>> for x, y in ft.dp.poisson_batches((train_x, train_y), q):  # one epoch
        ...     trainer.step(x, y)
        >>> trainer.steps
        10
        >>> 0 < trainer.get_epsilon(1e-5) < trainer.get_epsilon(1e-6)
        True
    """

    def __init__(
        self,
        model,
        optimizer,
        loss_fn,
        *,
        max_grad_norm,
        sample_rate,
        expected_batch_size,
        noise_multiplier=None,
        target_epsilon=None,
        target_delta=1e-5,
        epochs=None,
        steps=None,
        accountant="rdp",
        clipping="auto",
        max_physical_batch_size=None,
        allow_zero_noise=False,
        generator=None,
        distributed=None,
    ):
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
            raise TypeError(f"max_grad_norm must be a positive finite number, got {max_grad_norm!r}")
        if not 0 < max_grad_norm < math.inf:  # also nan; an infinite bound clips nothing
            raise ValueError(
                f"max_grad_norm must be > 0 and finite (the clipping bound C), got {max_grad_norm!r}"
            )
        _check_sample_rate(sample_rate)
        _check_accountant(accountant)
        if not (isinstance(expected_batch_size, (int, float)) and expected_batch_size > 0):
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size!r}")
        if clipping not in ("auto", "ghost", "vmap"):
            raise ValueError(f"clipping must be 'auto', 'ghost' or 'vmap', got {clipping!r}")
        if max_physical_batch_size is not None and not (
            isinstance(max_physical_batch_size, int) and max_physical_batch_size > 0
        ):
            raise ValueError(
                f"max_physical_batch_size must be a positive int or None, got {max_physical_batch_size!r}"
            )
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if target_epsilon is not None:
            noise_multiplier = get_noise_multiplier(
                target_epsilon, target_delta, sample_rate, epochs=epochs, steps=steps, accountant=accountant
            )
        if (
            not isinstance(noise_multiplier, (int, float))
            or noise_multiplier < 0
            or (noise_multiplier == 0 and not allow_zero_noise)
        ):
            raise ValueError(
                f"noise_multiplier must be > 0, got {noise_multiplier!r} (0 is allowed only with "
                "allow_zero_noise=True, for debugging: it gives no privacy)"
            )
        self.model = model
        self.module = _ddp.unwrap(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = sample_rate
        self.expected_batch_size = float(expected_batch_size)
        self.clipping = clipping
        self.max_physical_batch_size = max_physical_batch_size
        self.generator = generator
        self.distributed = _ddp.is_distributed() if distributed is None else bool(distributed)
        if self.distributed and not _ddp.is_distributed(min_world_size=1):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        self.accountant = PrivacyAccountant(accountant)
        self._sums = None

    def _params(self):
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @eager
    def accumulate(self, inputs, targets):
        """Adds the clipped per-example gradients of this physical batch to the pending sum (a
        virtual step); :meth:`step` then adds the noise and steps the optimizer.
        """
        from ._clip import clipped_grad_module

        if self._sums is None:
            self._sums = {}
        n = len(inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
        if n == 0:
            return
        size = self.max_physical_batch_size or n
        known = dict(self._params())
        for start in range(0, n, size):
            sums = clipped_grad_module(
                self.module,
                self.loss_fn,
                _rows(inputs, start, size),
                _rows(targets, start, size),
                max_norm=self.max_grad_norm,
                method=self.clipping,
            )
            for name, g in sums.items():
                if name not in known:
                    raise RuntimeError(f"clipped_grad_module returned an unknown parameter {name!r}")
                prev = self._sums.get(name)
                self._sums[name] = g.detach() if prev is None else prev + g.detach()

    @eager
    def step(self, inputs=None, targets=None):
        """One DP-SGD step on the batch ``(inputs, targets)``, after any batches given to
        :meth:`accumulate`. An empty batch is legal: the update is then noise only.
        """
        if inputs is not None:
            self.accumulate(inputs, targets)
        elif targets is not None:
            raise ValueError("step: targets given without inputs")
        sums = self._sums or {}
        self._sums = None
        params = self._params()
        total = [sums[n] if n in sums else torch.zeros_like(p) for n, p in params]
        std = self.noise_multiplier * self.max_grad_norm
        if not self.distributed or _ddp.adds_noise():
            total = [s + _noise(s, std, self.generator) for s in total]
        if self.distributed:
            total = _ddp.all_reduce_sum(total)
        for (_, p), s in zip(params, total):
            p.grad = (s / self.expected_batch_size).to(p.dtype)
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def get_epsilon(self, delta, accountant=None):
        """epsilon at ``delta`` after the steps taken, by this trainer's accountant or by
        ``accountant`` (``"rdp"`` or ``"pld"``) over the same history.
        """
        if accountant is None or accountant == self.accountant.mechanism:
            return self.accountant.get_epsilon(delta)
        other = PrivacyAccountant(accountant)
        other.history = [list(h) for h in self.accountant.history]
        return other.get_epsilon(delta)

    @property
    def steps(self):
        """The number of DP-SGD steps taken (what the accountant counts)."""
        return len(self.accountant)


def _noise(like, std, generator):
    """N(0, std^2) noise shaped like `like` (drawn on the generator's device)."""
    if std == 0:
        return torch.zeros_like(like)
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return noise.mul_(std).to(like.device)


def _rows(batch, start, size):
    """Examples start:start+size of a tensor or a tuple/list of tensors (a physical batch)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[start : start + size] for t in batch)
    return batch[start : start + size]
