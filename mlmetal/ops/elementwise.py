"""Elementwise ops and activations (kernels/elementwise.metal).

The binary ops (add, sub, mul, div, maximum, minimum, equal) and `where` broadcast their inputs
by NumPy's rules; their gradients sum back over the axes an input was broadcast along
(`broadcast.sum_to`). Same-shaped inputs, the training steps' case, take a kernel without index
arithmetic.

The rest are maps over same-shaped tensors: `_map` registers one from its kernel name,
attribute defaults and gradient rule. The gradient kernels of the activations are ops too
(relu_grad, sigmoid_grad, ...), so a gradient rule is a call like any other.

Every op here takes float32, float16 and bfloat16 storage (its kernels' instances, picked by
`dtypes.kernel_name` from the inputs' dtype): they compute in float and round once, to the
storage type, when they store.
"""

import math
import sys

from .. import dtypes as D
from ..reference import elementwise as R
from . import ShapeError, apply, ensure, groups_for, register
from .broadcast import MAX_DIMS, broadcast_shape, broadcast_strides, merge_axes, padded, sum_to


# ---------------------------------------------------------------- broadcasting

def _broadcast_check(op, *shapes):
    """The output shape of `shapes` broadcast together, checked to fit the kernels' MAX_DIMS merged axes."""
    out = broadcast_shape(op, *shapes)
    merged, _ = merge_axes(out, *(broadcast_strides(s, out) for s in shapes))
    ensure(len(merged) <= MAX_DIMS, op, f"shapes {' and '.join(map(str, shapes))} broadcast along {len(merged)} "
                                        f"separate axes; the kernels take at most {MAX_DIMS}")
    return out


def _broadcast_params(out_shape, *shapes):
    """BroadcastParams of elementwise.metal: the output's merged axes and each input's strides along them."""
    merged, strides = merge_axes(out_shape, *(broadcast_strides(s, out_shape) for s in shapes))
    return {"n": math.prod(out_shape), "dims": len(merged), "sizes": padded([math.prod(s) for s in shapes], 3),
            "shape": padded(merged), "strides": padded([v for s in strides for v in padded(s)], 3 * MAX_DIMS)}


def _encode_broadcast(cb, kernel, out, *inputs):
    k = out.device.library("elementwise").kernel(D.kernel_name(kernel, inputs[0].dtype))
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256,
                args=[*inputs, out, _broadcast_params(out.shape, *(x.shape for x in inputs))])


def _binary(name, doc, grad, same_shape_kernel=True):
    """Register a binary op broadcasting its inputs (kernels `<name>_broadcast` and, for same-shaped
    inputs, `<name>`; `<name>` alone when it has no same-shape kernel)."""
    def check(x, y):
        return _broadcast_check(name, x, y), {}

    def encode(cb, out, x, y):
        if same_shape_kernel and x.shape == y.shape:
            k = out.device.library("elementwise").kernel(D.kernel_name(name, x.dtype))
            cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[x, y, out, {"n": out.size}])
        else:
            _encode_broadcast(cb, f"{name}_broadcast" if same_shape_kernel else name, out, x, y)

    check.__doc__ = doc
    kernels = [f"elementwise.{name}", f"elementwise.{name}_broadcast"] if same_shape_kernel else [f"elementwise.{name}"]
    register(name, check=check, encode=encode, reference=getattr(R, name), grad=grad, kernels=kernels, dtypes=D.FLOATS)


_binary("add", """out = x + y, broadcast by NumPy's rules.

    Example:
        >>> z = mm.ops.add(x, b)  # x (N, C, H, W), b (C, 1, 1)
    """, grad=lambda g, out, x, y: (sum_to(g, x.shape), sum_to(g, y.shape)))

_binary("sub", """out = x − y, broadcast by NumPy's rules.

    Example:
        >>> centred = mm.ops.sub(x, mm.ops.mean(x, axis=1, keepdims=True))
    """, grad=lambda g, out, x, y: (sum_to(g, x.shape), apply("scale", sum_to(g, y.shape), s=-1.0)))

