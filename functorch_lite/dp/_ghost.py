"""clipped_grad_module's fast path: per-example gradient norms from layer inputs and output
gradients, and the clipped sum by book-keeping, without per-example gradients where a layer
has a ghost rule.

One forward records, for every module call, its inputs and its output's gradient edge (forward
hooks), and a TorchFunctionMode notes which module calls use each trainable parameter. One
backward of sum_i loss_i asks autograd only for the gradients at the recorded outputs (b), not
for any parameter gradient. Then, per parameter:

- used only inside calls of a layer with a rule (Linear, Conv1d/2d, Embedding, LayerNorm,
  GroupNorm, RMSNorm, eval-mode BatchNorm, MultiheadAttention) that own it: from that layer's
  input a and b (attention re-runs its core to get its projections' a and b). For a
  weight used by exactly one call, ghost norm (||G_i||^2 from a and b, then the clipped sum as
  one reweighted product (c*b)^T a) or materialised per-example gradients (b_i^T a_i), chosen by
  cost; a weight used by several calls (tied weights, a module called twice) is materialised and
  its uses summed, so its norm stays exact; biases and norm-layer affines are always formed
  per example (cheap);
- otherwise (any other module, a parameter used outside its module): the deepest module whose
  calls contain every use of the parameter gets a per-layer vmap(grad) of <module(a_i), b_i>.

The total norm is the root of the sum of all squared contributions; exact, same values as
vmap(grad). Assumption (documented): dim 0 of every module input/output that carries examples
is the example dim (batch-first), and a module argument whose dim 0 equals the batch size is
per-example. When the structure defeats this path (a use the mode did not see, an output view
modified in place, a layer input that is not batch-first) the caller falls back to the
whole-model vmap path: slower, same result. A parameter used in loss_fn is refused
(ValueError): every method differentiates through the model's forward only.
"""

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._grad import grad
from .._module import functional_call
from .._vmap import vmap
from ._clip import _as_tuple, check_per_example_loss, clip_factors, per_example_sq_norms, weighted_sum

__all__ = ["ghost_clipped_grad"]


class _Fallback(Exception):
    """The model's structure defeats the per-layer path; use the whole-model vmap path."""


# ------------------------------------------------------------------------------------------------
# recording: module calls (inputs, output edges) and which calls use each parameter


def _draws_dropout(module):
    return isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0


def _rng_state(args):
    """The state of the generator that a call on these inputs draws from."""
    device = args[0].device if args and isinstance(args[0], torch.Tensor) else torch.device("cpu")
    if device.type == "cuda":
        return device, torch.cuda.get_rng_state(device)
    return device, torch.get_rng_state()


@contextlib.contextmanager
def _replaying(rng):
    """The generator set to the recorded state, restored afterwards."""
    device, state = rng
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def _tensors(args, kwargs):
    for x in (*args, *kwargs.values()):
        if isinstance(x, (list, tuple)):
            yield from (y for y in x if isinstance(y, torch.Tensor))
        elif isinstance(x, torch.Tensor):
            yield x


def _carries_grad(out):
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    return isinstance(out, (list, tuple)) and any(_carries_grad(x) for x in out)


