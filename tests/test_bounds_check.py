"""The bounds-checked cpu backend (MLMETAL_CHECK_BOUNDS) and the extents kernels declare for binding.

The checked device is the cpu backend whatever MLMETAL_DEVICE names; the extent refusal at bind
runs on the backend under test."""

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from conftest import AWKWARD
from mlmetal.runtime import source as S


@pytest.fixture(scope="module")
def checked():
    why = mm.available("cpu")
    if why:
        pytest.skip(f"backend cpu unavailable: {why}")
    return mm.device("cpu", check_bounds=True)


@pytest.fixture(scope="module")
def unchecked():
    return mm.device("cpu", check_bounds=False)


HEAD = """#include <metal_stdlib>
using namespace metal;
struct P { uint n; };
"""

# Kernels that go out of bounds when `bad` is 1 and stay inside when it is 0, each with the
# buffer it oversteps and the index it reaches at n = 64 (the buffers hold n elements). The line
# of the bad access is marked `// here`.
CASES = {
    "read_past_end": ("x", 64, """
kernel void read_past_end(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                          constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                          uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = x[min(i + bad, p.n - 1 + bad)];  // here
}"""),
    "write_past_end": ("y", 64, """
kernel void write_past_end(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                           constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
    if (i < p.n) {
        uint j = i + bad * (p.n - i);
        y[j] = x[i];  // here
    }
}"""),
    "negative_index": ("x", -1, """
kernel void negative_index(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                           constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                           uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = x[int(i) - int(bad * (i + 1))];  // here
}"""),
    "float4_cast": ("x", 16, """
kernel void float4_cast(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                        constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                        uint i [[thread_position_in_grid]]) {
    // y = x, a float4 at a time; with `bad` it reads one float4 more than x holds
    if (i < p.n / 4 + bad) {
        float4 v = ((device const float4*)x)[i];  // here
        if (i < p.n / 4) ((device float4*)y)[i] = v;
    }
}"""),
    "through_a_helper": ("x", 64, """
inline float pick(device const float* row, uint j) {
    return row[j];  // here
}
kernel void through_a_helper(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                             constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                             uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = pick(x + bad, i);
}"""),
    "threadgroup_overflow": ("threadgroup array `t`", 32, """
kernel void threadgroup_overflow(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                                 constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                                 uint i [[thread_position_in_grid]], uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float t[32];
    t[lid] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[i] = t[(lid + bad) % (32 + bad)];  // here
}"""),
    "threadgroup_row_overflow": ("threadgroup array `t`", "[3][8]", """
kernel void threadgroup_row_overflow(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                                     constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                                     uint i [[thread_position_in_grid]], uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float t[4][8];
    t[lid / 8][lid % 8] = x[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[i] = t[lid / 8][lid % 8 + (lid == 31 ? bad : 0)];  // here
}"""),
    "atomic_out_of_range": ("y", 64, """
kernel void atomic_out_of_range(device const float* x [[buffer(0)]], device atomic_uint* y [[buffer(1)]],
                                constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                                uint i [[thread_position_in_grid]]) {
    // y[i] counts one; with `bad` the last thread counts into the slot past the end
    if (i < p.n) atomic_fetch_add_explicit(y + i + (i == p.n - 1 ? bad : 0), 1u, memory_order_relaxed);  // here
}"""),
}


def source_of(name: str) -> str:
    return HEAD + CASES[name][2]


def line_of(name: str) -> int:
    return next(i for i, l in enumerate(source_of(name).split("\n"), 1) if "// here" in l)


def run(dev, name: str, bad: int, n: int = 64, path=None):
    lib = dev.library(path=path) if path else dev.library(source=source_of(name))
    x = dev.buffer(np.arange(n, dtype=np.float32) + 1)
    y = dev.buffer(np.zeros(n, np.float32))
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel(name), groups=(n + 31) // 32, threads=32, args=[x, y, {"n": n}, bad])
    cb.commit()
    cb.wait()
    return x, y


@pytest.mark.parametrize("name", CASES)
def test_out_of_bounds_access_names_kernel_file_line_buffer_and_index(checked, name, tmp_path):
    path = tmp_path / f"{name}.metal"
    path.write_text(source_of(name))
    buffer, index, _ = CASES[name]
    with pytest.raises(mm.ExecutionError) as e:
        run(checked, name, bad=1, path=path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line_of(name)}: kernel {name}: index {index} is out of bounds of "), message
    assert (buffer if buffer.startswith("threadgroup") else f"buffer `{buffer}`") in message


@pytest.mark.parametrize("name", CASES)
def test_the_same_kernels_in_bounds_run_unchanged(checked, unchecked, name):
    x, y = run(checked, name, bad=0)
    _, y_plain = run(unchecked, name, bad=0)
    # y = x, or one count a slot for the atomic kernel
    expected = np.ones(64, np.uint32).view(np.float32) if name == "atomic_out_of_range" else x.numpy(np.float32)
    np.testing.assert_array_equal(y.numpy(np.float32), expected)
    np.testing.assert_array_equal(y_plain.numpy(np.float32), expected)


