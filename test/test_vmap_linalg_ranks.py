"""Linear algebra under vmap with per-example inputs of too few (or mixed) logical dims.

Batch-native linalg ops treat every leading dim as a batch dim, so a per-example vector handed to
them as [B, n] used to be taken for one B x n matrix (eigvals, svdvals, qr, ... returned a
result) or gave a 0-dim result that could not carry the batch dim (det, inv, ... hit an internal
assert). Every case below gives each argument in turn (and all of them) too few dims per example
and checks that vmap raises what the unbatched call on one example raises (same exception type,
same first line), never an internal assert; and with valid ranks, including arguments whose
logical batch dims differ (broadcast), that vmap equals a for-loop with the fallback set to
'error' (a rule ran, never the for-loop fallback).
"""

import pytest
import torch

import functorch_lite as ft

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.cholesky is deprecated",
    "ignore:torch.lu is deprecated",
    "ignore:.*torch.linalg.solve_triangular",
    "ignore:.*torch.linalg.cholesky",
)

DT = torch.float64
N = 3
B = 2


def _spd(*batch, n=N):
    a = torch.randn(*batch, n, n, dtype=DT)
    return a @ a.mT + n * torch.eye(n, dtype=DT)


def _tri(*batch, n=N):
    return torch.triu(_spd(*batch, n=n))


def _vec(*shape):
    return torch.randn(shape, dtype=DT)


def _lu(a):
    return torch.linalg.lu_factor(a)


def _ldl(a):
    return torch.linalg.ldl_factor(a)


def _qr_parts(a):
    return torch.geqrf(a)


L = torch.linalg

