"""gram and gram_grad against their float64 references, and shape errors.

Tolerances scale with the reduction length: H·W for gram, 2·C for gram_grad (rtol_for of conftest).
"""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from opcheck import AWKWARD_DIMS, LOW_DTYPES, UNIT_ROUNDOFF, floats, make_storage_tests, make_tests, row

CHANNELS = AWKWARD_DIMS | st.sampled_from([63, 64, 65, 129])  # around the 64×64 tile and the diagonal
MAX_C, MAX_HW = 129, 40 * 40
ALPHA = st.sampled_from([1.0, 0.5]) | st.floats(1e-3, 4.0)


def gram_case(channels, dims):
    def case(data):
        n, c = data.draw(st.integers(1, 3), label="n"), data.draw(channels, label="c")
        h, w = data.draw(dims, label="h"), data.draw(dims, label="w")
        return [floats((n, c, h, w), data)], dict(alpha=data.draw(ALPHA, label="alpha"))
    return case


def gram_grad_case(data):
    (x,), attrs = gram_case(CHANNELS, AWKWARD_DIMS)(data)
    return [floats((x.shape[0], x.shape[1], x.shape[1]), data), x], attrs


ROWS = [
    row("gram", gram_case(CHANNELS, AWKWARD_DIMS), grad_case=gram_case(st.integers(1, 5), st.integers(1, 4)),
        rtol=rtol_for(MAX_HW), atol=4 * rtol_for(MAX_HW)),
    row("gram_grad", gram_grad_case, rtol=rtol_for(2 * MAX_C), atol=4 * rtol_for(2 * MAX_C)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), *LOW_DTYPES], ids=str)
def test_gram_split_reduction_is_symmetric(dev, dtype):
    """A long H·W reduction takes the split path (float32 slices, their sum rounded once to the
    storage type); mirrored tiles make G exactly symmetric."""
    x = np.random.default_rng(0).standard_normal((2, 70, 48, 48)).astype(dtype)
    g = mm.ops.gram(mm.tensor(x, dev), alpha=1 / 2304).numpy()
    assert g.dtype == dtype
    np.testing.assert_array_equal(g, g.transpose(0, 2, 1))
    f = x.reshape(2, 70, -1).astype(np.float64)
    u = UNIT_ROUNDOFF.get(np.dtype(dtype), 0.0)
    np.testing.assert_allclose(g.astype(np.float64), f @ f.transpose(0, 2, 1) / 2304,
                               rtol=rtol_for(2304) + u, atol=rtol_for(2304) + u)


@pytest.mark.parametrize("name, shapes, attrs, message", [
    ("gram", [(2, 3, 4)], {}, "features must be 4-D"),
    ("gram", [(2, 3, 4, 4)], dict(alpha=float("nan")), "alpha must be a finite number"),
    ("gram_grad", [(2, 3, 4), (2, 3, 4, 4)], {}, r"Gram gradient must have shape \(2, 3, 3\)"),
])
def test_errors_before_dispatch(dev, name, shapes, attrs, message):
    ts = [mm.tensor(np.zeros(s, np.float32), dev) for s in shapes]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, name)(*ts, **attrs)
