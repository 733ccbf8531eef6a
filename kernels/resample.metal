// Upsampling of NCHW images by an integer factor s: nearest and bilinear, with their gradients.
// Each element written is written by one thread (a thread per element, or for nearest
// upsampling a thread per s×s block); gradients gather (no atomics, reproducible). Each kernel is
// a template over the storage type T (float, half, bfloat), instantiated as `name`, `name_f16`
// and `name_bf16`: nearest upsampling copies T values; the others compute in float and round
// once when they store.
//
// Bilinear follows PyTorch's align_corners=False: output pixel j samples the input at
// src = max((j + ½)/s − ½, 0), between rows ⌊src⌋ and ⌊src⌋ + 1 (clamped to the last row).
#include <metal_stdlib>
using namespace metal;

struct ResampleParams {
    uint count;  // elements written (upsample_nearest: read, a thread each)
    int h, w;    // input size
    int oh, ow;  // output size, s·h × s·w
    int scale;
};

// A thread per input pixel, which writes its s×s block: input row r of the stacked planes is
// output rows s·r … s·r + s − 1 (OH = s·H), so one division (i / W) places it — a thread per
// output pixel spent several, a dozen instructions each on a GPU, for one copy. p.count is the
// input's elements here.
template <typename T>
kernel void upsample_nearest(device const T* x [[buffer(0)]],  // extent: p.count
                             device T* out [[buffer(1)]],  // extent: p.count * p.scale * p.scale
                             constant ResampleParams& p [[buffer(2)]],
                             uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    const uint row = i / uint(p.w), col = i - row * uint(p.w);
    const T v = x[i];
    device T* block = out + row * uint(p.scale) * uint(p.ow) + col * uint(p.scale);
    for (int dy = 0; dy < p.scale; dy++)
        for (int dx = 0; dx < p.scale; dx++) block[dy * p.ow + dx] = v;
}

template [[host_name("upsample_nearest")]] [[kernel]] decltype(upsample_nearest<float>) upsample_nearest<float>;
template [[host_name("upsample_nearest_f16")]] [[kernel]] decltype(upsample_nearest<half>) upsample_nearest<half>;
template [[host_name("upsample_nearest_bf16")]] [[kernel]] decltype(upsample_nearest<bfloat>) upsample_nearest<bfloat>;

// dx = the sum of g over the s×s block each input pixel was copied to (placed as upsample_nearest
// places it)
template <typename T>
kernel void upsample_nearest_grad(device const T* g [[buffer(0)]],  // extent: p.count / (p.h * p.w) * p.oh * p.ow
                                  device T* dx [[buffer(1)]],  // extent: p.count
                                  constant ResampleParams& p [[buffer(2)]],
                                  uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    const uint row = i / uint(p.w), col = i - row * uint(p.w);
    device const T* block = g + row * uint(p.scale) * uint(p.ow) + col * uint(p.scale);
    float acc = 0.0f;
    for (int dy = 0; dy < p.scale; dy++)
        for (int dx = 0; dx < p.scale; dx++) acc += float(block[dy * p.ow + dx]);
    dx[i] = T(acc);
}

template [[host_name("upsample_nearest_grad")]] [[kernel]] decltype(upsample_nearest_grad<float>) upsample_nearest_grad<float>;
template [[host_name("upsample_nearest_grad_f16")]] [[kernel]] decltype(upsample_nearest_grad<half>) upsample_nearest_grad<half>;
template [[host_name("upsample_nearest_grad_bf16")]] [[kernel]] decltype(upsample_nearest_grad<bfloat>) upsample_nearest_grad<bfloat>;

struct Taps {
    int i0, i1;    // the two input rows (or columns) ...
    float w0, w1;  // ... and their weights
};

inline Taps bilinear_taps(int j, int scale, int n) {
    float src = max((float(j) + 0.5f) / float(scale) - 0.5f, 0.0f);
    int i0 = min(int(src), n - 1);
    float l = src - float(i0);
    Taps t = {i0, min(i0 + 1, n - 1), 1.0f - l, l};
    return t;
}

