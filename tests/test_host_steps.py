"""Host steps (`cb.host_step`): host work at its place in the device's order, as mm.distributed's
collectives are encoded."""

import numpy as np
import pytest

import mlmetal as mm


def times_ten(dev, buf, n):
    """A host step multiplying the n floats of `buf` by 10 at its place in the queue: on cpu it
    does so itself; on cuda it enqueues the work on the device's stream, as a host step must."""
    if dev.name == "cuda":
        import cupy

        def step():
            with dev.stream:
                view = cupy.ndarray((n,), cupy.float32, buf._mem)  # the buffer's own memory
                view *= 10
        return step

    def step():
        buf.numpy(np.float32)[:n] *= 10
    return step


def test_host_step_runs_between_the_work_before_and_after_it(dev):
    n = 1000
    x = np.arange(n, dtype=np.float32)
    xb, yb = dev.buffer(x), dev.buffer(np.ones(n, np.float32))
    axpy = dev.library("elementwise").kernel("axpy")
    cb = dev.command_buffer()
    for i in range(3):  # y = 2x + y, then ×10, then 2x + y again, and again ×10 and 2x + y
        if i:
            cb.host_step(times_ten(dev, yb, n), "times ten")
        cb.dispatch(axpy, groups=(n + 255) // 256, threads=256, args=[xb, yb, {"n": n, "a": 2.0}])
    cb.commit()
    cb.wait()
    expected = ((2 * x + 1) * 10 + 2 * x) * 10 + 2 * x
    np.testing.assert_array_equal(yb.numpy(np.float32), expected)


def test_host_steps_replay_with_the_dispatches_around_them(dev):
    n = 64
    xb, yb = dev.buffer(np.ones(n, np.float32)), dev.buffer(np.zeros(n, np.float32))
    axpy = dev.library("elementwise").kernel("axpy")
    cb = dev.command_buffer()
    mark = cb.encoded()
    cb.dispatch(axpy, groups=1, threads=64, args=[xb, yb, {"n": n, "a": 1.0}])
    cb.host_step(times_ten(dev, yb, n), "times ten")
    recorded = cb.since(mark)
    cb.commit_and_continue()
    cb.replay(recorded)
    cb.commit()
    cb.wait()
    np.testing.assert_array_equal(yb.numpy(np.float32), np.full(n, 110, np.float32))  # (0+1)·10, (10+1)·10


def test_a_failing_host_step_fails_its_commit_and_stops_the_work_after_it():
    dev = mm.device("cpu")  # on cuda a step runs while committing, so its error is the commit's
    n = 64
    xb, yb = dev.buffer(np.ones(n, np.float32)), dev.buffer(np.zeros(n, np.float32))
    axpy = dev.library("elementwise").kernel("axpy")

    def fail():
        raise RuntimeError("the collective failed")

    cb = dev.command_buffer()
    cb.host_step(fail, "all_reduce")
    cb.dispatch(axpy, groups=1, threads=64, args=[xb, yb, {"n": n, "a": 1.0}])
    cb.commit()
    with pytest.raises(mm.ExecutionError, match="the collective failed"):
        cb.wait()
    np.testing.assert_array_equal(yb.numpy(np.float32), np.zeros(n, np.float32))


def test_a_host_step_may_leave_a_poll_the_worker_calls_between_the_dispatches_after_it():
    dev = mm.device("cpu")  # (cuda ignores what a step returns: its collectives progress by themselves)
    n = 64
    xb, yb = dev.buffer(np.ones(n, np.float32)), dev.buffer(np.zeros(n, np.float32))
    axpy = dev.library("elementwise").kernel("axpy")
    seen = []

    def poll():  # what y holds each time the worker polls; done once it has seen y reach 2
        seen.append(float(yb.numpy(np.float32)[0]))
        return seen[-1] >= 2

    cb = dev.command_buffer()
    cb.host_step(lambda: poll, "start")
    for _ in range(4):
        cb.dispatch(axpy, groups=1, threads=64, args=[xb, yb, {"n": n, "a": 1.0}])
        cb.commit_and_continue()  # polls carry over from one commit to the next
    cb.commit()
    cb.wait()
    assert seen == [0, 1, 2]  # before the 1st, 2nd and 3rd axpy; not again once done


def test_host_step_refused_once_committed(dev):
    cb = dev.command_buffer()
    cb.commit()
    with pytest.raises(mm.DispatchError, match="committed"):
        cb.host_step(lambda: None, "step")
