"""A differential fuzzer: random programs run through functorch_lite and torch.func.

A program is a chain of 2-6 ops from CATALOGUE applied to x (each op may also use a second input
y), wrapped in a nesting of 1-3 transforms. Every op is written shape-polymorphically: it accepts
any float64 tensor of rank 1-4 and derives dims, indices and weights from the tensor's own
(per-sample) shape and from an integer parameter, so a chain is valid whatever came before it
(and valid per sample under vmap). Between ops the chain keeps the value at rank 1-4 and at most
48 elements, so jacobians of the chain stay small.

The same program is built three times, with functorch_lite's transforms, with torch.func's, and
with a referee written in plain torch (vmap as a for-loop over the batch, the derivative
transforms through torch.autograd.grad with create_graph=True). Outcomes (see `run_case`):

  agree        both libraries return equal values (float64 tolerances)
  both_raise   both raise (exception types may differ: recorded, not a failure)
  ours_right   torch.func raises, or returns other values, and the referee agrees with us
  known        a failure with a strict-xfail reproducer in test_fuzz_regressions.py (KNOWN)
  failure      anything else

test/test_fuzz.py drives it with hypothesis (CI and long profiles); `python test/_fuzz.py N`
runs N random programs without pytest and prints the summary and the failures, shrunk.
"""

import collections
import math
import random
import re
import sys
import traceback
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

import functorch_lite as ft
from functorch_lite.func import functionalize as _ft_functionalize

MAX_NUMEL = 48


# ----------------------------------------------------------------------------------------------
# Shape-polymorphic helpers. `p` is the op's integer parameter; every choice derives from it.


