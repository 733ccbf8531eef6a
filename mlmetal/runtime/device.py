"""The backend contract: Device, Buffer, Library, Kernel, CommandBuffer.

Everything that can be checked without a device is checked here, once for every
backend: argument kinds and counts, constant-struct packing, threadgroup shape,
predicates. A backend only allocates, compiles, and runs lists of dispatches.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import source as S


class DispatchError(ValueError):
    """A dispatch that cannot run; raised before anything reaches the device."""


class ExecutionError(RuntimeError):
    """The device reported a failure while running committed work."""


# ---------------------------------------------------------------- buffers

class Buffer:
    """Device memory of `nbytes` bytes. Backends subclass it."""

    device: "Device"
    nbytes: int

    def numpy(self, dtype=np.uint8) -> np.ndarray:
        """The buffer's bytes as a flat numpy array of `dtype` (a view where the backend allows)."""
        raise NotImplementedError

    def write(self, data: np.ndarray, offset: int = 0) -> None:
        """Copy `data`'s bytes into the buffer at byte `offset`."""
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.nbytes} bytes on {self.device.label}>"


class HostBuffer(Buffer):
    """A buffer whose bytes the host sees as the numpy array `_mem` (cpu memory, Apple unified memory)."""

    _mem: np.ndarray

    def numpy(self, dtype=np.uint8) -> np.ndarray:
        dtype = np.dtype(dtype)
        if self.nbytes % dtype.itemsize:
            raise ValueError(f"{self.nbytes} bytes is not a whole number of {dtype} items")
        return self._mem.view(dtype)

    def write(self, data, offset: int = 0) -> None:
        raw = _as_bytes(data)
        if offset < 0 or offset + raw.nbytes > self.nbytes:
            raise ValueError(f"writing {raw.nbytes} bytes at offset {offset} overruns a {self.nbytes}-byte buffer")
        self._mem[offset:offset + raw.nbytes] = raw


def _as_bytes(data: Any) -> np.ndarray:
    arr = np.ascontiguousarray(data)
    if arr.dtype.kind not in "biufc" and arr.dtype.name != "bfloat16":  # text, bytes and objects have no bytes a kernel could mean
        raise TypeError(f"cannot make a buffer from {type(data).__name__} data (dtype {arr.dtype}): "
                        "give numbers, e.g. a numpy array")
    return arr.reshape(-1).view(np.uint8)


@dataclasses.dataclass(frozen=True)
class Predicate:
    """A uint32 at `offset` bytes into `buffer`: 0 skips every predicated dispatch, anything else runs it.

    Many predicates may share one buffer at different offsets.

    Example:
        >>> flags = dev.buffer(np.array([1, 0], dtype=np.uint32))
        >>> cb.dispatch(k, groups=(1, 1, 1), threads=(32, 1, 1), args=[x], predicate=mm.Predicate(flags, 4))
    """

    buffer: Buffer
    offset: int = 0

    def __post_init__(self):
        if not isinstance(self.buffer, Buffer):
            raise TypeError(f"a predicate needs a device buffer, got {type(self.buffer).__name__}")
        if self.offset % 4 or self.offset < 0:
            raise ValueError(f"predicate offset {self.offset} must be a non-negative multiple of 4")
        if self.offset + 4 > self.buffer.nbytes:
            raise ValueError(f"predicate offset {self.offset} is past the end of its {self.buffer.nbytes}-byte buffer")


# ---------------------------------------------------------------- kernels and arguments

