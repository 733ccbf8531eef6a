// Instance, group, layer and batch normalisation, forward and backward.
//
// Each normalises a group of elements by the group's mean and variance, then scales and shifts
// each element by its γ and β entry. One threadgroup handles one group, which is `rows` blocks of
// `hw` contiguous elements, block r of group i at (i + r·channels)·hw:
//
//   instance norm of (N, C, S)   N·C groups   rows 1   hw S      planes 1
//   group norm (G groups)        N·G groups   rows 1   hw C/G·S  planes C/G
//   layer norm of (R, M)         R groups     rows 1   hw M      planes M
//   batch norm of (N, C, S)      C groups     rows N   hw S      planes 1
//
// A block is `planes` planes of hw/planes elements, each plane with its own γ and β entry:
// entry (i mod channels)·planes + plane. Instance norm is group norm with G = C.
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
//
// The kernels that read or write activations (x, out, g, dx) are templates over their storage
// type T (float, half, bfloat), instantiated as `name`, `name_f16` and `name_bf16`: they load into
// float, compute in float and round once when they store. γ, β, the statistics, the running
// statistics and the γ and β gradients are float32 whatever T (mixed precision keeps them so);
// the kernels that touch only those (norm_param_grad, batch_norm_update) are not templates.
#include <metal_stdlib>
using namespace metal;

#include "store.h"