def _dim(x, p):
    """A dim of x chosen by p, negative half of the time."""
    d = p % x.dim()
    return d - x.dim() if (p // 7) % 2 else d


# torch has no forward-AD formula for huber_loss_backward and soft_margin_loss_backward, so
# torch.func raises for forward-over-reverse of these losses where functorch_lite runs
# decompositions. To still have torch.func as the oracle there, _run_case re-runs such programs
# through torch.func with the losses written in elementary ops (DECOMPOSED_LOSSES).
DECOMPOSED_LOSSES = [False]


def _huber(x, t, delta):
    if not DECOMPOSED_LOSSES[0]:
        return F.huber_loss(x, t, delta=delta)
    d = x - t
    return torch.where(d.abs() < delta, 0.5 * d * d, delta * (d.abs() - 0.5 * delta)).mean()


def _soft_margin(x, t):
    if not DECOMPOSED_LOSSES[0]:
        return F.soft_margin_loss(x, t)
    return torch.log1p(torch.exp(-t * x)).mean()


def _fit(y, shape):
    """y's values cycled into `shape` (so y can meet x whatever x's shape is)."""
    shape = tuple(shape)
    n = math.prod(shape)
    flat = y.reshape(-1)
    reps = -(-n // flat.numel()) if n else 1
    return flat.repeat(reps)[:n].reshape(shape)


def _r2(x):
    return x if x.dim() >= 2 else x.unsqueeze(0)


def _r3(x):
    while x.dim() < 3:
        x = x.unsqueeze(0)
    return x


def _idx(n, size, p):
    """n indices into a dim of `size`, data-independent, with repeats when n > size."""
    return torch.tensor([(p + 3 * i) % size for i in range(n)], dtype=torch.long)


def _idx_like(shape, size, p):
    n = math.prod(shape)
    return (torch.arange(n) * (p % 5 + 1) + p).remainder(size).reshape(shape)


def _mask(x, p):
    """A data-independent boolean mask of x's shape."""
    return (torch.arange(x.numel()) % (p % 3 + 2) == 0).reshape(x.shape)


def _k(x, d):
    return min(2, x.shape[d])


def _inplace_view(x, y, p):
    z = x.clone()
    v = z.transpose(0, -1)
    v.mul_(_fit(y, v.shape))
    return z


def _setitem(x, y, p):
    z = x.clone()
    z[..., 0] = y.sum()
    return z


def _setitem_adv(x, y, p):
    z = x.clone()
    i = _idx(1 + p % 2, x.shape[0], p)
    z[i] = _fit(y, (len(i),) + tuple(x.shape[1:]))
    return z


def _select_inplace(x, y, p):
    z = x.clone()
    z.select(_dim(x, p), 0).mul_(3.0)
    return z


def _diag_zero(x, y, p):
    z = _r2(x).clone()
    z.diagonal(0, -2, -1).zero_()
    return z


def _unsqueeze_(x, y, p):
    z = x.clone()
    z.unsqueeze_(p % (x.dim() + 1))
    return z * 2


def _transpose_(x, y, p):
    z = x.clone()
    z.transpose_(0, -1)
    return z + 1


def _fresh_copy(x, y, p):
    # An in-place write of x into a fresh unbatched tensor: an error under vmap (torch.func
    # raises too); elsewhere plain.
    return torch.zeros(x.shape, dtype=x.dtype).copy_(x)


def _index_add(x, y, p):
    d = _dim(x, p)
    i = _idx(2, x.shape[d], p)
    src_shape = list(x.shape)
    src_shape[d] = 2
    return x.index_add(d, i, _fit(y, src_shape))


def _scatter_add(x, y, p):
    d = _dim(x, p)
    i = _idx_like(x.shape, x.shape[d], p)
    return torch.zeros_like(x).scatter_add(d, i, x * 2)


def _conv1d(x, y, p):
    inp = x.reshape(1, -1)
    return F.conv1d(inp, _fit(y, (2, 1, 2)), padding=1)


def _conv2d(x, y, p):
    inp = _r2(x).reshape(1, -1, x.shape[-1])
    return F.conv2d(inp, _fit(y, (2, 1, 2, 2)), bias=_fit(y, (2,)), padding=1)


def _conv_t1d(x, y, p):
    return F.conv_transpose1d(x.reshape(1, 1, -1), _fit(y, (1, 2, 2)))


def _group_norm(x, y, p):
    x2 = _r2(x)
    c = x2.shape[0]
    g = c if p % 2 else 1
    return F.group_norm(x2.reshape(1, c, -1), g, weight=_fit(y, (c,)))


def _batch_norm(x, y, p):
    x2 = _r2(x).reshape(-1, x.shape[-1])
    # Three rows at least: two values per channel would normalize to +-1 whatever x is.
    x2 = torch.cat([x2, _fit(y, x2.shape), x2.sin()])
    return F.batch_norm(x2, None, None, training=True)


def _cross_entropy(x, y, p):
    x2 = _r2(x).reshape(-1, x.shape[-1])
    t = torch.arange(x2.shape[0]) % x2.shape[1]
    return F.cross_entropy(x2, t, reduction="none" if p % 2 else "mean")


def _nll(x, y, p):
    x2 = _r2(x).reshape(-1, x.shape[-1])
    t = (torch.arange(x2.shape[0]) + p) % x2.shape[1]
    return F.nll_loss(F.log_softmax(x2, -1), t)


def _embedding(x, y, p):
    w = _r2(x).reshape(-1, x.shape[-1])
    return F.embedding(_idx(3, w.shape[0], p), w)


def _unfold(x, y, p):
    d = _dim(x, p)
    return x.unfold(d, _k(x, d), 1)


def _pad_reflect(x, y, p):
    x2 = _r2(x)
    pad = 1 if x2.shape[-1] > 1 else 0
    return F.pad(x2, (pad, pad), mode="reflect")


def _pool1d(x, y, p):
    inp = x.reshape(1, -1)
    k = min(2, inp.shape[-1])
    return (F.max_pool1d if p % 2 else F.avg_pool1d)(inp, k)


def _pool2d(x, y, p):
    inp = _r3(x)
    k = (min(2, inp.shape[-2]), min(2, inp.shape[-1]))
    return (F.max_pool2d if p % 2 else F.avg_pool2d)(inp, k)


def _topk(x, y, p):
    d = _dim(x, p)
    return x.topk(_k(x, d), d, largest=bool(p % 2)).values


def _bmm(x, y, p):
    x3 = _r3(x)
    return torch.bmm(x3, _fit(y, (x3.shape[0], x3.shape[2], 2)))


def _matmul_w(x, y, p):
    return x @ _fit(y, (x.shape[-1], 3))


def _cat(x, y, p):
    d = _dim(x, p)
    return torch.cat([x, _fit(y, x.shape)], d)


def _stack(x, y, p):
    return torch.stack([x, x * 2], p % (x.dim() + 1))


def _chunk_cat(x, y, p):
    d = _dim(x, p)
    return torch.cat(list(reversed(x.chunk(2, d))), d)


def _split(x, y, p):
    d = _dim(x, p)
    parts = x.split(1, d)
    return parts[-1] * parts[0]


def _narrow(x, y, p):
    d = _dim(x, p)
    return x.narrow(d, 0, (x.shape[d] + 1) // 2)


def _diagonal(x, y, p):
    return _r2(x).diagonal(0, 0, -1)


def _tril(x, y, p):
    return (torch.tril if p % 2 else torch.triu)(_r2(x), p % 3 - 1)


def _movedim(x, y, p):
    return x.movedim(0, -1)


def _expand(x, y, p):
    return x.unsqueeze(0).expand(2, *x.shape) * _fit(y, (2,) + (1,) * x.dim())


def _adv_index(x, y, p):
    return x[_idx(2 + p % 2, x.shape[0], p)]


def _adv_index2(x, y, p):
    x2 = _r2(x)
    return x2[:, _idx(2, x2.shape[1], p)]


def _adv_index_pair(x, y, p):
    x2 = _r2(x)
    return x2[_idx(2, x2.shape[0], p), _idx(2, x2.shape[1], p + 1)]


def _reduce(fn):
    def op(x, y, p):
        return fn(x, _dim(x, p), bool(p % 2))

    return op


def _scan(fn):
    def op(x, y, p):
        return fn(x, _dim(x, p))

    return op


CATALOGUE = {
    # pointwise unary
    "neg": lambda x, y, p: -x,
    "abs": lambda x, y, p: x.abs(),
    "sin": lambda x, y, p: x.sin(),
    "cos": lambda x, y, p: torch.cos(x),
    "tanh": lambda x, y, p: x.tanh(),
    "sigmoid": lambda x, y, p: torch.sigmoid(x),
    "exp_tanh": lambda x, y, p: x.tanh().exp(),
    "expm1": lambda x, y, p: torch.expm1(x.tanh()),
    "log1p_abs": lambda x, y, p: torch.log1p(x.abs()),
    "log_sq": lambda x, y, p: torch.log(x * x + 1),
    "sqrt": lambda x, y, p: torch.sqrt(x * x + 1),
    "rsqrt": lambda x, y, p: torch.rsqrt(x * x + 1),
    "reciprocal": lambda x, y, p: (x * x + 1).reciprocal(),
    "square": lambda x, y, p: x.square(),
    "pow_scalar": lambda x, y, p: (x.abs() + 1).pow(1.5),
    "relu": lambda x, y, p: F.relu(x),
    "gelu": lambda x, y, p: F.gelu(x, approximate="tanh" if p % 2 else "none"),
    "silu": lambda x, y, p: F.silu(x),
    "softplus": lambda x, y, p: F.softplus(x),
    "elu": lambda x, y, p: F.elu(x),
    "leaky_relu": lambda x, y, p: F.leaky_relu(x, 0.1),
    "hardtanh": lambda x, y, p: F.hardtanh(x),
    "logsigmoid": lambda x, y, p: F.logsigmoid(x),
    "mish": lambda x, y, p: F.mish(x),
    "erf": lambda x, y, p: torch.erf(x),
    "atan": lambda x, y, p: torch.atan(x),
    "asinh": lambda x, y, p: torch.asinh(x),
    "floor_add": lambda x, y, p: x + x.detach().floor(),
    "round_mul": lambda x, y, p: x * torch.round(x),
    "sign_mul": lambda x, y, p: x * x.sign(),
    "detach_mul": lambda x, y, p: x.detach() * x,
    # pointwise binary, with broadcasting and scalars
    "add_y": lambda x, y, p: x + _fit(y, x.shape),
    "sub_y_last": lambda x, y, p: x - _fit(y, x.shape[-1:]),
    "mul_y_lead": lambda x, y, p: x * _fit(y, (x.shape[0],) + (1,) * (x.dim() - 1)),
    "div_y": lambda x, y, p: x / (_fit(y, x.shape).abs() + 1),
    "add_alpha": lambda x, y, p: torch.add(x, _fit(y, x.shape[-1:]), alpha=2.0),
    "rsub_scalar": lambda x, y, p: 1.5 - x,
    "mul_scalar": lambda x, y, p: x * 2.5,
    "maximum": lambda x, y, p: torch.maximum(x, _fit(y, x.shape)),
    "minimum": lambda x, y, p: torch.minimum(x, _fit(y, x.shape[-1:])),
    "atan2": lambda x, y, p: torch.atan2(x, _fit(y, x.shape).abs() + 0.5),
    "hypot": lambda x, y, p: torch.hypot(x, _fit(y, x.shape) + 2),
    "lerp": lambda x, y, p: torch.lerp(x, _fit(y, x.shape), 0.3),
    "addcmul": lambda x, y, p: torch.addcmul(x, _fit(y, x.shape), x, value=0.5),
    "addcdiv": lambda x, y, p: torch.addcdiv(x, x, _fit(y, x.shape).abs() + 1),
    "self_mul": lambda x, y, p: x * x,
    "add_keepdim_sum": lambda x, y, p: x + x.sum(_dim(x, p), keepdim=True),
    "where": lambda x, y, p: torch.where(x > 0, x, _fit(y, x.shape)),
    "where_scalar": lambda x, y, p: torch.where(_mask(x, p), x, 0.5),
    "clamp": lambda x, y, p: x.clamp(-0.5, 0.5),
    "clamp_min_t": lambda x, y, p: torch.clamp(x, min=_fit(y, x.shape)),
    "masked_fill": lambda x, y, p: x.masked_fill(x < 0, 0.25),
    "masked_fill_t": lambda x, y, p: x.masked_fill(_mask(x, p), y.sum()),
    # reductions
    "sum_dim": _reduce(lambda x, d, k: x.sum(d, keepdim=k)),
    "mean_dim": _reduce(lambda x, d, k: x.mean(d, keepdim=k)),
    "prod_dim": _reduce(lambda x, d, k: x.prod(d, keepdim=k)),
    "amax": _reduce(lambda x, d, k: x.amax(d, keepdim=k)),
    "amin": _reduce(lambda x, d, k: x.amin(d, keepdim=k)),
    "max_dim": _reduce(lambda x, d, k: x.max(d, keepdim=k).values),
    "min_dim": _reduce(lambda x, d, k: torch.min(x, d, keepdim=k)[0]),
    "logsumexp": _reduce(lambda x, d, k: x.logsumexp(d, keepdim=k)),
    "norm_dim": _reduce(lambda x, d, k: torch.linalg.vector_norm(x + 2, dim=d, keepdim=k)),
    "var": _reduce(lambda x, d, k: x.var(d, keepdim=k)),
    "std_mean": _reduce(lambda x, d, k: torch.std_mean(x, d, keepdim=k, correction=0)[1]),
    "median": _reduce(lambda x, d, k: x.median(d, keepdim=k).values),
    "sum_all": lambda x, y, p: x.sum(),
    "mean_all": lambda x, y, p: x.mean(),
    "cumsum": _scan(torch.cumsum),
    "cumprod": _scan(lambda x, d: torch.cumprod(x, d)),
    "logcumsumexp": _scan(torch.logcumsumexp),
    "softmax": _scan(lambda x, d: F.softmax(x, d)),
    "log_softmax": _scan(lambda x, d: x.log_softmax(d)),
    "sort": lambda x, y, p: x.sort(_dim(x, p), descending=bool(p % 2)).values,
    "topk": _topk,
    # views, shape ops
    "transpose": lambda x, y, p: x.transpose(0, _dim(x, p)),
    "permute": lambda x, y, p: x.permute(*reversed(range(x.dim()))),
    "reshape_flat": lambda x, y, p: x.reshape(-1),
    "view_split": lambda x, y, p: x.contiguous().view(x.shape[0], -1),
    "unsqueeze": lambda x, y, p: x.unsqueeze(p % (x.dim() + 1)),
    "squeeze": lambda x, y, p: x.squeeze(),
    "flip": lambda x, y, p: x.flip(_dim(x, p)),
    "narrow": _narrow,
    "step_slice": lambda x, y, p: x[..., ::2],
    "select": lambda x, y, p: x.select(_dim(x, p), -1),
    "expand": _expand,
    "diagonal": _diagonal,
    "movedim": _movedim,
    "unbind_stack": lambda x, y, p: torch.stack(x.unbind(0)[::-1], -1),
    "chunk_cat": _chunk_cat,
    "split": _split,
    "cat": _cat,
    "stack": _stack,
    "repeat": lambda x, y, p: x.repeat(*([1] * (x.dim() - 1) + [2])),
    "roll": lambda x, y, p: x.roll(1, _dim(x, p)),
    "tril_triu": _tril,
    "unfold": _unfold,
    "t_contiguous": lambda x, y, p: x.movedim(-1, 0).contiguous() * 1.0,
    # in-place ops on fresh tensors, in-place views
    "clone_add_": lambda x, y, p: x.clone().add_(_fit(y, x.shape)),
    "clone_mul_": lambda x, y, p: x.clone().mul_(2.0),
    "clone_relu_": lambda x, y, p: x.clone().relu_(),
    "inplace_view": _inplace_view,
    "setitem": _setitem,
    "setitem_adv": _setitem_adv,
    "select_inplace": _select_inplace,
    "diag_zero_": _diag_zero,
    "unsqueeze_": _unsqueeze_,
    "transpose_": _transpose_,
    "fresh_copy_": _fresh_copy,
    # indexing
    "index_select": lambda x, y, p: x.index_select(_dim(x, p), _idx(2, x.shape[_dim(x, p)], p)),
    "gather": lambda x, y, p: x.gather(_dim(x, p), _idx_like(x.shape, x.shape[_dim(x, p)], p)),
    "take_along_dim": lambda x, y, p: torch.take_along_dim(x, _idx_like(x.shape, x.shape[-1], p), -1),
    "adv_index": _adv_index,
    "adv_index2": _adv_index2,
    "adv_index_pair": _adv_index_pair,
    "index_add": _index_add,
    "scatter_add": _scatter_add,
    "masked_select": lambda x, y, p: x.masked_select(x > 0),  # data-dependent shape
    "embedding": _embedding,
    # matmul family
    "matmul_self": lambda x, y, p: _r2(x) @ _r2(x).mT,
    "matmul_w": _matmul_w,
    "mm": lambda x, y, p: torch.mm(_r2(x).reshape(-1, x.shape[-1]), _fit(y, (x.shape[-1], 2))),
    "bmm": _bmm,
    "mv": lambda x, y, p: torch.mv(_r2(x).reshape(-1, x.shape[-1]), _fit(y, x.shape[-1:])),
    "dot": lambda x, y, p: torch.dot(x.reshape(-1), _fit(y, (x.numel(),))),
    "outer": lambda x, y, p: torch.outer(x.reshape(-1)[:4], _fit(y, (3,))),
    "linear": lambda x, y, p: F.linear(x, _fit(y, (2, x.shape[-1])), _fit(y, (2,))),
    "addmm": lambda x, y, p: torch.addmm(
        _fit(y, (1, 2)), _r2(x).reshape(-1, x.shape[-1]), _fit(y, (x.shape[-1], 2))
    ),
    "einsum": lambda x, y, p: torch.einsum("...i,...j->...ij", x, x),
    "tensordot": lambda x, y, p: torch.tensordot(x, _fit(y, x.shape[-1:]), dims=1),
    "trace": lambda x, y, p: torch.trace(_r2(x).reshape(-1, x.shape[-1])),
    # conv, pooling
    "conv1d": _conv1d,
    "conv2d": _conv2d,
    "conv_transpose1d": _conv_t1d,
    "pool1d": _pool1d,
    "pool2d": _pool2d,
    # norms
    "layer_norm": lambda x, y, p: F.layer_norm(x, x.shape[-1:], weight=_fit(y, x.shape[-1:])),
    "group_norm": _group_norm,
    "batch_norm": _batch_norm,
    "normalize": lambda x, y, p: F.normalize(x, dim=_dim(x, p)),
    "rms_norm": lambda x, y, p: F.rms_norm(x, x.shape[-1:]),
    # losses
    "mse": lambda x, y, p: F.mse_loss(x, _fit(y, x.shape), reduction="sum" if p % 2 else "mean"),
    "l1": lambda x, y, p: F.l1_loss(x, _fit(y, x.shape)),
    "smooth_l1": lambda x, y, p: F.smooth_l1_loss(x, _fit(y, x.shape), reduction="none"),
    "huber": lambda x, y, p: _huber(x, _fit(y, x.shape), 0.5),
    "bce_logits": lambda x, y, p: F.binary_cross_entropy_with_logits(x, _fit(y, x.shape).sigmoid()),
    "kl_div": lambda x, y, p: F.kl_div(
        x.log_softmax(-1), _fit(y, x.shape).softmax(-1), reduction="batchmean"
    ),
    "cross_entropy": _cross_entropy,
    "nll": _nll,
    "cosine_sim": lambda x, y, p: F.cosine_similarity(x, _fit(y, x.shape) + 1, dim=-1),
    "pairwise_dist": lambda x, y, p: F.pairwise_distance(x, _fit(y, x.shape)),
    "soft_margin": lambda x, y, p: _soft_margin(x, _fit(y, x.shape).sign()),
    # padding, misc
    "pad_const": lambda x, y, p: F.pad(x, (1, 2), value=0.5),
    "pad_reflect": _pad_reflect,
    "diff": lambda x, y, p: torch.diff(x, dim=_dim(x, p)) if x.shape[_dim(x, p)] > 1 else x,
    "new_zeros_add": lambda x, y, p: x.new_zeros(x.shape) + x,
    "ones_like_mul": lambda x, y, p: torch.ones_like(x) * x,
}


# ----------------------------------------------------------------------------------------------
# Programs


@dataclass(frozen=True)
class Program:
    x_shape: tuple  # per-sample shape of x (innermost)
    y_shape: tuple  # per-sample shape of y
    ops: tuple  # ((name, param), ...)
    # outermost first: ("vmap", dx, dy, out_dims, chunk, B), ("grad", argnums), ("vjp",), ...
    layers: tuple
    seed: int = 0

    def input_shapes(self):
        xs, ys = list(self.x_shape), list(self.y_shape)
        for layer in reversed(self.layers):
            if layer[0] == "vmap":
                _, dx, dy, _, _, b = layer
                if dx is not None:
                    xs.insert(dx if dx >= 0 else len(xs) + 1 + dx, b)
                if dy is not None:
                    ys.insert(dy if dy >= 0 else len(ys) + 1 + dy, b)
        return tuple(xs), tuple(ys)

    def inputs(self):
        g = torch.Generator().manual_seed(self.seed)
        xs, ys = self.input_shapes()
        return (
            torch.randn(xs, generator=g, dtype=torch.float64),
            torch.randn(ys, generator=g, dtype=torch.float64),
        )

    def __str__(self):
        return (
            f"Program(x_shape={self.x_shape}, y_shape={self.y_shape}, ops={self.ops}, "
            f"layers={self.layers}, seed={self.seed})"
        )


def chain(ops):
    """The program's innermost function: the op chain, at rank 1-4 and <= MAX_NUMEL elements."""

    def f(x, y):
        for name, p in ops:
            x = CATALOGUE[name](x, y, p)
            if x.dim() == 0:
                x = x.unsqueeze(0)
            while x.dim() > 4:
                x = x.flatten(0, 1)
            if x.numel() > MAX_NUMEL:
                x = x.reshape(-1)[:MAX_NUMEL]
        return x

    return f


def _tuple(out):
    return tuple(tree_leaves(out))


def _scalar(outs):
    return sum(o.sum() for o in outs)


def _cot(o):
    return o.cos()


class FuncTransforms:
    """Wraps a (x, y) -> tuple-of-tensors function in one layer, with a torch.func-like module."""

    def __init__(self, mod):
        self.mod = mod

    def wrap(self, layer, g):
        T = self.mod
        kind = layer[0]
        if kind == "vmap":
            _, dx, dy, od, chunk, _ = layer
            if T is torch.func and od < 0:
                # torch.func does not wrap a negative out_dims for an output that does not depend
                # on the mapped inputs (docs/reliability.md): a huge shape, an error, or under
                # jacrev(jacrev) a corrupted heap that aborts the process. The oracle maps to
                # dim 0 and moves it.
                f = T.vmap(g, in_dims=(dx, dy), out_dims=0, chunk_size=chunk, randomness="error")
                return lambda x, y: tuple(o.movedim(0, od) for o in f(x, y))
            return T.vmap(g, in_dims=(dx, dy), out_dims=od, chunk_size=chunk, randomness="error")
        if kind == "grad":
            return lambda x, y: _tuple(T.grad(lambda a, b: _scalar(g(a, b)), argnums=layer[1])(x, y))
        if kind == "vjp":

            def h(x, y):
                out, fn = T.vjp(g, x, y)
                return _tuple(out) + _tuple(fn(tuple(_cot(o) for o in out)))

            return h
        if kind == "jvp":

            def h(x, y):
                out, tout = T.jvp(g, (x, y), (x.sin(), y.cos()))
                return _tuple(out) + _tuple(tout)

            return h
        if kind in ("jacrev", "jacfwd"):
            return lambda x, y: _tuple(getattr(T, kind)(g, argnums=layer[1])(x, y))
        if kind == "hessian":
            return lambda x, y: _tuple(T.hessian(lambda a, b: _scalar(g(a, b)), argnums=layer[1])(x, y))
        if kind == "functionalize":
            fz = torch.func.functionalize if T is torch.func else _ft_functionalize
            return fz(g, remove=layer[1])
        raise AssertionError(kind)


class RefereeTransforms:
    """The same layers in plain torch: vmap is a for-loop, derivatives are torch.autograd.grad."""

    @staticmethod
    def _own(args, argnums):
        nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        own = list(args)
        for i in nums:
            a = args[i]
            own[i] = a.clone() if a.requires_grad else a.detach().requires_grad_()
        return own, nums

    # Nested jacobians cost one backward pass per row at every level: bounded per program.
    budget = 0

    def _grads(self, outs, inputs, cots):
        RefereeTransforms.budget -= 1
        if RefereeTransforms.budget < 0:
            raise RuntimeError("referee: over its budget of backward passes for one program")
        pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
        if not pairs:
            return [torch.zeros_like(i) for i in inputs]
        gs = torch.autograd.grad(
            [o for o, _ in pairs], inputs, [c for _, c in pairs], create_graph=True, allow_unused=True
        )
        return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs)]

    _in_dual = False

    def __init__(self, forward=False):
        self.forward = forward

    @staticmethod
    def _jvp_forward(g, x, y):
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            outs = g(fwAD.make_dual(x, x.sin()), fwAD.make_dual(y, y.cos()))
            duals = [fwAD.unpack_dual(o) for o in outs]
        return tuple(d.primal for d in duals) + tuple(
            torch.zeros_like(d.primal) if d.tangent is None else d.tangent for d in duals
        )

    def _jac(self, g, argnums, x, y):
        with torch.enable_grad():
            own, nums = self._own((x, y), argnums)
            outs = g(*own)
            res = []
            for o in outs:
                flat = o.reshape(-1)
                per_arg = []
                for i in nums:
                    rows = [
                        self._grads([flat[k]], [own[i]], [torch.ones((), dtype=o.dtype)])[0]
                        for k in range(flat.numel())
                    ]
                    j = torch.stack(rows) if rows else own[i].new_zeros((0,) + own[i].shape)
                    per_arg.append(j.reshape(o.shape + own[i].shape))
                res.append(per_arg[0] if isinstance(argnums, int) else tuple(per_arg))
            return _tuple(tuple(res))

    def wrap(self, layer, g):
        kind = layer[0]
        if kind == "vmap":
            _, dx, dy, od, _, _ = layer

            def h(x, y):
                if dx is None and dy is None:
                    raise ValueError("vmap: no batched input")
                b = x.shape[dx] if dx is not None else y.shape[dy]
                per = [
                    g(x.select(dx, i) if dx is not None else x, y.select(dy, i) if dy is not None else y)
                    for i in range(b)
                ]
                return tuple(torch.stack([p[k] for p in per], od) for k in range(len(per[0])))

            return h
        if kind == "grad":

            def h(x, y):
                with torch.enable_grad():
                    own, nums = self._own((x, y), layer[1])
                    outs = g(*own)
                    gs = self._grads(
                        [_scalar(outs)], [own[i] for i in nums], [torch.ones((), dtype=torch.float64)]
                    )
                return tuple(gs)

            return h
        if kind == "vjp":

            def h(x, y):
                with torch.enable_grad():
                    own, _ = self._own((x, y), (0, 1))
                    outs = g(*own)
                    gs = self._grads(outs, own, [_cot(o) for o in outs])
                return tuple(outs) + tuple(gs)

            return h
        if kind == "jvp":

            def h(x, y):
                # The double-vjp trick; the forward-AD flavour of the referee uses torch's
                # forward AD where it can (one dual level: not for a jvp inside a jvp, nor for
                # ops without a forward formula). Neither is right everywhere: backward-of-
                # backward formulas can give nan (logcumsumexp's where a gradient is zero),
                # and forward AD mixed with nested reverse passes disagrees with torch.func on
                # some nestings.
                if self.forward and not self._in_dual:
                    self._in_dual = True
                    try:
                        return self._jvp_forward(g, x, y)
                    except Exception:  # noqa: BLE001
                        pass
                    finally:
                        self._in_dual = False
                with torch.enable_grad():
                    own, _ = self._own((x, y), (0, 1))
                    outs = g(*own)
                    # J^T u is linear in u, so any u gives J t; ones, not zeros: some backward
                    # formulas take log(|u|) (logcumsumexp) and would give nan.
                    us = [torch.ones_like(o).requires_grad_() for o in outs]
                    gs = self._grads(outs, own, us)
                    tang = [x.sin(), y.cos()]
                    live = [(gg, t) for gg, t in zip(gs, tang) if gg.requires_grad]
                    if live:
                        jv = torch.autograd.grad(
                            [a for a, _ in live],
                            us,
                            [t for _, t in live],
                            create_graph=True,
                            allow_unused=True,
                        )
                    else:
                        jv = [None] * len(us)
                    jv = [torch.zeros_like(o) if j is None else j for j, o in zip(jv, outs)]
                return tuple(outs) + tuple(jv)

            return h
        if kind in ("jacrev", "jacfwd"):
            return lambda x, y: self._jac(g, layer[1], x, y)
        if kind == "hessian":
            inner = self.wrap(("grad", layer[1]), g)
            return lambda x, y: self._jac(inner, layer[1], x, y)
        if kind == "functionalize":  # the same values as the function itself
            return g
        raise AssertionError(kind)


class LoopOverTorchFunc(FuncTransforms):
    """A second referee: vmap as the for-loop, the other transforms from torch.func."""

    def __init__(self):
        super().__init__(torch.func)

    def wrap(self, layer, g):
        if layer[0] == "vmap":
            return RefereeTransforms.wrap(REFEREE, layer, g)
        return super().wrap(layer, g)


def build(prog, transforms):
    base = chain(prog.ops)
    g = lambda x, y: (base(x, y),)  # noqa: E731
    for layer in reversed(prog.layers):
        g = transforms.wrap(layer, g)
    return g


OURS = FuncTransforms(ft)
THEIRS = FuncTransforms(torch.func)
REFEREE = RefereeTransforms()
LOOP_REFEREE = LoopOverTorchFunc()
FORWARD_REFEREE = RefereeTransforms(forward=True)


def _run(prog, transforms):
    RefereeTransforms.budget = 5000
    x, y = prog.inputs()
    try:
        return True, tuple(t.detach() for t in build(prog, transforms)(x, y))
    except Exception as e:  # noqa: BLE001 (any exception is an outcome to compare)
        return False, e


def _same(a, b):
    if len(a) != len(b):
        return f"{len(a)} outputs vs {len(b)}"
    try:
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-7, atol=1e-7, equal_nan=True)
    except AssertionError as e:
        return str(e)
    return None


