"""Elementwise ops and activations against their references (table rows for the generic checker)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal import ops
from opcheck import AWKWARD_DIMS, LOW_DTYPES, floats, make_storage_tests, make_tests, row, run_op, stored


def same_shape(n_inputs, scale=1.0, away_from_zero=False, **attrs):
    """`n_inputs` arrays of one drawn shape; attrs maps attribute names to strategies."""
    def case(data):
        shape = data.draw(st.lists(AWKWARD_DIMS, min_size=1, max_size=4), label="shape")
        return _inputs(shape, n_inputs, scale, away_from_zero, data), {k: data.draw(v, label=k) for k, v in attrs.items()}
    return case


def small_same_shape(n_inputs, scale=1.0, away_from_zero=False, **attrs):
    def case(data):
        shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), label="shape")
        return _inputs(shape, n_inputs, scale, away_from_zero, data), {k: data.draw(v, label=k) for k, v in attrs.items()}
    return case


def _inputs(shape, n, scale, away_from_zero, data):
    xs = [floats(shape, data, scale) for _ in range(n)]
    if away_from_zero:  # keep finite differences off the kink at 0
        xs = [np.where(np.abs(x) < 0.01, 0.5, x).astype(np.float32) for x in xs]
    return xs


def channels_case(n_inputs, small=False):
    def case(data):
        dims = st.integers(1, 4) if small else AWKWARD_DIMS
        n = 2 if small else 4
        shape = tuple(data.draw(st.lists(dims, min_size=2, max_size=n), label="shape"))
        xs = [floats(shape, data, 3.0) for _ in range(n_inputs)]
        if n_inputs == 2:  # softmax_grad takes the forward's output
            xs[1] = mm.ops.REGISTRY["softmax"].reference(xs[1].astype(np.float64)).astype(np.float32)
        return xs, {}
    return case


def broadcast_case(n_inputs, small=False, rounded=False, positive=None, cond=None):
    """`n_inputs` arrays whose shapes broadcast together: each drops some leading axes of a drawn
    shape and has size 1 along some others (or, one time in four, all share the shape: the
    same-shape kernels). `rounded`: multiples of ½, so that values tie; `positive`: the index of an
    input kept away from 0 (a divisor); `cond`: the index of an input that is a condition, half zeros."""
    def case(data):
        dims = st.integers(1, 4) if small else AWKWARD_DIMS
        out = data.draw(st.lists(dims, min_size=1, max_size=3 if small else 4), label="shape")
        if data.draw(st.integers(0, 3), label="same shape") == 0:
            shapes = [tuple(out)] * n_inputs
        else:
            shapes = []
            for _ in range(n_inputs):
                lead = data.draw(st.integers(0, len(out)), label="dropped axes")
                shapes.append(tuple(1 if data.draw(st.booleans(), label="broadcast") else n for n in out[lead:]))
        xs = [floats(s, data) for s in shapes]
        if rounded:
            xs = [np.asarray(np.round(x * 2) / 2, np.float32) for x in xs]  # (a 0-d array stays one, not a scalar)
        if positive is not None:
            xs[positive] = np.where(np.abs(xs[positive]) < 0.2, 0.5, xs[positive]).astype(np.float32)
        if cond is not None:
            xs[cond] = np.where(xs[cond] < 0, 0.0, xs[cond]).astype(np.float32)
        return xs, {}
    return case


def positive(case, at=0.0):
    """`case` with its inputs' magnitudes, plus `at`."""
    def positive_case(data):
        xs, attrs = case(data)
        return [(np.abs(x) + at).astype(np.float32) for x in xs], attrs
    return positive_case


def pow_case(small=False):
    def case(data):
        [x], _ = (small_same_shape if small else same_shape)(1, scale=2.0)(data)
        if small:  # positive bases away from 0: a fractional power is smooth there
            x = (np.abs(x) + 0.5).astype(np.float32)
        return [x], {"exponent": data.draw(st.sampled_from([2.0, 3.0, 0.5, -1.0, 0.0, 1.5, -2.0, 1.0]), label="p")}
    return case


