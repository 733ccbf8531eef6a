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
from mlmetal.apps.images import to_image
from mlmetal.cli import announce_autocast, autocast_note, integer, loss_scaler, number

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
            conv = mm.nn.Conv2d(cin, cout, 3, padding=1, device=self.device)
            # He initialisation: the default U(±1/√fan_in) shrinks the signal ~6× per conv+ReLU,
            # so through a dozen of them the output barely depends on the input and training
            # crawls at first; scaling by √6 keeps the variance through each ReLU.
            conv.weight.assign(conv.weight.numpy() * math.sqrt(6.0))
            layers += [conv, mm.nn.ReLU()]
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
        return self.head(x) + noisy


def inputs_of(graph: mm.Graph, batch: int, size: int):
    """The graph's three image inputs: noisy, albedo, normal, each (batch, 3, size, size)."""
    return [graph.input(name, (batch, 3, size, size)) for name in ("noisy", "albedo", "normal")]


def training_graph(net: UNet, batch: int, size: int, lr: float, log_weight: float, distributed: bool = False,
                   autocast=None):
    """RGB L1 plus `log_weight` × Laplacian-of-Gaussian L1, summed; Adam over the net (averaging
    the gradients over mm.distributed's ranks when `distributed`); built under `mm.autocast(autocast)`
    when that is "bfloat16" or "float16" (the graph's compute_dtype)."""
    g = mm.Graph(net.device, compute_dtype=autocast)
    out = net(*inputs_of(g, batch, size))
    clean = g.input("clean", (batch, 3, size, size))
    rgb_loss = mm.ops.mae_loss(out, clean, reduction="mean")
    log_loss = mm.ops.mae_loss(mm.ops.log_filter(out, sigma=1.0, size=5), mm.ops.log_filter(clean, sigma=1.0, size=5),
                               reduction="mean", weight=log_weight)
    loss = rgb_loss + log_loss
    optimizer = mm.optim.Adam(net.parameters(), lr=lr)
    return loss.training_graph(optimizer=mm.distributed.DataParallel(optimizer, module=net) if distributed else optimizer,
                               loss_scaler=loss_scaler(autocast, net.device))


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


