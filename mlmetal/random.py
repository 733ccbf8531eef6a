"""Random numbers made on the device: Philox4x32-10 and MTGP32 (DESIGN §5).

A generator writes the next numbers of its stream into a device buffer or tensor, in place,
from kernels/random.metal; nothing crosses to the host. Its stream continues across calls:
two calls of n numbers write what one call of 2n would have. The generator counts the numbers
it has handed out (`position`) and advances it when it *encodes*, so command buffers holding
draws of one generator must be committed in the order they were encoded.

- `Philox` is counter-based: its whole state is (seed, position), passed to every dispatch.
- `MTGP32` keeps `states` generators of 351 words each in a device buffer, born there by a
  seeding kernel; state b uses MTGP parameter set b (mtgp32dc_params_fast_11213, shipped in
  mlmetal/data with its licence) and seed (seed + b + 1).

Example:
    >>> import mlmetal as mm, mlmetal.random
    >>> dev = mm.device("cpu")
    >>> gen = mm.random.Philox(dev, seed=7)
    >>> out = dev.buffer(nbytes=4 * 1000)
    >>> cb = dev.command_buffer()
    >>> gen.encode(cb, out, mm.random.Normal(mean=0, std=0.02), n=1000)
    >>> cb.commit(); cb.wait()
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .data import mtgp32_params
from .runtime import Buffer

__all__ = ["UInt32", "Uniform", "Normal", "Philox", "MTGP32", "seed", "default_generator"]

# Distribution codes of kernels/random.metal (its enum RANDOM_*).
_UINT32, _UNIFORM, _NORMAL = 0, 1, 2

_MAX_N = 2**32 - 4096  # kernels index the output with 32-bit unsigned integers


# ---------------------------------------------------------------- distributions

@dataclasses.dataclass(frozen=True)
class UInt32:
    """The raw 32-bit words of the stream (uint32 output).

    Example:
        >>> gen.encode(cb, out, mm.random.UInt32())
    """

    dtype = np.dtype(np.uint32)

    def _constants(self) -> tuple[int, float, float]:
        return _UINT32, 0.0, 0.0


@dataclasses.dataclass(frozen=True)
class Uniform:
    """float32 numbers in [min, max): t = (x >> 9) · 2⁻²³ from each word, then fma(max − min, t, min).

    `max − min` is rounded to float32 once; for ranges whose ends are not float32 steps apart,
    that rounding can make the largest outputs equal `max`.

    Args:
        min: lower end (inclusive).
        max: upper end (exclusive); must be greater than min.

    Example:
        >>> gen.encode(cb, weights, mm.random.Uniform(-0.1, 0.1))
    """

    min: float = 0.0
    max: float = 1.0
    dtype = np.dtype(np.float32)

    def __post_init__(self):
        _check_number("Uniform min", self.min)
        _check_number("Uniform max", self.max)
        if not self.min < self.max:
            raise ValueError(f"Uniform needs min < max, got min={self.min}, max={self.max}")
        scale = float(np.float32(self.max)) - float(np.float32(self.min))
        if not 0 < scale < float(np.finfo(np.float32).max):
            raise ValueError(f"Uniform range [{self.min}, {self.max}) is empty or overflows in float32")

    def _constants(self) -> tuple[int, float, float]:
        return _UNIFORM, float(np.float32(self.min)), float(np.float32(self.max) - np.float32(self.min))


@dataclasses.dataclass(frozen=True)
class Normal:
    """float32 normal numbers, by Box–Muller on word pairs (2j, 2j+1) of the stream.

    Element 2j is r·cos θ and element 2j+1 is r·sin θ, with r = √(−2 ln u1),
    u1 = ((x₀ >> 8) + 1)·2⁻²⁴ ∈ (0, 1] and θ = 2π (x₁ >> 8)·2⁻²⁴; then fma(std, z, mean).

    Args:
        mean: the mean.
        std: the standard deviation; must be positive.

    Example:
        >>> gen.encode(cb, latent, mm.random.Normal(0, 1))
    """

    mean: float = 0.0
    std: float = 1.0
    dtype = np.dtype(np.float32)

    def __post_init__(self):
        _check_number("Normal mean", self.mean)
        _check_number("Normal std", self.std)
        if not self.std > 0:
            raise ValueError(f"Normal needs std > 0, got std={self.std}")

    def _constants(self) -> tuple[int, float, float]:
        return _NORMAL, float(self.mean), float(self.std)


def _check_number(what: str, v) -> None:
    """Raise unless v is a finite real number."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {v!r}")
    if not math.isfinite(v) or abs(v) > float(np.finfo(np.float32).max):
        raise ValueError(f"{what} must be finite in float32, got {v}")


# ---------------------------------------------------------------- generators

