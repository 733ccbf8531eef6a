"""Training steps of DESIGN §8 — style transfer, U-Net denoiser, DCGAN — the MLP GAN, and the
full-size style-transfer and U-Net networks, against PyTorch.

Each is timed beside the same networks in PyTorch in the same run, with its peak temporary memory
with and without lifetime planning. All but the DCGAN are the demonstration apps' own networks
(mlmetal/apps); no app has a DCGAN, so its networks are defined here.

    python benchmarks/bench_training.py                       # the apps' four, sizes to suit the device
    python benchmarks/bench_training.py --only style-full,unet-full   # the networks at their real size
    python benchmarks/bench_training.py --only unet --size 128 --steps 20
    MLMETAL_DEVICE=cuda python benchmarks/bench_training.py --profile --precision high
    MLMETAL_DEVICE=cuda python benchmarks/bench_training.py --only style-full,unet-full --autocast bfloat16

Shapes (DESIGN §8): style transfer batch 4 of size² images (the app's transformer and frozen
loss network, style loss at three layers, content loss at one); U-Net batch 4 of 9 channels,
size² (the app's UNet, width 16, depth 2, L1 plus Laplacian-of-Gaussian L1); DCGAN batch 64 of
1×28×28 (generator: a latent of 100, linear to 128×7×7, then two 4×4 stride-2 padding-1
transposed convs, 128 → 64 → 1 channels, each doubling the image, batch norm and ReLU between,
tanh last, as the standard DCGAN; discriminator: two 4×4 stride-2 convs, 1 → 64 → 128 channels,
batch norm on the second, LeakyReLU 0.2, a linear logit; a conv followed by batch norm has no
bias, which the norm would cancel); MLP GAN batch 64 of the
digits' 8×8 (the app's fully connected generator and discriminator); full-size style transfer,
batch 4 of size² images: Johnson et al.'s transformer (9×9 outer convolutions, two stride-2
stages, five residual blocks of 128 channels, two upsampling stages) against VGG16's layers up to
relu3_3 (random filters, frozen; style at relu1_2, relu2_2, relu3_3, content at relu2_2);
full-size U-Net, batch 4 of 9 channels, size², width 32, depth 3. A GAN step
is one discriminator step and one generator step, each its own training graph, with the
discriminator frozen in the generator's, as mlmetal/apps/gan.py trains. Adam everywhere
(β₁ = 0.5 for the GANs).

Both sides get their inputs on the device before timing (mlmetal: device tensors bound to the
graph inputs; the GANs' latents are drawn on the device by both). An mlmetal step returns its
loss as a Python float, so it waits for the device every step; the PyTorch loop synchronises
only at the end of each round, its best case. On a GPU, mlmetal runs under each matmul precision
policy (`highest`, `high`, `medium`; `--precision` picks some) and PyTorch in FP32 with TF32 off,
with TF32 on (its default convolution math) and under bf16 autocast, cudnn.benchmark on (it picks
its fastest convolution algorithms during the warm-up step), torch.optim.Adam's defaults; on cpu
both in float32. Each time is the best of 3 rounds of `--steps` steps, after one warm-up step;
ratios are PyTorch's time over mlmetal's (> 1: mlmetal is faster): each policy against its peer
(highest/FP32, high/TF32, medium/bf16), and mlmetal's best against PyTorch's fastest setting.

`--autocast bfloat16` (or float16) also builds each mlmetal training graph under `mm.autocast`
(Graph(compute_dtype=)) and times it under the first precision policy, beside PyTorch's bf16
autocast (run on cpu too, then); the ratio is PyTorch bf16 over mlmetal's autocast. It prints the
peak temporaries of the float32 and the autocast steps (the plans' intermediate buffers, planned)
and their ratio. A workload whose autocast graph cannot be built or run says why in its row.

`--profile` (cuda, with PyTorch): a few more mlmetal steps under torch.profiler, whose CUDA
activity (CUPTI) records every kernel of the process, mlmetal's NVRTC kernels included; prints
the kernels taking the most device time and the device time per step against the wall time.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import numpy as np

import mlmetal as mm
from mlmetal.apps import denoise, gan, style
from mlmetal.reference.pool import log_taps
from timing import best_seconds

WORKLOADS = ("style", "unet", "dcgan", "gan", "style-full", "unet-full")
UNET = {"unet": (16, 2), "unet-full": (32, 3)}  # width, depth
LOG_WEIGHT = 0.5
# Johnson et al.'s transformer, and VGG16 up to relu3_3 with its style and content layers
JOHNSON = dict(width=32, blocks=5, stages=2, outer_kernel=9)
VGG16 = [("conv1_1", 64), ("conv1_2", 64), "pool", ("conv2_1", 128), ("conv2_2", 128), "pool",
         ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)]
STYLE_NETS = {"style": (dict(), style.LOSS_LAYERS, style.STYLE_LAYERS, style.CONTENT_LAYER),
              "style-full": (JOHNSON, VGG16, ("conv1_2", "conv2_2", "conv3_3"), "conv2_2")}
STYLE_WEIGHT, CONTENT_WEIGHT = 30.0, 1.0
DCGAN_LATENT, DCGAN_LR = 100, 2e-4


# ---------------------------------------------------------------- mlmetal

def peak_bytes(trainings, plan_lifetimes: bool) -> int:
    """Temporary memory of the training steps' plans, summed (each plan keeps its own buffers)."""
    return sum(t.graph.plan((t.loss, *t.param_grads.values()), plan_lifetimes=plan_lifetimes, updates=True).peak_bytes
               for t in trainings)