class Kernel:
    """One compiled kernel function of a library."""

    def __init__(self, library: "Library", sig: S.Kernel):
        self.library = library
        self.sig = sig
        self.name = sig.name
        # Everything a dispatch looks up, computed once: binding runs on every dispatch.
        self.where = f"kernel {sig.name} ({sig.where})"
        self.params = sig.buffers
        self.param_names = {p.name for p in self.params}
        self._packers = {p.name: _fast_packer(sig.struct_of(p)) for p in self.params if p.kind == "constant"}

    def __repr__(self):
        return f"<Kernel {self.name} ({self.sig.where}) on {self.library.device.label}>"

    def pack_fast(self, param: S.Param, values: Any) -> bytes:
        """`pack`, through a precompiled struct when the values are plainly right; else `pack`'s checks."""
        packer = self._packers.get(param.name)
        if packer is not None and type(values) is dict and len(values) == len(packer[0]):
            try:
                vals = [values[n] for n in packer[0]]
                if not any(v.__class__ is bool for v in vals):
                    return packer[1].pack(*vals)
            except (KeyError, struct.error, TypeError, OverflowError):
                pass
        return self.pack(param, values)

    def pack(self, param: S.Param, values: Any) -> bytes:
        """Pack a dict (or a scalar, for `constant float& x`) into the bytes of `param`'s constant."""
        where = f"kernel {self.name} ({self.sig.where}), parameter `{param.name}`"
        st = self.sig.struct_of(param)
        if st is None:
            code = S.SCALARS[param.base_type]
            return _pack_scalar(code, values, f"{where} ({param.base_type})")
        if not isinstance(values, dict):
            raise DispatchError(f"{where}: expected a dict of {st.name}'s fields "
                                f"({', '.join(f.name for f in st.fields)}) or a buffer, got {type(values).__name__}")
        names = [f.name for f in st.fields]
        missing = [n for n in names if n not in values]
        extra = [n for n in values if n not in names]
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(map(str, extra))}"] if extra else [])
            raise DispatchError(f"{where}: struct {st.name} fields do not match: {'; '.join(parts)}")
        out = []
        for f in st.fields:
            code = S.SCALARS[f.type]
            v = values[f.name]
            field = f"{where}, field {st.name}.{f.name}"
            if f.count == 1:
                out.append(_pack_scalar(code, v, f"{field} ({f.type})"))
            else:
                seq = list(np.asarray(v).reshape(-1)) if not np.isscalar(v) else None
                if seq is None or len(seq) != f.count:
                    raise DispatchError(f"{field}: expected {f.count} values of {f.type}")
                out.extend(_pack_scalar(code, x, f"{field}[{i}]") for i, x in enumerate(seq))
        return b"".join(out)


def _fast_packer(st: "S.Struct | None"):
    """(field names, struct.Struct) for a struct of scalar fields, or None."""
    if st is None or any(f.count != 1 for f in st.fields):
        return None
    return tuple(f.name for f in st.fields), struct.Struct("<" + "".join(S.SCALARS[f.type] for f in st.fields))


def _pack_scalar(code: str, v: Any, where: str) -> bytes:
    if code == "f":
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise DispatchError(f"{where}: expected a number, got {v!r}")
        try:
            return struct.pack("<f", float(v))
        except OverflowError:  # finite and past float32's largest value (inf and NaN pack as themselves)
            raise DispatchError(f"{where}: {v!r} is beyond float32's range (±3.4028235e38)") from None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise DispatchError(f"{where}: expected an integer, got {v!r}")
    lo, hi = (0, 2**32) if code == "I" else (-(2**31), 2**31)
    if not lo <= int(v) < hi:
        raise DispatchError(f"{where}: {v} is out of range [{lo}, {hi})")
    return struct.pack("<" + code, int(v))


@dataclasses.dataclass
class Dispatch:
    """One bound, validated dispatch, ready for a backend to run."""

    kernel: Kernel
    groups: tuple[int, int, int]
    threads: tuple[int, int, int]
    args: list[Buffer | bytes]  # in buffer-index order; bytes for packed constants
    predicate: Predicate | None


@dataclasses.dataclass
class HostStep:
    """Host work at its place in the device's order, encoded by `CommandBuffer.host_step`."""

    fn: Callable[[], None]
    what: str


