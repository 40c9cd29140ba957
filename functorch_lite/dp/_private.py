"""ft.dp.make_private: DP-SGD inside a training loop the user keeps, Opacus-style.

    model, optimizer, loader = ft.dp.make_private(module, optimizer, data_loader,
                                                  noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)    # the usual mean-reduced loss
        loss.backward()
        optimizer.step()                  # a DP-SGD step

NOTE [make_private runs the fast path inside the user's own backward]
The returned model's forward (in training mode, with grad enabled) is the recording forward of
the per-layer fast path (NOTE [The example dim is known, never guessed] in _ghost.py): the module
runs one example at a time under our vmap, hooks record each layer's physical input, and the
outputs are handed back batched, examples along dim 0. The plan (which layers a rule handles,
which gradient edges are needed) is made right away, and a pre-hook on each needed edge's
autograd node keeps the gradient that the user's own loss.backward() sends through it: the b of
every layer, times the batch size for a mean-reduced loss (loss_reduction). optimizer.step()
turns the recorded a and b into the clipped sum (the same rules and per-layer vmap(grad) as
clipped_grad_module), then a PrivateTrainer adds the noise, divides by the expected batch size,
records the step and steps the wrapped optimizer: the same numbers as PrivateTrainer. Several
forward/backward pairs before one step are one virtual step. The normal gradients that
loss.backward() also leaves in .grad are replaced.
"""

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._load import _C
from .._vmap import vmap
from . import _ghost
from ._common import _batch_size_of, trainable_parameters
from ._engine import PrivateTrainer
from ._sampler import PoissonSampler

__all__ = ["make_private", "PrivateModule", "DPOptimizer"]

_API = "make_private"


class _Pending:
    """One recorded forward waiting for its backward: the plan, the gradients the hooks keep."""

    def __init__(self, plan, size, wanted):
        self.plan, self.size = plan, size
        self.got = [None] * len(wanted)
        self.handles = []
        for i, edge in enumerate(wanted):
            if isinstance(edge, torch.Tensor):  # a parameter the recording did not see
                edge = get_gradient_edge(edge)
            self.handles.append(edge.node.register_prehook(self._keeper(i, edge.output_nr)))

    def _keeper(self, i, nr):
        def keep(grad_outputs):
            g = grad_outputs[nr]
            if g is not None:
                self.got[i] = g if self.got[i] is None else self.got[i] + g

        return keep

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class _Engine:
    def __init__(self, module, trainer, loss_reduction):
        self.module, self.trainer, self.loss_reduction = module, trainer, loss_reduction
        self.pending = None
        self.empty_batches = 0  # forwards of empty batches since the last step (noise-only steps)

    def forward(self, args):
        self.collect()  # a previous forward and backward before this one: a virtual step
        size = _batch_size_of([("inputs", args)], _API, "the model's")
        if size == 0:  # Poisson sampling can draw no example: the step is then noise only
            self.empty_batches += 1
            return self.module(*args)
        params = trainable_parameters(self.module)
        recorder = _ghost._Recorder(self.module, params)
        recorder.size = size

        def one(*xs):
            recorder.phys.level = _C._top_level_id()
            return self.module(*[x.unsqueeze(0) for x in xs])

        with recorder:
            out = vmap(one, randomness="different")(*args)
        recorder.phys.memo.clear()
        leaves, spec = tree_flatten(out)
        for t in leaves:
            if isinstance(t, torch.Tensor) and (t.dim() < 2 or t.shape[1] != 1):
                raise ValueError(
                    f"{_API}: the model's outputs must have the examples along dim 0 (one example "
                    f"gives an output of shape (1, ...)); one has shape {tuple(t.shape[1:])} for "
                    f"one example. Use ft.dp.PrivateTrainer, whose loss_fn sees the outputs as "
                    f"they are."
                )
        try:
            plan = _ghost._Plan(recorder, params)
        except _ghost._Fallback as e:
            raise ValueError(
                f"{_API}: the per-layer path cannot read this model ({e}); use "
                f"ft.dp.PrivateTrainer (or clipped_grad_module), which falls back to the "
                f"whole-model vmap path."
            ) from None
        self.pending = _Pending(plan, size, plan.wanted())
        return tree_unflatten([t.squeeze(1) if isinstance(t, torch.Tensor) else t for t in leaves], spec)

    def collect(self):
        """Turns the pending forward's recorded layers and kept gradients into clipped sums."""
        p, self.pending = self.pending, None
        if p is None:
            return False
        p.close()
        needed = len(p.plan.needed)
        if needed and all(g is None for g in p.got[:needed]):
            return False  # a forward without a backward (evaluation under grad mode): nothing
        scale = float(p.size) if self.loss_reduction == "mean" else 1.0
        got = [None if g is None else g * scale for g in p.got]
        like = next(t for t in (*got, *self.module.parameters()) if t is not None)
        try:
            sums, _ = p.plan.finish(
                got, self.trainer.max_grad_norm, p.size, self.trainer.clipping == "ghost", like
            )
        except _ghost._Fallback as e:
            raise ValueError(
                f"{_API}: the per-layer path cannot read this model ({e}); use ft.dp.PrivateTrainer."
            ) from None
        if self.trainer._sums is None:
            self.trainer._sums = {}
        for n in trainable_parameters(self.module):
            g = sums[n].detach()
            prev = self.trainer._sums.get(n)
            self.trainer._sums[n] = g if prev is None else prev + g
        return True

    def step(self):
        self.collect()
        if self.trainer._sums is None and not self.empty_batches:
            raise RuntimeError(
                f"{_API}: optimizer.step() without a forward and loss.backward() of the private "
                f"model in training mode since the last step: there is no gradient to privatize."
            )
        self.empty_batches = 0
        self.trainer.step()