def mlmetal_unet(dev, batch, size, name="unet", autocast=None):
    """The denoiser app's UNet and training graph (built under `autocast`, a dtype or None); returns (step, trainings)."""
    mm.nn.seed(0)
    net = denoise.UNet(*UNET[name], dev)
    train = denoise.training_graph(net, batch, size, lr=1e-3, log_weight=LOG_WEIGHT, autocast=autocast)
    rng = np.random.default_rng(0)
    feed = {name: mm.tensor(rng.random((batch, 3, size, size), np.float32), dev)
            for name in ("noisy", "albedo", "normal", "clean")}
    return lambda: train.step(**feed), [train]


def mlmetal_style(dev, batch, size, name="style", autocast=None):
    """The style app's transformer and loss network (or the full-size ones), with StyleTransfer's
    losses over a batch of contents (the training graph built under `autocast`)."""
    mm.nn.seed(0)
    shape, layers, style_layers, content_layer = STYLE_NETS[name]
    transformer, loss_net = style.Transformer(dev, **shape), style.LossNetwork(dev, layers=layers)
    alpha = style.StyleTransfer._alpha
    g = mm.Graph(dev)
    feats = loss_net.features(g.input("style", (1, 3, size, size)))
    grams = g.run({"style": style.default_style(size)[None]},
                  outputs=[mm.ops.gram(feats[n], alpha=alpha(feats[n])) for n in style_layers])

    g = mm.Graph(dev, compute_dtype=autocast)
    x = g.input("content", (batch, 3, size, size))
    fy, fx = loss_net.features(transformer(x)), loss_net.features(x)
    style_loss = None
    for n, t in zip(style_layers, grams):
        term = mm.ops.mse_loss(mm.ops.gram(fy[n], alpha=alpha(fy[n])), mm.tensor(np.repeat(t, batch, 0), dev))
        style_loss = term if style_loss is None else style_loss + term
    target = fx[content_layer]
    target.stop_gradient = True
    content_loss = mm.ops.mse_loss(fy[content_layer], target)
    total = STYLE_WEIGHT * style_loss + CONTENT_WEIGHT * content_loss
    train = total.training_graph(optimizer=mm.optim.Adam(transformer.parameters(), lr=1e-2))
    content = mm.tensor(np.repeat(style.default_content(size)[None], batch, 0), dev)
    return lambda: train.step(content=content), [train]


def adversarial_step(model, dev):
    """(step, trainings) of a gan.GAN: one discriminator step on a fixed real batch in [-1, 1], then one generator step."""
    real = mm.tensor(np.random.default_rng(0).uniform(-1, 1, (model.batch, 1, model.size, model.size)).astype(np.float32), dev)

    def step():
        model.train_d.step(real=real)
        model.train_g.step()
    return step, [model.train_d, model.train_g]


