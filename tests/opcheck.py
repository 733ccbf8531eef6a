"""The one generic op checker, driven by a table of rows (one per registered op).

Each family's test module (tests/test_ops_<family>.py) declares its rows with `row(...)`
and gets its tests from `make_tests(rows)`: forward against the float64 reference, the
gradient rule against central finite differences of that reference, and NaN propagation (a
NaN in an input gives NaN where the reference, which follows PyTorch, has one).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal import ops

# Every row ever declared, by op name: test_registry checks each registered op has one.
ALL_ROWS: dict[str, "Row"] = {}


@dataclasses.dataclass
class Row:
    op: str
    case: Callable[[st.DataObject], tuple[list[np.ndarray], dict]]  # draws (inputs, attrs)
    rtol: float = 1e-5
    atol: float = 1e-5
    grad_case: Callable | None = None  # smaller inputs for finite differences; default: case
    grad_rtol: float = 2e-3
    grad_atol: float = 2e-3
    fd_eps: float = 1e-3
    wrt: tuple[int, ...] | None = None  # inputs whose gradients are checked; default: all with one
    nan_spreads: str = ""  # why the kernel may turn more outputs NaN than the reference (a NaN input); "": it may not
    lowp_ulps: float = 1.0  # roundings of the storage type the outputs may be off by (make_storage_tests)
    lowp_atol: float = 1.0  # ... and the absolute part, in units of roundoff (for results near 0 after cancellation)


def row(op: str, case, **kw) -> Row:
    r = Row(op, case, **kw)
    ALL_ROWS[op] = r
    return r


def _is_float(dtype) -> bool:
    """A floating dtype, bfloat16 included (NumPy's kind of which is "V")."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == mm.bfloat16


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run_op(dev, name: str, inputs: list[np.ndarray], attrs: dict):
    ts = [mm.tensor(a, dev, dtype=a.dtype) for a in inputs]
    return ts, ops.apply(name, *ts, **attrs)


def reference(name: str, inputs: list[np.ndarray], attrs: dict):
    op = ops.REGISTRY[name]
    _, norm = op.check(*[a.shape for a in inputs], **attrs)
    as64 = [a.astype(np.float64) if _is_float(a.dtype) else a for a in inputs]
    return op.reference(*as64, **norm), norm


def check_forward(dev, r: Row, inputs, attrs):
    _, out = run_op(dev, r.op, inputs, attrs)
    ref, _ = reference(r.op, inputs, attrs)
    for o, e in zip(_as_tuple(out), _as_tuple(ref)):
        e = np.asarray(e)
        assert o.shape == e.shape, f"{r.op}: output shape {o.shape}, reference {e.shape}"
        got = o.numpy()
        assert np.isfinite(got).all() or not np.isfinite(e).all(), f"{r.op}: non-finite output"
        np.testing.assert_allclose(got, e, rtol=r.rtol, atol=r.atol, err_msg=f"{r.op} {attrs}")


def check_nan(dev, r: Row, inputs, attrs):
    """NaN wherever the reference has NaN; with `r.nan_spreads`, possibly elsewhere too, else nowhere else."""
    if not r.nan_spreads:
        return check_forward(dev, r, inputs, attrs)
    _, out = run_op(dev, r.op, inputs, attrs)
    ref, _ = reference(r.op, inputs, attrs)
    for o, e in zip(_as_tuple(out), _as_tuple(ref)):
        got, e = o.numpy(), np.asarray(e)
        assert np.isnan(got[np.isnan(e)]).all(), f"{r.op}: a NaN of the reference is not NaN {attrs}"
        both = ~np.isnan(got)
        np.testing.assert_allclose(got[both], e[both], rtol=r.rtol, atol=r.atol, err_msg=f"{r.op} {attrs}")


def finite_difference(f, inputs: list[np.ndarray], i: int, eps: float) -> np.ndarray:
    """d f / d inputs[i] by central differences, in float64."""
    x = [np.array(a, np.float64) if _is_float(a.dtype) else a for a in inputs]  # arrays, a NumPy scalar too
    grad = np.zeros_like(x[i])
    for j in range(x[i].size):
        keep = x[i].flat[j]
        x[i].flat[j] = keep + eps
        up = f(x)
        x[i].flat[j] = keep - eps
        down = f(x)
        x[i].flat[j] = keep
        grad.flat[j] = (up - down) / (2 * eps)
    return grad


def check_grad(dev, r: Row, inputs, attrs, seed: int):
    op = ops.REGISTRY[r.op]
    ts, out = run_op(dev, r.op, inputs, attrs)
    rng = np.random.default_rng(seed)
    gs = tuple(rng.standard_normal(o.shape).astype(o.dtype if _is_float(o.dtype) else np.float32)
               for o in _as_tuple(out))
    g_t = tuple(mm.tensor(g, dev) for g in gs)
    grads = op.grad(g_t if isinstance(out, tuple) else g_t[0], out, *ts, **ops.infer(r.op, *ts, **attrs)[1])
    assert len(grads) == len(inputs), f"{r.op}: gradient rule returned {len(grads)} gradients for {len(inputs)} inputs"
    _, norm = op.check(*[a.shape for a in inputs], **attrs)

    def f(x):
        return sum(float(np.sum(g.astype(np.float64) * np.asarray(o))) for g, o in zip(gs, _as_tuple(op.reference(*x, **norm))))

    for i, gi in enumerate(grads):
        if gi is None or (r.wrt is not None and i not in r.wrt):
            continue
        assert gi.shape == inputs[i].shape, f"{r.op}: gradient {i} has shape {gi.shape}, input {inputs[i].shape}"
        assert gi.dtype == inputs[i].dtype, f"{r.op}: gradient {i} is {gi.dtype}, input {inputs[i].dtype}"
        fd = finite_difference(f, inputs, i, r.fd_eps)
        np.testing.assert_allclose(gi.numpy().astype(np.float64), fd, rtol=r.grad_rtol, atol=r.grad_atol * max(1.0, np.abs(fd).max()),
                                   err_msg=f"{r.op}: gradient of input {i} {attrs}")


def with_nan(inputs: list[np.ndarray], data: st.DataObject) -> list[np.ndarray] | None:
    """`inputs` with one element of one float input NaN (None when no input is float)."""
    floating = [i for i, a in enumerate(inputs) if _is_float(a.dtype) and a.size]
    if not floating:
        return None
    i = data.draw(st.sampled_from(floating), label="nan input")
    poisoned = [a.copy() for a in inputs]
    poisoned[i].flat[data.draw(st.integers(0, inputs[i].size - 1), label="nan at")] = np.nan
    return poisoned


def make_tests(rows: list[Row]):
    """(test_forward, test_grad, test_nan) parametrized over `rows`."""
    ids = [r.op for r in rows]

    @pytest.mark.parametrize("r", rows, ids=ids)
    @given(data=st.data())
    def test_forward(dev, r, data):
        inputs, attrs = r.case(data)
        check_forward(dev, r, inputs, attrs)

    @pytest.mark.parametrize("r", rows, ids=ids)
    @settings(max_examples=max(2, settings.default.max_examples // 3))
    @given(data=st.data())
    def test_nan(dev, r, data):
        """A NaN in an input gives NaN exactly where the float64 reference has one (which follows PyTorch)."""
        inputs, attrs = r.case(data)
        poisoned = with_nan(inputs, data)
        if poisoned is not None:
            check_nan(dev, r, poisoned, attrs)

    diff_rows = [r for r in rows if ops.REGISTRY[r.op].grad is not None]

    @pytest.mark.parametrize("r", diff_rows, ids=[r.op for r in diff_rows])
    @given(data=st.data(), seed=st.integers(0, 2**31))
    def test_grad(dev, r, data, seed):
        inputs, attrs = (r.grad_case or r.case)(data)
        check_grad(dev, r, inputs, attrs, seed)

    return test_forward, test_grad, test_nan


# ---------------------------------------------------------------- float16 and bfloat16 storage
#
# An op whose kernels are instantiated per storage type (its `dtypes`) is checked in each: its
# float inputs are rounded to the type, and its outputs compared with the float64 reference on
# those rounded inputs. The kernels compute in float and round once when they store, so the
# output may differ from the reference by the storage type's unit roundoff u (2⁻¹¹ float16,
# 2⁻⁸ bfloat16) relative, on top of the row's float32 tolerance; `lowp_ulps` allows a row whose
# kernels store intermediate results in the storage type more roundings. Outputs beyond the
# type's range must be ±inf.

UNIT_ROUNDOFF = {np.dtype(np.float16): 2.0**-11, mm.bfloat16: 2.0**-8}
LOW_DTYPES = [np.dtype(np.float16), mm.bfloat16]


def stored(inputs: list[np.ndarray], dtype, op=None) -> list[np.ndarray]:
    """`inputs` with every float array rounded to storage type `dtype`, but those `op` takes in float32 always."""
    keep = op.float32_inputs if op is not None else ()
    return [a.astype(dtype) if _is_float(a.dtype) and i not in keep else a for i, a in enumerate(inputs)]


def check_storage(dev, r: Row, inputs, attrs, dtype):
    op = ops.REGISTRY[r.op]
    low = stored(inputs, dtype, op)
    _, out = run_op(dev, r.op, low, attrs)
    ref, _ = reference(r.op, low, attrs)
    u = UNIT_ROUNDOFF[np.dtype(dtype)] * r.lowp_ulps
    for i, (o, e) in enumerate(zip(_as_tuple(out), _as_tuple(ref))):
        e = np.asarray(e)
        if _is_float(o.dtype) and "dtype" not in attrs:  # (astype's output has the dtype it is given)
            want = np.float32 if i in op.float32_outputs else dtype
            assert o.dtype == np.dtype(want), f"{r.op}: {dtype} inputs gave a {o.dtype} output {i}"
        big = float(np.finfo(o.dtype).max) if o.dtype == np.float16 else 3.38e38
        got = o.numpy().astype(np.float64)
        over = np.abs(e) > big * (1 + u)
        assert np.isinf(got[over]).all(), f"{r.op}: outputs past {o.dtype}'s range are not inf"
        np.testing.assert_allclose(got[~over], e[~over], rtol=r.rtol + u, atol=r.atol + u * r.lowp_atol,
                                   err_msg=f"{r.op} in {dtype} {attrs}")


def check_storage_grad(dev, r: Row, inputs, attrs, seed: int, dtype):
    """The gradient rule on `dtype` tensors against finite differences of the reference at the
    rounded inputs: each op of the rule rounds its result, so a few units of roundoff more."""
    low = stored(inputs, dtype, ops.REGISTRY[r.op])
    u = UNIT_ROUNDOFF[np.dtype(dtype)] * r.lowp_ulps
    check_grad(dev, dataclasses.replace(r, grad_rtol=r.grad_rtol + 8 * u, grad_atol=r.grad_atol + 8 * u), low, attrs,
               seed)


def make_storage_tests(rows: list[Row]):
    """(test_storage, test_storage_grad): every row whose op takes float16 and bfloat16, in each."""
    typed = [(r, d) for r in rows for d in LOW_DTYPES if d in ops.REGISTRY[r.op].dtypes]
    ids = [f"{r.op}-{d}" for r, d in typed]

    @pytest.mark.parametrize("r,dtype", typed, ids=ids)
    @settings(max_examples=max(2, settings.default.max_examples // 2))
    @given(data=st.data())
    def test_storage(dev, r, dtype, data):
        inputs, attrs = r.case(data)
        check_storage(dev, r, inputs, attrs, dtype)

    diff = [(r, d) for r, d in typed if ops.REGISTRY[r.op].grad is not None]

    @pytest.mark.parametrize("r,dtype", diff, ids=[f"{r.op}-{d}" for r, d in diff])
    @settings(max_examples=max(2, settings.default.max_examples // 3))
    @given(data=st.data(), seed=st.integers(0, 2**31))
    def test_storage_grad(dev, r, dtype, data, seed):
        inputs, attrs = (r.grad_case or r.case)(data)
        check_storage_grad(dev, r, inputs, attrs, seed, dtype)

    return test_storage, test_storage_grad


# ---------------------------------------------------------------- drawing inputs

def floats(shape, data: st.DataObject, scale: float = 1.0) -> np.ndarray:
    """A float32 array of `shape` from a drawn seed (fast to draw, reproducible)."""
    seed = data.draw(st.integers(0, 2**31), label="seed")
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, np.float32)  # 0-d stays an array


AWKWARD_DIMS = st.sampled_from([1, 2, 3, 31, 32, 33]) | st.integers(1, 40)
