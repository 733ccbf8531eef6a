// mlm_simdgroup_matrix.h — Metal's simdgroup matrices for the cpu and cuda backends.
//
// simdgroup_float8x8, simdgroup_half8x8 and simdgroup_bfloat8x8 are 8×8 matrices that the 32
// lanes of a simdgroup hold together, with make_filled_simdgroup_matrix, simdgroup_load,
// simdgroup_store, simdgroup_multiply and simdgroup_multiply_accumulate as in MSL 2.3 (bfloat:
// MSL 3.1). No lane may look inside
// one (the lint refuses `thread_elements()`), so each backend keeps the layout that suits it:
//
// - cpu: every lane keeps the whole matrix. A load reads all 64 elements and then waits for the
//   other lanes (one simd exchange round), so no lane's later store can change what another lane
//   loaded: the load is collective, as on a GPU. A product is exact float arithmetic on the
//   operands rounded per the precision policy: d = c, then d = fma(a[i][k], b[k][j], d) for
//   k = 0 … 7.
// - cuda: lane l owns two elements of row l/4, columns 2(l%4) and 2(l%4)+1 (`row`), and the same
//   two of column l/4 (`col`): the A operand (with its k order permuted, which a sum does not
//   see) and the B operand of NVIDIA's mma.m16n8k8, whose accumulator has the `row` layout. A
//   product is a tensor-core instruction: a product of two half (or two bfloat) matrices is
//   NVIDIA's float16 (bfloat16) mma.m16n8k8, at twice the rate of the TF32 one the other operand
//   types take, and a half or bfloat matrix keeps its lane's two elements packed as the
//   instruction reads them as well. Its 16 rows are two 8×8 products sharing b:
//   simdgroup_multiply_accumulate_pair (not MSL; kernels/tile.h has it as two products for the
//   other backends) computes both at once, a single product leaves half the instruction idle.
//
// The precision policy, MLM_MATMUL_PRECISION (fixed when a library is compiled; mlmetal.precision
// names it), says how float operands enter a product; half and bfloat operands enter as they are,
// and sums are float always:
//   0 `highest`  float accuracy: exact on cpu; on cuda the split-TF32 scheme, a = hi + lo with
//                both TF32, and a·b ≈ hi·hi + hi·lo + lo·hi in three tensor-core products;
//   1 `high`     operands rounded to TF32 (10-bit mantissa; nearest, ties away from zero, as
//                cvt.rna.tf32.f32 rounds);
//   2 `medium`   operands rounded to bfloat16 (7-bit mantissa; nearest, ties to even).
// The cpu backend rounds exactly as the cuda backend does, so a CPU test checks the numerics of a
// GPU run. (Apple GPUs multiply float matrices at float precision whatever the policy.)
//
// Staged operands (not MSL; kernels/tile.h defines both for Metal, where they are a plain value and a
// plain load): `staged_operand(x)` is x as the policy lets it into a product (under `high` rounded
// to TF32, else x), for a kernel to apply once where it stages a value in threadgroup memory, and
// `simdgroup_load_staged` loads values so staged: their products skip the policy's rounding. On
// cuda that rounding is four or five integer instructions an element of every load, which in a 3×3
// convolution's loop outnumbered the tensor-core instructions four to one; a value staged once is
// loaded by many simdgroups and for several taps. The results are the same bits. On cpu a staged
// load of a float that `staged_operand` would change loads as NaN, so a test of a kernel that
// stages without it fails rather than its cuda run silently truncating (the tensor cores drop the
// low 13 bits of an unrounded float).
//
// Split staging (not MSL either; kernels/tile.h has it as plain staging for Metal): under `highest`
// a kernel may stage a float operand as two planes, `split_hi(x)` and `split_lo(x)` (x's TF32 high
// part and the rest, rounded to TF32), and load them with `simdgroup_load_split`: its products
// then take the two parts as loaded instead of splitting each value they read, which on cuda is
// about ten instructions an element (the rounding, the rest, and the care of infinities and NaNs)
// and in a 3×3 convolution's loop more than the tensor-core instructions. MLM_STAGED_SPLIT says
// whether the backend takes split operands (1 under `highest` here, 0 on Metal), so a kernel
// stages a second plane only where it is read. The products are the same bits either way. On cpu,
// whose `highest` products are exact float arithmetic, the rest is kept exact (x − hi), so a split
// load is x itself; a high part that `split_hi` would change, or a rest outside its high part's
// rounding, loads as NaN, so a CPU test of a kernel checks its planes and their offsets.
#pragma once
#include "mlm_compat.h"

