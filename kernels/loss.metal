// Separable losses (MPSCNNLossDescriptor's semantics): a forward kernel and a gradient kernel
// per loss type, a shared reduction, and the initial-gradient kernel.
//
// A forward kernel writes the weighted elementwise losses, weight·w[i]·loss(y[i], t[i]) (w the
// optional per-element weights), straight into the output for reduction "none" or into a
// temporary that loss_partial and loss_finish reduce to one value. Softmax cross-entropy has
// one loss per (n, position), summed over the channels; the others one per element.
//
// A gradient kernel writes dy[i] = g·weight·w[i]·∂loss/∂y[i] / divisor, reading g[i·g_stride]:
// the loss's own gradient per element (none, g_stride 1) or its one value (g_stride 0).
#include <metal_stdlib>
using namespace metal;

struct LossParams {
    uint n;             // loss elements: y's size, or N·positions for softmax cross-entropy
    uint has_weights;   // 1: multiply by weights[i]; 0: weights is a placeholder
    float weight;       // the descriptor's scalar weight
    float delta;        // Huber
    float smoothing;    // label smoothing (cross-entropies)
    uint channels;      // softmax cross-entropy: the class dimension (dim 1) ...
    uint inner;         // ... and the positions per sample
    uint g_stride;      // gradient kernels
    float inv_divisor;  // gradient kernels: 1/n for "mean", else 1
};

inline float element_weight(device const float* weights, constant LossParams& p, uint i) {
    return p.has_weights ? p.weight * weights[i] : p.weight;
}

inline float grad_scale(device const float* g, device const float* weights, constant LossParams& p, uint i) {
    return g[i * p.g_stride] * p.inv_divisor * element_weight(weights, p, i);
}

// ---------------------------------------------------------------- elementwise losses

kernel void mse_loss(device const float* y [[buffer(0)]],  // extent: p.n
                     device const float* t [[buffer(1)]],  // extent: p.n
                     device const float* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                     device float* out [[buffer(3)]],  // extent: p.n
                     constant LossParams& p [[buffer(4)]],
                     uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float d = y[i] - t[i];
    out[i] = element_weight(weights, p, i) * d * d;
}

kernel void mse_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                          device const float* y [[buffer(1)]],  // extent: p.n
                          device const float* t [[buffer(2)]],  // extent: p.n
                          device const float* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                          device float* dy [[buffer(4)]],  // extent: p.n
                          constant LossParams& p [[buffer(5)]],
                          uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    dy[i] = grad_scale(g, weights, p, i) * 2.0f * (y[i] - t[i]);
}

kernel void mae_loss(device const float* y [[buffer(0)]],  // extent: p.n
                     device const float* t [[buffer(1)]],  // extent: p.n
                     device const float* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                     device float* out [[buffer(3)]],  // extent: p.n
                     constant LossParams& p [[buffer(4)]],
                     uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    out[i] = element_weight(weights, p, i) * fabs(y[i] - t[i]);
}

// sign(y − t), 0 where y = t (PyTorch's choice at the kink)
kernel void mae_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                          device const float* y [[buffer(1)]],  // extent: p.n
                          device const float* t [[buffer(2)]],  // extent: p.n
                          device const float* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                          device float* dy [[buffer(4)]],  // extent: p.n
                          constant LossParams& p [[buffer(5)]],
                          uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    dy[i] = grad_scale(g, weights, p, i) * sign(y[i] - t[i]);
}

