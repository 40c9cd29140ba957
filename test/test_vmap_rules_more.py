"""vmap batching rules for ops that used to run as for-loops: the special functions, polygamma,
clamp_min/max with tensor bounds, glu, log_sigmoid, prelu, frexp, complex,
native_dropout_backward; var_mean/std_mean, aminmax, count_nonzero, dist, the aten::norm
overloads, full median/nanmedian, stable sort, _safe_softmax, renorm, logcumsumexp; unfold,
diag_embed, rot90, the *_scatter ops, view_as_real/view_as_complex, channel/pixel shuffles and the
*_copy variants of the views; the FFT primitives behind torch.fft.

Every case runs under ft.set_vmap_fallback('error') (so a real rule must have run) and is compared
with a Python for-loop and with torch.func.vmap, for each placement of the batch dim over the
arguments (0, -1, a middle dim, and None for each argument in turn), as in test_vmap_indexing.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _placements import F_, K, case_params, run, torch_func_agrees
from test_vmap import B, assert_same

import functorch_lite as ft

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------
# Argument specs (see _placements): F_(*shape) standard normal, K(kind, *shape) any other kind:
# "pos", "gt1", "n", "c", "b", "nan", "ninf".


# ------------------------------------------------------------------------------------------------
# Cases: name -> (fn, specs)

SPECIAL_UNARY = {
    "airy_ai": "f",
    "bessel_j0": "f",
    "bessel_j1": "f",
    "bessel_y0": "pos",
    "bessel_y1": "pos",
    "modified_bessel_i0": "f",
    "modified_bessel_i1": "f",
    "modified_bessel_k0": "pos",
    "modified_bessel_k1": "pos",
    "scaled_modified_bessel_k0": "pos",
    "scaled_modified_bessel_k1": "pos",
    "spherical_bessel_j0": "f",
    "i0e": "f",
    "i1e": "f",
    "erfcx": "f",
    "entr": "pos",
    "log_ndtr": "f",
}
POLYNOMIALS = [
    "chebyshev_polynomial_t",
    "chebyshev_polynomial_u",
    "chebyshev_polynomial_v",
    "chebyshev_polynomial_w",
    "shifted_chebyshev_polynomial_t",
    "shifted_chebyshev_polynomial_u",
    "shifted_chebyshev_polynomial_v",
    "shifted_chebyshev_polynomial_w",
    "hermite_polynomial_h",
    "hermite_polynomial_he",
    "laguerre_polynomial_l",
    "legendre_polynomial_p",
]


def _special(name):
    return getattr(torch.special, name)


POINTWISE = {
    **{f"special_{n}": (_special(n), [K(k, 3, 4)]) for n, k in SPECIAL_UNARY.items()},
    **{f"special_{n}_0d": (_special(n), [K(k)]) for n, k in list(SPECIAL_UNARY.items())[:3]},
    "special_zeta": (torch.special.zeta, [K("gt1", 3, 4), K("pos", 4)]),
    "special_zeta_self_scalar": (lambda q: torch.special.zeta(2.5, q), [K("pos", 3, 4)]),
    "special_zeta_other_scalar": (lambda x: torch.special.zeta(x, 1.5), [K("gt1", 3, 4)]),
    "special_xlog1py_self_scalar": (lambda y: torch.special.xlog1py(2.0, y), [K("pos", 3, 4)]),
    "special_xlog1py_other_scalar": (lambda x: torch.special.xlog1py(x, 0.5), [F_(3, 4)]),
    **{
        f"special_{n}": ((lambda f: lambda x, k: f(x, k))(_special(n)), [F_(3, 4), K("n", 4)])
        for n in POLYNOMIALS
    },
    **{
        f"special_{n}_n_scalar": ((lambda f: lambda x: f(x, 3))(_special(n)), [F_(3, 4)])
        for n in POLYNOMIALS[:4] + POLYNOMIALS[8:]
    },
    **{
        f"special_{n}_x_scalar": ((lambda f: lambda k: f(0.3, k))(_special(n)), [K("n", 3, 4)])
        for n in POLYNOMIALS[:2] + POLYNOMIALS[8:10]
    },
    "polygamma_1": (lambda x: torch.polygamma(1, x), [K("pos", 3, 4)]),
    "polygamma_3": (lambda x: torch.special.polygamma(3, x), [K("pos", 3, 4)]),
    "polygamma_0d": (lambda x: torch.polygamma(2, x), [K("pos")]),
    "polygamma_inplace": (lambda x: x.clone().polygamma_(2), [K("pos", 3, 4)]),
    "clamp_min_tensor": (torch.clamp_min, [F_(3, 4), F_(4)]),
    "clamp_max_tensor": (torch.clamp_max, [F_(3, 4), F_(3, 1)]),
    "clamp_min_tensor_0d_bound": (torch.clamp_min, [F_(3, 4), F_()]),
    "clamp_min_tensor_inplace": (lambda a, b: a.clone().clamp_min_(b), [F_(3, 4), F_(4)]),
    "clamp_max_tensor_inplace": (lambda a, b: a.clone().clamp_max_(b), [F_(3, 4), F_(3, 4)]),
    "glu_last": (lambda a: F.glu(a), [F_(3, 4)]),
    "glu_dim1": (lambda a: F.glu(a, 1), [F_(3, 4, 2)]),
    "glu_dim0": (lambda a: F.glu(a, 0), [F_(4, 3)]),
    "logsigmoid": (F.logsigmoid, [F_(3, 4)]),
    "log_sigmoid_forward": (aten.log_sigmoid_forward, [F_(3, 4)]),
    "log_sigmoid_backward": (
        lambda g, x: aten.log_sigmoid_backward(g, x, aten.log_sigmoid_forward(x)[1]),
        [F_(3, 4), F_(3, 4)],
    ),
    "prelu_channels": (F.prelu, [F_(2, 3, 4), F_(3)]),
    "prelu_single_weight": (F.prelu, [F_(2, 3), F_(1)]),
    "prelu_kernel_broadcast": (aten._prelu_kernel, [F_(2, 3, 4), F_(3, 1)]),
    "prelu_kernel_backward": (aten._prelu_kernel_backward, [F_(2, 3, 4), F_(2, 3, 4), F_(3, 1)]),
    "frexp": (torch.frexp, [F_(3, 4)]),
    "frexp_0d": (torch.frexp, [F_()]),
    "complex": (torch.complex, [F_(3, 4), F_(3, 4)]),
    "native_dropout_backward": (
        lambda g, m: aten.native_dropout_backward(g, m, 2.0),
        [F_(3, 4), K("b", 3, 4)],
    ),
}

REDUCTIONS = {
    "var_mean_dim": (lambda a: torch.var_mean(a, 1), [F_(3, 4, 5)]),
    "var_mean_keepdim_correction": (
        lambda a: torch.var_mean(a, [0, -1], correction=0, keepdim=True),
        [F_(3, 4, 5)],
    ),
    "var_mean_all": (torch.var_mean, [F_(3, 4)]),
    "std_mean_dim": (lambda a: torch.std_mean(a, -1), [F_(3, 4)]),
    "std_mean_all_keepdim": (lambda a: torch.std_mean(a, None, keepdim=True), [F_(3, 4)]),
    "std_mean_0d": (lambda a: torch.std_mean(a, correction=0), [F_()]),
    "aminmax_all": (torch.aminmax, [F_(3, 4)]),
    "aminmax_dim": (lambda a: torch.aminmax(a, dim=0), [F_(3, 4)]),
    "aminmax_dim_keepdim": (lambda a: torch.aminmax(a, dim=-1, keepdim=True), [F_(3, 4, 2)]),
    "aminmax_all_keepdim": (lambda a: aten.aminmax(a, keepdim=True), [F_(3, 4)]),
    "aminmax_0d": (lambda a: torch.aminmax(a, dim=0), [F_()]),
    "count_nonzero_all": (torch.count_nonzero, [K("n", 3, 4)]),
    "count_nonzero_dim": (lambda a: torch.count_nonzero(a, 1), [K("n", 3, 4)]),
    "count_nonzero_dims": (lambda a: torch.count_nonzero(a, (0, 2)), [K("n", 3, 4, 2)]),
    "count_nonzero_0d": (lambda a: torch.count_nonzero(a, 0), [K("n")]),
    "dist_2": (torch.dist, [F_(3, 4), F_(4)]),
    "dist_1": (lambda a, b: torch.dist(a, b, 1), [F_(3, 4), F_(3, 4)]),
    "dist_inf": (lambda a, b: torch.dist(a, b, math.inf), [F_(3, 4), F_(3, 1)]),
    "dist_0": (lambda a, b: torch.dist(a, b, 0), [K("n", 3, 4), K("n", 3, 4)]),
    "dist_0d": (torch.dist, [F_(), F_()]),
    "norm_scalaropt_dim": (lambda a: aten.norm.ScalarOpt_dim(a, 3, [1]), [F_(3, 4)]),
    "norm_scalaropt_dim_none_keepdim": (
        lambda a: aten.norm.ScalarOpt_dim(a, None, [0, 2], True),
        [F_(3, 4, 2)],
    ),
    "norm_scalaropt_dim_empty": (lambda a: aten.norm.ScalarOpt_dim(a, 1, []), [F_(3, 4)]),
    "norm_scalaropt_dim_dtype": (
        lambda a: aten.norm.ScalarOpt_dim_dtype(a, 2, [-1], False, dtype=torch.float64),
        [F_(3, 4)],
    ),
    "norm_scalar": (lambda a: aten.norm.Scalar(a, 1), [F_(3, 4)]),
    "norm_scalaropt_dtype": (lambda a: aten.norm.ScalarOpt_dtype(a, None, dtype=torch.float64), [F_(3, 4)]),
    "median_all": (torch.median, [F_(3, 4)]),
    "median_all_nan": (torch.median, [K("nan", 3, 4)]),
    "nanmedian_all": (torch.nanmedian, [K("nan", 3, 4)]),
    "nanmedian_dim": (lambda a: torch.nanmedian(a, 1), [K("nan", 3, 4)]),
    "sort_stable": (lambda a: torch.sort(a, dim=1, stable=True), [K("n", 3, 6)]),
    "sort_stable_descending": (lambda a: torch.sort(a, stable=True, descending=True), [K("n", 3, 6)]),
    "sort_stable_0d": (lambda a: torch.sort(a, stable=True), [F_()]),
    "safe_softmax": (lambda a: aten._safe_softmax(a, -1), [K("ninf", 3, 4)]),
    "safe_softmax_dim0_dtype": (lambda a: aten._safe_softmax(a, 0, torch.float64), [K("ninf", 3, 4)]),
    "renorm_0": (lambda a: torch.renorm(a, 2, 0, 1.0), [F_(3, 4)]),
    "renorm_1": (lambda a: torch.renorm(a, 1, 1, 0.5), [F_(3, 4, 2)]),
    "renorm_neg": (lambda a: torch.renorm(a, math.inf, -1, 0.7), [F_(3, 4)]),
    "renorm_inplace": (lambda a: a.clone().renorm_(2, 1, 0.5), [F_(3, 4)]),
    "logcumsumexp": (lambda a: torch.logcumsumexp(a, 1), [F_(3, 4)]),
}

VIEWS = {
    # *_copy variants
    "view_copy": (lambda a: aten.view_copy(a, [4, 3]), [F_(3, 4)]),
    "view_copy_needs_reshape": (lambda a: aten.view_copy(a.t(), [12]), [F_(3, 4)]),
    "unsqueeze_copy": (lambda a: aten.unsqueeze_copy(a, -1), [F_(3, 4)]),
    "squeeze_copy": (aten.squeeze_copy, [F_(3, 1, 4)]),
    "squeeze_copy_dim": (lambda a: aten.squeeze_copy.dim(a, 1), [F_(3, 1, 4)]),
    "squeeze_copy_dims": (lambda a: aten.squeeze_copy.dims(a, [0, 2]), [F_(1, 4, 1)]),
    "transpose_copy": (lambda a: aten.transpose_copy(a, 0, -1), [F_(3, 4, 2)]),
    "t_copy": (aten.t_copy, [F_(3, 4)]),
    "permute_copy": (lambda a: aten.permute_copy(a, [2, 0, 1]), [F_(3, 4, 2)]),
    "expand_copy": (lambda a: aten.expand_copy(a, [2, 3, 4]), [F_(3, 1)]),
    "alias_copy": (aten.alias_copy, [F_(3, 4)]),
    "narrow_copy": (lambda a: aten.narrow_copy(a, 1, 1, 2), [F_(3, 4)]),
    "narrow_copy_negative_start": (lambda a: torch.narrow_copy(a, 0, -2, 2), [F_(3, 4)]),
    "unbind_copy": (lambda a: aten.unbind_copy(a, 1), [F_(3, 4)]),
    "split_with_sizes_copy": (lambda a: aten.split_with_sizes_copy(a, [1, 3], -1), [F_(3, 4)]),
    "split_copy": (lambda a: aten.split_copy(a, 2, 0), [F_(3, 4)]),
    "unfold_copy": (lambda a: aten.unfold_copy(a, 1, 2, 1), [F_(3, 4)]),
    "diagonal_copy": (lambda a: aten.diagonal_copy(a, 1, 0, 1), [F_(3, 4)]),
    "diag_matrix": (torch.diag, [F_(4, 4)]),
    "select_copy": (lambda a: aten.select_copy(a, 1, -1), [F_(3, 4)]),
    "slice_copy": (lambda a: aten.slice_copy(a, 1, 1, None, 2), [F_(3, 4)]),
    # views and shape ops
    "unfold": (lambda a: a.unfold(1, 2, 1), [F_(3, 5)]),
    "unfold_step": (lambda a: a.unfold(0, 2, 2), [F_(5, 3)]),
    "unfold_last": (lambda a: a.unfold(-1, 3, 1), [F_(2, 3, 4)]),
    "unfold_0d": (lambda a: a.unfold(0, 1, 1), [F_()]),
    "diag_embed": (torch.diag_embed, [F_(4)]),
    "diag_embed_offset_dims": (lambda a: torch.diag_embed(a, 1, 0, 2), [F_(2, 3)]),
    "diag_vector": (lambda a: torch.diag(a, -1), [F_(4)]),
    "rot90": (torch.rot90, [F_(3, 4)]),
    "rot90_k2_dims": (lambda a: torch.rot90(a, 2, [2, 0]), [F_(3, 4, 2)]),
    "rot90_k3": (lambda a: torch.rot90(a, -1, [-1, -2]), [F_(3, 4)]),
    "slice_scatter": (lambda a, s: torch.slice_scatter(a, s, 1, 1, 4, 2), [F_(3, 5), F_(3, 2)]),
    "slice_scatter_dim0": (lambda a, s: torch.slice_scatter(a, s), [F_(3, 5), F_(3, 5)]),
    "select_scatter": (lambda a, s: torch.select_scatter(a, s, 0, -1), [F_(3, 4), F_(4)]),
    "select_scatter_0d_src": (lambda a, s: torch.select_scatter(a, s, 0, 1), [F_(3), F_()]),
    "diagonal_scatter": (lambda a, s: torch.diagonal_scatter(a, s), [F_(3, 4), F_(3)]),
    "diagonal_scatter_offset": (lambda a, s: torch.diagonal_scatter(a, s, -1, 2, 0), [F_(3, 2, 4), F_(2, 3)]),
    "view_as_real": (torch.view_as_real, [K("c", 3, 4)]),
    "view_as_real_0d": (torch.view_as_real, [K("c")]),
    "view_as_complex": (torch.view_as_complex, [F_(3, 2)]),
    "view_as_complex_1d": (torch.view_as_complex, [F_(2)]),
    "channel_shuffle": (lambda a: F.channel_shuffle(a, 2), [F_(2, 4, 3)]),
    "channel_shuffle_4d": (lambda a: F.channel_shuffle(a, 3), [F_(1, 6, 2, 2)]),
    "pixel_shuffle_3d": (lambda a: F.pixel_shuffle(a, 2), [F_(8, 2, 3)]),
    "pixel_shuffle_4d": (lambda a: F.pixel_shuffle(a, 2), [F_(2, 4, 2, 2)]),
    "pixel_unshuffle_3d": (lambda a: F.pixel_unshuffle(a, 2), [F_(2, 4, 6)]),
    "pixel_unshuffle_4d": (lambda a: F.pixel_unshuffle(a, 2), [F_(2, 1, 4, 2)]),
}

# torch.fft lowers to _fft_r2c / _fft_c2c / _fft_c2r (rules_fft.cpp)
FFT = {
    "rfft": (lambda a: torch.fft.rfft(a), [F_(4, 6)]),
    "rfft_dim0_n": (lambda a: torch.fft.rfft(a, n=5, dim=0, norm="ortho"), [F_(4, 6)]),
    "fft_complex": (lambda a: torch.fft.fft(a), [K("c", 4, 6)]),
    "ifft_neg_dim": (lambda a: torch.fft.ifft(a, dim=-2), [K("c", 4, 6)]),
    "fft2": (lambda a: torch.fft.fft2(a), [K("c", 3, 4, 6)]),
    "fftn_real": (lambda a: torch.fft.fftn(a, dim=(0, 2)), [F_(3, 4, 6)]),
    "irfft": (lambda a: torch.fft.irfft(a, n=8), [K("c", 4, 5)]),
    "irfftn": (lambda a: torch.fft.irfftn(a, dim=(0, 1)), [K("c", 4, 5)]),
    "hfft": (lambda a: torch.fft.hfft(a), [K("c", 4, 5)]),
    "ihfft": (lambda a: torch.fft.ihfft(a), [F_(4, 6)]),
    "fft_0d_dims_of_1d": (lambda a: torch.fft.fft(a), [F_(6)]),
}

CASES = {**POINTWISE, **REDUCTIONS, **VIEWS, **FFT}

# (name, placement) pairs where the function itself is invalid per element, as in the loop:
# view_as_complex needs the last dim to have stride 1, and an element of a tensor batched at its
# last dim has stride B there.
INVALID = {("view_as_complex", "-1"), ("view_as_complex_1d", "-1")}

# In-place writes into a clone of argument 0: with argument 0 unbatched, writing batched values into
# it is an error (tested below), as under torch.func.
INPLACE_INTO_ARG0 = {"clamp_min_tensor_inplace", "clamp_max_tensor_inplace"}

# Cases where torch.func.vmap itself disagrees with the for-loop (ours is compared with the loop
# only there): name -> (placements or None for all, what torch.func does).
TORCH_FUNC_WRONG = {
    "prelu_kernel_backward": (
        {"0", "-1", "mid", "None@0", "None@1"},
        "raises 'The size of tensor a (2) must match the size of tensor b "
        "(3)' when the weight is batched and of lower rank than self",
    ),
    "aminmax_all_keepdim": ({"0", "-1", "mid"}, "drops a dim: returns [B, 1] where each element is [1, 1]"),
    "split_copy": (
        None,
        "raises 'Batching rule not implemented for aten::split_copy.Tensor. We "
        "could not generate a fallback'",
    ),
}


def _skip(name, pname):
    return (name, pname) in INVALID or (name in INPLACE_INTO_ARG0 and pname == "None@0")


@pytest.mark.parametrize("name,pname,in_dims", list(case_params(CASES, skip=_skip)))
def test_rule(name, pname, in_dims):
    fn, specs = CASES[name]
    run(fn, specs, in_dims, torch_func=torch_func_agrees(TORCH_FUNC_WRONG, name, pname))


def test_in_place_into_unbatched_self_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"writes batched values in place into 'self'"):
        ft.vmap(lambda b: torch.zeros(4).clamp_min_(b))(torch.randn(B, 4))


@pytest.mark.parametrize(
    "fn,shape,match",
    [
        (lambda a: F.glu(a), (), "glu does not support scalars"),
        (lambda a: torch.renorm(a, 2, 0, 1.0), (4,), "renorm: input needs at least 2 dimensions"),
        (lambda a: torch.rot90(a), (4,), "expected total dims >= 2"),
        (lambda a: F.pixel_shuffle(a, 1), (2, 2), "pixel_shuffle expects input to have at least 3"),
        (lambda a: F.pixel_unshuffle(a, 1), (2, 2), "pixel_unshuffle expects input to have at least 3"),
        (lambda a: F.channel_shuffle(a, 1), (2, 2), "channel_shuffle expects input with > 2 dims"),
        (lambda a: torch.view_as_complex(a), (), "Input tensor must have one or more dimensions"),
    ],
    ids=["glu", "renorm", "rot90", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "view_as_complex"],
)
def test_logical_rank_errors(fn, shape, match):
    """Rank checks see the logical rank: the batch dim must not make a too-small input valid.
    The error is torch's own for the same per-element input."""
    x = torch.randn((2,) + shape)
    with pytest.raises(RuntimeError, match=match):
        fn(x[0])
    ft.set_vmap_fallback("error")
    with pytest.raises(RuntimeError, match=match):
        ft.vmap(fn)(x)


