"""Transposed 2-D convolution, through the convolution ops (kernels/conv.metal).

A transposed convolution is the input gradient of the convolution it transposes: conv_transpose2d
(x, w) is conv2d_input_grad(x, w) for the image size the convolution of stride, padding and
dilation would take back to x's. So it dispatches that op's kernels (its GEMMs and their matmul
precision policy included), which add the bias as they store, and its gradients are the
convolution's other passes with the roles turned: dx = conv2d(g, w), dw = conv2d_weight_grad
(x, g), db = conv2d_bias_grad(g).
"""

import sys

from .. import dtypes as D
from . import REGISTRY, apply, conv, ensure, pair, register
from ..reference import conv_transpose as R


def _attrs(op, stride, padding, output_padding, dilation, groups):
    stride, padding, dilation = pair(stride, op, "stride"), pair(padding, op, "padding"), pair(dilation, op, "dilation")
    output_padding = pair(output_padding, op, "output_padding")
    ensure(min(stride) >= 1 and min(dilation) >= 1, op, f"stride and dilation must be positive, got {stride} and {dilation}")
    ensure(min(padding) >= 0 and min(output_padding) >= 0, op,
           f"padding and output_padding must be non-negative, got {padding} and {output_padding}")
    # PyTorch allows output_padding < max(stride, dilation); below the stride, every output row
    # is one the convolution reads, which conv2d_input_grad computes
    ensure(all(o < s for o, s in zip(output_padding, stride)), op,
           f"output_padding {output_padding} must be smaller than the stride {stride}")
    ensure(isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1, op,
           f"groups must be a positive int, got {groups!r}")
    return dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups)


def _conv_attrs(a):
    """The attributes of the convolution this one transposes."""
    return {k: a[k] for k in ("stride", "padding", "dilation", "groups")}


def _check(x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1, groups=1):
    """Transposed 2-D convolution (PyTorch's conv_transpose2d) of NCHW images."""
    op = "conv_transpose2d"
    a = _attrs(op, stride, padding, output_padding, dilation, groups)
    ensure(len(x) == 4 and min(x) >= 1, op, f"input must be 4-D (N, C, H, W) and non-empty, got shape {x}")
    ensure(len(w) == 4 and min(w) >= 1, op, f"weights must be 4-D (Cin, Cout/groups, KH, KW) and non-empty, got shape {w}")
    ensure(w[0] == x[1], op, f"input has {x[1]} channels, the weights (Cin, Cout/groups, KH, KW) = {w} expect {w[0]}")
    ensure(x[1] % a["groups"] == 0, op, f"{x[1]} input channels are not divisible by groups={a['groups']}")
    cout = w[1] * a["groups"]
    ensure(b is None or tuple(b) == (cout,), op, f"bias must have shape ({cout},), got {b}")
    size = tuple((n - 1) * s - 2 * p + d * (k - 1) + o + 1
                 for n, s, p, d, k, o in zip(x[2:], a["stride"], a["padding"], a["dilation"], w[2:], a["output_padding"]))
    ensure(min(size) >= 1, op, f"the output would be {size[0]}×{size[1]}: padding {a['padding']} removes all of it")
    out, _ = REGISTRY["conv2d_input_grad"].check(x, w, input_size=size, **_conv_attrs(a))
    return out, a


def _encode(cb, y, x, w, b=None, *, stride, padding, output_padding, dilation, groups):
    conv.encode_input_grad(cb, y, x, w, b, input_size=y.shape[2:], stride=stride, padding=padding, dilation=dilation,
                           groups=groups)


def _grad(g, y, x, w, b=None, *, stride, padding, output_padding, dilation, groups):
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    dx = apply("conv2d", g, w, **a)
    dw = apply("conv2d_weight_grad", x, g, kernel_size=tuple(w.shape[2:]), **a)
    return (dx, dw) if b is None else (dx, dw, apply("conv2d_bias_grad", g))


register("conv_transpose2d", check=_check, encode=_encode, reference=R.conv_transpose2d, grad=_grad,
         kernels=[*REGISTRY["conv2d_input_grad"].kernels, *REGISTRY["conv2d"].kernels], dtypes=D.FLOATS)


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed 2-D convolution of NCHW images (float32, float16 or bfloat16), as PyTorch's
    conv_transpose2d (the gradient of conv2d with respect to its input): an upsampling layer with
    learned weights.

    Args:
        x: input, (N, Cin, H, W).
        w: weights, (Cin, Cout/groups, KH, KW).
        b: optional bias, (Cout,).
        stride, padding, dilation: an int or an (h, w) pair, those of the convolution transposed.
        output_padding: rows and columns added at the bottom and right, below the stride.
        groups: split the channels into this many independent convolutions.

    Returns:
        (N, Cout, OH, OW) with OH = (H − 1)·stride − 2·padding + dilation·(KH − 1) + output_padding + 1.

    Example:
        >>> x = mm.tensor(np.random.randn(1, 16, 7, 7))
        >>> w = mm.tensor(np.random.randn(16, 8, 4, 4))
        >>> mm.ops.conv_transpose2d(x, w, stride=2, padding=1).shape
        (1, 8, 14, 14)
    """
    return apply("conv_transpose2d", *((x, w) if b is None else (x, w, b)), stride=stride, padding=padding,
                 output_padding=output_padding, groups=groups, dilation=dilation)


sys.modules[__package__].conv_transpose2d = conv_transpose2d  # the registry's entry would pass b=None on as an input
