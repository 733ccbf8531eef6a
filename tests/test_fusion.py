"""conv2d with a fused relu (`activation="relu"`), and the graphs that fuse a conv2d into the relu
after it (mlmetal/graph/fusion.py).

The fused kernels apply the relu kernel's rule to the value they store, so their results are the
unfused ones bit for bit — on every kernel family a convolution can take (the tiled products,
split or not, the direct 3×3 kernels, the simdgroup-matrix ones) and in every storage type — and a
fused training graph computes the same loss and gradients, bit for bit, as the unfused one.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal.ops import conv as conv_ops
from mlmetal.ops import tiling
from mlmetal.reference import conv as RC

DTYPES = [np.dtype(np.float32), np.dtype(np.float16), mm.bfloat16]


def bits(a):
    """The array's bits, so −0 and 0 differ."""
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


@pytest.fixture(params=["products", "direct", "matrices"])
def kernels(request, dev, monkeypatch):
    """Which kernels a convolution may take: the tiled products alone (the cpu backend's choice);
    the GPUs' direct 3×3 kernels where they fit (small images too); or, where they fit, the
    simdgroup-matrix kernels under "high" (3×3 into 17 channels or more, k×k into at most 8,
    the products' `_mma` instances otherwise; the cpu backend emulates them)."""
    if request.param != "products":
        monkeypatch.setattr(dev, "cheap_barriers", True)
        monkeypatch.setattr(conv_ops, "MIN_TILE_USE", 0)
    if request.param == "matrices":
        monkeypatch.setattr(tiling, "matrix_hardware", lambda device: True)
        monkeypatch.setattr(tiling, "MATRIX_POLICIES", {"highest", "high", "medium"})
        monkeypatch.setattr(tiling, "HIGHEST_MMA_MIN_MACS", 0)
    return request.param


