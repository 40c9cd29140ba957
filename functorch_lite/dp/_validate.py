"""ft.dp.validate and ft.dp.fix: what in a model would break DP-SGD, found once before training.

DP-SGD bounds each example's contribution by clipping its own gradient; that only means
something when the model's output for one example depends on that example alone. validate()
checks a small batch:

- batch norm in training mode (or without running statistics) normalises with statistics of
  the whole batch: an error, fixed by fix() (GroupNorm) or by eval mode with running statistics;
- any other op that mixes examples (x - x.mean(0), attention across the batch dim, ...): the
  per-example gradients of the model's ordinary batched forward (one torch.autograd.grad per
  example) are compared with those of the per-example path every method uses (the model run one
  example at a time, as a batch of one); where they differ, the first module whose batched
  output differs from its per-example outputs is named;
- layers without a per-layer rule (their parameters get a per-layer vmap(grad)) and structures
  that send the whole model to the vmap path: not errors, but slower steps, reported with the
  reason.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from .._vmap import vmap
from . import _ghost
from ._common import _as_tuple, _batch_size_of, check_per_example_loss, trainable_parameters

__all__ = ["validate", "fix", "ValidationReport", "Issue"]


@dataclass(frozen=True)
class Issue:
    """One finding: `module` is the qualified name in model.named_modules() ('' is the model
    itself); `kind` is "error" (breaks DP or the per-example semantics) or "slow" (works, on a
    slower path); `problem` and `fix` say what and what to do.

    Example:
        >>> from functorch_lite.dp import Issue
        >>> print(Issue("1", "error", "BatchNorm2d in training mode mixes examples.", "ft.dp.fix(model)."))
        [error] 1: BatchNorm2d in training mode mixes examples. Fix: ft.dp.fix(model).
    """

    module: str
    kind: str
    problem: str
    fix: str

    def __str__(self):
        where = self.module or "<model>"
        return f"[{self.kind}] {where}: {self.problem} Fix: {self.fix}"


class ValidationReport:
    """What validate() found: `issues` (a list of Issue), `errors` and `slow` (filtered), `ok`
    (no errors). str() gives one line per issue.

    Example:
        >>> from functorch_lite.dp import Issue, ValidationReport
        >>> report = ValidationReport([Issue("head", "slow", "no per-layer rule.", "nothing needed.")])
        >>> report.ok, len(report.slow), report.errors
        (True, 1, [])
    """

    def __init__(self, issues):
        self.issues = list(issues)

    @property
    def errors(self):
        """The issues that break DP-SGD (kind "error")."""
        return [i for i in self.issues if i.kind == "error"]

    @property
    def slow(self):
        """The issues that only cost speed (kind "slow")."""
        return [i for i in self.issues if i.kind == "slow"]

    @property
    def ok(self):
        """True when there is no error (slow paths are fine)."""
        return not self.errors

    def raise_if_errors(self):
        """ValueError listing the errors, if any."""
        if self.errors:
            raise ValueError(
                "functorch_lite.dp.validate: the model is not ready for DP-SGD:\n"
                + "\n".join(f"  {e}" for e in self.errors)
            )

    def __str__(self):
        if not self.issues:
            return "functorch_lite.dp.validate: no issues (every parameter on a per-layer rule)."
        return "\n".join(str(i) for i in self.issues)

    def __repr__(self):
        return f"ValidationReport(errors={len(self.errors)}, slow={len(self.slow)})"


def _names(model):
    return {id(m): n for n, m in model.named_modules()}


def _batch_norm_issues(model):
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None):
            how = "in training mode" if m.training else "without running statistics"
            out.append(
                Issue(
                    name,
                    "error",
                    f"{type(m).__name__} {how} normalises with statistics of the whole batch, so "
                    f"each example's output depends on the others: per-example gradients, and "
                    f"their clipping, do not bound one example's contribution.",
                    "ft.dp.fix(model) replaces it by nn.GroupNorm (as Opacus' ModuleValidator.fix "
                    "does); or use nn.LayerNorm, or eval mode with running statistics.",
                )
            )
    return out


def _subset(tree, n):
    return tree_map(lambda t: t[:n], tree)


def _to64(model, inputs, targets):
    """A float64 copy of the model in eval mode (dropout would make the two forwards differ) and
    the inputs, so that comparisons are exact; a float32 copy with a looser tolerance where the
    model cannot be made float64."""
    cast = lambda t: t.double() if t.is_floating_point() else t  # noqa: E731
    try:
        return copy.deepcopy(model).double().eval(), tree_map(cast, inputs), tree_map(cast, targets), 1e-8
    except (RuntimeError, TypeError):  # a parameter type without a float64 form
        return copy.deepcopy(model).eval(), inputs, targets, 1e-3


def _loop_norms(model, loss_fn, inputs, targets, params, n):
    """Per-example gradient norms of the model's ordinary batched forward."""
    losses = loss_fn(model(*inputs), targets)
    check_per_example_loss(losses, n, "validate")
    ps = list(params.values())
    norms = []
    for i in range(n):
        gs = torch.autograd.grad(losses[i], ps, retain_graph=True, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs if g is not None)))
    return torch.tensor(norms, dtype=torch.float64)


