"""Reductions over any axes against their float64 references; their error bound on long axes.

The bound (mlmetal/ops/reduce.py): a sum of L float32 terms is within error_depth(L)·u·Σ|x| of the
exact sum, u = 2⁻²⁴, Σ|x| taken from the float64 reference — Higham's bound for a summation in
which no term passes through more than error_depth(L) additions. A float32 sum added up in
order has depth L and breaks it on long axes (the tests check that too, so the bound is one a
sloppier kernel would fail). A mean adds one rounding (the scale by 1/L); max and min round
nothing, so they are exact. The variance is two passes: the mean m̂, then Σ(x − m̂)² of terms
that are all ≥ 0, so its relative error is (depth + 4)·u plus L·(m − m̂)²/(L − c) from the
mean's error.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from mlmetal.ops import reduce as reduce_ops
from mlmetal.runtime import source as S
from opcheck import (AWKWARD_DIMS, LOW_DTYPES, check_forward, check_nan, floats, make_storage_tests, make_tests, row,
                     with_nan)
from test_ops_elementwise import as_bits, make_rounds_once_test, rounded

U = 2.0**-24


def axis_of(data, ndim):
    return data.draw(st.none() | st.integers(-ndim, ndim - 1)
                     | st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim).map(tuple), label="axis")


def reduce_case(small=False, distinct=False, var=False):
    """An input of up to 3 axes (4 for small ones), `axis` and `keepdims`; `distinct`: values at
    least 0.05 apart (a max's finite differences must not change which element is largest)."""
    def case(data):
        dims = st.integers(1, 4) if small else AWKWARD_DIMS
        shape = tuple(data.draw(st.lists(dims, min_size=1, max_size=4 if small else 3), label="shape"))
        x = floats(shape, data)
        if distinct:
            order = np.random.default_rng(data.draw(st.integers(0, 2**31), label="order")).permutation(x.size)
            x = (order.reshape(shape) * 0.05).astype(np.float32)
        attrs = {"axis": axis_of(data, len(shape)), "keepdims": data.draw(st.booleans(), label="keepdims")}
        if var:
            length = x.size if attrs["axis"] is None else np.prod([shape[a] for a in np.atleast_1d(attrs["axis"])])
            attrs["correction"] = data.draw(st.integers(0, 1), label="correction") if length > 1 else 0
        return [x], attrs
    return case


SUM_TOL = rtol_for(40**3)  # the rows' inputs hold at most 40³ elements
ROWS = [
    row("sum", reduce_case(), rtol=SUM_TOL, atol=SUM_TOL, grad_case=reduce_case(small=True)),
    row("mean", reduce_case(), rtol=1e-5, atol=1e-6, grad_case=reduce_case(small=True)),
    row("max", reduce_case(), rtol=0, atol=0, grad_case=reduce_case(small=True, distinct=True)),
    row("min", reduce_case(), rtol=0, atol=0, grad_case=reduce_case(small=True, distinct=True)),
    row("var", reduce_case(var=True), rtol=2e-5, atol=1e-6, grad_case=reduce_case(small=True, var=True)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)
test_rounds_once = make_rounds_once_test(ROWS)


def long_rows_case(data):
    """Rows longer than a thread's chunk, reduced along their innermost axes (the case a
    threadgroup a row takes on GPUs)."""
    shape = (data.draw(st.integers(1, 5), label="outer"), data.draw(st.integers(1, 40), label="middle"),
             data.draw(st.integers(65, 3000), label="row"))
    axis = data.draw(st.sampled_from([-1, (1, 2), None]), label="axis")
    attrs = {"axis": axis, "keepdims": data.draw(st.booleans(), label="keepdims")}
    return [floats(shape, data)], attrs


@pytest.mark.parametrize("r", ROWS, ids=[r.op for r in ROWS])
@settings(max_examples=max(2, settings.default.max_examples // 3))
@given(data=st.data())
def test_group_a_row(dev, monkeypatch, r, data):
    """The GPUs' kernel (a threadgroup a row, Device.cheap_barriers), run here too: values and
    NaN as the rows check them."""
    monkeypatch.setattr(dev, "cheap_barriers", True, raising=False)
    inputs, attrs = long_rows_case(data)
    if r.op == "var":
        attrs["correction"] = 1
    check_forward(dev, r, inputs, attrs)
    check_nan(dev, r, with_nan(inputs, data), attrs)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("cheap_barriers", [False, True], ids=["thread-a-chunk", "group-a-row"])
@pytest.mark.parametrize("shape, axis", [((2**16,), 0), ((3, 2**14), 1), ((2**14, 3), 0), ((2**8, 2**8), None)],
                         ids=["vector", "rows", "columns", "all"])
def test_long_low_precision_rounds_once(dev, monkeypatch, shape, axis, cheap_barriers, dtype):
    """Long reductions of float16 and bfloat16 take several passes, whose partial results stay
    float32 (the `_f16_f32` ... `_f32_bf16` instances): each result is, bit for bit, the float32
    one on the same values rounded once to the storage type."""
    monkeypatch.setattr(dev, "cheap_barriers", cheap_barriers, raising=False)
    x = (np.random.default_rng(len(shape)).random(shape) + 0.5).astype(dtype)
    low, wide = mm.tensor(x, dev), mm.tensor(x.astype(np.float32), dev)
    for op in ("sum", "mean", "max", "min", "var"):
        got, want = getattr(mm.ops, op)(low, axis=axis), getattr(mm.ops, op)(wide, axis=axis)
        assert got.dtype == dtype
        np.testing.assert_array_equal(as_bits(got.numpy()), as_bits(rounded(want.numpy(), dtype)), err_msg=op)


def test_partial_result_instances_exist():
    """Every instance a multi-pass float16 or bfloat16 reduction may dispatch, to float32 partial
    results and from them (the registry checks the others); squares' partials are folded by sum."""
    kernels = S.Source.from_file(S.find("reduce")).kernels
    for kind in ("sum", "squares", "max", "min"):
        for variant in ("threads", "groups"):
            for dtype in LOW_DTYPES:
                assert reduce_ops._instance(f"{kind}_{variant}", dtype, mm.float32) in kernels
                assert kind == "squares" or reduce_ops._instance(f"{kind}_{variant}", mm.float32, dtype) in kernels


def test_max_gradient_is_shared_among_ties(dev):
    """As PyTorch's amax: each element equal to the max gets g / (how many are)."""
    x = mm.tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], np.float32), dev)
    out = mm.ops.max(x, axis=1)
    (dx,) = mm.ops.REGISTRY["max"].grad(mm.tensor(np.array([6.0, 4.0], np.float32), dev), out, x, axis=(1,),
                                        keepdims=False)
    np.testing.assert_array_equal(dx.numpy(), [[0, 3, 3], [2, 0, 2]])


# ---------------------------------------------------------------- long axes

def sum_bound(x64, axis):
    """error_depth(L)·u·Σ|x| per output, from the float64 reference."""
    length = x64.size if axis is None else x64.shape[axis]
    return reduce_ops.error_depth(length) * U * np.abs(x64).sum(axis=axis)


def check_long(dev, x, axis):
    """sum, mean, max, min and var of x over `axis` within their bounds."""
    x64 = x.astype(np.float64)
    t = mm.tensor(x, dev)
    length = x.size if axis is None else x.shape[axis]
    bound = sum_bound(x64, axis)
    assert np.all(np.abs(mm.ops.sum(t, axis=axis).numpy() - x64.sum(axis=axis)) <= bound)
    assert np.all(np.abs(mm.ops.mean(t, axis=axis).numpy() - x64.mean(axis=axis)) <= (bound + 2 * U * np.abs(x64).sum(axis=axis)) / length)
    np.testing.assert_array_equal(mm.ops.max(t, axis=axis).numpy(), x.max(axis=axis))
    np.testing.assert_array_equal(mm.ops.min(t, axis=axis).numpy(), x.min(axis=axis))
    v = x64.var(axis=axis, ddof=1)
    mean_error = (bound + 2 * U * np.abs(x64).sum(axis=axis)) / length
    v_bound = (reduce_ops.error_depth(length) + 4) * U * v + length * mean_error**2 / (length - 1)
    assert np.all(np.abs(mm.ops.var(t, axis=axis).numpy() - v) <= v_bound)


def serial_sum_error(x):
    """|float32 sum added up in order − exact sum|, the error of the naive kernel."""
    return abs(float(np.cumsum(x, dtype=np.float32)[-1]) - x.astype(np.float64).sum())


LONG = [((2**20,), 0), ((4, 2**18), 1), ((2**18, 4), 0), ((2**10, 2**10), None)]


@pytest.mark.parametrize("shape, axis", LONG, ids=["vector", "rows", "columns", "all"])
@pytest.mark.parametrize("data", ["constant", "uniform", "normal"])
@pytest.mark.parametrize("cheap_barriers", [False, True], ids=["thread-a-chunk", "group-a-row"])
def test_long_axis_within_bound(dev, monkeypatch, shape, axis, data, cheap_barriers):
    """2^20 elements, reduced along the innermost axis, a kept innermost axis, and all of them,
    by each kernel (a threadgroup a row where barriers are cheap, on GPUs). The constant 0.1 is
    the case where adding in order drifts the most (every addition rounds the same way): such a
    sum would break the bound, this one may not."""
    monkeypatch.setattr(dev, "cheap_barriers", cheap_barriers, raising=False)
    rng = np.random.default_rng(len(shape))
    x = {"constant": lambda: np.full(shape, 0.1, np.float32), "uniform": lambda: rng.random(shape, np.float32),
         "normal": lambda: rng.standard_normal(shape, np.float32)}[data]()
    if data == "constant" and axis == 0 and len(shape) == 1:
        assert serial_sum_error(x) > sum_bound(x.astype(np.float64), 0)
    check_long(dev, x, axis)


@pytest.mark.parametrize("cheap_barriers", [False, True], ids=["thread-a-chunk", "group-a-row"])
def test_two_to_the_24_within_bound(dev, monkeypatch, cheap_barriers):
    """The issue's case: 2^24 elements on one axis (as check_long; 3 s on a 2-core cpu)."""
    monkeypatch.setattr(dev, "cheap_barriers", cheap_barriers, raising=False)
    x = np.random.default_rng(24).random(2**24, np.float32)
    assert serial_sum_error(x) > sum_bound(x.astype(np.float64), 0)
    check_long(dev, x, 0)
    check_long(dev, np.full(2**24, 0.1, np.float32), 0)


# ---------------------------------------------------------------- graphs and errors

def test_broadcast_and_reduce_in_a_training_graph(dev):
    """A bias broadcast over (N, C, H, W), a mean over chosen axes: the training graph's gradient
    of the bias is the sum over the broadcast axes, as in float64."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    b = mm.nn.Parameter(rng.standard_normal((3, 1, 1)).astype(np.float32), dev)
    g = mm.Graph(dev)
    xi = g.input("x", x.shape)
    y = mm.ops.mul(mm.ops.add(xi, b), xi)
    loss = mm.ops.mean(mm.ops.sum(y, axis=(1, 3)))
    train = loss.training_graph()
    value = train.step(x=x)
    b64 = b.numpy().astype(np.float64)
    np.testing.assert_allclose(value, ((x + b64) * x).sum(axis=(1, 3)).mean(), rtol=1e-5)
    np.testing.assert_allclose(b.grad.numpy(), x.sum(axis=(0, 2, 3)).reshape(3, 1, 1) / (2 * 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op, attrs, message", [
    ("sum", {"axis": 3}, "axis 3 is out of range"),
    ("mean", {"axis": (0, -3)}, "names an axis twice"),
    ("max", {"axis": 1.5}, "axis must be None, an int or a sequence"),
    ("var", {"axis": 0, "correction": 2}, "correction 2 leaves no degrees of freedom in 2"),
    ("var", {"correction": -1}, "non-negative int"),
])
def test_reduce_errors(dev, op, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(mm.tensor(np.zeros((2, 3, 4), np.float32), dev), **attrs)
