// mlm_opencl_check.h — lets clang's C++-for-OpenCL mode check the address spaces of the metal
// backend's generated MSL.
//
// Force-included by tests/test_address_spaces.py, which runs `clang -x clcpp -cl-std=clc++
// -cl-no-stdinc --target=spir64 -fsyntax-only -Wno-unknown-attributes` on every kernel's metal
// translation (whose own `#include <metal_stdlib>` finds an empty file). g++ checks that
// translation as C++ (mlm_metal_check.h), where address spaces vanish; here they map one to one
// onto OpenCL's, which clang keeps apart: a `threadgroup` array handed to a `device float*`
// parameter, a store through a `constant` pointer or a `device` location bound to a
// `thread float&` are compile errors, as in Metal. One thing Metal allows fails here: copying a
// `constant` struct by value (clang gives implicit copy constructors `__generic` references,
// which cannot bind `__constant`); the test tolerates exactly that error.
//
// Only types matter to a syntax check, so metal_stdlib's functions are declarations. What is
// left deliberately loose: they take any argument type (g++ checks the values), and pointers or
// references without an address space are OpenCL's `__generic` (the lint requires one on every
// parameter). Nothing here may come from a C++ standard header: this mode has none.
#pragma once

// ---------------------------------------------------------------------------------------------
// Address spaces. MSL's names are OpenCL keywords or become them; OpenCL's other keywords are
// ordinary names in MSL (reduce.metal calls a threadgroup array `local`), so they are renamed
// out of the way — consistently, so the renamed declaration and its uses still agree.

#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
#define kernel __kernel

#define global mlm_global
#define local mlm_local
#define generic mlm_generic
#define pipe mlm_pipe
#define read_only mlm_read_only
#define write_only mlm_write_only
#define read_write mlm_read_write
#define vec_step mlm_vec_step
#define addrspace_cast mlm_addrspace_cast

// half needs the extension (the spir64 target supports it).
#pragma OPENCL EXTENSION cl_khr_fp16 : enable

// ---------------------------------------------------------------------------------------------
// Constants.

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF INFINITY
#define FLT_MAX 0x1.fffffep+127f
#define MAXFLOAT FLT_MAX
#define FLT_MIN 0x1p-126f
#define FLT_EPSILON 0x1p-23f
#define INT_MAX 2147483647
#define INT_MIN (-INT_MAX - 1)
#define UINT_MAX 4294967295u
#include "mlm_constants.h"  // M_PI_F and the other float constants of <metal_math>

// ---------------------------------------------------------------------------------------------
// Scalar and vector types, in the global namespace as in Metal, and in metal:: too. Vectors
// are clang's ext_vector_type: swizzles (v.xy, v.zyx), component-wise operators and scalar
// splats come with it. Two differences from Metal: vector comparisons yield int vectors of the
// element's size (clang has no bool vectors, so boolN is an int vector here), and a C-style
// cast between vector types reinterprets rather than converts; the constructor syntax,
// `float4(…)`, converts (below).

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef decltype(sizeof(0)) size_t;

namespace metal {
template <class T, int N> using vec = T __attribute__((ext_vector_type(N)));
}

#define MLM_VECTORS(X)                                                                          \
  X(bool, int) X(char, char) X(uchar, uchar) X(short, short) X(ushort, ushort) X(int, int)      \
  X(uint, uint) X(half, half) X(float, float)
#define MLM_TYPEDEFS(name, element)                                                             \
  typedef metal::vec<element, 2> name##2;                                                       \
  typedef metal::vec<element, 3> name##3;                                                       \
  typedef metal::vec<element, 4> name##4;
#define MLM_USINGS(name, element) using ::name##2; using ::name##3; using ::name##4;
MLM_VECTORS(MLM_TYPEDEFS)
namespace metal {
using ::uint;
using ::ushort;
using ::uchar;
using ::size_t;
MLM_VECTORS(MLM_USINGS)
}  // namespace metal
#undef MLM_VECTORS
#undef MLM_TYPEDEFS
#undef MLM_USINGS

// Metal's vector constructors, `float4(xy, z, w)` and the like: every way of making N
// components from scalars and shorter vectors, a splat, and a conversion from a vector of
// another element type. Each `float4(` in the kernel source becomes a call of one of these
// (so a constructor cannot be spelt `metal::float4(…)` here).
namespace metal {
namespace detail {
template <class T, int N> struct construct;
template <class T> struct construct<T, 2> {
  using V = vec<T, 2>;
  static V make(T s);
  static V make(T x, T y);
  template <class U> static V make(vec<U, 2> v);
};
template <class T> struct construct<T, 3> {
  using V = vec<T, 3>;
  static V make(T s);
  static V make(T x, T y, T z);
  static V make(vec<T, 2> xy, T z);
  static V make(T x, vec<T, 2> yz);
  template <class U> static V make(vec<U, 3> v);
};
template <class T> struct construct<T, 4> {
  using V = vec<T, 4>;
  static V make(T s);
  static V make(T x, T y, T z, T w);
  static V make(vec<T, 2> xy, T z, T w);
  static V make(T x, vec<T, 2> yz, T w);
  static V make(T x, T y, vec<T, 2> zw);
  static V make(vec<T, 2> xy, vec<T, 2> zw);
  static V make(vec<T, 3> xyz, T w);
  static V make(T x, vec<T, 3> yzw);
  template <class U> static V make(vec<U, 4> v);
};
}  // namespace detail
}  // namespace metal