// ½d² for |d| ≤ delta, else delta·(|d| − ½delta)
kernel void huber_loss(device const float* y [[buffer(0)]],  // extent: p.n
                       device const float* t [[buffer(1)]],  // extent: p.n
                       device const float* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                       device float* out [[buffer(3)]],  // extent: p.n
                       constant LossParams& p [[buffer(4)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float d = fabs(y[i] - t[i]);
    float l = d <= p.delta ? 0.5f * d * d : p.delta * (d - 0.5f * p.delta);
    out[i] = element_weight(weights, p, i) * l;
}

kernel void huber_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                            device const float* y [[buffer(1)]],  // extent: p.n
                            device const float* t [[buffer(2)]],  // extent: p.n
                            device const float* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                            device float* dy [[buffer(4)]],  // extent: p.n
                            constant LossParams& p [[buffer(5)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float d = y[i] - t[i];  // clipped to ±delta; not clamp, whose fmin/fmax would clip NaN to −delta
    dy[i] = grad_scale(g, weights, p, i) * (d < -p.delta ? -p.delta : d > p.delta ? p.delta : d);
}

// Logits y, labels t smoothed to t·(1 − s) + s/2:
// max(y, 0) − y·t + log(1 + e^−|y|), which never exponentiates a positive number.
kernel void sigmoid_cross_entropy_loss(device const float* y [[buffer(0)]],  // extent: p.n
                                       device const float* t [[buffer(1)]],  // extent: p.n
                                       device const float* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                                       device float* out [[buffer(3)]],  // extent: p.n
                                       constant LossParams& p [[buffer(4)]],
                                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = y[i], label = fma(t[i], 1.0f - p.smoothing, 0.5f * p.smoothing);
    float l = max(v, 0.0f) - v * label + precise::log(1.0f + precise::exp(-fabs(v)));
    out[i] = element_weight(weights, p, i) * l;
}

kernel void sigmoid_cross_entropy_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                                            device const float* y [[buffer(1)]],  // extent: p.n
                                            device const float* t [[buffer(2)]],  // extent: p.n
                                            device const float* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                                            device float* dy [[buffer(4)]],  // extent: p.n
                                            constant LossParams& p [[buffer(5)]],
                                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float label = fma(t[i], 1.0f - p.smoothing, 0.5f * p.smoothing);
    float s = 1.0f / (1.0f + precise::exp(-y[i]));
    dy[i] = grad_scale(g, weights, p, i) * (s - label);
}

// ---------------------------------------------------------------- softmax cross-entropy

// Logits y and labels t of (N, C, positions), labels being probabilities over the channels
// smoothed to t·(1 − s) + s/C; one thread per (n, position):
// Σ_c t_c·(logsumexp(y) − y_c).
kernel void softmax_cross_entropy_loss(device const float* y [[buffer(0)]],  // extent: p.n * p.channels
                                       device const float* t [[buffer(1)]],  // extent: p.n * p.channels
                                       device const float* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                                       device float* out [[buffer(3)]],  // extent: p.n
                                       constant LossParams& p [[buffer(4)]],
                                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float m = y[base];
    for (uint c = 1; c < p.channels; c++) m = max(m, y[base + c * p.inner]);
    float sum = 0.0f;
    for (uint c = 0; c < p.channels; c++) sum += precise::exp(y[base + c * p.inner] - m);
    float lse = m + precise::log(sum), smooth = p.smoothing / float(p.channels), l = 0.0f;
    for (uint c = 0; c < p.channels; c++) {
        uint at = base + c * p.inner;
        l = fma(fma(t[at], 1.0f - p.smoothing, smooth), lse - y[at], l);
    }
    out[i] = element_weight(weights, p, i) * l;
}

// ∂/∂y_c = softmax(y)_c·Σ_k t_k − t_c (labels need not sum to one)
kernel void softmax_cross_entropy_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                                            device const float* y [[buffer(1)]],  // extent: p.n * p.channels
                                            device const float* t [[buffer(2)]],  // extent: p.n * p.channels
                                            device const float* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                                            device float* dy [[buffer(4)]],  // extent: p.n * p.channels
                                            constant LossParams& p [[buffer(5)]],
                                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float m = y[base], label_sum = 0.0f, smooth = p.smoothing / float(p.channels);
    for (uint c = 0; c < p.channels; c++) {
        m = max(m, y[base + c * p.inner]);
        label_sum += fma(t[base + c * p.inner], 1.0f - p.smoothing, smooth);
    }
    float sum = 0.0f;
    for (uint c = 0; c < p.channels; c++) sum += precise::exp(y[base + c * p.inner] - m);
    float s = grad_scale(g, weights, p, i), inv = 1.0f / sum;
    for (uint c = 0; c < p.channels; c++) {
        uint at = base + c * p.inner;
        float prob = precise::exp(y[at] - m) * inv;
        dy[at] = s * (prob * label_sum - fma(t[at], 1.0f - p.smoothing, smooth));
    }
}

// ---------------------------------------------------------------- reductions

struct ReduceParams {
    uint n;
    uint has_weights;
    float weight;
};

// Σ over the threadgroup to thread 0 (other threads get partial sums).
inline float threadgroup_total(float v, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
    v = simd_sum(v);
    if (lane == 0) scratch[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float t = simd_sum(lane < nsg ? scratch[lane] : 0.0f);
    threadgroup_barrier(mem_flags::mem_threadgroup);  // scratch is reused by the next call
    return t;
}

// Threadgroup g: partial[g] = (Σ values, number of nonzero weights) over its grid-stride share.
// The count is what reduction "sum_by_nonzero_weights" divides by.
kernel void loss_partial(device const float* values [[buffer(0)]],  // extent: p.n
                         device const float* weights [[buffer(1)]],  // extent: p.has_weights * p.n
                         device float2* partial [[buffer(2)]],
                         constant ReduceParams& p [[buffer(3)]],
                         uint i [[thread_position_in_grid]],
                         uint grid [[threads_per_grid]],
                         uint lid [[thread_index_in_threadgroup]],
                         uint group [[threadgroup_position_in_grid]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float sum = 0.0f, nonzero = 0.0f;
    for (uint j = i; j < p.n; j += grid) {
        sum += values[j];
        nonzero += (p.has_weights ? p.weight * weights[j] : p.weight) != 0.0f ? 1.0f : 0.0f;
    }
    sum = threadgroup_total(sum, scratch, lane, sg, nsg);
    nonzero = threadgroup_total(nonzero, scratch, lane, sg, nsg);
    if (lid == 0) partial[group] = float2(sum, nonzero);
}

struct FinishParams {
    uint groups;
    uint mode;  // 0: sum, 1: mean (divide by n), 2: divide by the number of nonzero weights
    float n;
};

// out[0] = Σ partial sums / divisor; 0 when there is no nonzero weight to divide by.
// One threadgroup; the partials are added in a fixed order, so the result is reproducible.
kernel void loss_finish(device const float2* partial [[buffer(0)]],  // extent: p.groups
                        device float* out [[buffer(1)]],  // extent: 1
                        constant FinishParams& p [[buffer(2)]],
                        uint lid [[thread_index_in_threadgroup]],
                        uint tpg [[threads_per_threadgroup]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]],
                        uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float sum = 0.0f, nonzero = 0.0f;
    for (uint j = lid; j < p.groups; j += tpg) {
        sum += partial[j].x;
        nonzero += partial[j].y;
    }
    sum = threadgroup_total(sum, scratch, lane, sg, nsg);
    nonzero = threadgroup_total(nonzero, scratch, lane, sg, nsg);
    if (lid != 0) return;
    if (p.mode == 0) out[0] = sum;
    else if (p.mode == 1) out[0] = sum / p.n;
    else out[0] = nonzero > 0.0f ? sum / nonzero : 0.0f;
}

// scale[0] = g[0] / (number of nonzero weights), or 0·g[0] if there is none (NaN stays NaN):
// the gradient of reduction "sum_by_nonzero_weights" per unit of elementwise loss. One threadgroup.
kernel void loss_nonzero_scale(device const float* g [[buffer(0)]],  // extent: 1
                               device const float* weights [[buffer(1)]],  // extent: p.has_weights * p.n
                               device float* scale [[buffer(2)]],  // extent: 1
                               constant ReduceParams& p [[buffer(3)]],
                               uint lid [[thread_index_in_threadgroup]],
                               uint tpg [[threads_per_threadgroup]],
                               uint lane [[thread_index_in_simdgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]],
                               uint nsg [[simdgroups_per_threadgroup]]) {
    threadgroup float scratch[32];
    float nonzero = 0.0f;
    for (uint j = lid; j < p.n; j += tpg)
        nonzero += (p.has_weights ? p.weight * weights[j] : p.weight) != 0.0f ? 1.0f : 0.0f;
    nonzero = threadgroup_total(nonzero, scratch, lane, sg, nsg);
    if (lid == 0) scale[0] = nonzero > 0.0f ? g[0] / nonzero : 0.0f * g[0];
}

struct CountParams {
    uint n;
};

// The gradient that starts a backward pass: ones, dL/dL = 1.
kernel void initial_gradient(device float* out [[buffer(0)]],  // extent: p.n
                             constant CountParams& p [[buffer(1)]],
                             uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = 1.0f;
}
