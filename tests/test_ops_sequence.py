"""Sequence ops (embedding, its gradient, arg-max, running flags, reshape) against their references."""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row


def ids_of(data, n, vocab, out_of_range=True):
    low, high = (-1, vocab) if out_of_range else (0, vocab - 1)
    return np.asarray(data.draw(st.lists(st.integers(low, high), min_size=n, max_size=n), label="ids"), np.int32)


def embedding_case(small=False):
    def case(data):
        dims = st.integers(1, 4) if small else AWKWARD_DIMS
        n, vocab, dim = (data.draw(dims, label=k) for k in ("n", "vocab", "dim"))
        return [ids_of(data, n, vocab), floats((vocab, dim), data)], {}
    return case


def embedding_grad_case(data):
    n, vocab, dim = (data.draw(AWKWARD_DIMS, label=k) for k in ("n", "vocab", "dim"))
    return [floats((n, dim), data), ids_of(data, n, vocab)], {"vocab": vocab}


def argmax_case(data):
    """Scores of 1 to 3 axes, searched along one of them (or all); rounded to tenths, so values tie."""
    shape = tuple(data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=3), label="shape"))
    axis = data.draw(st.none() | st.integers(-len(shape), len(shape) - 1), label="axis")
    x = np.round(floats(shape, data), 1).astype(np.float32)
    return [x], {"axis": axis, "keepdims": data.draw(st.booleans(), label="keepdims")}


def still_running_case(data):
    n = data.draw(AWKWARD_DIMS, label="n")
    tokens = ids_of(data, n, 4, out_of_range=False)
    running = np.asarray(data.draw(st.lists(st.sampled_from([0, 1, 5]), min_size=n, max_size=n)), np.uint32)
    return [tokens, running], {"end": data.draw(st.integers(0, 3), label="end")}


def reshape_case(small=False):
    def case(data):
        dims = st.integers(1, 3) if small else AWKWARD_DIMS
        shape = tuple(data.draw(st.lists(dims, min_size=1, max_size=4), label="shape"))
        new = data.draw(st.sampled_from([(-1,), (shape[0], -1), (-1, 1)]), label="new")
        return [floats(shape, data)], {"shape": new}
    return case


ROWS = [
    row("embedding", embedding_case(), rtol=0, atol=0, grad_case=embedding_case(small=True), wrt=(1,)),
    row("embedding_grad", embedding_grad_case, rtol=1e-5, atol=1e-5),
    row("argmax", argmax_case, rtol=0, atol=0),
    row("still_running", still_running_case, rtol=0, atol=0),
    row("reshape", reshape_case(), rtol=0, atol=0, lowp_ulps=0, grad_case=reshape_case(small=True)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


def test_argmax_takes_the_first_of_equal_maxima(dev):
    x = mm.tensor(np.array([[1, 3, 3, 0], [2, 2, 2, 2], [-5, -1, -1, -9]], np.float32), dev)
    np.testing.assert_array_equal(mm.ops.argmax(x).numpy(), [1, 0, 1])


def test_embedding_gradient_in_a_training_graph(dev):
    """Repeated ids add up in the table's gradient; the ids (an input) get none."""
    table = mm.nn.Parameter(np.arange(12, dtype=np.float32).reshape(4, 3), dev)
    g = mm.Graph(dev)
    ids = g.input("ids", (5,), np.int32)
    target = g.input("t", (5, 3))
    loss = mm.ops.mse_loss(mm.ops.embedding(ids, table), target, reduction="sum")
    train = loss.training_graph()
    tokens = np.array([1, 3, 1, 1, 0], np.int32)
    train.step(ids=tokens, t=np.zeros((5, 3), np.float32))
    table_np = np.arange(12, dtype=np.float64).reshape(4, 3)
    expect = np.zeros((4, 3))
    np.add.at(expect, tokens, 2 * table_np[tokens])
    np.testing.assert_allclose(table.grad.numpy(), expect, rtol=1e-6)


@pytest.mark.parametrize("op, shapes, attrs, message", [
    ("embedding", [(3, 1), (4, 2)], {}, "vector of token ids"),
    ("argmax", [(3,)], {"axis": 1}, "axis 1 is not an axis of a tensor of shape"),
    ("reshape", [(2, 3)], {"shape": (4, 2)}, "cannot reshape"),
])
def test_sequence_errors(dev, op, shapes, attrs, message):
    dtypes = [mm.ops.REGISTRY[op].input_dtype(i) for i in range(len(shapes))]
    ts = [mm.tensor(np.zeros(s, d), dev, dtype=d) for s, d in zip(shapes, dtypes)]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(*ts, **attrs)
