"""The DP noise generators (functorch_lite/dp/_noise.py, csrc/dp/): the numbers, not only the code.

- the raw generators against published test vectors (Random123's Philox4x32-10 answers, RFC 8439's
  ChaCha20 block) and a pure-Python Philox, including which counter lands where;
- the normals, for each generator (Philox float32 and float64, secure mode): moments, a
  Kolmogorov-Smirnov test on 10^7 draws, tail frequencies at 3, 4 and 5 sigma against the
  binomial, the largest magnitude the transform can produce, no correlation between neighbours,
  steps or ranks;
- determinism: same seed same bits, on every instruction-set variant and thread count; secure
  mode ignores torch's seed;
- the fused pass: out = (sum + std z) * scale for every dtype and layout, aliasing included.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import functorch_lite as ft
from functorch_lite import _C
from functorch_lite.dp import _noise

N_BIG = 10**7


def philox_py(ctr, key):
    """Philox4x32-10, written from the paper, in Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    m = 0xFFFFFFFF
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & m, p1 & m, ((p0 >> 32) ^ c3 ^ k1) & m, p0 & m
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return [c0, c1, c2, c3]


def philox_noise(n, key, counter=0, rank=0, dtype=torch.float32, std=1.0):
    out = torch.empty(n, dtype=dtype)
    _C._dp_philox_noisy(out, None, std, 1.0, key, counter, 0, rank)
    return out


def secure_noise(n, dtype=torch.float64, std=1.0):
    out = torch.zeros(n, dtype=dtype)
    _noise.SecureNoise().apply([(out, out)], std, 1.0)
    return out


# ---- the raw generators


