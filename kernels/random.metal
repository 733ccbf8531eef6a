// Random numbers on the device: Philox4x32-10 and MTGP32 (DESIGN §5).
//
// Each generator's kernel writes n numbers of its stream, starting at a stream position the
// host keeps, under one of three distributions chosen by `dist` (MTGP32 has two variants of
// its kernel, for GPUs and for cpu, writing the same stream):
//
//   RANDOM_UINT32   the raw 32-bit words;
//   RANDOM_UNIFORM  t = (x >> 9) * 2^-23 in [0, 1), then fma(b, t, a) with a = min, b = max - min
//                   (b is rounded to float32 on the host, so every backend computes the same bits);
//   RANDOM_NORMAL   Box–Muller on the word pair (2j, 2j+1) of the stream: element 2j is r cos θ,
//                   element 2j+1 is r sin θ, then fma(b, z, a) with a = mean, b = std.
//
// Float results are stored through `as_type<uint>`, so one `device uint*` output serves all three.
// The kernels recompute whatever part of a block (Philox) or step (MTGP32) a previous call
// already handed out instead of storing leftovers: a call of n numbers after a call of m numbers
// writes exactly what one call of m + n would have written at positions m … m+n-1.

#include <metal_stdlib>
using namespace metal;

enum { RANDOM_UINT32 = 0, RANDOM_UNIFORM = 1, RANDOM_NORMAL = 2 };

// ---------------------------------------------------------------- distributions

inline float uniform(uint x, float low, float scale) {
    return fma(scale, float(x >> 9) * 0x1.0p-23f, low);
}

// Standard normal pair from two words. u1 = ((x0 >> 8) + 1) * 2^-24 lies in (0, 1], so the
// log is finite; precise:: because fast math would lose the tails (u1 near 0).
inline float2 box_muller(uint x0, uint x1) {
    float u1 = float((x0 >> 8) + 1u) * 0x1.0p-24f;
    float theta = 6.2831853071795865f * (float(x1 >> 8) * 0x1.0p-24f);
    float r = precise::sqrt(-2.0f * precise::log(u1));
    float c;
    float s = precise::sincos(theta, c);
    return float2(r * c, r * s);
}

// ---------------------------------------------------------------- Philox4x32-10

#include "philox.h"

struct PhiloxParams {
    uint n;         // numbers to write
    uint seed;      // key = (seed, 0)
    uint block_lo;  // block holding out[0]'s stream position, as a 64-bit number: counter words 3, 2
    uint block_hi;
    uint skip;      // out[0] is word `skip` of that block (stream position mod 4)
    uint dist;
    float a;
    float b;
};

// The four outputs of one block under a distribution, as bits. Box–Muller pairs are words
// (0, 1) and (2, 3): blocks start at even stream positions, so pairs never straddle blocks.
inline uint4 philox_block(PhiloxParams p, uint i) {
    uint lo = p.block_lo + i;
    uint hi = p.block_hi + (lo < i ? 1u : 0u);  // carry of the 64-bit block index
    uint4 x = philox4x32_10(uint4(0u, 0u, hi, lo), uint2(p.seed, 0u));
    if (p.dist == RANDOM_UNIFORM) {
        return uint4(as_type<uint>(uniform(x.x, p.a, p.b)), as_type<uint>(uniform(x.y, p.a, p.b)),
                     as_type<uint>(uniform(x.z, p.a, p.b)), as_type<uint>(uniform(x.w, p.a, p.b)));
    }
    if (p.dist == RANDOM_NORMAL) {
        float2 z0 = box_muller(x.x, x.y), z1 = box_muller(x.z, x.w);
        return uint4(as_type<uint>(fma(p.b, z0.x, p.a)), as_type<uint>(fma(p.b, z0.y, p.a)),
                     as_type<uint>(fma(p.b, z1.x, p.a)), as_type<uint>(fma(p.b, z1.y, p.a)));
    }
    return x;
}

