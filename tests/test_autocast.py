"""The autocast policy (mlmetal.autocast): which ops run in the low-precision type and which in
float32, promotion of mixed inputs, float32 gradients of float32 parameters through the astype
nodes, `Graph(compute_dtype=)` as the context, nesting, and one setting per thread.

The tests of convolutions, products, activations and losses in float16 and bfloat16 run those
ops' storage-type kernels (issue 17's conversions of their families)."""

import contextlib
import dataclasses
import threading

import numpy as np
import pytest

import mlmetal as mm
from mlmetal import dtypes as D
from mlmetal import ops
from mlmetal.autocast import current, policy

LOW = [mm.float16, mm.bfloat16]
ids = ["float16", "bfloat16"]


def rand(dev, *shape, seed=0, scale=1.0):
    return mm.tensor((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32), dev)


def signature(g: mm.Graph) -> list:
    """Each node's op with the dtypes of its inputs and outputs: what the policy decided."""
    return [(n.op, [str(x.dtype) for x in n.inputs], [str(o.dtype) for o in n.outputs]) for n in g.nodes]


# ---------------------------------------------------------------- the context

def test_the_context_sets_nests_and_restores():
    assert current() is None
    with mm.autocast("float16") as d:
        assert d == mm.float16 and current() == mm.float16
        with mm.autocast("bf16"):
            assert current() == mm.bfloat16
            with mm.autocast("float16", enabled=False):
                assert current() is None
            assert current() == mm.bfloat16
        assert current() == mm.float16
    assert current() is None
    with pytest.raises(RuntimeError), mm.autocast("bfloat16"):  # an error in the block restores too
        raise RuntimeError
    assert current() is None


@pytest.mark.parametrize("bad", ["float32", np.float32, "int32", "float64"])
def test_only_a_low_precision_type_is_a_compute_type(dev, bad):
    with pytest.raises((ValueError, TypeError)), mm.autocast(bad):
        pass
    with pytest.raises((ValueError, TypeError)):
        mm.Graph(dev, compute_dtype=bad)
    with pytest.raises(TypeError):
        mm.autocast("float8").__enter__()


def test_the_setting_is_per_thread(dev):
    """A block on one thread leaves another thread's ops as they are, at the same time."""
    inside, other_seen = threading.Event(), threading.Event()
    seen = {}

    def other():
        inside.wait(10)
        seen["current"] = current()
        x = rand(dev, 8).astype(mm.float16)
        with pytest.raises(mm.DTypeError):  # no autocast here: a float32-only op refuses half
            mm.ops.predicate_compare(x, mm.tensor(np.ones(1, np.uint32), dev, dtype=np.uint32), 0)
        other_seen.set()

    t = threading.Thread(target=other)
    t.start()
    with mm.autocast("float16"):
        inside.set()
        assert other_seen.wait(10)
        assert current() == mm.float16
    t.join()
    assert seen["current"] is None


# ---------------------------------------------------------------- what runs in which type

