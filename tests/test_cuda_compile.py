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