_binary("mul", """out = x · y, broadcast by NumPy's rules.

    Example:
        >>> z = mm.ops.mul(x, y)
    """, grad=lambda g, out, x, y: (sum_to(apply("mul", g, y), x.shape), sum_to(apply("mul", g, x), y.shape)))


def _div_grad(g, out, x, y):
    q = apply("div", g, y)  # dx = g/y; dy = −g·x/y² = −(g/y)·out
    return sum_to(q, x.shape), apply("scale", sum_to(apply("mul", q, out), y.shape), s=-1.0)


_binary("div", """out = x / y, broadcast by NumPy's rules (IEEE division: x/0 is ±inf, 0/0 NaN).

    Example:
        >>> probs = mm.ops.div(counts, mm.ops.sum(counts, axis=1, keepdims=True))
    """, grad=_div_grad)

_binary("maximum", """The larger of x and y, broadcast; NaN if either is NaN (PyTorch's maximum, not fmax).

    Its gradient goes to the larger input, half to each where they tie.

    Example:
        >>> y = mm.ops.maximum(x, floor)
    """, grad=lambda g, out, x, y: (sum_to(apply("maximum_grad", g, x, y), x.shape),
                                    sum_to(apply("maximum_grad", g, y, x), y.shape)))

_binary("minimum", """The smaller of x and y, broadcast; NaN if either is NaN (PyTorch's minimum, not fmin).

    Its gradient goes to the smaller input, half to each where they tie.

    Example:
        >>> y = mm.ops.minimum(x, ceiling)
    """, grad=lambda g, out, x, y: (sum_to(apply("minimum_grad", g, x, y), x.shape),
                                    sum_to(apply("minimum_grad", g, y, x), y.shape)))

# A comparison: no gradient flows through it (None for both inputs, as through PyTorch's bool result).
_binary("equal", """1.0 where x == y, else 0.0 (in x and y's dtype), broadcast; NaN equals nothing.

    Example:
        >>> is_max = mm.ops.equal(x, mm.ops.max(x, axis=1, keepdims=True))
    """, grad=lambda g, out, x, y: (None, None), same_shape_kernel=False)


def _ternary(name, doc, grad):
    """Register an op of three inputs broadcast together (kernel `name`)."""
    def check(x, y, z):
        return _broadcast_check(name, x, y, z), {}

    def encode(cb, out, x, y, z):
        _encode_broadcast(cb, name, out, x, y, z)

    check.__doc__ = doc
    register(name, check=check, encode=encode, reference=getattr(R, name), grad=grad, kernels=[f"elementwise.{name}"],
             dtypes=D.FLOATS)


_ternary("where", """a where cond is nonzero, else b; the three broadcast by NumPy's rules.

    Args:
        cond: nonzero (NaN included) for true; of a and b's dtype.
        a, b: the values taken where cond is true and false.

    Example:
        >>> y = mm.ops.where(mask, x, mm.ops.scale(x, s=0.1))
    """, grad=lambda g, out, cond, a, b: (None, sum_to(apply("where_grad", g, cond, branch=0), a.shape),
                                          sum_to(apply("where_grad", g, cond, branch=1), b.shape)))

_ternary("maximum_grad", "dL/da of maximum(a, b) given dL/dout `g`, at out's shape: g where a > b, g/2 where a == b.",
         grad=None)
_ternary("minimum_grad", "dL/da of minimum(a, b) given dL/dout `g`, at out's shape: g where a < b, g/2 where a == b.",
         grad=None)


def _where_grad_check(g, cond, branch):
    """dL/da (branch 0) or dL/db (branch 1) of where(cond, a, b) at the output's shape: g where cond
    picks that branch, else 0."""
    ensure(branch in (0, 1), "where_grad", f"branch must be 0 (a) or 1 (b), got {branch!r}")
    return _broadcast_check("where_grad", g, cond), {"branch": int(branch)}


def _where_grad_encode(cb, out, g, cond, branch):
    _encode_broadcast(cb, "where_grad_" + "ab"[branch], out, g, cond)


