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
//
// Predictions, labels, weights and dy are stored in T (float, half or bfloat; the kernels that read
// them are templates instantiated as `name`, `name_f16` and `name_bf16`), loaded into float and
// computed in float. The elementwise losses, their sums and the loss's gradient g are float32
// whatever T: a loss is one float32 value (or one a position), rounded once.
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

template <typename T>
inline float element_weight(device const T* weights, constant LossParams& p, uint i) {
    return p.has_weights ? p.weight * float(weights[i]) : p.weight;
}

template <typename T>
inline float grad_scale(device const float* g, device const T* weights, constant LossParams& p, uint i) {
    return g[i * p.g_stride] * p.inv_divisor * element_weight(weights, p, i);
}

// ---------------------------------------------------------------- elementwise losses

template <typename T>
kernel void mse_loss(device const T* y [[buffer(0)]],  // extent: p.n
                     device const T* t [[buffer(1)]],  // extent: p.n
                     device const T* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                     device float* out [[buffer(3)]],  // extent: p.n
                     constant LossParams& p [[buffer(4)]],
                     uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float d = float(y[i]) - float(t[i]);
    out[i] = element_weight(weights, p, i) * d * d;
}

template [[host_name("mse_loss")]] [[kernel]] decltype(mse_loss<float>) mse_loss<float>;
template [[host_name("mse_loss_f16")]] [[kernel]] decltype(mse_loss<half>) mse_loss<half>;
template [[host_name("mse_loss_bf16")]] [[kernel]] decltype(mse_loss<bfloat>) mse_loss<bfloat>;

template <typename T>
kernel void mse_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                          device const T* y [[buffer(1)]],  // extent: p.n
                          device const T* t [[buffer(2)]],  // extent: p.n
                          device const T* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                          device T* dy [[buffer(4)]],  // extent: p.n
                          constant LossParams& p [[buffer(5)]],
                          uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    dy[i] = T(grad_scale(g, weights, p, i) * 2.0f * (float(y[i]) - float(t[i])));
}

template [[host_name("mse_loss_grad")]] [[kernel]] decltype(mse_loss_grad<float>) mse_loss_grad<float>;
template [[host_name("mse_loss_grad_f16")]] [[kernel]] decltype(mse_loss_grad<half>) mse_loss_grad<half>;
template [[host_name("mse_loss_grad_bf16")]] [[kernel]] decltype(mse_loss_grad<bfloat>) mse_loss_grad<bfloat>;

template <typename T>
kernel void mae_loss(device const T* y [[buffer(0)]],  // extent: p.n
                     device const T* t [[buffer(1)]],  // extent: p.n
                     device const T* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                     device float* out [[buffer(3)]],  // extent: p.n
                     constant LossParams& p [[buffer(4)]],
                     uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    out[i] = element_weight(weights, p, i) * fabs(float(y[i]) - float(t[i]));
}

template [[host_name("mae_loss")]] [[kernel]] decltype(mae_loss<float>) mae_loss<float>;
template [[host_name("mae_loss_f16")]] [[kernel]] decltype(mae_loss<half>) mae_loss<half>;
template [[host_name("mae_loss_bf16")]] [[kernel]] decltype(mae_loss<bfloat>) mae_loss<bfloat>;

// sign(y − t), 0 where y = t (PyTorch's choice at the kink)
template <typename T>
kernel void mae_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                          device const T* y [[buffer(1)]],  // extent: p.n
                          device const T* t [[buffer(2)]],  // extent: p.n
                          device const T* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                          device T* dy [[buffer(4)]],  // extent: p.n
                          constant LossParams& p [[buffer(5)]],
                          uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    dy[i] = T(grad_scale(g, weights, p, i) * sign(float(y[i]) - float(t[i])));
}

