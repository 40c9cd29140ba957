"""as_strided and the ops that share its batching rule under vmap (csrc/vmap/rules_views.cpp,
NOTE [as_strided under vmap]): as_strided, as_strided_copy, as_strided_ and as_strided_scatter.

Under vmap each batch element is a tensor of its own: storage_offset is that of element 0's view,
and every element's view starts as far from its element as element 0's does from element 0. So
the for-loop that vmap must equal computes each element's offset from its own storage offset:
x[i].as_strided(size, stride, x[i].storage_offset() + k) for the vmapped
x.as_strided(size, stride, x.storage_offset() + k). A view that would leave the memory range of
its element (start before it, or reach past its last position) must raise a RuntimeError, as in
torch.func, even where the for-loop would read some other memory without complaint.

Inputs: contiguous, with a nonzero storage offset (a slice of a larger tensor), strided (every
other column of a larger tensor, so an element's range has gaps), and permuted; the batch dim at
0, -1 and a middle dim (and None for as_strided_scatter's arguments in turn). Compared with the
for-loop and with torch.func.vmap, under ft.set_vmap_fallback('error').
"""

import pytest
import torch
import torch.func as tf
from conftest import outcome, vmap_fallback
from test_vmap import B, assert_same, with_batch

import functorch_lite as ft

SHAPE = (4, 5)  # logical shape of one element


def physical(layout, in_dim):
    """A [B] batch of SHAPE at in_dim, laid out as `layout` says."""
    full = with_batch(SHAPE, in_dim)
    if layout == "contiguous":
        return torch.randn(full)
    if layout == "offset":
        return torch.randn((2, *full))[1]
    if layout == "strided":
        return torch.randn((*full[:-1], 2 * full[-1]))[..., 1::2]
    if layout == "permuted":
        return torch.randn(tuple(reversed(full))).permute(*reversed(range(len(full))))
    raise AssertionError(layout)


LAYOUTS = ["contiguous", "offset", "strided", "permuted"]
IN_DIMS = [0, -1, 1]


def element_geometry(x, in_dim):
    """(sizes, strides, storage offset) of element 0 of the physical batch x."""
    d = in_dim % x.dim()
    sizes = [s for i, s in enumerate(x.shape) if i != d]
    strides = [s for i, s in enumerate(x.stride()) if i != d]
    return sizes, strides, x.storage_offset()


# Views of one element, from its sizes and strides: name -> (size, stride, k), the view starting
# k positions after the element's own storage offset (k=None: as_strided's default offset).
def views(sizes, strides):
    (r, c), (sr, sc) = sizes, strides
    last = (r - 1) * sr + (c - 1) * sc
    return {
        "transpose": ((c, r), (sc, sr), 0),
        "default_offset": ((c,), (sc,), None),
        "row_1": ((c,), (sc,), sr),
        "last_position": ((1,), (1,), last),
        "raw_run": ((3,), (1,), 1),
        "rows_flat": ((r * c,), (1,), 0),
        "empty_far_away": ((0,), (1,), 10_000),
        "before_start": ((c,), (sc,), -1),
        "past_end": ((c,), (sc,), last - (c - 1) * sc + 1),
        "negative_offset": ((2,), (1,), -(10**6)),
        "negative_stride": ((c,), (-sc,), last),
        "size_stride_mismatch": ((2, 2), (1,), 0),
    }


def in_element(size, stride, k, sizes, strides):
    """Whether the view stays inside the element's memory range, which as_strided under vmap
    requires (None: as_strided itself refuses the arguments)."""
    if len(size) != len(stride) or any(s < 0 for s in stride):
        return None
    if 0 in size:
        return True
    k = 0 if k is None else k
    last = sum((n - 1) * s for n, s in zip(sizes, strides))
    return k >= 0 and k + sum((n - 1) * s for n, s in zip(size, stride)) <= last


def loop(fn, xs, in_dim, *others):
    """vmap's definition, each element's offset taken from its own storage offset."""
    rows = []
    for i in range(B):
        xi = xs.select(in_dim, i)
        rows.append(fn(xi, xi.storage_offset(), *[o if d is None else o.select(d, i) for o, d in others]))
    return torch.stack(rows)


OPS = {
    "as_strided": lambda t, base, size, stride, k: t.as_strided(
        size, stride, None if k is None else base + k
    ),
    "as_strided_copy": lambda t, base, size, stride, k: torch.as_strided_copy(
        t, size, stride, None if k is None else base + k
    ),
}


def _params():
    for layout in LAYOUTS:
        for in_dim in IN_DIMS:
            x = physical(layout, in_dim)
            sizes, strides, _ = element_geometry(x, in_dim)
            for view in views(sizes, strides):
                yield pytest.param(layout, in_dim, view, id=f"{layout}-in_dim{in_dim}-{view}")


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("layout, in_dim, view", list(_params()))
def test_as_strided_stays_in_each_element(op, layout, in_dim, view):
    x = physical(layout, in_dim)
    sizes, strides, first = element_geometry(x, in_dim)
    size, stride, k = views(sizes, strides)[view]
    fn = OPS[op]
    valid = in_element(size, stride, k, sizes, strides)

    def vmapped(lib):
        return lib.vmap(lambda t: fn(t, first, size, stride, k), in_dims=in_dim)(x)

    with vmap_fallback("error"):
        actual, ft_exc = outcome(lambda: vmapped(ft))
    torch_func, tf_exc = outcome(lambda: vmapped(tf))
    if not valid:
        assert isinstance(ft_exc, RuntimeError), f"{view}: expected a RuntimeError, got {actual!r}"
        assert isinstance(tf_exc, RuntimeError), f"torch.func: {tf_exc!r}"
        if valid is False:
            assert "as_strided" in str(ft_exc) and "INTERNAL ASSERT" not in str(ft_exc), ft_exc
        return
    assert ft_exc is None, ft_exc
    expected = loop(lambda xi, base, *_: fn(xi, base, size, stride, k), x, in_dim)
    assert_same(actual, expected, what="ft.vmap vs for-loop")
    assert tf_exc is None, tf_exc
    assert_same(actual, torch_func, what="ft.vmap vs torch.func.vmap")