def _shape3(v: Any, what: str, kernel: Kernel) -> tuple[int, int, int]:
    if type(v) is int and v >= 1:
        return (v, 1, 1)
    if type(v) is tuple and len(v) == 3 and all(type(x) is int and x >= 1 for x in v):
        return v
    try:
        items = [v] if isinstance(v, (int, np.integer)) else list(v)
    except TypeError:
        items = []
    integers = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items)
    if not 1 <= len(items) <= 3 or not integers:
        raise DispatchError(f"{kernel.where}: {what} must be 1 to 3 positive integers, got {v!r}")
    t = tuple(int(x) for x in items) + (1,) * (3 - len(items))
    if any(x < 1 for x in t):
        raise DispatchError(f"{kernel.where}: {what} {t} is empty: every dimension must be at least 1")
    return t


MAX_GROUPS_YZ = 65535  # threadgroups along a grid's y and z, at most: CUDA's limit, kept on every backend


def bind(kernel: Kernel, groups, threads, args: Sequence | None, named: dict, predicate) -> Dispatch:
    """Check everything about a dispatch and return it bound; raise DispatchError on any problem."""
    where = kernel.where
    g = _shape3(groups, "groups", kernel)
    t = _shape3(threads, "threads", kernel)
    count = t[0] * t[1] * t[2]
    if count % 32 or count > 1024:
        raise DispatchError(f"{where}: threads per threadgroup {t} = {count}; it must be a multiple of 32 "
                            "and at most 1024 (Apple and NVIDIA GPUs run 32-wide SIMD groups)")
    if max(g[1], g[2]) > MAX_GROUPS_YZ:
        raise DispatchError(f"{where}: grid {g}: at most {MAX_GROUPS_YZ} threadgroups along y and z (CUDA's limit; "
                            "put the long dimension first)")
    if g[0] * g[1] * g[2] * count >= 2**32:
        raise DispatchError(f"{where}: grid {g}×{t} has 2^32 threads or more; builtins are 32-bit")
    params = kernel.params
    args = list(args or [])
    if len(args) > len(params):
        raise DispatchError(f"{where}: takes {len(params)} arguments ({', '.join(p.name for p in params)}), got {len(args) + len(named)}")
    bound: dict[str, Any] = {p.name: a for p, a in zip(params, args)}
    for name, value in named.items():
        if name not in kernel.param_names:
            raise DispatchError(f"{where}: no parameter named {name!r} (parameters: {', '.join(p.name for p in params)})")
        if name in bound:
            raise DispatchError(f"{where}: parameter {name!r} given twice")
        bound[name] = value
    missing = [p.name for p in params if p.name not in bound]
    if missing:
        raise DispatchError(f"{where}: missing argument(s) {', '.join(missing)}")
    out: list[Buffer | bytes] = []
    for p in params:
        out.append(_bind_one(kernel, p, bound[p.name]))
    for p, count, need in kernel.sig.extent_bytes(bound):  # what the kernel declares it reaches
        if out[p.index].nbytes < need:
            raise DispatchError(f"kernel {kernel.name} ({p.loc}), parameter `{p.name}` ({p.type}): the buffer has "
                                f"{out[p.index].nbytes} bytes, the kernel reaches {need} (extent {p.extent} = {count} elements)")
    if predicate is not None and not isinstance(predicate, Predicate):
        try:
            predicate = Predicate(*predicate)
        except TypeError:
            raise DispatchError(f"{where}: predicate must be mm.Predicate(buffer, offset) or (buffer, offset)") from None
    if predicate is not None and predicate.buffer.device is not kernel.library.device:
        raise DispatchError(f"{where}: the predicate buffer {_elsewhere(predicate.buffer.device, kernel.library.device)}")
    return Dispatch(kernel, g, t, out, predicate)


