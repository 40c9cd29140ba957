"""vmap rules of CPU scaled-dot-product attention (csrc/vmap/rules_attention.cpp):
aten::_scaled_dot_product_flash_attention_for_cpu and its backward.

Oracles: torch.func (vmap, grad, vjp, jacrev) and a Python for-loop over the batch. Every check
runs under fallback_mode('error'), so a call that took the for-loop fallback fails the test:
passing proves the rules ran. 4-D per-example inputs reach the flash op; 3-D ones take torch's
math path (rules of its own) and are checked too."""

import itertools

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
B, N, H, L, S, E = 3, 2, 3, 4, 5, 8


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def _batched(shape, in_dim, dtype=torch.float64):
    """A tensor of logical shape `shape` with the batch at in_dim (None: unbatched)."""
    if in_dim is None:
        return _rand(*shape, dtype=dtype)
    full = list(shape)
    full.insert(in_dim, B)
    return _rand(*full, dtype=dtype)


def _loop(f, in_dims, args):
    """vmap's definition: f per batch element, results stacked at dim 0."""
    rows = []
    for i in range(B):
        rows.append(f(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]))
    if isinstance(rows[0], tuple):
        return tuple(torch.stack(c) for c in zip(*rows))
    return torch.stack(rows)


def _close(a, b, tol=1e-7):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
        return
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


def _check(f, in_dims, args, fallback_mode, tol=1e-7):
    with fallback_mode("error"):
        got = ft.vmap(f, in_dims=in_dims)(*args)
    _close(got, tf.vmap(f, in_dims=in_dims)(*args), tol)
    _close(got, _loop(f, in_dims, args), tol)
    return got


def _flash_reached(f, args):
    """The per-example function reaches the flash op (so the test covers the rule)."""
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            seen.append(func)
            return func(*a, **(kw or {}))

    with Spy():
        f(*args)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in seen


# ------------------------------------------------------------------------------------------------
# forward

QKV_DIMS = [d for d in itertools.product((0, 1, None), repeat=3) if d != (None, None, None)]


@pytest.mark.parametrize("dims", QKV_DIMS)
def test_sdpa_4d_in_dims(dims, fallback_mode):
    args = [_batched((N, H, L, E), dims[0]), _batched((N, H, S, E), dims[1]), _batched((N, H, S, E), dims[2])]
    assert _flash_reached(
        F.scaled_dot_product_attention, [a.select(d, 0) if d is not None else a for a, d in zip(args, dims)]
    )
    _check(F.scaled_dot_product_attention, dims, args, fallback_mode)


@pytest.mark.parametrize("dims", [(0, 0, 0), (1, None, 0), (None, 0, None), (0, 1, 1)])
def test_flash_op_both_outputs(dims, fallback_mode):
    """The op itself: output and logsumexp."""
    args = [_batched((N, H, L, E), dims[0]), _batched((N, H, S, E), dims[1]), _batched((N, H, S, E), dims[2])]
    _check(lambda q, k, v: FLASH(q, k, v), dims, args, fallback_mode)


MASK_SHAPES = [(L, S), (1, S), (1, 1, L, S), (N, 1, L, S), (N, H, L, S), (1, H, 1, S), (N, H, L, 1)]


def _mask(shape, in_dim, dtype):
    m = _batched(shape, in_dim)
    if dtype == torch.bool:
        m = m > -0.5
        m[..., 0] = True  # no row fully masked
    return m


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.bool])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
@pytest.mark.parametrize(
    "dims", [(0, 0, 0, 0), (0, 0, 0, None), (None, None, None, 0), (1, None, 0, 1), (None, 0, None, None)]
)
def test_sdpa_masks(dims, mask_shape, mask_dtype, fallback_mode):
    args = [
        _batched((N, H, L, E), dims[0]),
        _batched((N, H, S, E), dims[1]),
        _batched((N, H, S, E), dims[2]),
        _mask(mask_shape, dims[3], mask_dtype),
    ]
    _check(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), dims, args, fallback_mode)


