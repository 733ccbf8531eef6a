"""2-D convolution and its gradients (kernels/conv.metal).

`conv2d` takes an optional bias. The op is registered with two or three inputs — (x, w) or
(x, w, b) — rather than as two ops or with a zeros tensor standing in for a missing bias: the
kernel skips the bias add on a flag, the gradient rule returns one gradient per input it was
given, and the public `mm.ops.conv2d(x, w, b=None, ...)` below just drops a None.
"""

import math

from .. import dtypes as D
from .. import ops as _ops
from ..reference import conv as R
from ..tensor import empty
from . import apply, ensure, groups_for, pair, register
from ..runtime import source as S
from .tiling import (MEDIUM, MMA_THREADS, matrix_policy, partial_for, product, split_output, split_reduction, sum_splits,
                     tiling)

_C = S.Source.from_file(S.find("conv")).constants
C3_CO, C3_CI, C3_ROWS, C3_COLS = _C["C3_CO"], _C["C3_CI"], _C["C3_ROWS"], _C["C3_COLS"]  # conv2d_3x3_mma's tiles
C3_CO_32, C3_ROWS_32 = _C["C3_CO_32"], _C["C3_ROWS_32"]  # conv2d_3x3_mma_32's: for up to 32 output channels
D3_CO, D3_CI = _C["D3_CO"], _C["D3_CI"]  # conv2d_weight_grad_3x3_mma's channels a threadgroup
# conv2d_3x3_mma and conv2d_weight_grad_3x3_mma from this many output channels on; fewer fill too
# little of their tiles and the float kernels are faster (H200: 16 → 16 at 256², forward 0.087 ms
# against 0.143; 32 → 32 at 256², 0.179 against 0.176, measured before the 32-channel tile).
C3_MMA_MIN_COUT = 17
# conv2d_kxk_mma_8 and conv2d_weight_grad_kxk_mma_8: into at most K8_CO output channels through
# windows of up to K8_K × K8_K taps, from KXK_MIN_TAPS taps on. 3×3 windows keep the kernels they
# had, which were as fast or faster (H100, bfloat16, 4×32×256²→3: forward 0.088 against 0.092 ms,
# weight gradient 0.142 against 0.222 ms at 264 threadgroups).
K8_CO, K8_CI, K8_K, K8_ROWS, K8_COLS, D8_ROWS = (_C[k] for k in ("K8_CO", "K8_CI", "K8_K", "K8_ROWS", "K8_COLS", "D8_ROWS"))
KXK_MIN_TAPS = 10


def direct_mma(device, cout, kernel_size, stride, dilation, groups, dtype=D.float32) -> str | None:
    """The matmul precision policy when the direct 3×3 kernels on simdgroup matrices compute this
    convolution's passes on `dtype` storage, else None."""
    policy = matrix_policy(device, dtype)
    fits = (cout >= C3_MMA_MIN_COUT and tuple(kernel_size) == (3, 3) and stride == (1, 1) and dilation == (1, 1)
            and groups == 1)
    return policy if fits else None


def kxk_mma(device, cout, kernel_size, stride, dilation, groups, dtype=D.float32) -> str | None:
    """The matmul precision policy when conv2d_kxk_mma_8 (forward) and conv2d_weight_grad_kxk_mma_8
    compute this convolution's passes into few output channels on `dtype` storage, else None."""
    policy = matrix_policy(device, dtype)
    kh, kw = kernel_size
    fits = (cout <= K8_CO and max(kh, kw) <= K8_K and kh * kw >= KXK_MIN_TAPS and stride == (1, 1)
            and dilation == (1, 1) and groups == 1)
    return policy if fits else None


def _kxk_params(x, cout, oh, ow, kernel_size, padding, rows, has_bias=0, relu=0):
    """The ConvKxkParams constants of conv.metal, for pixel tiles of `rows` × K8_COLS."""
    n, cin, h, wd = x.shape
    tiles_x = groups_for(ow, K8_COLS)
    return dict(n=n, cin=cin, h=h, w=wd, cout=cout, oh=oh, ow=ow, kh=kernel_size[0], kw=kernel_size[1],
                pad_h=padding[0], pad_w=padding[1], tiles_x=tiles_x, tiles=tiles_x * groups_for(oh, rows),
                has_bias=has_bias, relu=relu, chunk=0)


