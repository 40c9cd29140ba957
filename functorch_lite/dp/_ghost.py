"""clipped_grad_module's fast path: per-example gradient norms from layer inputs and output
gradients, and the clipped sum by book-keeping, without per-example gradients where a layer
has a ghost rule.

NOTE [The example dim is known, never guessed]
The recording forward runs the model under our own vmap, one example at a time as the vmap path
does (each example is seen as a batch of one). Forward hooks then see BatchedTensors: a module
argument or output batched at that vmap level carries the examples along its physical batch
dim, which the vmap level knows exactly; an unbatched one is shared by all examples (a
parameter table, a mask built from constants). The hooks keep the physical tensors with the
example dim moved to the front, so a layer input is (B, *one example's shape) whatever the
model does with its layouts (seq-first attention, x.transpose(0, 1), T == B). Autograd records
the physical computation (the parameters are plain tensors captured by the vmapped function),
so one backward of sum_i loss_i gives each recorded output's gradient b, also (B, *shape).
Nothing is inferred from sizes: a rule whose layer sees a layout it cannot read (a conv input
whose batch of one was reshaped away, an input shared by all examples) hands the layer to the
per-layer vmap(grad), which takes every argument's exact batch dim; a parameter whose
per-example gradient cannot be read from any layer's a and b (a layer whose output is shared by
all examples) sends the model to the whole-model vmap path: slower, same result.

One forward records, for every module call, its inputs and its output's gradient edge (forward
hooks), and a TorchFunctionMode notes which module calls use each trainable parameter. One
backward asks autograd only for the gradients at the recorded outputs (b), not for any
parameter gradient. Then, per parameter:

- used only inside calls of a layer with a rule (Linear, Conv1d/2d, Embedding, LayerNorm,
  GroupNorm, RMSNorm, eval-mode BatchNorm, MultiheadAttention without attention dropout) that
  own it: from that layer's input a and b (attention re-runs its core to get its projections'
  a and b). For a weight used by exactly one call, ghost norm (||G_i||^2 from a and b, then the
  clipped sum as one reweighted product (c*b)^T a) or materialised per-example gradients
  (b_i^T a_i), chosen by cost; a weight used by several calls (tied weights, a module called
  twice) is materialised and its uses summed, so its norm stays exact; biases and norm-layer
  affines are always formed per example (cheap);
- otherwise (any other module, a parameter used outside its module): the deepest module whose
  calls contain every use of the parameter gets a per-layer vmap(grad) of <module(a_i), b_i>.
  A module that draws random numbers (dropout in training) is re-run from the generator state
  recorded at its call, and its recomputed outputs must equal the recorded ones.

The total norm is the root of the sum of all squared contributions; exact, same values as
vmap(grad) (and, with dropout, the same masks: both paths draw under the same vmap). When the
structure defeats this path (a use the mode did not see, an output view or an input modified in
place, a replay that does not reproduce its output) the caller falls back to the whole-model
vmap path. A parameter used in loss_fn is refused (ValueError): every method differentiates
through the model's forward only.
"""

import contextlib
import inspect
import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._grad import grad
from .._load import _C
from .._module import functional_call
from .._vmap import vmap
from ._common import _as_tuple, check_per_example_loss, clip_factors, per_example_sq_norms, weighted_sum

__all__ = ["ghost_clipped_grad"]


class _Fallback(Exception):
    """The model's structure defeats the per-layer path; use the whole-model vmap path."""


# ------------------------------------------------------------------------------------------------
# recording: module calls (physical inputs, output edges) and which calls use each parameter


