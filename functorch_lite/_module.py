"""Module utilities: functional_call, stack_module_state, make_functional(_with_buffers).

They run an nn.Module with tensors of the caller's choosing in place of its parameters and
buffers. The tensors are swapped into the module's `_parameters` / `_buffers` entries (or set as
plain attributes) for the duration of one call and the original entries are put back afterwards,
also when the call raises. No parametrization is involved, so the substituted tensors may be any
tensors, including functorch_lite's batched and grad wrappers: that is how these utilities
compose with vmap, grad, jvp and the functions built on them.

Batch norm under vmap: in training mode with running statistics, batch norm updates
running_mean / running_var in place. When its input is batched and those buffers are not, the
update would mix every batch element's statistics into one buffer (and the for-loop fallback
would apply it once per element), so the module calls made here refuse that case with an error
that lists the ways out (see _RunningStatsCheck).
"""

import contextlib
import copy

import torch
from torch import nn
from torch.compiler import is_compiling as _is_compiling
from torch.nn.modules.batchnorm import _NormBase

from ._compile import eager
from ._levels import _vmap_levels
from ._load import _C

__all__ = ["functional_call", "stack_module_state", "make_functional", "make_functional_with_buffers"]

_MISSING = object()


def _a(noun):
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _quote_list(names):
    return ", ".join(repr(n) for n in names)


# ------------------------------------------------------------------------------------------------
# Swapping tensors into a module


def _resolve(module, name, api):
    """Returns (submodule, attribute) for a dotted name such as 'layers.0.weight'."""
    *path, attr = name.split(".")
    sub = module
    for i, part in enumerate(path):
        child = sub._modules.get(part, _MISSING) if isinstance(sub, nn.Module) else _MISSING
        if child is _MISSING or child is None:
            where = ".".join(path[:i]) or "the module"
            raise AttributeError(
                f"{api}: the key {name!r} names a submodule {'.'.join(path[: i + 1])!r}, but "
                f"{where} ({type(sub).__name__}) has no submodule called {part!r}."
            )
        sub = child
    if attr in sub._modules:
        # TypeError, as torch.func ("... is not an instance of torch.Tensor").
        raise TypeError(
            f"{api}: the key {name!r} names a submodule ({type(sub._modules[attr]).__name__}), "
            f"not a parameter or buffer; give one value per tensor (e.g. {name + '.weight'!r})."
        )
    return sub, attr


class _Swapper:
    """Puts tensors in place of named parameters/buffers and puts the originals back."""

    def __init__(self, module, api):
        self.module = module
        self.api = api
        self.undo = []  # (submodule, attr, where, old), in the order of the swaps

    def swap(self, name, value):
        sub, attr = _resolve(self.module, name, self.api)
        if attr in sub._parameters:
            self.undo.append((sub, attr, "_parameters", sub._parameters[attr]))
            sub._parameters[attr] = value
        elif attr in sub._buffers:
            self.undo.append((sub, attr, "_buffers", sub._buffers[attr]))
            sub._buffers[attr] = value
        else:
            # Not a parameter or buffer of the module: a plain attribute for the duration of the
            # call (torch.func's non-strict behaviour), removed or restored afterwards.
            self.undo.append((sub, attr, "attr", sub.__dict__.get(attr, _MISSING)))
            setattr(sub, attr, value)

    def restore(self):
        touched = {}
        while self.undo:
            sub, attr, where, old = self.undo.pop()
            touched[id(sub)] = sub
            if where == "attr":
                if old is _MISSING:
                    delattr(sub, attr)
                else:
                    setattr(sub, attr, old)
            else:
                getattr(sub, where)[attr] = old
        for sub in touched.values():
            # RNNs keep a list of their weights (_flat_weights), refreshed at the start of each
            # forward; refresh it now so that it does not keep the substituted tensors alive.
            init = getattr(sub, "_init_flat_weights", None)
            if isinstance(sub, nn.RNNBase) and callable(init):
                init()


# ------------------------------------------------------------------------------------------------
# Batch norm in training mode under vmap


def _updates_running_stats(m):
    return (
        isinstance(m, _NormBase)
        and m.training
        and m.track_running_stats
        and (m.running_mean is not None or m.running_var is not None)
    )


