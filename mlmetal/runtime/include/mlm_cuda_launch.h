// Prelude of every cuda translation unit. Buffers arrive as kernel pointer arguments and
// the launch shape is CUDA's own (gridDim/blockDim), so nothing more is needed here.
#pragma once
#include <metal_stdlib>
