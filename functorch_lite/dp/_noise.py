"""The Gaussian noise of a DP-SGD step: Philox in C++ (the default), torch's generator, or secure
mode's ChaCha20 stream keyed by the OS; fused with the step's last pass over each gradient.

NOTE [Where the noise comes from]
- ``"philox"`` (default): Philox4x32-10 and a vectorised Box-Muller in C++ (csrc/dp/). Each call
  draws one fresh 64-bit key from the torch.Generator (or torch's global one), so the noise is a
  function of the generator's state: same seed, same noise, and a checkpoint of the generator
  resumes the same stream. Within a call every value has its own counter (NOTE [Philox counters
  in the DP noise] in csrc/dp/philox.h), the rank is part of the counter. CPU tensors of dtype
  float32/float64 go through the fused kernel; other dtypes get float32 noise from it, converted;
  CUDA tensors use torch's own CUDA generator, itself Philox.
- ``"torch"``: torch's ``randn`` on the generator, as before this module existed.
- secure mode: ``SecureNoise``, ChaCha20 keyed from getrandom(2), double-precision Box-Muller and
  snapping to a grid (NOTE [secure_mode's noise] in csrc/dp/noise.cpp). It takes no generator and
  cannot be reproduced, by design.
"""

import math

import torch

from .. import _C

NOISE_GENERATORS = ("philox", "torch")


def check_noise_generator(noise_generator):
    if noise_generator not in NOISE_GENERATORS:
        raise ValueError(f"noise_generator must be 'philox' or 'torch', got {noise_generator!r}")


def check_secure(secure_mode, generator, api):
    """secure_mode must be a bool, and cannot be seeded: a seeded generator would make the noise
    (or the sampling) predictable."""
    if not isinstance(secure_mode, bool):
        raise TypeError(f"{api}: secure_mode must be True or False, got {secure_mode!r}")
    if secure_mode and generator is not None:
        raise ValueError(
            f"{api}: secure_mode draws from the operating system's entropy and cannot be seeded: "
            "pass generator=None (a seeded generator would make it predictable)"
        )


def _draw_key(generator):
    """64 random bits from `generator` (torch's global CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    hi, lo = torch.randint(0, 2**32, (2,), generator=generator, device=device, dtype=torch.int64).tolist()
    return (hi << 32) | lo


def _fused_ok(out, total):
    return (
        out.device.type == "cpu"
        and out.dtype in (torch.float32, torch.float64)
        and out.is_contiguous()
        and (
            total is None
            or (total.dtype == out.dtype and total.device == out.device and total.is_contiguous())
        )
    )


class PhiloxNoise:
    """Philox noise seeded from a torch.Generator: one key per :meth:`apply` call."""

    name = "philox"

    def __init__(self, generator=None, rank=0):
        self.generator = generator
        self.rank = rank

    def apply(self, pairs, std, scale=1.0):
        """For each ``(out, total)``: ``out = (total + std * z) * scale`` (``total`` None: zero)."""
        key = _draw_key(self.generator)
        counter = 0
        for i, (out, total) in enumerate(pairs):
            if out.device.type != "cpu":
                # torch's CUDA generator is Philox too; seeding it from the key keeps the noise a
                # function of the trainer's generator (a distinct seed per tensor and rank)
                g = torch.Generator(device=out.device)
                g.manual_seed((key + (i + 1) * 0x9E3779B97F4A7C15 + self.rank * 0xBF58476D1CE4E5B9) % 2**64)
                z = torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)
                _combine(out, total, z, std, scale)
            elif _fused_ok(out, total):
                counter += _C._dp_philox_noisy(out, total, std, scale, key, counter, 0, self.rank)
            else:
                z = torch.empty(out.shape, dtype=torch.float32)
                counter += _C._dp_philox_noisy(z, None, 1.0, 1.0, key, counter, 0, self.rank)
                _combine(out, total, z.to(out.dtype), std, scale)
        return [out for out, _ in pairs]


class TorchNoise:
    """torch.randn on the generator (``noise_generator="torch"``)."""

    name = "torch"

    def __init__(self, generator=None, rank=0):
        self.generator = generator

    def apply(self, pairs, std, scale=1.0):
        device = self.generator.device if self.generator is not None else None
        for out, total in pairs:
            z = torch.randn(out.shape, generator=self.generator, device=device or out.device, dtype=out.dtype)
            _combine(out, total, z.to(out.device), std, scale)
        return [out for out, _ in pairs]


class SecureNoise:
    """Secure mode's noise: ChaCha20 keyed by the OS, snapped to a grid (see docs/dp.md)."""

    name = "secure"

    def __init__(self):
        self._rng = _C._SecureRandom()

    def apply(self, pairs, std, scale=1.0):
        if std == 0:  # no noise (allow_zero_noise: debugging), nothing to protect
            for out, total in pairs:
                _combine(out, total, torch.zeros_like(out), 0.0, scale)
            return [out for out, _ in pairs]
        grid = secure_grid(std)
        for out, total in pairs:
            if _fused_ok(out, total):
                self._rng.noisy(out, total, std, scale, grid)
            else:
                # made and snapped in float64 on the CPU, then cast and moved
                acc = torch.zeros(out.shape, dtype=torch.float64) if total is None else total.double().cpu()
                acc = acc.contiguous()
                self._rng.noisy(acc, acc, std, scale, grid)
                out.copy_(acc)
        return [out for out, _ in pairs]

    def bernoulli(self, n, q):
        """``n`` independent Bernoulli(q) draws from the secure stream (Poisson sampling)."""
        return self._rng.bernoulli(n, q)


