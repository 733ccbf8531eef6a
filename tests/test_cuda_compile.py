"""CI has no GPU, yet a CUDA compile error must fail it: every kernel's CUDA translation compiles here.

NVRTC (the `nvidia-cuda-nvrtc` wheel of the test extra, or a CUDA toolkit's) compiles for sm_90
with the very options and code path the cuda backend uses (`cuda.compile_cubin`); no device and
no CuPy are needed. nvcc cannot stand in for it: MSL helper functions carry no `__device__`, and
only NVRTC has `-default-device` to make them device functions.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlmetal.runtime import cuda
from mlmetal.runtime import source as S

ARCH = "90"  # the H100's
pytestmark = pytest.mark.no_cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def nvrtc():
    try:
        return cuda.nvrtc_version()
    except cuda.NvrtcNotFound as e:
        pytest.skip(f"cannot compile CUDA here: {e}")


def compile_source(src: S.Source, max_registers: int = 0) -> bytes:
    assert not S.lint(src)
    return cuda.compile_cubin(S.generate(src, "cuda"), src.name, ARCH, max_registers)


LIBRARIES = sorted(S.KERNEL_DIR.glob("*.metal"))
REGISTER_LIMITS = [0, 64]  # 64: the build the backend makes for 1024-thread dispatches of a register-hungry kernel


@pytest.fixture(scope="module")
def library_builds(nvrtc):
    """Every library's build for each register limit, all started at once, a thread a core
    (largest first): NVRTC runs outside the GIL, and the largest library alone takes minutes of a
    2-core machine. Each test waits for its own and reports its errors."""
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        yield {(path, limit): pool.submit(compile_source, S.Source.from_file(path), limit)
               for path in sorted(LIBRARIES, key=lambda p: -p.stat().st_size) for limit in REGISTER_LIMITS}
    finally:
        pool.shutdown(cancel_futures=True)  # after a stopped run, no more builds than those under way


@pytest.mark.parametrize("max_registers", REGISTER_LIMITS)
@pytest.mark.parametrize("path", LIBRARIES, ids=lambda p: p.stem)
def test_kernel_library_compiles_for_sm90(library_builds, path, max_registers):
    cubin = library_builds[(path, max_registers)].result()
    assert cubin[:4] == b"\x7fELF"


# Every simd function of mlm_cuda.h on scalar, vector, half and bool elements, the way kernels
# call them (kernels/ alone uses only a few).
SIMD_EVERYWHERE = """
#include <metal_stdlib>
using namespace metal;

template <class T> T reductions(T x) {
    return simd_sum(x) + simd_product(x) + simd_min(x) + simd_max(x)
         + simd_prefix_exclusive_sum(x) + simd_prefix_inclusive_sum(x)
         + simd_prefix_exclusive_product(x) + simd_prefix_inclusive_product(x);
}

template <class T> T bitwise(T x) { return simd_and(x) | simd_or(x) | simd_xor(x); }

template <class T> T moves(T x, ushort lane) {
    return simd_shuffle(x, lane) + simd_shuffle_down(x, 1) + simd_shuffle_up(x, 2)
         + simd_shuffle_xor(x, 3) + simd_broadcast(x, 0) + simd_broadcast_first(x);
}

kernel void every_simd_function(device float* f [[buffer(0)]],
                                device int* i [[buffer(1)]],
                                device uint* u [[buffer(2)]],
                                device half* h [[buffer(3)]],
                                device float4* f4 [[buffer(4)]],
                                device int2* i2 [[buffer(5)]],
                                device ushort* s [[buffer(6)]],
                                uint t [[thread_position_in_grid]],
                                ushort lane [[thread_index_in_simdgroup]]) {
    f[t] = reductions(f[t]) + moves(f[t], lane);
    i[t] = reductions(i[t]) + bitwise(i[t]) + moves(i[t], lane);
    u[t] = reductions(u[t]) + bitwise(u[t]) + moves(u[t], lane);
    h[t] = reductions(h[t]) + moves(h[t], lane);
    f4[t] = reductions(f4[t]) + moves(f4[t], lane);
    i2[t] = reductions(i2[t]) + bitwise(i2[t]) + moves(i2[t], lane);
    s[t] = reductions(s[t]) + bitwise(s[t]) + moves(s[t], lane);
    bool b = simd_shuffle(t > 3u, lane) && simd_all(t > 1u) && !simd_any(t > 9u);
    simdgroup_barrier(mem_flags::mem_none);
    if (simd_is_first() || b) u[t] += 1u;
}
"""


def test_every_simd_function_compiles_for_every_element_type():
    compile_source(S.Source(SIMD_EVERYWHERE, name="<simd>"))


def test_compile_error_points_at_the_metal_line():
    bad = "#include <metal_stdlib>\nusing namespace metal;\n\nkernel void k(device float* x [[buffer(0)]]) {\n" \
          "    x[0] = undefined_name;\n}\n"
    with pytest.raises(cuda.CompileError, match=r"<bad>:5: error: identifier \"undefined_name\" is undefined"):
        compile_source(S.Source(bad, name="<bad>"))


# `mlmetal resources`: what ptxas gave each kernel, read from NVRTC's log.
PLANTED = """#include <metal_stdlib>
using namespace metal;

