"""Concat and slice along the channels, transposes, strided slices and broadcasts against their
references; the functions over them; shape errors."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal import dtypes as D
from mlmetal import ops
from opcheck import AWKWARD_DIMS, LOW_DTYPES, floats, make_storage_tests, make_tests, row


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


def transpose_case(small=False):
    def case(data):
        shape = any_shape(data, small)
        perm = data.draw(st.none() | st.permutations(range(len(shape))).map(tuple), label="perm")
        return [floats(shape, data)], {"perm": perm}
    return case


def index_of(data, n):
    """A Python slice of an axis of size n that takes something: (start, stop, step), each maybe None."""
    step = data.draw(st.none() | st.sampled_from([1, 2, 3, -1, -2]), label="step")
    start = data.draw(st.none() | st.integers(-n - 2, n + 2), label="start")
    stop = data.draw(st.none() | st.integers(-n - 2, n + 2), label="stop")
    if not range(n)[slice(start, stop, step)]:
        start, stop = None, None
    return start, stop, step


def strided_slice_case(small=False):
    """x[...] with a slice or (maybe) an integer on each leading axis."""
    def case(data):
        shape = any_shape(data, small)
        leading = data.draw(st.integers(0, len(shape)), label="axes given")
        start, stop, step, drop = [], [], [], []
        for d in range(leading):
            if data.draw(st.integers(0, 3), label="integer") == 0:
                start.append(data.draw(st.integers(-shape[d], shape[d] - 1), label="index"))
                stop.append(None)
                step.append(None)
                drop.append(d)
            else:
                for to, v in zip((start, stop, step), index_of(data, shape[d])):
                    to.append(v)
        return [floats(shape, data)], {"start": tuple(start), "stop": tuple(stop), "step": tuple(step),
                                       "drop": tuple(drop)}
    return case


def strided_slice_grad_case(data):
    [x], attrs = strided_slice_case()(data)
    out, _ = mm.ops.REGISTRY["strided_slice"].check(x.shape, **attrs)
    return [floats(out, data)], dict(attrs, shape=x.shape)


def broadcast_to_case(small=False):
    """x and a shape it broadcasts to: more leading axes, and some of x's size-1 axes grown."""
    def case(data):
        shape = any_shape(data, small, max_axes=3)
        x_shape = tuple(1 if data.draw(st.booleans(), label="broadcast") else n for n in shape)
        lead = data.draw(st.lists(st.integers(1, 3 if small else 5), max_size=2), label="leading")
        return [floats(x_shape, data)], {"shape": tuple(lead) + shape}
    return case


# Every op here moves values: exact in every storage type (lowp_ulps=0).
EXACT = dict(rtol=0, atol=0, lowp_ulps=0)
ROWS = [
    row("concat", concat_case(), grad_case=concat_case(small=True), **EXACT),
    row("slice_channels", slice_case(), grad_case=slice_case(small=True), **EXACT),
    row("slice_channels_grad", fit(slice_grad_case), **EXACT),
    row("transpose", transpose_case(), grad_case=transpose_case(small=True), **EXACT),
    row("strided_slice", strided_slice_case(), grad_case=strided_slice_case(small=True), **EXACT),
    row("strided_slice_grad", strided_slice_grad_case, **EXACT),
    row("broadcast_to", broadcast_to_case(), grad_case=broadcast_to_case(small=True), **EXACT),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)
# broadcast_to's gradient is a `sum` and a `reshape` (ops.broadcast.sum_to), of other families:
# its float16 and bfloat16 gradients are checked where those ops take the types.
if not all(t in ops.REGISTRY[o].dtypes for o in ("sum", "reshape") for t in LOW_DTYPES):
    _, test_storage_grad = make_storage_tests([r for r in ROWS if r.op != "broadcast_to"])


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


