"""The metal backend: the MSL kernels on an Apple GPU, through metalcompute.

metalcompute (0.2.9) compiles an MSL string and runs one of its functions as
`function(count, *buffers)`: the buffers bound at indices 0, 1, … in call order, then a 1-D
dispatch of ceil(count / S) threadgroups of S threads, where S is the largest threadgroup the
pipeline allows. So each kernel is compiled once per threadgroup size T, with a wrapper
(source.generate(…, "metal", threads=T)) that caps S at T, rebuilds the 3-D builtins from a
launch struct, and writes the S it saw into an error flag if S is not T. Each call commits a
command buffer of its own on the device's one queue, so work runs in commit order; the call
returns a run handle, and releasing the handle blocks until that command buffer has completed.
"""

from __future__ import annotations

import dataclasses
import platform
import re
import struct
import sys
import threading
from typing import Any

import numpy as np

from . import device as D
from . import source as S

# struct mlm_launch (include/mlm_launch.h): 32-bit words, in its fields' order
LAUNCH_FIELDS = S.launch_struct().fields
LAUNCH = struct.Struct("<" + "I" * sum(f.count for f in LAUNCH_FIELDS))


def _metalcompute():
    import metalcompute  # only on macOS; imported late so this module loads everywhere

    return metalcompute


class CompileError(S.KernelSourceError):
    """Apple's Metal compiler rejected a kernel; messages point at the .metal file and line."""


def _compiler_messages(text: str, source_name: str) -> list[str]:
    """The compiler's error lines (the wrapper's #line directives name the .metal file), else all of it."""
    lines = [l for l in text.splitlines() if l.strip()]
    errors = [l for l in lines if re.search(r":\d+:(\d+:)? (fatal )?error", l)]
    return errors or lines or [f"{source_name}: the Metal compiler failed without a message"]


class MetalBuffer(D.HostBuffer):
    def __init__(self, device: "MetalDevice", nbytes: int):
        self.device = device
        self.nbytes = nbytes
        # Shared storage on unified memory: this numpy view and the GPU see the same bytes.
        self.mc = device.mc.buffer(nbytes)
        self._mem = np.frombuffer(self.mc, dtype=np.uint8)


@dataclasses.dataclass(eq=False)  # compared and hashed by identity
class _Pipeline:
    """A kernel compiled for threadgroups of `threads` threads, with its error flag.

    The flag is the pipeline's, not a dispatch's: the threadgroup size metalcompute picks
    depends on the compiled pipeline alone, so a pipeline that ran with the wrong size once
    does so every time, and the flag is never cleared.
    """

    kernel: "MetalKernel"
    threads: int
    function: Any  # metalcompute.Function
    flag: MetalBuffer

    def chosen_threads(self) -> int:
        """0 while every threadgroup had `threads` threads, else the size metalcompute chose."""
        return int(self.flag.numpy(np.uint32)[0])


class MetalKernel(D.Kernel):
    def __init__(self, library: "MetalLibrary", sig: S.Kernel):
        super().__init__(library, sig)
        self._pipelines: dict[int, _Pipeline] = {}

    def pipeline(self, threads: int) -> _Pipeline:
        """This kernel compiled for threadgroups of `threads` threads (once per size)."""
        with self.library._lock:
            if threads not in self._pipelines:
                function = self.library.compiled(threads).function(self.name)
                flag = self.library.device.buffer(np.zeros(1, np.uint32))
                self._pipelines[threads] = _Pipeline(self, threads, function, flag)
            return self._pipelines[threads]


class MetalLibrary(D.Library):
    def __init__(self, device: "MetalDevice", src: S.Source):
        super().__init__(device, src)
        self._compiled: dict[int, Any] = {}  # threads per threadgroup -> metalcompute.Kernel

    def compiled(self, threads: int):
        """The library's MSL with wrappers for `threads`-thread threadgroups, compiled once."""
        with self._lock:
            if threads not in self._compiled:
                text = S.generate(self.source, "metal", threads=threads)
                mc = self.device.mc_module
                try:
                    self._compiled[threads] = self.device.mc.kernel(text)
                except mc.error as e:
                    raise CompileError(_compiler_messages(str(e), self.source.name)) from None
            return self._compiled[threads]

    def _make_kernel(self, sig: S.Kernel) -> D.Kernel:
        return MetalKernel(self, sig)


class _Batch:
    """The run handles of one commit, in dispatch order, and the pipelines they ran."""

    def __init__(self, runs: list, pipelines: list[_Pipeline]):
        self.runs = runs
        self.pipelines = pipelines
        self.waited = False
        self.error: D.ExecutionError | None = None


