"""Early-exit decoding: time per batch of the captioner's decoder at maximum length 20, with
and without predication.

Both decoders encode all 20 steps without waiting; with predication the device skips the
steps after every sequence has emitted its end token, so device time follows the length
actually emitted (the digits' names: at most 6 steps) rather than the maximum. Device time
is measured as commit-to-completion of a fully encoded command buffer; wall time is a plain
`graph.run` (encoding overlapped with execution). Unpredicated decoders of 6, 10 and 20
steps show how device time grows with the steps that run.

    PYTHONPATH=. python benchmarks/bench_predicate.py --device cuda --batch 450
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlmetal.apps.caption import END, START, Decoder, train_caption


def device_time(decoder: Decoder, images: np.ndarray, repeats: int) -> float:
    """Median seconds from committing the fully encoded decoder to its completion."""
    g = decoder.graph
    plan = g.plan(tuple(decoder.tokens))
    n = decoder.batch
    bound = g.bind_inputs({"images": images, "start": np.full(n, START, np.int32), "running": np.ones(n, np.uint32)})
    times = []
    for _ in range(repeats + 1):  # the first run compiles and allocates
        cb = g.device.command_buffer()
        plan.encode(bound, cb)
        t0 = time.perf_counter()
        cb.commit()
        cb.wait()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def wall_time(decoder: Decoder, images: np.ndarray, repeats: int) -> float:
    decoder.run(images)
    t0 = time.perf_counter()
    for _ in range(repeats):
        decoder.run(images)
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=450, help="digits decoded per run (450: the whole held-out set)")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs before timing")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    trained = train_caption(args.device, epochs=args.epochs, progress=False)
    net, dev = trained["net"], trained["device"]
    x = np.resize(trained["test"][0], (args.batch, 1, 8, 8))
    print(f"captioner decoding on {dev.name}, batch {args.batch}, after {args.epochs} epochs "
          f"({trained['accuracy']:.1%} held-out digits spelled right)")
    rows = []
    pred = Decoder(net, dev, args.batch, 20, predicated=True)
    tokens = pred.run(x)
    emitted = max(list(s).index(END) + 1 if END in s else 20 for s in tokens.T)
    rows.append((f"predicated, max 20 (runs {emitted})", pred))
    for steps in (6, 10, 20):
        rows.append((f"unpredicated, {steps} steps", Decoder(net, dev, args.batch, steps, predicated=False)))
    print(f"{'decoder':<32} {'device ms':>10} {'wall ms':>9}")
    base = None
    for name, d in rows:
        dt, wt = device_time(d, x, args.repeats), wall_time(d, x, args.repeats)
        print(f"{name:<32} {dt * 1e3:10.2f} {wt * 1e3:9.2f}")
        if name.startswith("unpredicated, 20"):
            base = dt
        if name.startswith("predicated"):
            first = dt
    print(f"predication saves {1 - first / base:.0%} of the 20-step device time "
          f"(the longest name needs {emitted} of 20 steps)")


if __name__ == "__main__":
    main()
