"""The kernel contract (DESIGN §1, §4) on the backend under test."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from conftest import AWKWARD, rtol_for

ORACLE = """
#include <metal_stdlib>
using namespace metal;
kernel void oracle(device uint* out [[buffer(0)]],
                   uint3 tpig [[thread_position_in_grid]],
                   uint3 tpg [[threads_per_grid]],
                   uint3 tgpig [[threadgroup_position_in_grid]],
                   uint3 tgpg [[threadgroups_per_grid]],
                   uint3 tpitg [[thread_position_in_threadgroup]],
                   uint3 tptg [[threads_per_threadgroup]],
                   uint tiitg [[thread_index_in_threadgroup]],
                   uint tiisg [[thread_index_in_simdgroup]],
                   uint sgitg [[simdgroup_index_in_threadgroup]],
                   uint tpsg [[threads_per_simdgroup]],
                   uint sgptg [[simdgroups_per_threadgroup]],
                   uint x_only [[thread_position_in_grid]],
                   ushort2 tpitg_short [[thread_position_in_threadgroup]]) {
    uint idx = (tpig.z * tpg.y + tpig.y) * tpg.x + tpig.x;
    device uint* o = out + idx * 24;
    o[0] = tpig.x; o[1] = tpig.y; o[2] = tpig.z;
    o[3] = tpg.x; o[4] = tpg.y; o[5] = tpg.z;
    o[6] = tgpig.x; o[7] = tgpig.y; o[8] = tgpig.z;
    o[9] = tgpg.x; o[10] = tgpg.y; o[11] = tgpg.z;
    o[12] = tpitg.x; o[13] = tpitg.y; o[14] = tpitg.z;
    o[15] = tptg.x; o[16] = tptg.y; o[17] = tptg.z;
    o[18] = tiitg; o[19] = tiisg; o[20] = sgitg; o[21] = tpsg * 1000u + sgptg;
    o[22] = x_only; o[23] = uint(tpitg_short.x) + 65536u * uint(tpitg_short.y);
}
"""


def expected_builtins(groups, threads):
    """Every builtin of every thread, as DESIGN §1 defines them, laid out like the oracle writes them."""
    G, T = np.array(groups), np.array(threads)
    n = G * T
    z, y, x = np.meshgrid(np.arange(n[2]), np.arange(n[1]), np.arange(n[0]), indexing="ij")
    pos = np.stack([x, y, z], -1).reshape(-1, 3)
    group, local = pos // T, pos % T
    flat = local[:, 2] * T[0] * T[1] + local[:, 1] * T[0] + local[:, 0]
    rows = len(pos)
    cols = [pos, np.tile(n, (rows, 1)), group, np.tile(G, (rows, 1)), local, np.tile(T, (rows, 1)),
            flat[:, None], (flat % 32)[:, None], (flat // 32)[:, None],
            np.full((rows, 1), 32 * 1000 + (T.prod() + 31) // 32),
            pos[:, :1], (local[:, 0] + 65536 * local[:, 1])[:, None]]
    return np.concatenate(cols, axis=1).astype(np.uint32)


def threads_strategy():
    # tx·ty·tz a multiple of 32 and at most 1024, in 1, 2 and 3 dimensions
    return st.one_of(
        st.sampled_from([32, 64, 96, 256, 1024]).map(lambda t: (t, 1, 1)),
        st.sampled_from([(32, 2, 1), (8, 4, 1), (16, 16, 1), (1, 32, 1), (4, 8, 2), (2, 2, 8), (32, 1, 32)]),
    )


@given(groups=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3)), threads=threads_strategy())
def test_builtins_oracle(dev, groups, threads):
    k = dev.library(source=ORACLE).kernel("oracle")
    total = int(np.prod(groups) * np.prod(threads))
    out = dev.buffer(np.full(total * 24, 0xDEADBEEF, dtype=np.uint32))
    cb = dev.command_buffer()
    cb.dispatch(k, groups=groups, threads=threads, args=[out])
    cb.commit()
    cb.wait()
    np.testing.assert_array_equal(out.numpy(np.uint32).reshape(total, 24), expected_builtins(groups, threads))


def run(dev, kernel, groups, threads, *args):
    cb = dev.command_buffer()
    cb.dispatch(kernel, groups=groups, threads=threads, args=list(args))
    cb.commit()
    cb.wait()


@given(n4=st.sampled_from(AWKWARD) | st.integers(1, 30000), a=st.floats(-1e3, 1e3, width=32),
       threads=st.sampled_from([32, 96, 256]), seed=st.integers(0, 2**31))
def test_float4_kernels_match_float64(dev, n4, a, threads, seed):
    """copy_f4 and axpy_f4 (the bandwidth kernels of benchmarks/bench_runtime.py): four floats a
    thread, the grid rounded up past the end, nothing written beyond n4 float4s."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(4 * n4 + 4) * 10).astype(np.float32)
    y = (rng.standard_normal(4 * n4 + 4) * 10).astype(np.float32)
    lib = dev.library("elementwise")
    xb, yb, out = dev.buffer(x), dev.buffer(y), dev.buffer(np.full(4 * n4 + 4, 7, np.float32))
    groups = (n4 + threads - 1) // threads
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("copy_f4"), groups=groups, threads=threads, args=[xb, out, {"n": n4}])
    cb.dispatch(lib.kernel("axpy_f4"), groups=groups, threads=threads, args=[xb, yb, {"n": n4, "a": a}])
    cb.commit()
    cb.wait()
    np.testing.assert_array_equal(out.numpy(np.float32), np.concatenate([x[:4 * n4], np.full(4, 7, np.float32)]))
    ref = np.float64(np.float32(a)) * x.astype(np.float64) + y.astype(np.float64)  # fma: one rounding
    ref[4 * n4:] = y[4 * n4:]
    np.testing.assert_array_equal(yb.numpy(np.float32), ref.astype(np.float32))