class _RunningStatsCheck:
    """Forward pre-hooks on the norm modules that would update running statistics: they raise
    when the module's input (or weight/bias) is batched by a vmap level at which running_mean /
    running_var are not."""

    def __init__(self, module, api):
        self.api = api
        self.handles = []
        # no transform is live: nothing can be batched. Dynamo traces this only at the top level
        # of a compiled function (transforms run their function eagerly or in a recorded call).
        if _is_compiling() or _C._stack_depth() == 0:
            return
        for qualname, m in module.named_modules(remove_duplicate=False):
            if isinstance(m, _NormBase):
                self.handles.append(m.register_forward_pre_hook(self._hook_for(qualname)))

    def _hook_for(self, qualname):
        def hook(m, args):
            if not _updates_running_stats(m):
                return
            from_input = _vmap_levels(args[0]) if args else set()
            batched = set(from_input)
            for t in (m.weight, m.bias):
                batched |= _vmap_levels(t)
            if not batched:
                return
            for stat in ("running_mean", "running_var"):
                t = getattr(m, stat)
                if t is not None and not batched <= _vmap_levels(t):
                    what = "input" if from_input - _vmap_levels(t) else "weight/bias"
                    self._raise(m, qualname, stat, what)

        return hook

    def _raise(self, m, qualname, stat, what):
        name = f"the submodule {qualname!r} ({type(m).__name__})" if qualname else (f"the {type(m).__name__}")
        raise RuntimeError(
            f"{self.api}: {name} is in training mode with track_running_stats=True under vmap, "
            f"and its {what} is batched but its {stat} buffer is not. Batch norm in training "
            f"mode updates running_mean/running_var in place, so the statistics of every batch "
            f"element would go into one buffer. Options:\n"
            f"  - call model.eval() to use the running statistics without updating them;\n"
            f"  - build the norm layers with track_running_stats=False (batch statistics only), "
            f"or set track_running_stats=False and running_mean = running_var = None on each of "
            f"them (what torch.func.replace_all_batch_norm_modules_ does);\n"
            f"  - use a norm that keeps no running statistics (GroupNorm, LayerNorm);\n"
            f"  - pass the buffers batched like the input (e.g. one copy per model from "
            f"stack_module_state, mapped with in_dims=0)."
        )

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


@contextlib.contextmanager
def _substituted(module, named_tensors, api):
    """Runs the block with the tensors named_tensors (name -> tensor) in the module."""
    swapper = _Swapper(module, api)
    check = _RunningStatsCheck(module, api)
    try:
        for name, value in named_tensors.items():
            swapper.swap(name, value)
        yield
    finally:
        check.remove()
        swapper.restore()


# ------------------------------------------------------------------------------------------------
# functional_call


def _merge_dicts(parameter_and_buffer_dicts, api):
    if isinstance(parameter_and_buffer_dicts, dict):
        dicts = (parameter_and_buffer_dicts,)
    elif isinstance(parameter_and_buffer_dicts, (tuple, list)):
        dicts = tuple(parameter_and_buffer_dicts)
    else:
        raise ValueError(
            f"{api}: Expected parameter_and_buffer_dicts to be a dict (name -> Tensor), or a "
            f"list/tuple of dicts, but got {type(parameter_and_buffer_dicts).__name__}."
        )
    merged, seen_in = {}, {}
    for i, d in enumerate(dicts):
        if not isinstance(d, dict):
            raise ValueError(
                f"{api}: Expected all elements of parameter_and_buffer_dicts to be dictionaries "
                f"(name -> Tensor), but element {i} is {_a(type(d).__name__)}."
            )
        for k, v in d.items():
            if not isinstance(k, str):
                raise TypeError(f"{api}: keys must be str (dotted names), got {k!r}.")
            seen_in.setdefault(k, []).append(i)
            merged[k] = v
    dup = {k: where for k, where in seen_in.items() if len(where) > 1}
    if dup:
        listed = "; ".join(f"{k!r} in dicts {', '.join(map(str, w))}" for k, w in dup.items())
        raise ValueError(
            f"{api}: a key may appear in only one of the dicts, but {len(dup)} key(s) appear in "
            f"several: {listed}."
        )
    for k, v in merged.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"{api}: the value given for {k!r} is not an instance of torch.Tensor: got "
                f"{_a(type(v).__name__)}."
            )
    return merged


def _tensor_names(module):
    """[(name, tensor)] of every parameter and buffer, tied ones under each of their names."""
    return list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )


