// 2-D convolution (NCHW, cross-correlation like PyTorch) and its gradients, as implicit GEMMs.
//
// Each product is a matrix multiply whose operands are never written out: forward is
// weights (Cout × Cin·KH·KW) times the im2col'd input (Cin·KH·KW × N·OH·OW), and the two
// gradients are the same product with the roles swapped. The tiling, the pipelined staging and
// the register blocks are kernels/tile.h's; here is what each product stages: per slice, every
// thread gathers a quad (4 rows) of each operand from device memory into registers, choosing
// its rows so that a warp's loads are contiguous where the operand is. A thread's rows stay the
// same for the whole reduction, so their index arithmetic is done once, and the reduction index
// is advanced by counting, not dividing.
//
// Each comes in the three tilings of tile.h (`_medium` and `_narrow` for fewer channels);
// conv2d_weight_grad sums over pixels, and splits that sum across threadgroups (`chunk`).
//
// Every kernel is a template over the storage type T of its tensors (float, half, bfloat;
// instances `name`, `name_f16`, `name_bf16`): it converts what it loads to float, stages and sums
// in float, and rounds once to T where it stores (tile.h). What a split reduction leaves in its
// slices, and the packed weights of conv2d_3x3_mma, stay float.
#include <metal_stdlib>
using namespace metal;

#include "tile.h"
#define BIAS_THREADS 256
#define OUTSIDE (-(1 << 30))  // a window origin whose every tap misses the image

struct ConvParams {
    uint n, cin, h, w;        // input images
    uint cout, oh, ow;        // output images
    uint kh, kw;              // window
    int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    uint groups;
    uint has_bias;            // conv2d: add bias[cout]; conv2d_input_grad (a transposed convolution): bias[cin]
    uint relu;                // conv2d: a fused relu after the bias (stored_output; sum_splits's, split)
    uint chunk;               // conv2d_weight_grad: output pixels each split sums (a multiple of TILE_K)
};

// y = conv(x, w) + bias. GEMM per group g: rows = its Cout/groups output channels,
// columns = the N·OH·OW output pixels, reduction = (input channel, ky, kx). Few output tiles
// with a long reduction (a discriminator's 64 → 128 channels at 7×7) split it like the weight
// gradient: threadgroup z sums k in [split·chunk, (split+1)·chunk) into slice `split` of y
// (N·Cout·OH·OW floats a slice of `partial`; the bias goes into slice 0), and `sum_splits` adds
// the slices into y. Unsplit, y is written directly and `partial` is not touched.
// Grid: (ceil(N·OH·OW / width_n), ceil(Cout/groups / width_m), groups · splits).
template <typename T>
struct ConvOut {
    device T* y;
    device float* partial;  // a split's float slice, or null: y itself
    device const T* bias;   // or null
    uint m0, n0, rows, pixels, plane, cout, channel0;
    uint relu;  // a fused relu, where y is written (split, sum_splits applies it)

    void write(uint m, uint n, float v) const {
        const uint c = m0 + m, q = n0 + n;
        if (c >= rows || q >= pixels) return;
        const uint i = ((q / plane) * cout + channel0 + c) * plane + q % plane;
        const float r = v + (bias ? float(bias[channel0 + c]) : 0.0f);
        if (partial) partial[i] = r;
        else y[i] = stored_output<T>(r, relu);
    }
};

template <typename T>
inline void conv2d_tiled(device const T* x, device const T* w, device const T* bias, device T* y,
                         device float* partial, constant ConvParams& p, uint3 tile, uint t,
                         threadgroup float4* a_tile, threadgroup float4* b_tile,
                         uint width_m, uint width_n, uint threads, thread FmaTile& acc) {
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups, khw = p.kh * p.kw;
    const uint plane = p.oh * p.ow, pixels = p.n * plane;
    const uint g = tile.z % p.groups, split = tile.z / p.groups, m0 = tile.y * width_m, n0 = tile.x * width_n;
    const uint k_begin = split * p.chunk, K = min(cin_g * khw, k_begin + p.chunk);
    const uint a_pitch = pitch(width_m), b_pitch = pitch(width_n);

    // Weights, contiguous along k: the first TILE_K·width_m/4 threads stage a quad each.
    const bool a_stager = t < TILE_K * width_m / 4;
    const Stage sa = along_k(t);
    device const T* w_group = w + g * cout_g * cin_g * khw;

    // Input patches, contiguous along the pixels: thread t stages the same four output pixels
    // at every slice, at `units` reduction steps sb.k, sb.k + step, … of it.
    const uint step = threads / (width_n / 4), units = TILE_K / step;
    const Stage sb = along_rows(t, width_n);
    // A pixel past the end gets a window origin far above the image: all its taps are padding.
    uint x_img[4];
    int iy0[4], ix0[4];
    for (uint j = 0; j < 4; ++j) {
        const uint q = n0 + 4 * sb.quad + j;
        const uint img = q < pixels ? q / plane : 0, r = q < pixels ? q % plane : 0;
        x_img[j] = (img * p.cin + g * cin_g) * p.h * p.w;
        iy0[j] = q < pixels ? int(r / p.ow) * p.stride_h - p.pad_h : OUTSIDE;
        ix0[j] = int(r % p.ow) * p.stride_w - p.pad_w;
    }
    // the next step's k = (ci·KH + ky)·KW + kx
    uint ci = (k_begin + sb.k) / khw, ky = (k_begin + sb.k) % khw / p.kw, kx = (k_begin + sb.k) % p.kw;

    float4 a_next = 0.0f, b_next[MAX_STAGED];
    uint buf = 0;
    for (uint k0 = k_begin; k0 < K; k0 += TILE_K, buf ^= 1) {
        if (a_stager) {
            const uint k = k0 + sa.k;
            for (uint j = 0; j < 4; ++j) {
                const uint m = m0 + 4 * sa.quad + j;
                a_next[j] = m < cout_g && k < K ? float(w_group[m * cin_g * khw + k]) : 0.0f;
            }
        }
        #pragma unroll
        for (uint i = 0; i < units; ++i) {
            const bool k_ok = k0 + sb.k + i * step < K;
            for (uint j = 0; j < 4; ++j) {
                const int iy = iy0[j] + int(ky) * p.dil_h, ix = ix0[j] + int(kx) * p.dil_w;
                const bool inside = iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);  // else zero padding
                b_next[i][j] = k_ok && inside ? float(x[x_img[j] + (ci * p.h + uint(iy)) * p.w + uint(ix)]) : 0.0f;
            }
            advance(ci, ky, kx, step, p.kh, p.kw);
        }
        // The previous slice is multiplied while this one's loads are in flight.
        if (k0 > k_begin) acc.multiply(a_tile + (buf ^ 1) * STAGED(width_m), b_tile + (buf ^ 1) * STAGED(width_n));
        if (a_stager) a_tile[buf * STAGED(width_m) + sa.k * a_pitch + sa.quad] = a_next;
        #pragma unroll
        for (uint i = 0; i < units; ++i) b_tile[buf * STAGED(width_n) + (sb.k + i * step) * b_pitch + sb.quad] = b_next[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_tile + (buf ^ 1) * STAGED(width_m), b_tile + (buf ^ 1) * STAGED(width_n));
    acc.store(ConvOut<T>{y, cin_g * khw > p.chunk ? partial + split * p.n * p.cout * plane : nullptr,
                         p.has_bias && split == 0 ? bias : nullptr, m0, n0, cout_g, pixels, plane, p.cout, g * cout_g, p.relu});
}

// The kernels: one template over the storage type and the tiling (rows × columns a threadgroup,
// threads), instantiated for each of tile.h's tilings.
template <typename T, uint WM, uint WN, uint THREADS>
kernel void conv2d_tiles(device const T* x [[buffer(0)]],  // extent: p.n * p.cin * p.h * p.w
                         device const T* w [[buffer(1)]],  // extent: p.cout * (p.cin / p.groups) * p.kh * p.kw
                         device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cout
                         device T* y [[buffer(3)]],  // extent: p.n * p.cout * p.oh * p.ow
                         device float* partial [[buffer(4)]],  // extent: min((p.cin / p.groups * p.kh * p.kw + p.chunk - 1) / p.chunk - 1, 1) * (p.cin / p.groups * p.kh * p.kw + p.chunk - 1) / p.chunk * p.n * p.cout * p.oh * p.ow
                         constant ConvParams& p [[buffer(5)]],
                         uint3 tile [[threadgroup_position_in_grid]],
                         uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WM)];
    threadgroup float4 b_tile[2 * STAGED(WN)];
    FmaTile acc(t, WM, WN);
    conv2d_tiled(x, w, bias, y, partial, p, tile, t, a_tile, b_tile, WM, WN, THREADS, acc);
}
template [[host_name("conv2d")]] [[kernel]] decltype(conv2d_tiles<float, WIDE, WIDE, WIDE_THREADS>) conv2d_tiles<float, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_f16")]] [[kernel]] decltype(conv2d_tiles<half, WIDE, WIDE, WIDE_THREADS>) conv2d_tiles<half, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_bf16")]] [[kernel]] decltype(conv2d_tiles<bfloat, WIDE, WIDE, WIDE_THREADS>) conv2d_tiles<bfloat, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_medium")]] [[kernel]] decltype(conv2d_tiles<float, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_tiles<float, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_medium_f16")]] [[kernel]] decltype(conv2d_tiles<half, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_tiles<half, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_medium_bf16")]] [[kernel]] decltype(conv2d_tiles<bfloat, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_tiles<bfloat, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_narrow")]] [[kernel]] decltype(conv2d_tiles<float, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_tiles<float, NARROW_M, NARROW_N, NARROW_THREADS>;
template [[host_name("conv2d_narrow_f16")]] [[kernel]] decltype(conv2d_tiles<half, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_tiles<half, NARROW_M, NARROW_N, NARROW_THREADS>;
template [[host_name("conv2d_narrow_bf16")]] [[kernel]] decltype(conv2d_tiles<bfloat, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_tiles<bfloat, NARROW_M, NARROW_N, NARROW_THREADS>;

// y = conv(x, w) + bias on simdgroup matrices (tile.h's MMA staging), split as conv2d_tiled
// splits. A slice's k = (ci, ky, kx) is the same for every thread: it walks the taps once.
// Grid: (ceil(N·OH·OW / BN), ceil(Cout/groups / BM), groups · splits), MMA_THREADS threads.
template <typename T, uint BM, uint BN>
kernel void conv2d_mma_tiles(device const T* x [[buffer(0)]],  // extent: p.n * p.cin * p.h * p.w
                             device const T* w [[buffer(1)]],  // extent: p.cout * (p.cin / p.groups) * p.kh * p.kw
                             device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cout
                             device T* y [[buffer(3)]],  // extent: p.n * p.cout * p.oh * p.ow
                             device float* partial [[buffer(4)]],  // extent: min((p.cin / p.groups * p.kh * p.kw + p.chunk - 1) / p.chunk - 1, 1) * (p.cin / p.groups * p.kh * p.kw + p.chunk - 1) / p.chunk * p.n * p.cout * p.oh * p.ow
                             constant ConvParams& p [[buffer(5)]],
                             uint3 tile [[threadgroup_position_in_grid]],
                             uint t [[thread_index_in_threadgroup]]) {
    using S = T;  // staged as stored
    threadgroup float4 staged[MMA_STAGED_QUADS(BM, BN, S)];
    threadgroup S* a_s = (threadgroup S*)staged;  // [output channel][k]
    threadgroup S* b_s = a_s + BM * MMA_PITCH;  // [pixel][k]
    constexpr uint A_EACH = MMA_A_EACH(BM), B_COLS = MMA_B_COLS(BN);
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups, khw = p.kh * p.kw, cols = cin_g * khw;
    const uint plane = p.oh * p.ow, pixels = p.n * plane;
    const uint g = tile.z % p.groups, split = tile.z / p.groups, m0 = tile.y * BM, n0 = tile.x * BN;
    const uint k_begin = split * p.chunk, K = min(cols, k_begin + p.chunk);

    // A: weights of output channels m0 + t / MMA_K + (MMA_THREADS / MMA_K)·i at k0 + t % MMA_K.
    device const T* w_rows = w + (g * cout_g + m0 + t / MMA_K) * cols + t % MMA_K;
    const uint a_rows = cout_g - min(cout_g, m0 + t / MMA_K);  // of this thread's rows, those that exist
    // B: the patches of pixels n0 + t + MMA_THREADS·i; a pixel past the end gets a window origin
    // whose every tap is padding.
    uint x_img[B_COLS];
    int iy0[B_COLS], ix0[B_COLS];
    for (uint i = 0; i < B_COLS; ++i) {
        const uint q = n0 + t + MMA_THREADS * i;
        const uint img = q < pixels ? q / plane : 0, r = q < pixels ? q % plane : 0;
        x_img[i] = (img * p.cin + g * cin_g) * p.h * p.w;
        iy0[i] = q < pixels ? int(r / p.ow) * p.stride_h - p.pad_h : OUTSIDE;
        ix0[i] = int(r % p.ow) * p.stride_w - p.pad_w;
    }
    uint ci = k_begin / khw, ky = k_begin % khw / p.kw, kx = k_begin % p.kw;

    MMA_TILES(BM, BN, S) acc(t);
    S a_next[A_EACH], b_next[B_COLS][MMA_K];
    for (uint k0 = k_begin; k0 < K; k0 += MMA_K) {
        const bool a_k_ok = k0 + t % MMA_K < K;
        for (uint i = 0; i < A_EACH; ++i)
            a_next[i] = a_k_ok && (MMA_THREADS / MMA_K) * i < a_rows ? S(w_rows[(MMA_THREADS / MMA_K) * i * cols + k0]) : S(0.0f);
        #pragma unroll
        for (uint j = 0; j < MMA_K; ++j) {
            const bool k_ok = k0 + j < K;
            for (uint i = 0; i < B_COLS; ++i) {
                const int iy = iy0[i] + int(ky) * p.dil_h, ix = ix0[i] + int(kx) * p.dil_w;
                const bool inside = iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);  // else zero padding
                b_next[i][j] = k_ok && inside ? S(x[x_img[i] + (ci * p.h + uint(iy)) * p.w + uint(ix)]) : S(0.0f);
            }
            advance(ci, ky, kx, 1, p.kh, p.kw);
        }
        // The previous slice is multiplied while this one's loads are in flight.
        if (k0 > k_begin) acc.multiply(a_s, b_s);
        stage_slice(a_s, b_s, a_next, b_next, t);
    }
    if (K > k_begin) acc.multiply(a_s, b_s);
    acc.store(ConvOut<T>{y, cols > p.chunk ? partial + split * p.n * p.cout * plane : nullptr,
                         p.has_bias && split == 0 ? bias : nullptr, m0, n0, cout_g, pixels, plane, p.cout, g * cout_g, p.relu}, (threadgroup float*)staged);
}
template [[host_name("conv2d_mma")]] [[kernel]] decltype(conv2d_mma_tiles<float, WIDE, WIDE>) conv2d_mma_tiles<float, WIDE, WIDE>;
template [[host_name("conv2d_mma_f16")]] [[kernel]] decltype(conv2d_mma_tiles<half, WIDE, WIDE>) conv2d_mma_tiles<half, WIDE, WIDE>;
template [[host_name("conv2d_mma_bf16")]] [[kernel]] decltype(conv2d_mma_tiles<bfloat, WIDE, WIDE>) conv2d_mma_tiles<bfloat, WIDE, WIDE>;
template [[host_name("conv2d_medium_mma")]] [[kernel]] decltype(conv2d_mma_tiles<float, MEDIUM_M, MEDIUM_N>) conv2d_mma_tiles<float, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_medium_mma_f16")]] [[kernel]] decltype(conv2d_mma_tiles<half, MEDIUM_M, MEDIUM_N>) conv2d_mma_tiles<half, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_medium_mma_bf16")]] [[kernel]] decltype(conv2d_mma_tiles<bfloat, MEDIUM_M, MEDIUM_N>) conv2d_mma_tiles<bfloat, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_narrow_mma")]] [[kernel]] decltype(conv2d_mma_tiles<float, NARROW_M, NARROW_N>) conv2d_mma_tiles<float, NARROW_M, NARROW_N>;
template [[host_name("conv2d_narrow_mma_f16")]] [[kernel]] decltype(conv2d_mma_tiles<half, NARROW_M, NARROW_N>) conv2d_mma_tiles<half, NARROW_M, NARROW_N>;
template [[host_name("conv2d_narrow_mma_bf16")]] [[kernel]] decltype(conv2d_mma_tiles<bfloat, NARROW_M, NARROW_N>) conv2d_mma_tiles<bfloat, NARROW_M, NARROW_N>;