#ifndef MLM_MATMUL_PRECISION
#define MLM_MATMUL_PRECISION 0
#endif

namespace metal {

namespace detail {
// The 13 bits below TF32's mantissa rounded away: adding half of the last kept bit to the
// magnitude rounds ties away from zero (cvt.rna's rounding); a carry into the exponent is the right
// result, up to infinity, and infinities stay. A NaN is kept apart: a payload whose bits 12–22 are
// all ones (the NVIDIA GPUs' own NaN, 0x7fffffff) would carry through the exponent into the sign
// and come out −0 — NaNs made on the GPU silently vanished from tensor-core products. It becomes
// a quiet NaN with its payload's high bits, whatever they were. The same on cpu and cuda.
// (The NaN test is `x != x`: one float comparison on the GPU, where testing the magnitude's bits
// compiled to three integer instructions.)
MLM_FN float round_tf32(float x) {
  const unsigned b = as_type<unsigned>(x);
  return as_type<float>((x != x ? b | 0x400000u : b + 0x1000u) & ~0x1fffu);
}
#if MLM_CUDA
MLM_FN float round_bf16(float x) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return __uint_as_float(unsigned(h) << 16);
}
#else
MLM_FN float round_bf16(float x) {
  unsigned b = as_type<unsigned>(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return as_type<float>((b | 0x400000u) & 0xffff0000u);  // quiet NaN
  return as_type<float>((b + 0x7fffu + (b >> 16 & 1u)) & 0xffff0000u);
}
#endif

// A float operand as the policy lets it into a product; a half operand as it is.
MLM_FN float operand(float x) {
#if MLM_MATMUL_PRECISION == 1
  return round_tf32(x);
#elif MLM_MATMUL_PRECISION == 2
  return round_bf16(x);
#else
  return x;
#endif
}
MLM_FN float operand(half x) { return float(x); }
MLM_FN float operand(bfloat x) { return float(x); }

// Whether staged operands are rounded where they are staged, not in the products (the policy `high`).
constexpr bool staged_rounding = MLM_MATMUL_PRECISION == 1;

template <class T> constexpr bool is_16bit = same<T, half> || same<T, bfloat>;
}  // namespace detail

// x as the policy lets it into a product, applied once where a kernel stages it (see the top).
#define MLM_STAGED_OPERANDS 1
MLM_FN float staged_operand(float x) { return detail::staged_rounding ? detail::round_tf32(x) : x; }
MLM_FN half staged_operand(half x) { return x; }
MLM_FN bfloat staged_operand(bfloat x) { return x; }

// Split staging (see the top), and the split of every split-TF32 product: a float's TF32 high part
// and its rest. The rest is x − hi (exact) rounded to TF32, and 0 where hi is infinite: where x is
// (∞ − ∞ would be NaN), and where a finite x within half a TF32 step of float32's largest rounds up
// to ∞ (TF32 has no larger value: it is taken as ∞). A NaN's rest is whatever its bits round to:
// hi·hi is NaN. As x − hi is a number, its rounding needs no NaN test (two integer instructions).
// The cpu backend keeps the rest exact (its `highest` products are exact: a split load there is x).
// A half or bfloat value is exact in TF32, its rest 0.
#define MLM_STAGED_SPLIT (MLM_MATMUL_PRECISION == 0)
MLM_FN float split_hi(float x) { return detail::round_tf32(x); }
MLM_FN float split_lo(float x) {
  const float hi = detail::round_tf32(x);
#if MLM_CUDA
  return isinf(hi) ? 0.0f : as_type<float>((as_type<unsigned>(x - hi) + 0x1000u) & ~0x1fffu);
#else
  return isinf(hi) ? 0.0f : x - hi;
#endif
}
MLM_FN half split_hi(half x) { return x; }
MLM_FN half split_lo(half) { return half(0.0f); }
MLM_FN bfloat split_hi(bfloat x) { return x; }
MLM_FN bfloat split_lo(bfloat) { return bfloat(0.0f); }

template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "simdgroup matrices are 8×8 (MSL 2.3)");
  static_assert(detail::same<T, float> || detail::is_16bit<T>, "simdgroup matrices hold float, half or bfloat");
