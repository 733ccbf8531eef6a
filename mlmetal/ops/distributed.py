"""all_reduce: the sum or mean of tensors over the ranks of mm.distributed, in the device's order;
all_reduce_start and all_reduce_finish: the same in two halves, so that work between them
overlaps the communication.

Not kernels of their own: the reduction is MPI's or NCCL's, encoded as host steps of the command
buffer, which also gather the inputs into one flat message and spread it back
(mlmetal/distributed.py); elementwise's `scale` turns the sum into the mean. Before
`mm.distributed.init()`, in a world of one process, they copy, with layout's `copy_channels`.
"""

import math

from ..reference import distributed as R
from . import apply, ensure, register


def _all_reduce_check(*shapes, op="sum"):
    """The sum (or mean) over the ranks of each input: one output per input, of its shape.

    Args:
        *inputs: float32 tensors, each of the same shape on every rank.
        op: "sum" or "mean".

    Example:
        >>> total = mm.ops.all_reduce(x, op="sum")
        >>> ga, gb = mm.ops.all_reduce(a, b, op="mean")      # one collective for both
    """
    ensure(len(shapes) >= 1, "all_reduce", "needs at least one tensor")
    ensure(op in ("sum", "mean"), "all_reduce", f"op must be 'sum' or 'mean', got {op!r}")
    return (list(shapes) if len(shapes) > 1 else shapes[0]), {"op": op}


def _all_reduce_encode(cb, out, *inputs, op):
    from .. import distributed

    distributed.encode_all_reduce(cb, list(inputs), list(out) if isinstance(out, tuple) else [out], op)


def _all_reduce_grad(g, out, *inputs, op):
    # Every rank's output depends on every rank's input alike: the gradient reaching an input is
    # the same reduction of the outputs' gradients.
    return tuple(None if gi is None else apply("all_reduce", gi, op=op) for gi in (g if isinstance(g, tuple) else (g,)))


register("all_reduce", check=_all_reduce_check, encode=_all_reduce_encode, reference=R.all_reduce,
         grad=_all_reduce_grad, kernels=["elementwise.scale", "layout.copy_channels"])


def _all_reduce_start_check(*shapes):
    """Start summing the inputs over the ranks: one flat tensor, the inputs one after another,
    which holds the sum once `all_reduce_finish` has read it. Each start must be finished.

    Args:
        *inputs: float32 tensors, each of the same shape on every rank.

    Example:
        >>> flat = mm.ops.all_reduce_start(a, b)                             # the message is on its way
        >>> ga, gb = mm.ops.all_reduce_finish(flat, [a.shape, b.shape], "mean")
    """
    ensure(len(shapes) >= 1, "all_reduce_start", "needs at least one tensor")
    return (sum(math.prod(s) for s in shapes),), {}


def _all_reduce_start_encode(cb, flat, *inputs):
    from .. import distributed

    distributed.encode_all_reduce_start(cb, flat, list(inputs))


def _all_reduce_finish_check(flat, shapes, op="sum"):
    """Wait for the sum `all_reduce_start` began and split it into tensors of `shapes`, the sum or the mean."""
    ensure(isinstance(shapes, (list, tuple)) and len(shapes) >= 1, "all_reduce_finish",
           f"shapes must be a list of the started tensors' shapes, got {shapes!r}")
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    ensure(len(flat) == 1 and flat[0] == sum(math.prod(s) for s in shapes), "all_reduce_finish",
           f"a start of shape {flat} does not hold tensors of shapes {list(shapes)}")
    ensure(op in ("sum", "mean"), "all_reduce_finish", f"op must be 'sum' or 'mean', got {op!r}")
    return (list(shapes) if len(shapes) > 1 else shapes[0]), {"shapes": shapes, "op": op}


def _all_reduce_finish_encode(cb, out, flat, *, shapes, op):
    from .. import distributed

    distributed.encode_all_reduce_finish(cb, list(out) if isinstance(out, tuple) else [out], flat, op)


# The halves appear in training graphs after the backward pass (DataParallel): no gradient rule.
register("all_reduce_start", check=_all_reduce_start_check, encode=_all_reduce_start_encode,
         reference=R.all_reduce_start, grad=None, kernels=["layout.copy_channels"])
register("all_reduce_finish", check=_all_reduce_finish_check, encode=_all_reduce_finish_encode,
         reference=R.all_reduce_finish, grad=None, kernels=["layout.copy_channels", "elementwise.scale"])
