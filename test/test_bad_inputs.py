"""The bad-input catalogue (issue 13): misuse of every public function. Each case

- raises a Python exception whose message names the problem (a phrase checked in ours),
- of torch.func's type (or a subclass) where torch.func raises too,
- never a C++ internal-assert text, never a crash of the interpreter,
- and leaves the level stack empty, after which the transforms still work.

test/test_conformance_api.py holds the first part of the catalogue (wrong in_dims/out_dims/
argnums/has_aux/chunk_size/randomness, wrong output types, captured-tensor mutation, vjp_fn
cotangents, jvp structures, functional_call/stack_module_state/make_functional); this file adds
the cases it does not have: non-callables, dtypes of tangents and outputs, pytree leaves, shapes
and dims inside the function, data-dependent ops and control flow under vmap, batched values
written into unbatched tensors, escaped wrappers used later, vjp_fn after its level is gone, a
function that raises, KeyboardInterrupt, and ft.dp's entry points.
"""

import warnings

import pytest
import torch
import torch.func as tf
import torch.nn as nn

import functorch_lite as ft

x = torch.tensor([0.3, -1.2, 2.0])
X = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]])
idx = torch.tensor([7])
captured = torch.zeros(3)


def sq(t):
    return (t**2).sum()


def boom(*args):
    raise ValueError("boom from the user's function")


def interrupt(*args):
    raise KeyboardInterrupt


def _setitem(z, i, v):
    z[i] = v
    return z


def _while_batched(t):
    while t.sum() > 0:
        t = t - 1
    return t


_escaped = {}


def _escape(L, key):
    """A function that stores a tensor of the transform in a global (the user error)."""

    def f(t):
        _escaped[(L.__name__, key)] = t * 2
        return t.sin()

    return f


def _escaped_later(L, key):
    return _escaped[(L.__name__, key)]


def _vjp_fn_escaping_vmap(L):
    def f(t):
        _escaped[(L.__name__, "vjp_fn")] = L.vjp(torch.sin, t)[1]
        return t

    L.vmap(f)(X)
    return _escaped[(L.__name__, "vjp_fn")](torch.ones(3))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


