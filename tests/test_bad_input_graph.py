"""Issue 20's red-team rows for graphs, tensors and ops: each bad input gets one clear error before
anything runs, or the right behaviour (row 2, threads, is tests/test_threads.py)."""

import numpy as np
import pytest

import mlmetal as mm


def tiny_training(dev):
    mm.nn.seed(0)
    net = mm.nn.Linear(3, 2, device=dev)
    g = mm.Graph(dev)
    x, t = g.input("x", (4, 3)), g.input("t", (4, 2))
    loss = mm.ops.mse_loss(net(x), t, reduction="sum")
    return net, g, loss


BATCH = {"x": np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "t": np.ones((4, 2), np.float32)}


def test_row6_training_graph_twice(dev):
    """A second training_graph with the same arguments is the first; with others, an error.
    Either way one step applies each update once."""
    net, g, loss = tiny_training(dev)
    opt = mm.optim.SGD(net.parameters(), lr=0.1)
    train = loss.training_graph(optimizer=opt)
    nodes = len(g.nodes)
    assert loss.training_graph(optimizer=opt) is train
    with pytest.raises(mm.GraphError, match="already has a training graph"):
        loss.training_graph(optimizer=mm.optim.SGD(net.parameters(), lr=0.1))
    assert len(g.nodes) == nodes

    before = net.weight.numpy()
    train.step(**BATCH)
    grad = net.weight.grad.numpy()
    np.testing.assert_allclose(net.weight.numpy(), before - 0.1 * grad, rtol=1e-6, atol=1e-7)


def test_row7_dtypes_checked_before_anything_runs(dev):
    ints = mm.tensor(np.array([-1, 2, 3], np.int32), dev, dtype=np.int32)
    with pytest.raises(mm.DTypeError, match=r"relu: input 0 is int32; it takes float32"):
        mm.ops.relu(ints)
    assert issubclass(mm.DTypeError, TypeError) and issubclass(mm.DTypeError, mm.ShapeError)
    table = mm.tensor(np.eye(3, dtype=np.float32), dev)
    with pytest.raises(mm.DTypeError, match=r"embedding: input 0 \(ids\) is float32; it takes int32"):
        mm.ops.embedding(mm.tensor(np.zeros(2, np.float32), dev), table)
    ids = mm.tensor(np.array([2], np.int32), dev, dtype=np.int32)
    np.testing.assert_array_equal(mm.ops.embedding(ids, table).numpy(), [[0, 0, 1]])  # the dtypes it declares

    g = mm.Graph(dev)
    x = g.input("x", (3,))
    y = mm.ops.relu(x)
    with pytest.raises(mm.DTypeError, match="relu: input 0 is int32"):  # in a graph, when the node is appended
        mm.ops.relu(g.input("i", (3,), np.int32))
    with pytest.raises(mm.DTypeError, match=r"input 'x' is a int32 tensor; the graph declared float32"):
        g.run({"x": ints, "i": np.zeros(3, np.int32)}, outputs=[y])
    with pytest.raises(mm.DTypeError, match=r"input 'x' is a int32 array; the graph declared float32"):
        g.run({"x": np.array([-1, 2, 3], np.int32), "i": np.zeros(3, np.int32)}, outputs=[y])
    with pytest.raises(mm.DTypeError, match=r"input 'i' is a float64 array; the graph declared int32"):
        g.run({"x": np.zeros(3), "i": np.zeros(3)}, outputs=[y])
    with pytest.raises(mm.DTypeError, match=r"input 'i' is a int64 array; the graph declared int32"):
        g.run({"x": np.zeros(3), "i": np.array([0, 0, 2**40])}, outputs=[y])
    # float64 arrays still feed float32 inputs, and integers that fit feed int32 ones
    np.testing.assert_array_equal(g.run({"x": np.array([-1.0, 2.0, np.nan]), "i": np.arange(3)}, outputs=[y])[0],
                                  [0, 2, np.nan])


@pytest.mark.parametrize("op, inputs, attrs, message", [
    ("scale", 1, {"s": 1e40}, r"scale: attribute s = 1e\+40 does not fit a float32"),
    ("leaky_relu", 1, {"slope": -1e39}, "leaky_relu: attribute slope = -1e\\+39 does not fit"),
    ("linear_activation", 1, {"a": float("nan")}, "linear_activation: attribute a = nan is NaN"),
    ("mse_loss", 2, {"weight": 1e300}, "mse_loss: attribute weight = 1e\\+300 does not fit"),
    ("log_filter", 1, {"sigma": float("inf")}, "sigma must be positive and finite"),
    ("scale", 1, {"s": "abc"}, "scale: could not convert string to float"),
])
def test_row8_float_attributes_out_of_float32_range(dev, op, inputs, attrs, message):
    xs = [mm.tensor(np.ones((1, 1, 2, 2), np.float32), dev) for _ in range(inputs)]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(*xs, **attrs)
    g = mm.Graph(dev)
    nodes = len(g.nodes)
    with pytest.raises(mm.ShapeError, match=message):  # when the node is appended, not when the graph runs
        getattr(mm.ops, op)(*[g.input(f"x{i}", (1, 1, 2, 2)) for i in range(inputs)], **attrs)
    assert len(g.nodes) == nodes


