"""3×3 convolutions (forward; backward = input + weight gradients) and the Gram matrix against a
reference on the same machine, in the same run.

    python benchmarks/bench_nn_conv.py            # the convolutions of GPU_CONVS, Gram 4×256×(64·64) on a GPU
    MLMETAL_DEVICE=cpu python benchmarks/bench_nn_conv.py --conv 2 64 32 32 64 --gram 2 64 32 32

The default convolutions span the three tilings: many channels at small images (the style
network's residual blocks) and few channels at large ones (the U-Net's outer levels).

The reference is PyTorch (CUDA FP32 with TF32 off, cuDNN, on cuda; its CPU kernels on cpu)
where installed, else float32 numpy (im2col and BLAS). Each figure is the best of a few rounds
of `--calls` back-to-back calls encoded into one command buffer and waited for, divided by the
number of calls; the ratio is the reference's time over mlmetal's (> 1: mlmetal is faster).
"""

import argparse

import numpy as np

import mlmetal as mm
from timing import best_seconds
from mlmetal import ops
from mlmetal.tensor import empty

GPU_CONVS = [(4, 128, 64, 64, 128), (4, 64, 128, 128, 64), (4, 16, 256, 256, 16), (4, 9, 256, 256, 16)]
CPU_CONVS = [(2, 64, 32, 32, 64), (2, 16, 64, 64, 16)]


def label(x, w):
    """The workload name of a 3×3 convolution of x by w."""
    return f"{'×'.join(map(str, x.shape[:2]))}×{x.shape[2]}²→{w.shape[0]}"


def mlmetal_runs(dev, convs, f, alpha):
    """Encoders for the workloads — each convolution (x, w, g) forward and backward, and the
    Gram matrix of f — with outputs allocated once."""
    conv = dict(stride=1, padding=1, dilation=1, groups=1)

    def encoder(*steps):
        """steps: (op name, output, inputs, attrs); all encoded per call."""
        bound = [(ops.REGISTRY[name], out, inputs, ops.infer(name, *inputs, **attrs)[1])
                 for name, out, inputs, attrs in steps]

        def run(calls):
            cb = dev.command_buffer()
            for _ in range(calls):
                for op, out, inputs, attrs in bound:
                    op.encode(cb, out, *inputs, **attrs)
            cb.commit()
            dev.synchronize()
        return run

    runs = {}
    for x, w, g in convs:
        tx, tw, tg = (mm.tensor(a, dev) for a in (x, w, g))
        runs[f"{label(x, w)} fwd"] = encoder(("conv2d", empty(g.shape, dev), (tx, tw), conv))
        runs[f"{label(x, w)} bwd"] = encoder(
            ("conv2d_input_grad", empty(x.shape, dev), (tg, tw), dict(conv, input_size=x.shape[2:])),
            ("conv2d_weight_grad", empty(w.shape, dev), (tg, tx), dict(conv, kernel_size=w.shape[2:])))
    tf = mm.tensor(f, dev)
    runs["gram"] = encoder(("gram", empty((f.shape[0], f.shape[1], f.shape[1]), dev), (tf,), dict(alpha=alpha)))
    return runs


def torch_runs(convs, f, alpha, device, tf32=False):
    import torch
    import torch.nn.functional as F

    def precision():
        """The TF32 switches are global and read when a call runs, so each run sets them."""
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def conv_runs(x, w, g):
        tx = torch.tensor(x, device=device, requires_grad=True)
        tw = torch.tensor(w, device=device, requires_grad=True)
        tg = torch.tensor(g, device=device)
        y = F.conv2d(tx, tw, padding=1)

        def forward(calls):
            precision()
            with torch.no_grad():
                for _ in range(calls):
                    F.conv2d(tx, tw, padding=1)
            sync()

        def backward(calls):
            precision()
            for _ in range(calls):
                torch.autograd.grad(y, (tx, tw), tg, retain_graph=True)
            sync()
        return forward, backward

    precision()
    runs = {}
    for x, w, g in convs:
        runs[f"{label(x, w)} fwd"], runs[f"{label(x, w)} bwd"] = conv_runs(x, w, g)
    feats = torch.tensor(f, device=device).flatten(2)

    def gram(calls):
        precision()
        for _ in range(calls):
            torch.baddbmm(feats.new_empty(()), feats, feats.transpose(1, 2), beta=0, alpha=alpha)
        sync()

    name = f"PyTorch {torch.__version__} ({'CUDA' if device == 'cuda' else 'CPU'} FP32{', TF32 on' if tf32 else ''})"
    runs["gram"] = gram
    return runs, name


