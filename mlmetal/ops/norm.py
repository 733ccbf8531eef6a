"""Instance, group, layer and batch normalisation (kernels/norm.metal), with input, γ and β gradients.

All four reduce one group of elements per threadgroup (an (n, c) plane for instance norm, C/G
planes for group norm, a row for layer norm, a channel across the batch for batch norm), so the
same forward and backward kernels serve them; only the layout (`_grouped`, `_layered`,
`_batched`) differs. The backward recomputes the statistics from x rather than keeping them from
the forward: one more read of x, and no hidden state between ops.

The activations (x, the output, its gradient and dx) may be float32, float16 or bfloat16; γ, β,
the running statistics and the γ and β gradients are float32 whatever their type (the
`float32_inputs` and `float32_outputs` of each op), as are the statistics, computed in float: mixed
precision keeps parameters and statistics in float32 beside low-precision activations.
"""

import math

from .. import dtypes as D
from ..reference import norm as R
from ..tensor import empty
from . import apply, ensure, groups_for, register


def _threads(dev, m: int) -> int:
    """Threads for a group of m elements: enough to cover it, at most 1024 (32 where barriers are
    not cheap, as on cpu, where each thread is a fiber and a barrier costs more than the arithmetic
    it separates)."""
    cap = 1024 if dev.cheap_barriers else 32
    return min(cap, 32 * ((m + 31) // 32))


def _grouped(x, groups, eps, relu=0):
    """(params, number of groups) of group norm of (N, C, ...) with `groups` groups a sample
    (instance norm: C); the kernels' layout, see kernels/norm.metal (`relu`: norm_forward's fused relu)."""
    per_group = x[1] // groups
    return {"channels": groups, "rows": 1, "hw": per_group * math.prod(x[2:]), "planes": per_group,
            "eps": eps, "relu": relu}, x[0] * groups


def _layered(x, dims, eps):
    """(params, number of groups) of layer norm over the last `dims` axes of x."""
    m = math.prod(x[len(x) - dims:])
    return {"channels": 1, "rows": 1, "hw": m, "planes": m, "eps": eps, "relu": 0}, math.prod(x[:len(x) - dims])


def _batched(x, eps):
    """(params, number of groups) of batch norm of (N, C, ...): a group per channel, a block per sample."""
    return {"channels": x[1], "rows": x[0], "hw": math.prod(x[2:]), "planes": 1, "eps": eps, "relu": 0}, x[1]


def _kernel(x, name):
    """Kernel `name` of kernels/norm.metal for x's storage type."""
    return x.device.library("norm").kernel(D.kernel_name(name, x.dtype))


def _check_input(op, x, axes, layout):
    """x has at least `axes` axes, as `layout` names them, and no empty one (an empty group has no mean)."""
    ensure(len(x) >= axes, op, f"expected an ({layout}) input, got shape {x}")
    ensure(min(x) >= 1, op, f"input shape {x} has an empty dimension")


def _check_channels(op, x, **vectors):
    for name, v in vectors.items():
        ensure(v == (x[1],), op, f"{name} must have shape ({x[1]},) for {x[1]} channels, got {v}")


def _encode_forward(cb, out, x, gamma, beta, stats, layout):
    """norm_forward over the groups of `layout`; stats receives each group's (mean, var)."""
    p, groups = layout
    cb.dispatch(_kernel(x, "norm_forward"), groups=groups, threads=_threads(x.device, p["rows"] * p["hw"]),
                args=[x, gamma, beta, out, stats, p])


def _forward(cb, out, x, gamma, beta, layout):
    """norm_forward, the statistics it writes for batch norm unread."""
    _encode_forward(cb, out, x, gamma, beta, empty((layout[1], 2), x.device), layout)


def _encode_backward(cb, outs, g, x, gamma, layout):
    """norm_backward, then the γ and β gradients: (dx, dγ, dβ). Groups of one γ entry (instance,
    batch norm) add up norm_backward's partials; planes of one element (layer norm) sum columns;
    other planes (group norm) a threadgroup an entry."""
    dx, dgamma, dbeta = outs
    p, groups = layout
    partial, moments = empty((groups, 2), x.device), empty((groups, 3), x.device)
    lib = x.device.library("norm")
    cb.dispatch(_kernel(x, "norm_backward"), groups=groups, threads=_threads(x.device, p["rows"] * p["hw"]),
                args=[g, x, gamma, dx, partial, moments, p])
    samples, entries = groups // p["channels"], gamma.size
    if p["planes"] == 1:  # norm_backward's partials: one per group
        partials = samples
    elif p["hw"] == p["planes"]:  # planes of one element: column sums, in chunks of rows
        chunk = max(32, -(-samples // 65535))
        partials = -(-samples // chunk)
        partial = empty((partials, entries, 2), x.device)
        cb.dispatch(_kernel(x, "norm_affine_columns"), groups=(groups_for(entries, 64), partials), threads=(64, 1),
                    args=[g, x, moments, partial, {"entries": entries, "channels": p["channels"], "planes": p["planes"],
                                                   "samples": samples, "chunk": chunk}])
    else:
        cb.dispatch(_kernel(x, "norm_affine_grad"), groups=entries,
                    threads=_threads(x.device, samples * p["hw"] // p["planes"]),
                    args=[g, x, moments, dgamma, dbeta,
                          {"channels": p["channels"], "samples": samples, "hw": p["hw"], "planes": p["planes"]}])
        return
    cb.dispatch(lib.kernel("norm_param_grad"), groups=groups_for(entries, 64), threads=64,
                args=[partial, dgamma, dbeta, {"channels": entries, "groups": partials}])


# x in the storage type, γ and β float32; the gradient ops' (g, x, γ) likewise, and their dγ, dβ float32
_FORWARD = {"dtypes": D.FLOATS, "float32_inputs": (1, 2)}
_BACKWARD = {"dtypes": D.FLOATS, "float32_inputs": (2,), "float32_outputs": (1, 2)}


# ---------------------------------------------------------------- instance norm

def _instance_check(x, gamma, beta, eps=1e-5, activation=None):
    """Instance normalisation: each (sample, channel) plane to zero mean and unit variance, then γ·x̂ + β.

    Statistics are per plane (biased variance), computed in one numerically stable pass.

    Args:
        x: (N, C, H, W) (any number of spatial dimensions).
        gamma, beta: (C,) scale and shift.
        eps: added to the variance.
        activation: None, or "relu": relu(instance_norm(x)) in one pass, bit for bit `mm.ops.relu`
            of the unfused result. A graph fuses an instance_norm whose only reader is a relu
            by itself (`Graph.plan`).

    Example:
        >>> y = mm.ops.instance_norm(x, mm.tensor(np.ones(C)), mm.tensor(np.zeros(C)))
    """
    _check_input("instance_norm", x, 3, "N, C, H, W")
    _check_channels("instance_norm", x, gamma=gamma, beta=beta)
    ensure(eps >= 0, "instance_norm", f"eps must not be negative, got {eps}")
    ensure(activation in (None, "relu"), "instance_norm", f"activation must be None or 'relu', got {activation!r}")
    return x, {"eps": float(eps)} if activation is None else {"eps": float(eps), "activation": activation}


def _instance_encode(cb, out, x, gamma, beta, eps, activation=None):
    _forward(cb, out, x, gamma, beta, _grouped(x.shape, x.shape[1], eps, relu=int(activation == "relu")))


def _instance_grad(g, out, x, gamma, beta, eps, activation=None):
    if activation == "relu":  # relu's own rule, on the fused output (out > 0 exactly where relu's input is)
        g = apply("relu_grad", g, out)
    return apply("instance_norm_grad", g, x, gamma, eps=eps)


register("instance_norm", check=_instance_check, encode=_instance_encode, reference=R.instance_norm,
         grad=_instance_grad, kernels=["norm.norm_forward"], **_FORWARD)


def _instance_grad_check(g, x, gamma, eps):
    """(dx, dγ, dβ) of instance_norm given dL/dout `g`."""
    ensure(g == x, "instance_norm_grad", f"gradient shape {g} differs from the input's {x}")
    _instance_check(x, gamma, gamma, eps)
    return [x, gamma, gamma], {"eps": float(eps)}


register("instance_norm_grad", check=_instance_grad_check,
         encode=lambda cb, outs, g, x, gamma, eps: _encode_backward(cb, outs, g, x, gamma,
                                                                    _grouped(x.shape, x.shape[1], eps)),
         reference=R.instance_norm_grad, grad=None, kernels=["norm.norm_backward", "norm.norm_param_grad"],
         **_BACKWARD)


# ---------------------------------------------------------------- group norm

def _group_check(x, gamma, beta, num_groups, eps=1e-5):
    """Group normalisation, as PyTorch's group_norm: the channels of each sample split into
    `num_groups` groups, each normalised over its channels and positions, then γ·x̂ + β per channel.

    num_groups = C is instance norm; num_groups = 1 normalises each sample as a whole.

    Args:
        x: (N, C, ...) with C divisible by num_groups.
        gamma, beta: (C,) scale and shift.
        num_groups: groups per sample.
        eps: added to the variance.

    Example:
        >>> y = mm.ops.group_norm(x, gamma, beta, num_groups=8)
    """
    op = "group_norm"
    _check_input(op, x, 2, "N, C, ...")
    ensure(isinstance(num_groups, int) and not isinstance(num_groups, bool) and num_groups >= 1, op,
           f"num_groups must be a positive int, got {num_groups!r}")
    ensure(x[1] % num_groups == 0, op, f"{x[1]} channels are not divisible by num_groups={num_groups}")
    _check_channels(op, x, gamma=gamma, beta=beta)
    ensure(eps >= 0, op, f"eps must not be negative, got {eps}")
    return x, {"num_groups": num_groups, "eps": float(eps)}


register("group_norm", check=_group_check,
         encode=lambda cb, out, x, gamma, beta, num_groups, eps: _forward(cb, out, x, gamma, beta,
                                                                          _grouped(x.shape, num_groups, eps)),
         reference=R.group_norm,
         grad=lambda g, out, x, gamma, beta, num_groups, eps: apply("group_norm_grad", g, x, gamma,
                                                                    num_groups=num_groups, eps=eps),
         kernels=["norm.norm_forward"], **_FORWARD)


def _group_grad_check(g, x, gamma, num_groups, eps):
    """(dx, dγ, dβ) of group_norm given dL/dout `g`."""
    ensure(g == x, "group_norm_grad", f"gradient shape {g} differs from the input's {x}")
    _, attrs = _group_check(x, gamma, gamma, num_groups, eps)
    return [x, gamma, gamma], attrs


register("group_norm_grad", check=_group_grad_check,
         encode=lambda cb, outs, g, x, gamma, num_groups, eps: _encode_backward(
             cb, outs, g, x, gamma, _grouped(x.shape, num_groups, eps)),
         reference=R.group_norm_grad, grad=None,
         kernels=["norm.norm_backward", "norm.norm_param_grad", "norm.norm_affine_grad", "norm.norm_affine_columns"],
         **_BACKWARD)


# ---------------------------------------------------------------- layer norm

def _layer_check(x, gamma, beta, eps=1e-5):
    """Layer normalisation, as PyTorch's layer_norm: x normalised over its last axes, those of
    γ's shape (normalized_shape), then γ·x̂ + β elementwise.

    Args:
        x: (..., *normalized_shape).
        gamma, beta: normalized_shape, the shape of x's last axes.
        eps: added to the variance.

    Example:
        >>> y = mm.ops.layer_norm(x, gamma, beta)   # x (N, L, 512), gamma and beta (512,)
    """
    op = "layer_norm"
    ensure(len(gamma) >= 1 and min(gamma) >= 1, op, f"gamma must have at least one axis, none empty, got {gamma}")
    ensure(gamma == beta, op, f"beta's shape {beta} differs from gamma's {gamma}")
    ensure(len(x) >= len(gamma) and x[len(x) - len(gamma):] == gamma, op,
           f"input shape {x} does not end in gamma's shape {gamma} (the normalized shape)")
    ensure(min(x) >= 1, op, f"input shape {x} has an empty dimension")
    ensure(eps >= 0, op, f"eps must not be negative, got {eps}")
    return x, {"eps": float(eps)}


register("layer_norm", check=_layer_check,
         encode=lambda cb, out, x, gamma, beta, eps: _forward(cb, out, x, gamma, beta,
                                                              _layered(x.shape, gamma.ndim, eps)),
         reference=R.layer_norm,
         grad=lambda g, out, x, gamma, beta, eps: apply("layer_norm_grad", g, x, gamma, eps=eps),
         kernels=["norm.norm_forward"], **_FORWARD)


def _layer_grad_check(g, x, gamma, eps):
    """(dx, dγ, dβ) of layer_norm given dL/dout `g`."""
    ensure(g == x, "layer_norm_grad", f"gradient shape {g} differs from the input's {x}")
    _layer_check(x, gamma, gamma, eps)
    return [x, gamma, gamma], {"eps": float(eps)}


register("layer_norm_grad", check=_layer_grad_check,
         encode=lambda cb, outs, g, x, gamma, eps: _encode_backward(cb, outs, g, x, gamma,
                                                                    _layered(x.shape, gamma.ndim, eps)),
         reference=R.layer_norm_grad, grad=None,
         kernels=["norm.norm_backward", "norm.norm_affine_columns", "norm.norm_param_grad"], **_BACKWARD)


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
    _check_input("batch_norm", x, 2, "N, C, ...")
    _check_channels("batch_norm", x, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var)
    ensure(not training or math.prod(x) // x[1] > 1, "batch_norm",
           f"training needs more than one value per channel, got shape {x}")
    ensure(0 <= momentum <= 1, "batch_norm", f"momentum must be in [0, 1], got {momentum}")
    ensure(eps >= 0, "batch_norm", f"eps must not be negative, got {eps}")
    return x, {"training": bool(training), "momentum": float(momentum), "eps": float(eps)}


def _batch_encode(cb, out, x, gamma, beta, running_mean, running_var, training, momentum, eps):
    c = x.shape[1]
    if not training:
        p = {"count": x.size, "channels": c, "hw": math.prod(x.shape[2:]), "eps": eps}
        cb.dispatch(_kernel(x, "batch_norm_inference"), groups=groups_for(x.size, 256), threads=256,
                    args=[x, gamma, beta, running_mean, running_var, out, p])
        return
    stats = empty((c, 2), x.device)
    _encode_forward(cb, out, x, gamma, beta, stats, _batched(x.shape, eps))
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
         kernels=["norm.norm_forward", "norm.batch_norm_update", "norm.batch_norm_inference"], dtypes=D.FLOATS,
         float32_inputs=(1, 2, 3, 4))


def _batch_grad_check(g, x, gamma, eps):
    """(dx, dγ, dβ) of training-mode batch_norm given dL/dout `g`."""
    ensure(g == x, "batch_norm_grad", f"gradient shape {g} differs from the input's {x}")
    _batch_check(x, gamma, gamma, gamma, gamma, eps=eps)
    return [x, gamma, gamma], {"eps": float(eps)}


register("batch_norm_grad", check=_batch_grad_check,
         encode=lambda cb, outs, g, x, gamma, eps: _encode_backward(cb, outs, g, x, gamma, _batched(x.shape, eps)),
         reference=R.batch_norm_grad, grad=None, kernels=["norm.norm_backward", "norm.norm_param_grad"], **_BACKWARD)


def _batch_inference_grad_check(g, x, gamma, running_mean, running_var, eps):
    """(dx, dγ, dβ) of inference-mode batch_norm given dL/dout `g`."""
    ensure(g == x, "batch_norm_inference_grad", f"gradient shape {g} differs from the input's {x}")
    _batch_check(x, gamma, gamma, running_mean, running_var, training=False, eps=eps)
    return [x, gamma, gamma], {"eps": float(eps)}


def _batch_inference_grad_encode(cb, outs, g, x, gamma, running_mean, running_var, eps):
    p, groups = _batched(x.shape, eps)
    cb.dispatch(_kernel(x, "batch_norm_inference_grad"), groups=groups, threads=_threads(x.device, x.shape[0] * p["hw"]),
                args=[g, x, gamma, running_mean, running_var, *outs, p])


register("batch_norm_inference_grad", check=_batch_inference_grad_check, encode=_batch_inference_grad_encode,
         reference=R.batch_norm_inference_grad, grad=None, kernels=["norm.batch_norm_inference_grad"], dtypes=D.FLOATS,
         float32_inputs=(2, 3, 4), float32_outputs=(1, 2))
