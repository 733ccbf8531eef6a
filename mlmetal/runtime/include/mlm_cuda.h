// mlm_cuda.h — barriers and simd-group functions for the cuda backend.
//
// A Metal simdgroup is a CUDA warp: both are 32 lanes, and the generated wrapper numbers threads
// x-fastest as CUDA does, so thread_index_in_simdgroup is the hardware lane. Every function
// works on the lanes of __activemask(): lanes whose kernel has returned (or that sit in another
// branch) take no part, as on Metal. With all 32 lanes active, reductions and scans run as
// log₂(32)-step shuffle trees; with some missing, as one shuffle per active lane, folding lane 0
// first exactly as mlm_cpu.h does. Results at the edges (an inactive or out-of-range source lane)
// are mlm_cpu.h's: the caller's own value.
#pragma once
#include "mlm_compat.h"

namespace metal {

MLM_FN void threadgroup_barrier(mem_flags) { __syncthreads(); }
MLM_FN void simdgroup_barrier(mem_flags) { __syncwarp(__activemask()); }

namespace detail {
constexpr unsigned all_lanes = 0xffffffffu;

MLM_FN unsigned lane_id() {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

// __shfl_sync moves 32-bit words; any type (half, bool, vectors) travels as its words.
// `src` is taken mod 32, as __shfl_sync does for lanes past the end.
template <class T> MLM_FN T shfl(unsigned mask, T x, unsigned src) {
  constexpr unsigned words = (sizeof(T) + 3) / 4;
  unsigned w[words] = {};
  MLM_MEMCPY(w, &x, sizeof(T));
  for (unsigned i = 0; i < words; i++) w[i] = __shfl_sync(mask, w[i], int(src & 31u));
  T r;
  MLM_MEMCPY(&r, w, sizeof(T));
  return r;
}

// Lane `src`'s value if it is active, else the caller's own.
template <class T> MLM_FN T from(unsigned mask, T x, unsigned src) {
  T y = shfl(mask, x, src);
  return src < 32u && (mask >> src & 1u) ? y : x;
}

// Folds op over the active lanes below `end`, lane 0 first; `init` if there are none. Every
// active lane runs the same iterations (they depend on the mask alone), as __shfl_sync needs.
template <class T, class F> MLM_FN T fold(unsigned mask, T x, F op, T init, unsigned end) {
  T r = init;
  bool empty = true;
  for (unsigned m = mask; m != 0u; m &= m - 1u) {
    unsigned l = __ffs(m) - 1;
    T y = shfl(mask, x, l);
    if (l < end) {
      r = empty ? y : T(op(r, y));
      empty = false;
    }
  }
  return r;
}

// The op of all active lanes, on every active lane. The butterfly gives every lane the same
// bits: each step combines two equal-valued halves, and op is commutative.
template <class T, class F> MLM_FN T reduce(T x, F op) {
  unsigned mask = __activemask();
  if (mask != all_lanes) return fold(mask, x, op, x, 32u);
  for (unsigned d = 16; d > 0; d >>= 1) x = T(op(x, shfl(all_lanes, x, lane_id() ^ d)));
  return x;
}

// Inclusive (or exclusive) scan over the active lanes up to (or below) the caller.
template <class T, class F> MLM_FN T scan(T x, F op, T identity, bool inclusive) {
  unsigned mask = __activemask(), lane = lane_id();
  if (mask != all_lanes) return fold(mask, x, op, identity, inclusive ? lane + 1u : lane);
  for (unsigned d = 1; d < 32; d <<= 1) {  // Hillis–Steele: lane l gathers lanes l-2d+1 … l
    T y = shfl(all_lanes, x, lane - d);
    if (lane >= d) x = T(op(y, x));
  }
  if (inclusive) return x;
  T before = shfl(all_lanes, x, lane - 1u);
  return lane == 0u ? identity : before;
}
}  // namespace detail

template <class T, detail::if_number<T> = 0> MLM_FN T simd_sum(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return a + b; });
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_product(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return a * b; });
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_min(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return min(a, b); });
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_max(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return max(a, b); });
}
template <class T, detail::if_int<T> = 0> MLM_FN T simd_and(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return a & b; });
}
template <class T, detail::if_int<T> = 0> MLM_FN T simd_or(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return a | b; });
}
template <class T, detail::if_int<T> = 0> MLM_FN T simd_xor(T x) {
  return detail::reduce(x, [](T a, T b) -> T { return a ^ b; });
}
MLM_FN bool simd_all(bool x) { return __all_sync(__activemask(), x); }
MLM_FN bool simd_any(bool x) { return __any_sync(__activemask(), x); }

template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_exclusive_sum(T x) {
  return detail::scan(x, [](T a, T b) -> T { return a + b; }, T(0), false);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_inclusive_sum(T x) {
  return detail::scan(x, [](T a, T b) -> T { return a + b; }, T(0), true);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_exclusive_product(T x) {
  return detail::scan(x, [](T a, T b) -> T { return a * b; }, T(1), false);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_inclusive_product(T x) {
  return detail::scan(x, [](T a, T b) -> T { return a * b; }, T(1), true);
}

// Shuffles: a source lane past either end of the simdgroup, or one that is not active, yields
// the caller's own value (Metal's rule for shuffle_up/down, mlm_cpu.h's for the rest).
template <class T> MLM_FN T simd_shuffle(T x, ushort lane) {
  return detail::from(__activemask(), x, lane);
}
template <class T> MLM_FN T simd_shuffle_down(T x, ushort delta) {
  return detail::from(__activemask(), x, detail::lane_id() + delta);
}
template <class T> MLM_FN T simd_shuffle_up(T x, ushort delta) {
  unsigned lane = detail::lane_id();
  return detail::from(__activemask(), x, lane >= delta ? lane - delta : lane);
}
template <class T> MLM_FN T simd_shuffle_xor(T x, ushort mask) {
  return detail::from(__activemask(), x, detail::lane_id() ^ mask);
}
template <class T> MLM_FN T simd_broadcast(T x, ushort lane) { return simd_shuffle(x, lane); }
template <class T> MLM_FN T simd_broadcast_first(T x) {
  unsigned mask = __activemask();
  return detail::shfl(mask, x, __ffs(mask) - 1);
}
MLM_FN bool simd_is_first() { return detail::lane_id() == unsigned(__ffs(__activemask()) - 1); }

}  // namespace metal
