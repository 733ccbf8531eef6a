"""Style transfer: a transformer network learns to repaint a content image in the colours and textures of a style image.

The talk's demonstration in small (Johnson et al.'s feed-forward style transfer). A
transformer network — convolutions, instance norm, residual blocks and ×2 upsampling —
maps the content image to a stylised image. A fixed VGG-like loss network scores it:

- style loss: at several layers, the squared distance between the Gram matrices of the
  output's features and the style image's (α = 1/(H·W), as in Apple's own code), so the
  textures match wherever they sit in the image;
- content loss: at one deeper layer, the squared distance between the output's features and
  the content image's, so the layout survives. The content features are `stop_gradient`:
  they are a target, not something to train.

The loss network is frozen. Its weights come from a `.safetensors` file when one is given
(see LOSS_LAYERS for the names), otherwise they are fixed random filters from a seed:
random ReLU features still make Gram matrices that tell textures apart, and the pooling
between stages makes them multi-scale.

With no images given, both are generated here (no downloads): colourful waves and stripes
with noise for the style, shapes on a gradient for the content.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import mlmetal as mm
from mlmetal.apps.images import to_image
from mlmetal.cli import announce_autocast, autocast_note, existing_file, integer, loss_scaler, number

# The loss network: (name, output channels of the random default) per 3×3 convolution + ReLU,
# "pool" for a 2×2 average pool. A `--loss-weights` file holds `<name>.weight` (out, in, 3, 3)
# and `<name>.bias` (out,) for each convolution; its shapes set the channel counts.
LOSS_LAYERS = [("conv1_1", 16), ("conv1_2", 16), "pool", ("conv2_1", 32), ("conv2_2", 32), "pool", ("conv3_1", 64)]
STYLE_LAYERS = ("conv1_1", "conv2_1", "conv3_1")
CONTENT_LAYER = "conv2_2"


# ---------------------------------------------------------------- images

def default_style(size: int, seed: int = 0) -> np.ndarray:
    """A procedural style image (3, size, size) in [0, 1]: colourful diagonal waves over a checker, with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    waves = np.sin(2 * np.pi * (6 * (x + y) + 0.5 * np.sin(2 * np.pi * 3 * y)))
    checker = ((np.floor(8 * x) + np.floor(8 * y)) % 2) * 2 - 1
    phase = np.array([0.0, 2.1, 4.2])[:, None, None]  # one phase per channel: the bands change colour
    img = 0.5 + 0.35 * np.sin(3 * waves + phase) + 0.1 * checker + 0.08 * rng.standard_normal((3, size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def default_content(size: int) -> np.ndarray:
    """A procedural content image (3, size, size) in [0, 1]: a disc, a square and a bar on a sky-like gradient."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.3 + 0.4 * y, 0.5 + 0.3 * y, 0.9 - 0.3 * y])
    disc = (x - 0.32) ** 2 + (y - 0.35) ** 2 < 0.18 ** 2
    square = (np.abs(x - 0.68) < 0.17) & (np.abs(y - 0.62) < 0.17)
    bar = (y > 0.85) & (y < 0.95)
    for mask, colour in ((disc, (0.95, 0.85, 0.2)), (square, (0.8, 0.15, 0.15)), (bar, (0.1, 0.35, 0.1))):
        img[:, mask] = np.array(colour)[:, None]
    return img.astype(np.float32)


def load_image(path, size: int) -> np.ndarray:
    """Any image Pillow reads, as RGB (3, size, size) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.LANCZOS)
        return (np.asarray(im, np.float32) / 255).transpose(2, 0, 1).copy()


def save_image(img: np.ndarray, path) -> None:
    """Write (3, H, W) in [0, 1] as a PNG."""
    to_image(img).save(path)


# ---------------------------------------------------------------- networks

class Residual(mm.nn.Module):
    """x + (conv, instance norm, ReLU, conv, instance norm)(x): a block that can start as the identity."""

    def __init__(self, channels: int, device=None):
        self.body = mm.nn.Sequential(
            mm.nn.Conv2d(channels, channels, 3, padding=1, device=device), mm.nn.InstanceNorm2d(channels, device=device),
            mm.nn.ReLU(),
            mm.nn.Conv2d(channels, channels, 3, padding=1, device=device), mm.nn.InstanceNorm2d(channels, device=device))

    def forward(self, x):
        return x + self.body(x)


class Transformer(mm.nn.Module):
    """(N, 3, H, W) → conv → stride-2 convs → residual blocks → ×2 upsample + conv stages → conv + sigmoid →
    (N, 3, H, W) in [0, 1].

    The defaults are the app's small network; `Transformer(width=32, blocks=5, stages=2, outer_kernel=9)`
    is Johnson et al.'s (with nearest upsampling and a convolution for each transposed convolution).
    """

    def __init__(self, device=None, width: int = 16, blocks: int = 2, stages: int = 1, outer_kernel: int = 3):
        def conv_norm_relu(cin, cout, stride=1, kernel=3):
            return [mm.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, device=device),
                    mm.nn.InstanceNorm2d(cout, device=device), mm.nn.ReLU()]

        widths = [width * 2**i for i in range(stages + 1)]
        self.body = mm.nn.Sequential(
            *conv_norm_relu(3, width, kernel=outer_kernel),
            *(m for cin, cout in zip(widths, widths[1:]) for m in conv_norm_relu(cin, cout, stride=2)),
            *(Residual(widths[-1], device) for _ in range(blocks)),
            *(m for cin, cout in zip(widths[::-1], widths[-2::-1]) for m in (mm.nn.Upsample(2), *conv_norm_relu(cin, cout))),
            mm.nn.Conv2d(width, 3, outer_kernel, padding=outer_kernel // 2, device=device), mm.nn.Sigmoid())

    def forward(self, x):
        return self.body(x)


class LossNetwork(mm.nn.Module):
    """The frozen VGG-like feature extractor: `features(x)` returns {layer name: ReLU output}."""

    def __init__(self, device=None, weights: dict[str, np.ndarray] | None = None, layers=LOSS_LAYERS):
        self.layers = list(layers)  # (name, channels) per convolution, "pool" between stages
        cin = 3
        for layer in self.layers:
            if layer == "pool":
                continue
            name, cout = layer
            if weights is not None:
                cout = weights[f"{name}.weight"].shape[0]
            conv = mm.nn.Conv2d(cin, cout, 3, padding=1, device=device)
            if weights is not None:
                conv.weight.assign(weights[f"{name}.weight"])
                conv.bias.assign(weights[f"{name}.bias"])
            else:
                # He's scale (√6 × the default bound): ReLU features keep their size from layer to
                # layer instead of shrinking, so the losses are not lost under Adam's ε.
                conv.weight.assign(conv.weight.numpy() * np.sqrt(6))
            setattr(self, name, conv)  # a plain attribute, so its parameters are named `conv1_1.weight`...
            cin = cout
        self.freeze()

    def features(self, x) -> dict:
        out, h = {}, x
        for layer in self.layers:
            if layer == "pool":
                h = mm.ops.avg_pool2d(h, 2)
            else:
                h = out[layer[0]] = mm.ops.relu(getattr(self, layer[0])(h))
        return out


def read_loss_weights(path) -> dict[str, np.ndarray]:
    """The loss network's weights from a .safetensors file, every name of LOSS_LAYERS checked."""
    from safetensors.numpy import load_file

    weights = load_file(str(path))
    names = [f"{layer[0]}.{p}" for layer in LOSS_LAYERS if layer != "pool" for p in ("weight", "bias")]
    missing = [n for n in names if n not in weights]
    if missing:
        raise SystemExit(f"mlmetal style: {path} lacks {', '.join(missing)} (it needs {', '.join(names)})")
    return {n: weights[n].astype(np.float32) for n in names}


# ---------------------------------------------------------------- training

class StyleTransfer:
    """The transformer, the frozen loss network and the training graph that joins them.

    Args:
        device: a Device.
        style, content: images (3, H, W) in [0, 1], the same size; H and W even.
        style_weight, content_weight: the two losses' weights in the total.
        lr: Adam's learning rate.
        loss_weights: {name: array} for the loss network (see LOSS_LAYERS); None draws random filters.
        autocast: None, or "bfloat16" / "float16": the losses' graph's compute_dtype (mm.autocast).

    Example:
        >>> st = StyleTransfer(mm.device("cpu"), default_style(64), default_content(64))
        >>> total = st.step()
        >>> style_loss, content_loss, image = st.measure()
    """

    def __init__(self, device, style: np.ndarray, content: np.ndarray, style_weight: float = 30.0,
                 content_weight: float = 1.0, lr: float = 1e-2, loss_weights=None, autocast=None):
        self.device = device
        self.content = content[None]
        self.transformer = Transformer(device)
        self.loss_net = LossNetwork(device, loss_weights)

        # The style targets: the style image's Gram matrices, computed once.
        g = mm.Graph(device)
        feats = self.loss_net.features(g.input("style", (1, *style.shape)))
        grams = g.run({"style": style[None]}, outputs=[mm.ops.gram(feats[n], alpha=self._alpha(feats[n]))
                                                      for n in STYLE_LAYERS])

        self.graph = g = mm.Graph(device, compute_dtype=autocast)  # the losses' graph, trained and measured
        x = g.input("content", self.content.shape)
        self.image = self.transformer(x)
        fy, fx = self.loss_net.features(self.image), self.loss_net.features(x)
        terms = [mm.ops.mse_loss(mm.ops.gram(fy[n], alpha=self._alpha(fy[n])), mm.tensor(t, device), reduction="mean")
                 for n, t in zip(STYLE_LAYERS, grams)]
        self.style_loss = sum(terms[1:], terms[0])
        target = fx[CONTENT_LAYER]
        target.stop_gradient = True
        self.content_loss = mm.ops.mse_loss(fy[CONTENT_LAYER], target, reduction="mean")
        total = style_weight * self.style_loss + content_weight * self.content_loss
        self.train = total.training_graph(optimizer=mm.optim.Adam(self.transformer.parameters(), lr=lr),
                                          loss_scaler=loss_scaler(autocast, device))

    @staticmethod
    def _alpha(features) -> float:
        return 1.0 / (features.shape[2] * features.shape[3])

    def step(self) -> float:
        """One training step; returns the weighted total loss."""
        return self.train.step(content=self.content)

    def measure(self) -> tuple[float, float, np.ndarray]:
        """The style loss, the content loss and the stylised image (3, H, W), without training."""
        s, c, img = self.graph.run({"content": self.content}, outputs=[self.style_loss, self.content_loss, self.image])
        return float(s.sum()), float(c.sum()), img[0]


def train_style(style: np.ndarray, content: np.ndarray, device=None, steps: int = 300, every: int = 50,
                style_weight: float = 30.0, content_weight: float = 1.0, lr: float = 1e-2, loss_weights=None,
                seed: int = 0, out=None, progress: bool = True, autocast=None) -> dict:
    """Train a transformer to stylise `content` like `style`, writing the image every `every` steps.

    Ctrl-C stops training early; what was trained so far is returned.

    Args:
        style, content: images (3, H, W) in [0, 1], the same size.
        device: a Device or backend name.
        steps: training steps.
        every: write `step_<n>.png` into `out` every this many steps (and after the last).
        style_weight, content_weight, lr, loss_weights: see StyleTransfer.
        seed: the transformer's initialisation (and the random loss network's).
        out: a directory for the images; None writes nothing.
        progress: show a progress bar.
        autocast: None, or "bfloat16" / "float16": build the losses' graph (trained and measured)
            under `mm.autocast`; the weights stay float32.

    Returns:
        {'model', 'style_start', 'content_start', 'style', 'content' (the losses at the start and
        the end), 'image' (3, H, W), 'steps' (done), 'seconds', 'interrupted'}.

    Example:
        >>> r = train_style(default_style(64), default_content(64), "cpu", out="style-out")
        >>> r["style_start"] / r["style"]   # how far the style loss fell
    """
    dev = mm.device(device) if not isinstance(device, mm.Device) else device
    mm.nn.seed(seed)
    model = StyleTransfer(dev, style, content, style_weight, content_weight, lr, loss_weights, autocast)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    s0, c0, image = model.measure()
    result = {"model": model, "style_start": s0, "content_start": c0, "steps": 0, "interrupted": False}
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="style", unit="step", disable=not progress)
    try:
        for i in range(1, steps + 1):
            loss = model.step()
            result["steps"] = i
            bar.update()
            if i % every == 0 or i == steps:
                s, c, image = model.measure()
                bar.set_postfix(style=f"{s:.3g}", content=f"{c:.3g}", total=f"{loss:.3g}")
                if out is not None:
                    save_image(image, out / f"step_{i:05d}.png")
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        bar.close()
    result["seconds"] = time.perf_counter() - t0
    result["style"], result["content"], result["image"] = model.measure()
    return result


COMMAND = "style"
HELP = "train a style-transfer network and write the stylised image every N steps"
FLAGS = dict(out="style-out", size=64, steps=300, size_help="images are resized to size×size; even, at least 4")


def _image(text: str) -> str:
    return text if text == "default" else existing_file(text)


def add_arguments(p) -> None:
    p.add_argument("--style", type=_image, default="default",
                   help="style image, any format Pillow reads ('default': a generated one of colourful waves)")
    p.add_argument("--content", type=_image, default="default",
                   help="content image, any format Pillow reads ('default': generated shapes on a gradient)")
    p.add_argument("--every", type=integer(1), default=50,
                   help="write the stylised image every this many steps (default 50)")
    p.add_argument("--style-weight", type=number(0), default=30.0, help="the style loss's weight (default 30)")
    p.add_argument("--content-weight", type=number(0), default=1.0, help="the content loss's weight (default 1)")
    p.add_argument("--lr", type=number(0, above=True), default=1e-2, help="Adam's learning rate (default 1e-2)")
    names = ", ".join(f"{layer[0]}.weight, {layer[0]}.bias" for layer in LOSS_LAYERS if layer != "pool")
    p.add_argument("--loss-weights", type=existing_file, default=None, metavar="PATH",
                   help=f"a .safetensors file of loss-network weights (default: fixed random filters). Tensors: {names}; "
                        "each weight (out, in, 3, 3) float32, each bias (out,); the first conv takes RGB in [0, 1]; "
                        f"style from {', '.join(STYLE_LAYERS)}, content from {CONTENT_LAYER}, 2×2 average pools "
                        "after conv1_2 and conv2_2")


def check_arguments(args) -> str | None:
    """What the flags' types cannot see alone: the size, and what the files hold."""
    from PIL import Image

    # the transformer halves the image and doubles it back; the loss network pools it twice
    if args.size % 2 or args.size < 4:
        return f"argument --size: expected an even integer ≥ 4, got {args.size}"
    for flag in ("style", "content"):
        path = getattr(args, flag)
        if path != "default":
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 — Pillow raises many kinds for what it cannot read
                return f"argument --{flag}: cannot read {path!r} as an image ({e})"
    return _loss_weights_problem(args.loss_weights) if args.loss_weights else None


def _loss_weights_problem(path: str) -> str | None:
    """Why a --loss-weights file cannot be the loss network (from its header alone), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "numpy") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        return f"argument --loss-weights: cannot read {path!r} as safetensors ({e})"
    cin = 3
    for layer in LOSS_LAYERS:
        if layer != "pool":
            w, b = shapes.get(f"{layer[0]}.weight"), shapes.get(f"{layer[0]}.bias")
            if w is None or len(w) != 4 or w[1:] != (cin, 3, 3) or b != w[:1]:
                return (f"argument --loss-weights: {path!r} needs {layer[0]}.weight (out, {cin}, 3, 3) and "
                        f"{layer[0]}.bias (out,), has {w or 'no weight'} and {b or 'no bias'}")
            cin = w[0]
    return None


def run(args) -> int:
    style = default_style(args.size, args.seed) if args.style == "default" else load_image(args.style, args.size)
    content = default_content(args.size) if args.content == "default" else load_image(args.content, args.size)
    weights = read_loss_weights(args.loss_weights) if args.loss_weights else None
    announce_autocast(args)
    result = train_style(style, content, args.device, steps=args.steps, every=args.every,
                         style_weight=args.style_weight, content_weight=args.content_weight, lr=args.lr,
                         loss_weights=weights, seed=args.seed, out=args.out, progress=args.progress,
                         autocast=args.autocast)
    out = Path(args.out)
    # Saved on every exit, Ctrl-C included: training is the expensive part.
    result["model"].transformer.save_weights(out / "transformer.zip")
    save_image(result["image"], out / "stylised.png")
    save_image(style, out / "style.png")
    save_image(content, out / "content.png")
    how = "stopped" if result["interrupted"] else "trained"
    print(f"{how} after {result['steps']} step(s){autocast_note(args)} in {result['seconds']:.0f} s; "
          f"images and weights in {out}/")
    print(f"style loss   {result['style_start']:.4g} → {result['style']:.4g} "
          f"(fell {result['style_start'] / max(result['style'], 1e-30):.1f}×)")
    print(f"content loss {result['content_start']:.4g} → {result['content']:.4g} "
          f"({result['content'] / max(result['content_start'], 1e-30):.2f}× its start)")
    return 130 if result["interrupted"] else 0
