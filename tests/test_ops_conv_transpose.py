"""conv_transpose2d against its float64 reference (the scatter that defines it), its gradients,
and the errors before dispatch.

Tolerance: each output sums at most Cin/groups·KH·KW products of unit normals (see test_ops_conv).
"""

import numpy as np
import pytest
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from opcheck import AWKWARD_DIMS, floats, make_storage_tests, make_tests, row

MAX_CIN_G, MAX_K = 6, 5


def transpose_case(small=False):
    def case(data):
        draw = lambda s, label: data.draw(s, label=label)  # noqa: E731
        groups = draw(st.sampled_from([1, 1, 2, 3]), "groups")
        cin_g = draw(st.integers(1, 3 if small else MAX_CIN_G), "cin/groups")
        cout_g = draw(st.integers(1, 3) if small else st.sampled_from([1, 31, 32, 33]) | st.integers(1, 12), "cout/groups")
        kh, kw = (draw(st.sampled_from([1, 2, 3] if small else [1, 3, 4, 5]), f"k{d}") for d in "hw")
        stride = tuple(draw(st.integers(1, 3), "stride") for _ in "hw")
        dilation = tuple(draw(st.integers(1, 2), "dilation") for _ in "hw")
        output_padding = tuple(draw(st.integers(0, s - 1), "output_padding") for s in stride)
        padding = tuple(draw(st.integers(0, 2), "padding") for _ in "hw")
        n = draw(st.integers(1, 2 if small else 3), "n")
        dims = st.integers(1, 5) if small else AWKWARD_DIMS
        h, w = (draw(dims, d) for d in "hw")
        # Trim the padding until the output keeps a row and a column.
        padding = tuple(min(p, ((i - 1) * s + d * (k - 1) + o) // 2)
                        for p, i, s, d, k, o in zip(padding, (h, w), stride, dilation, (kh, kw), output_padding))
        inputs = [floats((n, cin_g * groups, h, w), data), floats((cin_g * groups, cout_g, kh, kw), data)]
        if draw(st.booleans(), "bias"):
            inputs.append(floats((cout_g * groups,), data))
        return inputs, dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
                            groups=groups)
    return case


TOL = rtol_for(MAX_CIN_G * MAX_K**2)
ROWS = [
    row("conv_transpose2d", transpose_case(), rtol=TOL, atol=TOL, grad_case=transpose_case(small=True),
        nan_spreads="its kernels are conv2d_input_grad's, whose GEMM multiplies each weight by zero padding too, "
                    "where PyTorch adds only the taps that reach a pixel (0·NaN is NaN)"),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)


def test_dcgan_upsampling(dev):
    """The DCGAN generator's 4×4 stride-2 padding-1 layer doubles 7×7 to 14×14, as PyTorch's does."""
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 16, 7, 7)), rng.standard_normal((16, 8, 4, 4)), rng.standard_normal(8)
    y = mm.ops.conv_transpose2d(*(mm.tensor(a, dev) for a in (x, w, b)), stride=2, padding=1)
    assert y.shape == (2, 8, 14, 14)
    ref = mm.ops.REGISTRY["conv_transpose2d"].reference(x, w, b, stride=(2, 2), padding=(1, 1), output_padding=(0, 0),
                                                         dilation=(1, 1), groups=1)
    np.testing.assert_allclose(y.numpy(), ref, rtol=rtol_for(16 * 4), atol=rtol_for(16 * 4))


def test_gradients_in_a_training_graph(dev):
    """In a graph, the weight and bias get the gradients the eager rule gives (conv2d_weight_grad
    and conv2d_bias_grad with the roles turned)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    w, b = (mm.nn.Parameter(rng.standard_normal(s).astype(np.float32), dev) for s in ((4, 3, 3, 3), (3,)))
    g = mm.Graph(dev)
    y = mm.ops.conv_transpose2d(g.input("x", x.shape), w, b, stride=2, padding=1, output_padding=1)
    loss = mm.ops.sum(mm.ops.mul(y, y))
    loss.training_graph().step(x=x)
    eager = mm.ops.conv_transpose2d(mm.tensor(x, dev), w, b, stride=2, padding=1, output_padding=1)
    dy = mm.ops.scale(eager, s=2.0)
    _, dw, db = mm.ops.REGISTRY["conv_transpose2d"].grad(
        dy, eager, mm.tensor(x, dev), w, b, stride=(2, 2), padding=(1, 1), output_padding=(1, 1), dilation=(1, 1),
        groups=1)
    np.testing.assert_allclose(w.grad.numpy(), dw.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b.grad.numpy(), db.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x, w, attrs, message", [
    ((1, 4, 5, 5), (3, 2, 3, 3), {}, "input has 4 channels, the weights"),
    ((1, 4, 5, 5), (4, 2, 3, 3), {"stride": 2, "output_padding": 2}, "output_padding .* smaller than the stride"),
    ((1, 4, 5, 5), (4, 2, 3, 3), {"groups": 3}, "not divisible by groups=3"),
    ((1, 4, 1, 1), (4, 2, 1, 1), {"padding": 1}, "padding .* removes all of it"),
    ((1, 4, 5), (4, 2, 3, 3), {}, "4-D"),
])
def test_conv_transpose_errors(dev, x, w, attrs, message):
    with pytest.raises(mm.ShapeError, match=message):
        mm.ops.conv_transpose2d(mm.tensor(np.zeros(x, np.float32), dev), mm.tensor(np.zeros(w, np.float32), dev), **attrs)
