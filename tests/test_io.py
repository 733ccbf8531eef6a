"""Saving and loading (mlmetal/io.py): round trips, resumed training, PyTorch interop, and a fuzzed loader."""

import inspect
import json
import os
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal import io

from conftest import cuda_reason

# ---------------------------------------------------------------- drawn networks

IMAGE_LAYERS = ["conv", "conv_transpose", "relu", "sigmoid", "tanh", "leaky_relu", "gelu", "silu", "softmax", "max_pool",
                "avg_pool", "upsample", "instance_norm", "batch_norm", "group_norm", "layer_norm", "dropout", "concat",
                "sequential"]


class Branch(mm.nn.Module):
    """x and a 1×1 convolution of x side by side: a Concat with parameters below it."""

    def __init__(self, channels, device):
        self.conv = mm.nn.Conv2d(channels, 2, 1, device=device)
        self.join = mm.nn.Concat()

    def forward(self, x):
        return self.join(x, self.conv(x))


def build(recipe, dev, seed=0):
    """The network a recipe describes, with weights from `seed`: (module, input shape)."""
    mm.nn.seed(seed)
    rng = np.random.default_rng(seed)
    shape, layers = recipe["input"], []

    def layer(kind, c, hw):
        if kind == "conv":
            return mm.nn.Conv2d(c, recipe["cout"], 3, padding=1, bias=recipe["bias"], device=dev), recipe["cout"], hw
        if kind == "conv_transpose":
            return mm.nn.ConvTranspose2d(c, recipe["cout"], 3, padding=1, bias=recipe["bias"], device=dev), recipe["cout"], hw
        if kind in ("relu", "sigmoid", "tanh", "gelu", "silu", "softmax"):
            cls = {"relu": mm.nn.ReLU, "sigmoid": mm.nn.Sigmoid, "tanh": mm.nn.Tanh, "gelu": mm.nn.GELU, "silu": mm.nn.SiLU,
                   "softmax": mm.nn.Softmax}[kind]
            return cls(), c, hw
        if kind == "dropout":  # a saved graph is for inference: dropout draws no mask there
            return mm.nn.Dropout(0.5).eval(), c, hw
        if kind in ("group_norm", "layer_norm"):
            norm = (mm.nn.GroupNorm(c if recipe["bias"] else 1, c, device=dev) if kind == "group_norm"
                    else mm.nn.LayerNorm((hw, hw), device=dev))
            norm.weight.assign(rng.uniform(0.5, 1.5, norm.weight.shape))
            norm.bias.assign(rng.uniform(-0.5, 0.5, norm.bias.shape))
            return norm, c, hw
        if kind == "leaky_relu":
            return mm.nn.LeakyReLU(0.2), c, hw
        if kind in ("max_pool", "avg_pool"):
            pool = mm.nn.MaxPool2d(2) if kind == "max_pool" else mm.nn.AvgPool2d(3, stride=1, padding=1)
            return pool, c, hw // 2 if kind == "max_pool" else hw
        if kind == "upsample":
            return mm.nn.Upsample(2, recipe["mode"]), c, hw * 2
        if kind in ("instance_norm", "batch_norm"):
            norm = mm.nn.InstanceNorm2d(c, device=dev) if kind == "instance_norm" else mm.nn.BatchNorm2d(c, device=dev)
            norm.weight.assign(rng.uniform(0.5, 1.5, c))
            norm.bias.assign(rng.uniform(-0.5, 0.5, c))
            if kind == "batch_norm":
                norm.training = recipe["bn_training"] and shape[0] * hw * hw > 1  # batch statistics need two values
                norm.running_mean.assign(rng.uniform(-0.2, 0.2, c))
                norm.running_var.assign(rng.uniform(0.5, 2.0, c))
            return norm, c, hw
        if kind == "concat":
            return Branch(c, dev), c + 2, hw
        inner, c2, hw2 = layer("conv", c, hw)  # "sequential": a nested Sequential
        return mm.nn.Sequential(inner, mm.nn.Tanh()), c2, hw2

    if recipe["vector"]:  # a classifier's head: 2×2 images pooled and flattened to vectors
        sizes = recipe["sizes"]
        layers += [mm.nn.AdaptiveAvgPool2d(1), mm.nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [mm.nn.Linear(a, b, bias=recipe["bias"], device=dev), mm.nn.Tanh()]
        layers[-1] = mm.nn.Softmax()
        return mm.nn.Sequential(*layers), (recipe["batch"], sizes[0], 2, 2)
    c, hw = shape[1], shape[2]
    for kind in recipe["layers"]:
        if kind == "max_pool" and hw % 2:
            continue
        module, c, hw = layer(kind, c, hw)
        layers.append(module)
    if recipe["gram"]:
        layers.append(mm.nn.GramMatrix(alpha=1.0 / (hw * hw)))
    if all(isinstance(m, mm.nn.Dropout) for m in layers):  # the identity: no node to save (see below)
        layers.append(mm.nn.Tanh())
    return mm.nn.Sequential(*layers), shape


@st.composite
def recipes(draw):
    vector = draw(st.booleans()) and draw(st.booleans())  # mostly images: they cover more layer types
    hw = draw(st.sampled_from([2, 4, 6]))
    return {"vector": vector, "batch": draw(st.integers(1, 3)),
            "sizes": draw(st.lists(st.integers(1, 6), min_size=2, max_size=4)),
            "input": (draw(st.integers(1, 2)), draw(st.integers(1, 3)), hw, hw),
            "layers": draw(st.lists(st.sampled_from(IMAGE_LAYERS), min_size=1, max_size=5)),
            "cout": draw(st.integers(1, 3)), "bias": draw(st.booleans()),
            "mode": draw(st.sampled_from(["nearest", "bilinear"])),
            "bn_training": draw(st.booleans()), "gram": draw(st.booleans())}


def graph_of(net, shape, dev):
    g = mm.Graph(dev)
    x = g.input("x", shape)
    return g, x, net(x)


def test_every_layer_type_is_drawn():
    """The drawn networks use every layer mm.nn defines (a new layer needs a line in `build`)."""
    drawn = {"Sequential", "Conv2d", "ConvTranspose2d", "Linear", "ReLU", "Sigmoid", "Tanh", "GELU", "SiLU", "Softmax",
             "LeakyReLU", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Flatten", "Upsample", "GramMatrix", "Concat",
             "InstanceNorm2d", "BatchNorm2d", "GroupNorm", "LayerNorm", "Dropout"}
    layers = {name for name, cls in vars(mm.nn).items()
              if inspect.isclass(cls) and issubclass(cls, mm.nn.Module) and cls is not mm.nn.Module
              and not name.startswith("_")}
    assert layers <= drawn, f"layers not covered by the round-trip test: {sorted(layers - drawn)}"


def test_an_output_that_is_the_input_is_refused(dev, tmp_path):
    """A graph whose output is its input (an inference-mode dropout alone) has no node to save:
    save says so, naming the output, and writes nothing."""
    g, x, y = graph_of(mm.nn.Sequential(mm.nn.Dropout(0.5).eval()), (1, 2, 4, 4), dev)
    assert y is x
    with pytest.raises(mm.io.FormatError, match="output 'y' is an input or a parameter"):
        mm.save(tmp_path / "m", g, outputs={"y": y})
    assert not (tmp_path / "m").exists()


@given(recipe=recipes(), zipped=st.booleans())
def test_round_trip_gives_the_same_outputs(dev, tmp_path_factory, recipe, zipped):
    net, shape = build(recipe, dev, seed=1)
    g, x, y = graph_of(net, shape, dev)
    xv = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    path = tmp_path_factory.mktemp("model") / ("m.zip" if zipped else "m")
    mm.save(path, g, outputs={"y": y}, module=net)
    expected = g.run({"x": xv}, outputs=[y])[0]
    model = mm.load(path, device=dev)
    got = model.run({"x": xv})["y"]
    np.testing.assert_array_equal(got, expected)
    saved = net.named_parameters()
    assert set(model.parameters) == set(saved)
    for name, p in saved.items():
        np.testing.assert_array_equal(model.parameters[name].numpy(), p.numpy(), err_msg=name)
        assert model.parameters[name].trainable == p.trainable

    # weights only, into a fresh module of the same architecture (other initial weights)
    weights = path.with_name("w.zip" if zipped else "w")
    net.save_weights(weights)
    fresh, _ = build(recipe, dev, seed=7)
    assert fresh.load_weights(weights) is fresh
    g2, x2, y2 = graph_of(fresh, shape, dev)
    np.testing.assert_array_equal(g2.run({"x": xv}, outputs=[y2])[0], expected)


def test_named_parameters_changes_nothing_and_save_names_by_module(dev, tmp_path):
    """named_parameters() only reports; a graph is saved under its module's dotted names, or
    without module= under the names its parameters carry (empty ones as leaves.<i>)."""
    net = mm.nn.Sequential(mm.nn.Linear(3, 2, device=dev))
    net.layers[0].weight.name = "mine"
    assert net.named_parameters() == {"layers.0.weight": net.layers[0].weight, "layers.0.bias": net.layers[0].bias}
    assert net.layers[0].weight.name == "mine" and net.layers[0].bias.name == ""
    g = mm.Graph(dev)
    y = net(g.input("x", (1, 3)))
    mm.save(tmp_path / "by-module", g, outputs={"y": y}, module=net)
    assert set(mm.load(tmp_path / "by-module", device=dev).parameters) == {"layers.0.weight", "layers.0.bias"}
    mm.save(tmp_path / "own", g, outputs={"y": y})
    assert set(mm.load(tmp_path / "own", device=dev).parameters) == {"mine", "leaves.1"}


def test_gradient_nodes_and_losses_round_trip(dev, tmp_path):
    """Saving a training graph's gradients saves the gradient ops too: every loss and most op families."""
    rng = np.random.default_rng(3)
    mm.nn.seed(5)
    g = mm.Graph(dev)
    x, labels, img = g.input("x", (4, 5)), g.input("labels", (4, 3)), g.input("img", (2, 3, 6, 6))
    first, second = mm.nn.Linear(5, 6, device=dev), mm.nn.Linear(6, 3, device=dev)
    h = mm.ops.leaky_relu(first(x), slope=0.1)
    logits = second(mm.ops.linear_activation(mm.ops.sigmoid(h), a=2.0, b=-1.0))
    conv, mix = mm.nn.Conv2d(3, 4, 3, padding=1, device=dev), mm.nn.Conv2d(4, 4, 1, device=dev)
    bn, inorm = mm.nn.BatchNorm2d(4, device=dev), mm.nn.InstanceNorm2d(2, device=dev)
    y = mm.ops.max_pool2d(mix(mm.ops.relu(bn(conv(img)))), 2)
    y = mm.ops.upsample(mm.ops.avg_pool2d(y, 3, stride=1, padding=1), 2, mode="bilinear")
    y = inorm(mm.ops.slice_channels(mm.ops.softmax(y), 1, 3))
    edges = mm.ops.log_filter(mm.ops.tanh(y), sigma=1.0, size=3)
    target = mm.tensor(rng.standard_normal((2, 2, 2)).astype(np.float32), dev)
    terms = [mm.ops.softmax_cross_entropy_loss(logits, labels, label_smoothing=0.1),
             mm.ops.sigmoid_cross_entropy_loss(logits, labels, reduction="sum"),
             mm.ops.huber_loss(mm.ops.matmul(logits, logits, transpose_b=True),
                               mm.tensor(np.eye(4, dtype=np.float32), dev), delta=0.5),
             mm.ops.mae_loss(mm.ops.mul(logits, logits), labels, weight=0.5),
             mm.ops.mse_loss(mm.ops.gram(edges, alpha=1 / 36), target, mm.tensor(np.ones((2, 2, 2), np.float32), dev),
                             reduction="sum_by_nonzero_weights"),
             mm.ops.mse_loss(mm.ops.scale(mm.ops.concat([y, edges]), s=0.5), mm.ops.concat([edges, y]))]
    total = terms[0]
    for t in terms[1:]:
        total = mm.ops.add(total, t)
    train = total.training_graph()
    grads = {f"grad.{t.value.name or i}": gt for i, (t, gt) in enumerate(train.param_grads.items())}
    outputs = {"loss": total, **grads}
    mm.save(tmp_path / "train.zip", g, outputs=outputs)
    inputs = {"x": rng.standard_normal((4, 5)).astype(np.float32),
              "labels": np.eye(3, dtype=np.float32)[[0, 2, 1, 1]],
              "img": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)}
    expected = dict(zip(outputs, g.run(inputs, outputs=list(outputs.values()))))
    model = mm.load(tmp_path / "train.zip", device=dev)
    saved_ops = {n.op for n in model.graph.nodes}
    assert {"conv2d_input_grad", "conv2d_weight_grad", "batch_norm_grad", "gram_grad", "upsample_grad",
            "max_pool2d_grad", "slice_channels_grad", "softmax_cross_entropy_loss_grad", "huber_loss_grad"} <= saved_ops
    for name, value in model.run(inputs).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


