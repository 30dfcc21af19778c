// CPU kernels of megan_fast::nonlocal_attention and its backward: fused
// dot-product attention that never materialises the n x m attention matrix
// (flash-attention style: blocks of logits, online softmax, recomputation in
// the backward from the saved row log-sum-exp).
//
// Notation, per batch element: Q (n, d), K (m, d), V (m, dv), c = scale,
//   S = c Q K^T (n, m),   lse_i = log sum_j exp(S_ij),   P = exp(S - lse),
//   O = P V (n, dv).
//
// Forward.  Queries are processed in blocks of kFwdBq; for each block the keys
// are visited in blocks of kFwdBk with an online softmax: keep the running
// row maximum m_i, the running sum l_i = sum_j exp(S_ij - m_i) and the
// unnormalised output O_i = sum_j exp(S_ij - m_i) V_j.  A new block of logits
// with row maximum mx_i gives m_new = max(m_i, mx_i); the old l_i and O_i are
// rescaled by alpha_i = exp(m_i - m_new) and the block's exp(S_ij - m_new) are
// added.  At the end O_i /= l_i and lse_i = m_i + log l_i.  A row whose every
// logit is -inf (or with m = 0 keys) has l_i = 0: its output is defined as 0
// and its lse as -inf.
//
// Backward.  With dO = dL/dO and D_i = sum_c dO_ic O_ic:
//   dV = P^T dO                                   (O = P V)
//   dP = dO V^T
//   dS_ij = P_ij (dP_ij - D_i)                    (softmax Jacobian: dS_ij =
//           P_ij (dP_ij - sum_l P_il dP_il), and sum_l P_il dP_il =
//           sum_l P_il (dO_i . V_l) = dO_i . O_i = D_i)
//   dQ = c dS K,   dK = c dS^T Q                  (S = c Q K^T)
// P is recomputed block by block from the saved lse.  The work is split over
// (batch, key block) tasks: a task owns its rows of dK and dV, accumulates
// them in a local block and loops over all query blocks.  dQ gets
// contributions from every key block; at::parallel_for hands each thread one
// contiguous range of tasks, so a range that covers every key block of a batch
// element owns that element's dQ and accumulates in place, and only an element
// split between ranges (b not a multiple of the thread count, e.g. b = 1) gets
// per-range partial buffers (d x n each, at most two per thread), summed into
// dQ afterwards in a fixed order (deterministic).  This computes each
// exponential once; a second pass over query blocks for dQ would recompute
// S, P and dP (about 40 % more work).
//
// Layout.  Everything is computed transposed, queries along the vector lanes:
// blocks of logits are stored S^T (keys x queries), so the softmax's row
// maxima, sums and the exp are plain element-wise loops over vectors of
// queries (no horizontal reductions), and the five products are one
// register-blocked outer-product micro-kernel (micro_kernel below) reading
// scalars of one operand (broadcast) and vectors of the other.  At d = 32 the
// BLAS (sgemm called per block) spent a third of its time packing and reached
// ~75 % of the FMA peak; these kernels need no packing beyond transposing Q
// (and dO) once and run at ~95 %.
//
// Memory: O((n + m) d): inputs, outputs and padded/transposed copies of q and
// dO; per thread blocks of kBq x kBk logits; the dQ partials above; never
// n x m.
//
// ISA: the build uses no -march flags, so the kernels are compiled three
// times, one code path each (cpu/isa.h, chosen at run time and capped by
// MEGAN_FAST_CPU_ISA): AVX-512 (x86-64-v4, 16 floats per vector), AVX2+FMA
// (x86-64-v3, 8) and the x86-64 baseline (SSE2, 4).  Other compilers and
// architectures get the 16-byte version only.  The float exp is
// our own branch-free polynomial (fast_expf) so that its loops vectorise;
// float64 uses std::exp.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/isa.h"  // x86-64-v4 / v3 / baseline code paths, chosen at run time (see the top)

#define NLA_INLINE MEGAN_FAST_INLINE
#if defined(__GNUC__)
#define NLA_RESTRICT __restrict__
#else
#define NLA_RESTRICT
#endif

