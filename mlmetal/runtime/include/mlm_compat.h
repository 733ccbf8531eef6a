// mlm_compat.h — the part of Metal's <metal_stdlib> that mlmetal kernels use, in portable C++17.
//
// One header, two compilers: g++ builds it as host C++ for the cpu backend, NVRTC/nvcc as CUDA.
// Under CUDA it includes nothing (NVRTC ships no standard headers) and everything that differs
// per target sits in a few `#if MLM_CUDA` branches. Barriers and simd-group functions need a
// runtime and live in mlm_cpu.h / mlm_cuda.h; address-space keywords come from `metal_stdlib`.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define MLM_CUDA 1
#define MLM_FN __device__ __forceinline__
#define MLM_MEMCPY memcpy  // NVRTC declares memcpy but not __builtin_memcpy
#else
#define MLM_CUDA 0
#define MLM_FN inline
#define MLM_MEMCPY __builtin_memcpy
#include <cmath>
#endif

// ---------------------------------------------------------------------------------------------
// Constants. <cmath> (cpu) or the CUDA host headers (nvcc) may have defined some already.

#if MLM_CUDA && !defined(INFINITY)  // NVRTC has neither <math.h> nor __builtin_inff
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fffffff)
#endif
#ifndef INFINITY
#define INFINITY __builtin_inff()
#endif
#ifndef NAN
#define NAN __builtin_nanf("")
#endif
#ifndef HUGE_VALF
#define HUGE_VALF INFINITY
#endif
#ifndef FLT_MAX
#define FLT_MAX 0x1.fffffep+127f
#endif
#ifndef MAXFLOAT
#define MAXFLOAT FLT_MAX
#endif
#ifndef FLT_MIN
#define FLT_MIN 0x1p-126f
#endif
#ifndef FLT_EPSILON
#define FLT_EPSILON 0x1p-23f
#endif
#ifndef INT_MAX
#define INT_MAX 2147483647
#endif
#ifndef INT_MIN
#define INT_MIN (-INT_MAX - 1)
#endif
#ifndef UINT_MAX
#define UINT_MAX 4294967295u
#endif
#include "mlm_constants.h"  // M_PI_F and the other float constants of <metal_math>

// ---------------------------------------------------------------------------------------------
// CUDA declares its own global ::float4, ::uint2, … (and cuda_fp16.h a global ::half). A kernel
// that says `using namespace metal;` would then find two `float4`s and fail as ambiguous. So under
// CUDA the Metal names are macros for distinct names (metal::mlm_float4, …); kernel source is
// unchanged and `metal::float4` still works. Consequence for mlm_cuda.h: include any CUDA header
// before this one, and spell CUDA's own types through what they expand from (make_float4, …).
#if MLM_CUDA
#define half mlm_half
#define bfloat mlm_bfloat
#define bool2 mlm_bool2
#define bool3 mlm_bool3
#define bool4 mlm_bool4
#define char2 mlm_char2
#define char3 mlm_char3
#define char4 mlm_char4
#define uchar2 mlm_uchar2
#define uchar3 mlm_uchar3
#define uchar4 mlm_uchar4
#define short2 mlm_short2
#define short3 mlm_short3
#define short4 mlm_short4
#define ushort2 mlm_ushort2
#define ushort3 mlm_ushort3
#define ushort4 mlm_ushort4
#define int2 mlm_int2
#define int3 mlm_int3
#define int4 mlm_int4
#define uint2 mlm_uint2
#define uint3 mlm_uint3
#define uint4 mlm_uint4
#define ulong2 mlm_ulong2
#define ulong3 mlm_ulong3
#define ulong4 mlm_ulong4
#define half2 mlm_half2
#define half3 mlm_half3
#define half4 mlm_half4
#define float2 mlm_float2
#define float3 mlm_float3
#define float4 mlm_float4
#endif

namespace metal {

// Same types as glibc's ::uint / ::ushort, so a kernel sees no ambiguity between the two.
using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;  // 64-bit in MSL, as on every target here (LP64)
using size_t = decltype(sizeof(0));

// Reinterprets the bits of x; memcpy of a constant size compiles to a register move everywhere.
template <class T, class U> MLM_FN T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T r;
  MLM_MEMCPY(&r, &x, sizeof(T));
  return r;
}

// ---------------------------------------------------------------------------------------------
// half: IEEE binary16 storage. Arithmetic converts to float (as half does on most GPUs), so
// `a + b` of two halves is a float that rounds back to half when stored into one.

