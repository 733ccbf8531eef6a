"""cpu and cuda run the same kernels on the same inputs and agree bit for bit.

Integer kernels must agree exactly, and so must float kernels built from fma, add and multiply:
both backends round every operation once (cpu: -ffp-contract=off; cuda: --fmad=false). The simd
probe holds mlm_cuda.h's warp shuffles to mlm_cpu.h's definition, inactive lanes included.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from conftest import AWKWARD

pytestmark = pytest.mark.skipif(mm.available("cuda") is not None,
                                reason=f"needs the cuda backend: {mm.available('cuda')}")


@pytest.fixture(scope="module")
def devices():
    return mm.device("cpu"), mm.device("cuda")


def run_both(devices, library, kernel, groups, threads, make_args, read):
    """Run `kernel` of `library` (a name in kernels/ or MSL source) on each device with the
    arguments `make_args(dev)` builds; return `read(args)` of each."""
    results = []
    for dev in devices:
        lib = dev.library(source=library) if "\n" in library else dev.library(library)
        args = make_args(dev)
        cb = dev.command_buffer()
        cb.dispatch(lib.kernel(kernel), groups=groups, threads=threads, args=args)
        cb.commit()
        cb.wait()
        results.append(read(args))
    return results


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 100_000), a=st.floats(-1e3, 1e3, width=32),
       seed=st.integers(0, 2**31))
def test_axpy_bit_identical(devices, n, a, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10).astype(np.float32)
    y = (rng.standard_normal(n) * 10).astype(np.float32)
    cpu, cuda = run_both(devices, "elementwise", "axpy", (n + 255) // 256, 256,
                         lambda dev: [dev.buffer(x), dev.buffer(y), {"n": n, "a": a}],
                         lambda args: args[1].numpy(np.uint32))
    np.testing.assert_array_equal(cpu, cuda)
    # and both are the single-rounding fma, computed exactly in float64 then rounded
    ref = (np.float64(np.float32(a)) * x.astype(np.float64) + y.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(cpu, ref.view(np.uint32))


@given(n4=st.sampled_from(AWKWARD) | st.integers(1, 30_000), a=st.floats(-1e3, 1e3, width=32),
       seed=st.integers(0, 2**31))
def test_axpy_f4_bit_identical(devices, n4, a, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(4 * n4) * 10).astype(np.float32)
    y = (rng.standard_normal(4 * n4) * 10).astype(np.float32)
    cpu, cuda = run_both(devices, "elementwise", "axpy_f4", (n4 + 255) // 256, 256,
                         lambda dev: [dev.buffer(x), dev.buffer(y), {"n": n4, "a": a}],
                         lambda args: args[1].numpy(np.uint32))
    np.testing.assert_array_equal(cpu, cuda)


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 100_000), value=st.integers(0, 2**32 - 1))
def test_fill_bit_identical(devices, n, value):
    cpu, cuda = run_both(devices, "elementwise", "fill_u32", (n + 127) // 128, 128,
                         lambda dev: [dev.buffer(np.zeros(n + 7, np.uint32)), {"n": n, "value": value}],
                         lambda args: args[0].numpy(np.uint32))
    np.testing.assert_array_equal(cpu, cuda)


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 50_000), bins=st.sampled_from([1, 31, 32, 33, 1000, 1024]),
       groups=st.integers(1, 9), threads=st.sampled_from([32, 96, 256, 1024]), seed=st.integers(0, 2**31))
def test_histogram_bit_identical(devices, n, bins, groups, threads, seed):
    x = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32)
    cpu, cuda = run_both(devices, "reduce", "histogram", groups, threads,
                         lambda dev: [dev.buffer(x), dev.buffer(np.zeros(bins, np.uint32)),
                                      {"n": n, "bins": bins, "shift": 5}],
                         lambda args: args[1].numpy(np.uint32))
    np.testing.assert_array_equal(cpu, cuda)


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 30_000), threads=st.sampled_from([32, 64, 96, 256, 1024]),
       seed=st.integers(0, 2**31))
def test_scan_block_bit_identical(devices, n, threads, seed):
    x = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32)  # wraps: exact modulo 2³²
    groups = (n + threads - 1) // threads
    cpu, cuda = run_both(devices, "reduce", "scan_block", groups, threads,
                         lambda dev: [dev.buffer(x), dev.buffer(nbytes=4 * n), dev.buffer(nbytes=4 * groups), {"n": n}],
                         lambda args: np.concatenate([args[1].numpy(np.uint32), args[2].numpy(np.uint32)]))
    np.testing.assert_array_equal(cpu, cuda)


# Every simd function on uint (and a uint2, and small-integer floats that add exactly), in
# simdgroups whose lanes outside `active` have returned. Slots of returned lanes keep their fill.
SIMD_PROBE = """
#include <metal_stdlib>
using namespace metal;

struct ProbeParams {
    uint active;     // bit l: lane l stays; the others return first
    uint delta;      // for shuffle_up/down/xor
    uint lane_add;   // simd_shuffle reads lane (lane * 7 + lane_add) mod 64: past 31 on purpose
    uint threshold;  // for simd_all/any
};