def clamp_case(small=False):
    def case(data):
        [x], _ = (small_same_shape if small else same_shape)(1)(data)
        lo = data.draw(st.sampled_from([-math.inf, -1.0, -0.25]), label="min")
        hi = data.draw(st.sampled_from([math.inf, 1.0, 0.5]), label="max")
        if small:  # keep finite differences off the bounds
            x = np.where((np.abs(x - lo) < 0.01) | (np.abs(x - hi) < 0.01), 0.0, x).astype(np.float32)
        return [x], {"min": lo, "max": hi}
    return case


def where_grad_case(data):
    [g, c], _ = broadcast_case(2, cond=1)(data)
    return [g, c], {"branch": data.draw(st.integers(0, 1), label="branch")}


def dropout_case(small=False):
    """x and a mask's uniform numbers u in [0, 1), of one shape, and a drop probability."""
    def case(data):
        [x], _ = (small_same_shape if small else same_shape)(1)(data)
        u = np.random.default_rng(data.draw(st.integers(0, 2**31), label="u")).random(x.shape, np.float32)
        return [x, u], {"p": data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), label="p")}
    return case


def gradient_at_output(case):
    """`case`'s inputs as (g, inputs...), g of their broadcast shape: a gradient op's inputs."""
    def grad_case(data):
        xs, attrs = case(data)
        return [floats(np.broadcast_shapes(*(x.shape for x in xs)), data), *xs], attrs
    return grad_case


FLOATS = st.floats(-2, 2)

ROWS = [
    row("add", broadcast_case(2), grad_case=broadcast_case(2, small=True)),
    row("sub", broadcast_case(2), grad_case=broadcast_case(2, small=True)),
    row("mul", broadcast_case(2), grad_case=broadcast_case(2, small=True)),
    row("div", broadcast_case(2), rtol=1e-6, atol=0, grad_case=broadcast_case(2, small=True, positive=1)),
    # gradients at multiples of ½: inputs tie exactly (half to each, as central differences give)
    # or differ by ½, never by less than the differences' step (which straddles the kink)
    row("maximum", broadcast_case(2, rounded=True), rtol=0, atol=0, grad_case=broadcast_case(2, small=True, rounded=True)),
    row("minimum", broadcast_case(2, rounded=True), rtol=0, atol=0, grad_case=broadcast_case(2, small=True, rounded=True)),
    row("maximum_grad", gradient_at_output(broadcast_case(2, rounded=True)), rtol=0, atol=0),
    row("minimum_grad", gradient_at_output(broadcast_case(2, rounded=True)), rtol=0, atol=0),
    row("equal", broadcast_case(2, rounded=True), rtol=0, atol=0),
    row("where", broadcast_case(3, cond=0), rtol=0, atol=0, grad_case=broadcast_case(3, small=True, cond=0)),
    row("where_grad", where_grad_case, rtol=0, atol=0),
    row("scale", same_shape(1, s=FLOATS), grad_case=small_same_shape(1, s=FLOATS)),
    row("linear_activation", same_shape(1, a=FLOATS, b=FLOATS), grad_case=small_same_shape(1, a=FLOATS, b=FLOATS)),
    row("relu", same_shape(1), rtol=0, atol=0, grad_case=small_same_shape(1, away_from_zero=True)),
    row("relu_grad", same_shape(2), rtol=0, atol=0),
    row("relu_grad_add", same_shape(3), rtol=1e-7, atol=0),
    row("leaky_relu", same_shape(1, slope=st.floats(0, 0.5)),
        grad_case=small_same_shape(1, away_from_zero=True, slope=st.floats(0, 0.5))),
    row("leaky_relu_grad", same_shape(2, slope=st.floats(0, 0.5))),
    # Large inputs: exp(-x) overflows, which must give 0 (or 1), not NaN.
    row("sigmoid", same_shape(1, scale=40.0), rtol=1e-5, atol=1e-6, grad_case=small_same_shape(1)),
    row("sigmoid_grad", same_shape(2)),
    row("tanh", same_shape(1, scale=30.0), rtol=1e-5, atol=1e-6, grad_case=small_same_shape(1)),
    row("tanh_grad", same_shape(2)),
    row("softmax", channels_case(1), rtol=1e-5, atol=1e-6, grad_case=channels_case(1, small=True)),
    row("softmax_grad", channels_case(2), rtol=1e-4, atol=1e-5),
    # exp(±30) is within float32's range; exp(x) = e^x·(1 + δ) with |δ| a few ulp
    row("exp", same_shape(1, scale=10.0), rtol=1e-6, atol=0, grad_case=small_same_shape(1)),
    row("log", positive(same_shape(1), at=1e-3), rtol=1e-6, atol=1e-6, grad_case=positive(small_same_shape(1), at=0.5)),
    row("sqrt", positive(same_shape(1)), rtol=1e-6, atol=0, grad_case=positive(small_same_shape(1), at=0.5)),
    row("rsqrt", positive(same_shape(1), at=0.1), rtol=1e-6, atol=0,
        grad_case=positive(small_same_shape(1), at=0.5)),
    row("abs", same_shape(1), rtol=0, atol=0, grad_case=small_same_shape(1, away_from_zero=True)),
    row("abs_grad", same_shape(2), rtol=0, atol=0),
    row("clamp", clamp_case(), rtol=0, atol=0, grad_case=clamp_case(small=True)),
    row("clamp_grad", lambda data: (same_shape(2)(data)[0], clamp_case()(data)[1]), rtol=0, atol=0),
    row("pow", pow_case(), rtol=1e-5, atol=1e-6, grad_case=pow_case(small=True)),
    # Φ by a fit of relative error 1.2e−7; far out on the negative side gelu is below atol
    row("gelu", same_shape(1, scale=4.0), rtol=1e-5, atol=1e-6, grad_case=small_same_shape(1)),
    row("gelu_grad", same_shape(2, scale=3.0), rtol=1e-5, atol=1e-6),
    row("silu", same_shape(1, scale=10.0), rtol=1e-5, atol=1e-6, grad_case=small_same_shape(1)),
    row("silu_grad", same_shape(2, scale=3.0), rtol=1e-5, atol=1e-6),
    row("dropout", dropout_case(), rtol=1e-6, atol=0, grad_case=dropout_case(small=True)),
    # Rounding to nearest even, bit for bit as NumPy (float16) and ml_dtypes (bfloat16) round; the
    # finite differences of a rounding are meaningless, so its gradient is checked going to float32.
    row("astype", same_shape(1, scale=1e3, dtype=st.sampled_from(["float32", "float16", "bfloat16"])), rtol=0, atol=0,
        grad_case=small_same_shape(1, dtype=st.just("float32"))),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


def rounded(a: np.ndarray, dtype) -> np.ndarray:
    """`a` rounded to `dtype` (to nearest even; past its range, ±inf)."""
    with np.errstate(over="ignore"):
        return a.astype(dtype)


def as_bits(a: np.ndarray) -> np.ndarray:
    """A float array's bit patterns, every NaN as one pattern (a kernel may make another NaN)."""
    bits = a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32).copy()
    bits[np.isnan(a.astype(np.float32))] = 0xFFFF if a.dtype.itemsize == 2 else 0xFFFFFFFF
    return bits


