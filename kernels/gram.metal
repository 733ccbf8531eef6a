// Gram matrices G = α·F·Fᵀ per batch item (F: C × H·W features), and their gradient
// dF = α·(dG + dGᵀ)·F — MPSNNGramMatrixCalculation's forward and gradient, α shared by both.
//
// Both are tiled products in kernels/tile.h's wide tiling (128×128 outputs, 256 threads,
// pipelined staging), with float register blocks or simdgroup matrices (`_mma`). G is symmetric, so only tiles on or above the
// diagonal are computed, each written twice; the H·W reduction is long and G small, so it is
// split across threadgroups (slices of `partial`, added by `sum_splits`). Templates over the
// storage type (tile.h): the slices of G are float whatever it is, and sum_splits rounds them.
#include <metal_stdlib>
using namespace metal;

#include "tile.h"

struct GramParams {
    uint batch, c, hw;  // features are batch × c × hw
    float alpha;
    uint chunk;         // features each split sums (a multiple of TILE_K)
};

struct GramOut {
    device float* g;
    float alpha;
    uint m0, n0, c;
    bool mirror;  // a tile above the diagonal writes its mirror image below it too

    void write(uint i, uint j, float v) const {
        const uint m = m0 + i, n = n0 + j;
        if (m >= c || n >= c) return;
        g[m * c + n] = alpha * v;
        if (mirror) g[n * c + m] = alpha * v;
    }
};

// Slice `split` of partial (batch × c × c floats a slice) = α·F[:, range]·F[:, range]ᵀ over
// the split's feature range. Grid: (tiles, tiles, batch · splits) with tiles = ceil(c / 128);
// threadgroups below the diagonal return at once.
template <typename T>
kernel void gram(device const T* x [[buffer(0)]],  // extent: p.batch * p.c * p.hw
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
    device const T* f = x + item * p.c * p.hw;
    // Features are contiguous along k: thread t stages channels 4·s.quad … 4·s.quad+3 of both
    // tiles at step s.k, so a warp reads 8-float runs of 16 channels.
    const Stage s = along_k(t);

    FmaTile acc(t, WIDE, WIDE);
    float4 a_next, b_next;
    uint buf = 0;
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K, buf ^= 1) {
        const uint k = k0 + s.k;
        for (uint j = 0; j < 4; ++j) {
            const uint r = 4 * s.quad + j;
            a_next[j] = m0 + r < p.c && k < k_end ? float(f[(m0 + r) * p.hw + k]) : 0.0f;
            b_next[j] = n0 + r < p.c && k < k_end ? float(f[(n0 + r) * p.hw + k]) : 0.0f;
        }
        // The previous slice is multiplied while this one's loads are in flight.
        if (k0 > k_begin) acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
        a_tile[buf * STAGED(WIDE) + s.k * pitch(WIDE) + s.quad] = a_next;
        b_tile[buf * STAGED(WIDE) + s.k * pitch(WIDE) + s.quad] = b_next;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
    acc.store(GramOut{partial + (split * p.batch + item) * p.c * p.c, p.alpha, m0, n0, p.c, tile.x != tile.y});
}
template [[host_name("gram")]] [[kernel]] decltype(gram<float>) gram<float>;
template [[host_name("gram_f16")]] [[kernel]] decltype(gram<half>) gram<half>;
template [[host_name("gram_bf16")]] [[kernel]] decltype(gram<bfloat>) gram<bfloat>;

