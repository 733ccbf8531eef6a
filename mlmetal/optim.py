"""Optimizers: SGD and Adam over the update kernels of kernels/optim.metal.

An optimizer owns its state tensors (momentum, moments) on the device. In a training
graph it appends one update node per trainable parameter that writes the parameter and its
state in place; `step()` runs the same updates eagerly from each parameter's `grad`.
Only `init_state` and the update's attributes differ between optimizers (as in MLX).
"""

from __future__ import annotations

import numpy as np

from . import ops
from .ops.optim import update_in_place
from .tensor import Tensor, tensor


class Optimizer:
    op = ""

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got no parameters to optimise")
        self.lr = float(lr)
        self.steps = 0
        self.state = {id(p): self.init_state(p) for p in self.params}
        self._nodes = []

    def init_state(self, p: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def attrs(self) -> dict:
        raise NotImplementedError

    def append_updates(self, graph, param_grads: dict) -> list:
        """Append an in-place update node for every parameter of this optimizer that has a gradient."""
        nodes = []
        mine = {id(p) for p in self.params}
        for leaf, grad in param_grads.items():
            p = leaf.value
            if id(p) not in mine or not getattr(p, "trainable", True):
                continue
            state = self.state[id(p)]
            graph.append(self.op, [p, grad, *state], self.attrs(), out_values=[p, *state])
            graph.nodes[-1].is_update = True
            nodes.append(graph.nodes[-1])
        self._nodes += nodes  # every training graph it updates in, so each sees this step's attributes
        return nodes

    def prepare_step(self) -> None:
        """Advance the step count and refresh the update nodes' attributes (learning rate, step);
        an attribute that cannot be (a learning rate past float32's range) leaves both as they were."""
        self.steps += 1
        if self._nodes:  # the attributes do not depend on the shapes: checked once, for the first node
            try:
                attrs = ops.infer(self.op, *self._nodes[0].inputs, **self.attrs())[1]
            except ops.ShapeError:
                self.steps -= 1
                raise
            for n in self._nodes:
                n.attrs.update(attrs)

    def step(self) -> None:
        """Eagerly update every trainable parameter from its `grad`."""
        self.steps += 1
        for p in self.params:
            if getattr(p, "trainable", True) and getattr(p, "grad", None) is not None:
                update_in_place(self.op, p, p.grad, *self.state[id(p)], **self.attrs())


def _zeros_like(p: Tensor) -> Tensor:
    return tensor(np.zeros(p.shape, np.float32), p.device)


class SGD(Optimizer):
    """torch.optim.SGD: `mm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)`."""

    op = "sgd_update"

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        super().__init__(params, lr)

    def init_state(self, p):
        return [_zeros_like(p)]

    def attrs(self):
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)


class Adam(Optimizer):
    """torch.optim.Adam: `mm.optim.Adam(model.parameters(), lr=1e-3)`."""

    op = "adam_update"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        super().__init__(params, lr)

    def init_state(self, p):
        return [_zeros_like(p), _zeros_like(p)]

    def attrs(self):
        return dict(lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                    step=max(self.steps, 1))


class StepDecay:
    """Halve (or scale by `gamma`) the optimizer's learning rate every `every` epochs."""

    def __init__(self, optimizer: Optimizer, every: int, gamma: float = 0.5):
        self.optimizer, self.every, self.gamma = optimizer, every, gamma
        self.base = optimizer.lr

    def epoch(self, n: int) -> float:
        """Set the learning rate for epoch `n` (counting from 0) and return it."""
        self.optimizer.lr = self.base * self.gamma ** (n // self.every)
        return self.optimizer.lr
