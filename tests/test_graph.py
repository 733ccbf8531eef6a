"""The tape: derived training graphs against finite differences, stop-gradient, node handlers, execution."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal import ops


def reference_run(graph: mm.Graph, inputs: dict, overrides: dict | None = None, upto=None) -> dict:
    """Evaluate the graph's forward nodes with the float64 references (parameters may be overridden)."""
    overrides = overrides or {}
    vals = {}
    for name, t in graph.inputs.items():
        vals[t] = np.asarray(inputs[name], np.float64)
    for t in graph.leaves.values():
        vals[t] = overrides.get(id(t.value), t.value.numpy().astype(np.float64))
    for n in graph.nodes:
        if upto is not None and n is upto:
            break
        out = ops.REGISTRY[n.op].reference(*[vals[x] for x in n.inputs], **n.attrs)
        for o, v in zip(n.outputs, out if isinstance(out, tuple) else (out,)):
            vals[o] = np.asarray(v, np.float64)
    return vals


def fd_gradient(graph, loss, inputs, param, eps=1e-3, first_grad_node=None):
    base = param.numpy().astype(np.float64)
    grad = np.zeros_like(base)
    for j in range(base.size):
        vals = []
        for sign in (1, -1):
            p = base.copy()
            p.flat[j] += sign * eps
            vals.append(reference_run(graph, inputs, {id(param): p}, upto=first_grad_node)[loss].sum())
        grad.flat[j] = (vals[0] - vals[1]) / (2 * eps)
    return grad


# ---------------------------------------------------------------- drawn networks

@st.composite
def image_network(draw):
    """A small random CNN with fan-out, concat and a Gram-matrix loss; returns (graph, loss, inputs, params)."""
    mm.nn.seed(draw(st.integers(0, 1000)))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    dev = mm.device()
    n, c, hw = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([4, 6]))
    g = mm.Graph(dev)
    x = g.input("x", (n, c, hw, hw))
    layers = []
    h = x
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "norm", "act", "fanout_add", "fanout_concat", "pool"]))
        if kind == "conv":
            cout = draw(st.integers(1, 3))
            conv = mm.nn.Conv2d(h.shape[1], cout, 3, padding=1, device=dev)
            layers.append(conv)
            h = conv(h)
        elif kind == "norm":
            norm = mm.nn.InstanceNorm2d(h.shape[1], device=dev)
            norm.weight.assign(rng.uniform(0.5, 1.5, h.shape[1]))
            norm.bias.assign(rng.uniform(-0.5, 0.5, h.shape[1]))
            layers.append(norm)
            h = norm(h)
        elif kind == "act":
            h = getattr(mm.ops, draw(st.sampled_from(["tanh", "sigmoid", "relu"])))(h)
        elif kind == "pool" and h.shape[2] % 2 == 0 and h.shape[2] >= 4:
            h = mm.ops.avg_pool2d(h, 2)
        elif kind.startswith("fanout"):
            conv = mm.nn.Conv2d(h.shape[1], h.shape[1], 1, device=dev)
            layers.append(conv)
            other = mm.ops.tanh(conv(h))
            h = mm.ops.add(h, other) if kind == "fanout_add" else mm.ops.concat([h, other])
    if not layers:
        conv = mm.nn.Conv2d(h.shape[1], 2, 3, padding=1, device=dev)
        layers.append(conv)
        h = conv(h)
    gram = mm.ops.gram(h, alpha=1.0 / (h.shape[2] * h.shape[3]))
    target = mm.tensor(rng.standard_normal(gram.shape).astype(np.float32) * 0.1, dev)
    loss = mm.ops.mse_loss(gram, target, reduction="sum")
    inputs = {"x": rng.standard_normal(x.shape).astype(np.float32)}
    params = [p for layer in layers for p in layer.parameters()]
    return g, loss, inputs, params