#if MLM_CUDA
  float row[2];  // elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of lane l
  float col[2];  // elements (2(l%4), l/4) and (2(l%4)+1, l/4)
  bool has_col;  // false after a product: col is gathered from the other lanes when first used
  bool staged;   // loaded by simdgroup_load_staged under `high`: its elements are TF32 already
  bool split;    // loaded by simdgroup_load_split under `highest`: row, col hold the high parts …
  float lo_row[2], lo_col[2];  // … and these the rest
  // half and bfloat: the same elements' bits, the first in the low 16 (what a 16-bit mma reads);
  // a float matrix leaves them unused, and the compiler drops them.
  unsigned row16, col16;
#else
  T e[8][8];
#endif
  simdgroup_matrix() = default;
  // The diagonal matrix with `diagonal` on its diagonal, as MSL's constructor makes.
  MLM_FN simdgroup_matrix(T diagonal);
};

using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

namespace detail {
// Where element (r, c) of a matrix lies in memory whose rows are `stride` elements apart: in the
// 8×8 block at `origin` (x: column, y: row), or, transposed, at (c, r) of that block.
MLM_FN ulong element_at(ulong r, ulong c, ulong stride, ulong2 origin, bool transpose) {
  return transpose ? (origin.y + c) * stride + origin.x + r : (origin.y + r) * stride + origin.x + c;
}
}  // namespace detail

#if MLM_CUDA

