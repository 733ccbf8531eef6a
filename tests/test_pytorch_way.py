"""A small model written the PyTorch way — parameters as module attributes, a forward pass of
operators, broadcasting and reductions, `loss = ((y - t) ** 2).mean()` — trains, and its
gradients match the same model's in float64 (NumPy, differentiated by central differences).
"""

from types import SimpleNamespace

import numpy as np

import mlmetal as mm
from mlmetal.nn import Parameter
from mlmetal.reference.conv_transpose import conv_transpose2d as conv_transpose2d_f64
from opcheck import finite_difference

RNG = np.random.default_rng(2024)
EPS = 1e-5  # the layer norm's


def forward(m, x):
    """Linear, a layer norm written out, tanh, linear: nothing but operators and methods."""
    h = x @ m.w1 + m.b1  # (N, 8) + (8,): broadcast
    h = (h - h.mean(axis=1, keepdims=True)) / (h.var(axis=1, keepdims=True, correction=0) + EPS).sqrt()
    h = (h * m.gain).tanh()
    return h @ m.w2 + m.b2


class Net(mm.nn.Module):
    def __init__(self, params: dict, dev):
        for name, value in params.items():
            setattr(self, name, Parameter(value, dev))

    forward = forward


def net_f64(p, x):
    h = x @ p["w1"] + p["b1"]
    h = (h - h.mean(axis=1, keepdims=True)) / np.sqrt(h.var(axis=1, keepdims=True) + EPS)
    return np.tanh(h * p["gain"]) @ p["w2"] + p["b2"]


def loss_f64(p, x, t):
    return ((net_f64(p, x) - t) ** 2).mean()


def init():
    shapes = {"w1": (4, 8), "b1": (8,), "gain": (8,), "w2": (8, 3), "b2": (3,)}
    params = {k: (RNG.standard_normal(s) * 0.5).astype(np.float32) for k, s in shapes.items()}
    params["gain"] += 1
    return params


def gradients_f64(p, x, t):
    names = list(p)
    values = [p[k].astype(np.float64) for k in names]
    f = lambda vs: loss_f64(dict(zip(names, vs)), x, t)  # noqa: E731
    return {k: finite_difference(f, values, i, 1e-6) for i, k in enumerate(names)}


def test_small_model_trains_and_matches_float64_gradients(dev):
    x = RNG.standard_normal((16, 4)).astype(np.float32)
    t = np.tanh(x @ RNG.standard_normal((4, 3))).astype(np.float32)  # a target the model can approach
    p0 = init()
    net = Net(p0, dev)
    g = mm.Graph(dev)
    loss = ((net(g.input("x", x.shape)) - g.input("t", t.shape)) ** 2).mean()
    lr = 0.2
    train = loss.training_graph(optimizer=mm.optim.SGD(net.parameters(), lr=lr))

    # the first step's gradients, at the initial parameters, against float64
    first = train.step(x=x, t=t)
    expected = gradients_f64(p0, x, t)
    np.testing.assert_allclose(first, loss_f64({k: v.astype(np.float64) for k, v in p0.items()}, x, t), rtol=1e-5)
    for name, p in net.named_parameters().items():
        np.testing.assert_allclose(p.grad.numpy(), expected[name], rtol=1e-3, atol=1e-5, err_msg=name)

    # training: the same steps of SGD in float64 follow the same path (a step returns the loss
    # before its update)
    p64 = {k: v.astype(np.float64) for k, v in p0.items()}
    losses, losses64 = [], []
    for step in range(40):
        losses.append(first if step == 0 else train.step(x=x, t=t))
        losses64.append(loss_f64(p64, x, t))
        for k, gk in (expected if step == 0 else gradients_f64(p64, x, t)).items():
            p64[k] -= lr * gk
    assert losses[-1] < 0.25 * losses[0], losses
    np.testing.assert_allclose(losses, losses64, rtol=1e-4)
    for name, p in net.named_parameters().items():
        np.testing.assert_allclose(p.numpy(), p64[name], rtol=1e-3, atol=1e-4, err_msg=name)


