"""torch.autograd.Function under functorch_lite's transforms, differential against torch.func on
the same Functions (modelled on torch's test_eager_transforms.py / test_vmap.py tests): the vmap
staticmethod and generate_vmap_rule under vmap, backward and jvp per grad/jvp level, ctx
features, and torch.func's errors for what a Function lacks."""

import numpy as np
import pytest
import torch
import torch.func as tf
from torch.autograd.function import once_differentiable

import functorch_lite as ft


def _np(x):
    return x.detach().cpu().numpy()


# ---- Functions


class Cube(torch.autograd.Function):
    """Opaque forward (numpy): only its own staticmethods can batch or differentiate it."""

    @staticmethod
    def forward(x):
        return torch.from_numpy(np.ascontiguousarray(_np(x) ** 3)), torch.from_numpy(
            np.ascontiguousarray(3 * _np(x) ** 2)
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, g, gdx):
        x, dx = ctx.saved_tensors
        return g * dx + gdx * 6 * x

    @staticmethod
    def jvp(ctx, t):
        x, dx = ctx.saved_tensors
        return dx * t, 6 * x * t

    @staticmethod
    def vmap(info, in_dims, x):
        Cube.seen.append(info)
        out = Cube.apply(x)
        return out, (in_dims[0], in_dims[0])

    seen = []


def cube(x):
    return Cube.apply(x)[0]


class ScaledSin(torch.autograd.Function):
    """A custom backward that is NOT the derivative (2x), so that each level must use it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale=2.0):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos() * ctx.scale, None

    @staticmethod
    def jvp(ctx, t, _):
        (x,) = ctx.saved_tensors
        return t * x.cos() * ctx.scale


class Mul(torch.autograd.Function):
    """Two inputs, one maybe unbatched; a backward whose gradients need reducing."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, y):
        return x * y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y, g * x

    @staticmethod
    def jvp(ctx, tx, ty):
        x, y = ctx.saved_tensors
        return tx * y + x * ty


class MulVmap(Mul):
    """Mul with a hand-written vmap staticmethod instead."""

    generate_vmap_rule = False

    @staticmethod
    def vmap(info, in_dims, x, y):
        x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(info.batch_size, *x.shape)
        y = y.movedim(in_dims[1], 0) if in_dims[1] is not None else y.expand(info.batch_size, *y.shape)
        return MulVmap.apply(x, y), 0


