"""Optimizer updates (kernels/optim.metal): one step of torch.optim.SGD or torch.optim.Adam.

How an in-place update fits the registry: the ops are functional — `mm.ops.sgd_update(p, g,
buf, ...)` returns new (param, state...) tensors and leaves its inputs alone, so it runs,
tests and records like any op. The kernels read each element before writing it, so their
outputs may alias their inputs; `update_in_place` encodes the same op with the parameter and
state tensors as its outputs, which is what an optimizer calls every step. Not differentiable
(grad=None).

Dynamic loss scaling (mlmetal.train.LossScaler) keeps its state on the device, five uint32
words: the scale (a float32's bits), the "every gradient finite" predicate word, the clean steps
since the scale last changed, the skipped steps and all steps. Its ops are here:
`loss_scale_gradient` starts a backward pass from the scale, the updates' `loss_scale`
attribute unscales their gradient on the device, and `loss_scale_update` moves the scale after
a step. The finite check is predicate.py's `predicate_finite`.
"""

import numpy as np

from .. import dtypes as D
from ..reference import optim as R
from ..tensor import Tensor
from . import REGISTRY, ensure, groups_for, infer, register

LOSS_SCALE_WORDS = 5  # scale bits, finite, clean steps, skipped steps, steps
FINITE_WORD = 1  # the predicate word: byte offset 4


def _loss_scale_attr(op, loss_scale) -> dict:
    """`loss_scale` checked (None, or a loss scaler's state tensor), as an attribute: none when None,
    so an update without one has the attributes it always had (saved optimizers among them)."""
    ensure(loss_scale is None or isinstance(loss_scale, Tensor) and loss_scale.dtype == np.uint32
           and loss_scale.shape == (LOSS_SCALE_WORDS,), op,
           f"loss_scale must be None or a loss scaler's state (mm.LossScaler().state), got {loss_scale!r}")
    return {} if loss_scale is None else {"loss_scale": loss_scale}


def _scale_args(param, loss_scale) -> tuple:
    """The buffer the update reads the scale from (any buffer when there is none: it is not read) and the flag."""
    return (loss_scale if loss_scale is not None else param), int(loss_scale is not None)


def _check_same(op, shapes, names):
    for s, name in zip(shapes[1:], names[1:]):
        ensure(s == shapes[0], op, f"{name} has shape {s}; the parameter has {shapes[0]}")


def _sgd_check(param, grad, momentum_buffer, lr, momentum=0.0, weight_decay=0.0, nesterov=False, loss_scale=None):
    """One torch.optim.SGD step (dampening 0): returns the new (param, momentum_buffer).

    Args:
        param, grad, momentum_buffer: same-shaped tensors; the buffer starts as zeros.
        lr: learning rate.
        momentum: momentum factor (0: plain SGD; the buffer then just holds the step).
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum.
        loss_scale: None, or a loss scaler's state (`mm.LossScaler().state`): grad is scaled by
            the scale it holds, and the update divides it out, reading the scale on the device.

    Example:
        >>> p, buf = mm.ops.sgd_update(p, g, buf, lr=0.1, momentum=0.9)
        >>> mm.ops.optim.update_in_place("sgd_update", p, g, buf, lr=0.1, momentum=0.9)
    """
    _check_same("sgd_update", (param, grad, momentum_buffer), ("param", "grad", "momentum_buffer"))
    ensure(lr >= 0 and momentum >= 0 and weight_decay >= 0, "sgd_update",
           f"lr, momentum and weight_decay must not be negative, got {lr}, {momentum}, {weight_decay}")
    ensure(not nesterov or momentum > 0, "sgd_update", "Nesterov momentum needs momentum > 0")
    attrs = {"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
             "nesterov": bool(nesterov), **_loss_scale_attr("sgd_update", loss_scale)}
    return [param, param], attrs


def _sgd_encode(cb, outs, param, grad, momentum_buffer, lr, momentum, weight_decay, nesterov, loss_scale=None):
    k = param.device.library("optim").kernel("sgd_update")
    scale, unscale = _scale_args(param, loss_scale)
    p = {"n": param.size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": int(nesterov),
         "unscale": unscale}
    cb.dispatch(k, groups=groups_for(param.size, 256), threads=256,
                args=[param, grad, momentum_buffer, scale, *outs, p])


register("sgd_update", check=_sgd_check, encode=_sgd_encode, reference=R.sgd_update, grad=None,
         kernels=["optim.sgd_update"])


def _adam_check(param, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1,
                loss_scale=None):
    """One torch.optim.Adam step (bias-corrected, L2 weight decay): returns the new (param, m, v).

    Args:
        param, grad, m, v: same-shaped tensors; m and v (the moment estimates) start as zeros.
        lr: learning rate.
        beta1, beta2: decay rates of the first and second moments.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        step: this step's number, counting from 1 (for the bias corrections).
        loss_scale: None, or a loss scaler's state: the update divides grad by its scale (sgd_update).

    Example:
        >>> p, m, v = mm.ops.adam_update(p, g, m, v, lr=1e-3, step=1)
    """
    _check_same("adam_update", (param, grad, m, v), ("param", "grad", "m", "v"))
    ensure(isinstance(step, int) and not isinstance(step, bool) and step >= 1, "adam_update",
           f"step must be an integer ≥ 1, got {step!r}")
    ensure(0 <= beta1 < 1 and 0 <= beta2 < 1, "adam_update", f"betas must be in [0, 1), got {beta1}, {beta2}")
    ensure(lr >= 0 and eps >= 0 and weight_decay >= 0, "adam_update",
           f"lr, eps and weight_decay must not be negative, got {lr}, {eps}, {weight_decay}")
    attrs = {"lr": float(lr), "beta1": float(beta1), "beta2": float(beta2), "eps": float(eps),
             "weight_decay": float(weight_decay), "step": int(step), **_loss_scale_attr("adam_update", loss_scale)}
    return [param, param, param], attrs