# name -> (call(lib), phrase our message carries). torch.func must raise too; ours must be of its
# exception type (or a subclass).
CASES = {
    # not a function
    "vmap_func_not_callable": (lambda L: L.vmap(3)(X), "not callable"),
    "grad_func_not_callable": (lambda L: L.grad(3)(x), "not callable"),
    "grad_and_value_func_not_callable": (lambda L: L.grad_and_value("f")(x), "not callable"),
    "vjp_func_not_callable": (lambda L: L.vjp(3, x), "not callable"),
    "jvp_func_not_callable": (lambda L: L.jvp(3, (x,), (x,)), "not callable"),
    "jacrev_func_none": (lambda L: L.jacrev(None)(x), "not callable"),
    "jacfwd_func_not_callable": (lambda L: L.jacfwd(3)(x), "not callable"),
    "hessian_func_not_callable": (lambda L: L.hessian(3)(x), "not callable"),
    # wrong dtypes and types of tangents and outputs
    "jvp_tangent_int": (
        lambda L: L.jvp(torch.sin, (x,), (torch.ones(3, dtype=torch.long),)),
        "Expected tangent to be floating point or complex",
    ),
    "jvp_tangent_bool": (
        lambda L: L.jvp(torch.sin, (x,), (torch.ones(3, dtype=torch.bool),)),
        "Expected tangent to be floating point or complex",
    ),
    "jvp_tangent_float": (lambda L: L.jvp(torch.sin, (x,), (1.0,)), "tangents"),
    "jvp_tangent_none": (lambda L: L.jvp(torch.sin, (x,), (None,)), "tangents"),
    "jvp_tangent_on_meta": (
        lambda L: L.jvp(torch.sin, (x,), (torch.ones(3, device="meta"),)),
        "is not on the expected device",
    ),
    "vjp_integer_output": (
        lambda L: L.vjp(lambda t: (t > 0).long(), x),
        "All outputs of f must be floating-point or complex",
    ),
    "jacrev_integer_output": (
        lambda L: L.jacrev(lambda t: (t > 0).long())(x),
        "All outputs of f must be floating-point or complex",
    ),
    "grad_bool_output": (lambda L: L.grad(lambda t: True)(x), "to return a Tensor"),
    "vmap_returns_dict_with_int": (
        lambda L: L.vmap(lambda t: {"a": t, "b": 1})(X),
        "must only return Tensors",
    ),
    "vmap_returns_nested_int": (lambda L: L.vmap(lambda t: [t, [t, 3]])(X), "must only return Tensors"),
    # argnums and pytree leaves
    "grad_argnums_bool": (lambda L: L.grad(sq, argnums=True)(x), "argnum"),
    "grad_argnums_huge": (lambda L: L.grad(sq, argnums=10**20)(x), "only 1 positional inputs"),
    "grad_argnum_of_an_int": (lambda L: L.grad(lambda a, b: (a * b).sum(), argnums=1)(x, 3), "must be"),
    "grad_dict_with_int_leaf": (lambda L: L.grad(lambda d: d["a"].sum())({"a": x, "b": 1}), "must be"),
    "grad_list_with_none_leaf": (lambda L: L.grad(lambda d: d[0].sum())([x, None]), "must be"),
    "grad_has_aux_truthy_str": (lambda L: L.grad(sq, has_aux="yes")(x), "should be a tuple"),
    "jacfwd_has_aux_truthy_int": (lambda L: L.jacfwd(torch.sin, has_aux=1)(x), "should be a tuple"),
    "jacrev_chunk_size_negative": (lambda L: L.jacrev(torch.sin, chunk_size=-1)(x), "chunk_size"),
    "vjp_primals_as_keyword": (lambda L: L.vjp(torch.sin, primals=x), "primals"),
    "vjp_fn_two_cotangents": (lambda L: L.vjp(torch.sin, x)[1](torch.ones(3), torch.ones(3)), ""),
    # in_dims / out_dims structures
    "vmap_in_dims_shorter_than_args": (
        lambda L: L.vmap(torch.add, in_dims=(0,))(X, X),
        "in_dims is not compatible with the structure",
    ),
    "vmap_in_dims_list_longer": (
        lambda L: L.vmap(lambda l: l[0] + l[1], in_dims=([0, 0, 0],))([X, X]),
        "in_dims is not compatible with the structure",
    ),
    "vmap_set_input": (lambda L: L.vmap(lambda s: s)({1, 2}), "in_dim=0"),
    "vmap_dict_batch_sizes_differ": (
        lambda L: L.vmap(lambda d: d["a"] + d["b"])({"a": X, "b": torch.ones(3, 3)}),
        "same size in the mapped dim",
    ),
    "vmap_nested_batch_sizes_differ": (
        lambda L: L.vmap(L.vmap(torch.add))(torch.ones(2, 3, 4), torch.ones(2, 4, 4)),
        "same size in the mapped dim",
    ),
    "vmap_out_dim_negative_out_of_range": (
        lambda L: L.vmap(torch.sin, out_dims=-3)(X),
        "Dimension out of range",
    ),
    "vmap_out_dims_tuple_for_one_output": (
        lambda L: L.vmap(torch.sin, out_dims=(0, 0))(X),
        "out_dims is not compatible with the structure",
    ),
    # shapes and dims inside the function (per-sample shapes in the messages)
    "vmap_view_wrong_size": (lambda L: L.vmap(lambda t: t.view(6))(X), "is invalid for input of size"),
    "vmap_reshape_wrong_size": (lambda L: L.vmap(lambda t: t.reshape(4))(X), "is invalid for input of size"),
    "vmap_sum_dim_out_of_range": (lambda L: L.vmap(lambda t: t.sum(1))(X), "Dimension out of range"),
    "vmap_index_out_of_range": (lambda L: L.vmap(lambda t: t[5])(X), "out of bounds"),
    "vmap_gather_index_out_of_range": (lambda L: L.vmap(lambda t: t.gather(0, idx))(X), "out of bounds"),
    "vmap_cat_ranks_differ": (
        lambda L: L.vmap(lambda t: torch.cat([t, torch.ones(2, 2)]))(X),
        "same number of dimensions",
    ),
    "vmap_matmul_shapes": (
        lambda L: L.vmap(lambda t: t @ torch.ones(4, 2))(X),
        "cannot be multiplied",
    ),
    "grad_matmul_shapes": (
        lambda L: L.grad(lambda t: (t @ torch.ones(4)).sum())(x),
        "inconsistent tensor size",
    ),
    "functional_call_weight_shape": (
        lambda L: L.functional_call(nn.Linear(3, 3), {"weight": torch.ones(2, 2)}, (x,)),
        "cannot be multiplied",
    ),
    "functional_call_kwargs_not_a_mapping": (
        lambda L: L.functional_call(nn.Linear(3, 3), {}, (x,), 3),
        "must be a mapping",
    ),
    # data-dependent ops and control flow under vmap
    "vmap_masked_select": (lambda L: L.vmap(lambda t: t.masked_select(t > 0))(X), "masked_select"),
    "vmap_unique": (lambda L: L.vmap(torch.unique)(X), "unique"),
    "vmap_where_one_argument": (lambda L: L.vmap(lambda t: torch.where(t > 0)[0])(X), "vmap"),
    "vmap_bool_of_batched": (
        lambda L: L.vmap(lambda t: t if bool(t[0] > 0) else -t)(X),
        "data-dependent control flow",
    ),
    "vmap_while_on_batched": (lambda L: L.vmap(_while_batched)(X), "data-dependent control flow"),
    "vmap_float_of_batched": (lambda L: L.vmap(lambda t: t * float(t[0]))(X), ".item()"),
    "vmap_numpy_of_batched": (lambda L: L.vmap(lambda t: torch.from_numpy(t.numpy()))(X), ""),
    "vmap_grad_item": (lambda L: L.vmap(L.grad(lambda t: t.sum() * t.sum().item()))(X), ".item()"),
    # batched values written into unbatched tensors
    "vmap_setitem_into_fresh_unbatched": (
        lambda L: L.vmap(lambda t: _setitem(torch.zeros(3), 0, t[0]))(X),
        "vmap",
    ),
    "vmap_setitem_into_captured": (lambda L: L.vmap(lambda t: _setitem(captured, 0, t[0]))(X), "vmap"),
    "vmap_out_kwarg_unbatched": (
        lambda L: L.vmap(lambda t: torch.sin(t, out=torch.empty(3)))(X),
        "aten::sin.out",
    ),
    "vmap_set_unbatched_from_batched": (lambda L: L.vmap(lambda t: torch.zeros(3).set_(t))(X), "set_"),
    "vmap_index_put_into_unbatched": (
        lambda L: L.vmap(lambda t: torch.zeros(3).index_put_((torch.tensor([0]),), t[:1]))(X),
        "vmap",
    ),
    # other misuse inside the function
    "grad_inplace_on_differentiated_input": (
        lambda L: L.grad(lambda t: t.add_(1).sum())(x.clone()),
        "leaf Variable that requires grad",
    ),
    "grad_backward_inside": (lambda L: L.grad(lambda t: (t.sum().backward(), t.sum())[1])(x), "backward"),
    # escaped wrappers used later
    "vmap_escaped_tensor_add": (
        lambda L: (L.vmap(_escape(L, "add"))(X), _escaped_later(L, "add") + 1),
        "used after that vmap returned",
    ),
    "vmap_escaped_tensor_sum": (
        lambda L: (L.vmap(_escape(L, "sum"))(X), _escaped_later(L, "sum").sum()),
        "used after that vmap returned",
    ),
    "vjp_fn_escaped_from_vmap": (_vjp_fn_escaping_vmap, "used after that vmap returned"),
    # a function that raises: the user's exception, unchanged
    "vmap_func_raises": (lambda L: L.vmap(boom)(X), "boom from the user's function"),
    "vmap_chunked_func_raises": (lambda L: L.vmap(boom, chunk_size=1)(X), "boom from the user's function"),
    "grad_func_raises": (lambda L: L.grad(boom)(x), "boom from the user's function"),
    "grad_and_value_func_raises": (lambda L: L.grad_and_value(boom)(x), "boom from the user's function"),
    "vjp_func_raises": (lambda L: L.vjp(boom, x), "boom from the user's function"),
    "jvp_func_raises": (lambda L: L.jvp(boom, (x,), (x,)), "boom from the user's function"),
    "jacrev_func_raises": (lambda L: L.jacrev(boom)(x), "boom from the user's function"),
    "jacfwd_func_raises": (lambda L: L.jacfwd(boom)(x), "boom from the user's function"),
    "hessian_func_raises": (lambda L: L.hessian(boom)(x), "boom from the user's function"),
    "vmap_grad_func_raises": (lambda L: L.vmap(L.grad(boom))(X), "boom from the user's function"),
    "grad_of_vmap_func_raises": (
        lambda L: L.grad(lambda t: L.vmap(boom)(t[None]).sum())(x),
        "boom from the user's function",
    ),
    "vjp_fn_backward_raises": (
        lambda L: L.vjp(lambda t: _RaisingBackward.apply(t), x)[1](torch.ones(3)),
        "boom in backward",
    ),
    "functional_call_module_raises": (
        lambda L: L.functional_call(_Raising(), {}, (x,)),
        "boom from the user's function",
    ),
}