// out[4q … 4q+3] are stream words skip … skip+3 of blocks q and q+1 counted from p.block:
// when a previous call ended inside a block (skip > 0), both blocks are made and the four
// words taken from them, so no leftover words are kept between calls.
inline uint4 philox_quad(PhiloxParams p, uint q) {
    uint4 v = philox_block(p, q);
    if (p.skip == 0u) return v;
    uint4 w = philox_block(p, q + 1u);
    return p.skip == 1u ? uint4(v.y, v.z, v.w, w.x)
         : p.skip == 2u ? uint4(v.z, v.w, w.x, w.y)
                        : uint4(v.w, w.x, w.y, w.z);
}

// One 16-byte store per quad: GPUs write at full bandwidth only with wide contiguous stores.
inline void store_quad(device uint* out, uint n, uint q, uint4 v) {
    uint at = 4u * q;
    if (at + 3u < n) {
        ((device uint4*)out)[q] = v;  // device buffers are at least 16-byte aligned
    } else if (at < n) {
        out[at] = v.x;
        if (at + 1u < n) out[at + 1u] = v.y;
        if (at + 2u < n) out[at + 2u] = v.z;
    }
}

// Thread i writes quads i and i + threads_per_grid. Two independent Philox chains per thread
// keep the ALUs busy while the stores drain: on an H100, one quad per thread ran about 10%
// under the store bandwidth, two ran at it.
kernel void philox(device uint* out [[buffer(0)]],  // extent: p.n
                   constant PhiloxParams& p [[buffer(1)]],
                   uint i [[thread_position_in_grid]],
                   uint threads [[threads_per_grid]]) {
    // A private copy: stores to `out` cannot change it, so both quads are made before either store.
    const PhiloxParams local = p;
    uint4 v0 = philox_quad(local, i), v1 = philox_quad(local, i + threads);
    store_quad(out, local.n, i, v0);
    store_quad(out, local.n, i + threads, v1);
}

// ---------------------------------------------------------------- MTGP32

// 11213-bit state: 351 words. A step makes 256 new words, one per thread: word k+N+t from
// words k+t, k+t+1 and k+t+pos, tempered with word k+t+pos-1. Every parameter set has
// pos <= 93 < N - 255, so no word of a step reads another word of the same step.
#define MTGP32_N 351u
#define MTGP32_STEP 256u
// A step reads ring slots k … k+350 and writes k+351 … k+606: a 1024-word ring keeps the two
// apart (one barrier per step) and still holds the pre-step state for a step not kept.
#define MTGP32_RING 1024u
#define MTGP32_RING_MASK 1023u
// A parameter set on the device: pos, sh1, sh2, mask, tbl[16], tmp_tbl[16].
#define MTGP32_PARAM_WORDS 36u

// Tempering-table index from word k+pos-1.
inline uint temper_index(uint v) {
    v ^= v >> 16;
    v ^= v >> 8;
    return v & 15u;
}

struct MTGP32Params {
    uint n;       // numbers to write
    uint states;  // B: chunk c of the stream is step c / B of state c % B
    uint chunk;   // chunk of out[0]'s stream position (position / 256)
    uint skip;    // out[0] is word `skip` of that chunk (position % 256)
    uint dist;
    float a;
    float b;
};

// A tempered word under the distribution. The whole threadgroup calls it together: normal
// pairs are the words of threads (2j, 2j+1), neighbours in one SIMD group.
inline uint mtgp32_output(uint o, uint t, uint dist, float a, float b) {
    if (dist == RANDOM_UNIFORM) return as_type<uint>(uniform(o, a, b));
    if (dist == RANDOM_NORMAL) {
        uint partner = simd_shuffle_xor(o, 1);
        bool odd = (t & 1u) != 0u;
        float2 z = odd ? box_muller(partner, o) : box_muller(o, partner);
        return as_type<uint>(fma(b, odd ? z.y : z.x, a));
    }
    return o;
}