@pytest.mark.parametrize("mask_shape", [(L, S), (1, 1, L, S), (N, 1, L, S), (N, H, L, S)])
@pytest.mark.parametrize("dims", [(0, 0, 0, 0), (0, None, None, None), (None, None, None, 1)])
def test_flash_op_masks(dims, mask_shape, fallback_mode):
    """Float masks straight into the op, both outputs."""
    args = [
        _batched((N, H, L, E), dims[0]),
        _batched((N, H, S, E), dims[1]),
        _batched((N, H, S, E), dims[2]),
        _mask(mask_shape, dims[3], torch.float64),
    ]
    _check(lambda q, k, v, m: FLASH(q, k, v, attn_mask=m), dims, args, fallback_mode)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dims", [(0, 0, 0), (0, None, None), (None, 1, 0)])
def test_sdpa_causal_and_scale(dims, is_causal, scale, fallback_mode):
    args = [_batched((N, H, L, E), dims[0]), _batched((N, H, S, E), dims[1]), _batched((N, H, S, E), dims[2])]
    _check(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale),
        dims,
        args,
        fallback_mode,
    )


@pytest.mark.parametrize("dims", [(0, 0, 0), (1, None, 0), (None, 0, 0)])
def test_sdpa_3d_per_example(dims, fallback_mode):
    """[H, L, E] per example: torch's math path, no fallback either."""
    args = [_batched((H, L, E), dims[0]), _batched((H, S, E), dims[1]), _batched((H, S, E), dims[2])]
    _check(F.scaled_dot_product_attention, dims, args, fallback_mode)


def test_float32(fallback_mode):
    args = [
        _rand(B, N, H, L, E, dtype=torch.float32),
        _rand(B, N, H, S, E, dtype=torch.float32),
        _rand(B, N, H, S, E, dtype=torch.float32),
    ]
    _check(F.scaled_dot_product_attention, (0, 0, 0), args, fallback_mode, tol=1e-5)


def test_empty_batch(fallback_mode):
    q, k, v = _rand(0, N, H, L, E), _rand(0, N, H, S, E), _rand(0, N, H, S, E)
    with fallback_mode("error"):
        out = ft.vmap(F.scaled_dot_product_attention)(q, k, v)
    assert out.shape == (0, N, H, L, E)


def test_dropout_rejected_like_torch(fallback_mode):
    """The CPU kernel rejects dropout_p > 0; under vmap the same torch error is raised."""
    q, k, v = _rand(B, N, H, L, E), _rand(B, N, H, S, E), _rand(B, N, H, S, E)
    with pytest.raises(RuntimeError) as eager:
        FLASH(q[0], k[0], v[0], 0.5)
    with pytest.raises(RuntimeError) as batched:
        ft.vmap(lambda q, k, v: FLASH(q, k, v, 0.5))(q, k, v)
    assert str(eager.value).splitlines()[0] in str(batched.value)


def test_sdpa_dropout_follows_randomness():
    """F.sdpa with dropout takes torch's math path, whose dropout follows vmap's randomness."""
    q, k, v = _rand(B, N, H, L, E), _rand(B, N, H, S, E), _rand(B, N, H, S, E)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # noqa: E731
    with pytest.raises(RuntimeError, match="randomness"):
        ft.vmap(f)(q, k, v)
    rep = [t[:1].expand_as(t).clone() for t in (q, k, v)]  # identical rows
    same = ft.vmap(f, randomness="same")(*rep)
    _close(same, same[:1].expand_as(same))
    diff = ft.vmap(f, randomness="different")(*rep)
    assert not torch.equal(diff[0], diff[1])


# ------------------------------------------------------------------------------------------------
# backward: vmap(grad), vmap(vjp), jacrev


def _loss(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m).pow(2).sum()


