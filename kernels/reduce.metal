// Reductions and scans: threadgroup memory, barriers and simd functions at work.
#include <metal_stdlib>
using namespace metal;

struct SumParams {
    uint n;
};

// Partial sums: threadgroup g writes partial[g], the sum of its contiguous slice of x. Its
// threads stride through the slice together (coalesced on a GPU; on the cpu backend the
// slice stays in cache while one fiber after another walks it), then reduce by simd_sum
// within each simdgroup and through threadgroup memory across simdgroups. A second
// dispatch with one threadgroup sums the partials.
kernel void sum_partial(device const float* x [[buffer(0)]],  // extent: p.n
                        device float* partial [[buffer(1)]],
                        constant SumParams& p [[buffer(2)]],
                        uint lid [[thread_index_in_threadgroup]],
                        uint tpg [[threads_per_threadgroup]],
                        uint group [[threadgroup_position_in_grid]],
                        uint groups [[threadgroups_per_grid]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]],
                        uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float totals[32];
    uint per = (p.n + groups - 1) / groups;
    uint begin = group * per, end = min(begin + per, p.n);
    // Four independent partial sums: loads and adds overlap instead of waiting on one chain.
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    uint j = begin + lid;
    for (; j + 3 * tpg < end; j += 4 * tpg) {
        a0 += x[j];
        a1 += x[j + tpg];
        a2 += x[j + 2 * tpg];
        a3 += x[j + 3 * tpg];
    }
    for (; j < end; j += tpg) a0 += x[j];
    float acc = simd_sum((a0 + a1) + (a2 + a3));
    if (lane == 0) totals[sg] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float t = lane < nsg ? totals[lane] : 0.0f;
        t = simd_sum(t);
        if (lid == 0) partial[group] = t;
    }
}

struct ScanParams {
    uint n;
};

// Exclusive prefix sum of each threadgroup's slice of x (one element a thread), and the
// slice's total in block_sums[group]. `scan_add` then adds the scanned block sums back.
kernel void scan_block(device const uint* x [[buffer(0)]],  // extent: p.n
                       device uint* out [[buffer(1)]],  // extent: p.n
                       device uint* block_sums [[buffer(2)]],
                       constant ScanParams& p [[buffer(3)]],
                       uint i [[thread_position_in_grid]],
                       uint lid [[thread_index_in_threadgroup]],
                       uint group [[threadgroup_position_in_grid]],
                       uint lane [[thread_index_in_simdgroup]],
                       uint sg [[simdgroup_index_in_threadgroup]],
                       uint nsg [[simdgroups_per_threadgroup]],
                       uint tpg [[threads_per_threadgroup]]) {
    threadgroup uint simd_totals[32];
    uint v = i < p.n ? x[i] : 0u;
    uint before = simd_prefix_exclusive_sum(v);
    if (lane == 31) simd_totals[sg] = before + v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        uint t = lane < nsg ? simd_totals[lane] : 0u;
        uint t_before = simd_prefix_exclusive_sum(t);
        if (lane < nsg) simd_totals[lane] = t_before;
        if (lane == nsg - 1) block_sums[group] = t_before + t;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (i < p.n) out[i] = before + simd_totals[sg];
}

kernel void scan_add(device uint* out [[buffer(0)]],  // extent: p.n
                     device const uint* scanned_block_sums [[buffer(1)]],
                     constant ScanParams& p [[buffer(2)]],
                     uint i [[thread_position_in_grid]],
                     uint group [[threadgroup_position_in_grid]]) {
    if (i < p.n) out[i] += scanned_block_sums[group];
}

struct HistogramParams {
    uint n;
    uint bins;   // at most 1024
    uint shift;  // bin = (x >> shift) % bins
};