// One threadgroup of 256 threads per state. State g loads its 351 words into a threadgroup
// ring, makes the steps of its chunks in this call, and stores back the state after its last
// *finished* chunk: a chunk the call only partly writes is made again by the next call.
//
// A state is a chain of dependent steps, so a step's latency is the kernel's speed: each step
// issues its loads first and finishes and stores the previous step's number while they are
// in flight.
kernel void mtgp32(device uint* out [[buffer(0)]],  // extent: p.n
                   device uint* state [[buffer(1)]],  // extent: p.states * 351
                   device const uint* params [[buffer(2)]],  // extent: p.states * 36
                   constant MTGP32Params& p [[buffer(3)]],
                   uint g [[threadgroup_position_in_grid]],
                   uint t [[thread_position_in_threadgroup]]) {
    threadgroup uint ring[MTGP32_RING];
    threadgroup uint rec_tbl[16];
    threadgroup uint tmp_tbl[16];

    // Copied once: for all the compiler knows, stores to `out` could change `p`.
    const uint n = p.n, states = p.states, skip = p.skip, dist = p.dist;
    const float a = p.a, b = p.b;
    // Chunks are counted from p.chunk: this call touches 0 … touched-1 and finishes 0 … finished-1.
    uint touched = (skip + n + MTGP32_STEP - 1u) / MTGP32_STEP;
    uint finished = (skip + n) / MTGP32_STEP;
    uint first = (g + states - p.chunk % states) % states;  // this state's first chunk
    if (g >= states || first >= touched) return;  // the whole threadgroup leaves together

    device const uint* set = params + MTGP32_PARAM_WORDS * g;
    uint pos = set[0], sh1 = set[1], sh2 = set[2], mask = set[3];
    if (t < 16u) {
        rec_tbl[t] = set[4u + t];
        tmp_tbl[t] = set[20u + t];
    }
    device uint* s = state + MTGP32_N * g;
    for (uint j = t; j < MTGP32_N; j += MTGP32_STEP) ring[j] = s[j];
    threadgroup_barrier(mem_flags::mem_threadgroup);

    uint k = 0u;     // ring slot of the oldest state word
    uint kept = 0u;  // ring slot of the state to store back
    uint word = 0u, at = ~0u;  // the previous step's tempered word and its index in out
    for (uint c = first; c < touched; c += states) {
        uint x0 = ring[(k + t) & MTGP32_RING_MASK], x1 = ring[(k + t + 1u) & MTGP32_RING_MASK];
        uint xp = ring[(k + t + pos) & MTGP32_RING_MASK], xt = ring[(k + t + pos - 1u) & MTGP32_RING_MASK];
        uint number = mtgp32_output(word, t, dist, a, b);
        if (at < n) out[at] = number;

        uint x = (x0 & mask) ^ x1;
        x ^= x << sh1;
        uint y = x ^ (xp >> sh2);
        uint r = y ^ rec_tbl[y & 15u];
        ring[(k + MTGP32_N + t) & MTGP32_RING_MASK] = r;
        word = r ^ tmp_tbl[temper_index(xt)];
        at = c * MTGP32_STEP + t - skip;  // wraps past n for the words before skip
        threadgroup_barrier(mem_flags::mem_threadgroup);

        k += MTGP32_STEP;
        if (c < finished) kept = k;
    }
    uint number = mtgp32_output(word, t, dist, a, b);
    if (at < n) out[at] = number;
    for (uint j = t; j < MTGP32_N; j += MTGP32_STEP) s[j] = ring[(kept + j) & MTGP32_RING_MASK];
}