def _rng_state(args):
    """The state of the generator that a call on these inputs draws from."""
    first = next((t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
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


def _physical_requires_grad(t):
    """Whether the physical value under t's batching carries gradient (a BatchedTensor itself
    has no autograd meta: autograd records the physical computation)."""
    while True:
        info = _C._wrapper_info(t)
        if info is None:
            return t.requires_grad
        t = info[3]


def _carries_grad(out):
    if isinstance(out, torch.Tensor):
        return _physical_requires_grad(out)
    return isinstance(out, (list, tuple)) and any(_carries_grad(x) for x in out)


class _Physical:
    """Converts the tensors a hook sees into physical ones: a tensor batched at the recording
    vmap level becomes its value with the batch dim moved to the front, (B, *one example's
    shape); any other tensor is shared by all examples and stays as it is. One conversion per
    tensor object, so identities (self-attention's query is key is value) survive."""

    def __init__(self):
        self.level = None
        self.memo = {}

    def _get(self, t):
        got = self.memo.get(id(t))
        if got is None or got[0] is not t:  # the memo holds t, so its id is not reused meanwhile
            value, bdim = _C._unwrap_batched(t, self.level)
            front = (value if bdim is None else value.movedim(bdim, 0)).detach()
            got = self.memo[id(t)] = (t, value, bdim, front)
        return got

    def raw(self, t):
        """(physical value, batch dim or None), the value as the vmap level holds it."""
        _, value, bdim, _ = self._get(t)
        return value, bdim

    def front(self, t):
        """(detached tensor with the examples along dim 0 if batched, batched?)."""
        _, _, bdim, front = self._get(t)
        return front, bdim is not None


class _Call:
    __slots__ = (
        "args",
        "kwargs",
        "batched",
        "in_versions",
        "outputs",
        "out_dims",
        "edges",
        "versions",
        "bases",
        "rng",
        "front_shapes",
    )

    def __init__(self, phys, args, kwargs, output, rng=None):
        leaves, spec = _flatten_call(args, kwargs)
        flat, self.batched, self.in_versions = [], [], []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                v, batched = phys.front(x)
                flat.append(v)
                self.batched.append(batched)
                self.in_versions.append(v._version)
            else:
                flat.append(x)
                self.batched.append(False)
                self.in_versions.append(None)
        self.args, self.kwargs = (tuple(flat), {}) if spec is None else tree_unflatten(flat, spec)
        self.rng = rng
        # b is needed for every output that carries gradient; others (None, masks) get none
        self.outputs, self.out_dims = [], []
        for t in (output,) if isinstance(output, torch.Tensor) else tree_flatten(output)[0]:
            if isinstance(t, torch.Tensor):
                v, bdim = phys.raw(t)
                self.outputs.append(v if v.requires_grad else None)
                self.out_dims.append(bdim)
            else:
                self.outputs.append(None)
                self.out_dims.append(None)
        # the edge, not the tensor: an in-place op after the call (ReLU(inplace=True)) must not
        # turn the output's gradient into the gradient of the modified value
        self.edges = [None if t is None else get_gradient_edge(t) for t in self.outputs]
        # the outputs themselves are released before the backward (NOTE [What the backward keeps]):
        # a zero gradient for an output the loss does not reach needs its shape only
        self.front_shapes = [
            None if t is None else (self.front_output(k, t).shape, t.dtype, t.device)
            for k, t in enumerate(self.outputs)
        ]
        self.versions = [None if t is None else t._version for t in self.outputs]
        # a physical output is often a view (the batching rule's reshape of a fresh result); an
        # in-place op on it later (ReLU(inplace=True)) moves its history to the base, and its own
        # edge is then no longer reached: the base's edge, sliced like the view, is
        self.bases = [_base_of(t) for t in self.outputs]

    def edge_for(self, k):
        """The edge to ask autograd for output k's gradient, and how to read that gradient."""
        if self.outputs[k]._version == self.versions[k] or self.bases[k] is None:
            return self.edges[k], None
        return self.bases[k][1], self.bases[k]

    def front_output(self, k, value):
        """value (shaped like output k's physical value) with the examples along dim 0."""
        d = self.out_dims[k]
        return value if d is None else value.movedim(d, 0)

    def inputs_changed(self):
        """Whether an input was modified in place after the call (its recorded value is stale)."""
        leaves = _flatten_call(self.args, self.kwargs)[0]
        return any(
            v is not None and x._version != v
            for x, v in zip(leaves, self.in_versions)
            if isinstance(x, torch.Tensor)
        )


def _flatten_call(args, kwargs):
    """tree_flatten((args, kwargs)), with spec None for the common call of a layer (positional
    tensors only), which skips pytree: a few microseconds per layer call, every step."""
    if not kwargs and all(type(a) is torch.Tensor or type(a) is nn.Parameter for a in args):
        return list(args), None
    return tree_flatten((args, kwargs))


def _base_of(t):
    if t is None or not t._is_view() or not t._base.requires_grad:
        return None
    base = t._base
    return (
        base,
        get_gradient_edge(base),
        (tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset()),
    )


def _view_of_base_grad(g, based):
    """The gradient of a view from its base's gradient, read with the view's geometry."""
    base, _, (shape, stride, offset) = based
    if g.stride() != base.stride():
        g = torch.empty_strided(base.shape, base.stride(), dtype=g.dtype, device=g.device).copy_(g)
    return g.as_strided(shape, stride, g.storage_offset() + offset)


class _Recorder(TorchFunctionMode):
    def __init__(self, model, params):
        super().__init__()
        self.model = model
        self.param_ids = {id(p) for p in params.values()}
        self.stack, self.rng = [], []
        self.calls = {}  # module -> [_Call]
        self.uses = {}  # id(param) -> [tuple of the modules active at the use, outermost first]
        self.handles = []
        self.phys = _Physical()
        self.size = None  # the batch size, set by _record
        self.has_rule = {}  # module -> whether a layer rule reads it (asked at every call of it)
        self.sites = {}  # (id(W), id(b), transposed) -> _MatmulUse (NOTE [Weights that enter ...])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a use is an op on a parameter whose result carries gradient: metadata reads (.shape,
        # .dtype, .dim()) and detached copies elsewhere do not tie the parameter to a module
        used = [x for x in _tensors(args, kwargs) if id(x) in self.param_ids]
        if used:
            with torch._C.DisableTorchFunction():
                carries = _carries_grad(out)
                site = self._matmul_site(func, args, kwargs, out) if carries else None
            if carries:
                where = tuple(self.stack) if site is None else (*self.stack, site)
                for x in used:
                    self.uses.setdefault(id(x), []).append(where)
        return out

    def _matmul_site(self, func, args, kwargs, out):
        """NOTE [Weights that enter through F.linear or matmul]: inside a module without a rule
        (a custom projection, an attention block written with F.linear), a trainable weight
        passed to F.linear(x, W[, b]), addmm(b, x, W) or x @ W / matmul(x, W) is recorded as a
        call of a pseudo-layer (_MatmulUse) that owns W (and b): the Linear rule then takes it
        from the recorded call, instead of a per-layer vmap(grad) of the whole module. Returns
        that pseudo-layer, or None for any other op (the module keeps the use)."""
        if not self.stack or kwargs:
            return None
        owner = self.stack[-1]
        if self.has_rule.get(owner):
            return None  # the owner's own rule reads it (nn.Linear's forward calls F.linear)
        if func is F.linear and len(args) in (2, 3):
            x, w, b, transposed = args[0], args[1], args[2] if len(args) == 3 else None, False
        elif func in _MATMULS and len(args) == 2:
            x, w, b, transposed = args[0], args[1], None, True
        elif func is torch.addmm and len(args) == 3:
            b, x, w, transposed = args[0], args[1], args[2], True
        else:
            return None
        ids = self.param_ids
        if (
            not isinstance(out, torch.Tensor)
            or id(w) not in ids
            or w.dim() != 2
            or id(x) in ids
            or not isinstance(x, torch.Tensor)
            or (b is not None and (id(b) not in ids or b.dim() != 1))
            or not self.phys.front(x)[1]  # a shared input: the owner's per-layer vmap takes it
        ):
            return None
        key = (id(w), None if b is None else id(b), transposed)
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = _MatmulUse(w, b, transposed)
            self.has_rule[site] = True
        self.calls.setdefault(site, []).append(_Call(self.phys, (x,), {}, out))
        return site

    def _pre(self, module, args, kwargs):
        self.stack.append(module)
        ruled = self.has_rule.get(module)
        if ruled is None:
            ruled = self.has_rule[module] = _rule_for(module) is not None
        # a module without a rule may get a per-layer vmap(grad), which re-runs it: in training
        # mode it may draw (dropout), so the generator state at the call is kept to redraw
        self.rng.append(_rng_state(args) if module.training and not ruled else None)

    def _post(self, module, args, kwargs, output):
        self.stack.pop()
        rng = self.rng.pop()
        with torch._C.DisableTorchFunction():  # our own attribute reads are no uses (and slow)
            output = self._per_example_output(module, output)
            self.calls.setdefault(module, []).append(_Call(self.phys, args, kwargs, output, rng))
        return output

    def _per_example_output(self, module, output):
        """NOTE [Shared outputs of layers with a rule]: a layer whose input is shared by all
        examples (GPT-2's position embedding of the shared position ids, a Linear of a parameter
        table) has one output for all examples, and the backward gives only the sum of its
        examples' gradients there. Its per-example gradients are needed, so the output becomes a
        batched copy (one per example, same values) before anything uses it: the backward then
        gives one gradient per example, and the rule reads the shared input as repeated."""
        if (
            not isinstance(output, torch.Tensor)
            or not self.has_rule[module]  # set by _pre
            or not any(id(p) in self.param_ids for p in module._parameters.values() if p is not None)
            or not _physical_requires_grad(output)
            or self.phys.raw(output)[1] is not None
        ):
            return output
        copies = output.unsqueeze(0).expand(self.size, *output.shape).clone()
        return _C._add_batch_dim(copies, 0, self.phys.level)

    def __enter__(self):
        for m in self._holders():
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        return super().__enter__()

    def _holders(self):
        """The modules that hold a trainable parameter (their own or a submodule's, tied ones
        under every name): only their calls can be planned. An activation, a dropout or a frozen
        block is never a rule layer nor the owner a per-layer vmap(grad) is given, so it gets no
        hooks (a use inside it counts for its caller, which the plan would pick anyway), which
        saves two hook calls and a recorded call per module call (about a fifth of the fixed
        cost of an MLP's step)."""
        modules = dict(self.model.named_modules(remove_duplicate=False))
        marked = set()
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) not in self.param_ids:
                continue
            parts = name.split(".")[:-1]
            for k in range(len(parts) + 1):
                marked.add(".".join(parts[:k]))
        seen, out = set(), []
        for name, m in modules.items():
            if name in marked and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)