// Counts into threadgroup atomics first, so the device-memory atomics are one per bin per
// threadgroup rather than one per element.
kernel void histogram(device const uint* x [[buffer(0)]],  // extent: p.n
                      device atomic_uint* counts [[buffer(1)]],  // extent: p.bins
                      constant HistogramParams& p [[buffer(2)]],
                      uint i [[thread_position_in_grid]],
                      uint grid [[threads_per_grid]],
                      uint lid [[thread_index_in_threadgroup]],
                      uint tpg [[threads_per_threadgroup]]) {
    threadgroup atomic_uint local[1024];
    for (uint b = lid; b < p.bins; b += tpg) atomic_store_explicit(&local[b], 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = i; j < p.n; j += grid)
        atomic_fetch_add_explicit(&local[(x[j] >> p.shift) % p.bins], 1u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint b = lid; b < p.bins; b += tpg) {
        uint c = atomic_load_explicit(&local[b], memory_order_relaxed);
        if (c) atomic_fetch_add_explicit(&counts[b], c, memory_order_relaxed);
    }
}

// ---------------------------------------------------------------- reductions over any axes
//
// x's axes, size-1 ones dropped, fall into kept and reduced ones (neighbours of one kind merged
// by the host); each output element folds the `length` elements that share its kept
// coordinates. A pass writes `splits` partial results per output (split-major), each folding
// a `chunk` of them, and the host folds the partials in further passes until one is left. No
// term passes through more than 64 additions in a thread plus the tree of a threadgroup in
// any pass, whatever the length: the error bound of a sum stays that of a pairwise one.
//
// Storage types: x is read as its storage type In and folded in float; the result is stored
// once as Out. A reduction in half or bfloat is `<T, T>` when one pass does; a longer one
// writes its partial results as float (`<T, float>`, the instances named `_f16_f32`,
// `_bf16_f32`) and folds them in float (`<float, float>`) until the last pass, which rounds
// to T (`<float, T>`: `_f32_f16`, `_f32_bf16`). So a partial result never rounds to T, and the
// result rounds once, as in one pass. The variance's centre (the mean) is float too.

#define REDUCE_SUM 0
#define REDUCE_SQUARES 1  // Σ (x − centre)², the centre per output: the variance's second pass
#define REDUCE_MAX 2
#define REDUCE_MIN 3

struct ReduceParams {
    uint outputs;            // output elements
    uint length;             // elements folded into each
    uint chunk;              // of those, a split folds this many
    uint splits;             // partial results per output
    uint size;               // x's elements
    uint centres;            // centre's elements: `outputs` for squares, else 0 (it is not read)
    float scale;             // multiplies each result (1/length for a mean, 1 for partials)
    uint kept_dims;          // merged axes of x that are kept (at most 8) ...
    uint reduced_dims;       // ... and reduced (at most 8)
    uint kept_shape[8];
    uint kept_stride[8];     // in x's elements
    uint reduced_shape[8];
    uint reduced_stride[8];
};

inline uint kept_offset(constant ReduceParams& p, uint o) {
    uint at = 0;
    for (uint d = p.kept_dims; d-- > 0;) {
        at += o % p.kept_shape[d] * p.kept_stride[d];
        o /= p.kept_shape[d];
    }
    return at;
}

inline uint reduced_offset(constant ReduceParams& p, uint r) {
    uint at = 0;
    for (uint d = p.reduced_dims; d-- > 0;) {
        at += r % p.reduced_shape[d] * p.reduced_stride[d];
        r /= p.reduced_shape[d];
    }
    return at;
}

inline float fold_identity(uint op) {
    return op == REDUCE_MAX ? -INFINITY : op == REDUCE_MIN ? INFINITY : 0.0f;
}

// Neither max nor fmax, which drop a NaN: a NaN anywhere makes the max NaN, as in PyTorch
// (when neither comparison holds, a or b is NaN, and so is a + b).
inline float fold(uint op, float a, float b) {
    if (op == REDUCE_MAX) return a > b ? a : b >= a ? b : a + b;
    if (op == REDUCE_MIN) return a < b ? a : b <= a ? b : a + b;
    return a + b;
}

inline float term(uint op, float v, float centre) {
    return op == REDUCE_SQUARES ? (v - centre) * (v - centre) : v;
}

