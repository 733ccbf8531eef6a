// Sliding-window kernels over NCHW images: max and average pooling with their gradients, and
// the fixed Laplacian-of-Gaussian filter.
//
// Every element written is written by one thread, which gathers what it needs (a thread per
// element, or for windows that tile the input a thread per window): no atomics, and results are
// bitwise reproducible.
//
// Each is a template over the storage type T (float, half, bfloat), instantiated as `name`,
// `name_f16` and `name_bf16`: it loads into float, sums in float and rounds once when it
// stores. Max pooling only picks an input value, so its output is that value exactly.
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
template <typename T>
inline int window_argmax(device const T* plane, constant PoolParams& p, int oh, int ow) {
    int h0 = oh * p.sh - p.ph, w0 = ow * p.sw - p.pw;
    float best = 0.0f;
    int at = -1;  // none yet: the first pixel in the window always becomes the best
    for (int dy = 0; dy < p.kh; dy++) {
        int y = h0 + dy;
        if (y < 0 || y >= p.h) continue;
        for (int dx = 0; dx < p.kw; dx++) {
            int x = w0 + dx;
            if (x < 0 || x >= p.w) continue;
            float v = float(plane[y * p.w + x]);
            if (at < 0 || !(v <= best)) {  // v > best, or v is NaN
                best = v;
                at = y * p.w + x;
                if (v != v) return at;
            }
        }
    }
    return at;
}

template <typename T>
kernel void max_pool2d(device const T* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.w
                       device T* out [[buffer(1)]],  // extent: p.count
                       constant PoolParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int ow = i % p.ow, oh = (i / p.ow) % p.oh;
    device const T* plane = x + (i / (p.ow * p.oh)) * (p.h * p.w);
    out[i] = plane[window_argmax(plane, p, oh, ow)];
}

template [[host_name("max_pool2d")]] [[kernel]] decltype(max_pool2d<float>) max_pool2d<float>;
template [[host_name("max_pool2d_f16")]] [[kernel]] decltype(max_pool2d<half>) max_pool2d<half>;
template [[host_name("max_pool2d_bf16")]] [[kernel]] decltype(max_pool2d<bfloat>) max_pool2d<bfloat>;

struct Pool2x2Params {
    uint count;  // N·C·OH·OW
    uint h;      // input height
    uint oh, ow; // output height and width; the input's width is 2·ow
};

// max_pool2d's common case, 2×2 windows with stride 2, no padding and an even width: a window's
// two rows are two aligned two-element loads (T2: float2, half2, bfloat2). Same result as
// window_argmax (the first maximum in row-major order, NaN above everything), so
// max_pool2d_grad finds the same arg-max.
template <typename T, typename T2>
kernel void max_pool2d_2x2(device const T2* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.ow
                           device T* out [[buffer(1)]],  // extent: p.count
                           constant Pool2x2Params& p [[buffer(2)]],
                           uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    uint ow = i % p.ow, rows = i / p.ow, oh = rows % p.oh, plane = rows / p.oh;
    uint top = (plane * p.h + 2 * oh) * p.ow + ow;  // in T2s: an input row is ow of them
    float2 a = float2(x[top]), b = float2(x[top + p.ow]);
    float best = a.x;
    if (!(a.y <= best) && best == best) best = a.y;  // a.y > best, or a.y is NaN and best is not
    if (!(b.x <= best) && best == best) best = b.x;
    if (!(b.y <= best) && best == best) best = b.y;
    out[i] = T(best);
}

