"""3×3 convolutions (forward; backward = input + weight gradients), the Gram matrix and a matrix
product against a reference on the same machine, in the same run, under each matmul precision.

    python benchmarks/bench_nn_conv.py            # the convolutions of GPU_CONVS, Gram 4×256×(64·64) on a GPU
    MLMETAL_DEVICE=cpu python benchmarks/bench_nn_conv.py --conv 2 64 32 32 64 --gram 2 64 32 32
    python benchmarks/bench_nn_conv.py --dtype bfloat16   # mlmetal's tensors stored in bfloat16

The default convolutions span the three tilings: many channels at small images (the style
network's residual blocks) and few channels at large ones (the U-Net's outer levels), and the
three shapes the tensor-core work was measured on (64 channels at 256², 128 at 128², 256 at 64²).

mlmetal runs under each matmul precision policy (`highest`, `high`, `medium`; on cpu `highest`
only, the others being an exact emulation there). The reference is PyTorch where installed —
on cuda FP32 with TF32 off, with TF32 on (its default convolution math) and under bf16 autocast,
cuDNN with benchmark mode on; its CPU kernels on cpu — else float32 numpy (im2col and BLAS).
Each figure is the best of a few rounds of `--calls` back-to-back calls encoded into one command
buffer and waited for, divided by the number of calls. Ratios are the reference's time over
mlmetal's (> 1: mlmetal is faster): each policy against its peer (highest/FP32, high/TF32,
medium/bf16), and the best mlmetal against PyTorch's fastest setting. With `--dtype float16` or
`--dtype bfloat16` mlmetal's inputs and outputs are stored in that type (float sums); the
references stay as they are, bf16 autocast being the peer of bfloat16 storage.
"""

import argparse

import numpy as np

import mlmetal as mm
from timing import best_seconds
from mlmetal import ops
from mlmetal.tensor import empty

GPU_CONVS = [(4, 64, 256, 256, 64), (4, 128, 128, 128, 128), (4, 256, 64, 64, 256), (4, 128, 64, 64, 128),
             (4, 64, 128, 128, 64), (4, 16, 256, 256, 16), (4, 9, 256, 256, 16)]
CPU_CONVS = [(2, 64, 32, 32, 64), (2, 16, 64, 64, 16)]


def label(x, w):
    """The workload name of a 3×3 convolution of x by w."""
    return f"{'×'.join(map(str, x.shape[:2]))}×{x.shape[2]}²→{w.shape[0]}"


def mlmetal_runs(dev, convs, f, alpha, a, b, policy, dtype=np.float32):
    """Encoders for the workloads under matmul precision `policy` — each convolution (x, w, g)
    forward and backward, the Gram matrix of f and the product a·b — with tensors stored in `dtype`
    and outputs allocated once."""
    conv = dict(stride=1, padding=1, dilation=1, groups=1)

    def encoder(*steps):
        """steps: (op name, output, inputs, attrs); all encoded per call."""
        bound = [(ops.REGISTRY[name], out, inputs, ops.infer(name, *inputs, **attrs)[1])
                 for name, out, inputs, attrs in steps]

        def run(calls):
            cb = dev.command_buffer()
            with mm.matmul_precision(policy):
                for _ in range(calls):
                    for op, out, inputs, attrs in bound:
                        op.encode(cb, out, *inputs, **attrs)
            cb.commit()
            dev.synchronize()
        return run

    def tensor(x):
        return mm.tensor(x.astype(dtype), dev)

    def out(shape):
        return empty(shape, dev, dtype)

    runs = {}
    for x, w, g in convs:
        tx, tw, tg = (tensor(a) for a in (x, w, g))
        runs[f"{label(x, w)} fwd"] = encoder(("conv2d", out(g.shape), (tx, tw), conv))
        runs[f"{label(x, w)} bwd"] = encoder(
            ("conv2d_input_grad", out(x.shape), (tg, tw), dict(conv, input_size=x.shape[2:])),
            ("conv2d_weight_grad", out(w.shape), (tg, tx), dict(conv, kernel_size=w.shape[2:])))
    runs["gram"] = encoder(("gram", out((f.shape[0], f.shape[1], f.shape[1])), (tensor(f),), dict(alpha=alpha)))
    runs["matmul"] = encoder(("matmul", out((a.shape[0], b.shape[1])), (tensor(a), tensor(b)), {}))
    return runs


