"""The layers of mm.nn beyond their ops: weight layouts and initialisation, train() and eval(),
dropout's masks (drawn on the device, seedable, fresh every run, the same in the gradient), and
the errors their constructors raise."""

import math

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.reference import conv_transpose as RT
from mlmetal.reference import norm as RN


def arr(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- ConvTranspose2d

def test_conv_transpose_has_pytorchs_layout_and_initialisation(dev):
    mm.nn.seed(0)
    layer = mm.nn.ConvTranspose2d(8, 12, (3, 5), stride=2, padding=1, output_padding=1, groups=4, device=dev)
    assert layer.weight.shape == (8, 3, 3, 5) and layer.bias.shape == (12,)
    bound = 1 / math.sqrt(3 * 3 * 5)  # fan_in: out_channels / groups · KH · KW, as PyTorch computes it
    for p in (layer.weight, layer.bias):
        v = p.numpy()
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound
    x = arr(np.random.default_rng(0), 2, 8, 4, 5)
    y = layer(mm.tensor(x, dev))
    want = RT.conv_transpose2d(x.astype(np.float64), layer.weight.numpy(), layer.bias.numpy(), stride=(2, 2),
                               padding=(1, 1), output_padding=(1, 1), dilation=(1, 1), groups=4)
    assert y.shape == want.shape == (2, 12, 8, 12)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_trains_its_weight_and_bias(dev):
    layer = mm.nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1, device=dev)
    g = mm.Graph(dev)
    y = layer(g.input("x", (2, 3, 5, 5)))
    loss = mm.ops.sum(mm.ops.mul(y, y))
    x = arr(np.random.default_rng(1), 2, 3, 5, 5)
    loss.training_graph().step(x=x)
    assert y.shape == (2, 2, 10, 10)
    out = layer(mm.tensor(x, dev))  # eagerly, the gradients the op's rule gives for dL/dy = 2y
    _, dw, db = mm.ops.REGISTRY["conv_transpose2d"].grad(
        mm.ops.scale(out, s=2.0), out, mm.tensor(x, dev), layer.weight, layer.bias, stride=(2, 2), padding=(1, 1),
        output_padding=(0, 0), dilation=(1, 1), groups=1)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dw.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad.numpy(), db.numpy(), rtol=1e-5, atol=1e-4)


def test_conv_transpose_without_bias(dev):
    layer = mm.nn.ConvTranspose2d(2, 4, 3, bias=False, device=dev)
    assert layer.bias is None and list(layer.named_parameters()) == ["weight"]
    assert layer(mm.tensor(np.ones((1, 2, 3, 3), np.float32), dev)).shape == (1, 4, 5, 5)


# ---------------------------------------------------------------- Dropout

def test_dropout_drops_a_fraction_p_and_scales_the_rest(dev):
    x = np.random.default_rng(2).uniform(1, 2, 100_000).astype(np.float32)
    p = 0.3
    y = mm.nn.Dropout(p)(mm.tensor(x, dev)).numpy()
    kept = y != 0
    # the dropped fraction is binomial: 5 standard deviations of it
    assert abs((1 - kept.mean()) - p) < 5 * math.sqrt(p * (1 - p) / x.size)
    np.testing.assert_allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)


def test_dropout_masks_follow_the_seed_or_the_generator(dev):
    x = mm.tensor(np.ones(4096, np.float32), dev)
    drop = mm.nn.Dropout(0.5)
    mm.nn.seed(7)
    first, second = drop(x).numpy(), drop(x).numpy()
    mm.nn.seed(7)
    np.testing.assert_array_equal(drop(x).numpy(), first)  # the seed restarts the stream
    assert not np.array_equal(first, second)  # each call a fresh mask
    own = mm.nn.Dropout(0.5, generator=mm.random.Philox(dev, seed=7))
    same = mm.nn.Dropout(0.5, generator=mm.random.Philox(dev, seed=7))
    np.testing.assert_array_equal(own(x).numpy(), same(x).numpy())
    mm.nn.seed(8)
    assert not np.array_equal(drop(x).numpy(), first)


def test_dropout_in_a_graph_draws_a_mask_every_run_and_backpropagates_through_it(dev):
    """loss = Σ mask·x·w/(1 − p), so dL/dw = mask·x/(1 − p) and loss = Σ w·dL/dw exactly when
    the gradient used the step's own mask; two steps draw two masks."""
    rng = np.random.default_rng(3)
    x, w0 = arr(rng, 64, 16), arr(rng, 64, 16)
    w = mm.nn.Parameter(w0, dev)
    g = mm.Graph(dev)
    loss = mm.ops.sum(mm.nn.Dropout(0.5)(mm.ops.mul(g.input("x", x.shape), w)))
    train = loss.training_graph()
    grads = []
    for _ in range(2):
        value = train.step(x=x)
        grad = w.grad.numpy()
        assert set(np.unique(np.round(grad[x != 0] / x[x != 0], 5))) <= {0.0, 2.0}
        np.testing.assert_allclose(value, (grad * w0).sum(), rtol=1e-4)
        grads.append(grad)
    assert not np.array_equal(grads[0], grads[1])


def test_dropout_is_the_identity_in_eval_mode_and_at_p_0(dev):
    x = mm.tensor(np.arange(5, dtype=np.float32), dev)
    assert mm.nn.Dropout(0.5).eval()(x) is x
    assert mm.nn.Dropout(0.0)(x) is x
    g = mm.Graph(dev)
    h = g.input("x", (5,))
    assert mm.nn.Dropout(0.5).eval()(h) is h and not g.nodes  # no mask drawn
    np.testing.assert_array_equal(mm.nn.Dropout(1.0)(x).numpy(), 0.0)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_refuses_a_p_outside_0_1(p):
    with pytest.raises(mm.ShapeError, match=rf"p must be a probability in \[0, 1\], got {p}"):
        mm.nn.Dropout(p)


