"""References of kernels/elementwise.metal."""

import numpy as np


def add(x, y):
    return np.asarray(x, np.float64) + np.asarray(y, np.float64)


def sub(x, y):
    return x - y


def mul(x, y):
    return x * y


def div(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        return x / y


def maximum(x, y):
    return np.maximum(x, y)  # NaN if either is NaN, as PyTorch


def minimum(x, y):
    return np.minimum(x, y)


def equal(x, y):
    return (x == y).astype(np.float64)


def where(cond, a, b):
    return np.where(cond != 0, a, b)


def where_grad(g, cond, branch):
    taken = (cond != 0) if branch == 0 else (cond == 0)
    return np.where(taken, g, 0.0) + np.zeros(np.broadcast_shapes(g.shape, cond.shape))


def maximum_grad(g, a, b):
    # PyTorch: where(a == b, g/2, g), then 0 where a < b (so all of g where either is NaN)
    return np.where(a < b, 0.0, np.where(a == b, g / 2, g)) + np.zeros(np.broadcast_shapes(g.shape, a.shape, b.shape))


def minimum_grad(g, a, b):
    return np.where(a > b, 0.0, np.where(a == b, g / 2, g)) + np.zeros(np.broadcast_shapes(g.shape, a.shape, b.shape))


def scale(x, s):
    return s * x


def linear_activation(x, a, b):
    return a * x + b


def relu(x):
    return np.maximum(x, 0.0)


def relu_grad(g, x):
    return np.where(x <= 0, 0.0, g)  # g where x is NaN, as PyTorch


def leaky_relu(x, slope):
    return np.where(x > 0, x, slope * x)


def leaky_relu_grad(g, x, slope):
    return np.where(x > 0, g, slope * g)


def sigmoid(x):
    return 0.5 * (1 + np.tanh(0.5 * x))  # no overflow for large |x|


def sigmoid_grad(g, y):
    return g * y * (1 - y)


def tanh(x):
    return np.tanh(x)


def tanh_grad(g, y):
    return g * (1 - y * y)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_grad(g, y):
    return y * (g - (g * y).sum(axis=1, keepdims=True))