kernel void simd_probe(device const uint* x [[buffer(0)]],
                       device uint* out [[buffer(1)]],
                       constant ProbeParams& p [[buffer(2)]],
                       uint lid [[thread_index_in_threadgroup]],
                       uint3 tpg [[threads_per_threadgroup]],
                       uint group [[threadgroup_position_in_grid]],
                       uint lane [[thread_index_in_simdgroup]]) {
    if ((p.active >> lane & 1u) == 0u) return;
    uint t = group * (tpg.x * tpg.y * tpg.z) + lid;
    uint v = x[t], odd = v | 1u;
    device uint* o = out + t * 22u;
    o[0] = simd_sum(v);
    o[1] = simd_product(odd);
    o[2] = simd_min(v);
    o[3] = simd_max(v);
    o[4] = simd_and(v);
    o[5] = simd_or(v);
    o[6] = simd_xor(v);
    o[7] = simd_prefix_exclusive_sum(v);
    o[8] = simd_prefix_inclusive_sum(v);
    o[9] = simd_prefix_exclusive_product(odd);
    o[10] = simd_prefix_inclusive_product(odd);
    o[11] = simd_shuffle(v, ushort((lane * 7u + p.lane_add) % 64u));
    o[12] = simd_shuffle_down(v, ushort(p.delta));
    o[13] = simd_shuffle_up(v, ushort(p.delta));
    o[14] = simd_shuffle_xor(v, ushort(p.delta));
    o[15] = simd_broadcast_first(v);
    o[16] = simd_is_first() ? 1u : 0u;
    o[17] = simd_all(v > p.threshold) ? 1u : 0u;
    o[18] = simd_any(v > p.threshold) ? 1u : 0u;
    o[19] = simd_sum(uint2(v, v * 3u)).y;
    o[20] = as_type<uint>(simd_sum(float(v & 0xffffu)));
    o[21] = simd_min(int(v));
}
"""


@pytest.mark.parametrize("active", [0xFFFFFFFF, 0x0000FFFF, 0xFFFFFFFE, 0x80000001, 0x12345678, 0x00000100])
@pytest.mark.parametrize("delta", [1, 5, 16, 31])
@pytest.mark.parametrize("threads", [(64, 1, 1), (16, 4, 1), (1024, 1, 1)])
def test_simd_functions_bit_identical(devices, active, delta, threads):
    groups = 3
    total = groups * int(np.prod(threads))
    x = np.random.default_rng(active ^ delta).integers(0, 2**32, total, dtype=np.uint32)
    params = {"active": active, "delta": delta, "lane_add": 3 + delta, "threshold": 2**31}
    cpu, cuda = run_both(devices, SIMD_PROBE, "simd_probe", groups, threads,
                         lambda dev: [dev.buffer(x), dev.buffer(np.full(total * 22, 0xDEADBEEF, np.uint32)), params],
                         lambda args: args[1].numpy(np.uint32).reshape(total, 22))
    np.testing.assert_array_equal(cpu, cuda)
    returned = (active >> (np.arange(total) % 32) & 1) == 0
    assert (cpu[returned] == 0xDEADBEEF).all() and (cpu[~returned] != 0xDEADBEEF).any()


# ---------------------------------------------------------------- float16 and bfloat16 storage

def _special_floats(rng, n):
    """Normal values across float32's range, the storage types' edges and ties, and specials."""
    v = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    edges = np.array([0.0, -0.0, 65504.0, 65520.0, -65519.99, 2**-24, 2**-25, 3 * 2**-26, 6e-8, 1e-40,
                      3.3895314e38, 3.4028235e38, np.inf, -np.inf, 1 + 2**-11, 1 + 2**-8, 1 + 3 * 2**-9], np.float32)
    nans = np.array([0x7fc00000, 0xffc00000, 0x7fc12345, 0xffffffff, 0x7f800001, 0x7fa00000, 0xff802000],
                    np.uint32).view(np.float32)  # quiet and signalling, either sign, payloads high and low
    return np.concatenate([v, edges, -edges, nans])


@pytest.mark.parametrize("to", ["f16", "bf16"])
@given(n=st.sampled_from(AWKWARD) | st.integers(1, 5000), seed=st.integers(0, 2**31))
def test_rounding_to_storage_types_bit_identical(devices, to, n, seed):
    """float32 → float16 and → bfloat16 round to nearest even, identically on cpu and cuda, and as
    NumPy (float16) and ml_dtypes (bfloat16) do; a NaN keeps its sign and top payload bits and
    becomes quiet, the same bits on both; the way back is exact."""
    x = _special_floats(np.random.default_rng(seed), n)
    cpu, cuda = run_both(devices, "elementwise", f"cast_f32_{to}", (x.size + 255) // 256, 256,
                         lambda dev: [dev.buffer(x), dev.buffer(nbytes=2 * x.size), {"n": x.size}],
                         lambda args: args[1].numpy(np.uint16))
    np.testing.assert_array_equal(cpu, cuda)
    # NumPy and ml_dtypes choose their own NaN payloads: a NaN must stay a quiet NaN of its sign
    nan = np.isnan(x)
    ref = x.astype(np.float16 if to == "f16" else mm.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(cpu[~nan], ref[~nan])
    quiet = 0x7e00 if to == "f16" else 0x7fc0
    np.testing.assert_array_equal(cpu[nan] & quiet, np.full(nan.sum(), quiet, np.uint16))
    np.testing.assert_array_equal(cpu[nan] >> 15, x[nan].view(np.uint32) >> 31)
    back = run_both(devices, "elementwise", f"cast_{to}_f32", (x.size + 255) // 256, 256,
                    lambda dev: [dev.buffer(cpu), dev.buffer(nbytes=4 * x.size), {"n": x.size}],
                    lambda args: args[1].numpy(np.float32))
    np.testing.assert_array_equal(back[0].view(np.uint32), back[1].view(np.uint32))
    np.testing.assert_array_equal(back[0], cpu.view(np.float16 if to == "f16" else mm.bfloat16).astype(np.float32))
