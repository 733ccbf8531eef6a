"""A fresh random tensor on every run (kernels/random.metal through mlmetal.random's generators).

The op has no tensor inputs: its generator names the device, and each run encodes the
generator's next numbers, so a graph node of it draws a new latent batch or dropout mask
every step.
"""

from ..reference import random as R
from . import ensure, register


def _random_check(*, shape, generator, distribution):
    """A tensor of `shape` filled with the generator's next numbers under `distribution`.

    Args:
        shape: the output shape.
        generator: an `mm.random.Philox` or `mm.random.MTGP32`.
        distribution: `mm.random.Uniform(...)`, `Normal(...)` or `UInt32()`.

    Example:
        >>> z = mm.ops.random_tensor(shape=(64, 100), generator=gen, distribution=mm.random.Normal())
    """
    shape = tuple(int(s) for s in shape)
    ensure(all(s >= 1 for s in shape), "random_tensor", f"shape {shape} must have positive sizes")
    ensure(hasattr(generator, "encode") and hasattr(distribution, "dtype"), "random_tensor",
           "needs an mm.random generator and distribution")
    return shape, {"shape": shape, "generator": generator, "distribution": distribution,
                   "start": generator.position, "dtype": distribution.dtype}


def _random_encode(cb, out, *, shape, generator, distribution, start, dtype):
    generator.encode(cb, out, distribution)


register("random_tensor", check=_random_check, encode=_random_encode, reference=R.random_tensor, grad=None,
         kernels=["random.philox", "random.mtgp32"], replayable=False)  # each run draws the generator's next numbers