def _tied_groups(named):
    """Lists of names that share one tensor (only groups of two names or more)."""
    by_id = {}
    for name, t in named:
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def functional_call(
    module, parameter_and_buffer_dicts, args=None, kwargs=None, *, tie_weights=True, strict=False
):
    """Calls ``module(*args, **kwargs)`` with the given tensors in place of its parameters/buffers.

    Args:
        module: the ``nn.Module`` to call.
        parameter_and_buffer_dicts: a dict name -> Tensor, or a tuple/list of such dicts (e.g.
            ``(params, buffers)``); names are those of ``module.named_parameters()`` /
            ``named_buffers()``, such as ``'layers.0.weight'``. Keys must not repeat across the
            dicts. Parameters and buffers without a key keep their own values.
        args: a tuple of positional arguments, or a single argument.
        kwargs: a dict of keyword arguments.
        tie_weights: parameters/buffers that the module shares under several names take the
            value given for any one of them (giving different values for tied names is an
            error); with False each name is replaced independently.
        strict: raise unless the keys are exactly the module's parameter and buffer names.

    Returns:
        What ``module`` returns.

    The module's own tensors are put back afterwards, also when the call raises. Composes with
    vmap/grad/jvp: the given tensors may be batched or differentiated.

    Example:
        >>> import torch, functorch_lite as ft
        >>> model = torch.nn.Linear(2, 1)
        >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> ft.functional_call(model, params, (torch.tensor([[1.0, 2.0]]),))
        tensor([[3.]])
        >>> def loss(params, x):  # per-example gradients of a module's parameters
        ...     return ft.functional_call(model, params, (x,)).sum()
        >>> grads = ft.vmap(ft.grad(loss), in_dims=(None, 0))(params, torch.randn(5, 2))
        >>> grads["weight"].shape, grads["bias"].shape
        (torch.Size([5, 1, 2]), torch.Size([5, 1]))
    """
    api = "functional_call"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{api}: module must be a torch.nn.Module, got {type(module).__name__}.")
    tensors = _merge_dicts(parameter_and_buffer_dicts, api)
    if args is None:
        args = ()
    elif not isinstance(args, tuple):
        args = (args,)
    if kwargs is None:
        kwargs = {}
    named = _tensor_names(module) if (tie_weights or strict) else None
    if tie_weights:
        for group in _tied_groups(named):
            given = [n for n in group if n in tensors]
            if not given:
                continue
            if len({id(tensors[n]) for n in given}) > 1:
                raise ValueError(
                    f"{api}: the keys {_quote_list(given)} name one tensor that the module "
                    f"shares (tied weights: {_quote_list(group)}), but were given different "
                    f"values. Give one value (or the same tensor for each), or pass "
                    f"tie_weights=False to replace each name independently."
                )
            for n in group:
                tensors.setdefault(n, tensors[given[0]])
    if strict:
        expected = {n for n, _ in named}
        missing = [n for n, _ in named if n not in tensors]
        missing = list(dict.fromkeys(missing))
        unexpected = [n for n in tensors if n not in expected]
        if missing or unexpected:
            lines = [
                f"{api}(strict=True): the keys must be exactly the parameter and buffer "
                f"names of the {type(module).__name__}."
            ]
            if missing:
                lines.append(f"  missing key(s): {_quote_list(missing)}")
            if unexpected:
                lines.append(f"  unexpected key(s): {_quote_list(unexpected)}")
            raise RuntimeError("\n".join(lines))
    with _substituted(module, tensors, api):
        return module(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# stack_module_state


def _describe_keys(kind, i, extra, lacking):
    parts = []
    if extra:
        parts.append(f"has {kind}(s) {_quote_list(extra)} that model 0 does not have")
    if lacking:
        parts.append(f"lacks {kind}(s) {_quote_list(lacking)} that model 0 has")
    return f"model {i} " + " and ".join(parts)


def _stack_leaves(kind, name, tensors):
    first = tensors[0]
    for i, t in enumerate(tensors[1:], 1):
        for what, a, b in (
            ("shape", tuple(first.shape), tuple(t.shape)),
            ("dtype", first.dtype, t.dtype),
            ("device", first.device, t.device),
        ):
            if a != b:
                raise RuntimeError(
                    f"stack_module_state: {kind} {name!r} has {what} {a} in model 0 but {b} in "
                    f"model {i}; all models must have the same structure, dtypes and devices."
                )
    rg = {t.requires_grad for t in tensors}
    if len(rg) > 1:
        flags = ", ".join(f"model {i}: {t.requires_grad}" for i, t in enumerate(tensors))
        raise RuntimeError(
            f"stack_module_state: Expected {kind} {name!r} from each model to have the same "
            f".requires_grad, got {flags}."
        )
    with torch.no_grad():
        stacked = torch.stack([t.detach() for t in tensors])
    # A fresh leaf: gradients flow to the stacked tensor, not to the models' own parameters.
    return stacked.requires_grad_(first.requires_grad)


@eager
def stack_module_state(models):
    """Stacks the parameters and buffers of models of one structure along a new dim 0.

    Args:
        models: a list of ``nn.Module`` of the same structure (parameter names, shapes, dtypes).

    Returns:
        ``(params, buffers)``: dicts name -> stacked tensor, names as in ``named_parameters()`` /
        ``named_buffers()`` of the models (tied tensors once). Stacked parameters are new leaves
        that require grad when the models' parameters do; they do not share memory with the
        models. Use them with :func:`vmap` over :func:`functional_call` (an ensemble).

    Example:
        >>> import copy, torch, functorch_lite as ft
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> params, buffers = ft.stack_module_state(models)
        >>> params["weight"].shape
        torch.Size([4, 2, 3])
        >>> base = copy.deepcopy(models[0]).to("meta")  # the structure only, no weights
        >>> def run(params, buffers, x):
        ...     return ft.functional_call(base, (params, buffers), (x,))
        >>> x = torch.randn(5, 3)
        >>> out = ft.vmap(run, in_dims=(0, 0, None))(params, buffers, x)  # 4 models, one call
        >>> out.shape, torch.allclose(out[1], models[1](x))
        (torch.Size([4, 5, 2]), True)
    """
    api = "stack_module_state"
    if isinstance(models, nn.Module) or not hasattr(models, "__iter__"):
        raise TypeError(f"{api}: expected a list or tuple of nn.Modules, got {type(models).__name__}.")
    models = list(models)
    if not models:
        raise RuntimeError(f"{api}: Expected at least one model, got 0 (an empty sequence).")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{api}: models[{i}] is a {type(m).__name__}, not an nn.Module.")
    cls = type(models[0])
    for i, m in enumerate(models[1:], 1):
        if type(m) is not cls:
            raise RuntimeError(
                f"{api}: Expected all models to be of the same class, but model 0 is a "
                f"{cls.__name__} and model {i} is a {type(m).__name__}."
            )
        if m.training != models[0].training:
            modes = ["training" if x.training else "eval" for x in (models[0], m)]
            raise RuntimeError(
                f"{api}: Expected all models to have the same training/eval mode, but model 0 "
                f"is in {modes[0]} mode and model {i} in {modes[1]} mode."
            )
    out = []
    for kind, getter in (
        ("parameter", lambda m: dict(m.named_parameters())),
        ("buffer", lambda m: dict(m.named_buffers())),
    ):
        all_named = [getter(m) for m in models]
        keys = list(all_named[0])
        for i, named in enumerate(all_named[1:], 1):
            if list(named) != keys:
                extra = [k for k in named if k not in all_named[0]]
                lacking = [k for k in keys if k not in named]
                if not extra and not lacking:
                    raise RuntimeError(
                        f"{api}: model {i} registers its {kind}s in another order than model 0 "
                        f"({_quote_list(named)} vs {_quote_list(keys)})."
                    )
                raise RuntimeError(
                    f"{api}: all models must have the same {kind}s, but "
                    f"{_describe_keys(kind, i, extra, lacking)}."
                )
        out.append({k: _stack_leaves(kind, k, [named[k] for named in all_named]) for k in keys})
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# make_functional / make_functional_with_buffers (the functorch API)


def _unique_groups(named):
    """[(names sharing one tensor, tensor)], in order of first appearance."""
    groups = {}
    for name, t in named:
        if id(t) in groups:
            groups[id(t)][0].append(name)
        else:
            groups[id(t)] = ([name], t)
    return [(tuple(names), t) for names, t in groups.values()]


def _meta_copy(model, tensors):
    """A deep copy of model in which the given tensors are replaced by meta tensors (so the copy
    owns no parameter or buffer data and refers to none of the model's tensors)."""
    memo = {}
    for t in tensors:
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(model, memo)


class FunctionalModule(nn.Module):
    """fmodel(params, *args, **kwargs): the model's forward with the given parameters.

    params: a sequence with one tensor per entry of the params returned by make_functional (the
    model's named_parameters() order; tied parameters once). The module holds a copy of the
    model's structure on the meta device (`stateless_model`), so its train()/eval() mode starts as
    the model's and is changed with fmodel.train()/fmodel.eval().
    """

    _api = "make_functional"
    _with_buffers = False

    def __init__(self, stateless_model, param_names, buffer_names=()):
        super().__init__()
        self.stateless_model = stateless_model
        self.param_names = tuple(param_names)  # one tuple of (tied) names per tensor
        self.buffer_names = tuple(buffer_names)
        self.training = stateless_model.training

    def _named(self, what, names, values):
        if isinstance(values, torch.Tensor) or not isinstance(values, (tuple, list)):
            raise TypeError(
                f"{self._api}: fmodel expects its {what} as a tuple or list of Tensors (as "
                f"returned by {self._api}), got {type(values).__name__}."
            )
        if len(values) != len(names):
            raise ValueError(
                f"{self._api}: fmodel expects {len(names)} {what} (one per tensor of the model, "
                f"as returned by {self._api}), got {len(values)}."
            )
        out = {}
        for group, v in zip(names, values):
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"{self._api}: the {what} given for {group[0]!r} must be a Tensor, got "
                    f"{type(v).__name__}."
                )
            for n in group:
                out[n] = v
        return out

    def _run(self, named, args, kwargs):
        with _substituted(self.stateless_model, named, self._api):
            return self.stateless_model(*args, **kwargs)

    def forward(self, params, *args, **kwargs):
        return self._run(self._named("params", self.param_names, params), args, kwargs)