struct NormParams {
    uint channels;  // groups per sample (C, G or 1); batch norm: C, the stride between a group's blocks
    uint rows;      // blocks per group: 1, or N for batch norm
    uint hw;        // elements per block
    uint planes;    // γ, β entries per group, one per plane of hw / planes elements
    float eps;
    uint relu;      // norm_forward: a fused relu on the output (store.h)
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

// Offset of block r of group i.
inline uint block_offset(constant NormParams& p, uint group, uint r) {
    return (group + r * p.channels) * p.hw;
}

// The plane of the elements start, start + step, start + 2·step, … of a block of planes of
// `size` elements, followed without a division per element.
struct Cursor {
    uint plane, offset;  // of the current element
    uint plane_step, offset_step, size;
};

inline Cursor cursor(uint start, uint step, uint size) {
    Cursor c = {start / size, start % size, step / size, step % size, size};
    return c;
}

inline void advance(thread Cursor& c) {
    c.plane += c.plane_step;
    c.offset += c.offset_step;
    if (c.offset >= c.size) {
        c.offset -= c.size;
        c.plane++;
    }
}

// A group that fits in NORM_CACHE elements a thread (instance norm up to 16·1024 pixels on a
// GPU) is read from device memory once: each thread keeps its elements in registers between
// the passes (the loops over k unroll, so `cache[k]` is a register). Larger groups, and batch
// norm's groups of several blocks, read x again in each pass.
#define NORM_CACHE 16

// Where a group does not fit, each thread streams its elements NORM_STREAM at a time: their loads
// are issued together, then the arithmetic runs element by element in the order it always does
// (the same bits as one at a time). One load in flight a thread left a GPU's memory mostly idle:
// the largest groups (instance norm of 256² planes) are few, a threadgroup a multiprocessor, and
// a store's possible aliasing keeps the compiler from issuing the next element's load early.
#define NORM_STREAM 4

// v[u] = block[i + u·step] for the NORM_STREAM elements of one turn, 0 past n.
template <typename T>
inline void stream_loads(device const T* block, uint i, uint step, uint n, thread float* v) {
    for (uint u = 0; u < NORM_STREAM; u++) v[u] = i + u * step < n ? float(block[i + u * step]) : 0.0f;
}

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
template <typename T>
inline Moments group_moments(device const T* x, constant NormParams& p, uint group, uint lid, uint tpg,
                             thread float* cache, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
    float shift = float(x[block_offset(p, group, 0)]);
    float count = float(p.rows * p.hw);
    if (fits_cache(p, tpg)) {
        device const T* block = x + block_offset(p, group, 0);
        float sum = 0.0f;
        for (uint k = 0; k < NORM_CACHE; k++) {
            uint i = lid + k * tpg;
            cache[k] = i < p.hw ? float(block[i]) - shift : 0.0f;
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
        device const T* block = x + block_offset(p, group, r);
        for (uint i = lid; i < p.hw; i += NORM_STREAM * tpg) {
            float v[NORM_STREAM];
            stream_loads(block, i, tpg, p.hw, v);
            for (uint u = 0; u < NORM_STREAM; u++)
                if (i + u * tpg < p.hw) welford(v[u] - shift, n, mean, m2);
        }
    }
    float total_mean = group_sum(n * mean, scratch, lane, sg, nsg) / count;
    float d = mean - total_mean;
    float total_m2 = group_sum(fma(n * d, d, m2), scratch, lane, sg, nsg);
    Moments m = {shift, total_mean, total_m2 / count};
    return m;
}

// out = (x − mean)/√(var + eps)·γ + β (through a fused relu where p.relu); stats[group] = (mean, var)
// for batch norm's running averages.
template <typename T>
kernel void norm_forward(device const T* x [[buffer(0)]],
                         device const float* gamma [[buffer(1)]],  // extent: p.channels * p.planes
                         device const float* beta [[buffer(2)]],  // extent: p.channels * p.planes
                         device T* out [[buffer(3)]],
                         device float* stats [[buffer(4)]],
                         constant NormParams& p [[buffer(5)]],
                         uint group [[threadgroup_position_in_grid]],
                         uint lid [[thread_index_in_threadgroup]],
                         uint tpg [[threads_per_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float cache[NORM_CACHE];
    Moments m = group_moments(x, p, group, lid, tpg, cache, scratch, lane, sg, nsg);
    float rstd = 1.0f / precise::sqrt(m.var + p.eps);
    device const float* g_entry = gamma + (group % p.channels) * p.planes;  // this group's γ and β
    device const float* b_entry = beta + (group % p.channels) * p.planes;
    uint plane = p.hw / p.planes;
    if (fits_cache(p, tpg)) {
        device T* block = out + block_offset(p, group, 0);
        Cursor at = cursor(lid, tpg, plane);
        for (uint k = 0; k < NORM_CACHE; k++, advance(at)) {
            uint i = lid + k * tpg;
            if (i < p.hw) block[i] = stored_output<T>(fma(cache[k] - m.mean, g_entry[at.plane] * rstd, b_entry[at.plane]), p.relu);
        }
    } else {
        for (uint r = 0; r < p.rows; r++) {
            uint base = block_offset(p, group, r);
            Cursor at = cursor(lid, tpg, plane);
            for (uint i = lid; i < p.hw; i += NORM_STREAM * tpg) {
                float v[NORM_STREAM];
                stream_loads(x + base, i, tpg, p.hw, v);
                for (uint u = 0; u < NORM_STREAM; u++, advance(at))
                    if (i + u * tpg < p.hw)
                        out[base + i + u * tpg] = stored_output<T>(fma((v[u] - m.shift) - m.mean, g_entry[at.plane] * rstd,
                                                                       b_entry[at.plane]), p.relu);
            }
        }
    }
    if (lid == 0) {
        stats[2 * group] = m.shift + m.mean;
        stats[2 * group + 1] = m.var;
    }
}

template [[host_name("norm_forward")]] [[kernel]] decltype(norm_forward<float>) norm_forward<float>;
template [[host_name("norm_forward_f16")]] [[kernel]] decltype(norm_forward<half>) norm_forward<half>;
template [[host_name("norm_forward_bf16")]] [[kernel]] decltype(norm_forward<bfloat>) norm_forward<bfloat>;

// With x̂ = (x − mean)·rstd, m the group's size and ĝ = γ·g the gradient with respect to x̂:
//   dx = rstd·(ĝ − Σĝ/m − x̂·Σ(ĝ·x̂)/m).
// A group with one γ entry (instance, batch norm) sums g rather than ĝ and multiplies by γ
// after: its Σ(g·x̂) and Σg are then also its shares of dγ and dβ, which go to partial[group]
// (for norm_param_grad). A group of several planes writes (shift, mean, rstd) to
// moments[group] instead, for norm_affine_grad or norm_affine_columns.
template <typename T>
kernel void norm_backward(device const T* g [[buffer(0)]],
                          device const T* x [[buffer(1)]],
                          device const float* gamma [[buffer(2)]],  // extent: p.channels * p.planes
                          device T* dx [[buffer(3)]],
                          device float* partial [[buffer(4)]],
                          device float* moments [[buffer(5)]],
                          constant NormParams& p [[buffer(6)]],
                          uint group [[threadgroup_position_in_grid]],
                          uint lid [[thread_index_in_threadgroup]],
                          uint tpg [[threads_per_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]],
                          uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float cache[NORM_CACHE], g_cache[NORM_CACHE];
    bool cached = fits_cache(p, tpg);
    if (cached) {  // issue the loads of g before the statistics' reduction waits on x
        device const T* block = g + block_offset(p, group, 0);
        for (uint k = 0; k < NORM_CACHE; k++) {
            uint i = lid + k * tpg;
            g_cache[k] = i < p.hw ? float(block[i]) : 0.0f;
        }
    }
    Moments m = group_moments(x, p, group, lid, tpg, cache, scratch, lane, sg, nsg);
    float rstd = 1.0f / precise::sqrt(m.var + p.eps);
    device const float* entry = gamma + (group % p.channels) * p.planes;
    uint plane = p.hw / p.planes;
    bool one_entry = p.planes == 1;
    float sum_g = 0.0f, sum_gx = 0.0f;
    if (cached) {
        Cursor at = cursor(lid, tpg, plane);
        for (uint k = 0; k < NORM_CACHE; k++, advance(at)) {  // padding entries are 0 and add nothing
            float gv = one_entry || lid + k * tpg >= p.hw ? g_cache[k] : entry[at.plane] * g_cache[k];
            sum_g += gv;
            sum_gx = fma(gv, (cache[k] - m.mean) * rstd, sum_gx);
        }
    } else {
        for (uint r = 0; r < p.rows; r++) {
            uint base = block_offset(p, group, r);
            Cursor at = cursor(lid, tpg, plane);
            for (uint i = lid; i < p.hw; i += NORM_STREAM * tpg) {
                float gs[NORM_STREAM], xs[NORM_STREAM];
                stream_loads(g + base, i, tpg, p.hw, gs);
                stream_loads(x + base, i, tpg, p.hw, xs);
                for (uint u = 0; u < NORM_STREAM; u++, advance(at)) {
                    if (i + u * tpg >= p.hw) continue;
                    float gv = one_entry ? gs[u] : entry[at.plane] * gs[u];
                    sum_g += gv;
                    sum_gx = fma(gv, ((xs[u] - m.shift) - m.mean) * rstd, sum_gx);
                }
            }
        }
    }
    sum_g = group_sum(sum_g, scratch, lane, sg, nsg);
    sum_gx = group_sum(sum_gx, scratch, lane, sg, nsg);
    if (lid == 0 && one_entry) {
        partial[2 * group] = sum_gx;
        partial[2 * group + 1] = sum_g;
    } else if (lid == 0) {
        moments[3 * group] = m.shift;
        moments[3 * group + 1] = m.mean;
        moments[3 * group + 2] = rstd;
    }
    if (one_entry) {
        sum_g *= entry[0];
        sum_gx *= entry[0];
    }
    float count = float(p.rows * p.hw);
    float mean_g = sum_g / count, mean_gx = sum_gx / count;
    if (cached) {
        device T* block = dx + block_offset(p, group, 0);
        Cursor at = cursor(lid, tpg, plane);
        for (uint k = 0; k < NORM_CACHE; k++, advance(at)) {
            uint i = lid + k * tpg;
            if (i < p.hw)
                block[i] = T(rstd * (entry[at.plane] * g_cache[k] - mean_g - (cache[k] - m.mean) * rstd * mean_gx));
        }
    } else {
        for (uint r = 0; r < p.rows; r++) {
            uint base = block_offset(p, group, r);
            Cursor at = cursor(lid, tpg, plane);
            for (uint i = lid; i < p.hw; i += NORM_STREAM * tpg) {
                float gs[NORM_STREAM], xs[NORM_STREAM];
                stream_loads(g + base, i, tpg, p.hw, gs);
                stream_loads(x + base, i, tpg, p.hw, xs);
                for (uint u = 0; u < NORM_STREAM; u++, advance(at)) {
                    if (i + u * tpg >= p.hw) continue;
                    float xh = ((xs[u] - m.shift) - m.mean) * rstd;
                    dx[base + i + u * tpg] = T(rstd * (entry[at.plane] * gs[u] - mean_g - xh * mean_gx));
                }
            }
        }
    }
}

template [[host_name("norm_backward")]] [[kernel]] decltype(norm_backward<float>) norm_backward<float>;
template [[host_name("norm_backward_f16")]] [[kernel]] decltype(norm_backward<half>) norm_backward<half>;
template [[host_name("norm_backward_bf16")]] [[kernel]] decltype(norm_backward<bfloat>) norm_backward<bfloat>;

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

struct AffineGradParams {
    uint channels;  // groups per sample
    uint samples;   // groups / channels: N (group norm) or R (layer norm)
    uint hw;        // elements per group
    uint planes;    // γ entries per group
};

// dγ[e] = Σ g·x̂, dβ[e] = Σ g over the elements of γ entry e (plane e mod planes of groups
// n·channels + e / planes, for every sample n), with norm_backward's moments of each group: one
// threadgroup per entry, its threads along the planes' contiguous pixels (group norm).
template <typename T>
kernel void norm_affine_grad(device const T* g [[buffer(0)]],  // extent: p.samples * p.channels * p.hw
                             device const T* x [[buffer(1)]],  // extent: p.samples * p.channels * p.hw
                             device const float* moments [[buffer(2)]],  // extent: 3 * p.samples * p.channels
                             device float* dgamma [[buffer(3)]],  // extent: p.channels * p.planes
                             device float* dbeta [[buffer(4)]],  // extent: p.channels * p.planes
                             constant AffineGradParams& p [[buffer(5)]],
                             uint e [[threadgroup_position_in_grid]],
                             uint lid [[thread_index_in_threadgroup]],
                             uint tpg [[threads_per_threadgroup]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]],
                             uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    uint c = e / p.planes, plane = p.hw / p.planes, start = (e % p.planes) * plane;
    float sum_g = 0.0f, sum_gx = 0.0f;
    Cursor at = cursor(lid, tpg, plane);  // at.plane: the sample, at.offset: the element in its plane
    for (uint i = lid; i < p.samples * plane; i += tpg, advance(at)) {
        uint group = at.plane * p.channels + c, idx = group * p.hw + start + at.offset;
        float gv = float(g[idx]);
        sum_g += gv;
        sum_gx = fma(gv, ((float(x[idx]) - moments[3 * group]) - moments[3 * group + 1]) * moments[3 * group + 2],
                     sum_gx);
    }
    sum_g = group_sum(sum_g, scratch, lane, sg, nsg);
    sum_gx = group_sum(sum_gx, scratch, lane, sg, nsg);
    if (lid == 0) {
        dgamma[e] = sum_gx;
        dbeta[e] = sum_g;
    }
}

template [[host_name("norm_affine_grad")]] [[kernel]] decltype(norm_affine_grad<float>) norm_affine_grad<float>;
template [[host_name("norm_affine_grad_f16")]] [[kernel]] decltype(norm_affine_grad<half>) norm_affine_grad<half>;
template [[host_name("norm_affine_grad_bf16")]] [[kernel]] decltype(norm_affine_grad<bfloat>) norm_affine_grad<bfloat>;

struct ColumnParams {
    uint entries;   // γ entries: channels · planes
    uint channels;  // groups per sample
    uint planes;    // γ entries per group
    uint samples;
    uint chunk;     // samples a thread sums
};

// norm_affine_grad for planes of one element (layer norm; group norm of (N, C)): entry e's values
// are column e of a (samples, entries) matrix, x[n·entries + e]. Thread (e, k) sums rows
// k·chunk … (k + 1)·chunk − 1 of its column, neighbouring threads reading neighbouring addresses,
// into partial[k][e] = (Σ g·x̂, Σ g), which norm_param_grad adds up over k. (A threadgroup an entry
// would reduce a handful of values per barrier there.)
template <typename T>
kernel void norm_affine_columns(device const T* g [[buffer(0)]],  // extent: p.samples * p.entries
                                device const T* x [[buffer(1)]],  // extent: p.samples * p.entries
                                device const float* moments [[buffer(2)]],  // extent: 3 * p.samples * p.channels
                                device float* partial [[buffer(3)]],
                                constant ColumnParams& p [[buffer(4)]],
                                uint2 pos [[thread_position_in_grid]]) {
    uint e = pos.x, k = pos.y;
    if (e >= p.entries) return;
    uint c = e / p.planes, end = min(p.samples, (k + 1) * p.chunk);
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (uint n = k * p.chunk; n < end; n++) {
        uint group = n * p.channels + c;
        float gv = float(g[n * p.entries + e]);
        sum_g += gv;
        sum_gx = fma(gv, ((float(x[n * p.entries + e]) - moments[3 * group]) - moments[3 * group + 1])
                             * moments[3 * group + 2], sum_gx);
    }
    partial[2 * (k * p.entries + e)] = sum_gx;
    partial[2 * (k * p.entries + e) + 1] = sum_g;
}

template [[host_name("norm_affine_columns")]] [[kernel]] decltype(norm_affine_columns<float>) norm_affine_columns<float>;
template [[host_name("norm_affine_columns_f16")]] [[kernel]] decltype(norm_affine_columns<half>) norm_affine_columns<half>;
template [[host_name("norm_affine_columns_bf16")]] [[kernel]] decltype(norm_affine_columns<bfloat>) norm_affine_columns<bfloat>;

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
template <typename T>
kernel void batch_norm_inference(device const T* x [[buffer(0)]],  // extent: p.count
                                 device const float* gamma [[buffer(1)]],  // extent: p.channels
                                 device const float* beta [[buffer(2)]],  // extent: p.channels
                                 device const float* mean [[buffer(3)]],  // extent: p.channels
                                 device const float* var [[buffer(4)]],  // extent: p.channels
                                 device T* out [[buffer(5)]],  // extent: p.count
                                 constant InferenceParams& p [[buffer(6)]],
                                 uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    uint c = (i / p.hw) % p.channels;
    out[i] = T(fma(float(x[i]) - mean[c], gamma[c] / precise::sqrt(var[c] + p.eps), beta[c]));
}

template [[host_name("batch_norm_inference")]] [[kernel]] decltype(batch_norm_inference<float>) batch_norm_inference<float>;
template [[host_name("batch_norm_inference_f16")]] [[kernel]] decltype(batch_norm_inference<half>) batch_norm_inference<half>;
template [[host_name("batch_norm_inference_bf16")]] [[kernel]] decltype(batch_norm_inference<bfloat>) batch_norm_inference<bfloat>;

// The inference-mode gradients, one threadgroup per channel (the statistics are constants):
// dx = g·γ·rstd, dγ[c] = Σ g·x̂, dβ[c] = Σ g.
template <typename T>
kernel void batch_norm_inference_grad(device const T* g [[buffer(0)]],  // extent: p.rows * p.channels * p.hw
                                      device const T* x [[buffer(1)]],  // extent: p.rows * p.channels * p.hw
                                      device const float* gamma [[buffer(2)]],  // extent: p.channels
                                      device const float* mean [[buffer(3)]],  // extent: p.channels
                                      device const float* var [[buffer(4)]],  // extent: p.channels
                                      device T* dx [[buffer(5)]],  // extent: p.rows * p.channels * p.hw
                                      device float* dgamma [[buffer(6)]],  // extent: p.channels
                                      device float* dbeta [[buffer(7)]],  // extent: p.channels
                                      constant NormParams& p [[buffer(8)]],
                                      uint c [[threadgroup_position_in_grid]],
                                      uint lid [[thread_index_in_threadgroup]],
                                      uint tpg [[threads_per_threadgroup]],
                                      uint lane [[thread_index_in_simdgroup]],
                                      uint sg [[simdgroup_index_in_threadgroup]],
                                      uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float rstd = 1.0f / precise::sqrt(var[c] + p.eps), a = gamma[c] * rstd;
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (uint r = 0; r < p.rows; r++) {
        uint base = block_offset(p, c, r);
        for (uint i = lid; i < p.hw; i += tpg) {
            float gv = float(g[base + i]);
            sum_g += gv;
            sum_gx = fma(gv, (float(x[base + i]) - mean[c]) * rstd, sum_gx);
            dx[base + i] = T(gv * a);
        }
    }
    sum_g = group_sum(sum_g, scratch, lane, sg, nsg);
    sum_gx = group_sum(sum_gx, scratch, lane, sg, nsg);
    if (lid == 0) {
        dgamma[c] = sum_gx;
        dbeta[c] = sum_g;
    }
}

template [[host_name("batch_norm_inference_grad")]] [[kernel]] decltype(batch_norm_inference_grad<float>) batch_norm_inference_grad<float>;
template [[host_name("batch_norm_inference_grad_f16")]] [[kernel]] decltype(batch_norm_inference_grad<half>) batch_norm_inference_grad<half>;
template [[host_name("batch_norm_inference_grad_bf16")]] [[kernel]] decltype(batch_norm_inference_grad<bfloat>) batch_norm_inference_grad<bfloat>;