def device_sum(dev, x: np.ndarray, groups: int, threads: int) -> float:
    lib = dev.library("reduce")
    xb = dev.buffer(x.astype(np.float32))
    partial = dev.buffer(nbytes=4 * groups)
    total = dev.buffer(nbytes=4)
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("sum_partial"), groups=(groups, 1, 1), threads=(threads, 1, 1), args=[xb, partial, {"n": x.size}])
    cb.dispatch(lib.kernel("sum_partial"), groups=(1, 1, 1), threads=(1024, 1, 1), args=[partial, total, {"n": groups}])
    cb.commit()
    cb.wait()
    return float(total.numpy(np.float32)[0])


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 20000), groups=st.integers(1, 40),
       threads=st.sampled_from([32, 64, 96, 128, 256, 1024]), seed=st.integers(0, 2**31))
def test_threadgroup_sum(dev, n, groups, threads, seed):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    ref = float(np.sum(x.astype(np.float64)))
    got = device_sum(dev, x, groups, threads)
    assert got == pytest.approx(ref, rel=rtol_for(n), abs=rtol_for(n) * float(np.abs(x).sum()))


@given(rows=st.sampled_from([1, 31, 32, 33, 64, 100]) | st.integers(1, 130),
       cols=st.sampled_from([1, 31, 32, 33, 64, 100]) | st.integers(1, 130), seed=st.integers(0, 2**31))
def test_tiled_transpose(dev, rows, cols, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    out = dev.buffer(np.full(rows * cols, np.nan, dtype=np.float32))
    k = dev.library("layout").kernel("transpose")
    run(dev, k, ((cols + 31) // 32, (rows + 31) // 32, 1), (32, 8, 1), dev.buffer(x), out, {"rows": rows, "cols": cols})
    np.testing.assert_array_equal(out.numpy(np.float32).reshape(cols, rows), x.T)


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 50000), bins=st.sampled_from([1, 2, 31, 32, 33, 256, 1000, 1024]),
       groups=st.integers(1, 9), threads=st.sampled_from([32, 96, 256, 1024]), seed=st.integers(0, 2**31))
def test_atomic_histogram(dev, n, bins, groups, threads, seed):
    x = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint32)
    counts = dev.buffer(np.zeros(bins, dtype=np.uint32))
    k = dev.library("reduce").kernel("histogram")
    run(dev, k, (groups, 1, 1), (threads, 1, 1), dev.buffer(x), counts, {"n": n, "bins": bins, "shift": 7})
    ref = np.bincount((x >> 7) % bins, minlength=bins)
    np.testing.assert_array_equal(counts.numpy(np.uint32), ref)


def device_exclusive_scan(dev, x: np.ndarray, threads: int) -> np.ndarray:
    lib = dev.library("reduce")
    n = x.size
    groups = (n + threads - 1) // threads
    assert groups <= 1024, "two levels cover n <= threads·1024"
    xb, out = dev.buffer(x), dev.buffer(nbytes=4 * n)
    sums, scanned, total = dev.buffer(nbytes=4 * groups), dev.buffer(nbytes=4 * groups), dev.buffer(nbytes=4)
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("scan_block"), groups=groups, threads=threads, args=[xb, out, sums, {"n": n}])
    cb.dispatch(lib.kernel("scan_block"), groups=1, threads=1024, args=[sums, scanned, total, {"n": groups}])
    cb.dispatch(lib.kernel("scan_add"), groups=groups, threads=threads, args=[out, scanned, {"n": n}])
    cb.commit()
    cb.wait()
    return out.numpy(np.uint32)