# ---------------------------------------------------------------- optimizers and resumed training

def small_net(dev, seed):
    mm.nn.seed(seed)
    net = mm.nn.Sequential(mm.nn.Conv2d(2, 3, 3, padding=1, device=dev), mm.nn.BatchNorm2d(3, device=dev),
                           mm.nn.Tanh(), mm.nn.InstanceNorm2d(3, device=dev), mm.nn.Conv2d(3, 2, 1, device=dev))
    return net


def make_optimizer(kind, params, hyper):
    return mm.optim.SGD(params, **hyper) if kind == "sgd" else mm.optim.Adam(params, **hyper)


optimizers = st.one_of(
    st.tuples(st.just("sgd"), st.fixed_dictionaries({
        "lr": st.sampled_from([0.01, 0.1]), "momentum": st.sampled_from([0.0, 0.9]),
        "weight_decay": st.sampled_from([0.0, 1e-3])})).map(
        lambda t: (t[0], dict(t[1], nesterov=t[1]["momentum"] > 0 and t[1]["lr"] > 0.05))),
    st.tuples(st.just("adam"), st.fixed_dictionaries({
        "lr": st.sampled_from([1e-3, 1e-2]), "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
        "eps": st.sampled_from([1e-8, 1e-6]), "weight_decay": st.sampled_from([0.0, 1e-2])})))


