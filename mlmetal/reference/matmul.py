"""References of kernels/matmul.metal."""

import numpy as np


def matmul(a, b, *, transpose_a, transpose_b):
    return (np.swapaxes(a, -1, -2) if transpose_a else a) @ (np.swapaxes(b, -1, -2) if transpose_b else b)


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def linear_bias_grad(g):
    return g.sum(axis=0)