class FunctionalModuleWithBuffers(FunctionalModule):
    """fmodel(params, buffers, *args, **kwargs): the model's forward with the given parameters
    and buffers (in the orders returned by make_functional_with_buffers)."""

    _api = "make_functional_with_buffers"

    def forward(self, params, buffers, *args, **kwargs):
        named = self._named("params", self.param_names, params)
        named.update(self._named("buffers", self.buffer_names, buffers))
        return self._run(named, args, kwargs)


def _copy_tensor(t, disable_autograd_tracking, param):
    c = t.detach().clone()
    if param:
        return nn.Parameter(c, requires_grad=t.requires_grad and not disable_autograd_tracking)
    return c


def _make(model, disable_autograd_tracking, with_buffers, api):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: model must be a torch.nn.Module, got {type(model).__name__}.")
    params = _unique_groups(model.named_parameters(remove_duplicate=False))
    buffers = _unique_groups(model.named_buffers(remove_duplicate=False))
    if buffers and not with_buffers:
        names = [g[0] for g, _ in buffers]
        shown = _quote_list(names[:4]) + (", ..." if len(names) > 4 else "")
        raise RuntimeError(
            f"{api}: the model has buffers ({shown}); use make_functional_with_buffers(model), "
            f"which returns (fmodel, params, buffers), or functional_call."
        )
    stateless = _meta_copy(model, [t for _, t in params + buffers])
    p = tuple(_copy_tensor(t, disable_autograd_tracking, True) for _, t in params)
    if not with_buffers:
        return FunctionalModule(stateless, [g for g, _ in params]), p
    b = tuple(_copy_tensor(t, disable_autograd_tracking, False) for _, t in buffers)
    fmodel = FunctionalModuleWithBuffers(stateless, [g for g, _ in params], [g for g, _ in buffers])
    return fmodel, p, b