def secure_grid(std):
    """Secure mode's snapping grid for noise of std ``std`` > 0: the power of two in
    (std / 512, std / 256] (the rounding adds a uniform error of std at most std / (256 sqrt 12),
    about 0.0011 std; the grid depends only on the public std)."""
    return 2.0 ** (math.floor(math.log2(std)) - 8)


def _combine(out, total, z, std, scale):
    if total is None:
        torch.mul(z, std * scale, out=out)
    else:
        res = (total + z * std) * scale
        out.copy_(res)


def make_noise(noise_generator, generator, secure_mode, rank=0):
    """The noise source a trainer uses."""
    if secure_mode:
        return SecureNoise()
    check_noise_generator(noise_generator)
    return (PhiloxNoise if noise_generator == "philox" else TorchNoise)(generator, rank)


_SECURE = None


def _secure():
    global _SECURE
    if _SECURE is None:
        _SECURE = SecureNoise()
    return _SECURE


def gaussian_noise_(tensors, std, *, scale=1.0, generator=None, noise_generator="philox", secure_mode=False):
    """Adds N(0, std^2) noise to each tensor in place and multiplies by ``scale``:
    ``t = (t + std * z) * scale``, in one pass per tensor (the DP-SGD step's last pass).

    Args:
        tensors: a tensor or a list of tensors (float dtypes; CPU or CUDA).
        std: the noise's standard deviation (>= 0).
        scale: a factor applied after the noise (e.g. 1 / expected batch size).
        generator: a ``torch.Generator``; the noise is a function of its state (it draws one
            64-bit key per call). None: torch's global generator. Not allowed with
            ``secure_mode``.
        noise_generator: ``"philox"`` (C++ Philox4x32-10, the default) or ``"torch"``
            (``torch.randn``).
        secure_mode: noise from a ChaCha20 stream keyed by the OS, in double precision, snapped
            to a grid (docs/dp.md, "secure mode"); cannot be seeded or reproduced.

    Returns:
        The tensors (the same objects).

    Example:
        >>> import torch
        >>> from functorch_lite import dp
        >>> a = dp.gaussian_noise_(torch.zeros(4), 1.0, generator=torch.Generator().manual_seed(0))
        >>> b = dp.gaussian_noise_(torch.zeros(4), 1.0, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(a, b) and bool(a.ne(0).all())
        True
    """
    single = isinstance(tensors, torch.Tensor)
    ts = [tensors] if single else list(tensors)
    for i, t in enumerate(ts):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"gaussian_noise_: tensors[{i}] must be a floating-point tensor, got {t!r}")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (0 <= std < math.inf):
        raise ValueError(f"gaussian_noise_: std must be a finite number >= 0, got {std!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"gaussian_noise_: scale must be a finite number, got {scale!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"gaussian_noise_: generator must be a torch.Generator or None, got {generator!r}")
    check_secure(secure_mode, generator, "gaussian_noise_")
    if secure_mode:
        src = _secure()
    else:
        src = make_noise(noise_generator, generator, False)
    work = [t if t.is_contiguous() else t.contiguous() for t in ts]  # the kernels write contiguous memory
    src.apply([(w, w) for w in work], float(std), float(scale))
    for t, w in zip(ts, work):
        if w is not t:
            t.copy_(w)
    return tensors
