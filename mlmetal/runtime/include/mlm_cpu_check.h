// mlm_cpu_check.h — the cpu backend's bounds-checked build (MLMETAL_CHECK_BOUNDS=1), as
// compute-sanitizer is for CUDA.
//
// The wrapper generator rewrites every `device`, `constant` and `threadgroup` pointer type into
// check::ptr<T> and every threadgroup array into a check::ptr view of its storage; kernel bodies
// are otherwise the same text. A ptr is the raw pointer plus the region it points into (a bound
// buffer or a threadgroup array: its extent and its name), so indexing, arithmetic, casts to other
// element types (`(device float4*)p`) and passing to helpers keep working, and every access is
// checked against the region. An access outside it is never made: the first one of a dispatch is
// recorded (kernel, buffer, index, the .metal file and line of the access) for the runtime to
// raise, and the access goes to a zeroed scratch slot instead, so the kernel runs to its end.
//
// The line comes from __builtin_FILE()/__builtin_LINE() as default arguments of the index's
// converting constructor: they take the value of the expression that indexes, which the
// generated code's #line directives place in the .metal source. `*p` and `p->` carry no index
// and so no line (the kernels use p[0]).
#pragma once
#include <metal_stdlib>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

// The first out-of-bounds access of a dispatch; the runtime zeroes `set` before each dispatch.
struct mlm_bounds_error {
  int set;
  int buffer;  // the [[buffer(i)]] index, or -1 for a threadgroup array
  char message[1016];
};

