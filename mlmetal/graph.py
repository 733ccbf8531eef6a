"""The tape: inference graphs, the training graphs derived from them, and their execution.

Calling an op on graph tensors appends a node to the graph; nothing runs until the graph is
run. `loss.training_graph()` walks the tape backwards and appends, for every forward node
that needs one, the gradient nodes its op's gradient rule creates — the same rules that
run eagerly — plus an addition wherever a tensor fans out (DESIGN §3, MPS's
`trainingGraph(sourceGradient:nodeHandler:)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable

import numpy as np

from . import ops
from .ops import ShapeError
from .precision import check as check_precision, get_matmul_precision, matmul_precision
from .runtime.device import Device
from .tensor import DTYPES, Tensor


class GraphError(ValueError):
    """A graph that cannot be built or run as asked."""


class GraphTensor:
    """A symbolic tensor: an input, a parameter, or the output of a node."""

    def __init__(self, graph: "Graph", shape, dtype=np.float32, node: "Node | None" = None, name: str = "",
                 value: Tensor | None = None):
        self.graph = graph
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.node = node  # producer; None for inputs and parameters
        self.name = name
        self.value = value  # the device tensor of a parameter (or constant)
        self.stop_gradient = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def is_input(self) -> bool:
        return self.node is None and self.value is None

    def training_graph(self, source_gradient: "GraphTensor | None" = None, node_handler: Callable | None = None,
                       optimizer=None) -> "Training":
        """Derive the training graph that ends at this tensor (usually a loss). See `Graph.training_graph`."""
        return self.graph.training_graph(self, source_gradient, node_handler, optimizer)

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


class Graph:
    """An inference graph under construction: ops on its tensors append nodes.

    `run` and training steps may be called from several threads: one graph runs one at a time
    (its plans' buffers are shared by every run), so each gets the result it would alone.

    Example:
        >>> g = mm.Graph(dev)
        >>> x = g.input("x", (4, 3))
        >>> y = mm.ops.relu(x)
        >>> g.run({"x": np.ones((4, 3), np.float32)}, outputs=[y])[0].shape
        (4, 3)
    """

    def __init__(self, device: Device, matmul_precision: str | None = None):
        self.device = device
        # this graph's matmul precision policy (mlmetal.precision); None: the one in force when it runs
        self.matmul_precision = None if matmul_precision is None else check_precision(matmul_precision)
        self.nodes: list[Node] = []
        self.inputs: dict[str, GraphTensor] = {}
        self._params: dict[int, GraphTensor] = {}
        self._recording: list[Node] | None = None  # nodes created by a gradient rule
        self._plans: dict = {}
        self.replay = True  # plans made from now on replay unchanged nodes' dispatches (see Plan)
        self.lock = threading.RLock()  # held by every run and training step
        self._training: tuple | None = None  # (the arguments it was derived with, the Training)

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
        from .runtime.device import Predicate

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
        """The graph tensor of a device tensor (a parameter or a constant) used by a node."""
        key = id(value)
        if key not in self._params:
            if value.device is not self.device:
                raise GraphError(f"a tensor on {value.device.name} used in a graph on {self.device.name}")
            t = GraphTensor(self, value.shape, value.dtype, value=value, name=getattr(value, "name", ""))
            t.stop_gradient = value.stop_gradient
            self._params[key] = t
        return self._params[key]

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
        node.outputs = [GraphTensor(self, s, norm.get("dtype", op.out_dtype), node=node) for s in shapes]
        for o, v in zip(node.outputs, out_values or []):
            o.value = v
        self.nodes.append(node)
        if self._recording is not None:
            self._recording.append(node)
        return tuple(node.outputs) if isinstance(shape, list) else node.outputs[0]

    # ------------------------------------------------------------ training graphs

    def training_graph(self, loss: GraphTensor, source_gradient: GraphTensor | None = None,
                       node_handler: Callable | None = None, optimizer=None) -> "Training":
        """Append the gradient nodes of everything `loss` depends on, and the optimizer's updates.

        Args:
            loss: the tensor the backward pass starts from (usually a loss, or a sum of losses).
            source_gradient: its initial gradient; None uses the loss op's own
                (`initial_gradient`: ones of the loss's shape).
            node_handler: called once on every node created; returning False drops the node
                and prunes the gradients that would flow through it.
            optimizer: appends an update node for every trainable parameter that gets a gradient.

        Returns:
            a Training whose `step(**inputs)` runs forward, backward and updates.

        A graph has one training graph: asked again with the same arguments, this returns the
        one it made; asked with others, it raises GraphError, since a second set of gradient
        nodes and updates would run in every step too (every parameter updated twice). Build
        the network in a new `mm.Graph` for another training graph.
        """
        args = (loss, source_gradient, node_handler, optimizer)
        if self._training is not None:
            made, training = self._training
            if all(a is b for a, b in zip(made, args)):
                return training
            raise GraphError(f"this graph already has a training graph (derived from {training.loss}); a second "
                             "one would run in every step too, applying each update twice: build the network "
                             "in a new mm.Graph for another")
        forward = list(self.nodes)
        needs = self._needs_gradient(forward)
        if not needs.get(loss, False):
            raise GraphError("nothing in this graph has a gradient to compute: the loss depends on no trainable "
                             "parameter (or every path to one is cut by stop_gradient)")
        if source_gradient is None:
            source_gradient = ops.initial_gradient(loss) if "initial_gradient" in ops.REGISTRY else None
            if source_gradient is None:
                raise GraphError("no initial_gradient op is registered; pass source_gradient")
        grads: dict[GraphTensor, GraphTensor] = {loss: source_gradient}
        created: list[Node] = []
        for node in reversed(forward):
            outs = [grads.get(o) for o in node.outputs]
            if all(g is None for g in outs) or not any(needs.get(x, False) for x in node.inputs):
                continue
            op = ops.REGISTRY[node.op]
            if op.grad is None:
                raise GraphError(f"op {node.op} has no gradient rule, but a gradient flows through it")
            g = outs[0] if len(outs) == 1 else tuple(outs)
            out = node.outputs[0] if len(node.outputs) == 1 else tuple(node.outputs)
            in_grads, made = self._record(lambda: op.grad(g, out, *node.inputs, **node.attrs))
            for x, gx in zip(node.inputs, in_grads):
                if gx is None or not needs.get(x, False):
                    continue
                if x in grads:  # fan-out: one addition node joins the two gradients
                    gx, made_add = self._record(lambda: ops.add(grads[x], gx))
                    made += made_add
                grads[x] = gx
            for m in made:
                m.gradient_of = node
            created += made
        params = [t for t in self._params.values() if t.value is not None and needs.get(t, False)]
        param_grads = {t: grads[t] for t in params if t in grads}
        created = self._prune(created, param_grads)
        if node_handler is not None:
            created = self._handle(created, param_grads, node_handler)
        updates = optimizer.append_updates(self, param_grads) if optimizer is not None else []
        training = Training(self, loss, param_grads, created, updates, optimizer)
        self._training = (args, training)
        return training

    def _prune(self, created: list[Node], param_grads: dict) -> list[Node]:
        """Drop the gradient nodes no parameter gradient depends on (e.g. an input gradient above a cut)."""
        live, todo = set(), [g.node for g in param_grads.values() if g.node is not None]
        while todo:
            n = todo.pop()
            if n in live:
                continue
            live.add(n)
            todo += [x.node for x in n.inputs if x.node is not None]
        dead = [n for n in created if n not in live]
        for n in dead:
            self.nodes.remove(n)
        return [n for n in created if n in live]

    def _handle(self, created: list[Node], param_grads: dict, node_handler) -> list[Node]:
        """Show every gradient node to `node_handler`; a node it drops takes its branch with it.

        Where a dropped branch met another at a fan-out addition, the other branch's gradient
        flows on alone.
        """
        dropped: set[GraphTensor] = set()
        alias: dict[GraphTensor, GraphTensor] = {}
        kept = []
        for n in created:
            n.inputs = [alias.get(x, x) for x in n.inputs]
            lost = [x for x in n.inputs if x in dropped]
            if n.op == "add" and len(lost) == 1 and n.gradient_of is not None and len(n.inputs) == 2:
                alias[n.outputs[0]] = n.inputs[1] if lost[0] is n.inputs[0] else n.inputs[0]
                self.nodes.remove(n)
                continue
            if lost or node_handler(n) is False:
                dropped.update(n.outputs)
                self.nodes.remove(n)
                continue
            kept.append(n)
        for t, g in list(param_grads.items()):
            g = alias.get(g, g)
            if g in dropped:
                del param_grads[t]
            else:
                param_grads[t] = g
        return self._prune(kept, param_grads)

    def _record(self, fn):
        saved, self._recording = self._recording, []
        try:
            result = fn()
            return result, self._recording
        finally:
            self._recording = saved

    def _needs_gradient(self, nodes: list[Node]) -> dict[GraphTensor, bool]:
        """Which tensors carry a gradient: trainable parameters and everything computed from them."""
        needs: dict[GraphTensor, bool] = {}
        for t in self._params.values():
            needs[t] = t.value is not None and not t.stop_gradient and getattr(t.value, "trainable", False)
        for node in nodes:
            flows = any(needs.get(x, False) for x in node.inputs)
            for o in node.outputs:
                needs[o] = flows and not o.stop_gradient
        return needs

    # ------------------------------------------------------------ execution

    def run(self, inputs: dict, outputs: list[GraphTensor] | None = None, commit_every: int = 16):
        """Run the graph; returns the numpy values of `outputs` (default: the last node's outputs).

        Args:
            inputs: {name: array} for every graph input, with the declared shapes.
            outputs: the tensors to return.
            commit_every: nodes per `commit_and_continue`, so the device starts while the rest is encoded.
        """
        bound = self.bind_inputs(inputs)
        if outputs is None:
            if not self.nodes:
                raise GraphError("the graph has no nodes to run")
            outputs = self.nodes[-1].outputs
        outputs = list(outputs)
        with self.lock:
            values = self.plan(tuple(outputs)).execute(bound, commit_every)
            return [values[o].numpy() if isinstance(values[o], Tensor) else values[o] for o in outputs]

    def bind_inputs(self, inputs: dict) -> dict[GraphTensor, Any]:
        """Check `inputs` against the graph's declared inputs; {graph tensor: array or tensor}.

        Arrays are converted to the declared dtype within its kind (float64 to float32, say);
        an array of another kind (integers for a float32 input) or a tensor of another dtype is
        refused, as its bits would be read as the declared dtype's.
        """
        if not isinstance(inputs, dict):
            raise GraphError(f"inputs must be a dict {{name: array}}, got {type(inputs).__name__}")
        missing = [n for n in self.inputs if n not in inputs]
        extra = [n for n in inputs if n not in self.inputs]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
            raise GraphError(f"graph inputs do not match: {'; '.join(parts)} (inputs: {', '.join(self.inputs)})")
        bound = {}
        for name, t in self.inputs.items():
            v = inputs[name]
            if isinstance(v, Tensor):
                if v.shape != t.shape:
                    raise GraphError(f"input {name!r} has shape {v.shape}; the graph declared {t.shape}")
                if v.dtype != t.dtype:
                    raise ops.DTypeError(f"input {name!r} is a {v.dtype} tensor; the graph declared {t.dtype}")
                if v.device is not self.device:
                    raise GraphError(f"input {name!r} lives on {v.device.name}; the graph on {self.device.name}")
                bound[t] = v
                continue
            a = np.asarray(v)
            if a.shape != t.shape:
                raise GraphError(f"input {name!r} has shape {a.shape}; the graph declared {t.shape}")
            bound[t] = _convert(name, a, t.dtype)
        return bound

    def plan(self, outputs: tuple[GraphTensor, ...], plan_lifetimes: bool = True, copy: int = 0,
             updates: bool = False) -> "Plan":
        """The (cached) execution plan computing `outputs`.

        `updates` adds the optimizer's update nodes (a training step); `copy` numbers
        independent plans with buffers of their own, one per iteration kept in flight.
        """
        key = (tuple(outputs), len(self.nodes), plan_lifetimes, copy, updates, self.replay)
        with self.lock:
            if key not in self._plans:
                self._plans[key] = Plan(self, outputs, plan_lifetimes, updates, self.replay)
            return self._plans[key]


def _convert(name: str, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Array `a` fed to input `name` as `dtype`: floats to a float input, integers that fit to an integer one."""
    fits = a.dtype.kind == dtype.kind == "f" or (
        a.dtype.kind in "iu" and dtype.kind in "iu"
        and (a.size == 0 or np.iinfo(dtype).min <= a.min() and a.max() <= np.iinfo(dtype).max))
    if not fits:
        raise ops.DTypeError(f"input {name!r} is a {a.dtype} array; the graph declared {dtype}"
                             + (f" (convert it: .astype(np.{dtype}))" if a.dtype.kind in "iufb" else ""))
    return np.ascontiguousarray(a, dtype=dtype)


def _same(a: tuple, b: tuple) -> bool:
    """Replay keys equal; attributes that cannot be compared (arrays) count as changed."""
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


class Plan:
    """Which nodes run, and which buffer each intermediate tensor lives in.

    Temporaries share memory: a tensor's buffer returns to a free list after the last node
    that reads it, and later tensors take the smallest free buffer that fits.
    """

    def __init__(self, graph: Graph, outputs: tuple[GraphTensor, ...], plan_lifetimes: bool = True,
                 updates: bool = False, replay: bool = True):
        self.graph = graph
        self.outputs = outputs
        self.nodes = self._live_nodes(graph.nodes, outputs, updates)
        self.slots: dict[GraphTensor, int] = {}
        self.slot_bytes: list[int] = []
        keep = set(outputs)
        last_use: dict[GraphTensor, int] = {}
        for i, n in enumerate(self.nodes):
            for x in n.inputs:
                last_use[x] = i
        free: list[int] = []
        for i, n in enumerate(self.nodes):
            for o in n.outputs:
                if o.value is None:
                    self.slots[o] = self._take(free, max(o.nbytes, 4))
            if plan_lifetimes:
                for x in set(n.inputs) | set(n.outputs):
                    if x in self.slots and x not in keep and last_use.get(x, -1) <= i:
                        free.append(self.slots[x])
        self.peak_bytes = sum(self.slot_bytes)
        self._buffers = None
        # Replay: a node whose buffers, attributes and predicate are those of the last run gets
        # the dispatches it encoded then, already bound and checked, instead of encoding again.
        # The record holds those buffers, so their ids cannot be reused by new ones meanwhile.
        self.replay = replay
        self._recorded: dict[int, tuple] = {}
        self._last_roots = None
        self._policy = None  # the matmul precision the recorded dispatches were encoded under

    @staticmethod
    def _live_nodes(nodes: list[Node], outputs, updates: bool) -> list[Node]:
        """Nodes the outputs depend on, plus every node that writes tensors in place (predicate
        writers; optimizer updates only when `updates`)."""
        needed = {o.node for o in outputs if o.node is not None}
        live = []
        for n in reversed(nodes):
            writes = any(o.value is not None for o in n.outputs) and (updates or not n.is_update)
            if n in needed or writes:
                live.append(n)
                needed.update(x.node for x in n.inputs if x.node is not None)
        return live[::-1]

    @staticmethod
    def _replay_key(n: Node, inputs, outs) -> tuple:
        outs = outs if isinstance(outs, tuple) else (outs,)
        return (tuple(id(t.buffer) for t in (*inputs, *outs)), dict(n.attrs), id(n.predicate))

    def _take(self, free: list[int], nbytes: int) -> int:
        fits = [s for s in free if self.slot_bytes[s] >= nbytes]
        if fits:
            best = min(fits, key=lambda s: self.slot_bytes[s])
            free.remove(best)
            return best
        self.slot_bytes.append(nbytes)
        return len(self.slot_bytes) - 1

    def _roots(self, bound: dict) -> tuple | None:
        """The buffers behind the graph's inputs and parameters (None when an input is an array,
        which gets a fresh buffer every run)."""
        if not all(isinstance(v, Tensor) for v in bound.values()):
            return None
        return (tuple(id(v.buffer) for v in bound.values()),
                tuple(id(t.value.buffer) for t in self.graph._params.values()))

    def encode(self, bound: dict, cb, commit_every: int = 16) -> dict:
        """Encode every node into `cb` (with `commit_and_continue` every `commit_every` nodes)
        and return the outputs' tensors (with any others it built), without the final commit or
        wait — so a caller can keep several iterations in flight (each with its own plan, see
        `Graph.plan(copy=)`). The caller keeps other threads off the plan until it has read the
        outputs (`with graph.lock:`), as `Graph.run` does. Products run under the graph's matmul
        precision, or the one in force."""
        with matmul_precision(self.graph.matmul_precision):
            if get_matmul_precision() != self._policy:  # the recorded dispatches chose their kernels by it
                self._recorded.clear()
                self._policy = get_matmul_precision()
            return self._encode(bound, cb, commit_every)

    def _encode(self, bound: dict, cb, commit_every: int) -> dict:
        dev = self.graph.device
        if self._buffers is None:
            self._buffers = [dev.buffer(nbytes=b) for b in self.slot_bytes]
        # When the inputs and parameters are the buffers of the last run, every intermediate is
        # too (the plan's own), so a recorded node whose attributes and predicate are unchanged
        # replays without its tensors being looked up at all: a few dict comparisons a node.
        roots = self._roots(bound) if self.replay else None
        quick, self._last_roots = roots is not None and roots == self._last_roots, roots
        values: dict[GraphTensor, Tensor] = {}

        def value(t: GraphTensor) -> Tensor:
            v = values.get(t)
            if v is None:
                if t in bound:
                    v = bound[t]
                    if not isinstance(v, Tensor):
                        v = Tensor(dev.buffer(v if v.size else np.zeros(1, v.dtype)), t.shape, t.dtype)
                elif t.value is not None:
                    v = t.value
                else:
                    v = Tensor(self._buffers[self.slots[t]], t.shape, t.dtype)
                values[t] = v
            return v

        for i, n in enumerate(self.nodes):
            recorded = self._recorded.get(i)
            if quick and recorded is not None and recorded[0][2] == id(n.predicate) and _same(recorded[0][1], n.attrs):
                cb.replay(recorded[1])
            else:
                outs = value(n.outputs[0]) if len(n.outputs) == 1 else tuple(value(o) for o in n.outputs)
                inputs = [value(x) for x in n.inputs]
                op = ops.REGISTRY[n.op]
                key = self._replay_key(n, inputs, outs) if self.replay and op.replayable else None
                if key is not None and recorded is not None and _same(recorded[0], key):
                    cb.replay(recorded[1])
                else:
                    saved, mark = cb.predicate, cb.encoded()
                    if n.predicate is not None:
                        cb.predicate = n.predicate
                    op.encode(cb, outs, *inputs, **n.attrs)
                    cb.predicate = saved
                    if key is not None:
                        self._recorded[i] = (key, cb.since(mark))
            if commit_every and (i + 1) % commit_every == 0:
                cb.commit_and_continue()
        for o in self.outputs:
            value(o)
        return values

    def execute(self, bound: dict, commit_every: int = 16) -> dict:
        """Encode, commit, and wait for the device."""
        cb = self.graph.device.command_buffer()
        values = self.encode(bound, cb, commit_every)
        cb.commit()
        cb.wait()
        return values


class Training:
    """A derived training graph: `step(**inputs)` runs forward, backward and the optimizer's updates."""

    def __init__(self, graph: Graph, loss: GraphTensor, param_grads: dict, created: list[Node], updates: list[Node],
                 optimizer=None):
        self.graph = graph
        self.optimizer = optimizer
        self.loss = loss
        self.param_grads = param_grads
        self.gradient_nodes = created
        self.update_nodes = updates

    @property
    def parameters(self) -> list[Tensor]:
        return [t.value for t in self.param_grads]

    def step(self, commit_every: int = 16, **inputs) -> float:
        """Run one training step; returns the loss and leaves each parameter's gradient in `p.grad`.

        Steps from several threads take turns, each one whole (forward, backward, updates).
        """
        bound = self.graph.bind_inputs(inputs)
        with self.graph.lock:
            self.prepare_step()
            plan = self.graph.plan((self.loss, *self.param_grads.values()), updates=True)
            values = plan.execute(bound, commit_every)
            for t, g in self.param_grads.items():
                t.value._step_gradient(values[g], self.graph.lock)
            return float(values[self.loss].numpy().sum())

    def prepare_step(self) -> None:
        """Advance the optimizer's step count and give the update nodes this step's attributes."""
        if self.optimizer is not None:
            attrs = self.optimizer.prepare_step()
            for n in self.update_nodes:
                n.attrs = attrs

    @property
    def peak_bytes(self) -> int:
        return self.graph.plan((self.loss, *self.param_grads.values()), updates=True).peak_bytes
