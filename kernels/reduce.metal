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