namespace detail {
MLM_FN unsigned matrix_row() { return lane_id() >> 2; }
MLM_FN unsigned matrix_pair() { return 2u * (lane_id() & 3u); }
// x, which the compiler cannot see through (so cannot merge loads at x and x − 1); free in SASS.
MLM_FN ulong opaque(ulong x) {
  asm("mov.b64 %0, %1;" : "=l"(x) : "l"(x));
  return x;
}

// T as it is stored: a half result rounds to half.
template <class T> MLM_FN float stored(float x) { return float(T(x)); }

// Two values of a 16-bit type T packed, the first in the low half.
template <class T> MLM_FN unsigned pack16(float lo, float hi) {
  return unsigned(as_type<ushort>(T(lo))) | unsigned(as_type<ushort>(T(hi))) << 16;
}

// A half or bfloat matrix's packed bits follow its float elements.
template <class T> MLM_FN void repack(simdgroup_matrix<T, 8, 8>& m) {
  if constexpr (is_16bit<T>) {
    m.row16 = pack16<T>(m.row[0], m.row[1]);
    m.col16 = pack16<T>(m.col[0], m.col[1]);
  }
}

// m holds whole values: no rests.
template <class T> MLM_FN void unsplit(simdgroup_matrix<T, 8, 8>& m) {
  m.split = false;
  m.lo_row[0] = m.lo_row[1] = m.lo_col[0] = m.lo_col[1] = 0.0f;
}

// Column layout gathered from the row layout: (k, l/4) for k = 2(l%4), 2(l%4)+1 sits in lane
// 4k + (l/4)/2, element (l/4)%2.
template <class T> MLM_FN void columns(const simdgroup_matrix<T, 8, 8>& m, float (&c)[2]) {
  if (m.has_col) {
    c[0] = m.col[0];
    c[1] = m.col[1];
    return;
  }
  const unsigned g = matrix_row(), k = matrix_pair(), odd = g & 1u;
  for (unsigned i = 0; i < 2; ++i) {
    const unsigned src = 4u * (k + i) + g / 2u;
    const float even_v = __shfl_sync(all_lanes, m.row[0], int(src));
    const float odd_v = __shfl_sync(all_lanes, m.row[1], int(src));
    c[i] = odd ? odd_v : even_v;
  }
}

// d (16×8) = a (16×8) · b (8×8) + d on the tensor cores: TF32 operands (bits of floats whose
// low 13 bits are zero) or, with Bf16, bfloat16 pairs packed low element first.
MLM_FN void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
}
MLM_FN unsigned bf16_pair(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// d += a·b with 16-bit operands packed: a0 row g, a1 row g+8 (k = 2t, 2t+1), b k = 2t, 2t+1 of
// column g; T says whether they are float16 or bfloat16.
template <class T> MLM_FN void mma_16bit(float (&d)[4], unsigned a0, unsigned a1, unsigned b) {
  if constexpr (same<T, half>)
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(b));
  else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(b));
}
MLM_FN void mma_bf16(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  // a: rows g (a[0], a[2]) and g+8 (a[1], a[3]) at k = 2t, 2t+1; b: k = 2t, 2t+1 of column g.
  mma_16bit<bfloat>(d, bf16_pair(a[0], a[2]), bf16_pair(a[1], a[3]), bf16_pair(b[0], b[1]));
}

// b's column layout packed, gathered from the other lanes after a product.
template <class T> MLM_FN unsigned columns16(const simdgroup_matrix<T, 8, 8>& m) {
  if (m.has_col) return m.col16;
  float c[2];
  columns(m, c);
  return pack16<T>(c[0], c[1]);
}

// The TF32 A fragment (rows g and g+8, k slots t and t+4) holds k = 2t and 2t+1, in the order
// the row layout keeps them; the B fragment then takes the same k from the column layout.
// hi, lo: x split (split_hi, split_lo), or where split[i], x[i] and rest[i] as a split load holds them.
template <int N>
MLM_FN void split_tf32(const float (&x)[N], const float (&rest)[N], const bool (&split)[N], float (&hi)[N], float (&lo)[N]) {
  for (int i = 0; i < N; ++i) {
    hi[i] = split[i] ? x[i] : split_hi(x[i]);
    lo[i] = split[i] ? rest[i] : split_lo(x[i]);
  }
}

// d += a·b for the stacked rows a (as mma_tf32 takes them) and b's column layout, under the policy.
// a_staged, b_staged: the operand was loaded by simdgroup_load_staged, and is rounded already.
// a_split, b_split: which elements were loaded by simdgroup_load_split (high parts, their rests in
// a_lo, b_lo); `highest` reads them, the other policies load no split operands.
template <class U, class V>
MLM_FN void product(float (&d)[4], const float (&a)[4], const float (&b)[2], bool a_staged, bool b_staged,
                    const float (&a_lo)[4], const bool (&a_split)[4], const float (&b_lo)[2], const bool (&b_split)[2]) {
  constexpr bool floats = same<U, float> && same<V, float>;
  if constexpr (floats && MLM_MATMUL_PRECISION == 2) {
    mma_bf16(d, a, b);
  } else if constexpr (MLM_MATMUL_PRECISION == 0 && (same<U, float> || same<V, float>)) {
    float a_hi[4], a_rest[4], b_hi[2], b_rest[2], a_cross[4], b_cross[2];
    split_tf32(a, a_lo, a_split, a_hi, a_rest);  // a half operand is exact in TF32: its rest is zero
    split_tf32(b, b_lo, b_split, b_hi, b_rest);
    // The cross terms take an infinite hi as 0: ∞·lo would be NaN where lo is 0, and ∞·b's
    // infinity (or NaN) comes from hi·hi alone, as float32 arithmetic gives it.
    for (int i = 0; i < 4; ++i) a_cross[i] = isinf(a_hi[i]) ? 0.0f : a_hi[i];
    for (int i = 0; i < 2; ++i) b_cross[i] = isinf(b_hi[i]) ? 0.0f : b_hi[i];
    if constexpr (same<U, float>) mma_tf32(d, a_rest, b_cross);
    if constexpr (same<V, float>) mma_tf32(d, a_cross, b_rest);
    mma_tf32(d, a_hi, b_hi);
  } else {
    float a_r[4], b_r[2];
    // Rounded per the policy (a bfloat16 value is a TF32 one too); half values are TF32 already.
    for (int i = 0; i < 4; ++i) a_r[i] = same<U, float> && !a_staged ? operand(a[i]) : a[i];
    for (int i = 0; i < 2; ++i) b_r[i] = same<V, float> && !b_staged ? operand(b[i]) : b[i];
    mma_tf32(d, a_r, b_r);
  }
}
}  // namespace detail