template [[host_name("max_pool2d_2x2")]] [[kernel]] decltype(max_pool2d_2x2<float, float2>) max_pool2d_2x2<float, float2>;
template [[host_name("max_pool2d_2x2_f16")]] [[kernel]] decltype(max_pool2d_2x2<half, half2>) max_pool2d_2x2<half, half2>;
template [[host_name("max_pool2d_2x2_bf16")]] [[kernel]] decltype(max_pool2d_2x2<bfloat, bfloat2>) max_pool2d_2x2<bfloat, bfloat2>;

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
template <typename T>
kernel void max_pool2d_grad(device const T* g [[buffer(0)]],  // extent: p.count / (p.h * p.w) * p.oh * p.ow
                            device const T* x [[buffer(1)]],  // extent: p.count
                            device T* dx [[buffer(2)]],  // extent: p.count
                            constant PoolParams& p [[buffer(3)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int px = i % p.w, py = (i / p.w) % p.h;
    uint plane_index = i / (p.w * p.h);
    device const T* plane = x + plane_index * (p.h * p.w);
    device const T* gp = g + plane_index * (p.oh * p.ow);
    int2 rows = windows_covering(py, p.kh, p.sh, p.ph, p.oh);
    int2 cols = windows_covering(px, p.kw, p.sw, p.pw, p.ow);
    int me = py * p.w + px;
    float acc = 0.0f;
    for (int oh = rows.x; oh <= rows.y; oh++)
        for (int ow = cols.x; ow <= cols.y; ow++)
            if (window_argmax(plane, p, oh, ow) == me) acc += float(gp[oh * p.ow + ow]);
    dx[i] = T(acc);
}

template [[host_name("max_pool2d_grad")]] [[kernel]] decltype(max_pool2d_grad<float>) max_pool2d_grad<float>;
template [[host_name("max_pool2d_grad_f16")]] [[kernel]] decltype(max_pool2d_grad<half>) max_pool2d_grad<half>;
template [[host_name("max_pool2d_grad_bf16")]] [[kernel]] decltype(max_pool2d_grad<bfloat>) max_pool2d_grad<bfloat>;

// Padding counts as zeros: every window is divided by kh·kw (PyTorch's count_include_pad=True).
template <typename T>
kernel void avg_pool2d(device const T* x [[buffer(0)]],  // extent: p.count / (p.oh * p.ow) * p.h * p.w
                       device T* out [[buffer(1)]],  // extent: p.count
                       constant PoolParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int ow = i % p.ow, oh = (i / p.ow) % p.oh;
    device const T* plane = x + (i / (p.ow * p.oh)) * (p.h * p.w);
    int h0 = oh * p.sh - p.ph, w0 = ow * p.sw - p.pw;
    float acc = 0.0f;
    for (int y = max(h0, 0); y < min(h0 + p.kh, p.h); y++)
        for (int x = max(w0, 0); x < min(w0 + p.kw, p.w); x++)
            acc += float(plane[y * p.w + x]);
    out[i] = T(acc / float(p.kh * p.kw));
}

template [[host_name("avg_pool2d")]] [[kernel]] decltype(avg_pool2d<float>) avg_pool2d<float>;
template [[host_name("avg_pool2d_f16")]] [[kernel]] decltype(avg_pool2d<half>) avg_pool2d<half>;
template [[host_name("avg_pool2d_bf16")]] [[kernel]] decltype(avg_pool2d<bfloat>) avg_pool2d<bfloat>;

template <typename T>
kernel void avg_pool2d_grad(device const T* g [[buffer(0)]],  // extent: p.count / (p.h * p.w) * p.oh * p.ow
                            device T* dx [[buffer(1)]],  // extent: p.count
                            constant PoolParams& p [[buffer(2)]],
                            uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int px = i % p.w, py = (i / p.w) % p.h;
    device const T* gp = g + (i / (p.w * p.h)) * (p.oh * p.ow);
    int2 rows = windows_covering(py, p.kh, p.sh, p.ph, p.oh);
    int2 cols = windows_covering(px, p.kw, p.sw, p.pw, p.ow);
    float acc = 0.0f;
    for (int oh = rows.x; oh <= rows.y; oh++)
        for (int ow = cols.x; ow <= cols.y; ow++)
            acc += float(gp[oh * p.ow + ow]);
    dx[i] = T(acc / float(p.kh * p.kw));
}

template [[host_name("avg_pool2d_grad")]] [[kernel]] decltype(avg_pool2d_grad<float>) avg_pool2d_grad<float>;
template [[host_name("avg_pool2d_grad_f16")]] [[kernel]] decltype(avg_pool2d_grad<half>) avg_pool2d_grad<half>;
template [[host_name("avg_pool2d_grad_bf16")]] [[kernel]] decltype(avg_pool2d_grad<bfloat>) avg_pool2d_grad<bfloat>;

// Windows that tile the input — kernel = stride, no padding, H = OH·KH and W = OW·KW (the 2×2
// pools of VGG and the U-Net) — run a thread per window, which reads or writes its KH·KW pixels.
// A thread per pixel spends several integer divisions finding its window (a division is a
// dozen instructions on a GPU, and these kernels move few bytes each); here one finds the
// window's first pixel: window i's top-left input pixel is row KH·(i / OW) of the stacked
// planes (H = OH·KH), column KW·(i % OW). Each writes what the general kernel writes, bit for
// bit: the same sums in the same order, the same arg-max. p.count is the windows, N·C·OH·OW.
inline uint tiled_window_origin(uint i, constant PoolParams& p) {
    const uint rows = i / uint(p.ow), ox = i - rows * uint(p.ow);
    return rows * uint(p.kh) * uint(p.w) + ox * uint(p.kw);
}

template <typename T>
kernel void avg_pool2d_tiled(device const T* x [[buffer(0)]],  // extent: p.count * p.kh * p.kw
                             device T* out [[buffer(1)]],  // extent: p.count
                             constant PoolParams& p [[buffer(2)]],
                             uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    device const T* window = x + tiled_window_origin(i, p);
    float acc = 0.0f;
    for (int y = 0; y < p.kh; y++)
        for (int x = 0; x < p.kw; x++) acc += float(window[y * p.w + x]);
    out[i] = T(acc / float(p.kh * p.kw));
}

template [[host_name("avg_pool2d_tiled")]] [[kernel]] decltype(avg_pool2d_tiled<float>) avg_pool2d_tiled<float>;
template [[host_name("avg_pool2d_tiled_f16")]] [[kernel]] decltype(avg_pool2d_tiled<half>) avg_pool2d_tiled<half>;
template [[host_name("avg_pool2d_tiled_bf16")]] [[kernel]] decltype(avg_pool2d_tiled<bfloat>) avg_pool2d_tiled<bfloat>;

template <typename T>
kernel void avg_pool2d_grad_tiled(device const T* g [[buffer(0)]],  // extent: p.count
                                  device T* dx [[buffer(1)]],  // extent: p.count * p.kh * p.kw
                                  constant PoolParams& p [[buffer(2)]],
                                  uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    device T* window = dx + tiled_window_origin(i, p);
    float acc = 0.0f;  // one window covers each pixel: 0 + g, as the general kernel sums (−0 becomes +0)
    acc += float(g[i]);
    const T v = T(acc / float(p.kh * p.kw));
    for (int y = 0; y < p.kh; y++)
        for (int x = 0; x < p.kw; x++) window[y * p.w + x] = v;
}

template [[host_name("avg_pool2d_grad_tiled")]] [[kernel]] decltype(avg_pool2d_grad_tiled<float>) avg_pool2d_grad_tiled<float>;
template [[host_name("avg_pool2d_grad_tiled_f16")]] [[kernel]] decltype(avg_pool2d_grad_tiled<half>) avg_pool2d_grad_tiled<half>;
template [[host_name("avg_pool2d_grad_tiled_bf16")]] [[kernel]] decltype(avg_pool2d_grad_tiled<bfloat>) avg_pool2d_grad_tiled<bfloat>;

// g of each window to its first maximum (window_argmax's rule: row-major, strict >, the first
// NaN), zero to its other pixels.
template <typename T>
kernel void max_pool2d_grad_tiled(device const T* g [[buffer(0)]],  // extent: p.count
                                  device const T* x [[buffer(1)]],  // extent: p.count * p.kh * p.kw
                                  device T* dx [[buffer(2)]],  // extent: p.count * p.kh * p.kw
                                  constant PoolParams& p [[buffer(3)]],
                                  uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    const uint origin = tiled_window_origin(i, p);
    device const T* window = x + origin;
    float best = float(window[0]);
    int at = 0;  // y · W + x of the arg-max, relative to the window's origin
    for (int y = 0; y < p.kh && best == best; y++)
        for (int x = y == 0 ? 1 : 0; x < p.kw; x++) {
            const float v = float(window[y * p.w + x]);
            if (!(v <= best)) {  // v > best, or v is NaN
                best = v;
                at = y * p.w + x;
                if (v != v) break;
            }
        }
    float acc = 0.0f;  // the arg-max's one window: 0 + g, as the general kernel sums
    acc += float(g[i]);
    for (int y = 0; y < p.kh; y++)
        for (int x = 0; x < p.kw; x++) dx[origin + y * p.w + x] = y * p.w + x == at ? T(acc) : T(0.0f);
}

template [[host_name("max_pool2d_grad_tiled")]] [[kernel]] decltype(max_pool2d_grad_tiled<float>) max_pool2d_grad_tiled<float>;
template [[host_name("max_pool2d_grad_tiled_f16")]] [[kernel]] decltype(max_pool2d_grad_tiled<half>) max_pool2d_grad_tiled<half>;
template [[host_name("max_pool2d_grad_tiled_bf16")]] [[kernel]] decltype(max_pool2d_grad_tiled<bfloat>) max_pool2d_grad_tiled<bfloat>;

struct FilterParams {
    uint count;   // N·C·H·W
    int h, w;
    int size;     // odd, at most 9
    float taps[81];  // size×size weights, row-major
};

// A fixed size×size filter applied to every channel alone (a depthwise correlation), zero
// padding of size/2 so the output keeps the input's size. The Laplacian-of-Gaussian taps come
// from the host; the filter is symmetric, so the same kernel also computes its own gradient.
template <typename T>
kernel void log_filter(device const T* x [[buffer(0)]],  // extent: p.count
                       device T* out [[buffer(1)]],  // extent: p.count
                       constant FilterParams& p [[buffer(2)]],
                       uint i [[thread_position_in_grid]]) {
    if (i >= p.count) return;
    int px = i % p.w, py = (i / p.w) % p.h, r = p.size / 2;
    device const T* plane = x + (i / (p.w * p.h)) * (p.h * p.w);
    float acc = 0.0f;
    for (int dy = -r; dy <= r; dy++) {
        int y = py + dy;
        if (y < 0 || y >= p.h) continue;
        for (int dx = -r; dx <= r; dx++) {
            int x = px + dx;
            if (x < 0 || x >= p.w) continue;
            acc = fma(p.taps[(dy + r) * p.size + dx + r], float(plane[y * p.w + x]), acc);
        }
    }
    out[i] = T(acc);
}

template [[host_name("log_filter")]] [[kernel]] decltype(log_filter<float>) log_filter<float>;
template [[host_name("log_filter_f16")]] [[kernel]] decltype(log_filter<half>) log_filter<half>;
template [[host_name("log_filter_bf16")]] [[kernel]] decltype(log_filter<bfloat>) log_filter<bfloat>;
