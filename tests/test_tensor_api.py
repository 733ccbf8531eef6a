"""The tensor API (issue 16): operators and methods equal the ops they name, eagerly and in graphs
(values and, through training_graph, gradients, bit for bit); NumPy's basic indexing; what
mm.tensor stores; the factories."""

import numpy as np
import pytest

import mlmetal as mm
from mlmetal import ops
from mlmetal.nn import Parameter

RNG = np.random.default_rng(16)
X = RNG.standard_normal((3, 4)).astype(np.float32)
Y = RNG.standard_normal((4,)).astype(np.float32) + 3.0  # broadcasts against X; far from 0, for division
W = RNG.standard_normal((2, 4, 5)).astype(np.float32)


def const(v, like):
    """The 0-d float32 tensor a number stands for, on the device (or graph) of `like`."""
    return mm.tensor(np.float32(v), like.device)


# (id, operator form, the named ops it must equal, the float64 meaning)
CASES = [
    ("x+y", lambda x, y: x + y, lambda x, y: ops.add(x, y), lambda x, y: x + y),
    ("x+s", lambda x, y: x + 2.5, lambda x, y: ops.add(x, const(2.5, x)), lambda x, y: x + 2.5),
    ("s+x", lambda x, y: 2.5 + x, lambda x, y: ops.add(const(2.5, x), x), lambda x, y: 2.5 + x),
    ("x-y", lambda x, y: x - y, lambda x, y: ops.sub(x, y), lambda x, y: x - y),
    ("x-s", lambda x, y: x - 0.75, lambda x, y: ops.sub(x, const(0.75, x)), lambda x, y: x - 0.75),
    ("s-x", lambda x, y: 0.75 - x, lambda x, y: ops.sub(const(0.75, x), x), lambda x, y: 0.75 - x),
    ("y-x", lambda x, y: y - x, lambda x, y: ops.sub(y, x), lambda x, y: y - x),
    ("x*y", lambda x, y: x * y, lambda x, y: ops.mul(x, y), lambda x, y: x * y),
    ("x*s", lambda x, y: x * 1.7, lambda x, y: ops.mul(x, const(1.7, x)), lambda x, y: x * 1.7),
    ("np*x", lambda x, y: np.float32(1.7) * x, lambda x, y: ops.mul(const(1.7, x), x), lambda x, y: 1.7 * x),
    ("x/y", lambda x, y: x / y, lambda x, y: ops.div(x, y), lambda x, y: x / y),
    ("x/s", lambda x, y: x / 3.0, lambda x, y: ops.div(x, const(3.0, x)), lambda x, y: x / 3.0),
    ("s/y", lambda x, y: 3.0 / y, lambda x, y: ops.div(const(3.0, y), y), lambda x, y: 3.0 / y),
    ("-x", lambda x, y: -x, lambda x, y: ops.neg(x), lambda x, y: -x),
    ("abs", lambda x, y: abs(x), lambda x, y: ops.abs(x), lambda x, y: np.abs(x)),
    ("x**3", lambda x, y: x ** 3, lambda x, y: ops.pow(x, exponent=3.0), lambda x, y: x ** 3),
    ("y**0.5", lambda x, y: y ** 0.5, lambda x, y: ops.pow(y, exponent=0.5), lambda x, y: y ** 0.5),
    ("x@w", lambda x, y: x @ y.reshape(4, 1), lambda x, y: ops.matmul(x, ops.reshape(y, shape=(4, 1))),
     lambda x, y: x @ y.reshape(4, 1)),
    ("x.T", lambda x, y: x.T, lambda x, y: ops.transpose(x), lambda x, y: x.T),
    ("x[:,1:3]", lambda x, y: x[:, 1:3], lambda x, y: ops.strided_slice(x, start=(None, 1), stop=(None, 3)),
     lambda x, y: x[:, 1:3]),
    ("sum", lambda x, y: x.sum(axis=1, keepdims=True), lambda x, y: ops.sum(x, axis=1, keepdims=True),
     lambda x, y: x.sum(axis=1, keepdims=True)),
    ("mean", lambda x, y: x.mean(), lambda x, y: ops.mean(x), lambda x, y: x.mean()),
    ("max", lambda x, y: x.max(axis=0), lambda x, y: ops.max(x, axis=0), lambda x, y: x.max(axis=0)),
    ("min", lambda x, y: x.min(axis=-1), lambda x, y: ops.min(x, axis=-1), lambda x, y: x.min(axis=-1)),
    ("var", lambda x, y: x.var(axis=1), lambda x, y: ops.var(x, axis=1), lambda x, y: x.var(axis=1, ddof=1)),
    ("reshape", lambda x, y: x.reshape(2, -1), lambda x, y: ops.reshape(x, shape=(2, 6)), lambda x, y: x.reshape(2, 6)),
    ("permute", lambda x, y: x.unsqueeze(0).permute(2, 0, 1), lambda x, y: ops.transpose(
        ops.unsqueeze(x, 0), perm=(2, 0, 1)), lambda x, y: x[None].transpose(2, 0, 1)),
    ("flatten", lambda x, y: x.flatten(), lambda x, y: ops.flatten(x), lambda x, y: x.reshape(-1)),
    ("exp", lambda x, y: x.exp(), lambda x, y: ops.exp(x), lambda x, y: np.exp(x)),
    ("log", lambda x, y: y.log(), lambda x, y: ops.log(y), lambda x, y: np.log(y)),
    ("sqrt", lambda x, y: y.sqrt(), lambda x, y: ops.sqrt(y), lambda x, y: np.sqrt(y)),
    ("clamp", lambda x, y: x.clamp(min=-0.5), lambda x, y: ops.clamp(x, min=-0.5), lambda x, y: np.maximum(x, -0.5)),
    ("chain", lambda x, y: ((x - y) ** 2).mean(axis=0) / 2 + 1,
     lambda x, y: ops.add(ops.div(ops.mean(ops.pow(ops.sub(x, y), exponent=2.0), axis=0), const(2, x)), const(1, x)),
     lambda x, y: ((x - y) ** 2).mean(axis=0) / 2 + 1),
]