def _tensors(args, kwargs):
    for x in (*args, *kwargs.values()):
        if isinstance(x, (list, tuple)):
            yield from (y for y in x if isinstance(y, torch.Tensor))
        elif isinstance(x, torch.Tensor):
            yield x


# ------------------------------------------------------------------------------------------------
# per-layer rules. A contribution is ("inst", name, per-example gradients (B, *shape)) or
# ("ghost", name, squared norms (B,), finish(c, into=None) -> the clipped sum (added into `into`,
# in place, when given: NOTE [One buffer per tied weight])[, factors]).
#
# NOTE [Ghost norms of a weight used several times]
# A weight used by several calls (an output layer tied to the embedding, a module called twice)
# has per-example gradient G = sum_k G_k, and ||G||^2 = sum_k ||G_k||^2 + 2 sum_{k<l} <G_k, G_l>:
# the uses' own ghost norms do not add up. A matmul-like use has G_k = X_k^T Y_k per example, with
# X_k (T_k, rows) and Y_k (T_k, cols): a Linear's X = b (output gradient), Y = a (input); an
# Embedding's X = onehot(ids), Y = b. Its "factors" (X, Y) give the cross terms without forming
# any G: <X_k^T Y_k, X_l^T Y_l> = sum_{t,s} (X_k X_l^T)[t,s] (Y_k Y_l^T)[t,s], two T_k x T_l
# products per example, where X_k X_l^T of one-hot ids is a gather of the other's X at the ids
# (or id equality when both are ids). The clipped sum is the sum of the uses' finish(c). A use
# without factors (grouped convolutions, MultiheadAttention's in_proj blocks) or materialised by
# cost is materialised with every other use of that weight instead (exact, as before).


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

    def clipped_sum(c, into):
        if n > 1 and t > 1 and b.stride(0) != b.stride(1) * t:
            # b's examples and positions do not flatten into one matrix without a copy (the
            # logits' gradient when the loss reads them as (vocab, T): cross_entropy of
            # logits.transpose(1, 2)). A copy of the largest tensor of the step costs more than
            # one matmul per example accumulated in place, which reads b as it lies.
            aw = a * c[:, None, None]
            out = b[0].T @ aw[0] if into is None else into.addmm_(b[0].T, aw[0])
            for i in range(1, n):
                out.addmm_(b[i].T, aw[i])
            return out
        # one matmul over all examples and positions, scaling the thinner side
        a2, b2 = a.reshape(-1, d), b.reshape(-1, p)
        w = (c if t == 1 else c.repeat_interleave(t))[:, None]
        left, right = ((b2 * w).T, a2) if p <= d else (b2.T, a2 * w)
        return left @ right if into is None else into.addmm_(left, right)

    def finish(c, into=None):
        if a.dim() != 3:
            return _added(into, torch.einsum("bgtp,bgtd->gpd", b * c[:, None, None, None], a))
        if into is not None and into.shape != (p, d):
            return _added(into, clipped_sum(c, None))
        return clipped_sum(c, into)

    # per-example G = b^T a (NOTE [Ghost norms of a weight used several times])
    return ("ghost", name, sq, finish, (b, a) if a.dim() == 3 else None)


def _added(into, part):
    """part added into `into` in place (into, when given, is a clipped sum this step made)."""
    return part if into is None else into.add_(part.reshape(into.shape))


def _matmul_layer(a, b, policy, transposed, bias):
    """The rule of a layer out = a W^T + bias (W (p, d)), or out = a W + bias with transposed
    (W (d, p): transformers' Conv1D, x @ W)."""
    n = a.shape[0]
    a = a.reshape(n, -1, a.shape[-1])
    b = b.reshape(n, -1, b.shape[-1])
    if transposed:
        # _matmul_weight forms (its b)^T (its a): swapping the roles gives a^T b, (d, p)
        out = [_matmul_weight("weight", b, a, policy("weight", a.shape[1], a.shape[-1], b.shape[-1]))]
    else:
        out = [_matmul_weight("weight", a, b, policy("weight", a.shape[1], b.shape[-1], a.shape[-1]))]
    if bias:
        # one position (an MLP): the output gradient is the bias gradient, no reduction (a sum
        # over a dim of size 1 costs a zero-fill and a pass)
        out.append(("inst", "bias", b[:, 0] if b.shape[1] == 1 else b.sum(1)))
    return out


def _linear(module, call, a, b, policy):
    return _matmul_layer(a, b, policy, False, module.bias is not None)


def _hf_conv1d(module, call, a, b, policy):
    """transformers' Conv1D (GPT-2's projections): addmm(bias, x, W) with W (nx, nf), a Linear
    with the weight transposed: per-example gradient a^T b."""
    return _matmul_layer(a, b, policy, True, True)