namespace megan_fast {
namespace {

// ----------------------------------------------------------------- block sizes
//
// Measured at d = dv = 32, b = 4, n = m = 1,024 and 7,168 on an AVX-512 CPU
// (Zen 4, 32 KiB L1d, 1 MiB L2 per core).  Queries per block: a multiple of
// 16 (the widest vector) and of the micro-kernels' column tiles (64 floats).
// Forward: one kFwdBk x kFwdBq block of logits is written by the Q K^T
// kernel, swept by the max and exp loops and read by the P V kernel; small
// enough to stay in L1/L2, large enough that the per-block rescale of O
// (dv x kFwdBq) and the micro-kernels' accumulator loads are negligible.
// Backward: two kBwdBk x kBwdBq blocks (P and dS) plus the dK and dV
// accumulators (kBwdBk x d each).
#ifndef NLA_FWD_BQ
#define NLA_FWD_BQ 64
#define NLA_FWD_BK 256
#define NLA_BWD_BQ 64
#define NLA_BWD_BK 128
#endif
constexpr int64_t kFwdBq = NLA_FWD_BQ;
constexpr int64_t kFwdBk = NLA_FWD_BK;
constexpr int64_t kBwdBq = NLA_BWD_BQ;
constexpr int64_t kBwdBk = NLA_BWD_BK;
// Padding granularity of the shared transposed copies (every vector width
// divides it): 64 bytes.
template <typename T>
constexpr int64_t kPad = 64 / sizeof(T);

NLA_INLINE int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// ------------------------------------------------------------------------ exp

NLA_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
NLA_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for float, branch-free so that loops over it vectorise:
//   x = k ln2 + r,  k = round(x / ln2),  |r| <= ln2 / 2,  exp(x) = 2^k exp(r).
// k is rounded by adding 1.5 * 2^23, which leaves k in the low mantissa bits
// of t; r = x - k ln2 uses a two-part ln2 whose high part has 9 significant
// bits, so k * kLn2Hi and the subtraction are exact (Cody-Waite) with or
// without FMA contraction.  exp(r) ~ 1 + r + r^2 (c2 + c3 r + ... + c6 r^4),
// coefficients fitted for minimal relative error on [-ln2/2, ln2/2] (3e-9,
// far below float's 6e-8 half-ulp).  Measured on every float in
// [-86.98, 88.72]: at most 0.91 ulp from exp (1.18 ulp without FMA).
// The polynomial is evaluated doubled (2 exp(r), an exact scaling) and
// multiplied by 2^(k-1) built in the exponent bits, e = k + 126; clamping e
// to [0, 255] handles both ends: e <= 0 (x < -86.99: results below
// 2^-125.5 = 1.7e-38, and x = -inf) gives 2^(k-1) = +0 and exp = 0 (subnormal
// results are flushed), e = 255 (x > 89.07) gives +inf.  |x| is first
// clamped to 100 to keep k far from overflow; NaN propagates; exp(0) = 1
// exactly.
// Every clamp and select is integer arithmetic on the bits: GCC does not
// if-convert float compares (they may trap) without AVX-512 masks, so float
// selects would leave the loops scalar on AVX2 and SSE2.
NLA_INLINE float fast_expf(float x) {
  constexpr int32_t kAbsMaxBits = 0x42C80000;  // bits of 100.0f
  constexpr float kLog2e = 1.44269502162933349609375f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kShift = 12582912.0f;       // 1.5 * 2^23
  constexpr int32_t kShiftBits = 0x4B400000;  // bits of kShift: bits(t) = kShiftBits + k
  // 2 * (1, 1, c2 .. c6)
  constexpr float c0 = 2.0f, c1 = 2.0f, c2 = 2 * 0.4999999345167989f, c3 = 2 * 0.16666520689634973f,
                  c4 = 2 * 0.04166838736701293f, c5 = 2 * 0.008368709842554736f, c6 = 2 * 0.0013814612982926365f;
  const int32_t ix = float_to_bits(x);
  // NaN test on a different expression than the clamp below, so that GCC
  // does not thread the two comparisons into branches.
  const int32_t nan_mask = -static_cast<int32_t>((static_cast<uint32_t>(ix) << 1) > 0xFF000000u);
  int32_t ax = ix & 0x7FFFFFFF;
  ax = ax < kAbsMaxBits ? ax : kAbsMaxBits;
  const float xc = bits_to_float(ax | (ix & static_cast<int32_t>(0x80000000u)));
  const float t = xc * kLog2e + kShift;
  const float kf = t - kShift;
  float r = xc - kf * kLn2Hi;
  r = r - kf * kLn2Lo;
  float p = c6;
  p = p * r + c5;
  p = p * r + c4;
  p = p * r + c3;
  p = p * r + c2;
  p = p * r + c1;
  p = p * r + c0;
  int32_t e = float_to_bits(t) - (kShiftBits - 126);  // k + 126
  e = e < 0 ? 0 : e;
  e = e > 255 ? 255 : e;
  const float y = p * bits_to_float(e << 23);
  return bits_to_float((float_to_bits(y) & ~nan_mask) | (ix & nan_mask));
}

NLA_INLINE float exp_(float x) { return fast_expf(x); }
NLA_INLINE double exp_(double x) { return std::exp(x); }

// ---------------------------------------------------------------- micro-kernel
//
// GNU vector extensions: VB-byte vectors of T, compiled to zmm / ymm / xmm
// registers by the version being built.
template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int W = VB / static_cast<int>(sizeof(T));
};

template <typename T, int VB>
NLA_INLINE typename Vec<T, VB>::type vload(const T* p) {
  typename Vec<T, VB>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T, int VB>
NLA_INLINE void vstore(T* p, typename Vec<T, VB>::type v) {
  std::memcpy(p, &v, sizeof v);
}

// C (+)= A B for an R x (V W) tile, K-dimension kd:
//   C[r*crs + v*W + w] (+)= sum_k A[r*ars + k*aks] * B[k*bks + v*W + w].
// A's elements are broadcast, B's rows are loaded as vectors; R x V vector
// accumulators stay in registers.  The strides let the same kernel compute
// S^T = K Q^T (A = K rows, B = Q^T), O^T += V^T P^T (A = V read down its
// columns, B = P^T) and dV += P^T dO (A = P^T rows, B = dO).
template <typename T, int VB, int R, int V>
NLA_INLINE void micro_kernel(int64_t kd, const T* NLA_RESTRICT A, int64_t ars, int64_t aks, const T* NLA_RESTRICT B,
                             int64_t bks, T* NLA_RESTRICT C, int64_t crs, bool accumulate) {
  using vec = typename Vec<T, VB>::type;
  constexpr int W = Vec<T, VB>::W;
  vec acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? vload<T, VB>(C + r * crs + v * W) : vec{};
  for (int64_t k = 0; k < kd; ++k) {
    vec b[V];
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) b[v] = vload<T, VB>(B + k * bks + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + k * aks];
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) vstore<T, VB>(C + r * crs + v * W, acc[r][v]);
}

// One row tile (R rows) across `cols` columns (a multiple of W): full V-vector
// tiles, then the remaining 1 .. V-1 vectors.
template <typename T, int VB, int R, int V>
NLA_INLINE void row_tile(int64_t cols, int64_t kd, const T* A, int64_t ars, int64_t aks, const T* B, int64_t bks, T* C,
                         int64_t crs, bool accumulate) {
  constexpr int W = Vec<T, VB>::W;
  int64_t c0 = 0;
  for (; c0 + V * W <= cols; c0 += V * W)
    micro_kernel<T, VB, R, V>(kd, A, ars, aks, B + c0, bks, C + c0, crs, accumulate);
  if constexpr (V > 1) {
    if (c0 < cols) row_tile<T, VB, R, V - 1>(cols - c0, kd, A, ars, aks, B + c0, bks, C + c0, crs, accumulate);
  }
}

// The remaining rows < R of a tiled product, with one R' = rows tile.
template <typename T, int VB, int R, int V>
NLA_INLINE void row_remainder(int64_t rows, int64_t cols, int64_t kd, const T* A, int64_t ars, int64_t aks, const T* B,
                              int64_t bks, T* C, int64_t crs, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R)
      row_tile<T, VB, R, V>(cols, kd, A, ars, aks, B, bks, C, crs, accumulate);
    else
      row_remainder<T, VB, R - 1, V>(rows, cols, kd, A, ars, aks, B, bks, C, crs, accumulate);
  }
}