class _Raising(nn.Module):
    def forward(self, t):
        boom()


class _RaisingBackward(torch.autograd.Function):
    @staticmethod
    def forward(t):
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise ValueError("boom in backward")


# KeyboardInterrupt raised inside the function: it propagates as KeyboardInterrupt (it is not an
# Exception, so nothing of ours may catch and rewrap it) and the stack is unwound.
INTERRUPTS = {
    "vmap": lambda L: L.vmap(interrupt)(X),
    "vmap_chunked": lambda L: L.vmap(interrupt, chunk_size=1)(X),
    "grad": lambda L: L.grad(interrupt)(x),
    "grad_and_value": lambda L: L.grad_and_value(interrupt)(x),
    "vjp": lambda L: L.vjp(interrupt, x),
    "jvp": lambda L: L.jvp(interrupt, (x,), (x,)),
    "jacrev": lambda L: L.jacrev(interrupt)(x),
    "jacfwd": lambda L: L.jacfwd(interrupt)(x),
    "hessian": lambda L: L.hessian(interrupt)(x),
    "vmap_grad_vmap": lambda L: L.vmap(L.grad(lambda t: L.vmap(interrupt)(t[None]).sum()))(X),
    "functional_call": lambda L: L.functional_call(_Interrupting(), {}, (x,)),
}