namespace detail {
#if MLM_CUDA
// The hardware conversions, except for NaN: cvt turns every NaN into 0x7fff, where the cpu branch
// keeps its sign and top payload bits; both targets must store the same bits.
MLM_FN unsigned short half_bits(float f) {
  unsigned x = __float_as_uint(f), a = x & 0x7fffffff;
  if (a > 0x7f800000) return (unsigned short)((x >> 16 & 0x8000) | 0x7e00 | (a >> 13 & 0x3ff));
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
MLM_FN float half_value(unsigned short h) {
  if ((h & 0x7fff) > 0x7c00) return __uint_as_float((h & 0x8000u) << 16 | 0x7f800000 | (h & 0x3ffu) << 13);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
#else
MLM_FN unsigned short half_bits(float f) {
  unsigned x = as_type<unsigned>(f), sign = x >> 16 & 0x8000, a = x & 0x7fffffff;
  if (a > 0x7f800000) return sign | 0x7e00 | (a >> 13 & 0x3ff);  // NaN stays NaN, quiet
  if (a >= 0x477ff000) return sign | 0x7c00;                      // 65520 and up round to inf
  if (a >= 0x38800000) {  // normal: rebias the exponent, round the 13 dropped bits to even
    unsigned h = (a - 0x38000000) >> 13, rest = a & 0x1fff;
    return sign | (h + (rest > 0x1000 || (rest == 0x1000 && (h & 1))));
  }
  if (a <= 0x33000000) return sign;  // at most half the smallest subnormal: ties to zero
  // Subnormal: the half's bits are value·2²⁴ = m·2^(e−126), rounded to nearest even.
  unsigned e = a >> 23, m = (a & 0x7fffff) | 0x800000, shift = 126 - e;
  unsigned h = m >> shift, rest = m & ((1u << shift) - 1), tie = 1u << (shift - 1);
  return sign | (h + (rest > tie || (rest == tie && (h & 1))));
}
MLM_FN float half_value(unsigned short h) {
  unsigned sign = (h & 0x8000u) << 16, e = h >> 10 & 0x1f, m = h & 0x3ff;
  if (e == 0x1f) return as_type<float>(sign | 0x7f800000 | m << 13);
  if (e) return as_type<float>(sign | (e + 112) << 23 | m << 13);
  float v = float(m) * 0x1p-24f;  // zero or subnormal, exact in float
  return sign ? -v : v;
}
#endif
}  // namespace detail

struct half {
  unsigned short bits;
  half() = default;
  MLM_FN half(float f) : bits(detail::half_bits(f)) {}
  MLM_FN operator float() const { return detail::half_value(bits); }
  MLM_FN half& operator+=(float v) { return *this = float(*this) + v; }
  MLM_FN half& operator-=(float v) { return *this = float(*this) - v; }
  MLM_FN half& operator*=(float v) { return *this = float(*this) * v; }
  MLM_FN half& operator/=(float v) { return *this = float(*this) / v; }
};

// ---------------------------------------------------------------------------------------------
// bfloat: bfloat16 storage (MSL 3.1), float's top 16 bits. As with half, arithmetic converts to
// float and a store rounds to nearest even. The same integer code runs on every target, so cpu
// and cuda round identically (NaN stays NaN and quiet, its sign and top payload bits kept).

namespace detail {
MLM_FN unsigned short bfloat_bits(float f) {
  unsigned x = as_type<unsigned>(f);
  if ((x & 0x7fffffff) > 0x7f800000) return (unsigned short)(x >> 16 | 0x40);
  return (unsigned short)((x + 0x7fff + (x >> 16 & 1)) >> 16);
}
MLM_FN float bfloat_value(unsigned short b) { return as_type<float>((unsigned)b << 16); }
}  // namespace detail

struct bfloat {
  unsigned short bits;
  bfloat() = default;
  MLM_FN bfloat(float f) : bits(detail::bfloat_bits(f)) {}
  MLM_FN operator float() const { return detail::bfloat_value(bits); }
  MLM_FN bfloat& operator+=(float v) { return *this = float(*this) + v; }
  MLM_FN bfloat& operator-=(float v) { return *this = float(*this) - v; }
  MLM_FN bfloat& operator*=(float v) { return *this = float(*this) * v; }
  MLM_FN bfloat& operator/=(float v) { return *this = float(*this) / v; }
};

template <class T, int N> struct vec;

// ---------------------------------------------------------------------------------------------
// Type traits, hand-rolled because NVRTC has no <type_traits>. Only Metal's scalar types and
// vectors of them have traits; every function below is constrained on them.

namespace detail {
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { using type = T; };
template <bool B, class T = void> using enable_if_t = typename enable_if<B, T>::type;
template <class T, class U> constexpr bool same = false;
template <class T> constexpr bool same<T, T> = true;
template <bool B, class T, class F> struct conditional { using type = T; };
template <class T, class F> struct conditional<false, T, F> { using type = F; };
template <class T> struct identity { using type = T; };
template <class T> using id = typename identity<T>::type;  // keeps an argument out of deduction

enum kind { boolean, integer, floating };
template <class T> struct traits {};
template <class T, kind K, class U = T> struct scalar_traits {
  using scalar = T;
  using unsigned_scalar = U;
  static constexpr int width = 1;
  static constexpr kind category = K;
};
template <> struct traits<bool> : scalar_traits<bool, boolean> {};
template <> struct traits<char> : scalar_traits<char, integer, uchar> {};
template <> struct traits<signed char> : scalar_traits<signed char, integer, uchar> {};
template <> struct traits<uchar> : scalar_traits<uchar, integer> {};
template <> struct traits<short> : scalar_traits<short, integer, ushort> {};
template <> struct traits<ushort> : scalar_traits<ushort, integer> {};
template <> struct traits<int> : scalar_traits<int, integer, uint> {};
template <> struct traits<uint> : scalar_traits<uint, integer> {};
template <> struct traits<ulong> : scalar_traits<ulong, integer> {};
template <> struct traits<half> : scalar_traits<half, floating> {};
template <> struct traits<bfloat> : scalar_traits<bfloat, floating> {};
template <> struct traits<float> : scalar_traits<float, floating> {};
template <class T, int N> struct traits<vec<T, N>> : traits<T> {
  static constexpr int width = N;
};

template <class T> using scalar_t = typename traits<T>::scalar;
template <class T> constexpr int width = traits<T>::width;
template <class T, class S> using with_scalar = typename conditional<width<T> == 1, S, vec<S, width<T>>>::type;
template <class T> using bool_t = with_scalar<T, bool>;
template <class T> using unsigned_t = with_scalar<T, typename traits<T>::unsigned_scalar>;

template <class T> using if_scalar = enable_if_t<traits<T>::width == 1, int>;
template <class T> using if_float = enable_if_t<traits<T>::category == floating, int>;
template <class T> using if_int = enable_if_t<traits<T>::category == integer, int>;
template <class T> using if_number = enable_if_t<traits<T>::category != boolean, int>;
template <class T> using if_bool = enable_if_t<traits<T>::category == boolean, int>;
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Vectors. `lanes` holds the named components and the constructors that differ by width;
// `vec` adds what all widths share. Sizes and alignments are Metal's (float3 is 16 bytes).

namespace detail {
template <class T, int N> struct lanes;

template <class T> struct alignas(2 * sizeof(T)) lanes<T, 2> {
  T x, y;
  lanes() = default;
  MLM_FN explicit lanes(T s) : x(s), y(s) {}
  MLM_FN lanes(T x, T y) : x(x), y(y) {}
  MLM_FN T& operator[](int i) { return i == 0 ? x : y; }
  MLM_FN T operator[](int i) const { return i == 0 ? x : y; }
};

template <class T> struct alignas(4 * sizeof(T)) lanes<T, 3> {
  T x, y, z;
  lanes() = default;
  MLM_FN explicit lanes(T s) : x(s), y(s), z(s) {}
  MLM_FN lanes(T x, T y, T z) : x(x), y(y), z(z) {}
  MLM_FN lanes(vec<T, 2> xy, T z) : x(xy.x), y(xy.y), z(z) {}
  MLM_FN lanes(T x, vec<T, 2> yz) : x(x), y(yz.x), z(yz.y) {}
  MLM_FN T& operator[](int i) { return i == 0 ? x : i == 1 ? y : z; }
  MLM_FN T operator[](int i) const { return i == 0 ? x : i == 1 ? y : z; }
};

template <class T> struct alignas(4 * sizeof(T)) lanes<T, 4> {
  T x, y, z, w;
  lanes() = default;
  MLM_FN explicit lanes(T s) : x(s), y(s), z(s), w(s) {}
  MLM_FN lanes(T x, T y, T z, T w) : x(x), y(y), z(z), w(w) {}
  MLM_FN lanes(vec<T, 2> xy, T z, T w) : x(xy.x), y(xy.y), z(z), w(w) {}
  MLM_FN lanes(T x, vec<T, 2> yz, T w) : x(x), y(yz.x), z(yz.y), w(w) {}
  MLM_FN lanes(T x, T y, vec<T, 2> zw) : x(x), y(y), z(zw.x), w(zw.y) {}
  MLM_FN lanes(vec<T, 2> xy, vec<T, 2> zw) : x(xy.x), y(xy.y), z(zw.x), w(zw.y) {}
  MLM_FN lanes(vec<T, 3> xyz, T w) : x(xyz.x), y(xyz.y), z(xyz.z), w(w) {}
  MLM_FN lanes(T x, vec<T, 3> yzw) : x(x), y(yzw.x), z(yzw.y), w(yzw.z) {}
  MLM_FN T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  MLM_FN T operator[](int i) const { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
};

// Component i of an argument; scalars stand for every component.
template <class T> MLM_FN T at(T s, int) { return s; }
template <class T, int N> MLM_FN T at(vec<T, N> v, int i) { return v[i]; }

// Applies f component-wise and assembles an Out: how every vector function and operator is built.
template <class Out, class F, class... A> MLM_FN Out zip(F f, A... a) {
  using E = scalar_t<Out>;
  if constexpr (width<Out> == 1) return Out(f(a...));
  else if constexpr (width<Out> == 2) return Out(E(f(at(a, 0)...)), E(f(at(a, 1)...)));
  else if constexpr (width<Out> == 3)
    return Out(E(f(at(a, 0)...)), E(f(at(a, 1)...)), E(f(at(a, 2)...)));
  else return Out(E(f(at(a, 0)...)), E(f(at(a, 1)...)), E(f(at(a, 2)...)), E(f(at(a, 3)...)));
}
}  // namespace detail

#define MLM_VEC_ARITHMETIC(op)                                                                  \
  friend MLM_FN vec operator op(vec a, vec b) {                                                 \
    return detail::zip<vec>([](T x, T y) { return x op y; }, a, b);                             \
  }                                                                                             \
  MLM_FN vec& operator op##=(vec b) { return *this = *this op b; }
#define MLM_VEC_LOGICAL(op)                                                                     \
  friend MLM_FN bools operator op(vec a, vec b) {                                               \
    return detail::zip<bools>([](T x, T y) { return x op y; }, a, b);                           \
  }

template <class T, int N> struct vec : detail::lanes<T, N> {
  using bools = vec<bool, N>;
  using detail::lanes<T, N>::lanes;
  vec() = default;
  // Implicit splat, as in Metal (`float4 v = 0;`), from any scalar including half.
  template <class S, detail::if_scalar<S> = 0>
  MLM_FN vec(S s) : detail::lanes<T, N>(T(s)) {}
  template <class U>
  MLM_FN explicit vec(vec<U, N> v) : vec(detail::zip<vec>([](U u) { return T(u); }, v)) {}

  // Hidden friends: found through the vector operand, and a scalar operand splats implicitly.
  MLM_VEC_ARITHMETIC(+)
  MLM_VEC_ARITHMETIC(-)
  MLM_VEC_ARITHMETIC(*)
  MLM_VEC_ARITHMETIC(/)
  MLM_VEC_ARITHMETIC(%)
  MLM_VEC_ARITHMETIC(&)
  MLM_VEC_ARITHMETIC(|)
  MLM_VEC_ARITHMETIC(^)
  MLM_VEC_ARITHMETIC(<<)
  MLM_VEC_ARITHMETIC(>>)
  MLM_VEC_LOGICAL(==)
  MLM_VEC_LOGICAL(!=)
  MLM_VEC_LOGICAL(<)
  MLM_VEC_LOGICAL(<=)
  MLM_VEC_LOGICAL(>)
  MLM_VEC_LOGICAL(>=)
  MLM_VEC_LOGICAL(&&)
  MLM_VEC_LOGICAL(||)
  friend MLM_FN vec operator+(vec a) { return a; }
  friend MLM_FN vec operator-(vec a) { return detail::zip<vec>([](T x) { return -x; }, a); }
  friend MLM_FN vec operator~(vec a) { return detail::zip<vec>([](T x) { return ~x; }, a); }
  friend MLM_FN bools operator!(vec a) { return detail::zip<bools>([](T x) { return !x; }, a); }
};
#undef MLM_VEC_ARITHMETIC
#undef MLM_VEC_LOGICAL

#define MLM_VEC_NAMES(T) \
  using T##2 = vec<T, 2>; \
  using T##3 = vec<T, 3>; \
  using T##4 = vec<T, 4>;
MLM_VEC_NAMES(bool)
MLM_VEC_NAMES(char)
MLM_VEC_NAMES(uchar)
MLM_VEC_NAMES(short)
MLM_VEC_NAMES(ushort)
MLM_VEC_NAMES(int)
MLM_VEC_NAMES(uint)
MLM_VEC_NAMES(ulong)
MLM_VEC_NAMES(half)
MLM_VEC_NAMES(bfloat)
MLM_VEC_NAMES(float)
#undef MLM_VEC_NAMES

// ---------------------------------------------------------------------------------------------
// The result type of a call that mixes scalars and vectors, e.g. clamp(float4, float, float):
// the vector type if any argument is a vector (all vectors must agree), else the scalars'
// common type. No type (so no overload) for anything else.

namespace detail {
template <class A, class B, class = void> struct common2 {};
template <class A, class B>
struct common2<A, B, enable_if_t<traits<A>::width == 1 && traits<B>::width == 1>>
    : conditional<same<A, B>, A, decltype(A() + B())> {};
template <class T, int N, class S>
struct common2<vec<T, N>, S, enable_if_t<traits<S>::width == 1>> : identity<vec<T, N>> {};
template <class S, class T, int N>
struct common2<S, vec<T, N>, enable_if_t<traits<S>::width == 1>> : identity<vec<T, N>> {};
template <class T, int N> struct common2<vec<T, N>, vec<T, N>> : identity<vec<T, N>> {};

template <class Void, class... A> struct common {};
template <class A> struct common<void, A> : identity<A> {};
template <class A, class B, class... C>
struct common<decltype(void(typename common2<A, B>::type())), A, B, C...>
    : common<void, typename common2<A, B>::type, C...> {};
template <class... A> using common_t = typename common<void, A...>::type;
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Math. Scalar and vector forms are one template each; float math goes through the float libm
// functions (device functions under CUDA), half math through float. Where CUDA or libm declares a
// global overload with the same signature (e.g. ::sqrt(float)), unqualified calls prefer it over
// these templates; it computes the same thing.

#define MLM_FLOAT1(name, expr)                                                                  \
  template <class T, detail::if_float<T> = 0> MLM_FN T name(T v) {                              \
    return detail::zip<T>([](float x) -> float { return expr; }, v);                            \
  }
#define MLM_FLOAT2(name, expr)                                                                  \
  template <class A, class B, class T = detail::common_t<A, B>, detail::if_float<T> = 0>        \
  MLM_FN T name(A a, B b) {                                                                     \
    return detail::zip<T>([](float x, float y) -> float { return expr; }, a, b);                \
  }
#define MLM_FLOAT3(name, expr)                                                                  \
  template <class A, class B, class C, class T = detail::common_t<A, B, C>,                     \
            detail::if_float<T> = 0>                                                            \
  MLM_FN T name(A a, B b, C c) {                                                                \
    return detail::zip<T>([](float x, float y, float z) -> float { return expr; }, a, b, c);    \
  }
#define MLM_FLOAT_TEST(name, expr)                                                              \
  template <class T, detail::if_float<T> = 0> MLM_FN detail::bool_t<T> name(T v) {             \
    return detail::zip<detail::bool_t<T>>([](float x) -> bool { return expr; }, v);             \
  }

MLM_FLOAT1(fabs, ::fabsf(x))
MLM_FLOAT1(floor, ::floorf(x))
MLM_FLOAT1(ceil, ::ceilf(x))
MLM_FLOAT1(round, ::roundf(x))
MLM_FLOAT1(rint, ::rintf(x))
MLM_FLOAT1(trunc, ::truncf(x))
MLM_FLOAT1(fract, ::fminf(x - ::floorf(x), 0x1.fffffep-1f))
MLM_FLOAT1(sqrt, ::sqrtf(x))
MLM_FLOAT1(rsqrt, 1.0f / ::sqrtf(x))
MLM_FLOAT1(cbrt, ::cbrtf(x))
MLM_FLOAT1(exp, ::expf(x))
MLM_FLOAT1(exp2, ::exp2f(x))
MLM_FLOAT1(exp10, ::exp10f(x))
MLM_FLOAT1(log, ::logf(x))
MLM_FLOAT1(log2, ::log2f(x))
MLM_FLOAT1(log10, ::log10f(x))
MLM_FLOAT1(sin, ::sinf(x))
MLM_FLOAT1(cos, ::cosf(x))
MLM_FLOAT1(tan, ::tanf(x))
MLM_FLOAT1(asin, ::asinf(x))
MLM_FLOAT1(acos, ::acosf(x))
MLM_FLOAT1(atan, ::atanf(x))
MLM_FLOAT1(sinh, ::sinhf(x))
MLM_FLOAT1(cosh, ::coshf(x))
MLM_FLOAT1(tanh, ::tanhf(x))
MLM_FLOAT1(asinh, ::asinhf(x))
MLM_FLOAT1(acosh, ::acoshf(x))
MLM_FLOAT1(atanh, ::atanhf(x))
MLM_FLOAT1(saturate, ::fminf(::fmaxf(x, 0.0f), 1.0f))
MLM_FLOAT1(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : x == x ? x : 0.0f)  // ±0 kept, NaN → 0
MLM_FLOAT2(fmin, ::fminf(x, y))
MLM_FLOAT2(fmax, ::fmaxf(x, y))
MLM_FLOAT2(fmod, ::fmodf(x, y))
MLM_FLOAT2(pow, ::powf(x, y))
MLM_FLOAT2(powr, x < 0.0f ? NAN : ::powf(x, y))  // Metal defines powr for x ≥ 0 only
MLM_FLOAT2(atan2, ::atan2f(x, y))
MLM_FLOAT2(copysign, ::copysignf(x, y))
MLM_FLOAT2(step, y < x ? 0.0f : 1.0f)  // step(edge, x)
MLM_FLOAT3(fma, ::fmaf(x, y, z))
MLM_FLOAT3(mix, x + (y - x) * z)
MLM_FLOAT_TEST(isnan, x != x)
MLM_FLOAT_TEST(isinf, ::fabsf(x) == INFINITY)
MLM_FLOAT_TEST(isfinite, ::fabsf(x) < INFINITY)
MLM_FLOAT_TEST(signbit, as_type<uint>(x) >> 31)

template <class A, class B, class C, class T = detail::common_t<A, B, C>, detail::if_float<T> = 0>
MLM_FN T smoothstep(A edge0, B edge1, C x) {
  T t = saturate((T(x) - T(edge0)) / (T(edge1) - T(edge0)));
  return t * t * (3.0f - 2.0f * t);
}

template <class T, detail::if_float<T> = 0> MLM_FN T sincos(T x, T& cosine) {
  cosine = cos(x);
  return sin(x);
}

// Integer and float alike: float min/max are fmin/fmax, as Metal defines them.
template <class T, detail::if_number<T> = 0> MLM_FN T abs(T v) {
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x) -> E {
    if constexpr (detail::traits<E>::category == detail::floating) return ::fabsf(x);
    else if constexpr (E(-1) > 0) return x;
    else return x < 0 ? -x : x;
  }, v);
}

template <class A, class B, class T = detail::common_t<A, B>, detail::if_number<T> = 0>
MLM_FN T min(A a, B b) {
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x, E y) -> E {
    if constexpr (detail::traits<E>::category == detail::floating) return ::fminf(x, y);
    else return y < x ? y : x;
  }, a, b);
}

template <class A, class B, class T = detail::common_t<A, B>, detail::if_number<T> = 0>
MLM_FN T max(A a, B b) {
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x, E y) -> E {
    if constexpr (detail::traits<E>::category == detail::floating) return ::fmaxf(x, y);
    else return x < y ? y : x;
  }, a, b);
}