# Failures not fixed yet, each with its strict-xfail reproducer in test/test_fuzz_regressions.py:
# a program whose failure matches one is counted as "known" instead of failing the fuzzer. An
# entry maps the test's name to a regex over the outcome's detail.
KNOWN: dict[str, str] = {}


def known(outcome):
    """The regression test that covers this failure, or None."""
    for test, pattern in KNOWN.items():
        if re.match(pattern, outcome.detail):
            return test
    return None


@dataclass
class Outcome:
    kind: str  # agree | both_raise | ours_right | not_finite | known | failure
    detail: str = ""
    types: tuple = ()  # (our exception type, torch.func's) when both raise


def run_case(prog):
    out = _run_case(prog)
    if out.kind == "failure" and known(out):
        return Outcome("known", out.detail)
    return out


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "(no message)"


def _referee(prog, ours):
    """The first referee that runs and agrees with us, else the last one's result."""
    result = None
    for referee in (LOOP_REFEREE, REFEREE, FORWARD_REFEREE):
        result = _run(prog, referee)
        if result[0] and _same(ours, result[1]) is None:
            return result
    return result


def _run_case(prog):
    ok_ours, ours = _run(prog, OURS)
    if ft._C._stack_depth() != 0:
        return Outcome("failure", f"functorch_lite left {ft._C._stack_depth()} level(s) on the stack")
    if ok_ours and any(o.numel() == 0 for o in ours) and any(l[0] != "vmap" for l in prog.layers):
        # torch.func kills the process (SIGFPE, an integer division by zero) on some programs
        # with an empty output under a derivative transform (seed 43: a masked_select that
        # selects nothing under jacrev): the torch.autograd referees decide these alone.
        ok_ref, ref = _run(prog, REFEREE)
        if not (ok_ref and _same(ours, ref) is None):
            ok_ref, ref = _run(prog, FORWARD_REFEREE)
        if ok_ref and _same(ours, ref) is None:
            return Outcome("agree", "empty output, checked against the referees (torch.func not run)")
        return Outcome("failure", "empty output, the referees disagree or raise (torch.func not run)")
    ok_theirs, theirs = _run(prog, THEIRS)
    if not ok_ours and not ok_theirs:
        return Outcome("both_raise", types=(type(ours).__name__, type(theirs).__name__))
    if ok_ours and ok_theirs:
        diff = _same(ours, theirs)
        if diff is None:
            return Outcome("agree")
        ok_ref, ref = _referee(prog, ours)
        if ok_ref and _same(ours, ref) is None and _same(theirs, ref) is not None:
            return Outcome("ours_right", "torch.func's values differ from ours and the referee's")
        return Outcome("failure", "values differ from torch.func: " + diff)
    if ok_ours:
        if isinstance(theirs, NotImplementedError) and re.search(
            r"forward AD with (huber|soft_margin)_loss_backward", str(theirs)
        ):
            DECOMPOSED_LOSSES[0] = True
            try:
                ok_dec, dec = _run(prog, THEIRS)
            finally:
                DECOMPOSED_LOSSES[0] = False
            if ok_dec and _same(ours, dec) is None:
                return Outcome("agree", "with torch.func running the losses decomposed")
        ok_ref, ref = _referee(prog, ours)
        if ok_ref and _same(ours, ref) is None:
            return Outcome("ours_right", f"torch.func raises {type(theirs).__name__}: " + _first_line(theirs))
        if ok_ref and not all(bool(r.isfinite().all()) for r in ref):
            # The referee's derivatives are nan or inf (a var of one element, a log of zero):
            # the function is not differentiable at the drawn point and each formula (torch's
            # double backward, a decomposition, a where's other branch) yields its own nan/0 mix.
            return Outcome(
                "not_finite", f"torch.func raises {type(theirs).__name__}; the referee is not finite"
            )
        why = (
            "the referees raise " + type(ref).__name__
            if not ok_ref
            else "the referees' values differ from ours"
        )
        return Outcome(
            "failure",
            f"torch.func raises {type(theirs).__name__}: {_first_line(theirs)}; we return values; {why}",
        )
    tb = "".join(traceback.format_exception_only(type(ours), ours)).strip()
    return Outcome("failure", "we raise where torch.func returns: " + tb[:400])


