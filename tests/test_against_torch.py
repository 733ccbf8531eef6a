"""Ops that promise PyTorch's semantics, checked against PyTorch itself where it is installed.

The float64 references define every op; this file checks that the references (and so the
kernels) mean what PyTorch means by the same name: padding, dilation, groups, pooling
windows, align_corners=False upsampling, biased/unbiased variances, optimizer updates, and where a
NaN goes.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlmetal as mm

torch = pytest.importorskip("torch", reason="PyTorch is optional: these tests compare semantics with it")
F = torch.nn.functional


def arr(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(ours, theirs, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=rtol, atol=atol)


@given(seed=st.integers(0, 2**31), stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3]), bias=st.booleans())
def test_conv2d(dev, seed, stride, padding, dilation, groups, k, bias):
    rng = np.random.default_rng(seed)
    x, w, b = arr(rng, 2, 4, 9, 7), arr(rng, 6, 4 // groups, k, k), arr(rng, 6)
    ours = mm.ops.conv2d(mm.tensor(x, dev), mm.tensor(w, dev), mm.tensor(b, dev) if bias else None,
                         stride=stride, padding=padding, dilation=dilation, groups=groups)
    theirs = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if bias else None,
                      stride=stride, padding=padding, dilation=dilation, groups=groups)
    close(ours, theirs)


@given(seed=st.integers(0, 2**31), kernel=st.integers(1, 3), stride=st.sampled_from([None, 1, 2]),
       padding=st.integers(0, 1))
def test_pooling(dev, seed, kernel, stride, padding):
    padding = min(padding, kernel // 2)
    x = arr(np.random.default_rng(seed), 2, 3, 7, 6)
    xt = mm.tensor(x, dev)
    close(mm.ops.max_pool2d(xt, kernel, stride=stride, padding=padding),
          F.max_pool2d(torch.from_numpy(x), kernel, stride=stride, padding=padding))
    close(mm.ops.avg_pool2d(xt, kernel, stride=stride, padding=padding),
          F.avg_pool2d(torch.from_numpy(x), kernel, stride=stride, padding=padding))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsample(dev, mode):
    x = arr(np.random.default_rng(0), 2, 3, 5, 4)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    close(mm.ops.upsample(mm.tensor(x, dev), 2, mode=mode), F.interpolate(torch.from_numpy(x), scale_factor=2, mode=mode, **kw))


def test_instance_and_batch_norm(dev):
    rng = np.random.default_rng(1)
    x, g, b = arr(rng, 3, 4, 5, 6) * 3 + 1, arr(rng, 4), arr(rng, 4)
    close(mm.ops.instance_norm(*(mm.tensor(a, dev) for a in (x, g, b)), eps=1e-5),
          F.instance_norm(torch.from_numpy(x), weight=torch.from_numpy(g), bias=torch.from_numpy(b), eps=1e-5))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    mean_t, var_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    rm_ours, rv_ours = mm.tensor(rm, dev), mm.tensor(rv, dev)
    ours = mm.ops.batch_norm(*(mm.tensor(a, dev) for a in (x, g, b)), rm_ours, rv_ours, training=True, momentum=0.1, eps=1e-5)
    theirs = F.batch_norm(torch.from_numpy(x), mean_t, var_t, torch.from_numpy(g), torch.from_numpy(b),
                          training=True, momentum=0.1, eps=1e-5)
    close(ours[0] if isinstance(ours, tuple) else ours, theirs)
    np.testing.assert_allclose(rm_ours.numpy(), mean_t.numpy(), rtol=1e-5, atol=1e-6)  # running stats, unbiased variance
    np.testing.assert_allclose(rv_ours.numpy(), var_t.numpy(), rtol=1e-5, atol=1e-6)



def grads_of(op, dev, inputs, g, **attrs):
    """mlmetal's output and gradient rule's results of op on `inputs` for dL/dout = g."""
    ts = [mm.tensor(a, dev) for a in inputs]
    out = getattr(mm.ops, op)(*ts, **attrs)
    return out, mm.ops.REGISTRY[op].grad(mm.tensor(g, dev), out, *ts, **mm.ops.infer(op, *ts, **attrs)[1])


@pytest.mark.parametrize("op", ["group_norm", "layer_norm"])
def test_group_and_layer_norm(dev, op):
    rng = np.random.default_rng(11)
    x = arr(rng, 3, 6, 5, 4) * 3 + 1
    shape = (6,) if op == "group_norm" else (5, 4)
    gamma, beta, g = arr(rng, *shape), arr(rng, *shape), arr(rng, *x.shape)
    attrs = {"num_groups": 3} if op == "group_norm" else {}
    out, grads = grads_of(op, dev, [x, gamma, beta], g, eps=1e-5, **attrs)
    xt, gt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, gamma, beta))
    theirs = (F.group_norm(xt, 3, gt, bt, eps=1e-5) if op == "group_norm"
              else F.layer_norm(xt, shape, gt, bt, eps=1e-5))
    theirs.backward(torch.from_numpy(g))
    close(out, theirs)
    for ours, t in zip(grads, (xt, gt, bt)):
        np.testing.assert_allclose(ours.numpy(), t.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_conv_transpose_module(dev):
    """mm.nn.ConvTranspose2d with torch.nn.ConvTranspose2d's weights gives its output and gradients,
    and draws its initial weights from the same range."""
    torch.manual_seed(0)
    theirs = torch.nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2)
    ours = mm.nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2,
                                 device=dev)
    assert ours.weight.shape == tuple(theirs.weight.shape)
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(theirs.weight)
    assert np.abs(ours.weight.numpy()).max() <= 1 / np.sqrt(fan_in)
    ours.weight.assign(theirs.weight.detach().numpy())
    ours.bias.assign(theirs.bias.detach().numpy())
    rng = np.random.default_rng(12)
    x = arr(rng, 2, 4, 5, 6)
    xt = torch.from_numpy(x).requires_grad_()
    y_t = theirs(xt)
    g = arr(rng, *y_t.shape)
    y_t.backward(torch.from_numpy(g))
    y = ours(mm.tensor(x, dev))
    close(y, y_t)
    dx, dw, db = mm.ops.REGISTRY["conv_transpose2d"].grad(
        mm.tensor(g, dev), y, mm.tensor(x, dev), ours.weight, ours.bias,
        **mm.ops.infer("conv_transpose2d", mm.tensor(x, dev), ours.weight, ours.bias, stride=(2, 1), padding=(1, 0),
                       output_padding=(1, 0), groups=2)[1])
    for a, t in [(dx, xt.grad), (dw, theirs.weight.grad), (db, theirs.bias.grad)]:
        np.testing.assert_allclose(a.numpy(), t.numpy(), rtol=1e-4, atol=1e-4)

def test_losses(dev):
    rng = np.random.default_rng(2)
    y, t = arr(rng, 4, 5), arr(rng, 4, 5)
    yt, tt = torch.from_numpy(y), torch.from_numpy(t)
    Y, T = mm.tensor(y, dev), mm.tensor(t, dev)
    close(mm.ops.mse_loss(Y, T, reduction="mean"), F.mse_loss(yt, tt).reshape(1))
    close(mm.ops.mae_loss(Y, T, reduction="sum"), F.l1_loss(yt, tt, reduction="sum").reshape(1))
    close(mm.ops.huber_loss(Y, T, reduction="mean", delta=0.7), F.huber_loss(yt, tt, delta=0.7).reshape(1))
    labels = np.eye(5, dtype=np.float32)[[0, 3, 1, 4]]
    close(mm.ops.softmax_cross_entropy_loss(Y, mm.tensor(labels, dev), reduction="mean", label_smoothing=0.1),
          F.cross_entropy(yt, torch.tensor([0, 3, 1, 4]), label_smoothing=0.1).reshape(1))
    probs = 1 / (1 + np.exp(-t))
    close(mm.ops.sigmoid_cross_entropy_loss(Y, mm.tensor(probs, dev), reduction="mean"),
          F.binary_cross_entropy_with_logits(yt, torch.from_numpy(probs)).reshape(1))


@pytest.mark.parametrize("make", [
    lambda ps: (mm.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01), lambda tp: torch.optim.SGD(tp, lr=0.1, momentum=0.9, weight_decay=0.01)),
    lambda ps: (mm.optim.Adam(ps, lr=0.01, weight_decay=0.01), lambda tp: torch.optim.Adam(tp, lr=0.01, weight_decay=0.01)),
])
def test_optimizers_follow_torch(dev, make):
    rng = np.random.default_rng(3)
    w0 = arr(rng, 6, 5)
    ours = mm.nn.Parameter(w0.copy(), dev)
    theirs = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt, make_torch = make([ours])
    topt = make_torch([theirs])
    for step in range(5):
        g = arr(rng, 6, 5)
        ours.grad = mm.tensor(g, dev)
        opt.step()
        theirs.grad = torch.from_numpy(g)
        topt.step()
    np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_linear_and_gram(dev):
    rng = np.random.default_rng(4)
    x, w, b = arr(rng, 3, 7), arr(rng, 5, 7), arr(rng, 5)
    close(mm.ops.linear(*(mm.tensor(a, dev) for a in (x, w, b))), F.linear(*map(torch.from_numpy, (x, w, b))))
    f = arr(rng, 2, 4, 3, 5)
    ft = torch.from_numpy(f).reshape(2, 4, 15)
    close(mm.ops.gram(mm.tensor(f, dev), alpha=1 / 15), ft @ ft.transpose(1, 2) / 15)


NAN_OPS = [  # (op, attributes, PyTorch's function of the input (and labels))
    ("relu", {}, torch.relu),
    ("leaky_relu", {"slope": 0.1}, lambda x: F.leaky_relu(x, 0.1)),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("softmax", {}, lambda x: torch.softmax(x, 1)),
    ("max_pool2d", {"kernel": 2}, lambda x: F.max_pool2d(x, 2)),
    ("max_pool2d", {"kernel": 3, "stride": 1, "padding": 1}, lambda x: F.max_pool2d(x, 3, 1, 1)),
    ("avg_pool2d", {"kernel": 2}, lambda x: F.avg_pool2d(x, 2)),
    ("upsample", {"scale": 2, "mode": "nearest"}, lambda x: F.interpolate(x, scale_factor=2, mode="nearest")),
    ("upsample", {"scale": 2, "mode": "bilinear"},
     lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)),
    ("mse_loss", {"reduction": "none"}, lambda y, t: F.mse_loss(y, t, reduction="none")),
    ("mae_loss", {"reduction": "none"}, lambda y, t: F.l1_loss(y, t, reduction="none")),
    ("huber_loss", {"reduction": "none", "delta": 0.5}, lambda y, t: F.huber_loss(y, t, reduction="none", delta=0.5)),
    ("sigmoid_cross_entropy_loss", {"reduction": "mean"},
     lambda y, t: F.binary_cross_entropy_with_logits(y, t).reshape(1)),
    ("softmax_cross_entropy_loss", {"reduction": "sum"}, lambda y, t: F.cross_entropy(y, t, reduction="sum").reshape(1)),
]


@pytest.mark.parametrize("op, attrs, theirs", NAN_OPS, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(NAN_OPS)])
@pytest.mark.parametrize("where", [0, 5, 37])
def test_nan_propagates_as_in_torch(dev, op, attrs, theirs, where):
    """A NaN in the input gives NaN in the output and in the input's gradient exactly where PyTorch's does."""
    rng = np.random.default_rng(where)
    x = arr(rng, 2, 3, 4, 4)
    x.flat[where] = np.nan
    inputs = [x] + ([rng.uniform(0, 1, x.shape).astype(np.float32)] if "loss" in op else [])
    xt = [torch.from_numpy(a).requires_grad_(i == 0) for i, a in enumerate(inputs)]
    out_t = theirs(*xt)
    g = arr(rng, *out_t.shape)
    out_t.backward(torch.from_numpy(g))

    ts = [mm.tensor(a, dev) for a in inputs]
    out = getattr(mm.ops, op)(*ts, **attrs)
    grad = mm.ops.REGISTRY[op].grad(mm.tensor(g, dev), out, *ts, **mm.ops.infer(op, *ts, **attrs)[1])[0]
    np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), rtol=1e-4, atol=1e-5)  # NaN where theirs is
    np.testing.assert_allclose(grad.numpy(), xt[0].grad.numpy(), rtol=1e-4, atol=1e-5)