def _calls(model, run):
    """(module, caller, input leaves, output leaves) per module call of run(), in the order the
    calls finish; caller is the module whose forward made the call (None for the model)."""
    seen, stack = [], []

    def leaves(tree):
        return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

    def pre(m, args):
        stack.append(m)

    def post(m, args, out):
        stack.pop()
        seen.append((m, stack[-1] if stack else None, leaves(args), leaves(out)))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _differs(batched, singles, n, rtol):
    """Whether a batched tensor differs from the per-example tensors stacked along its one
    example dim; None where no example dim can be told apart (then nothing is claimed)."""
    first = singles[0]
    if any(s.shape != first.shape for s in singles) or first.dim() != batched.dim():
        return None
    dims = [d for d in range(batched.dim()) if batched.shape[d] == n and first.shape[d] == 1]
    if len(dims) != 1:
        return None
    expect = torch.cat(singles, dims[0])
    if expect.shape != batched.shape:
        return None
    scale = float(expect.detach().abs().max()) if expect.numel() else 0.0
    return not torch.allclose(batched.detach(), expect, rtol=rtol, atol=rtol * max(scale, 1.0))


def _first_mixing_module(model, inputs, n, rtol):
    """Where examples first mix: a module whose inputs agree with the per-example run but whose
    output does not (that module mixes), or one whose inputs already differ (its caller's own
    code mixed them). None where the calls cannot be compared; the model itself is `model`."""
    batched = _calls(model, lambda: model(*inputs))
    with torch.no_grad():
        singles = [_calls(model, lambda i=i: model(*[t[i : i + 1] for t in inputs])) for i in range(n)]
    if any(len(s) != len(batched) for s in singles):
        return None  # data-dependent control flow: the calls do not line up
    for k, (m, caller, ins, outs) in enumerate(batched):
        for j, x in enumerate(ins):
            if _differs(x, [s[k][2][j] for s in singles], n, rtol):
                return caller if caller is not None else model
        for j, o in enumerate(outs):
            if _differs(o, [s[k][3][j] for s in singles], n, rtol):
                return m
    return None


def validate(model, loss_fn, inputs, targets, *, examples=4, method="auto"):
    """Checks once, on a few examples, what in ``model`` would break DP-SGD or slow it down.

    Args:
        model: the ``nn.Module`` to train.
        loss_fn: ``loss_fn(model(*inputs), targets)`` -> per-example losses ``(B,)``.
        inputs, targets: a batch as ``PrivateTrainer.step`` takes it (examples along dim 0).
        examples: how many examples of the batch to check (at least 2).
        method: the clipping method the training will use (``"auto"``/``"ghost"``: its
            per-layer coverage is reported; ``"vmap"``: nothing to report there).

    Returns:
        A :class:`ValidationReport`: ``report.ok``, ``report.errors``, ``report.slow``,
        ``print(report)``, ``report.raise_if_errors()``. The model, its parameters' ``.grad``
        and its buffers are left as they were.

    Example:
        >>> import torch, torch.nn as nn, torch.nn.functional as F, functorch_lite as ft
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))
        >>> x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
        >>> loss = lambda out, y: F.cross_entropy(out, y, reduction="none")
        >>> report = ft.dp.validate(model, loss, x, y)
        >>> report.ok, report.errors[0].module
        (False, '1')
        >>> ft.dp.validate(ft.dp.fix(model), loss, x, y).ok
        True
    """
    api = "validate"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{api}: model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 2:
        raise ValueError(f"{api}: examples must be an int >= 2 (a pair at least), got {examples!r}.")
    if method not in ("auto", "ghost", "vmap"):
        raise ValueError(f"{api}: method must be one of 'auto', 'ghost', 'vmap', got {method!r}.")
    inputs = _as_tuple(inputs)
    size = _batch_size_of([("inputs", inputs), ("targets", targets)], api, "")
    n = min(examples, size)
    if n < 2:
        raise ValueError(f"{api}: the batch needs at least 2 examples to check, got {size}.")
    inputs, targets = _subset(inputs, n), _subset(targets, n)
    names = _names(model)
    issues = _batch_norm_issues(model)
    params = trainable_parameters(model)
    if not params:
        return ValidationReport(issues)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {id(p): p.grad for p in model.parameters()}
    try:
        if not issues:  # batch norm mixes examples by itself: fix that first
            issues += _mixing_issues(model, loss_fn, inputs, targets, n, names)
            if method != "vmap" and not any(i.kind == "error" for i in issues):
                issues += _coverage_issues(model, loss_fn, inputs, targets, params, n, names)
    finally:
        with torch.no_grad():
            model.load_state_dict(state)
        for p in model.parameters():
            p.grad = grads[id(p)]
    return ValidationReport(issues)


