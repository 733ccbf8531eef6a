"""A generative adversarial network that learns to draw scikit-learn's handwritten digits.

The talk's GAN in small. A generator turns a latent vector into an image; a discriminator
turns an image into one logit, "real" or "fake". They train in turns, each step on its own
derived training graph and its own Adam:

- the discriminator's graph sums two separable sigmoid cross-entropy losses, real digits
  against label 1 and generated ones against label 0; the generated images are marked
  `stop_gradient`, so no gradient reaches the generator through them;
- the generator's graph runs its images through the discriminator against label 1 (the
  non-saturating loss). It is derived while the discriminator is frozen, so the gradient
  flows back through the discriminator's layers to the images but no discriminator weight
  gradient is made, and only the generator's optimizer has updates in it.

Both graphs begin with a `random_tensor` node (`Graph.random`): every run draws a fresh
latent batch on the device, so no latent ever crosses from the host during training.

Whether the samples look like digits is judged by the digits classifier
(mlmetal/apps/digits.py): the fraction of samples it assigns to one class with probability
at least 0.9.

Images are the digits' own 8×8 by default; at a larger size (16, 32, …) the digits are
upscaled bilinearly, the generator gains one ×2 upsampling stage per doubling, and the
classifier judges samples average-pooled back to 8×8.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import mlmetal as mm
from mlmetal.apps.digits import train_digits, upscale
from mlmetal.cli import announce_autocast, autocast_note, integer, loss_scaler, number

LATENT = 32


def upsampling_stages(size: int) -> int:
    """How many ×2 stages take 8×8 to size×size; size must be 8·2^k."""
    if size < 8 or size % 8 or (size // 8) & (size // 8 - 1):
        raise ValueError(f"size must be 8, 16, 32, … (8·2^k), got {size}")
    return (size // 8).bit_length() - 1


class Generator(mm.nn.Module):
    """z (N, latent) → two (fully connected + LeakyReLU) → an 8×8 image in [-1, 1] (N, 1, 8, 8).

    At a larger size the last fully connected layer makes `channels` 8×8 feature maps
    instead, each stage doubles their side (bilinear upsampling, 3×3 conv + LeakyReLU), and
    a 3×3 conv + tanh makes the (N, 1, size, size) image.
    """

    def __init__(self, device=None, latent: int = LATENT, hidden: int = 128, size: int = 8, channels: int = 16):
        stages = upsampling_stages(size)
        self.channels = channels if stages else 1
        self.body = mm.nn.Sequential(
            mm.nn.Linear(latent, hidden, device=device), mm.nn.LeakyReLU(0.2),
            mm.nn.Linear(hidden, 2 * hidden, device=device), mm.nn.LeakyReLU(0.2),
            mm.nn.Linear(2 * hidden, 64 * self.channels, device=device),
            mm.nn.LeakyReLU(0.2) if stages else mm.nn.Tanh())
        layers = []
        for _ in range(stages):
            layers += [mm.nn.Upsample(2, "bilinear"), mm.nn.Conv2d(channels, channels, 3, padding=1, device=device),
                       mm.nn.LeakyReLU(0.2)]
        if stages:
            layers += [mm.nn.Conv2d(channels, 1, 3, padding=1, device=device), mm.nn.Tanh()]
        self.upsampling = mm.nn.Sequential(*layers)

    def forward(self, z):
        return self.upsampling(self.body(z).reshape(z.shape[0], self.channels, 8, 8))


class Discriminator(mm.nn.Module):
    """(N, 1, size, size) → fully connected + LeakyReLU → one logit (N, 1): large for real digits."""

    def __init__(self, device=None, hidden: int = 256, size: int = 8):
        self.body = mm.nn.Sequential(
            mm.nn.Linear(size * size, hidden, device=device), mm.nn.LeakyReLU(0.2),
            mm.nn.Linear(hidden, 1, device=device))

    def forward(self, x):
        return self.body(x.flatten(1))


class GAN:
    """A generator, a discriminator, and the two training graphs that train them in turns.

    Args:
        device: a Device.
        batch: real and generated images per step.
        lr: both optimizers' learning rate (Adam with β₁ = 0.5, as GANs usually are).
        seed: the latent stream's seed.
        size: the image side, 8·2^k for the app's own networks.
        generator, discriminator: other networks to train instead of the app's Generator and
            Discriminator (latents (N, latent) → images (N, 1, size, size) → logits (N, 1)).
        latent: the latents' length.
        autocast: None, or "bfloat16" / "float16": the two training graphs' compute_dtype
            (mm.autocast); sampling and watching run in float32.

    Example:
        >>> gan = GAN(mm.device("cpu"), batch=64)
        >>> d_loss, g_loss = gan.step(real_batch)      # real_batch (64, 1, 8, 8) in [-1, 1]
        >>> images = gan.sample(np.zeros((16, LATENT), np.float32))
    """

    def __init__(self, device, batch: int = 64, lr: float = 1e-3, seed: int = 0, size: int = 8,
                 generator: mm.nn.Module | None = None, discriminator: mm.nn.Module | None = None, latent: int = LATENT,
                 autocast=None):
        self.device, self.batch, self.size, self.latent = device, batch, size, latent
        self.generator = generator if generator is not None else Generator(device, latent=latent, size=size)
        self.discriminator = discriminator if discriminator is not None else Discriminator(device, size=size)
        latents = mm.random.Philox(device, seed)  # one stream, shared by both graphs' latent nodes
        ones = mm.tensor(np.ones((batch, 1), np.float32), device)
        zeros = mm.tensor(np.zeros((batch, 1), np.float32), device)
        adam = dict(lr=lr, betas=(0.5, 0.999))

        g = mm.Graph(device, compute_dtype=autocast)
        fake = self.generator(g.random((batch, latent), latents, mm.random.Normal()))
        fake.stop_gradient = True
        real_loss, fake_loss = self._discriminator_losses(g, fake, ones, zeros)
        d_loss = real_loss + fake_loss
        self.train_d = d_loss.training_graph(optimizer=mm.optim.Adam(self.discriminator.parameters(), **adam),
                                             loss_scaler=loss_scaler(autocast, device))

        g = mm.Graph(device, compute_dtype=autocast)
        fake = self.generator(g.random((batch, latent), latents, mm.random.Normal()))
        g_loss = mm.ops.sigmoid_cross_entropy_loss(self.discriminator(fake), ones)
        # Frozen only while the graph is derived: that is when gradient nodes are chosen.
        self.discriminator.freeze()
        try:
            self.train_g = g_loss.training_graph(optimizer=mm.optim.Adam(self.generator.parameters(), **adam),
                                                 loss_scaler=loss_scaler(autocast, device))
        finally:
            self.discriminator.unfreeze()

        # The same losses in a graph with no updates, for watching the discriminator without training it.
        self.watch = mm.Graph(device)
        fake = self.generator(self.watch.random((batch, latent), latents, mm.random.Normal()))
        self.watched = self._discriminator_losses(self.watch, fake, ones, zeros)
        self._samplers: dict[int, tuple] = {}

    def step(self, real: np.ndarray) -> tuple[float, float]:
        """One discriminator step on a real batch, then one generator step; returns their losses."""
        return self.train_d.step(real=real), self.train_g.step()

    def _discriminator_losses(self, g, fake, ones, zeros):
        """The two separable losses of graph g: its input "real" against label 1, `fake` against label 0."""
        real = g.input("real", (self.batch, 1, self.size, self.size))
        return (mm.ops.sigmoid_cross_entropy_loss(self.discriminator(real), ones),
                mm.ops.sigmoid_cross_entropy_loss(self.discriminator(fake), zeros))

    def discriminator_losses(self, real: np.ndarray) -> tuple[float, float]:
        """The discriminator's (real, fake) losses on a real batch and a fresh fake one, without training."""
        return tuple(float(v[0]) for v in self.watch.run({"real": real}, outputs=list(self.watched)))

    def sample(self, z: np.ndarray) -> np.ndarray:
        """The generator's images of latents z (N, latent), mapped to [0, 1] as the digits classifier sees them."""
        n = len(z)
        if n not in self._samplers:
            g = mm.Graph(self.device)
            self._samplers[n] = (g, self.generator(g.input("z", (n, self.latent))))
        g, images = self._samplers[n]
        return (g.run({"z": z}, outputs=[images])[0] + 1) / 2