# name -> (function, per-example arguments with valid ranks). Argument builders are lambdas so
# that every test draws its own values under the seed conftest sets.
CASES = {
    # torch.linalg
    "linalg.cholesky": (L.cholesky, lambda: [_spd()]),
    "linalg.cholesky_ex": (lambda a: L.cholesky_ex(a).L, lambda: [_spd()]),
    "linalg.cond": (L.cond, lambda: [_spd()]),
    "linalg.cond_fro": (lambda a: L.cond(a, "fro"), lambda: [_spd()]),
    "linalg.det": (L.det, lambda: [_spd()]),
    "linalg.eig": (lambda a: L.eig(a).eigenvalues, lambda: [_spd()]),
    "linalg.eigh": (L.eigh, lambda: [_spd()]),
    "linalg.eigvals": (L.eigvals, lambda: [_spd()]),
    "linalg.eigvalsh": (L.eigvalsh, lambda: [_spd()]),
    "linalg.householder_product": (L.householder_product, lambda: list(_qr_parts(_spd()))),
    "linalg.inv": (L.inv, lambda: [_spd()]),
    "linalg.inv_ex": (lambda a: L.inv_ex(a).inverse, lambda: [_spd()]),
    "linalg.ldl_factor": (L.ldl_factor, lambda: [_spd()]),
    "linalg.ldl_factor_ex": (lambda a: L.ldl_factor_ex(a)[:2], lambda: [_spd()]),
    "linalg.ldl_solve": (L.ldl_solve, lambda: [*_ldl(_spd()), _vec(N, 2)]),
    "linalg.lstsq": (lambda a, b: L.lstsq(a, b).solution, lambda: [_spd(), _vec(N, 2)]),
    "linalg.lstsq_vector": (lambda a, b: L.lstsq(a, b).solution, lambda: [_spd(), _vec(N)]),
    "linalg.lu": (L.lu, lambda: [_spd()]),
    "linalg.lu_factor": (L.lu_factor, lambda: [_spd()]),
    "linalg.lu_factor_ex": (lambda a: L.lu_factor_ex(a)[:2], lambda: [_spd()]),
    "linalg.lu_solve": (L.lu_solve, lambda: [*_lu(_spd()), _vec(N, 2)]),
    "linalg.matrix_exp": (L.matrix_exp, lambda: [_spd() / 10]),
    "linalg.matrix_norm": (L.matrix_norm, lambda: [_spd()]),
    "linalg.matrix_norm_nuc": (lambda a: L.matrix_norm(a, "nuc"), lambda: [_spd()]),
    "linalg.matrix_power": (lambda a: L.matrix_power(a, 3), lambda: [_spd()]),
    "linalg.matrix_power_neg": (lambda a: L.matrix_power(a, -2), lambda: [_spd()]),
    "linalg.matrix_rank": (L.matrix_rank, lambda: [_spd()]),
    "linalg.matrix_rank_tol": (lambda a: L.matrix_rank(a, atol=1.0, rtol=0.0), lambda: [_spd()]),
    "linalg.pinv": (L.pinv, lambda: [_spd()]),
    "linalg.pinv_hermitian": (lambda a: L.pinv(a, hermitian=True), lambda: [_spd()]),
    "linalg.pinv_atol": (lambda a, t: L.pinv(a, atol=t.abs()), lambda: [_spd(), _vec()]),
    "linalg.qr": (L.qr, lambda: [_spd()]),
    "linalg.slogdet": (L.slogdet, lambda: [_spd()]),
    "linalg.solve": (L.solve, lambda: [_spd(), _vec(N, 2)]),
    "linalg.solve_vector": (L.solve, lambda: [_spd(), _vec(N)]),
    "linalg.solve_right": (lambda a, b: L.solve(a, b, left=False), lambda: [_spd(), _vec(2, N)]),
    "linalg.solve_ex": (lambda a, b: L.solve_ex(a, b).result, lambda: [_spd(), _vec(N, 2)]),
    "linalg.solve_triangular": (
        lambda a, b: L.solve_triangular(a, b, upper=True),
        lambda: [_tri(), _vec(N, 2)],
    ),
    "linalg.svd": (lambda a: L.svd(a).S, lambda: [_spd()]),
    "linalg.svdvals": (L.svdvals, lambda: [_spd()]),
    "linalg.diagonal": (L.diagonal, lambda: [_spd()]),
    "linalg.matmul": (L.matmul, lambda: [_spd(), _vec(N)]),
    "linalg.multi_dot": (lambda a, b: L.multi_dot([a, b]), lambda: [_spd(), _spd()]),
    "linalg.tensorinv": (lambda a: L.tensorinv(a, ind=1), lambda: [_spd()]),
    "linalg.tensorsolve": (L.tensorsolve, lambda: [_spd(), _vec(N)]),
    "linalg.cross": (L.cross, lambda: [_vec(N), _vec(N)]),
    "linalg.vecdot": (L.vecdot, lambda: [_vec(N), _vec(N)]),
    # old API and the matrix products of rules_linalg.cpp
    "det": (torch.det, lambda: [_spd()]),
    "logdet": (torch.logdet, lambda: [_spd()]),
    "slogdet": (torch.slogdet, lambda: [_spd()]),
    "inverse": (torch.inverse, lambda: [_spd()]),
    "cholesky": (torch.cholesky, lambda: [_spd()]),
    "cholesky_solve": (torch.cholesky_solve, lambda: [_vec(N, 2), torch.linalg.cholesky(_spd())]),
    "cholesky_inverse": (torch.cholesky_inverse, lambda: [torch.linalg.cholesky(_spd())]),
    "qr": (torch.qr, lambda: [_spd()]),
    "svd": (lambda a: torch.svd(a).S, lambda: [_spd()]),
    "pinverse": (torch.pinverse, lambda: [_spd()]),
    "lu": (lambda a: torch.lu(a)[0], lambda: [_spd()]),
    "lu_solve": (lambda b, lu, p: torch.lu_solve(b, lu, p), lambda: [_vec(N, 2), *_lu(_spd())]),
    "lu_unpack": (torch.lu_unpack, lambda: list(_lu(_spd()))),
    "triangular_solve": (lambda b, a: torch.triangular_solve(b, a).solution, lambda: [_vec(N, 2), _tri()]),
    "matrix_exp": (torch.matrix_exp, lambda: [_spd() / 10]),
    "matrix_power": (lambda a: torch.matrix_power(a, 2), lambda: [_spd()]),
    "geqrf": (torch.geqrf, lambda: [_spd()]),
    "orgqr": (torch.orgqr, lambda: list(_qr_parts(_spd()))),
    "ormqr": (torch.ormqr, lambda: [*_qr_parts(_spd()), _vec(N, 2)]),
    "triu": (torch.triu, lambda: [_spd()]),
    "tril": (torch.tril, lambda: [_spd()]),
    "trace": (torch.trace, lambda: [_spd()]),
    "nuclear_norm": (torch.nuclear_norm, lambda: [_spd()]),
    "mm": (torch.mm, lambda: [_spd(), _vec(N, 2)]),
    "mv": (torch.mv, lambda: [_spd(), _vec(N)]),
    "bmm": (torch.bmm, lambda: [_vec(2, N, N), _vec(2, N, 2)]),
    "dot": (torch.dot, lambda: [_vec(N), _vec(N)]),
    "vdot": (torch.vdot, lambda: [_vec(N), _vec(N)]),
    "matmul": (torch.matmul, lambda: [_spd(), _vec(N, 2)]),
    "addmm": (torch.addmm, lambda: [_vec(N, 2), _spd(), _vec(N, 2)]),
    "addmv": (torch.addmv, lambda: [_vec(N), _spd(), _vec(N)]),
    "addr": (torch.addr, lambda: [_spd(), _vec(N), _vec(N)]),
    "baddbmm": (torch.baddbmm, lambda: [_vec(2, N, 2), _vec(2, N, N), _vec(2, N, 2)]),
    "addbmm": (torch.addbmm, lambda: [_vec(N, 2), _vec(2, N, N), _vec(2, N, 2)]),
    "outer": (torch.outer, lambda: [_vec(N), _vec(N)]),
    "inner": (torch.inner, lambda: [_vec(N), _vec(N)]),
}

