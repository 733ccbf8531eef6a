"""The cpu backend: the very MSL kernels, compiled as C++ and run on a thread pool.

Not a numpy fallback: a test that passes here ran the shader. Threadgroups are spread
over all cores; the threads of a group run as a plain loop, or as fibers switching at
barriers and simd functions when the kernel uses them (see include/mlm_cpu_runtime.cpp).
Execution is asynchronous: committed command buffers go to one in-order worker thread.

The runtime and the kernel libraries are loaded privately (RTLD_LOCAL) and each is linked to
export only the names cpu.py looks up: C++ compiled here must neither bind to nor be bound by
another library of the process (a std:: template instantiation the runtime exported, weakly,
would stand in for the same one in CuPy's or PyTorch's code). Kernels reach the runtime's
barrier and simd exchange through a table of hooks it fills in (include/mlm_cpu_abi.h).
"""

from __future__ import annotations

import ctypes
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import cache
from . import device as D
from . import source as S

INCLUDE = Path(__file__).resolve().parent / "include"
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fsigned-char",
         "-march=native", "-w"]


class CompilerNotFound(RuntimeError):
    """No C++ compiler for the cpu backend."""


class CompileError(S.KernelSourceError):
    """The C++ compiler rejected a kernel; messages point at the .metal file and line."""


@lru_cache(maxsize=None)
def compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler: $CXX, else c++, g++ or clang++ on PATH."""
    for cand in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if cand and shutil.which(cand):
            path = shutil.which(cand)
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            return path, (out.splitlines() or ["?"])[0]
    raise CompilerNotFound(
        "the cpu backend compiles kernels with a C++17 compiler and none was found: install one "
        "(Debian/Ubuntu: `apt-get install g++`; Fedora: `dnf install gcc-c++`; macOS: `xcode-select --install`) "
        "or point CXX at it")


@lru_cache(maxsize=None)
def cpu_features() -> str:
    """What -march=native builds for: the cache key must change when the code moves to another CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = re.search(r"^(flags|Features)\s*:(.*)$", text, re.M)
        model = re.search(r"^model name\s*:(.*)$", text, re.M)
        return f"{platform.machine()}|{model.group(1).strip() if model else ''}|{flags.group(2).strip() if flags else ''}"
    except OSError:
        return f"{platform.machine()}|{platform.processor()}|{platform.platform()}"


def _headers_digest() -> str:
    return cache.key(*(p.name + p.read_text() for p in sorted(INCLUDE.iterdir()) if p.is_file()))


def _export_list(names: list[str], path: Path) -> list[str]:
    """Write the linker's list of the only symbols to export; return the flags that apply it
    (-Xlinker, not -Wl, which would split a path at its commas)."""
    if sys.platform == "darwin":
        path.write_text("".join(f"_{n}\n" for n in names))
        return ["-Xlinker", "-exported_symbols_list", "-Xlinker", str(path)]
    path.write_text("{ global: " + "".join(f"{n}; " for n in names) + "local: *; };\n")
    return ["-Xlinker", f"--version-script={path}"]


def _compile(text: str, out: Path, source_name: str, exports: list[str], extra: tuple[str, ...] = ()) -> None:
    cxx, _ = compiler()
    src_file, list_file = out.with_suffix(".cpp"), out.with_suffix(".exports")
    src_file.write_text(text)
    try:
        proc = subprocess.run([cxx, *FLAGS, "-I", str(INCLUDE), str(src_file), "-o", str(out),
                               *_export_list(exports, list_file), *extra], capture_output=True, text=True)
    finally:
        src_file.unlink(missing_ok=True)
        list_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise CompileError(_compiler_messages(proc.stderr, source_name))


def _compiler_messages(stderr: str, source_name: str) -> list[str]:
    """The compiler's errors, each starting `file:line:`, with context lines kept after them."""
    lines = [l for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if re.search(r":\d+:(\d+:)? (fatal )?error", l)]
    return errors or lines[-20:] or [f"{source_name}: the C++ compiler failed without a message"]


def build(text: str, source_name: str, exports: list[str], what: str = "kernels") -> tuple[Path, bool]:
    """Compile (or find in the cache) a shared library from C++ text that exports `exports` alone."""
    cxx, version = compiler()
    k = cache.key(text, _headers_digest(), cxx, version, " ".join(FLAGS), cpu_features(), " ".join(exports))
    return cache.lookup(f"{what}-{k}.so", lambda tmp: _compile(text, tmp, source_name, exports), subdir="cpu")


def kernel_exports(src: S.Source, unit: str | None = None) -> list[str]:
    """What a kernel library (or its storage unit `unit`) exports: each kernel's two entries and the hook table."""
    return ["mlm_hooks"] + [f"{k}__mlm_{kind}" for k in src.kernels if unit is None or S.storage_unit(k) == unit
                            for kind in ("group", "thread")]


RUNTIME_EXPORTS = ["mlm_run", "mlm_set_threads", "mlm_threads", "mlm_cpu_link"]