def _bind_one(kernel: Kernel, p: S.Param, value: Any) -> Buffer | bytes:
    dev = kernel.library.device
    value = getattr(value, "buffer", value)  # tensors carry their buffer
    if isinstance(value, Buffer) and value.device is dev and p.kind == "buffer":
        return value
    if p.kind == "constant" and not isinstance(value, Buffer):
        return kernel.pack_fast(p, value)
    where = f"kernel {kernel.name} ({p.loc}), parameter `{p.name}` ({p.type})"
    if isinstance(value, Buffer):
        if value.device is not dev:
            raise DispatchError(f"{where}: buffer {_elsewhere(value.device, dev)}")
        if p.kind == "constant":
            st = kernel.sig.struct_of(p)
            need = st.nbytes if st is not None else 4
            if value.nbytes < need:
                raise DispatchError(f"{where}: buffer of {value.nbytes} bytes is smaller than the {need} bytes it binds")
        return value
    if p.kind == "constant":
        return kernel.pack(p, value)
    raise DispatchError(f"{where}: expected a device buffer or tensor, got {type(value).__name__}"
                        + (" (copy arrays to the device with dev.buffer(array))" if isinstance(value, np.ndarray) else ""))


def _elsewhere(there: "Device", here: "Device") -> str:
    """Where a buffer lives when it is not on the kernel's device, told apart however alike they are."""
    text = f"lives on {there.label}, the kernel on {here.label}"
    if there.name == here.name:
        text += (f" (two {here.name} devices: each has its own queue and buffers; use one, as "
                 f"mm.device({here.name!r}) returns the same device every call)")
    return text


# ---------------------------------------------------------------- libraries

# The matmul precision policies (mlmetal.precision), in the order of the MLM_MATMUL_PRECISION
# values that kernels are compiled with (include/mlm_simdgroup_matrix.h).
MATMUL_PRECISIONS = ("highest", "high", "medium")


def precision_defines(precision: str) -> dict[str, int]:
    """The defines a library is compiled with under a matmul precision policy: MLM_MATMUL_PRECISION,
    its index in MATMUL_PRECISIONS, where it is not the default `highest`."""
    level = MATMUL_PRECISIONS.index(precision)
    return {"MLM_MATMUL_PRECISION": level} if level else {}


class Library:
    """The kernels of one MSL source, linted and compiled for a device."""

    def __init__(self, device: "Device", src: S.Source):
        self.device = device
        self.source = src
        problems = S.lint(src)
        if problems:
            raise S.LintError(problems)
        self._kernels: dict[str, Kernel] = {}
        self._lock = threading.RLock()  # kernels (and a backend's builds) are made once, whichever thread asks

    @property
    def names(self) -> list[str]:
        return list(self.source.kernels)

    def kernel(self, name: str) -> Kernel:
        """The kernel function `name` of this library."""
        kernel = self._kernels.get(name)
        if kernel is None:
            sig = self.source.kernels.get(name)
            if sig is None:
                raise KeyError(f"{self.source.name} has no kernel {name!r} (kernels: {', '.join(self.names) or 'none'})")
            with self._lock:
                if name not in self._kernels:
                    self._kernels[name] = self._make_kernel(sig)
                kernel = self._kernels[name]
        return kernel

    def _make_kernel(self, sig: S.Kernel) -> Kernel:
        raise NotImplementedError


# ---------------------------------------------------------------- command buffers

