// Prelude of every cpu translation unit: what the generated entry wrappers take.
#pragma once
#include <metal_stdlib>

struct mlm_launch {
    unsigned int groups[3];     // threadgroups per grid
    unsigned int threads[3];    // threads per threadgroup
    const unsigned int* pred;   // predicate word, or null when the dispatch has none
};