def _adam_encode(cb, outs, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, loss_scale=None):
    k = param.device.library("optim").kernel("adam_update")
    scale, unscale = _scale_args(param, loss_scale)
    p = {"n": param.size, "lr": lr, "beta1": beta1, "beta2": beta2, "one_minus_beta1": 1 - beta1,
         "one_minus_beta2": 1 - beta2, "eps": eps, "weight_decay": weight_decay,
         "bias_correction1": 1 - beta1**step, "bias_correction2": 1 - beta2**step, "unscale": unscale}
    cb.dispatch(k, groups=groups_for(param.size, 256), threads=256, args=[param, grad, m, v, scale, *outs, p])


register("adam_update", check=_adam_check, encode=_adam_encode, reference=R.adam_update, grad=None,
         kernels=["optim.adam_update"])


# ---------------------------------------------------------------- dynamic loss scaling

def _check_state(op, loss_scale):
    ensure(loss_scale == (LOSS_SCALE_WORDS,), op,
           f"the loss scaler's state is {LOSS_SCALE_WORDS} uint32 words, got shape {loss_scale}")


def _loss_scale_gradient_check(loss_scale, loss):
    """The gradient that starts a scaled backward pass: the loss's shape and dtype, holding the
    scale that word 0 of `loss_scale` holds (a loss scaler's state) — read on the device.

    Example:
        >>> g = mm.ops.loss_scale_gradient(scaler.state, loss)  # (1,) holding 65536.0
    """
    _check_state("loss_scale_gradient", loss_scale)
    return loss, {}


def _loss_scale_gradient_encode(cb, out, loss_scale, loss):
    k = out.device.library("optim").kernel(D.kernel_name("loss_scale_gradient", out.dtype))
    cb.dispatch(k, groups=groups_for(out.size, 256), threads=256, args=[loss_scale, out, {"n": out.size}])


# Its value does not depend on the loss's: no gradient reaches either input (LossScaler.scale_loss
# differentiates through it).
register("loss_scale_gradient", check=_loss_scale_gradient_check, encode=_loss_scale_gradient_encode,
         reference=R.loss_scale_gradient, grad=lambda g, out, loss_scale, loss: (None, None),
         kernels=["optim.loss_scale_gradient"], in_dtypes=(np.uint32,), dtypes=D.FLOATS)


def _loss_scale_update_check(loss_scale, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
    """A loss scaler's state after a step (PyTorch's GradScaler.update), decided on the device:
    if the finite word (1) is set, one more clean step, and after `growth_interval` of them the
    scale is multiplied by `growth_factor` (kept if that overflows); if not, the scale is
    multiplied by `backoff_factor`, the step counts as skipped and the clean steps restart.
    The finite word is set again, and the step counted.

    Args:
        loss_scale: the state, 5 uint32 words: scale (float32 bits), finite, clean, skipped, steps.
        growth_factor: above 1.
        backoff_factor: in (0, 1).
        growth_interval: clean steps between growths, a positive integer.

    Example:
        >>> state = mm.ops.loss_scale_update(state, growth_interval=2000)
    """
    _check_state("loss_scale_update", loss_scale)
    ensure(growth_factor > 1, "loss_scale_update", f"growth_factor must be above 1, got {growth_factor}")
    ensure(0 < backoff_factor < 1, "loss_scale_update", f"backoff_factor must be in (0, 1), got {backoff_factor}")
    ensure(isinstance(growth_interval, (int, np.integer)) and not isinstance(growth_interval, bool)
           and 1 <= growth_interval < 2**32, "loss_scale_update",
           f"growth_interval must be a positive integer, got {growth_interval!r}")
    return loss_scale, {"growth_factor": float(growth_factor), "backoff_factor": float(backoff_factor),
                        "growth_interval": int(growth_interval)}


def _loss_scale_update_encode(cb, out, loss_scale, growth_factor, backoff_factor, growth_interval):
    k = out.device.library("optim").kernel("loss_scale_update")
    cb.dispatch(k, groups=1, threads=32, args=[loss_scale, out, {
        "growth_factor": growth_factor, "backoff_factor": backoff_factor, "growth_interval": growth_interval}])


register("loss_scale_update", check=_loss_scale_update_check, encode=_loss_scale_update_encode,
         reference=R.loss_scale_update, grad=None, kernels=["optim.loss_scale_update"], out_dtype=np.uint32,
         in_dtypes=(np.uint32,))


def update_in_place(name, param, grad, *state, **attrs):
    """Run optimizer op `name` writing the new parameter and state into `param` and `state`.

    Args:
        name: an optimizer's update op (`mm.optim.Adam.op` is "adam_update"), one of kernels/optim.metal's.
        param, grad, *state: the op's inputs (state: the momentum buffer, or m and v).
        **attrs: the op's attributes.

    Example:
        >>> update_in_place("adam_update", w, dw, m, v, lr=1e-3, step=t)
    """
    ensure(name in REGISTRY and REGISTRY[name].kernels[0].startswith("optim.") and not name.startswith("loss_scale"),
           name, "is not an optimizer update")
    op = REGISTRY[name]
    _, attrs = infer(name, param, grad, *state, **attrs)
    cb = param.device.command_buffer()
    op.encode(cb, (param, *state), param, grad, *state, **attrs)
    cb.commit()
    return (param, *state)