class _Interrupting(nn.Module):
    def forward(self, t):
        interrupt()


# functorch_lite only (no torch.func counterpart): name -> (call, exception type, phrase)
OURS_ONLY = {
    "dp_clipped_grad_max_norm_zero": (
        lambda: ft.dp.clipped_grad(lambda w, r: (w * r).sum(), max_norm=0.0)(x, X),
        ValueError,
        "max_norm must be > 0",
    ),
    "dp_clipped_grad_max_norm_str": (
        lambda: ft.dp.clipped_grad(lambda w, r: (w * r).sum(), max_norm="1")(x, X),
        TypeError,
        "max_norm",
    ),
    "dp_clipped_grad_batch_argnums_twice": (
        lambda: ft.dp.clipped_grad(lambda w, r: (w * r).sum(), max_norm=1.0, batch_argnums=(1, 1))(x, X),
        ValueError,
        "names an argument twice",
    ),
    "dp_clipped_grad_batch_sizes_differ": (
        lambda: ft.dp.clipped_grad(lambda w, r, s: (w * r * s).sum(), max_norm=1.0, batch_argnums=(1, 2))(
            x, X, torch.ones(3, 3)
        ),
        ValueError,
        "",
    ),
    "dp_clipped_grad_func_raises": (
        lambda: ft.dp.clipped_grad(boom, max_norm=1.0)(x, X),
        ValueError,
        "boom from the user's function",
    ),
    "dp_clipped_grad_module_not_a_module": (
        lambda: ft.dp.clipped_grad_module(lambda a: a, nn.MSELoss(), X, X, max_norm=1.0),
        TypeError,
        "model must be a torch.nn.Module",
    ),
    "dp_clipped_grad_module_method": (
        lambda: ft.dp.clipped_grad_module(_mlp(), nn.MSELoss(), X, X[:, :1], max_norm=1.0, method="x"),
        ValueError,
        "method must be one of",
    ),
    "dp_poisson_sampler_rate_above_one": (
        lambda: ft.dp.PoissonSampler(10, 1.5),
        ValueError,
        "sample_rate must be in (0, 1]",
    ),
    "dp_poisson_sampler_no_examples": (lambda: ft.dp.PoissonSampler(0, 0.5), ValueError, "num_examples"),
    "dp_compute_epsilon_delta_one": (
        lambda: ft.dp.compute_epsilon(1.0, 0.01, 100, 1.0),
        ValueError,
        "delta must be in (0, 1)",
    ),
    "dp_compute_epsilon_accountant": (
        lambda: ft.dp.compute_epsilon(1.0, 0.01, 100, 1e-5, accountant="moments"),
        ValueError,
        "accountant must be",
    ),
    "dp_trainer_max_grad_norm": (
        lambda: ft.dp.PrivateTrainer(
            _mlp(),
            torch.optim.SGD(_mlp().parameters(), lr=0.1),
            nn.MSELoss(),
            max_grad_norm=-1.0,
            sample_rate=0.1,
            expected_batch_size=4,
            noise_multiplier=1.0,
        ),
        ValueError,
        "max_grad_norm must be > 0",
    ),
    "dp_trainer_noise_and_target": (
        lambda: ft.dp.PrivateTrainer(
            _mlp(),
            torch.optim.SGD(_mlp().parameters(), lr=0.1),
            nn.MSELoss(),
            max_grad_norm=1.0,
            sample_rate=0.1,
            expected_batch_size=4,
            noise_multiplier=1.0,
            target_epsilon=1.0,
        ),
        ValueError,
        "exactly one of noise_multiplier and target_epsilon",
    ),
    "make_functional_not_a_module": (lambda: ft.make_functional(lambda a: a), TypeError, ""),
    "set_vmap_fallback_bad_mode": (lambda: ft.set_vmap_fallback("sometimes"), ValueError, "sometimes"),
}

