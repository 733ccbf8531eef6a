"""Data-parallel training across processes and GPUs: MPI between any processes, NCCL between NVIDIA GPUs.

`mpirun -n 4 python train.py` starts four processes; `init()` in each reads its rank and the
world's size from MPI (mpi4py). Collectives are encoded into command buffers as host steps
(`CommandBuffer.host_step`), so the host never waits for them: on cpu the queue's worker runs
them through MPI, in order with the kernels around them; on cuda they are NCCL calls on a stream
of their own, ordered against the device's stream by events (the NCCL unique id travels over
MPI). An all-reduce may be started and finished apart (all_reduce_start, all_reduce_finish), so
that the kernels encoded between them run while it travels. One process drives one device: a
process picks its GPU by its rank among the processes of its host, and on cpu takes its share
of the host's cores.

No rank waits forever. An exception that ends a rank's program prints and stops every rank
(MPI_Abort); a launcher stops the others when a rank dies; and a collective that waits longer
than the timeout (`init(timeout=)`, else MLMETAL_DISTRIBUTED_TIMEOUT, else 300 s) for the other
ranks stops every rank, naming itself.
"""

from __future__ import annotations

import collections
import os
import pickle
import sys
import threading
import time

import numpy as np

from . import ops
from .runtime import backends
from .tensor import Tensor


class DistributedError(RuntimeError):
    """Ranks that disagree (parameters, optimizers), a collective that timed out, or MPI or NCCL missing."""


_world: "World | None" = None


