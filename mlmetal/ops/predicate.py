"""Predicate-writing ops (kernels/predicate.metal) and `Predicates`, a buffer of predicate words.

A predicate (`mm.Predicate(buffer, offset)`, DESIGN §1) is a uint32 word on the device: a
dispatch predicated by it runs only while the word is nonzero. The ops here write such words
*on the device*, from device data, so work can switch itself off without the host waiting:

- `predicate_set(words, word, value)`: word := value;
- `predicate_decrement(words, word)`: word := max(word, 1) − 1, a countdown;
- `predicate_compare(x, words, word, threshold, compare, index)`: word := x[index] ⋚ threshold;
- `predicate_all(flags, words, word)` / `predicate_any(flags, words, word)`: word := all / any
  of a uint32 flag vector is nonzero;
- `predicate_finite(x, words, word)`: word := 0 if x (float32, float16 or bfloat16) holds an
  Inf or a NaN, else it is left as it is — so checks of many tensors AND into one word (the loss
  scaler's "every gradient is finite").

As ops they are pure: they return a copy of the whole word buffer `words` (a uint32 tensor)
with one word replaced, so they test against references like every other op. What one
wants in practice is to write the words in place; `Predicates` does that, eagerly or as
graph nodes (bound to its buffer the way optimizer updates are bound to parameters):

    >>> flags = Predicates(dev, 2)                  # two words, both 1
    >>> g = mm.Graph(dev)
    >>> alive = g.input("alive", (8,), np.uint32)
    >>> flags.any(0, alive)                          # a node: word 0 := any(alive)
    >>> with g.predicated(flags[0]):                 # nodes skipped once word 0 is 0
    ...     y = mm.ops.tanh(x)
"""

from __future__ import annotations

import numpy as np

from .. import dtypes as D
from ..reference import predicate as R
from ..runtime.device import Device, Predicate
from ..tensor import Symbolic, Tensor, tensor
from . import ensure, groups_for, infer, register

COMPARES = {op: i for i, op in enumerate((">", ">=", "<", "<=", "==", "!="))}


def _word_attrs(op, words, word):
    ensure(len(words) == 1, op, f"the predicate words must be a vector, got shape {words}")
    ensure(isinstance(word, (int, np.integer)) and 0 <= word < words[0], op,
           f"word {word!r} is not an index into the {words[0]} predicate words")
    return {"word": int(word)}


def _encode(cb, out, kernel, *buffers, threads=32, **params):
    """One threadgroup runs a predicate writer (see kernels/predicate.metal for why one)."""
    k = out.device.library("predicate").kernel(kernel)
    cb.dispatch(k, groups=1, threads=threads, args=[*buffers, out, {"count": out.size, **params}])


# ---------------------------------------------------------------- set and decrement

def _set_check(words, word=0, value=1):
    """Predicate words with word `word` set to `value` (a uint32; nonzero runs, 0 skips).

    Args:
        words: the uint32 predicate words, a vector.
        word: which one to write (its byte offset is 4·word).
        value: the value written.

    Example:
        >>> words = mm.tensor(np.ones(2, np.uint32), dtype=np.uint32)
        >>> mm.ops.predicate_set(words, 1, 0).numpy()
        array([1, 0], dtype=uint32)
    """
    attrs = _word_attrs("predicate_set", words, word)
    ensure(isinstance(value, (int, np.integer)) and 0 <= value < 2**32, "predicate_set",
           f"value must be a uint32, got {value!r}")
    return words, {**attrs, "value": int(value)}


register("predicate_set", check=_set_check, reference=R.predicate_set, grad=None, out_dtype=np.uint32,
         encode=lambda cb, out, words, word, value: _encode(cb, out, "predicate_set", words, word=word, value=value),
         kernels=["predicate.predicate_set"], in_dtypes=(np.uint32,))


