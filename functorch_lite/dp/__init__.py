"""functorch_lite.dp: differentially private training (DP-SGD) on functorch_lite's transforms.

See docs/dp.md. Accounting needs the optional dp-accounting package (`pip install
functorch_lite[dp]`); everything else works without it.
"""

from ._accounting import (
    PLDAccountant,
    PrivacyAccountant,
    RDPAccountant,
    compute_epsilon,
    get_noise_multiplier,
)
from ._clip import clipped_grad, clipped_grad_module
from ._engine import PrivateTrainer
from ._noise import gaussian_noise_
from ._private import DPOptimizer, PrivateModule, make_private
from ._sampler import PoissonSampler, poisson_batches
from ._validate import Issue, ValidationReport, fix, validate

__all__ = [
    "clipped_grad",
    "clipped_grad_module",
    "PrivateTrainer",
    "gaussian_noise_",
    "make_private",
    "PrivateModule",
    "DPOptimizer",
    "PrivacyAccountant",
    "RDPAccountant",
    "PLDAccountant",
    "compute_epsilon",
    "get_noise_multiplier",
    "PoissonSampler",
    "poisson_batches",
    "validate",
    "fix",
    "ValidationReport",
    "Issue",
]
