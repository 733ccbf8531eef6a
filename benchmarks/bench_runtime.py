"""Runtime benchmark: dispatch cost, an eager op's cost, bandwidth-bound kernels, fiber switches.

Prints each figure beside a reference measured in the same run: numpy on the cpu
backend, PyTorch on cuda (where installed).

    python benchmarks/bench_runtime.py                 # MLMETAL_DEVICE or the best device
    MLMETAL_DEVICE=cpu python benchmarks/bench_runtime.py --log2n 24
"""

from __future__ import annotations

import argparse

import numpy as np

import mlmetal as mm
from timing import timeit


def dispatcher(dev, kernel, groups, threads, args):
    def run():
        cb = dev.command_buffer()
        cb.dispatch(kernel, groups=groups, threads=threads, args=args)
        cb.commit()
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--log2n", type=int, default=None, help="elements per buffer: 2^log2n (default 24 on cpu, 28 on gpus)")
    args = ap.parse_args()
    dev = mm.device(args.device)
    n = 1 << (args.log2n or (24 if dev.name == "cpu" else 28))
    sync = dev.synchronize
    ew, red = dev.library("elementwise"), dev.library("reduce")
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(n).astype(np.float32)
    y_np = rng.standard_normal(n).astype(np.float32)
    x, y, out = dev.buffer(x_np), dev.buffer(y_np), dev.buffer(nbytes=4 * n)
    groups = n // 256

    # An eager op on a small tensor costs its host work: checks, encoding and binding on its kind's
    # first call, a replay of that call's dispatches later (mlmetal/ops/eager.py). Timed first: on the
    # cpu backend, small kernels after large ones ran up to twice as slow for a while (2 cores).
    small_x, small_y = mm.tensor(x_np[:1024], dev), mm.tensor(y_np[:1024], dev)
    t_op = timeit(lambda: mm.ops.add(small_x, small_y), sync, number=200)
    empty = dispatcher(dev, ew.kernel("empty"), 1, 32, [out])
    t_empty = timeit(empty, sync, number=200)
    t_empty_sync = timeit(lambda: (empty(), sync()), lambda: None, number=50)

    copy = dispatcher(dev, ew.kernel("copy_f4"), n // 4 // 256, 256, [x, out, {"n": n // 4}])
    t_copy = timeit(copy, sync)
    # n is a power of two: the float4 kernels cover it (PyTorch's elementwise kernels vectorise too)
    axpy = dispatcher(dev, ew.kernel("axpy_f4"), n // 4 // 256, 256, [x, y, {"n": n // 4, "a": 1e-3}])
    t_axpy = timeit(axpy, sync)
    partial_groups = 1024 if dev.name != "cpu" else 256
    partial, total = dev.buffer(nbytes=4 * partial_groups), dev.buffer(nbytes=4)

    def reduce_sum():
        cb = dev.command_buffer()
        cb.dispatch(red.kernel("sum_partial"), groups=partial_groups, threads=256, args=[x, partial, {"n": n}])
        cb.dispatch(red.kernel("sum_partial"), groups=1, threads=1024, args=[partial, total, {"n": partial_groups}])
        cb.commit()
    t_sum = timeit(reduce_sum, sync)

    ref_name, ref = "numpy", {}
    if dev.name == "cpu":
        xr, yr, o = x_np.copy(), y_np.copy(), np.empty_like(x_np)
        ref["copy"] = timeit(lambda: np.copyto(o, xr), lambda: None)
        ref["axpy"] = timeit(lambda: (np.multiply(xr, np.float32(1e-3), out=o), np.add(o, yr, out=yr)), lambda: None)
        ref["sum"] = timeit(lambda: xr.sum(), lambda: None)
        ref["op"] = timeit(lambda: np.add(xr[:1024], yr[:1024]), lambda: None, number=200)
        ref["empty"] = ref["empty+wait"] = None
    else:
        try:
            import torch
            ref_name = f"PyTorch {torch.__version__}"
            xt, yt = torch.from_numpy(x_np).cuda(), torch.from_numpy(y_np).cuda()
            ot = torch.empty_like(xt)
            tiny = torch.zeros(1, device="cuda")
            tsync = torch.cuda.synchronize
            ref["copy"] = timeit(lambda: ot.copy_(xt), tsync)
            ref["axpy"] = timeit(lambda: yt.add_(xt, alpha=1e-3), tsync)
            ref["sum"] = timeit(lambda: xt.sum(), tsync)
            ref["op"] = timeit(lambda: torch.add(xt[:1024], yt[:1024]), tsync, number=200)
            ref["empty"] = timeit(lambda: tiny.add_(1), tsync, number=200)
            ref["empty+wait"] = timeit(lambda: (tiny.add_(1), tsync()), lambda: None, number=50)
        except ImportError:
            ref = dict.fromkeys(["copy", "axpy", "sum", "op", "empty", "empty+wait"])

    print(f"device {dev.name}, n = 2^{n.bit_length() - 1} floats; reference: {ref_name}\n")
    print(f"{'what':<34}{'mlmetal':>12}{'GB/s':>9}{ref_name:>16}{'GB/s':>9}{'ratio':>8}")

    def line(what, t, r, nbytes=None):
        bw = f"{nbytes / t / 1e9:9.1f}" if nbytes else " " * 9
        rbw = f"{nbytes / r / 1e9:9.1f}" if nbytes and r else " " * 9
        rs = f"{r * 1e6:13.1f} µs" if r else f"{'—':>16}"
        ratio = f"{r / t:8.2f}" if r else ""
        print(f"{what:<34}{t * 1e6:9.1f} µs{bw}{rs}{rbw}{ratio}")

    line("empty kernel, encode+commit", t_empty, ref["empty"])
    line("empty kernel, commit+wait", t_empty_sync, ref["empty+wait"])
    line("eager op: add of 1024 floats", t_op, ref["op"])
    line("copy (read+write)", t_copy, ref["copy"], 8 * n)
    line("axpy y = a·x + y (2 reads, 1 write)", t_axpy, ref["axpy"], 12 * n)
    line("sum (read)", t_sum, ref["sum"], 4 * n)
    print(f"\naxpy reaches {t_copy * 12 / 8 / t_axpy:.0%} of copy bandwidth; sum reaches {t_copy * 4 / 8 / t_sum:.0%} "
          "of it (copy counts bytes read + written). ratio = reference time / mlmetal time (> 1: mlmetal faster).")

    if dev.name == "cpu":
        fiber_switches(dev)


FIBERS = """
#include <metal_stdlib>
using namespace metal;
struct P { uint rounds; };
kernel void barriers(device float* out [[buffer(0)]], constant P& p [[buffer(1)]],
                     uint lid [[thread_index_in_threadgroup]], uint g [[threadgroup_position_in_grid]]) {
    threadgroup float v[256];
    v[lid] = float(lid);
    for (uint r = 0; r < p.rounds; ++r) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        v[lid] += 1.0f;
    }
    out[g * 256 + lid] = v[lid];
}
"""


def fiber_switches(dev):
    k = dev.library(source=FIBERS).kernel("barriers")
    groups, rounds = 64, 16
    out = dev.buffer(nbytes=4 * 256 * groups)
    t = timeit(dispatcher(dev, k, groups, 256, [out, {"rounds": rounds}]), dev.synchronize)
    threads = groups * 256
    switches = threads * (rounds + 1)
    print(f"\nfibers: {threads} threads × {rounds} barriers in {t * 1e3:.2f} ms on {dev.threads} OS threads: "
          f"{threads / t / 1e6:.2f} M threads/s, {t * dev.threads / switches * 1e9:.1f} ns per switch per core")


if __name__ == "__main__":
    main()
