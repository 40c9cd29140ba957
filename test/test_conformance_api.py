"""Conformance of the public API's errors with torch.func (issue 12, items 9, 11 and 13).

Item 9, the misuse catalogue: every case runs with torch.func and with functorch_lite, and our
exception must be of torch.func's type (or a subclass), so code that catches torch.func's errors
catches ours. Where the first sentence of our message carries torch.func's key phrase, the
catalogue says which, and checks it in both messages. Deliberate differences (torch.func raises
an incidental error of its internals, or accepts what we refuse, or refuses what we accept) are
listed in DELIBERATE with the reason, and docs/index.md lists them.

Items 11 and 13: what torch.func refuses inside its transforms and we accepted silently (`.data`
assignment, old-style autograd.Function, complex jacobians, saved-tensor hooks that leak our
wrappers), and nested tensors under vmap (mapped over their components).
"""

import warnings

import pytest
import torch
import torch.func as tf
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

import functorch_lite as ft

x = torch.randn(3)
X = torch.randn(2, 3)
C3 = torch.randn(3, dtype=torch.cfloat)
captured = torch.zeros(3)


def sq(t):
    return (t**2).sum()


def _setitem_captured(t):
    captured[0] = t[0]
    return t.sum()


# name -> (call(lib), key phrase of torch.func's message that ours carries too, or None)
CASES = {
    # vmap: in_dims
    "vmap_in_dims_str": (lambda L: L.vmap(torch.sin, in_dims="a")(X), "in_dims"),
    "vmap_in_dims_float": (lambda L: L.vmap(torch.sin, in_dims=0.5)(X), "in_dims"),
    "vmap_in_dims_list": (lambda L: L.vmap(torch.sin, in_dims=[0])(X), "in_dims"),
    "vmap_in_dims_none": (lambda L: L.vmap(torch.sin, in_dims=None)(X), "in_dims"),
    "vmap_in_dims_structure": (
        lambda L: L.vmap(torch.add, in_dims=(0, 0, 0))(X, X),
        "in_dims is not compatible with the structure of",
    ),
    "vmap_in_dims_dict_keys": (
        lambda L: L.vmap(lambda d: d["a"], in_dims=({"b": 0},))({"a": X}),
        "in_dims is not compatible with the structure of",
    ),
    "vmap_in_dim_leaf_str": (lambda L: L.vmap(torch.add, in_dims=(0, "a"))(X, X), None),
    "vmap_in_dim_out_of_range": (lambda L: L.vmap(torch.sin, in_dims=2)(X), None),
    "vmap_in_dim_out_of_range_neg": (lambda L: L.vmap(torch.sin, in_dims=-3)(X), None),
    "vmap_in_dim_of_scalar": (lambda L: L.vmap(torch.sin)(torch.tensor(1.0)), None),
    "vmap_in_dim_for_non_tensor": (lambda L: L.vmap(lambda a, b: a * b, in_dims=(0, 0))(X, 2.0), None),
    "vmap_nothing_to_map": (lambda L: L.vmap(torch.sin, in_dims=(None,))(X), None),
    "vmap_mismatched_batch_sizes": (
        lambda L: L.vmap(torch.add)(X, torch.randn(3, 3)),
        "same size in the mapped dim",
    ),
    "vmap_no_inputs": (lambda L: L.vmap(lambda: torch.ones(3))(), "got no inputs"),
    # vmap: out_dims and outputs
    "vmap_out_dims_str": (lambda L: L.vmap(torch.sin, out_dims="a")(X), "out_dims"),
    "vmap_out_dims_float": (lambda L: L.vmap(torch.sin, out_dims=0.5)(X), "out_dims"),
    "vmap_out_dims_structure": (
        lambda L: L.vmap(lambda t: (t, t), out_dims=(0, 0, 0))(X),
        "out_dims is not compatible with the structure of",
    ),
    "vmap_out_dim_leaf_str": (lambda L: L.vmap(lambda t: (t, t), out_dims=(0, "a"))(X), None),
    "vmap_out_dim_out_of_range": (lambda L: L.vmap(torch.sin, out_dims=3)(X), "Dimension out of range"),
    "vmap_out_dims_none_for_batched": (lambda L: L.vmap(torch.sin, out_dims=None)(X), None),
    "vmap_returns_float": (lambda L: L.vmap(lambda t: 1.0)(X), "must only return Tensors"),
    "vmap_returns_none": (lambda L: L.vmap(lambda t: None)(X), "must only return Tensors"),
    "vmap_returns_none_leaf": (lambda L: L.vmap(lambda t: (t, None))(X), "must only return Tensors"),
    "vmap_returns_str": (lambda L: L.vmap(lambda t: "s")(X), "must only return Tensors"),
    # vmap: randomness and chunk_size
    "vmap_randomness_bad": (
        lambda L: L.vmap(torch.sin, randomness="foo")(X),
        "Only allowed values for randomness are 'error', 'different', or 'same'",
    ),
    "vmap_randomness_none": (
        lambda L: L.vmap(torch.sin, randomness=None)(X),
        "Only allowed values for randomness",
    ),
    "vmap_chunk_size_0": (
        lambda L: L.vmap(torch.sin, chunk_size=0)(X),
        "chunk_size should be None or greater than 0",
    ),
    "vmap_chunk_size_negative": (
        lambda L: L.vmap(torch.sin, chunk_size=-1)(X),
        "chunk_size should be None or greater than 0",
    ),
    "vmap_chunk_size_float": (lambda L: L.vmap(torch.sin, chunk_size=1.5)(X), None),
    "vmap_chunk_size_str": (lambda L: L.vmap(torch.sin, chunk_size="a")(X), None),
    "vmap_chunk_size_bool": (lambda L: L.vmap(torch.sin, chunk_size=True)(X), None),
    "vmap_rand_in_error_mode": (lambda L: L.vmap(lambda t: t + torch.rand(3))(X), "randomness error mode"),
    "vmap_dropout_in_error_mode": (lambda L: L.vmap(lambda t: F.dropout(t, 0.5))(X), "randomness error mode"),
    "vmap_rand_like_in_error_mode": (lambda L: L.vmap(torch.rand_like)(X), "randomness error mode"),
    "vmap_bernoulli_in_error_mode": (
        lambda L: L.vmap(lambda t: torch.bernoulli(t.sigmoid()))(X),
        "randomness error mode",
    ),
    "vmap_normal__in_error_mode": (
        lambda L: L.vmap(lambda t: t.clone().normal_())(X),
        "randomness error mode",
    ),
    "jacfwd_rand_in_error_mode": (
        lambda L: L.jacfwd(lambda t: t * torch.rand(3))(x),
        "randomness error mode",
    ),
    "hessian_rand_in_error_mode": (
        lambda L: L.hessian(lambda t: (t * torch.rand(3)).sum())(x),
        "randomness error mode",
    ),
    # vmap: data-dependent Python values and control flow, in-place writes
    "vmap_item": (lambda L: L.vmap(lambda t: t.sum().item())(X), ".item()"),
    "vmap_int": (lambda L: L.vmap(lambda t: int(t.sum()))(X), ".item()"),
    "vmap_if_tensor": (
        lambda L: L.vmap(lambda t: t if t.sum() > 0 else -t)(X),
        "data-dependent control flow",
    ),
    "vmap_tolist": (lambda L: L.vmap(lambda t: torch.tensor(t.tolist()))(X), None),
    "vmap_nonzero": (lambda L: L.vmap(lambda t: t.nonzero())(X), None),
    "vmap_inplace_batched_into_unbatched": (lambda L: L.vmap(lambda t: torch.zeros(3).add_(t))(X), None),
    "vmap_inplace_into_captured": (lambda L: L.vmap(lambda t: captured.add_(t))(X), None),
    "vmap_copy_into_unbatched": (lambda L: L.vmap(lambda t: captured.clone().copy_(t))(X), None),
    # grad / grad_and_value: argnums
    "grad_argnums_out_of_range": (lambda L: L.grad(sq, argnums=1)(x), "but only 1 positional inputs"),
    "grad_argnums_negative_out_of_range": (
        lambda L: L.grad(sq, argnums=-2)(x),
        "but only 1 positional inputs",
    ),
    "grad_argnums_duplicate": (
        lambda L: L.grad(lambda a, b: (a * b).sum(), argnums=(0, 0))(x, x),
        "argnums elements must be unique",
    ),
    "grad_argnums_str": (lambda L: L.grad(sq, argnums="0")(x), "argnums must be int or Tuple"),
    "grad_argnums_float": (lambda L: L.grad(sq, argnums=0.0)(x), "argnums must be int or Tuple"),
    "grad_argnums_list": (lambda L: L.grad(sq, argnums=[0])(x), "argnums must be int or Tuple"),
    "grad_argnums_empty": (lambda L: L.grad(sq, argnums=())(x), "argnums must be non-empty"),
    "grad_argnums_tuple_with_str": (lambda L: L.grad(sq, argnums=(0, "a"))(x), None),
    "grad_no_arguments": (lambda L: L.grad(lambda: torch.ones(()))(), None),
    "grad_and_value_argnums_out_of_range": (lambda L: L.grad_and_value(sq, argnums=3)(x), None),
    # grad: inputs and outputs
    "grad_integer_input": (lambda L: L.grad(lambda t: t.sum().float())(torch.arange(3)), None),
    "grad_float_input": (lambda L: L.grad(lambda t: t * 2)(2.0), None),
    "grad_non_scalar_output": (lambda L: L.grad(torch.sin)(x), "to return a scalar Tensor"),
    "grad_and_value_non_scalar_output": (
        lambda L: L.grad_and_value(torch.sin)(x),
        "to return a scalar Tensor",
    ),
    "grad_float_output": (lambda L: L.grad(lambda t: 1.0)(x), "to return a Tensor"),
    "grad_none_output": (lambda L: L.grad(lambda t: None)(x), "to return a Tensor"),
    "grad_tuple_output": (lambda L: L.grad(lambda t: (t.sum(), t.sum()))(x), "to return a Tensor"),
    # has_aux
    "grad_aux_not_a_tuple": (
        lambda L: L.grad(sq, has_aux=True)(x),
        "should be a tuple: (output, aux) if has_aux is True",
    ),
    "grad_aux_3_tuple": (
        lambda L: L.grad(lambda t: (sq(t), t, t), has_aux=True)(x),
        "should be a tuple: (output, aux) if has_aux is True",
    ),
    "grad_aux_list": (
        lambda L: L.grad(lambda t: [sq(t), t], has_aux=True)(x),
        "should be a tuple: (output, aux) if has_aux is True",
    ),
    "grad_aux_non_scalar_output": (
        lambda L: L.grad(lambda t: (t, t), has_aux=True)(x),
        "to return a scalar Tensor",
    ),
    "grad_and_value_aux_not_a_tuple": (
        lambda L: L.grad_and_value(sq, has_aux=True)(x),
        "should be a tuple: (output, aux) if has_aux is True",
    ),
    "vjp_aux_not_a_tuple": (
        lambda L: L.vjp(torch.sin, x, has_aux=True),
        "should be a tuple: (output, aux) if has_aux is True",
    ),
    "jvp_aux_not_a_tuple": (
        lambda L: L.jvp(torch.sin, (x,), (x,), has_aux=True),
        "should be a tuple: (output, aux) if has_aux is True",
    ),
    "jacrev_aux_not_a_tuple": (lambda L: L.jacrev(torch.sin, has_aux=True)(x), None),
    # non-tensor aux: refused as torch.func refuses it (posteriors turns that error into its own)
    "grad_aux_none": (lambda L: L.grad(lambda t: (sq(t), None), has_aux=True)(x), None),
    "grad_aux_float": (lambda L: L.grad(lambda t: (sq(t), 1.0), has_aux=True)(x), None),
    "grad_and_value_aux_str": (
        lambda L: L.grad_and_value(lambda t: (sq(t), {"a": "s"}), has_aux=True)(x),
        None,
    ),
    "vjp_aux_non_tensor": (lambda L: L.vjp(lambda t: (t, 1.0), x, has_aux=True), None),
    "jvp_aux_none": (lambda L: L.jvp(lambda t: (t, None), (x,), (x,), has_aux=True), None),
    # f returning no output at all
    "jacrev_empty_output": (lambda L: L.jacrev(lambda t: ())(x), None),
    "jacfwd_empty_output": (lambda L: L.jacfwd(lambda t: ())(x), None),
    "jvp_empty_output": (lambda L: L.jvp(lambda t: (), (x,), (x,)), None),
    "vjp_empty_output": (lambda L: L.vjp(lambda t: (), x), None),
    # .data of a batched tensor inside vmap
    "vmap_data_read": (lambda L: L.vmap(lambda t: t.data * 2)(X), None),
    "jacfwd_aux_not_a_tuple": (lambda L: L.jacfwd(torch.sin, has_aux=True)(x), None),
    "jacrev_aux_non_tensor": (lambda L: L.jacrev(lambda t: (t, 1.0), has_aux=True)(x), None),
    "jacfwd_aux_non_tensor": (lambda L: L.jacfwd(lambda t: (t, 1.0), has_aux=True)(x), None),
    # mutation of captured tensors
    "grad_add__captured": (lambda L: L.grad(lambda t: captured.add_(t).sum())(x), "mutate a captured Tensor"),
    "grad_copy__captured": (
        lambda L: L.grad(lambda t: captured.copy_(t).sum())(x),
        "mutate a captured Tensor",
    ),
    "grad_setitem_captured": (lambda L: L.grad(_setitem_captured)(x), "mutate a captured Tensor"),
    "vjp_add__captured": (lambda L: L.vjp(lambda t: captured.add_(t), x), "mutate a captured Tensor"),
    "jvp_add__captured": (
        lambda L: L.jvp(lambda t: captured.add_(t), (x,), (x,)),
        "mutate a captured Tensor",
    ),
    "jacrev_add__captured": (lambda L: L.jacrev(lambda t: captured.add_(t))(x), "mutate a captured Tensor"),
    "jacfwd_add__captured": (lambda L: L.jacfwd(lambda t: captured.add_(t))(x), "mutate a captured Tensor"),
    # vjp and vjp_fn
    "vjp_integer_primal": (lambda L: L.vjp(lambda t: t * 2, torch.arange(3)), None),
    "vjp_float_primal": (lambda L: L.vjp(lambda t: t * 2, 2.0), None),
    "vjp_float_output": (lambda L: L.vjp(lambda t: 1.0, x), "expected f(*primals) to return only tensors"),
    "vjp_none_output": (lambda L: L.vjp(lambda t: None, x), None),
    "vjp_none_leaf_in_output": (
        lambda L: L.vjp(lambda t: (t, None), x),
        "expected f(*primals) to return only tensors",
    ),
    "vjp_fn_structure": (
        lambda L: L.vjp(torch.sin, x)[1]((x, x)),
        "Expected pytree structure of cotangents to be the same as pytree structure of outputs",
    ),
    "vjp_fn_list_for_tuple": (
        lambda L: L.vjp(lambda t: (t, t), x)[1]([x, x]),
        "Expected pytree structure of cotangents",
    ),
    "vjp_fn_shape": (lambda L: L.vjp(torch.sin, x)[1](torch.ones(4)), "Mismatch in shape"),
    "vjp_fn_non_tensor": (lambda L: L.vjp(torch.sin, x)[1](1.0), None),
    "vjp_fn_none_for_non_scalar": (
        lambda L: L.vjp(torch.sin, x)[1](None),
        "grad can be implicitly created only for scalar outputs",
    ),
    "vjp_fn_complex_for_real": (
        lambda L: L.vjp(torch.sin, x)[1](torch.ones(3, dtype=torch.complex64)),
        "both grad_output and output are required to have the same dtype",
    ),
    # jvp
    "jvp_primals_list": (lambda L: L.jvp(torch.sin, [x], [x]), "Expected primals to be a tuple"),
    "jvp_primals_tensor": (lambda L: L.jvp(torch.sin, x, x), "Expected primals to be a tuple"),
    "jvp_tangents_list": (lambda L: L.jvp(torch.sin, (x,), [x]), None),
    "jvp_lengths_differ": (
        lambda L: L.jvp(torch.add, (x, x), (x,)),
        "Expected primals and tangents to have the same python structure",
    ),
    "jvp_structures_differ": (
        lambda L: L.jvp(lambda d: d["a"], ({"a": x},), ({"b": x},)),
        "Expected primals and tangents to have the same python structure",
    ),
    "jvp_shapes_differ": (lambda L: L.jvp(torch.sin, (x,), (torch.ones(4),)), None),
    "jvp_integer_primal": (lambda L: L.jvp(lambda t: t * 2, (torch.arange(3),), (torch.arange(3),)), None),
    "jvp_float_primal": (lambda L: L.jvp(lambda t: t * 2, (2.0,), (1.0,)), None),
    "jvp_float_output": (
        lambda L: L.jvp(lambda t: 1.0, (x,), (x,)),
        "expected f(*primals) to return only tensors",
    ),
    "jvp_none_output": (lambda L: L.jvp(lambda t: None, (x,), (x,)), None),
    "jvp_none_leaf_in_output": (
        lambda L: L.jvp(lambda t: (t, None), (x,), (x,)),
        "expected f(*primals) to return only tensors",
    ),
    "jvp_no_primals": (
        lambda L: L.jvp(lambda: torch.ones(3), (), ()),
        "Expected primals to contain at least one Tensor",
    ),
    "jvp_strict_independent_output": (
        lambda L: L.jvp(lambda t: torch.ones(3), (x,), (x,), strict=True),
        "independent of the inputs",
    ),
    # jacrev / jacfwd / hessian
    "jacrev_argnums_out_of_range": (
        lambda L: L.jacrev(torch.sin, argnums=1)(x),
        "but only 1 positional inputs",
    ),
    "jacrev_argnums_duplicate": (
        lambda L: L.jacrev(torch.add, argnums=(0, 0))(x, x),
        "argnums elements must be unique",
    ),
    "jacrev_argnums_str": (lambda L: L.jacrev(torch.sin, argnums="0")(x), "argnums must be int or Tuple"),
    "jacrev_argnums_empty": (lambda L: L.jacrev(torch.sin, argnums=())(x), "argnums must be non-empty"),
    "jacrev_no_arguments": (lambda L: L.jacrev(lambda: torch.ones(3))(), None),
    "jacrev_integer_input": (lambda L: L.jacrev(lambda t: t.float())(torch.arange(3)), None),
    "jacrev_float_input": (lambda L: L.jacrev(lambda t: t * 2)(2.0), None),
    "jacrev_float_output": (lambda L: L.jacrev(lambda t: 1.0)(x), "to return only tensors"),
    "jacrev_none_output": (lambda L: L.jacrev(lambda t: None)(x), None),
    "jacrev_none_leaf_in_output": (lambda L: L.jacrev(lambda t: (t, None))(x), "to return only tensors"),
    "jacrev_chunk_size_0": (lambda L: L.jacrev(torch.sin, chunk_size=0)(x), None),
    "jacrev_chunk_size_float": (lambda L: L.jacrev(torch.sin, chunk_size=1.5)(x), None),
    "jacrev_chunk_size_str": (lambda L: L.jacrev(torch.sin, chunk_size="a")(x), None),
    "jacrev_complex_input": (
        lambda L: L.jacrev(torch.abs)(C3),
        "Expected all inputs to be real but received complex tensor",
    ),
    "jacrev_complex_output": (
        lambda L: L.jacrev(lambda t: t * 1j)(x),
        "Expected all outputs to be real but received complex tensor",
    ),
    "jacrev_complex_input_with_aux": (
        lambda L: L.jacrev(lambda t: (t.abs(), t), has_aux=True)(C3),
        "Expected all inputs to be real",
    ),
    "jacfwd_argnums_out_of_range": (
        lambda L: L.jacfwd(torch.sin, argnums=1)(x),
        "but only 1 positional inputs",
    ),
    "jacfwd_argnums_duplicate": (
        lambda L: L.jacfwd(torch.add, argnums=(0, 0))(x, x),
        "argnums elements must be unique",
    ),
    "jacfwd_argnums_str": (lambda L: L.jacfwd(torch.sin, argnums="0")(x), "argnums must be int or Tuple"),
    "jacfwd_no_arguments": (lambda L: L.jacfwd(lambda: torch.ones(3))(), None),
    "jacfwd_integer_input": (lambda L: L.jacfwd(lambda t: t.float())(torch.arange(3)), None),
    "jacfwd_float_output": (lambda L: L.jacfwd(lambda t: 1.0)(x), "to return only tensors"),
    "jacfwd_none_output": (lambda L: L.jacfwd(lambda t: None)(x), None),
    "jacfwd_none_leaf_in_output": (lambda L: L.jacfwd(lambda t: (t, None))(x), "to return only tensors"),
    "jacfwd_randomness_bad": (
        lambda L: L.jacfwd(torch.sin, randomness="x")(x),
        "Only allowed values for randomness",
    ),
    "jacfwd_complex_input": (
        lambda L: L.jacfwd(torch.abs)(C3),
        "Expected all inputs to be real but received complex tensor",
    ),
    "jacfwd_complex_output": (
        lambda L: L.jacfwd(lambda t: t * 1j)(x),
        "Expected all outputs to be real but received complex tensor",
    ),
    "hessian_argnums_out_of_range": (lambda L: L.hessian(sq, argnums=1)(x), "but only 1 positional inputs"),
    "hessian_integer_input": (lambda L: L.hessian(lambda t: t.float().sum())(torch.arange(3)), None),
    "hessian_float_output": (lambda L: L.hessian(lambda t: 1.0)(x), "to return only tensors"),
    "hessian_none_output": (lambda L: L.hessian(lambda t: None)(x), None),
    "hessian_complex_input": (
        lambda L: L.hessian(lambda t: t.abs().sum())(C3),
        "Expected all inputs to be real",
    ),
    # functional_call / stack_module_state
    "functional_call_dicts_int": (
        lambda L: L.functional_call(nn.Linear(3, 3), 3, (x,)),
        "Expected parameter_and_buffer_dicts to be a dict",
    ),
    "functional_call_dicts_list_of_int": (
        lambda L: L.functional_call(nn.Linear(3, 3), [1, 2], (x,)),
        "Expected all elements of parameter_and_buffer_dicts to be dictionaries",
    ),
    "functional_call_unknown_submodule": (
        lambda L: L.functional_call(nn.Linear(3, 3), {"foo.bar": x}, (x,)),
        None,
    ),
    "functional_call_key_names_submodule": (
        lambda L: L.functional_call(nn.Sequential(nn.Linear(3, 3)), {"0": x}, (x,)),
        None,
    ),
    "functional_call_value_not_tensor": (
        lambda L: L.functional_call(nn.Linear(3, 3), {"weight": 3}, (x,)),
        "is not an instance of torch.Tensor",
    ),
    "functional_call_strict_missing": (
        lambda L: L.functional_call(nn.Linear(3, 3), {"weight": torch.eye(3)}, (x,), strict=True),
        None,
    ),
    "functional_call_strict_unexpected": (
        lambda L: L.functional_call(
            nn.Linear(3, 3), {"weight": torch.eye(3), "bias": x, "zz": x}, (x,), strict=True
        ),
        None,
    ),
    "functional_call_key_in_two_dicts": (
        lambda L: L.functional_call(
            nn.Linear(3, 3), ({"weight": torch.eye(3)}, {"weight": torch.eye(3)}), (x,)
        ),
        None,
    ),
    "stack_module_state_empty": (lambda L: L.stack_module_state([]), "Expected at least one model"),
    "stack_module_state_not_a_list": (lambda L: L.stack_module_state(nn.Linear(3, 3)), None),
    "stack_module_state_shapes_differ": (
        lambda L: L.stack_module_state([nn.Linear(3, 3), nn.Linear(3, 4)]),
        None,
    ),
    "stack_module_state_train_and_eval": (
        lambda L: L.stack_module_state([nn.Linear(3, 3), nn.Linear(3, 3).eval()]),
        "Expected all models to have the same training/eval mode",
    ),
    "stack_module_state_classes_differ": (
        lambda L: L.stack_module_state([nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3))]),
        "Expected all models to be of the same class",
    ),
    "stack_module_state_requires_grad_differs": (
        lambda L: L.stack_module_state([nn.Linear(3, 3), nn.Linear(3, 3).requires_grad_(False)]),
        ".requires_grad",
    ),
}


