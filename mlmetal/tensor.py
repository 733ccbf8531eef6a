"""Tensor: a device buffer with a shape and a dtype (float32 first; images are NCHW)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .runtime.device import Buffer, Device

DTYPES = (np.dtype(np.float32), np.dtype(np.int32), np.dtype(np.uint32))


class Tensor:
    """A shaped view of a device buffer.

    Work on tensors is asynchronous; `numpy()` waits for the device first.

    Example:
        >>> x = mm.tensor(np.ones((2, 3), np.float32))
        >>> mm.ops.relu(x).numpy().shape
        (2, 3)
    """

    stop_gradient = False
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
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

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
                    from . import ops

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
        return self

    def __repr__(self):
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device.name})"


class Symbolic:
    """A tensor of a graph under construction (mlmetal.graph's GraphTensor): an op given one
    appends a node to its `graph` instead of running, so the ops need not know the graph."""

    graph: Any


def _device(device: Device | str | None) -> Device:
    from .runtime.backends import device as pick

    return device if isinstance(device, Device) else pick(device)


def tensor(data, device: Device | str | None = None, dtype=None) -> Tensor:
    """A device tensor holding a copy of `data` (float data becomes float32).

    Args:
        data: an array-like.
        device: a Device, a backend name, or None for `mm.device()`.
        dtype: float32 (default for floating data), int32 or uint32.

    Example:
        >>> x = mm.tensor(np.arange(6.0).reshape(2, 3))
    """
    a = np.asarray(data)
    if dtype is None:
        dtype = np.float32 if a.dtype.kind in "fb" or a.dtype == object else a.dtype
    a = np.asarray(a, dtype=dtype, order="C")  # not ascontiguousarray, which makes a 0-d array 1-d
    dev = _device(device)
    buf = dev.buffer(a) if a.size else dev.buffer(nbytes=4)
    return Tensor(buf, a.shape, a.dtype)


def empty(shape, device: Device | str | None = None, dtype=np.float32) -> Tensor:
    """An uninitialised device tensor."""
    dev = _device(device)
    nbytes = max(4, math.prod(shape) * np.dtype(dtype).itemsize)
    return Tensor(dev.buffer(nbytes=nbytes), shape, dtype)
