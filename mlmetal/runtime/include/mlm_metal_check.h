// mlm_metal_check.h — lets a C++17 compiler read the metal backend's generated MSL.
//
// Force-included (`-include mlm_metal_check.h`) by tests/test_metal_backend.py, which compiles
// every kernel's metal translation with `g++ -std=c++17 -fsyntax-only -Wno-attributes` where no
// Metal compiler exists. <metal_stdlib> already supplies the types, math, atomics and address-space
// keywords; what is left of MSL is the `kernel` qualifier, dropped here, and `[[...]]`
// attributes, which C++ accepts syntactically and g++ ignores once told to. The generated
// `#include <metal_stdlib>` then finds this one, already included.
#pragma once
#include <metal_stdlib>

#define kernel
