"""Reductions over any axes (kernels/reduce.metal): sum, mean, max, min, var.

Each takes `axis` (None: every axis; an int; or a sequence of them, negative counting from the
end) and `keepdims`. A pass folds at most SERIAL terms one after another in a thread, then (over
an innermost reduced axis, on GPUs) a threadgroup's tree; a reduction too long for one pass writes
partial results that further passes fold, so the rounding error of a sum of L terms is bounded by
`error_depth(L)`·2⁻²⁴·Σ|x| (Higham's bound for a summation of that depth) however long L is.
Max and min round nothing. `var` takes two passes over x: the mean, then the squares of the
deviations from it.

Each takes float32, float16 and bfloat16 storage: the kernels fold in float, partial results
between passes (and var's mean) are float32 buffers, and only the result rounds to the storage
type, once.

Gradients: sum and mean broadcast g back (`broadcast_to`); max and min share g equally among
the elements that equal the result (as PyTorch's amax and MLX do); var's is 2(x − mean)/(L − c).
"""

import math
import numbers

from .. import dtypes as D
from ..reference import reduce as R
from ..tensor import empty
from . import apply, ensure, register
from .broadcast import MAX_DIMS, contiguous_strides, padded

SERIAL = 64  # terms a thread folds one after another in a pass
GROUP_THREADS = 256  # a threadgroup of reduce_groups: its tree adds log2(256) = 8 levels


def error_depth(length: int) -> int:
    """A bound on the additions any term of a sum of `length` terms passes through: each pass of
    `_encode_reduce` folds at most SERIAL terms in order and then a threadgroup's tree of 8
    levels, and leaves at most 1/SERIAL of the length to the next."""
    passes = 0
    while length > 1:
        passes += 1
        length = -(-length // SERIAL)
    return passes * (SERIAL + 8)


def _axes(op, shape, axis) -> tuple[int, ...]:
    """`axis` as a sorted tuple of distinct axes of `shape`, each in range."""
    if axis is None:
        return tuple(range(len(shape)))
    given = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    ensure(all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in given), op,
           f"axis must be None, an int or a sequence of ints, got {axis!r}")
    for a in given:
        ensure(-len(shape) <= a < len(shape), op, f"axis {a} is out of range for a tensor of {len(shape)} axes {shape}")
    axes = sorted(int(a) % len(shape) for a in given)
    ensure(len(set(axes)) == len(axes), op, f"axis {axis!r} names an axis twice")
    return tuple(axes)


def _reduced_shape(shape, axes, keepdims):
    return tuple(1 if d in axes else n for d, n in enumerate(shape)) if keepdims else \
        tuple(n for d, n in enumerate(shape) if d not in axes)


def _layout(shape, axes):
    """x's kept and reduced axes as (sizes, strides) each, size-1 axes dropped and neighbours of
    one kind merged, and whether the innermost is reduced."""
    parts = []  # [reduced?, size, stride]
    for d, (n, s) in enumerate(zip(shape, contiguous_strides(shape))):
        if n == 1:
            continue
        if parts and parts[-1][0] == (d in axes):
            parts[-1][1] *= n
            parts[-1][2] = s
        else:
            parts.append([d in axes, n, s])
    kept = [(n, s) for r, n, s in parts if not r]
    reduced = [(n, s) for r, n, s in parts if r]
    return kept, reduced, bool(parts) and parts[-1][0]


def _check(op, x, axis=None, keepdims=False):
    axes = _axes(op, x, axis)
    kept, reduced, _ = _layout(x, axes)
    ensure(len(kept) <= MAX_DIMS and len(reduced) <= MAX_DIMS, op,
           f"axes {axes} of {x} alternate between kept and reduced more than {MAX_DIMS} times")
    ensure(math.prod(x) < 2**31, op, f"tensors of 2^31 elements or more are not supported, got {x}")
    return _reduced_shape(x, axes, bool(keepdims)), {"axis": axes, "keepdims": bool(keepdims)}




