"""Timing helpers shared by the benchmarks (run them as scripts: `python benchmarks/bench_x.py`)."""

import statistics
import time


def timeit(fn, sync, repeat=7, number=None) -> float:
    """Median seconds per call of fn(), with `sync()` closing each timed batch."""
    fn()
    sync()
    if number is None:  # aim for ~50 ms batches
        t0 = time.perf_counter()
        fn()
        sync()
        number = max(1, int(0.05 / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def best_seconds(run, calls: int, rounds: int) -> float:
    """Seconds per call: the best over `rounds` of `calls` calls back to back."""
    run(1)  # warm up: compile, allocate, first touch
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run(calls)
        best = min(best, (time.perf_counter() - start) / calls)
    return best