def numpy_runs(convs, f, alpha):
    """float32 numpy: im2col views multiplied through BLAS."""
    from numpy.lib.stride_tricks import sliding_window_view

    def patches(a, k):
        """(N, C, OH, OW, k, k) windows of `a` padded by k // 2 ('same' convolution)."""
        p = k // 2
        return sliding_window_view(np.pad(a, ((0, 0), (0, 0), (p, p), (p, p))), (k, k), axis=(2, 3))

    def conv_runs(x, w, g):
        k = w.shape[2]
        w_flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # dx = conv(g, flipped wᵀ)

        def forward(calls):
            for _ in range(calls):
                np.tensordot(patches(x, k), w, axes=((1, 4, 5), (1, 2, 3))).transpose(0, 3, 1, 2)

        def backward(calls):
            for _ in range(calls):
                np.tensordot(patches(g, k), w_flipped, axes=((1, 4, 5), (1, 2, 3))).transpose(0, 3, 1, 2)
                np.tensordot(g, patches(x, k), axes=((0, 2, 3), (0, 2, 3)))
        return forward, backward

    runs = {}
    for x, w, g in convs:
        runs[f"{label(x, w)} fwd"], runs[f"{label(x, w)} bwd"] = conv_runs(x, w, g)
    feats = f.reshape(f.shape[0], f.shape[1], -1)

    def gram(calls):
        for _ in range(calls):
            alpha * feats @ feats.transpose(0, 2, 1)

    runs["gram"] = gram
    return runs, f"numpy {np.__version__} (float32, BLAS)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conv", type=int, nargs=5, metavar=("N", "CIN", "H", "W", "COUT"))
    ap.add_argument("--gram", type=int, nargs=4, metavar=("N", "C", "H", "W"))
    ap.add_argument("--calls", type=int, default=None, help="calls per timed round (default: 50 on a GPU, 3 on cpu)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    dev = mm.device()
    gpu = dev.name != "cpu"
    shapes = [args.conv] if args.conv else GPU_CONVS if gpu else CPU_CONVS
    gram_shape = tuple(args.gram or ((4, 256, 64, 64) if gpu else (2, 128, 32, 32)))
    calls = args.calls or (50 if gpu else 3)
    rng = np.random.default_rng(0)
    convs, flops = [], {}
    for n, cin, h, wd, cout in shapes:
        x = rng.standard_normal((n, cin, h, wd), dtype=np.float32)
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        g = rng.standard_normal((n, cout, h, wd), dtype=np.float32)
        convs.append((x, w, g))
        flops[f"{label(x, w)} fwd"] = 2 * n * cout * h * wd * cin * 9
        flops[f"{label(x, w)} bwd"] = 2 * flops[f"{label(x, w)} fwd"]
    f = rng.standard_normal(gram_shape, dtype=np.float32)
    alpha = 1.0 / (gram_shape[2] * gram_shape[3])
    flops["gram"] = 2 * gram_shape[0] * gram_shape[1] ** 2 * gram_shape[2] * gram_shape[3]

    ours = mlmetal_runs(dev, convs, f, alpha)
    references = []
    try:
        references.append(torch_runs(convs, f, alpha, "cuda" if dev.name == "cuda" else "cpu"))
        if dev.name == "cuda":  # DESIGN §8's Gram figure is PyTorch's with TF32 on
            references.append(torch_runs(convs, f, alpha, "cuda", tf32=True))
    except ImportError:
        references.append(numpy_runs(convs, f, alpha))

    print(f"mlmetal on {dev.name}; conv 3×3 (padding 1) N×Cin×H²→Cout, Gram {'×'.join(map(str, gram_shape[:2]))}"
          f"×({gram_shape[2]}·{gram_shape[3]}); float32; best of {args.rounds} rounds of {calls} calls")
    times = {name: best_seconds(run, calls, args.rounds) for name, run in ours.items()}
    for theirs, ref_name in references:
        print(f"\nreference: {ref_name}")
        print(f"{'workload':<24}{'mlmetal':>12}{'TFLOP/s':>9}{'reference':>12}{'TFLOP/s':>9}{'ratio':>8}")
        for name, t_ours in times.items():
            t_ref = best_seconds(theirs[name], calls, args.rounds)
            print(f"{name:<24}{t_ours * 1e3:>10.3f}ms{flops[name] / t_ours / 1e12:>9.2f}"
                  f"{t_ref * 1e3:>10.3f}ms{flops[name] / t_ref / 1e12:>9.2f}{t_ref / t_ours:>7.2f}×")


if __name__ == "__main__":
    main()
