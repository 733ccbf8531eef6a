// How a forward kernel with a fused activation stores its outputs (conv.metal's convolutions,
// norm.metal's normalisations; mlmetal/graph/fusion.py fuses the relu after them into them).
#pragma once

// Output value v as stored: rounded to T, then, under a fused relu, negatives set to 0 — the relu
// kernel's rule (elementwise.metal) on the rounded value, so a fused relu's results are the
// unfused ones bit for bit (NaN stays NaN, −0 stays −0).
template <typename T>
inline T stored_output(float v, uint relu) {
    const T r = T(v);
    return relu && float(r) < 0.0f ? T(0.0f) : r;
}