template <class A, class B, class C, class T = detail::common_t<A, B, C>, detail::if_number<T> = 0>
MLM_FN T clamp(A x, B lo, C hi) {
  return min(max(T(x), T(lo)), T(hi));
}

// Integer functions. Bit counts are taken over the type's own width, so clz(ushort(1)) == 15.

namespace detail {
template <class E> constexpr unsigned bits = 8 * sizeof(E);
template <class E> MLM_FN unsigned low_bits(E x) {  // x's bits, zero-extended
  return unsigned(x) & (~0u >> (32 - bits<E>));
}
#if MLM_CUDA
MLM_FN unsigned popcount32(unsigned u) { return __popc(u); }
MLM_FN unsigned clz32(unsigned u) { return __clz(u); }
MLM_FN unsigned ctz32(unsigned u) { return u ? __ffs(u) - 1 : 32; }
#else
MLM_FN unsigned popcount32(unsigned u) { return __builtin_popcount(u); }
MLM_FN unsigned clz32(unsigned u) { return u ? __builtin_clz(u) : 32; }
MLM_FN unsigned ctz32(unsigned u) { return u ? __builtin_ctz(u) : 32; }
#endif
}  // namespace detail

template <class T, detail::if_int<T> = 0> MLM_FN T popcount(T v) {
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x) { return detail::popcount32(detail::low_bits(x)); }, v);
}

