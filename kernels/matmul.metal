// Matrix products: C = op(A)·op(B) (+ bias[column]), with op a transpose or not, and the bias
// gradient of a fully connected layer.
//
// A tiled product in kernels/tile.h's wide tiling (128×128 outputs, 256 threads, pipelined
// staging), with float register blocks (`matmul`) or simdgroup matrices (`matmul_mma`). Transposes are strides, so one kernel serves a·b, a·bᵀ (linear
// layers) and aᵀ·b (their weight gradients); each operand is staged along whichever of its
// dimensions is contiguous, so that a warp's loads are. Each is a template over the storage type
// (tile.h: loads converted to float, float sums, one rounding where C is stored).
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

template <typename T>
struct MatmulOut {
    device T* c;
    device float* partial;  // a split's float slice, or null: c itself
    device const T* bias;   // or null
    uint m0, n0, m, n;

    void write(uint i, uint j, float v) const {
        const uint row = m0 + i, col = n0 + j;
        if (row >= m || col >= n) return;
        const float r = v + (bias ? float(bias[col]) : 0.0f);
        if (partial) partial[row * n + col] = r;
        else c[row * n + col] = T(r);
    }
};

// c = A·B (+ bias), C row-major. A long reduction over a small C is split like the weight
// gradient of a convolution: threadgroup z sums k in [z·chunk, (z+1)·chunk) into float slice z
// of `partial` (m·n floats a slice; the bias goes into slice 0), and `sum_splits` adds the
// slices into c. Unsplit (k ≤ chunk), c is written directly and `partial` is not touched.
// Grid: (ceil(n / 128), ceil(m / 128), splits).
template <typename T>
kernel void matmul(device const T* a [[buffer(0)]],  // extent: (p.m - 1) * p.a_m + (p.k - 1) * p.a_k + 1
                   device const T* b [[buffer(1)]],  // extent: (p.k - 1) * p.b_k + (p.n - 1) * p.b_n + 1
                   device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.n
                   device T* c [[buffer(3)]],  // extent: p.m * p.n
                   device float* partial [[buffer(4)]],  // extent: min((p.k + p.chunk - 1) / p.chunk - 1, 1) * (p.k + p.chunk - 1) / p.chunk * p.m * p.n
                   constant MatmulParams& p [[buffer(5)]],
                   uint3 tile [[threadgroup_position_in_grid]],
                   uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WIDE)];  // [k][row]
    threadgroup float4 b_tile[2 * STAGED(WIDE)];  // [k][column]
    const uint m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    const uint k_begin = tile.z * p.chunk, k_end = min(p.k, k_begin + p.chunk);
    const Stage sa = p.a_k == 1 ? along_k(t) : along_rows(t, WIDE);
    const Stage sb = p.b_n == 1 ? along_rows(t, WIDE) : along_k(t);

    FmaTile acc(t, WIDE, WIDE);
    float4 a_next, b_next;
    uint buf = 0;
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K, buf ^= 1) {
        const uint ka = k0 + sa.k, kb = k0 + sb.k;
        for (uint j = 0; j < 4; ++j) {
            const uint m = m0 + 4 * sa.quad + j, n = n0 + 4 * sb.quad + j;
            a_next[j] = m < p.m && ka < k_end ? float(a[m * p.a_m + ka * p.a_k]) : 0.0f;
            b_next[j] = n < p.n && kb < k_end ? float(b[kb * p.b_k + n * p.b_n]) : 0.0f;
        }
        // The previous slice is multiplied while this one's loads are in flight.
        if (k0 > k_begin) acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
        a_tile[buf * STAGED(WIDE) + sa.k * pitch(WIDE) + sa.quad] = a_next;
        b_tile[buf * STAGED(WIDE) + sb.k * pitch(WIDE) + sb.quad] = b_next;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_tile + (buf ^ 1) * STAGED(WIDE), b_tile + (buf ^ 1) * STAGED(WIDE));
    acc.store(MatmulOut<T>{c, p.k > p.chunk ? partial + tile.z * p.m * p.n : nullptr,
                           p.has_bias && tile.z == 0 ? bias : nullptr, m0, n0, p.m, p.n});
}
template [[host_name("matmul")]] [[kernel]] decltype(matmul<float>) matmul<float>;
template [[host_name("matmul_f16")]] [[kernel]] decltype(matmul<half>) matmul<half>;
template [[host_name("matmul_bf16")]] [[kernel]] decltype(matmul<bfloat>) matmul<bfloat>;