# Ops whose valid-rank cases take vmap's for-loop fallback (no rule is claimed for them).
FALLBACK_OK = set()


# (op, argument, rank) cases where torch itself is no referee. lu_unpack does not check the rank
# of `pivots` and reads min(m, n) of them from a 0-dim tensor, past its one element: whether
# it raises ('pivots ... must be between 1 and LU.size(-2)') depends on the memory it reads, so
# the same call raised in one process and returned in another (seen in CI, about 1 run in 6).
NO_REFEREE = {("lu_unpack", 1, 0)}


def _lower(t, rank):
    """t with `rank` (< t.dim()) dims, keeping its dtype: the first elements of its flattening."""
    flat = t.reshape(-1)
    return flat[0] if rank == 0 else flat[: t.shape[-1]]


def _batch(args, which):
    """B copies (slightly different) of the arguments in `which`, stacked at dim 0; in_dims."""
    out, in_dims = [], []
    for i, a in enumerate(args):
        if i in which:
            noise = [(a + 0.01 * k) if a.is_floating_point() else a for k in range(B)]
            out.append(torch.stack(noise))
            in_dims.append(0)
        else:
            out.append(a)
            in_dims.append(None)
    return out, tuple(in_dims)


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test compares whatever torch raises
        return e
    return None


def _first_line(e):
    return str(e).strip().splitlines()[0]