@given(net=image_network())
def test_training_graph_gradients_match_finite_differences(net):
    g, loss, inputs, params = net
    forward_nodes = len(g.nodes)
    train = loss.training_graph()
    first_grad = g.nodes[forward_nodes]
    got = train.step(**inputs)
    ref = reference_run(g, inputs, upto=first_grad)[loss].sum()
    assert got == pytest.approx(ref, rel=1e-3, abs=1e-4)
    for p in params:
        fd = fd_gradient(g, loss, inputs, p, first_grad_node=first_grad)
        np.testing.assert_allclose(p.grad.numpy(), fd, rtol=2e-2, atol=2e-3 * max(1.0, np.abs(fd).max()),
                                   err_msg=f"gradient of {p.shape}")


def mlp(dev, sizes, seed=0):
    mm.nn.seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [mm.nn.Linear(a, b, device=dev), mm.nn.Tanh()]
    return mm.nn.Sequential(*layers[:-1])


def test_vector_network_with_softmax_cross_entropy(dev):
    net = mlp(dev, [5, 7, 3], seed=1)
    g = mm.Graph(dev)
    x = g.input("x", (4, 5))
    labels = g.input("labels", (4, 3))
    loss = mm.ops.softmax_cross_entropy_loss(net(x), labels, reduction="mean")
    train = loss.training_graph()
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((4, 5)).astype(np.float32), "labels": np.eye(3, dtype=np.float32)[[0, 2, 1, 2]]}
    first_grad = g.nodes[len(g.nodes) - len(train.gradient_nodes)]
    train.step(**inputs)
    for p in net.parameters():
        fd = fd_gradient(g, loss, inputs, p, first_grad_node=first_grad)
        np.testing.assert_allclose(p.grad.numpy(), fd, rtol=1e-2, atol=1e-4)


# ---------------------------------------------------------------- stop_gradient and node handlers

def two_layer_image_graph(dev):
    mm.nn.seed(3)
    first = mm.nn.Conv2d(2, 3, 3, padding=1, device=dev)
    second = mm.nn.Conv2d(3, 2, 3, padding=1, device=dev)
    g = mm.Graph(dev)
    x = g.input("x", (1, 2, 5, 5))
    target = g.input("t", (1, 2, 5, 5))
    h = mm.ops.relu(first(x))
    y = second(h)
    loss = mm.ops.mse_loss(y, target, reduction="mean")
    inputs = {"x": np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32),
              "t": np.zeros((1, 2, 5, 5), np.float32)}
    return g, first, second, h, loss, inputs


def test_stop_gradient_cuts_everything_upstream(dev):
    g, first, second, h, loss, inputs = two_layer_image_graph(dev)
    h.stop_gradient = True
    opt = mm.optim.SGD(first.parameters() + second.parameters(), lr=0.1)
    before = {id(p): p.numpy() for p in first.parameters() + second.parameters()}
    train = loss.training_graph(optimizer=opt)
    # gradient nodes only for what is downstream of the cut: the loss and the second conv
    assert {n.gradient_of.op for n in train.gradient_nodes} <= {"mse_loss", "conv2d"}
    assert all(n.gradient_of.inputs[0] is not h or n.op != "conv2d_input_grad" for n in train.gradient_nodes)
    assert not any(n.gradient_of.op == "relu" for n in train.gradient_nodes)
    assert {id(n.inputs[0].value) for n in train.update_nodes} == {id(p) for p in second.parameters()}
    train.step(**inputs)
    for p in first.parameters():
        np.testing.assert_array_equal(p.numpy(), before[id(p)])
    assert any(not np.array_equal(p.numpy(), before[id(p)]) for p in second.parameters())


def test_transfer_learning_updates_only_the_last_layer(dev):
    g, first, second, h, loss, inputs = two_layer_image_graph(dev)
    first.freeze()
    opt = mm.optim.Adam(first.parameters() + second.parameters(), lr=1e-2)
    train = loss.training_graph(optimizer=opt)
    before = [p.numpy() for p in first.parameters()]
    losses = [train.step(**inputs) for _ in range(5)]
    assert losses[-1] < losses[0]
    for p, b in zip(first.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)
    assert len(train.update_nodes) == len(second.parameters())


