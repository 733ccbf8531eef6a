"""References of kernels/loss.metal: separable losses with MPS's weights and reductions."""

import numpy as np


def _weights(shape, w, weight):
    return weight * (np.ones(shape) if w is None else w)


def _reduce(values, w, reduction):
    """MPS's reductions of the weighted elementwise losses `values` (w: their effective weights)."""
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "mean":
        total = total / values.size
    elif reduction == "sum_by_nonzero_weights":
        nonzero = np.count_nonzero(w)
        total = total / nonzero if nonzero else 0.0
    return np.reshape(total, (1,))


def _grad_scale(g, shape, w, reduction):
    """dL/d(elementwise loss): g broadcast over the elements, times the weights, over the divisor."""
    if reduction == "none":
        return g * w
    if reduction == "mean":
        return np.broadcast_to(g / np.prod(shape), shape) * w
    if reduction == "sum_by_nonzero_weights":
        nonzero = np.count_nonzero(w)
        return np.broadcast_to(g / nonzero if nonzero else 0.0 * g, shape) * w
    return np.broadcast_to(g, shape) * w


def _elementwise(loss):
    """The forward reference of an elementwise loss given loss(y, t, **attrs)."""
    def reference(y, t, w=None, *, reduction, weight, **attrs):
        ww = _weights(y.shape, w, weight)
        return _reduce(ww * loss(y, t, **attrs), ww, reduction)
    return reference


def _elementwise_grad(dloss):
    def reference(g, y, t, w=None, *, reduction, weight, **attrs):
        ww = _weights(y.shape, w, weight)
        return _grad_scale(g, y.shape, ww, reduction) * dloss(y, t, **attrs)
    return reference


def _smooth_sigmoid(t, label_smoothing):
    return t * (1 - label_smoothing) + 0.5 * label_smoothing


def _sigmoid(y):
    return 0.5 * (1 + np.tanh(0.5 * y))


mse_loss = _elementwise(lambda y, t: (y - t) ** 2)
mse_loss_grad = _elementwise_grad(lambda y, t: 2 * (y - t))
mae_loss = _elementwise(lambda y, t: np.abs(y - t))
mae_loss_grad = _elementwise_grad(lambda y, t: np.nan_to_num(np.sign(y - t)))  # 0 for NaN, as Metal's sign and PyTorch
huber_loss = _elementwise(lambda y, t, delta: np.where(np.abs(y - t) <= delta, 0.5 * (y - t) ** 2,
                                                       delta * (np.abs(y - t) - 0.5 * delta)))
huber_loss_grad = _elementwise_grad(lambda y, t, delta: np.clip(y - t, -delta, delta))
sigmoid_cross_entropy_loss = _elementwise(
    lambda y, t, label_smoothing: np.logaddexp(0, y) - y * _smooth_sigmoid(t, label_smoothing))
sigmoid_cross_entropy_loss_grad = _elementwise_grad(
    lambda y, t, label_smoothing: _sigmoid(y) - _smooth_sigmoid(t, label_smoothing))


def _log_softmax(y):
    m = y.max(axis=1, keepdims=True)
    return y - m - np.log(np.exp(y - m).sum(axis=1, keepdims=True))


def _smooth_softmax(t, label_smoothing):
    return t * (1 - label_smoothing) + label_smoothing / t.shape[1]


def softmax_cross_entropy_loss(y, t, w=None, *, reduction, weight, label_smoothing):
    per_position = -(_smooth_softmax(t, label_smoothing) * _log_softmax(y)).sum(axis=1, keepdims=True)
    ww = _weights(per_position.shape, w, weight)
    return _reduce(ww * per_position, ww, reduction)


def softmax_cross_entropy_loss_grad(g, y, t, w=None, *, reduction, weight, label_smoothing):
    ts = _smooth_softmax(t, label_smoothing)
    shape = y.shape[:1] + (1,) + y.shape[2:]
    scale = _grad_scale(g, shape, _weights(shape, w, weight), reduction)
    return scale * (np.exp(_log_softmax(y)) * ts.sum(axis=1, keepdims=True) - ts)


def initial_gradient(loss):
    return np.ones_like(loss)
