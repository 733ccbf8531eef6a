"""Concat and slice along the channels and broadcasts against their references; shape errors."""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from opcheck import AWKWARD_DIMS, floats, make_tests, row


def outer_shape(data, small):
    dims = st.integers(1, 3) if small else AWKWARD_DIMS
    return data.draw(st.lists(dims, min_size=0, max_size=1 if small else 2), label="spatial")


def concat_case(small=False):
    def case(data):
        n = data.draw(st.integers(1, 3), label="n")
        spatial = outer_shape(data, small)
        k = data.draw(st.integers(1, 3 if small else 4), label="inputs")
        channels = [data.draw(st.integers(1, 3) if small else AWKWARD_DIMS, label="c") for _ in range(k)]
        return [floats((n, c, *spatial), data) for c in channels], {}
    return case


def slice_case(small=False):
    def case(data):
        c = data.draw(st.integers(1, 4) if small else AWKWARD_DIMS, label="c")
        start = data.draw(st.integers(0, c - 1), label="start")
        stop = data.draw(st.integers(start + 1, c), label="stop")
        x = floats((data.draw(st.integers(1, 3)), c, *outer_shape(data, small)), data)
        return [x], {"start": start, "stop": stop}
    return case


def slice_grad_case(data):
    [x], attrs = slice_case()(data)
    return [x], {"channels": x.shape[1] + data.draw(st.integers(0, 5)), "start": data.draw(st.integers(0, 5))}


def fit(case):
    """slice_grad_case with `start` clipped so the gradient fits."""
    def fitted(data):
        [g], attrs = case(data)
        attrs["start"] = min(attrs["start"], attrs["channels"] - g.shape[1])
        return [g], attrs
    return fitted


def any_shape(data, small, max_axes=4):
    dims = st.integers(1, 4) if small else AWKWARD_DIMS
    return tuple(data.draw(st.lists(dims, min_size=1, max_size=3 if small else max_axes), label="shape"))


def broadcast_to_case(small=False):
    """x and a shape it broadcasts to: more leading axes, and some of x's size-1 axes grown."""
    def case(data):
        shape = any_shape(data, small, max_axes=3)
        x_shape = tuple(1 if data.draw(st.booleans(), label="broadcast") else n for n in shape)
        lead = data.draw(st.lists(st.integers(1, 3 if small else 5), max_size=2), label="leading")
        return [floats(x_shape, data)], {"shape": tuple(lead) + shape}
    return case


ROWS = [
    row("concat", concat_case(), rtol=0, atol=0, grad_case=concat_case(small=True)),
    row("slice_channels", slice_case(), rtol=0, atol=0, grad_case=slice_case(small=True)),
    row("slice_channels_grad", fit(slice_grad_case), rtol=0, atol=0),
    row("broadcast_to", broadcast_to_case(), rtol=0, atol=0, grad_case=broadcast_to_case(small=True)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)


def test_concat_takes_a_list(dev):
    a, b = (mm.tensor(np.full((2, c, 3, 3), c, np.float32), dev) for c in (1, 2))
    y = mm.ops.concat([a, b]).numpy()
    assert y.shape == (2, 3, 3, 3) and (y[:, 0] == 1).all() and (y[:, 1:] == 2).all()
    with pytest.raises(TypeError, match="list"):
        mm.ops.concat(a)


@pytest.mark.parametrize("shapes, message", [
    ([(2, 3, 4, 4), (2, 3, 4, 5)], "differ outside the channel"),
    ([(2, 3, 4, 4), (1, 3, 4, 4)], "differ outside the channel"),
    ([(3,)], r"\(N, C, \.\.\.\)"),
    ([], "at least one"),
])
def test_concat_errors(dev, shapes, message):
    with pytest.raises(mm.ShapeError, match=message):
        mm.ops.concat([mm.tensor(np.zeros(s, np.float32), dev) for s in shapes])


@pytest.mark.parametrize("start, stop", [(2, 2), (-1, 2), (0, 5), (3, 1), (0.5, 2)])
def test_slice_errors(dev, start, stop):
    with pytest.raises(mm.ShapeError, match="slice_channels"):
        mm.ops.slice_channels(mm.tensor(np.zeros((1, 4, 2, 2), np.float32), dev), start, stop)


@pytest.mark.parametrize("op, attrs, message", [
    ("broadcast_to", {"shape": (3, 5)}, r"cannot broadcast \(3, 4, 1\) to \(3, 5\)"),
    ("broadcast_to", {"shape": (3, 3, 1)}, r"do not broadcast"),
    ("broadcast_to", {"shape": (3, 4, 0)}, "positive ints"),
])
def test_layout_errors(dev, op, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(mm.tensor(np.zeros((3, 4, 1), np.float32), dev), **attrs)

