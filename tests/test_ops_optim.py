"""Optimizer updates against their references, in place and over several steps; errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal.ops.optim import update_in_place
from mlmetal.reference import optim as R
from opcheck import AWKWARD_DIMS, floats, make_tests, row


def shape_of(data):
    return data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=3), label="shape")


def sgd_case(data):
    shape = shape_of(data)
    momentum = data.draw(st.sampled_from([0.0, 0.9]), label="momentum")
    attrs = {"lr": data.draw(st.sampled_from([0.1, 1e-3]), label="lr"), "momentum": momentum,
             "weight_decay": data.draw(st.sampled_from([0.0, 1e-2]), label="wd"),
             "nesterov": momentum > 0 and data.draw(st.booleans(), label="nesterov")}
    return [floats(shape, data) for _ in range(3)], attrs


def adam_case(data):
    shape = shape_of(data)
    p, g, m, v = (floats(shape, data) for _ in range(4))
    attrs = {"lr": data.draw(st.sampled_from([1e-3, 0.1]), label="lr"), "beta1": 0.9, "beta2": 0.999,
             "eps": data.draw(st.sampled_from([1e-8, 1e-3]), label="eps"),
             "weight_decay": data.draw(st.sampled_from([0.0, 1e-2]), label="wd"),
             "step": data.draw(st.integers(1, 1000), label="step")}
    return [p, g, m, np.abs(v)], attrs


ROWS = [
    row("sgd_update", sgd_case, rtol=1e-6, atol=1e-6),
    row("adam_update", adam_case, rtol=1e-5, atol=1e-6),
]

test_forward, _, test_nan = make_tests(ROWS)  # no differentiable op here


@given(data=st.data())
def test_adam_in_place_over_steps(dev, data):
    # Zero-initialised moments, several steps in place, against the reference run alongside.
    shape = shape_of(data)
    p = floats(shape, data).astype(np.float64)
    m, v = np.zeros(shape), np.zeros(shape)
    tp, tm, tv = (mm.tensor(a, dev) for a in (p, m, v))
    for step in range(1, 4):
        g = floats(shape, data)
        update_in_place("adam_update", tp, mm.tensor(g, dev), tm, tv, lr=0.01, step=step)
        p, m, v = R.adam_update(p, g, m, v, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=step)
    np.testing.assert_allclose(tp.numpy(), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tv.numpy(), v, rtol=1e-5, atol=1e-7)


def test_sgd_in_place_momentum(dev):
    p, buf = mm.tensor(np.ones(5, np.float32), dev), mm.tensor(np.zeros(5, np.float32), dev)
    g = mm.tensor(np.full(5, 2.0, np.float32), dev)
    for _ in range(2):
        update_in_place("sgd_update", p, g, buf, lr=0.1, momentum=0.5)
    np.testing.assert_allclose(buf.numpy(), 3.0)  # 2, then 0.5·2 + 2
    np.testing.assert_allclose(p.numpy(), 1 - 0.1 * 2 - 0.1 * 3, rtol=1e-6)


@pytest.mark.parametrize("op, n, attrs, message", [
    ("sgd_update", 3, {"lr": -1.0}, "must not be negative"),
    ("sgd_update", 3, {"lr": 0.1, "nesterov": True}, "Nesterov"),
    ("adam_update", 4, {"step": 0}, "step"),
    ("adam_update", 4, {"beta1": 1.0}, "betas"),
])
def test_optim_errors(dev, op, n, attrs, message):
    ts = [mm.tensor(np.zeros(3, np.float32), dev) for _ in range(n)]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(*ts, **attrs)


def test_optim_shape_mismatch(dev):
    p, g = mm.tensor(np.zeros(3, np.float32), dev), mm.tensor(np.zeros(4, np.float32), dev)
    with pytest.raises(mm.ShapeError, match="grad has shape"):
        mm.ops.sgd_update(p, g, p, lr=0.1)