def past_the_end(buf, nbytes: int) -> np.ndarray:
    """The bytes just past a cpu buffer's end: its allocation's padding, safe to write."""
    raw = buf._mem.base
    at = buf.ptr - raw.ctypes.data + buf.nbytes
    assert at + nbytes <= raw.nbytes
    return raw[at:at + nbytes]


def test_a_bad_write_is_not_made_and_later_dispatches_run(checked, unchecked):
    def sentinel_after_bad_write(dev):
        lib = dev.library(source=source_of("write_past_end"))
        x, y = dev.buffer(np.arange(64, dtype=np.float32) + 1), dev.buffer(np.zeros(64, np.float32))
        past_the_end(y, 4)[:] = 0xAB
        cb = dev.command_buffer()
        cb.dispatch(lib.kernel("write_past_end"), groups=2, threads=32, args=[x, y, {"n": 64}, 1])
        cb.commit()
        try:
            cb.wait()
        except mm.ExecutionError as e:
            assert "index 64 is out of bounds of buffer `y`" in str(e)
        return past_the_end(y, 4).copy()

    assert (sentinel_after_bad_write(unchecked) != 0xAB).any()  # the plain build writes past y's end
    assert (sentinel_after_bad_write(checked) == 0xAB).all()  # the checked one does not
    x, y = run(checked, "write_past_end", bad=0)
    np.testing.assert_array_equal(y.numpy(np.float32), np.arange(64) + 1)


IDIOMS = HEAD + """
inline void store(device float* at, float v) { *at = v; }
inline float first_of(threadgroup const float* row) { return row[0]; }
struct Pair { float a, b; };
// Pointer idioms the checked build must keep: arithmetic, comparison loops, ++, `*`, `->`,
// `&x[i]` passed on, casts to vectors and back, atomics through pointer arithmetic, a
// threadgroup row passed as a pointer, a pointer chosen by a condition.
kernel void idioms(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                   device atomic_uint* counts [[buffer(2)]], device const Pair* pairs [[buffer(3)]],
                   constant P& p [[buffer(4)]],
                   uint i [[thread_position_in_grid]], uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float rows[2][32];
    rows[lid / 32 % 2][lid % 32] = float(lid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (i >= p.n) return;
    float s = 0.0f;
    for (device const float* q = x; q < x + p.n; ++q) s += *q;
    device const float4* v = (device const float4*)x;
    float4 first = v[0];
    device const float* back = (device const float*)(v + 1);
    device float* out = i % 2 == 0 ? y : y + 0;
    store(&out[i], s + first.w + back[-1] + pairs->b + (pairs + 1)->a + first_of(rows[1]));
    atomic_fetch_add_explicit(counts + i % 4, 1u, memory_order_relaxed);
}
"""


def test_pointer_idioms_keep_working(checked, unchecked):
    outs = []
    for dev in (checked, unchecked):
        x = dev.buffer(np.arange(8, dtype=np.float32))
        y, counts = dev.buffer(np.zeros(64, np.float32)), dev.buffer(np.zeros(4, np.uint32))
        pairs = dev.buffer(np.array([[1, 2], [3, 4]], np.float32))
        cb = dev.command_buffer()
        cb.dispatch(dev.library(source=IDIOMS).kernel("idioms"), groups=1, threads=64, args=[x, y, counts, pairs, {"n": 8}])
        cb.commit()
        cb.wait()
        outs.append((y.numpy(np.float32)[:8].copy(), counts.numpy(np.uint32).copy()))
    expected = 28 + 3 + 3 + 2 + 3 + 32  # Σx, x[3] twice, pairs[0].b, pairs[1].a, rows[1][0]
    for y, counts in outs:
        np.testing.assert_array_equal(y, np.full(8, expected, np.float32))
        np.testing.assert_array_equal(counts, [2, 2, 2, 2])


def test_a_dereference_has_no_line_but_names_kernel_and_buffer(checked):
    src = HEAD + """
kernel void deref(device float* y [[buffer(0)]], constant P& p [[buffer(1)]]) {
    *(y + p.n) = 1.0f;
}"""
    y = checked.buffer(np.zeros(4, np.float32))
    cb = checked.command_buffer()
    cb.dispatch(checked.library(source=src).kernel("deref"), groups=1, threads=32, args=[y, {"n": 4}])
    cb.commit()
    with pytest.raises(mm.ExecutionError, match=r"kernel deref \(line unknown.*index 4 is out of bounds of buffer `y`"):
        cb.wait()