# Accepted by both libraries, with the same values: the misuse-looking cases that are legal.
ACCEPTED = {
    # vjp_fn is meant to be called after vjp returned (its level is gone), also repeatedly,
    # inside another transform, and after escaping from an inner grad.
    "vjp_fn_after_its_level": lambda L: L.vjp(torch.sin, x)[1](torch.ones(3)),
    "vjp_fn_called_twice": lambda L: (lambda fn: (fn(torch.ones(3)), fn(2 * torch.ones(3))))(
        L.vjp(torch.sin, x)[1]
    ),
    "vjp_fn_under_vmap": lambda L: L.vmap(L.vjp(torch.sin, x)[1])(torch.eye(3)),
    "vjp_fn_escaped_from_grad": lambda L: _vjp_fn_escaping_grad(L),
    # a grad-level tensor that escaped is a constant afterwards
    "grad_escaped_tensor_used_later": lambda L: (
        L.grad(lambda t: _escape(L, "grad")(t).sum())(x),
        _escaped_later(L, "grad") + 1,
    )[1],
    "jvp_escaped_tensor_used_later": lambda L: (
        L.jvp(_escape(L, "jvp"), (x,), (x,)),
        _escaped_later(L, "jvp") * 3,
    )[1],
    "repr_of_escaped_batched_tensor": lambda L: (
        (L.vmap(_escape(L, "repr"))(X), repr(_escaped_later(L, "repr")))[1] and torch.ones(1)
    ),
    "vmap_batch_of_zero": lambda L: L.vmap(torch.sin)(torch.ones(0, 3)),
    "grad_nan_input": lambda L: L.grad(lambda t: t.sqrt().sum())(torch.tensor([-1.0, 1.0])),
    "grad_output_independent_of_input": lambda L: L.grad(lambda t: torch.tensor(1.0))(x),
}


def _vjp_fn_escaping_grad(L):
    def f(t):
        _escaped[(L.__name__, "vjp_fn_grad")] = L.vjp(torch.sin, t)[1]
        return t.sum()

    L.grad(f)(x)
    return _escaped[(L.__name__, "vjp_fn_grad")](torch.ones(3))


# torch.func accepts, we refuse with a clear error: name -> (call, phrase, why)
DELIBERATE = {
    "vmap_escaped_tensor_in_a_new_vmap": (
        lambda L: (L.vmap(_escape(L, "new"))(X), L.vmap(lambda a: a + _escaped_later(L, "new"))(X))[1],
        "used after that vmap returned",
        "torch.func silently treats the dead batched tensor's physical value as a constant",
    ),
    "vmap_resize_": (
        lambda L: L.vmap(lambda t: t.clone().resize_(5))(X),
        "resize_",
        "in-place shape change of a batched tensor, refused by design (docs/design.md)",
    ),
    "grad_autograd_grad_inside": (
        lambda L: L.grad(lambda t: torch.autograd.grad(t.sum(), t)[0].sum())(x),
        "torch.autograd.grad()",
        "torch.func runs it at the grad level; we refuse it like .backward() (docs/index.md)",
    ),
}

_INTERNAL = ("INTERNAL ASSERT", "please report a bug to PyTorch", "Exception raised from")


