"""References of kernels/resample.metal: nearest and bilinear upsampling (NCHW) and their gradients.

Each output row (and column) reads two input rows with two weights, as the kernels and PyTorch do,
so a NaN reaches exactly the pixels that read it, even with a weight of 0.
"""

import numpy as np


def _taps(n, scale, mode):
    """For each output row of a 1-D upsampling of n rows: its two input rows and their weights."""
    j = np.arange(scale * n)
    if mode == "nearest":
        return j // scale, j // scale, np.ones(j.size), np.zeros(j.size)
    src = np.maximum((j + 0.5) / scale - 0.5, 0.0)  # PyTorch's align_corners=False
    i0 = np.minimum(src.astype(int), n - 1)
    lam = src - i0
    return i0, np.minimum(i0 + 1, n - 1), 1 - lam, lam


def _upsample_axis(x, axis, taps):
    i0, i1, w0, w1 = taps
    shape = [-1 if a == axis else 1 for a in range(x.ndim)]
    return np.take(x, i0, axis) * w0.reshape(shape) + np.take(x, i1, axis) * w1.reshape(shape)


def _upsample_axis_adjoint(g, axis, n, taps):
    """Each output row's gradient added back into the two input rows it read, times their weights."""
    i0, i1, w0, w1 = taps
    out = np.zeros(g.shape[:axis] + (n,) + g.shape[axis + 1:])
    rows, gs = np.moveaxis(out, axis, 0), np.moveaxis(g, axis, 0)
    weight = (-1,) + (1,) * (g.ndim - 1)
    np.add.at(rows, i0, gs * w0.reshape(weight))
    np.add.at(rows, i1, gs * w1.reshape(weight))
    return out


def upsample(x, scale, mode):
    y = _upsample_axis(x, 2, _taps(x.shape[2], scale, mode))
    return _upsample_axis(y, 3, _taps(x.shape[3], scale, mode))


def upsample_grad(g, scale, mode):
    h, w = g.shape[2] // scale, g.shape[3] // scale
    dy = _upsample_axis_adjoint(g, 2, h, _taps(h, scale, mode))
    return _upsample_axis_adjoint(dy, 3, w, _taps(w, scale, mode))
