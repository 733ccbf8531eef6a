"""Optimizers: SGD and Adam over the update kernels of kernels/optim.metal.

An optimizer owns its state tensors (momentum, moments) on the device. In a training
graph it appends one update node per trainable parameter that writes the parameter and its
state in place; `step()` runs the same updates eagerly from each parameter's `grad`.
A subclass names its update op and state slots and maps its hyper-parameters to and from
the op's attributes (as MLX's optimizers implement only `init_single` and `apply_single`);
saving and restoring are the base class's, so a new optimizer is a class here, its update
op (kernel, registration, reference) and its test.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

from . import ops
from .ops.optim import update_in_place
from .tensor import Tensor, tensor


class Optimizer:
    """Base class. Subclasses set `name` (its name in saved files), `op` (the update op) and
    `slots` (the names of the per-parameter state tensors, which start as zeros) and define
    `hyper` and `set_hyper`; their constructors take `(params, lr)` and default the rest."""

    name = ""
    op = ""
    slots: tuple[str, ...] = ()
    KINDS: dict[str, type["Optimizer"]] = {}  # by name: what a saved model's optimizer may be

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            Optimizer.KINDS[cls.name] = cls

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got no parameters to optimise")
        self.lr = float(lr)
        self.steps = 0
        self.state = {id(p): self.init_state(p) for p in self.params}

    def init_state(self, p: Tensor) -> list[Tensor]:
        return [tensor(np.zeros(p.shape, np.float32), p.device) for _ in self.slots]

    def hyper(self) -> dict:
        """The hyper-parameters, named as the update op's attributes (the step number aside)."""
        raise NotImplementedError

    def set_hyper(self, attrs: dict) -> None:
        """Take the hyper-parameters from `hyper()`'s form."""
        raise NotImplementedError

    @classmethod
    def update_attrs(cls, hyper: dict, steps: int) -> dict:
        """The update op's attributes after `steps` steps: the hyper-parameters, and the step number where the op takes one."""
        return {**hyper, "step": max(steps, 1)} if _takes_step(cls.op) else dict(hyper)

    def attrs(self) -> dict:
        return self.update_attrs(self.hyper(), self.steps)

    def append_updates(self, graph, param_grads: dict) -> list:
        """Append an in-place update node for every parameter of this optimizer that has a gradient."""
        nodes, mine = [], {id(p) for p in self.params}
        for leaf, grad in param_grads.items():
            p = leaf.value
            if id(p) in mine and getattr(p, "trainable", True):
                state = self.state[id(p)]
                outs = graph.append(self.op, [p, grad, *state], self.attrs(), out_values=[p, *state], update=True)
                nodes.append(outs[0].node)
        return nodes

    def prepare_step(self) -> dict:
        """Advance the step count; the update op's attributes for this step, checked (an attribute
        that cannot be, such as a learning rate past float32's range, raises and leaves the count)."""
        p = self.params[0]  # the attributes do not depend on the shapes: checked on the first parameter
        attrs = ops.infer(self.op, p, p, *self.state[id(p)], **self.update_attrs(self.hyper(), self.steps + 1))[1]
        self.steps += 1
        return attrs

    def step(self) -> None:
        """Eagerly update every trainable parameter from its `grad`."""
        attrs = self.prepare_step()
        for p in self.params:
            if getattr(p, "trainable", True) and getattr(p, "grad", None) is not None:
                update_in_place(self.op, p, p.grad, *self.state[id(p)], **attrs)

    # ------------------------------------------------------------ saved form (mlmetal.io)

    @classmethod
    def state_name(cls, slot: str, param: str) -> str:
        """The saved name of parameter `param`'s state tensor `slot`: `optimizer.adam.m.conv1.weight`."""
        return f"optimizer.{cls.name}.{slot}.{param}"

    def saved_state(self, names: list[str]) -> dict[str, Tensor]:
        """The state tensors by saved name, `names[i]` naming `params[i]`."""
        return {self.state_name(slot, name): t
                for p, name in zip(self.params, names) for slot, t in zip(self.slots, self.state[id(p)])}

    def describe(self, names: list[str]) -> dict:
        """graph.json's optimizer entry, `names[i]` naming `params[i]`."""
        return {"type": self.name, "steps": int(self.steps), "parameters": list(names), "attrs": self.hyper()}

    def restore(self, entry: dict) -> None:
        """Take a saved entry's step count and hyper-parameters (the loader fills the state tensors)."""
        self.set_hyper(entry["attrs"])
        self.steps = entry["steps"]

    @classmethod
    def from_saved(cls, params: list, entry: dict) -> "Optimizer":
        """An optimizer of the saved entry's kind over `params`, with its step count and hyper-parameters."""
        opt = cls.KINDS[entry["type"]](params, lr=entry["attrs"]["lr"])
        opt.restore(entry)
        return opt


@functools.lru_cache(maxsize=None)
def _takes_step(op: str) -> bool:
    return "step" in inspect.signature(ops.REGISTRY[op].check).parameters


class SGD(Optimizer):
    """torch.optim.SGD: `mm.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)`."""

    name, op, slots = "sgd", "sgd_update", ("momentum_buffer",)

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        super().__init__(params, lr)

    def hyper(self):
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)

    def set_hyper(self, attrs):
        self.lr, self.momentum, self.weight_decay = attrs["lr"], attrs["momentum"], attrs["weight_decay"]
        self.nesterov = attrs["nesterov"]


class Adam(Optimizer):
    """torch.optim.Adam: `mm.optim.Adam(model.parameters(), lr=1e-3)`."""

    name, op, slots = "adam", "adam_update", ("m", "v")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        super().__init__(params, lr)

    def hyper(self):
        return dict(lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)

    def set_hyper(self, attrs):
        self.lr, self.betas = attrs["lr"], (attrs["beta1"], attrs["beta2"])
        self.eps, self.weight_decay = attrs["eps"], attrs["weight_decay"]


class StepDecay:
    """Halve (or scale by `gamma`) the optimizer's learning rate every `every` epochs."""

    def __init__(self, optimizer: Optimizer, every: int, gamma: float = 0.5):
        self.optimizer, self.every, self.gamma = optimizer, every, gamma
        self.base = optimizer.lr

    def epoch(self, n: int) -> float:
        """Set the learning rate for epoch `n` (counting from 0) and return it."""
        self.optimizer.lr = self.base * self.gamma ** (n // self.every)
        return self.optimizer.lr
