"""The cpu backend's own machinery: compile cache, compiler discovery, thread pool, fibers.

The cpu backend is present whatever MLMETAL_DEVICE names, so these run under every backend and
use the cpu device explicitly."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.runtime import cache, cpu


@pytest.fixture(scope="module")
def cpu_dev():
    why = mm.available("cpu")
    if why:
        pytest.skip(f"backend cpu unavailable: {why}")
    return mm.device("cpu")

# A kernel no other test compiles, so the cache state is this test's own.
PROBE = """
#include <metal_stdlib>
using namespace metal;
kernel void probe_{tag}(device uint* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {{
    out[i] = i * {tag}u;
}}
"""


def run_in_subprocess(code: str, cache_dir, env_extra=None) -> str:
    env = dict(os.environ, MLMETAL_CACHE_DIR=str(cache_dir), MLMETAL_DEVICE="cpu", **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


COMPILE = """
    import numpy as np, mlmetal as mm
    dev = mm.device("cpu")
    lib = dev.library(source={src!r})
    out = dev.buffer(nbytes=4 * 64)
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("probe_7"), groups=2, threads=32, args=[out])
    cb.commit(); cb.wait()
    assert (out.numpy(np.uint32) == np.arange(64) * 7).all()
    print("compiled" if lib.compiled else "cached")
"""


def test_second_process_reuses_the_cache_and_a_truncated_entry_is_rebuilt(tmp_path):
    code = COMPILE.format(src=PROBE.format(tag=7))
    assert run_in_subprocess(code, tmp_path) == "compiled"
    assert run_in_subprocess(code, tmp_path) == "cached"
    entries = [p for p in (tmp_path / "cpu").glob("kernels-*.so")]
    assert len(entries) == 1
    data = entries[0].read_bytes()
    entries[0].write_bytes(data[: len(data) // 3])  # truncated, as after a crash or a full disk
    assert run_in_subprocess(code, tmp_path) == "compiled"
    assert run_in_subprocess(code, tmp_path) == "cached"


def test_concurrent_processes_compile_the_same_entry_safely(tmp_path):
    code = COMPILE.format(src=PROBE.format(tag=7))
    env = dict(os.environ, MLMETAL_CACHE_DIR=str(tmp_path), MLMETAL_DEVICE="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    assert not list((tmp_path / "cpu").glob(".build-*")), "no temporary files left behind"


def test_cache_directory_is_private_and_refused_when_others_can_write(tmp_path, monkeypatch):
    monkeypatch.setenv("MLMETAL_CACHE_DIR", str(tmp_path / "c"))
    root = cache.cache_dir()
    assert root.stat().st_mode & 0o077 == 0
    root.chmod(0o777)
    with pytest.raises(cache.CacheError, match="writable by others"):
        cache.cache_dir()


def test_missing_compiler_says_what_to_install(tmp_path):
    code = """
        import mlmetal as mm
        try:
            mm.device("cpu")
        except mm.BackendUnavailable as e:
            print(e)
    """
    out = run_in_subprocess(code, tmp_path, {"PATH": str(tmp_path), "CXX": ""})
    assert "C++17 compiler" in out and "apt-get install g++" in out


def test_cache_key_covers_cpu_features():
    assert cpu.cpu_features()  # non-empty: -march=native code must not move to another CPU
    assert cache.key("a", "b") != cache.key("ab", "")


def test_pool_uses_every_core(cpu_dev):
    assert cpu_dev.threads == (int(os.environ.get("MLMETAL_CPU_THREADS", "0") or 0) or os.cpu_count())


DEEP_BARRIERS = """
#include <metal_stdlib>
using namespace metal;
struct P { uint rounds; };
// Each round every thread adds its left neighbour's previous value: only correct if every
// barrier really waits for the whole threadgroup.
kernel void ring(device uint* out [[buffer(0)]], constant P& p [[buffer(1)]],
                 uint lid [[thread_index_in_threadgroup]], uint n [[threads_per_threadgroup]],
                 uint g [[threadgroup_position_in_grid]]) {
    threadgroup uint v[1024];
    v[lid] = lid + g;
    for (uint r = 0; r < p.rounds; ++r) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        uint left = v[(lid + n - 1) % n];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        v[lid] += left;
    }
    out[g * n + lid] = v[lid];
}
"""


@pytest.mark.parametrize("threads, rounds, groups", [(32, 1, 1), (96, 7, 3), (1024, 5, 4)])
def test_fibers_honour_every_barrier(cpu_dev, threads, rounds, groups):
    k = cpu_dev.library(source=DEEP_BARRIERS).kernel("ring")
    out = cpu_dev.buffer(nbytes=4 * threads * groups)
    cb = cpu_dev.command_buffer()
    cb.dispatch(k, groups=groups, threads=threads, args=[out, {"rounds": rounds}])
    cb.commit()
    cb.wait()
    for g in range(groups):
        v = (np.arange(threads) + g).astype(np.uint32)
        for _ in range(rounds):
            v = v + np.roll(v, 1)
        np.testing.assert_array_equal(out.numpy(np.uint32)[g * threads:(g + 1) * threads], v)
