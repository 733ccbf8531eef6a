"""Dynamic loss scaling decided on the device (mm.train.LossScaler): steps whose gradients
overflow are skipped by the device with every parameter untouched and the scale backing off,
clean steps grow it, a float16 run whose scale must fall recovers, and steps never wait for the
host to decide."""

import contextlib

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.runtime.device import HostStep
from mlmetal.train import LossScaler


def regression(seed=0):
    """A batch of a linear map scaled by 10: gradients of its summed squared error are in the
    hundreds at first, so a scale of 2¹²⁰ overflows float32 and 2¹¹⁰ does not."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    return {"x": x, "t": (x @ rng.standard_normal((8, 4)).astype(np.float32)) * 10}


def scaled_training(dev, scaler, lr=2e-4, dtype=None, reduction="sum", optimizer="sgd", seed=0, wrap=None):
    """(net, optimizer, graph, training) of a two-layer perceptron, optionally under mm.autocast(dtype);
    `wrap` wraps the optimizer (mm.distributed.DataParallel)."""
    mm.nn.seed(seed)
    net = mm.nn.Sequential(mm.nn.Linear(8, 16, device=dev), mm.nn.ReLU(), mm.nn.Linear(16, 4, device=dev))
    g = mm.Graph(dev)
    x, t = g.input("x", (32, 8)), g.input("t", (32, 4))
    with mm.autocast(dtype) if dtype else contextlib.nullcontext():
        loss = mm.ops.mse_loss(net(x), t, reduction=reduction)
    opt = mm.optim.SGD(net.parameters(), lr=lr) if optimizer == "sgd" else mm.optim.Adam(net.parameters(), lr=lr)
    return net, opt, g, g.training_graph(loss, optimizer=wrap(opt) if wrap else opt, loss_scaler=scaler)


def run(train, net, scaler, data, steps):
    """Take `steps` steps; returns each step's (loss, skipped by the device, parameters unchanged, scale after)."""
    seen = []
    for _ in range(steps):
        before, skipped = [p.numpy() for p in net.parameters()], scaler.skipped_steps
        loss = train.step(**data)
        unchanged = all(np.array_equal(b, p.numpy()) for b, p in zip(before, net.parameters()))
        seen.append((loss, scaler.skipped_steps - skipped, unchanged, scaler.scale))
    return seen


def check_skips(seen, init_scale):
    """A skipped step leaves every parameter bit for bit and halves the scale; any other step
    updates them and keeps the scale (growth_interval is not reached)."""
    scale = init_scale
    for i, (_, skipped, unchanged, after) in enumerate(seen):
        assert skipped in (0, 1), i
        assert unchanged == bool(skipped), f"step {i}: skipped {skipped}, parameters unchanged {unchanged}"
        assert after == (scale / 2 if skipped else scale), f"step {i}: scale {after}, was {scale}"
        scale = after


def test_float32_overflowing_steps_are_skipped_on_the_device_and_training_proceeds(dev):
    scaler = LossScaler(init_scale=2.0**120)
    net, opt, _, train = scaled_training(dev, scaler)
    seen = run(train, net, scaler, regression(), 60)
    check_skips(seen, 2.0**120)
    assert [s[1] for s in seen[:2]] == [1, 1], "2¹²⁰ and 2¹¹⁹ overflow the gradients: the first two steps skip"
    assert not seen[-1][1] and scaler.scale >= 2.0**100
    assert scaler.steps == 60 and scaler.skipped_steps == sum(s[1] for s in seen)
    assert opt.steps == 60 - scaler.skipped_steps  # a skipped step does not count as the optimizer's
    losses = [s[0] for s in seen]
    assert losses[-1] < losses[0] / 20
    assert all(np.isfinite(p.numpy()).all() for p in net.parameters())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_power_of_two_scale_that_fits_trains_bit_for_bit_as_without_one(dev, optimizer):
    """Scaling by 2¹⁰ and unscaling on the device are exact: the same parameters as unscaled training."""
    lr = 2e-4 if optimizer == "sgd" else 1e-2
    data = regression()
    scaler = LossScaler(init_scale=2.0**10)
    net, opt, _, train = scaled_training(dev, scaler, lr=lr, optimizer=optimizer)
    mm.nn.seed(0)
    plain = mm.nn.Sequential(mm.nn.Linear(8, 16, device=dev), mm.nn.ReLU(), mm.nn.Linear(16, 4, device=dev))
    g = mm.Graph(dev)
    loss = mm.ops.mse_loss(plain(g.input("x", (32, 8))), g.input("t", (32, 4)), reduction="sum")
    popt = mm.optim.SGD(plain.parameters(), lr=lr) if optimizer == "sgd" else mm.optim.Adam(plain.parameters(), lr=lr)
    ptrain = g.training_graph(loss, optimizer=popt)
    for _ in range(5):
        assert train.step(**data) == ptrain.step(**data)
    assert scaler.skipped_steps == 0 and opt.steps == popt.steps == 5
    for p, q in zip(net.parameters(), plain.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy() * 2.0**10)  # p.grad: the scaled gradient


