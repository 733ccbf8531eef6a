// Elementwise kernels over flat buffers (one thread per element, bounds guarded), the
// activations and their gradients, and softmax over the channels. The ops' kernels are templates
// over the storage type (float, half, bfloat; see "storage types" below); the runtime's own
// (axpy, fill_u32, copy_f4, empty) are float32 or untyped words.
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
// One template per shape of dispatch, instantiated once per operator and storage type:
// `binary<T, OP>` over inputs of the output's shape (the training steps' additions and products:
// one load each, no index arithmetic), `binary_broadcast<T, OP>` over inputs broadcast through
// strides — 0 along an axis an input is broadcast over — so no input is copied out to the
// output's shape first. The host merges neighbouring axes that every input steps through alike,
// so a bias added over (N, C, H, W) walks three axes and same-shaped inputs one.

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

template <typename T, uint OP>
kernel void binary(device const T* x [[buffer(0)]],  // extent: p.n
                   device const T* y [[buffer(1)]],  // extent: p.n
                   device T* out [[buffer(2)]],  // extent: p.n
                   constant CountParams& p [[buffer(3)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(binary_op(OP, float(x[i]), float(y[i])));
}

template [[host_name("add")]] [[kernel]] decltype(binary<float, OP_ADD>) binary<float, OP_ADD>;
template [[host_name("add_f16")]] [[kernel]] decltype(binary<half, OP_ADD>) binary<half, OP_ADD>;
template [[host_name("add_bf16")]] [[kernel]] decltype(binary<bfloat, OP_ADD>) binary<bfloat, OP_ADD>;
template [[host_name("sub")]] [[kernel]] decltype(binary<float, OP_SUB>) binary<float, OP_SUB>;
template [[host_name("sub_f16")]] [[kernel]] decltype(binary<half, OP_SUB>) binary<half, OP_SUB>;
template [[host_name("sub_bf16")]] [[kernel]] decltype(binary<bfloat, OP_SUB>) binary<bfloat, OP_SUB>;
template [[host_name("mul")]] [[kernel]] decltype(binary<float, OP_MUL>) binary<float, OP_MUL>;
template [[host_name("mul_f16")]] [[kernel]] decltype(binary<half, OP_MUL>) binary<half, OP_MUL>;
template [[host_name("mul_bf16")]] [[kernel]] decltype(binary<bfloat, OP_MUL>) binary<bfloat, OP_MUL>;
template [[host_name("div")]] [[kernel]] decltype(binary<float, OP_DIV>) binary<float, OP_DIV>;
template [[host_name("div_f16")]] [[kernel]] decltype(binary<half, OP_DIV>) binary<half, OP_DIV>;
template [[host_name("div_bf16")]] [[kernel]] decltype(binary<bfloat, OP_DIV>) binary<bfloat, OP_DIV>;
template [[host_name("maximum")]] [[kernel]] decltype(binary<float, OP_MAXIMUM>) binary<float, OP_MAXIMUM>;
template [[host_name("maximum_f16")]] [[kernel]] decltype(binary<half, OP_MAXIMUM>) binary<half, OP_MAXIMUM>;
template [[host_name("maximum_bf16")]] [[kernel]] decltype(binary<bfloat, OP_MAXIMUM>) binary<bfloat, OP_MAXIMUM>;
template [[host_name("minimum")]] [[kernel]] decltype(binary<float, OP_MINIMUM>) binary<float, OP_MINIMUM>;
template [[host_name("minimum_f16")]] [[kernel]] decltype(binary<half, OP_MINIMUM>) binary<half, OP_MINIMUM>;
template [[host_name("minimum_bf16")]] [[kernel]] decltype(binary<bfloat, OP_MINIMUM>) binary<bfloat, OP_MINIMUM>;

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

template <typename T, uint OP>
kernel void binary_broadcast(device const T* x [[buffer(0)]],  // extent: p.sizes[0]
                             device const T* y [[buffer(1)]],  // extent: p.sizes[1]
                             device T* out [[buffer(2)]],  // extent: p.n
                             constant BroadcastParams& p [[buffer(3)]],
                             uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(binary_op(OP, float(x[broadcast_offset(p, 0, i)]), float(y[broadcast_offset(p, 1, i)])));
}

template [[host_name("add_broadcast")]] [[kernel]] decltype(binary_broadcast<float, OP_ADD>) binary_broadcast<float, OP_ADD>;
template [[host_name("add_broadcast_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_ADD>) binary_broadcast<half, OP_ADD>;
template [[host_name("add_broadcast_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_ADD>) binary_broadcast<bfloat, OP_ADD>;
template [[host_name("sub_broadcast")]] [[kernel]] decltype(binary_broadcast<float, OP_SUB>) binary_broadcast<float, OP_SUB>;
template [[host_name("sub_broadcast_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_SUB>) binary_broadcast<half, OP_SUB>;
template [[host_name("sub_broadcast_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_SUB>) binary_broadcast<bfloat, OP_SUB>;
template [[host_name("mul_broadcast")]] [[kernel]] decltype(binary_broadcast<float, OP_MUL>) binary_broadcast<float, OP_MUL>;
template [[host_name("mul_broadcast_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_MUL>) binary_broadcast<half, OP_MUL>;
template [[host_name("mul_broadcast_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_MUL>) binary_broadcast<bfloat, OP_MUL>;
template [[host_name("div_broadcast")]] [[kernel]] decltype(binary_broadcast<float, OP_DIV>) binary_broadcast<float, OP_DIV>;
template [[host_name("div_broadcast_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_DIV>) binary_broadcast<half, OP_DIV>;
template [[host_name("div_broadcast_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_DIV>) binary_broadcast<bfloat, OP_DIV>;
template [[host_name("maximum_broadcast")]] [[kernel]] decltype(binary_broadcast<float, OP_MAXIMUM>) binary_broadcast<float, OP_MAXIMUM>;
template [[host_name("maximum_broadcast_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_MAXIMUM>) binary_broadcast<half, OP_MAXIMUM>;
template [[host_name("maximum_broadcast_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_MAXIMUM>) binary_broadcast<bfloat, OP_MAXIMUM>;
template [[host_name("minimum_broadcast")]] [[kernel]] decltype(binary_broadcast<float, OP_MINIMUM>) binary_broadcast<float, OP_MINIMUM>;
template [[host_name("minimum_broadcast_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_MINIMUM>) binary_broadcast<half, OP_MINIMUM>;
template [[host_name("minimum_broadcast_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_MINIMUM>) binary_broadcast<bfloat, OP_MINIMUM>;
template [[host_name("equal")]] [[kernel]] decltype(binary_broadcast<float, OP_EQUAL>) binary_broadcast<float, OP_EQUAL>;
template [[host_name("equal_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_EQUAL>) binary_broadcast<half, OP_EQUAL>;
template [[host_name("equal_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_EQUAL>) binary_broadcast<bfloat, OP_EQUAL>;
template [[host_name("where_grad_a")]] [[kernel]] decltype(binary_broadcast<float, OP_WHERE_GRAD_A>) binary_broadcast<float, OP_WHERE_GRAD_A>;
template [[host_name("where_grad_a_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_WHERE_GRAD_A>) binary_broadcast<half, OP_WHERE_GRAD_A>;
template [[host_name("where_grad_a_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_WHERE_GRAD_A>) binary_broadcast<bfloat, OP_WHERE_GRAD_A>;
template [[host_name("where_grad_b")]] [[kernel]] decltype(binary_broadcast<float, OP_WHERE_GRAD_B>) binary_broadcast<float, OP_WHERE_GRAD_B>;
template [[host_name("where_grad_b_f16")]] [[kernel]] decltype(binary_broadcast<half, OP_WHERE_GRAD_B>) binary_broadcast<half, OP_WHERE_GRAD_B>;
template [[host_name("where_grad_b_bf16")]] [[kernel]] decltype(binary_broadcast<bfloat, OP_WHERE_GRAD_B>) binary_broadcast<bfloat, OP_WHERE_GRAD_B>;

template <typename T, uint OP>
kernel void ternary_broadcast(device const T* x [[buffer(0)]],  // extent: p.sizes[0]
                              device const T* y [[buffer(1)]],  // extent: p.sizes[1]
                              device const T* z [[buffer(2)]],  // extent: p.sizes[2]
                              device T* out [[buffer(3)]],  // extent: p.n
                              constant BroadcastParams& p [[buffer(4)]],
                              uint i [[thread_position_in_grid]]) {
    if (i < p.n)
        out[i] = T(ternary_op(OP, float(x[broadcast_offset(p, 0, i)]), float(y[broadcast_offset(p, 1, i)]),
                              float(z[broadcast_offset(p, 2, i)])));
}

template [[host_name("where")]] [[kernel]] decltype(ternary_broadcast<float, OP_WHERE>) ternary_broadcast<float, OP_WHERE>;
template [[host_name("where_f16")]] [[kernel]] decltype(ternary_broadcast<half, OP_WHERE>) ternary_broadcast<half, OP_WHERE>;
template [[host_name("where_bf16")]] [[kernel]] decltype(ternary_broadcast<bfloat, OP_WHERE>) ternary_broadcast<bfloat, OP_WHERE>;
template [[host_name("maximum_grad")]] [[kernel]] decltype(ternary_broadcast<float, OP_MAXIMUM_GRAD>) ternary_broadcast<float, OP_MAXIMUM_GRAD>;
template [[host_name("maximum_grad_f16")]] [[kernel]] decltype(ternary_broadcast<half, OP_MAXIMUM_GRAD>) ternary_broadcast<half, OP_MAXIMUM_GRAD>;
template [[host_name("maximum_grad_bf16")]] [[kernel]] decltype(ternary_broadcast<bfloat, OP_MAXIMUM_GRAD>) ternary_broadcast<bfloat, OP_MAXIMUM_GRAD>;
template [[host_name("minimum_grad")]] [[kernel]] decltype(ternary_broadcast<float, OP_MINIMUM_GRAD>) ternary_broadcast<float, OP_MINIMUM_GRAD>;
template [[host_name("minimum_grad_f16")]] [[kernel]] decltype(ternary_broadcast<half, OP_MINIMUM_GRAD>) ternary_broadcast<half, OP_MINIMUM_GRAD>;
template [[host_name("minimum_grad_bf16")]] [[kernel]] decltype(ternary_broadcast<bfloat, OP_MINIMUM_GRAD>) ternary_broadcast<bfloat, OP_MINIMUM_GRAD>;

// ---------------------------------------------------------------- arithmetic

struct ScaleParams {
    uint n;
    float s;
};

// out = s * x
template <typename T>
kernel void scale(device const T* x [[buffer(0)]],  // extent: p.n
                  device T* out [[buffer(1)]],  // extent: p.n
                  constant ScaleParams& p [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(p.s * float(x[i]));
}

template [[host_name("scale")]] [[kernel]] decltype(scale<float>) scale<float>;
template [[host_name("scale_f16")]] [[kernel]] decltype(scale<half>) scale<half>;
template [[host_name("scale_bf16")]] [[kernel]] decltype(scale<bfloat>) scale<bfloat>;

// ---------------------------------------------------------------- activations
//
// Gradient kernels take the forward's input where the derivative needs it (leaky relu) and the
// forward's output where that is cheaper (relu, sigmoid, tanh, softmax); relu's output is > 0
// exactly where its input is, so relu_grad takes either.

struct LinearParams {
    uint n;
    float a;
    float b;
};

// out = a*x + b (MPS's linear neuron)
template <typename T>
kernel void linear_activation(device const T* x [[buffer(0)]],  // extent: p.n
                              device T* out [[buffer(1)]],  // extent: p.n
                              constant LinearParams& p [[buffer(2)]],
                              uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(fma(p.a, float(x[i]), p.b));
}

template [[host_name("linear_activation")]] [[kernel]] decltype(linear_activation<float>) linear_activation<float>;
template [[host_name("linear_activation_f16")]] [[kernel]] decltype(linear_activation<half>) linear_activation<half>;
template [[host_name("linear_activation_bf16")]] [[kernel]] decltype(linear_activation<bfloat>) linear_activation<bfloat>;

// Not max(x, 0), which is fmax and turns NaN into 0: NaN stays NaN, as in PyTorch.
template <typename T>
kernel void relu(device const T* x [[buffer(0)]],  // extent: p.n
                 device T* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(v < 0.0f ? 0.0f : v);
}

template [[host_name("relu")]] [[kernel]] decltype(relu<float>) relu<float>;
template [[host_name("relu_f16")]] [[kernel]] decltype(relu<half>) relu<half>;
template [[host_name("relu_bf16")]] [[kernel]] decltype(relu<bfloat>) relu<bfloat>;

// dx = 0 where x ≤ 0, else g (0 at the kink; g where x is NaN, as PyTorch); x is relu's input or output
template <typename T>
kernel void relu_grad(device const T* g [[buffer(0)]],  // extent: p.n
                      device const T* x [[buffer(1)]],  // extent: p.n
                      device T* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(float(x[i]) <= 0.0f ? 0.0f : float(g[i]));
}

template [[host_name("relu_grad")]] [[kernel]] decltype(relu_grad<float>) relu_grad<float>;
template [[host_name("relu_grad_f16")]] [[kernel]] decltype(relu_grad<half>) relu_grad<half>;
template [[host_name("relu_grad_bf16")]] [[kernel]] decltype(relu_grad<bfloat>) relu_grad<bfloat>;

// relu_grad(g + h, x): the gradient of a relu whose output has two readers, summed where it is
// masked (a graph fuses add → relu_grad so). The sum is rounded to T as add's kernel rounds it,
// so the result is add then relu_grad's, bit for bit, without the sum's pass over memory.
template <typename T>
kernel void relu_grad_add(device const T* g [[buffer(0)]],  // extent: p.n
                          device const T* h [[buffer(1)]],  // extent: p.n
                          device const T* x [[buffer(2)]],  // extent: p.n
                          device T* out [[buffer(3)]],  // extent: p.n
                          constant CountParams& p [[buffer(4)]],
                          uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = float(x[i]) <= 0.0f ? T(0.0f) : T(float(g[i]) + float(h[i]));
}

template [[host_name("relu_grad_add")]] [[kernel]] decltype(relu_grad_add<float>) relu_grad_add<float>;
template [[host_name("relu_grad_add_f16")]] [[kernel]] decltype(relu_grad_add<half>) relu_grad_add<half>;
template [[host_name("relu_grad_add_bf16")]] [[kernel]] decltype(relu_grad_add<bfloat>) relu_grad_add<bfloat>;

struct LeakyParams {
    uint n;
    float slope;
};

template <typename T>
kernel void leaky_relu(device const T* x [[buffer(0)]],  // extent: p.n
                       device T* out [[buffer(1)]],  // extent: p.n
                       constant LeakyParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(v > 0.0f ? v : p.slope * v);
}

template [[host_name("leaky_relu")]] [[kernel]] decltype(leaky_relu<float>) leaky_relu<float>;
template [[host_name("leaky_relu_f16")]] [[kernel]] decltype(leaky_relu<half>) leaky_relu<half>;
template [[host_name("leaky_relu_bf16")]] [[kernel]] decltype(leaky_relu<bfloat>) leaky_relu<bfloat>;

template <typename T>
kernel void leaky_relu_grad(device const T* g [[buffer(0)]],  // extent: p.n
                            device const T* x [[buffer(1)]],  // extent: p.n
                            device T* out [[buffer(2)]],  // extent: p.n
                            constant LeakyParams& p [[buffer(3)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float gi = float(g[i]);
    out[i] = T(float(x[i]) > 0.0f ? gi : p.slope * gi);
}

template [[host_name("leaky_relu_grad")]] [[kernel]] decltype(leaky_relu_grad<float>) leaky_relu_grad<float>;
template [[host_name("leaky_relu_grad_f16")]] [[kernel]] decltype(leaky_relu_grad<half>) leaky_relu_grad<half>;
template [[host_name("leaky_relu_grad_bf16")]] [[kernel]] decltype(leaky_relu_grad<bfloat>) leaky_relu_grad<bfloat>;

// 1/(1 + e^-x); precise::exp so that e^-x overflows to inf (giving 0) instead of NaN.
template <typename T>
kernel void sigmoid(device const T* x [[buffer(0)]],  // extent: p.n
                    device T* out [[buffer(1)]],  // extent: p.n
                    constant CountParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(1.0f / (1.0f + precise::exp(-float(x[i]))));
}

template [[host_name("sigmoid")]] [[kernel]] decltype(sigmoid<float>) sigmoid<float>;
template [[host_name("sigmoid_f16")]] [[kernel]] decltype(sigmoid<half>) sigmoid<half>;
template [[host_name("sigmoid_bf16")]] [[kernel]] decltype(sigmoid<bfloat>) sigmoid<bfloat>;

// dx = g·y·(1 − y), y the sigmoid's output
template <typename T>
kernel void sigmoid_grad(device const T* g [[buffer(0)]],  // extent: p.n
                         device const T* y [[buffer(1)]],  // extent: p.n
                         device T* out [[buffer(2)]],  // extent: p.n
                         constant CountParams& p [[buffer(3)]],
                         uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(y[i]);
    out[i] = T(float(g[i]) * v * (1.0f - v));
}

template [[host_name("sigmoid_grad")]] [[kernel]] decltype(sigmoid_grad<float>) sigmoid_grad<float>;
template [[host_name("sigmoid_grad_f16")]] [[kernel]] decltype(sigmoid_grad<half>) sigmoid_grad<half>;
template [[host_name("sigmoid_grad_bf16")]] [[kernel]] decltype(sigmoid_grad<bfloat>) sigmoid_grad<bfloat>;

// The op is `tanh`; the kernel is not, so it cannot shadow metal::tanh. precise:: because fast
// tanh returns NaN past |x| ≈ 44.
template <typename T>
kernel void tanh_activation(device const T* x [[buffer(0)]],  // extent: p.n
                            device T* out [[buffer(1)]],  // extent: p.n
                            constant CountParams& p [[buffer(2)]],
                            uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(precise::tanh(float(x[i])));
}

template [[host_name("tanh_activation")]] [[kernel]] decltype(tanh_activation<float>) tanh_activation<float>;
template [[host_name("tanh_activation_f16")]] [[kernel]] decltype(tanh_activation<half>) tanh_activation<half>;
template [[host_name("tanh_activation_bf16")]] [[kernel]] decltype(tanh_activation<bfloat>) tanh_activation<bfloat>;

// dx = g·(1 − y²), y the tanh's output
template <typename T>
kernel void tanh_grad(device const T* g [[buffer(0)]],  // extent: p.n
                      device const T* y [[buffer(1)]],  // extent: p.n
                      device T* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(y[i]);
    out[i] = T(float(g[i]) * (1.0f - v * v));
}

template [[host_name("tanh_grad")]] [[kernel]] decltype(tanh_grad<float>) tanh_grad<float>;
template [[host_name("tanh_grad_f16")]] [[kernel]] decltype(tanh_grad<half>) tanh_grad<half>;
template [[host_name("tanh_grad_bf16")]] [[kernel]] decltype(tanh_grad<bfloat>) tanh_grad<bfloat>;

// ---------------------------------------------------------------- math
//
// Kernels named like the op would shadow Metal's functions (exp, log, sqrt, ...), so they are the
// op's name with `_op`. precise:: wherever the result must hold for large or tiny inputs.

template <typename T>
kernel void exp_op(device const T* x [[buffer(0)]],  // extent: p.n
                   device T* out [[buffer(1)]],  // extent: p.n
                   constant CountParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(precise::exp(float(x[i])));
}

template [[host_name("exp_op")]] [[kernel]] decltype(exp_op<float>) exp_op<float>;
template [[host_name("exp_op_f16")]] [[kernel]] decltype(exp_op<half>) exp_op<half>;
template [[host_name("exp_op_bf16")]] [[kernel]] decltype(exp_op<bfloat>) exp_op<bfloat>;

template <typename T>
kernel void log_op(device const T* x [[buffer(0)]],  // extent: p.n
                   device T* out [[buffer(1)]],  // extent: p.n
                   constant CountParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(precise::log(float(x[i])));
}

template [[host_name("log_op")]] [[kernel]] decltype(log_op<float>) log_op<float>;
template [[host_name("log_op_f16")]] [[kernel]] decltype(log_op<half>) log_op<half>;
template [[host_name("log_op_bf16")]] [[kernel]] decltype(log_op<bfloat>) log_op<bfloat>;

template <typename T>
kernel void sqrt_op(device const T* x [[buffer(0)]],  // extent: p.n
                    device T* out [[buffer(1)]],  // extent: p.n
                    constant CountParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(precise::sqrt(float(x[i])));
}

template [[host_name("sqrt_op")]] [[kernel]] decltype(sqrt_op<float>) sqrt_op<float>;
template [[host_name("sqrt_op_f16")]] [[kernel]] decltype(sqrt_op<half>) sqrt_op<half>;
template [[host_name("sqrt_op_bf16")]] [[kernel]] decltype(sqrt_op<bfloat>) sqrt_op<bfloat>;

template <typename T>
kernel void rsqrt_op(device const T* x [[buffer(0)]],  // extent: p.n
                     device T* out [[buffer(1)]],  // extent: p.n
                     constant CountParams& p [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(precise::rsqrt(float(x[i])));
}

template [[host_name("rsqrt_op")]] [[kernel]] decltype(rsqrt_op<float>) rsqrt_op<float>;
template [[host_name("rsqrt_op_f16")]] [[kernel]] decltype(rsqrt_op<half>) rsqrt_op<half>;
template [[host_name("rsqrt_op_bf16")]] [[kernel]] decltype(rsqrt_op<bfloat>) rsqrt_op<bfloat>;

template <typename T>
kernel void abs_op(device const T* x [[buffer(0)]],  // extent: p.n
                   device T* out [[buffer(1)]],  // extent: p.n
                   constant CountParams& p [[buffer(2)]],
                   uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(fabs(float(x[i])));
}

template [[host_name("abs_op")]] [[kernel]] decltype(abs_op<float>) abs_op<float>;
template [[host_name("abs_op_f16")]] [[kernel]] decltype(abs_op<half>) abs_op<half>;
template [[host_name("abs_op_bf16")]] [[kernel]] decltype(abs_op<bfloat>) abs_op<bfloat>;

// dx = g·sign(x): 0 at the kink, and 0 where x is NaN (Metal's sign, and PyTorch's)
template <typename T>
kernel void abs_grad(device const T* g [[buffer(0)]],  // extent: p.n
                     device const T* x [[buffer(1)]],  // extent: p.n
                     device T* out [[buffer(2)]],  // extent: p.n
                     constant CountParams& p [[buffer(3)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = T(float(g[i]) * sign(float(x[i])));
}

template [[host_name("abs_grad")]] [[kernel]] decltype(abs_grad<float>) abs_grad<float>;
template [[host_name("abs_grad_f16")]] [[kernel]] decltype(abs_grad<half>) abs_grad<half>;
template [[host_name("abs_grad_bf16")]] [[kernel]] decltype(abs_grad<bfloat>) abs_grad<bfloat>;

struct ClampParams {
    uint n;
    float min;  // -INFINITY or INFINITY for a side without a bound
    float max;
};

// Not metal::clamp, whose fmin/fmax would clip NaN to a bound: NaN stays NaN, as in PyTorch.
// A bound between two values of T rounds to one of them when stored, as the result of any op does.
template <typename T>
kernel void clamp_op(device const T* x [[buffer(0)]],  // extent: p.n
                     device T* out [[buffer(1)]],  // extent: p.n
                     constant ClampParams& p [[buffer(2)]],
                     uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(v < p.min ? p.min : v > p.max ? p.max : v);
}

template [[host_name("clamp_op")]] [[kernel]] decltype(clamp_op<float>) clamp_op<float>;
template [[host_name("clamp_op_f16")]] [[kernel]] decltype(clamp_op<half>) clamp_op<half>;
template [[host_name("clamp_op_bf16")]] [[kernel]] decltype(clamp_op<bfloat>) clamp_op<bfloat>;

// dx = g where min ≤ x ≤ max (the bounds included, as PyTorch), else 0 (NaN included)
template <typename T>
kernel void clamp_grad(device const T* g [[buffer(0)]],  // extent: p.n
                       device const T* x [[buffer(1)]],  // extent: p.n
                       device T* out [[buffer(2)]],  // extent: p.n
                       constant ClampParams& p [[buffer(3)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(v >= p.min && v <= p.max ? float(g[i]) : 0.0f);
}

template [[host_name("clamp_grad")]] [[kernel]] decltype(clamp_grad<float>) clamp_grad<float>;
template [[host_name("clamp_grad_f16")]] [[kernel]] decltype(clamp_grad<half>) clamp_grad<half>;
template [[host_name("clamp_grad_bf16")]] [[kernel]] decltype(clamp_grad<bfloat>) clamp_grad<bfloat>;

struct PowerParams {
    uint n;
    float exponent;
};

// x^e. Metal's pow is defined for x ≥ 0 only, so a negative base is raised by its magnitude and
// takes the sign an integer power gives it (odd: negative); to any other power it is NaN, as in
// PyTorch. x^0 is 1 for every x, NaN included.
template <typename T>
kernel void power(device const T* x [[buffer(0)]],  // extent: p.n
                  device T* out [[buffer(1)]],  // extent: p.n
                  constant PowerParams& p [[buffer(2)]],
                  uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]), e = p.exponent, r = precise::pow(fabs(v), e);
    bool integral = e == rint(e), odd = fabs(fmod(e, 2.0f)) == 1.0f;  // ±∞: integral, even
    out[i] = T(e == 0.0f ? 1.0f : !(v < 0.0f) ? r : !integral ? NAN : odd ? -r : r);
}

template [[host_name("power")]] [[kernel]] decltype(power<float>) power<float>;
template [[host_name("power_f16")]] [[kernel]] decltype(power<half>) power<half>;
template [[host_name("power_bf16")]] [[kernel]] decltype(power<bfloat>) power<bfloat>;

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
template <typename T>
kernel void gelu(device const T* x [[buffer(0)]],  // extent: p.n
                 device T* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(v * normal_cdf(v));
}

template [[host_name("gelu")]] [[kernel]] decltype(gelu<float>) gelu<float>;
template [[host_name("gelu_f16")]] [[kernel]] decltype(gelu<half>) gelu<half>;
template [[host_name("gelu_bf16")]] [[kernel]] decltype(gelu<bfloat>) gelu<bfloat>;

// dx = g·(Φ(x) + x·φ(x)), φ the standard normal density
template <typename T>
kernel void gelu_grad(device const T* g [[buffer(0)]],  // extent: p.n
                      device const T* x [[buffer(1)]],  // extent: p.n
                      device T* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(float(g[i]) * (normal_cdf(v) + v * 0.39894228f * precise::exp(-0.5f * v * v)));
}

template [[host_name("gelu_grad")]] [[kernel]] decltype(gelu_grad<float>) gelu_grad<float>;
template [[host_name("gelu_grad_f16")]] [[kernel]] decltype(gelu_grad<half>) gelu_grad<half>;
template [[host_name("gelu_grad_bf16")]] [[kernel]] decltype(gelu_grad<bfloat>) gelu_grad<bfloat>;

// x·σ(x); precise::exp so that e^-x overflows to inf (σ = 0) instead of NaN.
template <typename T>
kernel void silu(device const T* x [[buffer(0)]],  // extent: p.n
                 device T* out [[buffer(1)]],  // extent: p.n
                 constant CountParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    out[i] = T(v / (1.0f + precise::exp(-v)));
}

template [[host_name("silu")]] [[kernel]] decltype(silu<float>) silu<float>;
template [[host_name("silu_f16")]] [[kernel]] decltype(silu<half>) silu<half>;
template [[host_name("silu_bf16")]] [[kernel]] decltype(silu<bfloat>) silu<bfloat>;

// dx = g·σ(x)·(1 + x·(1 − σ(x)))
template <typename T>
kernel void silu_grad(device const T* g [[buffer(0)]],  // extent: p.n
                      device const T* x [[buffer(1)]],  // extent: p.n
                      device T* out [[buffer(2)]],  // extent: p.n
                      constant CountParams& p [[buffer(3)]],
                      uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float v = float(x[i]);
    float s = 1.0f / (1.0f + precise::exp(-v));
    out[i] = T(float(g[i]) * s * (1.0f + v * (1.0f - s)));
}

template [[host_name("silu_grad")]] [[kernel]] decltype(silu_grad<float>) silu_grad<float>;
template [[host_name("silu_grad_f16")]] [[kernel]] decltype(silu_grad<half>) silu_grad<half>;
template [[host_name("silu_grad_bf16")]] [[kernel]] decltype(silu_grad<bfloat>) silu_grad<bfloat>;

struct DropoutParams {
    uint n;
    float p;
};

// out = x·(u ≥ p)/(1 − p), with u uniform in [0, 1) drawn afresh each step and read again by
// the gradient (which is this kernel applied to g: dropout is linear in x). A dropped element
// is x·0, not 0, so a NaN stays NaN, as in PyTorch; p = 1 drops everything (scale 0, not ∞).
// u has x's storage type: rounded to half or bfloat, it still decides the mask as stored.
template <typename T>
kernel void dropout(device const T* x [[buffer(0)]],  // extent: p.n
                    device const T* u [[buffer(1)]],  // extent: p.n
                    device T* out [[buffer(2)]],  // extent: p.n
                    constant DropoutParams& p [[buffer(3)]],
                    uint i [[thread_position_in_grid]]) {
    if (i >= p.n) return;
    float scale = p.p < 1.0f ? 1.0f / (1.0f - p.p) : 0.0f;
    out[i] = T(float(x[i]) * (float(u[i]) >= p.p ? scale : 0.0f));
}

template [[host_name("dropout")]] [[kernel]] decltype(dropout<float>) dropout<float>;
template [[host_name("dropout_f16")]] [[kernel]] decltype(dropout<half>) dropout<half>;
template [[host_name("dropout_bf16")]] [[kernel]] decltype(dropout<bfloat>) dropout<bfloat>;

struct SoftmaxParams {
    uint positions;  // N·inner
    uint channels;
    uint inner;      // H·W (1 for an (N, C) input)
};

// Softmax over dim 1 of (N, C, inner): one thread per (n, position), walking the channels at
// stride `inner` (neighbouring threads read neighbouring addresses). The max and the sum come
// in one pass, the sum rescaled whenever the running max grows; both stay float, and each
// output rounds once to T.
template <typename T>
kernel void softmax(device const T* x [[buffer(0)]],  // extent: p.positions * p.channels
                    device T* out [[buffer(1)]],  // extent: p.positions * p.channels
                    constant SoftmaxParams& p [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
    if (i >= p.positions) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float m = float(x[base]), sum = 0.0f;  // (not -INFINITY: NVRTC has no __builtin_inff)
    for (uint c = 0; c < p.channels; c++) {
        float v = float(x[base + c * p.inner]);
        float m_new = max(m, v);
        sum = sum * precise::exp(m - m_new) + precise::exp(v - m_new);
        m = m_new;
    }
    float inv = 1.0f / sum;
    for (uint c = 0; c < p.channels; c++)
        out[base + c * p.inner] = T(precise::exp(float(x[base + c * p.inner]) - m) * inv);
}

template [[host_name("softmax")]] [[kernel]] decltype(softmax<float>) softmax<float>;
template [[host_name("softmax_f16")]] [[kernel]] decltype(softmax<half>) softmax<half>;
template [[host_name("softmax_bf16")]] [[kernel]] decltype(softmax<bfloat>) softmax<bfloat>;

// dx_c = y_c·(g_c − Σ_k g_k·y_k), y the softmax's output; the dot product stays float.
template <typename T>
kernel void softmax_grad(device const T* g [[buffer(0)]],  // extent: p.positions * p.channels
                         device const T* y [[buffer(1)]],  // extent: p.positions * p.channels
                         device T* out [[buffer(2)]],  // extent: p.positions * p.channels
                         constant SoftmaxParams& p [[buffer(3)]],
                         uint i [[thread_position_in_grid]]) {
    if (i >= p.positions) return;
    uint base = (i / p.inner) * p.channels * p.inner + i % p.inner;
    float dot_gy = 0.0f;
    for (uint c = 0; c < p.channels; c++) dot_gy = fma(float(g[base + c * p.inner]), float(y[base + c * p.inner]), dot_gy);
    for (uint c = 0; c < p.channels; c++) {
        uint at = base + c * p.inner;
        out[at] = T(float(y[at]) * (float(g[at]) - dot_gy));
    }
}

template [[host_name("softmax_grad")]] [[kernel]] decltype(softmax_grad<float>) softmax_grad<float>;
template [[host_name("softmax_grad_f16")]] [[kernel]] decltype(softmax_grad<half>) softmax_grad<half>;
template [[host_name("softmax_grad_bf16")]] [[kernel]] decltype(softmax_grad<bfloat>) softmax_grad<bfloat>;