kernel void staged(device float* y [[buffer(0)]],  // extent: 1000
                   uint t [[thread_index_in_threadgroup]]) {
    threadgroup float tile[1000];
    tile[t] = float(t);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[t] = tile[999 - t];
}

kernel void local_array(device float* y [[buffer(0)]],  // extent: 64
                        device const uint* at [[buffer(1)]],  // extent: 1
                        uint t [[thread_position_in_grid]]) {
    float a[64];
    for (uint i = 0; i < 64; ++i) a[i] = y[i] * float(t);
    y[t % 64] = a[at[0] % 64];
}
"""


def test_resources_read_each_kernels_registers_stack_and_threadgroup_memory():
    """A 1000-float threadgroup array is 4000 bytes of shared memory; a float[64] indexed by a value
    loaded at run time lives on the stack (local memory), 256 bytes; each kernel reports once."""
    found = {r.kernel: r for r in cuda.resources(S.Source(PLANTED, name="planted.metal"), ARCH)}
    assert set(found) == {"staged", "local_array"}
    assert found["staged"].threadgroup_memory == 4000 and found["staged"].stack == 0
    assert found["local_array"].threadgroup_memory == 0 and found["local_array"].stack >= 256
    assert all(0 < r.registers <= 255 for r in found.values())


CROWDED = """#include <metal_stdlib>
using namespace metal;

kernel void crowded(device float* y [[buffer(0)]],  // extent: 4096
                    uint t [[thread_position_in_grid]]) {
    float v[48];
    for (uint i = 0; i < 48; ++i) v[i] = y[(t + 64 * i) % 4096];
    float s = 0.0f;
    for (uint r = 0; r < 4; ++r)
        for (uint i = 0; i < 48; ++i) s = s * v[(i * 7 + r) % 48] + v[i];
    y[t % 4096] = s;
}
"""


def test_resources_read_the_spills_a_register_cap_causes():
    """48 values live at once fit the registers the compiler picks; capped to 24 registers a thread
    (as the backend caps register-hungry kernels for large threadgroups), they spill."""
    src = S.Source(CROWDED, name="crowded.metal")
    (free,) = cuda.resources(src, ARCH)
    (capped,) = cuda.resources(src, ARCH, max_registers=24)
    assert free.registers > 24 and free.spill_stores == free.spill_loads == 0
    assert capped.registers <= 24 and capped.spill_stores > 0 and capped.spill_loads > 0 and capped.stack > 0


def test_the_resources_command_prints_a_row_a_kernel(tmp_path, capsys):
    from mlmetal.cli import main

    path = tmp_path / "planted.metal"
    path.write_text(PLANTED)
    assert main(["resources", str(path), "--kernel", "^staged$", "--threads", "256"]) == 0
    out = capsys.readouterr().out
    assert "threadgroups of 256 threads" in out and "local_array" not in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["staged"] and " 4000 " in out
    assert main(["resources", "no_such_library"]) == 2
    assert "no kernel library 'no_such_library'" in capsys.readouterr().err
    assert main(["resources", str(path), "--kernel", "nothing"]) == 2
    assert "no kernel of planted.metal matches 'nothing'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's way: usage, the flag and the problem, status 2
        main(["resources", str(path), "--kernel", "("])
    assert stop.value.code == 2 and "argument --kernel: not a regular expression" in capsys.readouterr().err