def _run(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return None, call()
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt included, on purpose
            return e, None


def _still_works():
    assert ft._C._stack_depth() == 0, ft._C._describe_stack()
    got = ft.vmap(ft.grad(sq))(X)
    torch.testing.assert_close(got, 2 * X)


def _check_message(e, phrase, name):
    msg = str(e)
    assert not any(s in msg for s in _INTERNAL), f"{name}: internal error text: {msg}"
    assert phrase.lower() in msg.lower(), f"{name}: {phrase!r} not in our message: {msg}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name):
    call, phrase = CASES[name]
    theirs, _ = _run(lambda: call(tf))
    ours, _ = _run(lambda: call(ft))
    assert theirs is not None, f"torch.func accepts {name}"
    assert ours is not None, f"functorch_lite accepts {name}; torch.func raises {theirs!r}"
    assert isinstance(ours, Exception), repr(ours)
    assert isinstance(ours, type(theirs)), f"{name}: ours {ours!r}, torch.func's {theirs!r}"
    _check_message(ours, phrase, name)
    _still_works()


@pytest.mark.parametrize("name", sorted(INTERRUPTS))
def test_keyboard_interrupt_inside_the_function(name):
    for L in (tf, ft):
        with pytest.raises(KeyboardInterrupt):
            INTERRUPTS[name](L)
    _still_works()


@pytest.mark.parametrize("name", sorted(OURS_ONLY))
def test_bad_input_ours_only(name):
    call, exc_type, phrase = OURS_ONLY[name]
    ours, _ = _run(call)
    assert isinstance(ours, exc_type), repr(ours)
    _check_message(ours, phrase, name)
    _still_works()


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_like_torch_func(name):
    theirs_e, theirs = _run(lambda: ACCEPTED[name](tf))
    ours_e, ours = _run(lambda: ACCEPTED[name](ft))
    assert theirs_e is None and ours_e is None, (ours_e, theirs_e)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    for t in torch.utils._pytree.tree_leaves(ours):
        assert ft._C._wrapper_info(t) is None, f"{name}: a wrapper came out"
    _still_works()


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_refusal(name):
    call, phrase, _why = DELIBERATE[name]
    theirs_e, _ = _run(lambda: call(tf))
    ours, _ = _run(lambda: call(ft))
    assert theirs_e is None, f"torch.func now refuses {name} too ({theirs_e!r}): move it to CASES"
    assert isinstance(ours, RuntimeError), repr(ours)
    _check_message(ours, phrase, name)
    _still_works()


def test_catalogue_size_and_coverage():
    from test_conformance_api import CASES as API_CASES
    from test_conformance_api import DELIBERATE as API_DELIBERATE
    from test_conformance_api import MAKE_FUNCTIONAL_CASES

    ours = set(CASES) | {f"interrupt_{n}" for n in INTERRUPTS} | set(OURS_ONLY) | set(DELIBERATE)
    assert len(ours) >= 50
    assert not (set(CASES) & set(API_CASES)), "a case duplicates test_conformance_api.py"
    names = " ".join(list(CASES) + list(INTERRUPTS) + list(OURS_ONLY))
    for api in (
        "vmap",
        "grad",
        "grad_and_value",
        "vjp",
        "jvp",
        "jacrev",
        "jacfwd",
        "hessian",
        "functional_call",
    ):
        assert api + "_" in names or api in INTERRUPTS, api
    for api in ("clipped_grad", "clipped_grad_module", "poisson_sampler", "compute_epsilon", "trainer"):
        assert "dp_" + api in names, api
    total = len(ours) + len(API_CASES) + len(API_DELIBERATE) + len(MAKE_FUNCTIONAL_CASES)
    print(f"bad inputs: {len(ours)} here, {total} with test_conformance_api.py")


def test_the_whole_catalogue_in_one_process_keeps_the_interpreter_alive():
    # Every case after every other, in one fresh interpreter: no crash, no level left behind.
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    script = (
        f"import sys, warnings; sys.path.insert(0, {str(here)!r}); warnings.simplefilter('ignore')\n"
        "import torch, functorch_lite as ft, test_bad_inputs as b\n"
        "n = 0\n"
        "for name, (call, _) in sorted(b.CASES.items()):\n"
        "    e, _ = b._run(lambda: call(ft)); assert e is not None, name; n += 1\n"
        "for name, call in sorted(b.INTERRUPTS.items()):\n"
        "    e, _ = b._run(lambda: call(ft)); assert isinstance(e, KeyboardInterrupt), name; n += 1\n"
        "for name, (call, _, _) in sorted(b.OURS_ONLY.items()):\n"
        "    e, _ = b._run(call); assert e is not None, name; n += 1\n"
        "assert ft._C._stack_depth() == 0\n"
        "b._still_works()\n"
        "print('ran', n)\n"
    )
    env = dict(__import__("os").environ)
    env["PYTHONPATH"] = str(here.parent) + ":" + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("ran ")
