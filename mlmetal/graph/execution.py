"""Running graphs: which nodes run, the buffers their tensors live in, encoding, replay, and training steps."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import ops
from .. import dtypes as D
from ..precision import get_matmul_precision, matmul_precision
from ..tensor import Tensor
from .fusion import fuse_activations
from .tape import GraphError, GraphTensor, Node, Tape


def bind_inputs(tape: Tape, inputs: dict) -> dict[GraphTensor, Any]:
    """Check `inputs` against the graph's declared inputs; {graph tensor: array or tensor}.

    Arrays are converted to the declared dtype within its kind (float64 to float32, say);
    an array of another kind (integers for a float32 input) or a tensor of another dtype is
    refused, as its bits would be read as the declared dtype's.
    """
    if not isinstance(inputs, dict):
        raise GraphError(f"inputs must be a dict {{name: array}}, got {type(inputs).__name__}")
    missing = [n for n in tape.inputs if n not in inputs]
    extra = [n for n in inputs if n not in tape.inputs]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        raise GraphError(f"graph inputs do not match: {'; '.join(parts)} (inputs: {', '.join(tape.inputs)})")
    bound = {}
    for name, t in tape.inputs.items():
        v = inputs[name]
        if isinstance(v, Tensor):
            if v.shape != t.shape:
                raise GraphError(f"input {name!r} has shape {v.shape}; the graph declared {t.shape}")
            if v.dtype != t.dtype:
                raise ops.DTypeError(f"input {name!r} is a {v.dtype} tensor; the graph declared {t.dtype}")
            if v.device is not tape.device:
                raise GraphError(f"input {name!r} lives on {v.device.name}; the graph on {tape.device.name}")
            bound[t] = v
            continue
        a = np.asarray(v)
        if a.shape != t.shape:
            raise GraphError(f"input {name!r} has shape {a.shape}; the graph declared {t.shape}")
        bound[t] = _convert(name, a, t.dtype)
    return bound


def _convert(name: str, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Array `a` fed to input `name` as `dtype`: floats to a float input, integers that fit to an integer one."""
    fits = D.is_float(a.dtype) and D.is_float(dtype) or (
        a.dtype.kind in "iu" and dtype.kind in "iu"
        and (a.size == 0 or np.iinfo(dtype).min <= a.min() and a.max() <= np.iinfo(dtype).max))
    if not fits:
        raise ops.DTypeError(f"input {name!r} is a {a.dtype} array; the graph declared {dtype}"
                             + (f" (convert it: .astype(np.{dtype}))" if a.dtype.kind in "iufb" else ""))
    return np.ascontiguousarray(a, dtype=dtype)


def _same(a, b) -> bool:
    """Replay keys equal; attributes that cannot be compared (arrays) count as changed."""
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


def _assign_slots(nodes: list[Node], keep: set, plan_lifetimes: bool) -> tuple[dict, list[int]]:
    """(slot of each intermediate tensor, bytes of each slot): tensors whose lives do not overlap
    share a slot (with `plan_lifetimes`; else each has its own). A tensor lives from the node that
    writes it to the last that reads it (to the end where it is an output), so a node's output
    never shares with its inputs. Two ways to pack, the smaller kept: in order, each tensor in the
    smallest free slot that fits (else a new one); and by size, largest first, each in the
    smallest slot whose tensors' lives it does not overlap (else a new one), as TensorFlow Lite's
    "greedy by size" does. Neither is best for every graph; both take milliseconds."""
    lives = _lives(nodes, keep, plan_lifetimes)
    packings = [_pack_in_order(lives)] + ([_pack_by_size(lives)] if plan_lifetimes else [])
    return min(packings, key=lambda p: sum(p[1]))


