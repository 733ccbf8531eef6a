// Instance and batch normalisation over NCHW float32 images, forward and backward.
//
// Both normalise a group of elements by the group's mean and variance: instance norm one
// (n, c) plane of H·W pixels, batch norm channel c across the batch, N planes. One threadgroup
// handles one group: threadgroup (c, n) reads planes (n + r)·C + c for r < rows. Instance norm
// dispatches (C, N) groups with rows = 1; batch norm (C, 1) groups with rows = N.
//
// Statistics read x once and never form E[x²] − E[x]². A group small enough to be held in
// registers (the usual case: see NORM_CACHE) sums its values per thread and then across the
// threadgroup for the mean, then sums (x − mean)² from the registers: the two-pass method,
// with one read of memory. Larger groups stream x once through Welford's update per thread
// and merge the threads' (count, mean, M2) with Chan's formula written as two sums,
//   mean = Σ nₜ·meanₜ / n,   M2 = Σ M2ₜ + nₜ·(meanₜ − mean)²,
// whose terms are all non-negative. The values are first shifted by the group's first
// element, so that a mean far from zero (relative to the spread) costs no precision in the
// sums: x − mean is computed as (x − shift) − shifted mean.
#include <metal_stdlib>
using namespace metal;

struct NormParams {
    uint channels;
    uint rows;      // planes per group: 1 (instance norm) or N (batch norm)
    uint hw;        // elements per plane
    float eps;
};

