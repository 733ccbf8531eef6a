"""Predicate-writing kernels against their references, and predication end to end: in place
through `Predicates`, inside graphs, a zero word leaving outputs untouched."""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal.ops.predicate import COMPARES, Predicates
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row


def words_and(data, extra=None):
    """Drawn predicate words (some zero, some large) and a word index into them."""
    count = data.draw(st.integers(1, 40), label="count")
    words = np.asarray(data.draw(st.lists(st.sampled_from([0, 1, 2, 7, 2**32 - 1]), min_size=count, max_size=count),
                                 label="words"), np.uint32)
    return words, data.draw(st.integers(0, count - 1), label="word")


def set_case(data):
    words, word = words_and(data)
    return [words], {"word": word, "value": data.draw(st.sampled_from([0, 1, 5, 2**32 - 1]), label="value")}


def decrement_case(data):
    words, word = words_and(data)
    return [words], {"word": word}


def compare_case(data):
    words, word = words_and(data)
    x = floats((data.draw(AWKWARD_DIMS, label="n"),), data)
    index = data.draw(st.integers(0, x.size - 1), label="index")
    # thresholds equal to the value exercise == and the non-strict comparisons
    threshold = data.draw(st.sampled_from([float(x[index]), 0.0, 0.5, -1.0]), label="threshold")
    return [x, words], {"word": word, "threshold": threshold, "compare": data.draw(st.sampled_from(list(COMPARES))),
                        "index": index}


def reduce_case(data):
    words, word = words_and(data)
    n = data.draw(st.sampled_from([1, 31, 32, 33, 255, 256, 257, 1000]), label="n")
    density = data.draw(st.sampled_from([0.0, 0.01, 0.5, 0.99, 1.0]), label="density")
    flags = (np.random.default_rng(data.draw(st.integers(0, 2**31))).random(n) < density).astype(np.uint32)
    flags *= data.draw(st.sampled_from([1, 3, 2**31]), label="scale")  # any nonzero value means true
    return [flags, words], {"word": word}


def finite_case(data):
    """Words of small values (the storage tests compare them as numbers) and x with a few, one or no Inf/NaN."""
    count = data.draw(st.integers(1, 40), label="count")
    words = np.asarray(data.draw(st.lists(st.sampled_from([0, 1, 2, 7]), min_size=count, max_size=count),
                                 label="words"), np.uint32)
    x = floats((data.draw(st.sampled_from([1, 31, 32, 33, 257, 1000, 70000]), label="n"),), data)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31), label="seed"))
    bad = data.draw(st.sampled_from([0, 1, 5, x.size]), label="bad")
    x[rng.choice(x.size, min(bad, x.size), replace=False)] = rng.choice([np.inf, -np.inf, np.nan], min(bad, x.size))
    return [x, words], {"word": data.draw(st.integers(0, count - 1), label="word")}


ROWS = [
    row("predicate_set", set_case, rtol=0, atol=0),
    row("predicate_decrement", decrement_case, rtol=0, atol=0),
    row("predicate_compare", compare_case, rtol=0, atol=0),
    row("predicate_all", reduce_case, rtol=0, atol=0),
    row("predicate_any", reduce_case, rtol=0, atol=0),
    row("predicate_finite", finite_case, rtol=0, atol=0),
]

test_forward, _, test_nan = make_tests(ROWS)  # none is differentiable
test_storage, _ = make_storage_tests(ROWS)  # (none is differentiable)


def u32(dev, values):
    return mm.tensor(np.asarray(values, np.uint32), dev, dtype=np.uint32)


# ---------------------------------------------------------------- Predicates, eagerly

def test_predicates_write_in_place_and_share_one_buffer(dev):
    p = Predicates(dev, 4)
    assert [q.offset for q in (p[0], p[3])] == [0, 12] and p[0].buffer is p[3].buffer
    p.set(1, 0)
    p.set(2, 3)
    p.decrement(2)
    p.any(3, u32(dev, [0, 0]))
    p.compare(0, mm.tensor(np.array([0.5, 2.0]), dev), ">=", 2.0, index=1)
    np.testing.assert_array_equal(p.numpy(), [1, 0, 2, 0])
    with pytest.raises(IndexError):
        p[4]


