// 2-D convolution (NCHW, cross-correlation like PyTorch) and its gradients, as implicit GEMMs.
//
// Each product is a matrix multiply whose operands are never written out: forward is
// weights (Cout × Cin·KH·KW) times the im2col'd input (Cin·KH·KW × N·OH·OW), and the two
// gradients are the same product with the roles swapped. A threadgroup of 64 threads owns a
// 64×64 output tile: per step it gathers a 16-deep slice of both operands into threadgroup
// memory (each thread a fixed share, chosen so that a warp's loads are contiguous where the
// operand is), waits at a barrier, and every thread accumulates its own 8×8 register block
// from the staged slices.
//
// Fat 8×8 blocks keep the threads few: on the cpu backend a barrier costs each thread a
// fiber switch, so 1024 multiply-adds per thread between barriers make it cheap there too.
#include <metal_stdlib>
using namespace metal;

#include "tile.h"
#define BIAS_THREADS 256

struct ConvParams {
    uint n, cin, h, w;        // input images
    uint cout, oh, ow;        // output images
    uint kh, kw;              // window
    int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    uint groups;
    uint has_bias;            // conv2d: add bias[cout]
    uint chunk;               // conv2d_weight_grad: output pixels each split sums (a multiple of TILE_K)
};

// y = conv(x, w) + bias. GEMM per group g: rows = its Cout/groups output channels,
// columns = the N·OH·OW output pixels, reduction = (input channel, ky, kx).
// Grid: (ceil(N·OH·OW / 64), ceil(Cout/groups / 64), groups).
kernel void conv2d(device const float* x [[buffer(0)]],
                   device const float* w [[buffer(1)]],
                   device const float* bias [[buffer(2)]],
                   device float* y [[buffer(3)]],
                   constant ConvParams& p [[buffer(4)]],
                   uint3 tile [[threadgroup_position_in_grid]],
                   uint t [[thread_index_in_threadgroup]]) {
    threadgroup float a_tile[TILE_K][TILE_M];  // weights, a_tile[k][output channel]
    threadgroup float b_tile[TILE_K][TILE_N];  // input patches, b_tile[k][output pixel]
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    const uint K = cin_g * p.kh * p.kw, plane = p.oh * p.ow, pixels = p.n * plane;
    const uint g = tile.z, m0 = tile.y * TILE_M, n0 = tile.x * TILE_N;

    // What thread t stages: the patch of output pixel n0+t, and slice column t % 16 of every
    // fourth weight row from t / 16 — weights are contiguous along k, so a warp reads whole runs.
    device const float* w_group = w + g * cout_g * K;
    const uint a_k = t % TILE_K, a_row = t / TILE_K;
    const uint q = n0 + t;
    const bool col_ok = q < pixels;
    const uint img = col_ok ? q / plane : 0, r = col_ok ? q % plane : 0;
    const int iy0 = int(r / p.ow) * p.stride_h - p.pad_h, ix0 = int(r % p.ow) * p.stride_w - p.pad_w;
    device const float* x_img = x + (img * p.cin + g * cin_g) * p.h * p.w;
    uint ci = 0, ky = 0, kx = 0;  // the reduction index k = (ci·KH + ky)·KW + kx, counted, not divided

    const uint tm = t / (TILE_N / BLOCK), tn = t % (TILE_N / BLOCK);
    Block acc;
    clear(acc);
    for (uint k0 = 0; k0 < K; k0 += TILE_K) {
        for (uint i = 0; i < TILE_M / (THREADS / TILE_K); ++i) {
            const uint m = a_row + i * (THREADS / TILE_K);
            a_tile[a_k][m] = m0 + m < cout_g && k0 + a_k < K ? w_group[(m0 + m) * K + k0 + a_k] : 0.0f;
        }
        for (uint kk = 0; kk < TILE_K; ++kk) {
            const bool k_ok = k0 + kk < K;
            const int iy = iy0 + int(ky) * p.dil_h, ix = ix0 + int(kx) * p.dil_w;
            const bool inside = iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);  // else zero padding
            b_tile[kk][t] = col_ok && k_ok && inside ? x_img[(ci * p.h + uint(iy)) * p.w + uint(ix)] : 0.0f;
            if (++kx == p.kw) { kx = 0; if (++ky == p.kh) { ky = 0; ++ci; } }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        multiply_tiles(&a_tile[0][0], &b_tile[0][0], tm, tn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    for (uint j = 0; j < BLOCK; ++j) {
        const uint qj = n0 + tn * BLOCK + j;
        if (qj >= pixels) break;
        device float* y_pix = y + ((qj / plane) * p.cout + g * cout_g) * plane + qj % plane;
        for (uint i = 0; i < BLOCK; ++i) {
            const uint m = m0 + tm * BLOCK + i;
            if (m < cout_g) y_pix[m * plane] = acc.v[i][j] + (p.has_bias ? bias[g * cout_g + m] : 0.0f);
        }
    }
}

// dx = the transposed convolution of dy. GEMM per group g: rows = its Cin/groups input
// channels, columns = the N·H·W input pixels, reduction = (output channel, ky, kx); a tap
// contributes only where the input pixel lies on the output grid (oy·stride = iy + pad − ky·dil).
// Grid: (ceil(N·H·W / 64), ceil(Cin/groups / 64), groups).
kernel void conv2d_input_grad(device const float* dy [[buffer(0)]],
                              device const float* w [[buffer(1)]],
                              device float* dx [[buffer(2)]],
                              constant ConvParams& p [[buffer(3)]],
                              uint3 tile [[threadgroup_position_in_grid]],
                              uint t [[thread_index_in_threadgroup]]) {
    threadgroup float a_tile[TILE_K][TILE_M];  // weights, a_tile[k][input channel]
    threadgroup float b_tile[TILE_K][TILE_N];  // output gradients, b_tile[k][input pixel]
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    const uint khw = p.kh * p.kw, K = cout_g * khw, plane = p.h * p.w, pixels = p.n * plane;
    const uint oplane = p.oh * p.ow;
    const uint g = tile.z, m0 = tile.y * TILE_M, n0 = tile.x * TILE_N;

    // Thread t stages input channel m0+t of the weights and input pixel n0+t's taps of dy.
    const bool row_ok = m0 + t < cin_g;
    device const float* w_ch = w + g * cout_g * cin_g * khw + (row_ok ? m0 + t : 0) * khw;
    const uint q = n0 + t;
    const bool col_ok = q < pixels;
    const uint img = col_ok ? q / plane : 0, r = col_ok ? q % plane : 0;
    const int ty0 = int(r / p.w) + p.pad_h, tx0 = int(r % p.w) + p.pad_w;  // oy·stride + ky·dil
    device const float* dy_img = dy + (img * p.cout + g * cout_g) * oplane;
    uint co = 0, ky = 0, kx = 0;  // k = (co·KH + ky)·KW + kx

    const uint tm = t / (TILE_N / BLOCK), tn = t % (TILE_N / BLOCK);
    Block acc;
    clear(acc);
    for (uint k0 = 0; k0 < K; k0 += TILE_K) {
        for (uint kk = 0; kk < TILE_K; ++kk) {
            const bool k_ok = k0 + kk < K;
            a_tile[kk][t] = row_ok && k_ok ? w_ch[co * cin_g * khw + ky * p.kw + kx] : 0.0f;
            const int sy = ty0 - int(ky) * p.dil_h, sx = tx0 - int(kx) * p.dil_w;
            float v = 0.0f;
            if (col_ok && k_ok && sy >= 0 && sx >= 0 && sy % p.stride_h == 0 && sx % p.stride_w == 0) {
                const uint oy = uint(sy / p.stride_h), ox = uint(sx / p.stride_w);
                if (oy < p.oh && ox < p.ow) v = dy_img[co * oplane + oy * p.ow + ox];
            }
            b_tile[kk][t] = v;
            if (++kx == p.kw) { kx = 0; if (++ky == p.kh) { ky = 0; ++co; } }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        multiply_tiles(&a_tile[0][0], &b_tile[0][0], tm, tn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    for (uint j = 0; j < BLOCK; ++j) {
        const uint qj = n0 + tn * BLOCK + j;
        if (qj >= pixels) break;
        device float* dx_pix = dx + ((qj / plane) * p.cin + g * cin_g) * plane + qj % plane;
        for (uint i = 0; i < BLOCK; ++i) {
            const uint m = m0 + tm * BLOCK + i;
            if (m < cin_g) dx_pix[m * plane] = acc.v[i][j];
        }
    }
}

// dw = dy · patchesᵀ. GEMM per group g: rows = its Cout/groups output channels, columns =
// (input channel, ky, kx), reduction = output pixels. The reduction is long (N·OH·OW) and the
// output small, so it is split: threadgroup z sums pixels [split·chunk, (split+1)·chunk) into
// slice `split` of `partial` (Cout × Cin/groups·KH·KW floats per slice), and `sum_splits`
// adds the slices. With one split, `partial` is dw itself.
// Grid: (ceil(Cin/groups·KH·KW / 64), ceil(Cout/groups / 64), groups · splits).
kernel void conv2d_weight_grad(device const float* dy [[buffer(0)]],
                               device const float* x [[buffer(1)]],
                               device float* partial [[buffer(2)]],
                               constant ConvParams& p [[buffer(3)]],
                               uint3 tile [[threadgroup_position_in_grid]],
                               uint t [[thread_index_in_threadgroup]]) {
    threadgroup float a_tile[TILE_K][TILE_M];  // output gradients, a_tile[pixel][output channel]
    threadgroup float b_tile[TILE_K][TILE_N];  // input patches, b_tile[pixel][(ci, ky, kx)]
    const uint cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    const uint khw = p.kh * p.kw, cols = cin_g * khw, oplane = p.oh * p.ow, pixels = p.n * oplane;
    const uint g = tile.z % p.groups, split = tile.z / p.groups;
    const uint m0 = tile.y * TILE_M, n0 = tile.x * TILE_N;
    const uint k_begin = split * p.chunk, k_end = min(pixels, k_begin + p.chunk);

    // Thread t stages output channel m0+t of dy and column n0+t = (ci, ky, kx) of the patches;
    // both walk the output pixels (img, oy, ox) in order, counted from k_begin.
    const bool row_ok = m0 + t < cout_g;
    const uint co = g * cout_g + (row_ok ? m0 + t : 0);
    const uint c = n0 + t;
    const bool col_ok = c < cols;
    const uint ci = col_ok ? c / khw : 0, ky = col_ok ? c % khw / p.kw : 0, kx = col_ok ? c % p.kw : 0;
    const int dy0 = int(ky) * p.dil_h - p.pad_h, dx0 = int(kx) * p.dil_w - p.pad_w;
    const uint x_channel = g * cin_g + ci;
    uint img = k_begin / oplane, oy = k_begin % oplane / p.ow, ox = k_begin % p.ow;

    const uint tm = t / (TILE_N / BLOCK), tn = t % (TILE_N / BLOCK);
    Block acc;
    clear(acc);
    for (uint k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        for (uint kk = 0; kk < TILE_K; ++kk) {
            const bool k_ok = k0 + kk < k_end;
            a_tile[kk][t] = row_ok && k_ok ? dy[(img * p.cout + co) * oplane + oy * p.ow + ox] : 0.0f;
            const int iy = int(oy) * p.stride_h + dy0, ix = int(ox) * p.stride_w + dx0;
            const bool inside = iy >= 0 && iy < int(p.h) && ix >= 0 && ix < int(p.w);
            b_tile[kk][t] = col_ok && k_ok && inside
                ? x[((img * p.cin + x_channel) * p.h + uint(iy)) * p.w + uint(ix)] : 0.0f;
            if (++ox == p.ow) { ox = 0; if (++oy == p.oh) { oy = 0; ++img; } }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        multiply_tiles(&a_tile[0][0], &b_tile[0][0], tm, tn, acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    device float* out = partial + split * p.cout * cols;
    for (uint i = 0; i < BLOCK; ++i) {
        const uint m = m0 + tm * BLOCK + i;
        if (m >= cout_g) break;
        for (uint j = 0; j < BLOCK; ++j) {
            const uint cj = n0 + tn * BLOCK + j;
            if (cj < cols) out[(g * cout_g + m) * cols + cj] = acc.v[i][j];
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

struct BiasGradParams {
    uint n, c, plane;  // dy is N × C × plane
};

// db[c] = Σ over images and pixels of dy[n, c, :]: one threadgroup a channel, a strided sum
// per thread, then a tree through threadgroup memory. Grid: (C), threads: (256).
kernel void conv2d_bias_grad(device const float* dy [[buffer(0)]],
                             device float* db [[buffer(1)]],
                             constant BiasGradParams& p [[buffer(2)]],
                             uint c [[threadgroup_position_in_grid]],
                             uint t [[thread_index_in_threadgroup]]) {
    threadgroup float sums[BIAS_THREADS];
    float s = 0.0f;
    for (uint img = 0; img < p.n; ++img) {
        device const float* row = dy + (img * p.c + c) * p.plane;
        for (uint r = t; r < p.plane; r += BIAS_THREADS) s += row[r];
    }
    sums[t] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint half_width = BIAS_THREADS / 2; half_width > 0; half_width /= 2) {
        if (t < half_width) sums[t] += sums[t + half_width];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (t == 0) db[c] = sums[0];
}
