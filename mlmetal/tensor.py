"""Tensor: a device buffer with a shape and a dtype (float32 first; images are NCHW).

`Operators` gives device tensors and graph tensors (mlmetal.graph's GraphTensor) Python's
operators and NumPy-style methods, each one call of a registered op, so `x + y` on either is
`mm.ops.add(x, y)`: eagerly it runs, in a graph it appends the node, and its gradient is the op's.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from .dtypes import DTYPES, FLOATS, as_dtype
from .runtime.device import Buffer, Device


class Operators:
    """Operators and methods over the ops, for device tensors and graph tensors alike.

    `x + y`, `x - y`, `x * y`, `x / y` broadcast (`add`, `sub`, `mul`, `div`); a Python or NumPy
    number on either side is an attribute where an op takes one (`x * 2` is `scale(x, s=2)`,
    `x + 1` and `1 - x` are `linear_activation`, each exact) and otherwise a 0-d float32
    constant (`x / 3`, `3 / x`: IEEE division). `-x` is `neg`, `x ** p` is `pow(x, exponent=p)`,
    `a @ b` is `matmul` (batched over leading axes), `x.T` reverses the axes, `x[1:, ::2, 0]` is
    `strided_slice` (None inserts an axis, `...` stands for the axes not named).

    Example:
        >>> loss = ((y - t) ** 2).mean()
        >>> h = (x @ w.T + b).relu()
    """

    # NumPy's operators defer to ours, so `np.float32(2) * x` is a tensor, not an array of the copy
    __array_ufunc__ = None
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def astype(self, dtype):
        """This tensor converted to floating storage type `dtype` (`mm.float32`, `mm.float16`,
        `mm.bfloat16`, or a name such as "bfloat16"), on the device; a graph tensor records the cast."""
        from . import ops

        return ops.astype(self, dtype=dtype)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # ------------------------------------------------ arithmetic

    def __add__(self, other):
        if _is_number(other):
            return ops.linear_activation(self, a=1.0, b=float(other))
        return ops.add(self, other) if isinstance(other, Operators) else _unsupported("+", other)

    __radd__ = __add__  # x + s and s + x round alike

    def __sub__(self, other):
        if _is_number(other):
            return ops.linear_activation(self, a=1.0, b=-float(other))
        return ops.sub(self, other) if isinstance(other, Operators) else _unsupported("-", other)

    def __rsub__(self, other):
        if _is_number(other):
            return ops.linear_activation(self, a=-1.0, b=float(other))
        return _unsupported("-", other)

    def __mul__(self, other):
        if _is_number(other):
            return ops.scale(self, s=float(other))
        return ops.mul(self, other) if isinstance(other, Operators) else _unsupported("*", other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        if _is_number(other):
            other = self._constant("div", other)
        return ops.div(self, other) if isinstance(other, Operators) else _unsupported("/", other)

    def __rtruediv__(self, other):
        if _is_number(other):
            return ops.div(self._constant("div", other), self)
        return _unsupported("/", other)

    def __neg__(self):
        return ops.neg(self)

    def __abs__(self):
        return ops.abs(self)

    def __pow__(self, exponent):
        if not _is_number(exponent):
            raise TypeError(f"x ** p takes a number as p, got {type(exponent).__name__}")
        return ops.pow(self, exponent=float(exponent))

    def __matmul__(self, other):
        return ops.matmul(self, other) if isinstance(other, Operators) else _unsupported("@", other)

    def __rmatmul__(self, other):
        return _unsupported("@", other)

    def _constant(self, op: str, value) -> "Tensor":
        """`value` as a 0-d float32 tensor on this tensor's device, checked as an op's float attribute."""
        value = float(value)
        ops.check_float_attrs(op, {"y": value})
        c = tensor(np.float32(value), self.device)
        c.from_parameters = getattr(self, "from_parameters", False)  # `w / 2` follows w (Tensor.derivation)
        return c

    # ------------------------------------------------ views and layout

    @property
    def T(self):
        """The axes reversed (`transpose` with no permutation)."""
        return ops.transpose(self)

    def __getitem__(self, index):
        return _index(self, index)

    def reshape(self, *shape):
        """x.reshape(2, -1) or x.reshape((2, -1)): `mm.ops.reshape`."""
        return ops.reshape(self, shape=_dims(shape))

    def transpose(self, *perm):
        """x.transpose() reverses the axes; x.transpose(0, 2, 1) permutes them (NumPy's and MLX's meaning)."""
        return ops.transpose(self, perm=_dims(perm) if perm else None)

    def permute(self, *perm):
        return ops.transpose(self, perm=_dims(perm))

    def flatten(self, start_axis: int = 0, end_axis: int = -1):
        return ops.flatten(self, start_axis, end_axis)

    def squeeze(self, axis=None):
        return ops.squeeze(self, axis)

    def unsqueeze(self, axis: int):
        return ops.unsqueeze(self, axis)

    def broadcast_to(self, *shape):
        return ops.broadcast_to(self, shape=_dims(shape))

    # ------------------------------------------------ reductions

    def sum(self, axis=None, keepdims: bool = False):
        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False):
        return ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False):
        return ops.max(self, axis=axis, keepdims=keepdims)

    def min(self, axis=None, keepdims: bool = False):
        return ops.min(self, axis=axis, keepdims=keepdims)

    def var(self, axis=None, keepdims: bool = False, correction: int = 1):
        return ops.var(self, axis=axis, keepdims=keepdims, correction=correction)

    def argmax(self, axis=-1, keepdims: bool = False):
        return ops.argmax(self, axis=axis, keepdims=keepdims)

    # ------------------------------------------------ elementwise

    def exp(self):
        return ops.exp(self)

    def log(self):
        return ops.log(self)

    def sqrt(self):
        return ops.sqrt(self)

    def rsqrt(self):
        return ops.rsqrt(self)

    def abs(self):
        return ops.abs(self)

    def clamp(self, min: float | None = None, max: float | None = None):
        bounds = {k: v for k, v in (("min", min), ("max", max)) if v is not None}
        return ops.clamp(self, **bounds)

    def relu(self):
        return ops.relu(self)

    def sigmoid(self):
        return ops.sigmoid(self)

    def tanh(self):
        return ops.tanh(self)

    def gelu(self):
        return ops.gelu(self)

    def silu(self):
        return ops.silu(self)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) or (isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "biuf")


def _unsupported(op: str, v):
    """NotImplemented for an operand Python may find another way to combine; a TypeError saying what to
    pass for the arrays and sequences that never will."""
    if isinstance(v, (np.ndarray, list, tuple)):
        raise TypeError(f"unsupported operand for {op}: a tensor and a {type(v).__name__} (make it a tensor first: "
                        f"mm.tensor(array))")
    return NotImplemented


def _dims(args) -> tuple:
    """A shape or permutation given as f(2, 3) or f((2, 3))."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _index(x, index):
    """x[index] for NumPy's basic indexing: integers (negative from the end), slices, `...` and None,
    as one `strided_slice` (integers drop their axis) and, for None, one `reshape`."""
    items = list(index) if isinstance(index, tuple) else [index]
    for item in items:
        if not (item is None or item is Ellipsis or isinstance(item, slice) or _is_index(item)):
            raise TypeError(f"tensors take basic indices: integers, slices, ... and None; got {type(item).__name__}"
                            f" (a tensor's index {index!r})")
    named = sum(item is not None and item is not Ellipsis for item in items)
    if named > x.ndim:
        raise IndexError(f"too many indices for a tensor of {x.ndim} axes {x.shape}: {index!r}")
    if items.count(Ellipsis) > 1:
        raise IndexError(f"an index can hold one ellipsis (...), got {index!r}")
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items[e:e + 1] = [slice(None)] * (x.ndim - named)
    else:
        items += [slice(None)] * (x.ndim - named)
    slices, drop, new_axes = [], [], []  # slices: (start, stop, step) of each axis of x
    for item in items:
        if item is None:  # a new axis of size 1 at this place of the result
            new_axes.append(len(slices) - len(drop) + len(new_axes))
        elif isinstance(item, slice):
            slices.append((item.start, item.stop, item.step))
        else:
            axis, n = len(slices), x.shape[len(slices)]
            if not -n <= item < n:
                raise IndexError(f"index {item} is out of range for axis {axis} of size {n}")
            slices.append((int(item), None, None))
            drop.append(axis)
    if drop or any(v is not None for s in slices for v in s):
        start, stop, step = zip(*slices)
        x = ops.strided_slice(x, start=start, stop=stop, step=step, drop=tuple(drop))
    if new_axes:
        shape = list(x.shape)
        for d in new_axes:
            shape.insert(d, 1)
        x = ops.reshape(x, shape=tuple(shape))
    return x