@pytest.mark.parametrize(
    "ctr,key,expected",
    [  # Random123 kat_vectors, philox4x32_10
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    assert list(_C._dp_philox_block(ctr, *key)) == expected
    assert philox_py(ctr, key) == expected


def test_chacha20_rfc8439_block():
    # RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, counter 1.
    # In our layout word 13 (the counter's high half) is the RFC's first nonce word.
    key = [int.from_bytes(bytes(range(4 * i, 4 * i + 4)), "little") for i in range(8)]
    block = 1 | (0x09000000 << 32)
    words = _C._dp_chacha_block(key, 0x4A000000, block)
    expected = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )
    assert b"".join(w.to_bytes(4, "little") for w in words) == expected


def test_values_land_where_the_counter_layout_says():
    # value j of a float32 call: group g = j // 64 uses counters 16 g .. 16 g + 15; within the
    # group, [z0 of words (0,1) | z1 of words (0,1) | z0 of (2,3) | z1 of (2,3)], lane-major
    key, rank = 0x0123456789ABCDEF, 3
    out = philox_noise(200, key, counter=32, rank=rank)
    for j in (0, 5, 17, 40, 63, 64, 130, 199):
        g, k, lane = j // 64, (j % 64) // 16, j % 16
        c = 32 + 16 * g + lane
        w = philox_py([c & 0xFFFFFFFF, c >> 32, 0, rank], [key & 0xFFFFFFFF, key >> 32])
        a, b = (w[0], w[1]) if k < 2 else (w[2], w[3])
        u = ((a >> 1) * 2.0**-31) + 2.0**-32
        phi = (((b & 0x1FFFFFFF) >> 5) + 0.5) * 2.0**-24 * math.pi / 4
        r = math.sqrt(-2 * math.log(u))
        swap, sx, sy = b >> 31, (b >> 30) & 1, (b >> 29) & 1
        cs, sn = (math.sin(phi), math.cos(phi)) if swap else (math.cos(phi), math.sin(phi))
        z = r * cs * (-1) ** sx if k % 2 == 0 else r * sn * (-1) ** sy
        assert out[j].item() == pytest.approx(z, abs=2e-6 * max(1, r)), j


# ---- the normals


def _normals(kind):
    if kind == "philox-float32":
        return philox_noise(N_BIG, 0x5EED).double().numpy(), 6.66
    if kind == "philox-float64":
        return philox_noise(N_BIG, 0x5EED, dtype=torch.float64).numpy(), 9.42
    grid = _noise.secure_grid(1.0)
    return secure_noise(N_BIG).numpy(), 9.42 + grid


KINDS = ["philox-float32", "philox-float64", "secure"]


@pytest.fixture(scope="module", params=KINDS)
def normals(request):
    return request.param, *_normals(request.param)


def test_moments(normals):
    kind, z, _ = normals
    n = len(z)
    # standard errors of the sample mean, variance, skewness and excess kurtosis of N(0, 1)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)


def test_kolmogorov_smirnov_on_ten_million(normals):
    kind, z, _ = normals
    # secure mode's values lie on a grid of std / 256: its CDF jumps by up to 0.4 / 256 = 1.6e-3 per
    # point, above the KS critical value at 10^7 draws (6e-4), so the test runs on the values
    # spread uniformly over their grid cell (a normal convolved with U(-grid/2, grid/2), whose
    # variance is 1 + grid^2 / 12: a CDF within 1e-6 of the normal's)
    if kind == "secure":
        grid = _noise.secure_grid(1.0)
        z = z + np.random.default_rng(0).uniform(-grid / 2, grid / 2, size=len(z))
    assert stats.kstest(z, "norm").pvalue > 1e-4


@pytest.mark.parametrize("k", [3, 4, 5])
def test_tail_frequencies(normals, k):
    kind, z, _ = normals
    n = len(z)
    p = 2 * stats.norm.sf(k)
    count = int((np.abs(z) > k).sum())
    # a two-sided binomial test at a false-alarm rate of 1e-5
    assert stats.binomtest(count, n, p).pvalue > 1e-5, (count, n * p)


def test_largest_magnitude_is_the_documented_bound(normals):
    kind, z, bound = normals
    assert np.abs(z).max() <= bound


def test_neighbours_are_uncorrelated(normals):
    kind, z, _ = normals
    n = len(z)
    for lag in (1, 2, 16, 32, 64):
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n), (lag, r)
    # the two values of one Box-Muller pair (z0 of words (0,1) at j, z1 at j + 16): uncorrelated,
    # and so are their squares (independent, not only uncorrelated)
    pairs = z[: (n // 64) * 64].reshape(-1, 64)
    if kind == "secure":
        pairs = z[: (n // 128) * 128].reshape(-1, 128)
    a, b = pairs[:, :16].ravel(), pairs[:, 16:32].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(len(a))
    assert abs(np.corrcoef(a**2, b**2)[0, 1]) < 5 / math.sqrt(len(a)) * 2


def test_steps_and_ranks_are_uncorrelated():
    n = 10**6
    g = torch.Generator().manual_seed(7)
    step1 = ft.dp.gaussian_noise_(torch.zeros(n), 1.0, generator=g)
    step2 = ft.dp.gaussian_noise_(torch.zeros(n), 1.0, generator=g)
    rank0 = philox_noise(n, 0xABC, rank=0)
    rank1 = philox_noise(n, 0xABC, rank=1)
    for a, b in ((step1, step2), (rank0, rank1)):
        assert not torch.equal(a, b)
        r = np.corrcoef(a.numpy(), b.numpy())[0, 1]
        assert abs(r) < 5 / math.sqrt(n)


# ---- determinism


def test_same_seed_same_noise_different_seed_different_noise():
    def draw(seed, **kw):
        return ft.dp.gaussian_noise_(
            torch.zeros(1000), 1.0, generator=torch.Generator().manual_seed(seed), **kw
        )

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(draw(1, noise_generator="torch"), draw(1, noise_generator="torch"))
    assert not torch.equal(draw(1), draw(1, noise_generator="torch"))


def test_global_generator_is_used_when_none_is_given():
    torch.manual_seed(3)
    a = ft.dp.gaussian_noise_(torch.zeros(100), 1.0)
    torch.manual_seed(3)
    b = ft.dp.gaussian_noise_(torch.zeros(100), 1.0)
    assert torch.equal(a, b)


def test_thread_count_does_not_change_the_bits():
    n = 3 * 10**5 + 17
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = philox_noise(n, 99)
        torch.set_num_threads(max(2, old))
        b = philox_noise(n, 99)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)


def test_every_instruction_set_gives_the_same_bits():
    code = (
        "import torch, hashlib, functorch_lite._C as C\n"
        "a = torch.empty(100003); C._dp_philox_noisy(a, None, 1.0, 1.0, 12345, 0, 0, 0)\n"
        "b = torch.empty(100003, dtype=torch.float64); C._dp_philox_noisy(b, None, 1.0, 1.0, 12345, 0, 0, 0)\n"
        "print(C._dp_noise_isa(), hashlib.sha256(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest())\n"
    )
    outs = {}
    for isa in ("native", "generic"):
        env = dict(os.environ)
        env.pop("FUNCTORCH_LITE_NOISE_ISA", None)
        if isa == "generic":
            env["FUNCTORCH_LITE_NOISE_ISA"] = "generic"
        res = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs[isa] = res.stdout.split()
    assert outs["generic"][0] == "generic"
    assert outs["native"][1] == outs["generic"][1], outs


def test_secure_mode_ignores_torchs_seed():
    torch.manual_seed(0)
    a = ft.dp.gaussian_noise_(torch.zeros(1000), 1.0, secure_mode=True)
    torch.manual_seed(0)
    b = ft.dp.gaussian_noise_(torch.zeros(1000), 1.0, secure_mode=True)
    assert not torch.equal(a, b)
    # and two processes seeded alike draw different noise (the key comes from the OS)
    code = "import torch, functorch_lite as ft; torch.manual_seed(0); print(ft.dp.gaussian_noise_(torch.zeros(4, dtype=torch.float64), 1.0, secure_mode=True).tolist())"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 2


def test_secure_outputs_lie_on_the_grid():
    std = 0.37
    grid = _noise.secure_grid(std)
    assert std / 512 < grid <= std / 256
    base = torch.randn(10000, dtype=torch.float64)
    out = base.clone()
    _noise.SecureNoise().apply([(out, out)], std, 1.0)
    k = out / grid
    assert torch.equal(k, k.round())
    assert (out - base).std().item() == pytest.approx(std, rel=0.05)


def test_secure_bernoulli_rate():
    n, q = 10**6, 0.013
    draws = _noise.SecureNoise().bernoulli(n, q)
    assert draws.dtype == torch.bool and draws.shape == (n,)
    assert stats.binomtest(int(draws.sum()), n, q).pvalue > 1e-5
    assert bool(_noise.SecureNoise().bernoulli(100, 1.0).all())


# ---- the fused pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise_generator", ["philox", "torch"])
def test_fused_pass_is_sum_plus_scaled_noise(dtype, noise_generator):
    total = torch.randn(1000, dtype=torch.float64).to(dtype)
    std, scale = 0.8, 1 / 7

    def run(t):
        src = _noise.make_noise(noise_generator, torch.Generator().manual_seed(4), False)
        out = torch.empty_like(total)
        src.apply([(out, t)], std, scale)
        return out

    noisy = run(total)
    noise_only = run(None)
    expected = total.double() * scale + noise_only.double()
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2e-2)
    torch.testing.assert_close(noisy.double(), expected, atol=tol * 4, rtol=tol)


def test_fused_pass_in_place_and_non_contiguous():
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    total = torch.randn(30, 40)
    in_place = total.clone()
    ft.dp.gaussian_noise_(in_place, 0.5, scale=2.0, generator=g())
    ref = torch.empty_like(total)
    _noise.make_noise("philox", g(), False).apply([(ref, total)], 0.5, 2.0)
    assert torch.equal(in_place, ref)
    t = total.clone().t()  # non-contiguous: same values as noising its contiguous copy
    ft.dp.gaussian_noise_(t, 0.5, scale=2.0, generator=g())
    c = total.t().contiguous()
    ft.dp.gaussian_noise_(c, 0.5, scale=2.0, generator=g())
    assert torch.equal(t, c)


def test_gaussian_noise_refuses_bad_arguments():
    with pytest.raises(ValueError, match="std"):
        ft.dp.gaussian_noise_(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match="std"):
        ft.dp.gaussian_noise_(torch.zeros(3), math.inf)
    with pytest.raises(TypeError, match="tensors\\[0\\]"):
        ft.dp.gaussian_noise_(torch.zeros(3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="noise_generator"):
        ft.dp.gaussian_noise_(torch.zeros(3), 1.0, noise_generator="mt")
    with pytest.raises(ValueError, match="cannot be seeded"):
        ft.dp.gaussian_noise_(torch.zeros(3), 1.0, secure_mode=True, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        ft.dp.gaussian_noise_(torch.zeros(3), 1.0, generator=5)
