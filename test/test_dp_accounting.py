"""functorch_lite.dp accounting: reference epsilons (dp-accounting's RDP and PLD), the Opacus RDP
accountant as a cross-check, get_noise_multiplier, and the ImportError without dp-accounting."""

import importlib.util
import subprocess
import sys

import pytest

import functorch_lite.dp as dp

needs_dpa = pytest.mark.skipif(
    importlib.util.find_spec("dp_accounting") is None,
    reason="dp-accounting is not installed (pip install functorch_lite[dp])",
)

# (sample_rate, noise_multiplier, steps, delta) -> (RDP epsilon, PLD epsilon); docs/dp.md
REFERENCE = [
    ((256 / 60000, 1.1, 14062, 1e-5), (2.597, 2.382)),
    ((0.01, 1.0, 1000, 1e-5), (2.101, 1.828)),
]


@pytest.mark.parametrize("args,expected", REFERENCE)
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@needs_dpa
def test_reference_epsilons(args, expected, accountant):
    q, sigma, steps, delta = args
    want = expected[0] if accountant == "rdp" else expected[1]
    assert round(dp.compute_epsilon(sigma, q, steps, delta, accountant=accountant), 3) == want


@pytest.mark.parametrize("cls,col", [(dp.RDPAccountant, 0), (dp.PLDAccountant, 1)])
@needs_dpa
def test_accountant_object_records_steps(cls, col):
    (q, sigma, steps, delta), expected = REFERENCE[1]
    acc = cls()
    assert acc.get_epsilon(delta) == 0.0
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    assert len(acc) == steps and acc.history == [[sigma, q, steps]]  # merged
    assert round(acc.get_epsilon(delta), 3) == expected[col]


@needs_dpa
def test_mixed_history_composes():
    acc = dp.PrivacyAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=500)
    acc.step(noise_multiplier=2.0, sample_rate=0.02, num_steps=300)
    assert len(acc.history) == 2 and len(acc) == 800
    eps = acc.get_epsilon(1e-5)
    first = dp.compute_epsilon(1.0, 0.01, 500, 1e-5)
    assert first < eps < first + dp.compute_epsilon(2.0, 0.02, 300, 1e-5)


def test_zero_noise_step_means_infinite_epsilon():
    acc = dp.RDPAccountant()
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert acc.get_epsilon(1e-5) == float("inf")


@needs_dpa
def test_matches_opacus_rdp_accountant():
    accountants = pytest.importorskip("opacus.accountants")
    for (q, sigma, steps, delta), _ in REFERENCE + [((0.05, 0.8, 200, 1e-6), None)]:
        ref = accountants.RDPAccountant()
        ref.history = [(sigma, q, steps)]
        ours = dp.RDPAccountant()
        ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        assert ours.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-6)


@needs_dpa
def test_opacus_get_noise_multiplier_agrees():
    opacus_utils = pytest.importorskip("opacus.accountants.utils")
    ref = opacus_utils.get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_rate=0.01,
        steps=1000,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )
    ours = dp.get_noise_multiplier(2.0, 1e-5, 0.01, steps=1000, accountant="rdp")
    assert ours == pytest.approx(ref, rel=0.02)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@needs_dpa
def test_get_noise_multiplier_round_trip(accountant):
    q, target = 0.01, 2.0
    sigma = dp.get_noise_multiplier(target, 1e-5, q, epochs=10, accountant=accountant)
    steps = 10 * 100  # epochs * round(1 / q)
    eps = dp.compute_epsilon(sigma, q, steps, 1e-5, accountant=accountant)
    assert target - 0.01 <= eps <= target
    # a little less noise would miss the target: sigma is (nearly) the smallest
    assert dp.compute_epsilon(sigma * 0.97, q, steps, 1e-5, accountant=accountant) > target


@needs_dpa
def test_get_noise_multiplier_steps_or_epochs():
    a = dp.get_noise_multiplier(3.0, 1e-5, 0.02, epochs=4)
    b = dp.get_noise_multiplier(3.0, 1e-5, 0.02, steps=200)
    assert a == b
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        dp.get_noise_multiplier(3.0, 1e-5, 0.02)
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        dp.get_noise_multiplier(3.0, 1e-5, 0.02, epochs=1, steps=2)


@needs_dpa
def test_unreachable_target_epsilon():
    # sampling everything every step: epsilon cannot get tiny in 10^5 steps at delta 1e-10
    with pytest.raises(ValueError, match="target_epsilon=1e-06 cannot be reached"):
        dp.get_noise_multiplier(1e-6, 1e-10, 1.0, steps=100000)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_epsilon=0.0), "target_epsilon must be > 0"),
        (dict(target_epsilon=-1.0), "target_epsilon must be > 0"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\]"),
        (dict(target_delta=0.0), r"delta must be in \(0, 1\)"),
        (dict(accountant="prv"), "accountant must be 'rdp' or 'pld'"),
    ],
)
def test_get_noise_multiplier_bad_arguments(kwargs, match):
    args = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.01, epochs=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dp.get_noise_multiplier(**args)


def test_accountant_bad_arguments():
    with pytest.raises(ValueError, match="accountant must be 'rdp' or 'pld'"):
        dp.PrivacyAccountant("gdp")
    acc = dp.RDPAccountant()
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(noise_multiplier=-1.0, sample_rate=0.1)


def test_without_dp_accounting_import_works_and_accounting_names_the_extra(monkeypatch):
    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed
    for name in [m for m in sys.modules if m == "dp_accounting" or m.startswith("dp_accounting.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    acc = dp.RDPAccountant()  # recording steps needs no library
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    with pytest.raises(ImportError, match=r"pip install functorch_lite\[dp\]"):
        acc.get_epsilon(1e-5)
    with pytest.raises(ImportError, match=r"pip install functorch_lite\[dp\]"):
        dp.get_noise_multiplier(2.0, 1e-5, 0.01, epochs=1)


def test_import_without_dp_accounting_in_fresh_process():
    code = (
        "import sys; sys.modules['dp_accounting'] = None\n"
        "import functorch_lite as ft\n"
        "t = ft.dp.PrivacyAccountant('pld')\n"
        "try:\n    ft.dp.compute_epsilon(1.0, 0.01, 10, 1e-5)\n"
        "except ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install functorch_lite[dp]" in proc.stdout, proc.stdout