def conv_case(data):
    """(x shape, w shape, attrs, bias?) drawn so that each family of kernels gets its shapes."""
    draw = lambda s, label: data.draw(s, label=label)  # noqa: E731
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (3, 3), (5, 5), (9, 9), (2, 9)]), "window")
    stride = draw(st.sampled_from([1, 1, 2]), "stride")
    cin = draw(st.sampled_from([1, 3, 9, 17]), "cin")
    cout = draw(st.sampled_from([1, 3, 8, 16, 17, 31, 33, 64, 65]), "cout")
    ph, pw = draw(st.integers(0, kh // 2), "pad_h"), draw(st.integers(0, kw // 2), "pad_w")
    h, w = (draw(st.sampled_from([1, 7, 8, 9, 16, 17, 33]), d) for d in "hw")
    h, w = max(h, kh - 2 * ph), max(w, kw - 2 * pw)
    n = draw(st.integers(1, 2), "n")
    attrs = dict(stride=(stride, stride), padding=(ph, pw), dilation=(1, 1), groups=1)
    return (n, cin, h, w), (cout, cin, kh, kw), attrs, draw(st.booleans(), "bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_fused_relu_is_relu_of_the_convolution_bit_for_bit(dev, kernels, dtype, data):
    x_shape, w_shape, attrs, with_bias = conv_case(data)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x, w, b = (rng.standard_normal(s).astype(np.float32).astype(dtype) for s in (x_shape, w_shape, (w_shape[0],)))
    args = [mm.tensor(a, dev) for a in ((x, w, b) if with_bias else (x, w))]
    with mm.matmul_precision("high" if kernels == "matrices" else "highest"):
        plain = mm.ops.conv2d(*args, **attrs)
        fused = mm.ops.conv2d(*args, **attrs, activation="relu").numpy()
        unfused = mm.ops.relu(plain).numpy()
    assert fused.dtype == dtype
    np.testing.assert_array_equal(bits(fused), bits(unfused))
    assert (plain.numpy() < 0).any() == (fused != plain.numpy()).any()  # the relu did something where it could
    # and what both compute is the reference's relu(conv + b), within the products' rounding
    ref = RC.conv2d(*(a.astype(np.float64) for a in ((x, w, b) if with_bias else (x, w))), **attrs, activation="relu")
    scale = RC.conv2d(*(np.abs(a.astype(np.float64)) for a in ((x, w, b) if with_bias else (x, w))), **attrs)
    u = 2.0**-8 if dtype == mm.bfloat16 or kernels == "matrices" else 2.0**-11 if dtype == np.float16 else 2.0**-23
    assert (np.abs(fused.astype(np.float64) - ref) <= (w_shape[1] * w_shape[2] * w_shape[3] + 2) * u * scale + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_relu_after_a_split_reduction(dev, dtype):
    """Few output tiles and a long reduction (a DCGAN discriminator's 64 → 128 channels, 4×4,
    stride 2, to 7×7) sum float slices; sum_splits applies the relu to their sum."""
    x_shape, w_shape, attrs = (3, 64, 14, 14), (128, 64, 4, 4), dict(stride=(2, 2), padding=(1, 1))
    tiles = conv_ops.groups_for(3 * 7 * 7, tiling.WIDE.cols)
    assert tiling.split_reduction(64 * 16, tiles, target=132, min_chunk=128)[0] > 1
    rng = np.random.default_rng(5)
    x, w, b = (mm.tensor(rng.standard_normal(s).astype(np.float32).astype(dtype), dev) for s in (x_shape, w_shape, (128,)))
    fused = mm.ops.conv2d(x, w, b, **attrs, activation="relu").numpy()
    unfused = mm.ops.relu(mm.ops.conv2d(x, w, b, **attrs)).numpy()
    np.testing.assert_array_equal(bits(fused), bits(unfused))
    assert (fused == 0).mean() > 0.3


def test_fused_relu_passes_nan_through_as_relu_does(dev):
    x = np.ones((1, 1, 3, 3), np.float32)
    x[0, 0, 1, 1] = np.nan
    w = np.ones((2, 1, 1, 1), np.float32)
    w[1] = -1
    y = mm.ops.conv2d(mm.tensor(x, dev), mm.tensor(w, dev), activation="relu").numpy()
    assert np.isnan(y[0, :, 1, 1]).all()
    np.testing.assert_array_equal(np.delete(y[0, 0].ravel(), 4), 1)
    np.testing.assert_array_equal(np.delete(y[0, 1].ravel(), 4), 0)


def mask_like(rng, shape, dtype):
    """A relu_grad mask: normals, a quarter of them 0, one NaN (which passes the gradient)."""
    m = rng.standard_normal(shape).astype(np.float32)
    m[rng.random(shape) < 0.25] = 0.0
    m.flat[rng.integers(m.size)] = np.nan
    return m.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_masked_input_gradient_is_relu_grad_of_it_bit_for_bit(dev, kernels, dtype, data):
    """conv2d_input_grad(g, w, mask): the direct 3×3 kernels apply the mask as they store; the
    other paths (k×k, the products, strided input gradients) run relu_grad after them in place."""
    x_shape, w_shape, attrs, _ = conv_case(data)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    y_shape = RC.conv2d(np.zeros(x_shape), np.zeros(w_shape), **attrs).shape
    g, w = (rng.standard_normal(s).astype(np.float32).astype(dtype) for s in (y_shape, w_shape))
    mask = mm.tensor(mask_like(rng, x_shape, dtype), dev)
    args = dict(attrs, input_size=x_shape[2:])
    with mm.matmul_precision("high" if kernels == "matrices" else "highest"):
        dx = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(w, dev), **args)
        fused = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(w, dev), mask, **args).numpy()
    unfused = mm.ops.relu_grad(dx, mask).numpy()
    assert fused.dtype == dtype
    np.testing.assert_array_equal(bits(fused), bits(unfused))
    assert ((mask.numpy() <= 0) & (dx.numpy() != 0)).any() == (fused != dx.numpy()).any()


def test_masked_input_gradient_after_a_split_reduction(dev):
    """The input gradient of a 64 → 128-channel 4×4 convolution of 8×8 images is a turned
    convolution summing 2048 terms over few tiles: split, then relu_grad after sum_splits."""
    rng = np.random.default_rng(2)
    g, w = rng.standard_normal((3, 128, 7, 7)).astype(np.float32), rng.standard_normal((128, 64, 4, 4)).astype(np.float32)
    mask = mm.tensor(mask_like(rng, (3, 64, 8, 8), np.float32), dev)
    attrs = dict(input_size=(8, 8), padding=(1, 1), stride=(1, 1))
    assert tiling.split_reduction(128 * 16, conv_ops.groups_for(3 * 64, tiling.WIDE.cols), target=132, min_chunk=128)[0] > 1
    dx = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(w, dev), **attrs)
    fused = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(w, dev), mask, **attrs).numpy()
    np.testing.assert_array_equal(bits(fused), bits(mm.ops.relu_grad(dx, mask).numpy()))
    ref = RC.conv2d_input_grad(g.astype(np.float64), w.astype(np.float64), mask.numpy().astype(np.float64), **attrs,
                               dilation=(1, 1), groups=1)
    np.testing.assert_allclose(fused, ref, rtol=1e-4, atol=1e-3)


