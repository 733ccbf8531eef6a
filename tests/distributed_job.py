"""One rank of the multi-process tests (tests/test_distributed.py starts it under mpiexec).

    mpiexec -n 2 python tests/distributed_job.py SCENARIO OUT

train: STEPS data-parallel steps, each rank on its own batches; rank r saves the model to
OUT/saved-by-rank{r} (mm.save: rank 0 only) and writes its parameters and their gradients to
OUT/rank{r}.npz, those of the same training without overlap (each bucket's reduction finished
right after its start) to OUT/rank{r}-no-overlap.npz, and the mean of (rank + 1)·[0 1 2] and
(rank + 1)·[0 1 2 3 4] through all_reduce_start/_finish, overwriting the first in between, to
OUT/rank{r}-started.npz. The others go wrong on rank 1, at step FAIL_AT: `raise`
raises, `die` kills itself, `hang` stops calling collectives; `mismatch` gives rank 1 a wider net.
"""

import os
import signal
import sys
import time

import numpy as np

import mlmetal as mm

STEPS = 4
FAIL_AT = 2
BATCH = 3  # per rank
SIZE = 8
BUCKET_BYTES = 300  # the net's four gradients (8 to 360 bytes) make three buckets


def net(dev, width: int = 4):
    mm.nn.seed(0)
    return mm.nn.Sequential(mm.nn.Conv2d(2, width, 3, padding=1, device=dev), mm.nn.Tanh(),
                            mm.nn.Conv2d(width, 2, 3, padding=1, device=dev))


def training(dev, model, batch: int, optimizer):
    g = mm.Graph(dev)
    x, target = g.input("x", (batch, 2, SIZE, SIZE)), g.input("target", (batch, 2, SIZE, SIZE))
    loss = mm.ops.mse_loss(model(x), target, reduction="mean")
    return loss.training_graph(optimizer=optimizer)


def adam(model):
    return mm.optim.Adam(model.parameters(), lr=0.01)


def batches(rank: int, step: int) -> dict:
    """Rank `rank`'s batch at `step`: x and target, BATCH images each."""
    rng = np.random.default_rng([rank, step])
    x = rng.standard_normal((BATCH, 2, SIZE, SIZE)).astype(np.float32)
    return {"x": x, "target": np.tanh(x[:, ::-1]) * 0.5}


def started_then_overwritten(a, b):
    """The mean over the ranks of a and b through all_reduce_start and _finish, a overwritten (×10) between them."""
    flat = mm.ops.all_reduce_start(a, b)
    cb = a.device.command_buffer()
    scale = a.device.library("elementwise").kernel("scale")
    cb.dispatch(scale, groups=1, threads=32, args=[a, a, {"n": a.size, "s": 10.0}])
    cb.commit()
    return mm.ops.all_reduce_finish(flat, [a.shape, b.shape], "mean")


def main(scenario: str, out: str) -> None:
    world = mm.distributed.init()
    dev = mm.device("cpu")
    for overlap in (True, False) if scenario == "train" else (True,):
        model = net(dev, 5 if scenario == "mismatch" and world.rank == 1 else 4)
        dp = mm.distributed.DataParallel(adam(model), bucket_bytes=BUCKET_BYTES, module=model, overlap=overlap)
        train = training(dev, model, BATCH, dp)
        for step in range(STEPS):
            if world.rank == 1 and step == FAIL_AT:
                if scenario == "raise":
                    raise RuntimeError("rank 1 fails on purpose")
                if scenario == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                if scenario == "hang":
                    time.sleep(120)
            train.step(**batches(world.rank, step))
        named = model.named_parameters()
        np.savez(os.path.join(out, f"rank{world.rank}{'' if overlap else '-no-overlap'}.npz"),
                 **{k: p.numpy() for k, p in named.items()}, **{f"grad.{k}": p.grad.numpy() for k, p in named.items()})
        if overlap:
            mm.save(os.path.join(out, f"saved-by-rank{world.rank}"), model)  # rank 0's alone is written
    if scenario == "train":
        a, b = (mm.tensor((world.rank + 1) * np.arange(k, dtype=np.float32), dev) for k in (3, 5))
        means = started_then_overwritten(a, b)
        np.savez(os.path.join(out, f"rank{world.rank}-started.npz"), *(t.numpy() for t in means))
    print(f"rank {world.rank}: finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
