"""Per-element output shapes of the loss batching rules (csrc/vmap/rules_loss.cpp).

For every loss op with a rule, every reduction, and the per-element input ranks (0, 1, 2) and
target shapes the op accepts (a [1] target next to a 0-D one, a target that broadcasts), vmap's
result must be the stack of the op's results on each element: same shape, same values. Where
torch refuses the shapes for one element, vmap must refuse them with the same exception type.
Backward rules are reached through vmap(grad(loss)).

Each case runs for every placement of the batch dim over the arguments (0, -1, a middle dim, and
None for each argument in turn, as in _placements), under ft.set_vmap_fallback('error'), and is
compared with a Python for-loop of eager calls and with torch.func.vmap.
"""

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from _placements import make, placements
from conftest import outcome, vmap_fallback
from test_vmap import assert_same, loop_vmap

import functorch_lite as ft

aten = torch.ops.aten
C = 4  # classes; B (test_vmap) is 3, so a rule that mixes the two fails
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def idx(shape, high=C):
    return ("idx", shape, high)


def f(shape):
    return ("f", shape)


def unit(shape):
    return ("unit", shape)


def prob(u):
    """A probability in (0, 1) from a "unit" argument in (-1, 1)."""
    return (u + 1) / 2


# ------------------------------------------------------------------------------------------------
# Cases: name -> (fn(red, *args), specs). `red` is the reduction's name; aten ops take its enum.
# TORCH_FUNC_WRONG: name -> why torch.func.vmap disagrees with the for-loop there (other values or
# shapes, or an error where the op takes the shapes); torch.func is not compared for those.

CASES = {}
TORCH_FUNC_WRONG = {}
BROADCAST_TARGET = (
    "torch.func's rules for the pointwise losses assume a target of the input's shape: with a "
    "target that broadcasts, it returns other shapes or values, or raises"
)
ONE_ELEMENT_TARGET = "torch.func refuses the [1] target that the op takes for a [C] input"


def case(name, fn, *specs, torch_func_wrong=None):
    assert name not in CASES, name
    CASES[name] = (fn, specs)
    if torch_func_wrong:
        TORCH_FUNC_WRONG[name] = torch_func_wrong


# nll_loss (and cross_entropy, which ends there): [C] input with a 0-D target, or with the [1]
# target the forward also takes; [N, C] with [N]; the nll_loss2d path for more dims.
NLL_SHAPES = [((C,), ()), ((C,), (1,)), ((2, C), (2,)), ((1, C), (1,)), ((1, C), ()), ((), ())]
for xs, ts in NLL_SHAPES:
    tag = f"x{list(xs)}_t{list(ts)}"
    wrong = ONE_ELEMENT_TARGET if len(xs) == 1 and ts == (1,) else None
    case(
        f"nll_loss_{tag}",
        lambda red, x, t: F.nll_loss(x, t, reduction=red),
        f(xs),
        idx(ts),
        torch_func_wrong=wrong,
    )
    case(
        f"nll_loss_weight_{tag}",
        lambda red, x, t, w: F.nll_loss(x, t, weight=w.exp(), reduction=red),
        f(xs),
        idx(ts),
        f((C,)),
        torch_func_wrong=wrong,
    )
    case(
        f"aten_nll_loss_forward_{tag}",
        lambda red, x, t: aten.nll_loss_forward(x, t, None, REDUCTIONS[red], -100)[0],
        f(xs),
        idx(ts),
        torch_func_wrong=wrong,
    )
    if xs:
        case(
            f"cross_entropy_{tag}",
            lambda red, x, t: F.cross_entropy(x, t, reduction=red),
            f(xs),
            idx(ts),
            torch_func_wrong=wrong,
        )
case(
    "nll_loss2d_x[2,4,3,3]",
    lambda red, x, t: aten.nll_loss2d_forward(x, t, None, REDUCTIONS[red], -100)[0],
    f((2, C, 3, 3)),
    idx((2, 3, 3)),
)
case("nll_loss_nd_x[2,4,3]", lambda red, x, t: F.nll_loss(x, t, reduction=red), f((2, C, 3)), idx((2, 3)))
case(
    "cross_entropy_probs_x[2,4]",
    lambda red, x, t: F.cross_entropy(x, t.softmax(-1), reduction=red),
    f((2, C)),
    f((2, C)),
)

