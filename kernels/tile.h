// The tiling family: the tiled products of conv.metal, matmul.metal and gram.metal.
//
// A threadgroup owns a tile of the output, `width_m` rows by `width_n` columns, and multiplies
// TILE_K-deep slices of the operands staged in threadgroup memory. Three tilings:
//
//   wide    128 × 128 outputs, 256 threads: the workhorse;
//   medium   64 × 128 outputs, 128 threads: for convolutions with 33 to 64 channels, and
//   narrow   16 × 256 outputs,  64 threads: for fewer (9 → 16, 16 → 32 at 256×256 pixels are
//            common in a U-Net), where a 128-row tile would be mostly waste.
//
// Staging is pipelined: while the threads multiply the slice in one of two threadgroup buffers,
// the next slice's loads from device memory are already in flight into registers, and are
// stored into the other buffer afterwards — one barrier per slice, and the load latency hidden
// behind the arithmetic. The slices are stored k-major (tile[k][row]), each row of k padded by
// one float4 so that threads storing down k land in different banks.
//
// Two accumulators multiply the staged slices, and a product kernel is written once for both:
//
// - FmaTile: each thread accumulates an 8×8 block of the tile in registers with float fma, 512
//   multiply-adds a slice. A thread's block is four 4×4 quarters, rows 4·tm … 4·tm+3 of each half
//   of the tile (likewise the columns), so that a warp reads the staged slices as consecutive
//   float4s: no bank conflicts, a quarter of the loads scalars would take. On the cpu backend a
//   barrier costs each thread a fiber switch; 512 multiply-adds between barriers keep that small.
// - MmaTile<TM, TN>: each simdgroup accumulates TM × TN 8×8 simdgroup matrices (the matrix
//   hardware: tensor cores on NVIDIA GPUs, Apple's simdgroup matrices), under the precision
//   policy the library was compiled with. Simdgroups tile the threadgroup's tile row-major.
//
// Storage types: the product kernels are templates over the storage type T of their operands
// and output (float, half, bfloat; instances `name`, `name_f16`, `name_bf16`). They accumulate in
// float and round once to T where they store. The slices of a split reduction stay float, and
// sum_splits rounds their sum. The float-register kernels stage operands as float; the `_mma`
// kernels stage them as T, so a half or bfloat slice takes half the threadgroup memory and its
// simdgroup matrices are half or bfloat: products of 16-bit operands, which enter exactly under
// every precision policy (on NVIDIA GPUs the 16-bit tensor-core instructions, twice TF32's rate).
//
// Kernels pass the tiling's sizes as literal arguments (the bodies are inlined, so the sizes are
// compile-time constants there), and declare the staging buffers.
#pragma once

#include "store.h"

#define TILE_K 8            // reduction depth staged per slice
#define WIDE 128            // the wide tiling: WIDE × WIDE outputs …
#define WIDE_THREADS 256    // … by (WIDE/8)² threads
#define MEDIUM_M 64         // the medium tiling: MEDIUM_M × MEDIUM_N outputs …
#define MEDIUM_N 128
#define MEDIUM_THREADS 128  // … by (MEDIUM_M/8)·(MEDIUM_N/8) threads
#define NARROW_M 16         // the narrow tiling: NARROW_M × NARROW_N outputs …
#define NARROW_N 256
#define NARROW_THREADS 64   // … by (NARROW_M/8)·(NARROW_N/8) threads
#define MAX_STAGED 8        // quads a thread stages per operand and slice, at most (narrow's B)

// float4s in one buffer of a staged operand that is `width` rows wide: TILE_K padded rows.
#define STAGED(width) (TILE_K * ((width) / 4 + 1))

struct Block {
    float v[8][8];
};

// Which quad of rows (4 consecutive rows) and which of the TILE_K steps of a slice staging
// unit u covers. along_k suits an operand contiguous along k: a warp reads 8-float runs of 4
// rows. along_rows suits one contiguous along its rows: a warp reads a run of 128 rows.
struct Stage {
    uint k, quad;
};

inline Stage along_k(uint u) {
    return Stage{u % TILE_K, u / TILE_K};
}

inline Stage along_rows(uint u, uint width) {
    return Stage{u / (width / 4), u % (width / 4)};
}

// float4s per staged row of k of an operand `width` rows wide.
inline uint pitch(uint width) {
    return width / 4 + 1;
}

