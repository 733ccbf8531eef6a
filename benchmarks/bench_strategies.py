"""Command-buffer strategies on a ResNet-style classifier's training step (32×32 synthetic inputs):

- one:      one command buffer per iteration, committed when fully encoded, then waited on;
- double:   double buffering — two iterations in flight, each with its own plan (buffers), the
            host encoding iteration k+1 while the device runs k;
- continue: `commit_and_continue` every few nodes inside one iteration, so the device starts
            while the host encodes the rest;
- both:     double buffering with commit_and_continue.

Prints throughput and peak temporary memory, writes a PNG chart (drawn with Pillow),
and says whether this run agrees with Apple's finding (WWDC 2019, ResNet-50 on CIFAR-10):
double buffering beats one buffer but costs memory; commit-and-continue comes close to double
buffering's speed with much less memory; both together are fastest.

    python benchmarks/bench_strategies.py --device cuda --batch 64 --width 32 --steps 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mlmetal as mm

STRATEGIES = ("one", "double", "continue", "both")


class Block(mm.nn.Module):
    """x + conv(relu(conv(x))), with a strided 1×1 projection where the shape changes."""

    def __init__(self, cin, cout, stride, dev):
        self.a = mm.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, device=dev)
        self.b = mm.nn.Conv2d(cout, cout, 3, padding=1, device=dev)
        self.skip = mm.nn.Conv2d(cin, cout, 1, stride=stride, device=dev) if (cin, stride) != (cout, 1) else None

    def forward(self, x):
        y = self.b(mm.ops.relu(self.a(x)))
        return mm.ops.relu(mm.ops.add(y, self.skip(x) if self.skip else x))


class ResNet(mm.nn.Module):
    """Stem, three stages of two residual blocks (32², 16², 8²), average pool, 1×1 conv to 10 logits."""

    def __init__(self, width, dev):
        w = width
        self.stem = mm.nn.Conv2d(3, w, 3, padding=1, device=dev)
        self.blocks = [Block(w, w, 1, dev), Block(w, w, 1, dev), Block(w, 2 * w, 2, dev), Block(2 * w, 2 * w, 1, dev),
                       Block(2 * w, 4 * w, 2, dev), Block(4 * w, 4 * w, 1, dev)]
        self.head = mm.nn.Conv2d(4 * w, 10, 1, device=dev)

    def forward(self, x):
        h = mm.ops.relu(self.stem(x))
        for b in self.blocks:
            h = b(h)
        return self.head(mm.ops.avg_pool2d(h, 8))


def build(dev, batch, width):
    mm.nn.seed(0)
    net = ResNet(width, dev)
    g = mm.Graph(dev)
    x = g.input("x", (batch, 3, 32, 32))
    labels = g.input("labels", (batch, 10, 1, 1))
    loss = mm.ops.softmax_cross_entropy_loss(net(x), labels, reduction="mean")
    return loss.training_graph(optimizer=mm.optim.SGD(net.parameters(), lr=0.01, momentum=0.9))


def run_strategy(name, dev, args, batches):
    """Time `args.steps` training steps under one strategy; returns (steps/s, peak temporary bytes, last loss)."""
    train = build(dev, args.batch, args.width)
    outputs = (train.loss, *train.param_grads.values())
    in_flight = 2 if name in ("double", "both") else 1
    plans = [train.graph.plan(outputs, copy=k, updates=True) for k in range(in_flight)]  # buffers per iteration in flight
    commit_every = args.commit_every if name in ("continue", "both") else 0
    pending: list = [None] * in_flight

    def step(k):
        slot = k % in_flight
        if pending[slot] is not None:  # the iteration that last used these buffers must be done
            pending[slot][0].wait()
        train.prepare_step()
        cb = dev.command_buffer()
        values = plans[slot].encode(train.graph.bind_inputs(batches[k % len(batches)]), cb, commit_every)
        cb.commit()
        pending[slot] = (cb, values)
        if in_flight == 1:
            cb.wait()

    step(0)  # warm up: compile kernels, allocate the plans' buffers
    for p in pending:
        if p is not None:
            p[0].wait()
    t0 = time.perf_counter()
    for k in range(1, args.steps + 1):
        step(k)
    for p in pending:
        p[0].wait()
    elapsed = time.perf_counter() - t0
    last = pending[args.steps % in_flight][1][train.loss].numpy()
    return args.steps / elapsed, sum(p.peak_bytes for p in plans), float(last.sum())


NOISE = 1.03  # speed differences under 3% are timing noise on a shared machine


def verdict(r):
    """Apple's three claims, checked against this run's numbers."""
    speed = {k: v[0] for k, v in r.items()}
    mem = {k: v[1] for k, v in r.items()}
    claims = [
        ("double buffering is faster than one buffer (by 3% or more)", speed["double"] > NOISE * speed["one"]),
        ("double buffering costs memory", mem["double"] > mem["one"]),
        ("commit-and-continue comes within 10% of double buffering's speed", speed["continue"] >= 0.9 * speed["double"]),
        ("commit-and-continue uses much less memory than double buffering", mem["continue"] <= 0.6 * mem["double"]),
        ("both together are fastest (within 3%, and 3% faster than one buffer)",
         NOISE * speed["both"] >= max(speed.values()) and speed["both"] > NOISE * speed["one"]),
    ]
    return claims


def chart(r, device, path):
    """Two bar panels, steps per second and peak temporary memory, drawn with Pillow (a
    dependency already) so that every machine that runs the benchmark gets the picture."""
    from PIL import Image, ImageDraw

    names = list(r)
    panels = [("training steps / s", [r[n][0] for n in names], (31, 119, 180)),
              ("peak temporary memory (MiB)", [r[n][1] / 2**20 for n in names], (255, 127, 14))]
    w, h, top, bottom, left = 980, 400, 50, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((w // 2, 18), f"command-buffer strategies, ResNet-style training step on {device}", fill="black", anchor="mm")
    pw = (w - 2 * left) // 2
    for k, (label, values, colour) in enumerate(panels):
        x0, y0, y1 = left + k * (pw + left // 2), top, h - bottom
        d.line([(x0, y0), (x0, y1), (x0 + pw - left // 2, y1)], fill="black")
        d.text((x0, y0 - 14), label, fill="black")
        peak = max(values) or 1.0
        slot = (pw - left // 2) / len(values)
        for i, (n, v) in enumerate(zip(names, values)):
            bx = x0 + i * slot + slot * 0.15
            by = y1 - (y1 - y0 - 20) * v / peak
            d.rectangle([bx, by, bx + slot * 0.7, y1 - 1], fill=colour)
            d.text((bx + slot * 0.35, by - 8), f"{v:.1f}", fill="black", anchor="mm")
            d.text((bx + slot * 0.35, y1 + 12), n, fill="black", anchor="mm")
    img.save(path)
    print(f"chart written to {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=None, help="default 8 on cpu, 64 on gpus")
    ap.add_argument("--width", type=int, default=None, help="channels of the first stage (default 8 on cpu, 32 on gpus)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6 on cpu, 30 on gpus)")
    ap.add_argument("--commit-every", type=int, default=16, help="nodes per commit_and_continue")
    ap.add_argument("--chart", default="bench_strategies.png")
    args = ap.parse_args()
    dev = mm.device(args.device)
    gpu = dev.name != "cpu"
    args.batch = args.batch or (64 if gpu else 8)
    args.width = args.width or (32 if gpu else 8)
    args.steps = args.steps or (30 if gpu else 6)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32),
                "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, args.batch)][:, :, None, None]}
               for _ in range(4)]
    results = {name: run_strategy(name, dev, args, batches) for name in STRATEGIES}
    print(f"ResNet-style training step on {dev.name}: batch {args.batch}, 3×32×32, width {args.width}, "
          f"{args.steps} steps, commit_and_continue every {args.commit_every} nodes")
    print(f"{'strategy':<10} {'steps/s':>9} {'images/s':>9} {'vs one':>7} {'peak MiB':>9} {'last loss':>10}")
    for name, (speed, peak, loss) in results.items():
        print(f"{name:<10} {speed:9.2f} {speed * args.batch:9.1f} {speed / results['one'][0]:6.2f}× "
              f"{peak / 2**20:9.2f} {loss:10.5f}")
    losses = {round(v[2], 4) for v in results.values()}
    print("same losses under every strategy (same arithmetic, in order):", "yes" if len(losses) == 1 else "NO")
    claims = verdict(results)
    for text, ok in claims:
        print(f"  Apple: {text}: {'agrees' if ok else 'does not agree'}")
    print(f"this run {'agrees' if all(ok for _, ok in claims) else 'does not fully agree'} with Apple's finding")
    chart(results, dev.name, args.chart)


if __name__ == "__main__":
    main()