// Σ v over the threadgroup, returned to every thread. Each simdgroup adds the per-simdgroup
// totals itself, in the same order, so all threads see the same bits without a broadcast.
inline float group_sum(float v, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
    v = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // scratch may still be read by the last call
    if (lane == 0) scratch[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return simd_sum(lane < nsg ? scratch[lane] : 0.0f);
}

// Offset of plane r of the group.
inline uint plane_offset(constant NormParams& p, uint2 group, uint r) {
    return ((group.y + r) * p.channels + group.x) * p.hw;
}

// A group that fits in NORM_CACHE elements a thread (instance norm up to 16·1024 pixels on a
// GPU) is read from device memory once: each thread keeps its elements in registers between
// the passes (the loops over k unroll, so `cache[k]` is a register). Larger groups, and batch
// norm's groups of several planes, read x again in each pass.
#define NORM_CACHE 16

struct Moments {
    float shift;  // the group's first element
    float mean;   // of x − shift
    float var;    // biased
};

inline void welford(float v, thread float& n, thread float& mean, thread float& m2) {
    n += 1.0f;
    float d = v - mean;
    mean += d / n;
    m2 = fma(d, v - mean, m2);
}

inline bool fits_cache(constant NormParams& p, uint tpg) {
    return p.rows == 1 && p.hw <= NORM_CACHE * tpg;
}

// The group's statistics, to every thread. When the group fits, cache[k] receives this
// thread's k-th element minus the shift.
inline Moments group_moments(device const float* x, constant NormParams& p, uint2 group, uint lid, uint tpg,
                             thread float* cache, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
    float shift = x[plane_offset(p, group, 0)];
    float count = float(p.rows * p.hw);
    if (fits_cache(p, tpg)) {
        device const float* plane = x + plane_offset(p, group, 0);
        float sum = 0.0f;
        for (uint k = 0; k < NORM_CACHE; k++) {
            uint i = lid + k * tpg;
            cache[k] = i < p.hw ? plane[i] - shift : 0.0f;
            sum += cache[k];
        }
        float mean = group_sum(sum, scratch, lane, sg, nsg) / count;
        float m2 = 0.0f;
        for (uint k = 0; k < NORM_CACHE; k++) {
            float d = lid + k * tpg < p.hw ? cache[k] - mean : 0.0f;
            m2 = fma(d, d, m2);
        }
        Moments m = {shift, mean, group_sum(m2, scratch, lane, sg, nsg) / count};
        return m;
    }
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (uint r = 0; r < p.rows; r++) {
        device const float* plane = x + plane_offset(p, group, r);
        for (uint i = lid; i < p.hw; i += tpg) welford(plane[i] - shift, n, mean, m2);
    }
    float total_mean = group_sum(n * mean, scratch, lane, sg, nsg) / count;
    float d = mean - total_mean;
    float total_m2 = group_sum(fma(n * d, d, m2), scratch, lane, sg, nsg);
    Moments m = {shift, total_mean, total_m2 / count};
    return m;
}

// out = (x − mean)/√(var + eps)·γ[c] + β[c]; stats[group] = (mean, var) for batch norm's running averages.
kernel void norm_forward(device const float* x [[buffer(0)]],
                         device const float* gamma [[buffer(1)]],  // extent: p.channels
                         device const float* beta [[buffer(2)]],  // extent: p.channels
                         device float* out [[buffer(3)]],
                         device float* stats [[buffer(4)]],
                         constant NormParams& p [[buffer(5)]],
                         uint2 group [[threadgroup_position_in_grid]],
                         uint lid [[thread_index_in_threadgroup]],
                         uint tpg [[threads_per_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float cache[NORM_CACHE];
    Moments m = group_moments(x, p, group, lid, tpg, cache, scratch, lane, sg, nsg);
    float a = gamma[group.x] / precise::sqrt(m.var + p.eps), b = beta[group.x];
    if (fits_cache(p, tpg)) {
        device float* plane = out + plane_offset(p, group, 0);
        for (uint k = 0; k < NORM_CACHE; k++) {
            uint i = lid + k * tpg;
            if (i < p.hw) plane[i] = fma(cache[k] - m.mean, a, b);
        }
    } else {
        for (uint r = 0; r < p.rows; r++) {
            uint base = plane_offset(p, group, r);
            for (uint i = lid; i < p.hw; i += tpg) out[base + i] = fma((x[base + i] - m.shift) - m.mean, a, b);
        }
    }
    if (lid == 0) {
        uint at = group.y * p.channels + group.x;
        stats[2 * at] = m.shift + m.mean;
        stats[2 * at + 1] = m.var;
    }
}

// With x̂ = (x − mean)·rstd and m the group's size:
//   dx = γ·rstd·(g − Σg/m − x̂·Σ(g·x̂)/m),
// and the group's Σ(g·x̂), Σg go to partial[group] for the γ and β gradients (norm_param_grad).
kernel void norm_backward(device const float* g [[buffer(0)]],
                          device const float* x [[buffer(1)]],
                          device const float* gamma [[buffer(2)]],  // extent: p.channels
                          device float* dx [[buffer(3)]],
                          device float* partial [[buffer(4)]],
                          constant NormParams& p [[buffer(5)]],
                          uint2 group [[threadgroup_position_in_grid]],
                          uint lid [[thread_index_in_threadgroup]],
                          uint tpg [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]],
                          uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float cache[NORM_CACHE], g_cache[NORM_CACHE];
    bool cached = fits_cache(p, tpg);
    if (cached) {  // issue the loads of g before the statistics' reduction waits on x
        device const float* plane = g + plane_offset(p, group, 0);
        for (uint k = 0; k < NORM_CACHE; k++) {
            uint i = lid + k * tpg;
            g_cache[k] = i < p.hw ? plane[i] : 0.0f;
        }
    }
    Moments m = group_moments(x, p, group, lid, tpg, cache, scratch, lane, sg, nsg);
    float rstd = 1.0f / precise::sqrt(m.var + p.eps);
    float sum_g = 0.0f, sum_gx = 0.0f;
    if (cached) {
        for (uint k = 0; k < NORM_CACHE; k++) {  // padding entries are 0 and add nothing
            sum_g += g_cache[k];
            sum_gx = fma(g_cache[k], (cache[k] - m.mean) * rstd, sum_gx);
        }
    } else {
        for (uint r = 0; r < p.rows; r++) {
            uint base = plane_offset(p, group, r);
            for (uint i = lid; i < p.hw; i += tpg) {
                float gv = g[base + i];
                sum_g += gv;
                sum_gx = fma(gv, ((x[base + i] - m.shift) - m.mean) * rstd, sum_gx);
            }
        }
    }
    sum_g = group_sum(sum_g, scratch, lane, sg, nsg);
    sum_gx = group_sum(sum_gx, scratch, lane, sg, nsg);
    float count = float(p.rows * p.hw);
    float a = gamma[group.x] * rstd, mean_g = sum_g / count, mean_gx = sum_gx / count;
    if (cached) {
        device float* plane = dx + plane_offset(p, group, 0);
        for (uint k = 0; k < NORM_CACHE; k++) {
            uint i = lid + k * tpg;
            if (i < p.hw) plane[i] = a * (g_cache[k] - mean_g - (cache[k] - m.mean) * rstd * mean_gx);
        }
    } else {
        for (uint r = 0; r < p.rows; r++) {
            uint base = plane_offset(p, group, r);
            for (uint i = lid; i < p.hw; i += tpg) {
                float xh = ((x[base + i] - m.shift) - m.mean) * rstd;
                dx[base + i] = a * (g[base + i] - mean_g - xh * mean_gx);
            }
        }
    }
    if (lid == 0) {
        uint at = group.y * p.channels + group.x;
        partial[2 * at] = sum_gx;
        partial[2 * at + 1] = sum_g;
    }
}

struct ParamGradParams {
    uint channels;
    uint groups;  // partials per channel: N for instance norm, 1 for batch norm
};

// dγ[c] = Σₙ Σ(g·x̂), dβ[c] = Σₙ Σg: the per-group partials added in a fixed order.
kernel void norm_param_grad(device const float* partial [[buffer(0)]],  // extent: 2 * p.groups * p.channels
                            device float* dgamma [[buffer(1)]],  // extent: p.channels
                            device float* dbeta [[buffer(2)]],  // extent: p.channels
                            constant ParamGradParams& p [[buffer(3)]],
                            uint c [[thread_position_in_grid]]) {
    if (c >= p.channels) return;
    float sum_gx = 0.0f, sum_g = 0.0f;
    for (uint n = 0; n < p.groups; n++) {
        sum_gx += partial[2 * (n * p.channels + c)];
        sum_g += partial[2 * (n * p.channels + c) + 1];
    }
    dgamma[c] = sum_gx;
    dbeta[c] = sum_g;
}

struct RunningParams {
    uint channels;
    float count;     // elements per channel, N·H·W (> 1)
    float momentum;
};

// PyTorch's running averages: mean ← (1 − m)·mean + m·batch mean, and the same for the
// variance with the batch's unbiased variance. Updates the buffers in place.
kernel void batch_norm_update(device const float* stats [[buffer(0)]],  // extent: 2 * p.channels
                              device float* running_mean [[buffer(1)]],  // extent: p.channels
                              device float* running_var [[buffer(2)]],  // extent: p.channels
                              constant RunningParams& p [[buffer(3)]],
                              uint c [[thread_position_in_grid]]) {
    if (c >= p.channels) return;
    float unbiased = stats[2 * c + 1] * p.count / (p.count - 1.0f);
    running_mean[c] = mix(running_mean[c], stats[2 * c], p.momentum);
    running_var[c] = mix(running_var[c], unbiased, p.momentum);
}

struct InferenceParams {
    uint count;  // N·C·H·W
    uint channels;
    uint hw;
    float eps;
};

// out = (x − running mean)/√(running var + eps)·γ + β, elementwise.
kernel void batch_norm_inference(device const float* x [[buffer(0)]],  // extent: p.count
                                 device const float* gamma [[buffer(1)]],  // extent: p.channels
                                 device const float* beta [[buffer(2)]],  // extent: p.channels
                                 device const float* mean [[buffer(3)]],  // extent: p.channels
                                 device const float* var [[buffer(4)]],  // extent: p.channels
                                 device float* out [[buffer(5)]],  // extent: p.count
                                 constant InferenceParams& p [[buffer(6)]],
                                 uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    uint c = (i / p.hw) % p.channels;
    out[i] = fma(x[i] - mean[c], gamma[c] / precise::sqrt(var[c] + p.eps), beta[c]);
}

// The inference-mode gradients, one threadgroup per channel (the statistics are constants):
// dx = g·γ·rstd, dγ[c] = Σ g·x̂, dβ[c] = Σ g.
kernel void batch_norm_inference_grad(device const float* g [[buffer(0)]],  // extent: p.rows * p.channels * p.hw
                                      device const float* x [[buffer(1)]],  // extent: p.rows * p.channels * p.hw
                                      device const float* gamma [[buffer(2)]],  // extent: p.channels
                                      device const float* mean [[buffer(3)]],  // extent: p.channels
                                      device const float* var [[buffer(4)]],  // extent: p.channels
                                      device float* dx [[buffer(5)]],  // extent: p.rows * p.channels * p.hw
                                      device float* dgamma [[buffer(6)]],  // extent: p.channels
                                      device float* dbeta [[buffer(7)]],  // extent: p.channels
                                      constant NormParams& p [[buffer(8)]],
                                      uint2 group [[threadgroup_position_in_grid]],
                                      uint lid [[thread_index_in_threadgroup]],
                                      uint tpg [[threads_per_threadgroup]],
                                      uint lane [[thread_index_in_simdgroup]],
                                      uint sg [[simdgroup_index_in_threadgroup]],
                                      uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    uint c = group.x;
    float rstd = 1.0f / precise::sqrt(var[c] + p.eps), a = gamma[c] * rstd;
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (uint r = 0; r < p.rows; r++) {
        uint base = plane_offset(p, group, r);
        for (uint i = lid; i < p.hw; i += tpg) {
            float gv = g[base + i];
            sum_g += gv;
            sum_gx = fma(gv, (x[base + i] - mean[c]) * rstd, sum_gx);
            dx[base + i] = gv * a;
        }
    }
    sum_g = group_sum(sum_g, scratch, lane, sg, nsg);
    sum_gx = group_sum(sum_gx, scratch, lane, sg, nsg);
    if (lid == 0) {
        dgamma[c] = sum_gx;
        dbeta[c] = sum_g;
    }
}