// C (rows x cols, row stride crs) (+)= A (rows x kd; element (r, k) at
// A[r*ars + k*aks]) times B (kd x cols, row stride bks).  cols: a multiple of
// the vector width W (callers pad).
template <typename T, int VB, int R, int V>
NLA_INLINE void tiled_product(int64_t rows, int64_t cols, int64_t kd, const T* A, int64_t ars, int64_t aks, const T* B,
                              int64_t bks, T* C, int64_t crs, bool accumulate) {
  int64_t r0 = 0;
  for (; r0 + R <= rows; r0 += R)
    row_tile<T, VB, R, V>(cols, kd, A + r0 * ars, ars, aks, B, bks, C + r0 * crs, crs, accumulate);
  if (r0 < rows)
    row_remainder<T, VB, R - 1, V>(rows - r0, cols, kd, A + r0 * ars, ars, aks, B, bks, C + r0 * crs, crs, accumulate);
}

// Register tiles (rows R x vectors V) per product shape, measured on Zen 4
// (single core, blocks in L1/L2):
//   Keys: S^T = K Q^T and dP^T = V dO^T: rows = keys, columns = queries, kd = d.
//   Feat: O^T += V^T P^T and dQ^T += K^T dS^T: rows = features, columns =
//         queries, kd = keys.
//   Grad: dV += P^T dO and dK += dS^T Q: rows = keys, columns = features,
//         kd = queries.
// 32 zmm registers: 16 accumulators (4 x 4, 8 x 2), 105-112 GFLOP/s per core
// in float, about 95 % of the FMA peak (MKL sgemm on the same blocks:
// 60-86).  16 ymm registers: 12 accumulators plus operands.  16 xmm
// registers without FMA (baseline x86-64): 8 accumulators, leaving room for
// the products.
template <typename T, int VB>
struct Tiles {
  static constexpr bool kZmm = VB >= 64, kYmm = VB == 32;
  static constexpr int kKeysR = kZmm ? 4 : kYmm ? 6 : 4, kKeysV = kZmm ? 4 : 2;
  static constexpr int kFeatR = 4, kFeatV = kZmm ? 4 : kYmm ? 3 : 2;
  static constexpr int kGradR = kZmm ? 8 : kYmm ? 6 : 4, kGradV = 2;
};

