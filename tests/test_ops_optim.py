"""Optimizer updates against their references, in place and over several steps; errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal.ops.optim import update_in_place
from mlmetal.reference import optim as R
from mlmetal.ops.optim import LOSS_SCALE_WORDS
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row


def state(scale, finite=1, clean=0, skipped=0, steps=0):
    """A loss scaler's five words."""
    words = np.array([0, finite, clean, skipped, steps], np.uint32)
    words[:1] = np.float32(scale).reshape(1).view(np.uint32)
    return words


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


def scale_gradient_case(data):
    scale = data.draw(st.sampled_from([1.0, 3.0, 2.0**16, 2.0**24, 2.0**-10, 2.0**127, 1e-30]), label="scale")
    return [state(scale), floats(data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=2), label="shape"), data)], {}


def scale_update_case(data):
    interval = data.draw(st.sampled_from([1, 2, 5, 2000]), label="growth_interval")
    words = state(data.draw(st.sampled_from([1.0, 2.0**16, 3.0, 2.0**127, 1e-45]), label="scale"),
                  finite=data.draw(st.sampled_from([0, 1, 9]), label="finite"),
                  clean=data.draw(st.sampled_from([0, interval - 1, interval]), label="clean"),
                  skipped=data.draw(st.sampled_from([0, 3]), label="skipped"),
                  steps=data.draw(st.sampled_from([0, 7, 2**32 - 1]), label="steps"))
    return [words], {"growth_interval": interval,
                     "growth_factor": data.draw(st.sampled_from([2.0, 1.5]), label="growth"),
                     "backoff_factor": data.draw(st.sampled_from([0.5, 0.25, 0.9]), label="backoff")}


ROWS = [
    row("sgd_update", sgd_case, rtol=1e-6, atol=1e-6),
    row("adam_update", adam_case, rtol=1e-5, atol=1e-6),
    row("loss_scale_gradient", scale_gradient_case, rtol=0, atol=0),
    row("loss_scale_update", scale_update_case, rtol=0, atol=0),
]

test_forward, test_grad, test_nan = make_tests(ROWS)  # (loss_scale_gradient's gradients are None)
test_storage, test_storage_grad = make_storage_tests(ROWS)


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


# ---------------------------------------------------------------- loss scaling

@pytest.mark.parametrize("op, n", [("sgd_update", 3), ("adam_update", 4)])
def test_updates_unscale_by_the_scale_on_the_device(dev, op, n):
    """With loss_scale, an update of the gradient times 2¹⁶ equals the update of the gradient, bit for bit."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(1000).astype(np.float32) for _ in range(n)]
    inputs[-1] = np.abs(inputs[-1])
    attrs = {"lr": 0.1, "weight_decay": 0.01}
    plain = getattr(mm.ops, op)(*[mm.tensor(a, dev) for a in inputs], **attrs)
    scaled_in = [inputs[0], inputs[1] * np.float32(2.0**16), *inputs[2:]]
    words = mm.tensor(state(2.0**16), dev, dtype=np.uint32)
    scaled = getattr(mm.ops, op)(*[mm.tensor(a, dev) for a in scaled_in], **attrs, loss_scale=words)
    for p, q in zip(plain, scaled):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    ref = getattr(R, op)(*[a.astype(np.float64) for a in scaled_in], **mm.ops.infer(op, *plain[:1] * n, **attrs)[1]
                         | {"loss_scale": words})
    np.testing.assert_allclose(scaled[0].numpy(), ref[0], rtol=1e-5, atol=1e-6)


def test_the_scale_never_grows_past_float32(dev):
    words = mm.tensor(state(2.0**127, clean=4), dev, dtype=np.uint32)
    out = mm.ops.loss_scale_update(words, growth_interval=5).numpy()
    np.testing.assert_array_equal(out, state(2.0**127, clean=0, steps=1))


def test_loss_scale_errors(dev):
    ts = [mm.tensor(np.zeros(3, np.float32), dev) for _ in range(3)]
    with pytest.raises(mm.ShapeError, match="loss_scale must be"):
        mm.ops.sgd_update(*ts, lr=0.1, loss_scale=ts[0])
    words = mm.tensor(state(1.0), dev, dtype=np.uint32)
    with pytest.raises(mm.ShapeError, match="5 uint32 words"):
        mm.ops.loss_scale_update(mm.tensor(np.zeros(3, np.uint32), dev, dtype=np.uint32))
    with pytest.raises(mm.ShapeError, match="growth_interval"):
        mm.ops.loss_scale_update(words, growth_interval=0)
    with pytest.raises(mm.ShapeError, match="backoff_factor"):
        mm.ops.loss_scale_update(words, backoff_factor=1.0)
    with pytest.raises(ValueError, match="not an optimizer update"):
        update_in_place("loss_scale_update", words, words)
    assert LOSS_SCALE_WORDS == 5
