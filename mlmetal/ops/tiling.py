"""The tiling family of kernels/tile.h, seen from Python: which tiling and accumulator a product
runs with, and how a long reduction is split across threadgroups.

The sizes are read from tile.h itself (`Source.constants`), so the kernels and this module cannot
disagree. A product kernel exists for each tiling with each accumulator: `name` with float register
blocks, `name_mma` with simdgroup matrices, which run on the matrix hardware under the matmul
precision policy (mlmetal.precision). Each is instantiated per storage type (`dtypes.kernel_name`):
float sums whatever the type, and a split reduction's slices in float32, rounded once when summed.
"""

from __future__ import annotations

import dataclasses

from .. import dtypes as D
from ..precision import get_matmul_precision
from ..runtime import source as S
from ..tensor import empty
from . import groups_for

_C = S.Source.from_file(S.KERNEL_DIR / "tile.h").constants
TILE_K = _C["TILE_K"]  # the reduction depth of one staged slice of the float kernels
MMA_K, MMA_THREADS = _C["MMA_K"], _C["MMA_THREADS"]  # the same of the `_mma` kernels, and their threads


@dataclasses.dataclass(frozen=True)
class Tiling:
    suffix: str  # of the kernel names: "", "_medium", "_narrow"
    rows: int  # of output a threadgroup
    cols: int
    threads: int


WIDE = Tiling("", _C["WIDE"], _C["WIDE"], _C["WIDE_THREADS"])
MEDIUM = Tiling("_medium", _C["MEDIUM_M"], _C["MEDIUM_N"], _C["MEDIUM_THREADS"])
NARROW = Tiling("_narrow", _C["NARROW_M"], _C["NARROW_N"], _C["NARROW_THREADS"])


def tiling(rows: int) -> Tiling:
    """The tiling for a product with `rows` output rows a group and many columns: one whose tiles
    are mostly full, and as tall as can be (a tall tile stages fewer operand loads per product)."""
    if rows <= 2 * NARROW.rows:
        return NARROW
    if rows <= MEDIUM.rows:
        return MEDIUM
    return WIDE


# The policies under which products run on simdgroup matrices: all three. Under `highest` the
# split-TF32 products (three TF32 products each) are faster than the float kernels now that the
# direct 3×3 kernels run on matrices: H100, 2026-12-07, full-size training steps, same run —
# Johnson + VGG16 14.42 ms against 23.11 with the float kernels (PyTorch FP32 25.18), U-Net
# 32×3 8.72 against 12.98 (PyTorch FP32 12.90). Convolutions into few channels keep the float
# direct kernels (conv.C3_MMA_MIN_COUT), as under the other policies.
MATRIX_POLICIES = {"highest", "high", "medium"}


def matrix_hardware(device) -> bool:
    """Whether products on `device` run on simdgroup matrices (tests force it on cpu, whose
    emulation is exact but slow)."""
    return device.has_simdgroup_matrix


def matrix_policy(device, dtype=D.float32) -> str | None:
    """The precision policy under which products of `dtype` operands on `device` run on simdgroup
    matrices, else None (the float kernels run). float16 and bfloat16 values are exact in TF32 and
    so are their products in float32, so under `highest` they take `high`'s single TF32 products:
    the same sums, at tensor-core speed."""
    policy = get_matmul_precision()
    if policy == "highest" and dtype in (D.float16, D.bfloat16):
        policy = "high"
    return policy if policy in MATRIX_POLICIES and matrix_hardware(device) else None


# Under `highest`, a float32 product of fewer multiply-adds than this runs on the float kernels
# rather than on split-TF32 (three TF32 products a term), which only pay for themselves on large
# ones. (The direct 3×3 and k×k convolution kernels do not ask: they stay on split-TF32.) H100,
# 2026-12-07: every product of the DCGAN step (0.4 M to 411 M multiply-adds) ran as fast or faster
# on the float kernels (its kernels 2.57 → 2.17 ms a step; the step 3.00 → 2.60 ms at 2**29, 2.90
# at 2**24); in a later call, 2**32 against 2**29 alternated twice, the full-size style step's
# 9×9 and stride-2 convolutions (2.0 G and 1.2 G) on the float kernels took it 16.69 / 16.70 →
# 16.32 / 16.36 ms, the other steps choosing the same kernels at both. The 4096³ matmul (69 G) is
# 4.6× slower on them.
HIGHEST_MMA_MIN_MACS = 2**32


def product(device, name: str, dtype, t: Tiling = WIDE, macs: int | None = None):
    """(kernel, threads) of product `name` for storage type `dtype` in tiling `t`: on simdgroup
    matrices where `matrix_policy` says so, float register blocks otherwise (also under `highest`
    for float32 products of fewer than HIGHEST_MMA_MIN_MACS multiply-adds, where `macs` is given)."""
    policy = matrix_policy(device, dtype)
    if policy == "highest" and dtype == D.float32 and macs is not None and macs < HIGHEST_MMA_MIN_MACS:
        policy = None
    if policy:
        kernel = D.kernel_name(name + t.suffix + "_mma", dtype)
        return device.library(_LIBRARY[name], precision=policy).kernel(kernel), MMA_THREADS
    return device.library(_LIBRARY[name]).kernel(D.kernel_name(name + t.suffix, dtype)), t.threads


_LIBRARY = {"conv2d": "conv", "conv2d_input_grad": "conv", "conv2d_weight_grad": "conv",
            "matmul": "matmul", "gram": "gram", "gram_grad": "gram"}


def split_reduction(length: int, tiles: int, target: int = 264, min_chunk: int = 256,
                    multiple: int = MMA_K) -> tuple[int, int]:
    """(splits, chunk): cut a reduction of `length` so ~`target` threadgroups of the wide tiling
    share it (two a multiprocessor on a 132-SM H100), each summing at least `min_chunk` terms (a
    multiple of `multiple`, the kernels' slice: MMA_K, which TILE_K divides) — a long reduction over
    a small output otherwise leaves most of a GPU idle."""
    splits = max(1, min(target // max(tiles, 1), length // min_chunk))
    chunk = -(-length // splits)
    chunk = -(-chunk // multiple) * multiple
    return -(-length // chunk), chunk


def partial_for(out, splits: int):
    """The float32 slices a reduction split `splits` ways is summed into, for a kernel that writes
    only slices: `out` itself for one split of a float32 output."""
    return out if splits == 1 and out.dtype == D.float32 else empty((splits, out.size), out.device)


def split_output(out, splits: int):
    """The `partial` buffer of a kernel that writes `out` (of any storage type) itself unsplit
    and float32 slices split (conv2d, matmul): `out` stands in for the unused slices when unsplit."""
    return out if splits == 1 else empty((splits, out.size), out.device)


def sum_splits(cb, lib, partial, out, splits: int, relu: int = 0) -> None:
    """out = the sum of the `splits` float32 slices of partial, rounded to out's storage type (and
    through a convolution's fused relu where `relu`); nothing to do where partial is out. `lib` is
    the product's library (each that includes tile.h has the kernel)."""
    if partial is not out:
        cb.dispatch(lib.kernel(D.kernel_name("sum_splits", out.dtype)), groups=groups_for(out.size, 256), threads=256,
                    args=[partial, out, {"count": out.size, "splits": splits, "relu": relu}])
