"""Simdgroup matrices (include/mlm_simdgroup_matrix.h), the matmul precision policy, and the tiled
products on simdgroup matrices (`*_mma` kernels of tile.h) under each policy.

The bound every product is held to: with operands rounded to p mantissa bits (unit roundoff
u = 2^-(p+1): TF32 2^-11, bfloat16 2^-8; float operands unrounded, u = 0) and float32 sums of K
terms,

    |computed − exact| ≤ (2u + 2K·2^-24) · Σ_k |a_ik|·|b_kj|,

since each product of rounded operands is within 2u (to first order) of the exact product, and
each of the K float additions within 2^-24 of the magnitude the sum has reached; the factor 2 on
the sums leaves room for the matrix hardware's own order and rounding of the additions. Under
`highest` the cuda backend's split-TF32 products are each within about 3·2^-22 (the dropped lo·lo
term and lo's own rounding), taken as u = 2^-21. The cpu emulation rounds operands exactly as the
cuda backend does, so the one bound holds on both, and on cpu the `high` and `medium` products
are compared bit for bit with a numpy model of the emulation.

In float16 and bfloat16 storage the operands are the stored values (exact in TF32) and the result
is rounded once more where it is stored: u_s more (2^-11, 2^-8) relative to it, which is at most
u_s·Σ|a|·|b|; float16's subnormals add half their spacing, 2^-25, absolute.
"""

import importlib
import threading

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mlmetal as mm
from mlmetal.ops import conv, tiling
from mlmetal.reference import conv as RC
from mlmetal.reference import gram as RG

ROUNDOFF = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}
POLICIES = list(ROUNDOFF)
STORE_ROUNDOFF = {np.dtype(np.float32): 0.0, np.dtype(np.float16): 2.0**-11, np.dtype(mm.bfloat16): 2.0**-8}
# The products on simdgroup matrices: float32 storage under each policy, and the 16-bit storage
# types under `high` (the policy a low-precision run would pair them with).
STORAGE_CASES = [(p, np.dtype(np.float32)) for p in POLICIES] + [("high", d) for d in (np.dtype(np.float16), mm.bfloat16)]
STORAGE_IDS = [f"{p}-{d}" for p, d in STORAGE_CASES]


def roundoff(dev, policy):
    return 2.0**-21 if policy == "highest" and dev.name == "cuda" else ROUNDOFF[policy]


def assert_within(got, exact, magnitude, k, u, dtype=np.float32):
    """|got − exact| ≤ (2u + 2K·2^-24)·magnitude elementwise (magnitude = Σ|a|·|b|), plus the
    rounding to storage type `dtype`."""
    bound = (2 * u + 2 * k * 2.0**-24 + STORE_ROUNDOFF[np.dtype(dtype)]) * magnitude + 1e-30
    bound += 2.0**-25 if np.dtype(dtype) == np.float16 else 0.0
    err = np.abs(got.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} over the bound {bound[worst]:.3g} at {worst}"


def round_tf32(a):
    b = np.asarray(a, np.float32).view(np.uint32)
    return ((b + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def round_bf16(a):
    b = np.asarray(a, np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)


def emulated_product(a, b, c, policy):
    """The cpu emulation's d = c + a·b for operands whose rounded products are exact floats:
    float32 sums in order k = 0 … 7."""
    r = {"high": round_tf32, "medium": round_bf16}[policy]
    ra, rb, d = r(a), r(b), c.astype(np.float32).copy()
    for k in range(8):
        d = (d + ra[:, k:k + 1] * rb[k:k + 1, :]).astype(np.float32)
    return d


def run(dev, lib, name, groups, threads, args):
    cb = dev.command_buffer()
    cb.dispatch(lib.kernel(name), groups=groups, threads=threads, args=args)
    cb.commit()
    cb.wait()


# ---------------------------------------------------------------- loads and stores

ROUNDTRIP = """
#include <metal_stdlib>
using namespace metal;
struct P { uint stride, ox, oy, t_in, out_stride, px, py, t_out; };
kernel void roundtrip(device const T* src [[buffer(0)]], device T* dst [[buffer(1)]], constant P& p [[buffer(2)]],
                      uint lane [[thread_index_in_simdgroup]]) {
    threadgroup T staged[64];
    simdgroup_matrix<T, 8, 8> m;
    simdgroup_load(m, src, p.stride, ulong2(p.ox, p.oy), p.t_in != 0);
    simdgroup_store(m, staged, 8);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_load(m, staged);
    simdgroup_store(m, dst, p.out_stride, ulong2(p.px, p.py), p.t_out != 0);
}
"""


def block(a, stride, ox, oy, transpose):
    """The matrix simdgroup_load reads: the 8×8 block of rows `stride` apart at column ox, row
    oy, transposed where asked."""
    m = a.reshape(-1, stride)[oy:oy + 8, ox:ox + 8]
    return m.T if transpose else m


MSL_TYPE = {np.dtype(np.float32): "float", np.dtype(np.float16): "half", np.dtype(mm.bfloat16): "bfloat"}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, mm.bfloat16], ids=["float", "half", "bfloat"])
@given(data=st.data())
def test_load_and_store_honour_stride_origin_and_transpose(dev, dtype, data):
    stride = data.draw(st.integers(8, 19), label="stride")
    ox, oy = data.draw(st.integers(0, stride - 8), label="ox"), data.draw(st.integers(0, 3), label="oy")
    out_stride = data.draw(st.integers(8, 13), label="out_stride")
    px, py = data.draw(st.integers(0, out_stride - 8), label="px"), data.draw(st.integers(0, 2), label="py")
    t_in, t_out = data.draw(st.booleans(), label="t_in"), data.draw(st.booleans(), label="t_out")
    src = np.random.default_rng(stride).standard_normal((oy + 8) * stride).astype(dtype)
    lib = dev.library(source=ROUNDTRIP.replace("T", MSL_TYPE[np.dtype(dtype)]))
    poison = np.full((py + 8) * out_stride, 7.5, dtype)
    dst = dev.buffer(poison)
    run(dev, lib, "roundtrip", 1, 32, [dev.buffer(src), dst,
                                       dict(stride=stride, ox=ox, oy=oy, t_in=int(t_in), out_stride=out_stride,
                                            px=px, py=py, t_out=int(t_out))])
    want = poison.reshape(-1, out_stride).copy()
    m = block(src, stride, ox, oy, t_in)
    want[py:py + 8, px:px + 8] = m.T if t_out else m
    np.testing.assert_array_equal(dst.numpy(dtype).reshape(-1, out_stride), want)


