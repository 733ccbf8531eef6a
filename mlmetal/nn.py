"""Layers on the ops: modules with named parameters, usable eagerly and inside graphs.

A module's parameters are plain attributes (dotted names through submodules, like MLX and
PyTorch); `p.numpy()` reads one, `p.assign(array)` sets it. Initialisation is deterministic:
every layer draws from a Philox stream on its device (`mm.nn.seed(n)` restarts it) in
construction order, so a seed gives the same weights on every backend; dropout masks come from
the same stream unless given a generator of their own. `module.train()` and `module.eval()` switch
dropout and batch norm, as in PyTorch.
"""

from __future__ import annotations

import math

import numpy as np

from . import dtypes as D
from . import ops
from .runtime.device import Device
from .ops import ShapeError
from .tensor import Symbolic, Tensor, _device, empty, tensor

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


def _generator(dev: Device):
    """The layers' Philox stream on `dev` (initial weights, dropout masks), from `seed`."""
    from .random import Philox

    if dev not in _generators:
        _generators[dev] = Philox(dev, _seed)
    return _generators[dev]


def _uniform(shape, fan_in: int, device) -> Parameter:
    """PyTorch's default for conv and linear layers, U(-1/√fan_in, 1/√fan_in), drawn on the device."""
    from .random import Uniform

    dev = _device(device)
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    out = empty(shape, dev)
    cb = dev.command_buffer()
    _generator(dev).encode(cb, out, Uniform(-bound, bound))
    cb.commit()
    return Parameter(out)


