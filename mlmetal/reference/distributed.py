"""Reference of the collectives (mlmetal/ops/distributed.py) in the suite's world of one process."""

import math

import numpy as np


def all_reduce(*xs, op="sum"):
    """The sum or mean over one rank: each input itself."""
    return tuple(xs) if len(xs) > 1 else xs[0]


def all_reduce_start(*xs):
    """The inputs, flattened one after another."""
    return np.concatenate([np.ravel(x) for x in xs])


def all_reduce_finish(flat, shapes, op="sum"):
    """The flat sum split into tensors of `shapes`."""
    ends = np.cumsum([math.prod(s) for s in shapes])
    parts = tuple(flat[e - math.prod(s):e].reshape(s) for s, e in zip(shapes, ends))
    return parts if len(parts) > 1 else parts[0]