template <class T, detail::if_int<T> = 0> MLM_FN T clz(T v) {
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x) { return detail::clz32(detail::low_bits(x)) - (32 - detail::bits<E>); }, v);
}

template <class T, detail::if_int<T> = 0> MLM_FN T ctz(T v) {
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x) { return min(detail::ctz32(detail::low_bits(x)), detail::bits<E>); }, v);
}

// The high half of the full product: Philox's 32×32 → 64-bit multiply.
template <class A, class B, class T = detail::common_t<A, B>, detail::if_int<T> = 0>
MLM_FN T mulhi(A a, B b) {
  using E = detail::scalar_t<T>;
  using Wide = typename detail::conditional<E(-1) < 0, long long, unsigned long long>::type;
  return detail::zip<T>([](E x, E y) { return E(Wide(x) * Wide(y) >> detail::bits<E>); }, a, b);
}

#if MLM_CUDA
// The exact-match overload wins over the template: one IMAD.HI instead of a wide multiply and
// a shift (Philox runs at the store bandwidth only with it).
MLM_FN uint mulhi(uint a, uint b) { return __umulhi(a, b); }
#endif

template <class A, class B, class T = detail::common_t<A, B>, detail::if_int<T> = 0>
MLM_FN T rotate(A a, B b) {  // rotate left by b mod width
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x, E y) {
    constexpr unsigned n = detail::bits<E>;
    unsigned u = detail::low_bits(x), s = detail::low_bits(y) % n;
    return E(u << s | u >> ((n - s) % n));
  }, a, b);
}

