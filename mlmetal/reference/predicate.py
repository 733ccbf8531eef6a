"""References of kernels/predicate.metal: each returns the predicate words with one word replaced."""

import operator

import numpy as np

COMPARES = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
            "!=": operator.ne}


def _with(words, word, value):
    out = np.array(words, dtype=np.uint32).reshape(-1)
    out[word] = value
    return out.reshape(np.shape(words))


def predicate_set(words, word, value):
    return _with(words, word, value)


def predicate_decrement(words, word):
    return _with(words, word, max(int(np.reshape(words, -1)[word]), 1) - 1)


def predicate_compare(x, words, word, index, threshold, compare):
    # float32, as the kernel compares: a threshold that float32 cannot hold rounds the same way
    v = np.float32(np.reshape(x, -1)[index])
    return _with(words, word, int(COMPARES[compare](v, np.float32(threshold))))


def predicate_all(flags, words, word):
    return _with(words, word, int(np.all(np.asarray(flags) != 0)))


def predicate_any(flags, words, word):
    return _with(words, word, int(np.any(np.asarray(flags) != 0)))


def predicate_finite(x, words, word):
    return _with(words, word, np.reshape(words, -1)[word] if np.isfinite(np.asarray(x, np.float64)).all() else 0)
