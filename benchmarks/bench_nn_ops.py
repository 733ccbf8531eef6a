"""Instance norm (forward, backward) and 2×2 max pooling against a reference on the same machine.

    python benchmarks/bench_nn_ops.py                 # 4×128×128×128 on a GPU, 2×32×64×64 on cpu
    MLMETAL_DEVICE=cpu python benchmarks/bench_nn_ops.py --shape 4 64 64 64

The reference is PyTorch (CUDA FP32 on cuda, its CPU kernels on cpu) where installed, else
float32 numpy. Each figure is the best of a few rounds of `--calls` back-to-back calls,
divided by the number of calls; the ratio is the reference's time over mlmetal's (> 1: mlmetal
is faster). The time includes each side's per-call overheads (mlmetal: encoding in Python, with
`commit_and_continue` every 8 calls so that the device works while the next are encoded, as a
graph's plan does every 16 nodes).
"""

import argparse

import numpy as np

import mlmetal as mm
from timing import best_seconds
from mlmetal import ops
from mlmetal.tensor import empty



def mlmetal_runs(dev, x, g):
    """Encoders for the three workloads, with outputs allocated once."""
    c = x.shape[1]
    tx, tg = mm.tensor(x, dev), mm.tensor(g, dev)
    gamma, beta = mm.tensor(np.ones(c, np.float32), dev), mm.tensor(np.zeros(c, np.float32), dev)
    y = empty(x.shape, dev)
    grads = (empty(x.shape, dev), empty((c,), dev), empty((c,), dev))
    pooled = empty(x.shape[:2] + (x.shape[2] // 2, x.shape[3] // 2), dev)

    def encoder(name, out, *inputs, **attrs):
        op = ops.REGISTRY[name]
        _, attrs = ops.infer(name, *inputs, **attrs)

        def run(calls):
            cb = dev.command_buffer()
            for i in range(calls):
                op.encode(cb, out, *inputs, **attrs)
                if i % 8 == 7:
                    cb.commit_and_continue()  # the device starts on these while Python encodes the next
            cb.commit()
            cb.wait()
        return run

    return {
        "instance norm forward": encoder("instance_norm", y, tx, gamma, beta),
        "instance norm backward": encoder("instance_norm_grad", grads, tg, tx, gamma, eps=1e-5),
        "max pool 2×2": encoder("max_pool2d", pooled, tx, kernel=2),
    }


def torch_runs(x, g, device):
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tx = torch.tensor(x, device=device, requires_grad=True)
    tg = torch.tensor(g, device=device)
    gamma = torch.ones(x.shape[1], device=device, requires_grad=True)
    beta = torch.zeros(x.shape[1], device=device, requires_grad=True)
    y = F.instance_norm(tx, weight=gamma, bias=beta, eps=1e-5)

    def forward(calls):
        with torch.no_grad():
            for _ in range(calls):
                F.instance_norm(tx, weight=gamma, bias=beta, eps=1e-5)
        sync()

    def backward(calls):
        for _ in range(calls):
            torch.autograd.grad(y, (tx, gamma, beta), tg, retain_graph=True)
        sync()

    def pool(calls):
        with torch.no_grad():
            for _ in range(calls):
                F.max_pool2d(tx, 2)
        sync()

    name = f"PyTorch {torch.__version__} ({'CUDA' if device == 'cuda' else 'CPU'} FP32)"
    return {"instance norm forward": forward, "instance norm backward": backward, "max pool 2×2": pool}, name


def numpy_runs(x, g):
    """float32 numpy: the same arithmetic, vectorised over the whole tensor."""
    def forward(calls):
        for _ in range(calls):
            mean = x.mean(axis=(2, 3), keepdims=True)
            var = x.var(axis=(2, 3), keepdims=True)
            (x - mean) / np.sqrt(var + 1e-5)

    def backward(calls):
        for _ in range(calls):
            mean = x.mean(axis=(2, 3), keepdims=True)
            rstd = 1 / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)
            xh = (x - mean) * rstd
            rstd * (g - g.mean(axis=(2, 3), keepdims=True) - xh * (g * xh).mean(axis=(2, 3), keepdims=True))
            (g * xh).sum(axis=(0, 2, 3)), g.sum(axis=(0, 2, 3))

    def pool(calls):
        n, c, h, w = x.shape
        for _ in range(calls):
            x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    return {"instance norm forward": forward, "instance norm backward": backward, "max pool 2×2": pool}, \
        f"numpy {np.__version__} (float32)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=4, metavar=("N", "C", "H", "W"))
    ap.add_argument("--calls", type=int, default=None, help="calls per timed round (default: 50 on a GPU, 3 on cpu)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    dev = mm.device()
    gpu = dev.name != "cpu"
    shape = tuple(args.shape or ((4, 128, 128, 128) if gpu else (2, 32, 64, 64)))
    calls = args.calls or (50 if gpu else 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    g = rng.standard_normal(shape, dtype=np.float32)

    ours = mlmetal_runs(dev, x, g)
    try:
        theirs, ref_name = torch_runs(x, g, "cuda" if dev.name == "cuda" else "cpu")
    except ImportError:
        theirs, ref_name = numpy_runs(x, g)

    print(f"mlmetal on {dev.name} vs {ref_name}; shape {'×'.join(map(str, shape))} float32; "
          f"best of {args.rounds} rounds of {calls} calls")
    print(f"{'workload':<24}{'mlmetal':>12}{'reference':>12}{'ratio':>8}")
    for name, run in ours.items():
        t_ours = best_seconds(run, calls, args.rounds)
        t_ref = best_seconds(theirs[name], calls, args.rounds)
        print(f"{name:<24}{t_ours * 1e3:>10.3f}ms{t_ref * 1e3:>10.3f}ms{t_ref / t_ours:>7.2f}×")


if __name__ == "__main__":
    main()