# Pointwise losses on aten (F.* would warn about differing shapes, or refuse them): the target
# may have the input's shape, be a scalar, a [1], a [1, 1] or a trailing-dim vector.
POINTWISE = {
    "mse_loss": lambda red, x, t: aten.mse_loss(x, t, REDUCTIONS[red]),
    "huber_loss": lambda red, x, t: aten.huber_loss(x, t, REDUCTIONS[red], 0.7),
    "smooth_l1_loss": lambda red, x, t: aten.smooth_l1_loss(x, t, REDUCTIONS[red], 0.5),
    "soft_margin_loss": lambda red, x, t: aten.soft_margin_loss(x, t, REDUCTIONS[red]),
    "binary_cross_entropy": lambda red, x, t: aten.binary_cross_entropy(
        prob(x), prob(t), None, REDUCTIONS[red]
    ),
    "binary_cross_entropy_with_logits": lambda red, x, t: aten.binary_cross_entropy_with_logits(
        x, prob(t), None, None, REDUCTIONS[red]
    ),
}
POINTWISE_SHAPES = [
    ((), ()),
    ((), (1,)),
    ((), (1, 1)),
    ((3,), (3,)),
    ((3,), ()),
    ((3,), (1,)),
    ((3,), (1, 1)),
    ((1,), (3,)),
    ((2, 3), (2, 3)),
    ((2, 3), (3,)),
    ((2, 3), ()),
    ((2, 1), (3,)),
]
for op, fn in POINTWISE.items():
    for xs, ts in POINTWISE_SHAPES:
        wrong = BROADCAST_TARGET if xs != ts else None
        case(f"{op}_x{list(xs)}_t{list(ts)}", fn, unit(xs), unit(ts), torch_func_wrong=wrong)
for name, fn in {
    "mse_loss": lambda red, x, t: F.mse_loss(x, t, reduction=red),
    "huber_loss": lambda red, x, t: F.huber_loss(x, t, reduction=red, delta=0.7),
    "smooth_l1_loss": lambda red, x, t: F.smooth_l1_loss(x, t, reduction=red, beta=0.5),
    "soft_margin_loss": lambda red, x, t: F.soft_margin_loss(x, t, reduction=red),
    "binary_cross_entropy": lambda red, x, t: F.binary_cross_entropy(prob(x), prob(t), reduction=red),
    "binary_cross_entropy_with_logits": lambda red, x, t: F.binary_cross_entropy_with_logits(
        x, prob(t), reduction=red
    ),
}.items():
    for xs in [(), (3,), (2, 3)]:
        case(f"F_{name}_x{list(xs)}", fn, unit(xs), unit(xs))
# weights: the input's shape, a vector broadcast over rows, a [1]
for xs, ws in [((3,), (3,)), ((2, 3), (3,)), ((2, 3), (1,)), ((), ()), ((3,), (1, 3))]:
    tag = f"x{list(xs)}_w{list(ws)}"
    case(
        f"binary_cross_entropy_weight_{tag}",
        lambda red, x, t, w: aten.binary_cross_entropy(prob(x), prob(t), w.exp(), REDUCTIONS[red]),
        unit(xs),
        unit(xs),
        f(ws),
    )
    case(
        f"binary_cross_entropy_with_logits_weight_{tag}",
        lambda red, x, t, w: aten.binary_cross_entropy_with_logits(
            x, prob(t), w.exp(), None, REDUCTIONS[red]
        ),
        unit(xs),
        unit(xs),
        f(ws),
    )
    case(
        f"binary_cross_entropy_with_logits_pos_weight_{tag}",
        lambda red, x, t, pw: aten.binary_cross_entropy_with_logits(
            x, prob(t), None, pw.exp(), REDUCTIONS[red]
        ),
        unit(xs),
        unit(xs),
        f(ws),
    )

# multi_margin_loss: 'none' gives [N] when the target has a dim ([C] or 0-D input with a [1]
# target included) and a scalar for a 0-D target.
MARGIN_SHAPES = [((C,), ()), ((C,), (1,)), ((2, C), (2,)), ((1, C), (1,)), ((1, C), ()), ((), ()), ((), (1,))]
for xs, ts in MARGIN_SHAPES:
    tag = f"x{list(xs)}_t{list(ts)}"
    high = xs[-1] if xs else 1
    case(
        f"multi_margin_loss_{tag}",
        lambda red, x, t: F.multi_margin_loss(x, t, reduction=red),
        f(xs),
        idx(ts, high),
    )
    case(
        f"multi_margin_loss_p2_weight_{tag}",
        lambda red, x, t, w: F.multi_margin_loss(x, t, p=2, margin=0.5, weight=w.exp(), reduction=red),
        f(xs),
        idx(ts, high),
        f((high,)),
    )
for xs in [(C,), (2, C), ()]:
    case(
        f"multilabel_margin_loss_x{list(xs)}",
        lambda red, x, t: F.multilabel_margin_loss(x, t, reduction=red),
        f(xs),
        idx(xs, xs[-1] if xs else 1),
    )

# torch.func.vmap raises another exception type than the op on one element; functorch_lite raises
# the op's (the for-loop's): {case name prefix: why}.
TORCH_FUNC_EXCEPTION = {
    "nll_loss_x[]": "torch.func's Python decomposition of nll_loss_forward asserts (AssertionError)",
    "nll_loss_weight_x[]": "as nll_loss_x[]",
    "aten_nll_loss_forward_x[]": "as nll_loss_x[]",
}