def mlmetal_gan(dev, batch, size, autocast=None):
    """The GAN app's two training graphs: one discriminator step, then one generator step."""
    mm.nn.seed(0)
    return adversarial_step(gan.GAN(dev, batch, autocast=autocast), dev)


class DCGenerator(mm.nn.Module):
    """z (N, 100) → linear to 128×7×7 → two 4×4 stride-2 transposed convs → a tanh image (N, 1, 28, 28)."""

    def __init__(self, device):
        self.project = mm.nn.Linear(DCGAN_LATENT, 128 * 7 * 7, device=device)
        self.body = mm.nn.Sequential(
            mm.nn.BatchNorm2d(128, device=device), mm.nn.ReLU(),
            mm.nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1, bias=False, device=device),
            mm.nn.BatchNorm2d(64, device=device), mm.nn.ReLU(),
            mm.nn.ConvTranspose2d(64, 1, 4, stride=2, padding=1, device=device), mm.nn.Tanh())

    def forward(self, z):
        return self.body(self.project(z).reshape(z.shape[0], 128, 7, 7))


class DCDiscriminator(mm.nn.Module):
    """(N, 1, 28, 28) → two 4×4 stride-2 convs (64, 128 channels) → one logit (N, 1)."""

    def __init__(self, device):
        self.body = mm.nn.Sequential(
            mm.nn.Conv2d(1, 64, 4, stride=2, padding=1, device=device), mm.nn.LeakyReLU(0.2),
            mm.nn.Conv2d(64, 128, 4, stride=2, padding=1, bias=False, device=device),
            mm.nn.BatchNorm2d(128, device=device), mm.nn.LeakyReLU(0.2))
        self.logit = mm.nn.Linear(128 * 7 * 7, 1, device=device)

    def forward(self, x):
        return self.logit(self.body(x).flatten(1))


def mlmetal_dcgan(dev, batch, size, autocast=None):
    """gan.GAN's two training graphs around DCGenerator and DCDiscriminator."""
    mm.nn.seed(0)
    return adversarial_step(gan.GAN(dev, batch, lr=DCGAN_LR, size=28, generator=DCGenerator(dev),
                                    discriminator=DCDiscriminator(dev), latent=DCGAN_LATENT, autocast=autocast), dev)


# ---------------------------------------------------------------- PyTorch