# ---------------------------------------------------------------- products

PRODUCT = """
#include <metal_stdlib>
using namespace metal;
#include "tile.h"
kernel void products(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                     device const float* c [[buffer(2)]], device float* d [[buffer(3)]]) {
    simdgroup_float8x8 ma0, ma1, mb, mc, d0, d1, d2;
    simdgroup_load(ma0, a);
    simdgroup_load(ma1, a + 64);
    simdgroup_load(mb, b);
    simdgroup_load(mc, c);
    simdgroup_multiply_accumulate(d0, ma0, mb, mc);            // one product
    simdgroup_multiply_accumulate_pair(d1, d2, ma0, ma1, mb, mc, mc);  // two sharing b
    simdgroup_store(d0, d);
    simdgroup_store(d1, d + 64);
    simdgroup_store(d2, d + 128);
    simdgroup_multiply(d0, ma1, mb);                            // no accumulator
    simdgroup_store(d0, d + 192);
    simdgroup_multiply_accumulate(d0, simdgroup_float8x8(2.0f), mb, make_filled_simdgroup_matrix<float, 8>(0.5f));
    simdgroup_store(d0, d + 256);
}
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_products_under_each_policy(dev, policy):
    rng = np.random.default_rng(POLICIES.index(policy))
    a = rng.standard_normal((2, 8, 8)).astype(np.float32)
    b, c = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32)
    out = dev.buffer(nbytes=5 * 64 * 4)
    lib = dev.library(source=PRODUCT, precision=policy)
    run(dev, lib, "products", 1, 32, [dev.buffer(a), dev.buffer(b), dev.buffer(c), out])
    d = out.numpy(np.float32).reshape(5, 8, 8)
    a64, b64, c64 = a.astype(np.float64), b.astype(np.float64), c.astype(np.float64)
    u = roundoff(dev, policy)
    assert_within(d[0], a64[0] @ b64 + c64, np.abs(a64[0]) @ np.abs(b64) + np.abs(c64), 9, u)
    assert_within(d[2], a64[1] @ b64 + c64, np.abs(a64[1]) @ np.abs(b64) + np.abs(c64), 9, u)
    assert_within(d[3], a64[1] @ b64, np.abs(a64[1]) @ np.abs(b64), 8, u)
    np.testing.assert_array_equal(d[1], d[0])  # the pair's first product is the single one
    assert_within(d[4], 2 * b64 + 0.5, 2 * np.abs(b64) + 0.5, 9, u)  # the diagonal constructor
    if dev.name == "cpu" and policy != "highest":
        np.testing.assert_array_equal(d[0], emulated_product(a[0], b, c, policy))
        np.testing.assert_array_equal(d[2], emulated_product(a[1], b, c, policy))
    if policy != "highest":  # the operands really are rounded: a float product differs
        assert not np.array_equal(d[0], (a64[0] @ b64 + c64).astype(np.float32))


STAGED = """
#include <metal_stdlib>
using namespace metal;
kernel void staged(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                   device float* d [[buffer(2)]], uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float rounded[128], plain[64];
    for (uint i = lane; i < 64; i += 32) {
        rounded[i] = staged_operand(a[i]);
        rounded[64 + i] = staged_operand(b[i]);
        plain[i] = a[i];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 ma, mb, mp, md;
    simdgroup_load(ma, a);
    simdgroup_load(mb, b);
    simdgroup_multiply(md, ma, mb);
    simdgroup_store(md, d);                 // rounded in the product
    simdgroup_load_staged(ma, rounded);
    simdgroup_load_staged(mb, rounded + 64);
    simdgroup_multiply(md, ma, mb);
    simdgroup_store(md, d + 64);            // staged rounded: the same bits
    simdgroup_load_staged(mp, plain);
    simdgroup_multiply(md, mp, mb);
    simdgroup_store(md, d + 128);           // staged without staged_operand
}
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_staged_operands_give_the_products_bits(dev, policy):
    """Operands rounded once where they are staged (staged_operand) and loaded as such
    (simdgroup_load_staged) multiply to the same bits as operands the product rounds; on cpu a
    float staged without staged_operand that it would round loads as NaN, so a kernel that
    forgets it fails its tests rather than losing accuracy on cuda unseen."""
    rng = np.random.default_rng(11)
    a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    a[0, 0] = 1.5  # exact in every format: staged as it is
    out = dev.buffer(nbytes=3 * 64 * 4)
    run(dev, dev.library(source=STAGED, precision=policy), "staged", 1, 32, [dev.buffer(a), dev.buffer(b), out])
    d = out.numpy(np.float32).reshape(3, 8, 8)
    np.testing.assert_array_equal(d[1], d[0])
    if policy != "high":  # staged_operand leaves floats as they are
        np.testing.assert_array_equal(d[2], d[0])
    elif dev.name == "cpu":
        assert np.isnan(d[2]).all()  # every row of a has an element TF32 cannot hold


SPLIT = """
#include <metal_stdlib>
using namespace metal;
kernel void split(device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
                  device float* d [[buffer(2)]], uint lane [[thread_index_in_simdgroup]]) {
    threadgroup float staged[256], plain[128];  // a's planes, then b's; a and b as they are
    for (uint i = lane; i < 64; i += 32) {
#if MLM_STAGED_SPLIT  // as tile.h's stage_split stages them
        staged[i] = split_hi(a[i]);
        staged[64 + i] = split_lo(a[i]);
        staged[128 + i] = split_hi(b[i]);
        staged[192 + i] = split_lo(b[i]);
#else
        staged[i] = staged_operand(a[i]);
        staged[128 + i] = staged_operand(b[i]);
#endif
        plain[i] = a[i];
        plain[64 + i] = split_lo(a[i]);  // a rest without its high part
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 ma, mb, md;
    simdgroup_load(ma, a);
    simdgroup_load(mb, b);
    simdgroup_multiply(md, ma, mb);
    simdgroup_store(md, d);                 // split in the product
    simdgroup_load_split(ma, staged, staged + 64);
    simdgroup_load_split(mb, staged + 128, staged + 192);
    simdgroup_multiply(md, ma, mb);
    simdgroup_store(md, d + 64);            // staged split
    simdgroup_load_split(ma, plain, plain + 64);
    simdgroup_multiply(md, ma, mb);
    simdgroup_store(md, d + 128);           // a staged as it is, not through split_hi
    simdgroup_load_split(ma, staged, staged + 65);
    simdgroup_multiply(md, ma, mb);
    simdgroup_store(md, d + 192);           // a's rests read one element off
}
"""


@pytest.mark.parametrize("policy", POLICIES)
def test_split_staged_operands_give_the_products_bits(dev, policy):
    """Float operands staged in two planes (split_hi, split_lo: tile.h's stage_split) and loaded as such
    (simdgroup_load_split) multiply to the bits of the products of the values as they are, infinities
    and NaNs included: on cuda the products split each value the same way, on cpu (exact `highest`
    products) a split load is x itself; under the other policies they are staged operands. Rests read
    from the wrong place change the products, and on cpu a high part that split_hi would change loads
    as NaN, so a kernel that stages its planes wrong fails on cpu."""
    rng = np.random.default_rng(13)
    a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    a[0, 0], a[1, 1], b[2, 3], b[4, 4] = 1.5, np.inf, np.nan, -np.inf
    out = dev.buffer(nbytes=4 * 64 * 4)
    run(dev, dev.library(source=SPLIT, precision=policy), "split", 1, 32, [dev.buffer(a), dev.buffer(b), out])
    d = out.numpy(np.float32).reshape(4, 8, 8)
    np.testing.assert_array_equal(d[1], d[0])
    assert np.isnan(d[0]).any() and np.isinf(d[0]).any()
    if policy == "highest":
        assert not np.array_equal(d[3], d[0])
        if dev.name == "cpu":
            assert np.isnan(d[2]).all()  # every row of a has an element TF32 cannot hold


LOW_PRODUCT = """
#include <metal_stdlib>
using namespace metal;
kernel void low_product(device const T* a [[buffer(0)]], device const T* b [[buffer(1)]],
                        device const float* c [[buffer(2)]], device float* d [[buffer(3)]], device T* e [[buffer(4)]],
                        device float* f [[buffer(5)]]) {
    simdgroup_matrix<T, 8, 8> ma, mb, me;
    simdgroup_float8x8 mc, mf;
    simdgroup_load(ma, a);
    simdgroup_load(mb, b);
    simdgroup_load(mc, c);
    simdgroup_multiply_accumulate(mf, ma, mb, mc);  // 16-bit operands, float accumulator
    simdgroup_store(mf, d);
    simdgroup_multiply(me, ma, mb);                 // a 16-bit result …
    simdgroup_store(me, e);
    simdgroup_multiply_accumulate(mf, ma, me, mc);  // … as the next product's right operand
    simdgroup_store(mf, f);
}
"""


@pytest.mark.parametrize("dtype", [np.float16, mm.bfloat16], ids=["half", "bfloat"])
@pytest.mark.parametrize("policy", POLICIES)
def test_16bit_operands_are_exact_under_every_policy(dev, policy, dtype):
    """half and bfloat operands enter a product as they are (on NVIDIA GPUs, the 16-bit tensor-core
    instructions); the sums are float; a 16-bit result rounds once, and feeds a product as well."""
    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal((8, 8)).astype(dtype) for _ in range(2))
    c = rng.standard_normal((8, 8)).astype(np.float32)
    d, e, f = dev.buffer(nbytes=256), dev.buffer(nbytes=128), dev.buffer(nbytes=256)
    lib = dev.library(source=LOW_PRODUCT.replace("T", MSL_TYPE[np.dtype(dtype)]), precision=policy)
    run(dev, lib, "low_product", 1, 32, [dev.buffer(a), dev.buffer(b), dev.buffer(c), d, e, f])
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert_within(d.numpy(np.float32).reshape(8, 8), a64 @ b64 + c, np.abs(a64) @ np.abs(b64) + np.abs(c), 9, 0.0)
    low = e.numpy(dtype).reshape(8, 8).astype(np.float64)
    assert_within(low, a64 @ b64, np.abs(a64) @ np.abs(b64), 8, 0.0, dtype)  # and the rounding to dtype
    assert_within(f.numpy(np.float32).reshape(8, 8), a64 @ low + c, np.abs(a64) @ np.abs(low) + np.abs(c), 9, 0.0)


