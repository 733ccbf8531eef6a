"""References of kernels/elementwise.metal."""

import math

import numpy as np

_erfc = np.vectorize(math.erfc, otypes=[np.float64])


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


def relu_grad_add(g, h, x):
    return relu_grad(g + h, x)


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


def exp(x):
    with np.errstate(over="ignore"):
        return np.exp(x)


def log(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x)


def sqrt(x):
    with np.errstate(invalid="ignore"):
        return np.sqrt(x)


def rsqrt(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 / np.sqrt(x)


def abs(x):  # noqa: A001 (the op's name)
    return np.abs(x)


def abs_grad(g, x):
    return g * np.where(np.isnan(x), 0.0, np.sign(x))  # sign(NaN) is 0 in PyTorch (NaN in NumPy)


def clamp(x, min, max):  # noqa: A002
    return np.where(x < min, min, np.where(x > max, max, x))  # NaN stays NaN


def clamp_grad(g, x, min, max):  # noqa: A002
    return np.where((x >= min) & (x <= max), g, 0.0)


def pow(x, exponent):  # noqa: A001
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.power(x, exponent)


def normal_cdf(x):
    return 0.5 * _erfc(-x / np.sqrt(2))


def gelu(x):
    with np.errstate(invalid="ignore"):
        return x * normal_cdf(x)


def gelu_grad(g, x):
    with np.errstate(invalid="ignore", over="ignore"):
        return g * (normal_cdf(x) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi))


def silu(x):
    with np.errstate(invalid="ignore"):
        return x * sigmoid(x)


def silu_grad(g, x):
    s = sigmoid(x)
    return g * s * (1 + x * (1 - s))


def dropout(x, u, p):
    return x * (u >= p) * (1 / (1 - p) if p < 1 else 0.0)


def astype(x, dtype):
    """x rounded to storage type `dtype` (to nearest even), as float64."""
    from ..dtypes import as_dtype

    return np.asarray(x).astype(as_dtype(dtype)).astype(np.float64)