# In-bounds kernels of the library that index every way (elementwise, float4, a threadgroup
# reduction with simd functions, atomics through threadgroup memory): never a false alarm.
@given(n=st.sampled_from(AWKWARD), seed=st.integers(0, 2**16))
def test_in_bounds_access_never_trips(checked, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(np.float32)
    xb, yb = checked.buffer(x), checked.buffer(np.ones(n, np.float32))
    groups = (n + 255) // 256
    partial = checked.buffer(nbytes=4 * groups)
    bins = checked.buffer(np.zeros(7, np.uint32))
    reduce = checked.library("reduce")
    cb = checked.command_buffer()
    cb.dispatch(checked.library("elementwise").kernel("axpy"), groups=groups, threads=256, args=[xb, yb, {"n": n, "a": 2.0}])
    cb.dispatch(reduce.kernel("sum_partial"), groups=groups, threads=256, args=[xb, partial, {"n": n}])
    cb.dispatch(reduce.kernel("histogram"), groups=groups, threads=256,
                args=[xb, bins, {"n": n, "bins": 7, "shift": 20}])
    cb.commit()
    cb.wait()
    np.testing.assert_allclose(yb.numpy(np.float32), 2 * x + 1, rtol=1e-6)
    np.testing.assert_allclose(partial.numpy(np.float32).sum(), x.sum(), rtol=1e-4, atol=1e-4)
    assert bins.numpy(np.uint32).sum() == n


def test_checked_and_plain_builds_are_cached_apart(checked, unchecked, monkeypatch):
    src = source_of("read_past_end")
    assert checked.library(source=src).so._name != unchecked.library(source=src).so._name
    assert "check::ptr" in checked.library(source=src).cpp and "check::ptr" not in unchecked.library(source=src).cpp
    monkeypatch.setenv("MLMETAL_CHECK_BOUNDS", "1")
    assert mm.device("cpu") is checked
    monkeypatch.setenv("MLMETAL_CHECK_BOUNDS", "0")
    assert mm.device("cpu") is unchecked


def test_check_bounds_is_for_the_cpu_backend():
    with pytest.raises(ValueError, match="cpu backend"):
        mm.device("cuda", check_bounds=True)


# ---------------------------------------------------------------- declared extents

DECLARED = HEAD + """
kernel void scaled(device const float* x [[buffer(0)]],  // extent: p.n
                   device float4* y [[buffer(1)]],        // extent: (p.n + 3) / 4
                   constant P& p [[buffer(2)]], constant uint& bad [[buffer(3)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) ((device float*)y)[i] = 2.0f * x[i + bad];
}
"""


def test_binding_refuses_a_buffer_smaller_than_the_declared_extent(dev):
    k = dev.library(source=DECLARED).kernel("scaled")
    x, y = dev.buffer(np.zeros(10, np.float32)), dev.buffer(np.zeros(12, np.float32))
    cb = dev.command_buffer()
    cb.dispatch(k, groups=1, threads=32, args=[x, y, {"n": 10}, 0])  # y: 3 float4s of 16 bytes: enough
    with pytest.raises(mm.DispatchError, match=re.escape(
            "kernel scaled (<source>:5), parameter `x` (device const float*): the buffer has 40 bytes, the kernel "
            "reaches 44 (extent p.n = 11 elements)")):
        cb.dispatch(k, groups=1, threads=32, args=[x, y, {"n": 11}, 0])
    with pytest.raises(mm.DispatchError, match=r"parameter `y` \(device float4\*\): the buffer has 48 bytes, "
                                               r"the kernel reaches 64 \(extent \(p.n \+ 3\) / 4 = 4 elements\)"):
        cb.dispatch(k, groups=1, threads=32, args=[dev.buffer(np.zeros(13, np.float32)), y, {"n": 13}, 0])
    # a constant bound as a buffer: its values are the device's, so binding cannot check
    cb.dispatch(k, groups=1, threads=32, args=[x, y, dev.buffer(np.array([10], np.uint32)), 0])


def test_checked_build_holds_a_kernel_to_its_declared_extent(checked):
    # x holds 16 floats but the kernel declares it reads p.n = 10: reading x[10] is a bug in the
    # kernel or its declaration, and the checked build says which.
    k = checked.library(source=DECLARED).kernel("scaled")
    x, y = checked.buffer(np.arange(16, dtype=np.float32)), checked.buffer(np.zeros(12, np.float32))
    cb = checked.command_buffer()
    cb.dispatch(k, groups=1, threads=32, args=[x, y, {"n": 10}, 1])
    cb.commit()
    line = next(i for i, l in enumerate(DECLARED.split("\n"), 1) if "2.0f * x" in l)
    with pytest.raises(mm.ExecutionError, match=re.escape(
            f"<source>:{line}: kernel scaled: index 10 is out of bounds of buffer `x` [[buffer(0)]] (10 elements of 4 bytes); "
            "that is its declared extent `p.n` (<source>:5), the buffer holds 64 bytes")):
        cb.wait()


def test_extent_comment_is_parsed_per_parameter():
    k = S.Source(DECLARED).kernels["scaled"]
    assert [(p.name, p.extent) for p in k.buffers] == [("x", "p.n"), ("y", "(p.n + 3) / 4"), ("p", None), ("bad", None)]
    assert [(p.name, n, b) for p, n, b in k.extent_bytes({"p": {"n": 10}, "bad": 0})] == [("x", 10, 40), ("y", 3, 48)]