@pytest.mark.parametrize("name", list(CASES))
def test_too_few_dims_raise_torchs_error(name):
    fn, make = CASES[name]
    args = make()
    checked = 0
    for i, a in enumerate(args):
        for rank in range(min(a.dim(), 2)):
            if (name, i, rank) in NO_REFEREE:
                continue
            low = list(args)
            low[i] = _lower(a, rank)
            for which in ({i}, set(range(len(args)))):
                batched, in_dims = _batch(low, which)
                # the unbatched call on one example (element 0) is the referee
                example = [b[0] if d == 0 else b for b, d in zip(batched, in_dims)]
                ref = _error_of(fn, *example)
                got = _error_of(ft.vmap(fn, in_dims=in_dims), *batched)
                where = f"{name}: argument {i} with {rank} dims, batched {sorted(which)}"
                if got is not None:
                    assert "INTERNAL ASSERT" not in str(got), f"{where}: {got}"
                if ref is None:
                    # torch accepts this rank: vmap must equal the for-loop
                    assert got is None, f"{where}: torch accepts it, vmap raised {got!r}"
                    expected = [
                        fn(*[b[k] if d == 0 else b for b, d in zip(batched, in_dims)]) for k in range(B)
                    ]
                    actual = ft.vmap(fn, in_dims=in_dims)(*batched)
                    _assert_rows(actual, expected, where)
                    continue
                checked += 1
                assert got is not None, f"{where}: torch raises {ref!r}, vmap returned a result"
                assert type(got) is type(ref), f"{where}: {type(got).__name__} vs {ref!r}"
                assert _first_line(ref) == _first_line(got), f"{where}: {got!r} vs {ref!r}"
    assert checked or name in (
        "linalg.vecdot",
        "linalg.cross",
        "dot",
        "vdot",
        "outer",
        "inner",
        "linalg.matmul",
        "linalg.tensorsolve",
    ), f"{name}: no too-low rank raised anything without vmap: the case checks nothing"


def _assert_rows(actual, rows, where):
    flat_a, _ = torch.utils._pytree.tree_flatten(actual)
    flat_r = [torch.utils._pytree.tree_flatten(r)[0] for r in rows]
    assert len(flat_a) == len(flat_r[0]), where
    for j, x in enumerate(flat_a):
        y = torch.stack([fr[j] for fr in flat_r])
        assert x.shape == y.shape, f"{where}: output {j}: {list(x.shape)} vs {list(y.shape)}"
        torch.testing.assert_close(x, y, msg=lambda m: f"{where}: output {j}: {m}")


# Valid ranks, including logical batch dims that differ between arguments (which broadcast):
# vmap equals the for-loop, with the for-loop fallback forbidden.
BROADCAST_CASES = {
    "solve_triangular_more_A": ("linalg.solve_triangular", lambda: [_tri(2), _vec(N, 2)]),
    "solve_triangular_more_B": ("linalg.solve_triangular", lambda: [_tri(), _vec(2, N, 2)]),
    "solve_more_A_vector": ("linalg.solve", lambda: [_spd(2), _vec(N)]),
    "solve_more_A_matrix": ("linalg.solve", lambda: [_spd(2), _vec(N, 2)]),
    "solve_more_B": ("linalg.solve", lambda: [_spd(), _vec(2, N, 2)]),
    "solve_batched_vector": ("linalg.solve", lambda: [_spd(2), _vec(2, N)]),
    "solve_ex_more_A": ("linalg.solve_ex", lambda: [_spd(2), _vec(N, 2)]),
    "lstsq_batched": ("linalg.lstsq", lambda: [_spd(2), _vec(2, N, 2)]),
    "lstsq_vector_batched": ("linalg.lstsq_vector", lambda: [_spd(2), _vec(2, N)]),
    "cholesky_solve_more_B": ("cholesky_solve", lambda: [_vec(2, N, 2), torch.linalg.cholesky(_spd())]),
    "lu_solve_more_B": ("linalg.lu_solve", lambda: [*_lu(_spd()), _vec(2, N, 2)]),
    "ldl_solve_more_B": ("linalg.ldl_solve", lambda: [*_ldl(_spd()), _vec(2, N, 2)]),
    "triangular_solve_more_A": ("triangular_solve", lambda: [_vec(N, 2), _tri(2)]),
    "det_batched": ("linalg.det", lambda: [_spd(2)]),
    "eigvals_batched": ("linalg.eigvals", lambda: [_spd(2)]),
}


@pytest.mark.parametrize("name", list(CASES) + list(BROADCAST_CASES))
def test_valid_ranks_equal_for_loop(name, fallback_mode):
    if name in BROADCAST_CASES:
        base, make = BROADCAST_CASES[name]
        fn = CASES[base][0]
    else:
        fn, make = CASES[name]
    args = make()
    mode = "quiet" if name in FALLBACK_OK else "error"
    for which in [{i} for i in range(len(args))] + [set(range(len(args)))]:
        batched, in_dims = _batch(args, which)
        rows = [fn(*[b[k] if d == 0 else b for b, d in zip(batched, in_dims)]) for k in range(B)]
        with fallback_mode(mode):
            actual = ft.vmap(fn, in_dims=in_dims)(*batched)
        _assert_rows(actual, rows, f"{name}, batched {sorted(which)}")