class Double_(torch.autograd.Function):
    """In place, with mark_dirty."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        x.mul_(2)
        return x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_dirty(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        t.mul_(2)
        return t


class SortWithIdx(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sort(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.n = inputs[0].shape[-1]

    @staticmethod
    def backward(ctx, g, _):
        (idx,) = ctx.saved_tensors
        return g.new_zeros(g.shape[:-1] + (ctx.n,)).scatter(-1, idx, g)


class OnceExp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


def _close(f):
    """f(T) with T = functorch_lite and T = torch.func give the same result."""
    ours = f(ft)
    ref = f(tf)
    torch.testing.assert_close(ours, ref)
    return ours


# ---- vmap staticmethod


def test_vmap_staticmethod_is_used_with_info(fallback_mode):
    x = torch.randn(4, 3)
    Cube.seen.clear()
    with fallback_mode("error"):
        out = ft.vmap(Cube.apply, randomness="same")(x)
    torch.testing.assert_close(out[0], x**3)
    torch.testing.assert_close(out[1], 3 * x**2)
    assert Cube.seen == [(4, "same")]
    assert type(Cube.seen[0]).__name__ == "VmapInfo"
    _close(lambda T: T.vmap(Cube.apply, in_dims=1)(x))
    _close(lambda T: T.vmap(T.vmap(Cube.apply))(x))


def test_vmap_staticmethod_with_unbatched_input_and_negative_in_dims():
    x, y = torch.randn(3, 5), torch.randn(3)
    _close(lambda T: T.vmap(MulVmap.apply, in_dims=(-1, None))(x, y))
    _close(lambda T: T.vmap(MulVmap.apply, in_dims=(None, 0))(y, x.t()))


@pytest.mark.parametrize(
    "transform",
    [
        lambda T, f: T.vmap(T.grad(lambda x: f(x).sum())),
        lambda T, f: T.grad(lambda x: T.vmap(f)(x).sum()),
        lambda T, f: T.vmap(T.jacrev(f)),
        lambda T, f: T.jacrev(T.vmap(f)),
        lambda T, f: T.vmap(T.vmap(T.grad(lambda x: f(x).sum()))),
    ],
    ids=["vmap_grad", "grad_vmap", "vmap_jacrev", "jacrev_vmap", "vmap_vmap_grad"],
)
def test_vmap_staticmethod_composes_with_grad(transform):
    x = torch.randn(2, 3)
    out = _close(lambda T: transform(T, cube)(x))
    assert out.abs().sum() > 0


@pytest.mark.parametrize(
    "transform",
    [
        lambda T, f: T.jvp(f, (X,), (X.cos(),))[1],
        lambda T, f: T.jacfwd(f)(X[0]),
        lambda T, f: T.vmap(T.jacfwd(f))(X),
        lambda T, f: T.jacfwd(T.vmap(f))(X),
    ],
    ids=["jvp", "jacfwd", "vmap_jacfwd", "jacfwd_vmap"],
)
def test_jvp_staticmethod(transform):
    _close(lambda T: transform(T, cube))


X = torch.randn(3, 4)


# ---- generate_vmap_rule


@pytest.mark.parametrize(
    "transform",
    [
        lambda T, f: T.vmap(f)(X),
        lambda T, f: T.vmap(f, in_dims=1)(X),
        lambda T, f: T.vmap(T.grad(lambda x: f(x).sum()))(X),
        lambda T, f: T.grad(lambda x: T.vmap(f)(x).sum())(X),
        lambda T, f: T.jacrev(T.vmap(f))(X),
        lambda T, f: T.vmap(T.jacrev(f))(X),
        lambda T, f: T.grad(lambda x: T.grad(lambda y: f(y).sum())(x).sum())(X),
        lambda T, f: T.vmap(T.vmap(T.grad(lambda x: f(x).sum())))(X),
        lambda T, f: T.grad(lambda x: T.vmap(T.vmap(f))(x).sum())(X),
        lambda T, f: T.jvp(T.vmap(f), (X,), (X.cos(),))[1],
        lambda T, f: T.vmap(lambda x, t: T.jvp(f, (x,), (t,))[1])(X, X.cos()),
        lambda T, f: T.jacfwd(T.vmap(f))(X),
        lambda T, f: T.vmap(T.jacfwd(T.jacrev(f)))(X),
    ],
    ids=[
        "vmap",
        "vmap_in_dims1",
        "vmap_grad",
        "grad_vmap",
        "jacrev_vmap",
        "vmap_jacrev",
        "grad_grad",
        "vmap_vmap_grad",
        "grad_vmap_vmap",
        "jvp_vmap",
        "vmap_jvp",
        "jacfwd_vmap",
        "vmap_hessian",
    ],
)
def test_generate_vmap_rule_uses_the_custom_backward_at_every_level(transform):
    out = _close(lambda T: transform(T, ScaledSin.apply))
    assert out.abs().sum() > 0


def test_generate_vmap_rule_with_unbatched_input_reduces_its_gradient():
    x, y = torch.randn(4, 3), torch.randn(3)
    _close(lambda T: T.grad(lambda y: T.vmap(Mul.apply, in_dims=(0, None))(x, y).sum())(y))
    _close(
        lambda T: T.grad(lambda x, y: T.vmap(Mul.apply, in_dims=(0, None))(x, y).sum(), argnums=(0, 1))(x, y)
    )
    # a broadcast (size-1) input: its per-element gradient is reduced to its shape
    b = torch.randn(4, 1)
    _close(lambda T: T.grad(lambda b: T.vmap(Mul.apply)(x, b).sum())(b))
    _close(lambda T: T.jvp(lambda y: T.vmap(Mul.apply, in_dims=(0, None))(x, y), (y,), (torch.ones(3),)))


def test_vmap_staticmethod_and_generated_rule_agree():
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    a = ft.grad(lambda x: ft.vmap(Mul.apply)(x, y).sum())(x)
    b = ft.grad(lambda x: ft.vmap(MulVmap.apply)(x, y).sum())(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, y)


# ---- ctx features


def test_default_and_non_tensor_arguments():
    _close(lambda T: T.vmap(lambda x: ScaledSin.apply(x, 3.0))(X))
    _close(lambda T: T.grad(lambda x: ScaledSin.apply(x, 3.0).sum())(X))
    _close(lambda T: T.grad(lambda x: ScaledSin.apply(x, scale=0.5).sum())(X))


def test_mark_dirty():
    def f(x):
        y = x.clone()
        out = Double_.apply(y)
        assert out is y
        return out

    # torch.func refuses mark_dirty under vmap (generate_vmap_rule): so do we, same error.
    ref, ours = _same_error(lambda T: T.vmap(f)(X))
    assert ref == ours
    ref, ours = _same_error(lambda T: T.vmap(T.grad(lambda x: f(x).sum()))(X))
    assert ref == ours
    _close(lambda T: T.grad(lambda x: f(x).sum())(X))
    _close(lambda T: T.jvp(f, (X,), (X.cos(),)))


def test_mark_non_differentiable():
    def f(x):
        v, i = SortWithIdx.apply(x)
        return v * torch.arange(1.0, x.shape[-1] + 1)

    # torch.func fails inside its own code on a structseq output under vmap; the for-loop referee
    v, i = ft.vmap(SortWithIdx.apply)(X)
    torch.testing.assert_close(v, X.sort(-1).values)
    torch.testing.assert_close(i, X.sort(-1).indices)
    _close(lambda T: T.grad(lambda x: f(x).sum())(X))
    # (torch.func fails there on the structseq too; the referee is the gradient of each row)
    expected = torch.stack([ft.grad(lambda x: f(x).sum())(row) for row in X])
    torch.testing.assert_close(ft.vmap(ft.grad(lambda x: f(x).sum()))(X), expected)
    torch.testing.assert_close(ft.grad(lambda x: ft.vmap(f)(x).sum())(X), expected)


def test_mark_non_differentiable_output_has_no_gradient_inside_grad():
    seen = []

    def f(x):
        v, i = SortWithIdx.apply(x)
        seen.append(i.requires_grad)
        return v.sum()

    ft.grad(f)(X[0])
    assert seen == [False]


def test_once_differentiable():
    _close(lambda T: T.grad(lambda x: OnceExp.apply(x).sum())(X))
    _close(lambda T: T.vmap(T.grad(lambda x: OnceExp.apply(x).sum()))(X))


def test_save_for_forward_and_jvp_under_vmap():
    _close(lambda T: T.vmap(lambda x, t: T.jvp(lambda x: Mul.apply(x, x), (x,), (t,)))(X, X.sin()))


# ---- what a Function lacks: torch.func's errors


class NoVmap(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class BothVmap(NoVmap):
    generate_vmap_rule = True

    @staticmethod
    def vmap(info, in_dims, x):
        return x * 2, in_dims[0]


class NoBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass


class OldStyle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class BadVmap(NoVmap):
    @staticmethod
    def vmap(info, in_dims, x):
        return x * 2  # not (output, out_dims)


class BadOutDims(NoVmap):
    @staticmethod
    def vmap(info, in_dims, x):
        return x * 2, (0, 0)


def _same_error(f):
    with pytest.raises(Exception) as ref:
        f(tf)
    with pytest.raises(type(ref.value)) as ours:
        f(ft)
    return str(ref.value), str(ours.value)


@pytest.mark.parametrize(
    "fn, phrase",
    [
        (
            lambda T: T.vmap(NoVmap.apply)(X),
            "does not have vmap support. Please override and implement the vmap",
        ),
        (lambda T: T.vmap(BothVmap.apply)(X), "has both generate_vmap_rule=True and an overridden vmap"),
        (lambda T: T.jvp(NoVmap.apply, (X,), (X,)), "You must implement the jvp function"),
        (
            lambda T: T.grad(lambda x: NoBackward.apply(x).sum())(X),
            "You must implement either the backward or vjp",
        ),
        (
            lambda T: T.vmap(T.grad(lambda x: NoBackward.apply(x).sum()))(X),
            "You must implement either the backward",
        ),
        (
            lambda T: T.grad(lambda x: OldStyle.apply(x).sum())(X),
            "it must override the setup_context staticmethod",
        ),
        (lambda T: T.vmap(OldStyle.apply)(X), "it must override the setup_context staticmethod"),
        (lambda T: T.vmap(BadVmap.apply)(X), "Expected the vmap staticmethod to have two returns"),
        (lambda T: T.vmap(BadOutDims.apply)(X), "incompatible (output, out_dims) tuple"),
    ],
    ids=[
        "no_vmap",
        "both",
        "no_jvp",
        "no_backward",
        "vmap_grad_no_backward",
        "old_grad",
        "old_vmap",
        "bad_vmap_return",
        "bad_out_dims",
    ],
)
def test_missing_pieces_raise_torch_funcs_error(fn, phrase):
    ref, ours = _same_error(fn)
    assert phrase in ref
    assert phrase in ours


def test_function_outside_transforms_is_untouched():
    x = torch.randn(3, requires_grad=True)
    ScaledSin.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach().cos())
    out = OldStyle.apply(x)
    assert type(out.grad_fn).__name__ == "OldStyleBackward"


def test_custom_op_autograd_formula_runs_under_grad():
    # A torch.library custom op's register_autograd formula is an old-style Function inside
    # torch: it runs in the grad level's autograd kernel and must not be refused there.
    @torch.library.custom_op("ftl_test_af::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(_np(x) * 2))

    twice.register_autograd(lambda ctx, g: 5 * g)
    out = ft.grad(lambda x: twice(x).sum())(X[0])
    torch.testing.assert_close(out, torch.full_like(X[0], 5.0))