class CommandBuffer:
    """Encodes dispatches; `commit` sends them to the device's queue, in commit order.

    Example:
        >>> cb = dev.command_buffer()
        >>> cb.dispatch(k, groups=(4, 1, 1), threads=(256, 1, 1), args=[x, y, {"n": 1000, "a": 2.0}])
        >>> cb.commit(); cb.wait()
    """

    def __init__(self, device: "Device"):
        self.device = device
        self.predicate: Predicate | None = None
        self._encoded: list[Dispatch | HostStep] = []
        self._submitted: list[Any] = []
        self._committed = False

    def dispatch(self, kernel: Kernel, groups, threads, args: Sequence | None = None, *,
                 predicate=None, **named) -> None:
        """Encode `groups` threadgroups of `threads` threads running `kernel`.

        Args:
            kernel: from `library.kernel(name)`.
            groups: threadgroups per grid, 1 to 3 integers.
            threads: threads per threadgroup, a multiple of 32 and at most 1024 in all.
            args: buffers (or tensors) and constants in buffer-index order; constants are a
                dict of the struct's fields, a scalar, or a buffer.
            predicate: `mm.Predicate(buffer, offset)` or a (buffer, offset) pair; overrides
                `cb.predicate` for this dispatch.
            **named: arguments by parameter name instead of position.
        """
        if self._committed:
            raise DispatchError("this command buffer was committed; encode into a new one "
                                "(or use commit_and_continue)")
        if not isinstance(kernel, Kernel) or kernel.library.device is not self.device:
            raise DispatchError(f"expected a kernel of {self.device.label}, got {kernel!r}")
        d = bind(kernel, groups, threads, args, named, predicate if predicate is not None else self.predicate)
        self._encoded.append(d)

    def host_step(self, fn: Callable[[], None], what: str) -> None:
        """Encode a call of `fn()` at this point of the queue, in order with the work around it
        (a collective of mm.distributed: MPI, or NCCL on the GPU's stream).

        The cpu backend's worker calls it once the work encoded before it has run, and runs the
        work after it once it returns; what it raises fails the commit as a kernel's error would.
        Where `fn` returns a function, the worker calls that between the dispatches after it
        until it returns true: work `fn` started and a later step finishes (an MPI collective,
        which moves bytes only while MPI is called) keeps progressing meanwhile.
        The cuda backend calls it while it enqueues the commit, between the launches before and
        after it: `fn` must enqueue its work on the device's stream (`dev.stream`), or on a
        stream of its own ordered against it by events, not wait for it; what it returns is
        ignored. The metal backend refuses host steps.

        Args:
            fn: takes no arguments; returns None, or on cpu a function polled as above.
            what: names the step in errors.
        """
        if self._committed:
            raise DispatchError("this command buffer was committed; encode into a new one "
                                "(or use commit_and_continue)")
        self._encoded.append(HostStep(fn, what))

    def encoded(self) -> int:
        """How many dispatches wait in this buffer for the next commit (a mark for `since`)."""
        return len(self._encoded)

    def since(self, mark: int) -> list[Dispatch | HostStep]:
        """The dispatches encoded after `mark` (= `encoded()` then), bound and checked: a graph's
        plan records them to `replay` on its next run."""
        return self._encoded[mark:]

    def replay(self, dispatches: list[Dispatch | HostStep]) -> None:
        """Encode dispatches bound earlier (by `since`) again, skipping the binding's checks."""
        if self._committed:
            raise DispatchError("this command buffer was committed; encode into a new one "
                                "(or use commit_and_continue)")
        self._encoded.extend(dispatches)

    def commit(self) -> None:
        """Send the encoded work to the device; no more work may be encoded into this buffer."""
        if self._committed:
            raise DispatchError("this command buffer was already committed")
        self._flush()
        self._committed = True

    def commit_and_continue(self) -> None:
        """Send what is encoded so far and keep encoding into a fresh buffer on the same queue.

        Temporaries of the committed part stay alive until the device is done with them;
        `wait()` afterwards waits for everything committed so far.
        """
        if self._committed:
            raise DispatchError("this command buffer was already committed")
        self._flush()

    def _flush(self):
        work, self._encoded = self._encoded, []
        self._submitted.append(self.device._submit(work))

    def wait(self) -> None:
        """Block until all committed work of this buffer is done; raise any device error."""
        if not self._submitted:
            raise DispatchError("wait() on a command buffer that was never committed")
        for handle in self._submitted:
            self.device._wait(handle)

    @property
    def completed(self) -> bool:
        return bool(self._submitted) and all(self.device._done(h) for h in self._submitted)