// The cpu variant (DESIGN §1): the same stream and state handling with one working thread per
// state, which walks each step word by word. Without barriers a threadgroup's threads run as a
// plain loop instead of fibers; one threadgroup per state keeps all cores busy. On a GPU this
// variant would leave 255 of 256 lanes idle.
kernel void mtgp32_serial(device uint* out [[buffer(0)]],  // extent: p.n
                          device uint* state [[buffer(1)]],  // extent: p.states * 351
                          device const uint* params [[buffer(2)]],  // extent: p.states * 36
                          constant MTGP32Params& p [[buffer(3)]],
                          uint g [[threadgroup_position_in_grid]],
                          uint lane [[thread_index_in_threadgroup]]) {
    const uint n = p.n, states = p.states, skip = p.skip, dist = p.dist;
    const float a = p.a, b = p.b;
    uint touched = (skip + n + MTGP32_STEP - 1u) / MTGP32_STEP;
    uint finished = (skip + n) / MTGP32_STEP;
    uint first = (g + states - p.chunk % states) % states;
    if (lane != 0u || g >= states || first >= touched) return;

    device const uint* set = params + MTGP32_PARAM_WORDS * g;
    device const uint* rec_tbl = set + 4;
    device const uint* tmp_tbl = set + 20;
    uint pos = set[0], sh1 = set[1], sh2 = set[2], mask = set[3];
    uint ring[MTGP32_RING];
    device uint* s = state + MTGP32_N * g;
    for (uint j = 0u; j < MTGP32_N; ++j) ring[j] = s[j];

    uint k = 0u, kept = 0u;
    for (uint c = first; c < touched; c += states) {
        for (uint t = 0u; t < MTGP32_STEP; t += 2u) {  // word pairs: Box–Muller's unit
            uint o[2];
            for (uint h = 0u; h < 2u; ++h) {
                uint u = t + h;
                uint x = (ring[(k + u) & MTGP32_RING_MASK] & mask) ^ ring[(k + u + 1u) & MTGP32_RING_MASK];
                x ^= x << sh1;
                uint y = x ^ (ring[(k + u + pos) & MTGP32_RING_MASK] >> sh2);
                uint r = y ^ rec_tbl[y & 15u];
                ring[(k + MTGP32_N + u) & MTGP32_RING_MASK] = r;
                o[h] = r ^ tmp_tbl[temper_index(ring[(k + u + pos - 1u) & MTGP32_RING_MASK])];
            }
            if (dist == RANDOM_UNIFORM) {
                o[0] = as_type<uint>(uniform(o[0], a, b));
                o[1] = as_type<uint>(uniform(o[1], a, b));
            } else if (dist == RANDOM_NORMAL) {
                float2 z = box_muller(o[0], o[1]);
                o[0] = as_type<uint>(fma(b, z.x, a));
                o[1] = as_type<uint>(fma(b, z.y, a));
            }
            uint at = c * MTGP32_STEP + t - skip;
            if (at < n) out[at] = o[0];
            if (at + 1u < n) out[at + 1u] = o[1];
        }
        k += MTGP32_STEP;
        if (c < finished) kept = k;
    }
    for (uint j = 0u; j < MTGP32_N; ++j) s[j] = ring[(kept + j) & MTGP32_RING_MASK];
}

// Initial states, born on the device: state b is the reference initialisation of parameter
// set b with seed (seed + b + 1), one thread per state (the recurrence is sequential).
struct MTGP32SeedParams {
    uint seed;
    uint states;
};

kernel void mtgp32_seed(device uint* state [[buffer(0)]],  // extent: p.states * 351
                        device const uint* params [[buffer(1)]],  // extent: p.states * 36
                        constant MTGP32SeedParams& p [[buffer(2)]],
                        uint b [[thread_position_in_grid]]) {
    if (b >= p.states) return;
    device const uint* tbl = params + MTGP32_PARAM_WORDS * b + 4u;
    uint hidden = tbl[4] ^ (tbl[8] << 16);
    uint fill = hidden;
    fill += fill >> 16;
    fill += fill >> 8;
    fill = (fill & 0xFFu) * 0x01010101u;  // the reference fills every byte with it first
    device uint* s = state + MTGP32_N * b;
    uint prev = p.seed + b + 1u;
    s[0] = prev;
    for (uint i = 1u; i < MTGP32_N; ++i) {
        prev = (i == 1u ? hidden : fill) ^ (1812433253u * (prev ^ (prev >> 30)) + i);
        s[i] = prev;
    }
}