template <class A, class B, class T = detail::common_t<A, B>, detail::if_int<T> = 0>
MLM_FN detail::unsigned_t<T> absdiff(A a, B b) {
  using E = detail::scalar_t<T>;
  using U = typename detail::traits<E>::unsigned_scalar;
  return detail::zip<detail::unsigned_t<T>>(
      [](E x, E y) { return y < x ? U(U(x) - U(y)) : U(U(y) - U(x)); }, a, b);
}

// Relational.

template <class A, class B, class C, class T = detail::common_t<A, B>, detail::if_bool<C> = 0,
          detail::enable_if_t<detail::traits<C>::width == 1 ||
                                              detail::traits<C>::width == detail::width<T>, int> = 0>
MLM_FN T select(A a, B b, C c) {  // c ? b : a, per component
  using E = detail::scalar_t<T>;
  return detail::zip<T>([](E x, E y, bool s) { return s ? y : x; }, a, b, c);
}

template <class T, detail::if_bool<T> = 0> MLM_FN bool all(T v) {
  bool r = true;
  for (int i = 0; i < detail::width<T>; i++) r = r && detail::at(v, i);
  return r;
}

template <class T, detail::if_bool<T> = 0> MLM_FN bool any(T v) {
  bool r = false;
  for (int i = 0; i < detail::width<T>; i++) r = r || detail::at(v, i);
  return r;
}