def _is_index(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


class Tensor(Operators):
    """A shaped view of a device buffer.

    Work on tensors is asynchronous; `numpy()` waits for the device first.

    Example:
        >>> x = mm.tensor(np.ones((2, 3), np.float32))
        >>> mm.ops.relu(x).numpy().shape
        (2, 3)
    """

    stop_gradient = False
    # (op, inputs, attributes, output index) of a tensor an op computed eagerly from parameters
    # alone (`w.T`, `b.reshape(-1, 1, 1)`, `w / 2`): a graph reading it records that op on the
    # parameters instead of a constant copy (Tape.leaf), so their gradients and updates reach it.
    # from_parameters marks what such an op may read: parameters, its results, and the constants
    # an operator makes for them (the 2 of `w / 2`).
    derivation = None
    from_parameters = False
    _grad = None
    _grad_lock = None  # set while `_grad` is a training plan's buffer, copied only when read (see grad)

    def __init__(self, buffer: Buffer, shape: tuple[int, ...], dtype=np.float32):
        self.buffer = buffer
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPES:
            raise TypeError(f"unsupported tensor dtype {self.dtype}; expected one of {', '.join(map(str, DTYPES))}")
        if self.nbytes > buffer.nbytes:
            raise ValueError(f"shape {self.shape} of {self.dtype} needs {self.nbytes} bytes; the buffer has {buffer.nbytes}")

    @property
    def device(self) -> Device:
        return self.buffer.device

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """A host copy of the tensor, after the device has finished the work committed so far."""
        self.device.synchronize()
        return self.buffer.numpy(self.dtype)[: self.size].reshape(self.shape).copy()

    @property
    def grad(self) -> "Tensor | None":
        """The gradient of the latest training step: a tensor of its own, which later steps leave
        as it is (copied on the device from the step's buffers when first read)."""
        while True:
            lock = self._grad_lock
            if lock is None:
                return self._grad
            with lock:  # the training graph's: no step overwrites its buffers meanwhile
                if self._grad_lock is lock:
                    self._grad, self._grad_lock = ops.reshape(self._grad, shape=self.shape), None

    @grad.setter
    def grad(self, value: "Tensor | None") -> None:
        self._grad, self._grad_lock = value, None

    def _step_gradient(self, view: "Tensor", lock) -> None:
        """Set by a training step: `view` lives in the plan's buffers, which the next step
        overwrites under `lock`, so `grad` copies it if it is read before then."""
        self._grad, self._grad_lock = view, lock

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def assign(self, array) -> "Tensor":
        """Overwrite the contents with `array` (same shape; converted to this dtype)."""
        a = np.asarray(array)
        if a.shape != self.shape:
            raise ValueError(f"cannot assign an array of shape {a.shape} to a tensor of shape {self.shape}")
        self.device.synchronize()
        self.buffer.write(np.ascontiguousarray(a, dtype=self.dtype))
        self.derivation, self.from_parameters = None, False  # data of its own now
        return self

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor of {self.size} elements is ambiguous; "
                             "read it with .numpy() and use .any() or .all()")
        return bool(self.numpy().item())

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device.name})"


