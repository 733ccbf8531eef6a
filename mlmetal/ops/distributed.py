"""all_reduce: the sum or mean of tensors over the ranks of mm.distributed, in the device's order.

Not a kernel of its own: the reduction is MPI's or NCCL's, encoded as a host step of the command
buffer (mlmetal/distributed.py); the mean scales the sum with elementwise's `scale`, which also
copies the inputs before `mm.distributed.init()`, in a world of one process.
"""

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
         grad=_all_reduce_grad, kernels=["elementwise.scale"])
