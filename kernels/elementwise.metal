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

// ---------------------------------------------------------------- storage types
//
// Kernels over floating storage are templates over the storage type T (float, half, bfloat),
// instantiated as `name` (float), `name_f16` and `name_bf16`: each loads into float, computes in
// float and rounds once when it stores (to nearest even).

// out = x converted from one storage type to another (or copied, for the same type)
template <typename From, typename To>
kernel void cast(device const From* x [[buffer(0)]],  // extent: p.n
                 device To* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = To(float(x[i]));
}

template [[host_name("cast_f32_f32")]] [[kernel]] decltype(cast<float, float>) cast<float, float>;
template [[host_name("cast_f32_f16")]] [[kernel]] decltype(cast<float, half>) cast<float, half>;
template [[host_name("cast_f32_bf16")]] [[kernel]] decltype(cast<float, bfloat>) cast<float, bfloat>;
template [[host_name("cast_f16_f32")]] [[kernel]] decltype(cast<half, float>) cast<half, float>;
template [[host_name("cast_f16_f16")]] [[kernel]] decltype(cast<half, half>) cast<half, half>;
template [[host_name("cast_f16_bf16")]] [[kernel]] decltype(cast<half, bfloat>) cast<half, bfloat>;
template [[host_name("cast_bf16_f32")]] [[kernel]] decltype(cast<bfloat, float>) cast<bfloat, float>;
template [[host_name("cast_bf16_f16")]] [[kernel]] decltype(cast<bfloat, half>) cast<bfloat, half>;
template [[host_name("cast_bf16_bf16")]] [[kernel]] decltype(cast<bfloat, bfloat>) cast<bfloat, bfloat>;

// ---------------------------------------------------------------- binary ops, broadcast by NumPy's rules
//
// One template per shape of dispatch, instantiated once per operator: `binary<OP>` over inputs of
// the output's shape (the training steps' additions and products: one load each, no index
// arithmetic), `binary_broadcast<OP>` over inputs broadcast through strides — 0 along an axis an
// input is broadcast over — so no input is copied out to the output's shape first. The host
// merges neighbouring axes that every input steps through alike, so a bias added over
// (N, C, H, W) walks three axes and same-shaped inputs one.

#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2
#define OP_DIV 3
#define OP_MAXIMUM 4
#define OP_MINIMUM 5
#define OP_EQUAL 6
#define OP_WHERE_GRAD_A 7  // keeps a where b (a condition) is nonzero: dL/da of where(b, a, ·)
#define OP_WHERE_GRAD_B 8  // keeps a where b is zero: dL/db of where(b, ·, a)
#define OP_WHERE 9
#define OP_MAXIMUM_GRAD 10
#define OP_MINIMUM_GRAD 11

// Neither max nor fmax: those return the other operand for a NaN, where PyTorch's maximum
// returns NaN. When neither comparison holds, an operand is NaN, and so is a + b.
inline float maximum_of(float a, float b) { return a > b ? a : b >= a ? b : a + b; }
inline float minimum_of(float a, float b) { return a < b ? a : b <= a ? b : a + b; }

inline float binary_op(uint op, float a, float b) {
    switch (op) {
        case OP_ADD: return a + b;
        case OP_SUB: return a - b;
        case OP_MUL: return a * b;
        case OP_DIV: return a / b;
        case OP_MAXIMUM: return maximum_of(a, b);
        case OP_MINIMUM: return minimum_of(a, b);
        case OP_EQUAL: return a == b ? 1.0f : 0.0f;
        case OP_WHERE_GRAD_A: return b != 0.0f ? a : 0.0f;
        default: return b != 0.0f ? 0.0f : a;  // OP_WHERE_GRAD_B
    }
}