def test_adam_does_not_count_the_steps_the_device_skipped(dev):
    """After the skipped steps, Adam's first update is its step 1, as with PyTorch's GradScaler:
    the parameters equal those of an unscaled run of the applied steps alone."""
    data = regression()
    scaler = LossScaler(init_scale=2.0**120)
    net, opt, _, train = scaled_training(dev, scaler, lr=1e-2, optimizer="adam")
    seen = run(train, net, scaler, data, 6)
    applied = sum(not s[1] for s in seen)
    assert 0 < applied < 6 and opt.steps == applied
    mm.nn.seed(0)
    plain = mm.nn.Sequential(mm.nn.Linear(8, 16, device=dev), mm.nn.ReLU(), mm.nn.Linear(16, 4, device=dev))
    g = mm.Graph(dev)
    loss = mm.ops.mse_loss(plain(g.input("x", (32, 8))), g.input("t", (32, 4)), reduction="sum")
    ptrain = g.training_graph(loss, optimizer=mm.optim.Adam(plain.parameters(), lr=1e-2))
    for _ in range(applied):
        ptrain.step(**data)
    for p, q in zip(net.parameters(), plain.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_float16_run_whose_loss_scale_must_fall_recovers(dev):
    """float16 activations under autocast, starting at 2²⁴: the loss's gradient times the scale
    overflows half (65504) in the backward pass, so the device skips the first steps and halves
    the scale until the gradients fit; then training recovers, the master weights float32."""
    scaler = LossScaler(init_scale=2.0**24, growth_interval=1000)
    net, opt, g, train = scaled_training(dev, scaler, lr=0.05, dtype="float16", reduction="mean")
    linears = [n for n in g.nodes if n.op == "linear"]
    assert [n.outputs[0].dtype for n in linears] == [mm.float16] * 2, "the network runs in float16"
    assert all(p.dtype == mm.float32 for p in net.parameters())
    seen = run(train, net, scaler, regression(), 80)
    check_skips(seen, 2.0**24)
    assert seen[0][1] == 1, "2²⁴ times the loss's gradient overflows float16: the first step is skipped"
    # (on cpu: the first 11 steps skip, and the scale is 2⁹ after 80)
    assert 2.0**4 <= scaler.scale <= 2.0**17 and scaler.skipped_steps >= 4
    assert opt.steps == 80 - scaler.skipped_steps
    losses = [s[0] for s in seen]
    assert losses[-1] < losses[0] / 4
    assert all(p.dtype == mm.float32 and np.isfinite(p.numpy()).all() for p in net.parameters())


def test_the_scale_grows_after_growth_interval_clean_steps(dev):
    scaler = LossScaler(init_scale=4.0, growth_factor=2.0, growth_interval=3)
    net, _, _, train = scaled_training(dev, scaler)
    seen = run(train, net, scaler, regression(), 9)
    assert [s[3] for s in seen] == [4, 4, 8, 8, 8, 16, 16, 16, 32]
    assert scaler.skipped_steps == 0 and not any(s[2] for s in seen)


def test_an_overflow_restarts_the_count_of_clean_steps(dev):
    """loss = w² at w = 2 has the gradient 4 whatever the step (lr 0): 2¹²⁵ fits, the growth to
    2¹²⁶ overflows (4·2¹²⁶ = 2¹²⁸) and backs off, and the count to the next growth restarts."""
    net = mm.nn.Linear(1, 1, bias=False, device=dev)
    net.weight.assign([[2.0]])
    g = mm.Graph(dev)
    loss = mm.ops.mse_loss(net(g.input("x", (1, 1))), g.input("t", (1, 1)), reduction="sum")
    scaler = LossScaler(init_scale=2.0**125, growth_interval=2)
    train = g.training_graph(loss, optimizer=mm.optim.SGD(net.parameters(), lr=0.0), loss_scaler=scaler)
    scales, skipped = [], []
    for _ in range(7):
        train.step(x=np.ones((1, 1), np.float32), t=np.zeros((1, 1), np.float32))
        scales.append(int(np.log2(scaler.scale)))
        skipped.append(scaler.skipped_steps)
    assert scales == [125, 126, 125, 125, 126, 125, 125]
    assert skipped == [0, 0, 1, 1, 1, 2, 2]


def test_steps_decide_on_the_device_without_the_host(dev, monkeypatch):
    """20 steps encoded into one command buffer, committed once: the skips, the scale and the
    parameters come out as from 20 `step` calls, with no host step and no wait in between."""
    data = regression()
    a_scaler, b_scaler = LossScaler(init_scale=2.0**120), LossScaler(init_scale=2.0**120)
    a, _, _, a_train = scaled_training(dev, a_scaler)
    b, _, b_graph, b_train = scaled_training(dev, b_scaler)
    for _ in range(20):
        a_train.step(**data)
    plan, bound = b_train.plan(), b_graph.bind_inputs(data)
    waits = []
    monkeypatch.setattr(dev, "synchronize", lambda: waits.append("synchronize"))
    cb = dev.command_buffer()
    for _ in range(20):
        plan.encode(bound, cb, commit_every=0)
    assert not any(isinstance(d, HostStep) for d in cb.since(0))
    assert sum(d.predicate is not None for d in cb.since(0)) == 20 * len(b.parameters())  # the updates
    assert waits == []
    cb.commit()
    cb.wait()
    monkeypatch.undo()
    np.testing.assert_array_equal(b_scaler.numpy(), a_scaler.numpy())
    assert b_scaler.skipped_steps >= 2 and b_scaler.steps == 20
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


@pytest.mark.parametrize("overlap", [True, False])
def test_data_parallel_checks_the_averaged_gradients(dev, monkeypatch, overlap):
    """With mm.distributed.DataParallel (a world of one rank), the checks read the all-reduced
    gradients, after every bucket has finished, and the updates follow the checks: the same
    steps, skips and scale as without it, bit for bit."""
    monkeypatch.setattr(mm.distributed, "_world", None)  # a world of this process alone, forgotten afterwards
    mm.distributed.init()
    data = regression()
    a_scaler, b_scaler = LossScaler(init_scale=2.0**120), LossScaler(init_scale=2.0**120)
    a, a_opt, _, a_train = scaled_training(dev, a_scaler)
    made = []

    def data_parallel(opt):
        made.append(mm.distributed.DataParallel(opt, bucket_bytes=300, overlap=overlap))  # three buckets
        return made[0]

    b, b_opt, b_graph, b_train = scaled_training(dev, b_scaler, wrap=data_parallel)
    nodes = b_graph.nodes
    finishes = [nodes.index(finish) for _, finish in made[0].buckets]
    checks = [i for i, n in enumerate(nodes) if n.op == "predicate_finite"]
    assert len(made[0].buckets) > 1 and max(finishes) < min(checks)
    assert all(nodes[i].inputs[0].node.op == "all_reduce_finish" for i in checks)
    assert max(checks) < min(nodes.index(n) for n in b_train.update_nodes)
    for _ in range(8):
        a_train.step(**data)
        b_train.step(**data)
    np.testing.assert_array_equal(b_scaler.numpy(), a_scaler.numpy())
    assert b_scaler.skipped_steps >= 2 and a_opt.steps == b_opt.steps == 8 - b_scaler.skipped_steps
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


def test_the_scaled_graph_and_its_plan(dev):
    """The backward pass starts from the scale; one check per updated parameter, before every
    update; the updates predicated by the finite word and unscaling; the scale update last.
    Running the graph for inference runs none of it."""
    scaler = LossScaler()
    net, _, g, train = scaled_training(dev, scaler)
    ops = [n.op for n in g.nodes]
    assert "initial_gradient" not in ops and ops.index("loss_scale_gradient") == ops.index("mse_loss") + 1
    checks = [i for i, op in enumerate(ops) if op == "predicate_finite"]
    updates = [i for i, op in enumerate(ops) if op == "sgd_update"]
    assert len(checks) == len(updates) == len(net.parameters()) and max(checks) < min(updates)
    assert ops[-1] == "loss_scale_update"
    for n in train.update_nodes:
        assert n.predicate.buffer is scaler.state.buffer and n.predicate.offset == 4
        assert n.attrs["loss_scale"] is scaler.state
    assert {id(g.nodes[i].inputs[0]) for i in checks} == {id(n.inputs[1]) for n in train.update_nodes}
    g.run(regression(), [train.loss])
    assert scaler.steps == 0


def test_eagerly_scale_loss_and_step(dev):
    """Without a graph: the gradient of `scale_loss(loss)` is the scaled one, and `step` skips
    an overflowing update on the device, backing off, as a training graph's step does."""
    rng = np.random.default_rng(0)
    x, t = mm.tensor(rng.standard_normal((16, 3)).astype(np.float32), dev), mm.tensor(np.ones((16, 2)), dev)
    w = mm.nn.Parameter(rng.standard_normal((3, 2)).astype(np.float32), dev)
    scaler = LossScaler(init_scale=2.0**126)
    value_and_grad = mm.value_and_grad(lambda w, x, t: scaler.scale_loss(mm.ops.mse_loss(x @ w, t, reduction="sum")))
    opt = mm.optim.SGD([w], lr=1e-3)
    seen = []
    for _ in range(12):
        before = w.numpy()
        loss, w.grad = value_and_grad(w, x, t)
        scaler.step(opt)
        seen.append((float(loss.numpy()[0]) / scaler.scale if not np.array_equal(before, w.numpy()) else None))
    assert seen[0] is None and scaler.skipped_steps >= 1 and scaler.steps == 12
    applied = [s for s in seen if s is not None]
    assert len(applied) == 12 - scaler.skipped_steps and applied[-1] < applied[0]
    words = scaler.numpy()
    with pytest.raises(mm.ShapeError, match="grad has shape"):
        w.grad = mm.tensor(np.zeros(3), dev)
        scaler.step(opt)
    np.testing.assert_array_equal(scaler.numpy(), words)  # nothing encoded


def test_a_scaled_training_graph_saves_its_forward_graph(dev, tmp_path):
    """mm.save keeps the forward graph and the optimizer: the scale's seed, checks and update are
    the training step's machinery (the scaler's state is not saved, as GradScaler's is not a model's)."""
    scaler = LossScaler()
    net, opt, g, train = scaled_training(dev, scaler, optimizer="adam")
    train.step(**regression())
    mm.save(tmp_path / "model", g, opt)
    loaded = mm.load(tmp_path / "model", device=dev)
    assert [n.op for n in loaded.graph.nodes] == ["linear", "relu", "linear", "mse_loss"]


def test_loss_scaler_errors(dev):
    for bad in (0.0, -1.0, float("inf"), 1e39, "big"):
        with pytest.raises(ValueError, match="init_scale"):
            LossScaler(init_scale=bad)
    with pytest.raises(ValueError, match="growth_factor"):
        LossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval"):
        LossScaler(growth_interval=0)
    net = mm.nn.Linear(3, 2, device=dev)
    g = mm.Graph(dev)
    loss = mm.ops.mse_loss(net(g.input("x", (4, 3))), g.input("t", (4, 2)))
    with pytest.raises(mm.GraphError, match="needs an optimizer"):
        g.training_graph(loss, loss_scaler=LossScaler())
    with pytest.raises(mm.GraphError, match="no source_gradient"):
        g.training_graph(loss, source_gradient=mm.ops.initial_gradient(loss),
                         optimizer=mm.optim.SGD(net.parameters(), lr=0.1), loss_scaler=LossScaler())


def test_loss_scaler_reads_its_state(dev):
    scaler = LossScaler(init_scale=1024.0)
    assert (scaler.scale, scaler.skipped_steps, scaler.steps) == (1024.0, 0, 0)
    assert scaler.numpy().dtype == np.uint32 and scaler.numpy()[1] == 1
    assert "scale=1024.0" in repr(scaler)