def test_masked_input_gradient_checks_the_mask(dev):
    g, w = mm.tensor(np.zeros((1, 2, 6, 6), np.float32), dev), mm.tensor(np.zeros((2, 4, 3, 3), np.float32), dev)
    with pytest.raises(mm.ShapeError, match=r"mask must have the input's shape \(1, 4, 8, 8\), got \(1, 4, 8, 7\)"):
        mm.ops.conv2d_input_grad(g, w, mm.tensor(np.zeros((1, 4, 8, 7), np.float32), dev), input_size=(8, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cheap_barriers", [False, True])  # 32 threads a plane or up to 1024: planes in registers or not
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 3, 32, 33]), h=st.sampled_from([1, 7, 31, 32, 33, 70]),
       w=st.sampled_from([1, 5, 33]), seed=st.integers(0, 2**16))
def test_fused_relu_after_instance_norm_bit_for_bit(dev, monkeypatch, cheap_barriers, dtype, n, c, h, w, seed):
    monkeypatch.setattr(dev, "cheap_barriers", cheap_barriers)
    rng = np.random.default_rng(seed)
    x = mm.tensor(rng.standard_normal((n, c, h, w)).astype(np.float32).astype(dtype), dev)
    gamma, beta = (mm.tensor(rng.standard_normal(c).astype(np.float32), dev) for _ in range(2))
    fused = mm.ops.instance_norm(x, gamma, beta, activation="relu").numpy()
    plain = mm.ops.instance_norm(x, gamma, beta).numpy()
    unfused = mm.ops.relu(mm.tensor(plain, dev)).numpy()
    assert fused.dtype == dtype
    np.testing.assert_array_equal(bits(fused), bits(unfused))
    assert (plain < 0).any() == (fused != plain).any()


# ---------------------------------------------------------------- graphs