class _MatmulUse(nn.Module):
    """A weight (and bias) that a module without a rule passes to F.linear, addmm or matmul
    (NOTE [Weights that enter through F.linear or matmul]): a layer of its own for the plan.
    Never called; its parameters are the module's, not copies."""

    def __init__(self, weight, bias, transposed):
        super().__init__()
        self._parameters["weight"] = weight
        self._parameters["bias"] = bias
        self.transposed = transposed

    def forward(self, x):  # pragma: no cover - the recording has its calls already
        raise RuntimeError("_MatmulUse is a record of calls, not a layer to call")


def _matmul_use(module, call, a, b, policy):
    return _matmul_layer(a, b, policy, module.transposed, module.bias is not None)


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _conv(module, call, a, b, policy):
    """Conv1d (as a 2-D conv of height 1) and Conv2d: the L output positions play the role of T;
    ghost norms from the unfolded input, per-example gradients by a grouped convolution."""
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
        _, name, sq, finish, factors = _matmul_weight("weight", a_t, b_t, "ghost")
        weight = (
            "ghost",
            name,
            sq,
            lambda c, into=None: finish(c, into).reshape(module.weight.shape),
            factors,
        )
    out = [weight]
    if module.bias is not None:
        out.append(("inst", "bias", b.reshape(n, b.shape[1], -1).sum(-1)))
    return out


def _embedding(module, call, ids, b, policy):
    n, vocab, dim = ids.shape[0], module.num_embeddings, module.embedding_dim
    ids = ids.reshape(n, -1)
    b = b.reshape(n, -1, dim)
    if module.padding_idx is not None:  # the padding row gets no gradient
        b = b * (ids != module.padding_idx).unsqueeze(-1).to(b.dtype)
    t = ids.shape[1]
    factors = (_Ids(ids, vocab), b)  # per-example G = onehot(ids)^T b
    if not _use_ghost(policy("weight", t, dim, vocab), t, dim, vocab):
        return [("inst", "weight", _materialize(factors, (vocab, dim)))]
    # ||G_i||^2 = sum over token pairs with equal ids of <b_it, b_is>
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(b.dtype)
    sq = (same * (b @ b.transpose(1, 2))).sum((1, 2))

    def finish(c, into=None):
        rows = (b * c[:, None, None]).reshape(-1, dim)
        out = b.new_zeros(vocab, dim) if into is None or into.shape != (vocab, dim) else into
        out.index_add_(0, ids.reshape(-1), rows)
        return out if out is into or into is None else _added(into, out)

    return [("ghost", "weight", sq, finish, factors)]


class _Ids:
    """The one-hot rows onehot(ids) (B, T, vocab) of an embedding's factors, never formed."""

    __slots__ = ("ids", "vocab")

    def __init__(self, ids, vocab):
        self.ids, self.vocab = ids, vocab


def _gram_rows(x1, x2):
    """X_1 X_2^T per example, (B, T1, T2), for dense (B, T, rows) or _Ids factors."""
    if isinstance(x1, _Ids) and isinstance(x2, _Ids):
        return x1.ids[:, :, None] == x2.ids[:, None, :]
    if isinstance(x2, _Ids):  # X_1[t, ids_2[s]]
        return x1.gather(2, x2.ids[:, None, :].expand(-1, x1.shape[1], -1))
    if isinstance(x1, _Ids):
        return _gram_rows(x2, x1).transpose(1, 2)
    return x1 @ x2.transpose(1, 2)


def _cross_sq(f1, f2):
    """<G_1, G_2> per example for two uses' factors (X, Y): G = X^T Y."""
    (x1, y1), (x2, y2) = f1, f2
    yy = y1 @ y2.transpose(1, 2)
    return (_gram_rows(x1, x2).to(yy.dtype) * yy).sum((1, 2))


def _materialize(factors, shape):
    """The per-example gradients X^T Y (B, *shape) of a use's factors."""
    x, y = factors
    n = y.shape[0]
    if isinstance(x, _Ids):
        offsets = (x.ids + torch.arange(n, device=y.device).unsqueeze(1) * x.vocab).reshape(-1)
        g = y.new_zeros(n * x.vocab, y.shape[-1]).index_add_(0, offsets, y.reshape(-1, y.shape[-1]))
        return g.reshape(n, *shape)
    return (x.transpose(1, 2) @ y).reshape(n, *shape)


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

    def rule(module, call, a, b, policy):
        return _affine(module, b, normalize(module, a), positions(module))

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


def _mha_inputs(module, call):
    """The attention call's arguments in the batch-first layout the rule computes with, or None
    where it cannot read them: query, key, value (B, T|S, E); masks as additive 4-D masks that
    broadcast over (B, heads, T, S); a function putting b (or the output) in the same layout."""
    bound = _MHA_SIGNATURE.bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    arg = bound.arguments
    leaves = tree_flatten((call.args, call.kwargs))[0]
    batched = {id(x) for x, b in zip(leaves, call.batched) if b}
    query, key, value = (arg[k] for k in ("query", "key", "value"))
    if not all(id(x) in batched for x in (query, key, value)):
        return None  # queries, keys or values shared by all examples: the per-layer vmap's
    example = 2 if not module.batch_first else 1  # where one example's batch of one lies

    def layout(t):
        if t.dim() == 3:  # one example seen unbatched, (T, E)
            return t
        return t.squeeze(example) if t.dim() == 4 and t.shape[example] == 1 else None

    q, k, v = (layout(x) for x in (query, key, value))
    if q is None or k is None or v is None:
        return None
    kpm = arg["key_padding_mask"]
    if kpm is not None:
        kpm = kpm.reshape(-1, 1, 1, kpm.shape[-1])  # (B or 1, S) rows: batched or shared
        if id(arg["key_padding_mask"]) in batched and kpm.shape[0] != q.shape[0]:
            return None
    mask = arg["attn_mask"]
    if mask is not None:
        lead = mask.shape[:-2] if id(mask) not in batched else mask.shape[1:-2]
        if len(lead) > 1 or (lead and lead[0] != module.num_heads):
            return None  # a batch of one with its heads merged is (heads, T, S); others: vmap
        heads = module.num_heads if lead else 1
        n = q.shape[0] if id(mask) in batched else 1
        mask = mask.reshape(n, heads, *mask.shape[-2:])
    return (query is key and key is value), q, k, v, kpm, mask, arg, layout