// y = conv(x, w) + bias for a 3×3, stride-1, undilated, ungrouped convolution, directly
// rather than as a GEMM: the GEMM stages each input value once for each of the nine taps.
// A threadgroup computes CF_CO output channels over a tile of CF_PIXELS pixels — rows × cols,
// 8 × 64, or 16 × 32 for small images — taking the input channels CF_CHUNK at a time:
// it stages their (rows + 2) × (cols + 4) input values and the weights, and each thread then
// sums 8 output channels × 8 consecutive pixels of one row: per input channel 9 float4 reads of
// input (three rows of 12 values, whose windows the 8 pixels share) and 18 of weights, all one
// address for a warp, for 576 multiply-adds. The next chunk's loads are in flight while the
// current one is multiplied. Staged column s holds input column ox0 − pad + s, so a thread's
// window starts on a float4.
// Grid: (N · tiles of an image, ceil(Cout / CF_CO)), threads: CF_THREADS (the batch is not a grid
// dimension of its own: CUDA allows only 65535 threadgroups along y and z).
#define CF_PIXELS 512                                // pixels a tile
#define CF_CO 16                                     // output channels a threadgroup: two of 8
#define CF_CHUNK 4                                   // input channels staged at once
#define CF_THREADS (CF_CO / 8 * CF_PIXELS / 8)
#define CF_X_TILE(cols) ((CF_PIXELS / (cols) + 2) * ((cols) + 4))  // staged input floats a channel
#define CF_X_MAX CF_X_TILE(64)                       // the larger of them
#define CF_X_QUADS ((CF_CHUNK * CF_X_MAX / 4 + CF_THREADS - 1) / CF_THREADS)  // staged float4s a thread, at most
#define CF_W_QUADS ((CF_CHUNK * 9 * CF_CO / 4 + CF_THREADS - 1) / CF_THREADS)

struct Conv3x3Params {
    uint cin, h, w;          // input images
    uint cout, oh, ow;       // output images
    int pad_h, pad_w;
    uint tiles_x, tiles;     // tiles across an image, and in one (threadgroup x = image · tiles + ty · tiles_x + tx)
    uint has_bias;
    uint relu;               // a fused relu after the bias (stored_output)
    uint masked;             // an input gradient's fused relu_grad by `mask` (masked_output)
};

// Thread t's share of input channels c0 … c0 + CF_CHUNK − 1, in float4s of 4 staged columns
// (or output channels): the tile's input window (zero outside the image) and the weights.
template <typename T>
inline void load_chunk_3x3(device const T* x_img, device const T* w, constant Conv3x3Params& p,
                           uint c0, uint co0, int iy0, int ix0, uint t, uint cols,
                           thread float4* x_part, thread float4* w_part) {
    const uint span = cols + 4, rows = CF_PIXELS / cols, quads = CF_CHUNK * CF_X_TILE(cols) / 4;
    for (uint i = 0; i < CF_X_QUADS; ++i) {
        const uint u = t + i * CF_THREADS, c = c0 + u / (CF_X_TILE(cols) / 4);
        const int iy = iy0 + int(u / (span / 4) % (rows + 2)), ix = ix0 + int(u % (span / 4) * 4);
        const bool row_ok = u < quads && c < p.cin && iy >= 0 && iy < int(p.h);
        device const T* x_row = x_img + (c * p.h + uint(iy)) * p.w;
        for (uint k = 0; k < 4; ++k)
            x_part[i][k] = row_ok && ix + int(k) >= 0 && ix + int(k) < int(p.w) ? float(x_row[ix + int(k)]) : 0.0f;
    }
    for (uint i = 0; i < CF_W_QUADS; ++i) {
        const uint u = t + i * CF_THREADS, c = c0 + u / (9 * CF_CO / 4), tap = u / (CF_CO / 4) % 9;
        const uint co = co0 + u % (CF_CO / 4) * 4;
        for (uint k = 0; k < 4; ++k)
            w_part[i][k] = u < CF_CHUNK * 9 * CF_CO / 4 && c < p.cin && co + k < p.cout ? float(w[((co + k) * p.cin + c) * 9 + tap]) : 0.0f;
    }
}

template <typename T>
inline void conv2d_3x3_tiled(device const T* x, device const T* w, device const T* bias,
                             device T* y, device const T* mask, constant Conv3x3Params& p, uint3 group, uint t,
                             threadgroup float4* xs, threadgroup float4* ws, uint cols) {
    const uint rows = CF_PIXELS / cols, span = cols + 4, quads = CF_CHUNK * CF_X_TILE(cols) / 4;
    const uint img = group.x / p.tiles, tile = group.x % p.tiles, co0 = group.y * CF_CO;
    const uint oy0 = tile / p.tiles_x * rows, ox0 = tile % p.tiles_x * cols;
    const int iy0 = int(oy0) - p.pad_h, ix0 = int(ox0) - p.pad_w;
    device const T* x_img = x + img * p.cin * p.h * p.w;
    // Thread t: output channels 8·upper … 8·upper + 7 of the block, pixels 8·j … 8·j + 7 of tile row r.
    const uint upper = t / (CF_THREADS / 2), r = t % (CF_THREADS / 2) / (cols / 8), j = t % (cols / 8);

    float acc[8][8];
    for (uint i = 0; i < 8; ++i)
        for (uint k = 0; k < 8; ++k) acc[i][k] = 0.0f;
    float4 x_next[CF_X_QUADS], w_next[CF_W_QUADS];
    load_chunk_3x3(x_img, w, p, 0, co0, iy0, ix0, t, cols, x_next, w_next);
    for (uint c0 = 0; c0 < p.cin; c0 += CF_CHUNK) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk's reads are done
        for (uint i = 0; i < CF_X_QUADS; ++i)
            if (t + i * CF_THREADS < quads) xs[t + i * CF_THREADS] = x_next[i];
        for (uint i = 0; i < CF_W_QUADS; ++i)
            if (t + i * CF_THREADS < CF_CHUNK * 9 * CF_CO / 4) ws[t + i * CF_THREADS] = w_next[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (c0 + CF_CHUNK < p.cin) load_chunk_3x3(x_img, w, p, c0 + CF_CHUNK, co0, iy0, ix0, t, cols, x_next, w_next);
        for (uint cl = 0; cl < CF_CHUNK; ++cl) {
            float win[3][12];  // three input rows of the thread's 8 pixels' windows (and 2 spare)
            for (uint ky = 0; ky < 3; ++ky)
                for (uint q = 0; q < 3; ++q) {
                    const float4 v = xs[(cl * CF_X_TILE(cols) + (r + ky) * span) / 4 + 2 * j + q];
                    win[ky][4 * q] = v.x;
                    win[ky][4 * q + 1] = v.y;
                    win[ky][4 * q + 2] = v.z;
                    win[ky][4 * q + 3] = v.w;
                }
            for (uint tap = 0; tap < 9; ++tap) {
                const uint at = ((cl * 9 + tap) * CF_CO + 8 * upper) / 4, ky = tap / 3, kx = tap % 3;
                const float4 w0 = ws[at], w1 = ws[at + 1];
                const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
                for (uint i = 0; i < 8; ++i)
                    for (uint k = 0; k < 8; ++k) acc[i][k] = fma(wv[i], win[ky][k + kx], acc[i][k]);
            }
        }
    }

    const uint oy = oy0 + r;
    if (oy >= p.oh) return;
    for (uint i = 0; i < 8; ++i) {
        const uint co = co0 + 8 * upper + i;
        if (co >= p.cout) break;
        const float b = p.has_bias ? float(bias[co]) : 0.0f;
        const uint row = ((img * p.cout + co) * p.oh + oy) * p.ow;
        for (uint k = 0; k < 8; ++k) {
            const uint ox = ox0 + 8 * j + k;
            if (ox < p.ow) y[row + ox] = masked_output(stored_output<T>(acc[i][k] + b, p.relu), p.masked ? mask : nullptr, row + ox);
        }
    }
}

// Tiles of 8 × 64 pixels.
template <typename T>
kernel void conv2d_3x3(device const T* x [[buffer(0)]],
                       device const T* w [[buffer(1)]],  // extent: p.cout * p.cin * 9
                       device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cout
                       device T* y [[buffer(3)]],
                       constant Conv3x3Params& p [[buffer(4)]],
                       device const T* mask [[buffer(5)]],  // y's shape where p.masked
                       uint3 group [[threadgroup_position_in_grid]],
                       uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 xs[CF_CHUNK * CF_X_TILE(64) / 4];  // [channel][row][column]
    threadgroup float4 ws[CF_CHUNK * 9 * CF_CO / 4];      // [channel][tap][output channel]
    conv2d_3x3_tiled(x, w, bias, y, mask, p, group, t, xs, ws, 64);
}
template [[host_name("conv2d_3x3")]] [[kernel]] decltype(conv2d_3x3<float>) conv2d_3x3<float>;
template [[host_name("conv2d_3x3_f16")]] [[kernel]] decltype(conv2d_3x3<half>) conv2d_3x3<half>;
template [[host_name("conv2d_3x3_bf16")]] [[kernel]] decltype(conv2d_3x3<bfloat>) conv2d_3x3<bfloat>;

// Tiles of 16 × 32 pixels, for small images.
template <typename T>
kernel void conv2d_3x3_16x32(device const T* x [[buffer(0)]],
                             device const T* w [[buffer(1)]],  // extent: p.cout * p.cin * 9
                             device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cout
                             device T* y [[buffer(3)]],
                             constant Conv3x3Params& p [[buffer(4)]],
                             device const T* mask [[buffer(5)]],  // y's shape where p.masked
                             uint3 group [[threadgroup_position_in_grid]],
                             uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 xs[CF_CHUNK * CF_X_TILE(32) / 4];
    threadgroup float4 ws[CF_CHUNK * 9 * CF_CO / 4];
    conv2d_3x3_tiled(x, w, bias, y, mask, p, group, t, xs, ws, 32);
}
template [[host_name("conv2d_3x3_16x32")]] [[kernel]] decltype(conv2d_3x3_16x32<float>) conv2d_3x3_16x32<float>;
template [[host_name("conv2d_3x3_16x32_f16")]] [[kernel]] decltype(conv2d_3x3_16x32<half>) conv2d_3x3_16x32<half>;
template [[host_name("conv2d_3x3_16x32_bf16")]] [[kernel]] decltype(conv2d_3x3_16x32<bfloat>) conv2d_3x3_16x32<bfloat>;

// y = conv(x, w) + bias of a 3×3, stride-1, undilated, ungrouped convolution on simdgroup
// matrices, directly: the GEMM (conv2d_mma) gathers each input value once for each of the nine
// taps; here a threadgroup stages C3_CI input channels of a tile of rows × C3_COLS output
// pixels once, with the halo the taps reach, and multiplies each tap's shifted view of it — an
// 8 × 8 block of it is C3_CI channels (rows a staged channel apart) by 8 pixels of a row — by that
// tap's weights, which pack_weights_3x3 has laid out [chunk][tap][channel][C3_CI] so they stage
// as one contiguous copy. The tile is CO output channels by its pixels, on four simdgroups (tile.h's
// MmaTiles), the next chunk's loads in flight while this one is multiplied. Both operands are
// staged operands (tile.h; the weights as they are packed): under `high` the chunk loop is about
// 715 SASS instructions for its 144 tensor-core ones, 1,460 when each load rounded. Under `highest`
// the input is staged split (tile.h's stage_split: high parts and rests, in two planes), which
// took the kernel from 7,952 SASS instructions to 7,264 for its 864 tensor-core ones and its time
// on 4×64×256²→64 from 526 to 496 µs (ncu, H100); the weights, whose second plane would not fit
// beside the prefetched loads' registers, are split in the products. Two tiles:
//   conv2d_3x3_mma     C3_CO = 64 channels by C3_ROWS × C3_COLS = 8 × 16 pixels (each simdgroup
//                      32 channels by 4 rows);
//   conv2d_3x3_mma_32  C3_CO_32 = 32 channels by C3_ROWS_32 × C3_COLS = 16 × 16 pixels (each
//                      simdgroup 32 channels by 4 rows), for 17 to 32 output channels, which
//                      would leave half of a 64-channel tile's products idle.
// Grid: (N · tiles of an image, ceil(Cout / CO)), MMA_THREADS threads.
#define C3_CO 64
#define C3_CO_32 32
#define C3_CI 8
#define C3_ROWS 8
#define C3_ROWS_32 16
#define C3_COLS 16
// Staged input values a channel (the tile's rows and columns with the halo): 180 and 324, which
// put the 8 channels of a matrix load on distinct banks.
#define C3_X_SPAN(rows) (((rows) + 2) * (C3_COLS + 2))
#define C3_X_PITCH C3_X_SPAN(C3_ROWS)
#define C3_X_EACH(rows) ((C3_CI * C3_X_SPAN(rows) + MMA_THREADS - 1) / MMA_THREADS)  // staged input values a thread
// A chunk's packed weights of a CO-channel tile in float4s (16 bytes of T each), and those a thread stages, at most.
#define C3_W_QUADS(CO, T) (9 * (CO) * C3_CI * sizeof(T) / 16)
#define C3_W_EACH(CO, T) ((C3_W_QUADS(CO, T) + MMA_THREADS - 1) / MMA_THREADS)