def real_digits(size: int = 8, device=None) -> np.ndarray:
    """All 1797 of scikit-learn's digits, (N, 1, size, size), scaled to the generator's range [-1, 1]
    (upscaled bilinearly on `device` when size > 8)."""
    from sklearn.datasets import load_digits

    x = (load_digits().images / 8.0 - 1).astype(np.float32)[:, None]
    upsampling_stages(size)  # refuses a size that is not 8·2^k
    return upscale(x, size, device)


def confident_fraction(classifier, device, images: np.ndarray, threshold: float = 0.9) -> tuple[float, np.ndarray]:
    """The fraction of images (in [0, 1]) the classifier puts in one class with probability ≥ threshold,
    and how many of those fell in each class. Images larger than 8×8 are average-pooled to 8×8 first."""
    if images.shape[-1] != 8:
        images = mm.ops.avg_pool2d(mm.tensor(images, device), images.shape[-1] // 8).numpy()
    g = mm.Graph(device)
    logits = g.run({"x": images}, outputs=[classifier(g.input("x", images.shape))])[0].reshape(len(images), 10)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sure = p.max(1) >= threshold
    return float(sure.mean()), np.bincount(p.argmax(1)[sure], minlength=10)


def save_grid(images: np.ndarray, path) -> None:
    """Write images (N, 1, side, side) in [0, 1] as one PNG grid, white ink on black, each pixel
    (32 / side)² screen pixels (at least one), so digits show at one size whatever their side."""
    from PIL import Image

    n, side = len(images), images.shape[-1]
    scale = max(1, 32 // side)
    cols = int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    step = side + 1  # one-pixel gutters between digits
    canvas = np.zeros((rows * step + 1, cols * step + 1), np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + step * r:step * (r + 1), 1 + step * c:step * (c + 1)] = im[0]
    pixels = (np.clip(canvas, 0, 1) * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(pixels).save(path)


def train_gan(device=None, epochs: int = 200, batch: int = 64, lr: float = 1e-3, seed: int = 0, out=None,
              steps: int | None = None, judge: bool = True, progress: bool = True, size: int = 8,
              autocast=None) -> dict:
    """Train a GAN on the digits, writing a grid of samples per epoch; returns what it measured.

    An epoch is one pass over the 1797 digits in batches. Ctrl-C stops training early;
    what was trained so far is returned (the caller decides what to save).

    Args:
        device: a Device or backend name.
        epochs: passes over the digits.
        batch: images per step.
        lr: Adam's learning rate for both networks.
        seed: initialisation, latents and shuffling.
        out: a directory for `samples_<epoch>.png`; None writes nothing.
        steps: stop after this many steps in all (quick runs); None trains every epoch through.
        judge: train the digits classifier and measure the fraction of confidently classified
            samples, before and after training ('confident_before', 'confident').
        progress: show progress bars.
        size: image side, 8·2^k: the digits' own 8, or them upscaled bilinearly.
        autocast: None, or "bfloat16" / "float16": the GAN's training graphs are built under
            `mm.autocast` (the judging classifier trains in float32).

    Returns:
        {'gan', 'history' (per epoch: d_loss, g_loss), 'seconds', 'interrupted', and with
        judge: 'confident_before', 'confident', 'classes' (confident samples per class)}.

    Example:
        >>> result = train_gan("cpu", out="out/gan")
        >>> result["confident"]   # fraction of samples the classifier is ≥ 90% sure of
    """
    dev = mm.device(device) if not isinstance(device, mm.Device) else device
    upsampling_stages(size)  # a bad size fails before the classifier trains
    classifier = None
    if judge:
        classifier = train_digits(dev, seed=seed, progress=progress)["net"]
    mm.nn.seed(seed)
    gan = GAN(dev, batch, lr, seed, size, autocast=autocast)
    x = real_digits(size, dev)
    rng = np.random.default_rng(seed)
    fixed = mm.random.Philox(dev, seed + 1).normal((64, LATENT))  # the same latents for every epoch's grid
    judged = mm.random.Philox(dev, seed + 2).normal((500, LATENT))
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    result = {"gan": gan, "history": [], "interrupted": False}
    if judge:
        result["confident_before"] = confident_fraction(classifier, dev, gan.sample(judged))[0]
    per_epoch = len(x) // batch
    total = epochs * per_epoch if steps is None else min(steps, epochs * per_epoch)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="gan", unit="step", disable=not progress)
    done = 0
    try:
        for epoch in range(epochs):
            if done >= total:
                break
            order = rng.permutation(len(x))
            losses = []
            for k in range(per_epoch):
                if done >= total:
                    break
                losses.append(gan.step(x[order[k * batch:(k + 1) * batch]]))
                done += 1
                bar.update()
            d_loss, g_loss = np.mean(losses, axis=0)
            result["history"].append({"epoch": epoch, "d_loss": float(d_loss), "g_loss": float(g_loss)})
            bar.set_postfix(d_loss=f"{d_loss:.3f}", g_loss=f"{g_loss:.3f}")
            if out is not None:
                save_grid(gan.sample(fixed), out / f"samples_{epoch:03d}.png")
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        bar.close()
    result["seconds"] = time.perf_counter() - t0
    if judge:
        result["confident"], result["classes"] = confident_fraction(classifier, dev, gan.sample(judged))
    return result


COMMAND = "gan"
HELP = "train a GAN on the handwritten digits and write a grid of samples per epoch"
FLAGS = dict(out="out/gan", size=8, size_help="image side: 8 (the digits' own), or 16, 32, … to train on the digits "
                                             "upscaled bilinearly, the generator gaining a ×2 upsampling stage per doubling")


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=integer(1), default=200, help="passes over the 1797 digits (default 200)")
    p.add_argument("--batch", type=integer(1, 1797), default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=number(0, above=True), default=1e-3,
                   help="Adam's learning rate for both networks (default 1e-3)")
    p.add_argument("--no-judge", dest="judge", action="store_false",
                   help="skip training the digits classifier that scores the samples")


def check_arguments(args) -> str | None:
    """What the flags' types cannot see alone."""
    try:
        upsampling_stages(args.size)
    except ValueError:
        return f"argument --size: expected 8, 16, 32, … (8·2^k), got {args.size}"
    return None


def run(args) -> int:
    announce_autocast(args)
    result = train_gan(args.device, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed, out=args.out,
                       steps=args.steps, judge=args.judge, progress=args.progress, size=args.size,
                       autocast=args.autocast)
    out = Path(args.out)
    gan = result["gan"]
    # Saved on every exit, Ctrl-C included: training is the expensive part.
    gan.generator.save_weights(out / "generator.zip")
    gan.discriminator.save_weights(out / "discriminator.zip")
    save_grid(gan.sample(mm.random.Philox(gan.device, args.seed + 1).normal((64, LATENT))), out / "samples.png")
    how = "stopped" if result["interrupted"] else "trained"
    print(f"{how} after {len(result['history'])} epoch(s){autocast_note(args)} in {result['seconds']:.0f} s; "
          f"samples and weights in {out}/")
    if args.judge:
        print(f"the digits classifier is ≥ 90% sure of {result['confident']:.0%} of 500 samples "
              f"(untrained generator: {result['confident_before']:.0%}); per class {result['classes'].tolist()}")
    return 130 if result["interrupted"] else 0