register("where_grad", check=_where_grad_check, encode=_where_grad_encode, reference=R.where_grad, grad=None,
         kernels=["elementwise.where_grad_a", "elementwise.where_grad_b"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- storage types

def _astype_check(x, dtype):
    """x converted to floating storage type `dtype` (float32, float16 or bfloat16), rounding to
    nearest even; the same dtype copies.

    Args:
        x: any shape, any floating dtype.
        dtype: the result's dtype: a NumPy dtype, `mm.float16`, or a name ("bfloat16").

    Example:
        >>> h = mm.ops.astype(x, dtype="bfloat16")  # or x.astype(mm.bfloat16)
    """
    try:
        d = D.as_dtype(dtype)
    except TypeError as e:
        raise ShapeError(f"astype: {e}") from None
    ensure(d in D.FLOATS, "astype", f"dtype {d} is not a floating storage type ({', '.join(map(str, D.FLOATS))})")
    return x, {"dtype": d.name}


def _astype_encode(cb, out, x, dtype):
    k = out.device.library("elementwise").kernel(f"cast_{D.SHORT[x.dtype]}_{D.SHORT[out.dtype]}")
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[x, out, {"n": out.size}])


register("astype", check=_astype_check, encode=_astype_encode, reference=R.astype,
         grad=lambda g, out, x, dtype: (apply("astype", g, dtype=x.dtype.name),),
         kernels=[f"elementwise.cast_{a}_{b}" for a in D.SHORT.values() for b in D.SHORT.values()], dtypes=D.FLOATS)


def _map(name, n_inputs, doc, grad, kernel=None, validate=None, **defaults):
    """Register an op mapping `n_inputs` same-shaped tensors to one, elementwise.

    Its float attributes (with `defaults`; None: the attribute must be given) are also the
    fields of the kernel's constant struct, after `n`, the element count; `validate(attrs)`
    checks them together.
    """
    kernel = kernel or name

    def check(*shapes, **attrs):
        ensure(len(shapes) == n_inputs, name, f"takes {n_inputs} tensor(s), got {len(shapes)}")
        ensure(len(set(shapes)) == 1, name, f"shapes {' and '.join(map(str, shapes))} differ")
        unknown = set(attrs) - set(defaults)
        if unknown:
            raise TypeError(f"unexpected attribute(s) {', '.join(sorted(unknown))}")
        missing = [k for k, v in defaults.items() if v is None and k not in attrs]
        if missing:
            raise TypeError(f"missing attribute(s) {', '.join(missing)}")
        norm = {k: float(attrs.get(k, v)) for k, v in defaults.items()}
        if validate:
            validate(norm)
        return shapes[0], norm

    def encode(cb, out, *inputs, **attrs):
        k = out.device.library("elementwise").kernel(D.kernel_name(kernel, inputs[0].dtype))
        cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[*inputs, out, {"n": out.size, **attrs}])

    check.__doc__ = doc
    register(name, check=check, encode=encode, reference=getattr(R, name), grad=grad,
             kernels=[f"elementwise.{kernel}"], dtypes=D.FLOATS)


_map("scale", 1, """out = s * x.

    Args:
        x: any shape.
        s: the scale factor.

    Example:
        >>> half = mm.ops.scale(x, s=0.5)
    """, grad=lambda g, out, x, s: (apply("scale", g, s=s),), s=1.0)

_map("linear_activation", 1, """out = a * x + b (MPS's linear neuron; not the fully connected `linear`).

    Args:
        x: any shape.
        a, b: slope and offset.

    Example:
        >>> y = mm.ops.linear_activation(x, a=2.0, b=-1.0)
    """, grad=lambda g, out, x, a, b: (apply("scale", g, s=a),), a=1.0, b=0.0)

_map("relu", 1, """max(x, 0); its gradient is 0 at x = 0.

    Example:
        >>> y = mm.ops.relu(x)
    """, grad=lambda g, out, x: (apply("relu_grad", g, out),))

# relu's rule reads its output, which is > 0 exactly where its input is (NaN where it is NaN):
# the input is then free once relu has run, and a graph can fuse a conv2d into the relu after it.
_map("relu_grad", 2, "dL/dx of relu given dL/dout `g` and relu's input or output x (> 0 at the same places).",
     grad=None)