def test_view_as_complex_with_trailing_batch_dim_raises_like_the_loop():
    x = torch.randn(3, 2, B)
    ft.set_vmap_fallback("error")
    with pytest.raises(RuntimeError, match="last dimension with stride 1"):
        ft.vmap(torch.view_as_complex, in_dims=-1)(x)
    with pytest.raises(RuntimeError, match="last dimension with stride 1"):
        torch.view_as_complex(x[..., 0])


def test_copy_variants_return_contiguous_elements():
    x = torch.randn(4, B, 3).movedim(1, 2)  # batch dim last, physically in the middle
    ft.set_vmap_fallback("error")

    def f(a):
        out = aten.transpose_copy(a, 0, 1)
        assert out.is_contiguous()
        return out

    assert_same(ft.vmap(f, in_dims=-1)(x), torch.stack([f(x[..., i]) for i in range(B)]))


def test_nested_vmap():
    x = torch.randn(2, 3, 4, 6)
    f = lambda a: torch.var_mean(F.glu(a.unfold(-1, 2, 2), -1), 0)
    ft.set_vmap_fallback("error")
    out = ft.vmap(ft.vmap(f, in_dims=1), in_dims=0)(x)
    assert_same(out, torch.func.vmap(torch.func.vmap(f, in_dims=1), in_dims=0)(x))