@given(n=st.sampled_from(AWKWARD) | st.integers(1, 30000), threads=st.sampled_from([32, 64, 96, 256, 1024]),
       seed=st.integers(0, 2**31))
def test_simd_prefix_sum(dev, n, threads, seed):
    x = np.random.default_rng(seed).integers(0, 1000, n, dtype=np.uint32)
    ref = (np.cumsum(x, dtype=np.uint64) - x).astype(np.uint32)
    np.testing.assert_array_equal(device_exclusive_scan(dev, x, threads), ref)


# ---------------------------------------------------------------- predication

def axpy_args(dev, n=100):
    x = dev.buffer(np.arange(n, dtype=np.float32))
    y = dev.buffer(np.ones(n, dtype=np.float32))
    return x, y, {"n": n, "a": 2.0}


def test_predicate_zero_skips_nonzero_runs_offsets_honoured(dev):
    k = dev.library("elementwise").kernel("axpy")
    flags = dev.buffer(np.array([7, 0, 1, 0], dtype=np.uint32))
    results = {}
    for offset in (0, 4, 8, 12):
        x, y, p = axpy_args(dev)
        cb = dev.command_buffer()
        cb.dispatch(k, groups=(4, 1, 1), threads=(32, 1, 1), args=[x, y, p], predicate=mm.Predicate(flags, offset))
        cb.commit()
        cb.wait()
        results[offset] = y.numpy(np.float32).copy()
    ran = 2 * np.arange(100, dtype=np.float32) + 1
    np.testing.assert_array_equal(results[0], ran)
    np.testing.assert_array_equal(results[8], ran)
    np.testing.assert_array_equal(results[4], np.ones(100, np.float32))
    np.testing.assert_array_equal(results[12], np.ones(100, np.float32))


def test_command_buffer_predicate_applies_to_later_dispatches(dev):
    k = dev.library("elementwise").kernel("axpy")
    flags = dev.buffer(np.array([0], dtype=np.uint32))
    x, y, p = axpy_args(dev)
    cb = dev.command_buffer()
    cb.dispatch(k, groups=4, threads=32, args=[x, y, p])  # before the predicate: runs
    cb.predicate = mm.Predicate(flags, 0)
    cb.dispatch(k, groups=4, threads=32, args=[x, y, p])  # skipped
    cb.commit()
    cb.wait()
    np.testing.assert_array_equal(y.numpy(np.float32), 2 * np.arange(100, dtype=np.float32) + 1)


@pytest.mark.parametrize("value", [0, 1])
def test_kernel_writes_predicate_read_later_in_same_command_buffer(dev, value):
    lib = dev.library("elementwise")
    flags = dev.buffer(np.array([1, 1], dtype=np.uint32))
    x, y, p = axpy_args(dev)
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("fill_u32"), groups=1, threads=32, args=[flags, {"n": 1, "value": value}])
    cb.dispatch(lib.kernel("axpy"), groups=4, threads=32, args=[x, y, p], predicate=(flags, 0))
    cb.commit()
    cb.wait()
    expect = 2 * np.arange(100, dtype=np.float32) + 1 if value else np.ones(100, np.float32)
    np.testing.assert_array_equal(y.numpy(np.float32), expect)


def test_predicate_validation(dev):
    flags = dev.buffer(np.zeros(2, dtype=np.uint32))
    with pytest.raises(ValueError, match="multiple of 4"):
        mm.Predicate(flags, 2)
    with pytest.raises(ValueError, match="past the end"):
        mm.Predicate(flags, 8)


# ---------------------------------------------------------------- command buffers