# ---------------------------------------------------------------- train() and eval()

class Block(mm.nn.Module):
    def __init__(self, dev):
        self.norm = mm.nn.BatchNorm2d(3, device=dev)
        self.stages = [mm.nn.Sequential(mm.nn.Dropout(0.5)), mm.nn.ReLU()]

    def forward(self, x):
        for m in self.stages:
            x = m(x)
        return self.norm(x)


def test_train_and_eval_reach_every_submodule(dev):
    net = mm.nn.Sequential(Block(dev), (shared := mm.nn.Dropout(0.2)), shared)
    kinds = [type(m).__name__ for m in net.modules()]
    assert sorted(kinds) == sorted(["Sequential", "Block", "BatchNorm2d", "Sequential", "Dropout", "ReLU", "Dropout"])
    assert net.eval() is net and not any(m.training for m in net.modules())
    assert net.train() is net and all(m.training for m in net.modules())
    net.train(False)
    assert not net.layers[0].stages[0].layers[0].training


def test_batch_norm_follows_train_and_eval(dev):
    rng = np.random.default_rng(4)
    x = arr(rng, 4, 3, 5, 5) * 2 + 1
    norm = mm.nn.BatchNorm2d(3, device=dev)
    norm(mm.tensor(x, dev))  # training: batch statistics, running ones updated
    mean, var = norm.running_mean.numpy(), norm.running_var.numpy()
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    y = norm.eval()(mm.tensor(x, dev)).numpy()
    want = (x - mean.reshape(1, 3, 1, 1)) / np.sqrt(var.reshape(1, 3, 1, 1) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(norm.running_mean.numpy(), mean)  # evaluation leaves them


# ---------------------------------------------------------------- GroupNorm, LayerNorm

def test_group_and_layer_norm_modules(dev):
    rng = np.random.default_rng(5)
    x = arr(rng, 2, 6, 4, 3) * 3 + 2
    gn = mm.nn.GroupNorm(3, 6, device=dev)
    gn.weight.assign(arr(rng, 6))
    assert list(gn.named_parameters()) == ["weight", "bias"]
    np.testing.assert_allclose(gn(mm.tensor(x, dev)).numpy(),
                               RN.group_norm(x.astype(np.float64), gn.weight.numpy(), np.zeros(6), 3, 1e-5),
                               rtol=1e-4, atol=1e-4)
    ln = mm.nn.LayerNorm((4, 3), eps=1e-3, device=dev)
    assert ln.weight.shape == (4, 3)
    np.testing.assert_allclose(ln(mm.tensor(x, dev)).numpy(),
                               RN.layer_norm(x.astype(np.float64), np.ones((4, 3)), np.zeros((4, 3)), 1e-3),
                               rtol=1e-4, atol=1e-4)
    assert mm.nn.LayerNorm(3, device=dev).weight.shape == (3,)


def test_group_norm_with_a_group_per_channel_is_instance_norm(dev):
    x = mm.tensor(arr(np.random.default_rng(6), 2, 4, 5, 5), dev)
    np.testing.assert_allclose(mm.nn.GroupNorm(4, 4, device=dev)(x).numpy(),
                               mm.nn.InstanceNorm2d(4, device=dev)(x).numpy(), rtol=1e-5, atol=1e-6)


def test_norms_without_affine_have_no_parameters(dev):
    x = arr(np.random.default_rng(7), 2, 4, 3)
    for layer, ref in [(mm.nn.GroupNorm(2, 4, affine=False, device=dev),
                        RN.group_norm(x.astype(np.float64), np.ones(4), np.zeros(4), 2, 1e-5)),
                       (mm.nn.LayerNorm(3, elementwise_affine=False, device=dev),
                        RN.layer_norm(x.astype(np.float64), np.ones(3), np.zeros(3), 1e-5))]:
        assert layer.named_parameters() == {}
        np.testing.assert_allclose(layer(mm.tensor(x, dev)).numpy(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Flatten, AdaptiveAvgPool2d, GELU, SiLU

def test_flatten_pool_and_activation_layers(dev):
    x = arr(np.random.default_rng(8), 2, 3, 4, 5)
    t = mm.tensor(x, dev)
    assert mm.nn.Flatten()(t).shape == (2, 60)
    assert mm.nn.Flatten(0, 1)(t).shape == (6, 4, 5)
    pooled = mm.nn.AdaptiveAvgPool2d((1, 1))(t)
    assert pooled.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(pooled.numpy(), x.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mm.nn.GELU()(t).numpy(), mm.ops.gelu(t).numpy())
    np.testing.assert_array_equal(mm.nn.SiLU()(t).numpy(), mm.ops.silu(t).numpy())


@pytest.mark.parametrize("make, message", [
    (lambda: mm.nn.AdaptiveAvgPool2d(7), "only output_size 1 .* got 7"),
    (lambda: mm.nn.AdaptiveAvgPool2d((1, 2)), r"only output_size 1 .* got \(1, 2\)"),
    (lambda: mm.nn.ConvTranspose2d(4, 6, 3, groups=4), "out_channels 6 must both be divisible by groups=4"),
    (lambda: mm.nn.GroupNorm(4, 6), "num_channels 6 must be divisible by num_groups=4"),
])
def test_layer_construction_errors(make, message):
    with pytest.raises(mm.ShapeError, match=message):
        make()