#define MLM_MAKE(element, n) ::metal::detail::construct<element, n>::make
#define bool2(...) MLM_MAKE(int, 2)(__VA_ARGS__)
#define bool3(...) MLM_MAKE(int, 3)(__VA_ARGS__)
#define bool4(...) MLM_MAKE(int, 4)(__VA_ARGS__)
#define char2(...) MLM_MAKE(char, 2)(__VA_ARGS__)
#define char3(...) MLM_MAKE(char, 3)(__VA_ARGS__)
#define char4(...) MLM_MAKE(char, 4)(__VA_ARGS__)
#define uchar2(...) MLM_MAKE(uchar, 2)(__VA_ARGS__)
#define uchar3(...) MLM_MAKE(uchar, 3)(__VA_ARGS__)
#define uchar4(...) MLM_MAKE(uchar, 4)(__VA_ARGS__)
#define short2(...) MLM_MAKE(short, 2)(__VA_ARGS__)
#define short3(...) MLM_MAKE(short, 3)(__VA_ARGS__)
#define short4(...) MLM_MAKE(short, 4)(__VA_ARGS__)
#define ushort2(...) MLM_MAKE(ushort, 2)(__VA_ARGS__)
#define ushort3(...) MLM_MAKE(ushort, 3)(__VA_ARGS__)
#define ushort4(...) MLM_MAKE(ushort, 4)(__VA_ARGS__)
#define int2(...) MLM_MAKE(int, 2)(__VA_ARGS__)
#define int3(...) MLM_MAKE(int, 3)(__VA_ARGS__)
#define int4(...) MLM_MAKE(int, 4)(__VA_ARGS__)
#define uint2(...) MLM_MAKE(uint, 2)(__VA_ARGS__)
#define uint3(...) MLM_MAKE(uint, 3)(__VA_ARGS__)
#define uint4(...) MLM_MAKE(uint, 4)(__VA_ARGS__)
#define half2(...) MLM_MAKE(half, 2)(__VA_ARGS__)
#define half3(...) MLM_MAKE(half, 3)(__VA_ARGS__)
#define half4(...) MLM_MAKE(half, 4)(__VA_ARGS__)
#define float2(...) MLM_MAKE(float, 2)(__VA_ARGS__)
#define float3(...) MLM_MAKE(float, 3)(__VA_ARGS__)
#define float4(...) MLM_MAKE(float, 4)(__VA_ARGS__)