class PrivateModule(nn.Module):
    """The module returned by :func:`make_private`: in training mode with grad enabled its forward
    records what the DP step needs (the outputs are the module's, examples along dim 0); in eval
    mode or under ``torch.no_grad()`` it is the module's plain forward. ``.module`` is the
    original module (its parameters are the ones trained).

    Example:
        >>> import torch, torch.nn as nn, functorch_lite as ft
        >>> model = ft.dp.PrivateModule(nn.Linear(3, 2))
        >>> model.eval()(torch.ones(4, 3)).shape  # eval: the plain forward
        torch.Size([4, 2])
    """

    def __init__(self, module, engine=None):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_engine", engine)

    def forward(self, *args, **kwargs):
        if kwargs or self._engine is None or not (self.training and torch.is_grad_enabled()):
            if kwargs and self.training and torch.is_grad_enabled() and self._engine is not None:
                raise TypeError(f"{_API}: the private model takes positional tensor inputs only.")
            return self.module(*args, **kwargs)
        return self._engine.forward(args)


class DPOptimizer:
    """The optimizer returned by :func:`make_private`: ``step()`` is a DP-SGD step (clipped
    per-example gradients from the last forward/backward pairs, noise, division by the expected
    batch size, the wrapped optimizer's step, the privacy accounting). ``zero_grad``,
    ``param_groups``, ``state_dict``/``load_state_dict`` (with the trainer's state) as usual;
    ``get_epsilon(delta)``; ``trainer`` is the :class:`PrivateTrainer` doing the step.

    Example:
        >>> import torch, functorch_lite as ft
        >>> ds = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
        >>> module = torch.nn.Linear(3, 2)
        >>> model, optimizer, loader = ft.dp.make_private(
        ...     module, torch.optim.SGD(module.parameters(), lr=0.1),
        ...     torch.utils.data.DataLoader(ds, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0)
        >>> for x, y in loader:
        ...     optimizer.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     optimizer.step()
        >>> optimizer.trainer.steps, optimizer.get_epsilon(1e-5) > 0
        (5, True)
    """

    def __init__(self, optimizer, engine):
        self.original_optimizer = optimizer
        self._engine = engine

    @property
    def trainer(self):
        """The PrivateTrainer that adds the noise and keeps the privacy ledger."""
        return self._engine.trainer

    @property
    def param_groups(self):
        """The wrapped optimizer's parameter groups (learning-rate schedulers use them)."""
        return self.original_optimizer.param_groups

    @property
    def state(self):
        """The wrapped optimizer's state."""
        return self.original_optimizer.state

    def zero_grad(self, set_to_none=True):
        """As the wrapped optimizer's zero_grad."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        """One DP-SGD step (a closure is called first, with grad enabled, as torch's do)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        self._engine.step()

    def get_epsilon(self, delta):
        """epsilon at ``delta`` after the steps taken."""
        return self._engine.trainer.get_epsilon(delta)

    def state_dict(self):
        """{"optimizer": the wrapped optimizer's state, "trainer": the trainer's state}."""
        return {"optimizer": self.original_optimizer.state_dict(), "trainer": self.trainer.state_dict()}

    def load_state_dict(self, state_dict):
        """Restores a :meth:`state_dict` (the trainer checks its configuration)."""
        self.original_optimizer.load_state_dict(state_dict["optimizer"])
        self.trainer.load_state_dict(state_dict["trainer"])


class _EmptySafeCollate:
    """The loader's collate function, and for an empty Poisson batch the collate of one example
    cut to zero rows (so the loop sees tensors of shape (0, ...), not an error)."""

    def __init__(self, collate, dataset):
        self.collate, self.dataset = collate, dataset

    def __call__(self, batch):
        if batch:
            return self.collate(batch)
        one = self.collate([self.dataset[0]])
        leaves, spec = tree_flatten(one)
        return tree_unflatten([t[:0] if isinstance(t, torch.Tensor) else t for t in leaves], spec)


def make_private(
    module,
    optimizer,
    data_loader,
    *,
    max_grad_norm,
    noise_multiplier=None,
    target_epsilon=None,
    target_delta=1e-5,
    epochs=None,
    loss_reduction="mean",
    clipping="auto",
    accountant="rdp",
    poisson_sampling=True,
    generator=None,
    noise_generator="philox",
    secure_mode=False,
):
    """Makes an existing training loop differentially private (DP-SGD), as Opacus'
    ``PrivacyEngine.make_private`` does: returns ``(model, optimizer, loader)`` to use in place of
    the originals, with the loop unchanged (``loss = criterion(model(x), y); loss.backward();
    optimizer.step()``).

    Args:
        module: the ``nn.Module`` to train; its forward takes the batch's tensors positionally,
            examples along dim 0, and returns outputs with the examples along dim 0.
        optimizer: an optimizer over the module's parameters.
        data_loader: a ``DataLoader``; its dataset, batch count and collate function are kept.
        max_grad_norm: the clipping bound C (finite, > 0).
        noise_multiplier: sigma (noise std = sigma * C), or give ``target_epsilon``.
        target_epsilon, target_delta, epochs: the noise that reaches epsilon at delta after
            ``epochs`` passes over the data.
        loss_reduction: ``"mean"`` (the loss is the mean over the batch of per-example losses,
            as ``nn.CrossEntropyLoss()`` computes it) or ``"sum"``.
        clipping: ``"auto"`` or ``"ghost"`` (the per-layer path's choice per layer).
        accountant: ``"rdp"`` or ``"pld"``.
        poisson_sampling: batches by Poisson sampling at rate 1 / len(data_loader) (what the
            accounting assumes); False keeps the loader's own batches.
        generator: a ``torch.Generator`` for the noise and the sampling (None: torch's global).
        noise_generator: ``"philox"`` (default) or ``"torch"`` (see :class:`PrivateTrainer`).
        secure_mode: noise and Poisson sampling from a ChaCha20 stream keyed by the operating
            system (see :class:`PrivateTrainer` and docs/dp.md); ``generator`` must be None.

    Returns:
        ``(model, optimizer, loader)``: a :class:`PrivateModule`, a :class:`DPOptimizer`
        (``optimizer.get_epsilon(delta)``) and the Poisson-sampling ``DataLoader``.

    The per-layer fast path runs inside the loop's own forward and backward (NOTE in
    ``functorch_lite/dp/_private.py``); a model it cannot read raises a ValueError naming the
    reason at the first forward or step, before anything is applied or counted (use
    :class:`PrivateTrainer` then, which falls back to the vmap path).

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, functorch_lite as ft
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> module = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> model, optimizer, loader = ft.dp.make_private(
        ...     module, torch.optim.SGD(module.parameters(), lr=0.1),
        ...     torch.utils.data.DataLoader(data, batch_size=16),
        ...     noise_multiplier=1.1, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0))
        >>> for x, y in loader:  # the loop as it was
        ...     optimizer.zero_grad()
        ...     loss = F.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     optimizer.step()
        >>> optimizer.trainer.steps, round(optimizer.get_epsilon(1e-5), 1) > 0
        (4, True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"{_API}: module must be a torch.nn.Module, got {type(module).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{_API}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if not isinstance(data_loader, torch.utils.data.DataLoader):
        raise TypeError(
            f"{_API}: data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}."
        )
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"{_API}: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    if clipping not in ("auto", "ghost"):
        raise ValueError(f"{_API}: clipping must be 'auto' or 'ghost', got {clipping!r}.")
    num_batches = len(data_loader)
    n = len(data_loader.dataset)
    if num_batches == 0 or n == 0:
        raise ValueError(f"{_API}: data_loader is empty.")
    sample_rate = 1.0 / num_batches
    if epochs is None and target_epsilon is not None:
        raise ValueError(f"{_API}: target_epsilon needs epochs (how many passes the budget is for).")
    trainer = PrivateTrainer(
        module,
        optimizer,
        None,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        expected_batch_size=n * sample_rate,
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        epochs=epochs,
        accountant=accountant,
        clipping=clipping,
        generator=generator,
        noise_generator=noise_generator,
        secure_mode=secure_mode,
    )
    engine = _Engine(module, trainer, loss_reduction)
    if poisson_sampling:
        sampler = PoissonSampler(
            n, sample_rate, num_batches=num_batches, generator=generator, secure_mode=secure_mode
        )
        loader = torch.utils.data.DataLoader(
            data_loader.dataset,
            batch_sampler=sampler,
            collate_fn=_EmptySafeCollate(data_loader.collate_fn, data_loader.dataset),
            num_workers=data_loader.num_workers,
            pin_memory=data_loader.pin_memory,
        )
    else:
        loader = data_loader
    return PrivateModule(module, engine), DPOptimizer(optimizer, engine), loader