// gram on simdgroup matrices (tile.h's MMA staging, wide tiling). Grid as gram's, MMA_THREADS threads.
template <typename T>
kernel void gram_mma(device const T* x [[buffer(0)]],  // extent: p.batch * p.c * p.hw
                     device float* partial [[buffer(1)]],  // extent: (p.hw + p.chunk - 1) / p.chunk * p.batch * p.c * p.c
                     constant GramParams& p [[buffer(2)]],
                     uint3 tile [[threadgroup_position_in_grid]],
                     uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_q[WIDE * MMA_PITCH / 4];  // [row channel][feature]
    threadgroup float4 b_q[WIDE * MMA_PITCH / 4];  // [column channel][feature]
    threadgroup float* a_s = (threadgroup float*)a_q;
    threadgroup float* b_s = (threadgroup float*)b_q;
    if (tile.y > tile.x) return;  // the whole threadgroup leaves together, before any barrier
    constexpr uint A_EACH = MMA_A_EACH(WIDE);
    const uint item = tile.z % p.batch, split = tile.z / p.batch;
    const uint m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    const uint k_begin = split * p.chunk, k_end = min(p.hw, k_begin + p.chunk);
    device const T* f = x + item * p.c * p.hw;
    device const T* a_rows = f + (m0 + t / MMA_K) * p.hw + t % MMA_K;
    const uint a_count = p.c - min(p.c, m0 + t / MMA_K);
    const bool b_ok = n0 + t < p.c;
    device const T* b_row = f + (b_ok ? n0 + t : 0) * p.hw;

    MMA_TILES(WIDE, WIDE) acc(t);
    float a_next[A_EACH], b_next[1][MMA_K];
    for (uint k0 = k_begin; k0 < k_end; k0 += MMA_K) {
        const bool a_k_ok = k0 + t % MMA_K < k_end;
        for (uint i = 0; i < A_EACH; ++i)
            a_next[i] = a_k_ok && (MMA_THREADS / MMA_K) * i < a_count ? float(a_rows[(MMA_THREADS / MMA_K) * i * p.hw + k0]) : 0.0f;
        for (uint j = 0; j < MMA_K; ++j) b_next[0][j] = b_ok && k0 + j < k_end ? float(b_row[k0 + j]) : 0.0f;
        if (k0 > k_begin) acc.multiply(a_s, b_s);
        stage_slice(a_s, b_s, a_next, b_next, t);
    }
    if (k_end > k_begin) acc.multiply(a_s, b_s);
    acc.store(GramOut{partial + (split * p.batch + item) * p.c * p.c, p.alpha, m0, n0, p.c, tile.x != tile.y}, b_s);
}
template [[host_name("gram_mma")]] [[kernel]] decltype(gram_mma<float>) gram_mma<float>;
template [[host_name("gram_mma_f16")]] [[kernel]] decltype(gram_mma<half>) gram_mma<half>;
template [[host_name("gram_mma_bf16")]] [[kernel]] decltype(gram_mma<bfloat>) gram_mma<bfloat>;

struct GramGradParams {
    uint batch, c, hw;
    float alpha;
};

template <typename T>
struct GramGradOut {
    device T* dx;
    float alpha;
    uint m0, n0, c, hw;

    void write(uint i, uint j, float v) const {
        const uint m = m0 + i, n = n0 + j;
        if (m < c && n < hw) dx[m * hw + n] = T(alpha * v);
    }
};

// dx = α·(dG + dGᵀ)·F per batch item; the symmetrised dG is formed while staging it.
// Grid: (ceil(hw / 128), ceil(c / 128), batch).
template <typename T>
kernel void gram_grad(device const T* dg [[buffer(0)]],  // extent: p.batch * p.c * p.c
                      device const T* x [[buffer(1)]],  // extent: p.batch * p.c * p.hw
                      device T* dx [[buffer(2)]],  // extent: p.batch * p.c * p.hw
                      constant GramGradParams& p [[buffer(3)]],
                      uint3 tile [[threadgroup_position_in_grid]],
                      uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WIDE)];  // [channel k][channel m] of dG + dGᵀ
    threadgroup float4 b_tile[2 * STAGED(WIDE)];  // [channel k][feature]
    const uint item = tile.z, m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    device const T* g = dg + item * p.c * p.c;
    device const T* f = x + item * p.c * p.hw;
    // dG is staged along k (its rows are), the features along their rows.
    const Stage sa = along_k(t), sb = along_rows(t, WIDE);

    FmaTile acc(t, WIDE, WIDE);
    float4 a_next, b_next;
    uint buf = 0;
    for (uint k0 = 0; k0 < p.c; k0 += TILE_K, buf ^= 1) {
        const uint ka = k0 + sa.k, kb = k0 + sb.k;
        for (uint j = 0; j < 4; ++j) {
            const uint m = m0 + 4 * sa.quad + j, n = n0 + 4 * sb.quad + j;
            a_next[j] = m < p.c && ka < p.c ? float(g[m * p.c + ka]) + float(g[ka * p.c + m]) : 0.0f;
            b_next[j] = n < p.hw && kb < p.c ? float(f[kb * p.hw + n]) : 0.0f;
        }
        if (k0 > 0) acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
        a_tile[buf * STAGED(WIDE) + sa.k * pitch(WIDE) + sa.quad] = a_next;
        b_tile[buf * STAGED(WIDE) + sb.k * pitch(WIDE) + sb.quad] = b_next;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
    acc.store(GramGradOut<T>{dx + item * p.c * p.hw, p.alpha, m0, n0, p.c, p.hw});
}
template [[host_name("gram_grad")]] [[kernel]] decltype(gram_grad<float>) gram_grad<float>;
template [[host_name("gram_grad_f16")]] [[kernel]] decltype(gram_grad<half>) gram_grad<half>;
template [[host_name("gram_grad_bf16")]] [[kernel]] decltype(gram_grad<bfloat>) gram_grad<bfloat>;

