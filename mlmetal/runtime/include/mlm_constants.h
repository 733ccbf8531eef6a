// mlm_constants.h — what <metal_stdlib> declares the same way for every translation: the float
// math constants (M_PI_F, …) and metal::memory_order. Shared by mlm_compat.h (cpu and cuda)
// and mlm_opencl_check.h (the clang address-space check).
#pragma once
#define M_E_F 2.71828182845904523536f
#define M_LOG2E_F 1.44269504088896340736f
#define M_LOG10E_F 0.434294481903251827651f
#define M_LN2_F 0.693147180559945309417f
#define M_LN10_F 2.30258509299404568402f
#define M_PI_F 3.14159265358979323846f
#define M_PI_2_F 1.57079632679489661923f
#define M_PI_4_F 0.785398163397448309616f
#define M_1_PI_F 0.318309886183790671538f
#define M_2_PI_F 0.636619772367581343076f
#define M_2_SQRTPI_F 1.12837916709551257390f
#define M_SQRT2_F 1.41421356237309504880f
#define M_SQRT1_2_F 0.707106781186547524401f

namespace metal {
// MSL 2.3 only has memory_order_relaxed; the rest are accepted. The order matches GCC's
// __ATOMIC_* values, so mlm_compat.h's cpu branch passes them straight through.
enum memory_order {
  memory_order_relaxed,
  memory_order_consume,
  memory_order_acquire,
  memory_order_release,
  memory_order_acq_rel,
  memory_order_seq_cst
};
}  // namespace metal
