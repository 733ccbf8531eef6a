"""mm.grad and mm.value_and_grad (issue 16, item 8): gradients of functions against float64
finite differences and hand-derived ones, traced once per signature, replayed on later calls."""

import numpy as np
import pytest

import mlmetal as mm
from opcheck import finite_difference

RNG = np.random.default_rng(8)


def f64(x, w, b):
    """log-sum-exp of a broadcast affine map, averaged: the function below, in float64."""
    z = x @ w + b
    return np.log(np.exp(z).sum(axis=1)).mean() + 0.5 * (w ** 2).sum()


def f(x, w, b):
    z = x @ w + b
    return (z.exp().sum(axis=1)).log().mean() + 0.5 * (w ** 2).sum()


def test_gradients_match_finite_differences(dev):
    x, w, b = (RNG.standard_normal(s).astype(np.float32) * 0.5 for s in ((6, 4), (4, 3), (3,)))
    value, (dx, dw, db) = mm.value_and_grad(f, argnums=(0, 1, 2))(mm.tensor(x, dev), w, b)
    np.testing.assert_allclose(value.numpy(), f64(x, w, b), rtol=1e-5)
    for i, got in enumerate((dx, dw, db)):
        expected = finite_difference(lambda a: f64(*a), [x, w, b], i, 1e-5)
        assert got.shape == expected.shape and got.device is dev
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_least_squares_gradient_by_hand(dev):
    """d/dw mean((xw − t)²) = 2·xᵀ(xw − t)/n, and grad returns it alone for an int argnums."""
    x, w, t = (RNG.standard_normal(s) for s in ((9, 5), (5, 2), (9, 2)))
    dw = mm.grad(lambda w, x, t: ((x @ w - t) ** 2).mean())(w, x, t)
    r = x.astype(np.float32).astype(np.float64) @ w.astype(np.float32) - t.astype(np.float32)
    np.testing.assert_allclose(dw.numpy(), 2 * x.astype(np.float32).T @ r / r.size, rtol=1e-5, atol=1e-6)


def test_traced_once_per_signature_and_replayed(dev):
    traces = []

    def loss(x):
        traces.append(x.shape)
        return (x * x).sum()

    g = mm.grad(loss)
    first = g(mm.tensor(np.ones(3, np.float32), dev))
    second = g(mm.tensor(np.full(3, 2.0, np.float32), dev))
    other = g(mm.tensor(np.ones((2, 2), np.float32), dev))
    assert traces == [(3,), (2, 2)]
    # each call's results are its own: the next call reuses the graph's buffers, not the returned tensors
    np.testing.assert_array_equal(first.numpy(), [2, 2, 2])
    np.testing.assert_array_equal(second.numpy(), [4, 4, 4])
    np.testing.assert_array_equal(other.numpy(), np.full((2, 2), 2))


def test_aux_outputs_and_arguments_without_gradient(dev):
    def loss(x, y, ids):
        err = ((x - 1) ** 2).sum()
        return err, x.argmax(axis=0)

    x = np.array([[0.0, 3.0], [2.0, 1.0]], np.float32)
    (value, best), (dx, dy) = mm.value_and_grad(loss, argnums=(0, 1))(x, np.ones(2, np.float32),
                                                                          np.zeros(2, np.int32))
    np.testing.assert_allclose(value.numpy(), ((x - 1) ** 2).sum())
    np.testing.assert_array_equal(best.numpy(), [1, 0])
    np.testing.assert_array_equal(dx.numpy(), 2 * (x - 1))
    np.testing.assert_array_equal(dy.numpy(), np.zeros(2))  # the value does not depend on y


def test_closed_over_parameters_are_constants(dev):
    """Only the arguments are differentiated: a module's parameters read inside fn get no gradient."""
    net = mm.nn.Linear(3, 2, device=dev)
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    dx = mm.grad(lambda x: net(x).sum())(mm.tensor(x, dev))
    w = net.weight.numpy()
    # Within float32's roundoff of the terms' magnitudes: the sum cancels (weights of both signs),
    # and under `highest` on a GPU the products are split-TF32 ones, good to about 2^-22 of |w|.
    np.testing.assert_allclose(dx.numpy(), np.tile(w.sum(axis=0), (4, 1)), rtol=1e-6, atol=1e-6 * np.abs(w).sum())
    assert net.weight.grad is None


@pytest.mark.parametrize("call, error, message", [
    (lambda d: mm.grad(lambda x: x.sum(), argnums=1)(np.ones(2, np.float32)), ValueError,
     r"argnums \(1,\) names argument 1; the call has 1"),
    (lambda d: mm.grad(lambda x: x.sum(), argnums=(0, 0)), ValueError, "distinct"),
    (lambda d: mm.grad(lambda i: i.sum())(mm.tensor(np.ones(2, np.int32), d)), mm.DTypeError,
     "argument 0 is int32; gradients are taken with respect to floating"),
    (lambda d: mm.grad(lambda x: 3.0)(np.ones(2, np.float32)), TypeError,
     "value must be a tensor computed from its arguments, got 3.0"),
    (lambda d: mm.grad(lambda x: x.sum())(x=np.ones(2, np.float32)), TypeError, "positionally"),
    (lambda d: mm.grad(lambda x: x.sum())(np.ones(2, np.complex64)), mm.DTypeError, "complex64"),
])
def test_errors(dev, call, error, message):
    with pytest.raises(error, match=message):
        call(dev)