@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_losses_and_reductions_run_in_float32(dev, dtype):
    y, t = rand(dev, 4, 5, seed=1).astype(dtype), rand(dev, 4, 5, seed=2)
    with mm.autocast(dtype):
        loss = mm.ops.mse_loss(y, t)
        total = mm.ops.sum(y, axis=1)
        probs = mm.ops.softmax(y)
    assert loss.dtype == total.dtype == probs.dtype == mm.float32
    y32 = y.numpy().astype(np.float64)
    np.testing.assert_allclose(loss.numpy(), [np.mean((y32 - t.numpy()) ** 2)], rtol=1e-6)
    np.testing.assert_allclose(total.numpy(), y32.sum(axis=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_a_float32_only_op_gets_its_low_inputs_cast_up(dev, dtype):
    """An op without kernels for the type (predicate_compare reads float32) runs in float32 under
    autocast; outside it, a half input is refused, not converted behind the user's back."""
    x, words = rand(dev, 8).astype(dtype), mm.tensor(np.zeros(1, np.uint32), dev, dtype=np.uint32)
    with pytest.raises(mm.DTypeError, match="cast with .astype"):
        mm.ops.predicate_compare(x, words, 0, threshold=-100.0)
    with mm.autocast(dtype):
        assert mm.ops.predicate_compare(x, words, 0, threshold=-100.0).numpy()[0] == 1


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_float32_tensors_stay_float32_through_ops_outside_the_low_list(dev, dtype):
    """Activations and elementwise ops run in the type of their inputs: float32 ones are not cast down."""
    x = rand(dev, 4, 6)
    with mm.autocast(dtype):
        assert mm.ops.relu(x).dtype == mm.float32
        assert mm.ops.tanh(x).dtype == mm.float32


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_convolutions_and_products_run_in_the_low_type(dev, dtype):
    """conv2d, matmul, linear: their float32 inputs (parameters too) are cast by astype nodes and
    the op runs in the low type; an activation after it stays low; the loss is float32."""
    mm.nn.seed(0)
    conv, fc = mm.nn.Conv2d(3, 4, 3, padding=1, device=dev), mm.nn.Linear(4 * 6 * 6, 5, device=dev)
    g = mm.Graph(dev)
    x, t = g.input("x", (2, 3, 6, 6)), g.input("t", (2, 5))
    with mm.autocast(dtype):
        h = mm.ops.relu(conv(x))
        y = fc(h.reshape(2, -1))
        z = mm.ops.matmul(y, y.T)
        loss = mm.ops.mse_loss(y, t)
    assert h.dtype == y.dtype == z.dtype == dtype
    assert loss.dtype == mm.float32
    by_op = {n.op: n for n in g.nodes}
    assert all(i.dtype == dtype for i in by_op["conv2d"].inputs) and by_op["conv2d"].inputs[1].node.op == "astype"
    assert all(i.dtype == dtype for i in by_op["linear"].inputs)
    assert by_op["mse_loss"].inputs[0].node.op == "astype"
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32),
              "t": np.zeros((2, 5), np.float32)}
    low = g.run(inputs, [y])[0]
    g32 = mm.Graph(dev)
    y32 = fc(mm.ops.relu(conv(g32.input("x", (2, 3, 6, 6)))).reshape(2, -1))
    ref = g32.run({"x": inputs["x"]}, [y32])[0]
    np.testing.assert_allclose(low.astype(np.float32), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_mixed_inputs_promote_to_float32(dev, dtype):
    """Outside autocast, an op given float32 and a low type computes in float32 (PyTorch's
    promotion); float16 with bfloat16 is float32 too."""
    a, b = rand(dev, 3, 4, seed=1), rand(dev, 4, 2, seed=2)
    y = mm.ops.matmul(a.astype(dtype), b)
    assert y.dtype == mm.float32
    np.testing.assert_allclose(y.numpy(), a.astype(dtype).numpy().astype(np.float32) @ b.numpy(), rtol=1e-5, atol=1e-6)
    other = mm.bfloat16 if dtype == mm.float16 else mm.float16
    assert mm.ops.matmul(a.astype(dtype), b.astype(other)).dtype == mm.float32
    assert mm.ops.mse_loss(a.astype(dtype), a).dtype == mm.float32


# ---------------------------------------------------------------- gradients and graphs

@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_float32_parameters_get_float32_gradients_through_the_astype_nodes(dev, dtype):
    """A parameter cast to the low type and back (the loss runs in float32): the training
    graph's gradient of it is float32, through the astype nodes' gradients, and the update
    writes the float32 master weight."""
    w = mm.nn.Parameter(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4) * 1.001, dev)
    g = mm.Graph(dev)
    t = g.input("t", (3, 4))
    with mm.autocast(dtype):
        loss = mm.ops.mse_loss(w.astype(dtype), t, reduction="sum")
    assert [n.op for n in g.nodes] == ["astype", "astype", "mse_loss"]
    assert [n.outputs[0].dtype for n in g.nodes[:2]] == [dtype, mm.float32]
    train = g.training_graph(loss, optimizer=mm.optim.SGD([w], lr=0.0))
    assert [n.op for n in train.gradient_nodes].count("astype") == 2
    train.step(t=np.zeros((3, 4), np.float32))
    assert w.grad.dtype == w.dtype == mm.float32
    rounded = w.numpy().astype(dtype).astype(np.float64)
    np.testing.assert_allclose(w.grad.numpy(), (2 * rounded).astype(dtype).astype(np.float64), rtol=0)


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_training_under_autocast_keeps_float32_master_weights(dev, dtype):
    mm.nn.seed(1)
    net = mm.nn.Sequential(mm.nn.Conv2d(2, 4, 3, padding=1, device=dev), mm.nn.ReLU(),
                           mm.nn.Conv2d(4, 2, 3, padding=1, device=dev))
    g = mm.Graph(dev)
    x, t = g.input("x", (2, 2, 8, 8)), g.input("t", (2, 2, 8, 8))
    with mm.autocast(dtype):
        loss = mm.ops.mse_loss(net(x), t)
    train = g.training_graph(loss, optimizer=mm.optim.Adam(net.parameters(), lr=1e-2))
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((2, 2, 8, 8)).astype(np.float32)}
    data["t"] = np.tanh(data["x"])
    losses = [train.step(**data) for _ in range(30)]
    assert losses[-1] < losses[0] / 2
    for p in net.parameters():
        assert p.dtype == p.grad.dtype == mm.float32 and np.isfinite(p.numpy()).all()
    assert all(n.outputs[0].dtype == dtype for n in g.nodes if n.op == "conv2d")


