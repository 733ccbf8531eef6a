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


# ---------------------------------------------------------------- row 2: threads

THREADED = """
#include <metal_stdlib>
using namespace metal;
struct Mix { uint n; float a; };
// A barrier and simd functions: the fibers of one threadgroup, from whichever thread commits.
kernel void mix(device const float* x [[buffer(0)]], device float* y [[buffer(1)]], constant Mix& p [[buffer(2)]],
                uint i [[thread_position_in_grid]], uint lid [[thread_index_in_threadgroup]]) {
    threadgroup float t[64];
    float v = i < p.n ? x[i] : 0.0f;
    t[lid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float s = simd_sum(v) + t[lid ^ 1];
    if (i < p.n) y[i] = p.a * s + y[i];
}
"""


def test_row2_threads_sharing_a_device_get_the_serial_results(dev):
    """Four threads, each encoding its own command buffers and eager ops on one device many
    times, give bit for bit what the same work gives run one job after another."""
    ew = dev.library("elementwise")
    n, jobs, rounds = 1000, 4, 12
    rng = np.random.default_rng(20)
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(jobs * rounds)]
    # Every buffer is made here, so that a thread's first act on the device is a dispatch.
    inputs = [dev.buffer(x) for x in xs]
    outputs = {run: [dev.buffer(np.full(n, j, np.float32)) for j in range(jobs * rounds)] for run in ("serial", "threads")}

    def job(j: int, lib, y) -> tuple[np.ndarray, np.ndarray]:
        x = inputs[j]
        cb = dev.command_buffer()
        cb.dispatch(ew.kernel("axpy"), groups=4, threads=256, args=[x, y, {"n": n, "a": 0.5 + j}])
        cb.commit_and_continue()
        cb.dispatch(lib.kernel("mix"), groups=(n + 63) // 64, threads=64, args=[x, y, {"n": n, "a": -0.25}])
        cb.commit()
        eager = mm.ops.relu(mm.ops.scale(mm.Tensor(y, (n,)), s=float(j + 1)))  # waits on the device itself
        result = eager.numpy()
        cb.wait()
        return y.numpy(np.float32), result

    lib = dev.library(source=THREADED)
    serial = [job(j, lib, outputs["serial"][j]) for j in range(jobs * rounds)]

    libraries, results, errors = {}, {}, []
    threaded_src = THREADED.replace("Mix", "Mix2")  # a library no thread has: every thread asks at once

    def worker(t: int):
        try:
            libraries[t] = dev.library(source=threaded_src)
            for j in range(t * rounds, (t + 1) * rounds):
                results[j] = job(j, libraries[t], outputs["threads"][j])
        except BaseException as e:  # reported below with the thread's number
            errors.append((t, e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(jobs)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads far more often than the default 5 ms
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    assert len({id(lib) for lib in libraries.values()}) == 1, "one library, compiled once, for every thread"
    for j, (y, eager) in enumerate(serial):
        got_y, got_eager = results[j]
        np.testing.assert_array_equal(got_y, y, err_msg=f"job {j}: command buffer result")
        np.testing.assert_array_equal(got_eager, eager, err_msg=f"job {j}: eager op result")


def test_row2_synchronize_waits_for_commits_of_every_thread(cpu_dev):
    """A thread preempted in the middle of a commit must not make `synchronize` (which every
    `Tensor.numpy()` calls) return while its work is still queued: the cpu queue's order is forced
    here, where the threads' timing would hit it only now and then."""
    dev = type(cpu_dev)()  # a device of its own, whose queue is slowed
    put, preempted = dev._queue.put, threading.Event()

    def put_late_once(batch):
        if not preempted.is_set():
            preempted.set()
            time.sleep(0.05)  # the first commit stalls between taking its place and joining the queue
        put(batch)

    dev._queue.put = put_late_once
    k = dev.library("elementwise").kernel("axpy")
    n = 1 << 20
    x, y = dev.buffer(np.ones(n, np.float32)), dev.buffer(np.zeros(n, np.float32))
    heavy = dev.command_buffer()
    for _ in range(20):
        heavy.dispatch(k, groups=n // 256, threads=256, args=[x, y, {"n": n, "a": 1.0}])
    other = threading.Thread(target=heavy.commit)
    other.start()
    preempted.wait()
    light = dev.command_buffer()
    light.dispatch(k, groups=1, threads=32, args=[x, x, {"n": 1, "a": 0.0}])
    light.commit()
    other.join()
    dev.synchronize()
    assert heavy.completed, "synchronize returned with a commit still queued"
    assert (y.numpy(np.float32) == 20).all()


# ---------------------------------------------------------------- rows 3 and 13: the compile cache

@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MLMETAL_CACHE_DIR", str(root))
    return root


def write(text: str):
    return lambda tmp: tmp.write_text(text)


def test_row3_world_writable_subdirectory_is_refused(cache_root):
    cache.lookup("entry.so", write("genuine"), subdir="cpu")
    (cache_root / "cpu").chmod(0o777)
    with pytest.raises(cache.CacheError, match=f"{cache_root / 'cpu'} is writable by others.*chmod go-w"):
        cache.lookup("entry.so", write("genuine"), subdir="cpu")


def test_row3_symlinked_subdirectory_is_refused(cache_root, tmp_path):
    cache.cache_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (cache_root / "cpu").symlink_to(elsewhere)
    with pytest.raises(cache.CacheError, match=f"{cache_root / 'cpu'} is a symbolic link"):
        cache.lookup("entry.so", write("genuine"), subdir="cpu")
    assert not list(elsewhere.iterdir()), "nothing written through the link"


def test_row3_symlinked_entry_is_rebuilt_not_followed(cache_root, tmp_path):
    path, built = cache.lookup("entry.so", write("genuine"), subdir="cpu")
    moved = tmp_path / "moved.so"
    shutil.move(path, moved)
    path.symlink_to(moved)  # the same bytes, so its MAC would check if the link were followed
    path, built = cache.lookup("entry.so", write("rebuilt"), subdir="cpu")
    assert built and not path.is_symlink() and path.read_text() == "rebuilt"


PLANTED = """
#include <metal_stdlib>
using namespace metal;
kernel void probe_7(device uint* out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = 666u; }
"""

GENUINE = PLANTED.replace("666u", "i * 7u")

RUN_PROBE = """
    import numpy as np, mlmetal as mm
    dev = mm.device("cpu")
    lib = dev.library(source={src!r})
    out = dev.buffer(nbytes=4 * 64)
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel("probe_7"), groups=2, threads=32, args=[out])
    cb.commit(); cb.wait()
    print("compiled" if lib.compiled else "cached", out.numpy(np.uint32)[:3].tolist())
"""


def test_row3_planted_library_with_a_matching_digest_is_not_loaded(tmp_path):
    """Someone who could write into the cache once (while a directory was open, say) plants a
    library and its SHA-256 under the name of an entry: the next run rebuilds it."""
    victim, other = tmp_path / "victim", tmp_path / "attacker"
    run = lambda where: python(RUN_PROBE.format(src=GENUINE), MLMETAL_CACHE_DIR=str(where), MLMETAL_DEVICE="cpu")
    first = run(victim)
    assert first.returncode == 0 and first.stdout.split()[0] == "compiled", first.stderr
    assert python(RUN_PROBE.format(src=PLANTED), MLMETAL_CACHE_DIR=str(other), MLMETAL_DEVICE="cpu").returncode == 0
    [entry] = (victim / "cpu").glob("kernels-*.so")
    [planted] = (other / "cpu").glob("kernels-*.so")
    shutil.copyfile(planted, entry)
    digest = hashlib.sha256(entry.read_bytes()).hexdigest()
    for suffix in (".sha256", ".mac"):
        entry.with_name(entry.name + suffix).write_text(digest)
    again = run(victim)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().split(maxsplit=1) == ["compiled", "[0, 7, 14]"], "the planted library ran"


def test_row13_cache_dir_that_is_a_file(cache_root, cpu_dev, monkeypatch):
    cache_root.write_text("not a directory")
    with pytest.raises(cache.CacheError, match=f"compile cache {cache_root} is not a directory.*MLMETAL_CACHE_DIR"):
        cpu_dev.library(source=GENUINE.replace("probe_7", "probe_13"))
    monkeypatch.setenv("MLMETAL_CACHE_DIR", str(cache_root / "sub"))
    with pytest.raises(cache.CacheError, match=f"compile cache {cache_root / 'sub'}: Not a directory; set MLMETAL"):
        cache.cache_dir()


def test_row13_one_clear_error_from_a_fresh_process(tmp_path):
    (tmp_path / "file").write_text("")
    proc = python("import mlmetal as mm; mm.device('cpu')", MLMETAL_CACHE_DIR=str(tmp_path / "file"))
    assert proc.returncode == 1
    assert proc.stderr.count("Traceback") == 1, proc.stderr  # no second one from a worker thread
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mlmetal.runtime.cache.CacheError: compile cache {tmp_path / 'file'} is not a directory; "
        "set MLMETAL_CACHE_DIR to a directory of yours")


def test_row13_unreadable_cache_dir(cache_root):
    cache.cache_dir().chmod(0o000)
    try:
        with pytest.raises(cache.CacheError, match=f"{cache_root} is not readable and writable by you.*chmod u\\+rwx"):
            cache.lookup("entry.so", write("x"), subdir="cpu")
    finally:
        cache_root.chmod(0o700)


# ---------------------------------------------------------------- row 8: floats past float32's range

def test_row8_struct_field_beyond_float32_is_refused_at_dispatch(dev):
    k = dev.library("elementwise").kernel("axpy")
    x, y = dev.buffer(np.ones(32, np.float32)), dev.buffer(np.ones(32, np.float32))
    cb = dev.command_buffer()
    for big in (1e40, -1e40, np.float64(3.5e38)):
        with pytest.raises(mm.DispatchError, match=r"kernel axpy .*field AxpyParams\.a \(float\): "
                                                   r".*e\+?\d+.* is beyond float32's range"):
            cb.dispatch(k, groups=1, threads=32, args=[x, y, {"n": 32, "a": big}])
    assert not cb._encoded
    # NaN and infinities are float32 values: they pass, and reach the kernel.
    for special in (float("inf"), float("nan")):
        cb.dispatch(k, groups=1, threads=32, args=[x, y, {"n": 32, "a": special}])
    cb.commit(); cb.wait()
    assert np.isnan(y.numpy(np.float32)).all()  # 1 + inf·1, then + nan


# ---------------------------------------------------------------- row 14: shapes, buffers, devices

@pytest.mark.parametrize("groups", [(1.5, 1, 1), "abc", (2.0,), (True, 1, 1), None, (1, 1, 1, 1)])
def test_row14_groups_must_be_integers(dev, groups):
    k = dev.library("elementwise").kernel("axpy")
    x = dev.buffer(np.ones(32, np.float32))
    cb = dev.command_buffer()
    with pytest.raises(mm.DispatchError, match="kernel axpy .*groups must be 1 to 3 positive integers, got "
                                               + re.escape(repr(groups))):
        cb.dispatch(k, groups=groups, threads=32, args=[x, x, {"n": 32, "a": 1.0}])
    cb.dispatch(k, groups=np.array([1, 1, 1]), threads=(np.int64(32),), args=[x, x, {"n": 32, "a": 1.0}])


def test_row14_buffers_take_numbers(dev):
    with pytest.raises(TypeError, match="nbytes must be an integer, got 2.5"):
        dev.buffer(nbytes=2.5)
    with pytest.raises(TypeError, match="nbytes must be an integer, got True"):
        dev.buffer(nbytes=True)
    for text in ("hi", b"hi", ["a", "b"]):
        with pytest.raises(TypeError, match="cannot make a buffer from .* data .*give numbers"):
            dev.buffer(text)
    assert dev.buffer(nbytes=np.int64(8)).nbytes == 8


def test_row14_two_cpu_devices_are_told_apart(cpu_dev):
    other = type(cpu_dev)()
    assert mm.device("cpu") is cpu_dev and other.label != cpu_dev.label
    k = cpu_dev.library("elementwise").kernel("axpy")
    theirs = other.buffer(np.ones(32, np.float32))
    cb = cpu_dev.command_buffer()
    with pytest.raises(mm.DispatchError, match=rf"buffer lives on {other.label}, the kernel on {cpu_dev.label} "
                                               r"\(two cpu devices"):
        cb.dispatch(k, groups=1, threads=32, args=[theirs, theirs, {"n": 32, "a": 1.0}])
    assert repr(other) == f"<mlmetal device {other.label}>"