// Row (or column) of the tile that element i of a thread's block lies in: quarters at 4·q and
// width/2 + 4·q.
inline uint block_row(uint i, uint q, uint width) {
    return (i < 4 ? 0 : width / 2) + 4 * q + i % 4;
}

// The float accumulator: thread t's 8×8 block of the tile, rows 4·tm … and columns 4·tn … of
// each half.
struct FmaTile {
    Block acc;
    uint tm, tn, width_m, width_n;

    FmaTile(uint t, uint width_m, uint width_n)
        : tm(t / (width_n / 8)), tn(t % (width_n / 8)), width_m(width_m), width_n(width_n) {
        for (uint i = 0; i < 8; ++i)
            for (uint j = 0; j < 8; ++j) acc.v[i][j] = 0.0f;
    }

    // acc += the outer products of one staged slice.
    void multiply(threadgroup const float4* a_tile, threadgroup const float4* b_tile) {
        const uint a_pitch = pitch(width_m), b_pitch = pitch(width_n);
        for (uint k = 0; k < TILE_K; ++k) {
            const float4 a0 = a_tile[k * a_pitch + tm], a1 = a_tile[k * a_pitch + width_m / 8 + tm];
            const float4 b0 = b_tile[k * b_pitch + tn], b1 = b_tile[k * b_pitch + width_n / 8 + tn];
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
            for (uint i = 0; i < 8; ++i)
                for (uint j = 0; j < 8; ++j) acc.v[i][j] = fma(a[i], b[j], acc.v[i][j]);
        }
    }

    // out.write(row, column, value) for each element of the block, tile-relative; column by
    // column, so what out works out per column is done once for eight rows.
    template <typename Out>
    void store(thread const Out& out) const {
        for (uint j = 0; j < 8; ++j)
            for (uint i = 0; i < 8; ++i) out.write(block_row(i, tm, width_m), block_row(j, tn, width_n), acc.v[i][j]);
    }
};

#ifndef MLM_SIMDGROUP_PAIR
// d0 = a0·b + c0 and d1 = a1·b + c1. Matrix hardware that multiplies 16 × 8 tiles (NVIDIA's)
// computes both in one instruction, and the cuda backend defines this itself.
template <typename S>
inline void simdgroup_multiply_accumulate_pair(thread simdgroup_float8x8& d0, thread simdgroup_float8x8& d1,
                                               simdgroup_matrix<S, 8, 8> a0, simdgroup_matrix<S, 8, 8> a1,
                                               simdgroup_matrix<S, 8, 8> b, simdgroup_float8x8 c0, simdgroup_float8x8 c1) {
    simdgroup_multiply_accumulate(d0, a0, b, c0);
    simdgroup_multiply_accumulate(d1, a1, b, c1);
}
#endif

#ifndef MLM_STAGED_OPERANDS
// Staged operands: x as the precision policy lets it into a product, for a kernel to apply once
// where it stages a value (in threadgroup memory, or packed weights in device memory), and a load
// of values so staged, whose products then skip the rounding. The cuda and cpu backends define
// them (mlm_simdgroup_matrix.h: under `high` the cuda backend rounds to TF32 once a staged value
// rather than in each product that reads it; the cpu backend loads a float not so staged as NaN,
// so a test catches a kernel that forgets it). Apple GPUs multiply float matrices at float
// precision: a plain value and load.
inline float staged_operand(float x) { return x; }
inline half staged_operand(half x) { return x; }
inline bfloat staged_operand(bfloat x) { return x; }
template <typename S>
inline void simdgroup_load_staged(thread simdgroup_matrix<S, 8, 8>& m, threadgroup const S* src, ulong stride,
                                  ulong2 origin = ulong2(0), bool transpose = false) {
    simdgroup_load(m, src, stride, origin, transpose);
}
template <typename S>
inline void simdgroup_load_staged(thread simdgroup_matrix<S, 8, 8>& m, device const S* src, ulong stride,
                                  ulong2 origin = ulong2(0), bool transpose = false) {
    simdgroup_load(m, src, stride, origin, transpose);
}
#endif

