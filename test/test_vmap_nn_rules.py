"""Batching rules of the nn ops: pointwise losses (mse, smooth_l1, huber, binary_cross_entropy,
binary_cross_entropy_with_logits, and l1_loss, which decomposes), batch norm, group norm, lerp.

Every case runs with ft.set_vmap_fallback('error') and checks that no op went through the
for-loop fallback, so a passing test proves a real rule ran. Oracles: a Python for-loop over the
batch (the definition of vmap) and torch.func. Placements cover in_dims 0, -1, a middle dim and
None for some arguments; the losses cover every reduction; gradients go through the backward ops
(vmap(grad), jacrev) and forward-mode formulas (jacfwd) on our wrappers.
"""

import contextlib
import copy
import warnings

import pytest
import torch
import torch.func as tf
import torch.nn.functional as F
from conftest import vmap_fallback
from test_vmap import assert_same, check_vmap, clone_args, loop_vmap
from torch import nn

import functorch_lite as ft

# Different from every logical size below, so confusing the batch dim with another one fails.
B = 3
ATOL = 1e-5
RTOL = 1e-4
REDUCTIONS = ["none", "mean", "sum"]


# ------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def rules_only():
    """Fallback mode 'error', and no op may have taken the for-loop: a rule handled each one."""
    ft._C._reset_fallback_ops_seen()
    with vmap_fallback("error"):
        yield
    assert ft._C._fallback_ops_seen() == []


assert_close = assert_same
clone = clone_args


def check(fn, args, in_dims, torch_func=True, atol=ATOL, rtol=RTOL):
    """ft.vmap(fn) with rules only == for-loop == torch.func.vmap."""
    return check_vmap(fn, tuple(args), in_dims, torch_func=torch_func, atol=atol, rtol=rtol)


def batched(shape, d, kind="f"):
    """A tensor of logical `shape` with the batch at in_dim d (None: unbatched)."""
    if d is not None:
        shape = list(shape)
        shape.insert(d if d >= 0 else len(shape) + 1 + d, B)
    if kind == "prob":
        return torch.rand(shape) * 0.8 + 0.1
    if kind == "pos":
        return torch.rand(shape) + 0.5
    return torch.randn(shape)


def dim_for(placement, shape):
    """in_dim of an argument of logical `shape` under a placement name."""
    return {"0": 0, "-1": -1, "mid": (len(shape) + 1) // 2, "None": None}[placement]


# ------------------------------------------------------------------------------------------------
# losses: forward


def _shape_for(spec):
    return (4, 5) if spec == "full" else (5,)


# name -> (fn(x, t, w, reduction), input kind, target kind, weight spec or None)
LOSSES = {
    "mse": (lambda x, t, w, r: F.mse_loss(x, t, reduction=r), "f", "f", None),
    "smooth_l1": (lambda x, t, w, r: F.smooth_l1_loss(x, t, reduction=r, beta=0.7), "f", "f", None),
    "smooth_l1_beta0": (lambda x, t, w, r: F.smooth_l1_loss(x, t, reduction=r, beta=0.0), "f", "f", None),
    "huber": (lambda x, t, w, r: F.huber_loss(x, t, reduction=r, delta=0.6), "f", "f", None),
    "l1": (lambda x, t, w, r: F.l1_loss(x, t, reduction=r), "f", "f", None),
    "bce": (lambda x, t, w, r: F.binary_cross_entropy(x, t, reduction=r), "prob", "prob", None),
    "bce_weight": (lambda x, t, w, r: F.binary_cross_entropy(x, t, w, reduction=r), "prob", "prob", "full"),
    "bce_weight_bcast": (
        lambda x, t, w, r: F.binary_cross_entropy(x, t, w.expand(4, 5), reduction=r),
        "prob",
        "prob",
        "row",
    ),
    "bce_logits": (
        lambda x, t, w, r: F.binary_cross_entropy_with_logits(x, t, reduction=r),
        "f",
        "prob",
        None,
    ),
    "bce_logits_weight": (
        lambda x, t, w, r: F.binary_cross_entropy_with_logits(x, t, weight=w, reduction=r),
        "f",
        "prob",
        "row",
    ),
    "bce_logits_pos_weight": (
        lambda x, t, w, r: F.binary_cross_entropy_with_logits(x, t, pos_weight=w, reduction=r),
        "f",
        "prob",
        "pos_row",
    ),
}

# Placements: (input, target, weight). Every in_dim for all at once, then None for some.
LOSS_PLACEMENTS = [
    ("0", "0", "0"),
    ("-1", "-1", "-1"),
    ("mid", "mid", "mid"),
    ("0", "None", "None"),
    ("None", "-1", "None"),
    ("mid", "0", "None"),
    ("None", "None", "0"),
    ("-1", "None", "mid"),
]


def _loss_args(name, placement):
    fn, xk, tk, wspec = LOSSES[name]
    xs = (4, 5)
    dims = [dim_for(p, xs) for p in placement[:2]]
    args = [batched(xs, dims[0], xk), batched(xs, dims[1], tk)]
    if wspec is not None:
        ws = _shape_for("full" if wspec == "full" else "row")
        wd = dim_for(placement[2], ws)
        args.append(batched(ws, wd, "pos"))
        dims.append(wd)
    if all(d is None for d in dims):
        return None
    return fn, args, tuple(dims)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("placement", LOSS_PLACEMENTS, ids="-".join)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_forward(name, placement, reduction):
    built = _loss_args(name, placement)
    if built is None:
        pytest.skip("nothing batched")
    fn, args, dims = built
    if len(args) == 2:
        check(lambda x, t: fn(x, t, None, reduction), args, dims)
    else:
        check(lambda x, t, w: fn(x, t, w, reduction), args, dims)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["mse", "huber", "bce"])
