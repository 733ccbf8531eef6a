"""References of kernels/optim.metal: one torch.optim step, returning the new parameter and state;
the loss scaler's seed and state update."""

import numpy as np


def scale_of(loss_scale) -> np.float32:
    """The scale a loss scaler's state holds: word 0's bits as a float32."""
    return np.asarray(loss_scale, np.uint32).reshape(-1)[:1].view(np.float32)[0]


def _unscaled(grad, loss_scale):
    return grad if loss_scale is None else grad * (1 / np.float64(scale_of(loss_scale)))


def sgd_update(param, grad, momentum_buffer, lr, momentum, weight_decay, nesterov, loss_scale=None):
    g = _unscaled(grad, loss_scale) + weight_decay * param
    b = momentum * momentum_buffer + g
    step = g + momentum * b if nesterov else b
    return param - lr * step, b


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, loss_scale=None):
    g = _unscaled(grad, loss_scale) + weight_decay * param
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - beta2**step) + eps
    return param - lr / (1 - beta1**step) * m / denom, m, v


def loss_scale_gradient(loss_scale, loss):
    return np.full(np.shape(loss), scale_of(loss_scale), np.float64)


def loss_scale_update(loss_scale, growth_factor, backoff_factor, growth_interval):
    # float32 products, as the kernel's: one rounding each
    state = np.array(loss_scale, np.uint32)
    scale, finite, clean, skipped, steps = scale_of(state), *(int(w) for w in state[1:])
    if finite:
        clean += 1
        if clean >= growth_interval:
            with np.errstate(over="ignore"):
                grown = np.float32(scale * np.float32(growth_factor))
            scale = grown if np.isfinite(grown) else scale
            clean = 0
    else:
        with np.errstate(under="ignore"):
            scale, clean, skipped = np.float32(scale * np.float32(backoff_factor)), 0, skipped + 1
    out = np.array([0, 1, clean, skipped, (steps + 1) % 2**32], np.uint32)
    out[:1] = np.float32(scale).reshape(1).view(np.uint32)
    return out