template [[host_name("mae_loss_grad")]] [[kernel]] decltype(mae_loss_grad<float>) mae_loss_grad<float>;
template [[host_name("mae_loss_grad_f16")]] [[kernel]] decltype(mae_loss_grad<half>) mae_loss_grad<half>;
template [[host_name("mae_loss_grad_bf16")]] [[kernel]] decltype(mae_loss_grad<bfloat>) mae_loss_grad<bfloat>;

// ½d² for |d| ≤ delta, else delta·(|d| − ½delta)
template <typename T>
kernel void huber_loss(device const T* y [[buffer(0)]],  // extent: p.n
                       device const T* t [[buffer(1)]],  // extent: p.n
                       device const T* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                       device float* out [[buffer(3)]],  // extent: p.n
                       constant LossParams& p [[buffer(4)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float d = fabs(float(y[i]) - float(t[i]));
    float l = d <= p.delta ? 0.5f * d * d : p.delta * (d - 0.5f * p.delta);
    out[i] = element_weight(weights, p, i) * l;
}

template [[host_name("huber_loss")]] [[kernel]] decltype(huber_loss<float>) huber_loss<float>;
template [[host_name("huber_loss_f16")]] [[kernel]] decltype(huber_loss<half>) huber_loss<half>;
template [[host_name("huber_loss_bf16")]] [[kernel]] decltype(huber_loss<bfloat>) huber_loss<bfloat>;

template <typename T>
kernel void huber_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                            device const T* y [[buffer(1)]],  // extent: p.n
                            device const T* t [[buffer(2)]],  // extent: p.n
                            device const T* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                            device T* dy [[buffer(4)]],  // extent: p.n
                            constant LossParams& p [[buffer(5)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float d = float(y[i]) - float(t[i]);  // clipped to ±delta; not clamp, whose fmin/fmax would clip NaN to −delta
    dy[i] = T(grad_scale(g, weights, p, i) * (d < -p.delta ? -p.delta : d > p.delta ? p.delta : d));
}

template [[host_name("huber_loss_grad")]] [[kernel]] decltype(huber_loss_grad<float>) huber_loss_grad<float>;
template [[host_name("huber_loss_grad_f16")]] [[kernel]] decltype(huber_loss_grad<half>) huber_loss_grad<half>;
template [[host_name("huber_loss_grad_bf16")]] [[kernel]] decltype(huber_loss_grad<bfloat>) huber_loss_grad<bfloat>;

// Logits y, labels t smoothed to t·(1 − s) + s/2:
// max(y, 0) − y·t + log(1 + e^−|y|), which never exponentiates a positive number.
template <typename T>
kernel void sigmoid_cross_entropy_loss(device const T* y [[buffer(0)]],  // extent: p.n
                                       device const T* t [[buffer(1)]],  // extent: p.n
                                       device const T* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                                       device float* out [[buffer(3)]],  // extent: p.n
                                       constant LossParams& p [[buffer(4)]],
                                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(y[i]), label = fma(float(t[i]), 1.0f - p.smoothing, 0.5f * p.smoothing);
    float l = max(v, 0.0f) - v * label + precise::log(1.0f + precise::exp(-fabs(v)));
    out[i] = element_weight(weights, p, i) * l;
}

template [[host_name("sigmoid_cross_entropy_loss")]] [[kernel]] decltype(sigmoid_cross_entropy_loss<float>) sigmoid_cross_entropy_loss<float>;
template [[host_name("sigmoid_cross_entropy_loss_f16")]] [[kernel]] decltype(sigmoid_cross_entropy_loss<half>) sigmoid_cross_entropy_loss<half>;
template [[host_name("sigmoid_cross_entropy_loss_bf16")]] [[kernel]] decltype(sigmoid_cross_entropy_loss<bfloat>) sigmoid_cross_entropy_loss<bfloat>;

template <typename T>
kernel void sigmoid_cross_entropy_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                                            device const T* y [[buffer(1)]],  // extent: p.n
                                            device const T* t [[buffer(2)]],  // extent: p.n
                                            device const T* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                                            device T* dy [[buffer(4)]],  // extent: p.n
                                            constant LossParams& p [[buffer(5)]],
                                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float label = fma(float(t[i]), 1.0f - p.smoothing, 0.5f * p.smoothing);
    float s = 1.0f / (1.0f + precise::exp(-float(y[i])));
    dy[i] = T(grad_scale(g, weights, p, i) * (s - label));
}

template [[host_name("sigmoid_cross_entropy_loss_grad")]] [[kernel]] decltype(sigmoid_cross_entropy_loss_grad<float>) sigmoid_cross_entropy_loss_grad<float>;
template [[host_name("sigmoid_cross_entropy_loss_grad_f16")]] [[kernel]] decltype(sigmoid_cross_entropy_loss_grad<half>) sigmoid_cross_entropy_loss_grad<half>;
template [[host_name("sigmoid_cross_entropy_loss_grad_bf16")]] [[kernel]] decltype(sigmoid_cross_entropy_loss_grad<bfloat>) sigmoid_cross_entropy_loss_grad<bfloat>;

// ---------------------------------------------------------------- softmax cross-entropy

// Logits y and labels t of (N, C, positions), labels being probabilities over the channels
// smoothed to t·(1 − s) + s/C; one thread per (n, position):
// Σ_c t_c·(logsumexp(y) − y_c).
template <typename T>
kernel void softmax_cross_entropy_loss(device const T* y [[buffer(0)]],  // extent: p.n * p.channels
                                       device const T* t [[buffer(1)]],  // extent: p.n * p.channels
                                       device const T* weights [[buffer(2)]],  // extent: p.has_weights * p.n
                                       device float* out [[buffer(3)]],  // extent: p.n
                                       constant LossParams& p [[buffer(4)]],
                                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float m = float(y[base]);
    for (uint c = 1; c < p.channels; c++) m = max(m, float(y[base + c * p.inner]));
    float sum = 0.0f;
    for (uint c = 0; c < p.channels; c++) sum += precise::exp(float(y[base + c * p.inner]) - m);
    float lse = m + precise::log(sum), smooth = p.smoothing / float(p.channels), l = 0.0f;
    for (uint c = 0; c < p.channels; c++) {
        uint at = base + c * p.inner;
        l = fma(fma(float(t[at]), 1.0f - p.smoothing, smooth), lse - float(y[at]), l);
    }
    out[i] = element_weight(weights, p, i) * l;
}

template [[host_name("softmax_cross_entropy_loss")]] [[kernel]] decltype(softmax_cross_entropy_loss<float>) softmax_cross_entropy_loss<float>;
template [[host_name("softmax_cross_entropy_loss_f16")]] [[kernel]] decltype(softmax_cross_entropy_loss<half>) softmax_cross_entropy_loss<half>;
template [[host_name("softmax_cross_entropy_loss_bf16")]] [[kernel]] decltype(softmax_cross_entropy_loss<bfloat>) softmax_cross_entropy_loss<bfloat>;

// ∂/∂y_c = softmax(y)_c·Σ_k t_k − t_c (labels need not sum to one)
template <typename T>
kernel void softmax_cross_entropy_loss_grad(device const float* g [[buffer(0)]],  // extent: (p.n - 1) * p.g_stride + 1
                                            device const T* y [[buffer(1)]],  // extent: p.n * p.channels
                                            device const T* t [[buffer(2)]],  // extent: p.n * p.channels
                                            device const T* weights [[buffer(3)]],  // extent: p.has_weights * p.n
                                            device T* dy [[buffer(4)]],  // extent: p.n * p.channels
                                            constant LossParams& p [[buffer(5)]],
                                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float m = float(y[base]), label_sum = 0.0f, smooth = p.smoothing / float(p.channels);
    for (uint c = 0; c < p.channels; c++) {
        m = max(m, float(y[base + c * p.inner]));
        label_sum += fma(float(t[base + c * p.inner]), 1.0f - p.smoothing, smooth);
    }
    float sum = 0.0f;
    for (uint c = 0; c < p.channels; c++) sum += precise::exp(float(y[base + c * p.inner]) - m);
    float s = grad_scale(g, weights, p, i), inv = 1.0f / sum;
    for (uint c = 0; c < p.channels; c++) {
        uint at = base + c * p.inner;
        float prob = precise::exp(float(y[at]) - m) * inv;
        dy[at] = T(s * (prob * label_sum - fma(float(t[at]), 1.0f - p.smoothing, smooth)));
    }
}

template [[host_name("softmax_cross_entropy_loss_grad")]] [[kernel]] decltype(softmax_cross_entropy_loss_grad<float>) softmax_cross_entropy_loss_grad<float>;
template [[host_name("softmax_cross_entropy_loss_grad_f16")]] [[kernel]] decltype(softmax_cross_entropy_loss_grad<half>) softmax_cross_entropy_loss_grad<half>;
template [[host_name("softmax_cross_entropy_loss_grad_bf16")]] [[kernel]] decltype(softmax_cross_entropy_loss_grad<bfloat>) softmax_cross_entropy_loss_grad<bfloat>;

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
template <typename T>
kernel void loss_partial(device const float* values [[buffer(0)]],  // extent: p.n
                         device const T* weights [[buffer(1)]],  // extent: p.has_weights * p.n
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
        nonzero += (p.has_weights ? p.weight * float(weights[j]) : p.weight) != 0.0f ? 1.0f : 0.0f;
    }
    sum = threadgroup_total(sum, scratch, lane, sg, nsg);
    nonzero = threadgroup_total(nonzero, scratch, lane, sg, nsg);
    if (lid == 0) partial[group] = float2(sum, nonzero);
}

template [[host_name("loss_partial")]] [[kernel]] decltype(loss_partial<float>) loss_partial<float>;
template [[host_name("loss_partial_f16")]] [[kernel]] decltype(loss_partial<half>) loss_partial<half>;
template [[host_name("loss_partial_bf16")]] [[kernel]] decltype(loss_partial<bfloat>) loss_partial<bfloat>;

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
template <typename T>
kernel void loss_nonzero_scale(device const float* g [[buffer(0)]],  // extent: 1
                               device const T* weights [[buffer(1)]],  // extent: p.has_weights * p.n
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
        nonzero += (p.has_weights ? p.weight * float(weights[j]) : p.weight) != 0.0f ? 1.0f : 0.0f;
    nonzero = threadgroup_total(nonzero, scratch, lane, sg, nsg);
    if (lid == 0) scale[0] = nonzero > 0.0f ? g[0] / nonzero : 0.0f * g[0];
}

template [[host_name("loss_nonzero_scale")]] [[kernel]] decltype(loss_nonzero_scale<float>) loss_nonzero_scale<float>;
template [[host_name("loss_nonzero_scale_f16")]] [[kernel]] decltype(loss_nonzero_scale<half>) loss_nonzero_scale<half>;
template [[host_name("loss_nonzero_scale_bf16")]] [[kernel]] decltype(loss_nonzero_scale<bfloat>) loss_nonzero_scale<bfloat>;

struct CountParams {
    uint n;
};

// The gradient that starts a backward pass: ones, dL/dL = 1.
template <typename T>
kernel void initial_gradient(device T* out [[buffer(0)]],  // extent: p.n
                             constant CountParams& p [[buffer(1)]],
                             uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(1.0f);
}

template [[host_name("initial_gradient")]] [[kernel]] decltype(initial_gradient<float>) initial_gradient<float>;
template [[host_name("initial_gradient_f16")]] [[kernel]] decltype(initial_gradient<half>) initial_gradient<half>;
template [[host_name("initial_gradient_bf16")]] [[kernel]] decltype(initial_gradient<bfloat>) initial_gradient<bfloat>;
