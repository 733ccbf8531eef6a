"""Nearest and bilinear upsampling by an integer factor (kernels/resample.metal), NCHW images
stored as float32, float16 or bfloat16 (nearest copies values; bilinear and the gradients
compute in float and round once).

Bilinear uses PyTorch's align_corners=False: output pixel j samples the input at
max((j + ½)/s − ½, 0), so the image's edges, not its edge pixels' centres, line up.
"""

from .. import dtypes as D
from ..reference import resample as R
from . import apply, ensure, groups_for, register

MODES = ("nearest", "bilinear")


def _check_attrs(op, scale, mode):
    ensure(isinstance(scale, int) and not isinstance(scale, bool) and scale >= 1, op,
           f"scale must be a positive integer, got {scale!r}")
    ensure(mode in MODES, op, f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return {"scale": int(scale), "mode": mode}


def _upsample_check(x, scale=2, mode="nearest"):
    """Upsample an NCHW image by an integer factor, nearest or bilinear.

    Args:
        x: (N, C, H, W).
        scale: the factor, a positive integer (2 in the U-Net's decoder).
        mode: "nearest" or "bilinear" (align_corners=False, as PyTorch).

    Example:
        >>> y = mm.ops.upsample(x, 2, mode="bilinear")  # (N, C, 2H, 2W)
    """
    ensure(len(x) == 4, "upsample", f"expected an NCHW input, got shape {x}")
    attrs = _check_attrs("upsample", scale, mode)
    return (x[0], x[1], x[2] * scale, x[3] * scale), attrs


def _params(count, h, w, scale):
    return {"count": count, "h": h, "w": w, "oh": h * scale, "ow": w * scale, "scale": scale}


def _upsample_encode(cb, out, x, scale, mode):
    k = x.device.library("resample").kernel(D.kernel_name(f"upsample_{mode}", x.dtype))
    n = x.size if mode == "nearest" else out.size  # nearest runs a thread per input pixel
    cb.dispatch(k, groups=groups_for(n, 256), threads=256, args=[x, out, _params(n, *x.shape[2:], scale)])


register("upsample", check=_upsample_check, encode=_upsample_encode, reference=R.upsample,
         grad=lambda g, out, x, scale, mode: (apply("upsample_grad", g, scale=scale, mode=mode),),
         kernels=["resample.upsample_nearest", "resample.upsample_bilinear"], dtypes=D.FLOATS)



def _upsample_grad_check(g, scale, mode):
    """dL/dx of upsample given dL/dout `g`, whose H and W are multiples of `scale`."""
    ensure(len(g) == 4, "upsample_grad", f"expected an NCHW gradient, got shape {g}")
    attrs = _check_attrs("upsample_grad", scale, mode)
    ensure(g[2] % scale == 0 and g[3] % scale == 0, "upsample_grad",
           f"gradient size {g[2]}×{g[3]} is not a multiple of the scale {scale}")
    return (g[0], g[1], g[2] // scale, g[3] // scale), attrs


def _upsample_grad_encode(cb, dx, g, scale, mode):
    k = g.device.library("resample").kernel(D.kernel_name(f"upsample_{mode}_grad", g.dtype))
    cb.dispatch(k, groups=groups_for(dx.size, 256), threads=256, args=[g, dx, _params(dx.size, *dx.shape[2:], scale)])


register("upsample_grad", check=_upsample_grad_check, encode=_upsample_grad_encode, reference=R.upsample_grad,
         grad=None, kernels=["resample.upsample_nearest_grad", "resample.upsample_bilinear_grad"], dtypes=D.FLOATS)
