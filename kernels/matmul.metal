// Matrix products: C = op(A)·op(B) (+ bias[column]), with op a transpose or not, and the bias
// gradient of a fully connected layer.
//
// A tiled product in kernels/tile.h's wide tiling (128×128 outputs, 256 threads, pipelined
// staging), with float register blocks (`matmul`) or simdgroup matrices (`matmul_mma`). Transposes are strides, so one kernel serves a·b, a·bᵀ (linear
// layers) and aᵀ·b (their weight gradients); each operand is staged along whichever of its
// dimensions is contiguous, so that a warp's loads are.
#include <metal_stdlib>
using namespace metal;

#include "tile.h"

struct MatmulParams {
    uint m, n, k;        // C is m × n, the reduction k long
    uint a_m, a_k;       // element strides of A along its rows and along k
    uint b_k, b_n;       // element strides of B along k and along its columns
    uint has_bias;       // add bias[column]
    uint chunk;          // reduction steps each split sums (k itself for one split)
};

struct MatmulOut {
    device float* c;
    device const float* bias;  // or null
    uint m0, n0, m, n;

    void write(uint i, uint j, float v) const {
        const uint row = m0 + i, col = n0 + j;
        if (row < m && col < n) c[row * n + col] = v + (bias ? bias[col] : 0.0f);
    }
};

// c = A·B (+ bias), C row-major. A long reduction over a small C is split like the weight
// gradient of a convolution: threadgroup z sums k in [z·chunk, (z+1)·chunk) into slice z of c
// (m·n floats a slice; the bias goes into slice 0), and `sum_splits` adds the slices.
// Grid: (ceil(n / 128), ceil(m / 128), splits).
template <typename Acc>
kernel void matmul_tiles(device const float* a [[buffer(0)]],
                         device const float* b [[buffer(1)]],
                         device const float* bias [[buffer(2)]],
                         device float* c [[buffer(3)]],
                         constant MatmulParams& p [[buffer(4)]],
                         uint3 tile [[threadgroup_position_in_grid]],
                         uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WIDE)];  // [k][row]
    threadgroup float4 b_tile[2 * STAGED(WIDE)];  // [k][column]
    const uint m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    const uint k_begin = tile.z * p.chunk, k_end = min(p.k, k_begin + p.chunk);
    const Stage sa = p.a_k == 1 ? along_k(t) : along_rows(t, WIDE);
    const Stage sb = p.b_n == 1 ? along_rows(t, WIDE) : along_k(t);

    Acc acc(t, WIDE, WIDE);
    float4 a_next, b_next;
    uint buf = 0;
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K, buf ^= 1) {
        const uint ka = k0 + sa.k, kb = k0 + sb.k;
        for (uint j = 0; j < 4; ++j) {
            const uint m = m0 + 4 * sa.quad + j, n = n0 + 4 * sb.quad + j;
            a_next[j] = m < p.m && ka < k_end ? a[m * p.a_m + ka * p.a_k] : 0.0f;
            b_next[j] = n < p.n && kb < k_end ? b[kb * p.b_k + n * p.b_n] : 0.0f;
        }
        // The previous slice is multiplied while this one's loads are in flight.
        if (k0 > k_begin) acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
        a_tile[buf * STAGED(WIDE) + sa.k * pitch(WIDE) + sa.quad] = a_next;
        b_tile[buf * STAGED(WIDE) + sb.k * pitch(WIDE) + sb.quad] = b_next;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
    acc.store(MatmulOut{c + tile.z * p.m * p.n, p.has_bias && tile.z == 0 ? bias : nullptr, m0, n0, p.m, p.n}, b_tile);
}
template [[host_name("matmul")]] [[kernel]] decltype(matmul_tiles<FmaTile>) matmul_tiles<FmaTile>;
template [[host_name("matmul_mma")]] [[kernel]] decltype(matmul_tiles<MmaTile<8, 4>>) matmul_tiles<MmaTile<8, 4>>;

struct BiasGradParams {
    uint rows, cols;
};

// db[j] = Σ_i g[i, j]: a thread a column, so a warp reads consecutive columns of each row.
kernel void linear_bias_grad(device const float* g [[buffer(0)]],
                             device float* db [[buffer(1)]],
                             constant BiasGradParams& p [[buffer(2)]],
                             uint j [[thread_position_in_grid]]) {
    if (j >= p.cols) return;
    float s = 0.0f;
    for (uint i = 0; i < p.rows; ++i) s += g[i * p.cols + j];
    db[j] = s;
}
