"""The spec-based harness of the batching-rule case tables (test_vmap_indexing.py,
test_vmap_rules_more.py, test_vmap_rules_nn_linalg.py): an argument is a spec (kind, shape[, ...]),
each case runs for every placement of the batch dim over its arguments, and is compared with a
Python for-loop and with torch.func.vmap under ft.set_vmap_fallback('error').

Argument kinds:
  "f"     standard normal
  "idx"   integer indices in [0, high): ("idx", shape, high), see I_
  "mask"  a boolean mask, never batched (a batched one is data-dependent)
  "b"     a boolean mask that is batched like any other argument
  "pos"   in [0.5, 1.5);  "gt1" in [1.5, 2.5)
  "n"     small non-negative integers stored as floats (polynomial degrees; ties for stable sort)
  "c"     complex normal
  "nan"   normal with some NaNs
  "ninf"  normal with whole rows of -inf (for _safe_softmax)
  "sign"  +-1;  "unit" inside (-1, 1)
"""

import math

import pytest
import torch
from test_vmap import B, check_vmap


def F_(*shape):
    return ("f", shape)


def I_(high, *shape):
    return ("idx", shape, high)


def S_(*shape):
    return ("sign", shape)


def K(kind, *shape):
    return (kind, shape)


def _draw(spec, full):
    kind = spec[0]
    if kind in ("f", "sign", "unit"):
        return torch.randn(full)
    if kind == "idx":
        return torch.randint(0, spec[2], full)
    if kind in ("mask", "b"):
        return torch.rand(full) > 0.4
    if kind == "pos":
        return torch.rand(full) + 0.5
    if kind == "gt1":
        return torch.rand(full) + 1.5
    if kind == "n":
        return torch.randint(0, 4, full).float()
    if kind == "c":
        return torch.randn(full, dtype=torch.cfloat)
    if kind == "nan":
        t = torch.randn(full)
        t[torch.rand(full) > 0.7] = math.nan
        return t
    if kind == "ninf":
        t = torch.randn(full)
        if t.dim() >= 2:
            t.select(-2, 0).fill_(-math.inf)
        return t
    raise AssertionError(kind)


def make(spec, batched_at):
    """A tensor for `spec`, with a batch of size B at in_dim `batched_at` (None: unbatched)."""
    kind, shape = spec[0], spec[1]
    full = shape if batched_at is None else (B,) + shape
    t = _draw(spec, full)
    if batched_at is not None:
        t = t.movedim(0, batched_at if batched_at >= 0 else len(shape) + 1 + batched_at)
    # Transformed after the move, from a draw like "f"'s: same random numbers, same batch-dim
    # layout as an "f" argument.
    if kind == "sign":
        return (t >= 0).float() * 2 - 1
    if kind == "unit":
        return t.tanh() * 0.95
    return t


def dims(placement, spec):
    rank = len(spec[1])
    return {"0": 0, "-1": -1, "mid": (rank + 1) // 2}[placement]


def placements(specs):
    """(name, in_dims) pairs: every argument batched at 0 / -1 / a middle dim, then each
    argument in turn unbatched (masks are never batched)."""
    out = []
    mappable = [i for i, s in enumerate(specs) if s[0] != "mask"]
    for p in ("0", "-1", "mid"):
        out.append((p, tuple(None if s[0] == "mask" else dims(p, s) for s in specs)))
    if len(mappable) >= 2:
        for i in mappable:
            out.append(
                (f"None@{i}", tuple(None if (j == i or s[0] == "mask") else 0 for j, s in enumerate(specs)))
            )
    return out


def case_params(cases, skip=lambda name, pname: False):
    """pytest params (name, pname, in_dims) with ids "name-pname", for every case and placement
    that `skip` keeps."""
    for name, (_, specs) in cases.items():
        for pname, in_dims in placements(specs):
            if not skip(name, pname):
                yield pytest.param(name, pname, in_dims, id=f"{name}-{pname}")


def torch_func_agrees(torch_func_wrong, name, pname):
    """False where the table says torch.func.vmap disagrees with the for-loop for this case and
    placement: {name: (placements or None for all, why)}."""
    where, _ = torch_func_wrong.get(name, (set(), ""))
    return not (where is None or pname in where)


def run(fn, specs, in_dims, torch_func=True, atol=1e-5):
    args = [make(s, d) for s, d in zip(specs, in_dims)]
    check_vmap(fn, tuple(args), in_dims, torch_func=torch_func, atol=atol, rtol=atol)
