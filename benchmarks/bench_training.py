"""Training-step benchmark: a small U-Net denoiser step, its peak memory with and without
lifetime planning, and its time beside PyTorch's same network (where PyTorch is installed).

    python benchmarks/bench_training.py --size 64 --batch 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mlmetal as mm


def unet(dev, x, width):
    """Encoder stage (conv+ReLU ×2, max pool), bottleneck, decoder stage (upsample, skip, conv+ReLU ×2)."""
    mm.nn.seed(0)
    enc = mm.nn.Sequential(mm.nn.Conv2d(x.shape[1], width, 3, padding=1, device=dev), mm.nn.ReLU(),
                           mm.nn.Conv2d(width, width, 3, padding=1, device=dev), mm.nn.ReLU())
    mid = mm.nn.Sequential(mm.nn.Conv2d(width, 2 * width, 3, padding=1, device=dev), mm.nn.ReLU())
    dec = mm.nn.Sequential(mm.nn.Conv2d(3 * width, width, 3, padding=1, device=dev), mm.nn.ReLU(),
                           mm.nn.Conv2d(width, 3, 3, padding=1, device=dev))
    skip = enc(x)
    up = mm.ops.upsample(mid(mm.ops.max_pool2d(skip, 2)), 2)
    out = dec(mm.ops.concat([up, skip]))
    return out, enc.parameters() + mid.parameters() + dec.parameters()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="image side (default 64 on cpu, 256 on gpus)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev = mm.device(args.device)
    size = args.size or (64 if dev.name == "cpu" else 256)
    shape = (args.batch, 9, size, size)
    g = mm.Graph(dev)
    x = g.input("x", shape)
    target = g.input("target", (args.batch, 3, size, size))
    out, params = unet(dev, x, args.width)
    loss = mm.ops.mse_loss(out, target, reduction="mean")
    train = loss.training_graph(optimizer=mm.optim.Adam(params, lr=1e-3))
    rng = np.random.default_rng(0)
    batch = {"x": rng.random(shape, np.float32), "target": rng.random(target.shape, np.float32)}
    train.step(**batch)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train.step(**batch)
    t = (time.perf_counter() - t0) / args.steps
    outputs = (train.loss, *train.param_grads.values())
    planned = g.plan(outputs, updates=True).peak_bytes
    unplanned = g.plan(outputs, plan_lifetimes=False, updates=True).peak_bytes
    print(f"U-Net step on {dev.name}, batch {args.batch}, 9×{size}×{size}, width {args.width}: {t * 1e3:.1f} ms")
    print(f"peak temporary memory: {planned / 2**20:.1f} MiB planned vs {unplanned / 2**20:.1f} MiB without "
          f"lifetime planning ({unplanned / planned:.1f}× less)")
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: no reference timing")
        return
    tdev = "cuda" if dev.name == "cuda" else "cpu"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    w = args.width
    enc = torch.nn.Sequential(torch.nn.Conv2d(9, w, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(w, w, 3, padding=1),
                              torch.nn.ReLU()).to(tdev)
    mid = torch.nn.Sequential(torch.nn.Conv2d(w, 2 * w, 3, padding=1), torch.nn.ReLU()).to(tdev)
    dec = torch.nn.Sequential(torch.nn.Conv2d(3 * w, w, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(w, 3, 3, padding=1)).to(tdev)
    opt = torch.optim.Adam([*enc.parameters(), *mid.parameters(), *dec.parameters()], lr=1e-3)
    xt, tt = torch.from_numpy(batch["x"]).to(tdev), torch.from_numpy(batch["target"]).to(tdev)

    def step():
        opt.zero_grad()
        s = enc(xt)
        up = torch.nn.functional.interpolate(mid(torch.nn.functional.max_pool2d(s, 2)), scale_factor=2)
        lo = torch.nn.functional.mse_loss(dec(torch.cat([up, s], 1)), tt)
        lo.backward()
        opt.step()
        return lo

    step()
    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    tt_ = (time.perf_counter() - t0) / args.steps
    print(f"PyTorch {torch.__version__} ({tdev}, FP32, TF32 off): {tt_ * 1e3:.1f} ms; ratio {tt_ / t:.2f} (> 1: mlmetal faster)")


if __name__ == "__main__":
    main()
