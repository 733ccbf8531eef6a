"""References of kernels/optim.metal: one torch.optim step, returning the new parameter and state."""

import numpy as np


def sgd_update(param, grad, momentum_buffer, lr, momentum, weight_decay, nesterov):
    g = grad + weight_decay * param
    b = momentum * momentum_buffer + g
    step = g + momentum * b if nesterov else b
    return param - lr * step, b


def adam_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    g = grad + weight_decay * param
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - beta2**step) + eps
    return param - lr / (1 - beta1**step) * m / denom, m, v