def _frozen_bias():
    m = nn.Linear(3, 3)
    m.bias.requires_grad_(False)
    return m


# name -> (call(lib), what we do: an exception type or "accepts", why we differ from torch.func)
DELIBERATE = {
    "vmap_in_dims_bool": (
        lambda L: L.vmap(torch.sin, in_dims=True)(X),
        ValueError,
        "torch.func takes True for the int 1 and fails inside Tensor.size() (TypeError); a bool "
        "is not a dim, so it is refused with the other wrong in_dims types",
    ),
    "jacfwd_float_input": (
        lambda L: L.jacfwd(lambda t: t * 2)(2.0),
        ValueError,
        "torch.func fails on float.numel (AttributeError); ValueError as for jacrev/grad",
    ),
    "hessian_float_input": (
        lambda L: L.hessian(lambda t: (t * 2).sum())(2.0),
        ValueError,
        "as jacfwd_float_input",
    ),
    "functional_call_not_a_module": (
        lambda L: L.functional_call(lambda a: a, {}, (x,)),
        TypeError,
        "torch.func fails on function.named_parameters (AttributeError)",
    ),
    "functional_call_non_str_key": (
        lambda L: L.functional_call(nn.Linear(3, 3), {1: x}, (x,)),
        TypeError,
        "torch.func fails on int.rpartition (AttributeError)",
    ),
    "stack_module_state_not_modules": (
        lambda L: L.stack_module_state([1, 2]),
        TypeError,
        "torch.func fails on int.training (AttributeError)",
    ),
    "stack_module_state_parameters_differ": (
        lambda L: L.stack_module_state([nn.Linear(3, 3), nn.Linear(3, 3, bias=False)]),
        RuntimeError,
        "torch.func raises a bare KeyError('bias'); ours names the models and keys",
    ),
    "stack_module_state_dtypes_differ": (
        lambda L: L.stack_module_state([nn.Linear(3, 3), nn.Linear(3, 3).double()]),
        RuntimeError,
        "torch.func's torch.stack silently promotes model 0's parameters to float64",
    ),
    "checkpoint_under_grad": (
        lambda L: L.grad(lambda t: cp.checkpoint(torch.sin, t, use_reentrant=False).sum())(x),
        "accepts",
        "torch.func refuses all saved-tensor hooks; ours run them (tests below check the "
        "gradients against torch.autograd)",
    ),
}