template <class T, int C, int R> MLM_FN simdgroup_matrix<T, C, R>::simdgroup_matrix(T diagonal) {
  const unsigned g = detail::matrix_row(), k = detail::matrix_pair();
  for (unsigned i = 0; i < 2; ++i) {
    row[i] = g == k + i ? float(diagonal) : 0.0f;
    col[i] = row[i];
  }
  has_col = true;
  staged = false;
  detail::unsplit(*this);
  detail::repack(*this);
}

template <class T, int C, int R = C> MLM_FN simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.row[0] = m.row[1] = m.col[0] = m.col[1] = float(value);
  m.has_col = true;
  m.staged = false;
  detail::unsplit(m);
  detail::repack(m);
  return m;
}

template <class T, class P>
MLM_FN void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  const unsigned g = detail::matrix_row(), k = detail::matrix_pair();
  T r[2], c[2];
  for (unsigned i = 0; i < 2; ++i) {
    // Under `high` a float matrix's row pair is loaded as two floats, not one 8-byte load: the
    // tensor-core instruction of a pair takes rows g of a0, g + 8 of a1, g of a0, g + 8 of a1 in
    // consecutive registers, so an 8-byte load of a0's two would be split by a move of each (two
    // moves a load, a quarter of a 3×3 convolution's loop). (The other policies compute the
    // operands' registers from the loaded values: split into two TF32 parts, or packed to bfloat16.)
    const ulong at_row = detail::element_at(g, k + i, elements_per_row, matrix_origin, transpose_matrix);
    r[i] = T(src[detail::same<T, float> && MLM_MATMUL_PRECISION == 1 && i ? detail::opaque(at_row) : at_row]);
    c[i] = T(src[detail::element_at(k + i, g, elements_per_row, matrix_origin, transpose_matrix)]);
    d.row[i] = float(r[i]);
    d.col[i] = float(c[i]);
  }
  d.has_col = true;
  d.staged = false;
  detail::unsplit(d);
  if constexpr (detail::is_16bit<T>) {  // the bits as loaded: no conversion back and forth
    d.row16 = unsigned(as_type<ushort>(r[0])) | unsigned(as_type<ushort>(r[1])) << 16;
    d.col16 = unsigned(as_type<ushort>(c[0])) | unsigned(as_type<ushort>(c[1])) << 16;
  }
}

// A load of values staged through staged_operand, whose products then skip the rounding.
template <class T, class P>
MLM_FN void simdgroup_load_staged(simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                                  ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  simdgroup_load(d, src, elements_per_row, matrix_origin, transpose_matrix);
  d.staged = detail::staged_rounding;
}