def _decrement_check(words, word=0):
    """Predicate words with word `word` decremented, stopping at 0: a step budget that runs out.

    Example:
        >>> mm.ops.predicate_decrement(mm.tensor(np.array([2, 0], np.uint32), dtype=np.uint32), 0).numpy()
        array([1, 0], dtype=uint32)
    """
    return words, _word_attrs("predicate_decrement", words, word)


register("predicate_decrement", check=_decrement_check, reference=R.predicate_decrement, grad=None,
         out_dtype=np.uint32, encode=lambda cb, out, words, word: _encode(cb, out, "predicate_decrement", words, word=word),
         kernels=["predicate.predicate_decrement"], in_dtypes=(np.uint32,))


# ---------------------------------------------------------------- compare

def _compare_check(x, words, word=0, threshold=0.0, compare=">", index=0):
    """Predicate words with word `word` set to 1 if x[index] <compare> threshold, else 0.

    Args:
        x: a float32 tensor (flat indexing), e.g. a reduced loss.
        words: the uint32 predicate words.
        word: which one to write.
        threshold: the float compared against.
        compare: one of ">", ">=", "<", "<=", "==", "!=".
        index: the element of x compared.

    Example:
        >>> keep_training = mm.ops.predicate_compare(loss, words, 0, threshold=0.01, compare=">")
    """
    attrs = _word_attrs("predicate_compare", words, word)
    ensure(compare in COMPARES, "predicate_compare", f"compare must be one of {', '.join(COMPARES)}, got {compare!r}")
    size = int(np.prod(x))
    ensure(isinstance(index, (int, np.integer)) and 0 <= index < size, "predicate_compare",
           f"index {index!r} is outside the {size} elements of x")
    return words, {**attrs, "threshold": float(threshold), "compare": compare, "index": int(index)}


def _compare_encode(cb, out, x, words, word, threshold, compare, index):
    _encode(cb, out, "predicate_compare", x, words, word=word, index=index, compare=COMPARES[compare],
            threshold=threshold)


register("predicate_compare", check=_compare_check, encode=_compare_encode, reference=R.predicate_compare,
         grad=None, out_dtype=np.uint32, kernels=["predicate.predicate_compare"], in_dtypes=(np.float32, np.uint32))


# ---------------------------------------------------------------- all / any

def _reduce_op(name, doc):
    def check(flags, words, word=0):
        ensure(0 < int(np.prod(flags)) < 2**32, name, f"needs a non-empty flag tensor, got shape {flags}")
        return words, _word_attrs(name, words, word)

    def encode(cb, out, flags, words, word):
        _encode(cb, out, name, flags, words, threads=256, word=word, n=flags.size)

    check.__doc__ = doc
    register(name, check=check, encode=encode, reference=getattr(R, name), grad=None, out_dtype=np.uint32,
             kernels=[f"predicate.{name}"], in_dtypes=(np.uint32, np.uint32))


_reduce_op("predicate_all", """Predicate words with word `word` set to 1 if every flag (uint32) is nonzero, else 0.

    Example:
        >>> mm.ops.predicate_all(flags, words, 0)
    """)

_reduce_op("predicate_any", """Predicate words with word `word` set to 1 if any flag (uint32) is nonzero, else 0.

    Example:
        >>> keep_decoding = mm.ops.predicate_any(running, words, 0)
    """)


# ---------------------------------------------------------------- finite

def _finite_check(x, words, word=0):
    """Predicate words with word `word` cleared (0) if x holds an Inf or a NaN, else unchanged:
    checks of several tensors into one word leave it nonzero only if every one is finite.

    Args:
        x: a float32, float16 or bfloat16 tensor, e.g. a gradient.
        words: the uint32 predicate words.
        word: which one to clear.

    Example:
        >>> words = mm.ops.predicate_finite(grad, words, 0)
    """
    return words, _word_attrs("predicate_finite", words, word)