def _run(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except Exception as e:  # noqa: BLE001 - the exception is what is compared
            return e
    return None


@pytest.mark.parametrize("name", sorted(CASES))
def test_misuse_raises_torch_funcs_exception_type(name):
    call, phrase = CASES[name]
    theirs = _run(lambda: call(tf))
    ours = _run(lambda: call(ft))
    assert theirs is not None, f"torch.func accepts {name}: move it to DELIBERATE or drop it"
    assert ours is not None, f"functorch_lite accepts {name}; torch.func raises {theirs!r}"
    assert isinstance(ours, type(theirs)), (
        f"{name}: ours is {type(ours).__name__} ({ours}), torch.func's {type(theirs).__name__} ({theirs})"
    )
    if phrase is not None:
        assert phrase.lower() in str(theirs).lower(), f"torch.func's message changed: {theirs}"
        first_sentence = str(ours).split(". ")[0]
        assert phrase.lower() in first_sentence.lower(), (
            f"{name}: {phrase!r} not in the first sentence of our message: {ours}"
        )
    assert ft._C._stack_depth() == 0


@pytest.mark.parametrize("name", sorted(DELIBERATE))
def test_deliberate_difference(name):
    call, ours_expected, reason = DELIBERATE[name]
    theirs = _run(lambda: call(tf))
    ours = _run(lambda: call(ft))
    if ours_expected == "accepts":
        assert ours is None, f"{name}: {ours!r}"
        assert theirs is not None, f"torch.func now accepts {name} too: move it to CASES"
    else:
        assert type(ours) is ours_expected, f"{name}: {ours!r}"
        assert not isinstance(ours, type(theirs) if theirs is not None else ()), (
            f"torch.func now raises {type(theirs).__name__} for {name}: move it to CASES"
        )


def test_catalogue_covers_every_public_function():
    names = " ".join(list(CASES) + list(DELIBERATE))
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
        "stack_module_state",
    ):
        assert api + "_" in names, api