# The gradient of a relu whose output has two readers, relu_grad(g + h, x) in one pass: the sum
# rounded to the storage type as add rounds it, so the bits are add's then relu_grad's. A graph's
# plan fuses add → relu_grad into it (mlmetal/graph/fusion.py).
_map("relu_grad_add", 3, "relu_grad(g + h, x): dL/dx of relu given the two parts g and h of dL/dout.", grad=None)

_map("leaky_relu", 1, """x where x > 0, else slope * x.

    Args:
        x: any shape.
        slope: the negative-side slope.

    Example:
        >>> y = mm.ops.leaky_relu(x, slope=0.2)
    """, grad=lambda g, out, x, slope: (apply("leaky_relu_grad", g, x, slope=slope),), slope=0.01)

_map("leaky_relu_grad", 2, "dL/dx of leaky_relu given dL/dout `g` and the input x.", grad=None, slope=0.01)

_map("sigmoid", 1, """1 / (1 + exp(-x)).

    Example:
        >>> p = mm.ops.sigmoid(logits)
    """, grad=lambda g, out, x: (apply("sigmoid_grad", g, out),))

_map("sigmoid_grad", 2, "dL/dx of sigmoid given dL/dout `g` and the output y.", grad=None)

_map("tanh", 1, """The hyperbolic tangent (kernel `tanh_activation`, which cannot shadow metal::tanh).

    Example:
        >>> y = mm.ops.tanh(x)
    """, grad=lambda g, out, x: (apply("tanh_grad", g, out),), kernel="tanh_activation")

_map("tanh_grad", 2, "dL/dx of tanh given dL/dout `g` and the output y.", grad=None)


# ---------------------------------------------------------------- softmax over channels

def _softmax_params(shape):
    inner = math.prod(shape[2:])
    return {"positions": shape[0] * inner, "channels": shape[1], "inner": inner}


def _softmax_check(x):
    """Softmax over the channels: dim 1 of (N, C, H, W), or of (N, C).

    Example:
        >>> probs = mm.ops.softmax(logits)  # probs.numpy().sum(axis=1) == 1
    """
    ensure(len(x) >= 2, "softmax", f"expected an (N, C, ...) input, got shape {x}")
    return x, {}


def _softmax_encode(cb, out, x):
    p = _softmax_params(x.shape)
    k = x.device.library("elementwise").kernel(D.kernel_name("softmax", x.dtype))
    cb.dispatch(k, groups=groups_for(p["positions"], 256), threads=256, args=[x, out, p])


register("softmax", check=_softmax_check, encode=_softmax_encode, reference=R.softmax,
         grad=lambda g, out, x: (apply("softmax_grad", g, out),), kernels=["elementwise.softmax"], dtypes=D.FLOATS)


def _softmax_grad_check(g, y):
    """dL/dx of softmax given dL/dout `g` and the output y."""
    ensure(g == y, "softmax_grad", f"shapes {g} and {y} differ")
    return _softmax_check(y)


def _softmax_grad_encode(cb, out, g, y):
    p = _softmax_params(y.shape)
    k = y.device.library("elementwise").kernel(D.kernel_name("softmax_grad", y.dtype))
    cb.dispatch(k, groups=groups_for(p["positions"], 256), threads=256, args=[g, y, out, p])


register("softmax_grad", check=_softmax_grad_check, encode=_softmax_grad_encode, reference=R.softmax_grad,
         grad=None, kernels=["elementwise.softmax_grad"], dtypes=D.FLOATS)


# ---------------------------------------------------------------- math

_map("exp", 1, """e^x.

    Example:
        >>> y = mm.ops.exp(x)
    """, grad=lambda g, out, x: (apply("mul", g, out),), kernel="exp_op")

_map("log", 1, """The natural logarithm (−inf at 0, NaN below).

    Example:
        >>> y = mm.ops.log(x)
    """, grad=lambda g, out, x: (apply("div", g, x),), kernel="log_op")

_map("sqrt", 1, """√x (NaN below 0).

    Example:
        >>> y = mm.ops.sqrt(x)
    """, grad=lambda g, out, x: (apply("div", apply("scale", g, s=0.5), out),), kernel="sqrt_op")