# ---------------------------------------------------------------- the executor

class Launch(ctypes.Structure):
    """struct mlm_launch (include/mlm_launch.h)."""

    _fields_ = [(f.name, ctypes.c_uint * f.count if f.count > 1 else ctypes.c_uint) for f in S.launch_struct().fields]


GROUP_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(Launch), ctypes.c_uint, ctypes.c_uint, ctypes.c_uint)


_runtime_lock = threading.Lock()


def runtime() -> ctypes.CDLL:
    """The executor library (thread pool, fibers), built and loaded once per process."""
    with _runtime_lock:
        return _load_runtime()


@lru_cache(maxsize=None)
def _load_runtime() -> ctypes.CDLL:
    text = (INCLUDE / "mlm_cpu_runtime.cpp").read_text()
    path, _ = build(text, "mlm_cpu_runtime.cpp", RUNTIME_EXPORTS, what="runtime")
    lib = ctypes.CDLL(str(path))  # RTLD_LOCAL: see the module's docstring
    lib.mlm_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(Launch)]
    lib.mlm_run.restype = ctypes.c_int
    lib.mlm_set_threads.argtypes = [ctypes.c_uint]
    lib.mlm_threads.restype = ctypes.c_uint
    lib.mlm_cpu_link.argtypes = [ctypes.c_void_p]
    threads = int(os.environ.get("MLMETAL_CPU_THREADS", "0") or 0)
    lib.mlm_set_threads(threads)
    return lib


class CpuBuffer(D.HostBuffer):
    def __init__(self, device: "CpuDevice", nbytes: int):
        self.device = device
        self.nbytes = nbytes
        # 64-byte alignment: a float4 load is aligned, and no two buffers share a cache line.
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        start = (-raw.ctypes.data) % 64
        self._mem = raw[start:start + nbytes]
        self.ptr = self._mem.ctypes.data


class CpuKernel(D.Kernel):
    def __init__(self, library: "CpuLibrary", sig: S.Kernel):
        super().__init__(library, sig)
        so = library.unit(S.storage_unit(sig.name))
        self.group = ctypes.cast(getattr(so, f"{sig.name}__mlm_group"), ctypes.c_void_p).value
        self.thread = ctypes.cast(getattr(so, f"{sig.name}__mlm_thread"), ctypes.c_void_p).value
        self.fibers = sig.uses_sync


class CpuLibrary(D.Library):
    """One shared library per storage unit of the source (S.storage_unit): the float32 unit is
    built with the library, so its errors are the library's; the float16 and bfloat16 instances
    on first use."""

    def __init__(self, device: "CpuDevice", src: S.Source):
        super().__init__(device, src)
        self._units: dict[str, ctypes.CDLL] = {}
        self.compiled = False  # whether building the float32 unit compiled it (else it came from the cache)
        self.so = self.unit("")

    def unit(self, unit: str) -> ctypes.CDLL:
        """The loaded shared library of storage unit `unit`, built once."""
        with self._lock:
            if unit not in self._units:
                cpp = S.generate(self.source, "cpu", check_bounds=self.device.check_bounds, unit=unit)
                if unit == "":
                    self.cpp = cpp  # the float32 unit's translation, as the compiler saw it
                path, compiled = build(cpp, self.source.name, kernel_exports(self.source, unit),
                                       what="kernels-checked" if self.device.check_bounds else "kernels")
                self.compiled = self.compiled or (compiled and unit == "")
                so = ctypes.CDLL(str(path))
                runtime().mlm_cpu_link(ctypes.addressof(ctypes.c_void_p.in_dll(so, "mlm_hooks")))
                self._units[unit] = so
            return self._units[unit]

    def _make_kernel(self, sig: S.Kernel) -> D.Kernel:
        return CpuKernel(self, sig)


class BoundsError(ctypes.Structure):
    """struct mlm_bounds_error of include/mlm_cpu_check.h: the first out-of-bounds access of a dispatch."""

    _fields_ = [("set", ctypes.c_int), ("buffer", ctypes.c_int), ("message", ctypes.c_char * 1016)]


class _Batch:
    def __init__(self, work: list[D.Dispatch | D.HostStep]):
        self.work = work
        self.done = threading.Event()
        self.error: BaseException | None = None