@given(pieces=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_commit_and_continue_equals_one_commit(dev, pieces):
    k = dev.library("elementwise").kernel("axpy")
    steps = sum(pieces)
    ys = []
    for split in (False, True):
        x, y, _ = axpy_args(dev)
        cb = dev.command_buffer()
        i = 0
        for piece in pieces:
            for _ in range(piece):
                # a fresh constant each step: temporaries of committed pieces must stay alive
                cb.dispatch(k, groups=4, threads=32, args=[x, y, {"n": 100, "a": float(i % 3) - 0.5}])
                i += 1
            if split:
                cb.commit_and_continue()
        cb.commit()
        cb.wait()
        ys.append(y.numpy(np.float32).copy())
    assert i == steps
    np.testing.assert_array_equal(ys[0], ys[1])


def test_execution_is_in_commit_order_across_command_buffers(dev):
    k = dev.library("elementwise").kernel("fill_u32")
    out = dev.buffer(nbytes=4 * 1000)
    cbs = []
    for v in range(20):
        cb = dev.command_buffer()
        cb.dispatch(k, groups=32, threads=32, args=[out, {"n": 1000, "value": v}])
        cb.commit()
        cbs.append(cb)
    cbs[-1].wait()
    assert all(cb.completed for cb in cbs)
    np.testing.assert_array_equal(out.numpy(np.uint32), 19)


def test_committed_buffer_refuses_more_work(dev):
    k = dev.library("elementwise").kernel("fill_u32")
    out = dev.buffer(nbytes=128)
    cb = dev.command_buffer()
    cb.dispatch(k, groups=1, threads=32, args=[out, {"n": 32, "value": 1}])
    cb.commit()
    with pytest.raises(mm.DispatchError, match="committed"):
        cb.dispatch(k, groups=1, threads=32, args=[out, {"n": 32, "value": 1}])
    cb.wait()


def test_named_arguments(dev):
    k = dev.library("elementwise").kernel("axpy")
    x, y, p = axpy_args(dev)
    cb = dev.command_buffer()
    cb.dispatch(k, groups=4, threads=32, p=p, y=y, x=x)
    cb.commit()
    cb.wait()
    np.testing.assert_array_equal(y.numpy(np.float32), 2 * np.arange(100, dtype=np.float32) + 1)


def test_constant_struct_from_a_buffer(dev):
    k = dev.library("elementwise").kernel("axpy")
    x, y, _ = axpy_args(dev)
    params = dev.buffer(np.array([100, np.float32(3.0).view(np.uint32)], dtype=np.uint32))
    run(dev, k, 4, 32, x, y, params)
    np.testing.assert_array_equal(y.numpy(np.float32), 3 * np.arange(100, dtype=np.float32) + 1)


# ---------------------------------------------------------------- errors before dispatch

@pytest.mark.parametrize("call, message", [
    (lambda k, x, y: dict(args=[x, y]), r"missing argument\(s\) p"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}, x]), "takes 3 arguments"),
    (lambda k, x, y: dict(args=[x, np.zeros(4), {"n": 1, "a": 1.0}]), "expected a device buffer.*dev.buffer"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1}]), "missing a"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0, "b": 2}]), "unknown b"),
    (lambda k, x, y: dict(args=[x, y, {"n": -1, "a": 1.0}]), "out of range"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1.5, "a": 1.0}]), "expected an integer"),
    (lambda k, x, y: dict(args=[x, y, x.device.buffer(nbytes=4)]), "smaller than the 8 bytes"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}], z=y), "no parameter named 'z'"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}], x=y), "given twice"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}], threads=(33, 1, 1)), "multiple of 32"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}], threads=(2048, 1, 1)), "at most 1024"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}], groups=(4, 0, 1)), "empty"),
    (lambda k, x, y: dict(args=[x, y, {"n": 1, "a": 1.0}], groups=(1, 1, 65536)), "at most 65535 threadgroups along y and z"),
])
def test_bad_dispatch_names_kernel_and_problem(dev, call, message):
    k = dev.library("elementwise").kernel("axpy")
    x, y = dev.buffer(np.zeros(4, np.float32)), dev.buffer(np.zeros(4, np.float32))
    kw = dict(groups=(1, 1, 1), threads=(32, 1, 1))
    kw.update(call(k, x, y))
    cb = dev.command_buffer()
    with pytest.raises(mm.DispatchError, match=message) as e:
        cb.dispatch(k, **kw)
    assert "axpy" in str(e.value) and "kernels/elementwise.metal" in str(e.value)
    assert not cb._encoded, "nothing half-encoded"


def test_unknown_kernel_and_library(dev):
    with pytest.raises(KeyError, match="no kernel 'nope'.*axpy"):
        dev.library("elementwise").kernel("nope")
    with pytest.raises(FileNotFoundError, match="no kernel library 'nope'"):
        dev.library("nope")


def test_ops_choose_by_capability_not_by_name(dev, monkeypatch):
    """Instance norm's threadgroup width and MTGP32's kernel follow `cheap_barriers`, whatever the
    device is called."""
    from mlmetal.ops import norm

    for name in ("cpu", "cuda"):
        monkeypatch.setattr(dev, "name", name)
        for cheap, kernel, threads in ((True, "mtgp32", 1024), (False, "mtgp32_serial", 32)):
            monkeypatch.setattr(dev, "cheap_barriers", cheap)
            assert mm.random.MTGP32(dev, 0, states=2).kernel == kernel
            assert norm._threads(dev, 64 * 64) == threads
