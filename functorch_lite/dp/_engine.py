"""PrivateTrainer: one DP-SGD step = clip, sum, noise once, divide by the expected batch size,
optimizer step; with accounting, gradient accumulation (virtual steps) and torch.distributed.

The clipped sum comes from clipped_grad_module (ghost norms or per-example gradients, chosen per
layer). Nothing here hooks the optimizer or the model: the trainer writes `.grad` and calls
`optimizer.step()`, so any torch.optim optimizer works unchanged.
"""

import math

import torch

from .._compile import eager
from . import _ddp, _noise
from ._accounting import PrivacyAccountant, _check_accountant, _check_sample_rate, get_noise_multiplier
from ._clip import clipped_grad_module


class PrivateTrainer:
    """DP-SGD training of ``model`` with ``optimizer`` (parameter names follow Opacus).

    Each :meth:`step` clips every example's gradient to norm C, sums them, adds Gaussian noise
    of std sigma * C once, divides by the expected batch size, and steps the optimizer; the
    accountant records the step (before the update is applied, so the ledger never
    under-counts). :meth:`state_dict` and :meth:`load_state_dict` checkpoint and resume a run
    (with the model's and the optimizer's own state dicts).

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
        generator: ``torch.Generator`` for the noise (default: torch's global generator). The
            noise is a function of its state: same seed, same noise.
        noise_generator: ``"philox"`` (default): Philox4x32-10 with a vectorised Box-Muller in
            C++, fused with the step's last pass over each gradient (one key per step drawn from
            ``generator``); ``"torch"``: ``torch.randn`` on ``generator``.
        secure_mode: noise from a ChaCha20 stream keyed by the operating system, in double
            precision and snapped to a grid, against floating-point attacks on the noise (see
            docs/dp.md, "secure mode": what it protects and what it does not). It cannot be
            seeded (``generator`` must be None) nor reproduced; for Poisson sampling from the
            same stream use ``poisson_batches(..., secure_mode=True)``.
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
        noise_generator="philox",
        secure_mode=False,
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
        _noise.check_noise_generator(noise_generator)
        _noise.check_secure(secure_mode, generator, "PrivateTrainer")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
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
        self.noise_generator = "secure" if secure_mode else noise_generator
        self.secure_mode = secure_mode
        rank = _ddp.rank() if self.distributed else 0
        self._noise = _noise.make_noise(noise_generator, generator, secure_mode, rank)
        self._sums = None

    def _params(self):
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @eager
    def accumulate(self, inputs, targets):
        """Adds the clipped per-example gradients of this physical batch to the pending sum (a
        virtual step); :meth:`step` then adds the noise and steps the optimizer.
        """
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
        std = self.noise_multiplier * self.max_grad_norm
        # NOTE [the ledger never under-counts]: the accountant records the step before any noisy
        # gradient is written to `.grad` and before `optimizer.step()` applies it, never after.
        # If anything from here on fails (an optimizer error, a KeyboardInterrupt), the step is
        # in the history whether or not the update was applied: the ledger can over-count by one
        # step, never under-count. A checkpoint (state_dict(), between steps, in the same
        # torch.save as the model and the optimizer) therefore holds parameters and a history
        # that agree: the two are atomic from the checkpoint's point of view. A process killed
        # after the update but before its checkpoint resumes from the previous checkpoint, whose
        # parameters did not see that update, and redoes the step with the same noise (the noise
        # generator's state is in the checkpoint).
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        # One pass per parameter (NOTE [One pass over the gradient] in csrc/dp/noise.cpp): the
        # noise is made blockwise and written with the clipped sum and the division by the
        # expected batch size straight into the `.grad` buffer (reused when it fits).
        outs = [_grad_buffer(p) for _, p in params]
        totals = [sums.get(n) for n, _ in params]
        scale = 1.0 / self.expected_batch_size
        if not self.distributed:
            self._noise.apply(list(zip(outs, totals)), std, scale)
        else:
            if _ddp.adds_noise():
                self._noise.apply(list(zip(outs, totals)), std, 1.0)
            else:
                for out, total in zip(outs, totals):
                    out.copy_(total) if total is not None else out.zero_()
            outs = [t.mul_(scale) for t in _ddp.all_reduce_sum(outs)]
        for (_, p), out in zip(params, outs):
            p.grad = out
        self.optimizer.step()

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

    def state_dict(self):
        """The trainer's state for a checkpoint: a plain dict of Python scalars, strings, lists
        and tensors (``torch.load(..., weights_only=True)`` reads it back).

        It holds a format ``version``; the ``steps`` taken and the accountant's ``history``
        (``[noise_multiplier, sample_rate, steps]`` entries), so that :meth:`get_epsilon` after
        :meth:`load_state_dict` equals epsilon before; the configuration the ledger depends on
        (``noise_multiplier``, ``max_grad_norm``, ``sample_rate``, ``expected_batch_size``,
        ``clipping``, ``accountant``, ``noise_generator``), which :meth:`load_state_dict` checks; and the state of the
        noise generator (``generator``: a uint8 tensor, ``None`` when the trainer draws from
        torch's global generator, whose state is yours to save with ``torch.get_rng_state()``).

        The model's and the optimizer's states are not in it: save ``model.state_dict()``,
        ``optimizer.state_dict()`` and ``trainer.state_dict()`` in one ``torch.save``, between
        steps, and the checkpoint's parameters and privacy ledger agree (the accountant records a
        step before its update is applied). The Poisson sampler's generator, if you seed one, is
        yours to save too (``generator.get_state()``).

        Raises:
            RuntimeError: in the middle of a virtual step (after :meth:`accumulate`, before
                :meth:`step`): the pending clipped sums are not noised yet, so they never go into
                a checkpoint; call :meth:`step` first.

        Example:
            >>> import io, torch, torch.nn as nn, torch.nn.functional as F, functorch_lite as ft
            >>> def make():
            ...     torch.manual_seed(0)
            ...     model = nn.Linear(4, 2)
            ...     optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            ...     trainer = ft.dp.PrivateTrainer(
            ...         model, optimizer, lambda out, y: F.cross_entropy(out, y, reduction="none"),
            ...         max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=2.0,
            ...         noise_multiplier=1.1, generator=torch.Generator().manual_seed(1))
            ...     return model, optimizer, trainer
            >>> model, optimizer, trainer = make()
            >>> x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
            >>> trainer.step(x, y)
            >>> buf = io.BytesIO()
            >>> torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            ...             "trainer": trainer.state_dict()}, buf)
            >>> trainer.step(x, y)  # the run goes on ...
            >>> _ = buf.seek(0)
            >>> ckpt = torch.load(buf, weights_only=True)
            >>> model2, optimizer2, trainer2 = make()  # ... and a new process resumes it
            >>> model2.load_state_dict(ckpt["model"])
            <All keys matched successfully>
            >>> optimizer2.load_state_dict(ckpt["optimizer"])
            >>> trainer2.load_state_dict(ckpt["trainer"])
            >>> trainer2.steps
            1
            >>> trainer2.step(x, y)  # the same noise as the uninterrupted run's second step
            >>> torch.equal(model2.weight, model.weight), trainer2.steps
            (True, 2)
        """
        if self._sums is not None:
            raise RuntimeError(
                "PrivateTrainer.state_dict() in the middle of a virtual step (accumulate() was "
                "called, step() was not): the pending clipped sums are not noised, so they never "
                "go into a checkpoint; call step() first, then state_dict()"
            )
        gen = self.generator
        return {
            "version": _STATE_VERSION,
            "steps": self.steps,
            "history": [[float(sigma), float(q), int(n)] for sigma, q, n in self.accountant.history],
            "accountant": self.accountant.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": float(self.sample_rate),
            "expected_batch_size": self.expected_batch_size,
            "clipping": self.clipping,
            "noise_generator": self.noise_generator,
            "generator": None if gen is None else gen.get_state(),
            "generator_device": None if gen is None else gen.device.type,
        }

    def load_state_dict(self, state_dict):
        """Restores a :meth:`state_dict`: the steps, the accountant's history and the noise
        generator's state, after checking that it fits this trainer.

        The trainer must be built with the configuration the checkpoint was made with: a
        different ``noise_multiplier``, ``max_grad_norm``, ``sample_rate``,
        ``expected_batch_size``, ``clipping``, ``accountant`` or ``noise_generator`` would make
        the privacy ledger (or the run) wrong, and is refused. Version 1 checkpoints (before
        ``noise_generator`` existed) are read as ``noise_generator="torch"``. Nothing is changed when a check fails. The model's and
        the optimizer's states are restored by their own ``load_state_dict``.

        Raises:
            ValueError: naming the field: an unknown format ``version``, a missing key, a
                configuration that differs from this trainer's, a malformed ``history`` or
                ``steps``, a ``generator`` state without a generator in this trainer (or the
                other way round, or of another device type).
            RuntimeError: in the middle of a virtual step (see :meth:`state_dict`).

        Example:
            >>> import torch, torch.nn as nn, torch.nn.functional as F, functorch_lite as ft
            >>> def trainer(max_grad_norm):
            ...     model = nn.Linear(4, 2)
            ...     return ft.dp.PrivateTrainer(
            ...         model, torch.optim.SGD(model.parameters(), lr=0.1),
            ...         lambda out, y: F.cross_entropy(out, y, reduction="none"),
            ...         max_grad_norm=max_grad_norm, sample_rate=0.1, expected_batch_size=2.0,
            ...         noise_multiplier=1.1, generator=torch.Generator().manual_seed(0))
            >>> a = trainer(1.0)
            >>> a.step(torch.randn(3, 4), torch.tensor([0, 1, 1]))
            >>> b = trainer(1.0)
            >>> b.load_state_dict(a.state_dict())
            >>> b.steps, b.accountant.history
            (1, [[1.1, 0.1, 1]])
            >>> trainer(2.0).load_state_dict(a.state_dict())  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: PrivateTrainer.load_state_dict: max_grad_norm is 1.0 in the checkpoint but 2.0 in this trainer; ...
        """
        if self._sums is not None:
            raise RuntimeError(
                "PrivateTrainer.load_state_dict() in the middle of a virtual step (accumulate() "
                "was called, step() was not): call step() first, or load into a fresh trainer"
            )
        sd = state_dict
        if not isinstance(sd, dict):
            raise ValueError(
                f"{_WHERE}: expected a dict from PrivateTrainer.state_dict(), got {type(sd).__name__}"
            )
        if "version" not in sd:
            raise ValueError(
                f"{_WHERE}: the checkpoint has no 'version' key (not a PrivateTrainer.state_dict()?)"
            )
        if sd["version"] not in (1, _STATE_VERSION):
            raise ValueError(
                f"{_WHERE}: unknown version {sd['version']!r} (this functorch_lite reads versions 1 "
                f"to {_STATE_VERSION})"
            )
        if sd["version"] == 1:  # before noise_generator existed, the noise was torch's randn
            sd = dict(sd, noise_generator="torch")
        missing = [k for k in _STATE_KEYS if k not in sd]
        if missing:
            raise ValueError(f"{_WHERE}: the checkpoint lacks the key(s) {', '.join(map(repr, missing))}")
        mine = {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": float(self.sample_rate),
            "expected_batch_size": self.expected_batch_size,
            "clipping": self.clipping,
            "accountant": self.accountant.mechanism,
            "noise_generator": self.noise_generator,
        }
        for key, value in mine.items():
            if sd[key] != value:
                raise ValueError(
                    f"{_WHERE}: {key} is {sd[key]!r} in the checkpoint but {value!r} in this "
                    "trainer; build the trainer with the checkpoint's configuration (the privacy "
                    "ledger would be wrong otherwise)"
                )
        history = _check_history(sd["history"])
        steps = sd["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps != sum(h[2] for h in history):
            raise ValueError(
                f"{_WHERE}: steps is {steps!r} but the history counts {sum(h[2] for h in history)} steps"
            )
        state, device = sd["generator"], sd["generator_device"]
        gen = self.generator
        if (state is None) != (gen is None):
            ckpt_has = "no generator state (generator=None)" if state is None else "a generator state"
            mine_has = "generator=None" if gen is None else "a generator"
            raise ValueError(
                f"{_WHERE}: generator: the checkpoint holds {ckpt_has} but this trainer has "
                f"{mine_has}; build the trainer as the checkpoint's was, so that the noise goes on "
                "from where it stopped"
            )
        if state is not None:
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8):
                raise ValueError(
                    f"{_WHERE}: generator must be a uint8 tensor (Generator.get_state()), got {state!r}"
                )
            if device != gen.device.type:
                raise ValueError(
                    f"{_WHERE}: generator_device is {device!r} in the checkpoint but this trainer's "
                    f"generator is on {gen.device.type!r}"
                )
        # every check passed: restore (nothing above changed the trainer)
        if state is not None:
            gen.set_state(state.clone())
        self.accountant.history = history


_STATE_VERSION = 2  # 2: noise_generator
_STATE_KEYS = (
    "version",
    "steps",
    "history",
    "accountant",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "expected_batch_size",
    "clipping",
    "noise_generator",
    "generator",
    "generator_device",
)
_WHERE = "PrivateTrainer.load_state_dict"


def _check_history(history):
    """A checkpoint's accountant history as fresh [sigma, q, steps] lists (so that the next step
    merges into the last entry as it would have without the checkpoint), or a ValueError."""
    if not isinstance(history, (list, tuple)):
        raise ValueError(
            f"{_WHERE}: history must be a list of [noise_multiplier, sample_rate, steps], got {history!r}"
        )
    out = []
    for entry in history:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 3
        if ok:
            sigma, q, n = entry
            ok = (
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (sigma, q))
                and isinstance(n, int)
                and not isinstance(n, bool)
                and sigma >= 0
                and 0 < q <= 1
                and n >= 0
            )
        if not ok:
            raise ValueError(
                f"{_WHERE}: history entry {entry!r} is not [noise_multiplier >= 0, sample_rate in "
                "(0, 1], steps >= 0]"
            )
        out.append([sigma, q, n])
    return out


def _grad_buffer(p):
    """Where p's new gradient is written: its `.grad` when that is a contiguous tensor of p's
    shape, dtype and device (the optimizer keeps pointing at the same memory), else fresh memory."""
    g = p.grad
    if (
        g is not None
        and g.shape == p.shape
        and g.dtype == p.dtype
        and g.device == p.device
        and g.is_contiguous()
        and not g.requires_grad
    ):
        return g.detach()
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _rows(batch, start, size):
    """Examples start:start+size of a tensor or a tuple/list of tensors (a physical batch)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[start : start + size] for t in batch)
    return batch[start : start + size]
