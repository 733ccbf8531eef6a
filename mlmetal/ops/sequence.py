"""Ops of sequence models (kernels/sequence.metal): token embeddings, greedy arg-max, the
per-sequence running flags that predicates reduce over, and `reshape` (image features into
the vectors a recurrent cell takes).

Token ids are int32 tensors, flags uint32 (nonzero = true).
"""

import math
import numbers

import numpy as np

from .. import dtypes as D
from ..reference import sequence as R
from . import apply, ensure, groups_for, register


# ---------------------------------------------------------------- embedding

def _embedding_check(ids, table):
    """Rows of `table` picked by token ids: out[i] = table[ids[i]] (a zero row for an id out of range).

    Args:
        ids: int32 token ids, (N,).
        table: the embedding table, (vocab, dim).

    Example:
        >>> ids = mm.tensor(np.array([2, 0], np.int32), dtype=np.int32)
        >>> mm.ops.embedding(ids, mm.tensor(np.eye(3))).numpy()[0]
        array([0., 0., 1.], dtype=float32)
    """
    ensure(len(ids) == 1, "embedding", f"ids must be a vector of token ids, got shape {ids}")
    ensure(len(table) == 2, "embedding", f"table must be (vocab, dim), got shape {table}")
    return (ids[0], table[1]), {}


def _embedding_encode(cb, out, ids, table):
    p = {"n": ids.size, "dim": table.shape[1], "vocab": table.shape[0]}
    k = out.device.library("sequence").kernel("embedding")
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[ids, table, out, p])


register("embedding", check=_embedding_check, encode=_embedding_encode, reference=R.embedding,
         grad=lambda g, out, ids, table: (None, apply("embedding_grad", g, ids, vocab=table.shape[0])),
         kernels=["sequence.embedding"], in_dtypes=(np.int32, np.float32))


def _embedding_grad_check(g, ids, vocab):
    """dL/dtable of embedding: each token's output gradient added into its row."""
    ensure(len(g) == 2 and len(ids) == 1 and g[0] == ids[0], "embedding_grad",
           f"expected (N, dim) gradients for N ids, got {g} and {ids}")
    ensure(isinstance(vocab, (int, np.integer)) and vocab >= 1, "embedding_grad", f"vocab must be positive, got {vocab!r}")
    return (int(vocab), g[1]), {"vocab": int(vocab)}


def _embedding_grad_encode(cb, out, g, ids, vocab):
    p = {"n": ids.size, "dim": g.shape[1], "vocab": vocab}
    k = out.device.library("sequence").kernel("embedding_grad")
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[g, ids, out, p])


register("embedding_grad", check=_embedding_grad_check, encode=_embedding_grad_encode, reference=R.embedding_grad,
         grad=None, kernels=["sequence.embedding_grad"], in_dtypes=(np.float32, np.int32))


# ---------------------------------------------------------------- argmax and running flags

def _argmax_check(x, axis=-1, keepdims=False):
    """The index of the largest value along `axis`, as int32 (the first on ties; NaN counts as the
    largest): greedy decoding's choice. No gradient.

    Args:
        x: any shape.
        axis: the axis searched (default the last); None searches the flattened tensor.
        keepdims: keep that axis as size 1.

    Example:
        >>> mm.ops.argmax(mm.tensor(np.array([[0.1, 2.0, 0.3]]))).numpy()
        array([1], dtype=int32)
    """
    ensure(len(x) >= 1 and math.prod(x) >= 1, "argmax", f"expected a non-empty tensor, got shape {x}")
    if axis is None:
        return ((1,) * len(x) if keepdims else ()), {"axis": None, "keepdims": bool(keepdims)}
    ensure(isinstance(axis, numbers.Integral) and not isinstance(axis, bool) and -len(x) <= axis < len(x), "argmax",
           f"axis {axis!r} is not an axis of a tensor of shape {x}")
    axis = int(axis) % len(x)
    out = x[:axis] + ((1,) if keepdims else ()) + x[axis + 1:]
    return out, {"axis": axis, "keepdims": bool(keepdims)}


def _argmax_encode(cb, out, x, axis, keepdims):
    length, inner = (x.size, 1) if axis is None else (x.shape[axis], math.prod(x.shape[axis + 1:]))
    k = out.device.library("sequence").kernel("argmax")
    cb.dispatch(k, groups=groups_for(out.size, 64), threads=64,
                args=[x, out, {"outputs": out.size, "length": length, "inner": inner}])


register("argmax", check=_argmax_check, encode=_argmax_encode, reference=R.argmax, grad=None, out_dtype=np.int32,
         kernels=["sequence.argmax"])


def _still_running_check(tokens, running, end):
    """uint32 flags, 1 where a sequence was running and its new token is not `end`.

    Args:
        tokens: int32 tokens just emitted, (N,).
        running: uint32 flags before this step, (N,).
        end: the end token.

    Example:
        >>> running = mm.ops.still_running(tokens, running, end=END)
    """
    ensure(len(tokens) == 1 and tokens == running, "still_running",
           f"tokens and flags must be vectors of one length, got {tokens} and {running}")
    ensure(isinstance(end, (int, np.integer)), "still_running", f"end must be a token id, got {end!r}")
    return tokens, {"end": int(end)}


def _still_running_encode(cb, out, tokens, running, end):
    k = out.device.library("sequence").kernel("still_running")
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[tokens, running, out, {"n": out.size, "end": end}])


register("still_running", check=_still_running_check, encode=_still_running_encode, reference=R.still_running,
         grad=None, out_dtype=np.uint32, kernels=["sequence.still_running"], in_dtypes=(np.int32, np.uint32))


# ---------------------------------------------------------------- reshape

def _reshape_check(x, shape):
    """A float32 tensor's elements in a new shape (a copy); one dimension may be -1.

    Example:
        >>> features = mm.ops.reshape(conv_out, shape=(-1, 128))   # (N, 32, 2, 2) -> (N, 128)
    """
    shape = tuple(int(s) for s in shape)
    size = math.prod(x)
    if shape.count(-1) == 1:
        rest = math.prod(s for s in shape if s != -1)
        ensure(rest > 0 and size % rest == 0, "reshape", f"cannot reshape {x} into {shape}")
        shape = tuple(size // rest if s == -1 else s for s in shape)
    ensure(all(s >= 1 for s in shape) and math.prod(shape) == size, "reshape", f"cannot reshape {x} into {shape}")
    return shape, {"shape": shape}


def _reshape_encode(cb, out, x, shape):
    # a flat copy: the channel-copy kernel over one "channel" holding every element
    n = x.size
    p = {"count": n, "channels": n, "inner": 1, "src_channels": n, "src_offset": 0, "dst_channels": n, "dst_offset": 0}
    # copy_channels moves 4-byte elements for every 32-bit dtype (functional.py copies int32 outputs this way)
    k = out.device.library("layout").kernel(D.kernel_name("copy_channels", x.dtype if x.dtype in D.FLOATS else D.float32))
    cb.dispatch(k, groups=groups_for(n, 256), threads=256, args=[x, out, p])


register("reshape", check=_reshape_check, encode=_reshape_encode, reference=R.reshape,
         grad=lambda g, out, x, shape: (apply("reshape", g, shape=x.shape),), kernels=["layout.copy_channels"],
         dtypes=D.FLOATS)