#ifndef MLM_STAGED_SPLIT
// Split staging: under `highest` the cuda and cpu backends take a float operand staged as two
// planes, its TF32 high part (split_hi) and rest (split_lo), through simdgroup_load_split, sparing
// each product the split of every value it loads (mlm_simdgroup_matrix.h). Apple GPUs multiply
// float matrices at float precision: one plane, the value itself, and a staged load.
#define MLM_STAGED_SPLIT 0
inline float split_hi(float x) { return x; }
inline float split_lo(float) { return 0.0f; }
inline half split_hi(half x) { return x; }
inline half split_lo(half) { return half(0.0f); }
inline bfloat split_hi(bfloat x) { return x; }
inline bfloat split_lo(bfloat) { return bfloat(0.0f); }
template <typename S>
inline void simdgroup_load_split(thread simdgroup_matrix<S, 8, 8>& m, threadgroup const S* src, threadgroup const S* lo_src,
                                 ulong stride, ulong2 origin = ulong2(0), bool transpose = false) {
    simdgroup_load_staged(m, src, stride, origin, transpose);
}
#endif

// The planes an operand staged as S takes: two (split_hi, then split_lo) where the backend takes
// float operands split, else one (staged_operand).
#define SPLIT_PLANES(S) (MLM_STAGED_SPLIT && sizeof(S) == 4 ? 2 : 1)

// Stages x at dst, as the planes of SPLIT_PLANES(S) take it: the second `plane` elements on.
template <typename S>
inline void stage_split(threadgroup S* dst, uint plane, S x) {
    if (SPLIT_PLANES(S) == 2) {
        dst[0] = split_hi(x);
        dst[plane] = split_lo(x);
    } else {
        dst[0] = staged_operand(x);
    }
}

// staged_operand of each of four.
template <typename T>
inline vec<T, 4> staged_operands(vec<T, 4> v) {
    return vec<T, 4>(staged_operand(v.x), staged_operand(v.y), staged_operand(v.z), staged_operand(v.w));
}

// ---------------------------------------------------------------- products on simdgroup matrices
//
// The `_mma` kernels: a threadgroup of MMA_THREADS threads (four simdgroups) owns a tile of the
// output in one of the three tilings' sizes. The reduction is staged MMA_K deep with k contiguous:
// a_s[row][MMA_PITCH], b_s[column][MMA_PITCH]. A lane's two elements of a matrix are then
// adjacent (one 8-byte load on NVIDIA GPUs), and rows 24 floats apart put the lanes of a load on
// distinct banks (16 would put rows 0 and 2 on the same ones). One buffer of each, the next
// slice's loads in flight in registers while the current one is multiplied: a slice is 32
// products a simdgroup between barriers, and both buffers fit Apple's 32 KB of threadgroup memory.
//
// Thread t stages element t + MMA_THREADS·i of A's slice (row (t + MMA_THREADS·i) / MMA_K,
// column t % MMA_K: a warp reads two 64-byte runs of k, and every element a thread stages has
// the same k), and all MMA_K elements of columns t, t + MMA_THREADS, … of B (a warp reads along
// the columns).
#define MMA_THREADS 128
#define MMA_K 16
#define MMA_PITCH 24

// The simdgroup-matrix accumulator: simdgroup s holds TM × TN matrices of 8 × 8, rows
// TM·8·(s / WARPS_N) …, columns TN·8·(s % WARPS_N) … of the tile, in float; the operands are
// staged as S. Products run two matrices of a column at a time
// (simdgroup_multiply_accumulate_pair), so TM is even.
template <uint TM, uint TN, uint WARPS_N, typename S = float>
struct MmaTiles {
    simdgroup_float8x8 c[TM][TN];
    uint row0, col0, simdgroup, lane;

