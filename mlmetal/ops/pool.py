"""Pooling and the Laplacian-of-Gaussian filter (kernels/pool.metal), on NCHW images stored as
float32, float16 or bfloat16 (sums in float, one rounding when stored).

Output size: OH = (H + 2·pad − kernel) // stride + 1 (floor, as PyTorch's ceil_mode=False).
Padding is at most half the window, so every window holds at least one input pixel; max
pooling ignores the padding, average pooling counts it as zeros (divides by kh·kw, as
PyTorch's count_include_pad=True). The max-pool gradient goes to each window's arg-max,
ties going to the first maximum in row-major window order.
"""

import math

import numpy as np

from .. import dtypes as D
from ..reference import pool as R
from . import apply, ensure, groups_for, pair, register


def _pool_attrs(op, x, kernel, stride, padding):
    """Normalised (kernel, stride, padding) pairs and the output shape; ShapeError on any problem."""
    ensure(len(x) == 4, op, f"expected an NCHW input, got shape {x}")
    kernel = pair(kernel, op, "kernel")
    stride = kernel if stride is None else pair(stride, op, "stride")
    padding = pair(padding, op, "padding")
    ensure(min(kernel) >= 1, op, f"kernel {kernel} must be positive")
    ensure(min(stride) >= 1, op, f"stride {stride} must be positive")
    ensure(min(padding) >= 0, op, f"padding {padding} must not be negative")
    ensure(all(2 * p <= k for p, k in zip(padding, kernel)), op,
           f"padding {padding} must be at most half the kernel {kernel}")
    h, w = x[2] + 2 * padding[0], x[3] + 2 * padding[1]
    ensure(kernel[0] <= h and kernel[1] <= w, op, f"window {kernel} is larger than the padded input {h}×{w}")
    out = (x[0], x[1], (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
    return out, {"kernel": kernel, "stride": stride, "padding": padding}


def _params(count, in_hw, out_hw, kernel, stride, padding):
    return {"count": count, "h": in_hw[0], "w": in_hw[1], "oh": out_hw[0], "ow": out_hw[1],
            "kh": kernel[0], "kw": kernel[1], "sh": stride[0], "sw": stride[1], "ph": padding[0], "pw": padding[1]}


def _tiles(x_hw, kernel, stride, padding) -> bool:
    """Whether the windows tile the input (kernel = stride, no padding, sizes multiples of the
    kernel), so the `_tiled` kernels run a thread per window (pool.metal)."""
    return (kernel == stride and padding == (0, 0)
            and x_hw[0] % kernel[0] == 0 and x_hw[1] % kernel[1] == 0)


def _dispatch(cb, name, n, args):
    """Kernel `name`'s instance for the storage type of the first tensor, over n threads."""
    k = args[0].device.library("pool").kernel(D.kernel_name(name, args[0].dtype))
    cb.dispatch(k, groups=groups_for(n, 256), threads=256, args=args)


# ---------------------------------------------------------------- max pooling

def _max_check(x, kernel, stride=None, padding=0):
    """Max pooling over kernel×kernel windows of an NCHW image.

    Args:
        x: (N, C, H, W).
        kernel: window size, an int or (kh, kw).
        stride: an int or a pair; defaults to the kernel.
        padding: implicit -inf padding on each side, at most half the kernel.

    Example:
        >>> y = mm.ops.max_pool2d(x, 2)  # halves H and W
    """
    return _pool_attrs("max_pool2d", x, kernel, stride, padding)


def _max_encode(cb, out, x, kernel, stride, padding):
    if kernel == stride == (2, 2) and padding == (0, 0) and x.shape[3] % 2 == 0:
        p = {"count": out.size, "h": x.shape[2], "oh": out.shape[2], "ow": out.shape[3]}
        _dispatch(cb, "max_pool2d_2x2", out.size, [x, out, p])
        return
    p = _params(out.size, x.shape[2:], out.shape[2:], kernel, stride, padding)
    _dispatch(cb, "max_pool2d", out.size, [x, out, p])


def _max_grad(g, out, x, **attrs):
    return (apply("max_pool2d_grad", g, x, **attrs),)


register("max_pool2d", check=_max_check, encode=_max_encode, reference=R.max_pool2d,
         grad=_max_grad, kernels=["pool.max_pool2d", "pool.max_pool2d_2x2"], dtypes=D.FLOATS)


def _max_grad_check(g, x, kernel, stride, padding):
    """dL/dx of max_pool2d given dL/dout `g`: g goes to each window's first maximum."""
    out, attrs = _pool_attrs("max_pool2d_grad", x, kernel, stride, padding)
    ensure(g == out, "max_pool2d_grad", f"gradient shape {g} does not match the pooled shape {out}")
    return x, attrs


def _max_grad_encode(cb, dx, g, x, kernel, stride, padding):
    tiled = _tiles(x.shape[2:], kernel, stride, padding)
    n = g.size if tiled else dx.size  # a thread per window, else per pixel
    p = _params(n, x.shape[2:], g.shape[2:], kernel, stride, padding)
    _dispatch(cb, "max_pool2d_grad_tiled" if tiled else "max_pool2d_grad", n, [g, x, dx, p])


register("max_pool2d_grad", check=_max_grad_check, encode=_max_grad_encode, reference=R.max_pool2d_grad,
         grad=None, kernels=["pool.max_pool2d_grad", "pool.max_pool2d_grad_tiled"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- average pooling

def _avg_check(x, kernel, stride=None, padding=0):
    """Average pooling over kernel×kernel windows of an NCHW image; padding counts as zeros.

    Args:
        x: (N, C, H, W).
        kernel: window size, an int or (kh, kw).
        stride: an int or a pair; defaults to the kernel.
        padding: implicit zero padding on each side, at most half the kernel.

    Example:
        >>> y = mm.ops.avg_pool2d(x, 3, stride=1, padding=1)  # a 3×3 box blur
    """
    return _pool_attrs("avg_pool2d", x, kernel, stride, padding)


def _avg_encode(cb, out, x, kernel, stride, padding):
    p = _params(out.size, x.shape[2:], out.shape[2:], kernel, stride, padding)
    _dispatch(cb, "avg_pool2d_tiled" if _tiles(x.shape[2:], kernel, stride, padding) else "avg_pool2d", out.size, [x, out, p])


def _avg_grad(g, out, x, **attrs):
    return (apply("avg_pool2d_grad", g, input_size=x.shape[2:], **attrs),)


register("avg_pool2d", check=_avg_check, encode=_avg_encode, reference=R.avg_pool2d,
         grad=_avg_grad, kernels=["pool.avg_pool2d", "pool.avg_pool2d_tiled"], dtypes=D.FLOATS)


def _avg_grad_check(g, kernel, stride, padding, input_size):
    """dL/dx of avg_pool2d given dL/dout `g` and the input's (H, W)."""
    ensure(len(g) == 4, "avg_pool2d_grad", f"expected an NCHW gradient, got shape {g}")
    x = tuple(g[:2]) + pair(input_size, "avg_pool2d_grad", "input_size")
    out, attrs = _pool_attrs("avg_pool2d_grad", x, kernel, stride, padding)
    ensure(g == out, "avg_pool2d_grad", f"gradient shape {g} does not match the pooled shape {out}")
    return x, {**attrs, "input_size": x[2:]}


def _avg_grad_encode(cb, dx, g, kernel, stride, padding, input_size):
    tiled = _tiles(input_size, kernel, stride, padding)
    n = g.size if tiled else dx.size  # a thread per window, else per pixel
    p = _params(n, input_size, g.shape[2:], kernel, stride, padding)
    _dispatch(cb, "avg_pool2d_grad_tiled" if tiled else "avg_pool2d_grad", n, [g, dx, p])


register("avg_pool2d_grad", check=_avg_grad_check, encode=_avg_grad_encode, reference=R.avg_pool2d_grad,
         grad=None, kernels=["pool.avg_pool2d_grad", "pool.avg_pool2d_grad_tiled"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- Laplacian of Gaussian

MAX_FILTER = 9  # FilterParams holds 9×9 taps


def _log_check(x, sigma=1.0, size=5):
    """A Laplacian-of-Gaussian filter on every channel: a fixed depthwise size×size convolution.

    The taps are ∇²G of a Gaussian of std `sigma`, shifted to sum to zero (constant regions
    give 0); zero padding keeps H and W. The denoiser's edge loss compares LoG responses.

    Args:
        x: (N, C, H, W).
        sigma: the Gaussian's standard deviation in pixels, > 0.
        size: the odd filter width, 1 to 9.

    Example:
        >>> edges = mm.ops.log_filter(img, sigma=1.0, size=5)
    """
    ensure(len(x) == 4, "log_filter", f"expected an NCHW input, got shape {x}")
    ensure(isinstance(size, (int, np.integer)) and size % 2 == 1 and 1 <= size <= MAX_FILTER, "log_filter",
           f"size must be an odd integer from 1 to {MAX_FILTER}, got {size!r}")
    ensure(0 < float(sigma) < math.inf, "log_filter", f"sigma must be positive and finite, got {sigma!r}")
    return x, {"sigma": float(sigma), "size": int(size)}


def _log_encode(cb, out, x, sigma, size):
    taps = np.zeros(MAX_FILTER * MAX_FILTER, np.float32)
    taps[:size * size] = R.log_taps(sigma, size).reshape(-1)
    p = {"count": out.size, "h": x.shape[2], "w": x.shape[3], "size": size, "taps": taps}
    _dispatch(cb, "log_filter", out.size, [x, out, p])


# The taps are symmetric and the padding is size//2, so the filter is its own adjoint.
register("log_filter", check=_log_check, encode=_log_encode, reference=R.log_filter,
         grad=lambda g, out, x, sigma, size: (apply("log_filter", g, sigma=sigma, size=size),),
         kernels=["pool.log_filter"], dtypes=D.FLOATS)