def network(g, dev, seed=0):
    """Four conv2d → relu pairs; c3's cannot fuse (its output is also added to the result: two
    readers), nor c4's in a plan that asks for its output t4."""
    rng = np.random.default_rng(seed)
    convs = [mm.nn.Conv2d(cin, cout, k, padding=k // 2, device=dev) for cin, cout, k in
             ((3, 8, 3), (8, 20, 3), (20, 20, 1), (20, 4, 5))]
    for c in convs:  # the same parameters every time
        c.weight.assign(rng.standard_normal(c.weight.shape) / np.sqrt(c.weight.size / c.weight.shape[0]))
        c.bias.assign(rng.standard_normal(c.bias.shape) * 0.1)
    x = g.input("x", (2, 3, 9, 11))
    a = mm.ops.relu(convs[0](x))
    b = mm.ops.relu(convs[1](a))
    t3 = convs[2](b)
    c = mm.ops.relu(t3) + t3
    t4 = convs[3](c)
    d = mm.ops.relu(t4)
    loss = (d * d).sum() + (b * b).sum()
    return convs, x, loss, t4, {"x": rng.standard_normal((2, 3, 9, 11)).astype(np.float32)}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_fused_training_graph_computes_what_the_unfused_one_does(dev, dtype):
    results = {}
    for fuse in (True, False):
        g = mm.Graph(dev, compute_dtype=dtype)
        g.fuse = fuse
        convs, x, loss, t4, inputs = network(g, dev)
        train = g.training_graph(loss)
        ops = [(n.op, n.attrs.get("activation") or len(n.inputs)) for n in train.plan().nodes]
        with_t4 = [(n.op, n.attrs.get("activation") or len(n.inputs)) for n in g.plan((loss, t4)).nodes]
        loss_value = train.step(**inputs)
        grads = [bits(p.grad.numpy()) for c in convs for p in (c.weight, c.bias)]
        temporaries = sum(t.nbytes for t in train.plan().slots)  # before tensors share buffers
        results[fuse] = (ops, with_t4, loss_value, grads, temporaries, g.run(inputs, outputs=[loss, t4]))
    (fused_ops, fused_t4, *fused), (plain_ops, plain_t4, *plain) = results[True], results[False]
    assert fused_ops.count(("conv2d", "relu")) == 3 and fused_ops.count(("relu", 1)) == 1
    assert fused_t4.count(("conv2d", "relu")) == 2 and fused_t4.count(("relu", 1)) == 2
    assert plain_ops.count(("conv2d", "relu")) == 0 and plain_ops.count(("relu", 1)) == 4
    # of the four relu_grads, a's follows a conv2d_input_grad alone; b's and d's follow the sum of
    # their two readers' gradients (relu_grad_add); t3's gradient is read by relu_grad and the sum for t3
    assert fused_ops.count(("conv2d_input_grad", 3)) == 1 and fused_ops.count(("relu_grad", 2)) == 1
    assert fused_ops.count(("relu_grad_add", 3)) == 2 and plain_ops.count(("relu_grad_add", 3)) == 0
    assert plain_ops.count(("conv2d_input_grad", 3)) == 0 and plain_ops.count(("relu_grad", 2)) == 4
    assert len(plain_ops) - len(fused_ops) == 6 and len(plain_t4) - len(fused_t4) == 2
    assert fused[0] == plain[0]
    for f, p in zip(fused[1], plain[1]):
        np.testing.assert_array_equal(f, p)
    assert fused[2] < plain[2]  # the values before their relus need no buffers
    for f, p in zip(fused[3], plain[3]):
        np.testing.assert_array_equal(bits(f), bits(p))


def test_fusion_leaves_the_tape_alone_and_each_plan_decides(dev):
    g = mm.Graph(dev)
    conv = mm.nn.Conv2d(3, 4, 3, padding=1, device=dev)
    x = g.input("x", (1, 3, 6, 6))
    t = conv(x)
    y = mm.ops.relu(t)
    inputs = {"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    only_y = g.plan((y,))
    assert [n.op for n in only_y.nodes] == ["conv2d"] and only_y.nodes[0].attrs["activation"] == "relu"
    both = g.plan((t, y))  # t is wanted itself: it must be written
    assert [n.op for n in both.nodes] == ["conv2d", "relu"]
    assert [n.op for n in g.nodes] == ["conv2d", "relu"] and "activation" not in g.nodes[0].attrs
    got_y, (got_t, got_y2) = g.run(inputs, outputs=[y])[0], g.run(inputs, outputs=[t, y])
    np.testing.assert_array_equal(got_y, np.maximum(got_t, 0))
    np.testing.assert_array_equal(got_y, got_y2)


def test_a_relu_under_another_predicate_is_not_fused(dev):
    flags = dev.buffer(np.array([0], np.uint32))
    g = mm.Graph(dev)
    conv = mm.nn.Conv2d(2, 2, 1, device=dev)
    x = g.input("x", (1, 2, 3, 3))
    t = conv(x)
    with g.predicated(mm.Predicate(flags, 0)):
        y = mm.ops.relu(t)
    assert [n.op for n in g.plan((y,)).nodes] == ["conv2d", "relu"]


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_conv_norm_relu_blocks_train_the_same_fused(dev, dtype):
    """Johnson's conv → instance_norm → relu blocks: the norm takes the relu; the conv's output,
    read by the norm and the norm's gradient, stays."""
    results = {}
    for fuse in (True, False):
        rng = np.random.default_rng(3)
        g = mm.Graph(dev, compute_dtype=dtype)
        g.fuse = fuse
        conv = mm.nn.Conv2d(3, 6, 3, padding=1, device=dev)
        norm = mm.nn.InstanceNorm2d(6, device=dev)
        conv.weight.assign(rng.standard_normal(conv.weight.shape) * 0.3)
        conv.bias.assign(rng.standard_normal(6) * 0.1)
        norm.weight.assign(rng.standard_normal(6) + 1)
        norm.bias.assign(rng.standard_normal(6) * 0.2)
        x = g.input("x", (2, 3, 10, 7))
        y = mm.ops.relu(norm(conv(x)))
        train = g.training_graph((y * y).sum())
        ops = [(n.op, n.attrs.get("activation")) for n in train.plan().nodes]
        loss = train.step(x=rng.standard_normal((2, 3, 10, 7)).astype(np.float32))
        results[fuse] = ops, loss, [bits(p.grad.numpy()) for p in (conv.weight, conv.bias, norm.weight, norm.bias)]
    assert ("instance_norm", "relu") in results[True][0] and ("relu", None) not in results[True][0]
    assert ("conv2d", None) in results[True][0] and ("relu", None) in results[False][0]
    # y's gradient is the sum of y·y's two parts: relu_grad_add; no conv2d_input_grad takes a mask
    assert ("relu_grad_add", None) in results[True][0] and ("relu_grad", None) not in results[True][0]
    assert ("relu_grad", None) in results[False][0] and ("relu_grad_add", None) not in results[False][0]
    assert results[True][1] == results[False][1]
    for f, p in zip(results[True][2], results[False][2]):
        np.testing.assert_array_equal(f, p)