def test_value_and_grad_of_the_same_loss(dev):
    """The functional way (mm.value_and_grad, MLX's) gives the same gradients."""
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    t = RNG.standard_normal((5, 3)).astype(np.float32)
    p0 = init()
    names = list(p0)

    def loss(x, t, *params):
        return ((forward(SimpleNamespace(**dict(zip(names, params))), x) - t) ** 2).mean()

    value, grads = mm.value_and_grad(loss, argnums=tuple(range(2, 2 + len(names))))(x, t, *p0.values())
    expected = gradients_f64(p0, x, t)
    np.testing.assert_allclose(value.numpy(), loss_f64({k: v.astype(np.float64) for k, v in p0.items()}, x, t),
                               rtol=1e-5)
    for name, got in zip(names, grads):
        np.testing.assert_allclose(got.numpy(), expected[name], rtol=1e-3, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- layers from mm.nn

class Decoder(mm.nn.Module):
    """A transposed convolution (mm.nn.ConvTranspose2d, its bias broadcast by the layer), dropout,
    ReLU, and global average pooling by `mean`."""

    def __init__(self, w, b, dev):
        self.up = mm.nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1, device=dev)
        self.up.weight.assign(w)
        self.up.bias.assign(b)
        self.drop = mm.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.up(x)).relu().mean(axis=(2, 3))


def test_decoder_gradients_match_float64(dev):
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = RNG.standard_normal((2, 2)).astype(np.float32)
    w = (RNG.standard_normal((3, 2, 4, 4)) * 0.3).astype(np.float32)
    b = (RNG.standard_normal(2) * 0.1).astype(np.float32)
    net = Decoder(w, b, dev)
    net.eval()  # dropout is the identity: the float64 model has none
    g = mm.Graph(dev)
    loss = ((net(g.input("x", x.shape)) - mm.tensor(t, dev)) ** 2).mean()
    value = loss.training_graph().step(x=x)

    def f64(vs):
        y = conv_transpose2d_f64(x.astype(np.float64), vs[0], vs[1], stride=(2, 2), padding=(1, 1),
                                 output_padding=(0, 0), dilation=(1, 1), groups=1)
        return ((np.maximum(y, 0).mean(axis=(2, 3)) - t) ** 2).mean()

    params = [w.astype(np.float64), b.astype(np.float64)]
    np.testing.assert_allclose(value, f64(params), rtol=1e-5)
    for i, p in enumerate((net.up.weight, net.up.bias)):
        np.testing.assert_allclose(p.grad.numpy(), finite_difference(f64, params, i, 1e-6), rtol=1e-3, atol=1e-6)


def test_decoder_trains_with_dropout(dev):
    """In train() mode the same decoder drops about half its activations, and still learns."""
    x = RNG.standard_normal((8, 3, 4, 4)).astype(np.float32)
    t = np.abs(RNG.standard_normal((8, 2))).astype(np.float32)
    net = Decoder((RNG.standard_normal((3, 2, 4, 4)) * 0.3).astype(np.float32), np.zeros(2, np.float32), dev)
    net.train()
    up = net.up(mm.tensor(x, dev)).numpy()
    kept = net.drop(mm.tensor(up, dev)).numpy()
    dropped = np.mean(kept == 0)
    assert 0.4 < dropped < 0.6, dropped
    np.testing.assert_allclose(kept[kept != 0], 2 * up[kept != 0], rtol=1e-6)  # the rest scaled by 1/(1 − p)
    g = mm.Graph(dev)
    loss = ((net(g.input("x", x.shape)) - mm.tensor(t, dev)) ** 2).mean()
    train = loss.training_graph(optimizer=mm.optim.Adam(net.parameters(), lr=0.05))
    losses = [train.step(x=x) for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
