"""Layers on the ops: modules with named parameters, usable eagerly and inside graphs.

A module's parameters are plain attributes (dotted names through submodules, like MLX and
PyTorch); `p.numpy()` reads one, `p.assign(array)` sets it. Initialisation is deterministic:
every layer draws from a Philox stream on its device (`mm.nn.seed(n)` restarts it) in
construction order, so a seed gives the same weights on every backend.
"""

from __future__ import annotations

import math

import numpy as np

from . import ops
from .runtime.device import Device
from .tensor import Tensor, _device, empty, tensor

_seed = 0
_generators: dict = {}


def seed(n: int) -> None:
    """Restart the Philox streams that layer initialisers draw from (one per device, all equal)."""
    global _seed
    _seed = int(n)
    _generators.clear()


class Parameter(Tensor):
    """A trainable tensor; after a training step `grad` holds its gradient.

    `name` is empty unless set (`mm.load` sets the saved name); `mm.save` names a graph's
    parameters by the dotted names of its `module=`, else by `name`.

    Args:
        data: an array, or a device tensor whose buffer the parameter takes over.
        device: where to put an array (default `mm.device()`).
        trainable: False keeps it out of training graphs' updates (frozen).
        statistic: a value its layer updates itself (batch norm's running statistics): never
            trainable, and `Module.unfreeze` leaves it so.
    """

    from_parameters = True  # what an op computes from parameters alone follows them into graphs (Tensor.derivation)

    def __init__(self, data, device: Device | str | None = None, trainable: bool = True, statistic: bool = False):
        t = data if isinstance(data, Tensor) else tensor(data, device)
        super().__init__(t.buffer, t.shape, t.dtype)
        self.statistic = statistic
        self.trainable = trainable and not statistic
        self.name = ""


def _uniform(shape, fan_in: int, device) -> Parameter:
    """PyTorch's default for conv and linear layers, U(-1/√fan_in, 1/√fan_in), drawn on the device."""
    from .random import Philox, Uniform

    dev = _device(device)
    if dev not in _generators:
        _generators[dev] = Philox(dev, _seed)
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    out = empty(shape, dev)
    cb = dev.command_buffer()
    _generators[dev].encode(cb, out, Uniform(-bound, bound))
    cb.commit()
    return Parameter(out)


class Module:
    """Base class: subclasses set parameters and submodules as attributes and define `forward`."""

    def __call__(self, *xs):
        return self.forward(*xs)

    def forward(self, *xs):
        raise NotImplementedError

    def named_parameters(self, prefix: str = "") -> dict[str, Parameter]:
        """Every parameter under this module, by dotted name (`body.0.weight`)."""
        out: dict[str, Parameter] = {}
        for name, v in vars(self).items():
            if isinstance(v, Parameter):
                out[prefix + name] = v
            elif isinstance(v, Module):
                out.update(v.named_parameters(f"{prefix}{name}."))
            elif isinstance(v, (list, tuple)):
                for i, m in enumerate(v):
                    if isinstance(m, Module):
                        out.update(m.named_parameters(f"{prefix}{name}.{i}."))
        return out

    def parameters(self) -> list[Parameter]:
        return list(self.named_parameters().values())

    def freeze(self) -> "Module":
        """Stop training every parameter under this module (transfer learning)."""
        for p in self.parameters():
            p.trainable = False
        return self

    def unfreeze(self) -> "Module":
        """Train every parameter under this module again (running statistics stay untrained)."""
        for p in self.parameters():
            p.trainable = not p.statistic
        return self

    def save_weights(self, path) -> None:
        """Save the parameters by dotted name: to one safetensors file where `path` ends in
        `.safetensors` (MLX's format; `safetensors.torch.load_file` reads it too), else as
        `mm.save(path, self)` does (a directory, or a `.zip`).

        Example:
            >>> net.save_weights("net.safetensors")
        """
        from .io import save, save_safetensors

        if str(path).endswith(".safetensors"):
            save_safetensors(path, self)
        else:
            save(path, self)

    def load_weights(self, path, strict: bool = True) -> "Module":
        """Load parameters saved by `save_weights` or `mm.save` (or any safetensors file of
        float32, int32 or uint32 tensors named as this module's parameters), matched by dotted name.

        Args:
            path: a `.safetensors` file, or the saved directory or `.zip`.
            strict: refuse missing and extra parameters; one `mm.FormatError` lists them
                all, with any of the wrong shape (always refused). Nothing changes on an error.

        Example:
            >>> net = make_net().load_weights("net.safetensors")
        """
        from .io import load_safetensors, restore

        if str(path).endswith(".safetensors"):
            load_safetensors(path, self, strict=strict)
        else:
            restore(path, self, strict=strict)
        return self