class _Call:
    __slots__ = ("args", "kwargs", "outputs", "edges", "versions", "rng")

    def __init__(self, args, kwargs, output, rng=None):
        self.args, self.kwargs, self.rng = args, kwargs, rng
        leaves, _ = tree_flatten(output)
        # b is needed for every output that carries gradient; others (None, masks) get none
        self.outputs = [t if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
        # the edge, not the tensor: an in-place op after the call (ReLU(inplace=True)) must not
        # turn the output's gradient into the gradient of the modified value
        self.edges = [None if t is None else get_gradient_edge(t) for t in self.outputs]
        self.versions = [None if t is None else t._version for t in self.outputs]


class _Recorder(TorchFunctionMode):
    def __init__(self, model, params):
        super().__init__()
        self.model = model
        self.param_ids = {id(p) for p in params.values()}
        self.stack, self.rng = [], []
        self.calls = {}  # module -> [_Call]
        self.uses = {}  # id(param) -> [tuple of the modules active at the use, outermost first]
        self.handles = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a use is an op on a parameter whose result carries gradient: metadata reads (.shape,
        # .dtype, .dim()) and detached copies elsewhere do not tie the parameter to a module
        used = [x for x in _tensors(args, kwargs) if id(x) in self.param_ids]
        if used and _carries_grad(out):
            where = tuple(self.stack)
            for x in used:
                self.uses.setdefault(id(x), []).append(where)
        return out

    def _pre(self, module, args, kwargs):
        self.stack.append(module)
        # attention dropout is replayed by the rule from the generator state at the call
        self.rng.append(_rng_state(args) if _draws_dropout(module) else None)

    def _post(self, module, args, kwargs, output):
        self.stack.pop()
        rng = self.rng.pop()
        with torch._C.DisableTorchFunction():  # our own attribute reads are no uses (and slow)
            self.calls.setdefault(module, []).append(_Call(args, kwargs, output, rng))

    def __enter__(self):
        for m in self.model.modules():
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


# ------------------------------------------------------------------------------------------------
# per-layer rules. A contribution is ("inst", name, per-example gradients (B, *shape)) or
# ("ghost", name, squared norms (B,), finish(c) -> the clipped sum).


def _use_ghost(policy, t, p, d):
    """Mixed ghost clipping (Bu et al. 2022): Gram matrices cost ~T^2 (p+d), instantiating T p d."""
    if policy == "inst":
        return False
    return policy == "ghost" or 2 * t * t < p * d


def _matmul_weight(name, a, b, policy):
    """Weight gradient of a matmul layer from a (B, T, d) and b (B, T, p), or per group from
    a (B, G, T, d) and b (B, G, T, p): per-example gradient b_i^T a_i, (B, [G,] p, d). Kept 3-D
    when there are no groups so that the batched products take the transposes without copies."""
    n, t, d, p = a.shape[0], a.shape[-2], a.shape[-1], b.shape[-1]
    if not _use_ghost(policy, t, p, d):
        return ("inst", name, b.transpose(-1, -2) @ a)
    if t == 1:
        sq = (
            torch.linalg.vector_norm(a, dim=(-1, -2)).square()
            * torch.linalg.vector_norm(b, dim=(-1, -2)).square()
        )
    else:
        sq = ((a @ a.transpose(-1, -2)) * (b @ b.transpose(-1, -2))).sum((-1, -2))
    sq = sq.reshape(n, -1).sum(1)

    def finish(c):
        if a.dim() == 3:  # one matmul over all examples and positions, scaling the thinner side
            a2, b2 = a.reshape(-1, d), b.reshape(-1, p)
            w = (c if t == 1 else c.repeat_interleave(t))[:, None]
            return (b2 * w).T @ a2 if p <= d else b2.T @ (a2 * w)
        return torch.einsum("bgtp,bgtd->gpd", b * c[:, None, None, None], a)

    return ("ghost", name, sq, finish)


def _linear(module, call, b, policy):
    a = _input(call)
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])
    b = b.reshape(n, -1, b.shape[-1])
    out = [_matmul_weight("weight", a, b, policy("weight", a.shape[1], b.shape[-1], a.shape[-1]))]
    if module.bias is not None:
        out.append(("inst", "bias", b.sum(1)))
    return out


