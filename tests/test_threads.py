"""Threads: one graph, one op or one command buffer per thread from several threads at once give
the results of running them one after another (issue 20, row 2)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

import mlmetal as mm

THREADS = 4
RUNS = 24  # per thread


def in_threads(fn, jobs):
    """fn(job) for every job, THREADS at a time; results in job order."""
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(fn, jobs))


def small_cnn(dev, seed=0):
    mm.nn.seed(seed)
    return mm.nn.Sequential(mm.nn.Conv2d(2, 4, 3, padding=1, device=dev), mm.nn.ReLU(),
                            mm.nn.Conv2d(4, 2, 3, padding=1, device=dev))


def batches(n, shape=(2, 2, 8, 8)):
    rng = np.random.default_rng(1)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def test_one_graph_run_from_threads(dev):
    net = small_cnn(dev)
    g = mm.Graph(dev)
    y = mm.ops.max_pool2d(mm.ops.tanh(net(g.input("x", (2, 2, 8, 8)))), 2)
    xs = batches(THREADS * RUNS)
    serial = [g.run({"x": x}, outputs=[y])[0] for x in xs]
    threaded = in_threads(lambda x: g.run({"x": x}, outputs=[y])[0], xs)
    for i, (a, b) in enumerate(zip(serial, threaded)):
        np.testing.assert_array_equal(b, a, err_msg=f"run {i}")


def test_eager_ops_from_threads(dev):
    w = mm.tensor(np.random.default_rng(2).standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3, dev)

    def forward(x):
        h = mm.ops.relu(mm.ops.conv2d(mm.tensor(x, dev), w, padding=1))
        return mm.ops.mse_loss(mm.ops.avg_pool2d(h, 2), mm.ops.max_pool2d(h, 2), reduction="none").numpy()

    xs = batches(THREADS * RUNS)
    serial = [forward(x) for x in xs]
    for i, (a, b) in enumerate(zip(serial, in_threads(forward, xs))):
        np.testing.assert_array_equal(b, a, err_msg=f"run {i}")


def test_one_command_buffer_per_thread(dev):
    k = dev.library("elementwise").kernel("axpy")
    n = 4099

    def axpy(a):
        x = dev.buffer(np.arange(n, dtype=np.float32))
        y = dev.buffer(np.ones(n, np.float32))
        cb = dev.command_buffer()
        for _ in range(5):
            cb.dispatch(k, groups=(n + 255) // 256, threads=256, args=[x, y, {"n": n, "a": float(a)}])
            cb.commit_and_continue()
        cb.commit()
        cb.wait()
        return y.numpy(np.float32)[:n].copy()

    for a, got in zip(range(THREADS * RUNS), in_threads(axpy, range(THREADS * RUNS))):
        np.testing.assert_array_equal(got, 1 + 5 * a * np.arange(n, dtype=np.float32), err_msg=f"a = {a}")


def test_training_steps_from_threads_on_one_graph(dev):
    """Every thread steps on the same batch, so whatever the order the steps are those of one serial
    run: the same losses (as a multiset) and the same final parameters and optimizer state."""
    x, target = batches(2)

    def setup():
        net = small_cnn(dev, seed=3)
        g = mm.Graph(dev)
        loss = mm.ops.mse_loss(net(g.input("x", x.shape)), g.input("t", x.shape), reduction="mean")
        opt = mm.optim.Adam(net.parameters(), lr=1e-2)
        return net, opt, loss.training_graph(optimizer=opt)

    steps = THREADS * 8
    net, opt, train = setup()
    serial = [train.step(x=x, t=target) for _ in range(steps)]
    expected = {n: p.numpy() for n, p in net.named_parameters().items()}

    net, opt, train = setup()
    threaded = in_threads(lambda _: train.step(x=x, t=target), range(steps))
    assert sorted(threaded) == sorted(serial)
    assert opt.steps == steps
    for n, p in net.named_parameters().items():
        np.testing.assert_array_equal(p.numpy(), expected[n], err_msg=n)
