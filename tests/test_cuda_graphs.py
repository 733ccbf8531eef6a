"""The cuda backend runs a commit of the same dispatch objects as one CUDA graph from its second
time on (CudaDevice._graph_for): the results must be the per-kernel launches' bit for bit, work
seen once must never match a graph captured for other dispatches, and a graph reads its buffers
when it runs, not when it was captured."""

import numpy as np
import pytest

import mlmetal as mm
from test_graph import replay_network

pytestmark = pytest.mark.skipif(mm.available("cuda") is not None,
                                reason=f"needs the cuda backend: {mm.available('cuda')}")


@pytest.fixture
def cuda(monkeypatch):
    dev = mm.device("cuda")
    monkeypatch.setattr(dev, "graphs", True)
    return dev


def axpy_twice(dev, x, y, a):
    """A command buffer of two dispatches: y += a·x, twice."""
    cb = dev.command_buffer()
    k = dev.library("elementwise").kernel("axpy")
    for _ in range(2):
        cb.dispatch(k, groups=(x.nbytes // 4 + 255) // 256, threads=256, args=[x, y, {"n": x.nbytes // 4, "a": a}])
    return cb


def test_training_steps_on_graphs_equal_kernel_launches(cuda, monkeypatch):
    """A training graph (conv, norm, pooling, concat, Gram, a fresh random input, a predicated
    block, Adam) over steps that replay, then read another input buffer, then the first again."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(2))
    results = []
    for graphs in (False, True):
        monkeypatch.setattr(cuda, "graphs", graphs)
        before = cuda.graph_launches
        g, train, params = replay_network(cuda, True)
        xa, xb = mm.tensor(a, cuda), mm.tensor(b, cuda)
        losses = [train.step(x=x, commit_every=4) for x in (xa, xa, xa, xb, xb, xa, xa)]
        results.append((losses, [p.numpy() for p in params], cuda.graph_launches - before))
    (loss_a, params_a, launched_a), (loss_b, params_b, launched_b) = results
    assert launched_a == 0 and launched_b > 0
    assert loss_a == loss_b and len(set(loss_b)) == len(loss_b)
    for pa, pb in zip(params_a, params_b):
        np.testing.assert_array_equal(pa, pb)


def test_a_graph_reads_its_buffers_when_it_runs(cuda):
    x = mm.tensor(np.arange(1000, dtype=np.float32), cuda)
    y = mm.tensor(np.zeros(1000, np.float32), cuda)
    cb = axpy_twice(cuda, x.buffer, y.buffer, 0.5)
    recorded = cb.since(0)
    cb.commit()
    cb.wait()
    before = cuda.graph_launches
    for step in range(1, 5):
        x.buffer.write(np.full(1000, step, np.float32))  # new contents before every run
        cb = cuda.command_buffer()
        cb.replay(recorded)
        cb.commit()
        cb.wait()
        y_want = np.arange(1000, dtype=np.float32) + sum(float(s) for s in range(1, step + 1))
        np.testing.assert_array_equal(y.numpy(), y_want)
    assert cuda.graph_launches - before == 4  # captured at the second commit, launched then and on every later one


def test_fresh_dispatches_never_run_a_graph(cuda):
    """Eager work binds new dispatch objects every time: no graph, and every result its own."""
    before = cuda.graph_launches
    for step in range(6):
        x = mm.tensor(np.full(777, step, np.float32), cuda)
        y = mm.tensor(np.ones(777, np.float32), cuda)
        cb = axpy_twice(cuda, x.buffer, y.buffer, 2.0)
        cb.commit()
        cb.wait()
        np.testing.assert_array_equal(y.numpy(), np.full(777, 1 + 4 * step, np.float32))
    assert cuda.graph_launches == before


def test_graphs_captured_while_other_threads_step_and_read(cuda, monkeypatch):
    """Three threads train their own network (each commit of their replayed steps a graph from its
    second time on) and read parameters between steps: a capture on the shared stream must not
    break another thread's wait, and each network ends as it does trained alone without graphs."""
    import threading

    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(3)]

    def train(net, x, out, i):
        try:
            _, step, params = net
            xt = mm.tensor(x, cuda)
            losses = []
            for _ in range(6):
                losses.append(step.step(x=xt, commit_every=4))
                params[0].numpy()  # a wait on the stream, between other threads' captures
            out[i] = (losses, [p.numpy() for p in params])
        except BaseException as e:  # reported by the main thread
            out[i] = e

    results = {}
    for graphs in (False, True):
        monkeypatch.setattr(cuda, "graphs", graphs)
        nets = [replay_network(cuda, True) for _ in inputs]  # built in turn: mm.nn.seed is global
        out = [None] * len(nets)
        if graphs:
            threads = [threading.Thread(target=train, args=(n, x, out, i)) for i, (n, x) in enumerate(zip(nets, inputs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i, (n, x) in enumerate(zip(nets, inputs)):
                train(n, x, out, i)
        for r in out:
            if isinstance(r, BaseException):
                raise r
        results[graphs] = out
    for (loss_a, params_a), (loss_b, params_b) in zip(results[False], results[True]):
        assert loss_a == loss_b
        for pa, pb in zip(params_a, params_b):
            np.testing.assert_array_equal(pa, pb)
