"""Tensors made from nothing: zeros, ones, full, arange, and random ones drawn on the device.

`zeros`, `ones` and `full` fill on the device (elementwise.fill_u32 writes the value's 32 bits);
`rand` and `randn` draw from a generator of mlmetal.random on the device, by default the
device's Philox stream that `mm.random.seed(n)` restarts; `arange` is computed on the host and
copied once, as it is small and its values exact there.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .ops import DTypeError, groups_for
from .random import Generator, Normal, Uniform, default_generator
from .runtime.device import Device
from .tensor import DTYPES, Tensor, _device, empty, tensor


def full(shape, value, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """A tensor of `shape` holding `value` everywhere (PyTorch's `full`, MLX's `full`).

    Args:
        shape: an int or a sequence of ints.
        value: a number the dtype holds (an integer within range for int32 and uint32).
        device: a Device, a backend name, or None for `mm.device()`.
        dtype: float32 (default), int32 or uint32.

    Example:
        >>> mm.full((2, 3), 0.5).numpy()[0]
        array([0.5, 0.5, 0.5], dtype=float32)
    """
    shape, dtype = _shape(shape), _dtype(dtype)
    bits = _bits(value, dtype)
    out = empty(shape, device, dtype)
    if out.size:
        fill = out.device.library("elementwise").kernel("fill_u32")
        cb = out.device.command_buffer()
        cb.dispatch(fill, groups=groups_for(out.size, 256), threads=256, args=[out, {"n": out.size, "value": bits}])
        cb.commit()
    return out


def zeros(shape, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """A tensor of zeros. Example: `mm.zeros((4, 3), device="cpu")`."""
    return full(shape, 0, device, dtype)


def ones(shape, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """A tensor of ones. Example: `mm.ones(5, dtype=np.int32)`."""
    return full(shape, 1, device, dtype)


def arange(start, stop=None, step=1, device: Device | str | None = None, dtype=None) -> Tensor:
    """Evenly spaced values in [start, stop), as np.arange: `arange(n)` is 0 … n−1.

    Args:
        start, stop, step: numbers; with `stop` None, `start` is the stop and 0 the start.
        device: a Device, a backend name, or None for `mm.device()`.
        dtype: None: int32 when start, stop and step are all integers, else float32.

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


def rand(shape, device: Device | str | None = None, generator: Generator | None = None) -> Tensor:
    """float32 numbers uniform in [0, 1), drawn on the device.

    Args:
        shape: an int or a sequence of ints.
        device: a Device, a backend name, or None for the generator's device or `mm.device()`.
        generator: an `mm.random.Philox` or `MTGP32` on that device; None: the device's default
            Philox stream (`mm.random.seed(n)` restarts it).

    Example:
        >>> mm.random.seed(0)
        >>> noise = mm.rand((64, 100))
    """
    return _draw(shape, device, generator, Uniform(0.0, 1.0))


def randn(shape, device: Device | str | None = None, generator: Generator | None = None) -> Tensor:
    """float32 numbers of the standard normal distribution, drawn on the device; see `rand`.

    Example:
        >>> z = mm.randn((64, 100), generator=mm.random.Philox(mm.device(), seed=7))
    """
    return _draw(shape, device, generator, Normal(0.0, 1.0))


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
    """The 32 bits of `value` as `dtype`; DTypeError unless the dtype holds it (NaN and ±inf are float32's)."""
    holds = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if holds and dtype.kind == "f":
        holds = not math.isfinite(value) or abs(value) <= float(np.finfo(dtype).max)
    elif holds:
        holds = math.isfinite(value) and float(value).is_integer() and \
            np.iinfo(dtype).min <= value <= np.iinfo(dtype).max
    if not holds:
        raise DTypeError(f"{value!r} is not a value of {dtype}")
    return int(np.array(value, dtype).view(np.uint32))


def _shape(shape) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    if not isinstance(dims, (tuple, list)) or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0 for n in dims):
        raise ValueError(f"shape must be an int or a sequence of non-negative ints, got {shape!r}")
    return tuple(int(n) for n in dims)


def _dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise DTypeError(f"dtype {dtype} is not one mlmetal stores ({', '.join(map(str, DTYPES))})")
    return dtype