def make_rounds_once_test(rows):
    """test_rounds_once: each row's op in float16 and bfloat16 gives, bit for bit, its float32
    result on the same values rounded to the storage type. Each kernel loads into float, computes
    in float as its float32 instance does and rounds once when it stores (reductions keep their
    partial results float), so nothing else may differ; a second rounding anywhere would show."""
    typed = [(r, d) for r in rows for d in LOW_DTYPES if d in ops.REGISTRY[r.op].dtypes and r.op != "astype"]

    @pytest.mark.parametrize("r,dtype", typed, ids=[f"{r.op}-{d}" for r, d in typed])
    @given(data=st.data())
    def test_rounds_once(dev, r, dtype, data):
        inputs, attrs = r.case(data)
        low = stored(inputs, dtype)
        _, out = run_op(dev, r.op, low, attrs)
        _, wide = run_op(dev, r.op, [a.astype(np.float32) if a.dtype == dtype else a for a in low], attrs)
        for o, w in zip(out if isinstance(out, tuple) else (out,), wide if isinstance(wide, tuple) else (wide,)):
            assert o.dtype == dtype
            np.testing.assert_array_equal(as_bits(o.numpy()), as_bits(rounded(w.numpy(), dtype)),
                                          err_msg=f"{r.op} {attrs}")

    return test_rounds_once