# d/dx x^(−1/2) = −½·x^(−3/2) = −½·out³
_map("rsqrt", 1, """1/√x.

    Example:
        >>> inv_std = mm.ops.rsqrt(variance)
    """, grad=lambda g, out, x: (apply("scale", apply("mul", g, apply("pow", out, exponent=3.0)), s=-0.5),),
     kernel="rsqrt_op")

_map("abs", 1, """|x|; its gradient is 0 at x = 0.

    Example:
        >>> y = mm.ops.abs(x)
    """, grad=lambda g, out, x: (apply("abs_grad", g, x),), kernel="abs_op")

_map("abs_grad", 2, "dL/dx of abs given dL/dout `g` and the input x: g·sign(x), 0 where x is 0 or NaN.", grad=None)


def _bounds_in_order(attrs):
    ensure(attrs["min"] <= attrs["max"], "clamp", f"min = {attrs['min']} is above max = {attrs['max']}")


_map("clamp", 1, """x limited to [min, max]; NaN stays NaN.

    Args:
        x: any shape.
        min, max: the bounds (default −inf and inf: no bound on that side).

    Example:
        >>> y = mm.ops.clamp(x, min=0.0, max=6.0)
    """, grad=lambda g, out, x, min, max: (apply("clamp_grad", g, x, min=min, max=max),), kernel="clamp_op",
     validate=_bounds_in_order, min=-math.inf, max=math.inf)

_map("clamp_grad", 2, "dL/dx of clamp given dL/dout `g` and the input x: g where min ≤ x ≤ max, else 0.", grad=None,
     validate=_bounds_in_order, min=-math.inf, max=math.inf)


def _pow_grad(g, out, x, exponent):
    if exponent == 0:  # x^0 = 1: no gradient (not 0·x^−1, which is NaN at 0)
        return (None,)
    return (apply("scale", apply("mul", g, apply("pow", x, exponent=exponent - 1)), s=exponent),)


_map("pow", 1, """x to a scalar power, as PyTorch: a negative base to an integer power keeps the sign that
    power gives it, to any other power it is NaN; x^0 = 1.

    Args:
        x: any shape.
        exponent: the power.

    Example:
        >>> sq = mm.ops.pow(x, exponent=2.0)
    """, grad=_pow_grad, kernel="power", exponent=None)

_map("gelu", 1, """x·Φ(x), Φ the standard normal distribution function: the exact GELU (PyTorch's default,
    approximate="none"; not the tanh approximation).

    Example:
        >>> y = mm.ops.gelu(x)
    """, grad=lambda g, out, x: (apply("gelu_grad", g, x),))

_map("gelu_grad", 2, "dL/dx of gelu given dL/dout `g` and the input x: g·(Φ(x) + x·φ(x)).", grad=None)

_map("silu", 1, """x·σ(x), σ the sigmoid (also called swish).

    Example:
        >>> y = mm.ops.silu(x)
    """, grad=lambda g, out, x: (apply("silu_grad", g, x),))

_map("silu_grad", 2, "dL/dx of silu given dL/dout `g` and the input x: g·σ(x)·(1 + x·(1 − σ(x))).", grad=None)



def _probability(attrs):
    ensure(0.0 <= attrs["p"] <= 1.0, "dropout", f"p must be a probability in [0, 1], got {attrs['p']}")


_map("dropout", 2, """x·(u ≥ p)/(1 − p): inverted dropout with the mask drawn as u, uniform in [0, 1) (mm.nn.Dropout
    draws u on the device each step). Dropped elements are x·0, so NaN stays NaN as in PyTorch;
    p = 1 gives zeros.

    Args:
        x: any shape.
        u: x's shape and dtype, uniform numbers in [0, 1): x[i] is kept where u[i] ≥ p.
        p: the probability of dropping an element.

    Example:
        >>> u = mm.ops.random_tensor(shape=x.shape, generator=gen, distribution=mm.random.Uniform())
        >>> y = mm.ops.dropout(x, u, p=0.1)
    """, grad=lambda g, out, x, u, p: (apply("dropout", g, u, p=p), None), validate=_probability, p=None)

def neg(x, /):
    """−x (the op `scale` with s = −1).

    Example:
        >>> y = mm.ops.neg(x)
    """
    return apply("scale", x, s=-1.0)


sys.modules[__package__].neg = neg