def test_the_reported_case_raises():
    """A view before each element's memory: element 0 would read the previous batch's data."""
    base = torch.arange(30.0).reshape(2, 5, 3)
    x = base[1]
    with pytest.raises(RuntimeError, match="storage_offset"):
        ft.vmap(lambda t: t.as_strided([3], [1], 14))(x)
    with pytest.raises(RuntimeError):
        tf.vmap(lambda t: t.as_strided([3], [1], 14))(x)
    # inside each element: the same as torch.func and the for-loop
    expected = torch.stack([x[i].as_strided([3], [1], x[i].storage_offset()) for i in range(5)])
    with vmap_fallback("error"):
        assert_same(ft.vmap(lambda t: t.as_strided([3], [1], 15))(x), expected)
    assert_same(tf.vmap(lambda t: t.as_strided([3], [1], 15))(x), expected)


@pytest.mark.parametrize("layout, in_dim, view", list(_params()))
def test_as_strided_inplace(layout, in_dim, view):
    """as_strided_ restrides a contiguous copy of each element (the for-loop's x[i].clone())."""
    x = physical(layout, in_dim)
    sizes, strides, _ = element_geometry(x, in_dim)
    contiguous = [SHAPE[1], 1]  # strides of the copy, whose offset is 0
    size, stride, k = views(sizes, contiguous)[view]
    valid = in_element(size, stride, k, SHAPE, contiguous)

    def fn(t):
        return t.clone(memory_format=torch.contiguous_format).as_strided_(size, stride, k)

    with vmap_fallback("error"):
        actual, ft_exc = outcome(lambda: ft.vmap(fn, in_dims=in_dim)(x))
    if not valid:
        assert isinstance(ft_exc, RuntimeError), f"{view}: expected a RuntimeError, got {actual!r}"
        return
    assert ft_exc is None, ft_exc
    assert_same(actual, loop(lambda xi, *_: fn(xi), x, in_dim), what="ft.vmap vs for-loop")
    # torch.func.vmap's as_strided_ leaves the element as it was (no restriding), unlike the loop


def _scatter_params():
    for layout in LAYOUTS:
        for in_dim in IN_DIMS:
            x = physical(layout, in_dim)
            sizes, strides, _ = element_geometry(x, in_dim)
            for view in views(sizes, strides):
                for placement in ("both", "self_unbatched", "src_unbatched"):
                    yield pytest.param(
                        layout, in_dim, view, placement, id=f"{layout}-in_dim{in_dim}-{view}-{placement}"
                    )


@pytest.mark.parametrize("layout, in_dim, view, placement", list(_scatter_params()))
def test_as_strided_scatter(layout, in_dim, view, placement):
    """as_strided_scatter writes src into the view of each element: only that element's memory.
    (torch.func.vmap has no rule for it and refuses it.)"""
    x = physical(layout, in_dim)
    sizes, strides, first = element_geometry(x, in_dim)
    size, stride, k = views(sizes, strides)[view]
    valid = in_element(size, stride, k, sizes, strides)
    if placement == "self_unbatched":
        x = x.select(in_dim, 0)
    src_shape = tuple(size) if len(size) == len(stride) else (2, 2)
    src = torch.randn(src_shape if placement == "src_unbatched" else (B, *src_shape))
    x_dim = None if placement == "self_unbatched" else in_dim
    src_dim = None if placement == "src_unbatched" else 0

    def fn(t, s, base):
        return torch.as_strided_scatter(t, s, size, stride, None if k is None else base + k)

    with vmap_fallback("error"):
        actual, ft_exc = outcome(
            lambda: ft.vmap(lambda t, s: fn(t, s, first), in_dims=(x_dim, src_dim))(x, src)
        )
    if not valid:
        assert isinstance(ft_exc, RuntimeError), f"{view}: expected a RuntimeError, got {actual!r}"
        return
    assert ft_exc is None, ft_exc
    rows = []
    for i in range(B):
        xi = x if x_dim is None else x.select(x_dim, i)
        si = src if src_dim is None else src[i]
        rows.append(fn(xi, si, xi.storage_offset()))
    assert_same(actual, torch.stack(rows), what="ft.vmap vs for-loop")


def test_forward_ad_views_of_batched_tangents_stay_valid():
    """jacfwd of view ops goes through as_strided on batched tangents (NOTE [Tangent layouts
    under vmap]): those views stay inside each element and keep working."""
    base = torch.randn(2, 5, 3, dtype=torch.float64)
    x = base[1]  # nonzero storage offset

    def f(t):
        return t[1:, ::2].transpose(0, 1).sin() * t.as_strided((2, 2), (1, 3), t.storage_offset() + 1).sum()

    with vmap_fallback("error"):
        got = ft.jacfwd(f)(x)
    torch.testing.assert_close(got, tf.jacfwd(f)(x))
    torch.testing.assert_close(ft.jacrev(f)(x), got)
