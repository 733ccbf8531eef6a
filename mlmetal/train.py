"""A small fit loop: epochs of training steps with a progress bar, validation every K epochs,
and a learning-rate schedule; and `LossScaler`, dynamic loss scaling decided on the device."""

from __future__ import annotations

import math
import sys
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from . import ops
from .ops.optim import FINITE_WORD, LOSS_SCALE_WORDS
from .runtime.device import Predicate
from .tensor import tensor


def fit(step: Callable[..., float], batches: Callable[[int], Iterable[dict]], epochs: int, *,
        validate: Callable[[], dict] | None = None, every: int = 1, schedule=None, progress: bool = True,
        steps: int | None = None) -> list[dict]:
    """Train for `epochs` epochs; returns one record per epoch (mean loss, learning rate, metrics).

    Args:
        step: one training step taking a batch as keyword arguments and returning its loss
            (e.g. `training.step`).
        batches: `batches(epoch)` yields the epoch's batches, each a dict of graph inputs.
        epochs: how many epochs.
        validate: called every `every` epochs and after the last; returns metrics to record.
        every: validation period in epochs.
        schedule: e.g. `mm.optim.StepDecay(opt, every=1000)`; its `epoch(n)` sets the learning rate.
        progress: show a progress bar (on stderr).
        steps: stop after this many steps in all (validating then), whatever the epoch count.

    Example:
        >>> history = mm.train.fit(train.step, lambda e: loader(e), epochs=10, validate=evaluate, every=2)
    """
    history = []
    done = 0
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in bar:
        lr = schedule.epoch(epoch) if schedule is not None else None
        losses = []
        for batch in batches(epoch):
            if steps is not None and done >= steps:
                break
            losses.append(step(**batch))
            done += 1
        last = epoch == epochs - 1 or (steps is not None and done >= steps)
        record = {"epoch": epoch, "loss": sum(losses) / max(len(losses), 1)}
        if lr is not None:
            record["lr"] = lr
        if validate is not None and ((epoch + 1) % every == 0 or last):
            record.update(validate())
        history.append(record)
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
        if last:
            break
    return history


