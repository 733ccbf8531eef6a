"""The `mlmetal` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import mlmetal as mm
from mlmetal.dtypes import as_dtype
from mlmetal.runtime.backends import BACKENDS
from mlmetal.runtime.device import MATMUL_PRECISIONS

# ---------------------------------------------------------------- flags: argparse types and the shared ones

def integer(lo: int, hi: int | None = None):
    """An argparse type: an integer from `lo` (to `hi`); its error names the allowed values."""
    allowed = f"an integer ≥ {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def pattern(text: str):
    """An argparse type: a regular expression, compiled."""
    import re

    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None


def number(lo: float, *, above: bool = False):
    """An argparse type: a finite number ≥ `lo` (> `lo` if `above`)."""
    allowed = f"a finite number {'>' if above else '≥'} {lo:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < lo or (above and value == lo):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def existing_file(text: str) -> str:
    """An argparse type: the path of a readable file."""
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"expected a readable file, got {text!r}"
                                         f"{' (no such file)' if not os.path.exists(text) else ''}")
    return text


SEED = integer(0, 2**31 - 1)  # the apps derive further seeds by adding small offsets; generators take 32 bits
# --autocast's values; float16 trains with a dynamic loss scale (mm.train.LossScaler), bfloat16 needs none
AUTOCAST = ("bfloat16", "float16")


def autocast_dtype(text: str) -> str:
    """An argparse type: the low-precision type of a training command's --autocast (a name
    mlmetal.dtypes knows, such as bf16, stands for it)."""
    try:
        name = str(as_dtype(text))
    except TypeError:
        name = None
    if name not in AUTOCAST:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(AUTOCAST)}, got {text!r}")
    return name


def autocast_note(args) -> str:
    """' under bfloat16 autocast' when the command trains under one, else ''; for its reports."""
    return f" under {args.autocast} autocast" if getattr(args, "autocast", None) else ""


def announce_autocast(args) -> None:
    """Say, before training starts, that it runs under an autocast and what that means."""
    if getattr(args, "autocast", None) and mm.distributed.rank() == 0:
        scaled = "; the loss scaled dynamically" if args.autocast == "float16" else ""
        print(f"training{autocast_note(args)}: convolutions, matmuls and Gram matrices in {args.autocast}; "
              f"norm statistics, losses, the optimizer and the weights in float32{scaled}", flush=True)


def loss_scaler(autocast, device):
    """A dynamic loss scale for a training graph built under `autocast`: one for float16, None for
    bfloat16 (float32's exponent range) or no autocast."""
    return mm.train.LossScaler(device=device) if autocast is not None and str(as_dtype(autocast)) == "float16" else None


def _device_flag() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", choices=BACKENDS, default=None,
                   help="cpu, cuda or metal (default: MLMETAL_DEVICE or the best present)")
    return p


def training_flags(out: str, size: int, size_help: str, steps: int | None = None,
                   distributed: bool = False) -> argparse.ArgumentParser:
    """The flags every training command takes, as an argparse parent parser (with --distributed
    where the command can train data-parallel).

    One per command: argparse hands a parent's actions to its children as they are, so a default
    set for one command would change every other's.
    """
    p = argparse.ArgumentParser(add_help=False, parents=[_device_flag()])
    p.add_argument("--seed", type=SEED, default=0, help="seed for initialisation and data (default 0)")
    p.add_argument("--out", default=out, help=f"directory for what it writes (default ./{out})")
    p.add_argument("--steps", type=integer(1), default=steps,
                   help=f"training steps in all (default {steps})" if steps else
                   "stop after this many training steps in all (default: every epoch)")
    p.add_argument("--size", type=integer(1), default=size, help=f"{size_help} (default {size})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--precision", choices=MATMUL_PRECISIONS, default="highest",
                   help="matmul precision policy of convolutions, matmuls and Gram matrices: float32, TF32 or "
                        "bfloat16 operands (default highest; see the README)")
    p.add_argument("--autocast", type=autocast_dtype, default=None, metavar="{" + ",".join(AUTOCAST) + "}",
                   help="build the training graph under mm.autocast: convolutions, matmuls and Gram matrices in "
                        "the type, their activations stored in it; norm statistics, losses, the optimizer and the "
                        "weights in float32; float16 with a dynamic loss scale (default: float32 throughout; see "
                        "the README)")
    if distributed:
        p.add_argument("--distributed", action="store_true",
                       help="train data-parallel with the processes mpirun started (MPI; NCCL between GPUs, "
                            "one a process); each trains on batches of its own, rank 0 reports, validates and saves")
    return p


