"""Upsampling against its reference (and PyTorch's bilinear convention); shape errors."""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from opcheck import AWKWARD_DIMS, LOW_DTYPES, floats, make_storage_tests, make_tests, row


def upsample_case(small=False, grad_op=False):
    def case(data):
        dims = st.integers(1, 4) if small else AWKWARD_DIMS
        scale = data.draw(st.sampled_from([1, 2, 2, 3]), label="scale")
        mode = data.draw(st.sampled_from(["nearest", "bilinear"]), label="mode")
        shape = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(dims), data.draw(dims))
        if grad_op:
            shape = shape[:2] + (shape[2] * scale, shape[3] * scale)
        return [floats(shape, data)], {"scale": scale, "mode": mode}
    return case


ROWS = [
    row("upsample", upsample_case(), grad_case=upsample_case(small=True)),
    # each input gathers up to (2·scale)² weighted gradients whose sum may cancel to near zero
    row("upsample_grad", upsample_case(grad_op=True), atol=5e-5),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 31), (2, 3, 33, 1), (1, 2, 5, 7)])
def test_nearest_copies_low_precision_values_bit_for_bit(dev, dtype, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    x.flat[::3] = np.nan
    y = mm.ops.upsample(mm.tensor(x, dev, dtype=dtype), 3).numpy()
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.view(np.uint16), x.repeat(3, axis=2).repeat(3, axis=3).view(np.uint16))


def test_bilinear_matches_pytorch_convention(dev):
    # torch.nn.functional.interpolate([[0, 1, 2]], scale_factor=2, mode="linear", align_corners=False)
    x = mm.tensor(np.array([0, 1, 2], np.float32).reshape(1, 1, 1, 3), dev)
    y = mm.ops.upsample(x, 2, mode="bilinear").numpy()[0, 0, 0]
    np.testing.assert_allclose(y, [0, 0.25, 0.75, 1.25, 1.75, 2], atol=1e-6)


@pytest.mark.parametrize("shape, args, attrs, message", [
    ((1, 1, 2, 2), (0,), {}, "positive integer"),
    ((1, 1, 2, 2), (1.5,), {}, "positive integer"),
    ((1, 1, 2, 2), (2,), {"mode": "cubic"}, "mode must be one of"),
    ((1, 2, 2), (2,), {}, "NCHW"),
])
def test_upsample_errors(dev, shape, args, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        mm.ops.upsample(mm.tensor(np.zeros(shape, np.float32), dev), *args, **attrs)


def test_upsample_grad_needs_a_multiple_of_the_scale(dev):
    with pytest.raises(mm.ShapeError, match="multiple of the scale"):
        mm.ops.upsample_grad(mm.tensor(np.zeros((1, 1, 3, 4), np.float32), dev), scale=2, mode="nearest")
