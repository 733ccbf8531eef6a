// mlm_launch.h — the launch record the cpu and metal entry wrappers read, declared once.
//
// The cpu executor and its kernels include it (mlm_cpu_abi.h); the metal wrapper's prelude is
// this struct's text; cpu.py's ctypes structure and metal.py's packing are made from its fields
// as mlmetal's parser reads them (source.LAUNCH). Plain C, 32-bit fields, which MSL reads alike.
#pragma once

struct mlm_launch {
    unsigned int groups[3];     // threadgroups per grid
    unsigned int threads[3];    // threads per threadgroup
    unsigned int pred_word;     // the predicate's word in its buffer (metal binds the buffer after the arguments)
    unsigned int has_pred;      // 0: the dispatch has no predicate
};
