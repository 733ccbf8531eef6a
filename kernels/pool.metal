// Sliding-window kernels over NCHW float32 images: max and average pooling with their
// gradients, and the fixed Laplacian-of-Gaussian filter.
//
// Every kernel runs one thread per element it writes and gathers what it needs, so no two
// threads write the same address: no atomics, and results are bitwise reproducible.
#include <metal_stdlib>
using namespace metal;

struct PoolParams {
    uint count;       // elements written: N·C·OH·OW for the forward kernels, N·C·H·W for the gradients
    int h, w;         // input height and width
    int oh, ow;       // output height and width
    int kh, kw;       // window
    int sh, sw;       // stride
    int ph, pw;       // zero padding (at most half the window, so every window holds an input pixel)
};

// The first maximum of the window at output (oh, ow) of one plane, as an index into the plane.
// Row-major window order with a strict `>` makes ties go to the earliest element; NaN counts as
// above everything (as in PyTorch: a window holding NaN pools to NaN), so the first NaN ends the
// search. The forward and the gradient kernels share this one function so that they always
// agree on the arg-max.
inline int window_argmax(device const float* plane, constant PoolParams& p, int oh, int ow) {
    int h0 = oh * p.sh - p.ph, w0 = ow * p.sw - p.pw;
    float best = 0.0f;
    int at = -1;  // none yet: the first pixel in the window always becomes the best
    for (int dy = 0; dy < p.kh; dy++) {
        int y = h0 + dy;
        if (y < 0 || y >= p.h) continue;
        for (int dx = 0; dx < p.kw; dx++) {
            int x = w0 + dx;
            if (x < 0 || x >= p.w) continue;
            float v = plane[y * p.w + x];
            if (at < 0 || !(v <= best)) {  // v > best, or v is NaN
                best = v;
                at = y * p.w + x;
                if (v != v) return at;
            }
        }
    }
    return at;
}

kernel void max_pool2d(device const float* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.w
                       device float* out [[buffer(1)]],  // extent: p.count
                       constant PoolParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int ow = i % p.ow, oh = (i / p.ow) % p.oh;
    device const float* plane = x + (i / (p.ow * p.oh)) * (p.h * p.w);
    out[i] = plane[window_argmax(plane, p, oh, ow)];
}

struct Pool2x2Params {
    uint count;  // N·C·OH·OW
    uint h;      // input height
    uint oh, ow; // output height and width; the input's width is 2·ow
};

// max_pool2d's common case, 2×2 windows with stride 2, no padding and an even width: a window's
// two rows are two aligned float2 loads. Same result as window_argmax (the first maximum in
// row-major order, NaN above everything), so max_pool2d_grad finds the same arg-max.
kernel void max_pool2d_2x2(device const float2* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.ow
                           device float* out [[buffer(1)]],  // extent: p.count
                           constant Pool2x2Params& p [[buffer(2)]],
                           uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    uint ow = i % p.ow, rows = i / p.ow, oh = rows % p.oh, plane = rows / p.oh;
    uint top = (plane * p.h + 2 * oh) * p.ow + ow;  // in float2s: an input row is ow of them
    float2 a = x[top], b = x[top + p.ow];
    float best = a.x;
    if (!(a.y <= best) && best == best) best = a.y;  // a.y > best, or a.y is NaN and best is not
    if (!(b.x <= best) && best == best) best = b.x;
    if (!(b.y <= best) && best == best) best = b.y;
    out[i] = best;
}

// The output windows that contain input row (or column) `y`: [first, last], clipped to the output.
inline int2 windows_covering(int y, int k, int s, int pad, int n_out) {
    // Window o covers o·s − pad … o·s − pad + k − 1.
    int hi = (y + pad) / s;
    int lo_num = y + pad - k + 1;
    int lo = lo_num <= 0 ? 0 : (lo_num + s - 1) / s;
    return int2(lo, min(hi, n_out - 1));
}

