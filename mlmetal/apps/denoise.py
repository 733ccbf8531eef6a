"""Ray-tracing denoiser: a U-Net learns to turn few-sample path-traced renders into clean ones.

The talk's demonstration in small. The path tracer of mlmetal/raytrace.py renders random
rooms twice on the device: a noisy image at a few samples per pixel and a clean one at many
(with independent noise). The network sees the noisy colour with the noise-free albedo and
normals of the first hit, packed into 9 channels by one concat, and predicts the clean colour.

Colours are compared after tone mapping (Reinhard, then gamma 2.2): the light itself is far
brighter than 1 in linear radiance, and both the loss and the PSNR should weigh what a viewer
sees. The loss is Apple's pair of separable losses, summed: L1 on the colour plus L1 on its
Laplacian of Gaussian (edges), so the network is pushed to keep edges sharp rather than
blur them away.

Training follows Apple's schedule, scaled down: every K epochs fresh scenes are rendered
(so the network never sees the same noise twice for long) and the validation renders are
scored; every M epochs the learning rate halves. Then the model is saved, loaded back (on
another backend when one is present), and run on held-out scenes.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

import mlmetal as mm
from mlmetal import raytrace as rt

CHANNELS = 9  # noisy rgb, albedo, normal
TEST_SEEDS = 1_000_000  # held-out scenes are numbered from here; training scenes stay far below


def tonemap(rgb: np.ndarray) -> np.ndarray:
    """Linear radiance to display values in [0, 1): Reinhard's x / (1 + x), then gamma 2.2."""
    x = np.maximum(rgb, 0.0)
    return (x / (1.0 + x)) ** (1 / 2.2)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of display images in [0, 1], over all of them."""
    mse = float(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


class UNet(mm.nn.Module):
    """Apple's denoising U-Net: 9 channels in (noisy rgb, albedo, normal), 3 out (rgb).

    Each encoder stage is three (3×3 conv + ReLU) pairs followed by a 2×2 max pool; the
    bottleneck is two pairs; each decoder stage upsamples, concatenates the skip connection
    from the encoder stage of the same resolution, and applies two pairs. A 1×1 convolution
    maps the last features to rgb, added to the noisy input so the network learns the
    correction (training starts from "output = input", a good first guess).

    Args:
        width: channels of the first stage; each deeper stage doubles them.
        depth: encoder stages (the image side must be divisible by 2**depth).
        device: where the parameters live.

    Example:
        >>> net = UNet(width=8, depth=2, device="cpu")
        >>> g = mm.Graph(net.device); y = net(g.input("x", (1, 9, 32, 32)))   # (1, 3, 32, 32)
    """

    def __init__(self, width: int = 16, depth: int = 2, device=None):
        self.device = mm.device(device) if not isinstance(device, mm.Device) else device
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoder = [self._pairs([CHANNELS if i == 0 else widths[i - 1]] + [widths[i]] * 3)
                        for i in range(depth)]
        self.bottleneck = self._pairs([widths[depth - 1], widths[depth], widths[depth]])
        self.decoder = [self._pairs([widths[i + 1] + widths[i], widths[i], widths[i]])
                        for i in reversed(range(depth))]
        self.head = mm.nn.Conv2d(width, 3, 1, device=self.device)

    def _pairs(self, channels: list[int]) -> mm.nn.Sequential:
        """(3×3 conv + ReLU) pairs taking channels[0] through channels[1:]."""
        layers = []
        for cin, cout in zip(channels, channels[1:]):
            layers += [mm.nn.Conv2d(cin, cout, 3, padding=1, device=self.device), mm.nn.ReLU()]
        return mm.nn.Sequential(*layers)

    def forward(self, noisy, albedo, normal):
        x = mm.ops.concat([noisy, albedo, normal])
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = mm.ops.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = stage(mm.ops.concat([mm.ops.upsample(x, 2), skip]))
        return mm.ops.add(self.head(x), noisy)


def inputs_of(graph: mm.Graph, batch: int, size: int):
    """The graph's three image inputs: noisy, albedo, normal, each (batch, 3, size, size)."""
    return [graph.input(name, (batch, 3, size, size)) for name in ("noisy", "albedo", "normal")]


def training_graph(net: UNet, batch: int, size: int, lr: float, log_weight: float):
    """RGB L1 plus `log_weight` × Laplacian-of-Gaussian L1, summed; Adam over the net."""
    g = mm.Graph(net.device)
    out = net(*inputs_of(g, batch, size))
    clean = g.input("clean", (batch, 3, size, size))
    rgb_loss = mm.ops.mae_loss(out, clean, reduction="mean")
    log_loss = mm.ops.mae_loss(mm.ops.log_filter(out, sigma=1.0, size=5), mm.ops.log_filter(clean, sigma=1.0, size=5),
                               reduction="mean", weight=log_weight)
    loss = mm.ops.add(rgb_loss, log_loss)
    return loss.training_graph(optimizer=mm.optim.Adam(net.parameters(), lr=lr))