# ---------------------------------------------------------------- the policy

def test_policy_is_set_scoped_and_checked():
    assert mm.get_matmul_precision() == "highest"
    with mm.matmul_precision("medium"):
        assert mm.get_matmul_precision() == "medium"
        with mm.matmul_precision("high"):
            assert mm.get_matmul_precision() == "high"
        with mm.matmul_precision(None):  # a graph without a setting of its own
            assert mm.get_matmul_precision() == "medium"
    try:
        mm.set_matmul_precision("high")
        assert mm.get_matmul_precision() == "high"
        seen = []
        with mm.matmul_precision("medium"):  # a block covers its own thread only
            t = threading.Thread(target=lambda: seen.append(mm.get_matmul_precision()))
            t.start()
            t.join()
        assert seen == ["high"]
    finally:
        mm.set_matmul_precision("highest")
    for bad in ("fp16", "HIGH", None, 1):
        with pytest.raises(ValueError, match="'highest', 'high', 'medium'"):
            mm.set_matmul_precision(bad)


def test_device_library_refuses_an_unknown_precision(dev):
    with pytest.raises(ValueError, match="precision must be one of"):
        dev.library("matmul", precision="low")


# ---------------------------------------------------------------- the tiled products on simdgroup matrices

@pytest.fixture
def matrix_products(monkeypatch):
    """Products on simdgroup matrices under every policy, on every backend (the cpu one emulates them)."""
    monkeypatch.setattr(tiling, "matrix_hardware", lambda device: True)
    monkeypatch.setattr(tiling, "MATRIX_POLICIES", set(POLICIES))
    monkeypatch.setattr(tiling, "HIGHEST_MMA_MIN_MACS", 0)  # small products too, under `highest`


