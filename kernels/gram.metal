// Gram matrices G = α·F·Fᵀ per batch item (F: C × H·W features), and their gradient
// dF = α·(dG + dGᵀ)·F — MPSNNGramMatrixCalculation's forward and gradient, α shared by both.
//
// Both are tiled products in kernels/tile.h's wide tiling (128×128 outputs, 256 threads,
// pipelined staging), with float register blocks or simdgroup matrices (`_mma`). G is symmetric, so only tiles on or above the
// diagonal are computed (GramOut: written once, mirrored where a tile writes G itself); the H·W
// reduction is long and G small, so it is split across threadgroups (slices of `partial`, added
// and mirrored by `gram_sum_splits`). Templates over the storage type (tile.h): the slices of G
// are float whatever it is, and gram_sum_splits rounds their sum.
#include <metal_stdlib>
using namespace metal;

#include "tile.h"

#define GRAM_SMALL 64  // gram_small_mma's tiles: GRAM_SMALL × GRAM_SMALL outputs, for at most that many channels

struct GramParams {
    uint batch, c, hw;  // features are batch × c × hw
    float alpha;
    uint chunk;         // features each split sums (a multiple of TILE_K)
    uint mirror;        // the tiles write G (one split of a float32 G) and mirror it (GramOut)
};

// Each tile writes G on and above the diagonal; where it writes G itself (`mirror`: one split of
// a float32 G) it also mirrors it below, else gram_sum_splits mirrors the sum. G is so exactly
// symmetric: a tile on the diagonal computes both G[m][n] and G[n][m], which the split-TF32
// products of `highest` (a_lo·b_hi before a_hi·b_lo) need not round alike. A slice is not
// mirrored because the mirror's writes are a matrix apart along the warp (one memory sector
// each); the sum mirrors G once instead of each of the splits.
struct GramOut {
    device float* g;
    float alpha;
    uint m0, n0, c;
    uint mirror;

