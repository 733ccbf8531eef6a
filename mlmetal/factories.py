"""Tensors made from nothing: zeros, ones, full, arange, and random ones drawn on the device.

`zeros`, `ones` and `full` fill on the device (elementwise.fill_u32 writes the value's 32 bits;
for float16 and bfloat16, two copies of the value's 16 bits a word); `rand` and `randn` draw
from a generator of mlmetal.random on the device, by default the device's Philox stream that
`mm.random.seed(n)` restarts, in float32, and round to float16 or bfloat16 when asked; `arange`
is computed on the host and copied once, as it is small and its values exact there.

Every factory takes `dtype=` as `mm.tensor` does: a NumPy dtype, `mm.float16`, `mm.bfloat16`, or
a name ("bfloat16").
"""

from __future__ import annotations

import math
import numbers

import ml_dtypes
import numpy as np

from . import dtypes as D
from . import ops
from .ops import DTypeError, groups_for
from .random import Generator, Normal, Uniform, default_generator
from .runtime.device import Device
from .tensor import DTYPES, Tensor, _device, empty, tensor


def full(shape, value, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """A tensor of `shape` holding `value` everywhere (PyTorch's `full`, MLX's `full`).

    Args:
        shape: an int or a sequence of ints.
        value: a number the dtype holds (an integer within range for int32 and uint32; a float
            within the dtype's finite range, or ±inf or NaN, rounded to the dtype as NumPy rounds).
        device: a Device, a backend name, or None for `mm.device()`.
        dtype: float32 (default), float16, bfloat16, int32 or uint32.

    Example:
        >>> mm.full((2, 3), 0.5).numpy()[0]
        array([0.5, 0.5, 0.5], dtype=float32)
        >>> mm.full(3, 0.1, dtype=mm.bfloat16).numpy().astype(np.float32)   # 0.1 rounded to bfloat16
        array([0.10009766, 0.10009766, 0.10009766], dtype=float32)
    """
    shape, dtype = _shape(shape), _dtype(dtype)
    bits = _bits(value, dtype)
    n = math.prod(shape)
    words = -(-n * dtype.itemsize // 4)  # a 2-byte type fills two elements a word (the last word's tail is padding)
    dev = _device(device)
    out = Tensor(dev.buffer(nbytes=4 * max(words, 1)), shape, dtype)
    if words:
        fill = dev.library("elementwise").kernel("fill_u32")
        cb = dev.command_buffer()
        cb.dispatch(fill, groups=groups_for(words, 256), threads=256, args=[out, {"n": words, "value": bits}])
        cb.commit()
    return out


def zeros(shape, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """A tensor of zeros. Example: `mm.zeros((4, 3), device="cpu")`, `mm.zeros(8, dtype=mm.bfloat16)`."""
    return full(shape, 0, device, dtype)


def ones(shape, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """A tensor of ones. Example: `mm.ones(5, dtype=np.int32)`."""
    return full(shape, 1, device, dtype)


def arange(start, stop=None, step=1, device: Device | str | None = None, dtype=None) -> Tensor:
    """Evenly spaced values in [start, stop), as np.arange: `arange(n)` is 0 … n−1.

    Args:
        start, stop, step: numbers; with `stop` None, `start` is the stop and 0 the start.
        device: a Device, a backend name, or None for `mm.device()`.
        dtype: None: int32 when start, stop and step are all integers, else float32; or any
            dtype mlmetal stores (the values are computed in float64 and rounded to it once).

    Example:
        >>> mm.arange(0, 1, 0.25).numpy()
        array([0.  , 0.25, 0.5 , 0.75], dtype=float32)
    """
    if stop is None:
        start, stop = 0, start
    ends = (start, stop, step)
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in ends):
        raise TypeError(f"arange: start, stop and step must be numbers, got {ends}")
    if step == 0:
        raise ValueError("arange: step must not be 0")
    integral = all(isinstance(v, numbers.Integral) for v in ends)
    dtype = _dtype(dtype if dtype is not None else np.int32 if integral else np.float32)
    values = np.arange(start, stop, step, dtype=np.int64 if integral else np.float64)
    return tensor(values, device, dtype)


def rand(shape, device: Device | str | None = None, generator: Generator | None = None, dtype=np.float32) -> Tensor:
    """Numbers uniform in [0, 1), drawn on the device.

    float16 and bfloat16 numbers are the float32 ones rounded to nearest even, except that those
    that would round up to 1 take the type's largest number below 1 (so each step of the type's
    grid in [0.5, 1) is equally likely, and 1 never appears).

    Args:
        shape: an int or a sequence of ints.
        device: a Device, a backend name, or None for the generator's device or `mm.device()`.
        generator: an `mm.random.Philox` or `MTGP32` on that device; None: the device's default
            Philox stream (`mm.random.seed(n)` restarts it).
        dtype: float32 (default), float16 or bfloat16.

    Example:
        >>> mm.random.seed(0)
        >>> noise = mm.rand((64, 100))
        >>> half_noise = mm.rand((64, 100), dtype=mm.float16)
    """
    dtype = _float_dtype(dtype)
    out = _draw(shape, device, generator, Uniform(0.0, 1.0))
    if dtype == np.float32:
        return out
    # the largest float32 that rounds (to nearest even) below 1 in the type: just under the midpoint 1 - 2^-(nmant+2)
    below = np.nextafter(np.float32(1 - 2.0 ** -(ml_dtypes.finfo(dtype).nmant + 2)), np.float32(0))
    return ops.clamp(out, max=float(below)).astype(dtype)


def randn(shape, device: Device | str | None = None, generator: Generator | None = None, dtype=np.float32) -> Tensor:
    """Numbers of the standard normal distribution, drawn on the device (in float32, then rounded to
    float16 or bfloat16 when `dtype` is one); see `rand`.

    Example:
        >>> z = mm.randn((64, 100), generator=mm.random.Philox(mm.device(), seed=7))
    """
    dtype = _float_dtype(dtype)
    out = _draw(shape, device, generator, Normal(0.0, 1.0))
    return out if dtype == np.float32 else out.astype(dtype)


def _draw(shape, device, generator, distribution) -> Tensor:
    shape = _shape(shape)
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator must be an mm.random.Philox or MTGP32, got {type(generator).__name__}")
    dev = _device(device if device is not None or generator is None else generator.device)
    generator = generator or default_generator(dev)
    if generator.device is not dev:
        raise ValueError(f"the generator draws on {generator.device.name}, the tensor is asked on {dev.name}")
    out = empty(shape, dev)
    cb = dev.command_buffer()
    generator.encode(cb, out, distribution)
    cb.commit()
    return out


def _bits(value, dtype: np.dtype) -> int:
    """The 32 bits of `value` as `dtype` (a 2-byte type's 16 bits twice); DTypeError unless the dtype holds
    it (NaN and ±inf are the floating types')."""
    holds = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if holds and D.is_float(dtype):
        holds = not math.isfinite(value) or abs(value) <= float(ml_dtypes.finfo(dtype).max)
    elif holds:
        holds = math.isfinite(value) and float(value).is_integer() and \
            np.iinfo(dtype).min <= value <= np.iinfo(dtype).max
    if not holds:
        raise DTypeError(f"{value!r} is not a value of {dtype}")
    if dtype.itemsize == 2:  # float16, bfloat16: the value's 16 bits twice, for two elements a word
        half = int(np.array([value], dtype).view(np.uint16)[0])
        return half | half << 16
    return int(np.array(value, dtype).view(np.uint32))


def _shape(shape) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    if not isinstance(dims, (tuple, list)) or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in dims):
        raise ValueError(f"shape must be an int or a sequence of non-negative ints, got {shape!r}")
    return tuple(int(n) for n in dims)


def _float_dtype(dtype) -> np.dtype:
    """`dtype`, checked to be one of the floating types random numbers are drawn as."""
    dtype = _dtype(dtype)
    if dtype not in D.FLOATS:
        raise DTypeError(f"random numbers are drawn as {', '.join(map(str, D.FLOATS))}, not {dtype}")
    return dtype


def _dtype(dtype) -> np.dtype:
    try:
        dtype = D.as_dtype(dtype)
    except TypeError as e:
        raise DTypeError(str(e)) from None
    if dtype not in DTYPES:
        raise DTypeError(f"dtype {dtype} is not one mlmetal stores ({', '.join(map(str, DTYPES))})")
    return dtype