def signature(prog, outcome):
    """A coarse key for deduplicating failures: the detail's first line without numbers."""
    import re

    return re.sub(r"[0-9]+", "N", outcome.detail.splitlines()[0])[:160]


# ----------------------------------------------------------------------------------------------
# Shrinking (used by the long profile and the command line: hypothesis shrinks in CI)


def _candidates(prog):
    ops, layers = list(prog.ops), list(prog.layers)
    for i in range(len(ops)):
        if len(ops) > 1:
            yield replace(prog, ops=tuple(ops[:i] + ops[i + 1 :]))
    for i in range(len(layers)):
        if len(layers) > 1:
            yield replace(prog, layers=tuple(layers[:i] + layers[i + 1 :]))
    for i, (name, p) in enumerate(ops):
        for q in (0, 1, 7):
            if q < p:
                yield replace(prog, ops=tuple(ops[:i] + [(name, q)] + ops[i + 1 :]))
    for attr in ("x_shape", "y_shape"):
        shape = getattr(prog, attr)
        for i, s in enumerate(shape):
            if len(shape) > 1:
                yield replace(prog, **{attr: shape[:i] + shape[i + 1 :]})
            if s > 1:
                yield replace(prog, **{attr: shape[:i] + (s - 1,) + shape[i + 1 :]})
    for i, layer in enumerate(layers):
        if layer[0] == "vmap":
            _, dx, dy, od, chunk, b = layer
            for new in (
                ("vmap", dx, dy, 0, chunk, b),
                ("vmap", dx, dy, od, None, b),
                ("vmap", dx, dy, od, chunk, 2),
                ("vmap", dx, None, od, chunk, b),
                ("vmap", 0 if dx is not None else None, dy, od, chunk, b),
            ):
                if new != layer:
                    yield replace(prog, layers=tuple(layers[:i] + [new] + layers[i + 1 :]))
    if prog.seed:
        yield replace(prog, seed=0)


