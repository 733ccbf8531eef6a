// Elementwise kernels over flat float32 buffers (one thread per element, bounds guarded),
// the activations and their gradients, and softmax over the channels.
#include <metal_stdlib>
using namespace metal;

struct AxpyParams {
    uint n;
    float a;
};

// y = a*x + y
kernel void axpy(device const float* x [[buffer(0)]],  // extent: p.n
                 device float* y [[buffer(1)]],  // extent: p.n
                 constant AxpyParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = fma(p.a, x[i], y[i]);
}

// y = a*x + y, four floats a thread (n counts float4 elements): what the device-memory
// bandwidth allows, for buffers whose length is a multiple of 4.
kernel void axpy_f4(device const float4* x [[buffer(0)]],  // extent: p.n
                    device float4* y [[buffer(1)]],  // extent: p.n
                    constant AxpyParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = fma(float4(p.a), x[i], y[i]);
}

struct FillParams {
    uint n;
    uint value;
};

// out[i] = value, for any 32-bit pattern (a float's bits, a predicate word, a counter).
kernel void fill_u32(device uint* out [[buffer(0)]],  // extent: p.n
                     constant FillParams& p [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = p.value;
}

struct CopyParams {
    uint n;  // float4 elements
};

// out = x, four floats a thread: the device-memory bandwidth reference for the other kernels.
kernel void copy_f4(device const float4* x [[buffer(0)]],  // extent: p.n
                    device float4* out [[buffer(1)]],  // extent: p.n
                    constant CopyParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i];
}

// Does nothing: its dispatch time is the runtime's fixed cost.
kernel void empty(device uint* out [[buffer(0)]],
                  uint i [[thread_position_in_grid]]) {
}

struct CountParams {
    uint n;
};

// out = x + y
kernel void add(device const float* x [[buffer(0)]],  // extent: p.n
                device const float* y [[buffer(1)]],  // extent: p.n
                device float* out [[buffer(2)]],  // extent: p.n
                constant CountParams& p [[buffer(3)]],
                uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] + y[i];
}

// ---------------------------------------------------------------- arithmetic

// out = x * y
kernel void mul(device const float* x [[buffer(0)]],  // extent: p.n
                device const float* y [[buffer(1)]],  // extent: p.n
                device float* out [[buffer(2)]],  // extent: p.n
                constant CountParams& p [[buffer(3)]],
                uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] * y[i];
}

struct ScaleParams {
    uint n;
    float s;
};

// out = s * x
kernel void scale(device const float* x [[buffer(0)]],  // extent: p.n
                  device float* out [[buffer(1)]],  // extent: p.n
                  constant ScaleParams& p [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = p.s * x[i];
}

// ---------------------------------------------------------------- activations
//
// Gradient kernels take the forward's input where the derivative needs it (relu, leaky relu)
// and the forward's output where that is cheaper (sigmoid, tanh, softmax).

struct LinearParams {
    uint n;
    float a;
    float b;
};

// out = a*x + b (MPS's linear neuron)
kernel void linear_activation(device const float* x [[buffer(0)]],  // extent: p.n
                              device float* out [[buffer(1)]],  // extent: p.n
                              constant LinearParams& p [[buffer(2)]],
                              uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = fma(p.a, x[i], p.b);
}

// Not max(x, 0), which is fmax and turns NaN into 0: NaN stays NaN, as in PyTorch.
kernel void relu(device const float* x [[buffer(0)]],  // extent: p.n
                 device float* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] < 0.0f ? 0.0f : x[i];
}

// dx = 0 where x ≤ 0, else g (0 at the kink; g where x is NaN, as PyTorch)
kernel void relu_grad(device const float* g [[buffer(0)]],  // extent: p.n
                      device const float* x [[buffer(1)]],  // extent: p.n
                      device float* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] <= 0.0f ? 0.0f : g[i];
}

struct LeakyParams {
    uint n;
    float slope;
};