namespace metal {
namespace check {

// A bound buffer or a threadgroup array.
struct region {
  uintptr_t base;
  unsigned long long nbytes;
  const char* what;    // "buffer `x` [[buffer(0)]]", "threadgroup array `t`"
  const char* kernel;
  int buffer;
  mlm_bounds_error* error;
  region(const void* base, unsigned long long nbytes, const char* what, const char* kernel, int buffer,
         mlm_bounds_error* error)
      : base(uintptr_t(base)), nbytes(nbytes), what(what), kernel(kernel), buffer(buffer), error(error) {}
};

// Zeroed memory of `size` bytes for an access that must not be made to use instead.
[[gnu::cold]] inline void* scratch(size_t size) {
  alignas(64) static thread_local unsigned char fixed[1024];
  static thread_local unsigned char* grown = nullptr;  // for larger elements and spans; kept for reuse
  static thread_local size_t grown_size = 0;
  unsigned char* s = fixed;
  if (size > sizeof(fixed)) {
    if (size > grown_size) {
      std::free(grown);
      grown_size = (size + 63) / 64 * 64;
      grown = static_cast<unsigned char*>(std::aligned_alloc(64, grown_size));
    }
    s = grown;
  }
  __builtin_memset(s, 0, size);
  return s;
}

// Records the first violation of a dispatch (`what` says which access, `file`:`line` where);
// returns scratch memory of `size` bytes for the access to use instead.
[[gnu::cold, gnu::noinline]] inline void* fail(const region* r, size_t size, const char* file, unsigned line,
                                               const char* what) {
  mlm_bounds_error* e = r->error;
  int unset = 0;
  if (__atomic_load_n(&e->set, __ATOMIC_RELAXED) == 0 &&
      __atomic_compare_exchange_n(&e->set, &unset, -1, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
    if (*file)
      std::snprintf(e->message, sizeof(e->message), "%s:%u: kernel %s: %s", file, line, r->kernel, what);
    else  // `*p` and `p->` have no index to carry the line
      std::snprintf(e->message, sizeof(e->message), "kernel %s (line unknown: a `*` or `->`): %s", r->kernel, what);
    e->buffer = r->buffer;
    __atomic_store_n(&e->set, 1, __ATOMIC_RELEASE);
  }
  return scratch(size);
}

// `size` bytes at byte `offset` of a region.
[[gnu::cold, gnu::noinline]] inline void* out_of_bounds(const region* r, long long offset, unsigned size,
                                                        const char* file, unsigned line) {
  char what[512];
  if (offset % size == 0)
    std::snprintf(what, sizeof(what), "index %lld is out of bounds of %s (%llu elements of %u bytes)",
                  offset / (long long)size, r->what, r->nbytes / size, size);
  else
    std::snprintf(what, sizeof(what), "%u bytes at byte offset %lld are out of bounds of %s (%llu bytes)",
                  size, offset, r->what, r->nbytes);
  return fail(r, size, file, line, what);
}

// An index with the place of the expression that indexes.
struct site {
  long long i;
  const char* file;
  unsigned line;
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  site(I i, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE())
      : i((long long)i), file(file), line(line) {}
};

template <class T> struct ptr;

// One row of a two-dimensional threadgroup array: its index is checked against the row.
template <class T, size_t N> struct row {
  T* p;
  const region* r;
  long long outer;
  T& operator[](site s) const {
    if (__builtin_expect(s.i < 0 || s.i >= (long long)N, 0)) {
      char what[512];
      std::snprintf(what, sizeof(what), "index [%lld][%lld] is out of bounds of %s (rows of %zu elements)", outer,
                    s.i, r->what, N);
      return *static_cast<T*>(fail(r, sizeof(T), s.file, s.line, what));
    }
    return p[s.i];
  }
  // Decays to a pointer into the whole array, as an array row does.
  template <class U, std::enable_if_t<std::is_convertible<T*, U*>::value, int> = 0>
  operator ptr<U>() const { return ptr<U>(p, r); }
};

template <class T> struct access {  // what p[i] gives: an element, or a checked row of an array
  using type = T&;
  static T& make(T* p, const region*, long long) { return *p; }
};
template <class T, size_t N> struct access<T[N]> {
  using type = row<T, N>;
  static row<T, N> make(T (*p)[N], const region* r, long long i) { return {*p, r, i}; }
};
template <class T, size_t N> struct access<const T[N]> : access<T[N]> {};

template <class T> struct ptr {
  T* p;
  const region* r;

  ptr() = default;
  ptr(void* raw, const region* r) : p(static_cast<T*>(raw)), r(r) {}
  ptr(T* raw, const region* r) : p(raw), r(r) {}
  // A raw pointer (`&x[i]` passed on, or nullptr) has no region: accesses through it go unchecked.
  ptr(T* raw) : p(raw), r(nullptr) {}
  template <class U, std::enable_if_t<std::is_convertible<U*, T*>::value, int> = 0>
  ptr(const ptr<U>& o) : p(o.p), r(o.r) {}
  template <class U, std::enable_if_t<!std::is_convertible<U*, T*>::value, int> = 0>
  explicit ptr(const ptr<U>& o) : p((T*)o.p), r(o.r) {}  // a cast to another element type

  // The element at i, checked; `file`/`line` name the access in the error.
  T* check(long long i, unsigned size, const char* file, unsigned line) const {
    if (r == nullptr) return (T*)(uintptr_t(p) + uintptr_t(i * (long long)sizeof(T)));
    const long long offset = (long long)(uintptr_t(p) - r->base) + i * (long long)sizeof(T);
    if (__builtin_expect(offset < 0 || (unsigned long long)offset + size > r->nbytes, 0))
      return static_cast<T*>(out_of_bounds(r, offset, size, file, line));
    return (T*)(r->base + uintptr_t(offset));
  }

  typename access<T>::type operator[](site s) const {
    return access<T>::make(check(s.i, sizeof(T), s.file, s.line), r, s.i);
  }
  T& operator*() const { return *check(0, sizeof(T), "", 0); }
  T* operator->() const { return check(0, sizeof(T), "", 0); }
  // The raw pointer to n elements from here, all checked at once: for functions that take raw
  // pointers (simdgroup_load, say).
  T* span(long long n, const char* file = __builtin_FILE(), unsigned line = __builtin_LINE()) const {
    return n > 0 ? check(0, unsigned(n * sizeof(T)), file, line) : p;
  }

  explicit operator bool() const { return p != nullptr; }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  friend ptr operator+(ptr a, I i) { return ptr((T*)(uintptr_t(a.p) + uintptr_t((long long)i * (long long)sizeof(T))), a.r); }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  friend ptr operator+(I i, ptr a) { return a + i; }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  friend ptr operator-(ptr a, I i) { return a + -(long long)i; }
  friend long long operator-(ptr a, ptr b) { return (long long)(a.p - b.p); }
  template <class I> ptr& operator+=(I i) { return *this = *this + i; }
  template <class I> ptr& operator-=(I i) { return *this = *this - i; }
  ptr& operator++() { return *this += 1; }
  ptr& operator--() { return *this -= 1; }
  ptr operator++(int) { ptr old = *this; *this += 1; return old; }
  ptr operator--(int) { ptr old = *this; *this -= 1; return old; }
  friend bool operator==(ptr a, ptr b) { return a.p == b.p; }
  friend bool operator!=(ptr a, ptr b) { return a.p != b.p; }
  friend bool operator<(ptr a, ptr b) { return a.p < b.p; }
  friend bool operator<=(ptr a, ptr b) { return a.p <= b.p; }
  friend bool operator>(ptr a, ptr b) { return a.p > b.p; }
  friend bool operator>=(ptr a, ptr b) { return a.p >= b.p; }
};

// A threadgroup array's checked view: a ptr to its first element (a row, for two dimensions).
template <class T, size_t N> ptr<T> view(T (&a)[N], const region* r) { return ptr<T>(a, r); }

}  // namespace check

// Atomics on a checked pointer (`atomic_fetch_add_explicit(counts + b, ...)`), checked at the call.
#define MLM_HERE const char *file = __builtin_FILE(), unsigned line = __builtin_LINE()
#define MLM_AT a.check(0, sizeof(atomic<T>), file, line)
template <class T> MLM_FN T atomic_load_explicit(check::ptr<atomic<T>> a, memory_order o, MLM_HERE) {
  return atomic_load_explicit(MLM_AT, o);
}
template <class T>
MLM_FN void atomic_store_explicit(check::ptr<atomic<T>> a, detail::id<T> v, memory_order o, MLM_HERE) {
  atomic_store_explicit(MLM_AT, v, o);
}
template <class T>
MLM_FN T atomic_exchange_explicit(check::ptr<atomic<T>> a, detail::id<T> v, memory_order o, MLM_HERE) {
  return atomic_exchange_explicit(MLM_AT, v, o);
}
template <class T>
MLM_FN bool atomic_compare_exchange_weak_explicit(check::ptr<atomic<T>> a, T* expected, detail::id<T> desired,
                                                  memory_order success, memory_order failure, MLM_HERE) {
  return atomic_compare_exchange_weak_explicit(MLM_AT, expected, desired, success, failure);
}
#define MLM_CHECKED_FETCH(op)                                                                     \
  template <class T>                                                                              \
  MLM_FN T atomic_fetch_##op##_explicit(check::ptr<atomic<T>> a, detail::id<T> v, memory_order o, MLM_HERE) { \
    return atomic_fetch_##op##_explicit(MLM_AT, v, o);                                            \
  }
MLM_CHECKED_FETCH(add)
MLM_CHECKED_FETCH(sub)
MLM_CHECKED_FETCH(and)
MLM_CHECKED_FETCH(or)
MLM_CHECKED_FETCH(xor)
MLM_CHECKED_FETCH(min)
MLM_CHECKED_FETCH(max)
#undef MLM_CHECKED_FETCH
#undef MLM_AT
#undef MLM_HERE

}  // namespace metal