CHANNELS = st.sampled_from([1, 3, 8, 9, 16, 17, 31, 33, 40, 64, 65, 72])


@pytest.mark.parametrize("policy, dtype", STORAGE_CASES, ids=STORAGE_IDS)
@settings(max_examples=6)
@given(data=st.data())
def test_convolutions_on_simdgroup_matrices(dev, matrix_products, policy, dtype, data):
    n, cin, cout = data.draw(st.integers(1, 2), label="n"), data.draw(CHANNELS, label="cin"), data.draw(CHANNELS, label="cout")
    size, k = data.draw(st.integers(1, 12), label="size"), data.draw(st.sampled_from([1, 3, 4]), label="k")
    stride, pad = data.draw(st.sampled_from([1, 2]), label="stride"), data.draw(st.integers(0, 1), label="pad")
    if size + 2 * pad < k:
        size = k
    rng = np.random.default_rng(cin * 100 + cout)
    x = rng.standard_normal((n, cin, size, size)).astype(dtype)
    w = rng.standard_normal((cout, cin, k, k)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    a = dict(stride=(stride, stride), padding=(pad, pad), dilation=(1, 1), groups=1)
    u = roundoff(dev, policy)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    with mm.matmul_precision(policy):
        y = mm.ops.conv2d(mm.tensor(x, dev), mm.tensor(w, dev), mm.tensor(b, dev), stride=stride, padding=pad).numpy()
        assert y.dtype == dtype
        ref = RC.conv2d(x64, w64, b.astype(np.float64), **a)
        assert_within(y, ref, RC.conv2d(np.abs(x64), np.abs(w64), np.abs(b.astype(np.float64)), **a), cin * k * k + 1, u, dtype)
        g = rng.standard_normal(y.shape).astype(dtype)
        g64 = g.astype(np.float64)
        dx = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(w, dev), input_size=(size, size),
                                      stride=stride, padding=pad).numpy()
        assert_within(dx, RC.conv2d_input_grad(g64, w64, input_size=(size, size), **a),
                      RC.conv2d_input_grad(np.abs(g64), np.abs(w64), input_size=(size, size), **a), cout * k * k, u, dtype)
        dw = mm.ops.conv2d_weight_grad(mm.tensor(g, dev), mm.tensor(x, dev), kernel_size=(k, k),
                                       stride=stride, padding=pad).numpy()
        assert_within(dw, RC.conv2d_weight_grad(g64, x64, kernel_size=(k, k), **a),
                      RC.conv2d_weight_grad(np.abs(g64), np.abs(x64), kernel_size=(k, k), **a), n * y.shape[2] * y.shape[3], u,
                      dtype)


@pytest.mark.parametrize("policy, dtype", STORAGE_CASES, ids=STORAGE_IDS)
@settings(max_examples=6)
@given(m=st.sampled_from([1, 7, 33, 130]), k=st.sampled_from([1, 8, 31, 200]), n=st.sampled_from([1, 9, 64, 129]),
       transpose_a=st.booleans(), transpose_b=st.booleans())
def test_matmul_on_simdgroup_matrices(dev, matrix_products, policy, dtype, m, k, n, transpose_a, transpose_b):
    rng = np.random.default_rng(m * k * n)
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(dtype)
    with mm.matmul_precision(policy):
        c = mm.ops.matmul(mm.tensor(a, dev), mm.tensor(b, dev), transpose_a=transpose_a, transpose_b=transpose_b).numpy()
    assert c.dtype == dtype
    a64 = (a.T if transpose_a else a).astype(np.float64)
    b64 = (b.T if transpose_b else b).astype(np.float64)
    assert_within(c, a64 @ b64, np.abs(a64) @ np.abs(b64), k, roundoff(dev, policy), dtype)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("transpose_b", [False, True])
