"""The tape: graph tensors and the nodes that ops on them append, in order.

Calling an op on graph tensors appends a node (through `mlmetal.ops.apply`, which sees a
`Symbolic` input); nothing runs until the graph is run (execution.py). A gradient rule
appends nodes the same way, which is how autodiff.py derives a training graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np

from .. import ops
from ..ops import ShapeError
from ..runtime.device import Device, Predicate
from ..tensor import DTYPES, Symbolic, Tensor


class GraphError(ValueError):
    """A graph that cannot be built or run as asked."""


class GraphTensor(Symbolic):
    """A symbolic tensor: an input, a parameter, or the output of a node. Its operators and
    methods (`x + y`, `x.sum(axis=1)`, `x[:, 0]`) append the ops' nodes (tensor.Operators)."""

    def __init__(self, graph: "Tape", shape, dtype=np.float32, node: "Node | None" = None, name: str = "",
                 value: Tensor | None = None):
        self.graph = graph
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.node = node  # producer; None for inputs and parameters
        self.name = name
        self.value = value  # the device tensor of a parameter (or constant), or the one a node writes in place
        self.stop_gradient = False

    @property
    def device(self) -> Device:
        return self.graph.device

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def is_input(self) -> bool:
        return self.node is None and self.value is None

    def __bool__(self):
        raise TypeError(f"{self} has no value until its graph runs, so it is neither true nor false "
                        "(Python's `if` and `and` run while the graph is built)")

    def training_graph(self, source_gradient: "GraphTensor | None" = None, node_handler=None, optimizer=None,
                       loss_scaler=None):
        """Derive the training graph that ends at this tensor (usually a loss). See `Graph.training_graph`."""
        return self.graph.training_graph(self, source_gradient, node_handler, optimizer, loss_scaler)

    def __repr__(self):
        what = "input" if self.is_input else "param" if self.value is not None else self.node.op
        return f"GraphTensor({self.name or what}, shape={self.shape})"


@dataclasses.dataclass(eq=False)
class Node:
    """One op application on the tape."""

    op: str
    inputs: list[GraphTensor]
    attrs: dict
    outputs: list[GraphTensor] = dataclasses.field(default_factory=list)
    gradient_of: "Node | None" = None  # the forward node whose gradient rule created this node
    predicate: Any = None
    is_update: bool = False  # an optimizer's in-place update: runs in training steps only

    def __repr__(self):
        return f"Node({self.op}, {[t.shape for t in self.inputs]} -> {[t.shape for t in self.outputs]})"


class Tape:
    """The nodes of a graph in the order they were appended, its named inputs, and the device
    tensors (parameters, constants) its nodes read, as leaves."""

    def __init__(self, device: Device):
        self.device = device
        self.nodes: list[Node] = []
        self.inputs: dict[str, GraphTensor] = {}
        self.leaves: dict[int, GraphTensor] = {}  # by id of the device tensor
        self._derived: dict[int, tuple[Tensor, GraphTensor]] = {}  # see leaf()
        self._recording: list[Node] | None = None  # see recording()

    def input(self, name: str, shape, dtype=np.float32) -> GraphTensor:
        """A named input, fed by `run(inputs={name: array})`.

        Args:
            name: its key in `run`'s and `step`'s inputs.
            shape: positive integer sizes.
            dtype: float32 (default), int32 or uint32.

        Example:
            >>> x = g.input("x", (4, 3, 32, 32))
        """
        if name in self.inputs:
            raise GraphError(f"graph already has an input named {name!r}")
        dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
        if dims is None or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in dims):
            raise ShapeError(f"input {name!r}: shape must be a tuple of positive integers, got {shape!r}")
        if np.dtype(dtype) not in DTYPES:
            raise ShapeError(f"input {name!r}: dtype {np.dtype(dtype)} is not one of {', '.join(map(str, DTYPES))}")
        t = self.inputs[name] = GraphTensor(self, dims, dtype, name=name)
        return t

    @contextlib.contextmanager
    def predicated(self, predicate):
        """Predicate every node appended inside the block: the device skips them when the
        predicate's word is 0 (their outputs keep what they held).

        Example:
            >>> with g.predicated(mm.Predicate(flags, 0)):
            ...     h = mm.ops.tanh(h)
        """
        if not isinstance(predicate, Predicate):
            predicate = Predicate(*predicate)
        start = len(self.nodes)
        try:
            yield predicate
        finally:
            for n in self.nodes[start:]:
                if n.predicate is None:
                    n.predicate = predicate

    def random(self, shape, generator, distribution) -> GraphTensor:
        """A node that fills a tensor with the generator's next numbers on every run (latents, masks).

        Example:
            >>> z = g.random((64, 100), mm.random.Philox(dev, 0), mm.random.Normal())
        """
        return self.append("random_tensor", [], {"shape": shape, "generator": generator, "distribution": distribution})

    def leaf(self, value: Tensor) -> GraphTensor:
        """The graph tensor of a device tensor (a parameter or a constant) used by a node; for one
        computed from parameters alone (`w.T`), the output of a node recording that computation."""
        key = id(value)
        if value.derivation is not None and not value.stop_gradient:
            if key not in self._derived:
                op, inputs, attrs, index = value.derivation
                out = self.append(op, list(inputs), attrs)
                self._derived[key] = (value, out if index is None else out[index])  # value: its id stays its own
            return self._derived[key][1]
        if key not in self.leaves:
            if value.device is not self.device:
                raise GraphError(f"a tensor on {value.device.name} used in a graph on {self.device.name}")
            t = GraphTensor(self, value.shape, value.dtype, value=value, name=getattr(value, "name", ""))
            t.stop_gradient = value.stop_gradient
            self.leaves[key] = t
        return self.leaves[key]

    def append(self, name: str, inputs: list, attrs: dict, out_values: list[Tensor] | None = None,
               update: bool = False):
        """Append a node applying op `name`; returns its output tensor(s).

        `out_values` binds the outputs to existing device tensors: the node writes them in
        place (a predicate's words, an optimizer's parameters and state). `update` marks an
        optimizer's update, which runs in training steps only.
        """
        gins = [x if isinstance(x, GraphTensor) else self.leaf(x) for x in inputs]
        for x in gins:
            if x.graph is not self:
                raise GraphError(f"{name}: input {x} belongs to another graph")
        shape, norm = ops.infer(name, *gins, **attrs)
        node = Node(name, gins, norm, is_update=update)
        op = ops.REGISTRY[name]
        shapes = shape if isinstance(shape, list) else [shape]
        node.outputs = [GraphTensor(self, s, op.output_dtype(gins, norm, i), node=node) for i, s in enumerate(shapes)]
        for o, v in zip(node.outputs, out_values or []):
            o.value = v
        self.nodes.append(node)
        if self._recording is not None:
            self._recording.append(node)
        return tuple(node.outputs) if isinstance(shape, list) else node.outputs[0]

    @contextlib.contextmanager
    def recording(self):
        """Collect the nodes appended inside the block (by a gradient rule) into the list it yields."""
        saved, self._recording = self._recording, []
        try:
            yield self._recording
        finally:
            self._recording = saved
