"""Separable losses (kernels/loss.metal) with MPSCNNLossDescriptor's semantics.

`mm.ops.<loss>(y, t[, w], reduction="mean", weight=1.0, ...)`: y the predictions (or
logits), t the labels of the same shape, w optional per-element weights of the unreduced
loss's shape. The elementwise loss is weight·w·loss(y, t); the reduction is one of

- "none": the elementwise losses (y's shape; (N, 1, H, W) for softmax cross-entropy,
  whose loss is summed over the channels of each position);
- "sum"; "mean": the sum over the number of loss elements;
- "sum_by_nonzero_weights": the sum over the number of nonzero effective weights (0 if none),

and a reduced loss is a one-element tensor of shape (1,) (MPS: a 1×1×1 loss image). Labels and weights get no gradient
(they are constants to MPS as well); the gradient of y is the op `<loss>_grad`.
Softmax cross-entropy takes probability (e.g. one-hot) labels over dim 1, smoothed to
t·(1 − s) + s/C; sigmoid cross-entropy smooths to t·(1 − s) + s/2.

y, t and w may be float32, float16 or bfloat16 (all one type), and so is the gradient dy. The loss
itself is float32 whatever their type: the kernels compute and sum in float, and the loss is
rounded once, to float32 (a value to scale, compare and log, as under `mm.autocast`, which runs
losses in float32); its gradient g is float32 accordingly.
"""

import math
import numbers

from .. import dtypes as D
from ..reference import loss as R
from ..tensor import empty
from . import apply, ensure, groups_for, register

REDUCTIONS = {"sum": 0, "mean": 1, "sum_by_nonzero_weights": 2, "none": None}


def _loss_shape(name, y):
    """The unreduced loss's shape for predictions of shape y."""
    if name == "softmax_cross_entropy_loss":
        return y[:1] + (1,) + y[2:]
    return y