def test_unfreeze_leaves_running_statistics_untrained(dev):
    norm = mm.nn.BatchNorm2d(3, device=dev)
    net = mm.nn.Sequential(mm.nn.Conv2d(2, 3, 3, device=dev), norm)
    stats = {id(norm.running_mean), id(norm.running_var)}
    net.freeze()
    assert not any(p.trainable for p in net.parameters())
    net.unfreeze()
    assert [p.trainable for p in net.parameters() if id(p) not in stats] == [True] * 4
    assert not norm.running_mean.trainable and not norm.running_var.trainable


def test_node_handler_sees_every_created_node_once_and_dropping_prunes(dev):
    g, first, second, h, loss, inputs = two_layer_image_graph(dev)
    seen = []
    train = loss.training_graph(node_handler=seen.append)
    assert seen == train.gradient_nodes and len({id(n) for n in seen}) == len(seen)
    assert all(n in g.nodes for n in seen)

    g2, first2, second2, h2, loss2, inputs2 = two_layer_image_graph(dev)
    # drop the input gradient of the second conv: nothing reaches the first layer any more
    train2 = loss2.training_graph(node_handler=lambda n: n.op != "conv2d_input_grad")
    assert not any(n.op == "conv2d_input_grad" for n in g2.nodes)
    assert set(map(id, train2.parameters)) >= {id(p) for p in second2.parameters()}
    assert not {id(p) for p in first2.parameters()} & set(map(id, train2.parameters))
    train2.step(**inputs2)


def test_fan_out_inserts_one_addition(dev):
    w = mm.nn.Parameter(np.full((2, 3), 0.5, np.float32), dev)
    g = mm.Graph(dev)
    x = g.input("x", (2, 3))
    a = mm.ops.mul(x, w)
    y = mm.ops.add(mm.ops.tanh(a), mm.ops.sigmoid(a))  # a fans out
    loss = mm.ops.mse_loss(y, mm.tensor(np.zeros((2, 3)), dev), reduction="sum")
    train = loss.training_graph()
    adds = [n for n in train.gradient_nodes if n.op == "add" and n.gradient_of.op in ("tanh", "sigmoid")]
    assert len(adds) == 1


# ---------------------------------------------------------------- execution and errors

def test_run_errors_name_the_problem(dev):
    g = mm.Graph(dev)
    x = g.input("x", (2, 3))
    y = mm.ops.relu(x)
    with pytest.raises(mm.GraphError, match="missing x"):
        g.run({}, outputs=[y])
    with pytest.raises(mm.GraphError, match="unknown z"):
        g.run({"x": np.zeros((2, 3)), "z": 1}, outputs=[y])
    with pytest.raises(mm.GraphError, match=r"shape \(3, 2\); the graph declared \(2, 3\)"):
        g.run({"x": np.zeros((3, 2))}, outputs=[y])
    with pytest.raises(mm.GraphError, match="depends on no trainable parameter"):
        mm.ops.mse_loss(y, mm.tensor(np.zeros((2, 3)), dev)).training_graph()