class Symbolic(Operators):
    """A tensor of a graph under construction (mlmetal.graph's GraphTensor): an op given one
    appends a node to its `graph` instead of running, so the ops need not know the graph."""

    graph: Any


def _device(device: Device | str | None) -> Device:
    from .runtime.backends import device as pick

    return device if isinstance(device, Device) else pick(device)


def tensor(data, device: Device | str | None = None, dtype=None) -> Tensor:
    """A device tensor holding a copy of `data`.

    mlmetal stores float32, float16, bfloat16 (`mm.bfloat16`, ml_dtypes' type), int32 and uint32.
    A NumPy array of another dtype is refused, with
    one exception: float64 becomes float32 (NumPy's default float is rarely meant as double
    precision here). Python numbers and lists become float32 (floats) or int32 (integers), as
    in MLX. Pass `dtype=` to convert anything else on purpose.

    Args:
        data: an array, a number, or nested lists of numbers.
        device: a Device, a backend name, or None for `mm.device()`.
        dtype: one of those (a NumPy dtype or a name such as "bfloat16"); None keeps the data's
            (see above).

    Raises:
        DTypeError: a dtype mlmetal does not store, or integers that do not fit the dtype.

    Example:
        >>> x = mm.tensor(np.arange(6.0).reshape(2, 3))        # float64 data: a float32 tensor
        >>> ids = mm.tensor(np.array([3, 1]), dtype=np.int32)  # int64 data: converted on purpose
    """
    a = np.asarray(data)
    if dtype is None:
        dtype = _stored_dtype(a, from_numpy=isinstance(data, (np.ndarray, np.generic)))
    else:
        try:
            dtype = as_dtype(dtype)
        except TypeError as e:
            raise _dtype_error(f"mm.tensor: {e}") from None
        if dtype not in DTYPES:
            raise _dtype_error(f"mm.tensor: dtype={dtype} is not one mlmetal stores")
    if dtype.kind in "iu" and a.dtype.kind in "iu" and a.size and not (
            np.iinfo(dtype).min <= a.min() and a.max() <= np.iinfo(dtype).max):
        raise _dtype_error(f"mm.tensor: integers from {a.min()} to {a.max()} do not fit {dtype}")
    a = np.asarray(a, dtype=dtype, order="C")  # not ascontiguousarray, which makes a 0-d array 1-d
    dev = _device(device)
    buf = dev.buffer(a) if a.size else dev.buffer(nbytes=4)
    return Tensor(buf, a.shape, a.dtype)


