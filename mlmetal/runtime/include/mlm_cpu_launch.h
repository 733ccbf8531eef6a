// Prelude of every cpu translation unit: what the generated entry wrappers take, and the hooks
// mlm_cpu.h's barrier and simd functions call, reached through a table the runtime fills in.
#pragma once
#include <metal_stdlib>
#include "mlm_cpu_abi.h"

extern "C" {
mlm_cpu_hooks mlm_hooks = {nullptr, nullptr};

// Hidden: never exported, and calls to them inline to one indirect call through the table.
__attribute__((visibility("hidden"))) void mlm_cpu_barrier(void) { mlm_hooks.barrier(); }
__attribute__((visibility("hidden"))) const void* mlm_cpu_simd_exchange(const void* value, unsigned size,
                                                                        unsigned* lane, unsigned* active) {
    return mlm_hooks.simd_exchange(value, size, lane, active);
}
}