def test_lifetime_planning_shares_memory_and_plans_are_reused(dev):
    g = mm.Graph(dev)
    x = g.input("x", (64, 64))
    h = x
    for _ in range(8):
        h = mm.ops.tanh(mm.ops.scale(h, s=0.5))
    planned = g.plan((h,))
    unplanned = g.plan((h,), plan_lifetimes=False)
    assert planned.peak_bytes <= 3 * 64 * 64 * 4 < unplanned.peak_bytes == 16 * 64 * 64 * 4
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    ref = a.astype(np.float64)
    for _ in range(8):
        ref = np.tanh(ref * 0.5)
    for commit_every in (0, 1, 3):
        np.testing.assert_allclose(g.run({"x": a}, outputs=[h], commit_every=commit_every)[0], ref, rtol=1e-5, atol=1e-6)
    assert g.plan((h,)) is planned


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 6), st.integers(1, 9)), min_size=1, max_size=40))
def test_both_packings_keep_lives_apart(spans):
    """Packing in order and by size: tensors whose lives overlap never share a slot, a slot holds
    each of its tensors, and the slots hold at least what is live at any one time."""
    from mlmetal.graph import execution as E
    lives = {f"t{i}": (first, first + length, 4 * words) for i, (first, length, words) in
             enumerate(sorted(spans, key=lambda s: s[0]))}  # in the order their nodes would run
    packings = [E._pack_in_order(lives), E._pack_by_size(lives)]
    for slots, sizes in packings:
        assert set(slots) == set(lives)
        for t, (first, last, nbytes) in lives.items():
            assert sizes[slots[t]] >= nbytes
            for u, (f, l, _) in lives.items():
                assert u == t or slots[u] != slots[t] or l < first or last < f, (t, u)
        assert sum(sizes) >= max(sum(n for f, l, n in lives.values() if f <= i <= l) for i in range(40))


def test_a_training_plan_keeps_the_smaller_packing(dev):
    """The denoiser's U-Net step at 32²: packing by size needs less than packing in order, and the
    plan takes it."""
    from mlmetal.apps import denoise
    from mlmetal.graph import execution as E
    mm.nn.seed(0)
    train = denoise.training_graph(denoise.UNet(8, 2, dev), 2, 32, lr=1e-3, log_weight=0.5)
    plan = train.plan()
    lives = E._lives(plan.nodes, set(plan.outputs), True)
    in_order, by_size = (sum(pack(lives)[1]) for pack in (E._pack_in_order, E._pack_by_size))
    assert plan.peak_bytes == min(in_order, by_size) and by_size < in_order


def test_step_decay_halves_the_learning_rate():
    w = mm.nn.Parameter(np.zeros(3, np.float32), "cpu")
    opt = mm.optim.SGD([w], lr=0.8)
    sched = mm.optim.StepDecay(opt, every=10)
    assert [sched.epoch(e) for e in (0, 9, 10, 25)] == [0.8, 0.8, 0.4, 0.2]