def _stored_dtype(a: np.ndarray, from_numpy: bool) -> np.dtype:
    """The dtype `mm.tensor` stores `a` as when not told: see `tensor`."""
    if a.dtype in DTYPES:
        return a.dtype
    if a.dtype == np.float64:
        return np.dtype(np.float32)
    if not from_numpy and a.dtype.kind in "iu":  # Python integers (int64 in NumPy's eyes)
        return np.dtype(np.int32)
    what = f"a NumPy array of {a.dtype}" if from_numpy else f"data of {a.dtype}"
    to = "int32" if a.dtype.kind in "iu" else "float32"
    raise _dtype_error(f"mm.tensor: {what} is not something mlmetal stores, and is not converted silently; "
                       f"convert it first (array.astype(np.{to})) or pass dtype=np.{to}")


def _dtype_error(message: str):
    return ops.DTypeError(f"{message} (mlmetal stores {', '.join(map(str, DTYPES))}; float64 arrays become float32)")


def empty(shape, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """An uninitialised device tensor."""
    dev = _device(device)
    nbytes = max(4, math.prod(shape) * np.dtype(dtype).itemsize)
    buffer = dev.buffer(nbytes=nbytes)
    eager.note_allocation(buffer)  # an op's temporary, where one is encoding
    return Tensor(buffer, shape, dtype)


# Last: the ops import this module (and find Tensor and Symbolic in it), and Operators calls them.
from . import ops  # noqa: E402
from .ops import eager  # noqa: E402
