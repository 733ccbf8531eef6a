"""Random numbers: Philox4x32-10 and MTGP32 uniform float32 on the current device, against
cuRAND through CuPy on cuda or numpy's generators on cpu, measured in the same run.

    python benchmarks/bench_random.py            # 2**28 numbers on a GPU, 2**24 on cpu
    MLMETAL_DEVICE=cpu python benchmarks/bench_random.py --log2n 22

Each figure is the best of a few rounds of `--calls` back-to-back draws into one buffer,
divided by the number of calls; the ratio is mlmetal's throughput over the reference's.
"""

import argparse

import numpy as np

import mlmetal as mm
from timing import best_seconds
import mlmetal.random as mr



def mlmetal_run(gen, out, n):
    """Encode `calls` uniform draws of n numbers into one command buffer and wait for them."""
    def run(calls):
        cb = gen.device.command_buffer()
        for _ in range(calls):
            gen.encode(cb, out, mr.Uniform(), n=n)
        cb.commit()
        cb.wait()
    return run


def curand_runs(n):
    """cuRAND Philox4_32_10 and MTGP32 uniform float32 through CuPy's curand bindings."""
    import cupy
    from cupy.cuda import curand

    out = cupy.empty(n, dtype=cupy.float32)
    runs = {}
    for name, kind in (("philox", curand.CURAND_RNG_PSEUDO_PHILOX4_32_10), ("mtgp32", curand.CURAND_RNG_PSEUDO_MTGP32)):
        g = curand.createGenerator(kind)
        curand.setPseudoRandomGeneratorSeed(g, 1234)

        def run(calls, g=g):
            for _ in range(calls):
                curand.generateUniform(g, out.data.ptr, n)
            cupy.cuda.get_current_stream().synchronize()
        runs[name] = run
    return runs, "cuRAND"


def numpy_runs(n):
    """numpy's Philox and MT19937 (MTGP32's nearest relative numpy has) float32 uniforms, one core."""
    out = np.empty(n, dtype=np.float32)
    runs = {}
    for name, bitgen in (("philox", np.random.Philox), ("mtgp32", np.random.MT19937)):
        g = np.random.Generator(bitgen(1234))

        def run(calls, g=g):
            for _ in range(calls):
                g.random(n, dtype=np.float32, out=out)
        runs[name] = run
    return runs, "numpy"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=None, help="numbers per call as a power of two")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    dev = mm.device()
    gpu = dev.name != "cpu"
    n = 2 ** (args.log2n or (28 if gpu else 24))
    calls = args.calls or (20 if gpu else 2)
    refs, ref_name = curand_runs(n) if dev.name == "cuda" else numpy_runs(n)

    out = dev.buffer(nbytes=4 * n)
    gens = {"philox": mr.Philox(dev, 1234), "mtgp32": mr.MTGP32(dev, 1234, states=192)}
    print(f"uniform float32, n = 2^{int(np.log2(n))} per call, device {dev.name}, reference {ref_name}")
    for name, gen in gens.items():
        ours = best_seconds(mlmetal_run(gen, out, n), calls, args.rounds)
        theirs = best_seconds(refs[name], calls, args.rounds)
        print(f"  {name:7s} mlmetal {ours * 1e3:9.3f} ms ({4 * n / ours / 1e9:7.1f} GB/s)   "
              f"{ref_name} {theirs * 1e3:9.3f} ms ({4 * n / theirs / 1e9:7.1f} GB/s)   "
              f"throughput ratio {theirs / ours:5.2f}x")


if __name__ == "__main__":
    main()