def _finite_encode(cb, out, x, words, word):
    k = out.device.library("predicate").kernel(D.kernel_name("predicate_finite", x.dtype))
    p = {"count": out.size, "word": word, "n": x.size, "copy": 0}
    if out.buffer is not words.buffer:  # the kernel only clears: start from a copy (in place, none is needed)
        cb.dispatch(k, groups=1, threads=256, args=[x, words, out, {**p, "copy": 1}])
    # a grid of at most 1024 threadgroups (a GPU full) strides over x, which bounds the clearing
    # stores when every element is Inf
    cb.dispatch(k, groups=min(groups_for(x.size, 256), 1024), threads=256, args=[x, words, out, p])


register("predicate_finite", check=_finite_check, encode=_finite_encode, reference=R.predicate_finite, grad=None,
         out_dtype=np.uint32, kernels=["predicate.predicate_finite"],
         in_dtypes=(np.float32, np.uint32), dtypes=D.FLOATS)


# ---------------------------------------------------------------- a buffer of predicates

class Predicates:
    """`count` predicate words in one device buffer, written in place by the ops above.

    Each method writes word `i` — eagerly (committed at once, asynchronously), or, when a
    tensor argument is a graph tensor or `graph=` is given, as a node of that graph that
    writes the buffer every time the graph runs.

    Args:
        device: where the words live.
        count: how many predicates share the buffer.
        value: their initial value (1: everything predicated by them runs).

    Example:
        >>> p = Predicates(dev, 3)
        >>> p.set(2, 0)                       # eagerly: word 2 := 0
        >>> cb.dispatch(k, groups=1, threads=32, args=[x], predicate=p[2])   # skipped
        >>> p.numpy()
        array([1, 1, 0], dtype=uint32)
    """

    def __init__(self, device: Device, count: int = 1, value: int = 1):
        self.words = tensor(np.full(count, value, np.uint32), device, dtype=np.uint32)

    def __len__(self) -> int:
        return self.words.size

    def __getitem__(self, i: int) -> Predicate:
        """The predicate of word `i` (byte offset 4·i)."""
        if not 0 <= i < len(self):
            raise IndexError(f"predicate {i} of {len(self)}")
        return Predicate(self.words.buffer, 4 * i)

    def numpy(self) -> np.ndarray:
        return self.words.numpy()

    def set(self, i: int, value: int, graph=None):
        """Word i := value."""
        return self._write("predicate_set", [], graph, word=i, value=value)

    def decrement(self, i: int, graph=None):
        """Word i := max(word i, 1) − 1."""
        return self._write("predicate_decrement", [], graph, word=i)

    def compare(self, i: int, x, compare: str, threshold: float, index: int = 0, graph=None):
        """Word i := 1 if x[index] <compare> threshold else 0."""
        return self._write("predicate_compare", [x], graph, word=i, threshold=threshold, compare=compare, index=index)

    def all(self, i: int, flags, graph=None):
        """Word i := 1 if every flag is nonzero else 0."""
        return self._write("predicate_all", [flags], graph, word=i)

    def any(self, i: int, flags, graph=None):
        """Word i := 1 if any flag is nonzero else 0."""
        return self._write("predicate_any", [flags], graph, word=i)

    def finite(self, i: int, x, graph=None):
        """Word i := 0 if x holds an Inf or a NaN, else unchanged."""
        return self._write("predicate_finite", [x], graph, word=i)

    def _write(self, op, inputs, graph, **attrs):
        graph = graph or next((x.graph for x in inputs if isinstance(x, Symbolic)), None)
        if graph is not None:
            # bound to the buffer: the node writes it in place on every run, and the plan
            # keeps it (nodes that write bound tensors always run)
            return graph.append(op, [*inputs, self.words], attrs, out_values=[self.words])
        for x in inputs:
            if not isinstance(x, Tensor):
                raise TypeError(f"{op}: expected a device tensor or a graph tensor, got {type(x).__name__}")
        from . import REGISTRY

        _, norm = infer(op, *inputs, self.words, **attrs)
        cb = self.words.device.command_buffer()
        REGISTRY[op].encode(cb, self.words, *inputs, self.words, **norm)
        cb.commit()
        return self.words
