// mlm_cpu.h — barriers and simd-group functions for the cpu backend.
//
// The threads of a threadgroup run as cooperative fibers; everything here rests on two hooks
// the cpu runtime implements: a threadgroup barrier, and one round of a simdgroup exchange in
// which every lane still running publishes a value and sees all the others'. Lanes whose
// kernel has returned take no part, so reductions run over the active lanes only.
#pragma once
#include "mlm_compat.h"

// Switches to the next fiber; returns when every thread of the threadgroup has reached it.
extern "C" void mlm_cpu_barrier(void);
// Publishes `size` (<= 64) bytes of this lane's value and waits for the other lanes; returns
// 32 slots of `size` bytes (slot l holds lane l's value), the caller's lane, and the bitmask of
// lanes that published in this round.
extern "C" const void* mlm_cpu_simd_exchange(const void* value, unsigned size, unsigned* lane,
                                             unsigned* active);

namespace metal {

MLM_FN void threadgroup_barrier(mem_flags) { mlm_cpu_barrier(); }

namespace detail {
// One exchange round, seen from one lane. The slots are the runtime's and stay valid only
// until this lane's next exchange, so a round is read right away and never kept.
template <class T> struct simd_round {
  const unsigned char* slots;
  unsigned lane, active;

  MLM_FN explicit simd_round(T x) {
    static_assert(sizeof(T) <= 64, "simd functions exchange at most 64 bytes per lane");
    slots = static_cast<const unsigned char*>(mlm_cpu_simd_exchange(&x, sizeof(T), &lane, &active));
  }
  MLM_FN bool is_active(unsigned l) const { return l < 32 && (active >> l & 1); }
  MLM_FN T operator[](unsigned l) const {
    T v;
    __builtin_memcpy(&v, slots + l * sizeof(T), sizeof(T));  // slots need not be aligned for T
    return v;
  }
  MLM_FN unsigned first() const { return __builtin_ctz(active); }

  // Lane `from`'s value, or the caller's own where Metal leaves the result undefined or unchanged.
  MLM_FN T from(unsigned from) const { return (*this)[is_active(from) ? from : lane]; }

  // Folds op over the active lanes below `end`, lane 0 first; `init` if there are none.
  template <class F> MLM_FN T fold(F op, T init, unsigned end = 32) const {
    T r = init;
    bool empty = true;
    for (unsigned l = 0; l < end; l++) {
      if (!is_active(l)) continue;
      r = empty ? (*this)[l] : T(op(r, (*this)[l]));
      empty = false;
    }
    return r;
  }
};
}  // namespace detail

// Waits for the other active lanes of the simdgroup: an exchange that carries nothing.
MLM_FN void simdgroup_barrier(mem_flags) { detail::simd_round<bool> sync(false); }

template <class T, detail::if_number<T> = 0> MLM_FN T simd_sum(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return a + b; }, T(0));
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_product(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return a * b; }, T(1));
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_min(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return min(a, b); }, x);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_max(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return max(a, b); }, x);
}
template <class T, detail::if_int<T> = 0> MLM_FN T simd_and(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return a & b; }, x);
}
template <class T, detail::if_int<T> = 0> MLM_FN T simd_or(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return a | b; }, x);
}
template <class T, detail::if_int<T> = 0> MLM_FN T simd_xor(T x) {
  return detail::simd_round<T>(x).fold([](T a, T b) { return a ^ b; }, x);
}
MLM_FN bool simd_all(bool x) {
  return detail::simd_round<bool>(x).fold([](bool a, bool b) { return a && b; }, true);
}
MLM_FN bool simd_any(bool x) {
  return detail::simd_round<bool>(x).fold([](bool a, bool b) { return a || b; }, false);
}

// Prefix scans over the active lanes below the caller, lane 0 first.
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_exclusive_sum(T x) {
  detail::simd_round<T> r(x);
  return r.fold([](T a, T b) { return a + b; }, T(0), r.lane);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_inclusive_sum(T x) {
  detail::simd_round<T> r(x);
  return r.fold([](T a, T b) { return a + b; }, T(0), r.lane + 1);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_exclusive_product(T x) {
  detail::simd_round<T> r(x);
  return r.fold([](T a, T b) { return a * b; }, T(1), r.lane);
}
template <class T, detail::if_number<T> = 0> MLM_FN T simd_prefix_inclusive_product(T x) {
  detail::simd_round<T> r(x);
  return r.fold([](T a, T b) { return a * b; }, T(1), r.lane + 1);
}

// Shuffles. A source lane past either end of the simdgroup, or one that has returned, yields
// the caller's own value (Metal's rule for shuffle_up/down, a safe choice for the rest).
template <class T> MLM_FN T simd_shuffle(T x, ushort lane) {
  return detail::simd_round<T>(x).from(lane);
}
template <class T> MLM_FN T simd_shuffle_down(T x, ushort delta) {
  detail::simd_round<T> r(x);
  return r.from(r.lane + delta);
}
template <class T> MLM_FN T simd_shuffle_up(T x, ushort delta) {
  detail::simd_round<T> r(x);
  return r.from(r.lane >= delta ? r.lane - delta : r.lane);
}
template <class T> MLM_FN T simd_shuffle_xor(T x, ushort mask) {
  detail::simd_round<T> r(x);
  return r.from(r.lane ^ mask);
}
template <class T> MLM_FN T simd_broadcast(T x, ushort lane) { return simd_shuffle(x, lane); }
template <class T> MLM_FN T simd_broadcast_first(T x) {
  detail::simd_round<T> r(x);
  return r[r.first()];
}
MLM_FN bool simd_is_first() {
  detail::simd_round<bool> r(true);
  return r.lane == r.first();
}

}  // namespace metal