class Generator:
    """What Philox and MTGP32 share: seed, stream position, argument checks, convenience draws."""

    def __init__(self, device, seed: int):
        _check_seed(seed)
        self.device = device
        self.seed = int(seed)
        self.position = 0  # numbers of the stream handed out so far
        self._library = device.library("random")

    def encode(self, cb, out, distribution=None, *, n: int | None = None) -> None:
        """Encode into `cb` the writing of the stream's next numbers into `out`.

        Everything is checked before anything is encoded; the stream position advances now.

        Args:
            cb: a command buffer of the generator's device.
            out: a device buffer, or a tensor (anything with `.buffer` and `.shape` or `.size`).
            distribution: `UInt32()` (the default), `Uniform(min, max)` or `Normal(mean, std)`.
            n: how many numbers; default: the tensor's size, or the buffer's bytes // 4.

        Example:
            >>> gen.encode(cb, out, mm.random.Uniform(0, 1))
        """
        distribution = UInt32() if distribution is None else distribution
        if not isinstance(distribution, (UInt32, Uniform, Normal)):
            raise TypeError(f"distribution must be mm.random.UInt32(), Uniform() or Normal(), got {distribution!r}")
        buf, count = _destination(out, distribution, n)
        if buf.device is not self.device:
            raise ValueError(f"output lives on {buf.device.name}, the generator on {self.device.name}")
        self._check_room(count)
        if count:
            self._encode(cb, buf, count, distribution)
        self.position += count

    def uint32(self, shape) -> np.ndarray:
        """The next numbers as a host uint32 array of `shape` (draws, commits and waits)."""
        return self._draw(shape, UInt32())

    def uniform(self, shape, min: float = 0.0, max: float = 1.0) -> np.ndarray:
        """The next numbers as a host float32 array of `shape`, uniform in [min, max)."""
        return self._draw(shape, Uniform(min, max))

    def normal(self, shape, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
        """The next numbers as a host float32 array of `shape`, normal(mean, std)."""
        return self._draw(shape, Normal(mean, std))

    def _draw(self, shape, distribution) -> np.ndarray:
        """Encode into a fresh buffer, run it, and copy it to the host."""
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        n = math.prod(shape)
        if n == 0:
            return np.zeros(shape, distribution.dtype)
        out = self.device.buffer(nbytes=4 * n)
        cb = self.device.command_buffer()
        self.encode(cb, out, distribution, n=n)
        cb.commit()
        cb.wait()
        return out.numpy(distribution.dtype).reshape(shape).copy()

    def _check_room(self, count: int) -> None:
        """Raise if `count` more numbers would run past what the kernels can address."""

    def _encode(self, cb, buf, n: int, distribution) -> None:
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} seed={self.seed} position={self.position} on {self.device.name}>"