def _conv(module, call, b, policy):
    """Conv1d (as a 2-D conv of height 1) and Conv2d: the L output positions play the role of T;
    ghost norms from the unfolded input, per-example gradients by a grouped convolution."""
    a = _input(call)
    one_d = isinstance(module, nn.Conv1d)
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = F.pad(a, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * (1 if one_d else 2)
    else:
        padding = module.padding
    if one_d:
        a, b = a.unsqueeze(2), b.unsqueeze(2)
        kernel, dilation, stride = (
            (1,) + tuple(module.kernel_size),
            (1,) + module.dilation,
            (1,) + module.stride,
        )
        padding = (0,) + tuple(padding)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    n, groups, c_in, c_out = a.shape[0], module.groups, a.shape[1], b.shape[1]
    t, p, d = b[0, 0].numel(), c_out // groups, c_in // groups * kernel[0] * kernel[1]
    choice = policy("weight", t, p, d)
    if not _use_ghost(choice, t, p, d):
        # per-example weight gradients as one weight gradient of a convolution whose groups are
        # the examples: no unfolded copy of the input (which costs more than the products)
        g = torch.nn.grad.conv2d_weight(
            a.reshape(1, n * c_in, *a.shape[2:]),
            (n * c_out, c_in // groups, *kernel),
            b.reshape(1, n * c_out, *b.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=n * groups,
        )
        weight = ("inst", "weight", g.reshape(n, *module.weight.shape))
    else:
        cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
        lead = (n,) if groups == 1 else (n, groups)
        a_t = cols.reshape(*lead, d, -1).transpose(-1, -2)
        b_t = b.reshape(*lead, p, -1).transpose(-1, -2)
        _, name, sq, finish = _matmul_weight("weight", a_t, b_t, "ghost")
        weight = ("ghost", name, sq, lambda c: finish(c).reshape(module.weight.shape))
    out = [weight]
    if module.bias is not None:
        out.append(("inst", "bias", b.reshape(n, b.shape[1], -1).sum(-1)))
    return out


def _embedding(module, call, b, policy):
    ids = _input(call)
    n, vocab, dim = ids.shape[0], module.num_embeddings, module.embedding_dim
    ids = ids.reshape(n, -1)
    b = b.reshape(n, -1, dim)
    if module.padding_idx is not None:  # the padding row gets no gradient
        b = b * (ids != module.padding_idx).unsqueeze(-1).to(b.dtype)
    t = ids.shape[1]
    if not _use_ghost(policy("weight", t, dim, vocab), t, dim, vocab):
        offsets = (ids + torch.arange(n, device=ids.device).unsqueeze(1) * vocab).reshape(-1)
        g = b.new_zeros(n * vocab, dim).index_add_(0, offsets, b.reshape(-1, dim))
        return [("inst", "weight", g.reshape(n, vocab, dim))]
    # ||G_i||^2 = sum over token pairs with equal ids of <b_it, b_is>
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(b.dtype)
    sq = (same * (b @ b.transpose(1, 2))).sum((1, 2))

    def finish(c):
        rows = (b * c[:, None, None]).reshape(-1, dim)
        return b.new_zeros(vocab, dim).index_add_(0, ids.reshape(-1), rows)

    return [("ghost", "weight", sq, finish)]


def _affine(module, b, x_hat, channel_dims):
    """Per-example weight/bias gradients of an elementwise affine y = x_hat * w + bias, summed over
    the positions that share a weight; channel_dims: how w's entries lie in x_hat."""
    n = b.shape[0]
    out = []
    if module.weight is not None:
        out.append(("inst", "weight", channel_dims(b * x_hat).reshape(n, *module.weight.shape)))
    if getattr(module, "bias", None) is not None:
        out.append(("inst", "bias", channel_dims(b).reshape(n, *module.bias.shape)))
    return out


def _trailing(shape):
    """Sums over everything but the batch dim and the trailing `shape` (LayerNorm, RMSNorm)."""
    k = len(shape)
    return lambda t: t.reshape(t.shape[0], -1, *t.shape[t.dim() - k :]).sum(1)


def _channels(t):
    """Sums over the positions after dim 1 (GroupNorm, BatchNorm: one weight per channel)."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def _norm_rule(normalize, positions):
    """The rule of a norm layer y = normalize(a) * weight + bias; positions(module) sums the
    per-position products over the positions that share a weight entry."""

    def rule(module, call, b, policy):
        return _affine(module, b, normalize(module, _input(call)), positions(module))

    return rule


_layer_norm = _norm_rule(
    lambda m, a: F.layer_norm(a, m.normalized_shape, eps=m.eps), lambda m: _trailing(m.normalized_shape)
)
_rms_norm = _norm_rule(
    lambda m, a: F.rms_norm(a, m.normalized_shape, eps=m.eps), lambda m: _trailing(m.normalized_shape)
)
_group_norm = _norm_rule(lambda m, a: F.group_norm(a, m.num_groups, eps=m.eps), lambda m: _channels)
_batch_norm_eval = _norm_rule(
    lambda m, a: F.batch_norm(a, m.running_mean, m.running_var, training=False, eps=m.eps),
    lambda m: _channels,
)


def _float_mask(mask, dtype):
    """MultiheadAttention's masks as additive float masks (bool True = not attended)."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha(module, call, b, policy):
    """nn.MultiheadAttention (batch_first, packed in_proj, no bias_k/add_zero_attn):
    the attention is re-run from the recorded inputs to get the context (out_proj's input) and,
    by one batched backward of b through it, the gradients at q, k and v (in_proj's outputs);
    both projections are then matmul layers like Linear. Attention dropout in training is
    replayed from the generator state recorded at the call, and checked against the output."""
    bound = _MHA_SIGNATURE.bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    arg = bound.arguments
    query, key, value = (arg[k].detach() for k in ("query", "key", "value"))
    n, t, e = query.shape
    heads, hd = module.num_heads, module.embed_dim // module.num_heads
    kpm = _float_mask(arg["key_padding_mask"], query.dtype)
    causal = arg["is_causal"] and kpm is None and not arg["need_weights"]
    mask = None if causal else _float_mask(arg["attn_mask"], query.dtype)
    if mask is not None:
        mask = mask.view(1, 1, *mask.shape) if mask.dim() == 2 else mask.view(n, heads, *mask.shape[1:])
    if kpm is not None:
        kpm = kpm.view(n, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    w = module.in_proj_weight.detach()
    bias = module.in_proj_bias.detach() if module.in_proj_bias is not None else None
    self_attention = query is key and key is value
    with torch.enable_grad():
        if self_attention:  # one projection; its gradient holds the q, k, v blocks side by side
            leaves = [F.linear(query, w, bias).requires_grad_()]
            proj = leaves[0].chunk(3, -1)
        else:
            leaves = proj = [
                F.linear(
                    x, w[i * e : (i + 1) * e], None if bias is None else bias[i * e : (i + 1) * e]
                ).requires_grad_()
                for i, x in enumerate((query, key, value))
            ]
        split = [x.unflatten(-1, (heads, hd)).transpose(1, 2) for x in proj]
        if call.rng is None:
            ctx = F.scaled_dot_product_attention(*split, attn_mask=mask, is_causal=causal)
        else:
            with _replaying(call.rng):
                ctx = F.scaled_dot_product_attention(
                    *split, attn_mask=mask, is_causal=causal, dropout_p=module.dropout
                )
        ctx = ctx.transpose(1, 2).reshape(n, t, e)
        grads = torch.autograd.grad(ctx, leaves, b @ module.out_proj.weight.detach())
    if call.rng is not None:
        _check_replay(module, call, ctx)
    out = [_matmul_weight("out_proj.weight", ctx.detach(), b, policy("out_proj.weight", t, e, e))]
    if module.out_proj.bias is not None:
        out.append(("inst", "out_proj.bias", b.sum(1)))
    if self_attention:
        out.append(_matmul_weight("in_proj_weight", query, grads[0], policy("in_proj_weight", t, 3 * e, e)))
    else:  # three row blocks of one weight: squared norms add, the sums stack
        choice = policy("in_proj_weight", max(t, key.shape[1]), e, e)
        parts = [_matmul_weight("in_proj_weight", x, g, choice) for x, g in zip((query, key, value), grads)]
        if parts[0][0] == "inst":
            out.append(("inst", "in_proj_weight", torch.cat([q[2] for q in parts], 1)))
        else:
            out.append(
                (
                    "ghost",
                    "in_proj_weight",
                    sum(q[2] for q in parts),
                    lambda c: torch.cat([q[3](c) for q in parts]),
                )
            )
    if bias is not None:
        out.append(("inst", "in_proj_bias", torch.cat([g.sum(1) for g in grads], -1)))
    return out


def _check_replay(module, call, ctx):
    """The replayed dropout must be the one drawn in the forward: the output, recomputed from
    the replayed context, must match the recorded one (a different mask differs by O(1))."""
    y = call.outputs[0]
    if y._version != call.versions[0]:
        raise _Fallback("attention output modified in place: dropout replay unchecked")
    again = F.linear(
        ctx.detach(),
        module.out_proj.weight.detach(),
        None if module.out_proj.bias is None else module.out_proj.bias.detach(),
    )
    tol = 1e-3 if y.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if not torch.allclose(again, y.detach(), rtol=tol, atol=tol * float(y.detach().abs().max())):
        raise _Fallback("attention dropout could not be replayed")


def _mha_supported(module):
    return (
        module.batch_first
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


_RULES = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.BatchNorm1d: _batch_norm_eval,
    nn.BatchNorm2d: _batch_norm_eval,
    nn.BatchNorm3d: _batch_norm_eval,
    nn.MultiheadAttention: _mha,
}
if hasattr(nn, "RMSNorm"):
    _RULES[nn.RMSNorm] = _rms_norm


def _input(call):
    """A layer's (first) input, detached: the rules compute from values only."""
    return (call.args[0] if call.args else next(iter(call.kwargs.values()))).detach()


def _rule_parameters(module):
    """name -> parameter for the parameters a layer's rule computes: its own (and
    MultiheadAttention's out_proj's, which it uses directly rather than calling out_proj)."""
    if isinstance(module, nn.MultiheadAttention):
        named = {
            "in_proj_weight": module.in_proj_weight,
            "in_proj_bias": module.in_proj_bias,
            "out_proj.weight": module.out_proj.weight,
            "out_proj.bias": module.out_proj.bias,
        }
    else:
        named = module._parameters
    return {n: p for n, p in named.items() if p is not None}


def _rule_for(module):
    """The rule of a module whose forward is one of the standard layers' (subclasses that keep
    it, such as MultiheadAttention's out_proj, count), or None."""
    for base, rule in _RULES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            if isinstance(module, nn.Embedding) and (
                module.max_norm is not None or module.scale_grad_by_freq
            ):
                return None  # renormalising/rescaling lookups: the per-layer vmap handles them
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or module.running_mean is None or not module.affine
            ):
                return None
            if isinstance(module, nn.MultiheadAttention) and not _mha_supported(module):
                return None
            return rule
    return None


# ------------------------------------------------------------------------------------------------
# planning: which parameters a rule covers, which get a per-layer vmap(grad)


def _plan(recorder, params, rules):
    """Returns (rule_params, generic): rule_params maps id(param) -> number of calls that use it
    (all inside rule layers owning it); generic maps a module -> [id(param)] of the parameters it
    differentiates with a per-layer vmap(grad)."""
    rule_params, generic = {}, {}
    for p in params.values():
        stacks = recorder.uses.get(id(p))
        if not stacks:
            continue
        if any(not s for s in stacks):
            name = next(n for n, q in params.items() if q is p)
            raise ValueError(
                f"clipped_grad_module: the trainable parameter {name!r} is used in loss_fn, "
                f"outside the model's forward; per-example gradients are taken through the "
                f"model only. Use it inside the model's forward (or freeze it)."
            )
        owners = {s[-1] for s in stacks}
        if all(
            rules.get(m) is not None and any(q is p for q in _rule_parameters(m).values()) for m in owners
        ):
            rule_params[id(p)] = sum(len(recorder.calls.get(m, ())) for m in owners)
            continue
        common = stacks[0]
        for s in stacks[1:]:
            k = 0
            while k < min(len(common), len(s)) and common[k] is s[k]:
                k += 1
            common = common[:k]
        if not common:
            raise _Fallback("a parameter is used by module calls with no common caller")
        generic.setdefault(common[-1], []).append(id(p))
    return rule_params, generic


# ------------------------------------------------------------------------------------------------
# the step


def ghost_clipped_grad(model, loss_fn, inputs, targets, params, max_norm, size, force_ghost):
    """(grads, norms), or None when the caller must use the whole-model vmap path."""
    try:
        return _ghost_clipped_grad(model, loss_fn, inputs, targets, params, max_norm, size, force_ghost)
    except _Fallback:
        return None


def _ghost_clipped_grad(model, loss_fn, inputs, targets, params, max_norm, size, force_ghost):
    api = "clipped_grad_module"
    recorder = _Recorder(model, params)
    with recorder:
        outputs = model(*_as_tuple(inputs))
        losses = loss_fn(outputs, targets)
    check_per_example_loss(losses, size, api)
    rules = {m: _rule_for(m) for m in recorder.calls}
    rule_params, generic = _plan(recorder, params, rules)

    # the calls whose output gradients we need, then one backward for all of them
    rule_calls = [
        (m, c)
        for m, calls in recorder.calls.items()
        if rules[m] is not None and any(id(q) in rule_params for q in _rule_parameters(m).values())
        for c in calls
    ]
    generic_calls = [(m, c) for m in generic for c in recorder.calls.get(m, ())]
    used = set(rule_params) | {i for ids in generic.values() for i in ids}
    unseen = [p for p in params.values() if id(p) not in used]
    needed = [(c, k) for _, c in rule_calls + generic_calls for k, e in enumerate(c.edges) if e is not None]
    wanted = [c.edges[k] for c, k in needed] + unseen
    got = (
        torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
        if wanted and losses.requires_grad
        else [None] * len(wanted)
    )
    if any(g is not None for g in got[len(needed) :]):
        raise _Fallback("a parameter is used where the recording did not see it")
    grads_at = {}
    for (c, k), g in zip(needed, got):
        if g is None and c.outputs[k]._version != c.versions[k]:
            raise _Fallback("a module output (a view) was modified in place")
        grads_at[(id(c), k)] = g

    contributions = []
    with torch.no_grad():
        for module, call in rule_calls:
            contributions += _rule_contributions(
                module, rules[module], call, grads_at, rule_params, size, force_ghost
            )
    for module, ids in generic.items():
        for call in recorder.calls.get(module, ()):
            contributions += _generic_contributions(module, ids, call, grads_at, size)

    with torch.no_grad():
        return _combine(contributions, params, max_norm, size, losses)


def _output_grad(call, grads_at, k=0):
    g = grads_at.get((id(call), k))
    return torch.zeros_like(call.outputs[k]) if g is None else g


def _rule_contributions(module, rule, call, grads_at, rule_params, size, force_ghost):
    a = _input(call)
    if a.dim() == 0 or a.shape[0] != size or call.outputs[0] is None:
        raise _Fallback("a layer's input is not batch-first")
    if any(grads_at.get((id(call), k)) is not None for k in range(1, len(call.outputs))):
        raise _Fallback("attention weights reach the loss")
    b = _output_grad(call, grads_at)
    owned = _rule_parameters(module)

    def policy(name, t, p, d):
        pid = id(owned[name])
        if pid not in rule_params or rule_params[pid] > 1:
            return "inst"  # several uses: materialise and sum them so the norm stays exact
        return "ghost" if force_ghost else "auto"

    out = []
    for kind, name, *rest in rule(module, call, b, policy):
        pid = id(owned[name])
        if pid in rule_params:  # a parameter also used elsewhere is the per-layer vmap's
            out.append((kind, pid, *rest))
    return out


def _generic_contributions(module, ids, call, grads_at, size):
    """Per-example gradients of <module(a_i), b_i> w.r.t. the parameters `ids` (vmap(grad))."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    dims = [0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size else None for t in leaves]
    if not any(d == 0 for d in dims):
        raise _Fallback("a module call has no per-example (batch-first) argument")
    # outputs the loss does not depend on (an RNN's final state, often) contribute nothing
    outs = [k for k, t in enumerate(call.outputs) if grads_at.get((id(call), k)) is not None]
    if any(call.outputs[k].dim() == 0 or call.outputs[k].shape[0] != size for k in outs):
        raise _Fallback("a module output is not batch-first")
    if not outs:
        return []
    bs = [grads_at[(id(call), k)] for k in outs]
    names = {}
    for n, p in module.named_parameters():
        names.setdefault(id(p), (n, p))
    fixed = {n: p.detach() for n, p in names.values()}
    diff = {names[i][0]: fixed[names[i][0]] for i in ids}
    leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]

    def one_example(diff_params, *flat):
        xs = [t.unsqueeze(0) if d == 0 else t for t, d in zip(flat[: len(leaves)], dims)]
        args, kwargs = tree_unflatten(xs, spec)
        out, _ = tree_flatten(functional_call(module, {**fixed, **diff_params}, args, kwargs))
        return sum((out[k] * b.unsqueeze(0)).sum() for k, b in zip(outs, flat[len(leaves) :]))

    per_example = vmap(grad(one_example), in_dims=(None, *dims, *([0] * len(bs))), randomness="different")(
        diff, *leaves, *bs
    )
    return [("inst", i, per_example[names[i][0]].detach()) for i in ids]


def _combine(contributions, params, max_norm, size, losses):
    inst, ghosts = {}, []
    shapes = {id(p): (p.shape, p.dtype) for p in params.values()}
    for kind, pid, *rest in contributions:
        if kind == "inst":
            g = rest[0].reshape(size, *shapes[pid][0])  # uses of a tied weight by different layers
            inst[pid] = g if pid not in inst else inst[pid] + g
        else:
            ghosts.append((pid, *rest))
    parts = [per_example_sq_norms(g) for g in inst.values()] + [sq for _, sq, _ in ghosts]
    dtype = losses.dtype
    norms = (
        sum(q if q.dtype == dtype else q.to(dtype) for q in parts) if parts else losses.new_zeros(size)
    ).sqrt()
    c = clip_factors(norms, max_norm)
    factors = {dtype: c}  # in each parameter's dtype, converted once
    sums = {pid: weighted_sum(c, g) for pid, g in inst.items()}
    for pid, _, finish in ghosts:
        d = shapes[pid][1]
        sums[pid] = finish(factors.setdefault(d, c.to(d)))
    grads = {
        n: sums[id(p)].reshape(p.shape) if id(p) in sums else torch.zeros_like(p) for n, p in params.items()
    }
    return grads, norms