def shrink(prog, outcome, timeout_s=60):
    """Greedy shrinking that keeps the failure's signature."""
    sig = signature(prog, outcome)
    improved = True
    while improved:
        improved = False
        for cand in _candidates(prog):
            out = run_case_limited(cand, timeout_s)
            if out.kind == "failure" and signature(cand, out) == sig:
                prog, outcome, improved = cand, out, True
                break
    return prog, outcome


# ----------------------------------------------------------------------------------------------
# Random programs (shared by the hypothesis strategy and the command-line driver)

TRANSFORMS = ("vmap", "grad", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "functionalize")
OP_NAMES = tuple(sorted(CATALOGUE))


def make_layer(kind, draw_int, rank_x, rank_y):
    """A layer of `kind`; draw_int(lo, hi) draws an int. rank_* are per-sample ranks under it."""
    if kind == "vmap":

        def in_dim(rank):
            choices = list(range(rank + 1)) + [-d for d in range(1, rank + 2)] + [None]
            return choices[draw_int(0, len(choices) - 1)]

        dx = in_dim(rank_x)
        dy = in_dim(rank_y) if draw_int(0, 2) else None
        od = (0, -1, 1)[draw_int(0, 2)]
        chunk = (None, None, 1, 2)[draw_int(0, 3)]
        return ("vmap", dx, dy, od, chunk, draw_int(1, 3))
    if kind in ("grad", "jacrev"):
        return (kind, (0, 1, (0, 1), 0)[draw_int(0, 3)])
    if kind in ("jacfwd", "hessian"):
        return (kind, (0, 1, 0)[draw_int(0, 2)])
    if kind == "functionalize":
        return (kind, ("mutations", "mutations_and_views")[draw_int(0, 1)])
    return (kind,)


