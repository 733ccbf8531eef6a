// Gram matrices G = α·F·Fᵀ per batch item (F: C × H·W features), and their gradient
// dF = α·(dG + dGᵀ)·F — MPSNNGramMatrixCalculation's forward and gradient, α shared by both.
//
// Both are tiled products like kernels/matmul.metal: 64 threads own a 64×64 output tile, stage
// 16-deep slices of both operands in threadgroup memory and accumulate 8×8 register blocks.
// G is symmetric, so only tiles on or above the diagonal are computed, each written twice; the
// H·W reduction is long and G small, so it is split across threadgroups (slices of `partial`,
// added by `sum_splits`).
#include <metal_stdlib>
using namespace metal;

#include "tile.h"

struct GramParams {
    uint batch, c, hw;  // features are batch × c × hw
    float alpha;
    uint chunk;         // features each split sums (a multiple of TILE_K)
};

// Slice `split` of partial (batch × c × c floats a slice) = α·F[:, range]·F[:, range]ᵀ over
// the split's feature range. Grid: (tiles, tiles, batch · splits) with tiles = ceil(c / 64);
// threadgroups below the diagonal return at once.
kernel void gram(device const float* x [[buffer(0)]],
                 device float* partial [[buffer(1)]],
                 constant GramParams& p [[buffer(2)]],
                 uint3 tile [[threadgroup_position_in_grid]],
                 uint t [[thread_index_in_threadgroup]]) {
    threadgroup float a_tile[TILE_K][TILE_M];  // a_tile[feature][row channel]
    threadgroup float b_tile[TILE_K][TILE_N];  // b_tile[feature][column channel]
    if (tile.y > tile.x) return;  // the whole threadgroup leaves together, before any barrier
    const uint item = tile.z % p.batch, split = tile.z / p.batch;
    const uint m0 = tile.y * TILE_M, n0 = tile.x * TILE_N;
    const uint k_begin = split * p.chunk, k_end = min(p.hw, k_begin + p.chunk);
    device const float* f = x + item * p.c * p.hw;
    // Thread t stages slice column t % 16 of every fourth channel from t / 16 in both tiles:
    // features are contiguous along k, so a warp reads whole runs of two channels.
    const uint s_k = t % TILE_K, s_row = t / TILE_K;

    const uint tm = t / (TILE_N / BLOCK), tn = t % (TILE_N / BLOCK);
    Block acc;
    clear(acc);
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        const uint k = k0 + s_k;
        for (uint i = 0; i < TILE_M / (THREADS / TILE_K); ++i) {
            const uint r = s_row + i * (THREADS / TILE_K);
            a_tile[s_k][r] = m0 + r < p.c && k < k_end ? f[(m0 + r) * p.hw + k] : 0.0f;
            b_tile[s_k][r] = n0 + r < p.c && k < k_end ? f[(n0 + r) * p.hw + k] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        multiply_tiles(&a_tile[0][0], &b_tile[0][0], tm, tn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    device float* g = partial + (split * p.batch + item) * p.c * p.c;
    for (uint i = 0; i < BLOCK; ++i) {
        const uint m = m0 + tm * BLOCK + i;
        if (m >= p.c) break;
        for (uint j = 0; j < BLOCK; ++j) {
            const uint n = n0 + tn * BLOCK + j;
            if (n >= p.c) break;
            const float v = p.alpha * acc.v[i][j];
            g[m * p.c + n] = v;
            if (tile.x != tile.y) g[n * p.c + m] = v;  // the mirrored tile below the diagonal
        }
    }
}

struct SplitParams {
    uint count;   // floats per slice
    uint splits;
};

// out[i] = Σ_s partial[s·count + i], in a fixed order (so results do not depend on timing).
kernel void sum_splits(device const float* partial [[buffer(0)]],
                       device float* out [[buffer(1)]],
                       constant SplitParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    float s = 0.0f;
    for (uint k = 0; k < p.splits; ++k) s += partial[k * p.count + i];
    out[i] = s;
}

struct GramGradParams {
    uint batch, c, hw;
    float alpha;
};

// dx = α·(dG + dGᵀ)·F per batch item; the symmetrised dG is formed while staging it.
// Grid: (ceil(hw / 64), ceil(c / 64), batch).
kernel void gram_grad(device const float* dg [[buffer(0)]],
                      device const float* x [[buffer(1)]],
                      device float* dx [[buffer(2)]],
                      constant GramGradParams& p [[buffer(3)]],
                      uint3 tile [[threadgroup_position_in_grid]],
                      uint t [[thread_index_in_threadgroup]]) {
    threadgroup float a_tile[TILE_K][TILE_M];  // a_tile[channel k][channel m] of dG + dGᵀ
    threadgroup float b_tile[TILE_K][TILE_N];  // b_tile[channel k][feature]
    const uint item = tile.z, m0 = tile.y * TILE_M, n0 = tile.x * TILE_N;
    device const float* g = dg + item * p.c * p.c;
    device const float* f = x + item * p.c * p.hw;
    const bool row_ok = m0 + t < p.c, col_ok = n0 + t < p.hw;
    const uint m = row_ok ? m0 + t : 0, n = col_ok ? n0 + t : 0;

    const uint tm = t / (TILE_N / BLOCK), tn = t % (TILE_N / BLOCK);
    Block acc;
    clear(acc);
    for (uint k0 = 0; k0 < p.c; k0 += TILE_K) {
        for (uint kk = 0; kk < TILE_K; ++kk) {
            const uint k = k0 + kk;
            a_tile[kk][t] = row_ok && k < p.c ? g[m * p.c + k] + g[k * p.c + m] : 0.0f;
            b_tile[kk][t] = col_ok && k < p.c ? f[k * p.hw + n] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        multiply_tiles(&a_tile[0][0], &b_tile[0][0], tm, tn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    device float* out = dx + item * p.c * p.hw;
    for (uint i = 0; i < BLOCK; ++i) {
        const uint mi = m0 + tm * BLOCK + i;
        if (mi >= p.c) break;
        for (uint j = 0; j < BLOCK; ++j) {
            const uint nj = n0 + tn * BLOCK + j;
            if (nj < p.hw) out[mi * p.hw + nj] = p.alpha * acc.v[i][j];
        }
    }
}
