"""ft.rearrange: einops.rearrange with torch ops, as torch.func.rearrange (its patterns, its
ValueErrors). Made of view/permute/reshape only, so it works on the tensors of every transform."""

import functools
import keyword

import torch

_ELLIPSIS = "..."


class DimensionBindError(ValueError):
    """The sizes of a pattern's axes do not fit the tensor's shape (torch.func.rearrange raises
    an exception of this name too)."""


def _parse_side(side, what):
    """The groups of one side of a pattern: a list of lists of axis names; "1" is an axis of
    size 1 with no name, "..." the ellipsis (one at most)."""
    groups, current, names = [], None, []
    tokens = side.replace("(", " ( ").replace(")", " ) ").split()
    for tok in tokens:
        if tok == "(":
            if current is not None:
                raise ValueError(f"rearrange: nested parentheses in the {what} of the pattern")
            current = []
        elif tok == ")":
            if current is None:
                raise ValueError(f"rearrange: unmatched ')' in the {what} of the pattern")
            groups.append(current)
            current = None
        else:
            if tok == _ELLIPSIS:
                if _ELLIPSIS in names:
                    raise ValueError("rearrange: expression may contain dots only inside ellipsis (...)")
            elif tok == "1":
                tok = None
            elif tok.isdigit():
                raise ValueError(f"rearrange only supports unnamed axes of size 1, got {tok} in {side!r}")
            elif not (tok.isidentifier() and not keyword.iskeyword(tok)) or tok.startswith("_"):
                raise ValueError(f"rearrange: invalid axis identifier {tok!r} in the pattern")
            elif tok in names:
                raise ValueError(f"Indexing expression contains duplicate dimension '{tok}'")
            if tok is not None:
                names.append(tok)
            if current is not None:
                current.append(tok)
            else:  # an ungrouped "..." stays a str: its dims stay separate dims
                groups.append(tok if tok == _ELLIPSIS else [tok])
    if current is not None:
        raise ValueError(f"rearrange: unmatched '(' in the {what} of the pattern")
    return [g if g == _ELLIPSIS else [n for n in g if n is not None] for g in groups], names


@functools.lru_cache(maxsize=256)
def _plan(ndim, pattern, lengths):
    if pattern.count("->") != 1:
        raise ValueError(f"rearrange: the pattern must have one '->', got {pattern!r}")
    left_s, right_s = pattern.split("->")
    left, left_names = _parse_side(left_s, "left side")
    right, right_names = _parse_side(right_s, "right side")
    only = set(left_names) ^ set(right_names)
    if only:
        raise ValueError(f"Identifiers only on one side of rearrange expression (should be on both): {only}")
    if any(_ELLIPSIS in g for g in left if g != _ELLIPSIS):
        raise ValueError("rearrange: the ellipsis (...) cannot be inside parentheses on the left side")
    n_fixed = len(left) - (1 if _ELLIPSIS in left_names else 0)
    if (_ELLIPSIS in left_names and ndim < n_fixed) or (_ELLIPSIS not in left_names and ndim != len(left)):
        raise ValueError(
            f"Number of dimensions in pattern ({n_fixed}) must be equal to the number of "
            f"dimensions in the tensor ({ndim})"
        )
    dots = [f"...{i}" for i in range(ndim - n_fixed)]

    def expand(groups):
        out = []
        for g in groups:
            if g == _ELLIPSIS:
                out.extend([d] for d in dots)
            else:
                out.append([d for n in g for d in (dots if n == _ELLIPSIS else [n])])
        return out

    for name, _ in lengths:
        if name not in left_names:
            raise ValueError(f"rearrange: axis {name!r} of axes_lengths is not in the pattern")
    return expand(left), expand(right), dict(lengths)


def rearrange(tensor, pattern, **axes_lengths):
    """Reorders, groups and splits the dims of `tensor` as `pattern` says (einops notation), e.g.
    rearrange(images, "b h w c -> b c h w") or "b (h1 h) w c -> (b h1) h w c" with h1=2. A list
    or tuple of tensors is stacked first (along a new leading dim).

    Example:
        >>> import torch, functorch_lite as ft
        >>> ft.rearrange(torch.zeros(2, 5, 7, 3), "b h w c -> b c h w").shape
        torch.Size([2, 3, 5, 7])
        >>> ft.rearrange(torch.zeros(2, 6, 3), "b (h1 h) c -> (b h1) h c", h1=2).shape
        torch.Size([4, 3, 3])
    """
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.stack(tensor)
    left, right, known = _plan(tensor.ndim, pattern, tuple(sorted(axes_lengths.items())))
    sizes = dict(known)
    for dim, group in enumerate(left):
        size = tensor.shape[dim]
        unknown = [n for n in group if n not in sizes]
        if len(unknown) > 1:
            raise DimensionBindError(
                f"rearrange: cannot infer the sizes of two dimensions at once: {', '.join(unknown)}"
            )
        product = 1
        for n in group:
            if n in sizes:
                product *= sizes[n]
        if unknown:
            if product == 0 or size % product:
                raise DimensionBindError(
                    f"rearrange: inferred dimension does not evenly fit into larger dimension: "
                    f"dim {dim} has length {size}, not a multiple of {product}"
                )
            sizes[unknown[0]] = size // product
        elif product != size:
            raise DimensionBindError(
                f"rearrange: the pattern gives length {product} to dim {dim} of a tensor of shape "
                f"{tuple(tensor.shape)}"
            )
    elementary = [n for g in left for n in g]
    out = tensor.reshape([sizes[n] for n in elementary])
    order = [n for g in right for n in g]
    out = out.permute([elementary.index(n) for n in order])
    shape = []
    for g in right:
        size = 1
        for n in g:
            size *= sizes[n]
        shape.append(size)
    return out.reshape(shape)
