"""Poisson sampling: the batches DP-SGD's privacy analysis assumes.

Every batch includes each example independently with probability `sample_rate`, so batch sizes
vary and a batch can be empty. An epoch is round(1 / sample_rate) batches (each example is seen
once per epoch on average). Fixed-size shuffled batches would not match the accountant's
PoissonSampledDpEvent.
"""

import torch

from . import _noise
from ._accounting import _check_sample_rate, batches_per_epoch


class PoissonSampler(torch.utils.data.Sampler):
    """A batch sampler yielding lists of example indices (for ``DataLoader(batch_sampler=...)`` or
    your own indexing): every example is in each batch independently with probability
    ``sample_rate``, as DP-SGD's accounting assumes.

    Args:
        num_examples: the size of the data set.
        sample_rate: q.
        num_batches: defaults to ``round(1 / sample_rate)``: one epoch.
        generator: a ``torch.Generator`` to seed the sampling.
        secure_mode: draw from a ChaCha20 stream keyed by the operating system instead (cannot
            be seeded: ``generator`` must be None; see docs/dp.md, "secure mode").

    Example:
        >>> import torch
        >>> from functorch_lite import dp
        >>> sampler = dp.PoissonSampler(1000, 0.01, generator=torch.Generator().manual_seed(0))
        >>> batches = list(sampler)
        >>> len(batches), all(0 <= i < 1000 for b in batches for i in b)
        (100, True)
    """

    def __init__(self, num_examples, sample_rate, *, num_batches=None, generator=None, secure_mode=False):
        _check_sample_rate(sample_rate)
        _noise.check_secure(secure_mode, generator, "PoissonSampler")
        if not (isinstance(num_examples, int) and num_examples > 0):
            raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.num_batches = batches_per_epoch(sample_rate) if num_batches is None else num_batches
        self.generator = generator
        self.secure_mode = secure_mode

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield (
                _draw(self.num_examples, self.sample_rate, self.generator, self.secure_mode)
                .nonzero()
                .flatten()
                .tolist()
            )


def _draw(n, q, generator, secure_mode):
    """The membership mask of one Poisson batch: n independent Bernoulli(q) draws."""
    if secure_mode:
        return _noise._secure().bernoulli(n, q)
    return torch.rand(n, generator=generator) < q


def poisson_batches(data, sample_rate, *, num_batches=None, generator=None, secure_mode=False):
    """Iterates over one epoch (or ``num_batches``) of Poisson-sampled batches of ``data``.

    Args:
        data: a tensor, a tuple/list of tensors with the same first dimension (e.g.
            ``(inputs, targets)``), or a map-style Dataset whose items are tensors or tuples of
            tensors.
        sample_rate: q, the probability of each example being in a batch.
        num_batches: defaults to ``round(1 / sample_rate)``: one epoch.
        generator: a ``torch.Generator`` to seed the sampling.
        secure_mode: sample from secure mode's ChaCha20 stream (see :class:`PoissonSampler`).

    Yields:
        What ``data`` holds, indexed by the batch's examples: a tensor or a tuple of tensors
        whose first dimension is the (random) batch size. An empty batch is yielded as tensors
        with 0 rows and the right trailing shape and dtype.

    Example:
        >>> import torch
        >>> from functorch_lite import dp
        >>> x, y = torch.randn(100, 3), torch.arange(100)
        >>> g = torch.Generator().manual_seed(0)
        >>> sizes = [len(yb) for xb, yb in dp.poisson_batches((x, y), 0.1, generator=g)]
        >>> len(sizes), sum(sizes) > 0
        (10, True)
    """
    single = isinstance(data, torch.Tensor)
    if single or isinstance(data, (tuple, list)):
        tensors = (data,) if single else tuple(data)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("data must be a tensor, a tuple of tensors or a Dataset")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError(
                f"data: the tensors must have the same first dimension, got {[len(t) for t in tensors]}"
            )

        def take(idx):
            index = torch.tensor(idx, dtype=torch.long, device=tensors[0].device)
            return tuple(t[index.to(t.device)] for t in tensors)
    else:
        n = len(data)
        first = data[0]
        single = isinstance(first, torch.Tensor)
        template = (first,) if single else tuple(torch.as_tensor(x) for x in first)

        def take(idx):
            if not idx:
                return tuple(t.new_empty((0, *t.shape)) for t in template)
            items = [data[i] for i in idx]
            items = [(it,) if single else it for it in items]
            return tuple(torch.stack([torch.as_tensor(it[j]) for it in items]) for j in range(len(template)))

    sampler = PoissonSampler(
        n, sample_rate, num_batches=num_batches, generator=generator, secure_mode=secure_mode
    )
    for idx in sampler:
        batch = take(idx)
        yield batch[0] if single else batch