@pytest.mark.parametrize("mask", [None, "unbatched", "batched"])
@pytest.mark.parametrize("dims", [(0, 0, 0), (0, None, None), (None, 0, 1)])
def test_vmap_grad(dims, mask, fallback_mode):
    args = [_batched((N, H, L, E), dims[0]), _batched((N, H, S, E), dims[1]), _batched((N, H, S, E), dims[2])]
    in_dims = dims + (None if mask != "batched" else 0,)
    m = None if mask is None else _mask((N, 1, L, S), in_dims[3], torch.float64)
    g = lambda q, k, v, m: ft.grad(_loss, argnums=(0, 1, 2))(q, k, v, m)  # noqa: E731
    with fallback_mode("error"):
        got = ft.vmap(g, in_dims=in_dims)(*args, m)
    want = tf.vmap(tf.grad(_loss, argnums=(0, 1, 2)), in_dims=in_dims)(*args, m)
    _close(got, want)
    _close(got, _loop(lambda *a: tf.grad(_loss, argnums=(0, 1, 2))(*a), in_dims, args + [m]))


def test_vmap_grad_causal_scale(fallback_mode):
    def loss(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7).sin().sum()

    args = [_rand(B, N, H, L, E), _rand(B, N, H, S, E), _rand(B, N, H, S, E)]
    with fallback_mode("error"):
        got = ft.vmap(ft.grad(loss, argnums=(0, 1, 2)))(*args)
    _close(got, tf.vmap(tf.grad(loss, argnums=(0, 1, 2)))(*args))


def test_vmap_vjp_both_outputs(fallback_mode):
    """Cotangents batched and unbatched; the logsumexp cotangent does not reach the backward."""
    q, k, v = _rand(N, H, L, E), _rand(B, N, H, S, E), _rand(B, N, H, S, E)
    ct = _rand(B, N, H, L, E)

    def f(ft_or_tf, k, v, ct):
        out, vjp_fn = ft_or_tf.vjp(lambda q, k, v: FLASH(q, k, v)[0], q, k, v)
        return vjp_fn(ct)

    with fallback_mode("error"):
        got = ft.vmap(lambda k, v, ct: f(ft, k, v, ct))(k, v, ct)
    _close(got, tf.vmap(lambda k, v, ct: f(tf, k, v, ct))(k, v, ct))
    with fallback_mode("error"):
        got = ft.vmap(lambda k, v: f(ft, k, v, ct[0]))(k, v)
    _close(got, tf.vmap(lambda k, v: f(tf, k, v, ct[0]))(k, v))


def test_jacrev(fallback_mode):
    q, k, v = _rand(1, 2, 3, 4), _rand(1, 2, 3, 4), _rand(1, 2, 3, 4)
    m = _rand(3, 3)
    f = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
    with fallback_mode("error"):
        got = ft.jacrev(f, argnums=(0, 1, 2))(q, k, v)
    _close(got, tf.jacrev(f, argnums=(0, 1, 2))(q, k, v))


# ------------------------------------------------------------------------------------------------
# per-example gradients of attention modules


def _per_example(model, loss_of_out, x, y, fallback_mode, tol=1e-5):
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(functional_call, p, x, y):
        return loss_of_out(functional_call(model, p, (x[None],)), y[None])

    with fallback_mode("error"):
        got = ft.vmap(ft.grad(lambda p, x, y: loss(ft.functional_call, p, x, y)), in_dims=(None, 0, 0))(
            params, x, y
        )
    want = tf.vmap(tf.grad(lambda p, x, y: loss(tf.functional_call, p, x, y)), in_dims=(None, 0, 0))(
        params, x, y
    )
    rows = [tf.grad(lambda p: loss(tf.functional_call, p, x[i], y[i]))(params) for i in range(x.shape[0])]
    for name in params:
        _close(got[name], want[name], tol)
        _close(got[name], torch.stack([r[name] for r in rows]), tol)


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_per_example_grads(fallback_mode):
    model = _MHA()
    x, y = torch.randn(5, 6, 16), torch.randn(5, 6, 16)
    assert _flash_reached(model, [x[:1]])
    _per_example(model, F.mse_loss, x, y, fallback_mode)


def test_transformer_encoder_layer_per_example_grads(fallback_mode):
    model = nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True
    )
    x, y = torch.randn(5, 6, 16), torch.randn(5, 6, 16)
    assert _flash_reached(model, [x[:1]])
    _per_example(model, F.mse_loss, x, y, fallback_mode)
