// mlm_cpu_abi.h — what the cpu runtime and the kernel libraries it runs hand each other.
//
// Both are loaded privately (RTLD_LOCAL) and export nothing but their entry points, so neither
// finds a symbol of the other by name: the runtime calls the kernel entries cpu.py looks up,
// and a kernel library reaches the runtime through its table of hooks, which the runtime fills
// in when the library is loaded (mlm_cpu_link). Plain C: the runtime includes it without
// <metal_stdlib>'s address-space macros.
#pragma once
#include "mlm_launch.h"  // the launch record; the cpu queue skips a dispatch whose predicate is 0 before launching it

// The runtime functions behind mlm_cpu.h's barrier and simd-group functions.
struct mlm_cpu_hooks {
    void (*barrier)(void);
    const void* (*simd_exchange)(const void* value, unsigned size, unsigned* lane, unsigned* active);
};