def test_issue_examples():
    """The two calls of the issue: a silent result and an internal assert."""
    x = torch.randn(3, 3)
    with pytest.raises(
        RuntimeError, match="linalg.eigvals: The input tensor A must have at least 2 dimensions"
    ):
        ft.vmap(torch.linalg.eigvals)(x)
    with pytest.raises(RuntimeError, match="linalg.det: The input tensor A must have at least 2 dimensions"):
        ft.vmap(torch.linalg.det)(x)


def test_batched_tensor_invariant_is_a_clear_error():
    """BatchedTensorImpl asserts that its batch dim names a dim of its value (an internal
    invariant): the entry points that build one check it first and name the problem."""
    x = torch.randn(2)
    level = ft._C._push_vmap(2, "error")
    try:
        with pytest.raises(RuntimeError, match="out of range") as info:
            ft._C._add_batch_dim(x, 1, level)
        assert "INTERNAL ASSERT" not in str(info.value)
    finally:
        ft._C._pop(level)


# ------------------------------------------------------------------------------------------------
# The same check over torch's OpInfo samples of every linalg op (and the old-API aliases): the
# sample's input given 0 or 1 dims per example (other arguments as the sample has them).


def _linalg_opinfos():
    from torch.testing._internal.common_methods_invocations import op_db

    names = {
        "det",
        "logdet",
        "slogdet",
        "inverse",
        "cholesky",
        "cholesky_solve",
        "cholesky_inverse",
        "qr",
        "svd",
        "pinverse",
        "lu",
        "lu_solve",
        "lu_unpack",
        "triangular_solve",
        "matrix_exp",
        "geqrf",
        "ormqr",
        "trace",
        "mm",
        "mv",
        "bmm",
        "dot",
        "vdot",
        "addmm",
        "addmv",
        "addr",
        "baddbmm",
        "addbmm",
        "triu",
        "tril",
    }
    return [
        op
        for op in op_db
        if (op.name.startswith("linalg.") or op.name in names) and torch.float64 in op.supported_dtypes("cpu")
    ]


_OPINFOS = {
    op.name + ("." + op.variant_test_name if op.variant_test_name else ""): op for op in _linalg_opinfos()
}


@pytest.mark.parametrize("name", sorted(_OPINFOS))
def test_opinfo_samples_with_too_few_dims(name):
    op = _OPINFOS[name]
    checked = set()
    for s in list(op.sample_inputs("cpu", DT))[:12]:
        x = s.input
        if not isinstance(x, torch.Tensor) or x.layout != torch.strided or x.numel() == 0:
            continue
        for rank in range(min(x.dim(), 2)):
            if (x.dim(), rank) in checked:
                continue
            checked.add((x.dim(), rank))
            low = _lower(x, rank)
            batch = torch.stack([low, low + 0.5])

            def fn(t, s=s):
                return op(t, *s.args, **s.kwargs)

            ref = _error_of(fn, batch[0])
            got = _error_of(ft.vmap(fn), batch)
            where = f"{name}: input with {rank} dims (sample input {list(x.shape)})"
            if got is not None:
                assert "INTERNAL ASSERT" not in str(got), f"{where}: {got}"
            if ref is None:
                assert got is None, f"{where}: torch accepts it, vmap raised {got!r}"
                _assert_rows(ft.vmap(fn)(batch), [fn(b) for b in batch], where)
                continue
            assert got is not None, f"{where}: torch raises {ref!r}, vmap returned a result"
            assert type(got) is type(ref), f"{where}: {got!r} vs torch's {ref!r}"
            assert _first_line(ref) == _first_line(got), f"{where}: {got!r} vs torch's {ref!r}"
    if not checked:
        pytest.skip("no sample whose input is a non-empty tensor with dims to take away")