// Geometric. Sums run x, y, z, w in order.

template <class T, int N, detail::if_float<T> = 0> MLM_FN T dot(vec<T, N> a, vec<T, N> b) {
  float s = float(a.x) * float(b.x);
  for (int i = 1; i < N; i++) s += float(a[i]) * float(b[i]);
  return T(s);
}
template <class T, int N, detail::if_float<T> = 0> MLM_FN T length_squared(vec<T, N> v) {
  return dot(v, v);
}
template <class T, int N, detail::if_float<T> = 0> MLM_FN T length(vec<T, N> v) {
  return T(::sqrtf(dot(v, v)));
}
template <class T, int N, detail::if_float<T> = 0>
MLM_FN T distance(vec<T, N> a, vec<T, N> b) {
  return length(a - b);
}
template <class T, int N, detail::if_float<T> = 0> MLM_FN vec<T, N> normalize(vec<T, N> v) {
  return v / length(v);
}
template <class T, detail::if_float<T> = 0> MLM_FN vec<T, 3> cross(vec<T, 3> a, vec<T, 3> b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}
template <class T, int N, detail::if_float<T> = 0>
MLM_FN vec<T, N> reflect(vec<T, N> i, vec<T, N> n) {
  return i - 2.0f * dot(n, i) * n;
}

