"""random_tensor: a node that draws fresh numbers on every run, equal to the generator's reference stream."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal.reference import random as R
from opcheck import row


def case(data):
    kind = data.draw(st.sampled_from(["philox", "mtgp32"]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    dev = mm.device()
    gen = mm.random.Philox(dev, seed) if kind == "philox" else mm.random.MTGP32(dev, seed, states=4)
    shape = tuple(data.draw(st.lists(st.sampled_from([1, 3, 31, 32, 33]), min_size=1, max_size=3)))
    dist = data.draw(st.sampled_from([mm.random.UInt32(), mm.random.Uniform(-2.0, 3.0), mm.random.Normal(1.0, 0.5)]))
    return [], {"shape": shape, "generator": gen, "distribution": dist}


# The generic checker cannot replay a stateful stream, so this row only registers the op's
# table entry; the tests below check it against the reference stream directly.
ROW = row("random_tensor", case)


@given(data=st.data())
def test_random_tensor_continues_the_reference_stream(dev, data):
    _, attrs = case(data)
    gen, dist = attrs["generator"], attrs["distribution"]
    for _ in range(2):  # consecutive draws continue the stream
        start = gen.position
        out = mm.ops.random_tensor(**attrs).numpy()
        ref = R.random_tensor(shape=attrs["shape"], generator=gen, distribution=dist, start=start)
        assert out.shape == attrs["shape"] and out.dtype == dist.dtype
        if isinstance(dist, mm.random.Normal):
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(out, ref.astype(dist.dtype))


def test_graph_random_node_draws_fresh_numbers_every_run(dev):
    gen = mm.random.Philox(dev, 5)
    g = mm.Graph(dev)
    z = g.random((4, 8), gen, mm.random.Normal())
    y = mm.ops.scale(z, s=2.0)
    first, second = g.run({}, outputs=[y])[0], g.run({}, outputs=[y])[0]
    assert not np.array_equal(first, second)
    ref = R.random_tensor(shape=(4, 8), generator=gen, distribution=mm.random.Normal(), start=32)
    np.testing.assert_allclose(second, 2 * ref, rtol=1e-4, atol=1e-4)


def test_bad_shape_is_refused(dev):
    with pytest.raises(mm.ShapeError, match="positive sizes"):
        mm.ops.random_tensor(shape=(0, 3), generator=mm.random.Philox(dev, 0), distribution=mm.random.UInt32())