def test_decrement_saturates_at_zero(dev):
    p = Predicates(dev, 1, value=2)
    seen = []
    for _ in range(4):
        p.decrement(0)
        seen.append(int(p.numpy()[0]))
    assert seen == [1, 0, 0, 0]


@pytest.mark.parametrize("op, attrs, message", [
    ("predicate_set", {"word": 2}, "not an index"),
    ("predicate_set", {"word": 0, "value": -1}, "uint32"),
])
def test_predicate_errors(dev, op, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(u32(dev, [1, 1]), **attrs)
    with pytest.raises(mm.ShapeError, match="compare must be"):
        mm.ops.predicate_compare(mm.tensor(np.ones(2), dev), u32(dev, [1]), 0, compare="=>")


# ---------------------------------------------------------------- a zero word skips, a nonzero word runs

def sentinel(dev, shape, dtype=np.float32):
    return mm.tensor(np.full(shape, 1234, dtype), dev, dtype=dtype)


@pytest.mark.parametrize("value", [0, 1, 9])
def test_every_predicate_writer_obeys_a_predicate(dev, value):
    """Writers are dispatches like any other: a zero word skips them, leaving their output alone."""
    flags = Predicates(dev, 1, value=value)
    x = mm.tensor(np.array([3.0]), dev)
    for op, inputs, attrs in [("predicate_set", [], {"word": 0, "value": 5}),
                              ("predicate_decrement", [], {"word": 0}),
                              ("predicate_compare", [x], {"word": 0, "threshold": 1.0, "compare": ">", "index": 0}),
                              ("predicate_any", [u32(dev, [1])], {"word": 0}),
                              ("predicate_finite", [mm.tensor(np.array([np.inf]), dev)], {"word": 0})]:
        words = u32(dev, [0])
        out = sentinel(dev, (1,), np.uint32)
        _, norm = mm.ops.infer(op, *inputs, words, **attrs)
        cb = dev.command_buffer()
        cb.predicate = flags[0]
        mm.ops.REGISTRY[op].encode(cb, out, *inputs, words, **norm)
        cb.commit()
        cb.wait()
        ref = mm.ops.REGISTRY[op].reference(*[np.asarray(i.numpy(), np.float64) for i in inputs], np.zeros(1, np.uint32),
                                            **norm)
        np.testing.assert_array_equal(out.numpy(), ref if value else [1234], err_msg=op)


def small_graph(dev, predicate=None, outs=None):
    """tanh(x·wᵀ) and its sum with x, optionally predicated, optionally written into `outs`."""
    rng = np.random.default_rng(0)
    w = mm.tensor(rng.standard_normal((5, 5)).astype(np.float32), dev)
    g = mm.Graph(dev)
    x = g.input("x", (3, 5))

    def block():
        h = mm.ops.tanh(mm.ops.linear(x, w))
        if outs is None:
            return mm.ops.add(h, x)
        return g.append("add", [h, x], {}, out_values=[outs])

    if predicate is None:
        return g, block()
    with g.predicated(predicate):
        return g, block()


@pytest.mark.parametrize("value", [1, 7, 2**32 - 1])
def test_predicated_graph_equals_unpredicated_when_nonzero(dev, value):
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    g, y = small_graph(dev)
    gp, yp = small_graph(dev, Predicates(dev, 2, value=value)[1])
    np.testing.assert_array_equal(gp.run({"x": x}, [yp])[0], g.run({"x": x}, [y])[0])


def test_zero_predicate_leaves_graph_outputs_untouched(dev):
    out = sentinel(dev, (3, 5))
    g, y = small_graph(dev, Predicates(dev, 1, value=0)[0], outs=out)
    g.run({"x": np.ones((3, 5), np.float32)}, [y])
    np.testing.assert_array_equal(out.numpy(), np.full((3, 5), 1234, np.float32))


def test_a_graph_turns_its_own_later_nodes_off(dev):
    """A step budget of 3 in a graph of 5 predicated steps: the first 3 write, the last 2 do not."""
    budget = Predicates(dev, 1)
    g = mm.Graph(dev)
    x = g.input("x", (4,))
    budget.set(0, 3, graph=g)  # reset on every run
    outs = [sentinel(dev, (4,)) for _ in range(5)]
    for k, out in enumerate(outs):
        with g.predicated(budget[0]):
            g.append("scale", [x], {"s": float(k + 1)}, out_values=[out])
            budget.decrement(0, graph=g)
    for _ in range(2):  # a second run behaves the same: the budget is reset on the device
        g.run({"x": np.ones(4, np.float32)}, [g.nodes[-1].outputs[0]])
        for k, out in enumerate(outs):
            np.testing.assert_array_equal(out.numpy(), np.full(4, k + 1.0 if k < 3 else 1234.0, np.float32))
        for out in outs:
            out.assign(np.full(4, 1234, np.float32))


def test_any_over_running_flags_switches_off_the_rest(dev):
    """The decoder's pattern: a writer predicated by the very word it writes stops everything after it."""
    p = Predicates(dev, 1)
    g = mm.Graph(dev)
    running = g.input("running", (40,), np.uint32)
    outs = [sentinel(dev, (40,)) for _ in range(3)]
    with g.predicated(p[0]):
        g.append("scale", [g.leaf(mm.tensor(np.ones(40), dev))], {"s": 2.0}, out_values=[outs[0]])
        p.any(0, running)
        g.append("scale", [g.leaf(mm.tensor(np.ones(40), dev))], {"s": 3.0}, out_values=[outs[1]])
        p.set(0, 1, graph=g)  # skipped as well: nothing after the word drops to 0 runs
        g.append("scale", [g.leaf(mm.tensor(np.ones(40), dev))], {"s": 4.0}, out_values=[outs[2]])
    g.run({"running": np.zeros(40, np.uint32)}, [g.nodes[-1].outputs[0]])
    np.testing.assert_array_equal([o.numpy()[0] for o in outs], [2.0, 1234.0, 1234.0])
    assert p.numpy()[0] == 0


# ---------------------------------------------------------------- finite

@pytest.mark.parametrize("dtype", [mm.float32, mm.float16, mm.bfloat16])
def test_finite_checks_and_into_one_word_in_place(dev, dtype):
    """Several tensors checked into one word: it stays set only while every one is finite; a
    float32 value past the storage type's range is Inf there."""
    p = Predicates(dev, 3, value=5)
    for values in ([1.0, -2.0], np.zeros(5000), [3e4, 6e4]):
        p.finite(1, mm.tensor(np.asarray(values, np.float32), dev).astype(dtype))
    np.testing.assert_array_equal(p.numpy(), [5, 5, 5])
    bad = np.array([7e4 if dtype == mm.float16 else np.nan] + [0.0] * 999, np.float32)  # 7·10⁴: Inf in half
    p.finite(1, mm.tensor(bad, dev).astype(dtype))
    p.finite(1, mm.tensor(np.ones(3, np.float32), dev).astype(dtype))  # a later finite tensor does not set it again
    np.testing.assert_array_equal(p.numpy(), [5, 0, 5])


def test_finite_in_a_graph_predicates_what_follows(dev):
    """An Inf in the input switches off a predicated node, on the device; a finite input runs it."""
    p = Predicates(dev, 1)
    g = mm.Graph(dev)
    x = g.input("x", (40,))
    out = sentinel(dev, (40,))
    p.set(0, 1, graph=g)
    p.finite(0, x)
    with g.predicated(p[0]):
        g.append("scale", [x], {"s": 2.0}, out_values=[out])
    bad = np.ones(40, np.float32)
    bad[17] = -np.inf
    g.run({"x": bad}, [g.nodes[-1].outputs[0]])
    np.testing.assert_array_equal(out.numpy(), np.full(40, 1234, np.float32))
    g.run({"x": np.ones(40, np.float32)}, [g.nodes[-1].outputs[0]])
    np.testing.assert_array_equal(out.numpy(), np.full(40, 2, np.float32))
