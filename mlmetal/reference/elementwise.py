"""References of kernels/elementwise.metal."""

import numpy as np


def add(x, y):
    return np.asarray(x, np.float64) + np.asarray(y, np.float64)


def mul(x, y):
    return x * y


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