// -------------------------------------------------------------------- forward

template <typename T>
struct FwdArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  T* lse;
  int64_t b, n, m, d, dv;
  T scale;
  int64_t nqb;  // query blocks per batch element
};

// A buffer of T aligned to 64 bytes.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t size, bool zero = false)
      : p_(static_cast<T*>(::operator new[](std::max<int64_t>(size, 1) * sizeof(T), std::align_val_t(64)))) {
    if (zero) std::fill(p_, p_ + size, T(0));
  }
  ~Buffer() { ::operator delete[](p_, std::align_val_t(64)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// Forward tasks [begin, end): task = (batch, query block).
template <typename T, int VB>
NLA_INLINE void forward_range_impl(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  using Tl = Tiles<T, VB>;
  constexpr int W = Vec<T, VB>::W;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t ld = kFwdBq;  // row stride of the query-major blocks
  const int64_t n = a.n, m = a.m, d = a.d, dv = a.dv;
  Buffer<T> qt_buf(d * ld), s_buf(kFwdBk * ld), ot_buf(dv * ld), stats(5 * ld);
  T* NLA_RESTRICT QT = qt_buf.get();  // (d, ld): scale * Q^T
  T* NLA_RESTRICT ST = s_buf.get();   // (kFwdBk, ld): S^T, then P^T
  T* NLA_RESTRICT OT = ot_buf.get();  // (dv, ld): unnormalised O^T
  T* NLA_RESTRICT mrow = stats.get();  // running max
  T* NLA_RESTRICT lrow = mrow + ld;    // running sum
  T* NLA_RESTRICT mx = lrow + ld;      // block max, then exp offset
  T* NLA_RESTRICT alpha = mx + ld;     // rescale factor
  T* NLA_RESTRICT lsum = alpha + ld;   // block sum
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bi = task / a.nqb, i0 = (task % a.nqb) * kFwdBq;
    const int64_t bq = std::min(kFwdBq, n - i0), bqp = round_up(bq, W);
    const T* Q = a.q + (bi * n + i0) * d;
    const T* Kb = a.k + bi * m * d;
    const T* Vb = a.v + bi * m * dv;
    for (int64_t c = 0; c < d; ++c) {
      for (int64_t i = 0; i < bq; ++i) QT[c * ld + i] = a.scale * Q[i * d + c];
      for (int64_t i = bq; i < bqp; ++i) QT[c * ld + i] = T(0);
    }
    for (int64_t i = 0; i < bqp; ++i) {
      mrow[i] = kNegInf;
      lrow[i] = T(0);
    }
    for (int64_t c = 0; c < dv; ++c)
      for (int64_t i = 0; i < bqp; ++i) OT[c * ld + i] = T(0);

    for (int64_t j0 = 0; j0 < m; j0 += kFwdBk) {
      const int64_t bk = std::min(kFwdBk, m - j0);
      // S^T = K_blk (scale Q^T)
      tiled_product<T, VB, Tl::kKeysR, Tl::kKeysV>(bk, bqp, d, Kb + j0 * d, d, 1, QT, ld, ST, ld, false);
      // Block max per query.
      for (int64_t i = 0; i < bqp; ++i) mx[i] = kNegInf;
      for (int64_t j = 0; j < bk; ++j) {
        const T* s = ST + j * ld;
        for (int64_t i = 0; i < bqp; ++i) mx[i] = s[i] > mx[i] ? s[i] : mx[i];
      }
      // New running max, rescale factor, and the offset of the exp (0 where
      // every logit so far is -inf: then exp(-inf - 0) = 0, not NaN).
      for (int64_t i = 0; i < bqp; ++i) {
        const T m_old = mrow[i];
        const T m_new = mx[i] > m_old ? mx[i] : m_old;
        const bool none = m_new == kNegInf;
        alpha[i] = none ? T(1) : exp_(m_old - m_new);  // exp(-inf) = 0 on the first finite block
        mx[i] = none ? T(0) : m_new;
        mrow[i] = m_new;
        lsum[i] = T(0);
      }
      // P^T = exp(S^T - m_new), and its column sums.
      for (int64_t j = 0; j < bk; ++j) {
        T* s = ST + j * ld;
        for (int64_t i = 0; i < bqp; ++i) {
          const T p = exp_(s[i] - mx[i]);
          s[i] = p;
          lsum[i] += p;
        }
      }
      for (int64_t i = 0; i < bqp; ++i) lrow[i] = lrow[i] * alpha[i] + lsum[i];
      for (int64_t c = 0; c < dv; ++c) {
        T* o = OT + c * ld;
        for (int64_t i = 0; i < bqp; ++i) o[i] *= alpha[i];
      }
      // O^T += V_blk^T P^T
      tiled_product<T, VB, Tl::kFeatR, Tl::kFeatV>(dv, bqp, bk, Vb + j0 * dv, 1, dv, ST, ld, OT, ld, true);
    }

    T* O = a.out + (bi * n + i0) * dv;
    T* L = a.lse + bi * n + i0;
    for (int64_t i = 0; i < bq; ++i) {
      const T l = lrow[i];
      if (l == T(0)) {  // every logit -inf
        for (int64_t c = 0; c < dv; ++c) O[i * dv + c] = T(0);
        L[i] = kNegInf;
      } else {  // (NaN logits give l = NaN and propagate)
        const T inv = T(1) / l;
        for (int64_t c = 0; c < dv; ++c) O[i * dv + c] = OT[c * ld + i] * inv;
        L[i] = mrow[i] + std::log(l);
      }
    }
  }
}

// ------------------------------------------------------------------- backward

template <typename T>
struct BwdArgs {
  const T* k;      // (b, m, d)
  const T* v;      // (b, m, dv)
  const T* qt;     // (b, d, np): scale * q^T, zero padded
  const T* dot;    // (b, dv, np): grad_out^T
  const T* qp;     // (b, np, dp): q, rows padded to dp
  const T* dop;    // (b, np, dvp): grad_out, rows padded to dvp
  const T* lse;    // (b, np): lse, +inf where lse = -inf and in the padding
  const T* D;      // (b, np): rowsum(grad_out * out)
  T* dqt;          // (b, d, np): sum of dS K, transposed, for owned batches
  T* gk;           // (b, m, d)
  T* gv;           // (b, m, dv)
  int64_t b, n, m, d, dv, np, dp, dvp;
  T scale;
  int64_t nkb;  // key blocks per batch element
  // dQ^T accumulator for batch element bi when the range does not own it.
  std::function<T*(int64_t bi, int64_t first_block)>* partial;
};

// Backward tasks [begin, end): task = (batch, key block).
template <typename T, int VB>
NLA_INLINE void backward_range_impl(const BwdArgs<T>& a, int64_t begin, int64_t end) {
  using Tl = Tiles<T, VB>;
  constexpr int W = Vec<T, VB>::W;
  constexpr int64_t ld = kBwdBq;
  const int64_t n = a.n, m = a.m, d = a.d, dv = a.dv, np = a.np, dp = a.dp, dvp = a.dvp;
  Buffer<T> p_buf(kBwdBk * ld), g_buf(kBwdBk * ld), dk_buf(kBwdBk * dp), dv_buf(kBwdBk * dvp);
  T* NLA_RESTRICT PT = p_buf.get();  // (kBwdBk, ld): S^T, then P^T
  T* NLA_RESTRICT GT = g_buf.get();  // (kBwdBk, ld): dP^T, then dS^T
  T* NLA_RESTRICT dK = dk_buf.get();  // (kBwdBk, dp)
  T* NLA_RESTRICT dV = dv_buf.get();  // (kBwdBk, dvp)
  int64_t task = begin;
  while (task < end) {
    const int64_t bi = task / a.nkb, kb0 = task % a.nkb;
    const int64_t kb1 = std::min(a.nkb, kb0 + (end - task));
    T* dqt = (kb0 == 0 && kb1 == a.nkb) ? a.dqt + bi * d * np : (*a.partial)(bi, kb0);
    const T* QT = a.qt + bi * d * np;
    const T* dOT = a.dot + bi * dv * np;
    const T* Qp = a.qp + bi * np * dp;
    const T* dOp = a.dop + bi * np * dvp;
    const T* Lb = a.lse + bi * np;
    const T* Db = a.D + bi * np;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t j0 = kb * kBwdBk, bk = std::min(kBwdBk, m - j0);
      const T* Kb = a.k + (bi * m + j0) * d;
      const T* Vb = a.v + (bi * m + j0) * dv;
      std::fill(dK, dK + bk * dp, T(0));
      std::fill(dV, dV + bk * dvp, T(0));
      for (int64_t i0 = 0; i0 < n; i0 += kBwdBq) {
        const int64_t bq = std::min(kBwdBq, n - i0), bqp = round_up(bq, W);
        const T* L = Lb + i0;
        const T* Dq = Db + i0;
        // S^T = K_blk (scale Q^T);  P^T = exp(S^T - lse)  (0 in padded lanes: lse = +inf)
        tiled_product<T, VB, Tl::kKeysR, Tl::kKeysV>(bk, bqp, d, Kb, d, 1, QT + i0, np, PT, ld, false);
        for (int64_t j = 0; j < bk; ++j) {
          T* s = PT + j * ld;
          for (int64_t i = 0; i < bqp; ++i) s[i] = exp_(s[i] - L[i]);
        }
        // dV += P^T dO  (kd = bq: padded query lanes are skipped)
        tiled_product<T, VB, Tl::kGradR, Tl::kGradV>(bk, dvp, bq, PT, ld, 1, dOp + i0 * dvp, dvp, dV, dvp, true);
        // dP^T = V_blk dO^T;  dS^T = P^T (dP^T - D)
        tiled_product<T, VB, Tl::kKeysR, Tl::kKeysV>(bk, bqp, dv, Vb, dv, 1, dOT + i0, np, GT, ld, false);
        for (int64_t j = 0; j < bk; ++j) {
          const T* p = PT + j * ld;
          T* g = GT + j * ld;
          for (int64_t i = 0; i < bqp; ++i) g[i] = p[i] * (g[i] - Dq[i]);
        }
        // dK += dS^T Q  (scale applied when written out)
        tiled_product<T, VB, Tl::kGradR, Tl::kGradV>(bk, dp, bq, GT, ld, 1, Qp + i0 * dp, dp, dK, dp, true);
        // dQ^T += K_blk^T dS^T  (scale applied when written out)
        tiled_product<T, VB, Tl::kFeatR, Tl::kFeatV>(d, bqp, bk, Kb, 1, d, GT, ld, dqt + i0, np, true);
      }
      T* gk = a.gk + (bi * m + j0) * d;
      T* gv = a.gv + (bi * m + j0) * dv;
      for (int64_t j = 0; j < bk; ++j) {
        for (int64_t c = 0; c < d; ++c) gk[j * d + c] = a.scale * dK[j * dp + c];
        for (int64_t c = 0; c < dv; ++c) gv[j * dv + c] = dV[j * dvp + c];
      }
    }
    task += kb1 - kb0;
  }
}

