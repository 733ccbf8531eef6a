"""Graphs: ops on graph tensors append nodes to a tape, and nothing runs until the graph is run.

tape.py records nodes; autodiff.py derives a training graph from the tape (DESIGN §3);
execution.py plans buffers, encodes and replays dispatches, and runs training steps; fusion.py
fuses a plan's conv2d / instance_norm → relu and conv2d_input_grad → relu_grad pairs.
`Graph` is a tape with the other two's entry points.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..precision import check as check_precision
from ..runtime.device import Device
from ..tensor import Tensor
from .autodiff import gradients
from .execution import Plan, Training, bind_inputs
from .tape import GraphError, GraphTensor, Node, Tape

__all__ = ["Graph", "GraphError", "GraphTensor", "Node", "Plan", "ScaledTraining", "Training"]


class Graph(Tape):
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

    # Plans made from now on fuse a conv2d or instance_norm into the relu after it, and a relu_grad
    # into the conv2d_input_grad before it (fusion.py);
    # False on a graph keeps them apart there, on the class everywhere (`mm.Graph.fuse = False`).
    fuse = True

    def __init__(self, device: Device, matmul_precision: str | None = None, compute_dtype=None):
        super().__init__(device)
        # nodes appended to this graph are autocast to it ("bfloat16", "float16"; mlmetal.autocast)
        # unless an `mm.autocast` block says otherwise; None: only such a block does
        self.compute_dtype = None if compute_dtype is None else _low_precision(compute_dtype)
        # this graph's matmul precision policy (mlmetal.precision); None: the one in force when it runs
        self.matmul_precision = None if matmul_precision is None else check_precision(matmul_precision)
        self._plans: dict = {}
        self.replay = True  # plans made from now on replay unchanged nodes' dispatches (see Plan)
        self.lock = threading.RLock()  # held by every run and training step
        self._training: tuple | None = None  # (the arguments it was derived with, the Training)

    def training_graph(self, loss: GraphTensor, source_gradient: GraphTensor | None = None,
                       node_handler: Callable | None = None, optimizer=None, loss_scaler=None) -> Training:
        """Append the gradient nodes of everything `loss` depends on, and the optimizer's updates.

        Args:
            loss: the tensor the backward pass starts from (usually a loss, or a sum of losses).
            source_gradient: its initial gradient; None uses the loss op's own
                (`initial_gradient`: ones of the loss's shape).
            node_handler: called once on every node created; returning False drops the node
                and prunes the gradients that would flow through it.
            optimizer: appends an update node for every trainable parameter that gets a gradient.
            loss_scaler: an `mm.train.LossScaler` (float16 training): the backward pass starts
                from its scale, the updates run only when every gradient they take is finite
                (a predicate written on the device) and unscale it, and the scale is updated
                after them — all on the device (see LossScaler). Needs an optimizer and no
                source_gradient.

        Returns:
            a Training whose `step(**inputs)` runs forward, backward and updates.

        A graph has one training graph: asked again with the same arguments, this returns the
        one it made; asked with others, it raises GraphError, since a second set of gradient
        nodes and updates would run in every step too (every parameter updated twice). Build
        the network in a new `mm.Graph` for another training graph.
        """
        args = (loss, source_gradient, node_handler, optimizer, loss_scaler)
        if self._training is not None:
            made, training = self._training
            if all(a is b for a, b in zip(made, args)):
                return training
            raise GraphError(f"this graph already has a training graph (derived from {training.loss}); a second "
                             "one would run in every step too, applying each update twice: build the network "
                             "in a new mm.Graph for another")
        if loss_scaler is not None and (optimizer is None or source_gradient is not None):
            raise GraphError("loss_scaler: the scaled backward pass starts from the scale and ends in the optimizer's "
                             "updates, so it needs an optimizer and no source_gradient")
        scale = loss_scaler.state if loss_scaler is not None else None
        param_grads, created = gradients(self, loss, source_gradient, node_handler, loss_scale=scale)
        updates = optimizer.append_updates(self, param_grads) if optimizer is not None else []
        if loss_scaler is not None:
            loss_scaler.guard(self, updates)
        training = (Training(self, loss, param_grads, created, updates, optimizer) if loss_scaler is None else
                    ScaledTraining(self, loss, param_grads, created, updates, optimizer, loss_scaler))
        self._training = (args, training)
        return training

    def run(self, inputs: dict, outputs: list[GraphTensor] | None = None, commit_every: int = 16):
        """Run the graph; returns the numpy values of `outputs` (default: the last node's outputs).

        Args:
            inputs: {name: array} for every graph input, with the declared shapes.
            outputs: the tensors to return.
            commit_every: nodes per `commit_and_continue`, so the device starts while the rest is encoded.
        """
        if isinstance(outputs, GraphTensor):  # iterable (by rows), so list() would not refuse it
            raise TypeError(f"outputs is a list of tensors: outputs=[y], not one tensor ({outputs})")
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
        """Check `inputs` against the graph's declared inputs (see execution.bind_inputs)."""
        return bind_inputs(self, inputs)

    def plan(self, outputs: tuple[GraphTensor, ...], plan_lifetimes: bool = True, copy: int = 0,
             updates: bool = False) -> Plan:
        """The (cached) execution plan computing `outputs`.

        `updates` adds the optimizer's update nodes (a training step); `copy` numbers
        independent plans with buffers of their own, one per iteration kept in flight.
        """
        key = (tuple(outputs), len(self.nodes), plan_lifetimes, copy, updates, self.replay, self.fuse)
        with self.lock:
            if key not in self._plans:
                self._plans[key] = Plan(self, outputs, plan_lifetimes, updates, self.replay, self.fuse)
            return self._plans[key]


class ScaledTraining(Training):
    """A training graph with a loss scaler (`training_graph(loss_scaler=)`): its updates read
    the scale from the device, and a step the device skipped does not advance the optimizer's
    step count (Adam's bias corrections count the updates made, as PyTorch's GradScaler has it)."""

    def __init__(self, graph, loss, param_grads, created, updates, optimizer, loss_scaler):
        super().__init__(graph, loss, param_grads, created, updates, optimizer)
        self.loss_scaler = loss_scaler
        self._seen = loss_scaler.numpy()  # its words after the last step taken here

    def prepare_step(self) -> None:
        super().prepare_step()
        for n in self.update_nodes:
            n.attrs = {**n.attrs, "loss_scale": self.loss_scaler.state}

    def step(self, commit_every: int = 16, **inputs) -> float:
        """Run one training step (Training.step); then, the device having finished it, take a
        step it skipped back off the optimizer's count. Reading the scaler's five words costs
        the host no wait: it has just waited for the loss."""
        with self.graph.lock:
            loss = super().step(commit_every, **inputs)
            words = self.loss_scaler.numpy()
            ran, skipped = int(words[4] - self._seen[4]), int(words[3] - self._seen[3])
            if ran == 1 and skipped:  # (steps run elsewhere, e.g. encoded by hand, were not counted by the host)
                getattr(self.optimizer, "optimizer", self.optimizer).steps -= 1  # DataParallel: its optimizer's
            self._seen = words
            return loss


def _low_precision(dtype):
    from .. import dtypes as D

    d = D.as_dtype(dtype)
    if d not in (D.float16, D.bfloat16):
        raise ValueError(f"Graph: compute_dtype {d} is not float16 or bfloat16")
    return d