def batches(n, seed=5):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 2, 5, 5)).astype(np.float32),
             "t": rng.standard_normal((2, 2, 5, 5)).astype(np.float32)} for _ in range(n)]


def training(net, opt, dev):
    g = mm.Graph(dev)
    x, t = g.input("x", (2, 2, 5, 5)), g.input("t", (2, 2, 5, 5))
    loss = mm.ops.mse_loss(net(x), t, reduction="mean")
    return g, loss, loss.training_graph(optimizer=opt)


def state_of(opt, net):
    names = {id(p): n for n, p in net.named_parameters().items()}
    return {names[id(p)]: [s.numpy() for s in opt.state[id(p)]] for p in opt.params}


@given(opt_spec=optimizers, steps=st.integers(1, 2), zipped=st.booleans())
def test_optimizer_state_round_trips(dev, tmp_path_factory, opt_spec, steps, zipped):
    kind, hyper = opt_spec
    net = small_net(dev, 0)
    opt = make_optimizer(kind, net.parameters(), hyper)
    _, _, train = training(net, opt, dev)
    for b in batches(steps):
        train.step(**b)
    path = tmp_path_factory.mktemp("opt") / ("c.zip" if zipped else "c")
    mm.save(path, net, opt)

    fresh = small_net(dev, 3)
    fresh_opt = make_optimizer(kind, fresh.parameters(), {"lr": 0.5})  # other hyper-parameters: restored
    io.restore(path, fresh, fresh_opt)
    assert fresh_opt.steps == opt.steps == steps and fresh_opt.attrs() == opt.attrs()
    for name, states in state_of(opt, net).items():
        for a, b in zip(states, state_of(fresh_opt, fresh)[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)

    loaded = mm.load(path, device=dev)  # a module's save: weights and an optimizer over them
    assert loaded.graph is None and loaded.optimizer.attrs() == opt.attrs() and loaded.optimizer.steps == steps
    with pytest.raises(mm.FormatError, match="not a graph"):
        loaded.run({})


def test_a_new_optimizer_saves_and_restores_without_the_loader_knowing_it(dev, tmp_path, monkeypatch):
    """An optimizer class defined here (SGD's update with a fixed momentum, under a name of its
    own) round-trips through mm.save, mm.load and io.restore: io.py holds no optimizer's details."""
    monkeypatch.setattr(mm.optim.Optimizer, "KINDS", dict(mm.optim.Optimizer.KINDS))

    class HeavyBall(mm.optim.Optimizer):
        name, op, slots = "heavy_ball", "sgd_update", ("velocity",)

        def hyper(self):
            return dict(lr=self.lr, momentum=0.5, weight_decay=0.0, nesterov=False)

        def set_hyper(self, attrs):
            self.lr = attrs["lr"]

    net = small_net(dev, 0)
    opt = HeavyBall(net.parameters(), lr=0.05)
    _, _, train = training(net, opt, dev)
    for b in batches(2):
        train.step(**b)
    mm.save(tmp_path / "ckpt", net, opt)
    assert "optimizer.heavy_ball.velocity.layers.0.weight" in safetensors.numpy.load_file(tmp_path / "ckpt" / "weights.safetensors")
    loaded = mm.load(tmp_path / "ckpt", device=dev)
    assert type(loaded.optimizer) is HeavyBall and loaded.optimizer.steps == 2 and loaded.optimizer.lr == 0.05
    fresh = small_net(dev, 1)
    fresh_opt = HeavyBall(fresh.parameters(), lr=1.0)
    io.restore(tmp_path / "ckpt", fresh, fresh_opt)
    assert fresh_opt.lr == 0.05 and fresh_opt.steps == 2
    saved = state_of(opt, net)
    assert sum(np.abs(states[0]).sum() > 0 for states in saved.values()) >= 8  # moved: not the zeros it started from
    for (name, states), loaded_p in zip(saved.items(), loaded.optimizer.params):
        for got in (state_of(fresh_opt, fresh)[name][0], loaded.optimizer.state[id(loaded_p)][0].numpy()):
            np.testing.assert_array_equal(got, states[0], err_msg=name)
    with pytest.raises(mm.FormatError, match="holds heavy_ball state; cannot restore a SGD"):
        io.restore(tmp_path / "ckpt", fresh, mm.optim.SGD(fresh.parameters(), lr=0.1))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_resumed_training_equals_uninterrupted_bit_for_bit(dev, tmp_path, kind):
    hyper = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
             "adam": dict(lr=1e-2, weight_decay=1e-3)}[kind]
    data = batches(6)
    net = small_net(dev, 0)
    opt = make_optimizer(kind, net.parameters(), hyper)
    _, _, train = training(net, opt, dev)
    losses = [train.step(**b) for b in data]
    expected = {n: p.numpy() for n, p in net.named_parameters().items()}

    # module path: 3 steps, save, fresh module and optimizer, restore, 3 more steps
    first = small_net(dev, 0)
    first_opt = make_optimizer(kind, first.parameters(), hyper)
    g1, loss1, train1 = training(first, first_opt, dev)
    assert [train1.step(**b) for b in data[:3]] == losses[:3]
    mm.save(tmp_path / "ckpt.zip", first, first_opt)
    mm.save(tmp_path / "graph", g1, first_opt, outputs={"loss": loss1}, module=first)

    second = small_net(dev, 42)
    second_opt = make_optimizer(kind, second.parameters(), {"lr": 0.3})
    _, _, train2 = training(second, second_opt, dev)
    io.restore(tmp_path / "ckpt.zip", second, second_opt)
    assert [train2.step(**b) for b in data[3:]] == losses[3:]
    for n, p in second.named_parameters().items():
        np.testing.assert_array_equal(p.numpy(), expected[n], err_msg=n)

    # graph path: the loaded graph's loss derives the training graph again, with the loaded optimizer
    model = mm.load(tmp_path / "graph", device=dev)
    train3 = model.outputs["loss"].training_graph(optimizer=model.optimizer)
    assert [train3.step(**b) for b in data[3:]] == losses[3:]
    for n, p in model.parameters.items():
        np.testing.assert_array_equal(p.numpy(), expected[n], err_msg=n)


