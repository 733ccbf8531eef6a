"""Moving data between layouts (kernels/layout.metal): concatenating and slicing along the
channels (dim 1 of (N, C, ...)), permuting axes, strided slices and broadcasts.

`concat` is the registry's one op with a variable number of inputs: its check, encode,
reference and gradient rule take `*inputs`, like any op's, and only the public entry point
`mm.ops.concat([a, b, ...])` takes a list. Likewise `mm.ops.slice_channels(x, start, stop)`
takes its attributes positionally. Both replace the `*inputs, **attrs` entries `register` made.

Tensors are contiguous buffers (and a graph gives every node's output a buffer of its own), so
`transpose`, `strided_slice` and `broadcast_to` copy, each through one strided read (`gather`);
`permute`, `flatten`, `squeeze` and `unsqueeze` are functions over `transpose` and `reshape`.

Every op here takes float32, float16 and bfloat16 tensors and moves their values bit for bit.
"""

import math
import numbers
import sys

from .. import dtypes as D
from ..reference import layout as R
from ..tensor import Tensor
from . import apply, ensure, groups_for, register
from .broadcast import MAX_DIMS, broadcast_shape, broadcast_strides, contiguous_strides, merge_axes, padded, sum_to


def _copy(cb, src, dst, channels, src_offset, dst_offset):
    """dst[:, dst_offset:dst_offset+channels] = src[:, src_offset:src_offset+channels]."""
    inner = math.prod(src.shape[2:])
    lib = src.device.library("layout")
    if inner * src.dtype.itemsize % 16 == 0:  # whole 16-byte words a channel (tensors start at their buffer's start)
        inner, k = inner * src.dtype.itemsize // 16, lib.kernel("copy_channel_words")
    else:
        k = lib.kernel(D.kernel_name("copy_channels", src.dtype))
    count = src.shape[0] * channels * inner
    p = {"count": count, "channels": channels, "inner": inner, "src_channels": src.shape[1], "src_offset": src_offset,
         "dst_channels": dst.shape[1], "dst_offset": dst_offset}
    cb.dispatch(k, groups=groups_for(count, 256), threads=256, args=[src, dst, p])


# ---------------------------------------------------------------- concat

def _concat_check(*shapes):
    """out = the inputs side by side along dim 1."""
    ensure(len(shapes) >= 1, "concat", "needs at least one tensor")
    first = shapes[0]
    for s in shapes:
        ensure(len(s) >= 2, "concat", f"expected (N, C, ...) tensors, got shape {s}")
        ensure(s[:1] + s[2:] == first[:1] + first[2:], "concat",
               f"shapes {first} and {s} differ outside the channel dimension")
    return first[:1] + (sum(s[1] for s in shapes),) + first[2:], {}


def _concat_encode(cb, out, *inputs):
    offset = 0
    for x in inputs:
        _copy(cb, x, out, x.shape[1], 0, offset)
        offset += x.shape[1]


def _concat_grad(g, out, *inputs):
    starts = [0]
    for x in inputs:
        starts.append(starts[-1] + x.shape[1])
    return tuple(apply("slice_channels", g, start=a, stop=b) for a, b in zip(starts, starts[1:]))


register("concat", check=_concat_check, encode=_concat_encode, reference=R.concat, grad=_concat_grad,
         kernels=["layout.copy_channels", "layout.copy_channel_words"], dtypes=D.FLOATS)


def concat(tensors, /):
    """Concatenate tensors along the channels (dim 1), e.g. a U-Net's skip connection.

    Args:
        tensors: a list of (N, C_i, ...) tensors equal in every other dimension.

    Example:
        >>> y = mm.ops.concat([a, b])  # (N, Ca + Cb, H, W)
    """
    if isinstance(tensors, Tensor):
        raise TypeError("concat takes a list of tensors: mm.ops.concat([a, b])")
    return apply("concat", *tensors)


sys.modules[__package__].concat = concat


# ---------------------------------------------------------------- slice

def _slice_check(x, start, stop):
    """Channels start … stop−1 of an (N, C, ...) tensor (a copy).

    Args:
        x: (N, C, ...).
        start, stop: 0 ≤ start < stop ≤ C.

    Example:
        >>> rgb = mm.ops.slice_channels(x, 0, 3)
    """
    ensure(len(x) >= 2, "slice_channels", f"expected an (N, C, ...) tensor, got shape {x}")
    ensure(all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (start, stop)), "slice_channels",
           f"start and stop must be integers, got {start!r}, {stop!r}")
    ensure(0 <= start < stop <= x[1], "slice_channels",
           f"channels {start}:{stop} are not a non-empty range within the {x[1]} channels")
    return x[:1] + (stop - start,) + x[2:], {"start": int(start), "stop": int(stop)}