def test_nan_and_infinity_come_through_products(dev, matrix_products, policy, transpose_b):
    """NaN and ±∞ operands give what float32 arithmetic gives: NaN where a NaN or ∞ − ∞ enters a
    sum, ±∞ where infinities of one sign do. The NaNs include 0x7fffffff, the NVIDIA GPUs' own,
    and 0xffffffff, whose all-ones payloads a rounding to TF32 once carried into the sign bit
    (−0: the NaN vanished); under `highest` on cuda the split-TF32 cross terms of an infinite
    operand once made NaN (∞ times a zero low part)."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((9, 20)).astype(np.float32)
    b = rng.standard_normal((20, 11)).astype(np.float32)
    b[:, 4] = 1.0  # exact in TF32 and bfloat16: its low parts are 0
    a.view(np.uint32)[0, 3] = 0x7FFFFFFF
    a.view(np.uint32)[2, 5] = 0xFFFFFFFF
    a[4, 7] = np.nan
    a[6, 1] = np.inf
    a[7, 2], a[7, 9] = np.inf, -np.inf  # ∞ − ∞ where b[2, j] and b[9, j] have one sign
    b[8, 6] = -np.inf
    with mm.matmul_precision(policy):
        c = mm.ops.matmul(mm.tensor(a, dev), mm.tensor(np.ascontiguousarray(b.T) if transpose_b else b, dev),
                          transpose_b=transpose_b).numpy()
    with np.errstate(invalid="ignore"):
        ref = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(c), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(c), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(c), np.isneginf(ref))
    assert np.isnan(ref[[0, 2, 4]]).all() and np.isnan(ref[7]).any() and np.isinf(ref).any() and np.isfinite(ref).any()


@pytest.mark.parametrize("policy, dtype", STORAGE_CASES, ids=STORAGE_IDS)
@settings(max_examples=4)
@given(n=st.integers(1, 2), c=st.sampled_from([1, 5, 33, 64, 65, 129]), hw=st.sampled_from([1, 7, 20]))
@example(n=1, c=65, hw=24).via("features split in two, whole quads (gram_mma's vector loads)")
@example(n=2, c=33, hw=23).via("features split in two, the last quad part-filled (its scalar loads)")
def test_gram_on_simdgroup_matrices(dev, matrix_products, policy, dtype, n, c, hw):
    rng = np.random.default_rng(c * hw)
    x = rng.standard_normal((n, c, hw, hw)).astype(dtype)
    dg = rng.standard_normal((n, c, c)).astype(dtype)
    x64, dg64 = x.astype(np.float64), dg.astype(np.float64)
    u = roundoff(dev, policy)
    with mm.matmul_precision(policy):
        g = mm.ops.gram(mm.tensor(x, dev), alpha=0.5).numpy()
        dx = mm.ops.gram_grad(mm.tensor(dg, dev), mm.tensor(x, dev), alpha=0.5).numpy()
    assert g.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(g, g.transpose(0, 2, 1))  # tiles write one triangle and mirror it
    assert_within(g, RG.gram(x64, alpha=0.5), RG.gram(np.abs(x64), alpha=0.5), hw * hw, u, dtype)
    assert_within(dx, RG.gram_grad(dg64, x64, alpha=0.5), RG.gram_grad(np.abs(dg64), np.abs(x64), alpha=0.5), 2 * c, u, dtype)


def test_graphs_run_under_the_policy_in_force_or_their_own(dev, matrix_products):
    """A plan replays recorded dispatches; a change of policy must re-encode them, and a graph's own
    policy holds whatever is in force around it."""
    rng = np.random.default_rng(3)
    xs, ws = rng.standard_normal((2, 5, 9, 9)).astype(np.float32), rng.standard_normal((12, 5, 3, 3)).astype(np.float32)

    def eager(policy):
        with mm.matmul_precision(policy):
            return mm.ops.conv2d(mm.tensor(xs, dev), mm.tensor(ws, dev), padding=1).numpy()

    def build(**kw):
        g = mm.Graph(dev, **kw)
        x = g.input("x", xs.shape)
        return g, mm.ops.conv2d(x, mm.tensor(ws, dev), padding=1)

    g, y = build()
    runs = {}
    for policy in ["highest", "high", "highest", "medium", "high"]:
        with mm.matmul_precision(policy):
            got = g.run({"x": xs}, outputs=[y])[0]
        np.testing.assert_array_equal(got, eager(policy))
        runs.setdefault(policy, got)
    assert not np.array_equal(runs["high"], runs["highest"]) and not np.array_equal(runs["medium"], runs["high"])
    g, y = build(matmul_precision="medium")
    with mm.matmul_precision("high"):
        np.testing.assert_array_equal(g.run({"x": xs}, outputs=[y])[0], eager("medium"))
    with pytest.raises(ValueError, match="matmul precision must be one of"):
        mm.Graph(dev, matmul_precision="low")


@pytest.mark.parametrize("policy, dtype", STORAGE_CASES, ids=STORAGE_IDS)
@settings(max_examples=6)
@given(data=st.data())
def test_3x3_convolutions_on_simdgroup_matrices(dev, matrix_products, policy, dtype, data):
    """conv2d_3x3_mma(_32) and conv2d_weight_grad_3x3_mma: output channels either side of their 64-
    and 32-channel tiles, input channels either side of their 8- and 16-channel chunks, images
    either side of their 8 × 16 and 16 × 16 pixel tiles, padding 0 to 2 (the input gradient of
    padding p is a forward convolution padded 2 − p)."""
    from mlmetal.ops import conv as conv_ops
    n, cin = data.draw(st.integers(1, 2), label="n"), data.draw(st.sampled_from([1, 3, 8, 9, 17]), label="cin")
    cout = data.draw(st.sampled_from([conv_ops.C3_MMA_MIN_COUT, 31, 32, 33, 64, 65, 72]), label="cout")
    h, w = data.draw(st.sampled_from([1, 7, 8, 9, 16, 17, 20]), label="h"), data.draw(st.sampled_from([3, 15, 16, 17, 33]), label="w")
    pad = data.draw(st.integers(0, 2), label="pad")
    if min(h, w) + 2 * pad < 3:
        pad = 1
        h, w = max(h, 1), max(w, 1)
    rng = np.random.default_rng(cin * 1000 + cout + h)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    wt = rng.standard_normal((cout, cin, 3, 3)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    a = dict(stride=(1, 1), padding=(pad, pad), dilation=(1, 1), groups=1)
    x64, w64, b64 = x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64)
    u = roundoff(dev, policy)
    with mm.matmul_precision(policy):
        y = mm.ops.conv2d(mm.tensor(x, dev), mm.tensor(wt, dev), mm.tensor(b, dev), padding=pad).numpy()
        assert y.dtype == dtype
        assert_within(y, RC.conv2d(x64, w64, b64, **a), RC.conv2d(np.abs(x64), np.abs(w64), np.abs(b64), **a), 9 * cin + 1, u,
                      dtype)
        g = rng.standard_normal(y.shape).astype(dtype)
        dx = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(wt, dev), input_size=(h, w), padding=pad).numpy()
        g64 = g.astype(np.float64)
        assert_within(dx, RC.conv2d_input_grad(g64, w64, input_size=(h, w), **a),
                      RC.conv2d_input_grad(np.abs(g64), np.abs(w64), input_size=(h, w), **a), 9 * cout, u, dtype)
        dw = mm.ops.conv2d_weight_grad(mm.tensor(g, dev), mm.tensor(x, dev), kernel_size=(3, 3), padding=pad).numpy()
        assert_within(dw, RC.conv2d_weight_grad(g64, x64, kernel_size=(3, 3), **a),
                      RC.conv2d_weight_grad(np.abs(g64), np.abs(x64), kernel_size=(3, 3), **a), n * y.shape[2] * y.shape[3], u,
                      dtype)


@pytest.mark.parametrize("policy", ["high", "medium"])
@pytest.mark.parametrize("cin, cout, h, w", [(9, 24, 9, 17), (17, 65, 8, 16), (3, 33, 10, 20)])
def test_products_take_each_operand_rounded_once_per_the_policy(dev, matrix_products, policy, cin, cout, h, w):
    """Under `high` and `medium` every product is the exact float sum of the operands rounded to
    TF32 or bfloat16 (nearest): held to the float32 summation bound alone (u = 0 against the
    rounded operands). An operand that reached the tensor cores unrounded (they truncate it) would
    miss this bound by far (a TF32 step is 2^-11 of an operand). A pass the float kernels compute
    (a 3×3 convolution into few channels, on a GPU) is held to the same bound with float operands."""
    r = {"high": round_tf32, "medium": round_bf16}[policy]
    rng = np.random.default_rng(cin + cout)
    x = rng.standard_normal((2, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    g = rng.standard_normal((2, cout, h, w)).astype(np.float32)
    rx, rw, rg = (r(v).astype(np.float64) for v in (x, wt, g))
    a = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    with mm.matmul_precision(policy):
        y = mm.ops.conv2d(mm.tensor(x, dev), mm.tensor(wt, dev), padding=1).numpy()
        dx = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(wt, dev), input_size=(h, w), padding=1).numpy()
        gm = mm.ops.gram(mm.tensor(x, dev)).numpy()
        mt = mm.ops.matmul(mm.tensor(x.reshape(2 * cin, -1), dev), mm.tensor(g.reshape(2 * cout, -1).T.copy(), dev)).numpy()
    assert_within(y, RC.conv2d(rx, rw, None, **a), RC.conv2d(np.abs(rx), np.abs(rw), None, **a), 9 * cin, 0.0)
    # The input gradient is a convolution into cin channels: into few, on a GPU, the float direct
    # kernel computes it (conv.direct_conv), whose products take the float operands as they are.
    floats = conv.direct_conv(dev, cin, (3, 3), (1, 1), (1, 1), 1, (h, w)) is not None
    dg, dw = (g.astype(np.float64), wt.astype(np.float64)) if floats else (rg, rw)
    assert_within(dx, RC.conv2d_input_grad(dg, dw, input_size=(h, w), **a),
                  RC.conv2d_input_grad(np.abs(dg), np.abs(dw), input_size=(h, w), **a), 9 * cout, 0.0)
    assert_within(gm, RG.gram(rx, alpha=1.0), RG.gram(np.abs(rx), alpha=1.0), h * w, 0.0)
    fx, fg = rx.reshape(2 * cin, -1), rg.reshape(2 * cout, -1).T
    assert_within(mt, fx @ fg, np.abs(fx) @ np.abs(fg), h * w, 0.0)


@pytest.mark.parametrize("policy, dtype", STORAGE_CASES, ids=STORAGE_IDS)
@pytest.mark.parametrize("h, w, pad", [(8, 16, 1), (9, 20, 1), (3, 4, 1), (8, 20, 0), (7, 12, 2), (10, 18, 1)])
def test_3x3_weight_grad_stages_runs_of_four(dev, matrix_products, policy, dtype, h, w, pad):
    """conv2d_weight_grad_3x3_mma stages its tiles in runs of four values of a row: one vector load
    a run where rows are a multiple of four wide and padded by one (the input's columns then line
    up with the output's), value by value otherwise (padding 0 or 2, width 18). Images end inside a
    16-column tile (width 4, 20) and inside an 8-row one; 17 input and 33 output channels end inside
    their 16- and 32-channel blocks."""
    n, cin, cout = 2, 17, 33
    rng = np.random.default_rng(h * 100 + w + pad)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    oh, ow = h + 2 * pad - 2, w + 2 * pad - 2
    g = rng.standard_normal((n, cout, oh, ow)).astype(dtype)
    a = dict(stride=(1, 1), padding=(pad, pad), dilation=(1, 1), groups=1)
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    with mm.matmul_precision(policy):
        dw = mm.ops.conv2d_weight_grad(mm.tensor(g, dev), mm.tensor(x, dev), kernel_size=(3, 3), padding=pad).numpy()
    assert_within(dw, RC.conv2d_weight_grad(g64, x64, kernel_size=(3, 3), **a),
                  RC.conv2d_weight_grad(np.abs(g64), np.abs(x64), kernel_size=(3, 3), **a), n * oh * ow,
                  roundoff(dev, policy), dtype)


@pytest.mark.parametrize("policy, dtype", STORAGE_CASES, ids=STORAGE_IDS)
@settings(max_examples=6)
@given(data=st.data())
def test_kxk_convolutions_into_few_channels(dev, matrix_products, policy, dtype, data):
    """conv2d_kxk_mma_8 and conv2d_weight_grad_kxk_mma_8 — into at most 8 output channels through
    windows of 10 to 81 taps (non-square too): input channels either side of their 8-channel chunk,
    images either side of the forward's 16 × 32 and the weight gradient's 8 × 32 pixel tiles, any
    padding up to the window's. The input gradient of a convolution from at most 8 channels is such
    a forward convolution of the output gradient (padded k − 1 − p)."""
    from mlmetal.ops import conv as conv_ops
    n, cin, cout = data.draw(st.integers(1, 2), label="n"), data.draw(st.sampled_from([1, 3, 8, 9, 17]), label="cin"), \
        data.draw(st.sampled_from([1, 3, 8]), label="cout")
    kh, kw = data.draw(st.sampled_from([(9, 9), (5, 5), (4, 7), (9, 2), (2, 9)]), label="window")
    h, w = data.draw(st.sampled_from([1, 7, 8, 9, 16, 17, 31]), label="h"), data.draw(st.sampled_from([1, 5, 31, 32, 33, 40]), label="w")
    ph, pw = data.draw(st.integers(0, kh - 1), label="pad_h"), data.draw(st.integers(0, kw - 1), label="pad_w")
    h, w = max(h, kh - 2 * ph), max(w, kw - 2 * pw)
    assert conv_ops.kxk_mma(dev, cout, (kh, kw), (1, 1), (1, 1), 1, dtype) == tiling.matrix_policy(dev, dtype)
    rng = np.random.default_rng(cin * 1000 + cout * 10 + h)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    wt = rng.standard_normal((cout, cin, kh, kw)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    a = dict(stride=(1, 1), padding=(ph, pw), dilation=(1, 1), groups=1)
    x64, w64, b64 = x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64)
    u, taps = roundoff(dev, policy), kh * kw
    with mm.matmul_precision(policy):
        y = mm.ops.conv2d(mm.tensor(x, dev), mm.tensor(wt, dev), mm.tensor(b, dev), padding=(ph, pw)).numpy()
        assert y.dtype == dtype
        assert_within(y, RC.conv2d(x64, w64, b64, **a), RC.conv2d(np.abs(x64), np.abs(w64), np.abs(b64), **a),
                      taps * cin + 1, u, dtype)
        g = rng.standard_normal(y.shape).astype(dtype)
        g64 = g.astype(np.float64)
        dw = mm.ops.conv2d_weight_grad(mm.tensor(g, dev), mm.tensor(x, dev), kernel_size=(kh, kw), padding=(ph, pw)).numpy()
        assert_within(dw, RC.conv2d_weight_grad(g64, x64, kernel_size=(kh, kw), **a),
                      RC.conv2d_weight_grad(np.abs(g64), np.abs(x64), kernel_size=(kh, kw), **a), n * y.shape[2] * y.shape[3],
                      u, dtype)
        if cin <= 8:  # the input gradient runs the forward kernel
            dx = mm.ops.conv2d_input_grad(mm.tensor(g, dev), mm.tensor(wt, dev), input_size=(h, w), padding=(ph, pw)).numpy()
            assert_within(dx, RC.conv2d_input_grad(g64, w64, input_size=(h, w), **a),
                          RC.conv2d_input_grad(np.abs(g64), np.abs(w64), input_size=(h, w), **a), taps * cout, u, dtype)


def test_bfloat16_storage_is_exact_under_high_and_medium(dev, matrix_products):
    """A bfloat16 value is exact in TF32 and in bfloat16, so in bfloat16 storage `medium` is exactly
    bfloat16 operands, and computes what `high` does, bit for bit: the GEMM and direct 3×3
    convolutions, each gradient, and matmul."""
    rng = np.random.default_rng(5)
    x = mm.tensor(rng.standard_normal((2, 9, 10, 11)).astype(mm.bfloat16), dev)
    w = mm.tensor(rng.standard_normal((20, 9, 3, 3)).astype(mm.bfloat16), dev)
    a = mm.tensor(rng.standard_normal((33, 70)).astype(mm.bfloat16), dev)

    def run(policy):
        with mm.matmul_precision(policy):
            outs = []
            for stride in (1, 2):  # the direct 3×3 kernels, the GEMMs
                y = mm.ops.conv2d(x, w, stride=stride, padding=1)
                outs += [y, mm.ops.conv2d_input_grad(y, w, input_size=(10, 11), stride=stride, padding=1),
                         mm.ops.conv2d_weight_grad(y, x, kernel_size=3, stride=stride, padding=1)]
            return [t.numpy() for t in outs + [mm.ops.matmul(a, a, transpose_b=True)]]

    for got, want in zip(run("medium"), run("high")):
        assert got.dtype == mm.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_highest_runs_small_float32_products_on_the_float_kernels(dev, monkeypatch):
    """Under `highest`, a float32 product of fewer than HIGHEST_MMA_MIN_MACS multiply-adds takes
    the float kernels (split-TF32's three products a term only pay for themselves on large
    products); larger ones, 16-bit storage and the other policies keep the simdgroup matrices.
    The ops pass their products' sizes: a small matmul and a small convolution's three passes take
    the float kernels."""
    monkeypatch.setattr(tiling, "matrix_hardware", lambda device: True)
    below = tiling.HIGHEST_MMA_MIN_MACS - 1
    assert below > 0
    products = [("matmul", tiling.WIDE)] + [(op, t) for op in ("conv2d", "conv2d_input_grad", "conv2d_weight_grad")
                                            for t in (tiling.WIDE, tiling.MEDIUM, tiling.NARROW)]
    names = lambda dtype, macs: [tiling.product(dev, op, dtype, t, macs)[0].name for op, t in products]  # noqa: E731
    with mm.matmul_precision("highest"):
        assert not any("_mma" in n for n in names(mm.float32, below))
        assert all("_mma" in n for n in names(mm.float32, below + 1))
        assert all("_mma" in n for n in names(mm.float32, None))
        assert all("_mma" in n for n in names(mm.bfloat16, below))
    for policy in ("high", "medium"):
        with mm.matmul_precision(policy):
            assert all("_mma" in n for n in names(mm.float32, below))
    taken = []

    def recorded(*args, **kwargs):
        kernel, threads = tiling.product(*args, **kwargs)
        taken.append(kernel.name)
        return kernel, threads
    for module in ("conv", "matmul"):
        monkeypatch.setattr(importlib.import_module(f"mlmetal.ops.{module}"), "product", recorded)
    rng = np.random.default_rng(4)
    a, b = mm.tensor(rng.standard_normal((5, 33)), dev), mm.tensor(rng.standard_normal((33, 7)), dev)
    x, w = mm.tensor(rng.standard_normal((2, 3, 9, 9)), dev), mm.tensor(rng.standard_normal((5, 3, 4, 4)), dev)
    g = mm.tensor(rng.standard_normal((2, 5, 4, 4)), dev)
    with mm.matmul_precision("highest"):
        mm.ops.matmul(a, b).numpy()
        mm.ops.conv2d(x, w, stride=2, padding=1).numpy()
        mm.ops.conv2d_input_grad(g, w, input_size=(9, 9), stride=2, padding=1).numpy()
        mm.ops.conv2d_weight_grad(g, x, kernel_size=(4, 4), stride=2, padding=1).numpy()
    assert len(taken) == 4 and not any("_mma" in n for n in taken), taken


@pytest.mark.parametrize("c", [64, 129], ids=["medium-tiles", "wide-tiles"])
@pytest.mark.parametrize("dtype", [np.dtype(np.float16), mm.bfloat16], ids=str)
def test_16bit_storage_keeps_highest_accuracy_on_simdgroup_matrices(dev, monkeypatch, dtype, c):
    """Under `highest`, 16-bit storage takes `high`'s single TF32 products (tiling.matrix_policy):
    exact for stored operands. gram_grad's A = dG + dGᵀ is no stored value; it is staged as its
    rounding and the remainder, so the sums keep float32's accuracy (u = 0 in the bound)."""
    monkeypatch.setattr(tiling, "matrix_hardware", lambda device: True)
    assert "_mma" in tiling.product(dev, "gram_grad", dtype)[0].name
    rng = np.random.default_rng(9)
    n, hw = 2, 9
    x = rng.standard_normal((n, c, hw, hw)).astype(dtype)
    dg = rng.standard_normal((n, c, c)).astype(dtype)
    x64, dg64 = x.astype(np.float64), dg.astype(np.float64)
    with mm.matmul_precision("highest"):
        dx = mm.ops.gram_grad(mm.tensor(dg, dev), mm.tensor(x, dev), alpha=0.5).numpy()
        g = mm.ops.gram(mm.tensor(x, dev), alpha=0.5).numpy()
    # float32 sums, then one rounding to the storage type relative to the result itself (not to
    # Σ|a|·|b| as assert_within allows: that would hide operands rounded to TF32)
    u_s = STORE_ROUNDOFF[np.dtype(dtype)]
    for got, exact, magnitude, k in [
            (dx, RG.gram_grad(dg64, x64, alpha=0.5), RG.gram_grad(np.abs(dg64), np.abs(x64), alpha=0.5), 2 * c),
            (g, RG.gram(x64, alpha=0.5), RG.gram(np.abs(x64), alpha=0.5), hw * hw)]:
        bound = 2 * k * 2.0**-24 * magnitude * (1 + u_s) + u_s * np.abs(exact) + 2.0**-25
        err = np.abs(got.astype(np.float64) - exact)
        assert np.all(err <= bound), f"error {np.max(err / bound):.3g}× the bound"
