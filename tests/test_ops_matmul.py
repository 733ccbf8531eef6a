"""matmul, linear and linear_bias_grad against their float64 references, and shape errors.

Tolerances scale with the reduction length: `rtol_for(K_max)` of conftest.
"""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from mlmetal.ops import tiling
from opcheck import (AWKWARD_DIMS, LOW_DTYPES, Row, check_forward, check_storage, floats, make_storage_tests, make_tests,
                     row)

DIMS = AWKWARD_DIMS | st.sampled_from([63, 64, 65, 127, 129])  # around the 64×64 output tile
MAX_K = 129
SMALL = st.integers(1, 6)


# Batch axes of a and b: none (matrices), b a matrix under a batch (one product over a's rows),
# equal, or broadcast against each other (size 1 or missing on one side).
BATCHES = st.sampled_from([((), ()), ((3,), ()), ((2, 3), ()), ((), (3,)), ((3,), (3,)), ((2, 1), (3,)),
                           ((1, 2), (3, 1))])


def matmul_case(dims):
    def case(data):
        m, k, n = (data.draw(dims, label=d) for d in "mkn")
        ta, tb = data.draw(st.booleans(), label="transpose_a"), data.draw(st.booleans(), label="transpose_b")
        batch_a, batch_b = data.draw(BATCHES, label="batch axes")
        return [floats(batch_a + ((k, m) if ta else (m, k)), data), floats(batch_b + ((n, k) if tb else (k, n)), data)], \
            dict(transpose_a=ta, transpose_b=tb)
    return case


def linear_case(dims):
    def case(data):
        batch, fan_in, fan_out = (data.draw(dims, label=d) for d in ("batch", "in", "out"))
        inputs = [floats((batch, fan_in), data), floats((fan_out, fan_in), data)]
        if data.draw(st.booleans(), label="bias"):
            inputs.append(floats((fan_out,), data))
        return inputs, {}
    return case


def bias_grad_case(data):
    return [floats((data.draw(DIMS, label="batch"), data.draw(DIMS, label="out")), data)], {}


ROWS = [
    row("matmul", matmul_case(DIMS), grad_case=matmul_case(SMALL), rtol=rtol_for(MAX_K), atol=rtol_for(MAX_K)),
    row("linear", linear_case(DIMS), grad_case=linear_case(SMALL), rtol=rtol_for(MAX_K), atol=rtol_for(MAX_K)),
    row("linear_bias_grad", bias_grad_case, rtol=rtol_for(MAX_K), atol=rtol_for(MAX_K)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), *LOW_DTYPES], ids=str)
@pytest.mark.parametrize("ta, tb", [(False, False), (True, False), (False, True)])
def test_long_reduction_split(dev, ta, tb, dtype):
    """A long reduction into one output tile (a discriminator's logit: 6272 features to 1) is
    summed by many threadgroups into float32 slices, then added and rounded to the storage type;
    a linear layer's bias is added exactly once."""
    check = check_forward if dtype == np.float32 else lambda *args: check_storage(*args, dtype)  # noqa: E731
    m, k, n = 5, 6272, 3
    assert tiling.split_reduction(k, 1, min_chunk=64)[0] > 1
    rng = np.random.default_rng(k)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    tol = dict(rtol=rtol_for(k), atol=rtol_for(k))
    check(dev, Row("matmul", None, **tol), [a, b], dict(transpose_a=ta, transpose_b=tb))
    if not ta and tb:
        bias = rng.standard_normal(n).astype(np.float32)
        check(dev, Row("linear", None, **tol), [a, b, bias], {})


def test_linear_optional_bias(dev):
    x = mm.tensor(np.arange(6, dtype=np.float32).reshape(2, 3), dev)
    w = mm.tensor(np.ones((4, 3), np.float32), dev)
    np.testing.assert_array_equal(mm.ops.linear(x, w, b=None).numpy(), [[3] * 4, [12] * 4])
    b = mm.tensor(np.arange(4, dtype=np.float32), dev)
    np.testing.assert_array_equal(mm.ops.linear(x, w, b).numpy(), [[3, 4, 5, 6], [12, 13, 14, 15]])


@pytest.mark.parametrize("name, shapes, attrs, message", [
    ("matmul", [(2, 3), (4, 5)], {}, "inner dimensions differ: a is 2×3, b is 4×5"),
    ("matmul", [(2, 3), (2, 5)], dict(transpose_b=True), "bᵀ is 5×2"),
    ("matmul", [(4,), (4, 5)], {}, r"a must be a non-empty matrix or batch of matrices, got shape \(4,\)"),
    ("matmul", [(2, 3, 4), (3, 4, 5)], {}, r"the batch axes \(2,\) of a and \(3,\) of b do not broadcast"),
    ("linear", [(2, 3), (4, 5)], {}, "input has 3 features"),
    ("linear", [(2, 3), (4, 3), (3,)], {}, r"bias must have shape \(4,\)"),
])
def test_errors_before_dispatch(dev, name, shapes, attrs, message):
    ts = [mm.tensor(np.zeros(s, np.float32), dev) for s in shapes]
    with pytest.raises(mm.ShapeError, match=message):
        getattr(mm.ops, name)(*ts, **attrs)