def _mha(module, call, a, b, policy):
    """nn.MultiheadAttention (packed in_proj, no bias_k/add_zero_attn, no attention dropout
    drawn), any layout: the attention is re-run from the recorded inputs to get the context
    (out_proj's input) and, by one batched backward of b through it, the gradients at q, k and
    v (in_proj's outputs); both projections are then matmul layers like Linear."""
    self_attention, query, key, value, kpm, mask, arg, _ = a  # _mha_inputs, from the plan
    n, t, e = query.shape
    heads, hd = module.num_heads, module.embed_dim // module.num_heads
    kpm = _float_mask(kpm, query.dtype)
    causal = arg["is_causal"] and kpm is None and not arg["need_weights"]
    mask = None if causal else _float_mask(mask, query.dtype)
    if kpm is not None:
        mask = kpm if mask is None else mask + kpm
    w = module.in_proj_weight.detach()
    bias = module.in_proj_bias.detach() if module.in_proj_bias is not None else None
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
        ctx = F.scaled_dot_product_attention(*split, attn_mask=mask, is_causal=causal)
        ctx = ctx.transpose(1, 2).reshape(n, t, e)
        grads = torch.autograd.grad(ctx, leaves, b @ module.out_proj.weight.detach())
    out = [_matmul_weight("out_proj.weight", ctx.detach(), b, policy("out_proj.weight", t, e, e))]
    if module.out_proj.bias is not None:
        out.append(("inst", "out_proj.bias", b.sum(1)))
    if self_attention:
        out.append(_matmul_weight("in_proj_weight", query, grads[0], policy("in_proj_weight", t, 3 * e, e)))
    else:  # three row blocks of one weight: squared norms add, the sums stack
        # one choice for the three blocks (their squared norms add only if all are ghosted): each
        # block deciding by its own length would split queries and keys of different lengths
        s_len = max(t, key.shape[1])
        choice = "ghost" if _use_ghost(policy("in_proj_weight", s_len, e, e), s_len, e, e) else "inst"
        parts = [_matmul_weight("in_proj_weight", x, g, choice) for x, g in zip((query, key, value), grads)]
        if parts[0][0] == "inst":
            out.append(("inst", "in_proj_weight", torch.cat([q[2] for q in parts], 1)))
        else:
            out.append(
                (
                    "ghost",
                    "in_proj_weight",
                    sum(q[2] for q in parts),
                    lambda c, into=None: _added(into, torch.cat([q[3](c) for q in parts])),
                )
            )
    if bias is not None:
        out.append(("inst", "in_proj_bias", torch.cat([g.sum(1) for g in grads], -1)))
    return out