// Three operands: where(c, a, b) picks a where c is nonzero (NaN included, as C and NumPy
// compare), and the gradients of maximum and minimum route g (the first operand) as PyTorch
// does: to a where a wins, half of it where a and b tie, nothing where b wins; all of it where
// either is NaN.
inline float ternary_op(uint op, float g, float a, float b) {
    switch (op) {
        case OP_WHERE: return g != 0.0f ? a : b;
        case OP_MAXIMUM_GRAD: return a < b ? 0.0f : a == b ? 0.5f * g : g;
        default: return a > b ? 0.0f : a == b ? 0.5f * g : g;  // OP_MINIMUM_GRAD
    }
}

template <uint OP>
kernel void binary(device const float* x [[buffer(0)]],  // extent: p.n
                   device const float* y [[buffer(1)]],  // extent: p.n
                   device float* out [[buffer(2)]],  // extent: p.n
                   constant CountParams& p [[buffer(3)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = binary_op(OP, x[i], y[i]);
}

template [[host_name("add")]] [[kernel]] decltype(binary<OP_ADD>) binary<OP_ADD>;
template [[host_name("sub")]] [[kernel]] decltype(binary<OP_SUB>) binary<OP_SUB>;
template [[host_name("mul")]] [[kernel]] decltype(binary<OP_MUL>) binary<OP_MUL>;
template [[host_name("div")]] [[kernel]] decltype(binary<OP_DIV>) binary<OP_DIV>;
template [[host_name("maximum")]] [[kernel]] decltype(binary<OP_MAXIMUM>) binary<OP_MAXIMUM>;
template [[host_name("minimum")]] [[kernel]] decltype(binary<OP_MINIMUM>) binary<OP_MINIMUM>;

struct BroadcastParams {
    uint n;             // output elements
    uint dims;          // merged axes of the output, at most 8
    uint sizes[3];      // elements of each input (what it binds)
    uint shape[8];      // the output's merged axes
    uint strides[24];   // input k's stride along axis d at [8k + d], in elements; 0 where it is broadcast
};

// The offset into input k of output element i.
inline uint broadcast_offset(constant BroadcastParams& p, uint k, uint i) {
    uint at = 0;
    for (uint d = p.dims; d-- > 0;) {
        at += i % p.shape[d] * p.strides[8 * k + d];
        i /= p.shape[d];
    }
    return at;
}

template <uint OP>
kernel void binary_broadcast(device const float* x [[buffer(0)]],  // extent: p.sizes[0]
                             device const float* y [[buffer(1)]],  // extent: p.sizes[1]
                             device float* out [[buffer(2)]],  // extent: p.n
                             constant BroadcastParams& p [[buffer(3)]],
                             uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = binary_op(OP, x[broadcast_offset(p, 0, i)], y[broadcast_offset(p, 1, i)]);
}

template [[host_name("add_broadcast")]] [[kernel]] decltype(binary_broadcast<OP_ADD>) binary_broadcast<OP_ADD>;
template [[host_name("sub_broadcast")]] [[kernel]] decltype(binary_broadcast<OP_SUB>) binary_broadcast<OP_SUB>;
template [[host_name("mul_broadcast")]] [[kernel]] decltype(binary_broadcast<OP_MUL>) binary_broadcast<OP_MUL>;
template [[host_name("div_broadcast")]] [[kernel]] decltype(binary_broadcast<OP_DIV>) binary_broadcast<OP_DIV>;
template [[host_name("maximum_broadcast")]] [[kernel]] decltype(binary_broadcast<OP_MAXIMUM>) binary_broadcast<OP_MAXIMUM>;
template [[host_name("minimum_broadcast")]] [[kernel]] decltype(binary_broadcast<OP_MINIMUM>) binary_broadcast<OP_MINIMUM>;
template [[host_name("equal")]] [[kernel]] decltype(binary_broadcast<OP_EQUAL>) binary_broadcast<OP_EQUAL>;
template [[host_name("where_grad_a")]] [[kernel]] decltype(binary_broadcast<OP_WHERE_GRAD_A>) binary_broadcast<OP_WHERE_GRAD_A>;
template [[host_name("where_grad_b")]] [[kernel]] decltype(binary_broadcast<OP_WHERE_GRAD_B>) binary_broadcast<OP_WHERE_GRAD_B>;

template <uint OP>
kernel void ternary_broadcast(device const float* x [[buffer(0)]],  // extent: p.sizes[0]
                              device const float* y [[buffer(1)]],  // extent: p.sizes[1]
                              device const float* z [[buffer(2)]],  // extent: p.sizes[2]
                              device float* out [[buffer(3)]],  // extent: p.n
                              constant BroadcastParams& p [[buffer(4)]],
                              uint i [[thread_position_in_grid]]) {
    if (i < p.n)
        out[i] = ternary_op(OP, x[broadcast_offset(p, 0, i)], y[broadcast_offset(p, 1, i)], z[broadcast_offset(p, 2, i)]);
}

template [[host_name("where")]] [[kernel]] decltype(ternary_broadcast<OP_WHERE>) ternary_broadcast<OP_WHERE>;
template [[host_name("maximum_grad")]] [[kernel]] decltype(ternary_broadcast<OP_MAXIMUM_GRAD>) ternary_broadcast<OP_MAXIMUM_GRAD>;
template [[host_name("minimum_grad")]] [[kernel]] decltype(ternary_broadcast<OP_MINIMUM_GRAD>) ternary_broadcast<OP_MINIMUM_GRAD>;

// ---------------------------------------------------------------- arithmetic

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

// ---------------------------------------------------------------- math
//
// Kernels named like the op would shadow Metal's functions (exp, log, sqrt, ...), so they are the
// op's name with `_op`. precise:: wherever the result must hold for large or tiny inputs.

kernel void exp_op(device const float* x [[buffer(0)]],  // extent: p.n
                   device float* out [[buffer(1)]],  // extent: p.n
                   constant CountParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = precise::exp(x[i]);
}

kernel void log_op(device const float* x [[buffer(0)]],  // extent: p.n
                   device float* out [[buffer(1)]],  // extent: p.n
                   constant CountParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = precise::log(x[i]);
}

kernel void sqrt_op(device const float* x [[buffer(0)]],  // extent: p.n
                    device float* out [[buffer(1)]],  // extent: p.n
                    constant CountParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = precise::sqrt(x[i]);
}

kernel void rsqrt_op(device const float* x [[buffer(0)]],  // extent: p.n
                     device float* out [[buffer(1)]],  // extent: p.n
                     constant CountParams& p [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = precise::rsqrt(x[i]);
}

kernel void abs_op(device const float* x [[buffer(0)]],  // extent: p.n
                   device float* out [[buffer(1)]],  // extent: p.n
                   constant CountParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = fabs(x[i]);
}

// dx = g·sign(x): 0 at the kink, and 0 where x is NaN (Metal's sign, and PyTorch's)
kernel void abs_grad(device const float* g [[buffer(0)]],  // extent: p.n
                     device const float* x [[buffer(1)]],  // extent: p.n
                     device float* out [[buffer(2)]],  // extent: p.n
                     constant CountParams& p [[buffer(3)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = g[i] * sign(x[i]);
}

struct ClampParams {
    uint n;
    float min;  // -INFINITY or INFINITY for a side without a bound
    float max;
};

// Not metal::clamp, whose fmin/fmax would clip NaN to a bound: NaN stays NaN, as in PyTorch.
kernel void clamp_op(device const float* x [[buffer(0)]],  // extent: p.n
                     device float* out [[buffer(1)]],  // extent: p.n
                     constant ClampParams& p [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] < p.min ? p.min : x[i] > p.max ? p.max : x[i];
}

// dx = g where min ≤ x ≤ max (the bounds included, as PyTorch), else 0 (NaN included)
kernel void clamp_grad(device const float* g [[buffer(0)]],  // extent: p.n
                       device const float* x [[buffer(1)]],  // extent: p.n
                       device float* out [[buffer(2)]],  // extent: p.n
                       constant ClampParams& p [[buffer(3)]],
                       uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] >= p.min && x[i] <= p.max ? g[i] : 0.0f;
}

struct PowerParams {
    uint n;
    float exponent;
};

// x^e. Metal's pow is defined for x ≥ 0 only, so a negative base is raised by its magnitude and
// takes the sign an integer power gives it (odd: negative); to any other power it is NaN, as in
// PyTorch. x^0 is 1 for every x, NaN included.
kernel void power(device const float* x [[buffer(0)]],  // extent: p.n
                  device float* out [[buffer(1)]],  // extent: p.n
                  constant PowerParams& p [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = x[i], e = p.exponent, r = precise::pow(fabs(v), e);
    bool integral = e == rint(e), odd = fabs(fmod(e, 2.0f)) == 1.0f;  // ±∞: integral, even
    out[i] = e == 0.0f ? 1.0f : !(v < 0.0f) ? r : !integral ? NAN : odd ? -r : r;
}

// Φ(x), the standard normal distribution function, as erfc(−x/√2)/2 with erfc by the Chebyshev
// fit of Press et al. (Numerical Recipes, erfcc): relative error below 1.2e−7 everywhere, so
// gelu keeps its precision far out on the negative side, where Φ is tiny and 1 + erf(x)
// would cancel.
inline float normal_cdf(float x) {
    float z = fabs(x) * 0.70710678f, t = 1.0f / (1.0f + 0.5f * z);
    float poly = -1.26551223f + t * (1.00002368f + t * (0.37409196f + t * (0.09678418f + t * (-0.18628806f
                 + t * (0.27886807f + t * (-1.13520398f + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f))))))));
    float tail = 0.5f * t * precise::exp(-z * z + poly);  // Φ(−|x|)
    return x < 0.0f ? tail : 1.0f - tail;
}

// x·Φ(x): the exact GELU (PyTorch's default, approximate="none"), not the tanh approximation.
kernel void gelu(device const float* x [[buffer(0)]],  // extent: p.n
                 device float* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] * normal_cdf(x[i]);
}

// dx = g·(Φ(x) + x·φ(x)), φ the standard normal density
kernel void gelu_grad(device const float* g [[buffer(0)]],  // extent: p.n
                      device const float* x [[buffer(1)]],  // extent: p.n
                      device float* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = x[i];
    out[i] = g[i] * (normal_cdf(v) + v * 0.39894228f * precise::exp(-0.5f * v * v));
}

// x·σ(x); precise::exp so that e^-x overflows to inf (σ = 0) instead of NaN.
kernel void silu(device const float* x [[buffer(0)]],  // extent: p.n
                 device float* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] / (1.0f + precise::exp(-x[i]));
}

// dx = g·σ(x)·(1 + x·(1 − σ(x)))
kernel void silu_grad(device const float* g [[buffer(0)]],  // extent: p.n
                      device const float* x [[buffer(1)]],  // extent: p.n
                      device float* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float s = 1.0f / (1.0f + precise::exp(-x[i]));
    out[i] = g[i] * s * (1.0f + x[i] * (1.0f - s));
}

struct DropoutParams {
    uint n;
    float p;
};

// out = x·(u ≥ p)/(1 − p), with u uniform in [0, 1) drawn afresh each step and read again by
// the gradient (which is this kernel applied to g: dropout is linear in x). A dropped element
// is x·0, not 0, so a NaN stays NaN, as in PyTorch; p = 1 drops everything (scale 0, not ∞).
kernel void dropout(device const float* x [[buffer(0)]],  // extent: p.n
                    device const float* u [[buffer(1)]],  // extent: p.n
                    device float* out [[buffer(2)]],  // extent: p.n
                    constant DropoutParams& p [[buffer(3)]],
                    uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float scale = p.p < 1.0f ? 1.0f / (1.0f - p.p) : 0.0f;
    out[i] = x[i] * (u[i] >= p.p ? scale : 0.0f);
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
