"""References of kernels/resample.metal: nearest and bilinear upsampling (NCHW) and their gradients."""

import numpy as np


def _interpolation(n, scale, mode):
    """The (scale·n × n) matrix mapping an input row to the output rows (1-D upsampling)."""
    m = np.zeros((scale * n, n))
    for j in range(scale * n):
        if mode == "nearest":
            m[j, j // scale] = 1
            continue
        src = max((j + 0.5) / scale - 0.5, 0.0)  # PyTorch's align_corners=False
        i0 = min(int(src), n - 1)
        lam = src - i0
        m[j, i0] += 1 - lam
        m[j, min(i0 + 1, n - 1)] += lam
    return m


def upsample(x, scale, mode):
    rows, cols = _interpolation(x.shape[2], scale, mode), _interpolation(x.shape[3], scale, mode)
    return np.einsum("jh,nchw,kw->ncjk", rows, x, cols)


def upsample_grad(g, scale, mode):
    rows = _interpolation(g.shape[2] // scale, scale, mode)
    cols = _interpolation(g.shape[3] // scale, scale, mode)
    return np.einsum("jh,ncjk,kw->nchw", rows, g, cols)