// ------------------------------------------------------------ ISA versions

// One function per code path (cpu/isa.h) and dtype; the register block width
// VB follows the path's vectors (64, 32 or 16 bytes).
#define NLA_PATH(NAME, ARGS, PATH, ATTR, VB)                                                           \
  ATTR void NAME##_##PATH(const ARGS<float>& a, int64_t b, int64_t e) { NAME##_impl<float, VB>(a, b, e); }   \
  ATTR void NAME##_##PATH(const ARGS<double>& a, int64_t b, int64_t e) { NAME##_impl<double, VB>(a, b, e); }
#define NLA_VERSIONS(NAME, ARGS)                                                    \
  NLA_PATH(NAME, ARGS, baseline, , 16)                                              \
  NLA_X86_PATHS(NAME, ARGS)                                                         \
  template <typename T>                                                             \
  void NAME(const ARGS<T>& a, int64_t b, int64_t e) {                               \
    NLA_X86_SWITCH(NAME)                                                            \
    NAME##_baseline(a, b, e);                                                       \
  }
#if MEGAN_FAST_X86_PATHS
#define NLA_X86_PATHS(NAME, ARGS)                                  \
  NLA_PATH(NAME, ARGS, avx2, MEGAN_FAST_TARGET_AVX2, 32)           \
  NLA_PATH(NAME, ARGS, avx512, MEGAN_FAST_TARGET_AVX512, 64)