# Devices whose barriers are cheap (Device.cheap_barriers: GPUs) spread the bias gradient's
# channel sums over several threadgroups; on cpu that costs more barriers than it saves.
# They also run 3×3 stride-1 convolutions of up to 64 output channels with the direct
# kernels conv2d_3x3 and conv2d_weight_grad_3x3 instead of the GEMMs. H100, batch 4:
#   forward       16→16 at 256²: 63 µs against the narrow GEMM's 100 (cuDNN 115);
#                 64→64 at 64²: 65 against the medium GEMM's 92 (cuDNN 58);
#   weight grad   16→16 at 256²: 57 µs against 145 (cuDNN 162); 64→64 at 64²: 53 against 78;
#                 but 128→128 at 64²: 168 against the wide GEMM's 148.
# On cpu, where each barrier is a fiber switch for each thread, the GEMMs win.
MAX_ELEMENTS = 2**31  # kernels index with 32-bit integers
SPLIT_FACTOR = {"_narrow": 2, "_medium": 0.5}  # the weight gradient's split target, relative to the wide tiling's


def _window(op, stride, padding, dilation, groups):
    """The attributes as pairs of ints, checked."""
    stride, padding, dilation = pair(stride, op, "stride"), pair(padding, op, "padding"), pair(dilation, op, "dilation")
    ensure(min(stride) >= 1, op, f"stride must be positive, got {stride}")
    ensure(min(dilation) >= 1, op, f"dilation must be positive, got {dilation}")
    ensure(min(padding) >= 0, op, f"padding must be non-negative, got {padding}")
    ensure(isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1, op,
           f"groups must be a positive int, got {groups!r}")
    return dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _output_size(op, h, w, kh, kw, a):
    """(OH, OW) of an H×W input under a KH×KW window; the window must fit the padded input."""
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    ensure(h + 2 * ph >= span_h and w + 2 * pw >= span_w, op,
           f"window {kh}×{kw} (dilation {a['dilation']}, spanning {span_h}×{span_w}) is larger than the "
           f"padded input {h + 2 * ph}×{w + 2 * pw}")
    return (h + 2 * ph - span_h) // sh + 1, (w + 2 * pw - span_w) // sw + 1


def _check_weights(op, cin, w, groups):
    ensure(len(w) == 4, op, f"weights must be 4-D (Cout, Cin/groups, KH, KW), got shape {w}")
    cout, cin_g, kh, kw = w
    ensure(min(w) >= 1, op, f"weights shape {w} has an empty dimension")
    ensure(cin % groups == 0, op, f"{cin} input channels are not divisible by groups={groups}")
    ensure(cout % groups == 0, op, f"{cout} output channels are not divisible by groups={groups}")
    ensure(cin_g * groups == cin, op, f"weights expect {cin_g}×{groups} = {cin_g * groups} input channels, "
                                      f"the input has {cin}")
    return cout, kh, kw


def _check_sizes(op, *shapes):
    ensure(all(math.prod(s) < MAX_ELEMENTS for s in shapes), op, "tensors of 2^31 elements or more are not supported")


def _params(n, cin, h, w, cout, oh, ow, kh, kw, a, has_bias=0, chunk=0, relu=0):
    """The ConvParams constants of conv.metal."""
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    return dict(n=n, cin=cin, h=h, w=w, cout=cout, oh=oh, ow=ow, kh=kh, kw=kw, stride_h=sh, stride_w=sw,
                pad_h=ph, pad_w=pw, dil_h=dh, dil_w=dw, groups=a["groups"], has_bias=has_bias, relu=relu,
                chunk=chunk)


# ---------------------------------------------------------------- conv2d

ACTIVATIONS = (None, "relu")  # what conv2d's epilogue can apply to its output


