"""References of kernels/matmul.metal."""


def matmul(a, b, *, transpose_a, transpose_b):
    return (a.T if transpose_a else a) @ (b.T if transpose_b else b)


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def linear_bias_grad(g):
    return g.sum(axis=0)