# ------------------------------------------------------------------------------------------------
# Transforms through the new rules: vmap runs the ops' backward and forward-mode formulas
# (glu_backward, log_sigmoid_backward, _prelu_kernel_backward, unfold_backward, ...).

DIFF_FUNCS = {
    "rfft_abs": lambda x: torch.fft.rfft(x).abs(),
    "fft2_real": lambda x: torch.view_as_real(torch.fft.fft2(x)),
    "glu": lambda x: F.glu(x, 0),
    "logsigmoid": lambda x: F.logsigmoid(x),
    "prelu": lambda x: F.prelu(x.unsqueeze(0), torch.tensor([0.25])),
    "prelu_batched_weight": lambda x: F.prelu(x.t().unsqueeze(0), x[0].cos()),
    "polygamma": lambda x: torch.polygamma(1, x.abs() + 0.5),
    "i0e": lambda x: torch.special.i0e(x),
    "erfcx": lambda x: torch.special.erfcx(x),
    "log_ndtr": lambda x: torch.special.log_ndtr(x),
    "clamp_min_tensor": lambda x: torch.clamp_min(x, x[0].cos()),
    "var_mean": lambda x: torch.stack(torch.var_mean(x, 1)),
    "std_mean": lambda x: torch.cat(torch.std_mean(x, 0, keepdim=True)),
    "dist": lambda x: torch.dist(x, x[0].sin(), 3),
    "norm_dim": lambda x: aten.norm.ScalarOpt_dim(x, 2, [1]),
    "median_all": lambda x: torch.median(x),
    "aminmax": lambda x: torch.stack(torch.aminmax(x, dim=1)),
    "sort_stable": lambda x: torch.sort(x, dim=1, stable=True).values,
    "safe_softmax": lambda x: aten._safe_softmax(x, 1),
    "renorm": lambda x: torch.renorm(x, 2, 0, 1.0),
    "logcumsumexp": lambda x: torch.logcumsumexp(x, 1),
    "unfold": lambda x: x.unfold(1, 2, 1),
    "diag_embed": lambda x: torch.diag_embed(x),
    "rot90": lambda x: torch.rot90(x),
    "slice_scatter": lambda x: torch.slice_scatter(x, x[:, :2].exp(), 1, 0, 4, 2),
    "select_scatter": lambda x: torch.select_scatter(x, x[1].sin(), 0, 0),
    "diagonal_scatter": lambda x: torch.diagonal_scatter(x, x[0, :4].exp()),
    "pixel_shuffle": lambda x: F.pixel_shuffle(x.reshape(4, 1, 5), 2),
    "channel_shuffle": lambda x: F.channel_shuffle(x.reshape(1, 4, 5), 2),
    "view_copy": lambda x: aten.view_copy(x.sin(), [20]),
}
TRANSFORMS = {
    "jacrev": lambda L, f, x: L.jacrev(f)(x),
    "jacfwd": lambda L, f, x: L.jacfwd(f)(x),
    "vmap_grad": lambda L, f, x: L.vmap(L.grad(lambda y: f(y).sin().sum()))(
        x.unsqueeze(0).repeat(2, 1, 1) * torch.tensor([1.0, -0.5]).view(2, 1, 1)
    ),
}