// A thread per (split, output) folds its chunk in order: for outputs whose kept axis is
// innermost (neighbouring threads read neighbouring addresses) or whose reductions are short.
template <typename In, typename Out, uint OP>
kernel void reduce_threads(device const In* x [[buffer(0)]],  // extent: p.size
                           device const float* centre [[buffer(1)]],  // extent: p.centres
                           device Out* out [[buffer(2)]],  // extent: p.splits * p.outputs
                           constant ReduceParams& p [[buffer(3)]],
                           uint t [[thread_position_in_grid]]) {
    if (t >= p.splits * p.outputs) return;
    uint o = t % p.outputs, split = t / p.outputs;
    uint base = kept_offset(p, o), begin = split * p.chunk, end = min(begin + p.chunk, p.length);
    float c = OP == REDUCE_SQUARES ? centre[o] : 0.0f, acc = fold_identity(OP);
    for (uint r = begin; r < end; ++r) acc = fold(OP, acc, term(OP, float(x[base + reduced_offset(p, r)]), c));
    out[t] = Out(acc * p.scale);
}

// A threadgroup per (split, output), its threads striding through the chunk together (so
// they read neighbouring addresses along an innermost reduced axis), then folding their
// results in a butterfly within each simdgroup and across simdgroups through threadgroup
// memory. The butterfly, not simd_max, keeps max's NaN rule.
template <typename In, typename Out, uint OP>
kernel void reduce_groups(device const In* x [[buffer(0)]],  // extent: p.size
                          device const float* centre [[buffer(1)]],  // extent: p.centres
                          device Out* out [[buffer(2)]],  // extent: p.splits * p.outputs
                          constant ReduceParams& p [[buffer(3)]],
                          uint group [[threadgroup_position_in_grid]],
                          uint lid [[thread_index_in_threadgroup]],
                          uint tpg [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]],
                          uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float totals[32];
    uint o = group % p.outputs, split = group / p.outputs;
    uint base = kept_offset(p, o), begin = split * p.chunk, end = min(begin + p.chunk, p.length);
    float c = OP == REDUCE_SQUARES ? centre[o] : 0.0f, acc = fold_identity(OP);
    for (uint r = begin + lid; r < end; r += tpg) acc = fold(OP, acc, term(OP, float(x[base + reduced_offset(p, r)]), c));
    for (uint d = 16; d > 0; d /= 2) acc = fold(OP, acc, simd_shuffle_xor(acc, d));
    if (lane == 0) totals[sg] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        acc = lane < nsg ? totals[lane] : fold_identity(OP);
        for (uint d = 16; d > 0; d /= 2) acc = fold(OP, acc, simd_shuffle_xor(acc, d));
        if (lid == 0) out[group] = Out(acc * p.scale);
    }
}

template [[host_name("sum_threads")]] [[kernel]] decltype(reduce_threads<float, float, REDUCE_SUM>) reduce_threads<float, float, REDUCE_SUM>;
template [[host_name("sum_threads_f16")]] [[kernel]] decltype(reduce_threads<half, half, REDUCE_SUM>) reduce_threads<half, half, REDUCE_SUM>;
template [[host_name("sum_threads_bf16")]] [[kernel]] decltype(reduce_threads<bfloat, bfloat, REDUCE_SUM>) reduce_threads<bfloat, bfloat, REDUCE_SUM>;
template [[host_name("sum_threads_f16_f32")]] [[kernel]] decltype(reduce_threads<half, float, REDUCE_SUM>) reduce_threads<half, float, REDUCE_SUM>;
template [[host_name("sum_threads_bf16_f32")]] [[kernel]] decltype(reduce_threads<bfloat, float, REDUCE_SUM>) reduce_threads<bfloat, float, REDUCE_SUM>;
template [[host_name("sum_threads_f32_f16")]] [[kernel]] decltype(reduce_threads<float, half, REDUCE_SUM>) reduce_threads<float, half, REDUCE_SUM>;
template [[host_name("sum_threads_f32_bf16")]] [[kernel]] decltype(reduce_threads<float, bfloat, REDUCE_SUM>) reduce_threads<float, bfloat, REDUCE_SUM>;

template [[host_name("squares_threads")]] [[kernel]] decltype(reduce_threads<float, float, REDUCE_SQUARES>) reduce_threads<float, float, REDUCE_SQUARES>;
template [[host_name("squares_threads_f16")]] [[kernel]] decltype(reduce_threads<half, half, REDUCE_SQUARES>) reduce_threads<half, half, REDUCE_SQUARES>;
template [[host_name("squares_threads_bf16")]] [[kernel]] decltype(reduce_threads<bfloat, bfloat, REDUCE_SQUARES>) reduce_threads<bfloat, bfloat, REDUCE_SQUARES>;
template [[host_name("squares_threads_f16_f32")]] [[kernel]] decltype(reduce_threads<half, float, REDUCE_SQUARES>) reduce_threads<half, float, REDUCE_SQUARES>;
template [[host_name("squares_threads_bf16_f32")]] [[kernel]] decltype(reduce_threads<bfloat, float, REDUCE_SQUARES>) reduce_threads<bfloat, float, REDUCE_SQUARES>;

