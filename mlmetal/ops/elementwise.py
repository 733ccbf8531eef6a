"""Elementwise ops and activations (kernels/elementwise.metal).

Most ops here are maps over same-shaped float32 tensors: `_map` registers one from its
kernel name, attribute defaults and gradient rule. The gradient kernels of the activations
are ops too (relu_grad, sigmoid_grad, ...), so a gradient rule is a call like any other.
"""

import math

from ..reference import elementwise as R
from . import apply, ensure, groups_for, register


def _add_check(x, y):
    """out = x + y, for tensors of the same shape."""
    ensure(x == y, "add", f"shapes {x} and {y} differ")
    return x, {}


def _add_encode(cb, out, x, y):
    k = out.device.library("elementwise").kernel("add")
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[x, y, out, {"n": out.size}])


register("add", check=_add_check, encode=_add_encode, reference=R.add,
         grad=lambda g, out, x, y: (g, g), kernels=["elementwise.add"])


def _map(name, n_inputs, doc, grad, kernel=None, **defaults):
    """Register an op mapping `n_inputs` same-shaped tensors to one, elementwise.

    Its float attributes (with `defaults`) are also the fields of the kernel's constant
    struct, after `n`, the element count.
    """
    kernel = kernel or name

    def check(*shapes, **attrs):
        ensure(len(shapes) == n_inputs, name, f"takes {n_inputs} tensor(s), got {len(shapes)}")
        ensure(len(set(shapes)) == 1, name, f"shapes {' and '.join(map(str, shapes))} differ")
        unknown = set(attrs) - set(defaults)
        if unknown:
            raise TypeError(f"unexpected attribute(s) {', '.join(sorted(unknown))}")
        return shapes[0], {k: float(attrs.get(k, v)) for k, v in defaults.items()}

    def encode(cb, out, *inputs, **attrs):
        k = out.device.library("elementwise").kernel(kernel)
        cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[*inputs, out, {"n": out.size, **attrs}])

    check.__doc__ = doc
    register(name, check=check, encode=encode, reference=getattr(R, name), grad=grad,
             kernels=[f"elementwise.{kernel}"])


_map("mul", 2, """out = x * y, elementwise, for tensors of the same shape.

    Example:
        >>> z = mm.ops.mul(x, y)
    """, grad=lambda g, out, x, y: (apply("mul", g, y), apply("mul", g, x)))

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
    """, grad=lambda g, out, x: (apply("relu_grad", g, x),))

_map("relu_grad", 2, "dL/dx of relu given dL/dout `g` and the input x.", grad=None)

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
    k = x.device.library("elementwise").kernel("softmax")
    cb.dispatch(k, groups=groups_for(p["positions"], 256), threads=256, args=[x, out, p])


register("softmax", check=_softmax_check, encode=_softmax_encode, reference=R.softmax,
         grad=lambda g, out, x: (apply("softmax_grad", g, out),), kernels=["elementwise.softmax"])


def _softmax_grad_check(g, y):
    """dL/dx of softmax given dL/dout `g` and the output y."""
    ensure(g == y, "softmax_grad", f"shapes {g} and {y} differ")
    return _softmax_check(y)


def _softmax_grad_encode(cb, out, g, y):
    p = _softmax_params(y.shape)
    k = y.device.library("elementwise").kernel("softmax_grad")
    cb.dispatch(k, groups=groups_for(p["positions"], 256), threads=256, args=[g, y, out, p])


register("softmax_grad", check=_softmax_grad_check, encode=_softmax_grad_encode, reference=R.softmax_grad,
         grad=None, kernels=["elementwise.softmax_grad"])