def _check_out(out: str) -> str | None:
    """Why `out` cannot take a command's output, or None (it is created here, as the command would)."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"argument --out: cannot create directory {out!r} ({e.strerror})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"argument --out: cannot write into {out!r} (permission denied)"
    return None


# ---------------------------------------------------------------- commands

def demo(args) -> int:
    """Compile a few kernels from kernels/, dispatch them, and show what they computed."""
    dev = mm.device(args.device)
    rng = np.random.default_rng(args.seed)
    n = args.size
    print(f"mlmetal {mm.__version__} on the {dev.name} backend")

    t0 = time.perf_counter()
    libs = {name: dev.library(name) for name in ("elementwise", "reduce", "layout")}
    fresh = any(getattr(lib, "compiled", True) for lib in libs.values())
    print(f"{'compiled' if fresh else 'loaded from the compile cache'} {sum(len(l.names) for l in libs.values())} "
          f"kernels of {', '.join(f'kernels/{n}.metal' for n in libs)} in {time.perf_counter() - t0:.2f} s\n")

    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    xb, yb = dev.buffer(x), dev.buffer(y)
    groups = (n + 255) // 256
    partial, total = dev.buffer(nbytes=4 * 64), dev.buffer(nbytes=4)
    hist = dev.buffer(np.zeros(16, np.uint32))
    codes = rng.integers(0, 2**32, n, dtype=np.uint32)
    m = int(np.sqrt(n)) // 2
    mat = rng.standard_normal((m, m + 3)).astype(np.float32)
    matb, matt = dev.buffer(mat), dev.buffer(nbytes=mat.nbytes)

    cb = dev.command_buffer()
    cb.dispatch(libs["elementwise"].kernel("axpy"), groups=groups, threads=256, args=[xb, yb, {"n": n, "a": 2.0}])
    cb.dispatch(libs["reduce"].kernel("sum_partial"), groups=64, threads=256, args=[yb, partial, {"n": n}])
    cb.dispatch(libs["reduce"].kernel("sum_partial"), groups=1, threads=64, args=[partial, total, {"n": 64}])
    cb.dispatch(libs["reduce"].kernel("histogram"), groups=32, threads=256,
                args=[dev.buffer(codes), hist, {"n": n, "bins": 16, "shift": 28}])
    cb.dispatch(libs["layout"].kernel("transpose"), groups=((m + 34) // 32, (m + 31) // 32), threads=(32, 8),
                args=[matb, matt, {"rows": m, "cols": m + 3}])
    t0 = time.perf_counter()
    cb.commit()
    cb.wait()
    elapsed = time.perf_counter() - t0

    ref_y = 2.0 * x.astype(np.float64) + y
    rows = [
        ("axpy  y = 2x + y", f"y[:3] = {np.array2string(yb.numpy(np.float32)[:3], precision=4)}",
         f"max |error| {np.abs(yb.numpy(np.float32) - ref_y).max():.2e}"),
        ("sum   Σ y (simd_sum + threadgroup memory)", f"{total.numpy(np.float32)[0]:.4f}", f"numpy {ref_y.sum():.4f}"),
        ("histogram of top 4 bits (threadgroup atomics)", str(hist.numpy(np.uint32)[:6].tolist())[:-1] + ", …]",
         "matches numpy" if np.array_equal(hist.numpy(np.uint32), np.bincount(codes >> 28, minlength=16)) else "DIFFERS"),
        (f"transpose {m}×{m + 3} (32×32 threadgroup tiles)", "",
         "matches numpy" if np.array_equal(matt.numpy(np.float32).reshape(m + 3, m), mat.T) else "DIFFERS"),
    ]
    for what, value, check in rows:
        print(f"  {what:<48} {value:<30} {check}")
    print(f"\n5 dispatches over {n:,} elements ran in {elapsed * 1e3:.1f} ms on {dev.name}.")
    ok = all("DIFFERS" not in r[2] for r in rows) and abs(total.numpy(np.float32)[0] - ref_y.sum()) < 1e-3 * np.abs(ref_y).sum()
    return 0 if ok else 1


def info(args) -> int:
    """Backends, the default device, compiler and cache."""
    from mlmetal.runtime import cache, cpu
    from mlmetal.runtime.backends import BACKENDS

    for name in BACKENDS:
        why = mm.available(name)
        print(f"{name:<6} {'available' if why is None else 'unavailable: ' + why.splitlines()[0]}")
    print(f"default device: {mm.device().name}")
    try:
        path, version = cpu.compiler()
        print(f"C++ compiler: {path} ({version})")
    except cpu.CompilerNotFound as e:
        print(f"C++ compiler: none ({e})")
    try:
        print(f"compile cache: {cache.cache_dir()}")
    except cache.CacheError as e:
        print(f"compile cache: unusable ({e})")
    print(f"matmul precision: {mm.get_matmul_precision()} (mm.set_matmul_precision; the training commands' --precision)")
    return 0


def resources(args) -> int:
    """Each kernel's registers, spilled bytes and threadgroup memory as the cuda backend compiles it
    (NVRTC, no GPU needed), and the threadgroups a multiprocessor holds at once."""
    from mlmetal.runtime import cuda, source as S
    from mlmetal.runtime.device import precision_defines

    try:
        path = Path(args.library) if args.library.endswith(".metal") else S.find(args.library)
    except FileNotFoundError as e:
        print(f"mlmetal resources: {e}", file=sys.stderr)
        return 2
    src = S.Source.from_file(path, precision_defines(args.precision))
    try:
        found = [r for r in cuda.resources(src, args.arch) if args.kernel.search(r.kernel)]
    except cuda.NvrtcNotFound as e:
        print(f"mlmetal resources: {e}", file=sys.stderr)
        return 2
    if not found:
        print(f"mlmetal resources: no kernel of {path.name} matches {args.kernel.pattern!r}", file=sys.stderr)
        return 2
    print(f"{path.name} for sm_{args.arch} under `{args.precision}` (NVRTC {cuda.nvrtc_version()}); "
          f"threadgroups of {args.threads} threads a multiprocessor holds at once, and what limits them")
    width = max(len(r.kernel) for r in found)
    print(f"{'kernel':<{width}}  registers  spilled bytes (stored/loaded)  stack  threadgroup memory  threadgroups")
    for r in sorted(found, key=lambda r: r.kernel):
        groups, limit = r.threadgroups(args.threads, args.arch)
        print(f"{r.kernel:<{width}}  {r.registers:>9}  {f'{r.spill_stores} / {r.spill_loads}':>29}  {r.stack:>5}  "
              f"{r.threadgroup_memory:>18}  {groups} ({limit})")
    return 0


def bench(args) -> int:
    """Run the benchmarks in benchmarks/ (a source checkout's), each printing ratios against its reference."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        print("mlmetal bench: the benchmarks ship with the source repository, not the wheel; "
              "run it from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    names = args.names or sorted(p.stem.removeprefix("bench_") for p in root.glob("bench_*.py"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root.parent), str(root), os.environ.get("PYTHONPATH", "")]))
    if args.device:
        env["MLMETAL_DEVICE"] = args.device
    status = 0
    for name in names:
        path = root / f"bench_{name}.py"
        if not path.is_file():
            print(f"mlmetal bench: no benchmark {name!r} ({path} does not exist)", file=sys.stderr)
            return 2
        print(f"== {name}", flush=True)
        status |= subprocess.call([sys.executable, str(path)], env=env)
    return status


def _apps():
    """The app modules under mlmetal/apps that define a command: COMMAND, HELP, FLAGS (`training_flags`'
    arguments), add_arguments(p) for the rest, check_arguments(args) -> the problem or None, run(args)."""
    import importlib
    import pkgutil

    import mlmetal.apps

    mods = (importlib.import_module(f"mlmetal.apps.{m.name}") for m in pkgutil.iter_modules(mlmetal.apps.__path__))
    return sorted((m for m in mods if hasattr(m, "COMMAND")), key=lambda m: m.COMMAND)


def main(argv: list[str] | None = None) -> int:
    from mlmetal.runtime.cuda import SM_LIMITS

    parser = argparse.ArgumentParser(prog="mlmetal", description="Hand-written MSL kernels on any device.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="compile and dispatch a few kernels and show what they computed",
                       parents=[_device_flag()])
    p.add_argument("--size", type=integer(4, 2**28), default=1 << 20, help="elements per buffer (default 1048576)")
    p.add_argument("--seed", type=SEED, default=0, help="random seed for the inputs")
    p.set_defaults(func=demo)
    p = sub.add_parser("info", help="show backends, device, compiler and compile cache")
    p.set_defaults(func=info)
    p = sub.add_parser("resources", help="registers, spills and threadgroup memory of a library's kernels on cuda "
                       "(compiled by NVRTC; no GPU needed)")
    p.add_argument("library", help="a library of kernels/ (e.g. conv) or a .metal file")
    p.add_argument("--precision", choices=MATMUL_PRECISIONS, default="highest",
                   help="the matmul precision policy the library is compiled under (default highest)")
    p.add_argument("--kernel", type=pattern, default="", help="only kernels whose names match this regular expression")
    p.add_argument("--threads", type=integer(32, 1024), default=128,
                   help="threads a threadgroup, for the threadgroups a multiprocessor holds (default 128)")
    p.add_argument("--arch", choices=sorted(SM_LIMITS), default="90", help="compute capability (default 90: H100, H200)")
    p.set_defaults(func=resources)
    p = sub.add_parser("bench", help="run the benchmarks (from a source checkout)", parents=[_device_flag()])
    p.add_argument("names", nargs="*", help="which, e.g. runtime random nn_conv (default: all)")
    p.set_defaults(func=bench)
    commands = {}
    for app in _apps():
        p = commands[app.COMMAND] = sub.add_parser(app.COMMAND, help=app.HELP, parents=[training_flags(**app.FLAGS)],
                                                   description=app.__doc__.strip().splitlines()[0])
        app.add_arguments(p)
        p.set_defaults(func=app.run, check=app.check_arguments)
    args = parser.parse_args(argv)
    if args.command in commands:  # what one flag's type cannot see: flags together, and the output directory
        problem = args.check(args) or _check_out(args.out)
        if problem:
            commands[args.command].error(problem)
        mm.set_matmul_precision(args.precision)
    try:
        status = args.func(args)
    except (mm.BackendUnavailable, mm.KernelSourceError, mm.DispatchError, RuntimeError) as e:
        print(f"mlmetal: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:  # before anything worth saving existed (the apps save what they trained)
        print(f"mlmetal {args.command}: interrupted", file=sys.stderr)
        return 130  # Ctrl-C reaches every rank mpirun started: each stops by itself
    if status not in (0, 130) and mm.distributed.size() > 1:  # the other ranks would wait for this one
        mm.distributed.abort(f"mlmetal {args.command} failed (exit status {status})", status)
    return status


if __name__ == "__main__":
    sys.exit(main())
