// How a kernel with a fused activation or activation gradient stores its outputs (conv.metal's
// convolutions, norm.metal's normalisations; mlmetal/graph/fusion.py fuses the relu after them,
// and the relu_grad after a convolution's input gradient, into them).
#pragma once

// Output value v as stored: rounded to T, then, under a fused relu, negatives set to 0 — the relu
// kernel's rule (elementwise.metal) on the rounded value, so a fused relu's results are the
// unfused ones bit for bit (NaN stays NaN, −0 stays −0).
template <typename T>
inline T stored_output(float v, uint relu) {
    const T r = T(v);
    return relu && float(r) < 0.0f ? T(0.0f) : r;
}

// An input gradient g as stored under a fused relu_grad: 0 where mask (relu's output, or input, at
// that place) is ≤ 0, else g — relu_grad's rule (elementwise.metal) on the stored value, so NaN in
// the mask passes g. No mask: g.
template <typename T>
inline T masked_output(T g, device const T* mask, uint i) {
    return mask && float(mask[i]) <= 0.0f ? T(0.0f) : g;
}