def torch_unet(torch, dev, batch, size, autocast, name="unet"):
    """denoise.UNet and its loss in PyTorch."""
    nn, F = torch.nn, torch.nn.functional
    torch.manual_seed(0)
    width, depth = UNET[name]

    def pairs(channels):
        return nn.Sequential(*[m for cin, cout in zip(channels, channels[1:])
                               for m in (nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())])

    widths = [width * 2**i for i in range(depth + 1)]
    encoder = nn.ModuleList(pairs([denoise.CHANNELS if i == 0 else widths[i - 1]] + [widths[i]] * 3)
                            for i in range(depth))
    bottleneck = pairs([widths[-2], widths[-1], widths[-1]])
    decoder = nn.ModuleList(pairs([widths[i + 1] + widths[i], widths[i], widths[i]])
                            for i in reversed(range(depth)))
    head = nn.Conv2d(width, 3, 1)
    net = nn.ModuleList([encoder, bottleneck, decoder, head]).to(dev)
    taps = torch.tensor(log_taps(1.0, 5), dtype=torch.float32, device=dev).expand(3, 1, 5, 5)

    def log_filter(x):
        return F.conv2d(x, taps, padding=2, groups=3)

    def forward(noisy, albedo, normal):
        x, skips = torch.cat([noisy, albedo, normal], 1), []
        for stage in encoder:
            x = stage(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = bottleneck(x)
        for stage, skip in zip(decoder, reversed(skips)):
            x = stage(torch.cat([F.interpolate(x, scale_factor=2), skip], 1))
        return head(x) + noisy

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    noisy, albedo, normal, clean = torch.rand(4, batch, 3, size, size, device=dev)

    def step():
        opt.zero_grad()
        with autocast():
            out = forward(noisy, albedo, normal)
            loss = F.l1_loss(out, clean) + LOG_WEIGHT * F.l1_loss(log_filter(out), log_filter(clean))
        loss.backward()
        opt.step()
    return step


def torch_style(torch, dev, batch, size, autocast, name="style"):
    """style.Transformer and style.LossNetwork (random filters, frozen) with the same losses in PyTorch."""
    nn, F = torch.nn, torch.nn.functional
    torch.manual_seed(0)
    shape, layers, style_layers, content_layer = STYLE_NETS[name]
    shape = dict(dict(width=16, blocks=2, stages=1, outer_kernel=3), **shape)

    def conv_norm_relu(cin, cout, stride=1, kernel=3):
        return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.InstanceNorm2d(cout, affine=True), nn.ReLU()]

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(*conv_norm_relu(c, c), nn.Conv2d(c, c, 3, padding=1),
                                      nn.InstanceNorm2d(c, affine=True))

        def forward(self, x):
            return x + self.body(x)

    widths = [shape["width"] * 2**i for i in range(shape["stages"] + 1)]
    k = shape["outer_kernel"]
    transformer = nn.Sequential(
        *conv_norm_relu(3, widths[0], kernel=k),
        *(m for cin, cout in zip(widths, widths[1:]) for m in conv_norm_relu(cin, cout, 2)),
        *(Residual(widths[-1]) for _ in range(shape["blocks"])),
        *(m for cin, cout in zip(widths[::-1], widths[-2::-1]) for m in (nn.Upsample(scale_factor=2), *conv_norm_relu(cin, cout))),
        nn.Conv2d(widths[0], 3, k, padding=k // 2), nn.Sigmoid()).to(dev)
    convs, cin = {}, 3
    for layer in layers:
        if layer != "pool":
            convs[layer[0]] = nn.Conv2d(cin, layer[1], 3, padding=1).to(dev).requires_grad_(False)
            cin = layer[1]

    def features(x, last=None):
        out = {}
        for layer in layers:
            if layer == "pool":
                x = F.avg_pool2d(x, 2)
                continue
            x = out[layer[0]] = F.relu(convs[layer[0]](x))
            if layer[0] == last:
                break
        return out

    def gram(f):
        n, c, h, w_ = f.shape
        f = f.reshape(n, c, h * w_)
        return torch.bmm(f, f.transpose(1, 2)) / (h * w_)

    with torch.no_grad():
        fs = features(torch.from_numpy(style.default_style(size)[None]).to(dev))
        targets = [gram(fs[n]).expand(batch, -1, -1) for n in style_layers]
    content = torch.from_numpy(style.default_content(size)[None]).to(dev).repeat(batch, 1, 1, 1)
    opt = torch.optim.Adam(transformer.parameters(), lr=1e-2)

    def step():
        opt.zero_grad()
        with autocast():
            fy = features(transformer(content))
            with torch.no_grad():
                fx = features(content, last=content_layer)
            style_loss = sum(F.mse_loss(gram(fy[n]).float(), t) for n, t in zip(style_layers, targets))
            loss = STYLE_WEIGHT * style_loss + CONTENT_WEIGHT * F.mse_loss(fy[content_layer], fx[content_layer])
        loss.backward()
        opt.step()
    return step


def torch_adversarial_step(torch, G, D, real, latent, lr, autocast):
    """gan.GAN's training turns in PyTorch: a discriminator step on `real` and a fresh fake batch,
    then a generator step with the discriminator frozen (no discriminator weight gradient)."""
    F = torch.nn.functional
    batch, dev = real.shape[0], real.device
    opt_g = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999))
    ones, zeros = torch.ones(batch, 1, device=dev), torch.zeros(batch, 1, device=dev)

    def step():
        with torch.no_grad(), autocast():
            fake = G(torch.randn(batch, latent, device=dev))
        with autocast():
            d_loss = (F.binary_cross_entropy_with_logits(D(real), ones)
                      + F.binary_cross_entropy_with_logits(D(fake), zeros))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        D.requires_grad_(False)
        with autocast():
            g_loss = F.binary_cross_entropy_with_logits(D(G(torch.randn(batch, latent, device=dev))), ones)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        D.requires_grad_(True)
    return step