# NOTE [Recurrent layers: the gates are Linear uses over the time steps]
# An RNN/GRU/LSTM layer computes, at every step t, gi_t = W_ih x_t + b_ih and gh_t = W_hh h_{t-1} +
# b_hh, then its gates from them. So W_ih is a Linear applied to the T inputs x_t and W_hh one
# applied to the T previous hidden states: each gets the Linear rule with T positions (ghost norms
# from T x T Grams, or per-example products by cost), once the per-step gradients d gi_t, d gh_t
# are known; the biases' per-example gradients are their sums over t. Those gradients come from
# re-running the layer from the recorded input (and h0), unrolled step by step with the gate
# pre-activations kept, and one batched backward of the recorded output gradients (of the output
# sequence and of h_n/c_n) through it, as Opacus' DPLSTM does by construction. gi and gh are kept
# apart because a GRU's candidate gate multiplies the hidden part by its reset gate. Supported:
# any number of layers, bidirectional, batch_first, h0/c0 given or not, tanh/relu RNNs; not:
# proj_size, packed sequences, dropout drawn between layers (those take the per-layer vmap).
def _rnn_cell(module, gi, gh, h, c):
    if isinstance(module, nn.LSTM):
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(module, nn.GRU):
        ri, zi, ni = gi.chunk(3, 1)
        rh, zh, nh = gh.chunk(3, 1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        return (1 - z) * n + z * h, None
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return act(gi + gh), None


def _rnn_inputs(module, call):
    """(x (B, T, D), h0 (B, L*dirs, H) or None, c0 or None, n_outputs) from the recorded call, or
    None where the layer does not run one sequence per example."""
    args = list(call.args) + list(call.kwargs.values())
    if not args or not isinstance(args[0], torch.Tensor) or not call.batched[0]:
        return None
    x = args[0]
    if x.dim() == 4:  # a batch of one per example
        axis = 1 if module.batch_first else 2
        if x.shape[axis] != 1:
            return None
        x = x.squeeze(axis)
    elif x.dim() != 3:  # (B, T, D): an unbatched sequence per example
        return None
    hx = args[1] if len(args) > 1 else None
    states = [] if hx is None else list(hx) if isinstance(hx, (tuple, list)) else [hx]
    out = []
    for st in states:
        if not isinstance(st, torch.Tensor):
            return None
        if st.dim() == 3:  # shared by all examples: (L*dirs, 1, H) or (L*dirs, H)
            st = st.unsqueeze(0).expand(x.shape[0], *st.shape)
        if st.dim() == 4:
            if st.shape[2] != 1:
                return None
            st = st.squeeze(2)
        out.append(st)
    h0 = out[0] if out else None
    c0 = out[1] if len(out) > 1 else None
    return x, h0, c0


def _rnn(module, call, a, bs, policy):
    """bs: the output gradients of the call, [output sequence, h_n(, c_n)], each None or with the
    examples along dim 0 (NOTE [Recurrent layers: the gates are Linear uses over the time steps])."""
    x, h0, c0 = a
    n, t_len = x.shape[0], x.shape[1]
    layers, dirs, hid = module.num_layers, 2 if module.bidirectional else 1, module.hidden_size
    lstm = isinstance(module, nn.LSTM)
    w = {name: getattr(module, name).detach() for name in module._flat_weights_names}
    inp = x
    gis, ghs, prevs, layer_inputs, finals_h, finals_c = {}, {}, {}, {}, [], []
    with torch.enable_grad():
        for layer in range(layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                k = layer * dirs + d
                gi = F.linear(inp, w["weight_ih" + sfx], w.get("bias_ih" + sfx))
                if not gi.requires_grad:
                    gi = gi.detach().requires_grad_()
                h = h0[:, k] if h0 is not None else x.new_zeros(n, hid)
                c = (c0[:, k] if c0 is not None else x.new_zeros(n, hid)) if lstm else None
                steps = range(t_len - 1, -1, -1) if d else range(t_len)
                hs, gh_t, prev_t = [None] * t_len, [None] * t_len, [None] * t_len
                for t in steps:
                    prev_t[t] = h
                    gh = F.linear(h, w["weight_hh" + sfx], w.get("bias_hh" + sfx))
                    if not gh.requires_grad:
                        gh = gh.detach().requires_grad_()
                    gh_t[t] = gh
                    h, c = _rnn_cell(module, gi[:, t], gh, h, c)
                    hs[t] = h
                gis[sfx], ghs[sfx], prevs[sfx], layer_inputs[sfx] = gi, gh_t, prev_t, inp
                finals_h.append(h)
                finals_c.append(c)
                outs.append(torch.stack(hs, 1))
            inp = outs[0] if dirs == 1 else torch.cat(outs, -1)
        produced = [inp, torch.stack(finals_h, 1)] + ([torch.stack(finals_c, 1)] if lstm else [])
        pairs = [(o, g.reshape(o.shape)) for o, g in zip(produced, bs) if g is not None]
        wanted = [gis[s] for s in gis] + [g for s in ghs for g in ghs[s]]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(wanted, grads)]
    out = []
    gi_grads = dict(zip(gis, grads[: len(gis)]))
    rest = grads[len(gis) :]
    for s in gis:
        d_i = gi_grads[s]
        d_h = torch.stack(rest[:t_len], 1)
        rest = rest[t_len:]
        a_ih, a_hh = layer_inputs[s].detach(), torch.stack(prevs[s], 1).detach()
        g, d_in = d_i.shape[-1], a_ih.shape[-1]
        out.append(_matmul_weight("weight_ih" + s, a_ih, d_i, policy("weight_ih" + s, t_len, g, d_in)))
        out.append(_matmul_weight("weight_hh" + s, a_hh, d_h, policy("weight_hh" + s, t_len, g, hid)))
        if module.bias:
            out.append(("inst", "bias_ih" + s, d_i.sum(1)))
            out.append(("inst", "bias_hh" + s, d_h.sum(1)))
    return out


def _rnn_supported(module):
    return (
        getattr(module, "proj_size", 0) == 0
        and not (module.training and module.dropout > 0 and module.num_layers > 1)
        and module.mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    )


def _mha_supported(module):
    return (
        module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and not (module.training and module.dropout > 0)  # dropout: the per-layer vmap redraws it
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
    nn.LSTM: _rnn,
    nn.GRU: _rnn,
    nn.RNN: _rnn,
    _MatmulUse: _matmul_use,
}
if hasattr(nn, "RMSNorm"):
    _RULES[nn.RMSNorm] = _rms_norm


def _input(call):
    """A layer's (first) input, with the examples along dim 0, and whether it is per-example."""
    return _flatten_call(call.args, call.kwargs)[0][0], call.batched[0]


def _same(module, t):
    """Layers that treat every leading dim as positions (Linear, Embedding, LayerNorm, RMSNorm):
    (B, *one example's shape) is read as it is."""
    return t


def _one_image(module, t):
    """Conv and channel-norm layers read (B, C, ...): one example is a batch of one (1, C, ...)
    or, for convolutions, one unbatched (C, ...) input; anything else (the batch of one
    reshaped into several images) goes to the per-layer vmap."""
    conv_rank = 3 if isinstance(module, nn.Conv1d) else 4 if isinstance(module, nn.Conv2d) else None
    if conv_rank is not None and t.dim() == conv_rank:
        return t
    if t.dim() >= 3 and t.shape[1] == 1 and (conv_rank is None or t.dim() == conv_rank + 1):
        return t.squeeze(1)
    return None


_LAYOUTS = {_conv: _one_image, _group_norm: _one_image, _batch_norm_eval: _one_image}


def _rule_inputs(module, rule, call):
    """(a, layout of b) in the layout the rule reads, or None where it cannot read this call
    (for attention, a is all of _mha_inputs' reading of the call)."""
    if call.outputs[0] is None or call.out_dims[0] is None:
        return None  # no gradient reaches the output, or the output is shared by all examples
    if rule is _mha:
        got = _mha_inputs(module, call)
        return None if got is None else (got, got[-1])
    if rule is _rnn:
        got = _rnn_inputs(module, call)
        return None if got is None else (got, None)
    a, batched = _input(call)
    out = call.front_output(0, call.outputs[0])
    if not batched:  # a shared input whose output was made per-example (NOTE [Shared outputs ...])
        if not isinstance(a, torch.Tensor):
            return None
        a = a.unsqueeze(0).expand(out.shape[0], *a.shape)
    layout = _LAYOUTS.get(rule, _same)
    a = layout(module, a)
    if a is None or layout(module, out) is None:
        return None
    return a, lambda t: layout(module, t)


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


def _add_library_rules():
    """Rules for layers of libraries that are imported (never imported here): transformers'
    Conv1D, the projections of GPT-2-style models."""
    pu = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pu, "Conv1D", None)
    if conv1d is not None and conv1d not in _RULES:
        _RULES[conv1d] = _hf_conv1d


def _rule_for(module):
    """The rule of a module whose forward is one of the standard layers' (subclasses that keep
    it, such as MultiheadAttention's out_proj, count), or None."""
    if type(module).__name__ == "Conv1D":
        _add_library_rules()
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
            if rule is _rnn and not _rnn_supported(module):
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
    owned = {}

    def owned_ids(module):
        if module not in owned:
            owned[module] = {id(q) for q in module.parameters()}
        return owned[module]

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
        # the per-layer vmap(grad) differentiates the module's own parameters: a parameter used
        # inside another module's call (a table passed to a Linear) goes to its owner
        while common and id(p) not in owned_ids(common[-1]):
            common = common[:-1]
        if not common:
            raise _Fallback("a parameter is used by module calls with no common caller")
        generic.setdefault(common[-1], []).append(id(p))
    return rule_params, generic


# ------------------------------------------------------------------------------------------------
# the step


_state = threading.local()


def last_fallback_reason():
    """Why the last ghost_clipped_grad of this thread handed the model to the vmap path (None if
    it did not): ft.dp.validate reports it."""
    return getattr(_state, "reason", None)


