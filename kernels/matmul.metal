// Matrix products: C = op(A)·op(B) (+ bias[column]), with op a transpose or not, and the bias
// gradient of a fully connected layer.
//
// The same tiling as kernels/conv.metal: a threadgroup of 64 threads owns a 64×64 tile of C,
// stages 16-deep slices of A and B in threadgroup memory (thread t loads row t of A's slice and
// column t of B's), and each thread accumulates an 8×8 register block between two barriers.
// Transposes are strides, so one kernel serves a·b, a·bᵀ (linear layers) and aᵀ·b (their
// weight gradients).
#include <metal_stdlib>
using namespace metal;

#include "tile.h"

struct MatmulParams {
    uint m, n, k;        // C is m × n, the reduction k long
    uint a_m, a_k;       // element strides of A along its rows and along k
    uint b_k, b_n;       // element strides of B along k and along its columns
    uint has_bias;       // add bias[column]
};

// c = A·B (+ bias), C row-major. Grid: (ceil(n / 64), ceil(m / 64), 1).
kernel void matmul(device const float* a [[buffer(0)]],
                   device const float* b [[buffer(1)]],
                   device const float* bias [[buffer(2)]],
                   device float* c [[buffer(3)]],
                   constant MatmulParams& p [[buffer(4)]],
                   uint3 tile [[threadgroup_position_in_grid]],
                   uint t [[thread_index_in_threadgroup]]) {
    threadgroup float a_tile[TILE_K][TILE_M];  // a_tile[k][row]
    threadgroup float b_tile[TILE_K][TILE_N];  // b_tile[k][column]
    const uint m0 = tile.y * TILE_M, n0 = tile.x * TILE_N;
    const bool row_ok = m0 + t < p.m, col_ok = n0 + t < p.n;
    device const float* a_row = a + (row_ok ? m0 + t : 0) * p.a_m;
    device const float* b_col = b + (col_ok ? n0 + t : 0) * p.b_n;

    const uint tm = t / (TILE_N / BLOCK), tn = t % (TILE_N / BLOCK);
    Block acc;
    clear(acc);
    for (uint k0 = 0; k0 < p.k; k0 += TILE_K) {
        for (uint kk = 0; kk < TILE_K; ++kk) {
            const uint k = k0 + kk;
            a_tile[kk][t] = row_ok && k < p.k ? a_row[k * p.a_k] : 0.0f;
            b_tile[kk][t] = col_ok && k < p.k ? b_col[k * p.b_k] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        multiply_tiles(&a_tile[0][0], &b_tile[0][0], tm, tn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    for (uint i = 0; i < BLOCK; ++i) {
        const uint m = m0 + tm * BLOCK + i;
        if (m >= p.m) break;
        for (uint j = 0; j < BLOCK; ++j) {
            const uint n = n0 + tn * BLOCK + j;
            if (n < p.n) c[m * p.n + n] = acc.v[i][j] + (p.has_bias ? bias[n] : 0.0f);
        }
    }
}

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