#undef MLM_FLOAT1
#undef MLM_FLOAT2
#undef MLM_FLOAT3
#undef MLM_FLOAT_TEST

// Metal's fast:: and precise:: variants. Here both are the precise float functions: what fast
// math may do differs by target, and a kernel tested on cpu must not depend on it.
#define MLM_MATH_NAMES(X)                                                                       \
  X(abs) X(fabs) X(min) X(max) X(fmin) X(fmax) X(clamp) X(saturate) X(floor) X(ceil) X(round)   \
  X(rint) X(trunc) X(fract) X(fmod) X(sqrt) X(rsqrt) X(cbrt) X(exp) X(exp2) X(exp10) X(log)    \
  X(log2) X(log10) X(pow) X(powr) X(sin) X(cos) X(tan) X(asin) X(acos) X(atan) X(atan2)        \
  X(sinh) X(cosh) X(tanh) X(asinh) X(acosh) X(atanh) X(sincos) X(copysign) X(fma) X(mix)       \
  X(step) X(smoothstep) X(sign) X(dot) X(length) X(length_squared) X(distance) X(normalize)     \
  X(cross) X(reflect)
#define MLM_USING(name) using metal::name;
namespace precise { MLM_MATH_NAMES(MLM_USING) }
namespace fast { MLM_MATH_NAMES(MLM_USING) }
#undef MLM_USING
#undef MLM_MATH_NAMES