// dx[n,c,y,x] = Σ g over the windows whose arg-max is (y, x): a gather over the few windows
// covering the pixel, each one's arg-max recomputed with the forward's tie rule.
kernel void max_pool2d_grad(device const float* g [[buffer(0)]],  // extent: p.count / (p.h * p.w) * p.oh * p.ow
                            device const float* x [[buffer(1)]],  // extent: p.count
                            device float* dx [[buffer(2)]],  // extent: p.count
                            constant PoolParams& p [[buffer(3)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int px = i % p.w, py = (i / p.w) % p.h;
    uint plane_index = i / (p.w * p.h);
    device const float* plane = x + plane_index * (p.h * p.w);
    device const float* gp = g + plane_index * (p.oh * p.ow);
    int2 rows = windows_covering(py, p.kh, p.sh, p.ph, p.oh);
    int2 cols = windows_covering(px, p.kw, p.sw, p.pw, p.ow);
    int me = py * p.w + px;
    float acc = 0.0f;
    for (int oh = rows.x; oh <= rows.y; oh++)
        for (int ow = cols.x; ow <= cols.y; ow++)
            if (window_argmax(plane, p, oh, ow) == me) acc += gp[oh * p.ow + ow];
    dx[i] = acc;
}

// Padding counts as zeros: every window is divided by kh·kw (PyTorch's count_include_pad=True).
kernel void avg_pool2d(device const float* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.w
                       device float* out [[buffer(1)]],  // extent: p.count
                       constant PoolParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int ow = i % p.ow, oh = (i / p.ow) % p.oh;
    device const float* plane = x + (i / (p.ow * p.oh)) * (p.h * p.w);
    int h0 = oh * p.sh - p.ph, w0 = ow * p.sw - p.pw;
    float acc = 0.0f;
    for (int y = max(h0, 0); y < min(h0 + p.kh, p.h); y++)
        for (int x = max(w0, 0); x < min(w0 + p.kw, p.w); x++)
            acc += plane[y * p.w + x];
    out[i] = acc / float(p.kh * p.kw);
}

kernel void avg_pool2d_grad(device const float* g [[buffer(0)]],  // extent: p.count / (p.h * p.w) * p.oh * p.ow
                            device float* dx [[buffer(1)]],  // extent: p.count
                            constant PoolParams& p [[buffer(2)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int px = i % p.w, py = (i / p.w) % p.h;
    device const float* gp = g + (i / (p.w * p.h)) * (p.oh * p.ow);
    int2 rows = windows_covering(py, p.kh, p.sh, p.ph, p.oh);
    int2 cols = windows_covering(px, p.kw, p.sw, p.pw, p.ow);
    float acc = 0.0f;
    for (int oh = rows.x; oh <= rows.y; oh++)
        for (int ow = cols.x; ow <= cols.y; ow++)
            acc += gp[oh * p.ow + ow];
    dx[i] = acc / float(p.kh * p.kw);
}

struct FilterParams {
    uint count;   // N·C·H·W
    int h, w;
    int size;     // odd, at most 9
    float taps[81];  // size×size weights, row-major
};

// A fixed size×size filter applied to every channel alone (a depthwise correlation), zero
// padding of size/2 so the output keeps the input's size. The Laplacian-of-Gaussian taps come
// from the host; the filter is symmetric, so the same kernel also computes its own gradient.
kernel void log_filter(device const float* x [[buffer(0)]],  // extent: p.count
                       device float* out [[buffer(1)]],  // extent: p.count
                       constant FilterParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int px = i % p.w, py = (i / p.w) % p.h, r = p.size / 2;
    device const float* plane = x + (i / (p.w * p.h)) * (p.h * p.w);
    float acc = 0.0f;
    for (int dy = -r; dy <= r; dy++) {
        int y = py + dy;
        if (y < 0 || y >= p.h) continue;
        for (int dx = -r; dx <= r; dx++) {
            int x = px + dx;
            if (x < 0 || x >= p.w) continue;
            acc = fma(p.taps[(dy + r) * p.size + dx + r], plane[y * p.w + x], acc);
        }
    }
    out[i] = acc;
}
