"""Gram matrices of feature maps, for style losses (kernels/gram.metal)."""

import math

from .. import dtypes as D
from ..reference import gram as R
from . import apply, ensure, groups_for, register
from ..runtime import source as S
from .tiling import MEDIUM, MMA_THREADS, WIDE, Tiling, matrix_policy, partial_for, product, split_reduction

_GRAM = S.Source.from_file(S.KERNEL_DIR / "gram.metal").constants


def _check_features(op, x):
    ensure(len(x) == 4 and min(x) >= 1, op, f"features must be 4-D (N, C, H, W) and non-empty, got shape {x}")
    ensure(math.prod(x) < 2**31, op, "features of 2^31 elements or more are not supported")


def _gram_check(x, alpha=1.0):
    """Gram matrix of each image's channels: G[n] = α·F·Fᵀ with F = x[n] as C × (H·W).

    Args:
        x: features, (N, C, H, W).
        alpha: scale (MPS's default is 1; style transfer often uses 1/(H·W)).

    Returns:
        (N, C, C).

    Example:
        >>> x = mm.tensor(np.random.randn(2, 8, 16, 16))
        >>> mm.ops.gram(x, alpha=1 / 256).shape
        (2, 8, 8)
    """
    _check_features("gram", x)
    ensure(isinstance(alpha, (int, float)) and math.isfinite(alpha), "gram", f"alpha must be a finite number, got {alpha!r}")
    n, c = x[:2]
    ensure(n * c * c < 2**31, "gram", "the Gram matrices have 2^31 elements or more")
    return (n, c, c), dict(alpha=float(alpha))


# gram_small_mma's tiles (kernels/gram.metal): on simdgroup matrices, a Gram of at most this many
# channels is one such tile rather than a quarter of a wide one.
SMALL = Tiling("_small", _GRAM["GRAM_SMALL"], _GRAM["GRAM_SMALL"], MMA_THREADS)


def fitted_tiling(device, c: int, dtype, narrow: Tiling) -> Tiling:
    """`narrow` for `c` channels that fit its rows on simdgroup matrices, else WIDE: a Gram (SMALL)
    or its gradient (MEDIUM) of few channels would leave most of a wide tile's rows padding."""
    return narrow if c <= narrow.rows and matrix_policy(device, dtype) else WIDE


def gram_tiling(device, c: int, dtype) -> Tiling:
    """The tiling of a Gram of `c` channels."""
    return fitted_tiling(device, c, dtype, SMALL)


def _gram_encode(cb, g, x, *, alpha):
    n, c, h, w = x.shape
    t = gram_tiling(g.device, c, g.dtype)
    tiles = groups_for(c, t.rows)
    splits, chunk = split_reduction(h * w, n * tiles * (tiles + 1) // 2)
    k, threads = product(g.device, "gram", g.dtype, t)
    partial = partial_for(g, splits)
    mirror = int(partial is g)  # else gram_sum_splits mirrors the sum of the slices
    cb.dispatch(k, groups=(tiles, tiles, n * splits), threads=threads,
                args=[x, partial, dict(batch=n, c=c, hw=h * w, alpha=alpha, chunk=chunk, mirror=mirror)])
    if not mirror:
        cb.dispatch(k.library.kernel(D.kernel_name("gram_sum_splits", g.dtype)), groups=groups_for(g.size, 256),
                    threads=256, args=[partial, g, dict(batch=n, c=c, splits=splits)])


register("gram", check=_gram_check, encode=_gram_encode, reference=R.gram,
         grad=lambda g, out, x, *, alpha: (apply("gram_grad", g, x, alpha=alpha),),
         kernels=["gram.gram", "gram.gram_mma", "gram.gram_small_mma", "gram.gram_sum_splits"], dtypes=D.FLOATS)


def _gram_grad_check(g, x, alpha=1.0):
    """dx of gram from the Gram gradient g: α·(g + gᵀ)·F per image."""
    op = "gram_grad"
    _check_features(op, x)
    ensure(tuple(g) == (x[0], x[1], x[1]), op, f"Gram gradient must have shape {(x[0], x[1], x[1])}, got {g}")
    return tuple(x), dict(alpha=float(alpha))


def _gram_grad_encode(cb, dx, g, x, *, alpha):
    n, c, h, w = x.shape
    t = fitted_tiling(dx.device, c, dx.dtype, MEDIUM)
    k, threads = product(dx.device, "gram_grad", dx.dtype, t)
    cb.dispatch(k, groups=(groups_for(h * w, t.cols), groups_for(c, t.rows), n), threads=threads,
                args=[g, x, dx, dict(batch=n, c=c, hw=h * w, alpha=alpha)])


register("gram_grad", check=_gram_grad_check, encode=_gram_grad_encode, reference=R.gram_grad,
         grad=None, kernels=["gram.gram_grad", "gram.gram_grad_mma", "gram.gram_grad_medium_mma"], dtypes=D.FLOATS)