class LossScaler:
    """Dynamic loss scaling decided on the device: PyTorch's GradScaler without the host round trip.

    float16 holds nothing above 65504 and nothing below 6·10⁻⁸, where small gradients vanish.
    A training graph given `loss_scaler=` (`Graph.training_graph`) scales them into range and
    decides every step on the device, so a step never waits for the host:

    1. the backward pass starts from the scale instead of 1 (`loss_scale_gradient`, which reads
       it from the device), so every gradient is multiplied by it;
    2. every updated parameter's gradient is checked for Inf and NaN (`predicate_finite`), all
       into one predicate word, `finite`;
    3. the optimizer's updates run predicated by that word: a step with an overflow leaves every
       parameter and optimizer state as it was; the updates divide the gradient by the scale,
       read on the device (their `loss_scale` attribute);
    4. `loss_scale_update` moves the scale: an overflow multiplies it by `backoff_factor` and
       counts a skipped step; `growth_interval` clean steps in a row multiply it by `growth_factor`.

    The state is one small device buffer of five uint32 words (the scale's float32 bits, the
    finite word, the clean steps since the scale last changed, the skipped steps, all steps);
    `scale`, `skipped_steps` and `steps` read it, waiting for the device.

    The gradients a step leaves in `p.grad` are the scaled ones (as PyTorch's before `unscale_`).
    Adam's step count, which its bias corrections use, is a host attribute: `Training.step`
    waits for its loss anyway, and then takes a skipped step back off the count, so the next
    update uses the number PyTorch's would (a skipped step does not advance Adam). Steps encoded
    without that wait (`Plan.encode` of several steps into one command buffer) are numbered as
    encoded, skipped or not. One scaler serves one training graph.

    Args:
        init_scale: the first scale (PyTorch's default 2¹⁶).
        growth_factor: multiplies the scale after `growth_interval` clean steps (above 1).
        backoff_factor: multiplies it after a step with an Inf or NaN gradient (in (0, 1)).
        growth_interval: clean steps between growths.
        device: where the state lives (that of the graph it serves); None: `mm.device()`.

    Example:
        >>> scaler = mm.train.LossScaler(init_scale=2.0**16)
        >>> with mm.autocast("float16"):
        ...     loss = mm.ops.mse_loss(net(x), t)
        >>> train = g.training_graph(loss, optimizer=mm.optim.Adam(net.parameters()), loss_scaler=scaler)
        >>> train.step(x=batch, t=target)
        >>> scaler.scale, scaler.skipped_steps
        (65536.0, 0)
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, device=None):
        with np.errstate(over="ignore"):
            scale = np.float32(init_scale) if isinstance(init_scale, (int, float, np.number)) else None
        if scale is None or not 0 < scale < math.inf:
            raise ValueError(f"LossScaler: init_scale must be a positive number within float32's range, "
                             f"got {init_scale!r}")
        self.attrs = ops.REGISTRY["loss_scale_update"].check(
            (LOSS_SCALE_WORDS,), growth_factor=growth_factor, backoff_factor=backoff_factor,
            growth_interval=growth_interval)[1]
        words = np.array([0, 1, 0, 0, 0], np.uint32)
        words[:1] = scale.reshape(1).view(np.uint32)
        self.state = tensor(words, device, dtype=np.uint32)

    @property
    def finite(self) -> Predicate:
        """The predicate word of the step: nonzero while every gradient checked is finite."""
        return Predicate(self.state.buffer, 4 * FINITE_WORD)

    def numpy(self) -> np.ndarray:
        """The state's five words (after the device has finished the work committed so far)."""
        return self.state.numpy()

    @property
    def scale(self) -> float:
        """The scale the next step multiplies its gradients by."""
        return float(self.numpy()[:1].view(np.float32)[0])

    @property
    def skipped_steps(self) -> int:
        """Steps whose updates the device skipped, for an Inf or NaN gradient."""
        return int(self.numpy()[3])

    @property
    def steps(self) -> int:
        """Steps taken, skipped ones included."""
        return int(self.numpy()[4])

    # ------------------------------------------------------------ eagerly (PyTorch's scale, step and update)

    def scale_loss(self, loss):
        """`loss` times the scale, read on the device (a graph tensor records the ops): its
        gradients are the scaled ones `step` takes.

        Example:
            >>> loss, grads = mm.value_and_grad(lambda w: scaler.scale_loss(loss_fn(w)))(w)
        """
        return ops.mul(loss, ops.loss_scale_gradient(self.state, loss))

    def step(self, optimizer) -> None:
        """Eagerly, from each parameter's (scaled) `grad`: check the gradients, run the
        optimizer's updates predicated by the finite word, unscaling, and update the scale — one
        command buffer, committed without waiting. The optimizer's step count advances whether or
        not the device skips the updates (the host would have to wait to know): unlike in a
        training graph's `step`, a skipped step counts for Adam's bias corrections.

        Example:
            >>> w.grad = dw            # the gradient of scaler.scale_loss(loss)
            >>> scaler.step(opt)
        """
        params = [p for p in optimizer.params if getattr(p, "trainable", True) and getattr(p, "grad", None) is not None]
        attrs = {**optimizer.prepare_step(), "loss_scale": self.state}
        for p in params:  # everything checked before anything is encoded
            ops.infer("predicate_finite", p.grad, self.state, word=FINITE_WORD)
            ops.infer(optimizer.op, p, p.grad, *optimizer.state[id(p)], **attrs)
        cb = self.state.device.command_buffer()
        for p in params:
            ops.REGISTRY["predicate_finite"].encode(cb, self.state, p.grad, self.state, word=FINITE_WORD)
        cb.predicate = self.finite
        update = ops.REGISTRY[optimizer.op]
        for p in params:
            state = optimizer.state[id(p)]
            update.encode(cb, (p, *state), p, p.grad, *state, **attrs)
        cb.predicate = None
        ops.REGISTRY["loss_scale_update"].encode(cb, self.state, self.state, **self.attrs)
        cb.commit()

    # ------------------------------------------------------------ in a training graph

    def guard(self, graph, updates: list) -> None:
        """Make a training graph's optimizer `updates` (nodes) conditional on finite gradients:
        check each one's gradient (input 1) into the finite word, move the updates after the
        checks, predicate them by the word and have them unscale their gradient, then append
        the scale's update. Called by `Graph.training_graph(loss_scaler=)`; the graph's backward
        pass must start from `loss_scale_gradient`.
        """
        for n in updates:  # after every check: the word is final only then
            graph.nodes.remove(n)
        for n in updates:
            graph.append("predicate_finite", [n.inputs[1], self.state], {"word": FINITE_WORD}, out_values=[self.state],
                         update=True)
        for n in updates:
            n.predicate = self.finite
            n.attrs = {**n.attrs, "loss_scale": self.state}
            graph.nodes.append(n)
        graph.append("loss_scale_update", [self.state], self.attrs, out_values=[self.state], update=True)

    def __repr__(self):
        return f"LossScaler(scale={self.scale}, skipped_steps={self.skipped_steps}, steps={self.steps})"