def make_program(draw_int, draw_op):
    x_shape = tuple(draw_int(1, 3) for _ in range(draw_int(1, 3)))
    y_shape = tuple(draw_int(1, 3) for _ in range(draw_int(1, 2)))
    ops = tuple((draw_op(), draw_int(0, 99)) for _ in range(draw_int(2, 6)))
    kinds = [TRANSFORMS[draw_int(0, len(TRANSFORMS) - 1)] for _ in range(draw_int(1, 3))]
    # Built inside-out so vmap's in_dims fit the per-sample ranks beneath it.
    layers, rx, ry = [], len(x_shape), len(y_shape)
    for kind in reversed(kinds):
        layer = make_layer(kind, draw_int, rx, ry)
        if kind == "vmap":
            rx += layer[1] is not None
            ry += layer[2] is not None
        layers.insert(0, layer)
    return Program(x_shape, y_shape, ops, tuple(layers), draw_int(0, 2**16))


class Stats:
    def __init__(self):
        self.counts = collections.Counter()
        self.type_mismatch = collections.Counter()
        self.ours_right = collections.Counter()
        self.failures = {}  # signature -> (program, outcome)
        self.known = collections.Counter()
        self.ours_right_example = {}

    def add(self, prog, out):
        self.counts[out.kind] += 1
        if out.kind == "both_raise" and out.types[0] != out.types[1]:
            self.type_mismatch[out.types] += 1
        if out.kind == "ours_right":
            self.ours_right[out.detail[:120]] += 1
            self.ours_right_example.setdefault(out.detail[:120], prog)
        if out.kind == "known":
            self.known[known(out)] += 1
        if out.kind == "failure":
            self.failures.setdefault(signature(prog, out), (prog, out))

    def summary(self):
        n = sum(self.counts.values())
        lines = [
            f"functorch_lite fuzzer: {n} programs run: {self.counts['agree']} agreed, "
            f"{self.counts['both_raise']} both raised, {self.counts['ours_right']} "
            f"ours right where torch.func is wrong, {self.counts['not_finite']} not finite "
            f"(torch.func raises, the referee's values are nan/inf), {self.counts['known']} known failures "
            f"(strict xfails), {self.counts['failure']} failures "
            f"({len(self.failures)} distinct)"
        ]
        for (a, b), c in self.type_mismatch.most_common():
            lines.append(f"  both raised, exception types differ ({c}x): ours {a}, torch.func {b}")
        for d, c in self.ours_right.most_common():
            lines.append(f"  ours right ({c}x): {d}\n    e.g. {self.ours_right_example[d]}")
        for test, c in self.known.most_common():
            lines.append(f"  known failure ({c}x): test_fuzz_regressions.py::{test}")
        for sig, (prog, out) in self.failures.items():
            lines.append(f"  FAILURE {sig}\n    {prog}")
        return "\n".join(lines)


class _Timeout(Exception):
    pass


def run_case_limited(prog, timeout_s):
    """run_case, reported as a failure when it takes longer than timeout_s (main thread only)."""
    import signal

    def alarm(*_):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout_s)
    try:
        return run_case(prog)
    except _Timeout:
        return Outcome(
            "failure",
            f"the program took longer than {timeout_s} s (levels left "
            f"on the stack after the interrupt: {ft._C._stack_depth()})",
        )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def main(n, seed=0, do_shrink=True, timeout_s=60):
    ft.set_vmap_fallback("quiet")
    rng = random.Random(seed)
    stats = Stats()
    for i in range(n):
        prog = make_program(rng.randint, lambda: rng.choice(OP_NAMES))
        stats.add(prog, run_case_limited(prog, timeout_s))
    print(stats.summary())
    if do_shrink:
        for sig, (prog, out) in stats.failures.items():
            small, sout = shrink(prog, out, timeout_s)
            print(f"\nSHRUNK {sig}\n  {small}\n  {sout.detail[:600]}")
    return stats


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
