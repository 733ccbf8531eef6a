"""Pooling and the LoG filter against their references, tie breaking, and shape errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal import dtypes as D
from mlmetal.ops import pool as pool_ops
from mlmetal.reference import pool as R
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row


def distinct(shape, data, spacing=0.05):
    """Values at least `spacing` apart: no ties, and finite differences never swap a maximum."""
    seed = data.draw(st.integers(0, 2**31), label="seed")
    n = int(np.prod(shape))
    v = np.random.default_rng(seed).permutation(n) * spacing
    return (v - v.mean()).reshape(shape).astype(np.float32)


def pool_case(small=False, values=floats):
    def case(data):
        k = data.draw(st.sampled_from([1, 2, 3]) if small else st.integers(1, 4), label="kernel")
        s = data.draw(st.integers(1, k + 1), label="stride")
        p = data.draw(st.integers(0, k // 2), label="padding")
        dim = st.integers(1, 7) if small else AWKWARD_DIMS
        h = max(data.draw(dim, label="h"), k - 2 * p)
        w = max(data.draw(dim, label="w"), k - 2 * p)
        n, c = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))) if small else \
            (data.draw(st.integers(1, 2)), data.draw(st.sampled_from([1, 3, 32, 33])))
        return [values((n, c, h, w), data)], {"kernel": k, "stride": s, "padding": p}
    return case


def pool_grad_case(op):
    """Inputs of the gradient kernels themselves: (g, x) or (g,) with the forward's attributes."""
    def case(data):
        [x], attrs = pool_case()(data)
        g = floats(mm.ops.REGISTRY[op].check(x.shape, **attrs)[0], data)
        if op == "max_pool2d":
            return [g, x], attrs
        return [g], {**attrs, "input_size": x.shape[2:]}
    return case


def log_case(small=False):
    def case(data):
        size = data.draw(st.sampled_from([1, 3, 5, 7, 9]), label="size")
        sigma = data.draw(st.floats(0.5, 2.0), label="sigma")
        dim = st.integers(1, 6) if small else AWKWARD_DIMS
        shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(dim), data.draw(dim))
        return [floats(shape, data)], {"sigma": sigma, "size": size}
    return case


ROWS = [
    # max pooling picks one input: exact in every storage type
    row("max_pool2d", pool_case(), rtol=0, atol=0, grad_case=pool_case(small=True, values=distinct), lowp_ulps=0),
    row("max_pool2d_grad", pool_grad_case("max_pool2d")),  # sums up to kh·kw gradients
    row("avg_pool2d", pool_case(), grad_case=pool_case(small=True)),
    row("avg_pool2d_grad", pool_grad_case("avg_pool2d")),
    row("log_filter", log_case(), rtol=1e-5, atol=1e-5, grad_case=log_case(small=True)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)

BITS = {D.float32: np.uint32, D.float16: np.uint16, D.bfloat16: np.uint16}


@pytest.mark.parametrize("dtype", D.FLOATS, ids=str)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 2, 33]), h=st.sampled_from([2, 3, 31, 32, 33, 64]),
       half_w=st.sampled_from([1, 15, 16, 17, 40]), levels=st.sampled_from([3, 1000]), seed=st.integers(0, 2**31))
def test_max_pool_2x2_fast_path_equals_the_general_kernel(dev, dtype, n, c, h, half_w, levels, seed):
    """2×2, stride 2, no padding, even width takes max_pool2d_2x2: the same bits as the general
    kernel and the float64 reference, ties (few distinct levels) and NaN included, in every
    storage type (whose instances load two elements at once)."""
    x = np.random.default_rng(seed).integers(0, levels, (n, c, h, 2 * half_w)).astype(dtype)
    x.flat[::7] = np.nan
    fast = mm.ops.max_pool2d(mm.tensor(x, dev, dtype=dtype), 2).numpy()
    assert fast.dtype == dtype
    # the general kernel on the same input, dispatched by hand
    t, out = mm.tensor(x, dev, dtype=dtype), mm.tensor(np.zeros_like(fast), dev, dtype=dtype)
    cb = dev.command_buffer()
    cb.dispatch(dev.library("pool").kernel(D.kernel_name("max_pool2d", dtype)), groups=(out.size + 255) // 256,
                threads=256, args=[t, out, pool_ops._params(out.size, x.shape[2:], fast.shape[2:], (2, 2), (2, 2), (0, 0))])
    cb.commit()
    cb.wait()
    np.testing.assert_array_equal(fast.view(BITS[dtype]), out.numpy().view(BITS[dtype]))
    # and the float64 reference's values: a window holding NaN pools to NaN
    ref = R.max_pool2d(x.astype(np.float64), kernel=(2, 2), stride=(2, 2), padding=(0, 0))
    np.testing.assert_array_equal(fast.astype(np.float64), ref)


