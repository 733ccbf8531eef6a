// The register-blocked tile product shared by conv.metal, matmul.metal and gram.metal.
//
// A threadgroup owns a tile of the output, `width_m` rows by `width_n` columns, and each of its
// threads accumulates an 8×8 block of it in registers: 512 multiply-adds per thread for every
// TILE_K-deep slice of the operands staged in threadgroup memory. Three tilings:
//
//   wide    128 × 128 outputs, 256 threads: the workhorse;
//   medium   64 × 128 outputs, 128 threads: for convolutions with 33 to 64 channels, and
//   narrow   16 × 256 outputs,  64 threads: for fewer (9 → 16, 16 → 32 at 256×256 pixels are
//            common in a U-Net), where a 128-row tile would be mostly waste.
//
// Staging is pipelined: while the threads multiply the slice in one of two threadgroup buffers,
// the next slice's loads from device memory are already in flight into registers, and are
// stored into the other buffer afterwards — one barrier per slice, and the load latency hidden
// behind the arithmetic. A thread's block is four 4×4 quarters, rows 4·tm … 4·tm+3 of each half
// of the tile (likewise the columns), so that a warp reads the staged slices as consecutive
// float4s: no bank conflicts, a quarter of the loads scalars would take. The slices are stored
// k-major (tile[k][row]), each row of k padded by one float4 so that threads storing down k
// land in different banks.
//
// On the cpu backend a barrier costs each thread a fiber switch; 512 multiply-adds between
// barriers keep that small.
//
// Kernels call their tiled body with the tiling's sizes as literal arguments (the bodies are
// inlined, so the sizes are compile-time constants there), and declare the staging buffers.
#pragma once

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

inline void clear(thread Block& acc) {
    for (uint i = 0; i < 8; ++i)
        for (uint j = 0; j < 8; ++j) acc.v[i][j] = 0.0f;
}

// acc += the outer products of one staged slice for this thread's rows (tm) and columns (tn).
inline void multiply_slice(threadgroup const float4* a_tile, threadgroup const float4* b_tile,
                           uint width_m, uint width_n, uint tm, uint tn, thread Block& acc) {
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

// Moves a reduction index k = (c·KH + ky)·KW + kx (or a pixel index (image·OH + oy)·OW + ox)
// `steps` places on, without dividing.
inline void advance(thread uint& c, thread uint& ky, thread uint& kx, uint steps, uint kh, uint kw) {
    kx += steps;
    while (kx >= kw) {
        kx -= kw;
        if (++ky == kh) { ky = 0; ++c; }
    }
}