// Input row i's weight in output row j; −1 where row j does not read row i. (A row it reads may
// weigh 0: PyTorch still adds 0·g there, so a NaN gradient reaches every pixel its output read.)
inline float bilinear_weight(int j, int i, int scale, int n) {
    Taps t = bilinear_taps(j, scale, n);
    if (t.i0 != i && t.i1 != i) return -1.0f;
    return (t.i0 == i ? t.w0 : 0.0f) + (t.i1 == i ? t.w1 : 0.0f);
}

template <typename T>
kernel void upsample_bilinear(device const T* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.w
                              device T* out [[buffer(1)]],  // extent: p.count
                              constant ResampleParams& p [[buffer(2)]],
                              uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int ox = i % p.ow, oy = (i / p.ow) % p.oh;
    device const T* plane = x + (i / (p.ow * p.oh)) * (p.h * p.w);
    Taps ty = bilinear_taps(oy, p.scale, p.h), tx = bilinear_taps(ox, p.scale, p.w);
    float top = tx.w0 * float(plane[ty.i0 * p.w + tx.i0]) + tx.w1 * float(plane[ty.i0 * p.w + tx.i1]);
    float bottom = tx.w0 * float(plane[ty.i1 * p.w + tx.i0]) + tx.w1 * float(plane[ty.i1 * p.w + tx.i1]);
    out[i] = T(ty.w0 * top + ty.w1 * bottom);
}

template [[host_name("upsample_bilinear")]] [[kernel]] decltype(upsample_bilinear<float>) upsample_bilinear<float>;
template [[host_name("upsample_bilinear_f16")]] [[kernel]] decltype(upsample_bilinear<half>) upsample_bilinear<half>;
template [[host_name("upsample_bilinear_bf16")]] [[kernel]] decltype(upsample_bilinear<bfloat>) upsample_bilinear<bfloat>;

// dx[y, x] = Σ over the outputs (j, k) that sample it of g[j, k]·weight(j, y)·weight(k, x).
// Output rows j sampling input row y lie within s·(y − 1) ≤ j < s·(y + 2); the loop visits
// those (3s×3s outputs) and skips the ones that do not sample it.
template <typename T>
kernel void upsample_bilinear_grad(device const T* g [[buffer(0)]],  // extent: p.count / (p.h * p.w) * p.oh * p.ow
                                   device T* dx [[buffer(1)]],  // extent: p.count
                                   constant ResampleParams& p [[buffer(2)]],
                                   uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int x = i % p.w, y = (i / p.w) % p.h;
    device const T* gp = g + (i / (p.w * p.h)) * (p.oh * p.ow);
    float acc = 0.0f;
    for (int j = max(p.scale * (y - 1), 0); j < min(p.scale * (y + 2), p.oh); j++) {
        float wy = bilinear_weight(j, y, p.scale, p.h);
        if (wy < 0.0f) continue;
        float row = 0.0f;
        for (int k = max(p.scale * (x - 1), 0); k < min(p.scale * (x + 2), p.ow); k++) {
            float wx = bilinear_weight(k, x, p.scale, p.w);
            if (wx >= 0.0f) row = fma(float(gp[j * p.ow + k]), wx, row);
        }
        acc = fma(wy, row, acc);
    }
    dx[i] = T(acc);
}

template [[host_name("upsample_bilinear_grad")]] [[kernel]] decltype(upsample_bilinear_grad<float>) upsample_bilinear_grad<float>;
template [[host_name("upsample_bilinear_grad_f16")]] [[kernel]] decltype(upsample_bilinear_grad<half>) upsample_bilinear_grad<half>;
template [[host_name("upsample_bilinear_grad_bf16")]] [[kernel]] decltype(upsample_bilinear_grad<bfloat>) upsample_bilinear_grad<bfloat>;