@pytest.mark.parametrize("dtype", D.FLOATS, ids=str)
@pytest.mark.parametrize("n", [1, 2, 31, 33])
def test_every_op_moves_bits(dev, dtype, n):
    """Odd element counts (1, 31, 33, …) and NaN, ±inf, -0 and subnormals come through each op
    bit for bit, forward and gradient kernels alike."""
    special = np.array([np.nan, np.inf, -np.inf, -0.0, ml_dtypes.finfo(dtype).smallest_subnormal, 1 / 3], dtype)
    a = np.resize(special, (1, n, 1, n)) * np.arange(1, n * n + 1, dtype=np.float32).reshape(1, n, 1, n).astype(dtype)
    a.flat[:len(special)] = special[:a.size]
    x = mm.tensor(a, dev, dtype=dtype)
    cases = [
        (mm.ops.concat([x, x]), np.concatenate([a, a], axis=1)),
        (mm.ops.slice_channels(x, n // 2, n), a[:, n // 2:]),
        (mm.ops.slice_channels_grad(x, channels=n + 3, start=2), np.pad(a, ((0, 0), (2, 1), (0, 0), (0, 0)))),
        (mm.ops.transpose(x), a.transpose()),
        (mm.ops.strided_slice(x, start=(None, None, None, -1), step=(None, 2, None, -1)), a[:, ::2, :, ::-1]),
        (mm.ops.strided_slice_grad(x, shape=(2, 1, n, 1, n), start=(1,), stop=(None,), step=(None,), drop=(0,)),
         np.stack([np.zeros_like(a), a])),
        (mm.ops.broadcast_to(x, shape=(3, 1, n, 2, n)), np.broadcast_to(a, (3, 1, n, 2, n))),
    ]
    for got, expected in cases:
        assert got.dtype == dtype and got.shape == expected.shape
        np.testing.assert_array_equal(bits(got.numpy()), bits(np.ascontiguousarray(expected)))


@pytest.mark.parametrize("dtype", D.FLOATS, ids=str)
@pytest.mark.parametrize("spatial", [(4, 2), (8, 8), (3, 3), (2, 6)])
def test_channel_copies_by_words_and_by_elements(dev, dtype, spatial):
    """concat and slice_channels move whole 16-byte words where a channel fills them (H·W of
    (4, 2), (8, 8) in every type), elements otherwise ((3, 3); (2, 6) in float32 only): bit for bit
    either way, whatever the channel offsets."""
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((2, c, *spatial)).astype(dtype) for c in (3, 5))
    x, y = mm.tensor(a, dev), mm.tensor(b, dev)
    for got, expected in [(mm.ops.concat([x, y, x]), np.concatenate([a, b, a], axis=1)),
                          (mm.ops.slice_channels(y, 1, 4), b[:, 1:4])]:
        assert got.dtype == dtype
        np.testing.assert_array_equal(bits(got.numpy()), bits(np.ascontiguousarray(expected)))


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


def test_many_axes_of_size_one(dev):
    """Axes of size 1 take no place in the kernels' eight: a slice of a 10-D tensor and its gradient."""
    a = np.arange(4 * 5, dtype=np.float32).reshape(1, 4, 1, 1, 1, 5, 1, 1, 1, 1)
    attrs = dict(start=(0, 1, 0, 0, 0, None), stop=(None, None, None, None, None, 2), step=(None, 2), drop=(0, 4))
    y = mm.ops.strided_slice(mm.tensor(a, dev), **attrs)
    np.testing.assert_array_equal(y.numpy(), a[0, 1::2, :, :, 0, :2])
    dx = mm.ops.strided_slice_grad(y, shape=a.shape, **attrs).numpy()
    expected = np.zeros_like(a)
    expected[0, 1::2, :, :, 0, :2] = a[0, 1::2, :, :, 0, :2]
    np.testing.assert_array_equal(dx, expected)


def test_strided_slice_as_numpy_indexes(dev):
    """x[:, 2:5, ::2], x[1, ::-1], x[-1] and x[..., 0] as NumPy reads them."""
    a = np.arange(3 * 6 * 5, dtype=np.float32).reshape(3, 6, 5)
    x = mm.tensor(a, dev)
    cases = [
        (a[:, 2:5, ::2], dict(start=(None, 2), stop=(None, 5), step=(None, None, 2))),
        (a[1, ::-1], dict(start=(1,), step=(None, -1), drop=(0,))),
        (a[-1], dict(start=(-1,), drop=(0,))),
        (a[:, :, 0], dict(start=(None, None, 0), drop=(-1,))),
        (a[1, 2, 3], dict(start=(1, 2, 3), drop=(0, 1, 2))),
    ]
    for expected, attrs in cases:
        got = mm.ops.strided_slice(x, **attrs).numpy()
        assert got.shape == expected.shape and (got == expected).all(), attrs


@pytest.mark.parametrize("attrs, message", [
    (dict(start=(None, 4), stop=(None, 2)), r"slice 4:2:None of axis 1 \(size 4\) is empty"),
    (dict(start=(5,), drop=(0,)), "index 5 is out of range for axis 0 of size 3"),
    (dict(start=(0,), stop=(1,), drop=(0,)), "stop and step must be None"),
    (dict(drop=(1,)), r"give its index as start\[1\]"),
    (dict(step=(0,)), "step of axis 0 is 0"),
    (dict(start=(0, 0, 0, 0)), "4 entries for the 3 axes"),
    (dict(start=(0.5,)), "ints or None"),
])
def test_strided_slice_errors(dev, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        mm.ops.strided_slice(mm.tensor(np.zeros((3, 4, 5), np.float32), dev), **attrs)


@pytest.mark.parametrize("op, attrs, message", [
    ("transpose", {"perm": (0, 0, 1)}, "not a permutation"),
    ("transpose", {"perm": (0, 1)}, "each of the 3 axes"),
    ("transpose", {"perm": (0, 1, 3)}, "perm entry 3 is not an axis"),
    ("broadcast_to", {"shape": (3, 5)}, r"cannot broadcast \(3, 4, 1\) to \(3, 5\)"),
    ("broadcast_to", {"shape": (3, 3, 1)}, r"do not broadcast"),
    ("broadcast_to", {"shape": (3, 4, 0)}, "positive ints"),
])
def test_layout_errors(dev, op, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, op)(mm.tensor(np.zeros((3, 4, 1), np.float32), dev), **attrs)


def test_functions_over_transpose_and_reshape(dev):
    """permute, flatten, squeeze and unsqueeze as PyTorch's, their errors named."""
    a = np.arange(2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4)
    x = mm.tensor(a, dev)
    assert (mm.ops.permute(x, (0, 2, 3, 1)).numpy() == a.transpose(0, 2, 3, 1)).all()
    assert (mm.ops.flatten(x, start_axis=1).numpy() == a.reshape(2, 12)).all()
    assert mm.ops.flatten(x, start_axis=1, end_axis=2).shape == (2, 3, 4)
    assert mm.ops.flatten(x).shape == (24,)
    assert (mm.ops.squeeze(x).numpy() == a.reshape(2, 3, 4)).all()
    assert mm.ops.squeeze(x, axis=1).shape == (2, 3, 4)
    assert mm.ops.unsqueeze(x, 0).shape == (1, 2, 1, 3, 4)
    assert mm.ops.unsqueeze(x, -1).shape == (2, 1, 3, 4, 1)
    with pytest.raises(mm.ShapeError, match=r"axes \[0\] of \(2, 1, 3, 4\) are not all of size 1"):
        mm.ops.squeeze(x, axis=0)
    with pytest.raises(mm.ShapeError, match="start_axis 2 comes after end_axis 1"):
        mm.ops.flatten(x, start_axis=2, end_axis=1)
    with pytest.raises(mm.ShapeError, match="axis 5 is not an axis of a tensor of 5 axes"):
        mm.ops.unsqueeze(x, 5)