def last_plan():
    """([modules whose parameters a layer rule handled], [modules that got a per-layer
    vmap(grad)]) of the last ghost_clipped_grad of this thread that got as far as planning."""
    return getattr(_state, "plan", None)


def ghost_clipped_grad(model, loss_fn, inputs, targets, params, max_norm, size, force_ghost):
    """(grads, norms), or None when the caller must use the whole-model vmap path."""
    _state.reason = _state.plan = None
    try:
        return _ghost_clipped_grad(model, loss_fn, inputs, targets, params, max_norm, size, force_ghost)
    except _Fallback as e:
        _state.reason = str(e)
        return None


def _record(model, loss_fn, inputs, targets, recorder, size):
    """The per-example losses (B,) of the model run under vmap, one example at a time (a batch
    of one, as the vmap path runs it), with the recorder's hooks and mode active."""
    api = "clipped_grad_module"

    def one_example(x, y):
        recorder.phys.level = _C._top_level_id()
        x1, y1 = tree_map(lambda t: t.unsqueeze(0), (x, y))
        losses = loss_fn(model(*x1), y1)
        check_per_example_loss(losses, 1, api, batch_size=size)
        return losses.sum()

    recorder.size = size
    with recorder:
        return vmap(one_example, randomness="different")(_as_tuple(inputs), targets)