def train_denoiser(device=None, *, size: int = 48, width: int = 12, depth: int = 2, epochs: int = 80,
                   scenes: int = 32, batch: int = 4, spp: int = 2, clean_spp: int = 128, refresh_every: int = 10,
                   halve_every: int = 40, lr: float = 3e-3, log_weight: float = 0.5, validation: int = 8,
                   seed: int = 0, progress: bool = True, steps: int | None = None, distributed: bool = False,
                   autocast=None) -> dict:
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
        steps: stop after this many training steps in all (default: run every epoch).
        distributed: train data-parallel with the other ranks of `mm.distributed` (`init()` first):
            each renders scenes of its own and takes `batch` images a step; rank 0 alone shows
            progress and validates.
        autocast: None, or "bfloat16" / "float16" to build the training graph under `mm.autocast`
            (validation and the saved model run in float32 on the float32 weights).

    Example:
        >>> result = train_denoiser("cpu", size=32, epochs=10); result["validations"][-1]["psnr"]
    """
    dev = mm.device(device) if not isinstance(device, mm.Device) else device
    if size % 2**depth:
        raise ValueError(f"size must be divisible by 2**depth = {2**depth}, got {size}")
    if not 1 <= batch <= scenes:
        raise ValueError(f"batch must be from 1 to scenes = {scenes}, got {batch}")
    rank = mm.distributed.rank() if distributed else 0
    mm.nn.seed(seed)
    rng = np.random.default_rng([seed, rank] if rank else seed)  # rank 0 renders what one process would
    net = UNet(width, depth, dev)
    train = training_graph(net, batch, size, lr, log_weight, distributed, autocast)
    schedule = mm.optim.StepDecay(train.optimizer, every=halve_every)
    evaluate = Denoiser(net, validation, size)
    val = Renders(dev, TEST_SEEDS + 10_000 + np.arange(validation), size, spp, clean_spp, noise_seed=7) if rank == 0 else None
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
        mm.train.fit(step, batches, epochs, validate=validate if rank == 0 else None, every=refresh_every,
                     schedule=schedule, progress=progress and rank == 0, steps=steps)
    except KeyboardInterrupt:
        interrupted = True
    timings["train"] = time.perf_counter() - t0
    return {"net": net, "optimizer": train.optimizer, "device": dev, "steps": step_losses,
            "validations": validations, "noisy_psnr": psnr(val.noisy, val.clean) if val else None,
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


# ---------------------------------------------------------------- pictures

def triptych(noisy: np.ndarray, denoised: np.ndarray, clean: np.ndarray, scale: int = 4, gap: int = 4):
    """noisy | denoised | clean side by side on white, each (3, H, W)."""
    from PIL import Image

    panels = [to_image(x, scale) for x in (noisy, denoised, clean)]
    w, h = panels[0].size
    out = Image.new("RGB", (3 * w + 2 * gap, h), "white")
    for i, p in enumerate(panels):
        out.paste(p, (i * (w + gap), 0))
    return out


def loss_curve(steps: list[float], validations: list[dict], noisy_psnr: float, size=(640, 400)):
    """The training loss per step (log scale) and the validation PSNR, as a Pillow image."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 30, size[0] - 60, size[1] - 40
    d.rectangle((left, top, right, bottom), outline="black")
    d.text((left, 8), "training loss (blue, log scale) and validation PSNR (red, dB)", fill="black")
    d.text((left, bottom + 20), f"step (0 to {len(steps)})", fill="black")
    n = max(len(steps) - 1, 1)

    def xs(i):
        return left + (right - left) * i / n

    if steps:
        logs = np.log10(np.maximum(np.asarray(steps, np.float64), 1e-12))
        lo, hi = logs.min(), logs.max() + 1e-9
        # a running mean over ~1% of the steps reads better than the raw, noisy per-step loss
        k = max(1, len(logs) // 100)
        smooth = np.convolve(logs, np.ones(k) / k, mode="valid")
        d.line([(xs(i + k - 1), bottom - (bottom - top) * (v - lo) / (hi - lo)) for i, v in enumerate(smooth)],
               fill=(40, 90, 200), width=2)
        d.text((4, top), f"{10 ** hi:.3g}", fill=(40, 90, 200))
        d.text((4, bottom - 10), f"{10 ** lo:.3g}", fill=(40, 90, 200))
    psnrs = [noisy_psnr] + [v["psnr"] for v in validations]
    lo, hi = min(psnrs) - 0.5, max(psnrs) + 0.5
    points = [(xs(0), noisy_psnr)] + [(xs(v["step"]), v["psnr"]) for v in validations]
    points = [(x, bottom - (bottom - top) * (p - lo) / (hi - lo)) for x, p in points]
    if len(points) > 1:
        d.line(points, fill=(200, 40, 40), width=2)
    for x, y in points:
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(200, 40, 40))
    d.text((right + 4, top), f"{hi:.1f}", fill=(200, 40, 40))
    d.text((right + 4, bottom - 10), f"{lo:.1f}", fill=(200, 40, 40))
    return img


# ---------------------------------------------------------------- the command

COMMAND = "denoise"
HELP = "train the ray-tracing denoiser U-Net on path-traced renders and show what it learnt"
FLAGS = dict(out="denoise-out", size=48, size_help="image side in pixels, divisible by 2**depth", distributed=True)


def add_arguments(p) -> None:
    p.add_argument("--epochs", type=integer(1), default=80, help="passes over the current training set (default 80)")
    p.add_argument("--width", type=integer(1), default=12, help="channels of the U-Net's first stage (default 12)")
    p.add_argument("--depth", type=integer(1), default=2, help="U-Net encoder stages (default 2)")
    p.add_argument("--scenes", type=integer(1), default=32, help="training images rendered per refresh (default 32)")
    p.add_argument("--batch", type=integer(1), default=4, help="images per training step, at most --scenes (default 4)")
    p.add_argument("--spp", type=integer(1), default=2, help="samples per pixel of the noisy input (default 2)")
    p.add_argument("--clean-spp", type=integer(1), default=128,
                   help="samples per pixel of the clean training target (default 128; held-out targets get at least 512)")
    p.add_argument("--refresh-every", type=integer(1), default=10,
                   help="render new training scenes and validate every K epochs (default 10)")
    p.add_argument("--halve-every", type=integer(1), default=40,
                   help="halve the learning rate every M epochs (default 40)")
    p.add_argument("--lr", type=number(0, above=True), default=3e-3, help="Adam's initial learning rate (default 0.003)")
    p.add_argument("--log-weight", type=number(0), default=0.5,
                   help="weight of the Laplacian-of-Gaussian loss against the RGB loss (default 0.5)")
    p.add_argument("--test", type=integer(1), default=8, help="held-out scenes denoised at the end (default 8)")


