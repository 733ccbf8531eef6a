"""References of kernels/norm.metal: instance, group, layer and batch normalisation."""

import numpy as np


def _normalise(x, axes, eps):
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _channel(v, ndim):
    """A per-channel vector shaped to broadcast against (N, C, ...)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _norm_grad(g, x, gamma, axes, eps):
    xh = _normalise(x, axes, eps)
    rstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    dx = _channel(gamma, x.ndim) * rstd * (g - g.mean(axis=axes, keepdims=True)
                                         - xh * (g * xh).mean(axis=axes, keepdims=True))
    param_axes = (0,) + tuple(range(2, x.ndim))
    return dx, (g * xh).sum(axis=param_axes), g.sum(axis=param_axes)


def instance_norm(x, gamma, beta, eps, activation=None):
    axes = tuple(range(2, x.ndim))
    y = _normalise(x, axes, eps) * _channel(gamma, x.ndim) + _channel(beta, x.ndim)
    return np.maximum(y, 0.0) if activation == "relu" else y


def instance_norm_grad(g, x, gamma, eps):
    return _norm_grad(g, x, gamma, tuple(range(2, x.ndim)), eps)


def _grouped(x, num_groups):
    """x as (N, G, C/G·S): group norm's groups along the last axis."""
    return x.reshape(x.shape[0], num_groups, -1)


def _dx(gh, x, axes, eps):
    """dL/dx of normalising x over `axes`, given dL/dx̂ = gh (g·γ)."""
    rstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    xh = _normalise(x, axes, eps)
    return rstd * (gh - gh.mean(axis=axes, keepdims=True) - xh * (gh * xh).mean(axis=axes, keepdims=True))


def group_norm(x, gamma, beta, num_groups, eps):
    xh = _normalise(_grouped(x, num_groups), (2,), eps).reshape(x.shape)
    return xh * _channel(gamma, x.ndim) + _channel(beta, x.ndim)


def group_norm_grad(g, x, gamma, num_groups, eps):
    gh = _grouped(g * _channel(gamma, x.ndim), num_groups)
    dx = _dx(gh, _grouped(x, num_groups), (2,), eps).reshape(x.shape)
    xh = _normalise(_grouped(x, num_groups), (2,), eps).reshape(x.shape)
    param_axes = (0,) + tuple(range(2, x.ndim))
    return dx, (g * xh).sum(axis=param_axes), g.sum(axis=param_axes)


def layer_norm(x, gamma, beta, eps):
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    return _normalise(x, axes, eps) * gamma + beta


def layer_norm_grad(g, x, gamma, eps):
    axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    batch_axes = tuple(range(x.ndim - gamma.ndim))
    xh = _normalise(x, axes, eps)
    return _dx(g * gamma, x, axes, eps), (g * xh).sum(axis=batch_axes), g.sum(axis=batch_axes)


def batch_norm(x, gamma, beta, running_mean, running_var, training, momentum, eps):
    if training:
        xh = _normalise(x, (0,) + tuple(range(2, x.ndim)), eps)
    else:
        xh = (x - _channel(running_mean, x.ndim)) / np.sqrt(_channel(running_var, x.ndim) + eps)
    return xh * _channel(gamma, x.ndim) + _channel(beta, x.ndim)


def batch_norm_running_stats(x, running_mean, running_var, momentum):
    """The running (mean, var) after one training step, as torch.nn.BatchNorm2d updates them."""
    axes = (0,) + tuple(range(2, x.ndim))
    m = x.size // x.shape[1]
    return ((1 - momentum) * running_mean + momentum * x.mean(axis=axes),
            (1 - momentum) * running_var + momentum * x.var(axis=axes) * m / (m - 1))


def batch_norm_grad(g, x, gamma, eps):
    return _norm_grad(g, x, gamma, (0,) + tuple(range(2, x.ndim)), eps)


def batch_norm_inference_grad(g, x, gamma, running_mean, running_var, eps):
    rstd = 1 / np.sqrt(_channel(running_var, x.ndim) + eps)
    xh = (x - _channel(running_mean, x.ndim)) * rstd
    axes = (0,) + tuple(range(2, x.ndim))
    return g * _channel(gamma, x.ndim) * rstd, (g * xh).sum(axis=axes), g.sum(axis=axes)