def test_loss_logical_scalar_and_broadcast(name, reduction):
    # 0-dim per-element inputs ("mean" must not reduce the batch dim) and a target that broadcasts
    fn = LOSSES[name][0]
    kind = "prob" if name == "bce" else "f"
    check(lambda x, t: fn(x, t, None, reduction), [batched((), 0, kind), batched((), 0, kind)], (0, 0))
    if name != "bce":  # binary_cross_entropy requires equal sizes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mse_loss warns about broadcasting
            check(lambda x, t: fn(x, t, None, reduction), [batched((4, 5), 1), batched((5,), 0)], (1, 0))


# ------------------------------------------------------------------------------------------------
# losses: the backward ops called directly (grad_output batched or not, for every reduction)

BACKWARD_OPS = {
    "mse": (lambda g, x, t, w, r: torch.ops.aten.mse_loss_backward(g, x, t, r), "f", "f"),
    "smooth_l1": (lambda g, x, t, w, r: torch.ops.aten.smooth_l1_loss_backward(g, x, t, r, 0.7), "f", "f"),
    "huber": (lambda g, x, t, w, r: torch.ops.aten.huber_loss_backward(g, x, t, r, 0.6), "f", "f"),
    "bce": (
        lambda g, x, t, w, r: torch.ops.aten.binary_cross_entropy_backward(g, x, t, w, r),
        "prob",
        "prob",
    ),
}
RED_ENUM = {"none": 0, "mean": 1, "sum": 2}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "placement",
    [
        ("0", "0", "0", "0"),
        ("-1", "-1", "None", "-1"),
        ("mid", "None", "mid", "None"),
        ("None", "0", "None", "None"),
        ("0", "None", "None", "None"),
        ("None", "None", "None", "0"),
    ],
    ids="-".join,
)
@pytest.mark.parametrize("name", list(BACKWARD_OPS))
def test_loss_backward_op(name, placement, reduction):
    fn, xk, tk = BACKWARD_OPS[name]
    r = RED_ENUM[reduction]
    gshape = (4, 5) if reduction == "none" else ()
    gd = dim_for(placement[0], gshape) if gshape or placement[0] == "None" else 0
    xd, td = dim_for(placement[1], (4, 5)), dim_for(placement[2], (4, 5))
    g, x, t = batched(gshape, gd), batched((4, 5), xd, xk), batched((4, 5), td, tk)
    if name == "bce":
        wd = dim_for(placement[3], (4, 5))
        args, dims = [g, x, t, batched((4, 5), wd, "pos")], (gd, xd, td, wd)
    else:
        args, dims = [g, x, t], (gd, xd, td)
    if all(d is None for d in dims):
        pytest.skip("nothing batched")
    if len(args) == 4:
        check(lambda g, x, t, w: fn(g, x, t, w, r), args, dims)
    else:
        check(lambda g, x, t: fn(g, x, t, None, r), args, dims)