@pytest.mark.parametrize("dtype", D.FLOATS, ids=str)
@given(n=st.integers(1, 2), c=st.sampled_from([1, 3, 33]), kh=st.integers(1, 4), kw=st.integers(1, 4),
       oh=st.sampled_from([1, 2, 7, 16, 33]), ow=st.sampled_from([1, 3, 16, 31, 32, 33]),
       levels=st.sampled_from([3, 1000]), seed=st.integers(0, 2**31))
def test_windows_that_tile_the_input_equal_the_general_kernels(dev, monkeypatch, dtype, n, c, kh, kw, oh, ow,
                                                               levels, seed):
    """Kernel = stride, no padding, sizes multiples of the kernel: avg_pool2d, avg_pool2d_grad and
    max_pool2d_grad run a thread per window (the `_tiled` kernels) and write the general kernels'
    bits — ties (few distinct levels), NaN, −0 and infinities included — in every storage type."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, levels, (n, c, oh * kh, ow * kw)) - levels // 2).astype(dtype)
    g = rng.standard_normal((n, c, oh, ow)).astype(dtype)
    for a, specials in ((x, [np.nan, -0.0, np.inf]), (g, [np.nan, -0.0, -np.inf])):
        for i, v in enumerate(specials):
            a.flat[i::11 + i] = v
    attrs = dict(kernel=(kh, kw), stride=(kh, kw), padding=(0, 0))

    def run(tiled):
        monkeypatch.setattr(pool_ops, "_tiles", lambda *args: tiled)
        tx, tg = mm.tensor(x, dev, dtype=dtype), mm.tensor(g, dev, dtype=dtype)
        return [mm.ops.avg_pool2d(tx, **attrs).numpy(),
                mm.ops.avg_pool2d_grad(tg, input_size=x.shape[2:], **attrs).numpy(),
                mm.ops.max_pool2d_grad(tg, tx, **attrs).numpy()]

    general = run(False)
    for got, want in zip(run(True), general):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(BITS[dtype]), want.view(BITS[dtype]))
    # and the references' values
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(general[2].astype(np.float64), R.max_pool2d_grad(g64, x64, **attrs), rtol=0, atol=0)
    np.testing.assert_allclose(general[1].astype(np.float64),
                               R.avg_pool2d_grad(g64, input_size=x.shape[2:], **attrs), rtol=1e-2, atol=1e-6)


def test_max_pool_ties_go_to_the_first_maximum(dev):
    # Overlapping 2×2 windows, stride 1, on a constant image: every window's arg-max is its
    # top-left pixel, so the gradient lands only where a window starts.
    x = mm.tensor(np.ones((1, 1, 3, 3), np.float32), dev)
    g = mm.tensor(np.ones((1, 1, 2, 2), np.float32), dev)
    dx = mm.ops.max_pool2d_grad(g, x, kernel=2, stride=1, padding=0).numpy()[0, 0]
    np.testing.assert_array_equal(dx, [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("shape, attrs, message", [
    ((1, 1, 4, 4), {"kernel": 2, "padding": -1}, "must not be negative"),
    ((1, 1, 4, 4), {"kernel": 5}, "larger than the padded input"),
    ((1, 1, 4, 4), {"kernel": 2, "padding": 2}, "at most half the kernel"),
    ((1, 4, 4), {"kernel": 2}, "NCHW"),
    ((1, 1, 4, 4), {"kernel": 2, "stride": 0}, "stride"),
    ((1, 1, 4, 4), {"kernel": 2.5}, "kernel must be an int or a pair of ints"),
])
def test_pool_errors(dev, op, shape, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(mm.tensor(np.zeros(shape, np.float32), dev), **attrs)


def test_pool_gradient_shape_mismatch(dev):
    x = mm.tensor(np.zeros((1, 1, 4, 4), np.float32), dev)
    g = mm.tensor(np.zeros((1, 1, 3, 3), np.float32), dev)
    with pytest.raises(mm.ShapeError, match="pooled shape"):
        mm.ops.max_pool2d_grad(g, x, kernel=2, stride=2, padding=0)


@pytest.mark.parametrize("attrs, message", [({"size": 4}, "odd"), ({"size": 11}, "odd"), ({"sigma": 0.0}, "sigma")])
def test_log_filter_errors(dev, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        mm.ops.log_filter(mm.tensor(np.zeros((1, 1, 4, 4), np.float32), dev), **attrs)


def test_log_filter_ignores_constants(dev):
    x = mm.tensor(np.full((1, 2, 9, 9), 3.0, np.float32), dev)
    y = mm.ops.log_filter(x, sigma=1.0, size=5).numpy()
    np.testing.assert_allclose(y[:, :, 2:-2, 2:-2], 0, atol=1e-5)  # away from the zero padding