def conv_graph(dev, dtype=None, compute_dtype=None):
    """A convolution, its activation cast to the low type, and a loss: under mm.autocast(dtype),
    or in a compute_dtype graph."""
    mm.nn.seed(3)
    net = mm.nn.Sequential(mm.nn.Conv2d(2, 3, 3, device=dev), mm.nn.ReLU())
    g = mm.Graph(dev, compute_dtype=compute_dtype)
    x, t = g.input("x", (1, 2, 5, 5)), g.input("t", (1, 3, 3, 3))
    with mm.autocast(dtype) if dtype else contextlib.nullcontext():
        y = net(x)
        loss = mm.ops.mse_loss(y.astype(dtype or compute_dtype), t)
    return g, y, loss


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_graph_compute_dtype_is_the_context(dev, dtype):
    """A graph made with compute_dtype records what the same building does under the context, and computes the same."""
    ga, ya, la = conv_graph(dev, dtype=dtype)
    gb, yb, lb = conv_graph(dev, compute_dtype=dtype)
    assert signature(ga) == signature(gb)
    assert la.dtype == lb.dtype == mm.float32 and gb.compute_dtype == dtype
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32), "t": np.zeros((1, 3, 3, 3), np.float32)}
    np.testing.assert_array_equal(ga.run(inputs, [la, ya])[0], gb.run(inputs, [lb, yb])[0])


def test_a_block_inside_a_compute_dtype_graph_decides(dev):
    """In a float16 graph, an autocast block picks its own type, and enabled=False turns autocast off."""
    g = mm.Graph(dev, compute_dtype="float16")
    h, t = g.input("h", (3,), mm.bfloat16), g.input("t", (3,))
    words = mm.tensor(np.zeros(1, np.uint32), dev, dtype=np.uint32)
    assert mm.ops.mse_loss(h, t).dtype == mm.float32  # a loss: float32 whatever the graph's type
    mm.ops.predicate_compare(h, words, 0)  # cast up to the float32 it takes
    assert g.nodes[-2].op == "astype" and g.nodes[-2].outputs[0].dtype == mm.float32
    with mm.autocast("float16", enabled=False), pytest.raises(mm.DTypeError):
        mm.ops.predicate_compare(h, words, 0)


@pytest.mark.parametrize("dtype", LOW, ids=ids)
def test_a_loss_between_low_tensors_reads_them_as_they_are(dev, dtype):
    """The style losses' case: both sides in the low type, no float32 copy made, a float32 loss
    summed in float."""
    g = mm.Graph(dev)
    a, b = g.input("a", (2, 3, 4), dtype), g.input("b", (2, 3, 4), dtype)
    with mm.autocast(dtype):
        loss = mm.ops.mse_loss(a, b)
    assert [n.op for n in g.nodes] == ["mse_loss"] and loss.dtype == mm.float32
    x, y = (np.random.default_rng(s).standard_normal((2, 3, 4)).astype(dtype) for s in (1, 2))
    got = g.run({"a": x, "b": y}, [loss])[0]
    np.testing.assert_allclose(got, [np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)], rtol=1e-6)


def test_the_policy_table(dev):
    """The decisions themselves, for an op of the low list and one of the float32 list, each as if
    it took every storage type: the block's type over the graph's, none when disabled."""
    low_op = dataclasses.replace(ops.REGISTRY["matmul"], dtypes=D.FLOATS)
    f32_op = dataclasses.replace(ops.REGISTRY["softmax"], dtypes=D.FLOATS)
    act = dataclasses.replace(ops.REGISTRY["relu"], dtypes=D.FLOATS)
    g = mm.Graph(dev, compute_dtype="float16")
    f32, f16, bf16 = mm.float32, mm.float16, mm.bfloat16
    assert policy(low_op, [f32, f32]) is None  # no autocast: the usual promotion
    assert policy(low_op, [f32, f32], g) == f16
    assert policy(f32_op, [f16, f32], g) == f32 and policy(f32_op, [f32, f32], g) is None
    assert policy(act, [f16], g) is None and policy(act, [f32], g) is None  # the type of its inputs
    with mm.autocast("bfloat16"):
        assert policy(low_op, [f32, f16], g) == bf16 and policy(low_op, [f32, f32]) == bf16
        assert policy(ops.REGISTRY["astype"], [f32]) is None
        with mm.autocast("float16", enabled=False):
            assert policy(low_op, [f32, f32], g) is None and policy(f32_op, [f16, f32], g) is None
    only32 = dataclasses.replace(ops.REGISTRY["matmul"], dtypes=(f32,))  # a low-list op without low kernels
    with mm.autocast("float16"):
        assert policy(only32, [f32, f32]) is None and policy(only32, [f16, f32]) == f32
