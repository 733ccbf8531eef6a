"""conv2d and its gradient ops against their float64 references, and the errors before dispatch.

Tolerances: each output is a float32 sum of K products of unit normals, so the error grows
with K; rows state `rtol_for(K_max)` of conftest for the largest K their cases can draw.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm
from conftest import rtol_for
from mlmetal.ops import conv as conv_ops
from mlmetal.ops import tiling
from opcheck import (AWKWARD_DIMS, LOW_DTYPES, Row, check_forward, check_storage, floats, make_storage_tests, make_tests,
                     row)

MAX_CIN_G, MAX_COUT_G, MAX_K, MAX_N, MAX_HW = 6, 65, 5, 3, 40


def config(data, small=False):
    """A drawn convolution: input shape, weight shape and attributes (the window always fits)."""
    draw = lambda s, label: data.draw(s, label=label)  # noqa: E731
    groups = draw(st.sampled_from([1, 1, 2, 3]), "groups")
    cin_g = draw(st.integers(1, 3 if small else MAX_CIN_G), "cin/groups")
    cout_g = draw(st.integers(1, 3) if small else st.sampled_from([1, 31, 32, 33, 64, 65]) | st.integers(1, 12),
                  "cout/groups")
    kh, kw = (draw(st.sampled_from([1, 2, 3] if small else [1, 3, 5]), f"k{d}") for d in "hw")
    stride = tuple(draw(st.integers(1, 3), "stride") for _ in "hw")
    padding = tuple(draw(st.integers(0, 2), "padding") for _ in "hw")
    dilation = tuple(draw(st.integers(1, 2), "dilation") for _ in "hw")
    n = draw(st.integers(1, 2 if small else MAX_N), "n")
    dims = st.integers(1, 6) if small else AWKWARD_DIMS
    h, w = (draw(dims, d) for d in "hw")
    # Grow the input until the dilated window fits the padded input.
    h = max(h, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    w = max(w, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (n, cin_g * groups, h, w), (cout_g * groups, cin_g, kh, kw), attrs


def out_shape(x, w, attrs):
    (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
    return (x[0], w[0], (x[2] + 2 * ph - dh * (w[2] - 1) - 1) // sh + 1, (x[3] + 2 * pw - dw * (w[3] - 1) - 1) // sw + 1)


def conv2d_case(small=False):
    def case(data):
        x, w, attrs = config(data, small)
        inputs = [floats(x, data), floats(w, data)]
        if data.draw(st.booleans(), label="bias"):
            inputs.append(floats((w[0],), data))
        return inputs, attrs
    return case


def input_grad_case(data):
    x, w, attrs = config(data)
    return [floats(out_shape(x, w, attrs), data), floats(w, data)], dict(attrs, input_size=x[2:])


def weight_grad_case(data):
    x, w, attrs = config(data)
    return [floats(out_shape(x, w, attrs), data), floats(x, data)], dict(attrs, kernel_size=w[2:])


def bias_grad_case(data):
    x, w, attrs = config(data)
    return [floats(out_shape(x, w, attrs), data)], {}


PIXELS_MAX = MAX_N * (MAX_HW + 4) ** 2  # stride 1 and padding 2 give (H+4)·(W+4) output pixels an image
ROWS = [
    row("conv2d", conv2d_case(), grad_case=conv2d_case(small=True),
        rtol=rtol_for(MAX_CIN_G * MAX_K**2), atol=rtol_for(MAX_CIN_G * MAX_K**2)),
    row("conv2d_input_grad", input_grad_case,
        rtol=rtol_for(MAX_COUT_G * MAX_K**2), atol=rtol_for(MAX_COUT_G * MAX_K**2),
        nan_spreads="the GEMM multiplies each weight by the zero-padded gradient too, where PyTorch adds only "
                    "the taps that reach a pixel (0·NaN is NaN)"),
    row("conv2d_weight_grad", weight_grad_case, rtol=rtol_for(PIXELS_MAX), atol=rtol_for(PIXELS_MAX)),
    row("conv2d_bias_grad", bias_grad_case, rtol=rtol_for(PIXELS_MAX), atol=rtol_for(PIXELS_MAX)),
]

test_forward, test_grad, test_nan = make_tests(ROWS)
test_storage, test_storage_grad = make_storage_tests(ROWS)

DTYPES = [np.dtype(np.float32), *LOW_DTYPES]


def check_in(dev, dtype, r: Row, inputs, attrs):
    """check_forward in float32; in float16 or bfloat16, on the inputs rounded to it (check_storage)."""
    if dtype == np.float32:
        check_forward(dev, r, inputs, attrs)
    else:
        check_storage(dev, r, inputs, attrs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_grad_split_reduction(dev, dtype):
    """A long pixel reduction over few output tiles takes the split path (float32 partials +
    sum_splits, which rounds to the storage type)."""
    g_shape, x_shape = (4, 8, 32, 32), (4, 8, 32, 32)
    assert tiling.split_reduction(4 * 32 * 32, tiles=1)[0] > 1
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(g_shape).astype(np.float32), rng.standard_normal(x_shape).astype(np.float32)]
    attrs = dict(stride=1, padding=1, kernel_size=3)
    check_in(dev, dtype, Row("conv2d_weight_grad", None, rtol=rtol_for(4096), atol=rtol_for(4096)), inputs, attrs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_split_reduction(dev, dtype):
    """A convolution with few output tiles and a long reduction (a DCGAN discriminator's
    64 → 128 channels, 4×4 stride 2, to 7×7) sums its reduction in float32 slices; the bias is
    added once; with groups, each group's slices are its own."""
    x, w, attrs = (3, 64, 14, 14), (128, 64, 4, 4), dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    tiles = conv_ops.groups_for(3 * 7 * 7, tiling.WIDE.cols)
    assert tiling.split_reduction(64 * 16, tiles, target=132, min_chunk=128)[0] > 1
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in (x, w, (128,))]
    tol = dict(rtol=rtol_for(64 * 16), atol=rtol_for(64 * 16))
    check_in(dev, dtype, Row("conv2d", None, **tol), inputs, attrs)
    grouped = [inputs[0], inputs[1][:, :32].copy()]  # two groups of 32 → 64 channels, no bias
    check_in(dev, dtype, Row("conv2d", None, **tol), grouped, dict(attrs, groups=2))


