"""Gradients of functions, as MLX and JAX take them: `mm.grad(fn)` and `mm.value_and_grad(fn)`.

`fn` is traced once per signature of its arguments (device, shapes and dtypes): called on the
inputs of a new graph, it records its ops as nodes, and its gradient nodes are derived by the
walk `training_graph` takes (graph/autodiff.py), with respect to fn's arguments instead of
trainable parameters. Later calls of that signature run the recorded graph on the new
arguments (replaying its dispatches, graph.Plan) and return copies of its results, without
waiting for the device. Python in `fn` (its control flow, its side effects) runs while tracing
only, as under `jax.jit`.
"""

from __future__ import annotations

import numbers
import threading

from .factories import zeros
from .graph import Graph, GraphTensor
from .graph.autodiff import gradients, needs_gradient
from . import dtypes as D
from .ops import REGISTRY, DTypeError
from .runtime.backends import device as default_device
from .tensor import Tensor, empty, tensor


def value_and_grad(fn, argnums=0):
    """A function returning fn's value and its gradient with respect to the arguments `argnums`.

    Args:
        fn: takes tensors (positionally) and returns the tensor to differentiate, or a tuple
            whose first element is it (the rest are returned with it). A value of more than one
            element is differentiated as its sum, as `training_graph` does.
        argnums: the argument to differentiate with respect to (an int), or a tuple of them.

    Returns:
        a function of fn's arguments (tensors, or arrays that `mm.tensor` takes) returning
        `(value, gradient)`: one gradient tensor for an int `argnums`, a tuple for a tuple. An
        argument the value does not depend on gets zeros.

    Example:
        >>> loss_and_grad = mm.value_and_grad(lambda w, x, t: ((x @ w - t) ** 2).mean())
        >>> loss, dw = loss_and_grad(w, x, t)
    """
    return _Gradient(fn, argnums, with_value=True)


def grad(fn, argnums=0):
    """A function returning the gradient of fn with respect to the arguments `argnums`; see `value_and_grad`.

    Example:
        >>> dx = mm.grad(lambda x: (x ** 3).sum())(mm.tensor(np.ones(4)))   # 3x² = 3
    """
    return _Gradient(fn, argnums, with_value=False)


class _Gradient:
    """fn with its traces, one per signature of the arguments."""

    def __init__(self, fn, argnums, with_value: bool):
        if not callable(fn):
            raise TypeError(f"expected a function to differentiate, got {type(fn).__name__}")
        self.single = isinstance(argnums, numbers.Integral)
        self.argnums = (argnums,) if self.single else tuple(argnums)
        if not self.argnums or not all(isinstance(i, numbers.Integral) and i >= 0 for i in self.argnums) \
                or len(set(self.argnums)) != len(self.argnums):
            raise ValueError(f"argnums must be a non-negative int or a tuple of distinct ones, got {argnums!r}")
        self.fn, self.with_value = fn, with_value
        self.traces: dict[tuple, _Trace] = {}
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError("pass the arguments of a differentiated function positionally "
                            f"(got {', '.join(kwargs)} by keyword)")
        if max(self.argnums) >= len(args):
            raise ValueError(f"argnums {self.argnums} names argument {max(self.argnums)}; the call has {len(args)}")
        dev = next((a.device for a in args if isinstance(a, Tensor)), None) or default_device()
        args = [a if isinstance(a, Tensor) else tensor(a, dev) for a in args]
        key = (dev, tuple((a.shape, a.dtype) for a in args))
        with self.lock:
            if key not in self.traces:
                self.traces[key] = _Trace(self.fn, self.argnums, dev, args)
            trace = self.traces[key]
        value, aux, grads = trace.run(args)
        grads = grads[0] if self.single else tuple(grads)
        if not self.with_value:
            return grads
        return (value, *aux) if aux else value, grads


class _Trace:
    """fn recorded as a graph of its arguments, with its gradient nodes, and the plan that runs them."""

    def __init__(self, fn, argnums, dev, args):
        self.graph = Graph(dev)
        inputs = [self.graph.input(f"arg{i}", a.shape, a.dtype) for i, a in enumerate(args)]
        wrt = [inputs[i] for i in argnums]
        for i, x in zip(argnums, wrt):
            if x.dtype not in D.FLOATS:
                raise DTypeError(f"argument {i} is {x.dtype}; gradients are taken with respect to floating "
                                 f"(float32, float16, bfloat16) arguments")
        out = fn(*inputs)
        value, aux = (out[0], tuple(out[1:])) if isinstance(out, (tuple, list)) else (out, ())
        for what, t in [("value", value)] + [(f"output {j + 1}", t) for j, t in enumerate(aux)]:
            if not isinstance(t, GraphTensor) or t.graph is not self.graph:
                raise TypeError(f"the differentiated function's {what} must be a tensor computed from its "
                                f"arguments, got {t!r}")
        flows = needs_gradient(self.graph, self.graph.nodes, wrt).get(value, False)
        found = gradients(self.graph, value, wrt=wrt)[0] if flows else {}
        # an argument the value does not depend on gets zeros, made on each call
        self.grads = [found.get(x) for x in wrt]
        self.shapes = [x.shape for x in wrt]
        self.outputs = (value, *aux, *(g for g in self.grads if g is not None))
        self.n_aux = len(aux)
        self.plan = self.graph.plan(self.outputs)

    def run(self, args):
        """(value, aux outputs, gradients) for `args`: copies of the plan's buffers, which the next run reuses."""
        g = self.graph
        bound = g.bind_inputs({f"arg{i}": a for i, a in enumerate(args)})
        with g.lock:
            cb = g.device.command_buffer()
            values = self.plan.encode(bound, cb)
            copies = [_copy(cb, values[o]) for o in self.outputs]
            cb.commit()
        value, aux, found = copies[0], copies[1:1 + self.n_aux], iter(copies[1 + self.n_aux:])
        grads = [next(found) if t is not None else zeros(shape, g.device) for t, shape in zip(self.grads, self.shapes)]
        return value, aux, grads


def _copy(cb, t: Tensor) -> Tensor:
    """A tensor of its own holding t, encoded into `cb` (the `reshape` op's flat copy)."""
    out = empty(t.shape, t.device, t.dtype)
    REGISTRY["reshape"].encode(cb, out, t, shape=t.shape)
    return out