struct PackParams {
    uint cin, cout, chunks, cout_padded;  // chunks of C3_CI input channels; output channels rounded up to C3_CO
};

// wp[chunk][tap][co][e] = w[co][C3_CI·chunk + e][tap] as a staged operand (tile.h), zeros past the
// channels, in T: the weights stage as they are packed, rounded once for all the tiles. Output
// channels are padded to a multiple of C3_CO for both tiles (a 32-channel tile reads the first half).
template <typename T>
kernel void pack_weights_3x3(device const T* w [[buffer(0)]],  // extent: p.cout * p.cin * 9
                             device T* wp [[buffer(1)]],  // extent: p.chunks * 9 * p.cout_padded * 8
                             constant PackParams& p [[buffer(2)]],
                             uint i [[thread_position_in_grid]]) {
    if (i >= p.chunks * 9 * p.cout_padded * C3_CI) return;
    const uint e = i % C3_CI, co = i / C3_CI % p.cout_padded, tap = i / (C3_CI * p.cout_padded) % 9;
    const uint ci = i / (C3_CI * p.cout_padded * 9) * C3_CI + e;
    wp[i] = co < p.cout && ci < p.cin ? staged_operand(T(w[(co * p.cin + ci) * 9 + tap])) : T(0.0f);
}
template [[host_name("pack_weights_3x3")]] [[kernel]] decltype(pack_weights_3x3<float>) pack_weights_3x3<float>;
template [[host_name("pack_weights_3x3_f16")]] [[kernel]] decltype(pack_weights_3x3<half>) pack_weights_3x3<half>;
template [[host_name("pack_weights_3x3_bf16")]] [[kernel]] decltype(pack_weights_3x3<bfloat>) pack_weights_3x3<bfloat>;

// acc += a staged chunk's product for a CO-channel tile of `rows` rows: for each tap (ky, kx), its
// weights by the staged input shifted by (ky, kx). A simdgroup's matrix j covers tile pixels
// col0 + 8j … (8 of one row; a simdgroup's pixels are whole rows, two matrices a row). The taps
// go column by column (kx, then ky): the input matrices of one kx serve its three ky, as tap
// (ky, kx) of row r reads what tap (ky − 1, kx) of row r + 1 reads, so a simdgroup loads TN + 4
// of them a column of taps instead of 3·TN. The staged pointers are taken as they are declared
// (not const), so S is deduced alike from all three.
template <uint CO, uint ROWS, uint TM, uint TN, uint WARPS_N, typename S>
inline void multiply_3x3(thread MmaTiles<TM, TN, WARPS_N, S>& acc, threadgroup S* w_s, threadgroup S* x_s) {
    constexpr uint plane = C3_CI * C3_X_SPAN(ROWS);  // the input's second plane, where staged split
    static_assert(C3_COLS == 16 && TN % 2 == 0, "a simdgroup's pixels are whole rows of two 8-pixel matrices");
    const uint row0 = acc.col0 / C3_COLS;  // the simdgroup's first tile row
    #pragma unroll
    for (uint kx = 0; kx < 3; ++kx) {
        simdgroup_matrix<S, 8, 8> bm[TN + 4];  // rows row0 … row0 + TN/2 + 1 of the staged input, shifted by kx
        #pragma unroll
        for (uint q = 0; q < TN + 4; ++q)
            simdgroup_load_split(bm[q], x_s + (row0 + q / 2) * (C3_COLS + 2) + 8 * (q % 2) + kx,
                                 x_s + plane + (row0 + q / 2) * (C3_COLS + 2) + 8 * (q % 2) + kx, C3_X_SPAN(ROWS));
        #pragma unroll
        for (uint ky = 0; ky < 3; ++ky) {
            const uint tap = 3 * ky + kx;
            simdgroup_matrix<S, 8, 8> am[TM];
            #pragma unroll
            for (uint i = 0; i < TM; ++i) simdgroup_load_staged(am[i], w_s + (tap * CO + acc.row0 + 8 * i) * C3_CI, C3_CI);
            #pragma unroll
            for (uint j = 0; j < TN; ++j)  // matrix j's row j/2, a tap ky lower: bm[j + 2·ky]
                #pragma unroll
                for (uint i = 0; i < TM; i += 2)
                    simdgroup_multiply_accumulate_pair(acc.c[i][j], acc.c[i + 1][j], am[i], am[i + 1], bm[j + 2 * ky],
                                                       acc.c[i][j], acc.c[i + 1][j]);
        }
    }
}

template <typename T>
struct Conv3x3Out {
    device T* y;           // the image's first output channel
    device const T* bias;  // or null
    uint co0, oy0, ox0, cout, oh, ow;
    uint relu;             // a fused relu
    device const T* mask;  // the image's first channel of a fused relu_grad's mask, or null

    void write(uint m, uint n, float v) const {
        const uint co = co0 + m, oy = oy0 + n / C3_COLS, ox = ox0 + n % C3_COLS, i = (co * oh + oy) * ow + ox;
        if (co < cout && oy < oh && ox < ow) y[i] = masked_output(stored_output<T>(v + (bias ? float(bias[co]) : 0.0f), relu), mask, i);
    }
};

template <typename T, uint CO, uint ROWS>
kernel void conv2d_3x3_mma_tiles(device const T* x [[buffer(0)]],
                                 device const T* wp [[buffer(1)]],  // extent: (p.cin + 7) / 8 * 9 * ((p.cout + 63) / 64 * 64) * 8
                                 device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cout
                                 device T* y [[buffer(3)]],
                                 constant Conv3x3Params& p [[buffer(4)]],
                                 device const T* mask [[buffer(5)]],  // y's shape where p.masked
                                 uint2 group [[threadgroup_position_in_grid]],
                                 uint t [[thread_index_in_threadgroup]]) {
    // Staged as stored: [tap][output channel][input channel] weights, then [input channel][row][column]
    // inputs with the halo (split: high parts, then rests); also the float scratch of acc.store (8 KB),
    // which both hold in any T.
    threadgroup float4 staged[(9 * CO * C3_CI + SPLIT_PLANES(T) * C3_CI * C3_X_SPAN(ROWS)) * sizeof(T) / 16];
    threadgroup T* w_s = (threadgroup T*)staged;
    threadgroup T* x_s = w_s + 9 * CO * C3_CI;
    const uint img = group.x / p.tiles, r = group.x % p.tiles, co0 = group.y * CO;
    const int oy0 = int(r / p.tiles_x * ROWS), ox0 = int(r % p.tiles_x * C3_COLS);
    const uint chunks = (p.cin + C3_CI - 1) / C3_CI, cout_padded = (p.cout + C3_CO - 1) / C3_CO * C3_CO;
    device const T* x_img = x + img * p.cin * p.h * p.w;
    // this thread's staged input values: element t + MMA_THREADS·i of a chunk's (channel, row, column)
    constexpr uint X_EACH = C3_X_EACH(ROWS), X_SPAN = C3_X_SPAN(ROWS);
    int x_off[X_EACH];  // offset in a channel's plane, or -1 outside the image (padding) or past the tile
    for (uint i = 0; i < X_EACH; ++i) {
        const uint e = t + MMA_THREADS * i, s = e % X_SPAN;
        const int iy = oy0 - p.pad_h + int(s / (C3_COLS + 2)), ix = ox0 - p.pad_w + int(s % (C3_COLS + 2));
        const bool inside = e < C3_CI * X_SPAN && iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);
        x_off[i] = inside ? iy * int(p.w) + ix : -1;
    }
    // The weights travel as raw 16-byte quads: a tap's CO · C3_CI of this tile, tap_quads of them.
    constexpr uint tap_quads = CO * C3_CI * sizeof(T) / 16;
    const uint row_quads = cout_padded * C3_CI * sizeof(T) / 16;  // a (chunk, tap)'s weights of all channels
    device const float4* w_tile = (device const float4*)wp + co0 / CO * tap_quads;

    MMA_TILES(CO, ROWS * C3_COLS, T) acc(t);
    T x_next[X_EACH];
    float4 w_next[C3_W_EACH(CO, T)];
    for (uint chunk = 0; chunk < chunks; ++chunk) {
        for (uint i = 0; i < X_EACH; ++i) {
            const uint ci = chunk * C3_CI + (t + MMA_THREADS * i) / X_SPAN;
            x_next[i] = x_off[i] >= 0 && ci < p.cin ? T(x_img[ci * p.h * p.w + uint(x_off[i])]) : T(0.0f);
        }
        for (uint i = 0; i < C3_W_EACH(CO, T); ++i) {
            const uint q = t + MMA_THREADS * i, tap = q / tap_quads;  // quad q of the chunk's 9 · CO · C3_CI
            if (q < C3_W_QUADS(CO, T)) w_next[i] = w_tile[(chunk * 9 + tap) * row_quads + q % tap_quads];
        }
        if (chunk > 0) multiply_3x3<CO, ROWS>(acc, w_s, x_s);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint i = 0; i < X_EACH; ++i)
            if (t + MMA_THREADS * i < C3_CI * X_SPAN) stage_split(x_s + t + MMA_THREADS * i, C3_CI * X_SPAN, x_next[i]);
        for (uint i = 0; i < C3_W_EACH(CO, T); ++i)
            if (t + MMA_THREADS * i < C3_W_QUADS(CO, T)) staged[t + MMA_THREADS * i] = w_next[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    multiply_3x3<CO, ROWS>(acc, w_s, x_s);
    acc.store(Conv3x3Out<T>{y + img * p.cout * p.oh * p.ow, p.has_bias ? bias : nullptr, co0, uint(oy0), uint(ox0), p.cout, p.oh, p.ow, p.relu,
                              p.masked ? mask + img * p.cout * p.oh * p.ow : nullptr},
              (threadgroup float*)staged);
}
template [[host_name("conv2d_3x3_mma")]] [[kernel]] decltype(conv2d_3x3_mma_tiles<float, C3_CO, C3_ROWS>) conv2d_3x3_mma_tiles<float, C3_CO, C3_ROWS>;
template [[host_name("conv2d_3x3_mma_f16")]] [[kernel]] decltype(conv2d_3x3_mma_tiles<half, C3_CO, C3_ROWS>) conv2d_3x3_mma_tiles<half, C3_CO, C3_ROWS>;
template [[host_name("conv2d_3x3_mma_bf16")]] [[kernel]] decltype(conv2d_3x3_mma_tiles<bfloat, C3_CO, C3_ROWS>) conv2d_3x3_mma_tiles<bfloat, C3_CO, C3_ROWS>;
template [[host_name("conv2d_3x3_mma_32")]] [[kernel]] decltype(conv2d_3x3_mma_tiles<float, C3_CO_32, C3_ROWS_32>) conv2d_3x3_mma_tiles<float, C3_CO_32, C3_ROWS_32>;
template [[host_name("conv2d_3x3_mma_32_f16")]] [[kernel]] decltype(conv2d_3x3_mma_tiles<half, C3_CO_32, C3_ROWS_32>) conv2d_3x3_mma_tiles<half, C3_CO_32, C3_ROWS_32>;
template [[host_name("conv2d_3x3_mma_32_bf16")]] [[kernel]] decltype(conv2d_3x3_mma_tiles<bfloat, C3_CO_32, C3_ROWS_32>) conv2d_3x3_mma_tiles<bfloat, C3_CO_32, C3_ROWS_32>;

struct FlipParams {
    uint count;   // elements of the weights
    uint cout;    // output channels of the forward convolution
    uint cin_g;   // its input channels a group
    uint groups;
    uint kh, kw;
};

// At stride 1 the input gradient is itself a forward convolution: of dy, padded by
// dil·(k − 1) − pad, with the weights turned around: w'[g·Cin/g + ci][co][ky][kx] =
// w[g·Cout/g + co][ci][KH − 1 − ky][KW − 1 − kx], laid out (Cin, Cout/groups, KH, KW).
// ops/conv.py then runs the forward kernel, which stages its operands better than the
// scatter-shaped conv2d_input_grad does.
template <typename T>
kernel void flip_weights(device const T* w [[buffer(0)]],  // extent: p.count
                         device T* out [[buffer(1)]],  // extent: p.count
                         constant FlipParams& p [[buffer(2)]],
                         uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    uint kx = i % p.kw, ky = (i / p.kw) % p.kh, taps = p.kh * p.kw;
    uint cout_g = p.cout / p.groups;
    uint co = (i / taps) % cout_g, cin = i / (taps * cout_g);
    uint g = cin / p.cin_g, ci = cin % p.cin_g;
    out[i] = w[(((g * cout_g + co) * p.cin_g + ci) * p.kh + (p.kh - 1 - ky)) * p.kw + (p.kw - 1 - kx)];
}
template [[host_name("flip_weights")]] [[kernel]] decltype(flip_weights<float>) flip_weights<float>;
template [[host_name("flip_weights_f16")]] [[kernel]] decltype(flip_weights<half>) flip_weights<half>;
template [[host_name("flip_weights_bf16")]] [[kernel]] decltype(flip_weights<bfloat>) flip_weights<bfloat>;

// The taps of a window that reach the output grid from the input pixels of one class along one
// axis: pixels i = residue + r·stride. Output o takes input i through tap k where
// o·stride = i + pad − k·dil; for a fixed residue that holds for k = first + a·step (a < count),
// at o = base + r − a·o_step, the same for every pixel of the class.
struct ClassTaps {
    uint first, step, count;  // the taps
    int base, o_step;         // their outputs
    uint size;                // pixels of the class along the axis
};