@eager
def make_functional(model, disable_autograd_tracking=False):
    """functorch's ``make_functional``: returns ``(fmodel, params)``.

    Args:
        model: an ``nn.Module`` without buffers (use :func:`make_functional_with_buffers`).
        disable_autograd_tracking: return params that do not require grad.

    Returns:
        ``fmodel``: ``fmodel(params, *args, **kwargs)`` runs the model's forward with exactly those
        tensors (any tensors of the same shapes: batched, differentiated, ...); ``params``: a
        tuple with a copy of each of the model's parameters, in ``named_parameters()`` order
        (tied parameters once).

    Example:
        >>> import torch, functorch_lite as ft
        >>> model = torch.nn.Linear(3, 2)
        >>> fmodel, params = ft.make_functional(model)
        >>> [tuple(p.shape) for p in params]
        [(2, 3), (2,)]
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(fmodel(params, x), model(x))
        True
        >>> grads = ft.grad(lambda params, x: fmodel(params, x).sum())(params, x)
        >>> [tuple(g.shape) for g in grads]
        [(2, 3), (2,)]
    """
    return _make(model, disable_autograd_tracking, False, "make_functional")


@eager
def make_functional_with_buffers(model, disable_autograd_tracking=False):
    """functorch's ``make_functional_with_buffers``: returns ``(fmodel, params, buffers)``.

    Like :func:`make_functional`, plus a tuple with a copy of each buffer in ``named_buffers()``
    order; ``fmodel(params, buffers, *args, **kwargs)`` runs the model with exactly those tensors.

    Args:
        model: an ``nn.Module``.
        disable_autograd_tracking: return params that do not require grad.

    Example:
        >>> import torch, functorch_lite as ft
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).eval()
        >>> fmodel, params, buffers = ft.make_functional_with_buffers(model)
        >>> len(params), len(buffers)  # running mean, running var, batch count
        (4, 3)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(fmodel(params, buffers, x), model(x))
        True
    """
    return _make(model, disable_autograd_tracking, True, "make_functional_with_buffers")