@pytest.mark.parametrize("form, named, meaning", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_operator_equals_named_op_eagerly(dev, form, named, meaning):
    x, y = mm.tensor(X, dev), mm.tensor(Y, dev)
    got = form(x, y)
    assert isinstance(got, mm.Tensor)
    np.testing.assert_array_equal(got.numpy(), named(x, y).numpy())
    np.testing.assert_allclose(got.numpy(), meaning(X.astype(np.float64), Y.astype(np.float64)), rtol=1e-5, atol=1e-6)


def _step(dev, expression, upstream):
    """(value, dL/dx, dL/dy) of L = Σ upstream·expression(x, y) in a graph, x and y parameters."""
    x, y = Parameter(X, dev), Parameter(Y, dev)
    g = mm.Graph(dev)
    out = expression(g.leaf(x), g.leaf(y))
    assert isinstance(out, mm.GraphTensor)
    loss = (out * mm.tensor(upstream, dev)).sum()
    loss.training_graph().step()
    values = g.run({}, outputs=[out])[0]
    return values, (x.grad.numpy() if x.grad is not None else None), (y.grad.numpy() if y.grad is not None else None)


@pytest.mark.parametrize("form, named", [c[1:3] for c in CASES], ids=[c[0] for c in CASES])
def test_operator_equals_named_op_in_graphs(dev, form, named):
    x, y = mm.tensor(X, dev), mm.tensor(Y, dev)
    upstream = RNG.standard_normal(form(x, y).shape).astype(np.float32)
    for a, b in zip(_step(dev, form, upstream), _step(dev, named, upstream)):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_graph_tensors_mix_with_device_tensors_and_inputs(dev):
    g = mm.Graph(dev)
    x = g.input("x", (3, 4))
    y = mm.tensor(Y, dev)
    out = 1 - (y * x).sum(axis=1) / y.sum()  # device tensor on the left of a graph tensor
    got = g.run({"x": X}, outputs=[out])[0]
    np.testing.assert_allclose(got, 1 - (Y * X).sum(axis=1) / Y.sum(), rtol=1e-5)
    assert x.ndim == 2 and x.size == 12 and len(x) == 3 and x.device is dev


def test_ops_on_parameters_alone_follow_them_into_graphs(dev):
    """`x @ w.T + b.reshape(...)`: w.T and b.reshape run eagerly on the parameters, yet a graph
    reading them records those ops on the parameters, so gradients and later updates reach them."""
    w, b = Parameter(RNG.standard_normal((5, 4)).astype(np.float32), dev), Parameter(np.zeros(5, np.float32), dev)
    wt, column = (w / 2).T * 2, b.reshape(1, 5)  # `/ 2` divides by a constant the operator makes
    assert wt.derivation is not None and column.derivation is not None
    assert (mm.tensor(X, dev) @ wt).derivation is None  # data and parameters: data, as before
    g = mm.Graph(dev)
    y = g.input("x", (3, 4)) @ wt + column
    train = (y * y).sum().training_graph()
    train.step(x=X)
    np.testing.assert_allclose(w.grad.numpy(), 2 * (X @ w.numpy().T).T @ X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), 2 * (X @ w.numpy().T).sum(axis=0), rtol=1e-5, atol=1e-5)
    w.assign(np.ones((5, 4)))  # the graph reads w as it is now, not the copy w.T made when it was built
    np.testing.assert_allclose(g.run({"x": X}, outputs=[y])[0], X @ np.ones((4, 5)), rtol=1e-6)
    wt.assign(np.zeros((4, 5)))
    assert wt.derivation is None  # assigned: data of its own