    MmaTiles(uint t)
        : row0(t / 32 / WARPS_N * 8 * TM), col0(t / 32 % WARPS_N * 8 * TN), simdgroup(t / 32), lane(t % 32) {
        #pragma unroll
        for (uint i = 0; i < TM; ++i)
            #pragma unroll
            for (uint j = 0; j < TN; ++j) c[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }

    // c += the staged slice's product.
    void multiply(threadgroup const S* a_s, threadgroup const S* b_s) {
        #pragma unroll
        for (uint k = 0; k < MMA_K; k += 8) {
            simdgroup_matrix<S, 8, 8> am[TM], bm[TN];
            #pragma unroll
            for (uint i = 0; i < TM; ++i) simdgroup_load_staged(am[i], a_s + (row0 + 8 * i) * MMA_PITCH + k, MMA_PITCH);
            #pragma unroll
            for (uint j = 0; j < TN; ++j) simdgroup_load_staged(bm[j], b_s + (col0 + 8 * j) * MMA_PITCH + k, MMA_PITCH, ulong2(0), true);
            #pragma unroll
            for (uint j = 0; j < TN; ++j)
                #pragma unroll
                for (uint i = 0; i < TM; i += 2)
                    simdgroup_multiply_accumulate_pair(c[i][j], c[i + 1][j], am[i], am[i + 1], bm[j], c[i][j], c[i + 1][j]);
        }
    }

    // out.write(row, column, value) for each element of the simdgroup's matrices, tile-relative.
    // The matrices go through `scratch` (a staging buffer, free once every simdgroup is done
    // with it) eight rows at a time: 64·TN floats a simdgroup. A lane writes columns lane,
    // lane + 32, …, so a simdgroup writes 32 consecutive columns of a row at once.
    template <typename Out>
    void store(thread const Out& out, threadgroup float* scratch) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        threadgroup float* strip = scratch + simdgroup * 64 * TN;
        #pragma unroll
        for (uint i = 0; i < TM; ++i) {
            #pragma unroll
            for (uint j = 0; j < TN; ++j) simdgroup_store(c[i][j], strip + 8 * j, 8 * TN);
            simdgroup_barrier(mem_flags::mem_threadgroup);
            for (uint col = lane; col < 8 * TN; col += 32)
                for (uint r = 0; r < 8; ++r) out.write(row0 + 8 * i + r, col0 + col, strip[r * 8 * TN + col]);
            simdgroup_barrier(mem_flags::mem_threadgroup);
        }
    }
};

