"""Mixed precision: `mm.autocast("bfloat16" | "float16")` around graph building or eager code.

Inside it, every op's floating inputs are cast before the op runs (a graph records the casts as
`astype` nodes, whose gradient casts back, so float32 parameters receive float32 gradients):

- the ops that do the arithmetic worth halving — convolutions, transposed convolutions, matmul,
  the Gram matrix — run in the low-precision type (`LOW`);
- reductions, softmax, exp, log and pow, and everything that only takes float32, run in float32
  (`FLOAT32`, and any op whose kernels are float32 only);
- every other op (activations, elementwise arithmetic, pooling, resampling, layout,
  normalisation, whose kernels keep their statistics in float, and the losses, whose kernels sum
  in float and return a float32 loss) runs in the type of its inputs, mixed inputs promoted to
  the widest. A loss between two low-precision tensors (the style losses' features) reads them as
  they are, with no float32 copy; one against a float32 target computes in float32.

So a network's activations are stored in the low-precision type, and its parameters, optimizer
state and loss stay float32 (master weights). `mm.Graph(dev, compute_dtype="bfloat16")` builds a
graph as if under the context. float16 training wants a loss scale: `mm.train.LossScaler`.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from . import dtypes as D

# The ops that run in the low-precision type under autocast.
LOW = frozenset({"conv2d", "conv_transpose2d", "matmul", "gram", "linear"})
# The ops that run in float32 under autocast: reductions, softmax and the functions whose results
# lose most in 16 bits. (The losses need not: their value is float32 whatever their inputs.)
FLOAT32 = frozenset({"sum", "mean", "var", "softmax", "exp", "log", "pow"})

_state = threading.local()
_OFF = "off"  # an `autocast(enabled=False)` block: no autocast, not even a graph's compute_dtype


def current() -> np.dtype | None:
    """The autocast dtype in force on this thread, or None."""
    d = getattr(_state, "dtype", None)
    return None if d is _OFF else d


@contextlib.contextmanager
def autocast(dtype="bfloat16", enabled: bool = True):
    """Run the ops of the block in mixed precision (see the module's docstring); per thread, and
    nested blocks restore the outer one's setting.

    Args:
        dtype: "bfloat16" (the default; no loss scale needed) or "float16".
        enabled: False runs the block in the dtypes of its tensors, as outside any block (inside
            an enclosing block, or in a graph made with compute_dtype, too).

    Example:
        >>> with mm.autocast("bfloat16"):
        ...     loss = mm.ops.mse_loss(net(x), target)
    """
    d = D.as_dtype(dtype)
    if d not in (D.float16, D.bfloat16):
        raise ValueError(f"autocast: dtype {d} is not float16 or bfloat16")
    saved = getattr(_state, "dtype", None)
    _state.dtype = d if enabled else _OFF
    try:
        yield d
    finally:
        _state.dtype = saved


def policy(op, float_dtypes, graph=None) -> np.dtype | None:
    """The dtype op `op`'s floating inputs (of `float_dtypes`) are cast to under the autocast in
    force (else `graph`'s compute_dtype), or None to leave them to the usual promotion."""
    state = getattr(_state, "dtype", None)
    low = None if state is _OFF else state or getattr(graph, "compute_dtype", None)
    if low is None or not float_dtypes or op.name == "astype":
        return None
    if op.name in LOW and low in op.dtypes:
        return low
    if op.name in FLOAT32 or not any(d in op.dtypes for d in float_dtypes if d != D.float32):
        return D.float32 if any(d != D.float32 for d in float_dtypes) else None
    return None