# ---------------------------------------------------------------- models saved by earlier versions

FORMAT1 = Path(__file__).parent / "data" / "format1"


def format1_network(dev, seed):
    """The network of the saves in tests/data/format1 (made by main at 7c9d455), with weights from `seed`."""
    mm.nn.seed(seed)
    return mm.nn.Sequential(mm.nn.Conv2d(2, 3, 3, padding=1, device=dev), mm.nn.BatchNorm2d(3, device=dev),
                            mm.nn.Tanh(), mm.nn.InstanceNorm2d(3, device=dev), mm.nn.Conv2d(3, 2, 1, device=dev))


def resume(graph_tensors, train, expected, kind, parameters):
    """Run the saved graph on batch 2, train on batches 2 and 3, and compare with what the saving
    code computed next (bit for bit on cpu, where the same kernels ran)."""
    tol = dict(rtol=1e-4, atol=1e-5)
    g, y = graph_tensors
    batch = lambda i: {"x": expected[f"x{i}"], "t": expected[f"t{i}"]}  # noqa: E731
    np.testing.assert_allclose(g.run(batch(2), outputs=[y])[0], expected[f"{kind}_y"], **tol)
    np.testing.assert_allclose([train.step(**batch(i)) for i in (2, 3)], expected[f"{kind}_losses"], **tol)
    for name, p in parameters.items():
        np.testing.assert_allclose(p.numpy(), expected[f"{kind}_after.{name}"], err_msg=name, **tol)