def _conv2d_check(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """2-D convolution (cross-correlation, as in PyTorch) of NCHW images, with an optional fused activation."""
    op = "conv2d"
    a = _window(op, stride, padding, dilation, groups)
    ensure(activation in ACTIVATIONS, op, f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    ensure(len(x) == 4, op, f"input must be 4-D (N, C, H, W), got shape {x}")
    ensure(min(x) >= 1, op, f"input shape {x} has an empty dimension")
    cout, kh, kw = _check_weights(op, x[1], w, groups)
    ensure(b is None or tuple(b) == (cout,), op, f"bias must have shape ({cout},), got {b}")
    oh, ow = _output_size(op, x[2], x[3], kh, kw, a)
    _check_sizes(op, x, w, (x[0], cout, oh, ow))
    return (x[0], cout, oh, ow), a if activation is None else dict(a, activation=activation)  # files saved before it load


CF_PIXELS, CF_CO, CF_THREADS = 512, 16, 128  # conv2d_3x3's tiles (conv.metal)
CF_KERNELS = {64: "conv2d_3x3", 32: "conv2d_3x3_16x32"}  # by the tiles' width
# H100: 14×14 images (38% of a 16×32 tile) still beat the GEMM; the captioner's encoder on 8×8
# digits (12%) at batch 65536 took 9.2 ms against the GEMM's 1.5.
MIN_TILE_USE = 1 / 3


def pixel_tiles(height: int, width: int) -> tuple[str, int, float]:
    """(kernel, tile columns, share of the tiles' pixels in use) of conv2d_3x3 for height × width
    output images: the tiles that cover an image with the fewest pixels to spare (the widest of equals)."""
    def covered(c):
        return groups_for(width, c) * c * groups_for(height, CF_PIXELS // c) * (CF_PIXELS // c)
    cols = min(CF_KERNELS, key=lambda c: (covered(c), -c))
    return CF_KERNELS[cols], cols, height * width / covered(cols)


def direct_conv(device, cout: int, kernel_size, stride, dilation, groups, out_size) -> tuple[str, int] | None:
    """(kernel, tile columns) when conv2d_3x3 computes this convolution, None for the GEMM:
    conv2d_3x3 runs on GPUs, for 3×3 stride-1 windows, few channels, and images that fill at
    least MIN_TILE_USE of their tiles (the GEMM's columns run on from one image into the next,
    so small images waste none of its tiles; 8×8 digits would leave 7/8 of conv2d_3x3's idle)."""
    if not (device.cheap_barriers and cout <= MEDIUM.rows and tuple(kernel_size) == (3, 3) and stride == (1, 1)
            and dilation == (1, 1) and groups == 1):
        return None
    name, cols, use = pixel_tiles(*out_size)
    return (name, cols) if use >= MIN_TILE_USE else None


def _direct_3x3_tile(cout):
    """(kernel, output channels, pixel rows) of the direct 3×3 forward's tile for `cout` channels:
    32 × (16 × 16) up to 32 channels, where a 64-channel tile would be half idle, else 64 × (8 × 16)."""
    return ("conv2d_3x3_mma_32", C3_CO_32, C3_ROWS_32) if cout <= C3_CO_32 else ("conv2d_3x3_mma", C3_CO, C3_ROWS)


def _conv3x3_mma(cb, y, x, w, b, padding, policy, relu, mask):
    """y = conv(x, w) + b (through a fused relu where `relu`, a fused relu_grad by `mask` where
    given) on simdgroup matrices, directly (conv2d_3x3_mma or, for up to 32 output channels,
    conv2d_3x3_mma_32), after packing w."""
    n, cin, h, wd = x.shape
    _, cout, oh, ow = y.shape
    lib = y.device.library("conv", precision=policy)
    name, co_tile, rows = _direct_3x3_tile(cout)
    chunks, cout_padded = groups_for(cin, C3_CI), groups_for(cout, C3_CO) * C3_CO  # packed for either tile
    packed = empty((chunks * 9 * cout_padded * C3_CI,), y.device, y.dtype)  # staged as stored
    cb.dispatch(lib.kernel(D.kernel_name("pack_weights_3x3", y.dtype)), groups=groups_for(packed.size, 256), threads=256,
                args=[w, packed, dict(cin=cin, cout=cout, chunks=chunks, cout_padded=cout_padded)])
    tiles_x = groups_for(ow, C3_COLS)
    tiles = tiles_x * groups_for(oh, rows)
    params = dict(cin=cin, h=h, w=wd, cout=cout, oh=oh, ow=ow, pad_h=padding[0], pad_w=padding[1],
                  tiles_x=tiles_x, tiles=tiles, has_bias=int(b is not None), relu=relu, masked=int(mask is not None))
    cb.dispatch(lib.kernel(D.kernel_name(name, y.dtype)), groups=(n * tiles, groups_for(cout, co_tile)),
                threads=MMA_THREADS, args=[x, packed, w if b is None else b, y, params, y if mask is None else mask])


def _conv_kxk_mma_8(cb, y, x, w, b, padding, policy, relu):
    """y = conv(x, w) + b (through a fused relu where `relu`) into at most K8_CO channels on
    simdgroup matrices (conv2d_kxk_mma_8), after packing w."""
    _, cout, oh, ow = y.shape
    params = _kxk_params(x, cout, oh, ow, w.shape[2:], padding, K8_ROWS, has_bias=int(b is not None), relu=relu)
    lib = y.device.library("conv", precision=policy)
    packed = empty((groups_for(x.shape[1], K8_CI) * params["kh"] * params["kw"] * K8_CI * K8_CO,), y.device, y.dtype)
    cb.dispatch(lib.kernel(D.kernel_name("pack_weights_kxk_8", y.dtype)), groups=groups_for(packed.size, 256),
                threads=256, args=[w, packed, params])
    cb.dispatch(lib.kernel(D.kernel_name("conv2d_kxk_mma_8", y.dtype)), groups=x.shape[0] * params["tiles"],
                threads=MMA_THREADS, args=[x, packed, w if b is None else b, y, params])


def _conv2d_encode(cb, y, x, w, b=None, *, stride, padding, dilation, groups, activation=None, mask=None):
    """y = conv2d(x, w, b) through `activation`; `mask`: then relu_grad(y, mask), for an input
    gradient (encode_input_grad), fused into the direct 3×3 kernels, a pass of its own after the others."""
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    n, cin, h, wd = x.shape
    _, cout, oh, ow = y.shape
    relu = int(activation == "relu")  # every kernel below applies it as it stores (sum_splits, split)
    policy = direct_mma(y.device, cout, w.shape[2:], stride, dilation, groups, y.dtype)
    if policy:
        return _conv3x3_mma(cb, y, x, w, b, padding, policy, relu, mask)
    policy = kxk_mma(y.device, cout, w.shape[2:], stride, dilation, groups, y.dtype)
    if policy:
        _conv_kxk_mma_8(cb, y, x, w, b, padding, policy, relu)
        return _relu_grad_in_place(cb, y, mask)
    direct = direct_conv(y.device, cout, w.shape[2:], stride, dilation, groups, (oh, ow))
    if direct:
        name, cols = direct
        tiles_x = groups_for(ow, cols)
        tiles = tiles_x * groups_for(oh, CF_PIXELS // cols)
        params = dict(cin=cin, h=h, w=wd, cout=cout, oh=oh, ow=ow, pad_h=padding[0], pad_w=padding[1],
                      tiles_x=tiles_x, tiles=tiles, has_bias=int(b is not None), relu=relu, masked=int(mask is not None))
        cb.dispatch(y.device.library("conv").kernel(D.kernel_name(name, y.dtype)), threads=CF_THREADS,
                    groups=(n * tiles, groups_for(cout, CF_CO)), args=[x, w, w if b is None else b, y, params,
                                                                      y if mask is None else mask])
        return
    t = tiling(cout // groups)
    k, threads = product(y.device, "conv2d", y.dtype, t, macs=y.size * (cin // groups) * w.shape[2] * w.shape[3])
    grid = (groups_for(n * oh * ow, t.cols), groups_for(cout // groups, t.rows), groups)
    # Split only below a wave of one threadgroup a multiprocessor: the slices of a large output
    # cost more to add than the split gains (4×128×64²→128, 128 tiles in two: 0.186 → 0.225 ms).
    reduction = cin // groups * w.shape[2] * w.shape[3]
    splits, chunk = split_reduction(reduction, math.prod(grid), target=132, min_chunk=128)
    partial = split_output(y, splits)
    params = _params(n, cin, h, wd, cout, oh, ow, w.shape[2], w.shape[3], a, has_bias=int(b is not None), chunk=chunk,
                     relu=relu)
    cb.dispatch(k, groups=(*grid[:2], groups * splits), threads=threads,
                args=[x, w, w if b is None else b, y, partial, params])
    sum_splits(cb, k.library, partial, y, splits, relu)
    _relu_grad_in_place(cb, y, mask)


def _relu_grad_in_place(cb, g, mask):
    """g = relu_grad(g, mask), where the kernel that wrote g could not (nothing without a mask): the
    relu_grad op's own encoding, in place."""
    if mask is not None:
        _ops.REGISTRY["relu_grad"].encode(cb, g, g, mask)


def _conv2d_grad(g, y, x, w, b=None, *, stride, padding, dilation, groups, activation=None):
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if activation == "relu":  # relu's own rule, on the fused output (y > 0 exactly where relu's input is)
        g = apply("relu_grad", g, y)
    dx = apply("conv2d_input_grad", g, w, input_size=tuple(x.shape[2:]), **a)
    dw = apply("conv2d_weight_grad", g, x, kernel_size=tuple(w.shape[2:]), **a)
    return (dx, dw) if b is None else (dx, dw, apply("conv2d_bias_grad", g))


def _products(name):
    """The kernels of tiled product `name`: each tiling, with each accumulator."""
    return [f"conv.{name}{t}{acc}" for t in ("", "_medium", "_narrow") for acc in ("", "_mma")]


register("conv2d", check=_conv2d_check, encode=_conv2d_encode, reference=R.conv2d, grad=_conv2d_grad,
         kernels=[*_products("conv2d"), "conv.conv2d_3x3", "conv.conv2d_3x3_16x32", "conv.conv2d_3x3_mma",
                  "conv.conv2d_3x3_mma_32", "conv.pack_weights_3x3", "conv.conv2d_kxk_mma_8", "conv.pack_weights_kxk_8",
                  "conv.sum_splits"], dtypes=D.FLOATS)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """2-D convolution (cross-correlation, as in PyTorch) of NCHW images, stored in float32, float16 or
    bfloat16 (float sums, the result rounded once).

    Args:
        x: input, (N, Cin, H, W).
        w: weights, (Cout, Cin/groups, KH, KW).
        b: optional bias, (Cout,).
        stride, padding, dilation: an int or an (h, w) pair; padding is zeros on both sides.
        groups: split the channels into this many independent convolutions.
        activation: None, or "relu": relu(conv + b) in one pass, the relu applied as the kernel
            stores (bit for bit `mm.ops.relu` of the unfused result). A graph fuses a conv2d
            whose only reader is a relu by itself (`Graph.plan`).

    Returns:
        (N, Cout, OH, OW) with OH = (H + 2·pad − dil·(KH − 1) − 1) // stride + 1 (likewise OW).

    Example:
        >>> x = mm.tensor(np.random.randn(1, 3, 8, 8))
        >>> w = mm.tensor(np.random.randn(16, 3, 3, 3))
        >>> mm.ops.conv2d(x, w, padding=1).shape
        (1, 16, 8, 8)
    """
    return apply("conv2d", *((x, w) if b is None else (x, w, b)),
                 stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation)


_ops.conv2d = conv2d  # the registry's entry point would pass b=None on as an input


# ---------------------------------------------------------------- gradients

def _input_grad_check(g, w, mask=None, *, input_size, stride=1, padding=0, dilation=1, groups=1):
    """dx of conv2d from the output gradient g and the weights, for an input of `input_size` (H, W);
    with a `mask` of dx's shape, relu_grad(dx, mask) in the same pass where the kernels can (a graph
    fuses a relu_grad after a conv2d_input_grad so: mlmetal/graph/fusion.py)."""
    op = "conv2d_input_grad"
    a = _window(op, stride, padding, dilation, groups)
    h, wd = pair(input_size, op, "input_size")
    ensure(len(g) == 4, op, f"output gradient must be 4-D, got shape {g}")
    ensure(len(w) == 4 and min(w) >= 1, op, f"weights must be 4-D and non-empty, got shape {w}")
    ensure(g[1] == w[0], op, f"output gradient has {g[1]} channels, the weights {w[0]}")
    cin = w[1] * groups
    _check_weights(op, cin, w, groups)
    ensure(h >= 1 and wd >= 1, op, f"input_size must be positive, got {(h, wd)}")
    oh, ow = _output_size(op, h, wd, w[2], w[3], a)
    ensure(tuple(g[2:]) == (oh, ow), op, f"output gradient is {g[2]}×{g[3]}, the convolution of a {h}×{wd} "
                                         f"input gives {oh}×{ow}")
    _check_sizes(op, g, w, (g[0], cin, h, wd))
    ensure(mask is None or tuple(mask) == (g[0], cin, h, wd), op, f"mask must have the input's shape {(g[0], cin, h, wd)}, "
                                                                  f"got {mask}")
    return (g[0], cin, h, wd), dict(a, input_size=(h, wd))


def encode_input_grad(cb, dx, g, w, b=None, *, input_size, stride, padding, dilation, groups, mask=None):
    """dx = conv2d_input_grad(g, w) (+ b[channel], for conv_transpose2d, whose product this is), then
    relu_grad(dx, mask) where a mask is given."""
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    n, cin, h, wd = dx.shape
    oh, ow = g.shape[2:]
    cout, cin_g, kh, kw = w.shape
    turned = [d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding)]
    if stride == (1, 1) and min(turned) >= 0:
        # a forward convolution of g with the weights turned around (see flip_weights)
        lib = dx.device.library("conv")
        flipped = empty((cin, cout // groups, kh, kw), dx.device, w.dtype)
        cb.dispatch(lib.kernel(D.kernel_name("flip_weights", w.dtype)), groups=groups_for(flipped.size, 256), threads=256,
                    args=[w, flipped, dict(count=flipped.size, cout=cout, cin_g=cin_g, groups=groups, kh=kh, kw=kw)])
        _conv2d_encode(cb, dx, g, flipped, b, stride=(1, 1), padding=tuple(turned), dilation=dilation, groups=groups,
                       mask=mask)
        return
    t = tiling(cin // groups)
    k, threads = product(dx.device, "conv2d_input_grad", dx.dtype, t, macs=g.size * (cin // groups) * kh * kw)
    (sh, sw) = stride
    class_pixels = n * -(-h // sh) * -(-wd // sw)  # the largest of the stride_h·stride_w pixel classes
    grid = (groups_for(class_pixels, t.cols), groups_for(cin // groups, t.rows), groups * sh * sw)
    params = _params(n, cin, h, wd, cout, oh, ow, kh, kw, a, has_bias=int(b is not None))
    cb.dispatch(k, groups=grid, threads=threads, args=[g, w, w if b is None else b, dx, params])
    _relu_grad_in_place(cb, dx, mask)


def _input_grad_encode(cb, dx, g, w, mask=None, **attrs):
    encode_input_grad(cb, dx, g, w, None, mask=mask, **attrs)


register("conv2d_input_grad", check=_input_grad_check, encode=_input_grad_encode, reference=R.conv2d_input_grad,
         grad=None, kernels=[*_products("conv2d_input_grad"), "conv.flip_weights"], dtypes=D.FLOATS)


def _weight_grad_check(g, x, *, kernel_size, stride=1, padding=0, dilation=1, groups=1):
    """dw of conv2d from the output gradient g and the input x, for a `kernel_size` (KH, KW) window."""
    op = "conv2d_weight_grad"
    a = _window(op, stride, padding, dilation, groups)
    kh, kw = pair(kernel_size, op, "kernel_size")
    ensure(len(g) == 4 and len(x) == 4, op, f"output gradient and input must be 4-D, got shapes {g} and {x}")
    ensure(g[0] == x[0], op, f"output gradient has {g[0]} images, the input {x[0]}")
    ensure(kh >= 1 and kw >= 1, op, f"kernel_size must be positive, got {(kh, kw)}")
    w = (g[1], x[1] // groups, kh, kw)
    _check_weights(op, x[1], w, groups)
    oh, ow = _output_size(op, x[2], x[3], kh, kw, a)
    ensure(tuple(g[2:]) == (oh, ow), op, f"output gradient is {g[2]}×{g[3]}, the convolution of the "
                                         f"{x[2]}×{x[3]} input gives {oh}×{ow}")
    _check_sizes(op, g, x, w)
    return w, dict(a, kernel_size=(kh, kw))


WG_ROWS, WG_COLS, WG_CO, WG_CI, WG_THREADS = 8, 16, 16, 16, 256  # conv2d_weight_grad_3x3's tiles (conv.metal)


def direct_weight_grad(device, cout: int, kernel_size, stride, dilation, groups) -> bool:
    """Whether conv2d_weight_grad_3x3 computes this weight gradient (rather than the GEMM)."""
    return (device.cheap_barriers and cout <= MEDIUM.rows and kernel_size == (3, 3) and stride == (1, 1)
            and dilation == (1, 1) and groups == 1)


# The direct 3×3 weight gradients: (kernel, pixel tile rows × columns, input × output channels a
# threadgroup, threads), with float fma and on simdgroup matrices.
WG_DIRECT = {None: ("conv2d_weight_grad_3x3", WG_ROWS, WG_COLS, WG_CI, WG_CO, WG_THREADS),
             "mma": ("conv2d_weight_grad_3x3_mma", C3_ROWS, C3_COLS, D3_CI, D3_CO, MMA_THREADS)}


# Threadgroups the direct weight gradients aim for on a GPU: one wave at the kernel's occupancy on
# a 132-multiprocessor H100 or H200. conv2d_weight_grad_3x3_mma in 16-bit storage (168 registers a
# thread) runs three a multiprocessor, in float32 (182) two; conv2d_weight_grad_3x3 takes the
# float32 entry whatever its storage. H100, bfloat16, 264 → 396 threadgroups: 4×96×256²→32
# 0.278 → 0.229 ms, 4×384×64²→128 0.298 → 0.202 ms; 528 (a wave and a third) was slower than 396
# on each shape timed.
WG_DIRECT_TARGET = {2: 396, 4: 264}  # by the storage type's bytes


def _weight_grad_3x3(cb, dw, g, x, padding, policy=None):
    """dw of a 3×3 stride-1 convolution by a direct kernel: on simdgroup matrices under `policy`,
    else with float fma. Each threadgroup sums a chunk of the images' pixel tiles into float32 slices;
    sum_splits adds them."""
    n, cin, h, wd = x.shape
    _, cout, oh, ow = g.shape
    name, rows, cols, ci_block, co_block, threads = WG_DIRECT["mma" if policy else None]
    tiles_x, tiles_y = groups_for(ow, cols), groups_for(oh, rows)
    blocks = groups_for(cin, ci_block) * groups_for(cout, co_block)
    # As many splits as fill a GPU once (at least two tiles each); on cpu a few.
    if not dw.device.cheap_barriers:
        target = 4
    else:
        target = WG_DIRECT_TARGET[dw.dtype.itemsize if policy else 4]
    splits, chunk = split_reduction(n * tiles_x * tiles_y, blocks, target=target, min_chunk=2, multiple=1)
    lib = dw.device.library("conv", precision=policy or "highest")
    partial = partial_for(dw, splits)
    params = dict(n=n, cin=cin, h=h, w=wd, cout=cout, oh=oh, ow=ow, pad_h=padding[0], pad_w=padding[1],
                  tiles_x=tiles_x, tiles_y=tiles_y, chunk=chunk)
    grid = (groups_for(cin, ci_block), groups_for(cout, co_block), splits)
    cb.dispatch(lib.kernel(D.kernel_name(name, dw.dtype)), groups=grid, threads=threads, args=[g, x, partial, params])
    sum_splits(cb, lib, partial, dw, splits)


# Threadgroups conv2d_weight_grad_kxk_mma_8 aims for on a GPU: one wave at four a multiprocessor
# on a 132-multiprocessor H100 or H200. H100, bfloat16, 264 / 396 / 528 / 660 / 792 / 1056:
# 4×32×256²→3 9×9 0.411 / 0.326 / 0.275 / 0.388 / 0.355 / 0.282 ms, 4×16×256²→8 9×9 0.246 /
# 0.219 / 0.199 / 0.198 / 0.252 / 0.248 ms (a wave and a part lose; float32 alike).
WG_KXK_TARGET = 528


def _weight_grad_kxk_mma_8(cb, dw, g, x, kernel_size, padding, policy):
    """dw of a convolution into at most K8_CO channels on simdgroup matrices
    (conv2d_weight_grad_kxk_mma_8): each threadgroup sums a chunk of the images' pixel tiles into
    float32 slices; sum_splits adds them."""
    n, cin = x.shape[:2]
    _, cout, oh, ow = g.shape
    params = _kxk_params(x, cout, oh, ow, kernel_size, padding, D8_ROWS)
    blocks = groups_for(cin, K8_CI)
    target = WG_KXK_TARGET if dw.device.cheap_barriers else 4
    splits, params["chunk"] = split_reduction(n * params["tiles"], blocks, target=target, min_chunk=2, multiple=1)
    lib = dw.device.library("conv", precision=policy)
    partial = partial_for(dw, splits)
    cb.dispatch(lib.kernel(D.kernel_name("conv2d_weight_grad_kxk_mma_8", dw.dtype)), groups=(blocks, 1, splits),
                threads=MMA_THREADS, args=[g, x, partial, params])
    sum_splits(cb, lib, partial, dw, splits)


def _weight_grad_encode(cb, dw, g, x, *, kernel_size, stride, padding, dilation, groups):
    policy = direct_mma(dw.device, g.shape[1], kernel_size, stride, dilation, groups, g.dtype)
    if policy:
        return _weight_grad_3x3(cb, dw, g, x, padding, policy)
    policy = kxk_mma(dw.device, g.shape[1], kernel_size, stride, dilation, groups, g.dtype)
    if policy:
        return _weight_grad_kxk_mma_8(cb, dw, g, x, kernel_size, padding, policy)
    if direct_weight_grad(dw.device, g.shape[1], kernel_size, stride, dilation, groups):
        return _weight_grad_3x3(cb, dw, g, x, padding)
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    n, cin, h, wd = x.shape
    _, cout, oh, ow = g.shape
    cols = dw.size // cout
    t = tiling(cout // groups)
    k, threads = product(dw.device, "conv2d_weight_grad", dw.dtype, t, macs=dw.size * n * oh * ow)
    grid = (groups_for(cols, t.cols), groups_for(cout // groups, t.rows), groups)
    # On GPUs the split's target is tuned per tiling (H100, U-Net and style steps at 256²):
    # twice the threadgroups for the narrow tiling (16→16 at 256²: 173 → 135 µs), half for the
    # medium one (32→64 at 64²: 58 → 50 µs).
    target = int(264 * SPLIT_FACTOR.get(t.suffix, 1)) if dw.device.cheap_barriers else 264
    splits, chunk = split_reduction(n * oh * ow, math.prod(grid), target=target)
    partial = partial_for(dw, splits)
    params = _params(n, cin, h, wd, cout, oh, ow, *kernel_size, a, chunk=chunk)
    cb.dispatch(k, groups=(*grid[:2], groups * splits), threads=threads, args=[g, x, partial, params])
    sum_splits(cb, k.library, partial, dw, splits)


register("conv2d_weight_grad", check=_weight_grad_check, encode=_weight_grad_encode, reference=R.conv2d_weight_grad,
         grad=None, kernels=[*_products("conv2d_weight_grad"), "conv.conv2d_weight_grad_3x3",
                             "conv.conv2d_weight_grad_3x3_mma", "conv.conv2d_weight_grad_kxk_mma_8",
                             "conv.sum_splits"], dtypes=D.FLOATS)


def _bias_grad_check(g):
    """db of conv2d: the output gradient summed over images and pixels."""
    ensure(len(g) == 4 and min(g) >= 1, "conv2d_bias_grad", f"output gradient must be 4-D and non-empty, got shape {g}")
    return (g[1],), {}


BIAS_GRAD_GROUPS = 64  # the bias gradient's threadgroups on a GPU, at least (one a channel)


def _bias_grad_encode(cb, db, g):
    n, c, h, w = g.shape
    # On a GPU a channel a threadgroup leaves most of it idle at few channels (H100, dy of
    # 4×16×256²: 0.064 ms; split four ways, 0.053 ms); many splits of many channels lose to the
    # extra pass (64 channels split eight ways: 0.030 → 0.058 ms).
    target = BIAS_GRAD_GROUPS if db.device.cheap_barriers else c
    splits, chunk = split_reduction(h * w, c, target=target, min_chunk=1024)
    lib = db.device.library("conv")
    partial = partial_for(db, splits)
    cb.dispatch(lib.kernel(D.kernel_name("conv2d_bias_grad", db.dtype)), groups=(splits, c), threads=256,
                args=[g, partial, {"n": n, "c": c, "plane": h * w, "chunk": chunk}])
    sum_splits(cb, lib, partial, db, splits)


register("conv2d_bias_grad", check=_bias_grad_check, encode=_bias_grad_encode, reference=R.conv2d_bias_grad,
         grad=None, kernels=["conv.conv2d_bias_grad", "conv.sum_splits"], dtypes=D.FLOATS)
