// Elementwise kernels over flat float32 buffers: one thread per element, bounds guarded.
#include <metal_stdlib>
using namespace metal;

struct AxpyParams {
    uint n;
    float a;
};

// y = a*x + y
kernel void axpy(device const float* x [[buffer(0)]],
                 device float* y [[buffer(1)]],
                 constant AxpyParams& p [[buffer(2)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < p.n) y[i] = fma(p.a, x[i], y[i]);
}

struct FillParams {
    uint n;
    uint value;
};

// out[i] = value, for any 32-bit pattern (a float's bits, a predicate word, a counter).
kernel void fill_u32(device uint* out [[buffer(0)]],
                     constant FillParams& p [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = p.value;
}

struct CopyParams {
    uint n;  // float4 elements
};

// out = x, four floats a thread: the device-memory bandwidth reference for the other kernels.
kernel void copy_f4(device const float4* x [[buffer(0)]],
                    device float4* out [[buffer(1)]],
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
kernel void add(device const float* x [[buffer(0)]],
                device const float* y [[buffer(1)]],
                device float* out [[buffer(2)]],
                constant CountParams& p [[buffer(3)]],
                uint i [[thread_position_in_grid]]) {
    if (i < p.n) out[i] = x[i] + y[i];
}