def _lives(nodes: list[Node], keep: set, plan_lifetimes: bool) -> dict:
    """Each intermediate tensor's (first, last node index, bytes in whole words: a slot may later
    hold any dtype), in the order their nodes run."""
    last_use: dict[GraphTensor, int] = {}
    for i, n in enumerate(nodes):
        for x in n.inputs:
            last_use[x] = i
    lives = {}
    for i, n in enumerate(nodes):
        for o in n.outputs:
            if o.value is None and o not in lives:
                end = len(nodes) if o in keep or not plan_lifetimes else max(last_use.get(o, i), i)
                lives[o] = (i, end, max(-(-o.nbytes // 4) * 4, 4))
    return lives


def _pack_in_order(lives: dict) -> tuple[dict, list[int]]:
    slots, sizes, free, ends = {}, [], [], []  # ends: (last index, slot) of the tensors in slots
    for t, (first, last, nbytes) in lives.items():  # in the order their nodes run
        free += [s for e, s in ends if e < first]
        ends = [(e, s) for e, s in ends if e >= first]
        fits = [s for s in free if sizes[s] >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: sizes[s])
            free.remove(slot)
        else:
            slot = len(sizes)
            sizes.append(nbytes)
        slots[t] = slot
        ends.append((last, slot))
    return slots, sizes


def _pack_by_size(lives: dict) -> tuple[dict, list[int]]:
    slots, sizes, held = {}, [], []  # held[s]: the (first, last) of the tensors in slot s
    for t, (first, last, nbytes) in sorted(lives.items(), key=lambda kv: -kv[1][2]):
        apart = [s for s in range(len(sizes)) if all(l < first or last < f for f, l in held[s])]
        if apart:
            slot = min(apart, key=lambda s: sizes[s])
        else:
            slot = len(sizes)
            sizes.append(nbytes)
            held.append([])
        slots[t] = slot
        held[slot].append((first, last))
    return slots, sizes


class Plan:
    """Which nodes run, and which buffer each intermediate tensor lives in.

    Temporaries share memory: tensors whose lives (from the node that writes one to the last
    that reads it) do not overlap share a buffer, packed as `_assign_slots` decides.

    Fusion (`fuse`): a conv2d or instance_norm whose only reader is a relu runs as one node with
    the relu in its epilogue, and a conv2d_input_grad whose only reader is a relu_grad takes the
    mask (fusion.py).

    Replay: a node encoded once keeps the dispatches it encoded, bound and checked, and the
    next run replays them unless its attributes, its predicate or the buffer of a graph input
    it reads changed. Nothing else it touches can change buffers: the plan's own are made
    once, and a parameter's tensor keeps its buffer for life. So most nodes replay on a
    comparison of their attributes. The record holds the buffers it names, so their ids
    cannot be reused by new ones meanwhile.
    """

    def __init__(self, graph, outputs: tuple[GraphTensor, ...], plan_lifetimes: bool = True,
                 updates: bool = False, replay: bool = True, fuse: bool = True):
        self.graph = graph
        self.outputs = outputs
        self.nodes = self._live_nodes(graph.nodes, outputs, updates)
        if fuse:
            self.nodes = fuse_activations(self.nodes, outputs)
        self.slots, self.slot_bytes = _assign_slots(self.nodes, set(outputs), plan_lifetimes)
        self.peak_bytes = sum(self.slot_bytes)
        self._buffers = None
        # per node: the graph inputs it reads, whose buffers may change from run to run (replay's
        # key), or None where its op's encoding depends on more than tensors and attributes (a generator)
        self._fed = [list(dict.fromkeys(x for x in n.inputs if x.is_input))
                     if replay and ops.REGISTRY[n.op].replayable else None for n in self.nodes]
        self._recorded: dict[int, tuple] = {}  # node index -> (predicate, fed buffers' ids, attributes, dispatches)
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

        recorded = self._recorded
        for i, n in enumerate(self.nodes):
            fed = self._fed[i]
            buffers = [id(value(x).buffer) for x in fed] if fed else None
            last = recorded.get(i)
            if last is not None and last[0] is n.predicate and last[1] == buffers and _same(last[2], n.attrs):
                cb.replay(last[3])
            else:
                outs = value(n.outputs[0]) if len(n.outputs) == 1 else tuple(value(o) for o in n.outputs)
                saved, mark = cb.predicate, cb.encoded()
                if n.predicate is not None:
                    cb.predicate = n.predicate
                ops.REGISTRY[n.op].encode(cb, outs, *[value(x) for x in n.inputs], **n.attrs)
                cb.predicate = saved
                if fed is not None:
                    recorded[i] = (n.predicate, buffers, dict(n.attrs), cb.since(mark))
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

    def __init__(self, graph, loss: GraphTensor, param_grads: dict, created: list[Node], updates: list[Node],
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

    def plan(self) -> Plan:
        """The plan of a step: the loss, every parameter's gradient, and the updates."""
        return self.graph.plan((self.loss, *self.param_grads.values()), updates=True)

    def prepare_step(self) -> None:
        """Advance the optimizer's step count and give the update nodes this step's attributes."""
        if self.optimizer is not None:
            attrs = self.optimizer.prepare_step()
            for n in self.update_nodes:
                n.attrs = attrs

    def step(self, commit_every: int = 16, **inputs) -> float:
        """Run one training step; returns the loss and leaves each parameter's gradient in `p.grad`.

        Steps from several threads take turns, each one whole (forward, backward, updates).
        """
        bound = self.graph.bind_inputs(inputs)
        with self.graph.lock:
            self.prepare_step()
            values = self.plan().execute(bound, commit_every)
            for t, g in self.param_grads.items():
                t.value._step_gradient(values[g], self.graph.lock)
            return float(values[self.loss].numpy().sum())

    @property
    def peak_bytes(self) -> int:
        return self.plan().peak_bytes