// gram_grad on simdgroup matrices (tile.h's MMA staging, wide tiling): A is dG + dGᵀ, formed
// while staging it. Grid as gram_grad's, MMA_THREADS threads.
template <typename T>
kernel void gram_grad_mma(device const T* dg [[buffer(0)]],  // extent: p.batch * p.c * p.c
                          device const T* x [[buffer(1)]],  // extent: p.batch * p.c * p.hw
                          device T* dx [[buffer(2)]],  // extent: p.batch * p.c * p.hw
                          constant GramGradParams& p [[buffer(3)]],
                          uint3 tile [[threadgroup_position_in_grid]],
                          uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_q[WIDE * MMA_PITCH / 4];  // [channel m][channel k] of dG + dGᵀ
    threadgroup float4 b_q[WIDE * MMA_PITCH / 4];  // [feature][channel k]
    threadgroup float* a_s = (threadgroup float*)a_q;
    threadgroup float* b_s = (threadgroup float*)b_q;
    constexpr uint A_EACH = MMA_A_EACH(WIDE);
    const uint item = tile.z, m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    const uint row = m0 + t / MMA_K, a_count = p.c - min(p.c, row);  // rows row + (MMA_THREADS / MMA_K)·i
    const bool b_ok = n0 + t < p.hw;
    device const T* g = dg + item * p.c * p.c;
    device const T* f_col = x + item * p.c * p.hw + (b_ok ? n0 + t : 0);

    MMA_TILES(WIDE, WIDE) acc(t);
    float a_next[A_EACH], b_next[1][MMA_K];
    for (uint k0 = 0; k0 < p.c; k0 += MMA_K) {
        const uint k = k0 + t % MMA_K;
        for (uint i = 0; i < A_EACH; ++i) {
            const uint m = row + (MMA_THREADS / MMA_K) * i;
            a_next[i] = k < p.c && (MMA_THREADS / MMA_K) * i < a_count ? float(g[m * p.c + k]) + float(g[k * p.c + m]) : 0.0f;
        }
        for (uint j = 0; j < MMA_K; ++j) b_next[0][j] = b_ok && k0 + j < p.c ? float(f_col[(k0 + j) * p.hw]) : 0.0f;
        if (k0 > 0) acc.multiply(a_s, b_s);
        stage_slice(a_s, b_s, a_next, b_next, t);
    }
    acc.multiply(a_s, b_s);
    acc.store(GramGradOut<T>{dx + item * p.c * p.hw, p.alpha, m0, n0, p.c, p.hw}, b_s);
}
template [[host_name("gram_grad_mma")]] [[kernel]] decltype(gram_grad_mma<float>) gram_grad_mma<float>;
template [[host_name("gram_grad_mma_f16")]] [[kernel]] decltype(gram_grad_mma<half>) gram_grad_mma<half>;
template [[host_name("gram_grad_mma_bf16")]] [[kernel]] decltype(gram_grad_mma<bfloat>) gram_grad_mma<bfloat>;