# ------------------------------------------------------------------------------------------------
# losses: gradients (backward ops under vmap) and forward mode (torch's formulas on our wrappers)


def _loss_fn_for_grad(name, reduction, with_weight_arg):
    fn, xk, tk, wspec = LOSSES[name]
    out = (
        (lambda x, t, w: fn(x, t, w, reduction))
        if with_weight_arg
        else (lambda x, t: fn(x, t, None, reduction))
    )
    return out, xk, tk, wspec


def _scalarize(f):
    """Sum for reduction='none', so that grad applies (the sum's backward is a plain expand)."""
    return lambda *a: f(*a).sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_per_sample_grad(name, reduction):
    fn, xk, tk, wspec = LOSSES[name]
    loss = _scalarize(lambda x, t, w: fn(x, t, w, reduction))
    x, t = batched((4, 5), 0, xk), batched((4, 5), 0, tk)
    w = batched(_shape_for("full" if wspec == "full" else "row"), None, "pos")
    for in_dims in [(0, 0, None), (0, None, None), (None, 0, None)]:
        tt = t if in_dims[1] == 0 else t[0]
        xx = x if in_dims[0] == 0 else x[0]
        # argnums=(0, 1): target gradients exercise the backward op with swapped roles
        argnums = (0, 1) if name in ("mse", "smooth_l1", "huber", "l1") else 0
        with rules_only():
            got = ft.vmap(ft.grad(loss, argnums=argnums), in_dims)(xx, tt, w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.func's huber rule resizes an output
            expected = tf.vmap(tf.grad(loss, argnums=argnums), in_dims)(xx, tt, w)
        assert_close(got, expected, what=f"vmap(grad) {in_dims}")
        ref = loop_vmap(lambda a, b, c: torch.func.grad(loss, argnums=argnums)(a, b, c), in_dims)(xx, tt, w)
        assert_close(got, ref, what=f"vmap(grad) vs loop {in_dims}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_per_sample_grad_of_weight(name, reduction):
    fn, xk, tk, wspec = LOSSES[name]
    if wspec is None:
        pytest.skip("no weight")
    # a batched weight (e.g. per-model class weights) meets an unbatched input in the backward op;
    # the bce losses are not differentiable in their weights
    loss = _scalarize(lambda w, x, t: fn(x, t, w, reduction))
    argnums = 1
    w = batched(_shape_for("full" if wspec == "full" else "row"), 0, "pos")
    x, t = batched((4, 5), None, xk), batched((4, 5), 0, tk)
    with rules_only():
        got = ft.vmap(ft.grad(loss, argnums=argnums), (0, None, 0))(w, x, t)
    assert_close(got, tf.vmap(tf.grad(loss, argnums=argnums), (0, None, 0))(w, x, t))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("jac", ["jacrev", "jacfwd"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_jacobians(name, jac, reduction):
    fn, xk, tk, wspec = LOSSES[name]
    x, t = batched((4, 5), None, xk), batched((4, 5), None, tk)
    w = batched(_shape_for("full" if wspec == "full" else "row"), None, "pos")
    f = lambda x, t: fn(x, t, w, reduction)  # noqa: E731
    argnums = (0, 1) if name not in ("bce", "bce_weight", "bce_weight_bcast") else 0
    with rules_only():
        got = getattr(ft, jac)(f, argnums=argnums)(x, t)
    assert_close(got, getattr(tf, jac)(f, argnums=argnums)(x, t), what=jac)


# huber_loss_backward has no forward-mode formula in torch, so no hessian through it
@pytest.mark.parametrize("name", ["mse", "smooth_l1", "bce", "bce_logits"])
def test_loss_hessian(name):
    # jacfwd(jacrev): forward mode through the backward ops' own derivative formulas
    fn, xk, tk, wspec = LOSSES[name]
    x, t = batched((3, 4), None, xk), batched((3, 4), None, tk)
    f = lambda x: fn(x, t, None, "mean")  # noqa: E731
    with rules_only():
        got = ft.hessian(f)(x)
    assert_close(got, tf.hessian(f)(x), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# batch norm

C = 4


def _bn_args(x_d, stats_d, affine_d, spatial=(3, 2)):
    """x: [N=5, C, *spatial]; stats/affine: [C] each, batched at the given in_dims."""
    xs = (5, C) + spatial
    x = batched(xs, x_d)
    rm, rv = batched((C,), stats_d), batched((C,), stats_d, "pos")
    w, b = batched((C,), affine_d), batched((C,), affine_d)
    return [x, rm, rv, w, b], (x_d, stats_d, stats_d, affine_d, affine_d)


def _bn_eval(x, rm, rv, w, b):
    return F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-4)


def _bn_train_no_stats(x, rm, rv, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=1e-4)


BN_PLACEMENTS = [
    (0, None, None),
    (-1, None, None),
    (2, None, None),
    (1, 0, 0),
    (0, 0, None),
    (None, 0, None),
    (None, None, 0),
    (3, -1, 0),
]


@pytest.mark.parametrize("spatial", [(), (3,), (3, 2)], ids=["1d_NC", "1d_NCL", "2d"])
@pytest.mark.parametrize("placement", BN_PLACEMENTS, ids=str)
@pytest.mark.parametrize("fn", [_bn_eval, _bn_train_no_stats], ids=["eval", "train_no_stats"])
def test_batch_norm_forward(fn, placement, spatial):
    x_d = placement[0]
    if x_d is not None and x_d > len(spatial) + 2 - 1 + 1:
        x_d = -1
    args, dims = _bn_args(x_d, *placement[1:], spatial=spatial)
    if fn is _bn_train_no_stats and x_d is None and placement[2] is None:
        pytest.skip("nothing batched that the function uses")
    check(fn, args, dims)


def test_batch_norm_no_affine_eval():
    args, dims = _bn_args(0, 0, None)
    check(lambda x, rm, rv: F.batch_norm(x, rm, rv, training=False), args[:3], dims[:3])


@pytest.mark.parametrize("stats_d", [0, 1])
@pytest.mark.parametrize("x_d", [0, None])
def test_batch_norm_train_with_batched_running_stats(x_d, stats_d):
    # ensembles (stack_module_state): each element updates its own slice of the stats
    x = batched((5, C, 3), x_d)
    rm = batched((C,), stats_d)
    rv = batched((C,), stats_d, "pos")
    w = torch.randn(C)
    fn = lambda x, rm, rv: F.batch_norm(
        x,
        rm,
        rv,
        w,
        None,
        training=True,  # noqa: E731
        momentum=0.3,
    )
    dims = (x_d, stats_d, stats_d)
    ours = clone([x, rm, rv])
    with rules_only():
        got = ft.vmap(fn, dims)(*ours)
    loop = clone([x, rm, rv])
    assert_close(got, loop_vmap(fn, dims)(*loop))
    assert_close(ours, loop, what="running stats updated as in the for-loop")


def test_batch_norm_train_with_unbatched_running_stats_raises():
    rm, rv = torch.zeros(C), torch.ones(C)
    before = (rm.clone(), rv.clone())
    with rules_only(), pytest.raises(RuntimeError, match="running_mean/running_var once per batch"):
        ft.vmap(lambda x: F.batch_norm(x, rm, rv, training=True))(torch.randn(B, 5, C))
    assert_close((rm, rv), before, what="nothing updated")
    # only the weight batched: still one update per batch element
    x = torch.randn(5, C)
    with rules_only(), pytest.raises(RuntimeError, match="track_running_stats=False"):
        ft.vmap(lambda w: F.batch_norm(x, rm, rv, w, training=True))(torch.randn(B, C))


@pytest.mark.parametrize("fn", [_bn_eval, _bn_train_no_stats], ids=["eval", "train_no_stats"])
def test_batch_norm_grads(fn):
    args, _ = _bn_args(None, None, None)
    x, rm, rv, w, b = args
    loss = lambda x, w, b: fn(x, rm, rv, w, b).sin().sum()  # noqa: E731
    xs = batched(x.shape, 0)
    with rules_only():
        got = ft.vmap(ft.grad(loss, argnums=(0, 1, 2)), (0, None, None))(xs, w, b)
    assert_close(got, tf.vmap(tf.grad(loss, argnums=(0, 1, 2)), (0, None, None))(xs, w, b))
    ws = batched(w.shape, 0)
    with rules_only():
        got = ft.vmap(ft.grad(loss, argnums=(0, 1, 2)), (None, 0, None))(x, ws, b)
    assert_close(got, tf.vmap(tf.grad(loss, argnums=(0, 1, 2)), (None, 0, None))(x, ws, b))
    for jac in ("jacrev", "jacfwd"):
        f = lambda x, w: fn(x, rm, rv, w, b)  # noqa: E731
        with rules_only():
            got = getattr(ft, jac)(f, argnums=(0, 1))(x, w)
        assert_close(got, getattr(tf, jac)(f, argnums=(0, 1))(x, w), what=jac)


def test_batch_norm_backward_op_direct():
    # the backward op under vmap with grad_out batched only (jacrev of an unbatched forward)
    x = torch.randn(5, C, 3)
    w = torch.randn(C)
    _, mean, invstd = torch.ops.aten.native_batch_norm(x, w, None, None, None, True, 0.1, 1e-5)

    def bwd(g, x, mean, invstd, w):
        return torch.ops.aten.native_batch_norm_backward(
            g, x, w, None, None, mean, invstd, True, 1e-5, [True, True, True]
        )

    gs = torch.randn(B, 5, C, 3)
    check(bwd, [gs, x, mean, invstd, w], (0, None, None, None, None))
    check(bwd, [gs.movedim(0, -1), x.expand(B, *x.shape).clone(), mean, invstd, w], (-1, 0, None, None, None))


# ------------------------------------------------------------------------------------------------
# group norm

GN_PLACEMENTS = [(0, None), (-1, None), (2, None), (1, 0), (None, 0), (0, -1)]


@pytest.mark.parametrize("spatial", [(), (3,), (3, 2)], ids=["NC", "NCL", "NCHW"])
@pytest.mark.parametrize("placement", GN_PLACEMENTS, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_forward(placement, spatial, affine):
    x_d, w_d = placement
    if x_d is not None and x_d > len(spatial) + 1:
        x_d = -1
    x = batched((2, 6) + spatial, x_d)
    if not affine:
        if x_d is None:
            pytest.skip("nothing batched")
        check(lambda x: F.group_norm(x, 3, eps=1e-4), [x], (x_d,))
        return
    w, b = batched((6,), w_d), batched((6,), w_d)
    check(lambda x, w, b: F.group_norm(x, 3, w, b, eps=1e-4), [x, w, b], (x_d, w_d, w_d))


def test_group_norm_grads():
    x, w, b = torch.randn(2, 6, 3), torch.randn(6), torch.randn(6)
    loss = lambda x, w, b: F.group_norm(x, 2, w, b).sin().sum()  # noqa: E731
    for dims in [(0, None, None), (None, 0, 0), (0, 0, None)]:
        args = [batched(a.shape, d) for a, d in zip((x, w, b), dims)]
        args = [a if d is not None else o for a, d, o in zip(args, dims, (x, w, b))]
        with rules_only():
            got = ft.vmap(ft.grad(loss, argnums=(0, 1, 2)), dims)(*args)
        assert_close(got, tf.vmap(tf.grad(loss, argnums=(0, 1, 2)), dims)(*args), what=str(dims))
    for jac in ("jacrev", "jacfwd"):
        f = lambda x, w: F.group_norm(x, 2, w, b)  # noqa: E731
        with rules_only():
            got = getattr(ft, jac)(f, argnums=(0, 1))(x, w)
        assert_close(got, getattr(tf, jac)(f, argnums=(0, 1))(x, w), what=jac)


def test_group_norm_hessian():
    x, w = torch.randn(2, 4, 3), torch.randn(4)
    f = lambda x: F.group_norm(x, 2, w).pow(2).mean()  # noqa: E731
    with rules_only():
        got = ft.hessian(f)(x)
    assert_close(got, tf.hessian(f)(x), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# per-sample gradients of modules (vmap(grad(functional_call))) against torch.autograd.grad


def _per_sample_grads(model, xs, ys):
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, x, y):
        out = ft.functional_call(model, (p, buffers), (x[None],))
        return F.mse_loss(out, y[None])

    with rules_only():
        got = ft.vmap(ft.grad(loss), (None, 0, 0))(params, xs, ys)
    expected = {k: [] for k in params}
    for x, y in zip(xs, ys):
        grads = torch.autograd.grad(F.mse_loss(model(x[None]), y[None]), list(model.parameters()))
        for k, g in zip(params, grads):
            expected[k].append(g)
    expected = {k: torch.stack(v) for k, v in expected.items()}
    assert list(got) == list(expected)
    for k in got:
        assert_close(got[k], expected[k], what=k)


@pytest.mark.parametrize("layer", ["GroupNorm", "BatchNorm2d_eval"])
def test_per_sample_grads_of_norm_modules(layer):
    torch.manual_seed(0)
    if layer == "GroupNorm":
        norm = nn.GroupNorm(2, 4)
    else:
        norm = nn.BatchNorm2d(4)
        with torch.no_grad():
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 3))
    if layer != "GroupNorm":
        model.eval()
    xs, ys = torch.randn(B, 2, 5, 5), torch.randn(B, 3)
    _per_sample_grads(model, xs, ys)


def test_ensemble_of_batch_norms_in_training_mode():
    # stacked params and running stats (stack_module_state): each model updates its own stats
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(B)]
    refs = copy.deepcopy(models)
    params, buffers = ft.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(6, 3)
    with rules_only():
        got = ft.vmap(lambda p, b, x: ft.functional_call(base, (p, b), (x,)), (0, 0, None))(
            params, buffers, x
        )
    assert_close(got, torch.stack([m(x) for m in refs]))
    for k, v in buffers.items():
        assert_close(v, torch.stack([dict(m.named_buffers())[k] for m in refs]), what=k)


# ------------------------------------------------------------------------------------------------
# lerp


@pytest.mark.parametrize("dims", [(0, 0), (-1, None), (None, 1), (1, -1)], ids=str)
def test_lerp(dims):
    a, b = batched((4, 5), dims[0]), batched((4, 5), dims[1])
    check(lambda a, b: torch.lerp(a, b, 0.3), [a, b], dims)
    w = batched((4, 5), dims[1])
    check(lambda a, b, w: torch.lerp(a, b, w), [a, b, w], dims + (dims[1],))
    if dims[0] is not None:
        check(lambda a, b: a.clone().lerp_(b, 0.7), [a, b], dims)


def test_lerp_grads():
    a, b = torch.randn(B, 4), torch.randn(4)
    f = lambda a, b: torch.lerp(a, b, 0.3).sin().sum()  # noqa: E731
    with rules_only():
        got = ft.vmap(ft.grad(f, argnums=(0, 1)), (0, None))(a, b)
    assert_close(got, tf.vmap(tf.grad(f, argnums=(0, 1)), (0, None))(a, b))
    with rules_only():
        got = ft.jacfwd(lambda a: torch.lerp(a, b, 0.3))(a[0])
    assert_close(got, tf.jacfwd(lambda a: torch.lerp(a, b, 0.3))(a[0]))


# ------------------------------------------------------------------------------------------------
# what F.batch_norm / F.group_norm reach in torch (the rules are on these ops)


def test_ops_reached_by_batch_norm_and_group_norm():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = torch.randn(5, C, 3, requires_grad=True)
    w = torch.randn(C, requires_grad=True)
    for call in (
        lambda: F.batch_norm(x, torch.zeros(C), torch.ones(C), w, training=False),
        lambda: F.batch_norm(x, None, None, w, training=True),
    ):
        with Record() as rec:
            call().sum().backward()
        assert {"aten.native_batch_norm", "aten.native_batch_norm_backward"} <= rec.ops
        assert not any("_legit" in o or "_batch_norm_with" in o or "_batch_norm_no" in o for o in rec.ops), (
            rec.ops
        )
    with Record() as rec:
        F.group_norm(x, 2, w).sum().backward()
    assert {"aten.native_group_norm", "aten.native_group_norm_backward"} <= rec.ops


def test_composite_losses_need_no_rule():
    # l1_loss decomposes (CompositeImplicitAutograd); bce_with_logits does not, so it has a rule
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::l1_loss", "CompositeImplicitAutograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::binary_cross_entropy_with_logits", "CompositeImplicitAutograd"
    )


# ------------------------------------------------------------------------------------------------
# cudnn_batch_norm / miopen_batch_norm: what F.batch_norm reaches on CUDA / ROCm. Their rules run
# them as native_batch_norm on the folded tensors, so they can be checked here on CPU by calling
# the ops directly under vmap (outside vmap they have no CPU kernel: the oracle is
# native_batch_norm per element).

_BN_DEVICE_OPS = {
    "cudnn": (torch.ops.aten.cudnn_batch_norm, torch.ops.aten.cudnn_batch_norm_backward),
    "miopen": (torch.ops.aten.miopen_batch_norm, torch.ops.aten.miopen_batch_norm_backward),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", list(_BN_DEVICE_OPS))
def test_device_batch_norm_ops_run_as_native(kind, training):
    fwd, _ = _BN_DEVICE_OPS[kind]
    x, w, b = torch.randn(B, 4, 3, 5), torch.randn(3), torch.randn(3)
    rm, rv = torch.randn(B, 3), torch.rand(B, 3) + 0.5
    with rules_only():
        got = ft.vmap(lambda x, rm, rv: fwd(x, w, b, rm, rv, training, 0.1, 1e-5)[:3])(
            x, rm.clone(), rv.clone()
        )
    for i in range(B):
        y, mean, invstd = torch.native_batch_norm(x[i], w, b, rm[i], rv[i], training, 0.1, 1e-5)
        assert_close(got[0][i], y, what="output")
        if training:
            assert_close(got[1][i], mean, what="save_mean")
            assert_close(got[2][i], invstd, what="save_invstd")


@pytest.mark.parametrize("kind", list(_BN_DEVICE_OPS))
def test_device_batch_norm_training_with_unbatched_running_stats_raises(kind):
    fwd, _ = _BN_DEVICE_OPS[kind]
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="running_mean/running_var once per batch element"):
        ft.vmap(lambda x: fwd(x, torch.ones(3), None, rm, rv, True, 0.1, 1e-5)[0])(torch.randn(B, 4, 3))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("kind", list(_BN_DEVICE_OPS))
def test_device_batch_norm_backward_runs_as_native(kind):
    _, bwd = _BN_DEVICE_OPS[kind]
    x, g, w = torch.randn(B, 4, 3, 5), torch.randn(B, 4, 3, 5), torch.randn(3)
    mean, invstd = torch.randn(B, 3), torch.rand(B, 3) + 0.5
    extra = (torch.empty(0, dtype=torch.uint8),) if kind == "cudnn" else ()
    with rules_only():
        got = ft.vmap(lambda x, g, m, s: bwd(x, g, w, None, None, m, s, 1e-5, *extra))(x, g, mean, invstd)
    for i in range(B):
        ref = torch.ops.aten.native_batch_norm_backward(
            g[i], x[i], w, None, None, mean[i], invstd[i], True, 1e-5, [True, True, True]
        )
        for k in range(3):
            assert_close(got[k][i], ref[k], what=f"output {k}")