def test_style_transfer_loss_matches_float64_reference(dev):
    """A transformer net scored by a VGG-like loss net: Gram style losses at three layers plus a content loss."""
    rng = np.random.default_rng(7)
    mm.nn.seed(11)
    transformer = mm.nn.Sequential(mm.nn.Conv2d(3, 4, 3, padding=1, device=dev), mm.nn.InstanceNorm2d(4, device=dev),
                                   mm.nn.ReLU(), mm.nn.Conv2d(4, 3, 3, padding=1, device=dev))
    loss_net = [mm.nn.Conv2d(3, 4, 3, padding=1, device=dev), mm.nn.Conv2d(4, 6, 3, padding=1, device=dev),
                mm.nn.Conv2d(6, 8, 3, padding=1, device=dev)]
    for layer in loss_net:
        layer.freeze()  # fixed features, as with pretrained VGG
    g = mm.Graph(dev)
    x = g.input("content", (1, 3, 8, 8))
    y = transformer(x)

    def features(img):
        out, h = [], img
        for i, conv in enumerate(loss_net):
            h = mm.ops.relu(conv(h))
            out.append(h)
            if i < len(loss_net) - 1:
                h = mm.ops.avg_pool2d(h, 2) if i == 0 else h
        return out

    fy, fx = features(y), features(x)
    terms = []
    for f in fy:
        alpha = 1.0 / (f.shape[2] * f.shape[3])
        style_target = mm.tensor(rng.standard_normal((1, f.shape[1], f.shape[1])).astype(np.float32) * 0.05, dev)
        terms.append(mm.ops.mse_loss(mm.ops.gram(f, alpha=alpha), style_target, reduction="sum", weight=10.0))
    content = fx[1]
    content.stop_gradient = True
    terms.append(mm.ops.mse_loss(fy[1], content, reduction="mean"))
    total = terms[0]
    for t in terms[1:]:
        total = mm.ops.add(total, t)
    n_forward = len(g.nodes)
    train = total.training_graph()
    inputs = {"content": rng.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    got = train.step(**inputs)
    first_grad = g.nodes[n_forward]
    ref = reference_run(g, inputs, upto=first_grad)[total].sum()
    assert got == pytest.approx(ref, rel=1e-4)
    assert not any(id(p) in {id(q) for q in train.parameters} for layer in loss_net for p in layer.parameters())
    for p in transformer.parameters():
        fd = fd_gradient(g, total, inputs, p, eps=1e-6, first_grad_node=first_grad)  # small: ReLU kinks
        np.testing.assert_allclose(p.grad.numpy(), fd, rtol=1e-2, atol=1e-3 * max(1.0, np.abs(fd).max()))


def test_predicated_block_runs_only_when_the_predicate_is_nonzero(dev):
    flags = dev.buffer(np.array([1, 0], np.uint32))
    g = mm.Graph(dev)
    x = g.input("x", (3, 4))
    with g.predicated(mm.Predicate(flags, 0)):
        on = mm.ops.scale(x, s=2.0)
    with g.predicated((flags, 4)):
        off = mm.ops.scale(x, s=3.0)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    got_on, got_off = g.run({"x": a}, outputs=[on, off])
    np.testing.assert_array_equal(got_on, 2 * a)
    assert not np.array_equal(got_off, 3 * a)  # skipped: the buffer keeps whatever it held


def test_running_a_training_graph_for_outputs_does_not_update_parameters(dev):
    g, first, second, h, loss, inputs = two_layer_image_graph(dev)
    loss.training_graph(optimizer=mm.optim.SGD(first.parameters() + second.parameters(), lr=0.5))
    before = [p.numpy() for p in first.parameters()]
    g.run(inputs, outputs=[loss])  # inference: the update nodes stay out of the plan
    for p, b in zip(first.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)


def test_fit_stops_after_steps_and_validates_last():
    seen, checks = [], []
    history = mm.train.fit(lambda **b: float(seen.append(b) or len(seen)), lambda e: ({"i": i} for i in range(4)),
                           epochs=10, validate=lambda: checks.append(1) or {"score": 1.0}, every=5, progress=False,
                           steps=6)
    assert len(seen) == 6 and len(history) == 2 and history[-1]["score"] == 1.0 and len(checks) == 1


def replay_network(dev, replay: bool):
    """conv, instance norm, pooling, concat, a Gram matrix, a fresh random input every step, a
    predicated block and Adam: every kind of node a plan may replay, or must not."""
    mm.nn.seed(3)
    g = mm.Graph(dev)
    g.replay = replay
    x = g.input("x", (2, 3, 8, 8))
    flags = mm.Predicates(dev, 1)
    conv, norm = mm.nn.Conv2d(3, 4, 3, padding=1, device=dev), mm.nn.InstanceNorm2d(4, device=dev)
    head = mm.nn.Linear(8 * 16, 5, device=dev)
    noise = g.random((2, 4, 8, 8), mm.random.Philox(dev, seed=5), mm.random.Normal(0.0, 0.1))
    h = mm.ops.relu(norm(conv(x)))
    h = mm.ops.concat([mm.ops.add(h, noise), mm.ops.tanh(h)])
    with g.predicated(flags[0]):
        h = mm.ops.scale(h, s=0.5)
    pooled = mm.ops.max_pool2d(h, 2)
    style = mm.ops.mse_loss(mm.ops.gram(pooled, alpha=1 / 16), mm.tensor(np.stack([np.eye(8, dtype=np.float32) * 0.1] * 2), dev),
                            reduction="sum")
    logits = head(mm.ops.reshape(pooled, (2, 8 * 16)))
    label = mm.ops.mse_loss(logits, mm.tensor(np.ones((2, 5), np.float32), dev), reduction="mean")
    params = conv.parameters() + norm.parameters() + head.parameters()
    train = mm.ops.add(style, label).training_graph(optimizer=mm.optim.Adam(params, lr=1e-2))
    return g, train, params


def test_replayed_steps_equal_encoded_steps_bit_for_bit(dev):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(2)]
    results = []
    for replay in (False, True):
        g, train, params = replay_network(dev, replay)
        losses = [train.step(x=batches[i % 2]) for i in range(4)]
        results.append((losses, [p.numpy() for p in params]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == loss_b and len(set(loss_b)) == 4  # the loss changes every step, identically
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)


def test_replay_follows_device_inputs_that_change(dev):
    """Steps fed device tensors: the same one twice (every node replays), then another (the
    nodes reading it encode afresh), then the first again; every loss and parameter equals an
    unreplayed run's."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(2))
    results = []
    for replay in (False, True):
        g, train, params = replay_network(dev, replay)
        xa, xb = mm.tensor(a, dev), mm.tensor(b, dev)
        losses = [train.step(x=x) for x in (xa, xa, xa, xb, xb, xa)]
        results.append((losses, [p.numpy() for p in params]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == loss_b and len(set(loss_b)) == 6
    for pa, pb in zip(params_a, params_b):
        np.testing.assert_array_equal(pa, pb)


def test_replay_skips_encoding_unchanged_nodes_only(dev, monkeypatch):
    g, train, params = replay_network(dev, True)
    x = mm.tensor(np.ones((2, 3, 8, 8), np.float32), dev)  # the same device buffer every step
    calls = {}
    def counted(name, encode):
        def run(*args, **attrs):
            calls[name] = calls.get(name, 0) + 1
            encode(*args, **attrs)
        return run

    for name in ("conv2d", "adam_update", "random_tensor"):
        op = mm.ops.REGISTRY[name]
        monkeypatch.setitem(mm.ops.REGISTRY, name, dataclasses.replace(op, encode=counted(name, op.encode)))
    train.step(x=x)
    first = dict(calls)
    train.step(x=x)
    second = {k: v - first.get(k, 0) for k, v in calls.items()}
    assert first["conv2d"] == 1 and second.get("conv2d", 0) == 0     # replayed: same buffers and attributes
    assert second["adam_update"] == first["adam_update"] == 6        # the step count changes every step
    assert second["random_tensor"] == first["random_tensor"] == 1    # a generator draws afresh every run
    monkeypatch.setitem(mm.ops.REGISTRY, "tanh", dataclasses.replace(mm.ops.REGISTRY["tanh"],
                                                                     encode=counted("tanh", mm.ops.REGISTRY["tanh"].encode)))
    before = dict(calls)
    train.step(x=np.ones((2, 3, 8, 8), np.float32))  # an array: a new buffer, read by the conv alone
    assert calls["conv2d"] - before["conv2d"] == 1 and calls.get("tanh", 0) == 0


@pytest.mark.parametrize("rule, message", [
    (lambda g, out, x, w: (mm.ops.mul(g, w),), "gave 1 gradients for its 2 inputs"),
    (lambda g, out, x, w: (None, mm.ops.reshape(mm.ops.mul(g, x), shape=(6,))),
     r"gave input 1 a gradient of \(6,\) float32; the input is \(2, 3\) float32"),
    (lambda g, out, x, w: None, "gave NoneType gradients for its 2 inputs"),
])
def test_training_graph_checks_each_gradient_rule(dev, monkeypatch, rule, message):
    """Backward asserts one gradient (or None) per input, shaped as the input: a rule that gets
    either wrong is named, instead of gradients being zipped to the wrong inputs."""
    monkeypatch.setitem(mm.ops.REGISTRY, "mul", dataclasses.replace(mm.ops.REGISTRY["mul"], grad=rule))
    w = mm.nn.Parameter(np.ones((2, 3), np.float32), dev)
    g = mm.Graph(dev)
    loss = mm.ops.mse_loss(mm.ops.mul(g.input("x", (2, 3)), w), mm.tensor(np.zeros((2, 3)), dev))
    with pytest.raises(mm.GraphError, match=f"the gradient rule of mul {message}"):
        loss.training_graph()