test_rounds_once = make_rounds_once_test(ROWS)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", [((1000,), (1000,)), ((7, 33), (33,))], ids=["same-shape", "broadcast"])
def test_relu_add_mul_match_numpy(dev, dtype, shapes):
    """relu, add and mul in bfloat16 (and float16) are, bit for bit, NumPy's float32 arithmetic on
    the stored values rounded once by ml_dtypes (NumPy): compute in float, round once."""
    rng = np.random.default_rng(17)
    a, b = (rng.standard_normal(s) * 3 for s in shapes)
    a.flat[:6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 3e38 if dtype == mm.bfloat16 else 6e4]
    b.flat[:6] = [-0.0, -0.0, 1.0, -np.inf, 2.0, 3e38 if dtype == mm.bfloat16 else 6e4]  # the last sum overflows
    a, b = a.astype(dtype), b.astype(dtype)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ta, tb = mm.tensor(a, dev), mm.tensor(b, dev)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = {"relu": np.where(a32 < 0, np.float32(0), a32), "add": a32 + b32, "mul": a32 * b32}
    got = {"relu": mm.ops.relu(ta), "add": mm.ops.add(ta, tb), "mul": mm.ops.mul(ta, tb)}
    for op, e in expected.items():
        assert got[op].dtype == dtype
        np.testing.assert_array_equal(as_bits(got[op].numpy()), as_bits(rounded(e, dtype)), err_msg=op)


@pytest.mark.parametrize("op, shapes, attrs, message", [
    ("mul", [(2, 3), (3, 2)], {}, r"shapes \(2, 3\) and \(3, 2\) do not broadcast"),
    ("add", [(2, 3), (2,)], {}, r"shapes \(2, 3\) and \(2,\) do not broadcast"),
    ("where", [(2, 1), (3,), (4,)], {}, r"shapes \(2, 1\) and \(3,\) and \(4,\) do not broadcast"),
    ("maximum", [(2,) * 9, (1, 2) * 4 + (1,)], {}, "at most 8"),
    ("clamp", [(2,)], {"min": 1.0, "max": 0.0}, "min = 1.0 is above max = 0.0"),
    ("pow", [(2,)], {}, "missing attribute"),
    ("scale", [(2,)], {"t": 1.0}, "unexpected attribute"),
    ("softmax", [(3,)], {}, "N, C"),
    ("relu", [(2,), (2,)], {}, "takes 1 tensor"),
    ("dropout", [(2,), (2,)], {"p": 1.5}, r"p must be a probability in \[0, 1\], got 1.5"),
    ("dropout", [(2,), (3,)], {"p": 0.5}, r"shapes \(2,\) and \(3,\) differ"),
])
def test_elementwise_errors(dev, op, shapes, attrs, message):
    ts = [mm.tensor(np.zeros(s, np.float32), dev) for s in shapes]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(*ts, **attrs)


def test_scalars_broadcast(dev):
    """A 0-d tensor (mm.tensor of a scalar) broadcasts as NumPy's scalars do."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    two = mm.tensor(np.float32(2.0), dev)
    assert two.shape == ()
    np.testing.assert_array_equal(mm.ops.mul(mm.tensor(x, dev), two).numpy(), x * 2)
    np.testing.assert_array_equal(mm.ops.sub(two, mm.tensor(x, dev)).numpy(), 2 - x)


def test_neg(dev):
    x = np.array([1.5, -2.0, 0.0, np.nan], np.float32)
    np.testing.assert_array_equal(mm.ops.neg(mm.tensor(x, dev)).numpy(), -x)


def test_dropout_keeps_where_u_reaches_p(dev):
    """Kept elements are scaled by 1/(1 − p), dropped ones are 0 (NaN stays NaN); p = 1 drops all."""
    x = np.array([1.0, 2.0, -3.0, np.nan, np.nan], np.float32)
    u = np.array([0.25, 0.75, 0.5, 0.1, 0.9], np.float32)
    out = mm.ops.dropout(mm.tensor(x, dev), mm.tensor(u, dev), p=0.5).numpy()
    np.testing.assert_array_equal(out, [0.0, 4.0, -6.0, np.nan, np.nan])
    np.testing.assert_array_equal(mm.ops.dropout(mm.tensor(x[:3], dev), mm.tensor(u[:3], dev), p=1.0).numpy(), 0.0)