BATCHED = [((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((3, 4), (2, 4, 5)), ((2, 1, 3, 4), (3, 4, 2))]


@pytest.mark.parametrize("sa, sb", BATCHED, ids=[f"{a}@{b}" for a, b in BATCHED])
def test_matmul_operator_batches(dev, sa, sb):
    a, b = RNG.standard_normal(sa).astype(np.float32), RNG.standard_normal(sb).astype(np.float32)
    got = (mm.tensor(a, dev) @ mm.tensor(b, dev)).numpy()
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


INDICES = [
    (1,), (-1,), (slice(None), 2), (slice(1, None), slice(None, None, -2)), (Ellipsis, 0), (None, 0, Ellipsis),
    (slice(None), None, slice(0, 4, 3), 1), (0, 1, 2), (slice(None, None, 2), Ellipsis, None),
]


@pytest.mark.parametrize("index", INDICES, ids=[repr(i) for i in INDICES])
def test_basic_indexing_as_numpy(dev, index):
    a = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    got = mm.tensor(a, dev)[index].numpy()
    assert got.shape == a[index].shape
    np.testing.assert_array_equal(got, a[index])
    # its gradient scatters back into the indexed places (every index here picks each element once)
    p = Parameter(a, dev)
    g = mm.Graph(dev)
    upstream = RNG.standard_normal(a[index].shape).astype(np.float32)
    (g.leaf(p)[index] * mm.tensor(upstream, dev)).sum().training_graph().step()
    expected = np.zeros_like(a)
    expected[index] = upstream
    np.testing.assert_array_equal(p.grad.numpy(), expected)


def test_iteration_and_len(dev):
    x = mm.tensor(X, dev)
    assert len(x) == 3 and x.ndim == 2 and x.size == 12
    np.testing.assert_array_equal(np.stack([row.numpy() for row in x]), X)


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: x[0, 0, 0], IndexError, r"too many indices for a tensor of 2 axes \(3, 4\)"),
    (lambda x: x[3], IndexError, "index 3 is out of range for axis 0 of size 3"),
    (lambda x: x[:, -5], IndexError, "index -5 is out of range for axis 1 of size 4"),
    (lambda x: x[..., ...], IndexError, "one ellipsis"),
    (lambda x: x[[0, 1]], TypeError, "basic indices: integers, slices, ... and None; got list"),
    (lambda x: x[x], TypeError, "got Tensor"),
    (lambda x: x + np.ones(4), TypeError, r"a tensor and a ndarray \(make it a tensor first: mm.tensor\(array\)\)"),
    (lambda x: x ** x, TypeError, "x \\*\\* p takes a number as p, got Tensor"),
    (lambda x: x + mm.tensor(np.ones(5, np.float32), x.device), mm.ShapeError, r"\(3, 4\) and \(5,\) do not broadcast"),
    (lambda x: bool(x), ValueError, "truth value of a tensor of 12 elements is ambiguous"),
    (lambda x: len(x.sum()), TypeError, "len\\(\\) of a 0-d tensor"),
    (lambda x: x + 1e39, mm.ShapeError, "does not fit a float32"),
    (lambda x: x / 1e39, mm.ShapeError, "does not fit a float32"),
])
def test_operator_errors(dev, bad, error, message):
    with pytest.raises(error, match=message):
        bad(mm.tensor(X, dev))


def test_graph_tensor_has_no_truth_value(dev):
    x = mm.Graph(dev).input("x", (2,))
    with pytest.raises(TypeError, match="no value until its graph runs"):
        bool(x)


def test_graph_run_refuses_one_tensor_as_outputs(dev):
    """A graph tensor iterates over its rows, so `outputs=y` must be refused rather than run row by row."""
    g = mm.Graph(dev)
    y = g.input("x", (2, 3)) * 2
    with pytest.raises(TypeError, match=r"outputs is a list of tensors: outputs=\[y\]"):
        g.run({"x": X[:2, :3]}, outputs=y)


def test_one_element_tensor_truth(dev):
    assert bool(mm.tensor(np.float32(2), dev)) and not bool(mm.tensor(np.zeros(1, np.float32), dev))


# ---------------------------------------------------------------- what mm.tensor stores

@pytest.mark.parametrize("array", [np.arange(3), np.ones(3, bool), np.ones(2, np.complex64),
                                   np.ones(2, np.uint8), np.array(["a"]), np.int64(3)],
                         ids=["int64", "bool", "complex64", "uint8", "str", "int64 scalar"])
def test_unstored_numpy_dtypes_are_refused(dev, array):
    with pytest.raises(mm.DTypeError, match=f"{np.asarray(array).dtype} is not something mlmetal stores.*"
                                            r"\(mlmetal stores float32, float16, bfloat16, int32, uint32; "
                                            r"float64 arrays become float32\)"):
        mm.tensor(array, dev)