// ---------------------------------------------------------------------------------------------
// Atomics (MSL 2.3: int and uint). One 4-byte word with no constructor, so they can live in
// device buffers and threadgroup arrays alike.

template <class T> struct atomic {
  T value;
};
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;

// memory_order is mlm_constants.h's (its order is GCC's __ATOMIC_* values, which the cpu branch relies on).

#if MLM_CUDA
namespace detail {
MLM_FN void fence(memory_order order) {
  if (order != memory_order_relaxed) __threadfence();
}
template <class F> MLM_FN auto ordered(memory_order order, F op) {
  fence(order);
  auto r = op();
  fence(order);
  return r;
}
}  // namespace detail

template <class T> MLM_FN T atomic_load_explicit(const atomic<T>* a, memory_order order) {
  return detail::ordered(order, [&] { return *(const volatile T*)&a->value; });
}
template <class T> MLM_FN void atomic_store_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {
  detail::fence(order);
  *(volatile T*)&a->value = v;
  detail::fence(order);
}
template <class T> MLM_FN T atomic_exchange_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {
  return detail::ordered(order, [&] { return atomicExch(&a->value, v); });
}
template <class T>
MLM_FN bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, detail::id<T> desired,
                                                  memory_order success, memory_order) {
  T seen = detail::ordered(success, [&] { return atomicCAS(&a->value, *expected, desired); });
  bool swapped = seen == *expected;
  *expected = seen;
  return swapped;
}
#define MLM_ATOMIC_FETCH(op, cuda_fn)                                                           \
  template <class T>                                                                            \
  MLM_FN T atomic_fetch_##op##_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {    \
    return detail::ordered(order, [&] { return cuda_fn(&a->value, v); });                       \
  }
MLM_ATOMIC_FETCH(add, atomicAdd)
MLM_ATOMIC_FETCH(sub, atomicSub)
MLM_ATOMIC_FETCH(and, atomicAnd)
MLM_ATOMIC_FETCH(or, atomicOr)
MLM_ATOMIC_FETCH(xor, atomicXor)
MLM_ATOMIC_FETCH(min, atomicMin)
MLM_ATOMIC_FETCH(max, atomicMax)
#undef MLM_ATOMIC_FETCH

#else  // cpu: threadgroups run in parallel on a thread pool, so these are real atomics.

template <class T> MLM_FN T atomic_load_explicit(const atomic<T>* a, memory_order order) {
  return __atomic_load_n(&a->value, order);
}
template <class T> MLM_FN void atomic_store_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {
  __atomic_store_n(&a->value, v, order);
}
template <class T> MLM_FN T atomic_exchange_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {
  return __atomic_exchange_n(&a->value, v, order);
}
template <class T>
MLM_FN bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, detail::id<T> desired,
                                                  memory_order success, memory_order failure) {
  return __atomic_compare_exchange_n(&a->value, expected, desired, true, success, failure);
}
#define MLM_ATOMIC_FETCH(op)                                                                    \
  template <class T>                                                                            \
  MLM_FN T atomic_fetch_##op##_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {    \
    return __atomic_fetch_##op(&a->value, v, order);                                            \
  }
MLM_ATOMIC_FETCH(add)
MLM_ATOMIC_FETCH(sub)
MLM_ATOMIC_FETCH(and)
MLM_ATOMIC_FETCH(or)
MLM_ATOMIC_FETCH(xor)
#undef MLM_ATOMIC_FETCH

// GCC has no fetch-min/max builtin: retry until v loses the comparison or is stored.
template <class T> MLM_FN T atomic_fetch_min_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {
  T seen = __atomic_load_n(&a->value, __ATOMIC_RELAXED);
  while (v < seen && !__atomic_compare_exchange_n(&a->value, &seen, v, true, order, __ATOMIC_RELAXED)) {}
  return seen;
}
template <class T> MLM_FN T atomic_fetch_max_explicit(atomic<T>* a, detail::id<T> v, memory_order order) {
  T seen = __atomic_load_n(&a->value, __ATOMIC_RELAXED);
  while (seen < v && !__atomic_compare_exchange_n(&a->value, &seen, v, true, order, __ATOMIC_RELAXED)) {}
  return seen;
}
#endif

// Barrier scopes; the barriers themselves are per target (mlm_cpu.h, mlm_cuda.h).
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
MLM_FN constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

}  // namespace metal
