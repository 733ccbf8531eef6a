"""One rank of the multi-process tests (tests/test_distributed.py starts it under mpiexec).

    mpiexec -n 2 python tests/distributed_job.py SCENARIO OUT

train: STEPS data-parallel steps, each rank on its own batches; rank r saves the model to
OUT/saved-by-rank{r} (mm.save: rank 0 only) and writes its parameters and their gradients to
OUT/rank{r}.npz. The others go wrong on rank 1, at step FAIL_AT: `raise`
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


def main(scenario: str, out: str) -> None:
    world = mm.distributed.init()
    dev = mm.device("cpu")
    model = net(dev, 5 if scenario == "mismatch" and world.rank == 1 else 4)
    train = training(dev, model, BATCH, mm.distributed.DataParallel(adam(model), bucket_bytes=BUCKET_BYTES, module=model))
    for step in range(STEPS):
        if world.rank == 1 and step == FAIL_AT:
            if scenario == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            if scenario == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            if scenario == "hang":
                time.sleep(120)
        train.step(**batches(world.rank, step))
    mm.save(os.path.join(out, f"saved-by-rank{world.rank}"), model)  # rank 0's alone is written
    named = model.named_parameters()
    np.savez(os.path.join(out, f"rank{world.rank}.npz"), **{k: p.numpy() for k, p in named.items()},
             **{f"grad.{k}": p.grad.numpy() for k, p in named.items()})
    print(f"rank {world.rank}: finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
