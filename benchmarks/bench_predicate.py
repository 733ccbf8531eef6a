"""Early-exit decoding: device time of the captioner's decoder at maximum length 20, with and
without predication.

Every decoder encodes all its steps before the host waits. With predication the device skips
the steps after every sequence has emitted its end token, so its device time should follow the
length actually emitted rather than the 20-step maximum. Two batches show it: digits whose
names are shortest (one, two, six: 3 letters and the end token, 4 steps) and longest (three,
seven, eight: 6 steps), each decoded predicated at maximum 20; unpredicated decoders of as
many steps as were emitted, and of all 20, give the cost of the steps that run.

Device time: the whole decoder is encoded into one command buffer first, then timed from
commit to completion — on cuda between two CUDA events on the device's stream (GPU
timestamps), elsewhere by the host clock — the median of --repeats runs, the decoders taking
turns, with the quartiles (p25-p75) beside it. Launch time is the host's time in `commit`
(on cuda: launching every kernel). Wall time is a plain `graph.run` (encoding overlapped with
execution, tokens copied back).

A decoding step is a few small kernels, and a skipped step still dispatches them (each
returns at once), so the saving shows only where a step's work outweighs dispatching it. On
a GPU at the held-out set's 450 digits each kernel is done before the host launches the
next, and the device time would time the launches; so on GPUs the default batch tiles the
held-out digits to 65536 sequences (on cpu, whose dispatches cost tens of microseconds of
Python, to 1800). The conclusion says when device time still looked launch-bound.

    PYTHONPATH=. python benchmarks/bench_predicate.py                       # cpu: batch 1800, 10 repeats
    MLMETAL_DEVICE=cuda PYTHONPATH=. python benchmarks/bench_predicate.py   # GPU: batch 65536, 30 repeats
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mlmetal.apps.caption import END, NAMES, START, Decoder, train_caption

MAX_LEN = 20


def timed_commit(cb) -> tuple[float, float]:
    """(device seconds, launch seconds) of committing the encoded command buffer `cb` and waiting for it."""
    dev = cb.device
    if dev.name == "cuda":
        import cupy

        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(dev.stream)
        t0 = time.perf_counter()
        cb.commit()
        launch = time.perf_counter() - t0
        end.record(dev.stream)
        cb.wait()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3, launch
    t0 = time.perf_counter()
    cb.commit()
    launch = time.perf_counter() - t0
    cb.wait()
    return time.perf_counter() - t0, launch


def encoder(decoder: Decoder, images: np.ndarray):
    """A function returning a fresh command buffer with one whole run of `decoder` on `images` encoded, uncommitted."""
    g = decoder.graph
    plan = g.plan(tuple(decoder.tokens))
    n = decoder.batch
    bound = g.bind_inputs({"images": images, "start": np.full(n, START, np.int32), "running": np.ones(n, np.uint32)})

    def encode():
        cb = g.device.command_buffer()
        plan.encode(bound, cb, commit_every=0)  # nothing reaches the device before the timed commit
        return cb

    return encode


def device_times(encoders: list, repeats: int) -> np.ndarray:
    """(decoder, device or launch, run) seconds, the decoders taking turns so drift touches all alike."""
    for encode in encoders:  # the first run compiles and allocates
        timed_commit(encode())
    return np.array([[timed_commit(encode()) for encode in encoders] for _ in range(repeats)]).transpose(1, 2, 0)


def wall_time(decoder: Decoder, images: np.ndarray, repeats: int) -> float:
    decoder.run(images)
    t0 = time.perf_counter()
    for _ in range(repeats):
        decoder.run(images)
    return (time.perf_counter() - t0) / repeats


def steps_emitted(tokens: np.ndarray) -> int:
    """Steps until every sequence (a column of `tokens`) has emitted its end token; the length if one never does."""
    return max(list(s).index(END) + 1 if END in s else len(tokens) for s in tokens.T)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences decoded per run, the held-out digits tiled (default: 1800 on cpu, 65536 on a GPU)")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs before timing (default 15)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per decoder (default: 10 on cpu, 30 on a GPU)")
    args = ap.parse_args()
    trained = train_caption(args.device, epochs=args.epochs, progress=False)
    net, dev = trained["net"], trained["device"]
    gpu = dev.name != "cpu"
    batch = args.batch or (65536 if gpu else 1800)
    repeats = args.repeats or (30 if gpu else 10)
    x_te = trained["test"][0]
    # Grouped by the name the net spells, so a misread digit cannot lengthen the short batch.
    spelled = np.array([len(w) for w in Decoder(net, dev, len(x_te), MAX_LEN).decode(x_te)])
    shortest, longest = min(len(n) for n in NAMES), max(len(n) for n in NAMES)
    batches = {
        "one/two/six": np.resize(x_te[spelled == shortest], (batch, *x_te.shape[1:])),
        "three/seven/eight": np.resize(x_te[spelled == longest], (batch, *x_te.shape[1:])),
        "all digits": np.resize(x_te, (batch, *x_te.shape[1:])),
    }
    print(f"captioner decoding on {dev.name}, batch {batch}, median of {repeats} runs, after {args.epochs} epochs "
          f"({trained['accuracy']:.1%} of held-out digits spelled right)")

    predicated = Decoder(net, dev, batch, MAX_LEN, predicated=True)
    emitted = {name: steps_emitted(predicated.run(x)) for name, x in batches.items()}
    rows = [(f"predicated, max {MAX_LEN}, {name}", predicated, x, emitted[name]) for name, x in batches.items()]
    for steps in sorted(set(emitted.values()) | {MAX_LEN}):
        rows.append((f"unpredicated, {steps} steps", Decoder(net, dev, batch, steps, predicated=False),
                     batches["all digits"], steps))

    times = device_times([encoder(decoder, x) for _, decoder, x, _ in rows], repeats)
    print(f"{'decoder':<38} {'steps':>5} {'device ms':>10} {'p25-p75':>13} {'launch ms':>10} {'wall ms':>9}")
    results = {}
    for (name, decoder, x, steps), (device, launch) in zip(rows, times):
        wall = wall_time(decoder, x, repeats)
        p25, p50, p75 = np.percentile(device, [25, 50, 75]) * 1e3
        results[name] = (p25, p50, p75, float(np.median(launch)) * 1e3)
        print(f"{name:<38} {steps:>5} {p50:10.2f} {f'{p25:.2f}-{p75:.2f}':>13} {results[name][3]:10.2f} {wall * 1e3:9.2f}")

    conclude(results, emitted)


def conclude(results: dict, emitted: dict) -> None:
    """Say what the numbers show, and only that."""
    def below(a, b):  # a's slower quarter of runs beat b's faster quarter: more than noise
        return results[a][2] < results[b][0]

    short, long, every = (f"predicated, max {MAX_LEN}, {name}" for name in ("one/two/six", "three/seven/eight", "all digits"))
    full = f"unpredicated, {MAX_LEN} steps"
    same = f"unpredicated, {emitted['all digits']} steps"
    p, u_same, u_full = results[every][1], results[same][1], results[full][1]
    print(f"\npredicated at max {MAX_LEN}, the longest name needing {emitted['all digits']} steps: {p:.2f} ms, "
          f"{p / u_full:.2f}× the unpredicated {MAX_LEN} steps ({u_full:.2f} ms) and "
          f"{p / u_same:.2f}× unpredicated {emitted['all digits']} steps ({u_same:.2f} ms)")
    print(f"predicated names of {emitted['one/two/six']} steps: {results[short][1]:.2f} ms; "
          f"of {emitted['three/seven/eight']} steps: {results[long][1]:.2f} ms")
    if emitted["all digits"] < MAX_LEN:
        skipped = MAX_LEN - emitted["all digits"]
        print(f"a step that runs costs {(u_full - u_same) / skipped:.3f} ms, a skipped one {(p - u_same) / skipped:.3f} ms "
              f"(its kernels are still dispatched, and return at once)")
    follows = below(every, full) and p < (u_same + u_full) / 2 and below(short, long) and \
        emitted["one/two/six"] < emitted["three/seven/eight"]
    if follows:
        print(f"so with predication the device time follows the steps emitted, not the {MAX_LEN}-step maximum: "
              f"predication saved {1 - p / u_full:.0%} of the {MAX_LEN}-step device time "
              f"(at most {1 - emitted['all digits'] / MAX_LEN:.0%} if skipped steps cost nothing)")
    else:
        print(f"so this run does NOT show device time following the steps emitted: "
              f"{'predication beat the full decoder' if below(every, full) else 'predicated vs full differ by less than the noise'}, "
              f"{'shorter names decoded faster' if below(short, long) else 'shorter names were not clearly faster'}")
    launch_bound = results[full][1] < 1.2 * results[full][3]
    if launch_bound:
        print(f"caution: the unpredicated {MAX_LEN}-step decoder's device time ({results[full][1]:.2f} ms) is within "
              f"20% of the host's time launching it ({results[full][3]:.2f} ms): the device was likely waiting on "
              f"launches, so these figures time launching more than decoding; try a larger --batch")


if __name__ == "__main__":
    main()
