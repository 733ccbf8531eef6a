"""Data-parallel training: step time and scaling efficiency of N ranks against one process.

Each rank trains the denoiser's U-Net (`mlmetal denoise`'s network) with Adam on a batch of its
own, through mm.distributed.DataParallel; the baseline is one process training the same batch
alone, without mm.distributed, on what one rank has: one GPU on cuda, on cpu its share of the
cores (the cores / N threads each rank runs). With the same batch on every rank, N ranks train
on N times the images a step, so the scaling efficiency is the baseline's step time over the
ranks' (100%: the all-reduce of the gradients cost nothing). The ranks run twice: as
DataParallel trains by default, each bucket's reduction overlapping the rest of the backward pass,
and with MLMETAL_DISTRIBUTED_OVERLAP=0, each reduction finished before the next kernel runs. On
cpu the table also shows one process on every core, which is what N ranks on one host compete with.

    python benchmarks/bench_distributed.py                       # 2 ranks, starting mpiexec itself
    python benchmarks/bench_distributed.py --size 16 --width 64 --bucket-bytes 1048576   # more to send
    MLMETAL_DEVICE=cuda python benchmarks/bench_distributed.py --ranks 2    # a GPU a rank
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

import numpy as np

import mlmetal as mm
from mlmetal.apps import denoise

SHAPES = {"cpu": dict(size=48, batch=4, width=12, depth=2), "cuda": dict(size=256, batch=4, width=32, depth=3)}


def measure(args) -> None:
    """Run inside one process (or one rank): time `--steps` training steps; rank 0 prints a JSON line."""
    if args.distributed:
        mm.distributed.init()
    dev = mm.device()
    mm.nn.seed(0)
    net = denoise.UNet(args.width, args.depth, dev)
    train = denoise.training_graph(net, args.batch, args.size, lr=1e-3, log_weight=0.5, distributed=args.distributed)
    rng = np.random.default_rng(mm.distributed.rank())
    feed = {name: mm.tensor(rng.random((args.batch, 3, args.size, args.size), np.float32), dev)
            for name in ("noisy", "albedo", "normal", "clean")}
    for _ in range(3):  # compile, plan, allocate
        train.step(**feed)
    times = []
    for _ in range(args.steps):  # each step reads its loss back: the device has finished it
        start = time.perf_counter()
        train.step(**feed)
        times.append(time.perf_counter() - start)
    if mm.distributed.rank() == 0:
        print(json.dumps({"step": statistics.median(times), "device": dev.name, "threads": getattr(dev, "threads", None)}))


def run(args, ranks: int, distributed: bool, threads: int | None, overlap: bool = True) -> dict:
    """`measure` in `ranks` processes under mpiexec (one plain process when not `distributed`)."""
    cmd = [sys.executable, __file__, "--measure", "--steps", str(args.steps), "--size", str(args.size), "--batch",
           str(args.batch), "--width", str(args.width), "--depth", str(args.depth)]
    if distributed:
        mpiexec = shutil.which("mpiexec", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ["PATH"]]))
        if mpiexec is None:
            sys.exit("bench_distributed: no mpiexec; pip install 'mlmetal[distributed]'")
        cmd = [mpiexec, "-n", str(ranks), *cmd, "--distributed"]
    env = dict(os.environ, MLMETAL_DISTRIBUTED_OVERLAP=str(int(overlap)),
               **({"MLMETAL_CPU_THREADS": str(threads)} if threads else {}),
               **({"MLMETAL_DISTRIBUTED_BUCKET_BYTES": str(args.bucket_bytes)} if args.bucket_bytes else {}))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_distributed: {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel run (default 2)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    for name in ("size", "batch", "width", "depth"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"U-Net {name} (default: per device, see SHAPES)")
    ap.add_argument("--bucket-bytes", type=int, default=None,
                    help="DataParallel's bucket size (default MLMETAL_DISTRIBUTED_BUCKET_BYTES, else 25 MiB)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    backend = None if args.measure else mm.device().name
    for name, value in SHAPES.get(backend or "cpu", SHAPES["cpu"]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.measure:
        return measure(args)
    if args.ranks < 2 or args.steps < 1 or (args.bucket_bytes is not None and args.bucket_bytes < 1):
        ap.error("--ranks must be at least 2, --steps and --bucket-bytes at least 1")

    if backend == "cuda":
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < args.ranks:
            sys.exit(f"bench_distributed: {args.ranks} ranks need {args.ranks} GPUs (one a rank); this machine has "
                     f"{cupy.cuda.runtime.getDeviceCount()}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // args.ranks) if backend == "cpu" else None
    rows = [("1 process", run(args, 1, False, share), 1)]
    if backend == "cpu" and share != cores:
        rows.append(("1 process, every core", run(args, 1, False, cores), 1))
    rows.append((f"{args.ranks} ranks", run(args, args.ranks, True, share), args.ranks))
    rows.append((f"{args.ranks} ranks, no overlap", run(args, args.ranks, True, share, overlap=False), args.ranks))
    base = rows[0][1]["step"]
    grads = sum(p.size for p in denoise.UNet(args.width, args.depth, mm.device()).parameters()) * 4
    print(f"U-Net training step on {backend}: batch {args.batch} a rank, {args.size}², width {args.width}, "
          f"depth {args.depth} ({grads / 2**20:.2f} MiB of gradients, buckets of "
          f"{(args.bucket_bytes or int(os.environ.get('MLMETAL_DISTRIBUTED_BUCKET_BYTES', 25 << 20))) / 2**20:g} MiB); "
          f"median of {args.steps} steps")
    print(f"{'':<28}{'threads':>8}{'step':>12}{'images/s':>10}{'efficiency':>12}")
    for what, r, ranks in rows:
        eff = f"{base / r['step']:.0%}" if ranks > 1 else ""
        threads = r["threads"] if r["threads"] is not None else "-"
        print(f"{what:<28}{threads:>8}{r['step'] * 1e3:>10.1f}ms{ranks * args.batch / r['step']:>10.1f}{eff:>12}")


if __name__ == "__main__":
    main()