#define NLA_X86_SWITCH(NAME)                                       \
  switch (cpu_isa()) {                                             \
    case Isa::kAvx512: return NAME##_avx512(a, b, e);              \
    case Isa::kAvx2: return NAME##_avx2(a, b, e);                  \
    default: break;                                                \
  }
#else
#define NLA_X86_PATHS(NAME, ARGS)
#define NLA_X86_SWITCH(NAME)
#endif

NLA_VERSIONS(forward_range, FwdArgs)
NLA_VERSIONS(backward_range, BwdArgs)
#undef NLA_VERSIONS
#undef NLA_X86_PATHS
#undef NLA_X86_SWITCH
#undef NLA_PATH

// -------------------------------------------------------------- drivers

template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, int64_t b, int64_t n, int64_t m, int64_t d,
                    int64_t dv, T scale) {
  const FwdArgs<T> args{q, k, v, out, lse, b, n, m, d, dv, scale, (n + kFwdBq - 1) / kFwdBq};
  at::parallel_for(0, b * args.nqb, 1, [&](int64_t begin, int64_t end) { forward_range(args, begin, end); });
}

template <typename T>
void backward_kernel(const T* gout, const T* q, const T* k, const T* v, const T* out, const T* lse, T* gq, T* gk,
                     T* gv, int64_t b, int64_t n, int64_t m, int64_t d, int64_t dv, T scale) {
  const int64_t np = round_up(n, kPad<T>), dp = round_up(d, kPad<T>), dvp = round_up(dv, kPad<T>);
  constexpr T kInf = std::numeric_limits<T>::infinity();
  // Transposed and padded copies of q and grad_out, lse and D: O(b n d).
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor qt_t = at::empty({b, d, np}, opts), dot_t = at::empty({b, dv, np}, opts);
  at::Tensor qp_t = at::empty({b, np, dp}, opts), dop_t = at::empty({b, np, dvp}, opts);
  at::Tensor lse_t = at::empty({b, np}, opts), D_t = at::empty({b, np}, opts);
  at::Tensor dqt_t = at::zeros({b, d, np}, opts);
  T *qt = qt_t.mutable_data_ptr<T>(), *dot = dot_t.mutable_data_ptr<T>(), *qp = qp_t.mutable_data_ptr<T>(),
    *dop = dop_t.mutable_data_ptr<T>(), *lsep = lse_t.mutable_data_ptr<T>(), *Dp = D_t.mutable_data_ptr<T>(),
    *dqt = dqt_t.mutable_data_ptr<T>();
  constexpr int64_t kRows = 256;  // rows per packing task
  const int64_t nrb = (np + kRows - 1) / kRows;
  at::parallel_for(0, b * nrb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / nrb, r0 = (t % nrb) * kRows, r1 = std::min(np, r0 + kRows);
      for (int64_t i = r0; i < r1; ++i) {
        T* qpi = qp + (bi * np + i) * dp;
        T* dopi = dop + (bi * np + i) * dvp;
        std::fill(qpi, qpi + dp, T(0));
        std::fill(dopi, dopi + dvp, T(0));
        if (i < n) {
          const T* qi = q + (bi * n + i) * d;
          const T* gi = gout + (bi * n + i) * dv;
          const T* oi = out + (bi * n + i) * dv;
          std::copy(qi, qi + d, qpi);
          std::copy(gi, gi + dv, dopi);
          T Di = 0;
          for (int64_t c = 0; c < dv; ++c) Di += gi[c] * oi[c];
          Dp[bi * np + i] = Di;
          const T L = lse[bi * n + i];
          lsep[bi * np + i] = L == -kInf ? kInf : L;  // row without finite logits: P = exp(S - inf) = 0
        } else {                                       // padding: P = 0
          Dp[bi * np + i] = T(0);
          lsep[bi * np + i] = kInf;
        }
      }
      for (int64_t c = 0; c < d; ++c) {
        T* row = qt + (bi * d + c) * np;
        for (int64_t i = r0; i < r1; ++i) row[i] = i < n ? scale * q[(bi * n + i) * d + c] : T(0);
      }
      for (int64_t c = 0; c < dv; ++c) {
        T* row = dot + (bi * dv + c) * np;
        for (int64_t i = r0; i < r1; ++i) row[i] = i < n ? gout[(bi * n + i) * dv + c] : T(0);
      }
    }
  });

  struct Partial {
    int64_t batch, first_block;
    std::unique_ptr<Buffer<T>> data;
  };
  std::vector<Partial> partials;
  std::mutex partials_mutex;
  std::function<T*(int64_t, int64_t)> partial = [&](int64_t bi, int64_t first_block) {
    auto buf = std::make_unique<Buffer<T>>(d * np, /*zero=*/true);
    T* p = buf->get();
    std::lock_guard<std::mutex> lock(partials_mutex);
    partials.push_back(Partial{bi, first_block, std::move(buf)});
    return p;
  };

  const BwdArgs<T> args{k,  v,  qt, dot, qp,  dop, lsep, Dp,    dqt,
                        gk, gv, b,  n,   m,   d,   dv,   np,    dp,
                        dvp, scale, (m + kBwdBk - 1) / kBwdBk, &partial};
  at::parallel_for(0, b * args.nkb, 1, [&](int64_t begin, int64_t end) { backward_range(args, begin, end); });

  // Fixed summation order of the partials, whatever order the threads ran in.
  std::sort(partials.begin(), partials.end(), [](const Partial& x, const Partial& y) {
    return x.batch != y.batch ? x.batch < y.batch : x.first_block < y.first_block;
  });
  // dq = scale * (dQ^T + partials)^T, rows in parallel.
  at::parallel_for(0, b * nrb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / nrb, r0 = (t % nrb) * kRows, r1 = std::min(n, r0 + kRows);
      T* acc = dqt + bi * d * np;
      for (const Partial& p : partials) {
        if (p.batch != bi) continue;
        const T* src = p.data->get();
        for (int64_t c = 0; c < d; ++c)
          for (int64_t i = r0; i < r1; ++i) acc[c * np + i] += src[c * np + i];
      }
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t c = 0; c < d; ++c) gq[(bi * n + i) * d + c] = scale * acc[c * np + i];
    }
  });
}