def torch_dcgan(torch, dev, batch, size, autocast):
    """DCGenerator and DCDiscriminator in PyTorch, trained in gan.GAN's turns."""
    nn = torch.nn
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(DCGAN_LATENT, 128 * 7 * 7), nn.Unflatten(1, (128, 7, 7)),
                      nn.BatchNorm2d(128), nn.ReLU(),
                      nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Tanh()).to(dev)
    D = nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.2),
                      nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
                      nn.Flatten(), nn.Linear(128 * 7 * 7, 1)).to(dev)
    real = torch.rand(batch, 1, 28, 28, device=dev) * 2 - 1
    return torch_adversarial_step(torch, G, D, real, DCGAN_LATENT, DCGAN_LR, autocast)


def torch_gan(torch, dev, batch, size, autocast):
    """gan.Generator and gan.Discriminator in PyTorch, trained in gan.GAN's turns."""
    nn = torch.nn
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(gan.LATENT, 128), nn.LeakyReLU(0.2), nn.Linear(128, 256), nn.LeakyReLU(0.2),
                      nn.Linear(256, 64), nn.Tanh()).to(dev)
    D = nn.Sequential(nn.Linear(64, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)).to(dev)
    real = torch.rand(batch, 64, device=dev) * 2 - 1
    return torch_adversarial_step(torch, G, D, real, gan.LATENT, 1e-3, autocast)


BUILD = {"style": (mlmetal_style, torch_style), "unet": (mlmetal_unet, torch_unet),
         "dcgan": (mlmetal_dcgan, torch_dcgan), "gan": (mlmetal_gan, torch_gan),
         "style-full": (mlmetal_style, torch_style), "unet-full": (mlmetal_unet, torch_unet)}


def describe(name, batch, size):
    return {"style": f"style transfer, batch {batch}, 3×{size}²",
            "unet": f"U-Net denoiser, batch {batch}, 9×{size}²",
            "dcgan": f"DCGAN, batch {batch}, 1×28²",
            "gan": f"MLP GAN, batch {batch}, 1×8²",
            "style-full": f"Johnson + VGG16, batch {batch}, {size}²",
            "unet-full": f"U-Net 32×3, batch {batch}, 9×{size}²"}[name]


# ---------------------------------------------------------------- autocast

PEERS = {"highest": "fp32", "high": "tf32", "medium": "bf16", "bf16-ac": "bf16", "f16-ac": "bf16"}
AUTOCAST_COLUMN = {"bfloat16": "bf16-ac", "float16": "f16-ac"}


def time_autocast(build_mlmetal, dev, batch, size, extra, dtype, policy, steps, planned):
    """Build and time a workload's training steps under `mm.autocast(dtype)` (a graph's compute_dtype);
    (seconds per step or None, the peak-temporaries text: autocast vs float32 `planned` bytes, or why it failed,
    the step or None)."""
    try:
        step, trainings = build_mlmetal(dev, batch, size, autocast=dtype, **extra)
        low = peak_bytes(trainings, True)
        with mm.matmul_precision(policy):
            seconds = best_seconds(lambda n: [step() for _ in range(n)], steps, 3)
    except Exception as e:  # noqa: BLE001 — an op without low-precision kernels yet: report it in the row, go on
        return None, f"; {dtype} autocast failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", None
    return seconds, f"; {dtype} autocast {low / 2**20:.1f} MiB ({low / planned:.2f}× float32's)", step


def time_unfused(build_mlmetal, dev, batch, size, extra, policy, autocast, steps, t_mm):
    """`--fusion both`: the workload's steps under `policy` (and `autocast`) built with mm.Graph.fuse
    off, as text: their times and how much faster the fused ones in `t_mm` were."""
    mm.Graph.fuse = False
    try:
        times = {}
        for dtype in (None, autocast) if autocast else (None,):
            step, _ = build_mlmetal(dev, batch, size, **({"autocast": dtype} if dtype else {}), **extra)
            with mm.matmul_precision(policy):
                times[AUTOCAST_COLUMN[dtype] if dtype else policy] = best_seconds(lambda n: [step() for _ in range(n)], steps, 3)
    finally:
        mm.Graph.fuse = True
    return "; unfused " + ", ".join(f"{k} {t * 1e3:.2f} ms (fused {t / t_mm[k]:.2f}× faster)" for k, t in times.items()
                                    if k in t_mm)