template [[host_name("max_threads")]] [[kernel]] decltype(reduce_threads<float, float, REDUCE_MAX>) reduce_threads<float, float, REDUCE_MAX>;
template [[host_name("max_threads_f16")]] [[kernel]] decltype(reduce_threads<half, half, REDUCE_MAX>) reduce_threads<half, half, REDUCE_MAX>;
template [[host_name("max_threads_bf16")]] [[kernel]] decltype(reduce_threads<bfloat, bfloat, REDUCE_MAX>) reduce_threads<bfloat, bfloat, REDUCE_MAX>;
template [[host_name("max_threads_f16_f32")]] [[kernel]] decltype(reduce_threads<half, float, REDUCE_MAX>) reduce_threads<half, float, REDUCE_MAX>;
template [[host_name("max_threads_bf16_f32")]] [[kernel]] decltype(reduce_threads<bfloat, float, REDUCE_MAX>) reduce_threads<bfloat, float, REDUCE_MAX>;
template [[host_name("max_threads_f32_f16")]] [[kernel]] decltype(reduce_threads<float, half, REDUCE_MAX>) reduce_threads<float, half, REDUCE_MAX>;
template [[host_name("max_threads_f32_bf16")]] [[kernel]] decltype(reduce_threads<float, bfloat, REDUCE_MAX>) reduce_threads<float, bfloat, REDUCE_MAX>;

template [[host_name("min_threads")]] [[kernel]] decltype(reduce_threads<float, float, REDUCE_MIN>) reduce_threads<float, float, REDUCE_MIN>;
template [[host_name("min_threads_f16")]] [[kernel]] decltype(reduce_threads<half, half, REDUCE_MIN>) reduce_threads<half, half, REDUCE_MIN>;
template [[host_name("min_threads_bf16")]] [[kernel]] decltype(reduce_threads<bfloat, bfloat, REDUCE_MIN>) reduce_threads<bfloat, bfloat, REDUCE_MIN>;
template [[host_name("min_threads_f16_f32")]] [[kernel]] decltype(reduce_threads<half, float, REDUCE_MIN>) reduce_threads<half, float, REDUCE_MIN>;
template [[host_name("min_threads_bf16_f32")]] [[kernel]] decltype(reduce_threads<bfloat, float, REDUCE_MIN>) reduce_threads<bfloat, float, REDUCE_MIN>;
template [[host_name("min_threads_f32_f16")]] [[kernel]] decltype(reduce_threads<float, half, REDUCE_MIN>) reduce_threads<float, half, REDUCE_MIN>;
template [[host_name("min_threads_f32_bf16")]] [[kernel]] decltype(reduce_threads<float, bfloat, REDUCE_MIN>) reduce_threads<float, bfloat, REDUCE_MIN>;

template [[host_name("sum_groups")]] [[kernel]] decltype(reduce_groups<float, float, REDUCE_SUM>) reduce_groups<float, float, REDUCE_SUM>;
template [[host_name("sum_groups_f16")]] [[kernel]] decltype(reduce_groups<half, half, REDUCE_SUM>) reduce_groups<half, half, REDUCE_SUM>;
template [[host_name("sum_groups_bf16")]] [[kernel]] decltype(reduce_groups<bfloat, bfloat, REDUCE_SUM>) reduce_groups<bfloat, bfloat, REDUCE_SUM>;
template [[host_name("sum_groups_f16_f32")]] [[kernel]] decltype(reduce_groups<half, float, REDUCE_SUM>) reduce_groups<half, float, REDUCE_SUM>;
template [[host_name("sum_groups_bf16_f32")]] [[kernel]] decltype(reduce_groups<bfloat, float, REDUCE_SUM>) reduce_groups<bfloat, float, REDUCE_SUM>;
template [[host_name("sum_groups_f32_f16")]] [[kernel]] decltype(reduce_groups<float, half, REDUCE_SUM>) reduce_groups<float, half, REDUCE_SUM>;
template [[host_name("sum_groups_f32_bf16")]] [[kernel]] decltype(reduce_groups<float, bfloat, REDUCE_SUM>) reduce_groups<float, bfloat, REDUCE_SUM>;