class Module:
    """Base class: subclasses set parameters and submodules as attributes and define `forward`."""

    training = True  # read by Dropout and BatchNorm2d when they build their ops; set by train() / eval()
    keeps_float32 = False  # Module.astype leaves this module's tensors float32 (normalisation layers)

    def __call__(self, *xs):
        return self.forward(*xs)

    def forward(self, *xs):
        raise NotImplementedError

    def modules(self):
        """This module and every module under it (attributes, and lists or tuples of modules), each
        once, depth first."""
        seen = set()

        def walk(m):
            if id(m) not in seen:
                seen.add(id(m))
                yield m
                for v in vars(m).values():
                    for child in v if isinstance(v, (list, tuple)) else (v,):
                        if isinstance(child, Module):
                            yield from walk(child)
        return walk(self)

    def train(self, mode: bool = True) -> "Module":
        """Put this module and every module under it in training mode (or, `mode=False`, evaluation
        mode), as PyTorch's `train()`: dropout drops and batch norm uses the batch's statistics
        (updating its running ones) only in training mode. It applies to the ops a module builds
        from then on; a graph keeps the mode it was built in.

        Args:
            mode: True for training, False for evaluation.

        Example:
            >>> net.eval()        # inference: dropout off, batch norm on its running statistics
            >>> net.train()
        """
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode throughout: `train(False)`.

        Example:
            >>> y = net.eval()(x)
        """
        return self.train(False)

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

    def astype(self, dtype) -> "Module":
        """Convert every floating tensor of this module and the modules under it — parameters,
        running statistics and constants — to `dtype`, in place, as PyTorch's `module.half()` /
        `module.to(dtype)`: a float16 or bfloat16 copy of a model for inference, at half the bytes.

        Normalisation layers keep their γ, β and running statistics in float32: their kernels read
        float16 or bfloat16 activations beside float32 statistics (`keeps_float32`).

        The tensors stay the same objects (a model's own references to them hold); their contents
        are rounded on the device (to nearest even), and a gradient they held is dropped. Build
        graphs after converting: a graph records the dtypes of the parameters it reads. The
        optimizers update float32 parameters only, so train in float32 — under `mm.autocast` for
        low-precision activations — and convert the trained model.

        Args:
            dtype: `mm.float16`, `mm.bfloat16`, `mm.float32`, or a name ("bfloat16", "half").

        Example:
            >>> net = mm.nn.Sequential(mm.nn.Linear(4, 8), mm.nn.ReLU()).astype(mm.bfloat16)
            >>> net.layers[0].weight.dtype == mm.bfloat16
            True
        """
        dtype = D.as_dtype(dtype)
        if dtype not in D.FLOATS:
            raise TypeError(f"Module.astype converts to a floating storage type ({', '.join(map(str, D.FLOATS))}), "
                            f"not {dtype}")
        for m in self.modules():
            if m.keeps_float32:
                continue
            for v in vars(m).values():
                if isinstance(v, Tensor) and v.dtype in D.FLOATS and v.dtype != dtype:  # a shared one converts once
                    v.buffer, v.dtype = ops.astype(v, dtype=dtype).buffer, dtype
                    v.grad = None
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
        float32, float16, bfloat16, int32 or uint32 tensors named as this module's parameters),
        matched by dotted name; each must have the parameter's shape and dtype (load into the
        float32 model, then `astype`, to convert).

        Args:
            path: a `.safetensors` file, or the saved directory or `.zip`.
            strict: refuse missing and extra parameters; one `mm.FormatError` lists them
                all, with any of the wrong shape or dtype (always refused). Nothing changes on an error.

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


class ConvTranspose2d(Module):
    """Transposed 2-D convolution, NCHW, as PyTorch's ConvTranspose2d: the weight is (in_channels,
    out_channels / groups, KH, KW), drawn as PyTorch draws it (U(±1/√fan_in), fan_in = out_channels /
    groups · KH · KW), and so is the bias.

    Args:
        in_channels, out_channels: both divisible by groups.
        kernel_size, stride, padding, output_padding, dilation: an int or an (h, w) pair;
            output_padding is added to the bottom and right, below the stride.
        groups: independent convolutions the channels split into.
        bias: add a learned bias.
        device: where the parameters live.

    Example:
        >>> up = mm.nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)   # (N, 64, H, W) -> (N, 32, 2H, 2W)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, device=None):
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ShapeError(f"ConvTranspose2d: in_channels {in_channels} and out_channels {out_channels} must both "
                             f"be divisible by groups={groups}")
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        fan_in = out_channels // groups * kh * kw
        self.weight = _uniform((in_channels, out_channels // groups, kh, kw), fan_in, device)
        self.bias = _uniform((out_channels,), fan_in, device) if bias else None
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.groups, self.dilation = groups, dilation

    def forward(self, x):
        return ops.conv_transpose2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                    output_padding=self.output_padding, groups=self.groups, dilation=self.dilation)


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


class GELU(_Stateless):
    """The exact GELU, x·Φ(x) (PyTorch's default)."""
    op = "gelu"


class SiLU(_Stateless):
    """x·σ(x) (swish)."""
    op = "silu"


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


class Flatten(Module):
    """Axes start_dim … end_dim merged into one, as PyTorch's Flatten: (N, C, H, W) -> (N, C·H·W) by default.

    Example: `mm.nn.Sequential(mm.nn.Conv2d(1, 8, 3), mm.nn.Flatten(), mm.nn.Linear(8 * 26 * 26, 10))`.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return ops.flatten(x, start_axis=self.start_dim, end_axis=self.end_dim)


class AdaptiveAvgPool2d(Module):
    """Global average pooling: (N, C, H, W) -> (N, C, 1, 1), the mean over each plane. Only output
    size 1 is supported (PyTorch's AdaptiveAvgPool2d(1)); AvgPool2d pools to other sizes.

    Example: `mm.nn.AdaptiveAvgPool2d(1)`.
    """

    def __init__(self, output_size=1):
        if output_size not in (1, (1, 1), [1, 1]):
            raise ShapeError(f"AdaptiveAvgPool2d: only output_size 1 (global average pooling) is supported, "
                             f"got {output_size!r}; use AvgPool2d(kernel, stride) for other sizes")
        self.output_size = 1

    def forward(self, x):
        return ops.mean(x, axis=(-2, -1), keepdims=True)


class Dropout(Module):
    """Inverted dropout, as PyTorch's Dropout: in training mode each element is zeroed with
    probability p and the others scaled by 1/(1 − p); in evaluation mode (`eval()`) it passes x on.

    The mask is drawn on the device, afresh on every call, and in a graph afresh on every run (a
    `random_tensor` node); the gradient goes through the same mask.

    Args:
        p: the probability of zeroing an element, in [0, 1].
        generator: an `mm.random` generator for the masks; default: the layers' stream of x's
            device, which `mm.nn.seed(n)` restarts.

    Example:
        >>> net = mm.nn.Sequential(mm.nn.Linear(64, 64), mm.nn.ReLU(), mm.nn.Dropout(0.1), mm.nn.Linear(64, 10))
    """

    def __init__(self, p: float = 0.5, generator=None):
        if not 0.0 <= p <= 1.0:
            raise ShapeError(f"Dropout: p must be a probability in [0, 1], got {p}")
        self.p, self.generator = float(p), generator

    def forward(self, x):
        from .random import Uniform

        if not self.training or self.p == 0.0:
            return x
        if isinstance(x, Symbolic):
            u = x.graph.random(x.shape, self.generator or _generator(x.graph.device), Uniform())
        else:
            gen = self.generator or _generator(x.device)
            u = ops.random_tensor(shape=x.shape, generator=gen, distribution=Uniform())
        if u.dtype != x.dtype:  # the mask's numbers in x's storage type, so the output keeps it
            u = ops.astype(u, dtype=x.dtype.name)
        return ops.dropout(x, u, p=self.p)


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

    keeps_float32 = True

    def __init__(self, channels: int, eps: float = 1e-5, device=None):
        self.weight = Parameter(np.ones(channels, np.float32), device)
        self.bias = Parameter(np.zeros(channels, np.float32), device)
        self.eps = eps

    def forward(self, x):
        return ops.instance_norm(x, self.weight, self.bias, eps=self.eps)


class GroupNorm(Module):
    """Group normalization, as PyTorch's GroupNorm: the channels split into num_groups groups, each
    normalised over its channels and positions per sample, then γ·x̂ + β per channel (γ ones, β zeros).
    GroupNorm(C, C) is instance norm, GroupNorm(1, C) normalises each sample whole.

    Args:
        num_groups: groups per sample; divides num_channels.
        num_channels: C of the (N, C, ...) input.
        eps: added to the variance.
        affine: learn γ and β (else they are constants 1 and 0, not parameters).
        device: where the parameters live.

    Example:
        >>> norm = mm.nn.GroupNorm(8, 64)
    """

    keeps_float32 = True

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None):
        if num_groups < 1 or num_channels % num_groups:
            raise ShapeError(f"GroupNorm: num_channels {num_channels} must be divisible by num_groups={num_groups}")
        self.weight, self.bias = _affine((num_channels,), affine, device)
        self.num_groups, self.eps = num_groups, eps

    def forward(self, x):
        return ops.group_norm(x, self.weight, self.bias, num_groups=self.num_groups, eps=self.eps)


class LayerNorm(Module):
    """Layer normalization, as PyTorch's LayerNorm: x normalised over its last axes (normalized_shape),
    then γ·x̂ + β elementwise (γ ones, β zeros, each of normalized_shape).

    Args:
        normalized_shape: an int or the shape of x's last axes.
        eps: added to the variance.
        elementwise_affine: learn γ and β (else they are constants 1 and 0, not parameters).
        device: where the parameters live.

    Example:
        >>> norm = mm.nn.LayerNorm(512)          # x (N, L, 512)
    """

    keeps_float32 = True

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, device=None):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.weight, self.bias = _affine(shape, elementwise_affine, device)
        self.normalized_shape, self.eps = shape, eps

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps)


def _affine(shape, learned: bool, device) -> tuple[Tensor, Tensor]:
    """γ (ones) and β (zeros) of `shape`: parameters, or constants that no training changes or saves."""
    ones, zeros = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    if learned:
        return Parameter(ones, device), Parameter(zeros, device)
    return tensor(ones, device), tensor(zeros, device)


class BatchNorm2d(Module):
    """Batch normalization: batch statistics in training mode (updating the running ones), the
    running ones in evaluation mode (`eval()`)."""

    keeps_float32 = True

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, device=None):
        self.weight = Parameter(np.ones(channels, np.float32), device)
        self.bias = Parameter(np.zeros(channels, np.float32), device)
        self.running_mean = Parameter(np.zeros(channels, np.float32), device, statistic=True)
        self.running_var = Parameter(np.ones(channels, np.float32), device, statistic=True)
        self.eps, self.momentum = eps, momentum

    def forward(self, x):
        return ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              training=self.training, momentum=self.momentum, eps=self.eps)