@pytest.mark.parametrize("x, cout, attrs", [
    ((3, 4, 300, 5), 34, dict(stride=(1, 1), padding=(2, 2), dilation=(1, 1), groups=2, kernel_size=(5, 5))),
    ((2, 3, 70, 66), 6, dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=1, kernel_size=(3, 3))),
    ((4, 2, 64, 64), 32, dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, kernel_size=(1, 1))),
])
@pytest.mark.parametrize("spread", [False, True])
def test_narrow_weight_and_bias_grad(dev, monkeypatch, x, cout, attrs, spread):
    """The weight gradient for few channels (the narrow tiling) with 5×5, 3×3 and 1×1 windows,
    groups, odd rows, and pixels split across threadgroups; the bias gradient over the same
    output gradients, in one threadgroup a channel (cpu) and split (GPUs)."""
    monkeypatch.setattr(dev, "cheap_barriers", spread)
    y = out_shape(x, (cout, x[1] // attrs["groups"], *attrs["kernel_size"]), attrs)
    assert tiling.tiling(cout // attrs["groups"]) is tiling.NARROW
    assert tiling.split_reduction(y[0] * y[2] * y[3], 1)[0] > 1
    rng = np.random.default_rng(cout)
    g, xs = rng.standard_normal(y).astype(np.float32), rng.standard_normal(x).astype(np.float32)
    tol = dict(rtol=rtol_for(y[2] * y[3] * y[0]), atol=rtol_for(y[2] * y[3] * y[0]))
    check_forward(dev, Row("conv2d_weight_grad", None, **tol), [g, xs], attrs)
    check_forward(dev, Row("conv2d_bias_grad", None, **tol), [g], {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread", [False, True])
@given(n=st.integers(1, 3), c=st.sampled_from([1, 2, 3, 31, 33]),
       plane=st.sampled_from([1, 255, 256, 257, 1023, 1024, 1025, 1027, 2047, 3073, 4100]) | st.integers(1, 5000))
def test_bias_grad_plane_lengths(dev, monkeypatch, dtype, spread, n, c, plane):
    """The bias gradient over planes either side of each multiple of its 256 threads and of the
    four sums a thread keeps (1024 pixels a pass), in one threadgroup a channel (cpu) and split
    across several (GPUs: every split but the last a whole number of passes or not)."""
    monkeypatch.setattr(dev, "cheap_barriers", spread)
    monkeypatch.setattr(conv_ops, "BIAS_GRAD_GROUPS", 8 * c)
    g = np.random.default_rng(plane).standard_normal((n, c, 1, plane)).astype(np.float32)
    tol = rtol_for(n * plane)
    check_in(dev, dtype, Row("conv2d_bias_grad", None, rtol=tol, atol=tol), [g], {})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(st.data())
def test_direct_3x3_kernels(dev, monkeypatch, dtype, data):
    """conv2d_3x3 and conv2d_weight_grad_3x3 (the GPUs' kernels for 3×3 stride-1 convolutions,
    forward, input gradient through turned weights, weight gradient) on every backend and in each
    storage type: channel counts either side of their 16-channel blocks and 4-channel chunks, images
    either side of their 8×16, 8×64 and 16×32-pixel tiles, padding 0–2, with and without bias, the
    weight gradient's tiles split across threadgroups or not."""
    monkeypatch.setattr(dev, "cheap_barriers", True)
    monkeypatch.setattr(conv_ops, "MIN_TILE_USE", 0)  # small images too
    draw = lambda s, label: data.draw(s, label=label)  # noqa: E731
    channels = st.sampled_from([1, 3, 4, 5, 15, 16, 17, 33]) | st.integers(1, 40)
    n, cin, cout = draw(st.integers(1, 3), "n"), draw(channels, "cin"), draw(channels, "cout")
    pad = draw(st.integers(0, 2), "padding")
    h, w = (max(3 - 2 * pad, draw(st.sampled_from([1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65]) | st.integers(1, 70), d))
            for d in "hw")
    y = (n, cout, h + 2 * pad - 2, w + 2 * pad - 2)
    assert conv_ops.direct_conv(dev, cout, (3, 3), (1, 1), (1, 1), 1, y[2:])
    assert conv_ops.direct_conv(dev, cin, (3, 3), (1, 1), (1, 1), 1, (h, w))  # the input gradient's turned convolution
    assert conv_ops.direct_weight_grad(dev, cout, (3, 3), (1, 1), (1, 1), 1)
    x, wt = floats((n, cin, h, w), data), floats((cout, cin, 3, 3), data)
    bias = [floats((cout,), data)] if draw(st.booleans(), "bias") else []
    attrs = dict(stride=(1, 1), padding=(pad, pad), dilation=(1, 1))
    # A sum of L products of unit normals is about √L in size, and its roundoff scales with that,
    # not with the result, which can cancel to near 0 (on a GPU under `highest` the direct kernels
    # for 17 channels or more take split-TF32 products: 8e-5 off a 0.017 of 297 terms, H100).
    tol = lambda length: dict(rtol=rtol_for(length), atol=rtol_for(length) * np.sqrt(length))  # noqa: E731
    check_in(dev, dtype, Row("conv2d", None, **tol(cin * 9)), [x, wt, *bias], attrs)
    check_in(dev, dtype, Row("conv2d_input_grad", None, **tol(cout * 9)), [floats(y, data), wt], dict(attrs, input_size=(h, w)))
    check_in(dev, dtype, Row("conv2d_weight_grad", None, **tol(n * y[2] * y[3])), [floats(y, data), x], dict(attrs, kernel_size=3))


@pytest.mark.parametrize("channels", [9, 40, 72])  # kernels/tile.h's narrow, medium and wide tilings
def test_every_tiling(dev, channels):
    """Hypothesis draws few input channels, so the input gradient's tilings are pinned here (and
    every op's, with padding, stride 2 and a tile-crossing pixel count). At stride 1 the input
    gradient runs the forward kernel on turned weights, unless the padding exceeds the window's
    reach (padding 3 of a 3×3 window), where it falls back to conv2d_input_grad like stride 2."""
    assert [tiling.tiling(c) for c in (9, 40, 72)] == [tiling.NARROW, tiling.MEDIUM, tiling.WIDE]
    rng = np.random.default_rng(channels)
    x, w = (2, channels, 11, 13), (channels + 3, channels, 3, 3)
    for s, d, pad in ((1, 1, 1), (2, 2, 1), (1, 1, 3)):
        attrs = dict(stride=(s, s), padding=(pad, pad), dilation=(d, d))
        y = out_shape(x, w, attrs)
        draw = lambda shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
        tol = dict(rtol=rtol_for(channels * 9 * 4), atol=rtol_for(channels * 9 * 4))
        check_forward(dev, Row("conv2d", None, **tol), [draw(x), draw(w)], attrs)
        check_forward(dev, Row("conv2d_input_grad", None, **tol), [draw(y), draw(w)], dict(attrs, input_size=x[2:]))
        check_forward(dev, Row("conv2d_weight_grad", None, **tol), [draw(y), draw(x)], dict(attrs, kernel_size=3))


def test_public_wrapper_optional_bias(dev):
    x = mm.tensor(np.ones((1, 2, 4, 4), np.float32), dev)
    w = mm.tensor(np.ones((3, 2, 3, 3), np.float32), dev)
    b = mm.tensor(np.arange(3, dtype=np.float32), dev)
    y = mm.ops.conv2d(x, w, b=None, padding=1).numpy()
    assert y.shape == (1, 3, 4, 4) and y[0, 0, 1, 1] == 18 and y[0, 0, 0, 0] == 8
    np.testing.assert_array_equal(mm.ops.conv2d(x, w, b, padding=1).numpy(), y + np.arange(3)[None, :, None, None])


@pytest.mark.parametrize("x, w, b, attrs, message", [
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(padding=-1), "padding must be non-negative"),
    ((1, 4, 4, 4), (2, 4, 7, 7), None, {}, "larger than the padded input"),
    ((1, 4, 4, 4), (2, 4, 3, 3), None, dict(dilation=3), "larger than the padded input"),
    ((1, 4, 8, 8), (2, 2, 3, 3), None, dict(groups=3), "not divisible by groups=3"),
    ((1, 6, 8, 8), (4, 2, 3, 3), None, dict(groups=3), "output channels are not divisible"),
    ((1, 4, 8, 8), (2, 3, 3, 3), None, {}, "input channels"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(stride=0), "stride must be positive"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(dilation=(1, 0)), "dilation must be positive"),
    ((4, 8, 8), (2, 4, 3, 3), None, {}, "input must be 4-D"),
    ((1, 4, 8, 8), (2, 4, 3), None, {}, "weights must be 4-D"),
    ((1, 4, 8, 8), (2, 4, 3, 3), (3,), {}, "bias must have shape (2,)"),
    ((1, 4, 8, 8), (2, 4, 3, 3), None, dict(activation="gelu"), "activation must be one of None, 'relu', got 'gelu'"),
])
def test_errors_before_dispatch(dev, x, w, b, attrs, message):
    ts = [mm.tensor(np.zeros(s, np.float32), dev) for s in (x, w) + ((b,) if b else ())]
    with pytest.raises(mm.ShapeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mm.ops.conv2d(*ts, **attrs)


def test_gradient_op_errors(dev):
    g = mm.tensor(np.zeros((1, 2, 6, 6), np.float32), dev)
    w = mm.tensor(np.zeros((2, 4, 3, 3), np.float32), dev)
    with pytest.raises(mm.ShapeError, match="the convolution of a 9×9 input gives 7×7"):
        mm.ops.conv2d_input_grad(g, w, input_size=(9, 9))
    with pytest.raises(mm.ShapeError, match="has 1 images, the input 2"):
        mm.ops.conv2d_weight_grad(g, mm.tensor(np.zeros((2, 4, 8, 8), np.float32), dev), kernel_size=3)
