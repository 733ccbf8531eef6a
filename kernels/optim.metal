// Optimizer updates, one thread per parameter element, following torch.optim.
//
// Each kernel reads an element's parameter, gradient and state before writing that same
// element's outputs, so the outputs may alias the inputs: passing the parameter and state
// buffers as outputs updates them in place.
//
// Loss scaling (mlmetal.train.LossScaler) keeps its state in five uint words on the device:
// the scale (a float's bits), the "every gradient is finite" predicate word, the clean steps
// since the scale last changed, the skipped steps and all steps. The updates take a scaled
// gradient with `p.unscale` set and multiply it by 1/scale read from word 0, so the host never
// needs the scale's value; unset, the factor is exactly 1 and the update is what it was.
#include <metal_stdlib>
using namespace metal;

struct SgdParams {
    uint n;
    float lr;
    float momentum;
    float weight_decay;
    uint nesterov;
    uint unscale;  // 1: grad is multiplied by 1/scale, the scale read from loss_scale[0]
};

#define LOSS_SCALE 0u  // the words of a loss scaler's state
#define LOSS_SCALE_FINITE 1u
#define LOSS_SCALE_CLEAN 2u
#define LOSS_SCALE_SKIPPED 3u
#define LOSS_SCALE_STEPS 4u  // five words in all

// The factor that unscales a gradient: 1/scale, or exactly 1. For the powers of two a scaler
// holds, 1/scale is exact, and so is the product.
inline float unscale_factor(device const uint* loss_scale, uint unscale) {
    return unscale ? 1.0f / as_type<float>(loss_scale[LOSS_SCALE]) : 1.0f;
}

// torch.optim.SGD (dampening 0): g ← grad + wd·param, b ← momentum·b + g, and the step is b
// (g + momentum·b with Nesterov). A zero buffer makes the first step b = g, which is how
// torch starts its buffer; with momentum 0 the step is plain g.
kernel void sgd_update(device const float* param [[buffer(0)]],  // extent: p.n
                       device const float* grad [[buffer(1)]],  // extent: p.n
                       device const float* momentum_buffer [[buffer(2)]],  // extent: p.n
                       device const uint* loss_scale [[buffer(3)]],  // extent: 1
                       device float* param_out [[buffer(4)]],  // extent: p.n
                       device float* momentum_out [[buffer(5)]],  // extent: p.n
                       constant SgdParams& p [[buffer(6)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float w = param[i];
    float g = fma(p.weight_decay, w, grad[i] * unscale_factor(loss_scale, p.unscale));
    float b = fma(p.momentum, momentum_buffer[i], g);
    float step = p.nesterov ? fma(p.momentum, b, g) : b;
    momentum_out[i] = b;
    param_out[i] = w - p.lr * step;
}

struct AdamParams {
    uint n;
    float lr;
    float beta1;
    float beta2;
    float one_minus_beta1;  // from the host in double: 1 − 0.999f in float loses 4 digits
    float one_minus_beta2;
    float eps;
    float weight_decay;
    float bias_correction1;  // 1 − beta1^step
    float bias_correction2;  // 1 − beta2^step
    uint unscale;
};

// torch.optim.Adam: g ← grad + wd·param; m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
// param ← param − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + eps).
kernel void adam_update(device const float* param [[buffer(0)]],  // extent: p.n
                        device const float* grad [[buffer(1)]],  // extent: p.n
                        device const float* m [[buffer(2)]],  // extent: p.n
                        device const float* v [[buffer(3)]],  // extent: p.n
                        device const uint* loss_scale [[buffer(4)]],  // extent: 1
                        device float* param_out [[buffer(5)]],  // extent: p.n
                        device float* m_out [[buffer(6)]],  // extent: p.n
                        device float* v_out [[buffer(7)]],  // extent: p.n
                        constant AdamParams& p [[buffer(8)]],
                        uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float w = param[i];
    float g = fma(p.weight_decay, w, grad[i] * unscale_factor(loss_scale, p.unscale));
    float m1 = fma(p.beta1, m[i], p.one_minus_beta1 * g);
    float v1 = fma(p.beta2, v[i], p.one_minus_beta2 * g * g);
    float denom = precise::sqrt(v1) / precise::sqrt(p.bias_correction2) + p.eps;
    m_out[i] = m1;
    v_out[i] = v1;
    param_out[i] = w - (p.lr / p.bias_correction1) * m1 / denom;
}

// ---------------------------------------------------------------- dynamic loss scaling

struct CountParams {
    uint n;
};

// The gradient that starts a scaled backward pass: the scale, everywhere (in place of
// initial_gradient's ones), read from the device.
template <typename T>
kernel void loss_scale_gradient(device const uint* loss_scale [[buffer(0)]],  // extent: 1
                                device T* out [[buffer(1)]],  // extent: p.n
                                constant CountParams& p [[buffer(2)]],
                                uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(as_type<float>(loss_scale[LOSS_SCALE]));
}

template [[host_name("loss_scale_gradient")]] [[kernel]] decltype(loss_scale_gradient<float>) loss_scale_gradient<float>;
template [[host_name("loss_scale_gradient_f16")]] [[kernel]] decltype(loss_scale_gradient<half>) loss_scale_gradient<half>;
template [[host_name("loss_scale_gradient_bf16")]] [[kernel]] decltype(loss_scale_gradient<bfloat>) loss_scale_gradient<bfloat>;

struct LossScaleParams {
    float growth_factor;
    float backoff_factor;
    uint growth_interval;
};

// After a step's updates (PyTorch's GradScaler.update): every gradient finite → one more clean
// step, and at growth_interval of them the scale grows (unless that overflows) and the count
// restarts; otherwise the scale backs off, the count restarts and the step counts as skipped.
// The finite word is set to 1 again for the next step's checks. One thread reads every word
// before writing any, so out may be the state itself.
kernel void loss_scale_update(device const uint* state [[buffer(0)]],  // extent: 5
                              device uint* out [[buffer(1)]],  // extent: 5
                              constant LossScaleParams& p [[buffer(2)]],
                              uint i [[thread_position_in_grid]]) {
    if (i != 0) return;
    float scale = as_type<float>(state[LOSS_SCALE]);
    uint clean = state[LOSS_SCALE_CLEAN], skipped = state[LOSS_SCALE_SKIPPED], steps = state[LOSS_SCALE_STEPS];
    if (state[LOSS_SCALE_FINITE] != 0u) {
        clean += 1u;
        if (clean >= p.growth_interval) {
            float grown = scale * p.growth_factor;
            // bits, not isinf: fast math may assume no infinities
            if ((as_type<uint>(grown) & 0x7f800000u) != 0x7f800000u) scale = grown;
            clean = 0u;
        }
    } else {
        scale *= p.backoff_factor;
        clean = 0u;
        skipped += 1u;
    }
    out[LOSS_SCALE] = as_type<uint>(scale);
    out[LOSS_SCALE_FINITE] = 1u;
    out[LOSS_SCALE_CLEAN] = clean;
    out[LOSS_SCALE_SKIPPED] = skipped;
    out[LOSS_SCALE_STEPS] = steps + 1u;
}
