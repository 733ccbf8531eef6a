"""References of kernels/pool.metal: pooling and the Laplacian-of-Gaussian filter (NCHW)."""

import numpy as np


def _windows(x, kernel, stride, padding, fill):
    """The pooling windows as an array (kh·kw, N, C, OH, OW), offsets in row-major window order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    oh = (xp.shape[2] - kh) // sh + 1
    ow = (xp.shape[3] - kw) // sw + 1
    return np.stack([xp[:, :, dy:dy + sh * (oh - 1) + 1:sh, dx:dx + sw * (ow - 1) + 1:sw]
                     for dy in range(kh) for dx in range(kw)])


def _scatter(per_offset, x_shape, kernel, stride, padding):
    """Adds per_offset[k] (N, C, OH, OW) back at window offset k of every window; the adjoint of _windows."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    oh, ow = per_offset.shape[-2:]
    for k in range(kh * kw):
        dy, dx = divmod(k, kw)
        out[:, :, dy:dy + sh * (oh - 1) + 1:sh, dx:dx + sw * (ow - 1) + 1:sw] += per_offset[k]
    return out[:, :, ph:ph + h, pw:pw + w]


def max_pool2d(x, kernel, stride, padding):
    return _windows(x, kernel, stride, padding, -np.inf).max(axis=0)


def max_pool2d_grad(g, x, kernel, stride, padding):
    win = _windows(x, kernel, stride, padding, -np.inf)
    first = np.argmax(win, axis=0)  # argmax returns the first maximum: the kernel's tie rule
    hit = np.arange(win.shape[0]).reshape(-1, 1, 1, 1, 1) == first
    return _scatter(np.where(hit, g, 0.0), x.shape, kernel, stride, padding)  # a NaN g reaches its arg-max only


def avg_pool2d(x, kernel, stride, padding):
    return _windows(x, kernel, stride, padding, 0.0).mean(axis=0)


def avg_pool2d_grad(g, kernel, stride, padding, input_size):
    share = np.broadcast_to(g / (kernel[0] * kernel[1]), (kernel[0] * kernel[1],) + g.shape)
    return _scatter(share, g.shape[:2] + tuple(input_size), kernel, stride, padding)


def log_taps(sigma, size):
    """The size×size Laplacian of a Gaussian, ∇²G = (r² − 2σ²)/(2πσ⁶)·exp(−r²/2σ²), shifted to sum to zero.

    The zero sum makes the filter blind to constant regions, which a truncated ∇²G is not.
    """
    r = np.arange(size) - size // 2
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    taps = (r2 - 2 * sigma**2) / (2 * np.pi * sigma**6) * np.exp(-r2 / (2 * sigma**2))
    return taps - taps.mean()


def log_filter(x, sigma, size):
    taps = log_taps(sigma, size)
    win = _windows(x, (size, size), (1, 1), (size // 2, size // 2), 0.0)
    return (taps.reshape(-1, 1, 1, 1, 1) * win).sum(axis=0)  # not tensordot, whose BLAS may drop 0·NaN