    void write(uint i, uint j, float v) const {
        const uint m = m0 + i, n = n0 + j;
        if (m >= c || n >= c || m > n) return;
        g[m * c + n] = alpha * v;
        if (mirror && m != n) g[n * c + m] = alpha * v;
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
    acc.store(GramOut{partial + (split * p.batch + item) * p.c * p.c, p.alpha, m0, n0, p.c, p.mirror});
}
template [[host_name("gram")]] [[kernel]] decltype(gram<float>) gram<float>;
template [[host_name("gram_f16")]] [[kernel]] decltype(gram<half>) gram<half>;
template [[host_name("gram_bf16")]] [[kernel]] decltype(gram<bfloat>) gram<bfloat>;

// gram on simdgroup matrices (tile.h's MMA staging) in BM × BM tiles: the wide tiling's 128, or
// 64 where the channels fit one such tile (a 128-wide tile would be three quarters padding).
// Both operands are rows of F (channels along, features across), so B's rows are staged the
// way A's are, and a tile on the diagonal stages its rows once and multiplies them by
// themselves. Grid as gram's with tiles = ceil(c / BM), MMA_THREADS threads.
template <typename T, uint BM>
kernel void gram_mma(device const T* x [[buffer(0)]],  // extent: p.batch * p.c * p.hw
                     device float* partial [[buffer(1)]],  // extent: (p.hw + p.chunk - 1) / p.chunk * p.batch * p.c * p.c
                     constant GramParams& p [[buffer(2)]],
                     uint3 tile [[threadgroup_position_in_grid]],
                     uint t [[thread_index_in_threadgroup]]) {
    using S = T;  // staged as stored
    threadgroup float4 staged[MMA_STAGED_QUADS(BM, BM, S)];
    threadgroup S* a_s = (threadgroup S*)staged;  // [row channel][feature]
    threadgroup S* b_s = a_s + BM * MMA_PITCH;    // [column channel][feature]
    if (tile.y > tile.x) return;  // the whole threadgroup leaves together, before any barrier
    constexpr uint EACH = MMA_QUADS_EACH(BM);
    const bool diagonal = tile.x == tile.y;
    const uint item = tile.z % p.batch, split = tile.z / p.batch;
    const uint m0 = tile.y * BM, n0 = tile.x * BM;
    const uint k_begin = split * p.chunk, k_end = min(p.hw, k_begin + p.chunk);
    device const T* f = x + item * p.c * p.hw;
    // Thread t stages rows QUAD_ROW(t) + QUAD_ROWS_APART·i of either operand, features QUAD_K(t) …
    // + 3 (tile.h): one vector load each where hw is a multiple of 4, as a row then starts aligned
    // and a split's range is whole quads (chunk is a multiple of MMA_K).
    const bool aligned = p.hw % 4 == 0;
    const uint a_row = min(p.c, m0 + QUAD_ROW(t)), b_row = min(p.c, n0 + QUAD_ROW(t));
    device const T* a_rows = f + a_row * p.hw + QUAD_K(t);
    device const T* b_rows = f + b_row * p.hw + QUAD_K(t);
    const uint a_count = p.c - a_row, b_count = p.c - b_row;
    threadgroup const S* b_read = diagonal ? a_s : b_s;

    MMA_TILES(BM, BM, S) acc(t);
    vec<S, 4> a_next[EACH], b_next[EACH];
    for (uint k0 = k_begin; k0 < k_end; k0 += MMA_K) {
        const int left = int(k_end) - int(k0 + QUAD_K(t));  // features of this quad within the split
        for (uint i = 0; i < EACH; ++i)
            a_next[i] = load_quad<S>(a_rows + QUAD_ROWS_APART * i * p.hw + k0, QUAD_ROWS_APART * i < a_count ? left : 0, aligned);
        if (!diagonal)
            for (uint i = 0; i < EACH; ++i)
                b_next[i] = load_quad<S>(b_rows + QUAD_ROWS_APART * i * p.hw + k0, QUAD_ROWS_APART * i < b_count ? left : 0, aligned);
        if (k0 > k_begin) acc.multiply(a_s, b_read);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        stage_quads(a_s, a_next, t);
        if (!diagonal) stage_quads(b_s, b_next, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (k_end > k_begin) acc.multiply(a_s, b_read);
    acc.store(GramOut{partial + (split * p.batch + item) * p.c * p.c, p.alpha, m0, n0, p.c, p.mirror}, (threadgroup float*)staged);
}
template [[host_name("gram_mma")]] [[kernel]] decltype(gram_mma<float, WIDE>) gram_mma<float, WIDE>;
template [[host_name("gram_mma_f16")]] [[kernel]] decltype(gram_mma<half, WIDE>) gram_mma<half, WIDE>;
template [[host_name("gram_mma_bf16")]] [[kernel]] decltype(gram_mma<bfloat, WIDE>) gram_mma<bfloat, WIDE>;
template [[host_name("gram_small_mma")]] [[kernel]] decltype(gram_mma<float, GRAM_SMALL>) gram_mma<float, GRAM_SMALL>;
template [[host_name("gram_small_mma_f16")]] [[kernel]] decltype(gram_mma<half, GRAM_SMALL>) gram_mma<half, GRAM_SMALL>;
template [[host_name("gram_small_mma_bf16")]] [[kernel]] decltype(gram_mma<bfloat, GRAM_SMALL>) gram_mma<bfloat, GRAM_SMALL>;

struct GramSumParams {
    uint batch, c, splits;
};

// g = the sum of the splits' slices of partial (each G on and above the diagonal, as GramOut
// leaves it), in a fixed order, rounded to T once and mirrored below the diagonal. One thread an
// element of G; those below the diagonal return (their value is written by the one above), so a
// warp reads and writes a row's run of G, and only the mirror's writes are scattered.
template <typename T>
kernel void gram_sum_splits(device const float* partial [[buffer(0)]],  // extent: p.splits * p.batch * p.c * p.c
                            device T* g [[buffer(1)]],  // extent: p.batch * p.c * p.c
                            constant GramSumParams& p [[buffer(2)]],
                            uint i [[thread_position_in_grid]]) {
    const uint count = p.batch * p.c * p.c;
    if (i >= count) return;
    const uint item = i / (p.c * p.c), m = i / p.c % p.c, n = i % p.c;
    if (m > n) return;
    const T s = T(split_sum(partial, count, p.splits, i));
    g[i] = s;
    if (m != n) g[(item * p.c + n) * p.c + m] = s;
}
template [[host_name("gram_sum_splits")]] [[kernel]] decltype(gram_sum_splits<float>) gram_sum_splits<float>;
template [[host_name("gram_sum_splits_f16")]] [[kernel]] decltype(gram_sum_splits<half>) gram_sum_splits<half>;
template [[host_name("gram_sum_splits_bf16")]] [[kernel]] decltype(gram_sum_splits<bfloat>) gram_sum_splits<bfloat>;

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

// gram_grad on simdgroup matrices (tile.h's MMA staging) in tiles of BM channels × WIDE features:
// the wide tiling, or the medium one (64 rows) where the channels fit it. A is dG + dGᵀ, formed
// while staging it. Grid: (ceil(hw / WIDE), ceil(c / BM), batch), MMA_THREADS threads. In a
// 16-bit type T the operands are staged as T, and A, a sum of two stored values that T cannot
// hold, as two: its rounding to T and the remainder (exact in T but where the float sum itself
// rounded), each multiplied by F — 16-bit products, exact under every policy, summing to
// float32's accuracy.
template <typename T, uint BM>
kernel void gram_grad_mma(device const T* dg [[buffer(0)]],  // extent: p.batch * p.c * p.c
                          device const T* x [[buffer(1)]],  // extent: p.batch * p.c * p.hw
                          device T* dx [[buffer(2)]],  // extent: p.batch * p.c * p.hw
                          constant GramGradParams& p [[buffer(3)]],
                          uint3 tile [[threadgroup_position_in_grid]],
                          uint t [[thread_index_in_threadgroup]]) {
    using S = T;
    constexpr bool SPLIT = sizeof(T) == 2;  // A staged as two 16-bit parts
    threadgroup float4 staged[MMA_STAGED_QUADS(BM + (SPLIT ? BM : 0), WIDE, S)];
    threadgroup S* a_s = (threadgroup S*)staged;  // [channel m][channel k] of dG + dGᵀ (rounded to S)
    threadgroup S* b_s = a_s + BM * MMA_PITCH;    // [feature][channel k]
    threadgroup S* r_s = b_s + WIDE * MMA_PITCH;  // the remainder of A, where SPLIT
    constexpr uint A_EACH = MMA_A_EACH(BM);
    const uint item = tile.z, m0 = tile.y * BM, n0 = tile.x * WIDE;
    const uint row = m0 + t / MMA_K, a_count = p.c - min(p.c, row);  // rows row + (MMA_THREADS / MMA_K)·i
    const bool b_ok = n0 + t < p.hw;
    device const T* g = dg + item * p.c * p.c;
    device const T* f_col = x + item * p.c * p.hw + (b_ok ? n0 + t : 0);

    MMA_TILES(BM, WIDE, S) acc(t);
    S a_next[A_EACH], r_next[A_EACH], b_next[1][MMA_K];
    for (uint k0 = 0; k0 < p.c; k0 += MMA_K) {
        const uint k = k0 + t % MMA_K;
        for (uint i = 0; i < A_EACH; ++i) {
            const uint m = row + (MMA_THREADS / MMA_K) * i;
            const float a = k < p.c && (MMA_THREADS / MMA_K) * i < a_count ? float(g[m * p.c + k]) + float(g[k * p.c + m]) : 0.0f;
            a_next[i] = S(a);
            r_next[i] = S(a - float(a_next[i]));
        }
        for (uint j = 0; j < MMA_K; ++j) b_next[0][j] = b_ok && k0 + j < p.c ? S(f_col[(k0 + j) * p.hw]) : S(0.0f);
        if (k0 > 0) {
            acc.multiply(a_s, b_s);
            if (SPLIT) acc.multiply(r_s, b_s);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // stage_slice's, with the remainder
        stage_rows(a_s, a_next, t);
        if (SPLIT) stage_rows(r_s, r_next, t);
        stage_column(b_s + t * MMA_PITCH, b_next[0]);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_s, b_s);
    if (SPLIT) acc.multiply(r_s, b_s);
    acc.store(GramGradOut<T>{dx + item * p.c * p.hw, p.alpha, m0, n0, p.c, p.hw}, (threadgroup float*)staged);
}
template [[host_name("gram_grad_mma")]] [[kernel]] decltype(gram_grad_mma<float, WIDE>) gram_grad_mma<float, WIDE>;
template [[host_name("gram_grad_mma_f16")]] [[kernel]] decltype(gram_grad_mma<half, WIDE>) gram_grad_mma<half, WIDE>;
template [[host_name("gram_grad_mma_bf16")]] [[kernel]] decltype(gram_grad_mma<bfloat, WIDE>) gram_grad_mma<bfloat, WIDE>;
template [[host_name("gram_grad_medium_mma")]] [[kernel]] decltype(gram_grad_mma<float, MEDIUM_M>) gram_grad_mma<float, MEDIUM_M>;
template [[host_name("gram_grad_medium_mma_f16")]] [[kernel]] decltype(gram_grad_mma<half, MEDIUM_M>) gram_grad_mma<half, MEDIUM_M>;
template [[host_name("gram_grad_medium_mma_bf16")]] [[kernel]] decltype(gram_grad_mma<bfloat, MEDIUM_M>) gram_grad_mma<bfloat, MEDIUM_M>;
