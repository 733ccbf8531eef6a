"""Matrix products and fully connected layers (kernels/matmul.metal).

`matmul` batches over leading axes as np.matmul does. Where every row of a meets the same
matrix b (b of two axes, a not transposed) the batch is one product over all of a's rows;
otherwise each batch item is one product, its operands copied out of their batches and its
result into c's (layout.copy_channels), since a product kernel reads and writes whole buffers.

`linear` takes an optional bias the way `conv2d` does: the op has two or three inputs and the
public `mm.ops.linear(x, w, b=None)` drops a None.
"""

import math

from .. import dtypes as D
from .. import ops as _ops
from ..reference import matmul as R
from ..tensor import Tensor, empty
from . import apply, ensure, groups_for, register
from .broadcast import broadcast_shape, broadcast_strides, sum_to
from .tiling import WIDE, product, split_output, split_reduction, sum_splits


def _encode_product(cb, c, a, b, bias, transpose_a, transpose_b):
    """Dispatch c = op(a)·op(b) (+ bias) for row-major a and b; transposes become strides."""
    m, n = c.shape
    k = a.shape[0] if transpose_a else a.shape[1]
    a_m, a_k = (1, a.shape[1]) if transpose_a else (a.shape[1], 1)
    b_k, b_n = (1, b.shape[1]) if transpose_b else (b.shape[1], 1)
    grid = (groups_for(n, WIDE.cols), groups_for(m, WIDE.rows))
    # A long reduction into a few tiles (a linear layer's logit, 6272 features to 1) is split
    # across threadgroups: one threadgroup would otherwise walk all of it alone.
    splits, chunk = split_reduction(k, grid[0] * grid[1], min_chunk=64)
    partial = split_output(c, splits)
    params = dict(m=m, n=n, k=k, a_m=a_m, a_k=a_k, b_k=b_k, b_n=b_n, has_bias=int(bias is not None), chunk=chunk)
    kernel, threads = product(c.device, "matmul", c.dtype, macs=m * n * k)
    cb.dispatch(kernel, groups=(*grid, splits), threads=threads,
                args=[a, b, b if bias is None else bias, c, partial, params])
    sum_splits(cb, kernel.library, partial, c, splits)


def _check_matrix(op, what, s):
    ensure(len(s) == 2 and min(s) >= 1, op, f"{what} must be a non-empty matrix, got shape {s}")
    ensure(s[0] * s[1] < 2**31, op, f"{what} has 2^31 elements or more")


# ---------------------------------------------------------------- matmul

def _matmul_check(a, b, transpose_a=False, transpose_b=False):
    """Matrix product op(a)·op(b), op transposing the last two axes where asked; leading axes are
    batch axes, broadcast by NumPy's rules (np.matmul's).

    Args:
        a, b: (..., m, k) and (..., k, n): matrices, or batches of them.
        transpose_a, transpose_b: use aᵀ or bᵀ (like MPSMatrixMultiplication's transposeLeft/Right).

    Example:
        >>> a, b = mm.tensor(np.ones((2, 3))), mm.tensor(np.ones((3, 4)))
        >>> mm.ops.matmul(a, b).shape
        (2, 4)
        >>> mm.ops.matmul(mm.tensor(np.ones((5, 2, 3))), b).shape   # a batch of 5
        (5, 2, 4)
    """
    op = "matmul"
    for what, s in (("a", a), ("b", b)):
        ensure(len(s) >= 2 and min(s) >= 1, op,
               f"{what} must be a non-empty matrix or batch of matrices, got shape {s}")
        ensure(math.prod(s) < 2**31, op, f"{what} has 2^31 elements or more")
    ensure(all(x == y or 1 in (x, y) for x, y in zip(a[-3::-1], b[-3::-1])), op,
           f"the batch axes {a[:-2]} of a and {b[:-2]} of b do not broadcast")
    batch = broadcast_shape(op, a[:-2], b[:-2])
    (m, ka), (kb, n) = (a[-1:-3:-1] if transpose_a else a[-2:]), (b[-1:-3:-1] if transpose_b else b[-2:])
    ensure(ka == kb, op, f"inner dimensions differ: {'aᵀ' if transpose_a else 'a'} is {m}×{ka}, "
                         f"{'bᵀ' if transpose_b else 'b'} is {kb}×{n}")
    ensure(math.prod(batch) * m * n < 2**31, op, "the product has 2^31 elements or more")
    return batch + (m, n), dict(transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))


def _view(t, shape):
    """t's buffer seen in another shape of the same size (no copy)."""
    return Tensor(t.buffer, shape, t.dtype)


