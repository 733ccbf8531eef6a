"""Host time to encode a training step, with and without replay (mlmetal/graph/execution.py's Plan).

A plan records the dispatches each node encodes; on the next run a node whose attributes,
predicate and outside buffers (inputs, parameters) are unchanged replays them, already bound and
checked, instead of running its op's encode again. This times the encoding of one step of the
denoiser's U-Net (DESIGN §8's network, width 16, depth 2) — without committing it — with replay
off, on with numpy inputs (the nodes reading them encode afresh: their buffers are new every
step) and on with device-tensor inputs (every node but Adam's updates, whose step number
changes, and the generator's replays); then whole steps (encode, run, wait) for scale.

    python benchmarks/bench_replay.py                    # MLMETAL_DEVICE or the best device
    python benchmarks/bench_replay.py --size 64 --batch 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mlmetal as mm
from mlmetal.apps import denoise
from timing import best_seconds

INPUTS = ("noisy", "albedo", "normal", "clean")


def measure(dev, args, replay: bool, feed_tensors: bool) -> dict:
    """Seconds to encode a step, dispatches in it, and seconds per whole step."""
    mm.nn.seed(0)
    train = denoise.training_graph(denoise.UNet(16, 2, dev), args.batch, args.size, lr=1e-3, log_weight=0.1)
    train.graph.replay = replay
    rng = np.random.default_rng(0)
    feed = {n: rng.random((args.batch, 3, args.size, args.size), np.float32) for n in INPUTS}
    if feed_tensors:
        feed = {n: mm.tensor(a, dev) for n, a in feed.items()}
    plan = train.plan()
    dispatches = []

    def encode(calls):
        for _ in range(calls):
            bound = train.graph.bind_inputs(feed)
            train.prepare_step()  # as a step does: Adam's step number changes its updates' attributes
            cb = dev.command_buffer()
            plan.encode(bound, cb, commit_every=0)
            dispatches.append(cb.encoded())  # never committed: encoding alone is timed

    train.step(**feed)  # compile, allocate, record
    encode_s = best_seconds(encode, args.steps, args.rounds)
    step_s = best_seconds(lambda calls: [train.step(**feed) for _ in range(calls)], args.steps, args.rounds)
    return {"encode": encode_s, "dispatches": dispatches[-1], "step": step_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=32, help="image side (a multiple of 4)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dev = mm.device(args.device)
    modes = {"replay off": (False, False), "on, numpy fed": (True, False), "on, tensors fed": (True, True)}
    results = {name: measure(dev, args, *mode) for name, mode in modes.items()}
    print(f"U-Net training step (width 16, depth 2, batch {args.batch}, 9×{args.size}²) on {dev.name}: "
          f"{results['replay off']['dispatches']} dispatches; best of {args.rounds} rounds of {args.steps}")
    print(f"{'':<26}" + "".join(f"{name:>18}" for name in results))
    rows = [("encode a step (ms)", lambda r: f"{r['encode'] * 1e3:.3f}"),
            ("encode a dispatch (µs)", lambda r: f"{r['encode'] / r['dispatches'] * 1e6:.2f}"),
            ("whole step (ms)", lambda r: f"{r['step'] * 1e3:.2f}"),
            ("encoding's share of it", lambda r: f"{r['encode'] / r['step']:.1%}")]
    for label, cell in rows:
        print(f"{label:<26}" + "".join(f"{cell(r):>18}" for r in results.values()))
    off = results["replay off"]["encode"]
    print(f"\nreplay encodes a step {off / results['on, tensors fed']['encode']:.1f}× faster when fed device tensors, "
          f"{off / results['on, numpy fed']['encode']:.1f}× with numpy inputs")


if __name__ == "__main__":
    main()