def test_a_graph_saved_by_format1_code_loads_and_resumes(dev):
    """graph-adam.zip: a graph with its Adam state after two steps; the loaded model runs and trains on as the old code did."""
    expected = np.load(FORMAT1 / "expected.npz")
    model = mm.load(FORMAT1 / "graph-adam.zip", device=dev)
    opt = model.optimizer
    assert type(opt) is mm.optim.Adam and opt.steps == 2
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay) == (1e-2, (0.8, 0.99), 1e-6, 1e-3)
    train = model.outputs["loss"].training_graph(optimizer=opt)
    resume((model.graph, model.outputs["y"]), train, expected, "adam", model.parameters)


def test_a_module_saved_by_format1_code_restores(dev):
    """module-sgd: a module's weights with SGD's momentum after two steps, restored into a fresh module and optimizer."""
    expected = np.load(FORMAT1 / "expected.npz")
    net = format1_network(dev, 5)
    opt = mm.optim.SGD(net.parameters(), lr=0.5)
    io.restore(FORMAT1 / "module-sgd", net, opt)
    assert opt.steps == 2 and (opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (0.05, 0.9, 1e-3, True)
    g = mm.Graph(dev)
    y = net(g.input("x", (2, 2, 5, 5)))
    train = mm.ops.mse_loss(y, g.input("t", (2, 2, 5, 5)), reduction="mean").training_graph(optimizer=opt)
    resume((g, y), train, expected, "sgd", net.named_parameters())


# ---------------------------------------------------------------- across backends and into PyTorch

def saved_cnn(dev, tmp_path):
    net = small_net(dev, 4)
    g, x, y = graph_of(net, (2, 2, 5, 5), dev)
    xv = np.random.default_rng(9).standard_normal((2, 2, 5, 5)).astype(np.float32)
    mm.save(tmp_path / "m.zip", g, outputs={"y": y})
    return net, xv, g.run({"x": xv}, outputs=[y])[0]


def test_cpu_to_cpu(tmp_path):
    cpu = mm.device("cpu")
    net, xv, expected = saved_cnn(cpu, tmp_path)
    model = mm.load(tmp_path / "m.zip", device="cpu")
    assert model.graph.device is cpu
    np.testing.assert_array_equal(model.run({"x": xv})["y"], expected)


@pytest.mark.skipif(cuda_reason() is not None, reason=f"cuda backend unavailable: {cuda_reason()}")
def test_cpu_to_cuda(tmp_path):
    net, xv, expected = saved_cnn(mm.device("cpu"), tmp_path)
    model = mm.load(tmp_path / "m.zip", device="cuda")
    assert model.graph.device.name == "cuda"
    np.testing.assert_allclose(model.run({"x": xv})["y"], expected, rtol=1e-5, atol=1e-5)


def test_weights_load_in_pytorch(dev, tmp_path):
    torch_st = pytest.importorskip("safetensors.torch", reason="PyTorch is not installed")
    net = small_net(dev, 2)
    opt = mm.optim.Adam(net.parameters())
    _, _, train = training(net, opt, dev)
    train.step(**batches(1)[0])
    mm.save(tmp_path / "ckpt", net, opt)
    loaded = torch_st.load_file(str(tmp_path / "ckpt" / "weights.safetensors"))
    for name, p in net.named_parameters().items():
        np.testing.assert_array_equal(loaded[name].numpy(), p.numpy())
        m, v = opt.state[id(p)]
        np.testing.assert_array_equal(loaded[f"optimizer.adam.m.{name}"].numpy(), m.numpy())
        np.testing.assert_array_equal(loaded[f"optimizer.adam.v.{name}"].numpy(), v.numpy())


# ---------------------------------------------------------------- what is refused, and how it is said

@pytest.fixture
def saved(dev, tmp_path):
    """A small saved graph (directory form) and a way to rewrite its graph.json."""
    net = small_net(dev, 1)
    g, x, y = graph_of(net, (2, 2, 5, 5), dev)
    mm.save(tmp_path / "m", g, mm.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), outputs={"y": y}, module=net)
    path = tmp_path / "m"

    def edit(fn):
        meta = json.loads((path / "graph.json").read_text())
        fn(meta)
        (path / "graph.json").write_text(json.dumps(meta))
        return path

    return path, edit


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(version=2), "unknown format version 2"),
    (lambda m: m["nodes"][0].update(op="os.system"), "unknown op 'os.system'"),
    (lambda m: m["nodes"][0]["attrs"].update(stride="big"), "conv2d rejects"),
    (lambda m: m["nodes"][0]["attrs"].update(stride=1), "not in the normal form"),
    (lambda m: m["nodes"][1]["attrs"].update(momentum=1), "not in the normal form"),
    (lambda m: m["nodes"][0]["attrs"].update(groups=True), "true/false where conv2d takes a number"),
    (lambda m: m["nodes"][0]["attrs"].update(stride=[1, True]), "true/false where"),
    (lambda m: m["nodes"][0]["outputs"][0].update(shape=[2, 3, 5, 6]), r"conv2d on inputs .* gives"),
    (lambda m: m["inputs"][0].update(shape=[2, 2, 5, 5, 1, 1, 1, 1, 1]), "at most 8"),
    (lambda m: m["parameters"][0].update(shape=[3, 2, 3, 4]), "conv2d rejects|gives"),
    (lambda m: m["parameters"][0].update(dtype="float64"), "expected one of float32"),
    (lambda m: m["nodes"][1]["inputs"][0].update(node=5),
     r"nodes\[1\].inputs\[0\].node: expected an integer in \[0, 0\]"),
    (lambda m: m["outputs"].update(y={"input": "x"}), "must be a node's output"),
    (lambda m: m["optimizer"]["attrs"].update(lr=-1.0), "sgd_update rejects"),
    (lambda m: m["optimizer"].update(type="pickle"), "expected one of sgd, adam, got 'pickle'"),
    (lambda m: m.update(extra=1), "unknown field 'extra'"),
])
def test_malformed_graph_json_names_the_problem(dev, saved, change, message):
    path, edit = saved
    with pytest.raises(mm.FormatError, match=message):
        mm.load(edit(change), device=dev)