# ---------------------------------------------------------------- device

_ordinals: dict[str, int] = {}
_ordinals_lock = threading.Lock()


class Device:
    """A backend: allocation, libraries, command buffers. Subclasses implement the underscored hooks.

    Every method may be called from any thread; a command buffer belongs to the thread that encodes it.

    Ops choose kernels by what a device can do, never by its name:
    `has_simdgroup_matrix`: simdgroup matrix products run on matrix hardware (every backend runs
    them; the cpu backend emulates them exactly, for tests, not for speed);
    `cheap_barriers`: a threadgroup's threads run side by side, so a barrier costs next to
    nothing and wide threadgroups and many of them pay (GPUs); on cpu each thread is a fiber and
    each barrier a switch for every one of them.
    """

    name = "abstract"
    has_simdgroup_matrix = False
    cheap_barriers = False

    def __init__(self):
        with _ordinals_lock:  # devices of one backend are numbered in creation order
            self.ordinal = _ordinals[self.name] = _ordinals.get(self.name, -1) + 1
        self._libraries: dict[Any, Library] = {}
        self._lock = threading.Lock()  # held while a library compiles

    @property
    def label(self) -> str:
        """The backend's name, numbered from the second device of that backend on: 'cpu', 'cpu:1'."""
        return self.name if self.ordinal == 0 else f"{self.name}:{self.ordinal}"

    def library(self, name: str | None = None, *, source: str | None = None, path: str | Path | None = None,
                precision: str = "highest") -> Library:
        """Compile a kernel library: `name` of a file in kernels/, a `source` string, or a `path`.

        `precision` is the matmul precision policy its simdgroup matrix products round their
        operands by (mlmetal.precision); kernels without them are the same under every policy.

        Example:
            >>> lib = dev.library("elementwise"); k = lib.kernel("axpy")
        """
        if sum(x is not None for x in (name, source, path)) != 1:
            raise TypeError("give exactly one of a library name, source= or path=")
        if precision not in MATMUL_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")
        defines = precision_defines(precision)
        key = ("name", name) if name is not None else ("path", str(path)) if path is not None else ("source", source)
        key += (precision,)
        with self._lock:
            lib = self._libraries.get(key)
            if lib is None:
                if name is not None:
                    src = S.Source.from_file(S.find(name), defines)
                elif path is not None:
                    src = S.Source.from_file(path, defines)
                else:
                    src = S.Source(source, name="<source>", defines=defines)
                lib = self._libraries[key] = self._make_library(src)
        return lib

    def buffer(self, data=None, *, nbytes: int | None = None) -> Buffer:
        """A device buffer holding a copy of `data`'s bytes, or `nbytes` uninitialised bytes."""
        if (data is None) == (nbytes is None):
            raise TypeError("give either data or nbytes=")
        if data is not None:
            raw = _as_bytes(data)
            if raw.nbytes == 0:
                raise ValueError("cannot make an empty buffer")
            buf = self._alloc(raw.nbytes)
            buf.write(raw)
            return buf
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise TypeError(f"nbytes must be an integer, got {nbytes!r}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        return self._alloc(int(nbytes))

    def command_buffer(self) -> CommandBuffer:
        return CommandBuffer(self)

    def synchronize(self) -> None:
        """Wait for all work committed on this device."""
        raise NotImplementedError

    def __repr__(self):
        return f"<mlmetal device {self.label}>"

    # hooks
    def _make_library(self, src: S.Source) -> Library:
        raise NotImplementedError

    def _alloc(self, nbytes: int) -> Buffer:
        raise NotImplementedError

    def _submit(self, work: list[Dispatch | HostStep]) -> Any:
        raise NotImplementedError

    def _wait(self, handle: Any) -> None:
        raise NotImplementedError

    def _done(self, handle: Any) -> bool:
        raise NotImplementedError
