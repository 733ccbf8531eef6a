"""Optimizer updates (kernels/optim.metal): one step of torch.optim.SGD or torch.optim.Adam.

How an in-place update fits the registry: the ops are functional — `mm.ops.sgd_update(p, g,
buf, ...)` returns new (param, state...) tensors and leaves its inputs alone, so it runs,
tests and records like any op. The kernels read each element before writing it, so their
outputs may alias their inputs; `update_in_place` encodes the same op with the parameter and
state tensors as its outputs, which is what an optimizer calls every step. Not differentiable
(grad=None).
"""

from ..reference import optim as R
from . import REGISTRY, ensure, groups_for, infer, register


def _check_same(op, shapes, names):
    for s, name in zip(shapes[1:], names[1:]):
        ensure(s == shapes[0], op, f"{name} has shape {s}; the parameter has {shapes[0]}")


def _sgd_check(param, grad, momentum_buffer, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """One torch.optim.SGD step (dampening 0): returns the new (param, momentum_buffer).

    Args:
        param, grad, momentum_buffer: same-shaped tensors; the buffer starts as zeros.
        lr: learning rate.
        momentum: momentum factor (0: plain SGD; the buffer then just holds the step).
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum.

    Example:
        >>> p, buf = mm.ops.sgd_update(p, g, buf, lr=0.1, momentum=0.9)
        >>> mm.ops.optim.update_in_place("sgd_update", p, g, buf, lr=0.1, momentum=0.9)
    """
    _check_same("sgd_update", (param, grad, momentum_buffer), ("param", "grad", "momentum_buffer"))
    ensure(lr >= 0 and momentum >= 0 and weight_decay >= 0, "sgd_update",
           f"lr, momentum and weight_decay must not be negative, got {lr}, {momentum}, {weight_decay}")
    ensure(not nesterov or momentum > 0, "sgd_update", "Nesterov momentum needs momentum > 0")
    attrs = {"lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay), "nesterov": bool(nesterov)}
    return [param, param], attrs


def _sgd_encode(cb, outs, param, grad, momentum_buffer, lr, momentum, weight_decay, nesterov):
    k = param.device.library("optim").kernel("sgd_update")
    p = {"n": param.size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": int(nesterov)}
    cb.dispatch(k, groups=groups_for(param.size, 256), threads=256, args=[param, grad, momentum_buffer, *outs, p])


register("sgd_update", check=_sgd_check, encode=_sgd_encode, reference=R.sgd_update, grad=None,
         kernels=["optim.sgd_update"])


def _adam_check(param, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1):
    """One torch.optim.Adam step (bias-corrected, L2 weight decay): returns the new (param, m, v).

    Args:
        param, grad, m, v: same-shaped tensors; m and v (the moment estimates) start as zeros.
        lr: learning rate.
        beta1, beta2: decay rates of the first and second moments.
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient.
        step: this step's number, counting from 1 (for the bias corrections).

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
             "weight_decay": float(weight_decay), "step": int(step)}
    return [param, param, param], attrs


def _adam_encode(cb, outs, param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    k = param.device.library("optim").kernel("adam_update")
    p = {"n": param.size, "lr": lr, "beta1": beta1, "beta2": beta2, "one_minus_beta1": 1 - beta1,
         "one_minus_beta2": 1 - beta2, "eps": eps, "weight_decay": weight_decay,
         "bias_correction1": 1 - beta1**step, "bias_correction2": 1 - beta2**step}
    cb.dispatch(k, groups=groups_for(param.size, 256), threads=256, args=[param, grad, m, v, *outs, p])


register("adam_update", check=_adam_check, encode=_adam_encode, reference=R.adam_update, grad=None,
         kernels=["optim.adam_update"])


def update_in_place(name, param, grad, *state, **attrs):
    """Run optimizer op `name` writing the new parameter and state into `param` and `state`.

    Args:
        name: an optimizer's update op (`mm.optim.Adam.op` is "adam_update"), one of kernels/optim.metal's.
        param, grad, *state: the op's inputs (state: the momentum buffer, or m and v).
        **attrs: the op's attributes.

    Example:
        >>> update_in_place("adam_update", w, dw, m, v, lr=1e-3, step=t)
    """
    ensure(name in REGISTRY and REGISTRY[name].kernels[0].startswith("optim."), name, "is not an optimizer update")
    op = REGISTRY[name]
    _, attrs = infer(name, param, grad, *state, **attrs)
    cb = param.device.command_buffer()
    op.encode(cb, (param, *state), param, grad, *state, **attrs)
    cb.commit()
    return (param, *state)