def init(timeout: float | None = None) -> "World":
    """Join the processes `mpirun`/`mpiexec` started (alone, a world of one); returns the world.

    Call it before the first `mm.device()`: a process picks its GPU by its rank on its host,
    and on cpu takes its share of the host's cores (unless MLMETAL_CPU_THREADS says). Calling
    it again returns the same world.

    Args:
        timeout: seconds a collective waits for the other ranks before it stops the job
            (default MLMETAL_DISTRIBUTED_TIMEOUT, else 300).

    Example:
        >>> world = mm.distributed.init()       # under `mpirun -n 2 python train.py`
        >>> world.rank, world.size
        (0, 2)
    """
    global _world
    if _world is not None:
        return _world
    if timeout is None:
        text = os.environ.get("MLMETAL_DISTRIBUTED_TIMEOUT", "300")
        try:
            timeout = float(text)
        except ValueError:
            timeout = float("nan")
        if not timeout > 0:
            raise DistributedError(f"MLMETAL_DISTRIBUTED_TIMEOUT must be a number of seconds > 0, got {text!r}")
    elif not timeout > 0:
        raise DistributedError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:  # RuntimeError: mpi4py found no MPI library to load
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedError(f"mm.distributed needs mpi4py and an MPI: pip install 'mlmetal[distributed]' ({first})") from None
    world = World(MPI, float(timeout))
    if world.local_size > 1 and not os.environ.get("MLMETAL_CPU_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["MLMETAL_CPU_THREADS"] = str(max(1, cores // world.local_size))
    _pick_gpu(world.local_rank)
    if world.size > 1:
        _stop_all_on_uncaught_exceptions()
    _world = world
    return world


def rank() -> int:
    """This process's rank: 0 to size() - 1 (0 before `init`)."""
    return _world.rank if _world is not None else 0


def size() -> int:
    """How many processes train together (1 before `init`)."""
    return _world.size if _world is not None else 1


def barrier() -> None:
    """Wait until every rank has called `barrier` (the host's program, not the device's work:
    `dev.synchronize()` first for that)."""
    world = _require_world("barrier")
    world.wait(world.host_comm.Ibarrier(), "barrier")


def all_reduce(tensor: Tensor, op: str = "sum") -> Tensor:
    """The sum (or mean) of `tensor` over the ranks, as a new tensor, computed in the device's order.

    Args:
        tensor: a float32 tensor of the same shape on every rank.
        op: "sum" or "mean".

    Example:
        >>> total = mm.distributed.all_reduce(mm.tensor([float(mm.distributed.rank())]))   # 0 + 1 on 2 ranks
    """
    return ops.apply("all_reduce", tensor, op=op)


def broadcast(tensor: Tensor, root: int = 0) -> Tensor:
    """Overwrite `tensor` on every rank with its contents on rank `root`, in the device's order; returns it.

    Example:
        >>> mm.distributed.broadcast(weights, root=0)
    """
    world = _require_world("broadcast")
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < world.size:
        raise DistributedError(f"broadcast: root must be a rank from 0 to {world.size - 1}, got {root!r}")
    cb = tensor.device.command_buffer()
    world.transport(tensor.device).broadcast(cb, tensor, int(root))
    cb.commit()
    return tensor


def abort(reason: str, code: int = 1) -> None:
    """Print `reason` naming this rank and stop every rank of the job (MPI_Abort); does not return."""
    from mpi4py import MPI

    where = f"rank {rank()} of {size()}"
    print(f"mlmetal.distributed: {where}: {reason}; stopping every rank", file=sys.stderr, flush=True)
    sys.stdout.flush()
    time.sleep(1)  # the launcher forwards what the ranks printed: once they are stopped, what it had not yet is lost
    MPI.COMM_WORLD.Abort(code)


def _require_world(what: str) -> "World":
    if _world is None:
        raise DistributedError(f"{what}: call mm.distributed.init() first (under mpirun, in every process)")
    return _world


def _stop_all_on_uncaught_exceptions() -> None:
    """An exception that would end this rank's program stops every rank instead of leaving them
    waiting for it (mpi4py's `python -m mpi4py` does the same)."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        abort(f"{kind.__name__}: {value}" if str(value) else kind.__name__)

    sys.excepthook = hook


def _pick_gpu(local_rank: int) -> None:
    """Make GPU local_rank (mod the GPUs present) this process's, where cuda can run."""
    if backends.available("cuda") is not None:
        return
    import cupy

    gpu = local_rank % cupy.cuda.runtime.getDeviceCount()
    made = backends._devices.get(("cuda", False))
    if made is not None and made.gpu.id != gpu:
        raise DistributedError(f"this process's cuda device is GPU {made.gpu.id}; as rank {local_rank} on its host it "
                               f"should drive GPU {gpu}: call mm.distributed.init() before mm.device()")
    cupy.cuda.runtime.setDevice(gpu)


# ---------------------------------------------------------------- the world and its transports

class World:
    """The processes training together: this one's rank, their number, and the communicators."""

    def __init__(self, MPI, timeout: float):
        self.MPI = MPI
        comm = MPI.COMM_WORLD
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        # Two communicators, so collectives the device's queue runs never meet the host's (a
        # barrier, a check) out of order: each communicator's collectives match in call order.
        self.queue_comm, self.host_comm = comm.Dup(), comm.Dup()
        self.timeout = timeout
        self._transports: dict = {}

    def __repr__(self):
        return f"<mlmetal world: rank {self.rank} of {self.size}>"

    def wait(self, request, what: str) -> None:
        """Wait for a non-blocking MPI request, yielding the core meanwhile (MPI would spin on it,
        taking it from the ranks that share the host); stop the job past the timeout."""
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                abort(f"{what} waited {self.timeout:g} s for the other ranks (one of them stopped, hangs, or "
                      "runs other collectives; MLMETAL_DISTRIBUTED_TIMEOUT sets the wait)")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def host_allgather(self, obj, what: str) -> list:
        """Every rank's `obj` (picklable), by rank."""
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        self.wait(self.host_comm.Iallgather(np.array([data.size], np.int64), sizes), what)
        out = np.empty(int(sizes.sum()), np.uint8)
        self.wait(self.host_comm.Iallgatherv(data, (out, sizes)), what)
        ends = np.cumsum(sizes)
        return [pickle.loads(out[e - s:e].tobytes()) for s, e in zip(sizes, ends)]

    def host_bcast(self, obj, what: str, root: int = 0):
        """Rank `root`'s `obj` (picklable), on every rank."""
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        n = np.array([data.size], np.int64)
        self.wait(self.host_comm.Ibcast(n, root), what)
        buf = data.copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.wait(self.host_comm.Ibcast(buf, root), what)
        return pickle.loads(buf.tobytes())

    def transport(self, dev) -> "_Mpi | _Nccl":
        """How collectives of device `dev` travel: NCCL on cuda, MPI through host memory elsewhere."""
        t = self._transports.get(dev)
        if t is None:
            if dev.name == "metal":
                raise DistributedError("mm.distributed does not run on the metal backend yet; use cpu")
            t = self._transports[dev] = _Nccl(self, dev) if dev.name == "cuda" else _Mpi(self)
        return t


class _Mpi:
    """Collectives through MPI on the buffers' host memory, run by the cpu backend's worker in queue order."""

    def __init__(self, world: World):
        self.world = world
        self.pending: dict = {}  # flat buffer -> its all-reduce in flight, from its start to its finish

    def start(self, cb, inputs: list[Tensor], flat: Tensor, what: str) -> None:
        world, MPI, view = self.world, self.world.MPI, flat.buffer.numpy(np.float32)[:flat.size]
        ins = [x.buffer.numpy(np.float32)[:x.size] for x in inputs]

        def step():
            np.concatenate(ins, out=view)  # one message for the bucket
            request = self.pending[flat.buffer] = world.queue_comm.Iallreduce(MPI.IN_PLACE, view, op=MPI.SUM)
            return request.Test  # MPI moves the bytes only inside MPI calls: the worker polls it between kernels

        cb.host_step(step, what)

    def finish(self, cb, flat: Tensor, outputs: list[Tensor], what: str) -> None:
        view = flat.buffer.numpy(np.float32)[:flat.size]
        outs = [y.buffer.numpy(np.float32)[:y.size] for y in outputs]
        ends = np.cumsum([y.size for y in outs])[:-1]

        def step():
            self.world.wait(_started(self.pending, flat, what), what)
            for y, part in zip(outs, np.split(view, ends)):
                y[...] = part

        cb.host_step(step, what)

    def broadcast(self, cb, tensor: Tensor, root: int) -> None:
        world, view = self.world, tensor.buffer.numpy(np.uint8)[:tensor.nbytes]
        what = f"broadcast of {tensor.shape} from rank {root}"
        cb.host_step(lambda: world.wait(world.queue_comm.Ibcast(view, root), what), what)


def _started(pending: dict, flat: Tensor, what: str):
    """What the start of `flat`'s all-reduce left pending, once."""
    try:
        return pending.pop(flat.buffer)
    except KeyError:
        raise DistributedError(f"{what}: finished, but never started (all_reduce_finish reads what "
                               "all_reduce_start returned)") from None


class _Nccl:
    """Collectives through NCCL on a stream of their own, ordered against the device's stream by events:
    the device's stream keeps running kernels while NCCL moves the bytes, until it needs them."""

    def __init__(self, world: World, dev):
        try:
            from cupy.cuda import nccl
        except ImportError as e:
            nccl, why = None, str(e)
        else:
            why = "cupy.cuda.nccl.available is False"
        if nccl is None or not nccl.available:
            raise DistributedError(f"mm.distributed on cuda needs NCCL: pip install nvidia-nccl-cu13 (or -cu12, as "
                                   f"CuPy's CUDA) ({why})")
        import cupy

        self.nccl, self.world, self.dev, self.cupy = nccl, world, dev, cupy
        uid = world.host_bcast(nccl.get_unique_id() if world.rank == 0 else None, "NCCL's unique id")
        dev.bind_thread()
        with dev.gpu:
            self.comm = nccl.NcclCommunicator(world.size, uid, world.rank)
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.pending: dict = {}  # flat buffer -> the event recorded after its all-reduce, from its start to its finish
        self.watchdog = _Watchdog(world, dev) if world.size > 1 else None

    def _event(self, stream):
        event = self.cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        return event

    def _collective(self, calls, what: str):
        """Enqueue NCCL `calls` (each taking a stream's pointer) as one group on the collectives'
        stream, after the work enqueued on the device's stream so far; the event that follows them."""
        nccl, stream = self.nccl, self.stream
        stream.wait_event(self._event(self.dev.stream))
        started = self._event(stream) if self.watchdog else None
        nccl.groupStart()
        try:
            for call in calls:
                call(stream.ptr)
        finally:
            nccl.groupEnd()
        done = self._event(stream)
        if self.watchdog:
            self.watchdog.watch(started, done, what)
        return done

    def _copies(self, pairs) -> None:
        """Enqueue device-to-device copies (destination, source pointer and bytes) on the device's stream."""
        rt = self.cupy.cuda.runtime
        for dst, src, nbytes in pairs:
            rt.memcpyAsync(dst, src, nbytes, rt.memcpyDeviceToDevice, self.dev.stream.ptr)

    def start(self, cb, inputs: list[Tensor], flat: Tensor, what: str) -> None:
        nccl, comm, at = self.nccl, self.comm, np.cumsum([0] + [x.nbytes for x in inputs])

        def step():
            self._copies((flat.buffer.ptr + int(a), x.buffer.ptr, x.nbytes) for x, a in zip(inputs, at))
            self.pending[flat.buffer] = self._collective(
                [lambda s: comm.allReduce(flat.buffer.ptr, flat.buffer.ptr, flat.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                                          s)], what)

        cb.host_step(step, what)

    def finish(self, cb, flat: Tensor, outputs: list[Tensor], what: str) -> None:
        at = np.cumsum([0] + [y.nbytes for y in outputs])

        def step():
            self.dev.stream.wait_event(_started(self.pending, flat, what))
            self._copies((y.buffer.ptr, flat.buffer.ptr + int(a), y.nbytes) for y, a in zip(outputs, at))

        cb.host_step(step, what)

    def broadcast(self, cb, tensor: Tensor, root: int) -> None:
        nccl, comm = self.nccl, self.comm
        what = f"broadcast of {tensor.shape} from rank {root}"
        call = lambda s: comm.bcast(tensor.buffer.ptr, tensor.nbytes, nccl.NCCL_UINT8, root, s)  # noqa: E731
        cb.host_step(lambda: self.dev.stream.wait_event(self._collective([call], what)), what)


class _Watchdog:
    """Stops the job when a collective on the GPU has run longer than the timeout: NCCL itself waits
    forever for a rank that stopped, and so would the host waiting on the stream."""

    def __init__(self, world: World, dev):
        self.world, self.dev = world, dev
        self.pending: collections.deque = collections.deque()  # (started, finished events, what), in stream order
        threading.Thread(target=self._run, name="mlmetal-nccl-watchdog", daemon=True).start()

    def watch(self, started, finished, what: str) -> None:
        self.pending.append((started, finished, what))

    def _run(self):
        self.dev.bind_thread()
        since = None  # when the oldest pending collective was first seen running
        while True:
            time.sleep(0.5)
            while self.pending and self.pending[0][1].done:
                self.pending.popleft()
                since = None
            if self.pending and self.pending[0][0].done:
                since = since or time.monotonic()
                if time.monotonic() - since > self.world.timeout:
                    abort(f"{self.pending[0][2]} ran {self.world.timeout:g} s on the GPU waiting for the other ranks "
                          "(one of them stopped or hangs; MLMETAL_DISTRIBUTED_TIMEOUT sets the wait)")


def encode_all_reduce(cb, inputs: list[Tensor], outputs: list[Tensor], op: str) -> None:
    """Encode the all_reduce op: outputs = the sum (or mean) over the ranks of the inputs, both
    halves back to back through a flat tensor of its own."""
    flat = Tensor(cb.device.buffer(nbytes=4 * sum(x.size for x in inputs)), (sum(x.size for x in inputs),))
    encode_all_reduce_start(cb, flat, inputs)
    encode_all_reduce_finish(cb, outputs, flat, op)


def encode_all_reduce_start(cb, flat: Tensor, inputs: list[Tensor]) -> None:
    """Encode the all_reduce_start op: the inputs into `flat`, one after another, and the start of
    its sum over the ranks (before `init`, in the world of this process alone, the copy alone)."""
    if _world is not None:
        _world.transport(cb.device).start(cb, inputs, flat, _what(inputs))
        return
    at = 0
    for x in inputs:
        _copy(cb, x, flat, x.size, 0, at)
        at += x.size


def encode_all_reduce_finish(cb, outputs: list[Tensor], flat: Tensor, op: str) -> None:
    """Encode the all_reduce_finish op: wait for `flat`'s sum over the ranks, then the outputs
    from it, the sum (or mean)."""
    if _world is None:
        at = 0
        for y in outputs:
            _copy(cb, flat, y, y.size, at, 0)
            at += y.size
        return
    _world.transport(cb.device).finish(cb, flat, outputs, _what(outputs))
    if op == "mean" and _world.size > 1:
        scale = cb.device.library("elementwise").kernel("scale")
        for y in outputs:
            cb.dispatch(scale, groups=ops.groups_for(y.size, 256), threads=256,
                        args=[y, y, {"n": y.size, "s": 1.0 / _world.size}])


def _copy(cb, src: Tensor, dst: Tensor, n: int, src_at: int, dst_at: int) -> None:
    """dst[dst_at:][:n] = src[src_at:][:n], with layout's copy_channels (one sample, one element a
    channel): the copies before `init`. A transport copies with memcpy (on the worker, on the
    stream), without the kernel's divisions per element."""
    k = cb.device.library("layout").kernel("copy_channels")
    cb.dispatch(k, groups=ops.groups_for(n, 256), threads=256,
                args=[src, dst, {"count": n, "channels": n, "inner": 1, "src_channels": src.size, "src_offset": src_at,
                                 "dst_channels": dst.size, "dst_offset": dst_at}])


def _what(tensors: list[Tensor]) -> str:
    """An all-reduce of these tensors, named in errors."""
    return (f"all_reduce of {len(tensors)} tensor{'s' if len(tensors) > 1 else ''} "
            f"({sum(x.nbytes for x in tensors) / 1024:.1f} KiB)")


# ---------------------------------------------------------------- data-parallel training graphs

class DataParallel:
    """An optimizer whose training graphs average every gradient over the ranks before its updates.

    Where a training graph is derived (`loss.training_graph(optimizer=dp)`), it checks that every
    rank has the same parameters (names and shapes, in order: the first difference is an error on
    every rank), broadcasts the parameters, the optimizer's state and step count from rank 0, and
    reduces the gradients in buckets, each in two nodes: an all_reduce_start right after the node
    that computes the bucket's last gradient, so its communication begins as soon as it can, and an
    all_reduce_finish (op="mean") after the backward pass, right before the updates of the bucket's
    parameters; the device computes the rest of the backward pass, and the earlier buckets'
    updates, while the bytes travel. The inner optimizer's updates read the averaged gradients,
    which are also each parameter's `grad`. Every rank must run the same steps.

    Args:
        optimizer: what each rank would train with alone (`mm.optim.SGD`, `mm.optim.Adam`).
        bucket_bytes: gradients are reduced in buckets of about this many bytes (default
            MLMETAL_DISTRIBUTED_BUCKET_BYTES, else 25 MiB, as PyTorch's DistributedDataParallel);
            a larger gradient is a bucket of its own. Overlap needs several buckets.
        module: the module whose parameters these are, if any: the check that the ranks agree
            names parameters by its dotted names (else by the names they carry).
        overlap: False finishes each bucket's reduction right after its start, so the device
            waits for it there (to measure what overlapping gains); default
            MLMETAL_DISTRIBUTED_OVERLAP (0 or 1), else True. The results are the same bit for bit.

    Example:
        >>> mm.distributed.init()
        >>> opt = mm.distributed.DataParallel(mm.optim.Adam(net.parameters(), lr=1e-3))
        >>> train = loss.training_graph(optimizer=opt)
    """

    def __init__(self, optimizer, bucket_bytes: int | None = None, module=None, overlap: bool | None = None):
        if bucket_bytes is None:
            text = os.environ.get("MLMETAL_DISTRIBUTED_BUCKET_BYTES", str(25 << 20))
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"MLMETAL_DISTRIBUTED_BUCKET_BYTES must be a positive integer, got {text!r}")
            bucket_bytes = int(text)
        elif isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, (int, np.integer)) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        if overlap is None:
            text = os.environ.get("MLMETAL_DISTRIBUTED_OVERLAP", "1")
            if text not in ("0", "1"):
                raise ValueError(f"MLMETAL_DISTRIBUTED_OVERLAP must be 0 or 1, got {text!r}")
            overlap = text == "1"
        elif not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        self.optimizer = optimizer
        self.bucket_bytes = int(bucket_bytes)
        self.overlap = overlap
        self._names = {id(p): n for n, p in module.named_parameters().items()} if module is not None else {}
        self.buckets: list = []  # (start, finish) nodes of each bucket, in the order the backward pass reaches them

    @property
    def lr(self) -> float:
        return self.optimizer.lr

    @lr.setter
    def lr(self, value: float) -> None:  # so a schedule (mm.optim.StepDecay) may hold the wrapper
        self.optimizer.lr = value

    @property
    def params(self) -> list:
        return self.optimizer.params

    def prepare_step(self) -> dict:
        """The inner optimizer's step: its update attributes for this step."""
        return self.optimizer.prepare_step()

    def append_updates(self, graph, param_grads: dict) -> list:
        """Check the ranks agree, broadcast rank 0's state, append each bucket's all_reduce_start
        and all_reduce_finish nodes and then the inner optimizer's updates (rebinding
        `param_grads` to the averaged gradients)."""
        world = _require_world("DataParallel")
        mine = {id(p) for p in self.optimizer.params if getattr(p, "trainable", True)}
        order = {n: i for i, n in enumerate(graph.nodes)}
        reduced = [t for t in param_grads if id(t.value) in mine]
        self._check_ranks_agree(world, reduced)
        self._broadcast_state(world)
        reduced.sort(key=lambda t: order.get(param_grads[t].node, -1))  # the order the backward pass computes them
        finishes = []
        for bucket in self._buckets(reduced):
            grads = [param_grads[t] for t in bucket]
            flat = graph.append("all_reduce_start", grads, {})
            start = graph.nodes.pop()
            last = grads[-1].node
            graph.nodes.insert(graph.nodes.index(last) + 1 if last is not None else 0, start)
            out = graph.append("all_reduce_finish", [flat], {"shapes": [t.shape for t in bucket], "op": "mean"})
            finish = out[0].node if isinstance(out, tuple) else out.node
            if not self.overlap:
                graph.nodes.remove(finish)
                graph.nodes.insert(graph.nodes.index(start) + 1, finish)
            finishes.append(finish)
            self.buckets.append((start, finish))
            for t, g in zip(bucket, out if isinstance(out, tuple) else (out,)):
                param_grads[t] = g
        updates = self.optimizer.append_updates(graph, param_grads)
        if self.overlap:  # each bucket's finish, then its updates, in the order the buckets started
            tail = []
            for finish in finishes:
                tail += [finish] + [n for n in updates if any(x.node is finish for x in n.inputs)]
            moved = {id(n) for n in tail}
            graph.nodes[:] = [n for n in graph.nodes if id(n) not in moved] + tail
        return updates

    def _buckets(self, tensors: list) -> list[list]:
        buckets, size = [], self.bucket_bytes  # "full", so the first tensor opens a bucket
        for t in tensors:
            if size + t.nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.nbytes
        return buckets

    def _check_ranks_agree(self, world: World, reduced: list) -> None:
        """Raise on every rank, naming the first difference, unless all ranks reduce the same gradients alike."""
        params = [(self._names.get(id(t.value)) or getattr(t.value, "name", "") or "unnamed", t.shape) for t in reduced]
        mine = (type(self.optimizer).__name__, self.bucket_bytes, params)
        everyone = world.host_allgather(mine, "DataParallel's check that the ranks agree")
        for r, theirs in enumerate(everyone[1:], 1):
            if theirs == everyone[0]:
                continue
            (kind0, bucket0, params0), (kind, bucket, params) = everyone[0], theirs
            if kind != kind0 or bucket != bucket0:
                raise DistributedError(f"DataParallel: rank 0 trains with {kind0} in buckets of {bucket0} bytes, "
                                       f"rank {r} with {kind} in buckets of {bucket} bytes")
            i = next(i for i in range(max(len(params), len(params0))) if params[i:i + 1] != params0[i:i + 1])

            def show(ps):
                return f"`{ps[i][0]}` of shape {ps[i][1]}" if i < len(ps) else "none"

            counts = f" (rank 0 trains {len(params0)}, rank {r} {len(params)})" if len(params) != len(params0) else ""
            raise DistributedError(f"DataParallel: the ranks' parameters differ{counts}: parameter {i} is {show(params0)} "
                                   f"on rank 0, {show(params)} on rank {r}")

    def _broadcast_state(self, world: World) -> None:
        opt = self.optimizer
        for p in opt.params:
            for t in (p, *opt.state[id(p)]):
                broadcast(t, 0)
        opt.steps = world.host_bcast(opt.steps, "the optimizer's step count")