// c = A·B (+ bias) on simdgroup matrices (tile.h's MMA staging, wide tiling), split likewise.
// Grid: (ceil(n / 128), ceil(m / 128), splits), MMA_THREADS threads.
template <typename T>
kernel void matmul_mma(device const T* a [[buffer(0)]],  // extent: (p.m - 1) * p.a_m + (p.k - 1) * p.a_k + 1
                       device const T* b [[buffer(1)]],  // extent: (p.k - 1) * p.b_k + (p.n - 1) * p.b_n + 1
                       device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.n
                       device T* c [[buffer(3)]],  // extent: p.m * p.n
                       device float* partial [[buffer(4)]],  // extent: min((p.k + p.chunk - 1) / p.chunk - 1, 1) * (p.k + p.chunk - 1) / p.chunk * p.m * p.n
                       constant MatmulParams& p [[buffer(5)]],
                       uint3 tile [[threadgroup_position_in_grid]],
                       uint t [[thread_index_in_threadgroup]]) {
    using S = T;  // staged as stored
    threadgroup float4 staged[MMA_STAGED_QUADS(WIDE, WIDE, S)];
    threadgroup S* a_s = (threadgroup S*)staged;  // [row][k]
    threadgroup S* b_s = a_s + WIDE * MMA_PITCH;  // [column][k]
    constexpr uint A_EACH = MMA_A_EACH(WIDE);
    const uint m0 = tile.y * WIDE, n0 = tile.x * WIDE;
    const uint k_begin = tile.z * p.chunk, k_end = min(p.k, k_begin + p.chunk);
    device const T* a_rows = a + (m0 + t / MMA_K) * p.a_m;  // rows m0 + t / MMA_K + (MMA_THREADS / MMA_K)·i
    const uint a_count = p.m - min(p.m, m0 + t / MMA_K);
    const bool b_ok = n0 + t < p.n;
    device const T* b_col = b + (b_ok ? n0 + t : 0) * p.b_n;

    MMA_TILES(WIDE, WIDE, S) acc(t);
    S a_next[A_EACH], b_next[1][MMA_K];
    for (uint k0 = k_begin; k0 < k_end; k0 += MMA_K) {
        const uint ka = k0 + t % MMA_K;
        for (uint i = 0; i < A_EACH; ++i)
            a_next[i] = ka < k_end && (MMA_THREADS / MMA_K) * i < a_count ? S(a_rows[(MMA_THREADS / MMA_K) * i * p.a_m + ka * p.a_k]) : S(0.0f);
        for (uint j = 0; j < MMA_K; ++j) b_next[0][j] = b_ok && k0 + j < k_end ? S(b_col[(k0 + j) * p.b_k]) : S(0.0f);
        if (k0 > k_begin) acc.multiply(a_s, b_s);
        stage_slice(a_s, b_s, a_next, b_next, t);
    }
    if (k_end > k_begin) acc.multiply(a_s, b_s);
    acc.store(MatmulOut<T>{c, p.k > p.chunk ? partial + tile.z * p.m * p.n : nullptr,
                           p.has_bias && tile.z == 0 ? bias : nullptr, m0, n0, p.m, p.n}, (threadgroup float*)staged);
}
template [[host_name("matmul_mma")]] [[kernel]] decltype(matmul_mma<float>) matmul_mma<float>;
template [[host_name("matmul_mma_f16")]] [[kernel]] decltype(matmul_mma<half>) matmul_mma<half>;
template [[host_name("matmul_mma_bf16")]] [[kernel]] decltype(matmul_mma<bfloat>) matmul_mma<bfloat>;

struct BiasGradParams {
    uint rows, cols;
};

// db[j] = Σ_i g[i, j]: a thread a column, so a warp reads consecutive columns of each row.
template <typename T>
kernel void linear_bias_grad(device const T* g [[buffer(0)]],  // extent: p.rows * p.cols
                             device T* db [[buffer(1)]],  // extent: p.cols
                             constant BiasGradParams& p [[buffer(2)]],
                             uint j [[thread_position_in_grid]]) {
    if (j >= p.cols) return;
    float s = 0.0f;
    for (uint i = 0; i < p.rows; ++i) s += float(g[i * p.cols + j]);
    db[j] = T(s);
}
template [[host_name("linear_bias_grad")]] [[kernel]] decltype(linear_bias_grad<float>) linear_bias_grad<float>;
template [[host_name("linear_bias_grad_f16")]] [[kernel]] decltype(linear_bias_grad<half>) linear_bias_grad<half>;
template [[host_name("linear_bias_grad_bf16")]] [[kernel]] decltype(linear_bias_grad<bfloat>) linear_bias_grad<bfloat>;
