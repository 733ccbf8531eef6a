"""A small CNN classifier of the handwritten digits scikit-learn ships (8×8 images, 10 classes).

The classifier is a training graph derived from its inference graph; its last layer is a
convolution covering the whole 2×2 feature map, MPS's way of writing a fully connected
layer on images, so the logits stay NCHW and no reshape is needed.
"""

from __future__ import annotations

import numpy as np

import mlmetal as mm


def load_digits(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) in [0, 1], integer labels."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise RuntimeError("the handwritten digits ship with scikit-learn: pip install 'mlmetal[apps]' "
                           "(or pip install scikit-learn)") from None

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_fraction))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


class DigitsCNN(mm.nn.Module):
    """conv 3×3 → ReLU → max pool → conv 3×3 → ReLU → max pool → conv 2×2 to 10 logits."""

    def __init__(self, device=None, width: int = 16):
        self.body = mm.nn.Sequential(
            mm.nn.Conv2d(1, width, 3, padding=1, device=device), mm.nn.ReLU(), mm.nn.MaxPool2d(2),
            mm.nn.Conv2d(width, 2 * width, 3, padding=1, device=device), mm.nn.ReLU(), mm.nn.MaxPool2d(2),
            mm.nn.Conv2d(2 * width, 10, 2, device=device))

    def forward(self, x):
        return self.body(x)


def upscale(images: np.ndarray, size: int, device=None) -> np.ndarray:
    """Digits (N, 1, 8, 8) scaled bilinearly to size×size on the device (unchanged at 8)."""
    return images if size == 8 else mm.ops.upsample(mm.tensor(images, device), size // 8, mode="bilinear").numpy()


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.float32)[labels][:, :, None, None]


def train_digits(device=None, epochs: int = 12, batch: int = 64, lr: float = 3e-3, seed: int = 0,
                 progress: bool = True) -> dict:
    """Train DigitsCNN with Adam; returns {'accuracy': test accuracy, 'history': per-epoch records, 'net': the trained DigitsCNN}."""
    dev = mm.device(device) if not isinstance(device, mm.Device) else device
    mm.nn.seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits(seed)
    net = DigitsCNN(dev)

    g = mm.Graph(dev)
    x = g.input("x", (batch, 1, 8, 8))
    labels = g.input("labels", (batch, 10, 1, 1))
    loss = mm.ops.softmax_cross_entropy_loss(net(x), labels, reduction="mean")
    train = loss.training_graph(optimizer=mm.optim.Adam(net.parameters(), lr=lr))

    ev = mm.Graph(dev)
    ex = ev.input("x", (len(x_te), 1, 8, 8))
    logits = net(ex)

    rng = np.random.default_rng(seed)

    def batches(epoch):
        order = rng.permutation(len(x_tr))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield {"x": x_tr[idx], "labels": one_hot(y_tr[idx])}

    def validate():
        pred = ev.run({"x": x_te}, outputs=[logits])[0].reshape(len(x_te), 10).argmax(1)
        return {"accuracy": float((pred == y_te).mean())}

    history = mm.train.fit(train.step, batches, epochs, validate=validate, every=4, progress=progress)
    return {"accuracy": history[-1]["accuracy"], "history": history, "net": net}