kernel void leaky_relu(device const float* x [[buffer(0)]],  // extent: p.n
                       device float* out [[buffer(1)]],  // extent: p.n
                       constant LeakyParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] > 0.0f ? x[i] : p.slope * x[i];
}

kernel void leaky_relu_grad(device const float* g [[buffer(0)]],  // extent: p.n
                            device const float* x [[buffer(1)]],  // extent: p.n
                            device float* out [[buffer(2)]],  // extent: p.n
                            constant LeakyParams& p [[buffer(3)]],
                            uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] > 0.0f ? g[i] : p.slope * g[i];
}

// 1/(1 + e^-x); precise::exp so that e^-x overflows to inf (giving 0) instead of NaN.
kernel void sigmoid(device const float* x [[buffer(0)]],  // extent: p.n
                    device float* out [[buffer(1)]],  // extent: p.n
                    constant CountParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = 1.0f / (1.0f + precise::exp(-x[i]));
}

// dx = g·y·(1 − y), y the sigmoid's output
kernel void sigmoid_grad(device const float* g [[buffer(0)]],  // extent: p.n
                         device const float* y [[buffer(1)]],  // extent: p.n
                         device float* out [[buffer(2)]],  // extent: p.n
                         constant CountParams& p [[buffer(3)]],
                         uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = g[i] * y[i] * (1.0f - y[i]);
}

// The op is `tanh`; the kernel is not, so it cannot shadow metal::tanh. precise:: because fast
// tanh returns NaN past |x| ≈ 44.
kernel void tanh_activation(device const float* x [[buffer(0)]],  // extent: p.n
                            device float* out [[buffer(1)]],  // extent: p.n
                            constant CountParams& p [[buffer(2)]],
                            uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = precise::tanh(x[i]);
}

// dx = g·(1 − y²), y the tanh's output
kernel void tanh_grad(device const float* g [[buffer(0)]],  // extent: p.n
                      device const float* y [[buffer(1)]],  // extent: p.n
                      device float* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = g[i] * (1.0f - y[i] * y[i]);
}

struct SoftmaxParams {
    uint positions;  // N·inner
    uint channels;
    uint inner;      // H·W (1 for an (N, C) input)
};

// Softmax over dim 1 of (N, C, inner): one thread per (n, position), walking the channels at
// stride `inner` (neighbouring threads read neighbouring addresses). The max and the sum come
// in one pass, the sum rescaled whenever the running max grows.
kernel void softmax(device const float* x [[buffer(0)]],  // extent: p.positions * p.channels
                    device float* out [[buffer(1)]],  // extent: p.positions * p.channels
                    constant SoftmaxParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i >= p.positions) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float m = x[base], sum = 0.0f;  // (not -INFINITY: NVRTC has no __builtin_inff)
    for (uint c = 0; c < p.channels; c++) {
        float v = x[base + c * p.inner];
        float m_new = max(m, v);
        sum = sum * precise::exp(m - m_new) + precise::exp(v - m_new);
        m = m_new;
    }
    float inv = 1.0f / sum;
    for (uint c = 0; c < p.channels; c++) out[base + c * p.inner] = precise::exp(x[base + c * p.inner] - m) * inv;
}

// dx_c = y_c·(g_c − Σ_k g_k·y_k), y the softmax's output
kernel void softmax_grad(device const float* g [[buffer(0)]],  // extent: p.positions * p.channels
                         device const float* y [[buffer(1)]],  // extent: p.positions * p.channels
                         device float* out [[buffer(2)]],  // extent: p.positions * p.channels
                         constant SoftmaxParams& p [[buffer(3)]],
                         uint i [[thread_position_in_grid]]) {
    if (i >= p.positions) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float dot_gy = 0.0f;
    for (uint c = 0; c < p.channels; c++) dot_gy = fma(g[base + c * p.inner], y[base + c * p.inner], dot_gy);
    for (uint c = 0; c < p.channels; c++) {
        uint at = base + c * p.inner;
        out[at] = y[at] * (g[at] - dot_gy);
    }
}