def _check_inputs(name, y, t, w, reduction, weight):
    ensure(y == t, name, f"predictions {y} and labels {t} differ in shape")
    ensure(reduction in REDUCTIONS, name, f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    ensure(isinstance(weight, numbers.Real), name, f"weight must be a number, got {weight!r}")
    if name == "softmax_cross_entropy_loss":
        ensure(len(y) >= 2, name, f"expected (N, C, ...) logits, got shape {y}")
    shape = _loss_shape(name, y)
    ensure(w is None or w == shape, name, f"weights must have the unreduced loss's shape {shape}, got {w}")
    return shape


def _params(name, y, has_weights, weight, delta=1.0, label_smoothing=0.0):
    inner = math.prod(y.shape[2:])
    channels = y.shape[1] if len(y.shape) > 1 else 1
    n = y.shape[0] * inner if name == "softmax_cross_entropy_loss" else y.size
    return {"n": n, "has_weights": int(has_weights), "weight": weight, "delta": delta, "smoothing": label_smoothing,
            "channels": channels, "inner": inner, "g_stride": 1, "inv_divisor": 1.0}


def _encode_reduce(cb, out, values, weights, p, reduction):
    """loss_partial then loss_finish: out[0] = the reduced `values`."""
    lib = values.device.library("loss")
    groups = min(256, groups_for(p["n"], 256))
    partial = empty((groups, 2), values.device)
    counting = {"n": p["n"], "has_weights": p["has_weights"], "weight": p["weight"]}
    cb.dispatch(lib.kernel(D.kernel_name("loss_partial", weights.dtype)), groups=groups, threads=256,
                args=[values, weights, partial, counting])
    cb.dispatch(lib.kernel("loss_finish"), groups=1, threads=256,
                args=[partial, out, {"groups": groups, "mode": REDUCTIONS[reduction], "n": float(p["n"])}])


def _register_loss(name, doc, **extra):
    """Register the loss `name` and its gradient op `<name>_grad`; `extra` are attribute defaults."""

    def attrs_of(reduction, weight, given):
        unknown = set(given) - set(extra)
        if unknown:
            raise TypeError(f"unexpected attribute(s) {', '.join(sorted(unknown))}")
        out = {"reduction": reduction, "weight": float(weight)}
        for k, default in extra.items():
            out[k] = float(given.get(k, default))
        ensure(out.get("delta", 1.0) > 0, name, f"delta must be positive, got {out.get('delta')}")
        ensure(0 <= out.get("label_smoothing", 0.0) <= 1, name,
               f"label_smoothing must be in [0, 1], got {out.get('label_smoothing')}")
        return out

    def check(y, t, w=None, *, reduction="mean", weight=1.0, **given):
        shape = _check_inputs(name, y, t, w, reduction, weight)
        return (shape if reduction == "none" else (1,)), attrs_of(reduction, weight, given)

    def encode(cb, out, y, t, w=None, *, reduction, weight, **attrs):
        p = _params(name, y, w is not None, weight, **attrs)
        weights = w if w is not None else y  # a placeholder the kernel never reads
        values = out if reduction == "none" else empty(_loss_shape(name, y.shape), y.device)
        k = y.device.library("loss").kernel(D.kernel_name(name, y.dtype))
        cb.dispatch(k, groups=groups_for(p["n"], 256), threads=256, args=[y, t, weights, values, p])
        if reduction != "none":
            _encode_reduce(cb, out, values, weights, p, reduction)

    def grad(g, out, y, t, w=None, **attrs):
        weights = () if w is None else (w,)
        return (apply(f"{name}_grad", g, y, t, *weights, **attrs), None) + (None,) * len(weights)

    def grad_check(g, y, t, w=None, *, reduction, weight, **given):
        shape = _check_inputs(name, y, t, w, reduction, weight)
        want = shape if reduction == "none" else (1,)
        ensure(g == want, f"{name}_grad", f"the loss gradient must have the loss's shape {want}, got {g}")
        return y, attrs_of(reduction, weight, given)

    def grad_encode(cb, dy, g, y, t, w=None, *, reduction, weight, **attrs):
        p = _params(name, y, w is not None, weight, **attrs)
        weights = w if w is not None else y
        lib = y.device.library("loss")
        if reduction != "none":
            p["g_stride"] = 0
        if reduction == "mean":
            p["inv_divisor"] = 1.0 / p["n"]
        elif reduction == "sum_by_nonzero_weights":
            scale = empty((1,), y.device)  # g / (number of nonzero weights), computed on the device
            counting = {"n": p["n"], "has_weights": p["has_weights"], "weight": weight}
            cb.dispatch(lib.kernel(D.kernel_name("loss_nonzero_scale", y.dtype)), groups=1, threads=256,
                        args=[g, weights, scale, counting])
            g = scale
        cb.dispatch(lib.kernel(D.kernel_name(f"{name}_grad", y.dtype)), groups=groups_for(p["n"], 256), threads=256,
                    args=[g, y, t, weights, dy, p])

    check.__doc__ = doc
    grad_check.__doc__ = f"dL/dy of {name} given dL/dloss `g` (the loss's shape; (1,) when reduced)."
    register(name, check=check, encode=encode, reference=getattr(R, name), grad=grad,
             kernels=[f"loss.{name}", "loss.loss_partial", "loss.loss_finish"], dtypes=D.FLOATS, float32_outputs=(0,))
    register(f"{name}_grad", check=grad_check, encode=grad_encode, reference=getattr(R, f"{name}_grad"), grad=None,
             kernels=[f"loss.{name}_grad", "loss.loss_nonzero_scale"], dtypes=D.FLOATS, float32_inputs=(0,))


_COMMON_ARGS = """
    Args:
        y: predictions, any shape.
        t: labels, y's shape.
        w: optional per-element weights, y's shape.
        reduction: "none", "sum", "mean" or "sum_by_nonzero_weights".
        weight: a scalar weight."""

_register_loss("mse_loss", f"""Mean squared error: weight·w·(y − t)², reduced.
{_COMMON_ARGS}

    Example:
        >>> loss = mm.ops.mse_loss(y, t, reduction="mean")
    """)

_register_loss("mae_loss", f"""Mean absolute error (L1): weight·w·|y − t|, reduced; its gradient is 0 where y = t.
{_COMMON_ARGS}

    Example:
        >>> loss = mm.ops.mae_loss(y, t, reduction="sum")
    """)

_register_loss("huber_loss", f"""Huber loss: ½d² where |d| ≤ delta, else delta·(|d| − ½delta), d = y − t.
{_COMMON_ARGS}
        delta: where the loss turns from quadratic to linear (MPS's default 1).

    Example:
        >>> loss = mm.ops.huber_loss(y, t, delta=0.5)
    """, delta=1.0)

_register_loss("sigmoid_cross_entropy_loss", f"""Sigmoid cross-entropy of logits y against labels t in [0, 1].

    Labels are smoothed to t·(1 − label_smoothing) + label_smoothing/2 (MPS).
{_COMMON_ARGS}
        label_smoothing: in [0, 1].

    Example:
        >>> d_loss = mm.ops.sigmoid_cross_entropy_loss(d_real, ones, reduction="mean")
    """, label_smoothing=0.0)

_register_loss("softmax_cross_entropy_loss", """Softmax cross-entropy over dim 1: −Σ_c t_c·log softmax(y)_c per (n, position).

    Labels are probabilities over the channels (one-hot for classes), smoothed to
    t·(1 − label_smoothing) + label_smoothing/C (MPS). The unreduced loss has shape
    (N, 1, H, W) (or (N, 1) for (N, C) logits), which is also the weights' shape.

    Args:
        y: logits, (N, C, ...).
        t: labels, y's shape.
        w: optional weights per (n, position): (N, 1, ...).
        reduction: "none", "sum", "mean" (over N·positions) or "sum_by_nonzero_weights".
        weight: a scalar weight.
        label_smoothing: in [0, 1].

    Example:
        >>> loss = mm.ops.softmax_cross_entropy_loss(logits, one_hot, label_smoothing=0.1)
    """, label_smoothing=0.0)


def _initial_gradient_check(loss):
    """Ones of the loss's shape: the gradient dL/dL that starts a backward pass (MPS's initial gradient).

    Example:
        >>> g = mm.ops.initial_gradient(loss)  # a reduced loss gives a (1,) tensor holding 1.0
    """
    return loss, {}


def _initial_gradient_encode(cb, out, loss):
    k = out.device.library("loss").kernel(D.kernel_name("initial_gradient", out.dtype))
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[out, {"n": out.size}])


# Not differentiable: its value does not depend on its input's.
register("initial_gradient", check=_initial_gradient_check, encode=_initial_gradient_encode,
         reference=R.initial_gradient, grad=None, kernels=["loss.initial_gradient"], dtypes=D.FLOATS)