def _ghost_clipped_grad(model, loss_fn, inputs, targets, params, max_norm, size, force_ghost):
    recorder = _Recorder(model, params)
    losses = _record(model, loss_fn, inputs, targets, recorder, size)
    recorder.phys.memo.clear()  # the BatchedTensors it kept alive are dead now
    try:
        return _from_recording(recorder, losses, params, max_norm, size, force_ghost)
    except (KeyError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        # A structure this path did not foresee must cost speed, never a crash or an internal
        # error: the whole-model vmap path computes the same values (and re-raises a genuine
        # error of the model's own code, which the per-layer vmap(grad) may have hit first).
        raise _Fallback(f"the per-layer path failed ({type(e).__name__}: {e})") from e


def _from_recording(recorder, losses, params, max_norm, size, force_ghost):
    plan = _Plan(recorder, params)
    wanted = plan.wanted()
    got = (
        torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
        if wanted and losses.requires_grad
        else [None] * len(wanted)
    )
    return plan.finish(got, max_norm, size, force_ghost, losses)


class _Plan:
    """What the recording needs from the backward: which layers a rule handles, which get a
    per-layer vmap(grad), and the gradient edges (the module outputs' b, and the parameters the
    recording did not see, which must get none)."""

    def __init__(self, recorder, params):
        rules, prepared = {}, {}
        for m, calls in recorder.calls.items():
            rule = _rule_for(m)
            if rule is not None:
                got = [_rule_inputs(m, rule, c) for c in calls]
                if all(g is not None for g in got):
                    prepared.update((id(c), g) for c, g in zip(calls, got))
                else:
                    rule = None  # a call the rule cannot read: the per-layer vmap takes the layer
            rules[m] = rule
        rule_params, generic = _plan(recorder, params, rules)
        _state.plan = (
            [
                m
                for m, r in rules.items()
                if r is not None and any(id(q) in rule_params for q in _rule_parameters(m).values())
            ],
            list(generic),
        )
        self.recorder, self.params, self.rules, self.prepared = recorder, params, rules, prepared
        self.rule_params, self.generic = rule_params, generic
        self.rule_calls = [
            (m, c)
            for m, calls in recorder.calls.items()
            if rules[m] is not None and any(id(q) in rule_params for q in _rule_parameters(m).values())
            for c in calls
        ]
        self.generic_calls = [(m, c) for m in generic for c in recorder.calls.get(m, ())]
        used = set(rule_params) | {i for ids in generic.values() for i in ids}
        self.unseen = [p for p in params.values() if id(p) not in used]
        self.needed = [
            (c, k)
            for _, c in self.rule_calls + self.generic_calls
            for k, e in enumerate(c.edges)
            if e is not None
        ]

    def wanted(self):
        """The edges to ask the backward for (read them after the recording's in-place ops: an
        output modified in place is read through its base), then the unseen parameters.

        NOTE [What the backward keeps]: after this, the outputs of the calls a rule handles are
        released (their edges, versions and shapes are all that is needed), so that the backward
        does not run with every layer's output alive beside autograd's own saved tensors: a
        language model's logits, (B, T, vocab), are the largest tensor of the step. Calls of the
        per-layer vmap keep theirs (a redraw is checked against them)."""
        self.reads = [c.edge_for(k) for c, k in self.needed]
        self.stale = [c.outputs[k]._version != c.versions[k] for c, k in self.needed]
        for _, c in self.rule_calls:
            c.outputs = [None] * len(c.outputs)
        return [e for e, _ in self.reads] + self.unseen

    def finish(self, got, max_norm, size, force_ghost, like):
        """The clipped sums and norms from the backward's gradients at wanted()."""
        needed = self.needed
        if any(g is not None for g in got[len(needed) :]):
            raise _Fallback("a parameter is used where the recording did not see it")
        grads_at = {}
        for (c, k), (_, based), stale, g in zip(needed, self.reads, self.stale, got):
            if g is None and stale:
                raise _Fallback("a module output (a view) was modified in place")
            if g is not None and based is not None:
                g = _view_of_base_grad(g, based)
            grads_at[(id(c), k)] = None if g is None else c.front_output(k, g)
        for _, c in self.rule_calls + self.generic_calls:
            if c.inputs_changed():
                raise _Fallback("a module input was modified in place after the call")

        contributions = []
        with torch.no_grad():
            for module, call in self.rule_calls:
                contributions += _rule_contributions(
                    module,
                    self.rules[module],
                    call,
                    self.prepared[id(call)],
                    grads_at,
                    self.rule_params,
                    force_ghost,
                )
        for module, ids in self.generic.items():
            for call in self.recorder.calls.get(module, ()):
                contributions += _generic_contributions(module, ids, call, grads_at)

        with torch.no_grad():
            return _combine(contributions, self.params, max_norm, size, like)


def _output_grad(call, grads_at, k=0):
    g = grads_at.get((id(call), k))
    if g is None:
        shape, dtype, device = call.front_shapes[k]
        return torch.zeros(shape, dtype=dtype, device=device)
    return g


def _rule_contributions(module, rule, call, prepared, grads_at, rule_params, force_ghost):
    a, layout = prepared
    if rule is _rnn:  # the output sequence, h_n and c_n can all reach the loss
        b = [grads_at.get((id(call), k)) for k in range(len(call.outputs))]
    else:
        if any(grads_at.get((id(call), k)) is not None for k in range(1, len(call.outputs))):
            raise _Fallback("attention weights reach the loss")
        b = layout(_output_grad(call, grads_at))
    owned = _rule_parameters(module)

    def policy(name, t, p, d):
        pid = id(owned[name])
        if pid not in rule_params:
            return "inst"
        if rule_params[pid] > 1 and isinstance(module, nn.MultiheadAttention):
            return "inst"  # its in_proj blocks have no factors: materialise every use
        # a weight used several times gets cross terms (NOTE [Ghost norms of a weight used
        # several times]) or, where a use is materialised by cost, materialised uses in _combine
        return "ghost" if force_ghost else "auto"

    out = []
    for kind, name, *rest in rule(module, call, a, b, policy):
        pid = id(owned[name])
        if pid in rule_params:  # a parameter also used elsewhere is the per-layer vmap's
            out.append((kind, pid, *rest))
    return out


def _generic_contributions(module, ids, call, grads_at):
    """Per-example gradients of <module(a_i), b_i> w.r.t. the parameters `ids` (vmap(grad)), each
    argument and output with its exact example dim from the recording (dim 0, or shared)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    dims = [0 if b else None for b in call.batched]
    # outputs the loss does not depend on (an RNN's final state, often) contribute nothing
    outs = [k for k, t in enumerate(call.outputs) if grads_at.get((id(call), k)) is not None]
    if not outs:
        return []
    if any(call.out_dims[k] is None for k in outs):
        raise _Fallback("a module output shared by all examples reaches the loss")
    if not any(d == 0 for d in dims):
        raise _Fallback("a module call has no per-example argument")
    bs = [grads_at[(id(call), k)] for k in outs]
    names = {}
    for n, p in module.named_parameters():
        names.setdefault(id(p), (n, p))
    fixed = {n: p.detach() for n, p in names.values()}
    diff = {names[i][0]: fixed[names[i][0]] for i in ids}

    def one_example(diff_params, *flat):
        args, kwargs = tree_unflatten(list(flat[: len(leaves)]), spec)
        out, _ = tree_flatten(functional_call(module, {**fixed, **diff_params}, args, kwargs))
        total = sum((out[k] * b).sum() for k, b in zip(outs, flat[len(leaves) :]))
        return total, [out[k].detach() for k in outs]

    per_example = vmap(
        grad(one_example, has_aux=True), in_dims=(None, *dims, *([0] * len(bs))), randomness="different"
    )
    if call.rng is None:
        grads, _ = per_example(diff, *leaves, *bs)
    else:  # the module may draw: redraw what the recording drew, and check that it did
        with _replaying(call.rng):
            grads, outputs = per_example(diff, *leaves, *bs)
        for k, y in zip(outs, outputs):
            recorded = call.outputs[k]
            if recorded._version != call.versions[k]:
                raise _Fallback("a module output modified in place: its redraw cannot be checked")
            _check_redraw(call.front_output(k, recorded.detach()), y)
    return [("inst", i, grads[names[i][0]].detach()) for i in ids]


def _check_redraw(recorded, again):
    """A module re-run from the recorded generator state must reproduce its output (different
    random draws differ by O(1)); otherwise its per-example gradients would be another draw's."""
    if recorded.shape != again.shape or recorded.dtype != again.dtype:
        raise _Fallback("a module's re-run does not reproduce its output")
    if not recorded.is_floating_point():
        same = torch.equal(recorded, again)
    else:
        tol = 1e-3 if recorded.dtype in (torch.float16, torch.bfloat16) else 1e-5
        scale = float(recorded.abs().max()) if recorded.numel() else 0.0
        same = torch.allclose(again, recorded, rtol=tol, atol=tol * scale)
    if not same:
        raise _Fallback("a module's random draws could not be replayed")


def _combine(contributions, params, max_norm, size, losses):
    shapes = {id(p): (p.shape, p.dtype) for p in params.values()}
    by_param = {}
    for kind, pid, *rest in contributions:
        by_param.setdefault(pid, []).append((kind, *rest))
    inst, ghosts = {}, []
    for pid, uses in by_param.items():
        shape = shapes[pid][0]
        factored = all(len(u) > 3 and u[3] is not None for u in uses)
        if all(u[0] == "ghost" for u in uses) and (len(uses) == 1 or factored):
            sq = sum(u[1] for u in uses)
            for k in range(len(uses)):  # NOTE [Ghost norms of a weight used several times]
                for l in range(k + 1, len(uses)):
                    sq = sq + 2 * _cross_sq(uses[k][3], uses[l][3])
            ghosts.append((pid, sq, [u[2] for u in uses]))
            continue
        for u in uses:  # materialise every use and sum them (a tied weight with an unfactored use)
            if u[0] == "inst":
                g = u[1].reshape(size, *shape)
            elif len(u) > 3 and u[3] is not None:
                g = _materialize(u[3], shape)
            else:
                raise _Fallback(
                    "a weight used several times has a use whose per-example gradient the rule cannot form"
                )
            inst[pid] = g if pid not in inst else inst[pid] + g
    parts = [per_example_sq_norms(g) for g in inst.values()] + [sq for _, sq, _ in ghosts]
    dtype = losses.dtype
    norms = (
        sum(q if q.dtype == dtype else q.to(dtype) for q in parts) if parts else losses.new_zeros(size)
    ).sqrt()
    c = clip_factors(norms, max_norm)
    factors = {dtype: c}  # in each parameter's dtype, converted once
    sums = {pid: weighted_sum(c, g) for pid, g in inst.items()}
    for pid, _, finishes in ghosts:
        cd = factors.setdefault(shapes[pid][1], c.to(shapes[pid][1]))
        # NOTE [One buffer per tied weight]: the uses of a weight used several times (GPT-2's
        # wte and lm_head) add their clipped sums into the first use's, in place, so the weight
        # holds one buffer of its size (vocab x d), not one per use plus their sum.
        total = None
        for finish in finishes:
            total = finish(cd, into=total)
        sums[pid] = total.reshape(shapes[pid][0])
    grads = {
        n: sums[id(p)].reshape(p.shape) if id(p) in sums else torch.zeros_like(p) for n, p in params.items()
    }
    return grads, norms