class MetalDevice(D.Device):
    """The metal backend (macOS 14 or later, Apple silicon). Example: `dev = mm.device("metal")`."""

    name = "metal"
    has_simdgroup_matrix = True  # Apple GPUs' simdgroup matrices (Apple7 and later)
    cheap_barriers = True

    @staticmethod
    def unavailable() -> str | None:
        if sys.platform != "darwin":
            return (f"the metal backend needs macOS 14 or later on Apple silicon; this machine runs "
                    f"{sys.platform} on {platform.machine()}")
        release = platform.mac_ver()[0]
        if release and int(release.split(".")[0]) < 14:
            return f"the metal backend needs macOS 14 or later (metalcompute's minimum); this is macOS {release}"
        if platform.machine() != "arm64":
            return (f"the metal backend needs Apple silicon (32-wide SIMD groups); this Mac is {platform.machine()}"
                    " (or Python runs under Rosetta)")
        try:
            mc = _metalcompute()
        except ImportError as e:
            return f"the metal backend needs the metalcompute package (`pip install 'metalcompute>=0.2.9'`): {e}"
        if not mc.get_devices():
            return "metalcompute finds no Metal device"
        return None

    def __init__(self):
        super().__init__()
        self.mc_module = _metalcompute()
        self.mc = self.mc_module.Device()
        # Bound as the predicate of unpredicated dispatches: the wrapper always takes one.
        self._always = self.buffer(np.ones(1, np.uint32))
        self._pending: list[_Batch] = []  # committed and not yet waited, in commit order
        self._submit_lock = threading.Lock()  # one thread at a time commits, so commit order is run order
        self._wait_lock = threading.Lock()  # one thread at a time releases run handles and checks flags

    def _make_library(self, src: S.Source) -> D.Library:
        return MetalLibrary(self, src)

    def _alloc(self, nbytes: int) -> D.Buffer:
        return MetalBuffer(self, nbytes)

    def _submit(self, work: list[D.Dispatch | D.HostStep]) -> _Batch:
        steps = [d.what for d in work if d.__class__ is D.HostStep]
        if steps:  # metalcompute's runs give no point in the queue to call the host at without waiting
            raise D.DispatchError(f"{steps[0]}: the metal backend runs no host steps (mm.distributed's "
                                  "collectives); nothing of this commit ran")
        # Compile everything first, so a compile error commits nothing.
        pipelines = [d.kernel.pipeline(int(np.prod(d.threads))) for d in work]
        with self._submit_lock:
            batch = _Batch([self._run(d, p) for d, p in zip(work, pipelines)], pipelines)
            self._pending.append(batch)
        return batch

    def _run(self, d: D.Dispatch, pipeline: _Pipeline):
        """Commit one dispatch; returns metalcompute's run handle."""
        args = [a if isinstance(a, bytes) else a.mc for a in d.args]  # metalcompute copies bytes into a buffer
        if d.predicate is None:
            pred, word, has_pred = self._always, 0, 0
        else:
            pred, word, has_pred = d.predicate.buffer, d.predicate.offset // 4, 1
        values = {"groups": d.groups, "threads": d.threads, "pred_word": (word,), "has_pred": (has_pred,)}
        launch = LAUNCH.pack(*[x for f in LAUNCH_FIELDS for x in values[f.name]])
        count = d.groups[0] * d.groups[1] * d.groups[2] * pipeline.threads
        try:
            return pipeline.function(count, *args, pred.mc, launch, pipeline.flag.mc)
        except self.mc_module.error as e:  # metalcompute builds the pipeline state here, per call
            raise D.ExecutionError(f"kernel {d.kernel.name} ({d.kernel.sig.where}): metalcompute could not "
                                   f"dispatch it: {e}") from None

    def _wait(self, batch: _Batch) -> None:
        with self._wait_lock:
            if not batch.waited:
                while batch.runs:
                    del batch.runs[0]  # releasing a run handle blocks until its command buffer completed
                batch.error = self._check(batch)
                with self._submit_lock:
                    self._pending.remove(batch)
                batch.waited = True
        if batch.error is not None:
            raise batch.error

    @staticmethod
    def _check(batch: _Batch) -> D.ExecutionError | None:
        for p in dict.fromkeys(batch.pipelines):
            chosen = p.chosen_threads()
            if chosen:
                k = p.kernel
                return D.ExecutionError(
                    f"kernel {k.name} ({k.sig.where}): compiled for threadgroups of {p.threads} threads, but "
                    f"metalcompute ran it in threadgroups of {chosen}, the most this pipeline allows on "
                    f"this GPU; its dispatches did nothing. Dispatch it with at most {chosen} threads "
                    "per threadgroup")
        return None

    def _done(self, batch: _Batch) -> bool:
        # metalcompute offers no completion query short of blocking, so work counts as done
        # once it has been waited for.
        return batch.waited

    def synchronize(self) -> None:
        with self._submit_lock:
            pending = list(self._pending)
        for batch in pending:
            self._wait(batch)
