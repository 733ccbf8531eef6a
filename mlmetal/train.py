"""A small fit loop: epochs of training steps with a progress bar, validation every K epochs,
and a learning-rate schedule."""

from __future__ import annotations

import sys
from typing import Callable, Iterable

from tqdm import tqdm


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
