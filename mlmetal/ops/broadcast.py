"""Shapes and strides for the ops that broadcast, reduce and rearrange tensors.

Tensors are contiguous: a buffer and a shape. A kernel reads an input in another order through
strides over the output's axes — 0 along an axis the input is broadcast over, negative along a
reversed slice — with size-1 axes dropped and neighbours merged wherever every input steps
through them as through one axis, so that few axes remain (at most MAX_DIMS).
"""

import math

from . import apply, ensure

MAX_DIMS = 8  # the kernels' shape and stride arrays


def contiguous_strides(shape) -> tuple[int, ...]:
    """Row-major strides, in elements, of a tensor of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def broadcast_shape(op: str, *shapes) -> tuple[int, ...]:
    """The shape NumPy's rules broadcast `shapes` to; ShapeError naming them when they do not broadcast."""
    ndim = max(map(len, shapes))
    out = []
    for sizes in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes]):
        kinds = set(sizes) - {1}
        ensure(len(kinds) <= 1, op, f"shapes {' and '.join(map(str, shapes))} do not broadcast")
        out.append(kinds.pop() if kinds else 1)
    ensure(math.prod(out) < 2**31, op, f"the result {tuple(out)} has 2^31 elements or more")
    return tuple(out)


def broadcast_strides(shape, out) -> tuple[int, ...]:
    """The strides of a tensor of `shape` read along the axes of `out`, which it broadcasts to:
    0 where it has fewer axes or size 1."""
    lead = len(out) - len(shape)
    own = contiguous_strides(shape)
    return tuple(0 if d < lead or shape[d - lead] == 1 else own[d - lead] for d in range(len(out)))


def merge_axes(shape, *strides) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """`shape` and each list of `strides` along it with size-1 axes dropped and each axis merged
    into the one before it where every list steps over it as over the inner part of that axis."""
    merged, out = [], [[] for _ in strides]
    for d, n in enumerate(shape):
        if n == 1:
            continue
        if merged and all(o[-1] == s[d] * n for o, s in zip(out, strides)):
            merged[-1] *= n
            for o, s in zip(out, strides):
                o[-1] = s[d]
        else:
            merged.append(n)
            for o, s in zip(out, strides):
                o.append(s[d])
    return tuple(merged), [tuple(o) for o in out]


def padded(values, n: int = MAX_DIMS, fill: int = 0) -> list[int]:
    """`values` filled out to a kernel array of `n` entries."""
    values = list(values)
    return values + [fill] * (n - len(values))


def sum_to(g, shape):
    """`g` summed over the axes along which a tensor of `shape` was broadcast to g's shape: the
    gradient of that tensor (g itself when nothing was broadcast)."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = len(g.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(lead + d for d, n in enumerate(shape) if n == 1 and g.shape[lead + d] != 1)
    summed = apply("sum", g, axis=axes, keepdims=True) if axes else g
    return summed if tuple(summed.shape) == shape else apply("reshape", summed, shape=shape)