// Stores thread t's staged values of a slice once every simdgroup is done with the last one:
// a_next[i] at row t / MMA_K + i·MMA_THREADS / MMA_K, column t % MMA_K of a_s; b_next[i] (MMA_K
// values) as column t + MMA_THREADS·i of b_s. Values are staged through staged_operand, which
// MmaTiles::multiply's staged loads rely on (a 16-bit value is staged as it is).
// Stages one column of B's slice: four float4 stores, or in a 16-bit type, 32-bit stores of pairs
// (a column starts 4-byte aligned: MMA_PITCH is even).
inline void stage_column(threadgroup float* dst, thread const float (&v)[MMA_K]) {
    for (uint j = 0; j < MMA_K; j += 4) *(threadgroup float4*)(dst + j) = staged_operands(float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
}
template <typename S>
inline void stage_column(threadgroup S* dst, thread const S (&v)[MMA_K]) {
    for (uint j = 0; j < MMA_K; j += 2)
        *(threadgroup uint*)(dst + j) = uint(as_type<ushort>(v[j])) | uint(as_type<ushort>(v[j + 1])) << 16;
}

// A's part of a slice (between the barriers of stage_slice).
template <uint A_EACH, typename S>
inline void stage_rows(threadgroup S* a_s, thread const S (&a_next)[A_EACH], uint t) {
    for (uint i = 0; i < A_EACH; ++i) a_s[(t / MMA_K + i * (MMA_THREADS / MMA_K)) * MMA_PITCH + t % MMA_K] = staged_operand(a_next[i]);
}

// Staging by quads, for an operand whose rows are contiguous along k (the features of a Gram
// matrix): thread t stages k = QUAD_K(t) … + 3 of rows QUAD_ROW(t) + QUAD_ROWS_APART·i of a slice, one
// 16-byte load (8 in a 16-bit type) and one store each instead of four — the scalar staging's
// load instructions and their address arithmetic were most of gram_mma's loop.
#define QUAD_ROWS_APART (MMA_THREADS / (MMA_K / 4))
#define QUAD_ROW(t) ((t) / (MMA_K / 4))
#define QUAD_K(t) (4 * ((t) % (MMA_K / 4)))
#define MMA_QUADS_EACH(BM) ((BM) / QUAD_ROWS_APART)

// src[0 … 3] as S, zeros from the `left`-th on (all where left ≤ 0): one vector load where
// `aligned` (src is then 4-element aligned and the four are all in or all out), else four loads.
template <typename S, typename T>
inline vec<S, 4> load_quad(device const T* src, int left, bool aligned) {
    if (left <= 0) return vec<S, 4>(S(0.0f));
    if (aligned) return vec<S, 4>(*(device const vec<T, 4>*)src);
    vec<S, 4> v = vec<S, 4>(S(0.0f));
    for (int j = 0; j < 4; ++j)
        if (j < left) v[j] = S(src[j]);
    return v;
}

// Stores thread t's quads of a slice of rows (k contiguous, MMA_PITCH apart) through staged_operand.
template <uint EACH, typename S>
inline void stage_quads(threadgroup S* a_s, thread const vec<S, 4> (&next)[EACH], uint t) {
    for (uint i = 0; i < EACH; ++i)
        *(threadgroup vec<S, 4>*)(a_s + (QUAD_ROW(t) + QUAD_ROWS_APART * i) * MMA_PITCH + QUAD_K(t)) = staged_operands(next[i]);
}

template <uint A_EACH, uint B_COLS, typename S>
inline void stage_slice(threadgroup S* a_s, threadgroup S* b_s, thread const S (&a_next)[A_EACH],
                        thread const S (&b_next)[B_COLS][MMA_K], uint t) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    stage_rows(a_s, a_next, t);
    for (uint i = 0; i < B_COLS; ++i) stage_column(b_s + (t + MMA_THREADS * i) * MMA_PITCH, b_next[i]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The accumulator of a BM × BN tile whose operands are staged as S: four simdgroups, two rows of
// two where the tile is 64 rows or more (64 × 64 or 32 × 64 each), else one row of four (16 × 64
// each).
#define MMA_TILES(BM, BN, S) MmaTiles<(BM) / ((BM) >= 64 ? 16 : 8), (BN) / ((BM) >= 64 ? 16 : 32), ((BM) >= 64 ? 2 : 4), S>
// The threadgroup memory of a BM × BN tile's slices staged as S, in float4s: A's rows, then B's
// columns. It is also the float scratch MmaTiles::store passes results through (4 · 64 · TN
// floats), which it holds for every tile here even in a 16-bit type.
#define MMA_STAGED_QUADS(BM, BN, S) (((BM) + (BN)) * MMA_PITCH * sizeof(S) / 16)
// The elements of A a thread stages a slice, and the columns of B.
#define MMA_A_EACH(BM) ((BM) * MMA_K / MMA_THREADS)
#define MMA_B_COLS(BN) ((BN) / MMA_THREADS)


// Moves a reduction index k = (c·KH + ky)·KW + kx (or a pixel index (image·OH + oy)·OW + ox)
// `steps` places on, without dividing.
inline void advance(thread uint& c, thread uint& ky, thread uint& kx, uint steps, uint kh, uint kw) {
    kx += steps;
    while (kx >= kw) {
        kx -= kw;
        if (++ky == kh) { ky = 0; ++c; }
    }
}

// A long reduction split across threadgroups leaves its slices in `partial`; this adds them.
struct SplitParams {
    uint count;   // floats per slice
    uint splits;
    uint relu;    // a convolution's fused relu (stored_output)
};

// out[i] = Σ_s partial[s·count + i], in a fixed order (so results do not depend on timing). The
// slices are float whatever the storage type T of out, which the sum is rounded to once (and
// passed through a convolution's fused relu).
// Σ_s partial[s·count + i] over the splits, in the order s = 0, 1, … (also gram_sum_splits').
inline float split_sum(device const float* partial, uint count, uint splits, uint i) {
    float s = 0.0f;
    for (uint k = 0; k < splits; ++k) s += partial[k * count + i];
    return s;
}

template <typename T>
kernel void sum_splits(device const float* partial [[buffer(0)]],  // extent: p.splits * p.count
                       device T* out [[buffer(1)]],  // extent: p.count
                       constant SplitParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    out[i] = stored_output<T>(split_sum(partial, p.count, p.splits, i), p.relu);
}
template [[host_name("sum_splits")]] [[kernel]] decltype(sum_splits<float>) sum_splits<float>;
template [[host_name("sum_splits_f16")]] [[kernel]] decltype(sum_splits<half>) sum_splits<half>;
template [[host_name("sum_splits_bf16")]] [[kernel]] decltype(sum_splits<bfloat>) sum_splits<bfloat>;