// A load of values staged split (split_hi at src, split_lo at lo_src; see the top). Not MSL.
template <class T, class P>
MLM_FN void simdgroup_load_split(simdgroup_matrix<T, 8, 8>& d, P src, P lo_src, ulong elements_per_row = 8,
                                 ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  simdgroup_load_staged(d, src, elements_per_row, matrix_origin, transpose_matrix);
  if constexpr (detail::same<T, float> && MLM_STAGED_SPLIT) {
    const unsigned g = detail::matrix_row(), k = detail::matrix_pair();
    for (unsigned i = 0; i < 2; ++i) {
      d.lo_row[i] = lo_src[detail::element_at(g, k + i, elements_per_row, matrix_origin, transpose_matrix)];
      d.lo_col[i] = lo_src[detail::element_at(k + i, g, elements_per_row, matrix_origin, transpose_matrix)];
    }
    d.split = true;
  }
}

template <class T, class P>
MLM_FN void simdgroup_store(simdgroup_matrix<T, 8, 8> a, P dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  const unsigned g = detail::matrix_row(), k = detail::matrix_pair();
  for (unsigned i = 0; i < 2; ++i)
    dst[detail::element_at(g, k + i, elements_per_row, matrix_origin, transpose_matrix)] = T(a.row[i]);
}

template <class T, class U, class V>
MLM_FN void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                                          const simdgroup_matrix<V, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c) {
  float acc[4] = {c.row[0], c.row[1], 0.0f, 0.0f};
  if constexpr (detail::same<U, V> && detail::is_16bit<U>) {
    detail::mma_16bit<U>(acc, a.row16, 0u, detail::columns16(b));
  } else {
    float rows[4] = {a.row[0], 0.0f, a.row[1], 0.0f}, cols[2];
    const float a_lo[4] = {a.lo_row[0], 0.0f, a.lo_row[1], 0.0f}, b_lo[2] = {b.lo_col[0], b.lo_col[1]};
    const bool a_split[4] = {a.split, false, a.split, false}, b_split[2] = {b.split, b.split};
    detail::columns(b, cols);
    detail::product<U, V>(acc, rows, cols, a.staged, b.staged, a_lo, a_split, b_lo, b_split);
  }
  d.row[0] = detail::stored<T>(acc[0]);
  d.row[1] = detail::stored<T>(acc[1]);
  d.has_col = false;
  d.staged = false;
  detail::unsplit(d);
  if constexpr (detail::is_16bit<T>) d.row16 = detail::pack16<T>(d.row[0], d.row[1]);
}

// d0 = a0·b + c0 and d1 = a1·b + c1: one tensor-core instruction for both. Not MSL: kernels/tile.h
// defines it as two products where this header does not.
#define MLM_SIMDGROUP_PAIR 1
template <class T, class U, class V>
MLM_FN void simdgroup_multiply_accumulate_pair(simdgroup_matrix<T, 8, 8>& d0, simdgroup_matrix<T, 8, 8>& d1,
                                               const simdgroup_matrix<U, 8, 8>& a0, const simdgroup_matrix<U, 8, 8>& a1,
                                               const simdgroup_matrix<V, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c0,
                                               const simdgroup_matrix<T, 8, 8>& c1) {
  float acc[4] = {c0.row[0], c0.row[1], c1.row[0], c1.row[1]};
  if constexpr (detail::same<U, V> && detail::is_16bit<U>) {
    detail::mma_16bit<U>(acc, a0.row16, a1.row16, detail::columns16(b));
  } else {
    float rows[4] = {a0.row[0], a1.row[0], a0.row[1], a1.row[1]}, cols[2];
    const float a_lo[4] = {a0.lo_row[0], a1.lo_row[0], a0.lo_row[1], a1.lo_row[1]}, b_lo[2] = {b.lo_col[0], b.lo_col[1]};
    const bool a_split[4] = {a0.split, a1.split, a0.split, a1.split}, b_split[2] = {b.split, b.split};
    detail::columns(b, cols);
    detail::product<U, V>(acc, rows, cols, a0.staged && a1.staged, b.staged, a_lo, a_split, b_lo, b_split);
  }
  d0.row[0] = detail::stored<T>(acc[0]);
  d0.row[1] = detail::stored<T>(acc[1]);
  d1.row[0] = detail::stored<T>(acc[2]);
  d1.row[1] = detail::stored<T>(acc[3]);
  d0.has_col = d1.has_col = false;
  d0.staged = d1.staged = false;
  detail::unsplit(d0);
  detail::unsplit(d1);
  if constexpr (detail::is_16bit<T>) {
    d0.row16 = detail::pack16<T>(d0.row[0], d0.row[1]);
    d1.row16 = detail::pack16<T>(d1.row[0], d1.row[1]);
  }
}