inline ClassTaps class_taps(uint residue, int stride, int dil, int pad, uint k, uint length) {
    int a = stride, b = dil;  // gcd(stride, dil)
    while (b != 0) {
        const int r = a % b;
        a = b;
        b = r;
    }
    ClassTaps c;
    c.step = uint(stride / a);
    c.o_step = dil / a;
    c.size = residue < length ? (length - residue + uint(stride) - 1) / uint(stride) : 0;
    c.first = k;  // no tap at all unless one of the first `step` works (the rest repeat them)
    for (uint t = 0; t < c.step; ++t)
        if ((int(residue) + pad - int(t) * dil) % stride == 0) {
            c.first = t;
            break;
        }
    c.count = c.first < k ? (k - c.first + c.step - 1) / c.step : 0;
    c.base = (int(residue) + pad - int(c.first) * dil) / stride;
    return c;
}

// dx = the transposed convolution of dy. The input pixels fall into stride_h·stride_w classes
// by (iy mod stride_h, ix mod stride_w), and within a class the same taps reach the output grid
// for every pixel (class_taps), so each class is a dense GEMM with no tap wasted — a 4×4,
// stride-2 window has four taps for each pixel, not sixteen of which twelve miss. GEMM per
// group g and class: rows = its Cin/groups input channels, columns = the class's pixels in all
// images, reduction = (output channel, ky index a, kx index b). A transposed convolution
// (ops/conv_transpose.py) is this product, and adds its bias (has_bias: bias[ci]) as it stores.
// Grid: (ceil(N·ceil(H/stride_h)·ceil(W/stride_w) / width_n), ceil(Cin/groups / width_m),
//        groups·stride_h·stride_w).
template <typename T>
struct InputGradOut {
    device T* dx;          // at the class's first pixel of group g's first channel in image 0
    device const T* bias;  // group g's, or null
    uint m0, n0, rows, pixels, cplane, class_w, stride_h, stride_w, w, plane, image;

    void write(uint m, uint n, float v) const {
        const uint c = m0 + m, q = n0 + n;
        if (c >= rows || q >= pixels) return;
        const uint r = q % cplane;
        dx[q / cplane * image + c * plane + r / class_w * stride_h * w + r % class_w * stride_w] =
            T(v + (bias ? float(bias[c]) : 0.0f));
    }
};

