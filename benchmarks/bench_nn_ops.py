"""Instance, group and layer norm (forward, backward) and 2×2 max pooling against a reference on the same machine.

Group norm takes 8 groups; layer norm normalises each sample's C·H·W values with elementwise γ, β.

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

GROUPS = 8


def mlmetal_runs(dev, x, g):
    """Encoders for the three workloads, with outputs allocated once."""
    c = x.shape[1]
    tx, tg = mm.tensor(x, dev), mm.tensor(g, dev)
    gamma, beta = mm.tensor(np.ones(c, np.float32), dev), mm.tensor(np.zeros(c, np.float32), dev)
    ln_gamma, ln_beta = mm.tensor(np.ones(x.shape[1:], np.float32), dev), mm.tensor(np.zeros(x.shape[1:], np.float32), dev)
    y = empty(x.shape, dev)
    grads = (empty(x.shape, dev), empty((c,), dev), empty((c,), dev))
    ln_grads = (empty(x.shape, dev), empty(x.shape[1:], dev), empty(x.shape[1:], dev))
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
        "group norm forward": encoder("group_norm", y, tx, gamma, beta, num_groups=GROUPS),
        "group norm backward": encoder("group_norm_grad", grads, tg, tx, gamma, num_groups=GROUPS, eps=1e-5),
        "layer norm forward": encoder("layer_norm", y, tx, ln_gamma, ln_beta),
        "layer norm backward": encoder("layer_norm_grad", ln_grads, tg, tx, ln_gamma, eps=1e-5),
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
    ln_gamma = torch.ones(x.shape[1:], device=device, requires_grad=True)
    ln_beta = torch.zeros(x.shape[1:], device=device, requires_grad=True)
    norms = {"instance norm": (lambda: F.instance_norm(tx, weight=gamma, bias=beta, eps=1e-5), (tx, gamma, beta)),
             "group norm": (lambda: F.group_norm(tx, GROUPS, gamma, beta, eps=1e-5), (tx, gamma, beta)),
             "layer norm": (lambda: F.layer_norm(tx, x.shape[1:], ln_gamma, ln_beta, eps=1e-5), (tx, ln_gamma, ln_beta))}

    def forward(norm):
        def run(calls):
            with torch.no_grad():
                for _ in range(calls):
                    norm()
            sync()
        return run

    def backward(norm, inputs):
        y = norm()

        def run(calls):
            for _ in range(calls):
                torch.autograd.grad(y, inputs, tg, retain_graph=True)
            sync()
        return run

    def pool(calls):
        with torch.no_grad():
            for _ in range(calls):
                F.max_pool2d(tx, 2)
        sync()

    name = f"PyTorch {torch.__version__} ({'CUDA' if device == 'cuda' else 'CPU'} FP32)"
    runs = {f"{name} {way}": (forward(norm) if way == "forward" else backward(norm, inputs))
            for name, (norm, inputs) in norms.items() for way in ("forward", "backward")}
    return {**runs, "max pool 2×2": pool}, name


def numpy_runs(x, g):
    """float32 numpy: the same arithmetic, vectorised over the whole tensor, each norm's groups on axis 2."""
    n, c = x.shape[:2]
    views = {"instance norm": (n, c, -1), "group norm": (n, GROUPS, -1), "layer norm": (n, 1, -1)}

    def forward(view):
        xs = x.reshape(view)

        def run(calls):
            for _ in range(calls):
                (xs - xs.mean(axis=2, keepdims=True)) / np.sqrt(xs.var(axis=2, keepdims=True) + 1e-5)
        return run

    def backward(view):
        xs, gs = x.reshape(view), g.reshape(view)

        def run(calls):
            for _ in range(calls):
                rstd = 1 / np.sqrt(xs.var(axis=2, keepdims=True) + 1e-5)
                xh = (xs - xs.mean(axis=2, keepdims=True)) * rstd
                rstd * (gs - gs.mean(axis=2, keepdims=True) - xh * (gs * xh).mean(axis=2, keepdims=True))
                (gs * xh).sum(axis=0), gs.sum(axis=0)
        return run

    def pool(calls):
        h, w = x.shape[2:]
        for _ in range(calls):
            x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    runs = {f"{name} {way}": (forward if way == "forward" else backward)(view)
            for name, view in views.items() for way in ("forward", "backward")}
    return {**runs, "max pool 2×2": pool}, f"numpy {np.__version__} (float32)"


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
