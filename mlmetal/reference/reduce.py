"""References of the reductions of kernels/reduce.metal (float64; NaN propagates, as in PyTorch)."""

import numpy as np


def sum(x, axis, keepdims):  # noqa: A001 (the op's name)
    return np.sum(x, axis=axis, keepdims=keepdims)


def mean(x, axis, keepdims):
    return np.mean(x, axis=axis, keepdims=keepdims)


def max(x, axis, keepdims):  # noqa: A001
    return np.max(x, axis=axis, keepdims=keepdims)


def min(x, axis, keepdims):  # noqa: A001
    return np.min(x, axis=axis, keepdims=keepdims)


def var(x, axis, keepdims, correction):
    return np.var(x, axis=axis, keepdims=keepdims, ddof=correction)
