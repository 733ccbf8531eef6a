// Optimizer updates, one thread per parameter element, following torch.optim.
//
// Each kernel reads an element's parameter, gradient and state before writing that same
// element's outputs, so the outputs may alias the inputs: passing the parameter and state
// buffers as outputs updates them in place.
#include <metal_stdlib>
using namespace metal;

struct SgdParams {
    uint n;
    float lr;
    float momentum;
    float weight_decay;
    uint nesterov;
};

// torch.optim.SGD (dampening 0): g ← grad + wd·param, b ← momentum·b + g, and the step is b
// (g + momentum·b with Nesterov). A zero buffer makes the first step b = g, which is how
// torch starts its buffer; with momentum 0 the step is plain g.
kernel void sgd_update(device const float* param [[buffer(0)]],  // extent: p.n
                       device const float* grad [[buffer(1)]],  // extent: p.n
                       device const float* momentum_buffer [[buffer(2)]],  // extent: p.n
                       device float* param_out [[buffer(3)]],  // extent: p.n
                       device float* momentum_out [[buffer(4)]],  // extent: p.n
                       constant SgdParams& p [[buffer(5)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float w = param[i];
    float g = fma(p.weight_decay, w, grad[i]);
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
};

// torch.optim.Adam: g ← grad + wd·param; m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
// param ← param − lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + eps).
kernel void adam_update(device const float* param [[buffer(0)]],  // extent: p.n
                        device const float* grad [[buffer(1)]],  // extent: p.n
                        device const float* m [[buffer(2)]],  // extent: p.n
                        device const float* v [[buffer(3)]],  // extent: p.n
                        device float* param_out [[buffer(4)]],  // extent: p.n
                        device float* m_out [[buffer(5)]],  // extent: p.n
                        device float* v_out [[buffer(6)]],  // extent: p.n
                        constant AdamParams& p [[buffer(7)]],
                        uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float w = param[i];
    float g = fma(p.weight_decay, w, grad[i]);
    float m1 = fma(p.beta1, m[i], p.one_minus_beta1 * g);
    float v1 = fma(p.beta2, v[i], p.one_minus_beta2 * g * g);
    float denom = precise::sqrt(v1) / precise::sqrt(p.bias_correction2) + p.eps;
    m_out[i] = m1;
    v_out[i] = v1;
    param_out[i] = w - (p.lr / p.bias_correction1) * m1 / denom;
}