class CpuDevice(D.Device):
    """The cpu backend. Example: `dev = mm.device("cpu")`.

    With `check_bounds` its kernels are compiled with pointers that know their buffer's (or
    threadgroup array's) extent, and an access outside it fails the dispatch with an
    ExecutionError naming kernel, .metal file and line, buffer and index (MLMETAL_CHECK_BOUNDS=1).
    """

    name = "cpu"

    @staticmethod
    def unavailable() -> str | None:
        try:
            compiler()
        except CompilerNotFound as e:
            return str(e)
        return None

    def __init__(self, check_bounds: bool = False):
        super().__init__()
        self._rt = runtime()  # here, not in the worker: a failure to build it is this call's error
        self.check_bounds = check_bounds
        self._bounds = BoundsError()  # one dispatch runs at a time, on the queue's worker
        self._queue: queue.Queue[_Batch] = queue.Queue()
        self._last: _Batch | None = None  # the batch queued last, which synchronize waits for
        self._submit_lock = threading.Lock()  # keeps `_last` the last in the queue whatever the threads
        self._worker = threading.Thread(target=self._loop, name="mlmetal-cpu-queue", daemon=True)
        self._worker.start()

    @property
    def threads(self) -> int:
        """OS threads that run threadgroups (MLMETAL_CPU_THREADS, default one per core)."""
        return runtime().mlm_threads()

    def _make_library(self, src: S.Source) -> D.Library:
        return CpuLibrary(self, src)

    def _alloc(self, nbytes: int) -> D.Buffer:
        return CpuBuffer(self, nbytes)

    def _submit(self, work: list[D.Dispatch | D.HostStep]) -> _Batch:
        batch = _Batch(work)
        with self._submit_lock:
            self._last = batch
            self._queue.put(batch)
        return batch

    def _wait(self, batch: _Batch) -> None:
        batch.done.wait()
        if batch.error is not None:
            raise D.ExecutionError(str(batch.error)) from batch.error

    def _done(self, batch: _Batch) -> bool:
        return batch.done.is_set()

    def synchronize(self) -> None:
        last = self._last
        if last is not None:
            self._wait(last)

    def _loop(self):
        rt = self._rt
        polls: list = []  # what host steps returned, called between the dispatches after them until true
        while True:
            batch = self._queue.get()
            try:
                for d in batch.work:
                    if polls:
                        polls[:] = [poll for poll in polls if not poll()]
                    if d.__class__ is D.HostStep:
                        poll = d.fn()
                        if poll is not None:
                            polls.append(poll)
                    else:
                        self._run(rt, d)
            except BaseException as e:  # reported to whoever waits on this batch
                batch.error = e
                polls.clear()  # what the failed work started is not finished after it
            finally:
                batch.done.set()

    def _run(self, rt: ctypes.CDLL, d: D.Dispatch) -> None:
        p = d.predicate
        if p is not None and ctypes.c_uint32.from_address(p.buffer.ptr + p.offset).value == 0:
            # Read as the dispatch comes up in queue order, after the work before it: the cpu
            # wrappers leave the predicate to this check (a kernel runs once it is launched).
            return
        keep = []  # packed constants must outlive the call
        n = len(d.args)
        ptrs = (ctypes.c_void_p * max(1, n + 2 * self.check_bounds))()
        for i, a in enumerate(d.args):
            if isinstance(a, bytes):
                arr = np.frombuffer(a + b"\0" * 16, dtype=np.uint8).copy()
                keep.append(arr)
                ptrs[i] = arr.ctypes.data
            else:
                ptrs[i] = a.ptr
        if self.check_bounds:  # the checked wrapper takes the extents and the error record after the buffers
            extents = (ctypes.c_ulonglong * max(1, n))(*self._extents(d))
            keep.append(extents)
            ptrs[n], ptrs[n + 1] = ctypes.addressof(extents), ctypes.addressof(self._bounds)
            self._bounds.set = 0
        launch = Launch(groups=(ctypes.c_uint * 3)(*d.groups), threads=(ctypes.c_uint * 3)(*d.threads))
        k: CpuKernel = d.kernel  # type: ignore[assignment]
        if rt.mlm_run(k.group, k.thread, int(k.fibers), ptrs, ctypes.byref(launch)):
            raise D.ExecutionError(f"kernel {k.name}: could not map fiber stacks for {np.prod(d.threads)} threads")
        if self.check_bounds and self._bounds.set:
            raise D.ExecutionError(self._bounds_message(d))

    @staticmethod
    def _declared(d: D.Dispatch) -> dict[int, tuple[S.Param, int]]:
        """buffer index -> (parameter, bytes) of each extent the kernel declares, at this dispatch's constants."""
        sig = d.kernel.sig
        values = {p.name: sig.unpack(p, a) for p, a in zip(d.kernel.params, d.args) if isinstance(a, bytes)}
        return {p.index: (p, nbytes) for p, _, nbytes in sig.extent_bytes(values)}

    def _extents(self, d: D.Dispatch) -> list[int]:
        """Each argument's extent in bytes: its size, or less where the kernel declares less."""
        declared = self._declared(d)
        return [min(len(a) if isinstance(a, bytes) else a.nbytes, declared.get(i, (None, 1 << 62))[1])
                for i, a in enumerate(d.args)]

    def _bounds_message(self, d: D.Dispatch) -> str:
        message = self._bounds.message.decode(errors="replace")
        p, nbytes = self._declared(d).get(self._bounds.buffer, (None, 0))
        a = d.args[self._bounds.buffer] if 0 <= self._bounds.buffer < len(d.args) else None
        if p is not None and isinstance(a, D.Buffer) and nbytes < a.nbytes:
            message += f"; that is its declared extent `{p.extent}` ({p.extent_loc}), the buffer holds {a.nbytes} bytes"
        return message