def _instance(name, x_dtype, out_dtype):
    """The instance of reduce kernel `name` reading `x_dtype` and writing `out_dtype`: `name_f16`
    for float16 to float16, `name_f16_f32` for float16 to float32 partials, and so on."""
    if x_dtype == out_dtype:
        return D.kernel_name(name, x_dtype)
    return f"{name}_{D.SHORT[x_dtype]}_{D.SHORT[out_dtype]}"


def _encode_reduce(cb, out, x, axes, kind, scale=1.0, centre=None):
    """out = scale · (x folded over `axes` by `kind`: sum, squares (about `centre`, float32), max
    or min), in as many passes as the length needs; the partial results are float32."""
    kept, reduced, inner_reduced = _layout(x.shape, axes)
    outputs, length = math.prod(n for n, _ in kept), math.prod(n for n, _ in reduced)
    # A threadgroup a row where barriers are cheap (GPUs: its threads read neighbouring addresses);
    # on cpu, where each barrier switches every thread's fiber, a thread a chunk is faster (a
    # (4096, 512) sum over rows: 4.5 ms against 127). (Device.cheap_barriers comes with main's
    # issue-21 merge; until then getattr reads False.)
    groups = inner_reduced and length > SERIAL and out.device.cheap_barriers
    chunk = min(length, GROUP_THREADS * SERIAL if groups else SERIAL)
    splits = -(-length // chunk)
    target = out if splits == 1 else empty((splits, outputs), out.device, D.float32)
    p = {"outputs": outputs, "length": length, "chunk": chunk, "splits": splits, "size": x.size,
         "centres": 0 if centre is None else outputs,
         "scale": scale if splits == 1 else 1.0, "kept_dims": len(kept), "reduced_dims": len(reduced),
         "kept_shape": padded(n for n, _ in kept), "kept_stride": padded(s for _, s in kept),
         "reduced_shape": padded(n for n, _ in reduced), "reduced_stride": padded(s for _, s in reduced)}
    lib = out.device.library("reduce")
    args = [x, x if centre is None else centre, target, p]
    if groups:
        cb.dispatch(lib.kernel(_instance(f"{kind}_groups", x.dtype, target.dtype)), groups=splits * outputs,
                    threads=GROUP_THREADS, args=args)
    else:
        cb.dispatch(lib.kernel(_instance(f"{kind}_threads", x.dtype, target.dtype)), groups=-(-splits * outputs // 256),
                    threads=256, args=args)
    if splits > 1:  # the partials of squares are summed
        _encode_reduce(cb, out, target, (0,), "sum" if kind == "squares" else kind, scale)


def _length(shape, axes) -> int:
    return math.prod(shape[d] for d in axes)


def _kept(t, x_shape, axes, keepdims):
    """A reduction's output (or its gradient) `t` with the reduced axes kept as size 1."""
    shape = _reduced_shape(x_shape, axes, True)
    return t if keepdims or tuple(t.shape) == shape else apply("reshape", t, shape=shape)


def _kernels(kind):
    """The kernel templates of `kind`, by their float32 instances (the registry checks the float16 and
    bfloat16 ones; `_instance` names those to and from float32 partial results)."""
    return [f"reduce.{kind}_threads", f"reduce.{kind}_groups"]


# ---------------------------------------------------------------- sum, mean

def _sum_check(x, axis=None, keepdims=False):
    """The sum over `axis` (None: all axes).

    Args:
        x: any shape.
        axis: None, an int or a sequence of ints (negative count from the end).
        keepdims: keep the reduced axes as size 1.

    Example:
        >>> mm.ops.sum(x, axis=(0, 2, 3)).shape   # x (N, C, H, W)
        (C,)
    """
    return _check("sum", x, axis, keepdims)


register("sum", check=_sum_check, encode=lambda cb, out, x, axis, keepdims: _encode_reduce(cb, out, x, axis, "sum"),
         reference=R.sum,
         grad=lambda g, out, x, axis, keepdims: (apply("broadcast_to", _kept(g, x.shape, axis, keepdims),
                                                       shape=x.shape),),
         kernels=_kernels("sum"), dtypes=D.FLOATS)


def _mean_check(x, axis=None, keepdims=False):
    """The mean over `axis` (None: all axes); see `sum`.

    Example:
        >>> loss = mm.ops.mean(mm.ops.mul(d, d))
    """
    return _check("mean", x, axis, keepdims)


def _mean_encode(cb, out, x, axis, keepdims):
    _encode_reduce(cb, out, x, axis, "sum", scale=1.0 / _length(x.shape, axis))


def _mean_grad(g, out, x, axis, keepdims):
    share = apply("scale", _kept(g, x.shape, axis, keepdims), s=1.0 / _length(x.shape, axis))
    return (apply("broadcast_to", share, shape=x.shape),)


register("mean", check=_mean_check, encode=_mean_encode, reference=R.mean, grad=_mean_grad, kernels=_kernels("sum"),
         dtypes=D.FLOATS)


# ---------------------------------------------------------------- max, min

def _extreme_grad(g, out, x, axis, keepdims):
    """g shared equally among the elements equal to the result (NaN if the result is NaN)."""
    hit = apply("equal", x, _kept(out, x.shape, axis, keepdims))
    count = apply("sum", hit, axis=axis, keepdims=True)
    return (apply("mul", hit, apply("div", _kept(g, x.shape, axis, keepdims), count)),)


def _max_check(x, axis=None, keepdims=False):
    """The largest element over `axis` (None: all axes); NaN where a NaN is among them, as in PyTorch.

    Its gradient is shared equally among the elements equal to the result (as PyTorch's amax).

    Example:
        >>> peak = mm.ops.max(x, axis=-1, keepdims=True)
    """
    return _check("max", x, axis, keepdims)


register("max", check=_max_check, encode=lambda cb, out, x, axis, keepdims: _encode_reduce(cb, out, x, axis, "max"),
         reference=R.max, grad=_extreme_grad, kernels=_kernels("max"), dtypes=D.FLOATS)


def _min_check(x, axis=None, keepdims=False):
    """The smallest element over `axis` (None: all axes); see `max`.

    Example:
        >>> low = mm.ops.min(x, axis=0)
    """
    return _check("min", x, axis, keepdims)


register("min", check=_min_check, encode=lambda cb, out, x, axis, keepdims: _encode_reduce(cb, out, x, axis, "min"),
         reference=R.min, grad=_extreme_grad, kernels=_kernels("min"), dtypes=D.FLOATS)


# ---------------------------------------------------------------- var

def _var_check(x, axis=None, keepdims=False, correction=1):
    """The variance over `axis`: Σ(x − mean)² / (L − correction) over the L elements reduced.

    Args:
        x, axis, keepdims: as `sum`.
        correction: 1 (default) for the unbiased estimate, 0 for the population variance
            (PyTorch's `correction`; NumPy's and MLX's `ddof`).

    Example:
        >>> v = mm.ops.var(x, axis=(0, 2, 3), correction=0)
    """
    shape, attrs = _check("var", x, axis, keepdims)
    ensure(isinstance(correction, numbers.Integral) and not isinstance(correction, bool) and correction >= 0, "var",
           f"correction must be a non-negative int, got {correction!r}")
    length = _length(x, attrs["axis"])
    ensure(correction < length, "var", f"correction {correction} leaves no degrees of freedom in {length} element(s)")
    return shape, dict(attrs, correction=int(correction))


def _var_encode(cb, out, x, axis, keepdims, correction):
    length = _length(x.shape, axis)
    mean = empty((out.size,), out.device, D.float32)  # float, whatever x's storage type
    _encode_reduce(cb, mean, x, axis, "sum", scale=1.0 / length)
    _encode_reduce(cb, out, x, axis, "squares", scale=1.0 / (length - correction), centre=mean)


def _var_grad(g, out, x, axis, keepdims, correction):
    deviation = apply("sub", x, apply("mean", x, axis=axis, keepdims=True))
    share = apply("scale", _kept(g, x.shape, axis, keepdims), s=2.0 / (_length(x.shape, axis) - correction))
    return (apply("mul", deviation, share),)


register("var", check=_var_check, encode=_var_encode, reference=R.var, grad=_var_grad,
         kernels=_kernels("sum") + _kernels("squares"), dtypes=D.FLOATS)
