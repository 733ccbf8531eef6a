// Gram matrices G = α·F·Fᵀ per batch item (F: C × H·W features), and their gradient
// dF = α·(dG + dGᵀ)·F — MPSNNGramMatrixCalculation's forward and gradient, α shared by both.
//
// Both are tiled products in kernels/tile.h's wide tiling (128×128 outputs, 256 threads,
// pipelined staging, 8×8 register blocks). G is symmetric, so only tiles on or above the
// diagonal are computed, each written twice; the H·W reduction is long and G small, so it is
// split across threadgroups (slices of `partial`, added by `sum_splits`).
#include <metal_stdlib>
using namespace metal;

#include "tile.h"

struct GramParams {
    uint batch, c, hw;  // features are batch × c × hw
    float alpha;
    uint chunk;         // features each split sums (a multiple of TILE_K)
};

// Slice `split` of partial (batch × c × c floats a slice) = α·F[:, range]·F[:, range]ᵀ over
// the split's feature range. Grid: (tiles, tiles, batch · splits) with tiles = ceil(c / 128);
// threadgroups below the diagonal return at once.
kernel void gram(device const float* x [[buffer(0)]],  // extent: p.batch * p.c * p.hw
                 device float* partial [[buffer(1)]],  // extent: (p.hw + p.chunk - 1) / p.chunk * p.batch * p.c * p.c
                 constant GramParams& p [[buffer(2)]],
                 uint3 tile [[threadgroup_position_in_grid]],
                 uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WIDE)];  // [feature][row channel]
    threadgroup float4 b_tile[2 * STAGED(WIDE)];  // [feature][column channel]
    if (tile.y > tile.x) return;  // the whole threadgroup leaves together, before any barrier
    const uint item = tile.z % p.batch, split = tile.z / p.batch;
    const uint m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    const uint k_begin = split * p.chunk, k_end = min(p.hw, k_begin + p.chunk);
    device const float* f = x + item * p.c * p.hw;
    // Features are contiguous along k: thread t stages channels 4·s.quad … 4·s.quad+3 of both
    // tiles at step s.k, so a warp reads 8-float runs of 16 channels.
    const Stage s = along_k(t);

    const uint tm = t / (WIDE / 8), tn = t % (WIDE / 8);
    Block acc;
    clear(acc);
    float4 a_next, b_next;
    uint buf = 0;
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K, buf ^= 1) {
        const uint k = k0 + s.k;
        for (uint j = 0; j < 4; ++j) {
            const uint r = 4 * s.quad + j;
            a_next[j] = m0 + r < p.c && k < k_end ? f[(m0 + r) * p.hw + k] : 0.0f;
            b_next[j] = n0 + r < p.c && k < k_end ? f[(n0 + r) * p.hw + k] : 0.0f;
        }
        // The previous slice is multiplied while this one's loads are in flight.
        if (k0 > k_begin) multiply_slice(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE),
                                         WIDE, WIDE, tm, tn, acc);
        a_tile[buf * STAGED(WIDE) + s.k * pitch(WIDE) + s.quad] = a_next;
        b_tile[buf * STAGED(WIDE) + s.k * pitch(WIDE) + s.quad] = b_next;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    multiply_slice(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE), WIDE, WIDE, tm, tn, acc);

    device float* g = partial + (split * p.batch + item) * p.c * p.c;
    for (uint i = 0; i < 8; ++i) {
        const uint m = m0 + block_row(i, tm, WIDE);
        if (m >= p.c) continue;
        for (uint j = 0; j < 8; ++j) {
            const uint n = n0 + block_row(j, tn, WIDE);
            if (n >= p.c) continue;
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
kernel void sum_splits(device const float* partial [[buffer(0)]],  // extent: p.splits * p.count
                       device float* out [[buffer(1)]],  // extent: p.count
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
// Grid: (ceil(hw / 128), ceil(c / 128), batch).
kernel void gram_grad(device const float* dg [[buffer(0)]],  // extent: p.batch * p.c * p.c
                      device const float* x [[buffer(1)]],  // extent: p.batch * p.c * p.hw
                      device float* dx [[buffer(2)]],  // extent: p.batch * p.c * p.hw
                      constant GramGradParams& p [[buffer(3)]],
                      uint3 tile [[threadgroup_position_in_grid]],
                      uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WIDE)];  // [channel k][channel m] of dG + dGᵀ
    threadgroup float4 b_tile[2 * STAGED(WIDE)];  // [channel k][feature]
    const uint item = tile.z, m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    device const float* g = dg + item * p.c * p.c;
    device const float* f = x + item * p.c * p.hw;
    // dG is staged along k (its rows are), the features along their rows.
    const Stage sa = along_k(t), sb = along_rows(t, WIDE);

    const uint tm = t / (WIDE / 8), tn = t % (WIDE / 8);
    Block acc;
    clear(acc);
    float4 a_next, b_next;
    uint buf = 0;
    for (uint k0 = 0; k0 < p.c; k0 += TILE_K, buf ^= 1) {
        const uint ka = k0 + sa.k, kb = k0 + sb.k;
        for (uint j = 0; j < 4; ++j) {
            const uint m = m0 + 4 * sa.quad + j, n = n0 + 4 * sb.quad + j;
            a_next[j] = m < p.c && ka < p.c ? g[m * p.c + ka] + g[ka * p.c + m] : 0.0f;
            b_next[j] = n < p.hw && kb < p.c ? f[kb * p.hw + n] : 0.0f;
        }
        if (k0 > 0) multiply_slice(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE),
                                   WIDE, WIDE, tm, tn, acc);
        a_tile[buf * STAGED(WIDE) + sa.k * pitch(WIDE) + sa.quad] = a_next;
        b_tile[buf * STAGED(WIDE) + sb.k * pitch(WIDE) + sb.quad] = b_next;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    multiply_slice(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE), WIDE, WIDE, tm, tn, acc);

    device float* out = dx + item * p.c * p.hw;
    for (uint i = 0; i < 8; ++i) {
        const uint m = m0 + block_row(i, tm, WIDE);
        if (m >= p.c) continue;
        for (uint j = 0; j < 8; ++j) {
            const uint n = n0 + block_row(j, tn, WIDE);
            if (n < p.hw) out[m * p.hw + n] = p.alpha * acc.v[i][j];
        }
    }
}