def check_arguments(args) -> str | None:
    """What the flags' types cannot see alone."""
    if args.size % 2**args.depth:
        return f"argument --size: expected a multiple of 2**depth = {2**args.depth} (--depth {args.depth}), " \
               f"got {args.size}"
    if args.batch > args.scenes:
        return f"argument --batch: expected at most --scenes = {args.scenes}, got {args.batch}"
    return None


def run(args) -> int:
    """Train, save, reload (on another backend if present), denoise held-out renders, write the pictures.

    Returns 0, or 130 when Ctrl-C cut training short (what was learnt is still saved and shown).
    With --distributed, every rank trains and rank 0 alone does the rest.
    """
    if args.distributed:
        mm.distributed.init()  # before the device: a process picks its GPU by its rank on its host
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    announce_autocast(args)
    result = train_denoiser(args.device, size=args.size, width=args.width, depth=args.depth, epochs=args.epochs,
                            scenes=args.scenes, batch=args.batch, spp=args.spp, clean_spp=args.clean_spp,
                            refresh_every=args.refresh_every, halve_every=args.halve_every, lr=args.lr,
                            log_weight=args.log_weight, validation=args.test, seed=args.seed,
                            progress=args.progress, steps=args.steps, distributed=args.distributed,
                            autocast=args.autocast)
    if mm.distributed.rank() != 0:
        return 130 if result["interrupted"] else 0
    if result["interrupted"]:
        print(f"interrupted after {len(result['steps'])} steps: saving and showing what was learnt", file=sys.stderr)
    net, dev = result["net"], result["device"]

    # Save the inference graph (with Adam's state, so training could resume), then deploy the saved file.
    deploy = Denoiser(net, args.test, args.size)
    model_path = out / "denoiser.zip"
    mm.save(model_path, deploy.graph, optimizer=result["optimizer"], outputs={"rgb": deploy.output}, module=net)
    target = other_backend(dev)
    model = mm.load(model_path, device=target)

    test = Renders(dev, TEST_SEEDS + np.arange(args.test), args.size, args.spp, max(args.clean_spp, 512),
                   noise_seed=3)
    feed = test.feed(slice(None))
    del feed["clean"]
    denoised = model.run(feed)["rgb"]
    before, after = psnr(test.noisy, test.clean), psnr(denoised, test.clean)

    for i in range(len(test)):
        triptych(test.noisy[i], denoised[i], test.clean[i]).save(out / f"triptych-{i}.png")
    loss_curve(result["steps"], result["validations"], result["noisy_psnr"]).save(out / "loss.png")

    t = result["timings"]
    ranks = f"{mm.distributed.size()} ranks of " if mm.distributed.size() > 1 else ""
    print(f"trained {len(result['steps'])} steps on {ranks}{dev.name}{autocast_note(args)} in {t['train']:.0f} s "
          f"({t['render']:.0f} s of it rendering); deployed on {target}")
    print(f"PSNR on {len(test)} held-out renders ({args.spp} spp vs {max(args.clean_spp, 512)} spp): "
          f"noisy {before:.2f} dB -> denoised {after:.2f} dB ({after - before:+.2f} dB)")
    print(f"wrote {model_path}, {out / 'loss.png'} and {len(test)} triptychs (noisy | denoised | clean) "
          f"to {out}/ in {time.perf_counter() - t0:.0f} s")
    return 130 if result["interrupted"] else 0