template <typename T>
inline void conv2d_input_grad_tiled(device const T* dy, device const T* w, device const T* bias, device T* dx,
                                    constant ConvParams& p, uint3 tile, uint t,
                                    threadgroup float4* a_tile, threadgroup float4* b_tile,
                                    uint width_m, uint width_n, uint threads, thread FmaTile& acc) {
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups, khw = p.kh * p.kw;
    const uint g = tile.z % p.groups, cls = tile.z / p.groups, m0 = tile.y * width_m, n0 = tile.x * width_n;
    const ClassTaps ty = class_taps(cls / uint(p.stride_w), p.stride_h, p.dil_h, p.pad_h, p.kh, p.h);
    const ClassTaps tx = class_taps(cls % uint(p.stride_w), p.stride_w, p.dil_w, p.pad_w, p.kw, p.w);
    const uint taps = ty.count * tx.count, K = cout_g * taps;
    const uint plane = p.h * p.w, cplane = ty.size * tx.size, pixels = p.n * cplane, oplane = p.oh * p.ow;
    if (n0 >= pixels) return;  // a class smaller than the largest (the whole threadgroup leaves)
    const uint a_pitch = pitch(width_m), b_pitch = pitch(width_n);

    // Weights w[co][ci][ky][kx] at the class's taps: staged along k by the first
    // TILE_K·width_m/4 threads, each at step sa.k of every slice.
    const bool a_stager = t < TILE_K * width_m / 4;
    const Stage sa = along_k(t);
    device const T* w_group = w + g * cout_g * cin_g * khw;
    uint a_co = 0, a_a = 0, a_b = 0;
    if (K > 0) advance(a_co, a_a, a_b, sa.k, ty.count, tx.count);

    // Output gradients at the taps of four input pixels, contiguous along the pixels: staged
    // along the rows, as conv2d stages its patches.
    const uint step = threads / (width_n / 4), units = TILE_K / step;
    const Stage sb = along_rows(t, width_n);
    uint dy_img[4];
    int oy0[4], ox0[4];  // the output each pixel reaches through the class's first taps; OUTSIDE past the end
    for (uint j = 0; j < 4; ++j) {
        const uint q = n0 + 4 * sb.quad + j;
        const uint img = q < pixels ? q / cplane : 0, r = q < pixels ? q % cplane : 0;
        const uint ry = r / max(tx.size, 1u), rx = r % max(tx.size, 1u);
        dy_img[j] = (img * p.cout + g * cout_g) * oplane;
        oy0[j] = q < pixels ? ty.base + int(ry) : OUTSIDE;
        ox0[j] = tx.base + int(rx);
    }
    uint co = 0, ka = 0, kb = 0;  // k = (co·ty.count + ka)·tx.count + kb
    if (K > 0) advance(co, ka, kb, sb.k, ty.count, tx.count);

    float4 a_next = 0.0f, b_next[MAX_STAGED];
    uint buf = 0;
    for (uint k0 = 0; k0 < K; k0 += TILE_K, buf ^= 1) {
        if (a_stager) {
            const bool k_ok = k0 + sa.k < K;
            const uint tap = (ty.first + a_a * ty.step) * p.kw + tx.first + a_b * tx.step;
            for (uint j = 0; j < 4; ++j) {
                const uint m = m0 + 4 * sa.quad + j;
                a_next[j] = k_ok && m < cin_g ? float(w_group[(a_co * cin_g + m) * khw + tap]) : 0.0f;
            }
            advance(a_co, a_a, a_b, TILE_K, ty.count, tx.count);
        }
        #pragma unroll
        for (uint i = 0; i < units; ++i) {
            const bool k_ok = k0 + sb.k + i * step < K;
            for (uint j = 0; j < 4; ++j) {
                const int oy = oy0[j] - int(ka) * ty.o_step, ox = ox0[j] - int(kb) * tx.o_step;
                const bool hit = k_ok && oy >= 0 && oy < int(p.oh) && ox >= 0 && ox < int(p.ow);
                b_next[i][j] = hit ? float(dy[dy_img[j] + co * oplane + uint(oy) * p.ow + uint(ox)]) : 0.0f;
            }
            advance(co, ka, kb, step, ty.count, tx.count);
        }
        if (k0 > 0) acc.multiply(a_tile + (buf ^ 1) * STAGED(width_m), b_tile + (buf ^ 1) * STAGED(width_n));
        if (a_stager) a_tile[buf * STAGED(width_m) + sa.k * a_pitch + sa.quad] = a_next;
        #pragma unroll
        for (uint i = 0; i < units; ++i) b_tile[buf * STAGED(width_n) + (sb.k + i * step) * b_pitch + sb.quad] = b_next[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (K > 0) acc.multiply(a_tile + (buf ^ 1) * STAGED(width_m), b_tile + (buf ^ 1) * STAGED(width_n));
    const uint res_y = cls / uint(p.stride_w), res_x = cls % uint(p.stride_w);
    acc.store(InputGradOut<T>{dx + g * cin_g * plane + res_y * p.w + res_x, p.has_bias ? bias + g * cin_g : nullptr, m0, n0,
                              cin_g, pixels, cplane, tx.size, uint(p.stride_h), uint(p.stride_w), p.w, plane, p.cin * plane});
}

template <typename T, uint WM, uint WN, uint THREADS>
kernel void conv2d_input_grad_tiles(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                    device const T* w [[buffer(1)]],  // extent: p.cout * (p.cin / p.groups) * p.kh * p.kw
                                    device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cin
                                    device T* dx [[buffer(3)]],  // extent: p.n * p.cin * p.h * p.w
                                    constant ConvParams& p [[buffer(4)]],
                                    uint3 tile [[threadgroup_position_in_grid]],
                                    uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WM)];
    threadgroup float4 b_tile[2 * STAGED(WN)];
    FmaTile acc(t, WM, WN);
    conv2d_input_grad_tiled(dy, w, bias, dx, p, tile, t, a_tile, b_tile, WM, WN, THREADS, acc);
}
template [[host_name("conv2d_input_grad")]] [[kernel]] decltype(conv2d_input_grad_tiles<float, WIDE, WIDE, WIDE_THREADS>) conv2d_input_grad_tiles<float, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_input_grad_f16")]] [[kernel]] decltype(conv2d_input_grad_tiles<half, WIDE, WIDE, WIDE_THREADS>) conv2d_input_grad_tiles<half, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_input_grad_bf16")]] [[kernel]] decltype(conv2d_input_grad_tiles<bfloat, WIDE, WIDE, WIDE_THREADS>) conv2d_input_grad_tiles<bfloat, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_input_grad_medium")]] [[kernel]] decltype(conv2d_input_grad_tiles<float, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_input_grad_tiles<float, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_input_grad_medium_f16")]] [[kernel]] decltype(conv2d_input_grad_tiles<half, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_input_grad_tiles<half, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_input_grad_medium_bf16")]] [[kernel]] decltype(conv2d_input_grad_tiles<bfloat, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_input_grad_tiles<bfloat, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_input_grad_narrow")]] [[kernel]] decltype(conv2d_input_grad_tiles<float, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_input_grad_tiles<float, NARROW_M, NARROW_N, NARROW_THREADS>;
template [[host_name("conv2d_input_grad_narrow_f16")]] [[kernel]] decltype(conv2d_input_grad_tiles<half, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_input_grad_tiles<half, NARROW_M, NARROW_N, NARROW_THREADS>;
template [[host_name("conv2d_input_grad_narrow_bf16")]] [[kernel]] decltype(conv2d_input_grad_tiles<bfloat, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_input_grad_tiles<bfloat, NARROW_M, NARROW_N, NARROW_THREADS>;

// dx on simdgroup matrices (tile.h's MMA staging): the class GEMMs of conv2d_input_grad_tiled.
// Every weight a thread stages a slice has the same k = (co, a, b), and a slice's k is the same
// for every thread's output gradients: each walks its taps once.
// Grid: (ceil(N·ceil(H/stride_h)·ceil(W/stride_w) / BN), ceil(Cin/groups / BM), groups·stride_h·stride_w).
template <typename T, uint BM, uint BN>
kernel void conv2d_input_grad_mma_tiles(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                        device const T* w [[buffer(1)]],  // extent: p.cout * (p.cin / p.groups) * p.kh * p.kw
                                        device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cin
                                        device T* dx [[buffer(3)]],  // extent: p.n * p.cin * p.h * p.w
                                        constant ConvParams& p [[buffer(4)]],
                                        uint3 tile [[threadgroup_position_in_grid]],
                                        uint t [[thread_index_in_threadgroup]]) {
    using S = T;  // staged as stored
    threadgroup float4 staged[MMA_STAGED_QUADS(BM, BN, S)];
    threadgroup S* a_s = (threadgroup S*)staged;  // [input channel][k]
    threadgroup S* b_s = a_s + BM * MMA_PITCH;  // [class pixel][k]
    constexpr uint A_EACH = MMA_A_EACH(BM), B_COLS = MMA_B_COLS(BN);
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups, khw = p.kh * p.kw;
    const uint g = tile.z % p.groups, cls = tile.z / p.groups, m0 = tile.y * BM, n0 = tile.x * BN;
    const ClassTaps ty = class_taps(cls / uint(p.stride_w), p.stride_h, p.dil_h, p.pad_h, p.kh, p.h);
    const ClassTaps tx = class_taps(cls % uint(p.stride_w), p.stride_w, p.dil_w, p.pad_w, p.kw, p.w);
    const uint K = cout_g * ty.count * tx.count;
    const uint plane = p.h * p.w, cplane = ty.size * tx.size, pixels = p.n * cplane, oplane = p.oh * p.ow;
    if (n0 >= pixels) return;  // a class smaller than the largest (the whole threadgroup leaves)

    // A: weights w[co][ci][ky][kx] of input channels m0 + t / MMA_K + (MMA_THREADS / MMA_K)·i
    // at this thread's k = (co·ty.count + a)·tx.count + b of each slice.
    device const T* w_rows = w + (g * cout_g * cin_g + m0 + t / MMA_K) * khw;
    const uint a_rows = cin_g - min(cin_g, m0 + t / MMA_K);
    uint a_co = 0, a_a = 0, a_b = 0;
    if (K > 0) advance(a_co, a_a, a_b, t % MMA_K, ty.count, tx.count);
    uint dy_img[B_COLS];
    int oy0[B_COLS], ox0[B_COLS];  // the output each pixel reaches through the class's first taps; OUTSIDE past the end
    for (uint i = 0; i < B_COLS; ++i) {
        const uint q = n0 + t + MMA_THREADS * i;
        const uint img = q < pixels ? q / cplane : 0, r = q < pixels ? q % cplane : 0;
        dy_img[i] = (img * p.cout + g * cout_g) * oplane;
        oy0[i] = q < pixels ? ty.base + int(r / tx.size) : OUTSIDE;
        ox0[i] = tx.base + int(r % tx.size);
    }
    uint co = 0, ka = 0, kb = 0;  // the slice's first k

    MMA_TILES(BM, BN, S) acc(t);
    S a_next[A_EACH], b_next[B_COLS][MMA_K];
    for (uint k0 = 0; k0 < K; k0 += MMA_K) {
        const bool a_k_ok = k0 + t % MMA_K < K;
        const uint tap = a_co * cin_g * khw + (ty.first + a_a * ty.step) * p.kw + tx.first + a_b * tx.step;
        for (uint i = 0; i < A_EACH; ++i)
            a_next[i] = a_k_ok && (MMA_THREADS / MMA_K) * i < a_rows ? S(w_rows[(MMA_THREADS / MMA_K) * i * khw + tap]) : S(0.0f);
        advance(a_co, a_a, a_b, MMA_K, ty.count, tx.count);
        #pragma unroll
        for (uint j = 0; j < MMA_K; ++j) {
            const bool k_ok = k0 + j < K;
            for (uint i = 0; i < B_COLS; ++i) {
                const int oy = oy0[i] - int(ka) * ty.o_step, ox = ox0[i] - int(kb) * tx.o_step;
                const bool hit = k_ok && oy >= 0 && oy < int(p.oh) && ox >= 0 && ox < int(p.ow);
                b_next[i][j] = hit ? S(dy[dy_img[i] + co * oplane + uint(oy) * p.ow + uint(ox)]) : S(0.0f);
            }
            advance(co, ka, kb, 1, ty.count, tx.count);
        }
        if (k0 > 0) acc.multiply(a_s, b_s);
        stage_slice(a_s, b_s, a_next, b_next, t);
    }
    if (K > 0) acc.multiply(a_s, b_s);
    const uint res_y = cls / uint(p.stride_w), res_x = cls % uint(p.stride_w);
    acc.store(InputGradOut<T>{dx + g * cin_g * plane + res_y * p.w + res_x, p.has_bias ? bias + g * cin_g : nullptr, m0, n0,
                              cin_g, pixels, cplane, tx.size, uint(p.stride_h), uint(p.stride_w), p.w, plane, p.cin * plane}, (threadgroup float*)staged);
}
template [[host_name("conv2d_input_grad_mma")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<float, WIDE, WIDE>) conv2d_input_grad_mma_tiles<float, WIDE, WIDE>;
template [[host_name("conv2d_input_grad_mma_f16")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<half, WIDE, WIDE>) conv2d_input_grad_mma_tiles<half, WIDE, WIDE>;
template [[host_name("conv2d_input_grad_mma_bf16")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<bfloat, WIDE, WIDE>) conv2d_input_grad_mma_tiles<bfloat, WIDE, WIDE>;
template [[host_name("conv2d_input_grad_medium_mma")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<float, MEDIUM_M, MEDIUM_N>) conv2d_input_grad_mma_tiles<float, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_input_grad_medium_mma_f16")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<half, MEDIUM_M, MEDIUM_N>) conv2d_input_grad_mma_tiles<half, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_input_grad_medium_mma_bf16")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<bfloat, MEDIUM_M, MEDIUM_N>) conv2d_input_grad_mma_tiles<bfloat, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_input_grad_narrow_mma")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<float, NARROW_M, NARROW_N>) conv2d_input_grad_mma_tiles<float, NARROW_M, NARROW_N>;
template [[host_name("conv2d_input_grad_narrow_mma_f16")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<half, NARROW_M, NARROW_N>) conv2d_input_grad_mma_tiles<half, NARROW_M, NARROW_N>;
template [[host_name("conv2d_input_grad_narrow_mma_bf16")]] [[kernel]] decltype(conv2d_input_grad_mma_tiles<bfloat, NARROW_M, NARROW_N>) conv2d_input_grad_mma_tiles<bfloat, NARROW_M, NARROW_N>;

// dw = dy · patchesᵀ. GEMM per group g: rows = its Cout/groups output channels, columns =
// (input channel, ky, kx), reduction = output pixels. The reduction is long (N·OH·OW) and the
// output small, so it is split: threadgroup z sums pixels [split·chunk, (split+1)·chunk) into
// slice `split` of `partial` (Cout × Cin/groups·KH·KW floats per slice), and `sum_splits`
// adds the slices (and rounds them to dw's storage type). With one split of a float32 dw,
// `partial` is dw itself.
// Grid: (ceil(Cin/groups·KH·KW / width_n), ceil(Cout/groups / width_m), groups · splits).
struct WeightGradOut {
    device float* out;  // at group g's first row
    uint m0, n0, rows, cols;

    void write(uint m, uint n, float v) const {
        const uint r = m0 + m, c = n0 + n;
        if (r < rows && c < cols) out[r * cols + c] = v;
    }
};

template <typename T>
inline void conv2d_weight_grad_tiled(device const T* dy, device const T* x, device float* partial,
                                     constant ConvParams& p, uint3 tile, uint t,
                                     threadgroup float4* a_tile, threadgroup float4* b_tile,
                                     uint width_m, uint width_n, uint threads, thread FmaTile& acc) {
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    const uint khw = p.kh * p.kw, cols = cin_g * khw, oplane = p.oh * p.ow, pixels = p.n * oplane;
    const uint g = tile.z % p.groups, split = tile.z / p.groups;
    const uint m0 = tile.y * width_m, n0 = tile.x * width_n;
    const uint k_begin = split * p.chunk, k_end = min(pixels, k_begin + p.chunk);
    const uint a_pitch = pitch(width_m), b_pitch = pitch(width_n);

    // Both operands are contiguous along the pixels they sum over. Output gradients are staged
    // along k by the first TILE_K·width_m/4 threads, at pixel step sa.k of every slice.
    const bool a_stager = t < TILE_K * width_m / 4;
    const Stage sa = along_k(t);
    const uint co0 = m0 + 4 * sa.quad, dy_row = (g * cout_g + co0) * oplane;
    uint a_img = (k_begin + sa.k) / oplane, a_oy = (k_begin + sa.k) % oplane / p.ow, a_ox = (k_begin + sa.k) % p.ow;

    // The patches too in the wide tiling (a warp then reads 8-pixel runs); in the others
    // there are more columns than threads, so each thread stages the same four columns at
    // every slice, at `units` pixels `step` apart. A column past the end gets a window origin
    // far above the image: all its taps are padding.
    const bool b_along_k = TILE_K * width_n / 4 == threads;
    const Stage sb = b_along_k ? along_k(t) : along_rows(t, width_n);
    const uint step = b_along_k ? TILE_K : threads / (width_n / 4), units = TILE_K / step;
    uint x_row[4];
    int dy0[4], dx0[4];  // ky·dil − pad of each column (likewise kx)
    for (uint j = 0; j < 4; ++j) {
        const uint c = n0 + 4 * sb.quad + j;
        const uint ci = c < cols ? c / khw : 0, ky = c < cols ? c % khw / p.kw : 0, kx = c < cols ? c % p.kw : 0;
        x_row[j] = (g * cin_g + ci) * p.h * p.w;
        dy0[j] = c < cols ? int(ky) * p.dil_h - p.pad_h : OUTSIDE;
        dx0[j] = int(kx) * p.dil_w - p.pad_w;
    }
    uint img = (k_begin + sb.k) / oplane, oy = (k_begin + sb.k) % oplane / p.ow, ox = (k_begin + sb.k) % p.ow;

    float4 a_next = 0.0f, b_next[MAX_STAGED];
    uint buf = 0;
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K, buf ^= 1) {
        if (a_stager) {
            const bool k_ok = k0 + sa.k < k_end;
            device const T* dy_img = dy + a_img * p.cout * oplane + a_oy * p.ow + a_ox;
            for (uint j = 0; j < 4; ++j) a_next[j] = k_ok && co0 + j < cout_g ? float(dy_img[dy_row + j * oplane]) : 0.0f;
            advance(a_img, a_oy, a_ox, TILE_K, p.oh, p.ow);
        }
        #pragma unroll
        for (uint i = 0; i < units; ++i) {
            const bool k_ok = k0 + sb.k + i * step < k_end;
            device const T* x_img = x + img * p.cin * p.h * p.w;
            const int iy = int(oy) * p.stride_h, ix = int(ox) * p.stride_w;
            for (uint j = 0; j < 4; ++j) {
                const int tap_y = iy + dy0[j], tap_x = ix + dx0[j];
                const bool inside = tap_y >= 0 && tap_y < int(p.h) && tap_x >= 0 && tap_x < int(p.w);
                b_next[i][j] = k_ok && inside ? float(x_img[x_row[j] + uint(tap_y) * p.w + uint(tap_x)]) : 0.0f;
            }
            advance(img, oy, ox, step, p.oh, p.ow);
        }
        if (k0 > k_begin) acc.multiply(a_tile + (buf ^ 1) * STAGED(width_m), b_tile + (buf ^ 1) * STAGED(width_n));
        if (a_stager) a_tile[buf * STAGED(width_m) + sa.k * a_pitch + sa.quad] = a_next;
        #pragma unroll
        for (uint i = 0; i < units; ++i) b_tile[buf * STAGED(width_n) + (sb.k + i * step) * b_pitch + sb.quad] = b_next[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    acc.multiply(a_tile + (buf ^ 1) * STAGED(width_m), b_tile + (buf ^ 1) * STAGED(width_n));
    acc.store(WeightGradOut{partial + (split * p.cout + g * cout_g) * cols, m0, n0, cout_g, cols});
}

template <typename T, uint WM, uint WN, uint THREADS>
kernel void conv2d_weight_grad_tiles(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                     device const T* x [[buffer(1)]],  // extent: p.n * p.cin * p.h * p.w
                                     device float* partial [[buffer(2)]],  // extent: (p.n * p.oh * p.ow + p.chunk - 1) / p.chunk * p.cout * (p.cin / p.groups) * p.kh * p.kw
                                     constant ConvParams& p [[buffer(3)]],
                                     uint3 tile [[threadgroup_position_in_grid]],
                                     uint t [[thread_index_in_threadgroup]]) {
    threadgroup float4 a_tile[2 * STAGED(WM)];
    threadgroup float4 b_tile[2 * STAGED(WN)];
    FmaTile acc(t, WM, WN);
    conv2d_weight_grad_tiled(dy, x, partial, p, tile, t, a_tile, b_tile, WM, WN, THREADS, acc);
}
template [[host_name("conv2d_weight_grad")]] [[kernel]] decltype(conv2d_weight_grad_tiles<float, WIDE, WIDE, WIDE_THREADS>) conv2d_weight_grad_tiles<float, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_weight_grad_f16")]] [[kernel]] decltype(conv2d_weight_grad_tiles<half, WIDE, WIDE, WIDE_THREADS>) conv2d_weight_grad_tiles<half, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_weight_grad_bf16")]] [[kernel]] decltype(conv2d_weight_grad_tiles<bfloat, WIDE, WIDE, WIDE_THREADS>) conv2d_weight_grad_tiles<bfloat, WIDE, WIDE, WIDE_THREADS>;
template [[host_name("conv2d_weight_grad_medium")]] [[kernel]] decltype(conv2d_weight_grad_tiles<float, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_weight_grad_tiles<float, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_weight_grad_medium_f16")]] [[kernel]] decltype(conv2d_weight_grad_tiles<half, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_weight_grad_tiles<half, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_weight_grad_medium_bf16")]] [[kernel]] decltype(conv2d_weight_grad_tiles<bfloat, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>) conv2d_weight_grad_tiles<bfloat, MEDIUM_M, MEDIUM_N, MEDIUM_THREADS>;
template [[host_name("conv2d_weight_grad_narrow")]] [[kernel]] decltype(conv2d_weight_grad_tiles<float, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_weight_grad_tiles<float, NARROW_M, NARROW_N, NARROW_THREADS>;
template [[host_name("conv2d_weight_grad_narrow_f16")]] [[kernel]] decltype(conv2d_weight_grad_tiles<half, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_weight_grad_tiles<half, NARROW_M, NARROW_N, NARROW_THREADS>;
template [[host_name("conv2d_weight_grad_narrow_bf16")]] [[kernel]] decltype(conv2d_weight_grad_tiles<bfloat, NARROW_M, NARROW_N, NARROW_THREADS>) conv2d_weight_grad_tiles<bfloat, NARROW_M, NARROW_N, NARROW_THREADS>;

// dw on simdgroup matrices (tile.h's MMA staging), split as conv2d_weight_grad_tiled splits.
// Every output gradient a thread stages a slice is at the same pixel, and a slice's pixels are
// the same for every thread's input columns: each walks its pixels once.
// Grid: (ceil(Cin/groups·KH·KW / BN), ceil(Cout/groups / BM), groups · splits), MMA_THREADS threads.
template <typename T, uint BM, uint BN>
kernel void conv2d_weight_grad_mma_tiles(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                         device const T* x [[buffer(1)]],  // extent: p.n * p.cin * p.h * p.w
                                         device float* partial [[buffer(2)]],  // extent: (p.n * p.oh * p.ow + p.chunk - 1) / p.chunk * p.cout * (p.cin / p.groups) * p.kh * p.kw
                                         constant ConvParams& p [[buffer(3)]],
                                         uint3 tile [[threadgroup_position_in_grid]],
                                         uint t [[thread_index_in_threadgroup]]) {
    using S = T;  // staged as stored
    threadgroup float4 staged[MMA_STAGED_QUADS(BM, BN, S)];
    threadgroup S* a_s = (threadgroup S*)staged;  // [output channel][pixel]
    threadgroup S* b_s = a_s + BM * MMA_PITCH;  // [column][pixel]
    constexpr uint A_EACH = MMA_A_EACH(BM), B_COLS = MMA_B_COLS(BN);
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    const uint khw = p.kh * p.kw, cols = cin_g * khw, oplane = p.oh * p.ow, pixels = p.n * oplane;
    const uint g = tile.z % p.groups, split = tile.z / p.groups, m0 = tile.y * BM, n0 = tile.x * BN;
    const uint k_begin = split * p.chunk, k_end = min(pixels, k_begin + p.chunk);

    // A: output gradients of channels m0 + t / MMA_K + (MMA_THREADS / MMA_K)·i at this thread's
    // pixel k0 + t % MMA_K of each slice, (a_img, a_pix).
    device const T* dy_rows = dy + (g * cout_g + m0 + t / MMA_K) * oplane;
    const uint a_rows = cout_g - min(cout_g, m0 + t / MMA_K);
    uint a_img = (k_begin + t % MMA_K) / oplane, a_pix = (k_begin + t % MMA_K) % oplane;
    uint x_row[B_COLS];
    int dy0[B_COLS], dx0[B_COLS];  // ky·dil − pad of each column (likewise kx); a column past the end misses the image
    for (uint i = 0; i < B_COLS; ++i) {
        const uint c = n0 + t + MMA_THREADS * i;
        const uint ci = c < cols ? c / khw : 0, ky = c < cols ? c % khw / p.kw : 0, kx = c < cols ? c % p.kw : 0;
        x_row[i] = (g * cin_g + ci) * p.h * p.w;
        dy0[i] = c < cols ? int(ky) * p.dil_h - p.pad_h : OUTSIDE;
        dx0[i] = int(kx) * p.dil_w - p.pad_w;
    }
    uint img = k_begin / oplane, oy = k_begin % oplane / p.ow, ox = k_begin % p.ow;  // the slice's first pixel

    MMA_TILES(BM, BN, S) acc(t);
    S a_next[A_EACH], b_next[B_COLS][MMA_K];
    for (uint k0 = k_begin; k0 < k_end; k0 += MMA_K) {
        const bool a_k_ok = k0 + t % MMA_K < k_end;
        device const T* dy_at = dy_rows + a_img * p.cout * oplane + a_pix;
        for (uint i = 0; i < A_EACH; ++i)
            a_next[i] = a_k_ok && (MMA_THREADS / MMA_K) * i < a_rows ? S(dy_at[(MMA_THREADS / MMA_K) * i * oplane]) : S(0.0f);
        a_pix += MMA_K;
        while (a_pix >= oplane) { a_pix -= oplane; ++a_img; }
        #pragma unroll
        for (uint j = 0; j < MMA_K; ++j) {
            const bool k_ok = k0 + j < k_end;
            device const T* x_img = x + img * p.cin * p.h * p.w;
            const int iy = int(oy) * p.stride_h, ix = int(ox) * p.stride_w;
            for (uint i = 0; i < B_COLS; ++i) {
                const int tap_y = iy + dy0[i], tap_x = ix + dx0[i];
                const bool inside = tap_y >= 0 && tap_y < int(p.h) && tap_x >= 0 && tap_x < int(p.w);
                b_next[i][j] = k_ok && inside ? S(x_img[x_row[i] + uint(tap_y) * p.w + uint(tap_x)]) : S(0.0f);
            }
            advance(img, oy, ox, 1, p.oh, p.ow);
        }
        if (k0 > k_begin) acc.multiply(a_s, b_s);
        stage_slice(a_s, b_s, a_next, b_next, t);
    }
    if (k_end > k_begin) acc.multiply(a_s, b_s);
    acc.store(WeightGradOut{partial + (split * p.cout + g * cout_g) * cols, m0, n0, cout_g, cols}, (threadgroup float*)staged);
}
template [[host_name("conv2d_weight_grad_mma")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<float, WIDE, WIDE>) conv2d_weight_grad_mma_tiles<float, WIDE, WIDE>;
template [[host_name("conv2d_weight_grad_mma_f16")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<half, WIDE, WIDE>) conv2d_weight_grad_mma_tiles<half, WIDE, WIDE>;
template [[host_name("conv2d_weight_grad_mma_bf16")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<bfloat, WIDE, WIDE>) conv2d_weight_grad_mma_tiles<bfloat, WIDE, WIDE>;
template [[host_name("conv2d_weight_grad_medium_mma")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<float, MEDIUM_M, MEDIUM_N>) conv2d_weight_grad_mma_tiles<float, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_weight_grad_medium_mma_f16")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<half, MEDIUM_M, MEDIUM_N>) conv2d_weight_grad_mma_tiles<half, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_weight_grad_medium_mma_bf16")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<bfloat, MEDIUM_M, MEDIUM_N>) conv2d_weight_grad_mma_tiles<bfloat, MEDIUM_M, MEDIUM_N>;
template [[host_name("conv2d_weight_grad_narrow_mma")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<float, NARROW_M, NARROW_N>) conv2d_weight_grad_mma_tiles<float, NARROW_M, NARROW_N>;
template [[host_name("conv2d_weight_grad_narrow_mma_f16")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<half, NARROW_M, NARROW_N>) conv2d_weight_grad_mma_tiles<half, NARROW_M, NARROW_N>;
template [[host_name("conv2d_weight_grad_narrow_mma_bf16")]] [[kernel]] decltype(conv2d_weight_grad_mma_tiles<bfloat, NARROW_M, NARROW_N>) conv2d_weight_grad_mma_tiles<bfloat, NARROW_M, NARROW_N>;

// dw of a 3×3, stride-1, undilated, ungrouped convolution, directly rather than as a GEMM.
// The GEMM of conv2d_weight_grad stages every (input channel, ky, kx) column of the patches
// separately — nine gathers of each input value — and, at 16 channels, fills only 144 of the
// narrow tile's 256 columns. Here a threadgroup stages a tile of pixels once: the output
// gradient of WG_CO output channels over WG_ROWS × WG_COLS pixels, and the input of WG_CI
// channels over the (WG_ROWS + 2) × (WG_COLS + 2) pixels those windows reach. Warp r takes
// pixel row r of the tile; its lane (h, ci) owns output channels 8h … 8h + 7 of input channel
// ci, all nine taps: 72 sums. Walking along the row it keeps the 3×3 window of input in
// registers, so each pixel costs 3 new input values and 8 output gradients (the two halves of
// the warp read the same input values: a broadcast) for 72 multiply-adds.
// The next tile's loads are in flight while the current one is multiplied. At the end the
// eight warps' sums for the same weights are added through threadgroup memory in four rounds.
// Threadgroup z sums tiles [z·chunk, (z+1)·chunk) of all images into slice z of `partial`,
// as conv2d_weight_grad does, and `sum_splits` adds the slices.
// Grid: (ceil(Cin / WG_CI), ceil(Cout / WG_CO), splits), threads: WG_THREADS.
#define WG_ROWS 8                               // pixel rows a tile: one a warp
#define WG_COLS 16                              // pixel columns a tile
#define WG_CO 16                                // output channels a threadgroup: two halves of 8
#define WG_CI 16                                // input channels a threadgroup: one a lane of a half
#define WG_THREADS (32 * WG_ROWS)
#define WG_SPAN (WG_COLS + 2)                   // input columns a tile reaches
#define WG_X_TILE ((WG_ROWS + 2) * WG_SPAN)     // input floats a channel's windows reach
// Floats an output / input channel takes in threadgroup memory: odd, so that the two halves
// of a warp, and its 16 lanes' input channels, read from different banks.
#define WG_DY_PITCH (WG_ROWS * WG_COLS + 1)
#define WG_X_PITCH (WG_X_TILE + 1)
#define WG_DY_STAGED (WG_CO * WG_ROWS * WG_COLS / WG_THREADS)
#define WG_X_STAGED ((WG_CI * WG_X_TILE + WG_THREADS - 1) / WG_THREADS)
#define WG_ROUND 18                             // sums a lane hands over a reduction round
// (WG_ROWS · WG_ROUND · 32 floats of the staging memory, which has room for them)
#define WG_STAGE_FLOATS (WG_CO * WG_DY_PITCH + WG_CI * WG_X_PITCH)

struct WeightGrad3x3Params {
    uint n, cin, h, w;      // input images
    uint cout, oh, ow;      // output gradient images
    int pad_h, pad_w;
    uint tiles_x, tiles_y;  // tiles of WG_ROWS × WG_COLS pixels an image
    uint chunk;             // tiles each split sums
};

// Thread t's share of tile `tile` (a flat index over images and their tiles): output
// gradients into dy_part, input (zero outside the image) into x_part.
template <typename T>
inline void load_tile_3x3(device const T* dy, device const T* x, constant WeightGrad3x3Params& p,
                          uint tile, uint ci0, uint co0, uint t, thread float* dy_part, thread float* x_part) {
    const uint tiles_image = p.tiles_x * p.tiles_y, img = tile / tiles_image, r = tile % tiles_image;
    const int oy0 = int(r / p.tiles_x * WG_ROWS), ox0 = int(r % p.tiles_x * WG_COLS);
    for (uint i = 0; i < WG_DY_STAGED; ++i) {
        const uint e = t + i * WG_THREADS, co = co0 + e / (WG_ROWS * WG_COLS);
        const int oy = oy0 + int(e / WG_COLS % WG_ROWS), ox = ox0 + int(e % WG_COLS);
        dy_part[i] = co < p.cout && oy < int(p.oh) && ox < int(p.ow)
                         ? float(dy[((img * p.cout + co) * p.oh + uint(oy)) * p.ow + uint(ox)]) : 0.0f;
    }
    for (uint i = 0; i < WG_X_STAGED; ++i) {
        const uint e = t + i * WG_THREADS, c = ci0 + e / WG_X_TILE;
        const int iy = oy0 - p.pad_h + int(e / WG_SPAN % (WG_ROWS + 2)), ix = ox0 - p.pad_w + int(e % WG_SPAN);
        const bool inside = iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);
        x_part[i] = e < WG_CI * WG_X_TILE && c < p.cin && inside ? float(x[((img * p.cin + c) * p.h + uint(iy)) * p.w + uint(ix)]) : 0.0f;
    }
}

template <typename T>
kernel void conv2d_weight_grad_3x3(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                   device const T* x [[buffer(1)]],  // extent: p.n * p.cin * p.h * p.w
                                   device float* partial [[buffer(2)]],  // extent: (p.n * p.tiles_x * p.tiles_y + p.chunk - 1) / p.chunk * p.cout * p.cin * 9
                                   constant WeightGrad3x3Params& p [[buffer(3)]],
                                   uint3 group [[threadgroup_position_in_grid]],
                                   uint t [[thread_index_in_threadgroup]]) {
    threadgroup float stage[WG_STAGE_FLOATS];
    threadgroup float* dys = stage;                       // [WG_CO][WG_DY_PITCH]
    threadgroup float* xs = stage + WG_CO * WG_DY_PITCH;  // [WG_CI][WG_X_PITCH]
    const uint ci0 = group.x * WG_CI, co0 = group.y * WG_CO, split = group.z;
    const uint first = split * p.chunk, last = min(p.n * p.tiles_x * p.tiles_y, first + p.chunk);
    const uint row = t / 32, lane = t % 32, upper = lane / 16, ci = lane % 16;

    float acc[8][9];
    for (uint j = 0; j < 8; ++j)
        for (uint k = 0; k < 9; ++k) acc[j][k] = 0.0f;
    float dy_next[WG_DY_STAGED], x_next[WG_X_STAGED];
    if (first < last) load_tile_3x3(dy, x, p, first, ci0, co0, t, dy_next, x_next);
    for (uint tile = first; tile < last; ++tile) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile's reads are done
        for (uint i = 0; i < WG_DY_STAGED; ++i) {
            const uint e = t + i * WG_THREADS;
            dys[e / (WG_ROWS * WG_COLS) * WG_DY_PITCH + e % (WG_ROWS * WG_COLS)] = dy_next[i];
        }
        for (uint i = 0; i < WG_X_STAGED; ++i) {
            const uint e = t + i * WG_THREADS;
            if (e < WG_CI * WG_X_TILE) xs[e / WG_X_TILE * WG_X_PITCH + e % WG_X_TILE] = x_next[i];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        // The next tile's loads are in flight during this one's products.
        if (tile + 1 < last) load_tile_3x3(dy, x, p, tile + 1, ci0, co0, t, dy_next, x_next);
        threadgroup const float* g_row = dys + upper * 8 * WG_DY_PITCH + row * WG_COLS;
        threadgroup const float* x_row = xs + ci * WG_X_PITCH + row * WG_SPAN;
        float win[3][3];
        for (uint ky = 0; ky < 3; ++ky) {
            win[ky][0] = x_row[ky * WG_SPAN];
            win[ky][1] = x_row[ky * WG_SPAN + 1];
        }
        #pragma unroll
        for (uint ox = 0; ox < WG_COLS; ++ox) {
            for (uint ky = 0; ky < 3; ++ky) win[ky][2] = x_row[ky * WG_SPAN + ox + 2];
            for (uint j = 0; j < 8; ++j) {
                const float g = g_row[j * WG_DY_PITCH + ox];
                for (uint ky = 0; ky < 3; ++ky)
                    for (uint kx = 0; kx < 3; ++kx) acc[j][ky * 3 + kx] = fma(g, win[ky][kx], acc[j][ky * 3 + kx]);
            }
            for (uint ky = 0; ky < 3; ++ky) {
                win[ky][0] = win[ky][1];
                win[ky][1] = win[ky][2];
            }
        }
    }

    // The warps' sums for the same weights, added in rounds of WG_ROUND a lane.
    device float* out = partial + split * p.cout * p.cin * 9;
    threadgroup float* sums = stage;  // [warp][WG_ROUND][32]
    #pragma unroll
    for (uint round = 0; round < 72 / WG_ROUND; ++round) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        #pragma unroll
        for (uint v = 0; v < WG_ROUND; ++v) {
            const uint s = round * WG_ROUND + v;
            sums[(row * WG_ROUND + v) * 32 + lane] = acc[s / 9][s % 9];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint o = t; o < WG_ROUND * 32; o += WG_THREADS) {
            float s = 0.0f;
            for (uint r = 0; r < WG_ROWS; ++r) s += sums[r * WG_ROUND * 32 + o];
            const uint v = round * WG_ROUND + o / 32, l = o % 32;
            const uint co = co0 + l / 16 * 8 + v / 9, c = ci0 + l % 16;
            if (co < p.cout && c < p.cin) out[(co * p.cin + c) * 9 + v % 9] = s;
        }
    }
}
template [[host_name("conv2d_weight_grad_3x3")]] [[kernel]] decltype(conv2d_weight_grad_3x3<float>) conv2d_weight_grad_3x3<float>;
template [[host_name("conv2d_weight_grad_3x3_f16")]] [[kernel]] decltype(conv2d_weight_grad_3x3<half>) conv2d_weight_grad_3x3<half>;
template [[host_name("conv2d_weight_grad_3x3_bf16")]] [[kernel]] decltype(conv2d_weight_grad_3x3<bfloat>) conv2d_weight_grad_3x3<bfloat>;

// dw of a 3×3, stride-1, undilated, ungrouped convolution on simdgroup matrices, directly: a
// threadgroup sums, over its share of the images' C3_ROWS × C3_COLS pixel tiles, the output
// gradients of D3_CO channels times the nine shifted views of D3_CI input channels, staged once
// with their halo as conv2d_3x3_mma stages them. For each tap an 8 × 8 block of the product is
// 8 output channels' gradients at 8 pixels of a row times the input at those pixels shifted by
// the tap. Four simdgroups of 16 output × 8 input channels, all nine taps each (18 matrices), the
// next tile's loads in flight while this one is multiplied. Each thread loads fixed runs of four
// values of a row (load_run): a vector load each where rows are four-aligned and padded by one,
// which took the tile loop from about 2,100 SASS instructions to 1,060 (a division and a bounds
// test a value before). The values are staged through staged_operand (tile.h): under `high` that
// took the loop from about 1,790 instructions to 1,330 (NVRTC 13, sm_90), the TF32 rounding of
// every loaded element gone from it; under `highest` the input is staged split (stage_split), which
// took the kernel from 3,176 SASS instructions to 2,680 for its 216 tensor-core ones (the input is
// nine of a product's ten loads). Threadgroup z sums tiles [z·chunk, (z+1)·chunk) into slice z of
// `partial`, which sum_splits adds.
// Grid: (ceil(Cin / D3_CI), ceil(Cout / D3_CO), splits), MMA_THREADS threads.
#define D3_CO 32
#define D3_CI 16
#define D3_PX (C3_ROWS * C3_COLS)                                          // pixels a tile
#define D3_DY_PITCH (D3_PX + 8)                                            // 136: a lane pair's rows on distinct banks
#define D3_X_PITCH (C3_X_PITCH + 4)                                        // 184: likewise down the input channels
#define D3_DY_RUNS (D3_CO * D3_PX / 4 / MMA_THREADS)                       // 8: runs of four gradients a thread stages
#define D3_X_RUNS (D3_CI * (C3_ROWS + 2) * C3_COLS / 4 / MMA_THREADS)      // 5: runs of four inputs (the halo's inside)
#define D3_X_EDGES ((D3_CI * (C3_ROWS + 2) * 2 + MMA_THREADS - 1) / MMA_THREADS)  // 3: the halo's edge columns

// Four values of `row` from column `col` on, zeros outside [0, width): one vector load where the
// caller knows the run is inside and aligned (`whole`).
template <typename T>
inline vec<T, 4> load_run(device const T* row, int col, int width, bool whole) {
    if (whole) return *(device const vec<T, 4>*)(row + col);
    vec<T, 4> v = vec<T, 4>(T(0.0f));
    for (int j = 0; j < 4; ++j)
        if (col + j >= 0 && col + j < width) v[j] = row[col + j];
    return v;
}

template <typename T>
kernel void conv2d_weight_grad_3x3_mma(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                       device const T* x [[buffer(1)]],  // extent: p.n * p.cin * p.h * p.w
                                       device float* partial [[buffer(2)]],  // extent: (p.n * p.tiles_x * p.tiles_y + p.chunk - 1) / p.chunk * p.cout * p.cin * 9
                                       constant WeightGrad3x3Params& p [[buffer(3)]],
                                       uint3 group [[threadgroup_position_in_grid]],
                                       uint t [[thread_index_in_threadgroup]]) {
    // Staged as stored: [output channel][pixel of the tile] gradients, then [input channel][row][column]
    // inputs with the halo (split: high parts, then rests); the first 2 KB are also the float scratch
    // of the results.
    threadgroup float4 staged[(D3_CO * D3_DY_PITCH + SPLIT_PLANES(T) * D3_CI * D3_X_PITCH) * sizeof(T) / 16];
    threadgroup T* dy_s = (threadgroup T*)staged;
    threadgroup T* x_s = dy_s + D3_CO * D3_DY_PITCH;
    constexpr uint x_plane = D3_CI * D3_X_PITCH;  // the input's second plane, where staged split
    const uint ci0 = group.x * D3_CI, co0 = group.y * D3_CO, split = group.z;
    const uint tiles_image = p.tiles_x * p.tiles_y;
    const uint first = split * p.chunk, last = min(p.n * tiles_image, first + p.chunk);
    const uint simdgroup = t / 32, lane = t % 32, co_w = simdgroup / 2 * 16, ci_w = simdgroup % 2 * 8;
    const uint plane = p.oh * p.ow, in_plane = p.h * p.w;
    // Rows of four-aligned width with one column of padding: every run of four starts a vector
    // (the tile's columns start at multiples of 16, the input's columns line up with the output's).
    const bool aligned = p.pad_w == 1 && p.w % 4 == 0 && p.ow % 4 == 0;
    // Thread t stages the gradients of pixels 4(t % 32) … +3 of output channels t / 32 + 4i, the
    // inside of the halo's rows t / 4 + 32i (input channel, row) from column 4(t % 4) + 1, and the edge
    // column t % 2 (left, right) of rows t / 2 + 64i.
    const uint run_px = 4 * (t % 32), run_col = 4 * (t % 4);

    simdgroup_float8x8 acc[9][2];
    #pragma unroll
    for (uint tap = 0; tap < 9; ++tap)
        #pragma unroll
        for (uint i = 0; i < 2; ++i) acc[tap][i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    vec<T, 4> dy_next[D3_DY_RUNS], x_next[D3_X_RUNS];
    T edge_next[D3_X_EDGES];
    for (uint tile = first; tile <= last; ++tile) {
        if (tile < last) {
            const uint img = tile / tiles_image, r = tile % tiles_image;
            const uint oy0 = r / p.tiles_x * C3_ROWS, ox0 = r % p.tiles_x * C3_COLS;
            const uint oy = oy0 + run_px / C3_COLS, ox = ox0 + run_px % C3_COLS;
            device const T* dy_row = dy + (img * p.cout + co0 + t / 32) * plane + min(oy, p.oh - 1) * p.ow;
            #pragma unroll
            for (uint i = 0; i < D3_DY_RUNS; ++i) {
                const bool ok = oy < p.oh && co0 + t / 32 + 4 * i < p.cout;
                dy_next[i] = ok ? load_run(dy_row + 4 * i * plane, int(ox), int(p.ow), aligned && ox < p.ow)
                                : vec<T, 4>(T(0.0f));
            }
            device const T* x_img = x + (img * p.cin + ci0) * in_plane;
            #pragma unroll
            for (uint i = 0; i < D3_X_RUNS; ++i) {
                const uint q = t / 4 + 32 * i, ci = q / (C3_ROWS + 2);
                const int iy = int(oy0 + q % (C3_ROWS + 2)) - p.pad_h, ix = int(ox0 + run_col) + 1 - p.pad_w;
                const bool ok = ci0 + ci < p.cin && iy >= 0 && iy < int(p.h);
                x_next[i] = ok ? load_run(x_img + ci * in_plane + uint(iy) * p.w, ix, int(p.w), aligned && ix < int(p.w))
                               : vec<T, 4>(T(0.0f));
            }
            #pragma unroll
            for (uint i = 0; i < D3_X_EDGES; ++i) {
                const uint q = t / 2 + 64 * i, ci = q / (C3_ROWS + 2);
                const int iy = int(oy0 + q % (C3_ROWS + 2)) - p.pad_h;
                const int ix = int(ox0) - p.pad_w + (t % 2 ? C3_COLS + 1 : 0);
                const bool ok = ci < D3_CI && ci0 + ci < p.cin && iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);
                edge_next[i] = ok ? x_img[ci * in_plane + uint(iy) * p.w + uint(ix)] : T(0.0f);
            }
        }
        if (tile > first) {  // the previous tile's products, while this one's loads are in flight
            #pragma unroll
            for (uint k = 0; k < D3_PX; k += 8) {
                simdgroup_matrix<T, 8, 8> a0, a1, b;
                simdgroup_load_staged(a0, dy_s + co_w * D3_DY_PITCH + k, D3_DY_PITCH);
                simdgroup_load_staged(a1, dy_s + (co_w + 8) * D3_DY_PITCH + k, D3_DY_PITCH);
                #pragma unroll
                for (uint tap = 0; tap < 9; ++tap) {
                    const uint row = k / C3_COLS + tap / 3, col = k % C3_COLS + tap % 3;
                    const uint at = ci_w * D3_X_PITCH + row * (C3_COLS + 2) + col;
                    simdgroup_load_split(b, x_s + at, x_s + x_plane + at, D3_X_PITCH, ulong2(0), true);
                    simdgroup_multiply_accumulate_pair(acc[tap][0], acc[tap][1], a0, a1, b, acc[tap][0], acc[tap][1]);
                }
            }
        }
        if (tile == last) break;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        #pragma unroll
        for (uint i = 0; i < D3_DY_RUNS; ++i)
            *(threadgroup vec<T, 4>*)(dy_s + (t / 32 + 4 * i) * D3_DY_PITCH + run_px) = staged_operands(dy_next[i]);
        #pragma unroll
        for (uint i = 0; i < D3_X_RUNS; ++i) {
            const uint q = t / 4 + 32 * i;
            threadgroup T* row = x_s + q / (C3_ROWS + 2) * D3_X_PITCH + q % (C3_ROWS + 2) * (C3_COLS + 2) + 1 + run_col;
            for (uint j = 0; j < 4; ++j) stage_split(row + j, x_plane, x_next[i][j]);
        }
        #pragma unroll
        for (uint i = 0; i < D3_X_EDGES; ++i) {
            const uint q = t / 2 + 64 * i;
            if (q < D3_CI * (C3_ROWS + 2))
                stage_split(x_s + q / (C3_ROWS + 2) * D3_X_PITCH + q % (C3_ROWS + 2) * (C3_COLS + 2) + (t % 2 ? C3_COLS + 1 : 0), x_plane,
                            edge_next[i]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // Each simdgroup's 16 × 8 block of each tap, through threadgroup memory, to partial[co][ci][tap].
    threadgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup float* strip = (threadgroup float*)staged + simdgroup * 128;
    device float* out = partial + split * p.cout * p.cin * 9;
    #pragma unroll
    for (uint tap = 0; tap < 9; ++tap) {
        simdgroup_store(acc[tap][0], strip, 8);
        simdgroup_store(acc[tap][1], strip + 64, 8);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (uint e = lane; e < 128; e += 32) {
            const uint co = co0 + co_w + e / 8, ci = ci0 + ci_w + e % 8;
            if (co < p.cout && ci < p.cin) out[(co * p.cin + ci) * 9 + tap] = strip[e];
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
    }
}
template [[host_name("conv2d_weight_grad_3x3_mma")]] [[kernel]] decltype(conv2d_weight_grad_3x3_mma<float>) conv2d_weight_grad_3x3_mma<float>;
template [[host_name("conv2d_weight_grad_3x3_mma_f16")]] [[kernel]] decltype(conv2d_weight_grad_3x3_mma<half>) conv2d_weight_grad_3x3_mma<half>;
template [[host_name("conv2d_weight_grad_3x3_mma_bf16")]] [[kernel]] decltype(conv2d_weight_grad_3x3_mma<bfloat>) conv2d_weight_grad_3x3_mma<bfloat>;

// ---------------------------------------------------------------- into few output channels, any window
//
// A convolution into at most K8_CO = 8 output channels (the style network's last layer, 32 → 3
// through a 9 × 9 window) fills three of the 16 rows of the GEMM's narrowest tile, whose im2col
// gather also reads each input value once for each of the 81 taps from device memory: H100,
// bfloat16, 4×32×256²→3, 0.79 ms forward and 0.90 ms weight gradient, about 5 TFLOP/s.
// The two kernels below turn the product around, the channels being the short side of each 8 × 8
// matrix, and stage an input tile with its halo once for every tap: 0.22 and 0.28 ms (cuDNN's
// bfloat16: 0.25 and 0.36). They take stride-1, undilated, ungrouped windows of up to K8_K × K8_K
// taps, on simdgroup matrices.
#define K8_CO 8                              // output channels, at most
#define K8_CI 8                              // input channels staged at once
#define K8_K 9                               // the widest window side
#define K8_ROWS 16                           // conv2d_kxk_mma_8's tile: K8_ROWS × K8_COLS output pixels
#define K8_COLS 32
#define K8_XW (K8_COLS + K8_K - 1)           // 40 staged columns a row (the halo of the widest window)
#define K8_X_PITCH ((K8_ROWS + K8_K - 1) * K8_XW + 8)  // 968 staged values a channel: 8 channels on distinct banks
#define K8_OUT (K8_CO * K8_ROWS * K8_COLS)   // the tile's results, staged as floats to be written out
#define K8_STAGED(T) (K8_CI * K8_X_PITCH * sizeof(T) > K8_OUT * 4 ? K8_CI * K8_X_PITCH * sizeof(T) / 16 : K8_OUT / 4)

struct ConvKxkParams {
    uint n, cin, h, w;     // input images
    uint cout, oh, ow;     // output images
    uint kh, kw;           // window, each side at most K8_K
    int pad_h, pad_w;
    uint tiles_x, tiles;   // pixel tiles across an image, and in one
    uint has_bias;         // forward: add bias[cout]
    uint relu;             // forward: a fused relu after the bias (stored_output)
    uint chunk;            // weight gradient: pixel tiles each split sums
};

// wp[chunk][tap][e][co] = w[co][K8_CI·chunk + e][tap] as a staged operand (tile.h), zeros past the
// channels: each tap's 8 × 8 block of weights (input by output channels) as one matrix.
template <typename T>
kernel void pack_weights_kxk_8(device const T* w [[buffer(0)]],  // extent: p.cout * p.cin * p.kh * p.kw
                               device T* wp [[buffer(1)]],  // extent: (p.cin + 7) / 8 * p.kh * p.kw * 64
                               constant ConvKxkParams& p [[buffer(2)]],
                               uint i [[thread_position_in_grid]]) {
    const uint taps = p.kh * p.kw;
    if (i >= (p.cin + K8_CI - 1) / K8_CI * taps * K8_CI * K8_CO) return;
    const uint co = i % K8_CO, e = i / K8_CO % K8_CI, tap = i / (K8_CO * K8_CI) % taps;
    const uint ci = i / (K8_CO * K8_CI * taps) * K8_CI + e;
    wp[i] = co < p.cout && ci < p.cin ? staged_operand(w[(co * p.cin + ci) * taps + tap]) : T(0.0f);
}
template [[host_name("pack_weights_kxk_8")]] [[kernel]] decltype(pack_weights_kxk_8<float>) pack_weights_kxk_8<float>;
template [[host_name("pack_weights_kxk_8_f16")]] [[kernel]] decltype(pack_weights_kxk_8<half>) pack_weights_kxk_8<half>;
template [[host_name("pack_weights_kxk_8_bf16")]] [[kernel]] decltype(pack_weights_kxk_8<bfloat>) pack_weights_kxk_8<bfloat>;

// Stage K8_CI input channels from c0 of `rows` rows from input row iy0 and K8_XW columns from
// ix0, zeros outside the image and past the channels, into x_s[channel][row][column] (PITCH
// values a channel), as staged operands (tile.h). Consecutive threads take consecutive columns of a row.
template <uint PITCH, typename T>
inline void stage_input_kxk(threadgroup T* x_s, device const T* x_img, constant ConvKxkParams& p, uint c0,
                            int iy0, int ix0, uint rows, uint t) {
    for (uint e = 0; e < K8_CI; ++e) {
        const uint c = c0 + e;
        for (uint s = t; s < rows * K8_XW; s += MMA_THREADS) {
            const int iy = iy0 + int(s / K8_XW), ix = ix0 + int(s % K8_XW);
            const bool inside = c < p.cin && iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);
            x_s[e * PITCH + s] = inside ? staged_operand(x_img[(c * p.h + uint(iy)) * p.w + uint(ix)]) : T(0.0f);
        }
    }
}

// y = conv(x, w) + bias into at most K8_CO channels. An 8 × 8 product is 8 pixels of a row (its
// rows) by the K8_CI staged input channels at those pixels shifted by the tap (a transposed view of
// the staged tile, a channel's plane apart) times the tap's packed weights (input by output
// channels), read from device memory as they are (a few KB the cache keeps). A threadgroup owns
// a K8_ROWS × K8_COLS pixel tile; simdgroup s its rows 4s … 4s + 3, four matrices of 8 pixels
// each, multiplied in pairs that share the weights.
// Grid: (N · tiles of an image), MMA_THREADS threads.
template <typename T>
kernel void conv2d_kxk_mma_8(device const T* x [[buffer(0)]],  // extent: p.n * p.cin * p.h * p.w
                             device const T* wp [[buffer(1)]],  // extent: (p.cin + 7) / 8 * p.kh * p.kw * 64
                             device const T* bias [[buffer(2)]],  // extent: p.has_bias * p.cout
                             device T* y [[buffer(3)]],  // extent: p.n * p.cout * p.oh * p.ow
                             constant ConvKxkParams& p [[buffer(4)]],
                             uint group [[threadgroup_position_in_grid]],
                             uint t [[thread_index_in_threadgroup]]) {
    // Staged as stored: [input channel][row][column] with the halo; after the last product, the
    // float results [output channel][pixel of the tile].
    threadgroup float4 staged[K8_STAGED(T)];
    threadgroup T* x_s = (threadgroup T*)staged;
    const uint img = group / p.tiles, r = group % p.tiles, simdgroup = t / 32;
    const int oy0 = int(r / p.tiles_x * K8_ROWS), ox0 = int(r % p.tiles_x * K8_COLS);
    const uint taps = p.kh * p.kw, chunks = (p.cin + K8_CI - 1) / K8_CI;
    device const T* x_img = x + img * p.cin * p.h * p.w;

    simdgroup_float8x8 acc[4][4];  // [row of the simdgroup's four][8 pixels of it]: pixels × output channels
    #pragma unroll
    for (uint i = 0; i < 4; ++i)
        #pragma unroll
        for (uint j = 0; j < 4; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    for (uint chunk = 0; chunk < chunks; ++chunk) {
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk's products are done
        stage_input_kxk<K8_X_PITCH>(x_s, x_img, p, chunk * K8_CI, oy0 - p.pad_h, ox0 - p.pad_w, K8_ROWS + p.kh - 1, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        device const T* w_chunk = wp + chunk * taps * K8_CI * K8_CO;
        for (uint ky = 0; ky < p.kh; ++ky)
            for (uint kx = 0; kx < p.kw; ++kx) {
                simdgroup_matrix<T, 8, 8> b;
                simdgroup_load_staged(b, w_chunk + (ky * p.kw + kx) * K8_CI * K8_CO, K8_CO);
                #pragma unroll
                for (uint i = 0; i < 4; ++i) {
                    threadgroup T* row = x_s + (4 * simdgroup + i + ky) * K8_XW + kx;
                    simdgroup_matrix<T, 8, 8> a[4];
                    #pragma unroll
                    for (uint j = 0; j < 4; ++j) simdgroup_load_staged(a[j], row + 8 * j, K8_X_PITCH, ulong2(0), true);
                    simdgroup_multiply_accumulate_pair(acc[i][0], acc[i][1], a[0], a[1], b, acc[i][0], acc[i][1]);
                    simdgroup_multiply_accumulate_pair(acc[i][2], acc[i][3], a[2], a[3], b, acc[i][2], acc[i][3]);
                }
            }
    }

    threadgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup float* out_s = (threadgroup float*)staged;  // [output channel][pixel of the tile]
    #pragma unroll
    for (uint i = 0; i < 4; ++i)
        #pragma unroll
        for (uint j = 0; j < 4; ++j)
            simdgroup_store(acc[i][j], out_s + (4 * simdgroup + i) * K8_COLS + 8 * j, K8_ROWS * K8_COLS, ulong2(0), true);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = t; e < p.cout * K8_ROWS * K8_COLS; e += MMA_THREADS) {
        const uint co = e / (K8_ROWS * K8_COLS), oy = uint(oy0) + e / K8_COLS % K8_ROWS, ox = uint(ox0) + e % K8_COLS;
        if (oy < p.oh && ox < p.ow)
            y[((img * p.cout + co) * p.oh + oy) * p.ow + ox] = stored_output<T>(out_s[e] + (p.has_bias ? float(bias[co]) : 0.0f), p.relu);
    }
}
template [[host_name("conv2d_kxk_mma_8")]] [[kernel]] decltype(conv2d_kxk_mma_8<float>) conv2d_kxk_mma_8<float>;
template [[host_name("conv2d_kxk_mma_8_f16")]] [[kernel]] decltype(conv2d_kxk_mma_8<half>) conv2d_kxk_mma_8<half>;
template [[host_name("conv2d_kxk_mma_8_bf16")]] [[kernel]] decltype(conv2d_kxk_mma_8<bfloat>) conv2d_kxk_mma_8<bfloat>;

// dw of a convolution into at most K8_CO channels: dw[co][ci][tap] = Σ over pixels of
// dy[co][pixel] · x[ci][pixel shifted by the tap]. An 8 × 8 product is K8_CI staged input
// channels at 8 pixels of a row shifted by a tap (its rows) times the output gradients at those 8
// pixels (a transposed view: pixels by output channels), accumulated per tap: simdgroup s keeps
// the taps s, s + 4, s + 8, …, at most D8_TAPS of them, in pairs that share the gradients. A
// threadgroup owns K8_CI input channels and sums its share of the images' D8_ROWS × K8_COLS
// pixel tiles: threadgroup z the tiles [z·chunk, (z+1)·chunk), into slice z of `partial`, which
// sum_splits adds.
// Grid: (ceil(Cin / K8_CI), 1, splits), MMA_THREADS threads.
#define D8_ROWS 8
#define D8_PX (D8_ROWS * K8_COLS)                    // 256 pixels a tile
#define D8_DY_PITCH (D8_PX + 8)                       // 264: the 8 channels of a matrix on distinct banks
#define D8_X_PITCH ((D8_ROWS + K8_K - 1) * K8_XW + 8)  // 648: likewise
#define D8_TAPS ((K8_K * K8_K + 7) / 8 * 2)           // 22: taps a simdgroup, at most, an even number
#define D8_STAGED(T) ((K8_CO * D8_DY_PITCH + K8_CI * D8_X_PITCH) * sizeof(T) / 16)
template <typename T>
kernel void conv2d_weight_grad_kxk_mma_8(device const T* dy [[buffer(0)]],  // extent: p.n * p.cout * p.oh * p.ow
                                         device const T* x [[buffer(1)]],  // extent: p.n * p.cin * p.h * p.w
                                         device float* partial [[buffer(2)]],  // extent: (p.n * p.tiles + p.chunk - 1) / p.chunk * p.cout * p.cin * p.kh * p.kw
                                         constant ConvKxkParams& p [[buffer(3)]],
                                         uint3 group [[threadgroup_position_in_grid]],
                                         uint t [[thread_index_in_threadgroup]]) {
    // Staged as stored: [output channel][pixel of the tile] gradients, then [input channel][row][column]
    // inputs with the halo; afterwards 64 floats a simdgroup of scratch for the results.
    threadgroup float4 staged[D8_STAGED(T)];
    threadgroup T* dy_s = (threadgroup T*)staged;
    threadgroup T* x_s = dy_s + K8_CO * D8_DY_PITCH;
    const uint ci0 = group.x * K8_CI, split = group.z, simdgroup = t / 32, lane = t % 32;
    const uint taps = p.kh * p.kw, first = split * p.chunk, last = min(p.n * p.tiles, first + p.chunk);
    // Every simdgroup goes through as many taps as the first has, past the window too: the cpu
    // backend's fibers match barriers and simdgroup loads by their count, threadgroup-wide.
    const uint most = (taps + 3) / 4;
    // this simdgroup's taps simdgroup + 4i: where each shifts the staged tile (row · K8_XW + column)
    uint shift[D8_TAPS];
    #pragma unroll
    for (uint i = 0; i < D8_TAPS; ++i) {
        const uint tap = min(simdgroup + 4 * i, taps - 1);  // past the window: a repeat, never written out
        shift[i] = tap / p.kw * K8_XW + tap % p.kw;
    }
    simdgroup_float8x8 acc[D8_TAPS];  // input × output channels, a tap each
    #pragma unroll
    for (uint i = 0; i < D8_TAPS; ++i) acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

    for (uint tile = first; tile < last; ++tile) {
        const uint img = tile / p.tiles, r = tile % p.tiles;
        const uint oy0 = r / p.tiles_x * D8_ROWS, ox0 = r % p.tiles_x * K8_COLS;
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous tile's products are done
        device const T* dy_img = dy + img * p.cout * p.oh * p.ow;
        for (uint e = t; e < K8_CO * D8_PX; e += MMA_THREADS) {
            const uint co = e / D8_PX, oy = oy0 + e / K8_COLS % D8_ROWS, ox = ox0 + e % K8_COLS;
            dy_s[co * D8_DY_PITCH + e % D8_PX] = co < p.cout && oy < p.oh && ox < p.ow ? staged_operand(dy_img[(co * p.oh + oy) * p.ow + ox]) : T(0.0f);
        }
        stage_input_kxk<D8_X_PITCH>(x_s, x + img * p.cin * p.h * p.w, p, ci0, int(oy0) - p.pad_h, int(ox0) - p.pad_w, D8_ROWS + p.kh - 1, t);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < D8_PX; k += 8) {
            simdgroup_matrix<T, 8, 8> g, a0, a1;
            simdgroup_load_staged(g, dy_s + k, D8_DY_PITCH, ulong2(0), true);
            threadgroup T* at = x_s + k / K8_COLS * K8_XW + k % K8_COLS;
            #pragma unroll
            for (uint i = 0; i < D8_TAPS; i += 2) {
                if (i >= most) break;
                simdgroup_load_staged(a0, at + shift[i], D8_X_PITCH);
                simdgroup_load_staged(a1, at + shift[i + 1], D8_X_PITCH);
                simdgroup_multiply_accumulate_pair(acc[i], acc[i + 1], a0, a1, g, acc[i], acc[i + 1]);
            }
        }
    }

    // Each tap's 8 × 8 block, through 64 floats of threadgroup memory a simdgroup, to partial[co][ci][tap].
    threadgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup float* strip = (threadgroup float*)staged + simdgroup * 64;
    device float* out = partial + split * p.cout * p.cin * taps;
    #pragma unroll
    for (uint i = 0; i < D8_TAPS; ++i) {
        if (i >= most) break;
        const uint tap = simdgroup + 4 * i;
        simdgroup_store(acc[i], strip, K8_CO);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (uint e = lane; e < 64; e += 32) {
            const uint ci = ci0 + e / K8_CO, co = e % K8_CO;
            if (tap < taps && co < p.cout && ci < p.cin) out[(co * p.cin + ci) * taps + tap] = strip[e];
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
    }
}
template [[host_name("conv2d_weight_grad_kxk_mma_8")]] [[kernel]] decltype(conv2d_weight_grad_kxk_mma_8<float>) conv2d_weight_grad_kxk_mma_8<float>;
template [[host_name("conv2d_weight_grad_kxk_mma_8_f16")]] [[kernel]] decltype(conv2d_weight_grad_kxk_mma_8<half>) conv2d_weight_grad_kxk_mma_8<half>;
template [[host_name("conv2d_weight_grad_kxk_mma_8_bf16")]] [[kernel]] decltype(conv2d_weight_grad_kxk_mma_8<bfloat>) conv2d_weight_grad_kxk_mma_8<bfloat>;

struct BiasGradParams {
    uint n, c, plane;  // dy is N × C × plane
    uint chunk;        // pixels of the plane each split sums
};

// db[c] = Σ over images and pixels of dy[n, c, :], split like the weight gradient: threadgroup
// (x, c) sums pixels [x·chunk, (x+1)·chunk) of channel c's plane in every image into
// partial[x·C + c] (then `sum_splits`), by a strided sum per thread and a tree through
// threadgroup memory. A channel a threadgroup left most of a GPU idle at few channels. Each
// thread keeps four sums, so four of its loads are in flight at once (one at a time left the
// kernel latency-bound at well under the memory's bandwidth).
// Grid: (splits, C), threads: (BIAS_THREADS).
template <typename T>
kernel void conv2d_bias_grad(device const T* dy [[buffer(0)]],  // extent: p.n * p.c * p.plane
                             device float* partial [[buffer(1)]],  // extent: (p.plane + p.chunk - 1) / p.chunk * p.c
                             constant BiasGradParams& p [[buffer(2)]],
                             uint2 tile [[threadgroup_position_in_grid]],
                             uint t [[thread_index_in_threadgroup]]) {
    threadgroup float sums[BIAS_THREADS];
    const uint c = tile.y, begin = tile.x * p.chunk, end = min(p.plane, begin + p.chunk);
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (uint img = 0; img < p.n; ++img) {
        device const T* row = dy + (img * p.c + c) * p.plane;
        uint r = begin + t;
        for (; r + 3 * BIAS_THREADS < end; r += 4 * BIAS_THREADS) {
            s0 += float(row[r]);
            s1 += float(row[r + BIAS_THREADS]);
            s2 += float(row[r + 2 * BIAS_THREADS]);
            s3 += float(row[r + 3 * BIAS_THREADS]);
        }
        for (; r < end; r += BIAS_THREADS) s0 += float(row[r]);
    }
    sums[t] = (s0 + s1) + (s2 + s3);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint half_width = BIAS_THREADS / 2; half_width > 0; half_width /= 2) {
        if (t < half_width) sums[t] += sums[t + half_width];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (t == 0) partial[tile.x * p.c + c] = sums[0];
}
template [[host_name("conv2d_bias_grad")]] [[kernel]] decltype(conv2d_bias_grad<float>) conv2d_bias_grad<float>;
template [[host_name("conv2d_bias_grad_f16")]] [[kernel]] decltype(conv2d_bias_grad<half>) conv2d_bias_grad<half>;
template [[host_name("conv2d_bias_grad_bf16")]] [[kernel]] decltype(conv2d_bias_grad<bfloat>) conv2d_bias_grad<bfloat>;
