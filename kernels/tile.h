// The register-blocked tile product shared by conv.metal, matmul.metal and gram.metal.
//
// A threadgroup of THREADS threads owns a TILE_M × TILE_N tile of the output; slices TILE_K
// deep of both operands are staged in threadgroup memory, and each thread accumulates a
// BLOCK × BLOCK block of outputs in registers between two barriers: 1024 multiply-adds per
// thread per barrier, so a barrier is cheap on GPUs and on the cpu backend's fibers alike.
#pragma once

#define TILE_M 64   // output rows per threadgroup
#define TILE_N 64   // output columns per threadgroup
#define TILE_K 16   // reduction depth staged per barrier
#define BLOCK 8     // each thread accumulates BLOCK × BLOCK outputs; (64/8)² = 64 threads
#define THREADS 64  // per threadgroup

struct Block {
    float v[BLOCK][BLOCK];
};

// acc += the staged slices' outer products for this thread's rows (tm) and columns (tn).
inline void multiply_tiles(threadgroup const float* a_tile, threadgroup const float* b_tile,
                           uint tm, uint tn, thread Block& acc) {
    for (uint k = 0; k < TILE_K; ++k) {
        float a[BLOCK], b[BLOCK];
        for (uint i = 0; i < BLOCK; ++i) a[i] = a_tile[k * TILE_M + tm * BLOCK + i];
        for (uint j = 0; j < BLOCK; ++j) b[j] = b_tile[k * TILE_N + tn * BLOCK + j];
        for (uint i = 0; i < BLOCK; ++i)
            for (uint j = 0; j < BLOCK; ++j) acc.v[i][j] = fma(a[i], b[j], acc.v[i][j]);
    }
}

inline void clear(thread Block& acc) {
    for (uint i = 0; i < BLOCK; ++i)
        for (uint j = 0; j < BLOCK; ++j) acc.v[i][j] = 0.0f;
}
