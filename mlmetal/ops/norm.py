"""Instance and batch normalisation (kernels/norm.metal), with input, γ and β gradients.

Both kernels reduce one group of elements per threadgroup (an (n, c) plane for instance norm,
a channel across the batch for batch norm), so the same forward and backward kernels serve
both; only the grid and `rows` differ. The backward recomputes the statistics from x rather
than keeping them from the forward: one more read of x, and no hidden state between ops.
"""

import math

from ..reference import norm as R
from ..tensor import empty
from . import apply, ensure, groups_for, register


def _threads(dev, m: int) -> int:
    """Threads for a group of m elements: enough to cover it, at most 1024 (32 where barriers are
    not cheap, as on cpu, where each thread is a fiber and a barrier costs more than the arithmetic
    it separates)."""
    cap = 1024 if dev.cheap_barriers else 32
    return min(cap, 32 * ((m + 31) // 32))


def _params(x, rows, eps):
    return {"channels": x.shape[1], "rows": rows, "hw": math.prod(x.shape[2:]), "eps": eps}


def _check_channels(op, x, **vectors):
    for name, v in vectors.items():
        ensure(v == (x[1],), op, f"{name} must have shape ({x[1]},) for {x[1]} channels, got {v}")


def _encode_forward(cb, out, x, gamma, beta, stats, rows, eps):
    """norm_forward over groups (C, N / rows)."""
    p = _params(x, rows, eps)
    k = x.device.library("norm").kernel("norm_forward")
    cb.dispatch(k, groups=(x.shape[1], x.shape[0] // rows), threads=_threads(x.device, rows * p["hw"]),
                args=[x, gamma, beta, out, stats, p])


def _encode_backward(cb, outs, g, x, gamma, rows, eps):
    """norm_backward then norm_param_grad: (dx, dγ, dβ)."""
    dx, dgamma, dbeta = outs
    n, c = x.shape[0] // rows, x.shape[1]
    p = _params(x, rows, eps)
    partial = empty((n * c, 2), x.device)
    lib = x.device.library("norm")
    cb.dispatch(lib.kernel("norm_backward"), groups=(c, n), threads=_threads(x.device, rows * p["hw"]),
                args=[g, x, gamma, dx, partial, p])
    cb.dispatch(lib.kernel("norm_param_grad"), groups=groups_for(c, 64), threads=64,
                args=[partial, dgamma, dbeta, {"channels": c, "groups": n}])


# ---------------------------------------------------------------- instance norm

def _instance_check(x, gamma, beta, eps=1e-5):
    """Instance normalisation: each (sample, channel) plane to zero mean and unit variance, then γ·x̂ + β.

    Statistics are per plane (biased variance), computed in one numerically stable pass.

    Args:
        x: (N, C, H, W) (any number of spatial dimensions).
        gamma, beta: (C,) scale and shift.
        eps: added to the variance.

    Example:
        >>> y = mm.ops.instance_norm(x, mm.tensor(np.ones(C)), mm.tensor(np.zeros(C)))
    """
    ensure(len(x) >= 3, "instance_norm", f"expected an (N, C, H, W) input, got shape {x}")
    _check_channels("instance_norm", x, gamma=gamma, beta=beta)
    ensure(eps >= 0, "instance_norm", f"eps must not be negative, got {eps}")
    return x, {"eps": float(eps)}


def _instance_encode(cb, out, x, gamma, beta, eps):
    stats = empty((x.shape[0] * x.shape[1], 2), x.device)  # (mean, var) per plane: batch norm's, unread here
    _encode_forward(cb, out, x, gamma, beta, stats, rows=1, eps=eps)


register("instance_norm", check=_instance_check, encode=_instance_encode, reference=R.instance_norm,
         grad=lambda g, out, x, gamma, beta, eps: apply("instance_norm_grad", g, x, gamma, eps=eps),
         kernels=["norm.norm_forward"])


def _instance_grad_check(g, x, gamma, eps):
    """(dx, dγ, dβ) of instance_norm given dL/dout `g`."""
    ensure(g == x, "instance_norm_grad", f"gradient shape {g} differs from the input's {x}")
    _instance_check(x, gamma, gamma, eps)
    return [x, gamma, gamma], {"eps": float(eps)}


register("instance_norm_grad", check=_instance_grad_check,
         encode=lambda cb, outs, g, x, gamma, eps: _encode_backward(cb, outs, g, x, gamma, rows=1, eps=eps),
         reference=R.instance_norm_grad, grad=None, kernels=["norm.norm_backward", "norm.norm_param_grad"])


# ---------------------------------------------------------------- batch norm

def _batch_check(x, gamma, beta, running_mean, running_var, training=True, momentum=0.1, eps=1e-5):
    """Batch normalisation over the batch and spatial dimensions, per channel, like torch's BatchNorm2d.

    Training uses the batch's statistics and updates `running_mean` and `running_var` in place
    (momentum-weighted, the variance unbiased); inference uses the running statistics.

    Args:
        x: (N, C, H, W), or (N, C).
        gamma, beta: (C,) scale and shift.
        running_mean, running_var: (C,) running statistics, updated when training.
        training: batch statistics (True) or running statistics (False).
        momentum: weight of the new batch in the running averages.
        eps: added to the variance.

    Example:
        >>> y = mm.ops.batch_norm(x, gamma, beta, mean, var, training=True)
    """
    ensure(len(x) >= 2, "batch_norm", f"expected an (N, C, ...) input, got shape {x}")
    _check_channels("batch_norm", x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    ensure(not training or math.prod(x) // x[1] > 1, "batch_norm",
           f"training needs more than one value per channel, got shape {x}")
    ensure(0 <= momentum <= 1, "batch_norm", f"momentum must be in [0, 1], got {momentum}")
    ensure(eps >= 0, "batch_norm", f"eps must not be negative, got {eps}")
    return x, {"training": bool(training), "momentum": float(momentum), "eps": float(eps)}


def _batch_encode(cb, out, x, gamma, beta, running_mean, running_var, training, momentum, eps):
    c = x.shape[1]
    if not training:
        k = x.device.library("norm").kernel("batch_norm_inference")
        p = {"count": x.size, "channels": c, "hw": math.prod(x.shape[2:]), "eps": eps}
        cb.dispatch(k, groups=groups_for(x.size, 256), threads=256, args=[x, gamma, beta, running_mean, running_var, out, p])
        return
    stats = empty((c, 2), x.device)
    _encode_forward(cb, out, x, gamma, beta, stats, rows=x.shape[0], eps=eps)
    k = x.device.library("norm").kernel("batch_norm_update")
    cb.dispatch(k, groups=groups_for(c, 64), threads=64,
                args=[stats, running_mean, running_var, {"channels": c, "count": x.size / c, "momentum": momentum}])


def _batch_grad(g, out, x, gamma, beta, running_mean, running_var, training, momentum, eps):
    if training:
        dx, dgamma, dbeta = apply("batch_norm_grad", g, x, gamma, eps=eps)
    else:
        dx, dgamma, dbeta = apply("batch_norm_inference_grad", g, x, gamma, running_mean, running_var, eps=eps)
    return dx, dgamma, dbeta, None, None


register("batch_norm", check=_batch_check, encode=_batch_encode, reference=R.batch_norm, grad=_batch_grad,
         kernels=["norm.norm_forward", "norm.batch_norm_update", "norm.batch_norm_inference"])


def _batch_grad_check(g, x, gamma, eps):
    """(dx, dγ, dβ) of training-mode batch_norm given dL/dout `g`."""
    ensure(g == x, "batch_norm_grad", f"gradient shape {g} differs from the input's {x}")
    _batch_check(x, gamma, gamma, gamma, gamma, eps=eps)
    return [x, gamma, gamma], {"eps": float(eps)}


register("batch_norm_grad", check=_batch_grad_check,
         encode=lambda cb, outs, g, x, gamma, eps: _encode_backward(cb, outs, g, x, gamma, rows=x.shape[0], eps=eps),
         reference=R.batch_norm_grad, grad=None, kernels=["norm.norm_backward", "norm.norm_param_grad"])


def _batch_inference_grad_check(g, x, gamma, running_mean, running_var, eps):
    """(dx, dγ, dβ) of inference-mode batch_norm given dL/dout `g`."""
    ensure(g == x, "batch_norm_inference_grad", f"gradient shape {g} differs from the input's {x}")
    _batch_check(x, gamma, gamma, running_mean, running_var, training=False, eps=eps)
    return [x, gamma, gamma], {"eps": float(eps)}


def _batch_inference_grad_encode(cb, outs, g, x, gamma, running_mean, running_var, eps):
    p = _params(x, x.shape[0], eps)
    k = x.device.library("norm").kernel("batch_norm_inference_grad")
    cb.dispatch(k, groups=(x.shape[1], 1), threads=_threads(x.device, x.shape[0] * p["hw"]),
                args=[g, x, gamma, running_mean, running_var, *outs, p])


register("batch_norm_inference_grad", check=_batch_inference_grad_check, encode=_batch_inference_grad_encode,
         reference=R.batch_norm_inference_grad, grad=None, kernels=["norm.batch_norm_inference_grad"])
