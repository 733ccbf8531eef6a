"""Eager calls replay the dispatches of an earlier call of the same kind.

An eager call checks its inputs, runs its op's Python encoder (which picks kernels, tilings and
splits) and binds every dispatch, checking it against the kernel's declared extents — 30 to 90 µs
of host time an op on a 2-core cpu, longer than many of its kernels run on a small tensor. All of
it is decided by the op, its inputs' shapes, dtypes and buffer sizes, which inputs share a buffer,
its attributes, the device and the matmul precision policy in force. So the first call of each such kind records
its dispatches as a template — each buffer argument as an input, an output or a temporary the
encoder allocated, each constant as its packed bytes — and later calls of that kind fill the
template with their own buffers and fresh temporaries and commit it, as a graph plan replays a
node (`Plan`). The results are the same bits: the same kernels run with the same arguments.

A call is recorded only where everything it encoded can be told apart so: dispatches without
predicates or host steps, whose buffers are the call's inputs, outputs or temporaries from
`mm.empty` made while it encoded (an encoder that binds any other buffer — one it holds, one it
filled from the host with `mm.tensor`, or the result of an op it ran — is never recorded; a replay
remakes temporaries uninitialised, as `mm.empty` made them), of ops that are `replayable` (not the
random ops, which draw a generator's next numbers).

Under `checking` (the test suite's bounds-checked pass turns it on) each later call encodes afresh
as well and raises if its template differs from the recorded one: a kernel choice that depends on
something the key leaves out shows up there rather than as a stale choice.
"""

from __future__ import annotations

import threading

from ..precision import get_matmul_precision
from ..runtime.device import Dispatch
from ..tensor import empty

checking = False  # encode every call afresh as well, and compare it with the recording (tests)
MAX_RECORDED = 4096  # kinds of call kept; past it the record starts again

UNRECORDABLE = object()  # the recording of a kind of call that cannot be replayed
_recorded: dict = {}
_local = threading.local()  # .current: the recording this thread is encoding in, if any


class Recording:
    """What a call of one kind encodes: its outputs' shapes and dtypes, its attributes as the op
    normalised them, and its dispatches with each buffer argument an index into the call's
    inputs, then its outputs, then its temporaries (their sizes)."""

    __slots__ = ("outputs", "multi", "attrs", "steps", "temporaries")

    def __init__(self, outputs, multi, attrs, steps, temporaries):
        self.outputs, self.multi, self.attrs, self.steps, self.temporaries = outputs, multi, attrs, steps, temporaries

    def run(self, inputs):
        """Allocate the outputs and temporaries and commit the dispatches on them; return the outputs."""
        dev = inputs[0].device
        outs = [empty(shape, dev, dtype) for shape, dtype in self.outputs]
        buffers = [x.buffer for x in inputs] + [o.buffer for o in outs] + [dev.buffer(nbytes=n) for n in self.temporaries]
        cb = dev.command_buffer()
        cb.replay([Dispatch(kernel, groups, threads, [buffers[a] if a.__class__ is int else a for a in args], None)
                   for kernel, groups, threads, args in self.steps])
        cb.commit()
        return tuple(outs) if self.multi else outs[0]

    def same_as(self, other: "Recording") -> bool:
        return (self.outputs == other.outputs and self.multi == other.multi and self.temporaries == other.temporaries
                and len(self.steps) == len(other.steps)
                and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(self.steps, other.steps)))


class _Unkeyed(Exception):
    """An attribute value the key cannot hold exactly."""


def _frozen(v):
    """v as a key part that only equal values of one type share: a float by its bits (0.0 and
    -0.0 differ), and 1, 1.0 and True apart."""
    t = v.__class__
    if t is float:
        return t, v.hex()
    if t is int or t is str or t is bool or v is None:
        return t, v
    if t is tuple or t is list:
        return t, tuple(_frozen(x) for x in v)
    raise _Unkeyed


def key(op, inputs, attrs):
    """The kind of an eager call on `inputs` (device tensors of one device), or None where it is
    not recorded."""
    if not op.replayable or not inputs:
        return None
    try:
        frozen = tuple((k, _frozen(v)) for k, v in attrs.items())
    except _Unkeyed:
        return None
    first: dict[int, int] = {}  # buffer id -> the first input in it
    return (op.name, inputs[0].device, get_matmul_precision(), frozen,
            tuple((x.shape, x.dtype, x.buffer.nbytes) for x in inputs),
            tuple(first.setdefault(id(x.buffer), i) for i, x in enumerate(inputs)) if len(inputs) > 1 else None)


def lookup(k):
    """The Recording of calls of kind `k`, UNRECORDABLE, or None (none yet, or `k` is None)."""
    return None if k is None else _recorded.get(k)


class recording:
    """Around an eager call's encoding: collects the temporaries `mm.empty` makes meanwhile;
    `save` then records the call's dispatches under `k` (None: record nothing)."""

    def __init__(self, k):
        self.key = k
        self.allocated: set[int] = set()

    def __enter__(self):
        self.outer = getattr(_local, "current", None)  # an op run by an encoder records on its own
        _local.current = self
        return self

    def __exit__(self, *exc):
        _local.current = self.outer
        return False

    def save(self, previous, work, inputs, outs, multi, attrs) -> None:
        """Record `work`, the call's dispatches; under `checking`, raise where the kind had a
        recording already and this one differs."""
        if self.key is None:
            return
        got = _template(work, inputs, outs, multi, attrs, self.allocated)
        if checking and previous is not None and (got is None or not got.same_as(previous)):
            raise AssertionError(f"eager replay of {self.key[0]}: this call encoded other dispatches than those "
                                 f"recorded for its kind {self.key!r}; the key leaves out something they depend on")
        if len(_recorded) >= MAX_RECORDED:
            _recorded.clear()
        _recorded[self.key] = UNRECORDABLE if got is None else got


def note_allocation(buffer) -> None:
    """Called by mm.empty: a buffer made while a call encodes is one of its temporaries."""
    current = getattr(_local, "current", None)
    if current is not None:
        current.allocated.add(id(buffer))


def forget() -> None:
    """Drop every recording (tests that change how ops pick their kernels start from none)."""
    _recorded.clear()


def _template(work, inputs, outs, multi, attrs, allocated):
    """The Recording of a call's dispatches, or None where one cannot be made."""
    outs = list(outs) if multi else [outs]
    index: dict[int, int] = {}
    for i, x in enumerate([*inputs, *outs]):
        index.setdefault(id(x.buffer), i)
    temporaries: list[int] = []
    steps = []
    for d in work:
        if d.__class__ is not Dispatch or d.predicate is not None:
            return None
        args = []
        for a in d.args:
            if a.__class__ is bytes:
                args.append(a)
                continue
            i = index.get(id(a))
            if i is None:
                if id(a) not in allocated:
                    return None  # a buffer the call did not make: what it holds would not be there on a replay
                i = index[id(a)] = len(inputs) + len(outs) + len(temporaries)
                temporaries.append(a.nbytes)
            args.append(i)
        steps.append((d.kernel, d.groups, d.threads, tuple(args)))
    return Recording(tuple((o.shape, o.dtype) for o in outs), multi, dict(attrs), tuple(steps), tuple(temporaries))