def _matmul_encode(cb, c, a, b, *, transpose_a, transpose_b):
    m, n = c.shape[-2:]
    if len(b.shape) == 2 and not transpose_a:
        rows = c.size // n
        _encode_product(cb, _view(c, (rows, n)), _view(a, (rows, a.shape[-1])), b, None, False, transpose_b)
        return
    batch = c.shape[:-2]
    count = math.prod(batch)
    # each operand's matrix: the tensor itself where it has one, else a buffer its batch items are copied to
    operands = []
    for t in (a, b):
        items = math.prod(t.shape[:-2])
        size = t.shape[-2] * t.shape[-1]
        matrix = _view(t, t.shape[-2:]) if items == 1 else empty(t.shape[-2:], t.device, t.dtype)
        operands.append((t, items, size, matrix, broadcast_strides(t.shape[:-2], batch)))
    c_matrix = _view(c, (m, n)) if count == 1 else empty((m, n), c.device, c.dtype)
    for i in range(count):
        index = [(i // math.prod(batch[d + 1:])) % batch[d] for d in range(len(batch))]
        for t, items, size, matrix, strides in operands:
            if items > 1:
                item = sum(x * s for x, s in zip(index, strides))
                _copy_item(cb, _view(t, (1, items, size)), _view(matrix, (1, 1, size)), item, 0)
        _encode_product(cb, c_matrix, operands[0][3], operands[1][3], None, transpose_a, transpose_b)
        if count > 1:
            _copy_item(cb, _view(c_matrix, (1, 1, m * n)), _view(c, (1, count, m * n)), 0, i)


def _copy_item(cb, src, dst, src_item, dst_item):
    """dst[0, dst_item] = src[0, src_item] for (1, items, size) views of two buffers."""
    size = src.shape[2]
    p = {"count": size, "channels": 1, "inner": size, "src_channels": src.shape[1], "src_offset": src_item,
         "dst_channels": dst.shape[1], "dst_offset": dst_item}
    k = src.device.library("layout").kernel(D.kernel_name("copy_channels", src.dtype))
    cb.dispatch(k, groups=groups_for(size, 256), threads=256, args=[src, dst, p])


def _matmul_grad(g, c, a, b, *, transpose_a, transpose_b):
    # C = op(a)·op(b): d op(a) = G·op(b)ᵀ and d op(b) = op(a)ᵀ·G, transposed back where op
    # transposes, summed over the batch axes an operand was broadcast along.
    mm = lambda x, y, tx, ty: apply("matmul", x, y, transpose_a=tx, transpose_b=ty)  # noqa: E731
    if len(b.shape) == 2 and len(a.shape) > 2 and not transpose_a:
        # every row of a met the same b, as one product: b's gradient is one product over all rows too
        rows = lambda t: apply("reshape", t, shape=(-1, t.shape[-1]))  # noqa: E731
        da = mm(g, b, False, not transpose_b)
        return da, (mm(rows(g), rows(a), True, False) if transpose_b else mm(rows(a), rows(g), True, False))
    if not transpose_a and not transpose_b:
        da, db = mm(g, b, False, True), mm(a, g, True, False)
    elif not transpose_a:  # C = a·bᵀ
        da, db = mm(g, b, False, False), mm(g, a, True, False)
    elif not transpose_b:  # C = aᵀ·b
        da, db = mm(b, g, False, True), mm(a, g, False, False)
    else:  # C = aᵀ·bᵀ
        da, db = mm(b, g, True, True), mm(g, a, True, True)
    return sum_to(da, a.shape), sum_to(db, b.shape)


register("matmul", check=_matmul_check, encode=_matmul_encode, reference=R.matmul, grad=_matmul_grad,
         kernels=["matmul.matmul", "matmul.matmul_mma", "matmul.sum_splits", "layout.copy_channels"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- linear

def _linear_check(x, w, b=None):
    """A fully connected layer, x·wᵀ + b."""
    op = "linear"
    _check_matrix(op, "input", x)
    _check_matrix(op, "weights", w)
    ensure(x[1] == w[1], op, f"input has {x[1]} features, the weights (out, in) = {w} expect {w[1]}")
    ensure(b is None or tuple(b) == (w[0],), op, f"bias must have shape ({w[0]},), got {b}")
    ensure(x[0] * w[0] < 2**31, op, "the output has 2^31 elements or more")
    return (x[0], w[0]), {}


def _linear_encode(cb, y, x, w, b=None):
    _encode_product(cb, y, x, w, b, False, True)


def _linear_grad(g, y, x, w, b=None):
    dx = apply("matmul", g, w)
    dw = apply("matmul", g, x, transpose_a=True)
    return (dx, dw) if b is None else (dx, dw, apply("linear_bias_grad", g))


register("linear", check=_linear_check, encode=_linear_encode, reference=R.linear, grad=_linear_grad,
         kernels=["matmul.matmul", "matmul.matmul_mma", "matmul.sum_splits"], dtypes=D.FLOATS)


def linear(x, w, b=None):
    """A fully connected layer, y = x·wᵀ + b, as in PyTorch.

    Args:
        x: input, (N, in).
        w: weights, (out, in).
        b: optional bias, (out,).

    Returns:
        (N, out).

    Example:
        >>> x, w = mm.tensor(np.ones((4, 3))), mm.tensor(np.ones((2, 3)))
        >>> mm.ops.linear(x, w, mm.tensor(np.zeros(2))).numpy()[0]
        array([3., 3.], dtype=float32)
    """
    return apply("linear", *((x, w) if b is None else (x, w, b)))


_ops.linear = linear  # the registry's entry point would pass b=None on as an input


def _bias_grad_check(g):
    """db of linear: the output gradient summed over the batch."""
    _check_matrix("linear_bias_grad", "output gradient", g)
    return (g[1],), {}


def _bias_grad_encode(cb, db, g):
    rows, cols = g.shape
    k = db.device.library("matmul").kernel(D.kernel_name("linear_bias_grad", db.dtype))
    cb.dispatch(k, groups=groups_for(cols, 256), threads=256, args=[g, db, {"rows": rows, "cols": cols}])


register("linear_bias_grad", check=_bias_grad_check, encode=_bias_grad_encode, reference=R.linear_bias_grad,
         grad=None, kernels=["matmul.linear_bias_grad"], dtypes=D.FLOATS)