def test_json_tricks_are_refused(dev, saved):
    path, _ = saved
    text = (path / "graph.json").read_text()
    for bad, message in [(text.replace('"format"', '"kind": "graph", "format"', 1), "duplicate key 'kind'"),
                         (text.replace('"momentum": 0.1', '"momentum": NaN'), "NaN is not a number"),
                         ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
                         (text[:100], "not valid JSON"),
                         ("\xff", "not valid JSON")]:
        (path / "graph.json").write_bytes(bad.encode("utf-8", "surrogateescape") if bad != "\xff" else b"\xff")
        with pytest.raises(mm.FormatError, match=message):
            mm.load(path, device=dev)


def rewrite_header(path: Path, fn):
    """Edit the safetensors header of `path` in place (the data stays)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_weights_must_match_graph_json(dev, saved):
    path, _ = saved
    w = path / "weights.safetensors"
    original = w.read_bytes()
    bias = "layers.0.bias"
    for fn, message in [(lambda h: h.pop(bias), f"missing {bias}"),
                        (lambda h: h.update(extra=h[bias]), "unexpected extra"),
                        (lambda h: h[bias].update(dtype="I32"), "graph.json says float32"),
                        (lambda h: h[bias].update(shape=[1, 3]), r"graph.json says \[3\]"),
                        (lambda h: h[bias].update(data_offsets=[4, 16]), "overlap or leave gaps|do not span")]:
        w.write_bytes(original)
        rewrite_header(w, fn)
        with pytest.raises(mm.FormatError, match=message):
            mm.load(path, device=dev)


def test_a_header_claiming_a_huge_tensor_is_refused_before_reading(dev, tmp_path):
    """4 GiB claimed by a file of a few hundred bytes: refused from the header alone, nothing allocated."""
    w = mm.nn.Parameter(np.zeros(4, np.float32), dev)
    net = mm.nn.Sequential()
    net.w = w
    mm.save(tmp_path / "m", net)
    meta = json.loads((tmp_path / "m" / "graph.json").read_text())
    meta["parameters"][0]["shape"] = [2**30]
    (tmp_path / "m" / "graph.json").write_text(json.dumps(meta))
    rewrite_header(tmp_path / "m" / "weights.safetensors",
                   lambda h: h["w"].update(shape=[2**30], data_offsets=[0, 2**32]))
    tracemalloc.start()
    try:
        with pytest.raises(mm.FormatError, match="data_offsets|header describes"):
            mm.load(tmp_path / "m", device=dev)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    meta["parameters"][0]["shape"] = [2**40]
    (tmp_path / "m" / "graph.json").write_text(json.dumps(meta))
    with pytest.raises(mm.FormatError, match=r"expected an integer in \[0, 2147483647\], got 1099511627776"):
        mm.load(tmp_path / "m", device=dev)


def test_archive_paths_outside_the_model_are_refused(dev, saved, tmp_path):
    path, _ = saved
    members = {n: (path / n).read_bytes() for n in ("graph.json", "weights.safetensors")}
    for evil in ["../evil", "/etc/passwd", "a/../../b", "C:\\x", "dir\\..\\x"]:
        z = tmp_path / "evil.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for n, data in members.items():
                zf.writestr(n, data)
            zf.writestr(evil, b"x")
        with pytest.raises(mm.FormatError, match="outside the archive"):
            mm.load(z, device=dev)
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("graph.json", members["graph.json"])
    with pytest.raises(mm.FormatError, match="no weights.safetensors"):
        mm.load(z, device=dev)
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:  # a deflated member could be a bomb
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(mm.FormatError, match="weights.safetensors: must be stored uncompressed"):
        mm.load(z, device=dev)
    # a directory whose member is a symbolic link (to anywhere) is refused
    (path / "weights.safetensors").unlink()
    os.symlink(tmp_path / "elsewhere", path / "weights.safetensors")
    with pytest.raises(mm.FormatError, match="symbolic links are refused"):
        mm.load(path, device=dev)
    with pytest.raises(mm.FormatError, match="no saved model here"):
        mm.load(tmp_path / "nothing", device=dev)


def test_what_cannot_be_saved_is_refused_at_save_time(dev, tmp_path):
    g = mm.Graph(dev)
    z = g.random((2, 3), mm.random.Philox(dev, 0), mm.random.Normal())
    with pytest.raises(mm.FormatError, match="random_tensor.*generator"):
        mm.save(tmp_path / "r", g, outputs={"z": z})
    g = mm.Graph(dev)
    x = g.input("x", (2, 3))
    with g.predicated(mm.Predicate(dev.buffer(np.ones(1, np.uint32)), 0)):
        y = mm.ops.relu(x)
    with pytest.raises(mm.FormatError, match="predicated"):
        mm.save(tmp_path / "p", g, outputs={"y": y})
    g = mm.Graph(dev)
    y = mm.ops.relu(g.input("x", (2, 3)))
    w = mm.nn.Parameter(np.ones(2, np.float32), dev)
    with pytest.raises(mm.FormatError, match="not among the saved parameters"):
        mm.save(tmp_path / "o", g, mm.optim.SGD([w], lr=0.1), outputs={"y": y})
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_load_weights_reports_every_mismatch_at_once(dev, tmp_path):
    net = small_net(dev, 0)
    net.save_weights(tmp_path / "w")
    other = mm.nn.Sequential(mm.nn.Conv2d(2, 4, 3, padding=1, device=dev), mm.nn.BatchNorm2d(3, device=dev),
                             mm.nn.Linear(3, 3, device=dev))
    before = [p.numpy() for p in other.parameters()]
    with pytest.raises(mm.FormatError) as e:
        other.load_weights(tmp_path / "w")
    message = str(e.value)
    assert "missing layers.2.weight, layers.2.bias" in message
    assert "unexpected layers.3.weight" in message and "layers.4.weight" in message
    assert "wrong shape or dtype layers.0.weight (4, 2, 3, 3)" in message
    for p, b in zip(other.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)  # nothing half-loaded
    # not strict: missing and extra parameters are skipped, matching ones load
    partial = mm.nn.Sequential(mm.nn.Conv2d(2, 3, 3, padding=1, device=dev))
    partial.load_weights(tmp_path / "w", strict=False)
    np.testing.assert_array_equal(partial.layers[0].weight.numpy(), net.layers[0].weight.numpy())


def test_the_loader_runs_no_code():
    source = inspect.getsource(io)
    for word in ("pickle", "eval(", "exec(", "__import__", "importlib"):
        assert word not in source, word


# ---------------------------------------------------------------- fuzzing

NASTY = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, 0.5, -0.0, 1e308, "", "x" * 600, "float64", "F64",
         "conv2d", "random_tensor", "adam", [], [0], [-1], [2**31] * 3, [1] * 9, [[[[[1]]]]], {},
         {"node": 0, "output": 0},
         {"input": "x"}, {"param": "layers.0.weight"}, {"node": -1, "output": 0}, {"__class__": "x"}]


class Chooser:
    """Draws integers from hypothesis or from a seeded numpy generator: one mutation code for both."""

    def __init__(self, data=None, rng=None):
        self.data, self.rng = data, rng

    def int(self, lo, hi):
        if self.data is not None:
            return self.data.draw(st.integers(lo, hi))
        return int(self.rng.integers(lo, hi + 1))

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]


def json_paths(v, path=()):
    yield path
    if isinstance(v, dict):
        for k, x in v.items():
            yield from json_paths(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from json_paths(x, path + (i,))


def edit_json(doc, c: Chooser):
    """Replace, delete or add one field somewhere in a parsed JSON document."""
    paths = list(json_paths(doc))
    path = c.pick(paths[1:]) if len(paths) > 1 else ()
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    action = c.int(0, 4)
    if not path:
        return c.pick(NASTY)
    key = path[-1]
    value = parent[key]
    if action == 4 and type(value) in (int, float):  # a plausible number: often still a valid model
        parent[key] = value + c.int(-1, 1) if type(value) is int else value * c.pick([0.5, 1.5, -1.0, 0.0])
    elif action == 0:
        parent[key] = c.pick(NASTY)
    elif action == 1:
        del parent[key]
    elif action == 2 and isinstance(parent, dict):
        parent[c.pick(["extra", "op", "name", "shape", "__metadata__"])] = c.pick(NASTY)
    elif isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key] = c.pick(NASTY)
    return doc


def mutate_bytes(data: bytes, c: Chooser) -> bytes:
    kind = c.int(0, 3)
    if kind == 0 or not data:  # truncate
        return data[:c.int(0, max(len(data) - 1, 0))]
    b = bytearray(data)
    if kind == 1:  # flip a few bytes
        for _ in range(c.int(1, 8)):
            b[c.int(0, len(b) - 1)] ^= 1 << c.int(0, 7)
    elif kind == 2:  # set a few bytes to extremes
        for _ in range(c.int(1, 4)):
            b[c.int(0, len(b) - 1)] = c.pick([0, 0xFF, 0x7F, 0x80, ord('"'), ord("{")])
    else:  # insert or delete a run
        i = c.int(0, len(b))
        b[i:i + c.int(0, 16)] = bytes(c.int(0, 16))
    return bytes(b)


def mutate_model(files: dict, c: Chooser) -> tuple[dict, str]:
    """One mutation of {member: bytes}; returns the new members and what was done."""
    files = dict(files)
    kind = c.int(0, 5)
    graph, weights = files.get("graph.json"), files.get("weights.safetensors")
    header = None
    if weights is not None and len(weights) >= 8:
        n = struct.unpack("<Q", weights[:8])[0]
        header = parse(weights[8:8 + n]) if n <= len(weights) else None
    if kind == 1 and graph is not None and parse(graph) is not None:
        files["graph.json"] = json.dumps(edit_json(parse(graph), c)).encode()
        return files, "graph.json field"
    if kind == 2 and header is not None:
        new = json.dumps(edit_json(header, c)).encode()
        files["weights.safetensors"] = struct.pack("<Q", len(new)) + new + weights[8 + n:]
        return files, "safetensors header field"
    if kind == 3 and weights is not None:  # a header length claiming more (or less) than there is
        files["weights.safetensors"] = struct.pack("<Q", c.pick([0, 1, len(weights), 2**40, 2**64 - 1])) + weights[8:]
        return files, "safetensors header length"
    if kind == 5 and header is not None and len(weights) > 8 + n:  # weight values only: still a valid model
        b = bytearray(weights)
        for _ in range(c.int(1, 8)):
            b[c.int(8 + n, len(b) - 1)] = c.int(0, 255)
        files["weights.safetensors"] = bytes(b)
        return files, "weight values"
    if kind == 4 and files:
        del files[c.pick(sorted(files))]
        return files, "missing member"
    if not files:
        return files, "no members"
    name = c.pick(sorted(files))
    files[name] = mutate_bytes(files[name], c)
    return files, f"bytes of {name}"


def parse(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def write_model(root: Path, files: dict, zipped: bool, c: Chooser) -> Path:
    if not zipped:
        root.mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data)
        return root
    z = root.with_suffix(".zip")
    with zipfile.ZipFile(z, "w") as zf:
        for name, data in files.items():
            stored = name == "weights.safetensors" and c.int(0, 9) > 0  # as mm.save writes it, mostly
            zf.writestr(name, data, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
        if c.int(0, 5) == 0:
            zf.writestr(c.pick(["../up", "/abs", "ok.txt", "graph.json"]), b"{}")
    if c.int(0, 2) == 0:  # damage the archive itself
        z.write_bytes(mutate_bytes(z.read_bytes(), c))
    return z


def load_or_refuse(path: Path, dev, inputs) -> str:
    """Load a possibly damaged model: 'refused' (FormatError) or 'loaded' (and it runs). Anything else fails."""
    start = time.perf_counter()
    try:
        model = mm.load(path, device=dev)
    except mm.FormatError:
        outcome = "refused"
    else:
        if model.graph is not None:
            model.run({k: v for k, v in inputs.items() if k in model.inputs})
        outcome = "loaded"
    assert time.perf_counter() - start < 10, f"{path} took {time.perf_counter() - start:.1f} s"
    return outcome


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    """The members of a saved graph with an Adam state, and inputs to run it."""
    dev = mm.device(os.environ.get("MLMETAL_DEVICE", "cpu"))
    net = small_net(dev, 6)
    g, x, y = graph_of(net, (2, 2, 5, 5), dev)
    opt = mm.optim.Adam(net.parameters())
    loss = mm.ops.mse_loss(y, mm.tensor(np.zeros((2, 2, 5, 5), np.float32), dev))
    loss.training_graph(optimizer=opt).step(x=np.ones((2, 2, 5, 5), np.float32))
    path = tmp_path_factory.mktemp("fuzz") / "base"
    mm.save(path, g, opt, outputs={"y": y, "loss": loss})
    files = {n: (path / n).read_bytes() for n in ("graph.json", "weights.safetensors")}
    return files, {"x": np.ones((2, 2, 5, 5), np.float32)}


@given(data=st.data())
def test_fuzzed_models_load_or_are_refused(dev, fuzz_base, tmp_path_factory, data):
    files, inputs = fuzz_base
    c = Chooser(data=data)
    mutated, _ = mutate_model(files, c)
    for _ in range(c.int(0, 2)):  # sometimes several mutations on top of each other
        mutated, _ = mutate_model(mutated, c)
    zipped = c.int(0, 1) == 1
    load_or_refuse(write_model(tmp_path_factory.mktemp("case") / "m", mutated, zipped, c), dev, inputs)


FUZZ_CASES = int(os.environ.get("MLMETAL_FUZZ_CASES", 500))  # more on a workstation: the stream just goes on


def test_fuzz_seeded_mutations(dev, fuzz_base, tmp_path, record_property):
    """A fixed number of seeded mutations, directory and zip alike; each loads (and runs) or is refused."""
    files, inputs = fuzz_base
    rng = np.random.default_rng(20240607)
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    tracemalloc.start()
    try:
        for i in range(FUZZ_CASES):
            c = Chooser(rng=rng)
            mutated, what = mutate_model(files, c)
            zipped = i % 2 == 1
            tracemalloc.reset_peak()
            outcome = load_or_refuse(write_model(tmp_path / f"m{i}", mutated, zipped, c), dev, inputs)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 64 << 20, f"case {i} ({what}) allocated {peak >> 20} MiB"
            key = f"{outcome}: {what}{' (zip)' if zipped else ''}"
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        tracemalloc.stop()
    total = sum(outcomes.values())
    record_property("fuzz_cases", total)
    print(f"\nfuzz: {total} cases in {time.perf_counter() - start:.1f} s")
    for key, n in sorted(outcomes.items()):
        print(f"  {n:4d}  {key}")
    assert total == FUZZ_CASES
    assert sum(n for k, n in outcomes.items() if k.startswith("refused")) > FUZZ_CASES // 2  # the mutations bite