# ------------------------------------------------------------------------------------------------
# Accepted as torch.func accepts them (found while building the catalogue)


def test_jvp_tangent_of_another_dtype_is_accepted():
    for t in (x.double(), x.half(), x.to(torch.complex64)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complex -> real cast warns, in both
            got, want = ft.jvp(torch.sin, (x,), (t,)), tf.jvp(torch.sin, (x,), (t,))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w)


def test_vjp_fn_none_cotangent_for_scalar_output():
    got = ft.vjp(lambda t: t.sin().sum(), x)[1](None)
    want = tf.vjp(lambda t: t.sin().sum(), x)[1](None)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[0], x.cos())


def test_jvp_strict_true_with_dependent_output():
    torch.testing.assert_close(
        ft.jvp(torch.sin, (x,), (x,), strict=True), tf.jvp(torch.sin, (x,), (x,), strict=True)
    )


# ------------------------------------------------------------------------------------------------
# Item 11: `.data` assignment on (or with) a tensor of a transform is refused.


def _assign_data(t, v):
    t.data = v
    return t


DATA_CASES = {
    "vmap_input": lambda L: L.vmap(lambda t: _assign_data(t, torch.zeros(3)) * 2)(X),
    "grad_input": lambda L: L.grad(lambda t: _assign_data(t, torch.zeros(3)).sum())(x),
    "grad_fresh": lambda L: L.grad(lambda t: _assign_data(t * 2, torch.zeros(3)).sum())(x),
    "grad_captured_gets_wrapper": lambda L: L.grad(lambda t: _assign_data(torch.ones(3), t).sum() + t.sum())(
        x
    ),
    "jvp_input": lambda L: L.jvp(lambda t: _assign_data(t, torch.zeros(3)), (x,), (x,)),
    "vjp_input": lambda L: L.vjp(lambda t: _assign_data(t, torch.zeros(3)), x),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_assignment_inside_transform_is_refused(case):
    for lib in (tf, ft):
        with pytest.raises(RuntimeError, match="mutating directly with `.data`"):
            DATA_CASES[case](lib)
    assert ft._C._stack_depth() == 0


def test_data_outside_transforms_and_reading_inside_still_work():
    p = torch.zeros(3)
    p.data = torch.ones(3)
    torch.testing.assert_close(p, torch.ones(3))
    w = nn.Parameter(torch.zeros(2))
    w.data = torch.ones(2)
    assert isinstance(w, nn.Parameter) and w.requires_grad
    torch.testing.assert_close(w.data, torch.ones(2))
    # reading .data inside grad: a detached alias, as in torch.func
    f = lambda t: (t.data * t).sum()  # noqa: E731
    torch.testing.assert_close(ft.grad(f)(x), tf.grad(f)(x))
    # plain tensors under vmap (neither is a tensor of the transform): allowed, as in torch.func
    q = torch.ones(3)
    ft.vmap(lambda t: _assign_data(q, torch.zeros(3)) * t)(X)
    torch.testing.assert_close(q, torch.zeros(3))


# ------------------------------------------------------------------------------------------------
# Item 11: torch.autograd.functional inside a transform (it marks inputs with requires_grad_).


def _af(fn):
    import torch.autograd.functional as AF

    def scalar(u):
        return u.sin().sum()

    def g(t):
        if fn == "vjp":
            return AF.vjp(torch.sin, t, torch.ones(3))[1]
        if fn == "jvp":
            return AF.jvp(torch.sin, t, torch.ones(3))[1]
        if fn in ("hvp", "vhp"):
            return getattr(AF, fn)(scalar, t, torch.ones(3))[1]
        if fn == "hessian":
            return AF.hessian(scalar, t)
        return AF.jacobian(torch.sin, t)

    return g


@pytest.mark.parametrize("fn", ["vjp", "jvp", "hvp", "vhp", "hessian", "jacobian"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_autograd_functional_inside_transform_is_refused(fn, transform):
    g = _af(fn)
    for lib in (tf, ft):
        with pytest.raises(
            RuntimeError,
            match=r"requires_grad_\(\) \(or perhaps using "
            r"torch.autograd.functional",
        ):
            if transform == "vmap":
                lib.vmap(g)(X)
            else:
                lib.grad(lambda t: g(t).sum())(x)


# ------------------------------------------------------------------------------------------------
# Item 11: old-style autograd.Function (forward(ctx, ...), no setup_context).


class _OldSin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t.sin()

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * t.cos()


class _NewSin(torch.autograd.Function):
    @staticmethod
    def forward(t):
        return t.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * t.cos()


OLD_FN_CASES = {
    "grad": lambda L: L.grad(lambda t: _OldSin.apply(t).sum())(x),
    "vjp": lambda L: L.vjp(_OldSin.apply, x),
    "jvp": lambda L: L.jvp(_OldSin.apply, (x,), (x,)),
    "jacrev": lambda L: L.jacrev(_OldSin.apply)(x),
    "jacfwd": lambda L: L.jacfwd(_OldSin.apply)(x),
    "hessian": lambda L: L.hessian(lambda t: _OldSin.apply(t).sum())(x),
    "vmap": lambda L: L.vmap(_OldSin.apply)(X),
    "vmap_grad": lambda L: L.vmap(L.grad(lambda t: _OldSin.apply(t).sum()))(X),
    "reentrant_checkpoint": lambda L: L.grad(lambda t: cp.checkpoint(torch.sin, t, use_reentrant=True).sum())(
        x
    ),
}


@pytest.mark.parametrize("case", sorted(OLD_FN_CASES))
def test_old_style_autograd_function_is_refused(case):
    for lib in (tf, ft):
        with pytest.raises(RuntimeError, match="it must override the setup_context staticmethod"):
            OLD_FN_CASES[case](lib)
    assert ft._C._stack_depth() == 0


def test_autograd_functions_outside_transforms_and_new_style_inside():
    t = x.clone().requires_grad_()
    _OldSin.apply(t).sum().backward()
    torch.testing.assert_close(t.grad, x.cos())
    f = lambda u: _NewSin.apply(u).sum()  # noqa: E731
    torch.testing.assert_close(ft.grad(f)(x), tf.grad(f)(x))
    torch.testing.assert_close(ft.grad(f)(x), x.cos())


# ------------------------------------------------------------------------------------------------
# Item 11: activation checkpointing and saved-tensor hooks. torch.func refuses every saved-tensor
# hook; ours run them, so checkpointing works under grad and vmap(grad). A hook that stores the
# tensor it packs would leak our wrapper out of the transform: refused.


def _block(u):
    return (u.sin() * u).exp().tanh()


def _ckpt_loss(t):
    return cp.checkpoint(_block, t, use_reentrant=False).sum()


def _loop_grads(loss, xs):
    out = []
    for r in xs:
        r = r.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(r), r)
        out.append(g)
    return torch.stack(out)


def test_checkpoint_inside_vmap_grad_gives_per_sample_gradients():
    xs = torch.randn(4, 5, dtype=torch.float64)
    got = ft.vmap(ft.grad(_ckpt_loss))(xs)
    torch.testing.assert_close(got, _loop_grads(_ckpt_loss, xs))
    torch.testing.assert_close(got, _loop_grads(lambda r: _block(r).sum(), xs))
    with pytest.raises(RuntimeError, match="saved tensor hooks"):
        tf.vmap(tf.grad(_ckpt_loss))(xs)


def test_checkpoint_inside_grad():
    xs = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(ft.grad(_ckpt_loss)(xs), _loop_grads(_ckpt_loss, xs[None])[0])


@pytest.mark.parametrize("nesting", ["grad_grad", "jvp_grad", "grad_vmap_grad"])
def test_checkpoint_under_nested_differentiation_is_refused(nesting):
    # It gave zeros for grad(grad(checkpointed f)) (torch.autograd gives the right values).
    xs = torch.randn(2, 5, dtype=torch.float64)
    runs = {
        "grad_grad": lambda: ft.grad(lambda t: ft.grad(_ckpt_loss)(t).sum())(xs[0]),
        "jvp_grad": lambda: ft.jvp(ft.grad(_ckpt_loss), (xs[0],), (xs[1],)),
        "grad_vmap_grad": lambda: ft.grad(lambda t: ft.vmap(ft.grad(_ckpt_loss))(t).sum())(xs),
    }
    with pytest.raises(RuntimeError, match="checkpoint inside two or more nested grad/jvp"):
        runs[nesting]()
    assert ft._C._stack_depth() == 0


@pytest.mark.parametrize("api", ["vjp", "jacrev", "hessian"])
def test_checkpoint_inside_vjp_and_jacrev_is_a_clear_error(api):
    # vjp_fn runs the backward after vjp's level has returned; checkpoint's recomputation then
    # records nothing (torch's CheckpointError "A different number of tensors was saved"): a
    # known limitation, said in our terms with torch's error as the cause.
    xs = torch.randn(5, dtype=torch.float64)
    f = lambda t: cp.checkpoint(_block, t, use_reentrant=False)  # noqa: E731
    runs = {
        "vjp": lambda: ft.vjp(f, xs)[1](torch.ones(5, dtype=torch.float64)),
        "jacrev": lambda: ft.jacrev(f)(xs),
        "hessian": lambda: ft.hessian(lambda t: f(t).sum())(xs),
    }
    with pytest.raises(RuntimeError, match="checkpoint inside (vjp|two or more nested)") as info:
        runs[api]()
    if api != "hessian":
        assert isinstance(info.value.__cause__, cp.CheckpointError)
    assert ft._C._stack_depth() == 0


def test_save_on_cpu_and_non_storing_hooks_work():
    xs = torch.randn(3, 4, dtype=torch.float64)

    def with_hooks(t):
        with torch.autograd.graph.saved_tensors_hooks(lambda u: u * 1, lambda u: u):
            return _block(t).sum()

    def on_cpu(t):
        with torch.autograd.graph.save_on_cpu():
            return _block(t).sum()

    for loss in (with_hooks, on_cpu):
        torch.testing.assert_close(ft.vmap(ft.grad(loss))(xs), _loop_grads(loss, xs))


def test_pack_hook_that_stores_the_tensor_is_refused():
    leaked = []

    def store(u):
        leaked.append(u)
        return u

    def loss(t):
        with torch.autograd.graph.saved_tensors_hooks(store, lambda u: u):
            return _block(t).sum()

    for run in (lambda: ft.grad(loss)(x), lambda: ft.vmap(ft.grad(loss))(X), lambda: ft.vjp(loss, x)):
        with pytest.raises(RuntimeError, match="saved-tensor pack hook kept a reference"):
            run()
        assert ft._C._stack_depth() == 0
    # outside transforms the same hook is torch's business
    leaked.clear()
    t = x.clone().requires_grad_()
    loss(t).backward()
    assert leaked


# ------------------------------------------------------------------------------------------------
# Item 13: nested tensors under vmap: mapped over the components with in_dim 0, as torch.func
# (test/test_vmap_nested.py has the rest); another in_dim is a RuntimeError in both.


def _nested(layout):
    return torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=layout)


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
@pytest.mark.parametrize("in_dims", [0, 1, (0, None)])
def test_nested_tensor_under_vmap(layout, in_dims):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nt = _nested(layout)
    args = (nt, torch.ones(3)) if isinstance(in_dims, tuple) else (nt,)
    f = (lambda a, b: a * b) if isinstance(in_dims, tuple) else torch.sin
    if in_dims == 1:
        with pytest.raises(RuntimeError, match="in_dim 0 only"):
            ft.vmap(f, in_dims=in_dims)(*args)
        if layout == torch.jagged:
            with pytest.raises(RuntimeError):
                tf.vmap(f, in_dims=in_dims)(*args)
    else:
        ours = ft.vmap(f, in_dims=in_dims)(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = tf.vmap(f, in_dims=in_dims)(*args)
        for a, b in zip(ours.unbind(), theirs.unbind(), strict=True):
            torch.testing.assert_close(a, b)
    assert ft._C._stack_depth() == 0


def test_missing_rule_with_fallback_disabled(fallback_mode):
    # torch.func's switch is torch._C._functorch._set_vmap_fallback_enabled; both raise
    # RuntimeError, and ours says "Batching rule not implemented" as torch.func does for ops that
    # its fallback cannot run.
    f = lambda t: torch.histc(t, bins=4)  # noqa: E731
    with fallback_mode("error"):
        with pytest.raises(
            RuntimeError, match="^functorch_lite.vmap: Batching rule not implemented for aten::histc"
        ):
            ft.vmap(f)(X)
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        with pytest.raises(RuntimeError, match="vmap fallback which is currently disabled"):
            tf.vmap(f)(X)
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


NESTED_TRANSFORMS = {
    "grad": lambda L, nt: L.grad(lambda t: t.sin().sum())(nt),
    "vjp": lambda L, nt: L.vjp(torch.sin, nt),
    "jvp": lambda L, nt: L.jvp(torch.sin, (nt,), (nt,)),
    "jacrev": lambda L, nt: L.jacrev(torch.sin)(nt),
    "jacfwd": lambda L, nt: L.jacfwd(torch.sin)(nt),
}


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
@pytest.mark.parametrize("api", sorted(NESTED_TRANSFORMS))
def test_nested_tensor_under_differentiation_is_a_clear_error(layout, api):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nt = _nested(layout)
        # torch.func refuses these too, with RuntimeErrors of its internals
        theirs = _run(lambda: NESTED_TRANSFORMS[api](tf, nt))
    with pytest.raises(
        RuntimeError,
        match=r"nested tensor \(torch.nested, layout=.*do not "
        r"support",
    ):
        NESTED_TRANSFORMS[api](ft, nt)
    if (api, layout) == ("vjp", torch.jagged):
        # torch.func's vjp supports jagged nested tensors; ours does not (docs/index.md)
        assert theirs is None
    else:
        assert isinstance(theirs, RuntimeError)
    assert ft._C._stack_depth() == 0


# ------------------------------------------------------------------------------------------------
# make_functional(_with_buffers): torch.func has no such function; functorch (deprecated) does.
# Where functorch raises the same type we do; elsewhere its errors are incidental ones from inside
# its implementation (a meta-device RuntimeError, AttributeError, a shape error of the model), and
# ours name the misuse instead.


def _fmodel(L, with_buffers=False):
    m = nn.Linear(3, 3)
    return (L.make_functional_with_buffers if with_buffers else L.make_functional)(m)


# name -> (call(lib), our type, functorch's type, or None where its error is incidental)
MAKE_FUNCTIONAL_CASES = {
    "model_with_buffers": (lambda L: L.make_functional(nn.BatchNorm1d(3)), RuntimeError, RuntimeError),
    "param_not_a_tensor": (lambda L: _fmodel(L)[0]((1.0, _fmodel(L)[1][1]), x), TypeError, TypeError),
    "not_a_module": (lambda L: L.make_functional(lambda a: a), TypeError, None),
    "wrong_number_of_params": (lambda L: _fmodel(L)[0](_fmodel(L)[1][:1], x), ValueError, None),
    "params_not_a_sequence": (lambda L: _fmodel(L)[0](_fmodel(L)[1][0], x), TypeError, None),
    "wrong_number_of_buffers": (
        lambda L: L.make_functional_with_buffers(nn.BatchNorm1d(3))[0](
            tuple(nn.BatchNorm1d(3).parameters()), (), torch.randn(2, 3)
        ),
        ValueError,
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(MAKE_FUNCTIONAL_CASES))
def test_make_functional_misuse(name):
    functorch = pytest.importorskip("functorch")
    call, ours_type, theirs_type = MAKE_FUNCTIONAL_CASES[name]
    ours, theirs = _run(lambda: call(ft)), _run(lambda: call(functorch))
    assert type(ours) is ours_type, repr(ours)
    assert theirs is not None
    if theirs_type is not None:
        assert isinstance(ours, type(theirs)), (ours, theirs)
    else:
        # incidental: functorch's text does not name the misuse
        assert "make_functional" not in str(theirs)