class Sequential(Module):
    """Layers applied in order. Example: `net = mm.nn.Sequential(mm.nn.Linear(4, 8), mm.nn.ReLU())`."""

    def __init__(self, *layers: Module):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Conv2d(Module):
    """2-D convolution, NCHW. Args: in_channels, out_channels, kernel_size, stride, padding, dilation,
    groups, bias, device. Example: `mm.nn.Conv2d(3, 16, 3, padding=1)`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias: bool = True, device=None):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        fan_in = in_channels // groups * kh * kw
        self.weight = _uniform((out_channels, in_channels // groups, kh, kw), fan_in, device)
        self.bias = _uniform((out_channels,), fan_in, device) if bias else None
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def forward(self, x):
        args = (x, self.weight) + ((self.bias,) if self.bias is not None else ())
        return ops.conv2d(*args, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


class Linear(Module):
    """Fully connected: x (N, in) → (N, out). Example: `mm.nn.Linear(64, 10)`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        self.weight = _uniform((out_features, in_features), in_features, device)
        self.bias = _uniform((out_features,), in_features, device) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, *((self.bias,) if self.bias is not None else ()))


class _Stateless(Module):
    op = ""

    def __init__(self, **attrs):
        self.attrs = attrs

    def forward(self, x):
        return getattr(ops, self.op)(x, **self.attrs)


class ReLU(_Stateless):
    op = "relu"


class Sigmoid(_Stateless):
    op = "sigmoid"


class Tanh(_Stateless):
    op = "tanh"


class Softmax(_Stateless):
    """Softmax over channels."""
    op = "softmax"


class LeakyReLU(_Stateless):
    op = "leaky_relu"

    def __init__(self, slope: float = 0.01):
        super().__init__(slope=slope)


class MaxPool2d(_Stateless):
    op = "max_pool2d"

    def __init__(self, kernel, stride=None, padding=0):
        super().__init__(kernel=kernel, stride=stride, padding=padding)


class AvgPool2d(_Stateless):
    op = "avg_pool2d"

    def __init__(self, kernel, stride=None, padding=0):
        super().__init__(kernel=kernel, stride=stride, padding=padding)


class Upsample(_Stateless):
    op = "upsample"

    def __init__(self, scale: int = 2, mode: str = "nearest"):
        super().__init__(scale=scale, mode=mode)


class GramMatrix(_Stateless):
    op = "gram"

    def __init__(self, alpha: float = 1.0):
        super().__init__(alpha=alpha)


class Concat(Module):
    """Concatenate along channels: `Concat()(a, b, ...)`."""

    def forward(self, *xs):
        return ops.concat(list(xs))


class InstanceNorm2d(Module):
    """Instance normalization with affine γ (ones) and β (zeros)."""

    def __init__(self, channels: int, eps: float = 1e-5, device=None):
        self.weight = Parameter(np.ones(channels, np.float32), device)
        self.bias = Parameter(np.zeros(channels, np.float32), device)
        self.eps = eps

    def forward(self, x):
        return ops.instance_norm(x, self.weight, self.bias, eps=self.eps)


class BatchNorm2d(Module):
    """Batch normalization: batch statistics while training (updating the running ones), running ones after."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, device=None):
        self.weight = Parameter(np.ones(channels, np.float32), device)
        self.bias = Parameter(np.zeros(channels, np.float32), device)
        self.running_mean = Parameter(np.zeros(channels, np.float32), device, statistic=True)
        self.running_var = Parameter(np.ones(channels, np.float32), device, statistic=True)
        self.eps, self.momentum, self.training = eps, momentum, True

    def forward(self, x):
        return ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              training=self.training, momentum=self.momentum, eps=self.eps)
