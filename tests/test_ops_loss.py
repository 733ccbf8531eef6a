"""Separable losses, their gradient kernels and the initial gradient against the references."""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row

ELEMENTWISE = ["mse_loss", "mae_loss", "huber_loss", "sigmoid_cross_entropy_loss"]
LOSSES = ELEMENTWISE + ["softmax_cross_entropy_loss"]
REDUCTIONS = st.sampled_from(["none", "sum", "mean", "sum_by_nonzero_weights"])


def loss_case(name, small=False, grad_op=False):
    def case(data):
        dims = st.integers(1, 3) if small else AWKWARD_DIMS
        shape = tuple(data.draw(st.lists(dims, min_size=2, max_size=3 if small else 4), label="shape"))
        y = floats(shape, data, scale=2.0)
        if name == "softmax_cross_entropy_loss":
            t = np.random.default_rng(data.draw(st.integers(0, 2**31))).dirichlet(np.ones(shape[1]), shape[:1] + shape[2:])
            t = np.moveaxis(t, -1, 1).astype(np.float32)
            loss_shape = shape[:1] + (1,) + shape[2:]
        elif name == "sigmoid_cross_entropy_loss":
            t = np.random.default_rng(data.draw(st.integers(0, 2**31))).uniform(size=shape).astype(np.float32)
            loss_shape = shape
        else:
            t = floats(shape, data)
            loss_shape = shape
        if name in ("mae_loss", "huber_loss"):  # keep finite differences off the kinks
            t = np.where(np.abs(np.abs(y - t) - 1.0) < 0.02, t + 0.1, t)
            t = np.where(np.abs(y - t) < 0.02, t + 0.1, t).astype(np.float32)
        inputs = [y, t]
        if data.draw(st.booleans(), label="weights"):  # per-element weights, some of them zero
            w = floats(loss_shape, data)
            inputs.append(np.where(w < -0.5, 0, w).astype(np.float32))
        attrs = {"reduction": data.draw(REDUCTIONS, label="reduction"),
                 "weight": data.draw(st.sampled_from([1.0, 0.5, 0.0, -2.0]), label="weight")}
        if name == "huber_loss":
            attrs["delta"] = data.draw(st.sampled_from([1.0, 0.5, 2.0]), label="delta")
        if "cross_entropy" in name:
            attrs["label_smoothing"] = data.draw(st.sampled_from([0.0, 0.1, 1.0]), label="smoothing")
        if grad_op:
            g_shape = loss_shape if attrs["reduction"] == "none" else (1,)
            inputs.insert(0, floats(g_shape, data))
        return inputs, attrs
    return case


def initial_case(data):
    shape = data.draw(st.sampled_from([(1,), (33,), (2, 1, 31, 5)]), label="shape")
    return [floats(shape, data)], {}


ROWS = [row(name, loss_case(name), rtol=rtol_for(40**4, 1e-6), atol=1e-5, grad_case=loss_case(name, small=True),
            grad_rtol=5e-3)
        for name in LOSSES]
ROWS += [row(f"{name}_grad", loss_case(name, grad_op=True), rtol=1e-5, atol=1e-6) for name in LOSSES]
ROWS += [row("initial_gradient", initial_case, rtol=0, atol=0)]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


def test_sigmoid_cross_entropy_is_finite_for_large_logits(dev):
    y = mm.tensor(np.array([-200.0, -50.0, 0.0, 50.0, 200.0], np.float32), dev)
    t = mm.tensor(np.array([1.0, 0.0, 0.5, 1.0, 0.0], np.float32), dev)
    got = mm.ops.sigmoid_cross_entropy_loss(y, t, reduction="none").numpy()
    np.testing.assert_allclose(got, [200.0, 0.0, np.log(2), 0.0, 200.0], rtol=1e-6, atol=1e-6)


def test_sum_by_nonzero_weights_with_all_zero_weights_is_zero(dev):
    y, t = (mm.tensor(np.ones(8, np.float32), dev) for _ in range(2))
    w = mm.tensor(np.zeros(8, np.float32), dev)
    assert mm.ops.mse_loss(y, t, w, reduction="sum_by_nonzero_weights").numpy() == 0
    g = mm.ops.mse_loss_grad(mm.tensor(np.ones(1, np.float32), dev), y, t, w, reduction="sum_by_nonzero_weights", weight=1.0)
    np.testing.assert_array_equal(g.numpy(), 0)


def test_initial_gradient_of_a_scalar_loss(dev):
    y, t = (mm.tensor(np.arange(4, dtype=np.float32) * k, dev) for k in (1, 2))
    g = mm.ops.initial_gradient(mm.ops.mse_loss(y, t))
    assert g.shape == (1,) and g.numpy() == 1


@pytest.mark.parametrize("op, shapes, attrs, message", [
    ("mse_loss", [(2, 3), (3, 2)], {}, "differ in shape"),
    ("mse_loss", [(2, 3), (2, 3)], {"reduction": "avg"}, "reduction must be one of"),
    ("mse_loss", [(2, 3), (2, 3), (2, 1)], {}, "weights must have"),
    ("softmax_cross_entropy_loss", [(2, 3), (2, 3), (2, 3)], {}, r"\(2, 1\)"),
    ("softmax_cross_entropy_loss", [(3,), (3,)], {}, "N, C"),
    ("huber_loss", [(2,), (2,)], {"delta": 0.0}, "delta"),
    ("sigmoid_cross_entropy_loss", [(2,), (2,)], {"label_smoothing": 2.0}, "label_smoothing"),
    ("mse_loss", [(2,), (2,)], {"delta": 1.0}, "unexpected attribute"),
    ("mse_loss_grad", [(2,), (2,), (2,)], {"reduction": "mean", "weight": 1.0}, r"loss's shape \(1,\)"),
])
def test_loss_errors(dev, op, shapes, attrs, message):
    ts = [mm.tensor(np.zeros(s, np.float32), dev) for s in shapes]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(*ts, **attrs)


def test_low_precision_losses_are_float32(dev):
    """bfloat16 predictions and labels give a float32 loss (computed and summed in float, rounded
    once), whose gradient g is float32 too, and a bfloat16 dy."""
    # rounded after scaling: ml_dtypes before 0.7 makes bfloat16 × 0.5 a float32 array
    y, t = ((np.linspace(-3, 3, 4096) * k).astype(mm.bfloat16) for k in (1, 0.5))
    loss = mm.ops.mse_loss(mm.tensor(y, dev), mm.tensor(t, dev), reduction="sum")
    assert loss.dtype == mm.float32
    np.testing.assert_allclose(loss.numpy(), [np.sum((y.astype(np.float64) - t.astype(np.float64)) ** 2)], rtol=1e-5)
    dy = mm.ops.mse_loss_grad(mm.ops.initial_gradient(loss), mm.tensor(y, dev), mm.tensor(t, dev), reduction="sum",
                              weight=1.0)
    assert dy.dtype == mm.bfloat16
    with pytest.raises(mm.DTypeError, match="input 0 .* is bfloat16; it takes float32"):
        mm.ops.mse_loss_grad(mm.tensor(np.ones(1, mm.bfloat16), dev), mm.tensor(y, dev), mm.tensor(t, dev),
                             reduction="sum", weight=1.0)