def _params():
    for name, (_, specs) in CASES.items():
        for red in REDUCTIONS:
            for pname, in_dims in placements(specs):
                yield pytest.param(name, red, in_dims, id=f"{name}-{red}-{pname}")


def _check_exception(name, ft_exc, loop_exc, tf_exc):
    """torch refuses the shapes for one element: so must vmap, with torch.func's exception type
    (the op's where torch.func does not raise, or raises another type for a known reason)."""
    known = any(name.startswith(k) for k in TORCH_FUNC_EXCEPTION) or name in TORCH_FUNC_WRONG
    want = type(loop_exc) if (tf_exc is None or known) else type(tf_exc)
    assert type(ft_exc) is want, f"{ft_exc!r}: expected {want.__name__} (for-loop: {loop_exc!r})"
    assert "INTERNAL ASSERT" not in str(ft_exc), ft_exc


def _check(fn, specs, in_dims, name):
    args = [make(s, d) for s, d in zip(specs, in_dims)]
    expected, loop_exc = outcome(lambda: loop_vmap(fn, in_dims)(*args))
    torch_func, tf_exc = outcome(lambda: tf.vmap(fn, in_dims)(*args))
    with vmap_fallback("error"):
        actual, ft_exc = outcome(lambda: ft.vmap(fn, in_dims)(*args))
    if loop_exc is not None:
        assert ft_exc is not None, f"the for-loop raises {loop_exc!r}, functorch_lite returns {actual}"
        _check_exception(name, ft_exc, loop_exc, tf_exc)
        return
    assert ft_exc is None, f"the for-loop returns, functorch_lite raises {ft_exc!r}"
    assert_same(actual, expected, 1e-5, 1e-5, "ft.vmap vs for-loop")
    _compare_torch_func(name, actual, torch_func, tf_exc)


def _compare_torch_func(name, actual, torch_func, tf_exc):
    if name in TORCH_FUNC_WRONG:
        return
    assert tf_exc is None, f"torch.func raises {tf_exc!r} where the for-loop returns"
    assert_same(actual, torch_func, 1e-5, 1e-5, "ft.vmap vs torch.func.vmap")


@pytest.mark.parametrize("name, red, in_dims", list(_params()))
def test_loss_shape_per_element(name, red, in_dims):
    fn, specs = CASES[name]
    _check(lambda *a: fn(red, *a), specs, in_dims, name)


def _grad_params():
    for name, (_, specs) in CASES.items():
        if specs[0][0] == "idx":
            continue
        for red in REDUCTIONS:
            # the input batched (its gradient is what is asked), the others at each placement
            for pname, in_dims in placements(specs):
                if in_dims[0] is not None:
                    yield pytest.param(name, red, in_dims, id=f"{name}-{red}-{pname}")


@pytest.mark.parametrize("name, red, in_dims", list(_grad_params()))
def test_loss_backward_shape_per_element(name, red, in_dims):
    """The backward rules, through vmap(grad): per element, the gradient grad gives that element."""
    fn, specs = CASES[name]

    def per_element(lib):
        return lambda x, *rest: lib.grad(lambda x: fn(red, x, *rest).sum())(x)

    # The loop runs ft.grad on each element: vmap(g) must be the stack of g's results. (Eager
    # autograd is no oracle here: some backward formulas take an in-place path outside of
    # transforms, which refuses broadcasting targets that the out-of-place path takes.)
    args = [make(s, d) for s, d in zip(specs, in_dims)]
    expected, loop_exc = outcome(lambda: loop_vmap(per_element(ft), in_dims)(*args))
    torch_func, tf_exc = outcome(lambda: tf.vmap(per_element(tf), in_dims)(*args))
    with vmap_fallback("error"):
        actual, ft_exc = outcome(lambda: ft.vmap(per_element(ft), in_dims)(*args))
    if loop_exc is not None:
        assert ft_exc is not None, f"the for-loop raises {loop_exc!r}, functorch_lite returns {actual}"
        _check_exception(name, ft_exc, loop_exc, tf_exc)
        return
    assert ft_exc is None, f"the for-loop returns, functorch_lite raises {ft_exc!r}"
    assert_same(actual, expected, 1e-5, 1e-5, "ft.vmap(ft.grad) vs for-loop")
    _compare_torch_func(name, actual, torch_func, tf_exc)


def test_multi_margin_loss_none_keeps_the_targets_dim():
    """The reported case: a [5] input with a [1] target gives a [1] loss per element."""
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4, 1))

    def loss(x, t):
        return F.multi_margin_loss(x, t, reduction="none")

    expected = torch.stack([loss(a, b) for a, b in zip(x, t)])
    assert expected.shape == (4, 1)
    with vmap_fallback("error"):
        assert_same(ft.vmap(loss)(x, t), expected)
    assert_same(tf.vmap(loss)(x, t), expected)