def _slice_encode(cb, out, x, start, stop):
    _copy(cb, x, out, stop - start, start, 0)


register("slice_channels", check=_slice_check, encode=_slice_encode, reference=R.slice_channels,
         grad=lambda g, out, x, start, stop: (apply("slice_channels_grad", g, channels=x.shape[1], start=start),),
         kernels=["layout.copy_channels", "layout.copy_channel_words"], dtypes=D.FLOATS)



def _slice_grad_check(g, channels, start):
    """dL/dx of slice_channels: `g` placed at channels start… of a zero tensor of `channels` channels."""
    ensure(len(g) >= 2, "slice_channels_grad", f"expected an (N, C, ...) gradient, got shape {g}")
    ensure(0 <= start and start + g[1] <= channels, "slice_channels_grad",
           f"{g[1]} channels from {start} do not fit in {channels}")
    return g[:1] + (channels,) + g[2:], {"channels": channels, "start": start}


def _slice_grad_encode(cb, out, g, channels, start):
    p = {"count": out.size, "channels": channels, "inner": math.prod(out.shape[2:]), "g_channels": g.shape[1],
         "start": start}
    k = out.device.library("layout").kernel(D.kernel_name("slice_channels_grad", g.dtype))
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[g, out, p])


register("slice_channels_grad", check=_slice_grad_check, encode=_slice_grad_encode, reference=R.slice_channels_grad,
         grad=None, kernels=["layout.slice_channels_grad"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- strided copies

def _gather(cb, out, x, strides, offset=0):
    """out[i] = x[offset + Σ i_d·strides_d] over out's axes (dispatches layout.gather)."""
    merged, (merged_strides,) = merge_axes(out.shape, strides)
    p = {"n": out.size, "dims": len(merged), "src_size": x.size, "offset": offset, "shape": padded(merged),
         "stride": padded(merged_strides)}
    k = out.device.library("layout").kernel(D.kernel_name("gather", x.dtype))
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[x, out, p])


def _fits_kernels(op, shape):
    ensure(len([n for n in shape if n != 1]) <= MAX_DIMS, op,
           f"{shape} has more than {MAX_DIMS} axes longer than 1; the kernels take at most {MAX_DIMS}")
    ensure(math.prod(shape) < 2**31, op, f"tensors of 2^31 elements or more are not supported, got {shape}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _axis(op, ndim, a, what="axis") -> int:
    """Axis `a` of a tensor of `ndim` axes (negative counting from the end), checked."""
    ensure(_is_int(a) and -ndim <= a < ndim, op, f"{what} {a!r} is not an axis of a tensor of {ndim} axes")
    return int(a) % ndim


# ---------------------------------------------------------------- broadcast_to

def _broadcast_to_check(x, shape):
    """x repeated along the axes it broadcasts over to `shape`, by NumPy's rules (a copy).

    Example:
        >>> mm.ops.broadcast_to(b, shape=(4, 3)).shape   # b (3,) or (1, 3) or (4, 1)
        (4, 3)
    """
    ensure(isinstance(shape, (tuple, list)) and all(_is_int(n) and n >= 1 for n in shape), "broadcast_to",
           f"shape must be a sequence of positive ints, got {shape!r}")
    shape = tuple(int(n) for n in shape)
    ensure(len(x) <= len(shape) and broadcast_shape("broadcast_to", x, shape) == shape, "broadcast_to",
           f"cannot broadcast {x} to {shape}")
    _fits_kernels("broadcast_to", shape)
    return shape, {"shape": shape}


register("broadcast_to", check=_broadcast_to_check,
         encode=lambda cb, out, x, shape: _gather(cb, out, x, broadcast_strides(x.shape, shape)),
         reference=R.broadcast_to, grad=lambda g, out, x, shape: (sum_to(g, x.shape),), kernels=["layout.gather"],
         dtypes=D.FLOATS)


# ---------------------------------------------------------------- transpose

def _transpose_check(x, perm=None):
    """x with its axes permuted: out.shape[d] = x.shape[perm[d]] (a copy), as NumPy's transpose.

    Args:
        x: any shape.
        perm: a permutation of 0 … ndim−1 (negative count from the end); None reverses the axes.

    Example:
        >>> mm.ops.transpose(x, perm=(0, 2, 3, 1)).shape   # NCHW -> NHWC
        (N, H, W, C)
    """
    perm = tuple(range(len(x)))[::-1] if perm is None else perm
    ensure(isinstance(perm, (tuple, list)) and len(perm) == len(x), "transpose",
           f"perm must list each of the {len(x)} axes of {x} once, got {perm!r}")
    perm = tuple(_axis("transpose", len(x), a, "perm entry") for a in perm)
    ensure(sorted(perm) == list(range(len(x))), "transpose", f"perm {perm} is not a permutation of the axes of {x}")
    _fits_kernels("transpose", x)
    return tuple(x[a] for a in perm), {"perm": perm}


def _transpose_encode(cb, out, x, perm):
    strides = contiguous_strides(x.shape)
    _gather(cb, out, x, [strides[a] for a in perm])


def _transpose_grad(g, out, x, perm):
    inverse = tuple(sorted(range(len(perm)), key=lambda d: perm[d]))
    return (apply("transpose", g, perm=inverse),)


register("transpose", check=_transpose_check, encode=_transpose_encode, reference=R.transpose,
         grad=_transpose_grad, kernels=["layout.gather"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- strided_slice

def _per_axis(op, x, values, what):
    values = () if values is None else tuple(values)
    ensure(len(values) <= len(x), op, f"{what} has {len(values)} entries for the {len(x)} axes of {x}")
    ensure(all(v is None or _is_int(v) for v in values), op, f"{what} entries must be ints or None, got {values!r}")
    return values + (None,) * (len(x) - len(values))


def _slice_of(shape, start, stop, step, drop):
    """The (start, step, count) a strided_slice takes along each axis of `shape` (normalised attributes)."""
    out = []
    for d, n in enumerate(shape):
        if d in drop:
            out.append((start[d], 1, 1))
        else:
            s = slice(start[d], stop[d], step[d]).indices(n)
            out.append((s[0], s[2], len(range(*s))))
    return out


def _strided_slice_check(x, start=None, stop=None, step=None, drop=()):
    """Basic slicing, x[a:b:c, i, ...] as Python and NumPy read it, as one op (a copy).

    Args:
        x: any shape.
        start, stop, step: per leading axis (the rest taken whole), each an int or None, read
            as a Python slice: negative indices count from the end, bounds are clipped to the
            axis, a negative step walks it backwards.
        drop: axes indexed by an integer (x[:, 3]): its index is `start` there; stop and step
            stay None; the axis is removed.

    Example:
        >>> y = mm.ops.strided_slice(x, start=(None, 2), stop=(None, 5), step=(None, None, 2))  # x[:, 2:5, ::2]
        >>> row = mm.ops.strided_slice(x, start=(3,), drop=(0,))                                  # x[3]
    """
    op = "strided_slice"
    start, stop, step = (_per_axis(op, x, v, what) for v, what in ((start, "start"), (stop, "stop"), (step, "step")))
    ensure(isinstance(drop, (tuple, list)), op, f"drop must be a sequence of axes, got {drop!r}")
    drop = tuple(sorted(_axis(op, len(x), a, "drop axis") for a in drop))
    ensure(len(set(drop)) == len(drop), op, f"drop {drop} names an axis twice")
    starts, stops, steps = list(start), list(stop), list(step)
    for d, n in enumerate(x):
        if d in drop:
            ensure(stop[d] is None and step[d] is None, op,
                   f"axis {d} is indexed by an integer (drop): its index is start[{d}]; stop and step must be None")
            ensure(start[d] is not None, op, f"axis {d} is indexed by an integer (drop): give its index as start[{d}]")
            ensure(-n <= start[d] < n, op, f"index {start[d]} is out of range for axis {d} of size {n}")
            starts[d] = int(start[d]) % n
        else:
            ensure(step[d] != 0, op, f"step of axis {d} is 0")
            a, b, c = slice(start[d], stop[d], step[d]).indices(n)
            ensure(len(range(a, b, c)) > 0, op, f"slice {start[d]}:{stop[d]}:{step[d]} of axis {d} (size {n}) is empty")
            # stop as it reads again the same way: −1 (before index 0, walking backwards) is None
            starts[d], stops[d], steps[d] = a, (b if b >= 0 else None), c
    attrs = {"start": tuple(starts), "stop": tuple(stops), "step": tuple(steps), "drop": drop}
    shape = tuple(count for d, (_, _, count) in enumerate(_slice_of(x, starts, stops, steps, drop)) if d not in drop)
    _fits_kernels(op, x)
    return shape, attrs


def _strided_slice_encode(cb, out, x, start, stop, step, drop):
    taken = _slice_of(x.shape, start, stop, step, drop)
    strides = contiguous_strides(x.shape)
    offset = sum(a * s for (a, _, _), s in zip(taken, strides))
    _gather(cb, out, x, [c * s for d, ((_, c, _), s) in enumerate(zip(taken, strides)) if d not in drop], offset)


def _strided_slice_grad(g, out, x, start, stop, step, drop):
    return (apply("strided_slice_grad", g, shape=x.shape, start=start, stop=stop, step=step, drop=drop),)


register("strided_slice", check=_strided_slice_check, encode=_strided_slice_encode, reference=R.strided_slice,
         grad=_strided_slice_grad, kernels=["layout.gather"], dtypes=D.FLOATS)


def _strided_slice_grad_check(g, shape, start, stop, step, drop):
    """dL/dx of strided_slice given dL/dout `g`: g in the slice of a zero tensor of x's `shape`."""
    op = "strided_slice_grad"
    out, attrs = _strided_slice_check(tuple(shape), start, stop, step, drop)
    ensure(tuple(g) == out, op, f"the gradient is {g}; the slice of {tuple(shape)} is {out}")
    return tuple(shape), dict(attrs, shape=tuple(shape))


def _strided_slice_grad_encode(cb, dx, g, shape, start, stop, step, drop):
    taken = _slice_of(shape, start, stop, step, drop)
    g_strides = iter(contiguous_strides(g.shape))
    g_stride = [0 if d in drop else next(g_strides) for d in range(len(shape))]
    axes = [d for d, n in enumerate(shape) if n != 1]  # a size-1 axis is taken whole (start 0)
    p = {"n": dx.size, "dims": len(axes), "g_size": g.size, "shape": padded(shape[d] for d in axes),
         "start": padded(taken[d][0] for d in axes), "step": padded(taken[d][1] for d in axes),
         "count": padded(taken[d][2] for d in axes), "g_stride": padded(g_stride[d] for d in axes)}
    k = dx.device.library("layout").kernel(D.kernel_name("strided_slice_grad", g.dtype))
    cb.dispatch(k, groups=groups_for(dx.size, 256), threads=256, args=[g, dx, p])


register("strided_slice_grad", check=_strided_slice_grad_check, encode=_strided_slice_grad_encode,
         reference=R.strided_slice_grad, grad=None, kernels=["layout.strided_slice_grad"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- functions over transpose and reshape

def permute(x, perm, /):
    """x with its axes permuted (PyTorch's name for `transpose` with a permutation).

    Example:
        >>> mm.ops.permute(x, (0, 2, 3, 1)).shape   # NCHW -> NHWC
    """
    return apply("transpose", x, perm=perm)


def flatten(x, /, start_axis=0, end_axis=-1):
    """x with axes start_axis … end_axis merged into one (a copy, through `reshape`).

    Example:
        >>> mm.ops.flatten(x, start_axis=1).shape   # (N, C, H, W) -> (N, C·H·W)
    """
    shape = tuple(x.shape)
    if not shape:
        return apply("reshape", x, shape=(1,))
    a, b = _axis("flatten", len(shape), start_axis, "start_axis"), _axis("flatten", len(shape), end_axis, "end_axis")
    ensure(a <= b, "flatten", f"start_axis {start_axis} comes after end_axis {end_axis} in {shape}")
    return apply("reshape", x, shape=shape[:a] + (math.prod(shape[a:b + 1]),) + shape[b + 1:])


def squeeze(x, /, axis=None):
    """x without its size-1 axes: all of them (axis=None), or those named, which must have size 1.

    Example:
        >>> mm.ops.squeeze(x, axis=1).shape   # (N, 1, D) -> (N, D)
    """
    shape = tuple(x.shape)
    if axis is None:
        axes = {d for d, n in enumerate(shape) if n == 1}
    else:
        axes = {_axis("squeeze", len(shape), a) for a in ((axis,) if _is_int(axis) else axis)}
        ensure(all(shape[d] == 1 for d in axes), "squeeze", f"axes {sorted(axes)} of {shape} are not all of size 1")
    return apply("reshape", x, shape=tuple(n for d, n in enumerate(shape) if d not in axes))


def unsqueeze(x, /, axis):
    """x with a size-1 axis inserted at `axis` (−1: last), as PyTorch's unsqueeze (MLX's expand_dims).

    Example:
        >>> mm.ops.unsqueeze(b, 1).shape   # (C,) -> (C, 1)
    """
    shape = tuple(x.shape)
    d = _axis("unsqueeze", len(shape) + 1, axis)
    return apply("reshape", x, shape=shape[:d] + (1,) + shape[d:])


for _f in (permute, flatten, squeeze, unsqueeze):
    setattr(sys.modules[__package__], _f.__name__, _f)
