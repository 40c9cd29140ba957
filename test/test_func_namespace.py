"""functorch_lite.func mirrors torch.func's namespace; torch.func's helpers debug_unwrap,
replace_all_batch_norm_modules_ and rearrange (issue 15). Differential against torch.func."""

import copy
import inspect

import pytest
import torch
import torch.func
import torch.nn.functional as F
from torch import nn

import functorch_lite as ft
import functorch_lite.func as func

_TORCH_NAMES = sorted(set(torch.func.__all__) | {n for n in dir(torch.func) if not n.startswith("_")})


@pytest.mark.parametrize("name", _TORCH_NAMES)
def test_every_public_name_of_torch_func_exists(name):
    ours = getattr(func, name)
    assert callable(ours)
    assert name in func.__all__
    # ours, not torch's
    assert ours is not getattr(torch.func, name)
    assert ours.__module__.startswith("functorch_lite"), ours.__module__


def test_names_map_to_the_package_transforms():
    for name in ("vmap", "grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "linearize"):
        assert getattr(func, name) is getattr(ft, name)
    assert func.functional_call is ft.functional_call
    assert func.stack_module_state is ft.stack_module_state
    assert func.debug_unwrap is ft.debug_unwrap
    assert func.replace_all_batch_norm_modules_ is ft.replace_all_batch_norm_modules_
    assert func.rearrange is ft.rearrange


def test_signatures_match_torch_func():
    for name in _TORCH_NAMES:
        ours, theirs = inspect.signature(getattr(func, name)), inspect.signature(getattr(torch.func, name))
        # the parameters a caller can name: same names, kinds and defaults
        want = [(p.name, p.kind, p.default) for p in theirs.parameters.values()]
        got = [(p.name, p.kind, p.default) for p in ours.parameters.values()]
        assert got[: len(want)] == want, (name, got, want)


def test_functionalize_is_ours():
    # implemented on torch's public functional tensors (tests: test_functionalize.py)
    assert func.functionalize.__module__ == "functorch_lite._functionalize"
    x = torch.randn(3)
    torch.testing.assert_close(func.functionalize(torch.sin)(x), x.sin())


def test_register_vmap_when_the_package_has_it():
    if hasattr(ft, "register_vmap"):
        assert func.register_vmap is ft.register_vmap
    else:
        with pytest.raises(AttributeError, match="register_vmap"):
            func.register_vmap  # noqa: B018
    with pytest.raises(AttributeError):
        func.no_such_name  # noqa: B018


def _program(f):
    """A user's program written against the torch.func namespace `f`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 4), torch.randn(6, 1)

    def loss(p, xi, yi):
        return F.mse_loss(f.functional_call(model, p, (xi,)), yi)

    out = {}
    out["per_sample"] = f.vmap(f.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    w = torch.randn(3)
    g = lambda w: (w.sin() * w).sum()  # noqa: E731
    out["jacrev"] = f.jacrev(lambda w: w.sin() * w)(w)
    out["jacfwd"] = f.jacfwd(lambda w: w.sin() * w)(w)
    out["hessian"] = f.hessian(g)(w)
    out["grad_and_value"] = f.grad_and_value(g)(w)
    out["vjp"] = f.vjp(torch.sin, w)[1](torch.ones(3))
    out["jvp"] = f.jvp(torch.sin, (w,), (torch.ones(3),))
    out["linearize"] = f.linearize(torch.sin, w)[1](torch.ones(3))
    models = [nn.Linear(4, 2) for _ in range(3)]
    stacked, _ = f.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    out["ensemble"] = f.vmap(lambda p, xx: f.functional_call(base, p, (xx,)), in_dims=(0, None))(stacked, x)
    out["rearrange"] = f.rearrange(x, "(b1 b) d -> b b1 d", b1=2)
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_line_swap():
    got, ref = _program(func), _program(torch.func)
    assert got.keys() == ref.keys()
    for k in got:
        torch.testing.assert_close(got[k], ref[k], msg=k)


# ---- debug_unwrap


def test_debug_unwrap_plain_tensor_is_itself():
    x = torch.randn(3)
    assert ft.debug_unwrap(x) is x
    assert ft.debug_unwrap(x, recurse=False) is x
    assert torch.func.debug_unwrap(x) is x


@pytest.mark.parametrize("in_dims", [0, 1])
def test_debug_unwrap_under_vmap_and_grad(in_dims):
    x = torch.randn(3, 3)
    seen = {}

    def make(f, key):
        def inner(a):
            seen[key] = (f.debug_unwrap(a), f.debug_unwrap(a, recurse=False))
            return (a * 2).sum()

        return f.vmap(f.grad(inner), in_dims=in_dims)

    for f, key in ((func, "ours"), (torch.func, "ref")):
        make(f, key)(x)
    full, one = seen["ours"]
    ref_full, _ = seen["ref"]
    # recurse: the plain tensor, with the batch dim where the caller had it, as torch.func's
    assert type(full) is torch.Tensor and full.shape == ref_full.shape
    torch.testing.assert_close(full, ref_full)
    torch.testing.assert_close(full, x)
    # one level: the vmap's BatchedTensor (unwrapping the grad wrapper only)
    assert type(one) is torch.Tensor and one.shape == (3,)
    assert ft.debug_unwrap(one).shape == (3, 3)


# ---- replace_all_batch_norm_modules_


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)
    )


def _bn_state(model):
    return [
        (m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def test_replace_all_batch_norm_modules_matches_torch_func():
    ours, ref = _bn_model(), _bn_model()
    assert ft.replace_all_batch_norm_modules_(ours) is ours
    assert torch.func.replace_all_batch_norm_modules_(ref) is ref
    assert _bn_state(ours) == _bn_state(ref) == [(False, None, None, None)] * 2
    # a bare batch norm module (the root itself)
    bn, bn_ref = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    ft.replace_all_batch_norm_modules_(bn)
    torch.func.replace_all_batch_norm_modules_(bn_ref)
    assert _bn_state(bn) == _bn_state(bn_ref)


def test_vmap_over_a_replaced_model_in_training_mode():
    ours, ref = _bn_model(), _bn_model()
    ft.replace_all_batch_norm_modules_(ours)
    torch.func.replace_all_batch_norm_modules_(ref)
    x = torch.randn(5, 4, 2, 4, 4)  # 5 groups of 4 examples: batch norm statistics per group
    got = ft.vmap(ours)(x)
    want = torch.func.vmap(ref)(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[1], ours(x[1]))


# ---- rearrange

_X = torch.randn(2, 3, 4)
_IMAGES = torch.randn(4, 6, 8, 3)
_REARRANGE = [
    (_X, "a b c -> c a b", {}),
    (_X, "... c -> c ...", {}),
    (_X, "a b c -> a (b c) 1", {}),
    (torch.randn(2, 3, 1), "a b 1 -> a b", {}),
    (_X, "a (b1 b) c -> b1 a b c", {"b1": 3}),
    (_X, "a ... -> (a ...)", {}),
    (_X, "a b c -> (a b) () c", {}),
    (_X, "... -> ...", {}),
    (_X, "a ... -> ... a", {}),
    (torch.randn(5), "a ... -> ... a", {}),
    (_IMAGES, "b h w c -> (b h) w c", {}),
    (_IMAGES, "b h w c -> h (b w) c", {}),
    (_IMAGES, "b h w c -> b (c h w)", {}),
    (_IMAGES, "b (h1 h) (w1 w) c -> (b h1 w1) h w c", {"h1": 2, "w1": 2}),
    (_IMAGES, "b (h h1) (w w1) c -> b h w (c h1 w1)", {"h1": 2, "w1": 2}),
    ([torch.ones(2), torch.zeros(2)], "n d -> d n", {}),
]


@pytest.mark.parametrize("tensor, pattern, lengths", _REARRANGE)
def test_rearrange_matches_torch_func(tensor, pattern, lengths):
    got = ft.rearrange(tensor, pattern, **lengths)
    want = torch.func.rearrange(tensor, pattern, **lengths)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "pattern, lengths, error",
    [
        ("a b c -> a b c d", {}, ValueError),
        ("a b -> a b", {}, ValueError),
        ("a a c -> a c", {}, ValueError),
        ("a b c -> a b c", {"z": 2}, ValueError),
        ("a b c", {}, ValueError),
        ("a b c -> a b (c", {}, ValueError),
        ("a b c -> a 2 b c", {}, ValueError),
        ("a (b c) d -> a b c d", {}, "DimensionBindError"),
        ("a (b c) d -> a b c d", {"b": 2}, "DimensionBindError"),
        ("(a b) c d -> a b c d", {"a": 3}, "DimensionBindError"),
    ],
)
def test_rearrange_errors_match_torch_func(pattern, lengths, error):
    with pytest.raises(Exception) as ref:
        torch.func.rearrange(_X, pattern, **lengths)
    with pytest.raises(Exception) as got:
        ft.rearrange(_X, pattern, **lengths)
    if error == "DimensionBindError":  # torch's class is functorch.dim's; ours is also a ValueError
        assert type(got.value).__name__ == type(ref.value).__name__ == error
    else:
        assert type(got.value) is type(ref.value) is error


def test_rearrange_under_transforms():
    x = torch.randn(5, 2, 6)
    got = ft.vmap(lambda a: ft.rearrange(a, "c (h w) -> h (w c)", h=2))(x)
    want = torch.func.vmap(lambda a: torch.func.rearrange(a, "c (h w) -> h (w c)", h=2))(x)
    assert torch.equal(got, want)
    g = ft.grad(lambda a: (ft.rearrange(a, "c (h w) -> w h c", h=3) * torch.arange(12.0).view(2, 3, 2)).sum())
    ref = torch.func.grad(
        lambda a: (torch.func.rearrange(a, "c (h w) -> w h c", h=3) * torch.arange(12.0).view(2, 3, 2)).sum()
    )
    torch.testing.assert_close(g(x[0]), ref(x[0]))
