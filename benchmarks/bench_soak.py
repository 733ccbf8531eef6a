"""Soak: many training steps of a small network, watching memory for growth (goal: none after warm-up).

A conv → ReLU → conv → 2×2 max pool → linear classifier trains with Adam on fresh random inputs
every step (each step uploads its batch, runs forward, backward and update, and reads the loss
back). Every tenth of the run it prints the process's resident memory, the device memory in use
(cuda: CuPy's pool and the driver's count; cpu and metal: device buffers are host memory, so in
the resident figure) and the number of live Python objects. Growth is measured from the end of
the warm-up (the first tenth: kernels compiled, plans and pools filled) to the end.

    python benchmarks/bench_soak.py --device cpu --steps 10000
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time

import numpy as np

import mlmetal as mm

MiB = 1 << 20


def resident_bytes() -> int:
    """The process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def device_bytes(dev) -> tuple[int, int] | None:
    """(bytes CuPy's pool hands out, bytes the driver counts as used) on cuda; None where device memory is host memory."""
    if dev.name != "cuda":
        return None
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    return cupy.get_default_memory_pool().used_bytes(), total - free


def build(dev, batch: int):
    """The training graph of a small classifier on (batch, 1, 16, 16) images and one-hot (batch, 10, 1, 1) labels."""
    mm.nn.seed(0)
    net = mm.nn.Sequential(mm.nn.Conv2d(1, 8, 3, padding=1, device=dev), mm.nn.ReLU(),
                           mm.nn.Conv2d(8, 16, 3, padding=1, device=dev), mm.nn.MaxPool2d(2), mm.nn.ReLU(),
                           mm.nn.Conv2d(16, 10, 1, device=dev), mm.nn.AvgPool2d(8))
    g = mm.Graph(dev)
    x, labels = g.input("x", (batch, 1, 16, 16)), g.input("labels", (batch, 10, 1, 1))
    loss = mm.ops.softmax_cross_entropy_loss(net(x), labels, reduction="mean")
    return loss.training_graph(optimizer=mm.optim.Adam(net.parameters(), lr=1e-3))


def sample(dev, kept: int) -> dict:
    """Memory now; `kept`: the rows this benchmark holds, left out of the object count."""
    gc.collect()
    return {"rss": resident_bytes(), "device": device_bytes(dev), "objects": len(gc.get_objects()) - kept}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu, cuda or metal (default: MLMETAL_DEVICE or the best present)")
    ap.add_argument("--steps", type=int, default=10_000, help="training steps (default 10000)")
    ap.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    args = ap.parse_args()
    if args.steps < 10 or args.batch < 1:
        ap.error("--steps must be at least 10 and --batch at least 1")
    dev = mm.device(args.device)
    train = build(dev, args.batch)
    rng = np.random.default_rng(0)
    eye = np.eye(10, dtype=np.float32)
    every = args.steps // 10
    rows, loss, t0 = [], float("nan"), time.perf_counter()
    for i in range(1, args.steps + 1):
        x = rng.standard_normal((args.batch, 1, 16, 16), np.float32)
        labels = eye[rng.integers(0, 10, args.batch)].reshape(args.batch, 10, 1, 1)
        loss = train.step(x=x, labels=labels)
        if i % every == 0:
            rows.append((i, time.perf_counter() - t0, loss, sample(dev, len(rows))))

    print(f"soak: {args.steps} training steps of a small classifier (batch {args.batch}, 1×16×16, Adam) on {dev.name}")
    print(f"{'step':>7} {'s':>7} {'loss':>7} {'RSS MiB':>9} {'device MiB':>16} {'objects':>8}")
    for i, seconds, value, m in rows:
        device = "in RSS" if m["device"] is None else f"{m['device'][0] / MiB:.1f} / {m['device'][1] / MiB:.0f}"
        print(f"{i:7d} {seconds:7.1f} {value:7.3f} {m['rss'] / MiB:9.1f} {device:>16} {m['objects']:8d}")
    warm, last = rows[0][3], rows[-1][3]
    growth = {"RSS": (last["rss"] - warm["rss"]) / MiB, "objects": last["objects"] - warm["objects"]}
    if warm["device"] is not None:
        growth["device (pool)"] = (last["device"][0] - warm["device"][0]) / MiB
        growth["device (driver)"] = (last["device"][1] - warm["device"][1]) / MiB
    print(f"growth after warm-up (step {rows[0][0]} to {rows[-1][0]}): "
          + ", ".join(f"{k} {v:+.1f} MiB" if k != "objects" else f"{k} {v:+d}" for k, v in growth.items()))
    print(f"{(rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0]) * 1e3:.2f} ms a step after warm-up")


if __name__ == "__main__":
    main()