#else  // cpu

template <class T, int C, int R> MLM_FN simdgroup_matrix<T, C, R>::simdgroup_matrix(T diagonal) {
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) e[i][j] = i == j ? diagonal : T(0.0f);
}

template <class T, int C, int R = C> MLM_FN simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i][j] = value;
  return m;
}

template <class T, class P>
MLM_FN void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  for (ulong r = 0; r < 8; ++r)
    for (ulong c = 0; c < 8; ++c) d.e[r][c] = src[detail::element_at(r, c, elements_per_row, matrix_origin, transpose_matrix)];
  simdgroup_barrier(mem_flags::mem_none);  // every lane has loaded before any goes on
}

// A load of values staged through staged_operand; one it would change loads as NaN (see the top).
template <class T, class P>
MLM_FN void simdgroup_load_staged(simdgroup_matrix<T, 8, 8>& d, P src, ulong elements_per_row = 8,
                                  ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  simdgroup_load(d, src, elements_per_row, matrix_origin, transpose_matrix);
  if constexpr (detail::same<T, float>)
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j)
        if (staged_operand(d.e[i][j]) != d.e[i][j] && d.e[i][j] == d.e[i][j]) d.e[i][j] = NAN;
}

// A load of values staged split (split_hi at src, split_lo at lo_src): their sum (x itself), or NaN
// where the high part is not one split_hi makes or the rest is not within its rounding (see the
// top). Not MSL.
template <class T, class P>
MLM_FN void simdgroup_load_split(simdgroup_matrix<T, 8, 8>& d, P src, P lo_src, ulong elements_per_row = 8,
                                 ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  simdgroup_load_staged(d, src, elements_per_row, matrix_origin, transpose_matrix);
  if constexpr (detail::same<T, float> && MLM_STAGED_SPLIT) {
    simdgroup_matrix<T, 8, 8> lo;
    simdgroup_load(lo, lo_src, elements_per_row, matrix_origin, transpose_matrix);
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) {
        const float hi = d.e[i][j], rest = lo.e[i][j];
        const bool made = (split_hi(hi) == hi || hi != hi) && (isinf(hi) ? rest == 0.0f : split_hi(hi + rest) == hi);
        d.e[i][j] = made ? hi + rest : NAN;
      }
  }
}

template <class T, class P>
MLM_FN void simdgroup_store(simdgroup_matrix<T, 8, 8> a, P dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false) {
  for (ulong r = 0; r < 8; ++r)
    for (ulong c = 0; c < 8; ++c) dst[detail::element_at(r, c, elements_per_row, matrix_origin, transpose_matrix)] = a.e[r][c];
}

template <class T, class U, class V>
MLM_FN void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                                          const simdgroup_matrix<V, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c) {
  float out[8][8];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float s = float(c.e[i][j]);
      for (int k = 0; k < 8; ++k) s = fma(detail::operand(a.e[i][k]), detail::operand(b.e[k][j]), s);
      out[i][j] = s;
    }
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) d.e[i][j] = T(out[i][j]);  // after the sum: d may be a, b or c
}

#endif

template <class T, class U, class V>
MLM_FN void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                               const simdgroup_matrix<V, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0.0f)));
}

}  // namespace metal