def _mixing_issues(model, loss_fn, inputs, targets, n, names):
    m64, x64, y64, rtol = _to64(model, inputs, targets)
    params = trainable_parameters(m64)
    batched = _loop_norms(m64, loss_fn, x64, y64, params, n)

    def one(p, x, y):
        from .._module import functional_call

        out = functional_call(m64, p, tuple(t.unsqueeze(0) for t in x))
        return loss_fn(out, tree_map(lambda t: t.unsqueeze(0), y)).sum()

    from .._grad import grad

    detached = {k: v.detach() for k, v in params.items()}
    per = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(detached, x64, y64)
    leaves = [g.reshape(n, -1).double() for g in tree_flatten(per)[0]]
    alone = torch.cat(leaves, 1).norm(dim=1)
    if torch.allclose(batched, alone, rtol=rtol * 100, atol=rtol):
        return []
    culprit = _first_mixing_module(m64, x64, n, rtol * 100)
    name = "" if culprit is None else names.get(id(_match(m64, model, culprit)), "")
    return [
        Issue(
            name,
            "error",
            f"{'the forward of this module' if culprit is not None else 'the model'} mixes examples: the "
            f"per-example gradients of the batched forward differ from those of each example on "
            f"its own (norms {_fmt(batched)} vs {_fmt(alone)}), so clipping one example's "
            f"gradient does not bound its contribution.",
            "make every op act on each example alone (no statistics over dim 0, no attention or "
            "pooling across the batch dim); every DP method computes the per-example version.",
        )
    ]


def _match(copy_model, model, module):
    """The module of `model` at the position of `module` in its float64 copy."""
    for (_, a), (_, b) in zip(copy_model.named_modules(), model.named_modules()):
        if a is module:
            return b
    return module


def _fmt(t):
    return "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"


def _coverage_issues(model, loss_fn, inputs, targets, params, n, names):
    result = _ghost.ghost_clipped_grad(model, loss_fn, inputs, targets, params, 1.0, n, False)
    if result is None:
        return [
            Issue(
                "",
                "slow",
                f"the per-layer path cannot handle this model ({_ghost.last_fallback_reason()}); "
                f"every step takes the whole-model vmap path (same values, slower).",
                "see docs/dp_clipping.md for what the per-layer path reads; the step works as is.",
            )
        ]
    _, per_layer = _ghost.last_plan()
    return [
        Issue(
            names.get(id(m), ""),
            "slow",
            f"{_why_per_layer(m)}: its parameters get a per-layer vmap(grad) (same values, slower "
            f"than the rules of Linear/Conv/Embedding/norm/attention layers).",
            "nothing needed; for speed, build it from layers with rules (docs/dp_clipping.md).",
        )
        for m in per_layer
    ]


def _why_per_layer(m):
    name = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):
        if m.training and m.dropout > 0:
            return f"{name} draws attention dropout in training (redrawn by a per-layer vmap)"
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            return f"{name} with separate q/k/v weights, bias_k or add_zero_attn has no rule"
    if _ghost._rule_for(m) is not None:
        return f"the {name} rule cannot read this call's layout (one image per example expected)"
    return f"{name} has no per-layer rule"


def fix(model):
    """Replaces every batch norm of ``model`` (in place) by an ``nn.GroupNorm`` over the same
    channels (``gcd(32, C)`` groups, as Opacus' ModuleValidator.fix), keeping its affine
    parameters; returns the model. Group norm normalises each example on its own, so the model
    becomes DP-compatible; it changes the model, so train it (or fine-tune it) after the swap.

    Example:
        >>> import torch.nn as nn, functorch_lite as ft
        >>> model = ft.dp.fix(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)))
        >>> type(model[1]).__name__, model[1].num_groups, model[1].num_channels
        ('GroupNorm', 16, 16)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fix: model must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, _BatchNorm):
        return _group_norm_like(model)
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, _group_norm_like(child))
        else:
            fix(child)
    return model


def _group_norm_like(bn):
    c = bn.num_features
    gn = nn.GroupNorm(math.gcd(32, c), c, eps=bn.eps, affine=bn.affine)
    like = bn.weight if bn.affine else bn.running_mean
    if like is not None:
        gn = gn.to(device=like.device, dtype=like.dtype)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn
