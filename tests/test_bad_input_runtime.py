"""Issue 20's red-team rows that land in the runtime: one or more tests per row, named after it.

Row 1 mixes backends in one process; row 2 runs the runtime from several threads; rows 3 and 13
attack and misconfigure the compile cache; rows 8 and 14 feed dispatches and buffers bad values.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.runtime import cache, cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cpu_dev():
    why = mm.available("cpu")
    if why:
        pytest.skip(f"backend cpu unavailable: {why}")
    return mm.device("cpu")


def python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **env), timeout=600)


# ---------------------------------------------------------------- row 1: cpu, then cuda, in one process

CPU_THEN_CUDA = """
    import sys
    import numpy as np, mlmetal as mm
    x = np.linspace(-2, 2, 1000, dtype=np.float32)
    cpu = mm.device("cpu")  # loads the cpu runtime
    if sys.argv[1] == "op":
        first = mm.ops.relu(mm.tensor(x, cpu)).numpy()  # and a kernel library
    gpu = mm.device("cuda")  # imports CuPy after them
    on_gpu = mm.ops.relu(mm.tensor(x, gpu)).numpy()
    on_cpu = mm.ops.relu(mm.tensor(x, cpu)).numpy()
    assert (on_cpu == np.maximum(x, 0)).all() and (on_gpu == on_cpu).all()
    print("ok")
"""


@pytest.mark.parametrize("cpu_first", ["op", "nothing"])
def test_row1_cpu_then_cuda_in_one_process(cpu_first):
    why = mm.available("cuda")
    if why:
        pytest.skip(f"backend cuda unavailable: {why}")
    proc = python(CPU_THEN_CUDA, cpu_first)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", f"exit {proc.returncode}\n{proc.stderr}"


TWO_KERNELS = """
#include <metal_stdlib>
using namespace metal;
kernel void exported_a(device uint* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = i; }
kernel void exported_b(device uint* out [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) {
    threadgroup uint t[32];
    t[i % 32] = i;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[i] = t[(i + 1) % 32];
}
"""


def exported(path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="reads ELF with nm")
def test_row1_cpu_libraries_export_only_their_entry_points(cpu_dev):
    lib = cpu_dev.library(source=TWO_KERNELS)
    assert exported(lib.so._name) == {"mlm_hooks", "exported_a__mlm_group", "exported_a__mlm_thread",
                                      "exported_b__mlm_group", "exported_b__mlm_thread"}
    assert exported(cpu.runtime()._name) == {"mlm_run", "mlm_set_threads", "mlm_threads", "mlm_cpu_link"}
    # The barrier reaches the runtime through the hook table: the kernel still runs.
    out = cpu_dev.buffer(nbytes=4 * 32)
    cb = cpu_dev.command_buffer()
    cb.dispatch(lib.kernel("exported_b"), groups=1, threads=32, args=[out])
    cb.commit(); cb.wait()
    assert (out.numpy(np.uint32) == (np.arange(32) + 1) % 32).all()


# A C++ library of someone else's, loaded after mlmetal: where does the std:: template code it
# instantiates itself resolve? To its own copy, unless a library loaded globally before it
# exports the same instantiation (the cpu runtime exported std::unique_lock<std::mutex>::unlock).
VICTIM = r"""
#include <dlfcn.h>
#include <cstring>
#include <mutex>
extern "C" const char* unlock_lives_in() {
    void (std::unique_lock<std::mutex>::*f)() = &std::unique_lock<std::mutex>::unlock;
    void* p;
    std::memcpy(&p, &f, sizeof p);
    Dl_info info;
    return dladdr(p, &info) ? info.dli_fname : "?";
}
"""

LEAKS = """
    import ctypes, sys
    import numpy as np, mlmetal as mm
    mm.ops.relu(mm.tensor(np.ones(4, np.float32), mm.device("cpu"))).numpy()  # runtime and a kernel library loaded
    everyone = ctypes.CDLL(None)  # the process's global scope, where every later library looks first
    print([n for n in ("mlm_run", "mlm_cpu_link", "mlm_hooks", "relu__mlm_group") if hasattr(everyone, n)])
    victim = ctypes.CDLL(sys.argv[1])
    victim.unlock_lives_in.restype = ctypes.c_char_p
    print(victim.unlock_lives_in().decode())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dladdr and ELF interposition")
def test_row1_cpu_runtime_binds_no_other_library_to_its_code(cpu_dev, tmp_path):
    (tmp_path / "victim.cpp").write_text(VICTIM)
    cxx, _ = cpu.compiler()
    subprocess.run([cxx, "-shared", "-fPIC", "-O1", "victim.cpp", "-o", "victim.so"], cwd=tmp_path, check=True)
    proc = python(LEAKS, str(tmp_path / "victim.so"))
    assert proc.returncode == 0, proc.stderr
    leaked, unlock = proc.stdout.split("\n")[:2]
    assert leaked == "[]", f"visible to every library loaded later: {leaked}"
    assert unlock == str(tmp_path / "victim.so"), f"the victim's own std:: code resolved to {unlock}"
