"""vmap batching rules for padding, pooling (1d, adaptive max 3d, max_unpool, im2col/col2im),
upsampling and grid_sample, the add* matrix products (baddbmm, addbmm, addmv, addr), vdot,
linalg_cross/lstsq/pinv and the old-API decompositions, cdist/pdist, _trilinear and the
remaining losses (nll_loss2d, multi_margin, multilabel_margin, soft_margin).

Every case runs under ft.set_vmap_fallback('error') (so a real rule must have run) and is compared
with a Python for-loop and with torch.func.vmap, for each placement of the batch dim over the
arguments (0, -1, a middle dim, and None for each argument in turn). Gradients go through the
backward ops under vmap: ft.vmap(ft.grad), ft.jacrev and ft.jacfwd against torch.func."""

import pytest
import torch
import torch.nn.functional as F
from _placements import F_, I_, S_, case_params, run, torch_func_agrees
from test_vmap import assert_same

import functorch_lite as ft

pytestmark = pytest.mark.filterwarnings("ignore:torch.cholesky is deprecated")

# ------------------------------------------------------------------------------------------------
# Argument specs (see _placements): F_(*shape) a float tensor, I_(high, *shape) integer indices in
# [0, high), S_(*shape) +-1, ("unit", shape) inside (-1, 1).

_NAN = float("nan")


def _maxpool_unpool2d(x):
    y, i = F.max_pool2d(x, 2, return_indices=True)
    return F.max_unpool2d(y, i, 2)


def _maxpool_unpool3d(x):
    y, i = F.max_pool3d(x, 2, return_indices=True)
    return F.max_unpool3d(y, i, 2)


def _interp(mode, **kw):
    return lambda a: F.interpolate(a, mode=mode, **kw)


def _spd(a):
    return a @ a.transpose(-1, -2) + 4 * torch.eye(a.size(-1))


