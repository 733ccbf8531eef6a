"""Moving data between layouts (kernels/layout.metal): concatenating and slicing along the
channels (dim 1 of (N, C, ...)), and broadcasts.

`concat` is the registry's one op with a variable number of inputs: its check, encode,
reference and gradient rule take `*inputs`, like any op's, and only the public entry point
`mm.ops.concat([a, b, ...])` takes a list. Likewise `mm.ops.slice_channels(x, start, stop)`
takes its attributes positionally. Both replace the `*inputs, **attrs` entries `register` made.

Tensors are contiguous buffers (and a graph gives every node's output a buffer of its own), so
`broadcast_to` copies, through one strided read (`gather`).
"""

import math
import numbers
import sys

from ..reference import layout as R
from ..tensor import Tensor
from . import apply, ensure, groups_for, register
from .broadcast import MAX_DIMS, broadcast_shape, broadcast_strides, merge_axes, padded, sum_to


def _copy(cb, src, dst, channels, src_offset, dst_offset):
    """dst[:, dst_offset:dst_offset+channels] = src[:, src_offset:src_offset+channels]."""
    inner = math.prod(src.shape[2:])
    count = src.shape[0] * channels * inner
    p = {"count": count, "channels": channels, "inner": inner, "src_channels": src.shape[1], "src_offset": src_offset,
         "dst_channels": dst.shape[1], "dst_offset": dst_offset}
    k = src.device.library("layout").kernel("copy_channels")
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
         kernels=["layout.copy_channels"])


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
         kernels=["layout.copy_channels"])



def _slice_grad_check(g, channels, start):
    """dL/dx of slice_channels: `g` placed at channels start… of a zero tensor of `channels` channels."""
    ensure(len(g) >= 2, "slice_channels_grad", f"expected an (N, C, ...) gradient, got shape {g}")
    ensure(0 <= start and start + g[1] <= channels, "slice_channels_grad",
           f"{g[1]} channels from {start} do not fit in {channels}")
    return g[:1] + (channels,) + g[2:], {"channels": channels, "start": start}


def _slice_grad_encode(cb, out, g, channels, start):
    fill = out.device.library("elementwise").kernel("fill_u32")
    cb.dispatch(fill, groups=groups_for(out.size, 256), threads=256, args=[out, {"n": out.size, "value": 0}])
    _copy(cb, g, out, g.shape[1], 0, start)


register("slice_channels_grad", check=_slice_grad_check, encode=_slice_grad_encode, reference=R.slice_channels_grad,
         grad=None, kernels=["elementwise.fill_u32", "layout.copy_channels"])


# ---------------------------------------------------------------- strided copies

def _gather(cb, out, x, strides, offset=0):
    """out[i] = x[offset + Σ i_d·strides_d] over out's axes (dispatches layout.gather)."""
    merged, (merged_strides,) = merge_axes(out.shape, strides)
    p = {"n": out.size, "dims": len(merged), "src_size": x.size, "offset": offset, "shape": padded(merged),
         "stride": padded(merged_strides)}
    k = out.device.library("layout").kernel("gather")
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[x, out, p])


def _fits_kernels(op, shape):
    ensure(len([n for n in shape if n != 1]) <= MAX_DIMS, op,
           f"{shape} has more than {MAX_DIMS} axes longer than 1; the kernels take at most {MAX_DIMS}")
    ensure(math.prod(shape) < 2**31, op, f"tensors of 2^31 elements or more are not supported, got {shape}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


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
         reference=R.broadcast_to, grad=lambda g, out, x, shape: (sum_to(g, x.shape),), kernels=["layout.gather"])
