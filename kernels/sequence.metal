// Sequence-model kernels: token embeddings (gather and its gradient), greedy decoding's
// arg-max, and the per-sequence "still running" flags that a predicate reduces over.
// Token ids are int32; flags are uint32 (nonzero = true), the predicate kernels' input.
#include <metal_stdlib>
using namespace metal;

struct EmbeddingParams {
    uint n;      // tokens
    uint dim;    // features per token
    uint vocab;  // rows of the table
};

// out[i, f] = table[ids[i], f]; an id outside [0, vocab) gives a zero row instead of a
// read out of bounds.
kernel void embedding(device const int* ids [[buffer(0)]],  // extent: p.n
                      device const float* table [[buffer(1)]],  // extent: p.vocab * p.dim
                      device float* out [[buffer(2)]],  // extent: p.n * p.dim
                      constant EmbeddingParams& p [[buffer(3)]],
                      uint j [[thread_position_in_grid]]) {
    if (j >= p.n * p.dim) return;
    uint i = j / p.dim, f = j % p.dim;
    int id = ids[i];
    out[j] = (id >= 0 && uint(id) < p.vocab) ? table[uint(id) * p.dim + f] : 0.0f;
}

// dtable[v, f] = Σ over tokens i with ids[i] == v of g[i, f]. One thread per table element
// walks all the tokens: no float atomics, and the sum's order (hence its rounding) is the
// same on every backend.
kernel void embedding_grad(device const float* g [[buffer(0)]],  // extent: p.n * p.dim
                           device const int* ids [[buffer(1)]],  // extent: p.n
                           device float* out [[buffer(2)]],  // extent: p.vocab * p.dim
                           constant EmbeddingParams& p [[buffer(3)]],
                           uint j [[thread_position_in_grid]]) {
    if (j >= p.vocab * p.dim) return;
    int v = int(j / p.dim);
    uint f = j % p.dim;
    float acc = 0.0f;
    for (uint i = 0; i < p.n; ++i) {
        if (ids[i] == v) acc += g[i * p.dim + f];
    }
    out[j] = acc;
}

struct ArgmaxParams {
    uint outputs;  // outer·inner
    uint length;   // of the axis searched
    uint inner;    // elements after it (its stride)
};

// out[o] = the index of the largest value along the axis, the first one on ties; NaN counts as
// above everything (as numpy's and PyTorch's argmax). A thread per output: neighbouring threads
// read neighbouring addresses where the axis is not the last.
kernel void argmax(device const float* x [[buffer(0)]],  // extent: p.outputs * p.length
                   device int* out [[buffer(1)]],  // extent: p.outputs
                   constant ArgmaxParams& p [[buffer(2)]],
                   uint o [[thread_position_in_grid]]) {
    if (o >= p.outputs) return;
    device const float* row = x + (o / p.inner) * p.length * p.inner + o % p.inner;
    uint best = 0;
    for (uint c = 1; c < p.length; ++c) {
        if (!(row[c * p.inner] <= row[best * p.inner]) && row[best * p.inner] == row[best * p.inner])
            best = c;  // greater, or the first NaN
    }
    out[o] = int(best);
}

struct StillRunningParams {
    uint n;
    int end;  // the end token
};

// out[i] = 1 while sequence i is running: it was running and has not just emitted `end`.
kernel void still_running(device const int* tokens [[buffer(0)]],  // extent: p.n
                          device const uint* running [[buffer(1)]],  // extent: p.n
                          device uint* out [[buffer(2)]],  // extent: p.n
                          constant StillRunningParams& p [[buffer(3)]],
                          uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = (running[i] != 0u && tokens[i] != p.end) ? 1u : 0u;
}