# ---------------------------------------------------------------- profile

def profile(torch, step, sync, steps: int):
    """Run `steps` mlmetal steps under torch.profiler; print the top kernels and device vs wall time per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not device_events:
        print(f"  profiler: no CUDA kernels recorded (CUPTI unavailable or not tracing this process's launches); "
              f"wall {wall * 1e3:.2f} ms/step")
        return
    totals, counts = defaultdict(float), defaultdict(int)
    for e in device_events:
        totals[e.name] += e.time_range.elapsed_us()
        counts[e.name] += 1
    copies = sum(t for n, t in totals.items() if n.startswith(("Memcpy", "Memset")))
    busy = sum(totals.values())
    kernels = busy - copies
    print(f"  profiled {steps} steps: kernels {kernels / steps / 1e3:.2f} ms/step, copies and memsets "
          f"{copies / steps / 1e3:.2f} ms/step, {sum(counts.values()) / steps:.0f} device activities/step; "
          f"wall {wall * 1e3:.2f} ms/step (device busy {busy / 1e3 / steps / (wall * 1e3):.0%} of it)")
    print(f"  {'kernel':<44} {'calls/step':>10} {'ms/step':>8} {'share':>6}")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[:24]:
        print(f"  {name[:44]:<44} {counts[name] / steps:>10.1f} {t / steps / 1e3:>8.3f} {t / busy:>6.1%}")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu, cuda or metal (default: MLMETAL_DEVICE or the best present)")
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"comma-separated workloads of {', '.join(WORKLOADS)}")
    ap.add_argument("--size", type=int, default=None,
                    help="image side of style and unet, divisible by 4 (default 256 on gpus, 64 on cpu); "
                         "the GANs' images are fixed: 28×28 for the DCGAN, the digits' 8×8 for the MLP GAN")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed round (default 10 on gpus, 3 on cpu)")
    ap.add_argument("--profile", action="store_true", help="profile mlmetal's steps with torch.profiler (cuda)")
    ap.add_argument("--precision", default=None,
                    help="comma-separated matmul precision policies to run mlmetal under (default: all three on a GPU, "
                         "highest on cpu)")
    ap.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                    help="also time mlmetal's steps built under mm.autocast of this dtype, beside PyTorch's bf16 "
                         "autocast, and compare their peak temporaries with float32's")
    ap.add_argument("--fusion", choices=("on", "off", "both"), default="on",
                    help="fuse each conv2d and instance_norm into the relu after it, and each relu_grad into the "
                         "input gradient before it (mm.Graph.fuse); both: also time mlmetal's steps unfused, in "
                         "the same run")
    args = ap.parse_args()
    mm.Graph.fuse = args.fusion != "off"
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    dev = mm.device(args.device)
    on_cpu = dev.name == "cpu"
    size = args.size or (64 if on_cpu else 256)
    if size % 8:
        ap.error(f"--size must be divisible by 8 (the full U-Net pools three times), got {size}")
    steps = args.steps or (3 if on_cpu else 10)
    policies = [p.strip() for p in (args.precision or ("highest" if on_cpu else "highest,high,medium")).split(",")]
    for p in policies:
        if p not in ("highest", "high", "medium"):
            ap.error(f"--precision: {p!r} is not a matmul precision policy (highest, high, medium)")
    batches = {"style": 4, "unet": 4, "dcgan": 64, "gan": 64, "style-full": 4, "unet-full": 4}

    try:
        import torch
    except ImportError:
        torch = None
    tdev = "cuda" if dev.name == "cuda" else "cpu"
    modes = ["fp32", "tf32", "bf16"] if torch is not None and tdev == "cuda" else ["fp32"] if torch is not None else []
    if args.autocast and torch is not None and "bf16" not in modes:
        modes.append("bf16")  # autocast's peer, on cpu too
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        tsync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
        ref = f"PyTorch {torch.__version__} ({tdev}, {', '.join(m.upper() for m in modes)}{', cudnn.benchmark on' if tdev == 'cuda' else ''})"
    else:
        ref = "PyTorch is not installed: no reference timing"
    ac = f"{args.autocast} autocast under {policies[0]}" if args.autocast else ""
    print(f"training steps on mlmetal {dev.name} under {', '.join(policies)}{'; ' + ac if ac else ''}"
          f"{'; relus unfused' if args.fusion == 'off' else ''}; {ref}; "
          f"best of 3 rounds of {steps} steps; times in ms")
    columns = policies + ([AUTOCAST_COLUMN[args.autocast]] if args.autocast else [])
    head = "".join(f"{'mlm ' + p:>12}" for p in columns) + "".join(f"{'torch ' + m:>12}" for m in modes)
    ratios = "".join(f"{p + '/' + PEERS[p]:>14}" for p in columns if PEERS[p] in modes) + \
        (f"{'best/best':>11}" if modes else "")
    memory = "peak temporaries, planned vs not" + (f"; {args.autocast} autocast vs float32" if args.autocast else "")
    print(f"{'workload':<32}{head}{ratios}   {memory}")
    profiles = []
    for name in only:
        batch = batches[name]
        build_mlmetal, build_torch = BUILD[name]
        extra = {"name": name} if name in UNET or name in STYLE_NETS else {}
        step, trainings = build_mlmetal(dev, batch, size, **extra)
        t_mm = {}
        for policy in policies:
            with mm.matmul_precision(policy):
                t_mm[policy] = best_seconds(lambda n: [step() for _ in range(n)], steps, 3)
        planned, unplanned = peak_bytes(trainings, True), peak_bytes(trainings, False)
        low_memory, low_step = "", None
        if args.autocast:
            t_low, low_memory, low_step = time_autocast(build_mlmetal, dev, batch, size, extra, args.autocast, policies[0],
                                              steps, planned)
            if t_low is not None:
                t_mm[AUTOCAST_COLUMN[args.autocast]] = t_low
        unfused = time_unfused(build_mlmetal, dev, batch, size, extra, policies[0], args.autocast, steps, t_mm) \
            if args.fusion == "both" else ""
        t_pt = {}
        for mode in modes:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
            autocast = lambda m=mode: torch.autocast(tdev, dtype=torch.bfloat16, enabled=m == "bf16")  # noqa: E731
            torch_step = build_torch(torch, tdev, batch, size, autocast, **extra)

            def run_torch(n):
                for _ in range(n):
                    torch_step()
                tsync()
            t_pt[mode] = best_seconds(run_torch, steps, 3)
            del torch_step
        cells = "".join(f"{t_mm[p] * 1e3:>12.2f}" if p in t_mm else f"{'-':>12}" for p in columns) + \
            "".join(f"{t * 1e3:>12.2f}" for t in t_pt.values())
        peer = "".join(f"{t_pt[PEERS[p]] / t_mm[p]:>13.2f}×" if p in t_mm else f"{'-':>14}"
                       for p in columns if PEERS[p] in t_pt)
        best = f"{min(t_pt.values()) / min(t_mm.values()):>10.2f}×" if t_pt else ""
        print(f"{describe(name, batch, size):<32}{cells}{peer}{best}   "
              f"{planned / 2**20:.1f} vs {unplanned / 2**20:.1f} MiB ({unplanned / planned:.1f}× less){low_memory}{unfused}",
              flush=True)
        profiles.append((name, batch, step, low_step))
    if not args.profile:
        return
    if torch is None or dev.name != "cuda" or not torch.cuda.is_available():
        print("--profile needs PyTorch with CUDA and the cuda backend: no profile")
        return
    for name, batch, step, low_step in profiles:
        for policy in policies:
            print(f"\nprofile of mlmetal's {describe(name, batch, size)} under {policy}:")
            with mm.matmul_precision(policy):
                profile(torch, step, dev.synchronize, max(3, math.ceil(steps / 2)))
        if low_step is not None:
            print(f"\nprofile of mlmetal's {describe(name, batch, size)} under {args.autocast} autocast, {policies[0]}:")
            with mm.matmul_precision(policies[0]):
                profile(torch, low_step, dev.synchronize, max(3, math.ceil(steps / 2)))


if __name__ == "__main__":
    main()