def torch_runs(convs, f, alpha, a, b, device, mode="fp32"):
    """PyTorch's runs in `mode`: "fp32" (TF32 off), "tf32" (TF32 on) or "bf16" (autocast)."""
    import torch
    import torch.nn.functional as F

    tf32 = mode == "tf32"
    torch.backends.cudnn.benchmark = device == "cuda"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16")

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
        precision()
        with autocast:
            y = F.conv2d(tx, tw, padding=1)

        def forward(calls):
            precision()
            with torch.no_grad(), autocast:
                for _ in range(calls):
                    F.conv2d(tx, tw, padding=1)
            sync()

        def backward(calls):
            precision()
            for _ in range(calls):
                torch.autograd.grad(y, (tx, tw), tg.to(y.dtype), retain_graph=True)
            sync()
        return forward, backward

    precision()
    runs = {}
    for x, w, g in convs:
        runs[f"{label(x, w)} fwd"], runs[f"{label(x, w)} bwd"] = conv_runs(x, w, g)
    feats = torch.tensor(f, device=device).flatten(2)

    ta, tb = torch.tensor(a, device=device), torch.tensor(b, device=device)

    def gram(calls):
        precision()
        with autocast:
            for _ in range(calls):
                torch.baddbmm(feats.new_empty(()), feats, feats.transpose(1, 2), beta=0, alpha=alpha)
        sync()

    def matmul(calls):
        precision()
        with autocast:
            for _ in range(calls):
                ta @ tb
        sync()

    name = f"PyTorch {torch.__version__} ({'CUDA' if device == 'cuda' else 'CPU'} {mode.upper()})"
    runs["gram"] = gram
    runs["matmul"] = matmul
    return runs, name


def numpy_runs(convs, f, alpha, a, b):
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

    def matmul(calls):
        for _ in range(calls):
            a @ b

    runs["matmul"] = matmul
    return runs, f"numpy {np.__version__} (float32, BLAS)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conv", type=int, nargs=5, metavar=("N", "CIN", "H", "W", "COUT"))
    ap.add_argument("--gram", type=int, nargs=4, metavar=("N", "C", "H", "W"))
    ap.add_argument("--matmul", type=int, nargs=3, metavar=("M", "K", "N"))
    ap.add_argument("--calls", type=int, default=None, help="calls per timed round (default: 20 on a GPU, 3 on cpu)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="mlmetal's storage type (default: float32)")
    args = ap.parse_args()
    dtype = mm.dtypes.as_dtype(args.dtype)

    dev = mm.device()
    gpu = dev.name != "cpu"
    shapes = [args.conv] if args.conv else GPU_CONVS if gpu else CPU_CONVS
    gram_shape = tuple(args.gram or ((4, 256, 64, 64) if gpu else (2, 128, 32, 32)))
    mm_shape = tuple(args.matmul or ((4096, 4096, 4096) if gpu else (256, 256, 256)))
    calls = args.calls or (20 if gpu else 3)
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
    a = rng.standard_normal(mm_shape[:2], dtype=np.float32)
    b = rng.standard_normal(mm_shape[1:], dtype=np.float32)
    flops["matmul"] = 2 * mm_shape[0] * mm_shape[1] * mm_shape[2]

    policies = ["highest", "high", "medium"] if gpu else ["highest"]
    ours = {p: mlmetal_runs(dev, convs, f, alpha, a, b, p, dtype) for p in policies}
    peers = {"highest": "fp32", "high": "tf32", "medium": "bf16"}
    try:
        modes = ["fp32", "tf32", "bf16"] if dev.name == "cuda" else ["fp32"]
        references = {m: torch_runs(convs, f, alpha, a, b, "cuda" if dev.name == "cuda" else "cpu", m) for m in modes}
    except ImportError:
        references = {"fp32": numpy_runs(convs, f, alpha, a, b)}

    print(f"mlmetal on {dev.name}; conv 3×3 (padding 1) N×Cin×H²→Cout, Gram {'×'.join(map(str, gram_shape[:2]))}"
          f"×({gram_shape[2]}·{gram_shape[3]}), matmul {'×'.join(map(str, mm_shape))}; mlmetal's data {args.dtype}; "
          f"best of {args.rounds} rounds of {calls} calls; times in ms (TFLOP/s)")
    print("references: " + "; ".join(f"{m}: {name}" for m, (_, name) in references.items()))
    head = "".join(f"{'mlm ' + p:>17}" for p in policies) + "".join(f"{'torch ' + m:>17}" for m in references)
    ratios = "".join(f"{p + '/' + peers[p]:>14}" for p in policies if peers[p] in references) + f"{'best/best':>11}"
    print(f"{'workload':<22}{head}{ratios}")
    for name in flops:
        t = {p: best_seconds(ours[p][name], calls, args.rounds) for p in policies}
        r = {m: best_seconds(references[m][0][name], calls, args.rounds) for m in references}
        cells = "".join(f"{v * 1e3:>9.3f} ({flops[name] / v / 1e12:>5.1f})" for v in [*t.values(), *r.values()])
        peer = "".join(f"{r[peers[p]] / t[p]:>13.2f}×" for p in policies if peers[p] in r)
        print(f"{name:<22}{cells}{peer}{min(r.values()) / min(t.values()):>10.2f}×", flush=True)


if __name__ == "__main__":
    main()
