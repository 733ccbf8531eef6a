"""The cuda backend: the MSL kernels on NVIDIA GPUs.

The generated CUDA translation unit (`source.generate(src, "cuda")`, with include/mlm_cuda.h for
barriers and warp-shuffle simd functions) is compiled by NVRTC to a cubin for the device's
architecture and cached; CuPy's driver bindings load and launch it, and CuPy owns the memory.
NVRTC is called here through ctypes rather than through CuPy so that CI, which has NVRTC but
no GPU and no CuPy, compiles every kernel with exactly the options the backend uses.

Command buffers go to one CUDA stream in commit order; each commit records an event, which
`wait` and `completed` ask. The packed constants of one commit travel together: one pinned
host block, one asynchronous copy, kept alive until the commit's event has completed.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import re
import shutil
import struct
import sys
import threading
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import cache
from . import device as D
from . import source as S

INCLUDE = Path(__file__).resolve().parent / "include"
# -default-device: helper functions in MSL carry no __device__; --fmad=false: a*b+c stays two
# roundings, as on the cpu backend (-ffp-contract=off), so elementwise kernels agree bit for bit.
OPTIONS = ("-std=c++17", "-default-device", "--fmad=false", f"-I{INCLUDE}")
REGISTERS_PER_BLOCK = 65536  # every NVIDIA GPU since Kepler: 64 registers per thread at 1024 threads


class CompileError(S.KernelSourceError):
    """NVRTC rejected a kernel; messages point at the .metal file and line."""


class NvrtcNotFound(RuntimeError):
    """No NVRTC library could be loaded."""


# ---------------------------------------------------------------- NVRTC

def _nvrtc_candidates() -> list[str]:
    """libnvrtc paths to try: the pip wheels' (nvidia-cuda-nvrtc), then CUDA toolkits', then the loader's."""
    found = []
    for root in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            found += sorted(str(p) for p in Path(root or ".", sub).glob("libnvrtc.so*"))
    toolkits = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        toolkits.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for tk in filter(None, toolkits):
        found += sorted(str(p) for p in Path(tk, "lib64").glob("libnvrtc.so*"))
    return found + ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]