template [[host_name("squares_groups")]] [[kernel]] decltype(reduce_groups<float, float, REDUCE_SQUARES>) reduce_groups<float, float, REDUCE_SQUARES>;
template [[host_name("squares_groups_f16")]] [[kernel]] decltype(reduce_groups<half, half, REDUCE_SQUARES>) reduce_groups<half, half, REDUCE_SQUARES>;
template [[host_name("squares_groups_bf16")]] [[kernel]] decltype(reduce_groups<bfloat, bfloat, REDUCE_SQUARES>) reduce_groups<bfloat, bfloat, REDUCE_SQUARES>;
template [[host_name("squares_groups_f16_f32")]] [[kernel]] decltype(reduce_groups<half, float, REDUCE_SQUARES>) reduce_groups<half, float, REDUCE_SQUARES>;
template [[host_name("squares_groups_bf16_f32")]] [[kernel]] decltype(reduce_groups<bfloat, float, REDUCE_SQUARES>) reduce_groups<bfloat, float, REDUCE_SQUARES>;

template [[host_name("max_groups")]] [[kernel]] decltype(reduce_groups<float, float, REDUCE_MAX>) reduce_groups<float, float, REDUCE_MAX>;
template [[host_name("max_groups_f16")]] [[kernel]] decltype(reduce_groups<half, half, REDUCE_MAX>) reduce_groups<half, half, REDUCE_MAX>;
template [[host_name("max_groups_bf16")]] [[kernel]] decltype(reduce_groups<bfloat, bfloat, REDUCE_MAX>) reduce_groups<bfloat, bfloat, REDUCE_MAX>;
template [[host_name("max_groups_f16_f32")]] [[kernel]] decltype(reduce_groups<half, float, REDUCE_MAX>) reduce_groups<half, float, REDUCE_MAX>;
template [[host_name("max_groups_bf16_f32")]] [[kernel]] decltype(reduce_groups<bfloat, float, REDUCE_MAX>) reduce_groups<bfloat, float, REDUCE_MAX>;
template [[host_name("max_groups_f32_f16")]] [[kernel]] decltype(reduce_groups<float, half, REDUCE_MAX>) reduce_groups<float, half, REDUCE_MAX>;
template [[host_name("max_groups_f32_bf16")]] [[kernel]] decltype(reduce_groups<float, bfloat, REDUCE_MAX>) reduce_groups<float, bfloat, REDUCE_MAX>;

template [[host_name("min_groups")]] [[kernel]] decltype(reduce_groups<float, float, REDUCE_MIN>) reduce_groups<float, float, REDUCE_MIN>;
template [[host_name("min_groups_f16")]] [[kernel]] decltype(reduce_groups<half, half, REDUCE_MIN>) reduce_groups<half, half, REDUCE_MIN>;
template [[host_name("min_groups_bf16")]] [[kernel]] decltype(reduce_groups<bfloat, bfloat, REDUCE_MIN>) reduce_groups<bfloat, bfloat, REDUCE_MIN>;
template [[host_name("min_groups_f16_f32")]] [[kernel]] decltype(reduce_groups<half, float, REDUCE_MIN>) reduce_groups<half, float, REDUCE_MIN>;
template [[host_name("min_groups_bf16_f32")]] [[kernel]] decltype(reduce_groups<bfloat, float, REDUCE_MIN>) reduce_groups<bfloat, float, REDUCE_MIN>;
template [[host_name("min_groups_f32_f16")]] [[kernel]] decltype(reduce_groups<float, half, REDUCE_MIN>) reduce_groups<float, half, REDUCE_MIN>;
template [[host_name("min_groups_f32_bf16")]] [[kernel]] decltype(reduce_groups<float, bfloat, REDUCE_MIN>) reduce_groups<float, bfloat, REDUCE_MIN>;