@pytest.mark.parametrize("dtype", [np.float16, mm.bfloat16])
def test_half_arrays_stay_half(dev, dtype):
    a = np.array([1.5, -2.25, 65504.0 if dtype == np.float16 else 3e38, 2.0**-24], dtype)
    t = mm.tensor(a, dev)
    assert t.dtype == np.dtype(dtype) and t.nbytes == 2 * a.size
    back = t.numpy()
    assert back.dtype == np.dtype(dtype) and back.view(np.uint16).tolist() == a.view(np.uint16).tolist()


def test_stored_dtypes_and_the_float64_exception(dev):
    assert mm.tensor(np.ones(2, np.float64), dev).dtype == np.float32  # the documented exception
    for dtype in (np.float32, np.int32, np.uint32):
        t = mm.tensor(np.arange(3).astype(dtype), dev)
        assert t.dtype == dtype
        np.testing.assert_array_equal(t.numpy(), np.arange(3))
    assert mm.tensor([1, 2], dev).dtype == np.int32 and mm.tensor(2.5, dev).dtype == np.float32  # Python data, as MLX
    assert mm.tensor(np.arange(3), dev, dtype=np.int32).dtype == np.int32  # asked for: converted
    with pytest.raises(mm.DTypeError, match="integers from 0 to 4294967296 do not fit int32"):
        mm.tensor(np.array([0, 2**32]), dev, dtype=np.int32)
    with pytest.raises(mm.DTypeError, match="dtype=float64 is not one mlmetal stores"):
        mm.tensor([1.0], dev, dtype=np.float64)
    assert mm.tensor([1.0], dev, dtype="bfloat16").dtype == mm.bfloat16


# ---------------------------------------------------------------- factories

def test_filled_factories(dev):
    for t, value, dtype in [(mm.zeros((2, 3), dev), 0, np.float32), (mm.ones(4, dev, np.int32), 1, np.int32),
                            (mm.full((2, 2), -2.5, device=dev), -2.5, np.float32),
                            (mm.full(3, 2**32 - 1, dev, np.uint32), 2**32 - 1, np.uint32),
                            (mm.full(2, float("-inf"), dev), -np.inf, np.float32)]:
        assert t.device is dev and t.dtype == dtype
        np.testing.assert_array_equal(t.numpy(), np.full(t.shape, value, dtype))
    assert mm.zeros((0, 3), dev).shape == (0, 3)


def test_arange_as_numpy(dev):
    for args, dtype in [((5,), np.int32), ((2, 11, 3), np.int32), ((0, 1, 0.25), np.float32), ((1.5,), np.float32),
                        ((3, -3, -2), np.int32)]:
        t = mm.arange(*args, device=dev)
        assert t.dtype == dtype
        np.testing.assert_array_equal(t.numpy(), np.arange(*args).astype(dtype))


def test_rand_and_randn_draw_the_philox_stream_on_the_device(dev):
    mm.random.seed(7)
    a, b = mm.rand((3, 5), dev), mm.randn(6, dev)
    stream = mm.random.Philox(dev, seed=7)  # the default generator's stream: seed 7, continued across calls
    np.testing.assert_array_equal(a.numpy(), stream.uniform((3, 5)))
    np.testing.assert_array_equal(b.numpy(), stream.normal(6))
    mine = mm.random.MTGP32(dev, seed=3, states=4)
    np.testing.assert_array_equal(mm.randn((2, 300), generator=mine).numpy(),
                                  mm.random.MTGP32(dev, seed=3, states=4).normal((2, 300)))
    mm.random.seed(7)
    np.testing.assert_array_equal(mm.rand((3, 5), dev).numpy(), a.numpy())  # seeding restarts it


@pytest.mark.parametrize("bad, error, message", [
    (lambda d: mm.full(2, 1.5, d, np.int32), mm.DTypeError, "1.5 is not a value of int32"),
    (lambda d: mm.full(2, -1, d, np.uint32), mm.DTypeError, "-1 is not a value of uint32"),
    (lambda d: mm.full(2, 1e39, d), mm.DTypeError, r"1e\+39 is not a value of float32"),
    (lambda d: mm.zeros((2, -1), d), ValueError, "non-negative ints, got \\(2, -1\\)"),
    (lambda d: mm.ones(2, d, np.float64), mm.DTypeError, "dtype float64 is not one mlmetal stores"),
    (lambda d: mm.arange(0, 1, 0, device=d), ValueError, "step must not be 0"),
    (lambda d: mm.random.seed(-1), ValueError, r"seed must be in \[0, 2\*\*32\)"),
])
def test_factory_errors(dev, bad, error, message):
    with pytest.raises(error, match=message):
        bad(dev)