@lru_cache(maxsize=None)
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library, loaded once."""
    tried = []
    for path in _nvrtc_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path}: {e}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise NvrtcNotFound("NVRTC (libnvrtc.so) was not found: `pip install nvidia-cuda-nvrtc` or install the CUDA "
                        "toolkit (tried " + "; ".join(tried[:3]) + (" …" if len(tried) > 3 else "") + ")")


@lru_cache(maxsize=None)
def nvrtc_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return f"{major.value}.{minor.value}"


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: {nvrtc().nvrtcGetErrorString(status).decode()}")


def options(arch: str, max_registers: int = 0) -> list[str]:
    """Every NVRTC option for compute capability `arch` (e.g. '90'): OPTIONS, the target, and a
    register cap per thread where one is asked for (0: the compiler's choice)."""
    cap = [f"--maxrregcount={max_registers}"] if max_registers else []
    return [*OPTIONS, f"--gpu-architecture=sm_{arch}", *cap]


def compile_cubin(text: str, source_name: str, arch: str, max_registers: int = 0) -> bytes:
    """Compile a CUDA translation unit for sm_`arch`; raise CompileError with NVRTC's messages."""
    return _compile(text, source_name, options(arch, max_registers))[0]


def _compile(text: str, source_name: str, opts: list[str]) -> tuple[bytes, str]:
    """(cubin, NVRTC's log) of a CUDA translation unit compiled with `opts`; CompileError on failure."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), source_name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        raw = [o.encode() for o in opts]
        status = lib.nvrtcCompileProgram(prog, len(raw), (ctypes.c_char_p * len(raw))(*raw))
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        text_log = log.value.decode(errors="replace")
        if status != 0:
            raise CompileError(_compiler_messages(text_log, source_name))
        _check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin.raw, text_log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------- what a kernel takes of a multiprocessor

@dataclasses.dataclass(frozen=True)
class Resources:
    """What the compiler gave one kernel: registers a thread, bytes of stack and of spilled registers
    stored and loaded (local memory), and bytes of static threadgroup (shared) memory."""
    kernel: str
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    threadgroup_memory: int

    def threadgroups(self, threads: int, arch: str = "90") -> tuple[int, str]:
        """(threadgroups of `threads` threads one multiprocessor holds at once, what limits them) on
        sm_`arch` — CUDA's occupancy rules for the architectures of SM_LIMITS."""
        regs_sm, smem_sm, smem_reserved, max_threads, max_groups = SM_LIMITS[arch]
        warps = -(-threads // 32)
        regs_warp = -(-max(self.registers, 1) * 32 // 256) * 256  # a warp's registers, in units of 256
        limits = {"threads": max_threads // threads, "threadgroups": max_groups,
                  "registers": regs_sm // (regs_warp * warps),
                  "threadgroup memory": smem_sm // (self.threadgroup_memory + smem_reserved)}
        which = min(limits, key=lambda k: limits[k])
        return limits[which], which


# sm_XX: (registers, shared memory bytes, shared memory reserved a threadgroup, threads, threadgroups) of
# one multiprocessor (CUDA C Programming Guide, compute capabilities table).
SM_LIMITS = {"80": (65536, 167936, 1024, 2048, 32), "86": (65536, 102400, 1024, 1536, 16),
             "89": (65536, 102400, 1024, 1536, 24), "90": (65536, 233472, 1024, 2048, 32)}

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def resources(src: S.Source, arch: str = "90", max_registers: int = 0) -> list[Resources]:
    """What each kernel of `src` takes on sm_`arch`, as the backend compiles it (ptxas's report);
    `max_registers` as compile_cubin takes it."""
    _, log = _compile(S.generate(src, "cuda"), src.name, [*options(arch, max_registers), "--ptxas-options=--verbose"])
    found, name, frame = [], None, (0, 0, 0)
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            name, frame = m.group(1), (0, 0, 0)
        elif (m := _PTXAS_FRAME.search(line)) and name:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _PTXAS_USED.search(line)) and name:
            found.append(Resources(name, int(m.group(1)), *frame, int(m.group(2) or 0)))
            name = None
    return found


def _compiler_messages(log: str, source_name: str) -> list[str]:
    """NVRTC's `file(line): error: …` lines as `file:line: error: …` (all lines if none is an error)."""
    lines = [re.sub(r"^(.*?)\((\d+)\): ", r"\1:\2: ", l) for l in log.splitlines() if l.strip()]
    errors = [l for l in lines if re.search(r":\d+: (catastrophic )?error", l)]
    return errors or lines[-20:] or [f"{source_name}: NVRTC failed without a message"]


def _headers_digest() -> str:
    return cache.key(*(p.name + p.read_text() for p in sorted(INCLUDE.iterdir()) if p.is_file()))


def build(text: str, source_name: str, arch: str, max_registers: int = 0) -> Path:
    """The cached cubin of a CUDA translation unit, compiled on a miss."""
    k = cache.key(text, _headers_digest(), " ".join(options(arch, max_registers)), nvrtc_version())
    path, _ = cache.lookup(f"kernels-sm{arch}-{k}.cubin",
                           lambda tmp: tmp.write_bytes(compile_cubin(text, source_name, arch, max_registers)),
                           subdir="cuda")
    return path


# ---------------------------------------------------------------- buffers, libraries, kernels

def _cupy():
    import cupy  # imported on first use: CI and cpu-only machines import this module without it
    return cupy


class CudaBuffer(D.Buffer):
    def __init__(self, device: "CudaDevice", nbytes: int):
        self.device = device
        self.nbytes = nbytes
        # Allocated while the device's stream is current: CuPy's pool then reuses the memory only
        # for that stream, whose order keeps it safe from work still reading it.
        with device.stream:
            self._mem = _cupy().cuda.alloc(nbytes)
        self.ptr = self._mem.ptr

    def numpy(self, dtype=np.uint8) -> np.ndarray:
        """A host copy, taken after all work committed so far (on cuda this is a copy, not a view)."""
        dtype = np.dtype(dtype)
        if self.nbytes % dtype.itemsize:
            raise ValueError(f"{self.nbytes} bytes is not a whole number of {dtype} items")
        out = np.empty(self.nbytes // dtype.itemsize, dtype)
        rt = _cupy().cuda.runtime
        self.device._sync_call(lambda: rt.memcpyAsync(out.ctypes.data, self.ptr, self.nbytes,
                                                      rt.memcpyDeviceToHost, self.device.stream.ptr))
        return out

    def write(self, data, offset: int = 0) -> None:
        """Copy `data` in, after the work committed so far (stream order)."""
        raw = D._as_bytes(data)
        if offset < 0 or offset + raw.nbytes > self.nbytes:
            raise ValueError(f"writing {raw.nbytes} bytes at offset {offset} overruns a {self.nbytes}-byte buffer")
        rt = _cupy().cuda.runtime
        # From pageable memory the call returns once `raw` is staged, so `raw` may go right after.
        with self.device._submit_lock:
            rt.memcpyAsync(self.ptr + offset, raw.ctypes.data, raw.nbytes, rt.memcpyHostToDevice,
                           self.device.stream.ptr)


class CudaKernel(D.Kernel):
    """A kernel as the compiler built it, and, on demand, rebuilt to fit larger threadgroups.

    A kernel using more than 64 registers per thread cannot launch 1024 threads, which the contract
    allows. Metal compiles each pipeline for its threadgroup size; here a dispatch too large for
    the default build gets the library compiled again with registers capped to fit (spilling
    what does not fit), and the default build keeps serving the sizes it can.
    """

    def __init__(self, library: "CudaLibrary", sig: S.Kernel):
        super().__init__(library, sig)
        self._builds: dict[int, tuple[int, int]] = {}  # register cap -> (CUfunction, max threads)
        self.ptr, self.max_threads = self._build(0)
        # Per parameter: 0 for a pointer; for a `constant T&` (passed by value, see
        # source.by_value) the bytes of T, whose zeros stand in when a buffer is bound instead.
        self.value_sizes = [(st.nbytes if (st := sig.struct_of(p)) else 4) if S.by_value(p) else 0
                            for p in sig.buffers]

    def _build(self, max_registers: int) -> tuple[int, int]:
        with self.library._lock:
            if max_registers not in self._builds:
                driver = _cupy().cuda.driver
                ptr = driver.moduleGetFunction(self.library.module(max_registers, S.storage_unit(self.name)), self.name)
                # 0: CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, what registers and shared memory allow
                self._builds[max_registers] = ptr, driver.funcGetAttribute(0, ptr)
            return self._builds[max_registers]

    def function(self, threads: int) -> int:
        """The CUfunction that launches `threads` threads per threadgroup."""
        if threads <= self.max_threads:
            return self.ptr
        cap = min(255, REGISTERS_PER_BLOCK // threads // 8 * 8)  # registers are allocated 8 at a time
        ptr, max_threads = self._build(cap)
        if threads > max_threads:
            raise D.DispatchError(f"kernel {self.name} ({self.sig.where}): {threads} threads per threadgroup, but "
                                  f"on this GPU it can run at most {max_threads} (shared memory or registers)")
        return ptr


class CudaLibrary(D.Library):
    """One module per storage unit of the source (S.storage_unit) and register cap: the float32
    unit is compiled with the library, so its errors are the library's; the float16 and bfloat16
    instances on first use."""

    def __init__(self, device: "CudaDevice", src: S.Source):
        super().__init__(device, src)
        self._texts: dict[str, str] = {}
        self._modules: dict[tuple[str, int], int] = {}
        self.module(0)  # compile now: errors belong to library creation

    def module(self, max_registers: int = 0, unit: str = "") -> int:
        """The CUmodule of storage unit `unit` built with `max_registers` registers per thread at most (0: no cap)."""
        self.device.bind_thread()
        with self._lock:
            if (unit, max_registers) not in self._modules:
                if unit not in self._texts:
                    self._texts[unit] = S.generate(self.source, "cuda", unit=unit)
                cubin = build(self._texts[unit], self.source.name, self.device.arch, max_registers).read_bytes()
                # Loaded for the life of the process, like the device's cache of libraries; the driver
                # loads into the calling thread's current context, so make it the device's.
                with self.device.gpu:
                    self._modules[unit, max_registers] = _cupy().cuda.driver.moduleLoadData(cubin)
            return self._modules[unit, max_registers]

    def _make_kernel(self, sig: S.Kernel) -> D.Kernel:
        return CudaKernel(self, sig)


_ADDRESS = struct.Struct("<Q")


def _launch_params(d: D.Dispatch):
    """cuLaunchKernel's array of pointers to each argument of the generated wrapper, all values
    in one block: a buffer's device address; a constant's bytes and a null pointer (or zeros and
    the bound buffer's address); then the predicate's address or null. The array keeps the
    block alive; cuLaunchKernel copies the values, so both may go once it returns."""
    parts, offsets, at = [], [], 0
    for a, size in zip(d.args, d.kernel.value_sizes):
        if size:
            value, address = (a, 0) if a.__class__ is bytes else (bytes(size), a.ptr)
            n = -(-max(size, len(value)) // 8) * 8
            parts += [value.ljust(n, b"\0"), _ADDRESS.pack(address)]
            offsets += [at, at + n]
            at += n + 8
        else:
            parts.append(_ADDRESS.pack(a.ptr))
            offsets.append(at)
            at += 8
    p = d.predicate
    parts.append(_ADDRESS.pack(p.buffer.ptr + p.offset if p else 0))
    offsets.append(at)
    block = ctypes.create_string_buffer(b"".join(parts), at + 8)
    base = ctypes.addressof(block)
    params = (ctypes.c_void_p * len(offsets))(*[base + o for o in offsets])
    params._keep = block
    return params


class _Batch:
    """One commit in flight: its completion event and everything its kernels still read. Once
    retired (seen complete) it is `done` and its event goes back to the device's pool."""

    def __init__(self, event, keep):
        self.event = event
        self.keep = keep
        self.done = False


class CudaDevice(D.Device):
    """The cuda backend (CuPy and an NVIDIA GPU). Example: `dev = mm.device("cuda")`."""

    GRAPH_CACHE = 256  # captured commits kept, least recently run dropped first

    name = "cuda"
    has_simdgroup_matrix = True  # tensor cores (mma.sync)
    cheap_barriers = True

    @staticmethod
    def unavailable() -> str | None:
        try:
            cupy = _cupy()
        except ImportError as e:
            return f"CuPy is not installed ({e}): pip install 'mlmetal[cuda]' (CUDA 12) or 'mlmetal[cuda13]'"
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                return "no NVIDIA GPU is visible"
        except cupy.cuda.runtime.CUDARuntimeError as e:
            return f"no usable NVIDIA GPU: {e}"
        try:
            nvrtc_version()
        except RuntimeError as e:  # NvrtcNotFound, or an NVRTC that does not answer
            return str(e)
        return None

    def __init__(self):
        super().__init__()
        cupy = _cupy()
        self.gpu = cupy.cuda.Device()
        self.arch = self.gpu.compute_capability
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._inflight: collections.deque[_Batch] = collections.deque()
        self._events: list = []  # completion events of retired commits, for reuse
        self._submit_lock = threading.Lock()  # one thread at a time enqueues, so commit order is stream order
        self._bound = threading.local()
        # Commits of the same dispatches run as CUDA graphs (_graph_for); MLMETAL_CUDA_GRAPHS=0 turns it off.
        self.graphs = os.environ.get("MLMETAL_CUDA_GRAPHS", "1") != "0"
        self._graphs: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self.graph_launches = 0  # commits run as one graph launch, for tests and benchmarks

    def bind_thread(self) -> None:
        """Make the GPU's primary context current in the calling thread, once per thread.

        A thread starts with none, and the driver calls here (module loads, cuLaunchKernel) fail
        without one, unless some runtime call happened to bind it first (a cudaMalloc, which
        CuPy's memory pool often skips).
        """
        if not getattr(self._bound, "done", False):
            _cupy().cuda.runtime.setDevice(self.gpu.id)  # CUDA 12 on: binds the device's primary context
            self._bound.done = True

    def _make_library(self, src: S.Source) -> D.Library:
        return CudaLibrary(self, src)

    def _alloc(self, nbytes: int) -> D.Buffer:
        return CudaBuffer(self, nbytes)

    def _submit(self, work: list[D.Dispatch | D.HostStep]) -> _Batch:
        self.bind_thread()
        # Every function is resolved (and any rebuild done) before the commit's first launch.
        functions = [None if d.__class__ is D.HostStep else d.kernel.function(d.threads[0] * d.threads[1] * d.threads[2])
                     for d in work]
        cupy = _cupy()
        with self._submit_lock:
            self._retire()
            graph = self._graph_for(work, functions) if self.graphs else None
            if graph is not None:
                graph.launch(self.stream)
            else:
                self._launch(work, functions)
            event = self._events.pop() if self._events else cupy.cuda.Event(block=False, disable_timing=True)
            event.record(self.stream)
            batch = _Batch(event, work)
            self._inflight.append(batch)
        return batch

    def _launch(self, work, functions) -> None:
        launch = _cupy().cuda.driver.launchKernel
        for f, d in zip(functions, work):
            if f is None:  # a host step enqueues its own work here, in stream order
                d.fn()
                continue
            params = d.__dict__.get("_launch")  # a replayed dispatch keeps its argument block
            if params is None:
                params = d._launch = _launch_params(d)
            # cuLaunchKernel copies the argument values, so `params` may go once it returns.
            launch(f, *d.groups, *d.threads, 0, self.stream.ptr, ctypes.addressof(params), 0)

    def _graph_for(self, work, functions):
        """The CUDA graph that runs `work`, where the same dispatch objects (a graph plan's recorded
        ones, replayed) were committed together before: captured on their second commit, launched
        as one on every later one — one launch in place of one a kernel, which the host otherwise
        spends longer on than the GPU on a small kernel. None for work seen once, or with host steps.

        Entries hold the dispatches weakly (they would otherwise keep their buffers alive), and
        match only while every one is alive and the same object: then the buffers the graph's
        arguments point to are alive too, as the dispatches hold them."""
        if len(work) < 2 or any(f is None for f in functions):
            return None
        key = tuple(map(id, work))
        entry = self._graphs.get(key)
        if entry is None or any(ref() is not d for ref, d in zip(entry[0], work)):
            self._graphs[key] = [[weakref.ref(d) for d in work], None]
            self._graphs.move_to_end(key)
            if len(self._graphs) > self.GRAPH_CACHE:
                self._graphs.popitem(last=False)
            return None
        self._graphs.move_to_end(key)
        if entry[1] is None:
            self.stream.begin_capture()
            try:
                self._launch(work, functions)
            except BaseException:
                try:
                    self.stream.end_capture()
                except Exception:  # the launch's own error is the one to report
                    pass
                raise
            entry[1] = self.stream.end_capture()
        self.graph_launches += 1
        return entry[1]

    def _retire(self) -> None:
        """Forget the commits that have completed, freeing what they kept alive."""
        while self._inflight and self._inflight[0].event.done:
            batch = self._inflight.popleft()
            batch.done, batch.keep = True, None
            self._events.append(batch.event)

    def _sync_call(self, fn) -> None:
        """Run `fn` (which enqueues on the stream) and wait for the stream, reporting device errors.
        It waits on an event recorded with `fn`'s work, not on the stream: another thread may be
        capturing a CUDA graph on the stream by then (_graph_for), which a stream wait would break."""
        cupy = _cupy()
        try:
            with self._submit_lock:
                fn()
                done = cupy.cuda.Event(block=False, disable_timing=True)
                done.record(self.stream)
            done.synchronize()
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise D.ExecutionError(f"the GPU reported an error while running committed work: {e}") from e

    def _wait(self, batch: _Batch) -> None:
        if batch.done:
            return
        cupy = _cupy()
        try:
            batch.event.synchronize()  # (if retired and reused meanwhile, this waits longer, never less)
        except (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError) as e:
            raise D.ExecutionError(f"the GPU reported an error while running committed work: {e}") from e

    def _done(self, batch: _Batch) -> bool:
        return batch.done or batch.event.done

    def synchronize(self) -> None:
        self._sync_call(lambda: None)