class Philox(Generator):
    """Philox4x32-10: key (seed, 0), counter (0, 0, 0, block); element i is word i mod 4 of block i div 4.

    Counter-based, so it needs no device state: each dispatch gets (seed, position) and makes
    the blocks it writes. A call starting inside a block makes that block again and writes only
    its remaining words, which is how two calls of n equal one of 2n for any n (such a call
    makes every block twice, so draws of multiples of 4 numbers are the fastest).

    Args:
        device: from `mm.device()`.
        seed: an integer in [0, 2**32).

    Example:
        >>> gen = mm.random.Philox(dev, seed=42)
        >>> gen.uniform((2, 3))
        >>> gen.position = 1 << 40  # jump anywhere in the stream (MTGP32 cannot: its state follows position)
    """

    def _encode(self, cb, buf, n, distribution):
        dist, a, b = distribution._constants()
        block, skip = divmod(self.position, 4)
        threads = 256
        quads = (n + 3) // 4  # 16 bytes of output each; a thread makes two
        cb.dispatch(self._library.kernel("philox"), groups=(-(-quads // (2 * threads)), 1, 1), threads=(threads, 1, 1),
                    args=[buf, {"n": n, "seed": self.seed, "block_lo": block & 0xFFFFFFFF,
                                "block_hi": block >> 32, "skip": skip, "dist": dist, "a": a, "b": b}])

    def _check_room(self, count):
        if (self.position + count) // 4 >= 2**64:
            raise OverflowError("this Philox stream is exhausted (2**64 blocks)")


MTGP32_N = 351  # state words of one MTGP32 generator
MTGP32_STEP = 256  # words per step: one per thread of a threadgroup
_PARAM_WORDS = 36  # pos, sh1, sh2, mask, tbl[16], tmp_tbl[16] — kernels/random.metal's layout


class MTGP32(Generator):
    """MTGP32 (period 2¹¹²¹³ − 1 per state) with `states` states interleaved as cuRAND's host generator.

    With B states, stream chunk c (words 256c … 256c+255) is step c div B of state c mod B.
    One threadgroup of 256 threads advances one state, 256 words per step. A call ending inside
    a chunk does not keep that chunk's step in the state; the next call makes it again and
    writes the rest.

    Args:
        device: from `mm.device()`.
        seed: an integer in [0, 2**32); state b is seeded with (seed + b + 1) mod 2**32.
        states: B, 1 to 200 (one MTGP parameter set each); 192 is cuRAND's layout.

    Example:
        >>> gen = mm.random.MTGP32(dev, seed=0, states=192)
        >>> gen.normal(1000)
    """

    def __init__(self, device, seed: int, states: int = 192):
        super().__init__(device, seed)
        sets = mtgp32_params()
        if isinstance(states, bool) or not isinstance(states, (int, np.integer)):
            raise TypeError(f"states must be an integer, got {states!r}")
        if not 1 <= states <= len(sets):
            raise ValueError(f"states must be in 1..{len(sets)} (one MTGP32 parameter set each), got {states}")
        self.states = int(states)
        # Kernel variant: 256 threads per state where barriers are cheap (GPUs); one thread per
        # state elsewhere (cpu, where barriers would make every step 256 fiber switches). Both
        # write the same stream.
        self.kernel = "mtgp32" if device.cheap_barriers else "mtgp32_serial"
        table = np.array([[s["pos"], s["sh1"], s["sh2"], s["mask"], *s["tbl"], *s["tmp_tbl"]]
                          for s in sets[:states]], np.uint32)
        self.params = device.buffer(table)
        self.state = device.buffer(nbytes=4 * MTGP32_N * self.states)
        cb = device.command_buffer()
        cb.dispatch(self._library.kernel("mtgp32_seed"), groups=(-(-self.states // 32), 1, 1), threads=(32, 1, 1),
                    args=[self.state, self.params, {"seed": self.seed, "states": self.states}])
        cb.commit()  # the device queue runs it before anything committed later

    def _encode(self, cb, buf, n, distribution):
        dist, a, b = distribution._constants()
        chunk, skip = divmod(self.position, MTGP32_STEP)
        threads = MTGP32_STEP if self.kernel == "mtgp32" else 32
        cb.dispatch(self._library.kernel(self.kernel), groups=(self.states, 1, 1), threads=(threads, 1, 1),
                    args=[buf, self.state, self.params, {"n": n, "states": self.states, "chunk": chunk,
                                                         "skip": skip, "dist": dist, "a": a, "b": b}])

    def _check_room(self, count):
        if (self.position + count) // MTGP32_STEP + 1 >= 2**32:
            raise OverflowError("this MTGP32 stream is past 2**40 numbers, the most mlmetal addresses")

    def __repr__(self):
        return f"<MTGP32 seed={self.seed} states={self.states} position={self.position} on {self.device.name}>"


def _destination(out, distribution, n: int | None) -> tuple[Buffer, int]:
    """(buffer, count) for an output buffer or tensor, checked against the distribution."""
    if isinstance(out, Buffer):
        buf, size, dtype = out, out.nbytes // 4, None  # raw bytes: any 32-bit distribution fits
    elif isinstance(getattr(out, "buffer", None), Buffer):
        buf = out.buffer
        size = int(out.size) if hasattr(out, "size") else math.prod(out.shape)
        dtype = np.dtype(out.dtype) if getattr(out, "dtype", None) is not None else None
    else:
        raise TypeError(f"out must be a device buffer or tensor, got {type(out).__name__}"
                        + (" (copy arrays to the device with dev.buffer(array))" if isinstance(out, np.ndarray) else ""))
    if dtype is not None and dtype != distribution.dtype:
        raise TypeError(f"{type(distribution).__name__} writes {distribution.dtype}, but the output tensor is {dtype}")
    if n is None:
        n = size
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an integer, got {n!r}")
    if not 0 <= n <= size:
        raise ValueError(f"n = {n} numbers do not fit the output, which holds {size}")
    if n > _MAX_N:
        raise ValueError(f"n = {n} is more numbers than one call may write ({_MAX_N})")
    return buf, int(n)


# ---------------------------------------------------------------- the default generators

_default_seed = 0
_defaults: dict = {}  # device -> its default Philox


def seed(n: int) -> None:
    """Restart every device's default generator (what `mm.rand` and `mm.randn` draw from) at seed `n`.

    Example:
        >>> mm.random.seed(42)
    """
    global _default_seed
    _check_seed(n)
    _default_seed = int(n)
    _defaults.clear()


def default_generator(device) -> Philox:
    """The device's default generator: a Philox stream seeded by `seed` (0 until it is called)."""
    if device not in _defaults:
        _defaults[device] = Philox(device, _default_seed)
    return _defaults[device]


def _check_seed(seed) -> None:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