// ------------------------------------------------------------------ op entries

void check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3, fn, ": q must be 3-D (b, n, d), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, fn, ": k must be 3-D (b, m, d), got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 3, fn, ": v must be 3-D (b, m, dv), got shape ", v.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, fn,
              ": q must be float32 or float64 on CPU, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), fn, ": k has dtype ", k.scalar_type(), " but q has ",
              q.scalar_type(), "; expected the same dtype");
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), fn, ": v has dtype ", v.scalar_type(), " but q has ",
              q.scalar_type(), "; expected the same dtype");
  TORCH_CHECK(q.device().is_cpu(), fn, ": q must be a CPU tensor, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), fn, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(v.device() == q.device(), fn, ": v is on ", v.device(), " but q is on ", q.device());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), fn, ": k must have shape (", q.size(0), ", m, ",
              q.size(2), ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == k.size(1), fn, ": v must have shape (", q.size(0), ", ",
              k.size(1), ", dv) to match k ", k.sizes(), ", got ", v.sizes());
}

std::tuple<at::Tensor, at::Tensor> nonlocal_attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                          const at::Tensor& v_, double scale) {
  constexpr const char* fn = "nonlocal_attention";
  check_qkv(fn, q_, k_, v_);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t b = q.size(0), n = q.size(1), d = q.size(2), m = k.size(1), dv = v.size(2);
  at::Tensor out = at::empty({b, n, dv}, q.options());
  at::Tensor lse = at::empty({b, n}, q.options());  // float32 / float64 like q
  if (b == 0 || n == 0) return {out, lse};
  if (m == 0) {  // empty softmax: output 0, log-sum-exp -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nonlocal_attention_cpu", [&] {
    forward_kernel<scalar_t>(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<scalar_t>(), b, n, m, d, dv, static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nonlocal_attention_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale) {
  constexpr const char* fn = "nonlocal_attention_backward";
  check_qkv(fn, q_, k_, v_);
  const int64_t b = q_.size(0), n = q_.size(1), d = q_.size(2), m = k_.size(1), dv = v_.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out_},
                                std::pair<const char*, const at::Tensor&>{"out", out_}}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == b && t.size(1) == n && t.size(2) == dv, fn, ": ", name,
                " must have shape (", b, ", ", n, ", ", dv, "), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q_.scalar_type(), fn, ": ", name, " has dtype ", t.scalar_type(),
                " but q has ", q_.scalar_type(), "; expected the same dtype");
    TORCH_CHECK(t.device() == q_.device(), fn, ": ", name, " is on ", t.device(), " but q is on ", q_.device());
  }
  TORCH_CHECK(lse_.dim() == 2 && lse_.size(0) == b && lse_.size(1) == n, fn, ": lse must have shape (", b, ", ", n,
              "), got ", lse_.sizes());
  TORCH_CHECK(lse_.scalar_type() == q_.scalar_type(), fn, ": lse has dtype ", lse_.scalar_type(), "; expected ",
              q_.scalar_type(), " for ", q_.scalar_type(), " q");
  TORCH_CHECK(lse_.device() == q_.device(), fn, ": lse is on ", lse_.device(), " but q is on ", q_.device());

  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const at::Tensor gout = grad_out_.contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  if (b == 0 || n == 0 || m == 0)
    return {at::zeros({b, n, d}, q.options()), at::zeros({b, m, d}, q.options()), at::zeros({b, m, dv}, q.options())};
  at::Tensor gq = at::empty({b, n, d}, q.options());
  at::Tensor gk = at::empty({b, m, d}, q.options());
  at::Tensor gv = at::empty({b, m, dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nonlocal_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(gout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              out.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
                              gq.mutable_data_ptr<scalar_t>(), gk.mutable_data_ptr<scalar_t>(),
                              gv.mutable_data_ptr<scalar_t>(), b, n, m, d, dv, static_cast<scalar_t>(scale));
  });
  return {gq, gk, gv};
}

}  // namespace
}  // namespace megan_fast

TORCH_LIBRARY_IMPL(megan_fast, CPU, m) {
  m.impl("nonlocal_attention", &megan_fast::nonlocal_attention_cpu);
  m.impl("nonlocal_attention_backward", &megan_fast::nonlocal_attention_backward_cpu);
}