CASES = {
    # padding
    "pad_const_1": (lambda a: F.pad(a, (1, 2)), [F_(4, 5)]),
    "pad_const_2_value": (lambda a: F.pad(a, (1, 0, 2, 1), value=0.5), [F_(2, 4, 5)]),
    "pad_const_negative": (lambda a: F.pad(a, (-1, 2, 0, -2)), [F_(4, 5)]),
    "pad_const_all_dims": (lambda a: F.pad(a, (1, 1, 2, 0)), [F_(4, 5)]),
    "pad_const_1d": (lambda a: F.pad(a, (2, 1)), [F_(5)]),
    "pad_reflect1d": (lambda a: F.pad(a, (2, 1), mode="reflect"), [F_(2, 4, 5)]),
    "pad_reflect1d_no_n": (lambda a: F.pad(a, (2, 1), mode="reflect"), [F_(4, 5)]),
    "pad_reflect2d": (lambda a: F.pad(a, (2, 1, 1, 2), mode="reflect"), [F_(2, 2, 4, 5)]),
    "pad_reflect2d_no_n": (lambda a: F.pad(a, (2, 1, 1, 2), mode="reflect"), [F_(2, 4, 5)]),
    "pad_reflect3d": (lambda a: F.pad(a, (1, 1, 1, 0, 0, 1), mode="reflect"), [F_(2, 2, 4, 5, 4)]),
    "pad_replicate1d": (lambda a: F.pad(a, (2, 3), mode="replicate"), [F_(4, 5)]),
    "pad_replicate2d": (lambda a: F.pad(a, (2, 1, 0, 2), mode="replicate"), [F_(2, 2, 4, 5)]),
    "pad_replicate3d": (lambda a: F.pad(a, (1, 2, 0, 1, 2, 0), mode="replicate"), [F_(2, 4, 5, 4)]),
    "pad_circular": (lambda a: F.pad(a, (2, 1), mode="circular"), [F_(2, 4, 5)]),
    # pooling
    "max_pool1d": (lambda a: F.max_pool1d(a, 2), [F_(2, 4, 5)]),
    "max_pool1d_no_n": (lambda a: F.max_pool1d(a, 3, 2, padding=1), [F_(4, 5)]),
    "max_pool1d_indices": (lambda a: F.max_pool1d(a, 2, return_indices=True), [F_(2, 4, 5)]),
    "avg_pool1d": (lambda a: F.avg_pool1d(a, 2), [F_(2, 4, 5)]),
    "adaptive_avg_pool1d": (lambda a: F.adaptive_avg_pool1d(a, 3), [F_(2, 4, 5)]),
    "adaptive_max_pool1d": (lambda a: F.adaptive_max_pool1d(a, 3, return_indices=True), [F_(2, 4, 5)]),
    "adaptive_max_pool3d": (
        lambda a: F.adaptive_max_pool3d(a, (2, 3, 2), return_indices=True),
        [F_(2, 2, 4, 5, 4)],
    ),
    # N = 1 made the expanded unbatched indices a stride-0 view after folding (a crash), and
    # permuted indices were read as dense by the CPU kernel
    "adaptive_max_pool3d_backward": (
        lambda g, x: torch.ops.aten.adaptive_max_pool3d_backward(
            g,
            x,
            F.adaptive_max_pool3d(x, 2, return_indices=True)[1].transpose(0, 1).contiguous().transpose(0, 1),
        ),
        [F_(1, 2, 2, 2, 2), F_(1, 2, 4, 5, 4)],
    ),
    "adaptive_max_pool3d_no_n": (lambda a: F.adaptive_max_pool3d(a, 2), [F_(2, 4, 5, 4)]),
    "max_unpool2d": (_maxpool_unpool2d, [F_(2, 2, 4, 6)]),
    "max_unpool2d_no_n": (_maxpool_unpool2d, [F_(2, 4, 6)]),
    "max_unpool3d": (_maxpool_unpool3d, [F_(2, 2, 4, 6, 4)]),
    "max_unpool2d_given": (
        lambda y, i: F.max_unpool2d(y, i, 2, output_size=(4, 4)),
        [F_(2, 2, 2, 2), I_(16, 2, 2, 2, 2)],
    ),
    "unfold": (lambda a: F.unfold(a, 2, padding=1), [F_(2, 2, 4, 5)]),
    "unfold_no_n": (lambda a: F.unfold(a, (2, 3), stride=2), [F_(2, 4, 5)]),
    "fold": (lambda a: F.fold(a, (4, 5), 2), [F_(2, 8, 12)]),
    "fold_no_n": (lambda a: F.fold(a, (3, 4), 2, padding=1), [F_(8, 20)]),
    # upsampling
    "nearest1d": (_interp("nearest", scale_factor=2), [F_(2, 4, 5)]),
    "nearest2d": (_interp("nearest", size=(5, 7)), [F_(2, 2, 4, 5)]),
    "nearest3d": (_interp("nearest", scale_factor=(2, 1, 2)), [F_(2, 2, 4, 5, 2)]),
    "nearest_exact1d": (_interp("nearest-exact", size=7), [F_(2, 4, 5)]),
    "nearest_exact2d": (_interp("nearest-exact", scale_factor=1.5), [F_(2, 2, 4, 5)]),
    "nearest_exact3d": (_interp("nearest-exact", size=(3, 6, 4)), [F_(2, 2, 4, 5, 2)]),
    "linear1d": (_interp("linear", scale_factor=2, align_corners=False), [F_(2, 4, 5)]),
    "linear1d_ac": (_interp("linear", size=8, align_corners=True), [F_(2, 4, 5)]),
    "bilinear2d": (_interp("bilinear", scale_factor=2), [F_(2, 2, 4, 5)]),
    "bicubic2d": (_interp("bicubic", size=(6, 7), align_corners=True), [F_(2, 2, 4, 5)]),
    "trilinear3d": (_interp("trilinear", scale_factor=2), [F_(2, 2, 4, 5, 2)]),
    "bilinear2d_aa": (_interp("bilinear", size=(2, 3), antialias=True), [F_(2, 2, 4, 5)]),
    "bicubic2d_aa": (_interp("bicubic", size=(3, 2), antialias=True), [F_(2, 2, 4, 5)]),
    "grid_sample2d": (
        lambda a, g: F.grid_sample(a, g, align_corners=False),
        [F_(2, 2, 4, 5), ("unit", (2, 3, 4, 2))],
    ),
    "grid_sample2d_nearest": (
        lambda a, g: F.grid_sample(a, g, mode="nearest", padding_mode="border", align_corners=True),
        [F_(2, 2, 4, 5), ("unit", (2, 3, 4, 2))],
    ),
    "grid_sample3d": (
        lambda a, g: F.grid_sample(a, g, align_corners=False),
        [F_(2, 2, 4, 5, 2), ("unit", (2, 3, 2, 2, 3))],
    ),
    # matrix products
    "baddbmm": (torch.baddbmm, [F_(2, 4, 5), F_(2, 4, 6), F_(2, 6, 5)]),
    "baddbmm_broadcast_self": (
        lambda s, a, b: torch.baddbmm(s, a, b, beta=0.5, alpha=2),
        [F_(5), F_(2, 4, 6), F_(2, 6, 5)],
    ),
    "baddbmm_beta0": (
        lambda s, a, b: torch.baddbmm(s.log(), a, b, beta=0),
        [F_(4, 5), F_(2, 4, 6), F_(2, 6, 5)],
    ),
    "addbmm": (torch.addbmm, [F_(4, 5), F_(2, 4, 6), F_(2, 6, 5)]),
    "addbmm_broadcast_self": (
        lambda s, a, b: torch.addbmm(s, a, b, beta=2, alpha=0.5),
        [F_(1, 5), F_(2, 4, 6), F_(2, 6, 5)],
    ),
    "addbmm_beta0": (
        lambda s, a, b: torch.addbmm(s.log(), a, b, beta=0),
        [F_(4, 5), F_(2, 4, 6), F_(2, 6, 5)],
    ),
    "addbmm_alpha0": (
        lambda s, a, b: torch.addbmm(s, a.log(), b, alpha=0),
        [F_(4, 5), F_(2, 4, 6), F_(2, 6, 5)],
    ),
    "addmv": (torch.addmv, [F_(4), F_(4, 6), F_(6)]),
    "addmv_scalars": (lambda s, a, b: torch.addmv(s, a, b, beta=0.5, alpha=-2), [F_(), F_(4, 6), F_(6)]),
    "addmv_beta0": (lambda s, a, b: torch.addmv(s.log(), a, b, beta=0), [F_(4), F_(4, 6), F_(6)]),
    "addmv_alpha0": (lambda s, a, b: torch.addmv(s, a.log(), b, alpha=0), [F_(4), F_(4, 6), F_(6)]),
    "addr": (torch.addr, [F_(4, 5), F_(4), F_(5)]),
    "addr_broadcast_self": (lambda s, a, b: torch.addr(s, a, b, beta=2, alpha=0.5), [F_(5), F_(4), F_(5)]),
    "addr_beta0": (lambda s, a, b: torch.addr(s.log(), a, b, beta=0), [F_(4, 5), F_(4), F_(5)]),
    "addr_alpha0": (lambda s, a, b: torch.addr(s, a.log(), b, alpha=0), [F_(4, 5), F_(4), F_(5)]),
    "vdot": (torch.vdot, [F_(5), F_(5)]),
    "vdot_complex": (lambda a, b: torch.vdot(a + 1j * b, b - 2j * a), [F_(5), F_(5)]),
    "cross": (lambda a, b: torch.linalg.cross(a, b), [F_(4, 3), F_(4, 3)]),
    "cross_dim0": (lambda a, b: torch.linalg.cross(a, b, dim=0), [F_(3, 4), F_(3, 4)]),
    "cross_broadcast": (lambda a, b: torch.linalg.cross(a, b), [F_(4, 3), F_(1, 3)]),
    "lstsq": (lambda a, b: torch.linalg.lstsq(a, b), [F_(6, 4), F_(6, 2)]),
    "lstsq_gelsd": (lambda a, b: torch.linalg.lstsq(a, b, driver="gelsd"), [F_(6, 4), F_(6, 2)]),
    "lstsq_vector": (lambda a, b: torch.linalg.lstsq(a, b).solution, [F_(2, 6, 4), F_(2, 6)]),
    "pinv": (torch.linalg.pinv, [F_(4, 6)]),
    "pinv_hermitian": (lambda a: torch.linalg.pinv(_spd(a), hermitian=True), [F_(4, 4)]),
    "pinv_atol": (lambda a, t: torch.linalg.pinv(a, atol=t.abs()), [F_(2, 4, 6), F_()]),
    "pinv_rtol": (
        lambda a, t: torch.linalg.pinv(a, rtol=t.abs(), atol=torch.tensor(0.1)),
        [F_(2, 4, 6), F_(2)],
    ),
    "cholesky": (lambda a: torch.cholesky(_spd(a)), [F_(4, 4)]),
    "cholesky_upper": (lambda a: torch.cholesky(_spd(a), upper=True), [F_(2, 4, 4)]),
    "geqrf": (torch.geqrf, [F_(5, 4)]),
    "ormqr": (lambda a, c: torch.ormqr(*torch.geqrf(a), c), [F_(5, 4), F_(5, 3)]),
    "ormqr_transpose_right": (
        lambda a, c: torch.ormqr(*torch.geqrf(a), c, left=False, transpose=True),
        [F_(5, 4), F_(3, 5)],
    ),
    # distances and bilinear
    "cdist": (torch.cdist, [F_(4, 3), F_(5, 3)]),
    "cdist_p1_batch": (lambda a, b: torch.cdist(a, b, p=1), [F_(2, 4, 3), F_(5, 3)]),
    "cdist_pinf_broadcast": (lambda a, b: torch.cdist(a, b, p=float("inf")), [F_(4, 3), F_(2, 5, 3)]),
    "cdist_p0.5_mm": (lambda a, b: torch.cdist(a, b, p=0.5), [F_(30, 3), F_(27, 3)]),
    "cdist_mm": (lambda a, b: torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist"), [F_(4, 3), F_(5, 3)]),
    "pdist": (F.pdist, [F_(5, 3)]),
    "pdist_p1": (lambda a: F.pdist(a, p=1), [F_(5, 3)]),
    "pdist_pinf": (lambda a: F.pdist(a, p=float("inf")), [F_(4, 2)]),
    "bilinear": (F.bilinear, [F_(2, 4), F_(2, 5), F_(6, 4, 5)]),
    "bilinear_bias": (F.bilinear, [F_(4), F_(5), F_(6, 4, 5), F_(6)]),
    # losses
    "nll_loss2d": (F.nll_loss, [F_(2, 4, 5, 2), I_(4, 2, 5, 2)]),
    "nll_loss2d_none": (
        lambda a, t: F.nll_loss(a, t, reduction="none", ignore_index=1),
        [F_(2, 4, 5, 2), I_(4, 2, 5, 2)],
    ),
    "nll_loss2d_weight_sum": (
        lambda a, t, w: F.nll_loss(a, t, w.exp(), reduction="sum"),
        [F_(2, 4, 5, 2), I_(4, 2, 5, 2), F_(4)],
    ),
    "nll_loss2d_weight_mean": (
        lambda a, t, w: F.nll_loss(a, t, w.exp(), ignore_index=0),
        [F_(2, 4, 5, 2), I_(4, 2, 5, 2), F_(4)],
    ),
    "cross_entropy_3d": (lambda a, t: F.cross_entropy(a, t), [F_(2, 4, 5), I_(4, 2, 5)]),
    "soft_margin": (F.soft_margin_loss, [F_(4, 5), S_(4, 5)]),
    "soft_margin_none": (lambda a, t: F.soft_margin_loss(a, t, reduction="none"), [F_(4, 5), S_(4, 5)]),
    "multi_margin": (F.multi_margin_loss, [F_(4, 5), I_(5, 4)]),
    "multi_margin_1d": (F.multi_margin_loss, [F_(5), I_(5)]),
    "multi_margin_1d_target_1": (F.multi_margin_loss, [F_(5), I_(5, 1)]),
    "multi_margin_p2_none": (
        lambda a, t: F.multi_margin_loss(a, t, p=2, margin=0.5, reduction="none"),
        [F_(4, 5), I_(5, 4)],
    ),
    "multi_margin_weight_sum": (
        lambda a, t, w: F.multi_margin_loss(a, t, weight=w.exp(), reduction="sum"),
        [F_(4, 5), I_(5, 4), F_(5)],
    ),
    "multi_margin_0d": (lambda a, t: F.multi_margin_loss(a, t, reduction="none"), [F_(), I_(1)]),
    "multilabel_margin": (F.multilabel_margin_loss, [F_(4, 5), I_(5, 4, 5)]),
    "multilabel_margin_0d": (F.multilabel_margin_loss, [F_(), I_(1)]),
    "multilabel_margin_1d_none": (
        lambda a, t: F.multilabel_margin_loss(a, t, reduction="none"),
        [F_(5), I_(5, 5)],
    ),
    "multilabel_margin_sum": (
        lambda a, t: F.multilabel_margin_loss(a, t, reduction="sum"),
        [F_(4, 5), I_(5, 4, 5)],
    ),
}

# Cases where torch.func.vmap disagrees with the for-loop (ours is compared with the loop only
# there): name -> (placements, or None for all; why).
TORCH_FUNC_WRONG = {
    "addbmm_alpha0": (None, "propagates NaNs of the product, which addbmm with alpha=0 ignores"),
    "addmv_alpha0": (None, "propagates NaNs of the product, which addmv with alpha=0 ignores"),
    "lstsq_vector": (
        {"0", "-1", "mid", "None@0"},
        "raises 'input.size(-2) should match "
        "other.size(-2)': a batched vector right-hand side is taken as a matrix",
    ),
}

# Placements where the function itself is invalid for the for-loop as well.
SKIP = {}

ATOL = {
    "lstsq": 1e-4,
    "lstsq_gelsd": 1e-4,
    "lstsq_vector": 1e-4,
    "pinv": 1e-4,
    "pinv_atol": 1e-4,
    "pinv_rtol": 1e-4,
    "pinv_hermitian": 1e-4,
    "ormqr": 1e-4,
    "ormqr_transpose_right": 1e-4,
    "bicubic2d_aa": 1e-4,
    "bilinear2d_aa": 1e-4,
    "cdist_mm": 1e-4,
    "cdist_p0.5_mm": 1e-4,
}


@pytest.mark.parametrize(
    "name,pname,in_dims", list(case_params(CASES, skip=lambda name, pname: pname in SKIP.get(name, ())))
)
def test_rule(name, pname, in_dims):
    fn, specs = CASES[name]
    run(
        fn,
        specs,
        in_dims,
        torch_func=torch_func_agrees(TORCH_FUNC_WRONG, name, pname),
        atol=ATOL.get(name, 1e-5),
    )


# ------------------------------------------------------------------------------------------------
# Transforms: vmap(grad), jacrev and jacfwd run the ops' backward ops (and forward-mode formulas)
# under vmap, so those need rules too. All under the fallback's 'error' mode.

_D = torch.float64
_W = torch.randn(6, 5, 5, dtype=_D)
_T2D = torch.randint(0, 4, (2, 5, 2))
_T1 = torch.randint(0, 5, (4,))
_TML = torch.tensor([[1, 3, -1, 0, 0], [0, -1, 2, 2, 2], [4, 2, 1, 0, -1], [2, -1, 0, 0, 0]])
_GRID = torch.rand(2, 3, 4, 2, dtype=_D) * 1.8 - 0.9
_M2 = torch.randn(2, 6, 5, dtype=_D)
_V = torch.randn(6, dtype=_D)
_IMG = torch.randn(2, 2, 4, 5, dtype=_D)

DIFF_FUNCS = {
    # name: (f, input shape)
    "pad_const": (lambda x: F.pad(x, (1, 2, 0, 1), value=0.3), (2, 4, 5)),
    "pad_reflect2d": (lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), (2, 2, 4, 5)),
    "pad_reflect1d_no_n": (lambda x: F.pad(x, (2, 1), mode="reflect"), (4, 5)),
    "pad_replicate3d": (lambda x: F.pad(x, (1, 2, 0, 1, 2, 0), mode="replicate"), (2, 4, 5, 4)),
    "pad_replicate1d": (lambda x: F.pad(x, (3, 1), mode="replicate"), (2, 4, 5)),
    "max_pool1d": (lambda x: F.max_pool1d(x, 2), (2, 4, 6)),
    "adaptive_max_pool3d": (lambda x: F.adaptive_max_pool3d(x, 2), (2, 4, 5, 4)),
    "max_unpool2d": (_maxpool_unpool2d, (2, 2, 4, 6)),
    "unfold": (lambda x: F.unfold(x, 2, padding=1), (2, 2, 4, 5)),
    "fold": (lambda x: F.fold(x, (4, 5), 2), (2, 8, 12)),
    "nearest2d": (_interp("nearest", scale_factor=2), (2, 2, 4, 5)),
    "nearest_exact1d": (_interp("nearest-exact", size=7), (2, 4, 5)),
    "linear1d": (_interp("linear", scale_factor=2), (2, 4, 5)),
    "bilinear2d": (_interp("bilinear", size=(5, 7), align_corners=True), (2, 2, 4, 5)),
    "bicubic2d": (_interp("bicubic", scale_factor=2), (2, 2, 4, 5)),
    "trilinear3d": (_interp("trilinear", scale_factor=2), (2, 2, 4, 5, 2)),
    "bilinear2d_aa": (_interp("bilinear", size=(2, 3), antialias=True), (2, 2, 4, 5)),
    "grid_sample_input": (lambda x: F.grid_sample(x, _GRID, align_corners=False), (2, 2, 4, 5)),
    "grid_sample_grid": (lambda g: F.grid_sample(_IMG, g.tanh(), align_corners=True), (2, 3, 4, 2)),
    "baddbmm": (lambda x: torch.baddbmm(x[:, :, :5], x, _M2, beta=0.5), (2, 4, 6)),
    "addbmm": (lambda x: torch.addbmm(x[0, :, :5], x, _M2, alpha=2), (2, 4, 6)),
    "addmv": (lambda x: torch.addmv(x[:, 0], x, _V, beta=2), (4, 6)),
    "addr": (lambda x: torch.addr(x[:, :3], x[:, 0], x[0, :3], alpha=0.5), (4, 6)),
    "vdot": (lambda x: torch.vdot(x[0], x[1]), (2, 6)),
    "cross": (lambda x: torch.linalg.cross(x[:, :3], x[:, 3:]), (4, 6)),
    "lstsq": (lambda x: torch.linalg.lstsq(x, x[:, :2].sin()).solution, (6, 4)),
    "pinv": (torch.linalg.pinv, (4, 6)),
    "cholesky": (lambda x: torch.cholesky(_spd(x)), (4, 4)),
    "cdist": (lambda x: torch.cdist(x, x[:3].cos()), (4, 3)),
    "cdist_p1": (lambda x: torch.cdist(x, x[:3].cos(), p=1), (4, 3)),
    "cdist_mm": (lambda x: torch.cdist(x, x.cos(), compute_mode="use_mm_for_euclid_dist"), (4, 3)),
    "pdist": (F.pdist, (5, 3)),
    "pdist_p3": (lambda x: F.pdist(x, p=3), (5, 3)),
    "bilinear": (lambda x: F.bilinear(x, x.sin()[:, :5], _W), (2, 5)),
    "nll_loss2d": (lambda x: F.nll_loss(x.log_softmax(1), _T2D), (2, 4, 5, 2)),
    "nll_loss2d_none": (lambda x: F.nll_loss(x, _T2D, reduction="none"), (2, 4, 5, 2)),
    "soft_margin": (lambda x: F.soft_margin_loss(x, x.sign().detach()), (4, 5)),
    "multi_margin": (lambda x: F.multi_margin_loss(x, _T1), (4, 5)),
    "multi_margin_p2_none": (lambda x: F.multi_margin_loss(x, _T1, p=2, reduction="none"), (4, 5)),
    "multi_margin_weight": (lambda x: F.multi_margin_loss(x, _T1, weight=x[0].exp().detach()), (4, 5)),
    "multilabel_margin": (lambda x: F.multilabel_margin_loss(x, _TML), (4, 5)),
    "multilabel_margin_none": (lambda x: F.multilabel_margin_loss(x, _TML, reduction="none"), (4, 5)),
    "multi_margin_0d": (lambda x: F.multi_margin_loss(x, torch.tensor(0)), ()),
    "multilabel_margin_0d": (lambda x: F.multilabel_margin_loss(x, torch.tensor(0)), ()),
}
TRANSFORMS = {
    "vmap_grad": lambda L, f, x: L.vmap(L.grad(lambda y: f(y).sin().sum()))(
        x.unsqueeze(0) * torch.tensor([1.0, -0.5, 2.0]).view(3, *[1] * x.dim())
    ),
    "jacrev": lambda L, f, x: L.jacrev(f)(x),
    "jacfwd": lambda L, f, x: L.jacfwd(f)(x),
}
# (function, transform) pairs torch cannot run (neither can we: forward AD uses torch's formulas).
TRANSFORM_SKIP = {
    ("lstsq", "jacfwd"): "forward AD of linalg_lstsq is not implemented in torch",
    ("cholesky", "jacfwd"): "forward AD of cholesky is not implemented in torch",
    ("multi_margin", "jacfwd"): "forward AD of multi_margin_loss is not implemented in torch",
    ("multi_margin_p2_none", "jacfwd"): "forward AD of multi_margin_loss is not implemented",
    ("multi_margin_weight", "jacfwd"): "forward AD of multi_margin_loss is not implemented",
    ("multilabel_margin", "jacfwd"): "forward AD of multilabel_margin_loss is not implemented",
    ("multi_margin_0d", "jacfwd"): "forward AD of multi_margin_loss is not implemented",
    ("multilabel_margin_0d", "jacfwd"): "forward AD of multilabel_margin_loss is not implemented",
    ("multilabel_margin_none", "jacfwd"): "forward AD of multilabel_margin_loss is not implemented",
    ("pdist", "jacfwd"): "forward AD of _pdist_forward is not implemented in torch",
    ("pdist_p3", "jacfwd"): "forward AD of _pdist_forward is not implemented in torch",
    ("bilinear2d_aa", "jacfwd"): "forward AD of _upsample_bilinear2d_aa is not implemented",
    ("cdist", "jacfwd"): "forward AD of _cdist_forward is not implemented in torch",
    ("cdist_p1", "jacfwd"): "forward AD of _cdist_forward is not implemented in torch",
    ("cdist_mm", "jacfwd"): "forward AD of _euclidean_dist is not implemented in torch",
    ("grid_sample_input", "jacfwd"): "forward AD of grid_sampler_2d is not implemented in torch",
    ("grid_sample_grid", "jacfwd"): "forward AD of grid_sampler_2d is not implemented in torch",
}
# Where torch.func's jacrev is wrong (checked against torch.autograd.functional.jacobian, which
# ours is compared with instead): name -> what torch.func gets wrong.
JACREV_TORCH_FUNC_WRONG = {
    "cdist": "torch.func's _cdist_backward batching rule gives a wrong Jacobian for p=2",
    "cdist_p1": "same for p=1",
}


def _transform_params():
    for fname in DIFF_FUNCS:
        for tname in TRANSFORMS:
            marks = ()
            if (fname, tname) in TRANSFORM_SKIP:
                marks = pytest.mark.skip(reason=TRANSFORM_SKIP[(fname, tname)])
            yield pytest.param(fname, tname, id=f"{fname}-{tname}", marks=marks)


@pytest.mark.parametrize("fname,tname", list(_transform_params()))
def test_transforms(fname, tname):
    f, shape = DIFF_FUNCS[fname]
    x = torch.randn(shape, dtype=torch.float64)
    t = TRANSFORMS[tname]
    ft._C._reset_fallback_ops_seen()
    ft.set_vmap_fallback("error")
    actual = t(ft, f, x)
    assert ft._C._fallback_ops_seen() == []
    ft.set_vmap_fallback("warn")
    if tname == "jacrev" and fname in JACREV_TORCH_FUNC_WRONG:
        expected = torch.autograd.functional.jacobian(f, x)
    else:
        expected = t(torch.func, f, x)
    assert_same(actual, expected, atol=1e-6, rtol=1e-6)