namespace metal {

template <class T, class U> T as_type(U x);

// ---------------------------------------------------------------------------------------------
// Math, scalar and vector alike. Arguments are taken by value, as in Metal, so they may come
// from any address space; a mixed call (`min(uint, int)`, `max(float4, float)`) has the type
// of the arithmetic between its arguments.

#define MLM_UNARY(name) template <class T> T name(T x);
#define MLM_BINARY(name) template <class A, class B> auto name(A a, B b) -> decltype(a + b);
#define MLM_TERNARY(name) \
  template <class A, class B, class C> auto name(A a, B b, C c) -> decltype(a + b + c);
#define MLM_TEST(name) template <class T> auto name(T x) -> decltype(x == x);
#define MLM_GEOMETRIC(name) template <class T> auto name(T a, T b) -> decltype(a.x * b.x);

#define MLM_MATH(X, X2, X3)                                                                     \
  X(abs) X(fabs) X(floor) X(ceil) X(round) X(rint) X(trunc) X(fract) X(sqrt) X(rsqrt) X(cbrt)   \
  X(exp) X(exp2) X(exp10) X(log) X(log2) X(log10) X(sin) X(cos) X(tan) X(asin) X(acos) X(atan)  \
  X(sinh) X(cosh) X(tanh) X(asinh) X(acosh) X(atanh) X(saturate) X(sign) X(normalize)           \
  X2(min) X2(max) X2(fmin) X2(fmax) X2(fmod) X2(pow) X2(powr) X2(atan2) X2(copysign) X2(step)    \
  X2(cross) X2(reflect)                                                                         \
  X3(clamp) X3(fma) X3(mix) X3(smoothstep)
MLM_MATH(MLM_UNARY, MLM_BINARY, MLM_TERNARY)
MLM_TEST(isnan)
MLM_TEST(isinf)
MLM_TEST(isfinite)
MLM_TEST(signbit)
MLM_GEOMETRIC(dot)
MLM_GEOMETRIC(distance)
template <class T> auto length(T v) -> decltype(v.x);
template <class T> auto length_squared(T v) -> decltype(v.x);

// The cosine comes back through a `thread` reference, as in Metal: a device location is refused.
template <class T> T sincos(T x, thread T& cosine);

MLM_UNARY(popcount)
MLM_UNARY(clz)
MLM_UNARY(ctz)
MLM_BINARY(mulhi)
MLM_BINARY(rotate)
MLM_BINARY(absdiff)

template <class A, class B, class C> auto select(A a, B b, C c) -> decltype(a + b);  // c ? b : a
template <class T> bool all(T v);
template <class T> bool any(T v);

#define MLM_USING(name) using metal::name;
namespace precise {
MLM_MATH(MLM_USING, MLM_USING, MLM_USING)
MLM_USING(sincos) MLM_USING(dot) MLM_USING(distance) MLM_USING(length) MLM_USING(length_squared)
}
namespace fast {
MLM_MATH(MLM_USING, MLM_USING, MLM_USING)
MLM_USING(sincos) MLM_USING(dot) MLM_USING(distance) MLM_USING(length) MLM_USING(length_squared)
}
#undef MLM_USING
#undef MLM_MATH
#undef MLM_UNARY
#undef MLM_BINARY
#undef MLM_TERNARY
#undef MLM_TEST
#undef MLM_GEOMETRIC

// ---------------------------------------------------------------------------------------------
// Atomics (MSL 2.3: int and uint), on device or threadgroup memory only — Metal has no atomics
// on constant or thread memory, so neither has an overload.

// OpenCL 2.0 predeclares ::atomic_int and ::atomic_uint as C11 atomics, which C++ cannot name
// otherwise: Metal's are those types (values reachable only through the atomic functions), and
// the functions take any atomic type A whose value type `value<A>` is defined.
using ::atomic_int;
using ::atomic_uint;

namespace detail {
template <class T> struct atomic_of {};
template <> struct atomic_of<int> { using type = atomic_int; };
template <> struct atomic_of<uint> { using type = atomic_uint; };
template <class A> struct atomic_traits {};
template <> struct atomic_traits<atomic_int> { using value = int; };
template <> struct atomic_traits<atomic_uint> { using value = uint; };
template <class A> using value = typename atomic_traits<A>::value;
}  // namespace detail
template <class T> using atomic = typename detail::atomic_of<T>::type;

// memory_order: mlm_constants.h's.

#define MLM_FETCH(space, op)                                                                    \
  template <class A>                                                                            \
  detail::value<A> atomic_fetch_##op##_explicit(volatile space A*, detail::value<A>, memory_order);
#define MLM_ATOMICS(space)                                                                      \
  template <class A>                                                                            \
  detail::value<A> atomic_load_explicit(const volatile space A*, memory_order);                 \
  template <class A>                                                                            \
  void atomic_store_explicit(volatile space A*, detail::value<A>, memory_order);                \
  template <class A>                                                                            \
  detail::value<A> atomic_exchange_explicit(volatile space A*, detail::value<A>, memory_order);  \
  template <class A>                                                                            \
  bool atomic_compare_exchange_weak_explicit(volatile space A*, thread detail::value<A>* expected, \
                                             detail::value<A> desired, memory_order, memory_order);\
  MLM_FETCH(space, add) MLM_FETCH(space, sub) MLM_FETCH(space, and) MLM_FETCH(space, or)        \
  MLM_FETCH(space, xor) MLM_FETCH(space, min) MLM_FETCH(space, max)
MLM_ATOMICS(device)
MLM_ATOMICS(threadgroup)
#undef MLM_ATOMICS
#undef MLM_FETCH

// ---------------------------------------------------------------------------------------------
// Synchronisation and simd-group functions.

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

#define MLM_SIMD(name) template <class T> T name(T x);
#define MLM_SIMD_LANE(name) template <class T> T name(T x, ushort lane);
MLM_SIMD(simd_sum)
MLM_SIMD(simd_product)
MLM_SIMD(simd_min)
MLM_SIMD(simd_max)
MLM_SIMD(simd_and)
MLM_SIMD(simd_or)
MLM_SIMD(simd_xor)
MLM_SIMD(simd_prefix_exclusive_sum)
MLM_SIMD(simd_prefix_inclusive_sum)
MLM_SIMD(simd_prefix_exclusive_product)
MLM_SIMD(simd_prefix_inclusive_product)
MLM_SIMD(simd_broadcast_first)
MLM_SIMD_LANE(simd_shuffle)
MLM_SIMD_LANE(simd_shuffle_down)
MLM_SIMD_LANE(simd_shuffle_up)
MLM_SIMD_LANE(simd_shuffle_xor)
MLM_SIMD_LANE(simd_broadcast)
#undef MLM_SIMD
#undef MLM_SIMD_LANE
bool simd_all(bool x);
bool simd_any(bool x);
bool simd_is_first();

}  // namespace metal