@pytest.mark.parametrize("tname", list(TRANSFORMS))
@pytest.mark.parametrize("fname", list(DIFF_FUNCS))
def test_transforms(fname, tname):
    x = torch.randn(4, 5)
    f, t = DIFF_FUNCS[fname], TRANSFORMS[tname]
    ft._C._reset_fallback_ops_seen()
    ft.set_vmap_fallback("error")
    actual = t(ft, f, x)
    assert ft._C._fallback_ops_seen() == []
    ft.set_vmap_fallback("warn")
    expected = t(torch.func, f, x)
    assert_same(actual, expected, atol=1e-5, rtol=1e-5)


def test_jacrev_through_unfold_of_a_scalar():
    """unfold_backward of a 0-d input: its rule handles a logical scalar separately."""
    f = lambda x: (x.sin().unfold(0, 1, 1) * 2).exp()
    x = torch.randn(B)
    ft.set_vmap_fallback("error")
    actual = ft.vmap(ft.jacrev(f))(x)
    assert_same(actual, torch.func.vmap(torch.func.jacrev(f))(x))


@pytest.mark.parametrize(
    "name",
    [
        "unbatched_legacy",
        "batched_legacy",
        "batched_legacy_first",
        "batched_legacy_bdim1",
        "only_legacy",
        "promotes",
    ],
)
def test_cat_skips_legacy_empty_tensors_batched_or_not(name):
    """torch.cat skips 1-d empty tensors beside others (issue 22 item 5): one example's (0,)
    next to its (4, 5), batched or not, still takes part in the dtype promotion."""
    x = torch.randn(3, 4, 5)
    cases = {
        "unbatched_legacy": (lambda t: torch.cat([t, torch.tensor([])], 1), (x,), 0),
        "batched_legacy": (lambda t, e: torch.cat([t, e], 1), (x, torch.empty(3, 0)), 0),
        "batched_legacy_first": (lambda t, e: torch.cat([e, t]), (x, torch.empty(3, 0)), 0),
        "batched_legacy_bdim1": (lambda t, e: torch.cat([e, t]), (x, torch.empty(0, 3)), (0, 1)),
        "only_legacy": (lambda t, e: torch.cat([e, e]), (x, torch.empty(3, 0)), 0),
        "promotes": (lambda t, e: torch.cat([t, e]), (x, torch.empty(3, 0, dtype=torch.float64)), 0),
    }
    f, args, in_dims = cases[name]
    got = ft.vmap(f, in_dims=in_dims)(*args)
    ref = torch.func.vmap(f, in_dims=in_dims)(*args)
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    loop = torch.stack([f(*(a.select(d, i) for a, d in zip(args, dims))) for i in range(3)])
    for want in (ref, loop):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