def test_row8_infinite_attributes_are_ieee_arithmetic(dev):
    x = mm.tensor(np.array([-1.0, 0.5, 2.0], np.float32), dev)
    np.testing.assert_array_equal(mm.ops.scale(x, s=float("inf")).numpy(), [-np.inf, np.inf, np.inf])
    t = mm.tensor(np.zeros(3, np.float32), dev)  # delta = ∞: Huber is half the squared error
    np.testing.assert_allclose(mm.ops.huber_loss(x, t, delta=float("inf"), reduction="none").numpy(), [0.5, 0.125, 2.0])


def test_row8_optimizer_attributes_checked_before_the_step_runs(dev):
    net, g, loss = tiny_training(dev)
    opt = mm.optim.Adam(net.parameters(), lr=1e-3)
    train = loss.training_graph(optimizer=opt)
    train.step(**BATCH)
    before = net.weight.numpy()
    opt.lr = 1e40
    with pytest.raises(mm.ShapeError, match=r"adam_update: attribute lr = 1e\+40 does not fit a float32"):
        train.step(**BATCH)
    assert opt.steps == 1
    np.testing.assert_array_equal(net.weight.numpy(), before)


NAN_CASES = [  # (op, inputs, attrs): a NaN input must give NaN where PyTorch gives it
    ("relu", [[-1.0, np.nan, 2.0]], {}),
    ("leaky_relu", [[-1.0, np.nan, 2.0]], {"slope": 0.1}),
    ("max_pool2d", [np.array([1, np.nan, 5, 0, 1, 2, 3, 4]).reshape(1, 2, 2, 2)], {"kernel": 2}),  # the 2×2 kernel
    ("max_pool2d", [np.array([1, 5, np.nan, 0, 1, 2, 3, 4, 7]).reshape(1, 1, 3, 3)], {"kernel": 2, "stride": 1}),
    ("huber_loss_grad", [[1.0], [np.nan, 1.0], [0.0, 0.0]], {"reduction": "sum", "weight": 1.0, "delta": 1.0}),
]


@pytest.mark.parametrize("op, inputs, attrs", NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_row10_nan_propagates_as_in_pytorch(dev, op, inputs, attrs):
    arrays = [np.asarray(a, np.float32) for a in inputs]
    got = getattr(mm.ops, op)(*[mm.tensor(a, dev) for a in arrays], **attrs).numpy()
    ref = mm.ops.REGISTRY[op].reference(*[a.astype(np.float64) for a in arrays],
                                        **mm.ops.REGISTRY[op].check(*[a.shape for a in arrays], **attrs)[1])
    assert np.isnan(ref).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_row10_max_pool_gradient_goes_to_the_nan(dev):
    """As torch: a window holding NaN pools to NaN, and its gradient goes to the NaN."""
    x = mm.tensor(np.array([[[[1.0, 2.0], [np.nan, 0.0]]]], np.float32), dev)
    g = mm.tensor(np.ones((1, 1, 1, 1), np.float32), dev)
    np.testing.assert_array_equal(mm.ops.max_pool2d_grad(g, x, kernel=2, stride=2, padding=0).numpy(),
                                  [[[[0, 0], [1, 0]]]])


@pytest.mark.parametrize("shape", [(-3, 4), (0, 4), (2.5, 4), (True, 4), ("3", 4), 4])
def test_row14_graph_input_shapes(dev, shape):
    with pytest.raises(mm.ShapeError, match="shape must be a tuple of positive integers"):
        mm.Graph(dev).input("x", shape)


def test_row14_run_names_missing_inputs(dev):
    g = mm.Graph(dev)
    g.input("x", (3,))
    g.input("y", (3,))
    with pytest.raises(mm.GraphError, match="missing x, y"):
        g.run({})
    with pytest.raises(mm.GraphError, match="no nodes to run"):
        g.run({"x": np.zeros(3), "y": np.zeros(3)})
    with pytest.raises(mm.GraphError, match="inputs must be a dict"):
        g.run([np.zeros(3), np.zeros(3)])


def test_row15_grad_is_not_overwritten_by_the_next_step(dev):
    net, g, loss = tiny_training(dev)
    train = loss.training_graph(optimizer=mm.optim.SGD(net.parameters(), lr=0.1))
    train.step(**BATCH)
    first = net.weight.grad
    first_values = first.numpy()
    train.step(x=BATCH["x"] * 3, t=BATCH["t"])
    second = net.weight.grad
    assert not np.allclose(second.numpy(), first_values)  # the second step's gradient differs ...
    np.testing.assert_array_equal(first.numpy(), first_values)  # ... and left the first one as it was
    assert net.weight.grad is second  # read twice, copied once