class Renders:
    """Noisy / clean pairs of random scenes with albedo and normals, tone-mapped, as numpy arrays.

    Args:
        dev: the device the path tracer runs on.
        seeds: scene seeds, one image each.
        size: image side in pixels.
        spp: samples per pixel of the noisy input.
        clean_spp: samples per pixel of the target.
        noise_seed: the noisy render's noise seed; the clean one uses the next seed, so
            their noise is independent.
    """

    def __init__(self, dev, seeds, size: int, spp: int, clean_spp: int, noise_seed: int):
        scenes = [rt.random_scene(int(s)) for s in seeds]
        noisy = rt.render(dev, scenes, size, spp=spp, seed=noise_seed)
        clean = rt.render(dev, scenes, size, spp=clean_spp, seed=noise_seed + 1)
        self.noisy = tonemap(noisy["rgb"].numpy())
        self.albedo = noisy["albedo"].numpy()
        self.normal = noisy["normal"].numpy()
        self.clean = tonemap(clean["rgb"].numpy())

    def __len__(self):
        return len(self.noisy)

    def feed(self, idx) -> dict:
        """Graph inputs for the images `idx` (the clean target included)."""
        return {"noisy": self.noisy[idx], "albedo": self.albedo[idx], "normal": self.normal[idx],
                "clean": self.clean[idx]}


def other_backend(dev) -> str:
    """A present backend other than `dev`'s to deploy on (the talk's "load on another device"), else `dev`'s."""
    for name in ("cuda", "metal", "cpu"):
        if name != dev.name and mm.available(name) is None:
            return name
    return dev.name


def train_denoiser(device=None, *, size: int = 48, width: int = 12, depth: int = 2, epochs: int = 120,
                   scenes: int = 32, batch: int = 8, spp: int = 2, clean_spp: int = 256, refresh_every: int = 20,
                   halve_every: int = 50, lr: float = 3e-3, log_weight: float = 0.5, validation: int = 8,
                   seed: int = 0, progress: bool = True) -> dict:
    """Train a UNet on fresh path-traced renders; returns the net, its optimizer, histories and timings.

    Ctrl-C stops training early and returns what was learnt so far (`interrupted` is True).

    Args:
        device: a Device or backend name.
        size: image side in pixels (divisible by 2**depth).
        width: channels of the U-Net's first stage.
        depth: encoder stages.
        epochs: passes over the current training set.
        scenes: training images rendered per refresh.
        batch: images per step.
        spp: samples per pixel of the noisy input.
        clean_spp: samples per pixel of the clean target.
        refresh_every: render new training scenes and validate every this many epochs.
        halve_every: halve the learning rate every this many epochs.
        lr: Adam's initial learning rate.
        log_weight: weight of the Laplacian-of-Gaussian loss against the RGB loss.
        validation: held-out validation images scored at every refresh.
        seed: initialisation, scene layouts and noise.
        progress: show a progress bar.

    Example:
        >>> result = train_denoiser("cpu", size=32, epochs=10); result["validations"][-1]["psnr"]
    """
    dev = mm.device(device) if not isinstance(device, mm.Device) else device
    if size % 2**depth:
        raise ValueError(f"size must be divisible by 2**depth = {2**depth}, got {size}")
    mm.nn.seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(width, depth, dev)
    train = training_graph(net, batch, size, lr, log_weight)
    schedule = mm.optim.StepDecay(train.optimizer, every=halve_every)
    evaluate = Denoiser(net, validation, size)
    val = Renders(dev, TEST_SEEDS + 10_000 + np.arange(validation), size, spp, clean_spp, noise_seed=7)
    data = {"epoch": 0}
    step_losses: list[float] = []  # kept here rather than from fit's history, which Ctrl-C would lose
    validations: list[dict] = []
    timings = {"render": 0.0}

    def refresh():
        t0 = time.perf_counter()
        data["set"] = Renders(dev, rng.integers(0, TEST_SEEDS, scenes), size, spp, clean_spp,
                              noise_seed=int(rng.integers(0, 2**31)))
        timings["render"] += time.perf_counter() - t0

    def batches(epoch):
        data["epoch"] = epoch
        if epoch % refresh_every == 0:
            refresh()
        order = rng.permutation(scenes)
        for k in range(0, scenes - batch + 1, batch):
            yield data["set"].feed(order[k:k + batch])

    def step(**feed):
        loss = train.step(**feed)
        step_losses.append(loss)
        return loss

    def validate():
        record = {"epoch": data["epoch"] + 1, "step": len(step_losses), "psnr": psnr(evaluate(val), val.clean)}
        validations.append(record)
        return {"psnr": record["psnr"]}

    t0 = time.perf_counter()
    interrupted = False
    try:
        mm.train.fit(step, batches, epochs, validate=validate, every=refresh_every, schedule=schedule,
                               progress=progress)
    except KeyboardInterrupt:
        interrupted = True
    timings["train"] = time.perf_counter() - t0
    return {"net": net, "optimizer": train.optimizer, "device": dev, "steps": step_losses,
            "validations": validations, "noisy_psnr": psnr(val.noisy, val.clean),
            "interrupted": interrupted, "timings": timings, "size": size, "spp": spp, "clean_spp": clean_spp,
            "refresh_every": refresh_every}


class Denoiser:
    """The net's inference graph for `batch` images of `size`², run on Renders or raw arrays.

    Args:
        net: a UNet.
        batch: images per run.
        size: image side.

    Example:
        >>> denoised = Denoiser(net, len(test), 48)(test)   # (N, 3, 48, 48) display values
    """

    def __init__(self, net: UNet, batch: int, size: int):
        self.graph = mm.Graph(net.device)
        self.output = net(*inputs_of(self.graph, batch, size))

    def __call__(self, renders: Renders) -> np.ndarray:
        feed = renders.feed(slice(None))
        del feed["clean"]
        return self.graph.run(feed, outputs=[self.output])[0]
