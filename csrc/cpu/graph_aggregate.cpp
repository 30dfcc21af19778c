// LMGA graph aggregation (MEGAN), fused CPU kernels: forward and backward.
//
// nodes E (b, p, c, h, w), w1 (hd, c), b1 (hd,), w2 (hd,).  Independently at
// every pixel, for every ordered pair p != q:
//
//   d       = |E_p - E_q|                              (c-vector)
//   z       = w1 @ d + b1                              (hd-vector)
//   s[p,q]  = w2 . leaky_relu(z, negative_slope)
//   A[p,:]  = softmax over q != p of s[p,q]            (no self loops: A[p,p] = 0)
//   out[p]  = sum_{q != p} A[p,q] E_q
//
// d is symmetric in (p, q), so s[p,q] = s[q,p]: the MLP runs once per
// unordered pair, p(p-1)/2 times per pixel instead of p(p-1).
//
// Backward (nothing is saved by the forward: s and A are recomputed here).
// With dO_p = grad_out[p] (a c-vector per pixel):
//
//   out[p] = sum_q A[p,q] E_q  =>  dE_q += A[p,q] dO_p,   dA[p,q] = dO_p . E_q
//   softmax over q             =>  ds[p,q] = A[p,q] (dA[p,q] - sum_r A[p,r] dA[p,r])
//   s[p,q] = s[q,p] come from the same MLP evaluation, so the unordered pair
//   {p,q} receives g = ds[p,q] + ds[q,p], and with a = leaky_relu(z):
//     dw2 += g a
//     dz   = g w2 * leaky_relu'(z)    leaky_relu'(z) = 1 if z > 0 else negative_slope
//                                      (torch's gradient at exactly z = 0 is
//                                      negative_slope: "z > 0", matched here)
//     dw1 += dz d^T,   db1 += dz,   dd = w1^T dz
//     d = |E_p - E_q|  =>  dE_p += dd * sign(E_p - E_q),  dE_q -= dd * sign(E_p - E_q)
//                          with sign(0) = 0 (torch.abs's derivative at 0 is 0).
//
// Layout and vectorisation.  nodes is (b, p, c, h*w): a pixel's channels are
// h*w apart, while neighbouring pixels are adjacent.  So the kernels work on a
// block of BP contiguous pixels (one native vector: 16 floats or 8 doubles
// with AVX-512, see "Code paths") with the pixel as the innermost, vectorised
// index: every quantity above is a BP-lane vector and the per-pixel
// matrix-vector products (w1 @ d is hd x c) become broadcast-weight x
// pixel-vector FMAs with register-tiled accumulators.  A block's nodes (p x c x BP) are copied to a small
// zero-padded local buffer (a few blocks at a time: see "Tile I/O"), padding
// c and hd up to tile multiples with zero weights, and the last, partial
// block's pixels with zeros, which contribute exactly zero to every gradient
// since their grad_out is zero.  Neither the (b, p, p, c, h, w) differences
// nor the (b, p, p, hd, h, w) hidden layer of the plain formula is ever
// stored: only one block's worth, in thread-local buffers.
//
// Weight gradients are sums over all pixels: each parallel chunk accumulates
// them as BP-lane vectors in the scalar type (no horizontal reductions in the
// hot loop), folds them into float64 every kFlushBlocks blocks and at its end,
// and the chunks' float64 sums are added in chunk order (deterministic for a
// given thread count).
//
// The hot loops are GCC vector-extension code, compiled for AVX-512, for
// AVX2 + FMA and for the baseline ISA, each with its own vector width, and
// picked at run time (see "Code paths"), so the library still runs on CPUs
// without AVX while using 512-bit FMAs where available (the build has no
// -march).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// x86-64 with GCC: explicit per-ISA code paths, chosen at run time by
// cpu/isa.h (see "Code paths" below).  Elsewhere: the portable path only.
#include "cpu/isa.h"

#define GA_X86_PATHS MEGAN_FAST_X86_PATHS
#define GA_TARGET_AVX512 MEGAN_FAST_TARGET_AVX512
#define GA_TARGET_AVX2 MEGAN_FAST_TARGET_AVX2
#define GA_INLINE MEGAN_FAST_INLINE

namespace megan_fast {
namespace {

// hd is padded to a multiple of kHdTile (the z tile: kHdTile accumulators) and
// c to a multiple of kCTile (the dd = w1^T dz tile).  Both are multiples of 4,
// the largest dw1 tile (up to 4 x 4 accumulators).
constexpr int64_t kHdTile = 8;
constexpr int64_t kCTile = 8;
// Blocks between folds of the scalar-type weight-gradient vectors into float64.
constexpr int64_t kFlushBlocks = 32;

template <typename T, int N>
struct VecOf;
template <int N>
struct VecOf<float, N> {
  typedef float type __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t itype __attribute__((vector_size(N * sizeof(int32_t))));
};
template <int N>
struct VecOf<double, N> {
  typedef double type __attribute__((vector_size(N * sizeof(double))));
  typedef int64_t itype __attribute__((vector_size(N * sizeof(int64_t))));
};

// Loads and stores through memcpy (unaligned, no strict-aliasing issue; they
// compile to single vector moves).  Vectors go by reference, never by value,
// so that no function signature depends on the vector ABI of a code path.
template <typename V, typename T>
GA_INLINE void vld(V& v, const T* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename T>
GA_INLINE void vst(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// exp of a vector of x <= 0 (softmax arguments after subtracting the row
// maximum).  Vectorised because the softmax takes p(p-1) exponentials per
// pixel, which as scalar libm calls would cost about as much as the whole MLP.
// exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (Cody-Waite split,
// |r| <= ln2/2), exp(r) by its Taylor polynomial: degree 7 for float (error
// < 1e-8 relative) and 12 for double (< 2e-16).  x is clamped below so 2^k
// stays a normal number; the clamped values (exp < 1e-37 / 1e-307) are
// negligible against the row maximum's term, which is 1.  NaN propagates.
template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float lo = -87.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr int degree = 7;
  static constexpr int mant_bits = 23;
  static constexpr int bias = 127;
};
template <>
struct ExpConst<double> {
  static constexpr double lo = -708.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int degree = 12;
  static constexpr int mant_bits = 52;
  static constexpr int bias = 1023;
};

template <typename T, int BP>
GA_INLINE void vexp_nonpositive(typename VecOf<T, BP>::type& x) {
  using V = typename VecOf<T, BP>::type;
  using IV = typename VecOf<T, BP>::itype;
  using K = ExpConst<T>;
  const V zero = {};
  const V lo = zero + K::lo;
  x = x < lo ? lo : x;
  // t = x log2e + 1.5 * 2^m: its low mantissa bits hold k = round(x log2e)
  // (round to nearest; no float -> int conversion instruction needed).
  const V t = x * K::log2e + K::magic;
  const V k = t - K::magic;
  const V r = (x - k * K::ln2_hi) - k * K::ln2_lo;
  // Taylor polynomial of exp(r), Horner form: coefficients 1/n!.
  T coef[K::degree + 1];
  coef[0] = T(1);
  for (int i = 1; i <= K::degree; ++i) coef[i] = coef[i - 1] / T(i);
  V poly = zero + coef[K::degree];
#pragma GCC unroll 16
  for (int i = K::degree - 1; i >= 0; --i) poly = poly * r + coef[i];
  // 2^k from its bit pattern: (k + bias) << mantissa bits.
  const IV ki = (IV)t - (IV)(zero + K::magic);
  const IV bits = (ki + K::bias) << K::mant_bits;
  x = poly * (V)bits;
}

// The MLP weights, zero-padded to (Hp, Cp) and laid out for the kernels.
template <typename T>
struct Mlp {
  int64_t C, Cp, Hp;
  const T* w1;       // (Hp, Cp) row-major: the dd = w1^T dz loop reads a row's kCTile columns
  const T* w1_tile;  // (Hp / kHdTile, Cp, kHdTile): the z loop reads a tile's kHdTile rows of column c
  const T* b1;       // (Hp,)
  const T* w2;       // (Hp,)
  T slope;
};

// Owns the padded weight tensors behind an Mlp.
struct MlpStorage {
  at::Tensor w1, w1_tile, b1, w2;
  int64_t C, Cp, hd, Hp;
  MlpStorage(const at::Tensor& w1_, const at::Tensor& b1_, const at::Tensor& w2_) {
    hd = w1_.size(0);
    C = w1_.size(1);
    Hp = round_up(hd, kHdTile);
    Cp = round_up(C, kCTile);
    w1 = at::zeros({Hp, Cp}, w1_.options());
    w1.narrow(0, 0, hd).narrow(1, 0, C).copy_(w1_);
    w1_tile = w1.view({Hp / kHdTile, kHdTile, Cp}).transpose(1, 2).contiguous();
    b1 = at::zeros({Hp}, b1_.options());
    b1.narrow(0, 0, hd).copy_(b1_);
    w2 = at::zeros({Hp}, w2_.options());
    w2.narrow(0, 0, hd).copy_(w2_);
  }
  template <typename T>
  Mlp<T> view(double slope) const {
    return Mlp<T>{C, Cp, Hp, w1.data_ptr<T>(), w1_tile.data_ptr<T>(), b1.data_ptr<T>(), w2.data_ptr<T>(),
                  static_cast<T>(slope)};
  }
};

// Tile I/O.  A block needs p * c rows (one per node and channel) lying h*w
// elements apart in memory, one cache line each: p * c concurrent streams,
// too many for the hardware prefetchers, and for h*w a multiple of 1024
// floats all in the same L1 set.  So the kernels move data a tile of
// tile_blocks() consecutive blocks at a time: each row's tile segment
// (kTileBytes, contiguous) is copied in one go into per-block
// local buffers, and the outputs are gathered likewise and written out row
// segment by row segment.  (Measured ~10% faster than block-by-block loads
// with software prefetching of the next block; software prefetching of the
// next tile on top of this measured no gain.)
//
// A tile's local buffer holds its blocks one after the other, each laid out
// (rows, BP); the input buffers have Cp rows per node (channels past c stay
// zero: the Scratch is zero-initialised and they are never written).
// Bytes of a row's tile segment: 4 cache lines.
constexpr int64_t kTileBytes = 256;
template <typename T, int BP>
constexpr int64_t tile_blocks() {
  return kTileBytes / (BP * static_cast<int64_t>(sizeof(T)));
}

struct TilePos {
  int64_t bi;  // batch index
  int64_t x0;  // first pixel
  int64_t n;   // valid pixels (<= tile_blocks() * BP)
  int64_t nb;  // blocks with at least one valid pixel
};
template <typename T, int BP>
GA_INLINE TilePos tile_pos(int64_t tile, int64_t ntile, int64_t HW) {
  constexpr int64_t TP = tile_blocks<T, BP>() * BP;  // pixels per tile
  TilePos t;
  t.bi = tile / ntile;
  t.x0 = (tile % ntile) * TP;
  t.n = std::min<int64_t>(TP, HW - t.x0);
  t.nb = (t.n + BP - 1) / BP;
  return t;
}

// src: the (P, C, HW) planes of one batch item; dst: the tile's blocks, each
// (P, Cp, BP) (block stride P * Cp * BP).  Lanes past the tile's valid pixels
// are zero-filled.
template <typename T, int BP>
GA_INLINE void load_tile(T* dst, const T* src, int64_t P, int64_t C, int64_t Cp, int64_t HW, const TilePos& t) {
  const int64_t bstride = P * Cp * BP;
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      const T* row = src + (p * C + c) * HW + t.x0;
      T* o = dst + (p * Cp + c) * BP;
      for (int64_t i = 0; i < t.nb; ++i) {
        const int64_t n = std::min<int64_t>(BP, t.n - i * BP);
        if (n == BP) {
          std::memcpy(o + i * bstride, row + i * BP, BP * sizeof(T));
        } else {
          std::memcpy(o + i * bstride, row + i * BP, n * sizeof(T));
          std::memset(o + i * bstride + n, 0, (BP - n) * sizeof(T));
        }
      }
    }
  }
}

// The inverse for outputs: src holds the tile's blocks, each (nrow_pad, BP)
// (block stride bstride); row r of dst (row stride HW) gets row
// r_pad = (r / nrow) * nrow_pad + r % nrow of src: outputs with Cp rows per
// node are cropped to c.  Only valid pixels are written.
template <typename T, int BP>
GA_INLINE void store_tile(T* dst, const T* src, int64_t nnode, int64_t nrow, int64_t nrow_pad, int64_t bstride,
                          int64_t HW, const TilePos& t) {
  for (int64_t p = 0; p < nnode; ++p) {
    for (int64_t r = 0; r < nrow; ++r) {
      T* row = dst + (p * nrow + r) * HW + t.x0;
      const T* s = src + (p * nrow_pad + r) * BP;
      for (int64_t i = 0; i < t.nb; ++i) {
        const int64_t n = std::min<int64_t>(BP, t.n - i * BP);
        if (n == BP)
          std::memcpy(row + i * BP, s + i * bstride, BP * sizeof(T));  // one vector move
        else
          std::memcpy(row + i * BP, s + i * bstride, n * sizeof(T));
      }
    }
  }
}

// The MLP for one unordered pair on a block: d = |E_p - E_q| into d (Cp, BP);
// z = w1 d + b1, written to z_out (Hp, BP) when not null (the backward needs
// it); s = w2 . leaky_relu(z) into *s_out.  z is computed kHdTile hidden units
// at a time with kHdTile vector accumulators, each step one load of d[c] and
// kHdTile broadcast-weight FMAs.
template <typename T, int BP>
GA_INLINE void pair_mlp(const T* Ep, const T* Eq, T* d, T* z_out, T* s_out, const Mlp<T>& m) {
  using V = typename VecOf<T, BP>::type;
  constexpr int JT = static_cast<int>(kHdTile);
  const V zero = {};
  const int64_t Cp = m.Cp;
  for (int64_t c = 0; c < Cp; ++c) {
    V a, b;
    vld(a, Ep + c * BP);
    vld(b, Eq + c * BP);
    const V x = a - b;
    const V ax = x < zero ? -x : x;
    vst(d + c * BP, ax);
  }
  V s = zero;
  for (int64_t jb = 0; jb < m.Hp; jb += JT) {
    V acc[JT];
#pragma GCC unroll 16
    for (int jj = 0; jj < JT; ++jj) acc[jj] = zero + m.b1[jb + jj];
    const T* wt = m.w1_tile + jb * Cp;  // (Cp, JT) for this tile
    for (int64_t c = 0; c < Cp; ++c) {
      V dv;
      vld(dv, d + c * BP);
#pragma GCC unroll 16
      for (int jj = 0; jj < JT; ++jj) acc[jj] += wt[c * JT + jj] * dv;
    }
#pragma GCC unroll 16
    for (int jj = 0; jj < JT; ++jj) {
      if (z_out) vst(z_out + (jb + jj) * BP, acc[jj]);
      const V a = acc[jj] > zero ? acc[jj] : acc[jj] * m.slope;
      s += m.w2[jb + jj] * a;
    }
  }
  vst(s_out, s);
}

// S (P, P, BP) holds the symmetric scores; replaces each row p by the softmax
// over q != p and sets the diagonal to 0.
template <typename T, int BP>
GA_INLINE void softmax_rows(T* S, int64_t P) {
  using V = typename VecOf<T, BP>::type;
  const V zero = {};
  for (int64_t p = 0; p < P; ++p) {
    T* row = S + p * P * BP;
    V mx;
    vld(mx, row + (p == 0 ? 1 : 0) * BP);
    for (int64_t q = 0; q < P; ++q) {
      if (q == p) continue;
      V v;
      vld(v, row + q * BP);
      mx = v > mx ? v : mx;
    }
    V sum = zero;
    for (int64_t q = 0; q < P; ++q) {
      if (q == p) continue;
      V v;
      vld(v, row + q * BP);
      v = v - mx;
      vexp_nonpositive<T, BP>(v);
      sum += v;
      vst(row + q * BP, v);
    }
    // sum >= 1 (the maximum's term is exp(0)).
    const V inv = (zero + T(1)) / sum;
    for (int64_t q = 0; q < P; ++q) {
      V v;
      vld(v, row + q * BP);
      v = q == p ? zero : v * inv;
      vst(row + q * BP, v);
    }
  }
}

template <typename T>
struct FwdArgs {
  int64_t B, P, C, HW, ntile;
  const T* nodes;  // (B, P, C, HW)
  T* out;          // (B, P, C, HW)
  T* adj;          // (B, P, P, HW) or null
  Mlp<T> mlp;
};

template <typename T>
struct BwdArgs {
  int64_t B, P, C, HW, ntile;
  const T* nodes;     // (B, P, C, HW)
  const T* grad_out;  // (B, P, C, HW)
  T* grad_nodes;      // (B, P, C, HW)
  Mlp<T> mlp;
};

// 64-byte aligned scratch of n elements.
template <typename T>
struct Scratch {
  std::vector<T> buf;
  T* ptr;
  explicit Scratch(int64_t n) : buf(static_cast<size_t>(n) + 64 / sizeof(T), T(0)) {
    auto addr = reinterpret_cast<uintptr_t>(buf.data());
    ptr = reinterpret_cast<T*>((addr + 63) & ~uintptr_t(63));
  }
};

// The aggregation, forward and backward: out[i][c] = sum_{j != i} W[i,j] X_j[c]
// with W = A (forward: out = A E) or W = A^T (TRANSPOSED, backward: dE = A^T dO),
// kCTile channels at a time (independent accumulators: a single one would be
// FMA-latency bound).  A (P, P, BP), X and out (P, Cp, BP).
template <typename T, int BP, bool TRANSPOSED>
GA_INLINE void aggregate(const T* A, const T* X, T* out, int64_t P, int64_t Cp) {
  using V = typename VecOf<T, BP>::type;
  constexpr int CT = static_cast<int>(kCTile);
  const V zero = {};
  for (int64_t i = 0; i < P; ++i) {
    for (int64_t c0 = 0; c0 < Cp; c0 += CT) {
      V acc[CT];
#pragma GCC unroll 16
      for (int cc = 0; cc < CT; ++cc) acc[cc] = zero;
      for (int64_t j = 0; j < P; ++j) {
        if (j == i) continue;
        V aw;
        vld(aw, A + (TRANSPOSED ? j * P + i : i * P + j) * BP);
        const T* Xj = X + (j * Cp + c0) * BP;
#pragma GCC unroll 16
        for (int cc = 0; cc < CT; ++cc) {
          V x;
          vld(x, Xj + cc * BP);
          acc[cc] += aw * x;
        }
      }
#pragma GCC unroll 16
      for (int cc = 0; cc < CT; ++cc) vst(out + (i * Cp + c0 + cc) * BP, acc[cc]);
    }
  }
}

// Forward of one block: E (P, Cp, BP) -> O (P, Cp, BP) and A in S (P, P, BP);
// d (Cp, BP) is scratch.
template <typename T, int BP>
GA_INLINE void forward_block(const T* E, T* O, T* S, T* d, int64_t P, const Mlp<T>& m) {
  const int64_t Cp = m.Cp;
  // Scores: one MLP per unordered pair, mirrored.
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t q = p + 1; q < P; ++q) {
      T* spq = S + (p * P + q) * BP;
      pair_mlp<T, BP>(E + p * Cp * BP, E + q * Cp * BP, d, nullptr, spq, m);
      std::memcpy(S + (q * P + p) * BP, spq, BP * sizeof(T));
    }
  }
  softmax_rows<T, BP>(S, P);  // S = A
  aggregate<T, BP, false>(S, E, O, P, Cp);  // out[p] = sum_{q != p} A[p,q] E_q
}

// Forward over the tiles [tile_begin, tile_end) (tile = (batch, pixel tile)).
template <typename T, int BP>
GA_INLINE void forward_range_impl(const FwdArgs<T>& a, int64_t tile_begin, int64_t tile_end) {
  const int64_t P = a.P, C = a.C, HW = a.HW, Cp = a.mlp.Cp;
  // Local buffers: per tile E and out (TB blocks of (P, Cp, BP)), A (TB
  // blocks of (P, P, BP), which is also the score buffer); d (Cp, BP).
  const int64_t nE = P * Cp * BP, nS = P * P * BP;
  constexpr int64_t TB = tile_blocks<T, BP>();
  Scratch<T> scratch(TB * (2 * nE + nS) + Cp * BP);
  T* Et = scratch.ptr;
  T* Ot = Et + TB * nE;
  T* St = Ot + TB * nE;
  T* d = St + TB * nS;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const TilePos t = tile_pos<T, BP>(tile, a.ntile, HW);
    const int64_t base = t.bi * P * C * HW;
    load_tile<T, BP>(Et, a.nodes + base, P, C, Cp, HW, t);
    for (int64_t blk = 0; blk < t.nb; ++blk)
      forward_block<T, BP>(Et + blk * nE, Ot + blk * nE, St + blk * nS, d, P, a.mlp);
    store_tile<T, BP>(a.out + base, Ot, P, C, Cp, nE, HW, t);
    if (a.adj) store_tile<T, BP>(a.adj + t.bi * P * P * HW, St, P, P, P, nS, HW, t);
  }
}

// Folds the lane vectors acc (n, BP) into out (n,) in float64 and zeroes them.
template <typename T, int BP>
GA_INLINE void flush_lanes(T* acc, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int l = 0; l < BP; ++l) s += static_cast<double>(acc[i * BP + l]);
    out[i] += s;
  }
  std::memset(acc, 0, n * BP * sizeof(T));
}

// Per-thread backward scratch (all in units of BP-lane vectors):
//   D    (npair, Cp)  d = |E_p - E_q| per pair (for dw1)
//   Z    (npair, Hp)  z per pair, then overwritten by dz
//   S, dS (P, P)      scores -> A, and ds
//   gw1v (Hp, Cp), gb1v (Hp), gw2v (Hp): weight-gradient lane accumulators
//                     (contiguous, in this order)
template <typename T>
struct BwdWork {
  T *D, *Z, *S, *dS, *gw1v, *gb1v, *gw2v;
};

// Backward of one block: E, G = grad_out (P, Cp, BP) -> dE (P, Cp, BP), and
// the block's weight gradients added to the lane accumulators.
template <typename T, int BP>
GA_INLINE void backward_block(const T* E, const T* G, T* dE, int64_t P, const Mlp<T>& m, const BwdWork<T>& w) {
  using V = typename VecOf<T, BP>::type;
  constexpr int CT = static_cast<int>(kCTile);
  // dw1 register tile GJ x GC: 4 x 4 with 32 vector registers (AVX-512),
  // 2 x 4 with 16.
  constexpr int GJ = BP * sizeof(T) == 64 ? 4 : 2;
  constexpr int GC = 4;
  const int64_t Cp = m.Cp, Hp = m.Hp;
  const int64_t npair = P * (P - 1) / 2;
  const V zero = {};
  const V one = zero + T(1);
  const V slope = zero + m.slope;
  T* const D = w.D;
  T* const Z = w.Z;
  T* const S = w.S;
  T* const dS = w.dS;
  T* const gw1v = w.gw1v;
  T* const gb1v = w.gb1v;
  T* const gw2v = w.gw2v;

  // Pass 1: recompute the scores, keeping d and z of every pair.
  {
    int64_t k = 0;
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t q = p + 1; q < P; ++q, ++k) {
        T* spq = S + (p * P + q) * BP;
        pair_mlp<T, BP>(E + p * Cp * BP, E + q * Cp * BP, D + k * Cp * BP, Z + k * Hp * BP, spq, m);
        std::memcpy(S + (q * P + p) * BP, spq, BP * sizeof(T));
      }
    }
  }
  softmax_rows<T, BP>(S, P);  // S = A

  // dA[p,q] = dO_p . E_q;  ds[p,q] = A[p,q] (dA[p,q] - sum_r A[p,r] dA[p,r]).
  for (int64_t p = 0; p < P; ++p) {
    V rowdot = zero;
    for (int64_t q = 0; q < P; ++q) {
      if (q == p) continue;
      // kCTile partial sums over the channels (latency), then a fixed tree.
      V part[CT];
#pragma GCC unroll 16
      for (int cc = 0; cc < CT; ++cc) part[cc] = zero;
      for (int64_t c0 = 0; c0 < Cp; c0 += CT) {
#pragma GCC unroll 16
        for (int cc = 0; cc < CT; ++cc) {
          V g, e;
          vld(g, G + (p * Cp + c0 + cc) * BP);
          vld(e, E + (q * Cp + c0 + cc) * BP);
          part[cc] += g * e;
        }
      }
#pragma GCC unroll 16
      for (int half = CT / 2; half >= 1; half /= 2)
#pragma GCC unroll 16
        for (int cc = 0; cc < half; ++cc) part[cc] += part[cc + half];
      const V acc = part[0];
      V aw;
      vld(aw, S + (p * P + q) * BP);
      rowdot += aw * acc;
      vst(dS + (p * P + q) * BP, acc);
    }
    for (int64_t q = 0; q < P; ++q) {
      if (q == p) continue;
      V aw, da;
      vld(aw, S + (p * P + q) * BP);
      vld(da, dS + (p * P + q) * BP);
      const V ds = aw * (da - rowdot);
      vst(dS + (p * P + q) * BP, ds);
    }
  }
  // dE_q = sum_{p != q} A[p,q] dO_p   (the aggregation's direct term).
  aggregate<T, BP, true>(S, G, dE, P, Cp);

  // Pass 2: back through the MLP of every unordered pair.
  {
    int64_t k = 0;
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t q = p + 1; q < P; ++q, ++k) {
        V g, gqp;
        vld(g, dS + (p * P + q) * BP);
        vld(gqp, dS + (q * P + p) * BP);
        g += gqp;  // both orientations of the pair share the MLP evaluation
        T* Zk = Z + k * Hp * BP;
        for (int64_t j = 0; j < Hp; ++j) {
          V z, gw2, gb1;
          vld(z, Zk + j * BP);
          vld(gw2, gw2v + j * BP);
          vld(gb1, gb1v + j * BP);
          const V act = z > zero ? z : z * slope;
          gw2 += g * act;
          // leaky_relu'(z): 1 for z > 0, negative_slope otherwise (z = 0 included, as torch).
          const V dz = (g * m.w2[j]) * (z > zero ? one : slope);
          gb1 += dz;
          vst(gw2v + j * BP, gw2);
          vst(gb1v + j * BP, gb1);
          vst(Zk + j * BP, dz);  // Z now holds dz
        }
        // dd = w1^T dz, kCTile channels at a time; then through |.|:
        // dE_p += dd sign(E_p - E_q), dE_q -= dd sign(E_p - E_q), sign(0) = 0.
        const T* Ep = E + p * Cp * BP;
        const T* Eq = E + q * Cp * BP;
        T* dEp = dE + p * Cp * BP;
        T* dEq = dE + q * Cp * BP;
        for (int64_t c0 = 0; c0 < Cp; c0 += CT) {
          V acc[CT];
#pragma GCC unroll 16
          for (int cc = 0; cc < CT; ++cc) acc[cc] = zero;
          for (int64_t j = 0; j < Hp; ++j) {
            V dz;
            vld(dz, Zk + j * BP);
            const T* wr = m.w1 + j * Cp + c0;
#pragma GCC unroll 16
            for (int cc = 0; cc < CT; ++cc) acc[cc] += wr[cc] * dz;
          }
#pragma GCC unroll 16
          for (int cc = 0; cc < CT; ++cc) {
            const int64_t off = (c0 + cc) * BP;
            V ep, eq, dp, dq;
            vld(ep, Ep + off);
            vld(eq, Eq + off);
            vld(dp, dEp + off);
            vld(dq, dEq + off);
            const V x = ep - eq;
            const V sd = x > zero ? acc[cc] : (x < zero ? -acc[cc] : zero);
            dp += sd;
            dq -= sd;
            vst(dEp + off, dp);
            vst(dEq + off, dq);
          }
        }
      }
    }
  }

  // dw1[j][c] += sum over pairs k (and lanes, later) of dz_k[j] d_k[c]: a
  // (Hp x npair) (npair x Cp) product of lane vectors, in GJ x GC register
  // tiles accumulated straight into the lane accumulators gw1v.
  for (int64_t j0 = 0; j0 < Hp; j0 += GJ) {
    for (int64_t c0 = 0; c0 < Cp; c0 += GC) {
      V acc[GJ][GC];
#pragma GCC unroll 16
      for (int jj = 0; jj < GJ; ++jj)
#pragma GCC unroll 16
        for (int cc = 0; cc < GC; ++cc) vld(acc[jj][cc], gw1v + ((j0 + jj) * Cp + c0 + cc) * BP);
      for (int64_t k = 0; k < npair; ++k) {
        V zv[GJ], dv[GC];
#pragma GCC unroll 16
        for (int i = 0; i < GJ; ++i) vld(zv[i], Z + (k * Hp + j0 + i) * BP);
#pragma GCC unroll 16
        for (int i = 0; i < GC; ++i) vld(dv[i], D + (k * Cp + c0 + i) * BP);
#pragma GCC unroll 16
        for (int jj = 0; jj < GJ; ++jj)
#pragma GCC unroll 16
          for (int cc = 0; cc < GC; ++cc) acc[jj][cc] += zv[jj] * dv[cc];
      }
#pragma GCC unroll 16
      for (int jj = 0; jj < GJ; ++jj)
#pragma GCC unroll 16
        for (int cc = 0; cc < GC; ++cc) vst(gw1v + ((j0 + jj) * Cp + c0 + cc) * BP, acc[jj][cc]);
    }
  }
}

// Backward over the tiles [tile_begin, tile_end); adds the weight gradients
// of these pixels to wacc = [dw1 (Hp, Cp) | db1 (Hp) | dw2 (Hp)] (float64,
// padded shapes).
template <typename T, int BP>
GA_INLINE void backward_range_impl(const BwdArgs<T>& a, int64_t tile_begin, int64_t tile_end, double* wacc) {
  const Mlp<T>& m = a.mlp;
  const int64_t P = a.P, C = a.C, HW = a.HW, Cp = m.Cp, Hp = m.Hp;
  const int64_t npair = P * (P - 1) / 2;
  // Local buffers: per tile E, G (grad_out) and dE (grad_nodes), TB blocks of
  // (P, Cp, BP) each; then the BwdWork buffers.
  const int64_t nE = P * Cp * BP;
  constexpr int64_t TB = tile_blocks<T, BP>();
  Scratch<T> scratch(3 * TB * nE + npair * Cp * BP + npair * Hp * BP + 2 * P * P * BP + Hp * Cp * BP + 2 * Hp * BP);
  T* Et = scratch.ptr;
  T* Gt = Et + TB * nE;
  T* dEt = Gt + TB * nE;
  BwdWork<T> w;
  w.D = dEt + TB * nE;
  w.Z = w.D + npair * Cp * BP;
  w.S = w.Z + npair * Hp * BP;
  w.dS = w.S + P * P * BP;
  w.gw1v = w.dS + P * P * BP;
  w.gb1v = w.gw1v + Hp * Cp * BP;
  w.gw2v = w.gb1v + Hp * BP;  // Scratch zero-initialises.
  int64_t since_flush = 0;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const TilePos t = tile_pos<T, BP>(tile, a.ntile, HW);
    const int64_t base = t.bi * P * C * HW;
    load_tile<T, BP>(Et, a.nodes + base, P, C, Cp, HW, t);
    // Padded lanes and channels get grad_out = 0: they then contribute 0 to
    // every gradient (ds = 0 there, hence g = dz = 0).
    load_tile<T, BP>(Gt, a.grad_out + base, P, C, Cp, HW, t);
    for (int64_t blk = 0; blk < t.nb; ++blk) {
      backward_block<T, BP>(Et + blk * nE, Gt + blk * nE, dEt + blk * nE, P, m, w);
      if (++since_flush == kFlushBlocks) {
        flush_lanes<T, BP>(w.gw1v, wacc, Hp * Cp + 2 * Hp);  // gw1v, gb1v, gw2v are contiguous
        since_flush = 0;
      }
    }
    // grad_nodes of the tile (real channels and pixels only).
    store_tile<T, BP>(a.grad_nodes + base, dEt, P, C, Cp, nE, HW, t);
  }
  flush_lanes<T, BP>(w.gw1v, wacc, Hp * Cp + 2 * Hp);
}

// Code paths.  The block width BP is one native vector: 64 bytes with
// AVX-512 (16 floats, 8 doubles), 32 with AVX2 + FMA, 16 otherwise (SSE2,
// NEON).  Each path instantiates the kernels for its BP in a function compiled
// for its ISA (the force-inlined templates take on the caller's target), and
// the path is chosen once at run time from the CPU's features (cpu_isa(),
// cpu/isa.h).  (GCC's target_clones cannot do this: one function body for all
// targets means one vector width, and 64-byte vectors on a 32-byte ISA lower
// badly: measured ~7x slower than AVX-512 instead of ~2x.)  The environment
// variable MEGAN_FAST_CPU_ISA=avx2|baseline caps the choice (for testing).
template <typename T>
struct Kernels {
  void (*forward)(const FwdArgs<T>&, int64_t, int64_t);
  void (*backward)(const BwdArgs<T>&, int64_t, int64_t, double*);
};

#define GA_DEFINE_PATH(NAME, ATTR, BYTES)                                                    \
  ATTR void forward_##NAME##_f32(const FwdArgs<float>& a, int64_t b, int64_t e) {            \
    forward_range_impl<float, BYTES / 4>(a, b, e);                                           \
  }                                                                                          \
  ATTR void forward_##NAME##_f64(const FwdArgs<double>& a, int64_t b, int64_t e) {           \
    forward_range_impl<double, BYTES / 8>(a, b, e);                                          \
  }                                                                                          \
  ATTR void backward_##NAME##_f32(const BwdArgs<float>& a, int64_t b, int64_t e, double* w) {  \
    backward_range_impl<float, BYTES / 4>(a, b, e, w);                                       \
  }                                                                                          \
  ATTR void backward_##NAME##_f64(const BwdArgs<double>& a, int64_t b, int64_t e, double* w) { \
    backward_range_impl<double, BYTES / 8>(a, b, e, w);                                      \
  }

GA_DEFINE_PATH(baseline, , 16)
#if GA_X86_PATHS
GA_DEFINE_PATH(avx2, GA_TARGET_AVX2, 32)
GA_DEFINE_PATH(avx512, GA_TARGET_AVX512, 64)
#endif

template <typename T>
Kernels<T> kernels();
template <>
Kernels<float> kernels<float>() {
#if GA_X86_PATHS
  switch (cpu_isa()) {
    case Isa::kAvx512: return {forward_avx512_f32, backward_avx512_f32};
    case Isa::kAvx2: return {forward_avx2_f32, backward_avx2_f32};
    default: break;
  }
#endif
  return {forward_baseline_f32, backward_baseline_f32};
}
template <>
Kernels<double> kernels<double>() {
#if GA_X86_PATHS
  switch (cpu_isa()) {
    case Isa::kAvx512: return {forward_avx512_f64, backward_avx512_f64};
    case Isa::kAvx2: return {forward_avx2_f64, backward_avx2_f64};
    default: break;
  }
#endif
  return {forward_baseline_f64, backward_baseline_f64};
}

// Pixels per tile, the same for every path: tile_blocks<T, BP>() * BP.
template <typename T>
constexpr int64_t tile_pixels() {
  return kTileBytes / static_cast<int64_t>(sizeof(T));
}

void check_args(const char* fn, const at::Tensor& nodes, const at::Tensor& w1, const at::Tensor& b1,
                const at::Tensor& w2) {
  TORCH_CHECK(nodes.dim() == 5, fn, ": nodes must be 5-D (b, p, c, h, w), got shape ", nodes.sizes());
  TORCH_CHECK(nodes.size(1) >= 2, fn, ": nodes must have p >= 2 nodes (dim 1) to form a graph, got p = ",
              nodes.size(1));
  TORCH_CHECK(nodes.scalar_type() == at::kFloat || nodes.scalar_type() == at::kDouble, fn,
              ": nodes must be float32 or float64 on CPU, got ", nodes.scalar_type());
  const int64_t c = nodes.size(2);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == c && w1.size(0) >= 1, fn, ": w1 must have shape (hd, ", c,
              ") with hd >= 1 (c from nodes), got ", w1.sizes());
  const int64_t hd = w1.size(0);
  TORCH_CHECK(b1.dim() == 1 && b1.size(0) == hd, fn, ": b1 must have shape (", hd, ",) (hd from w1), got ",
              b1.sizes());
  TORCH_CHECK(w2.dim() == 1 && w2.size(0) == hd, fn, ": w2 must have shape (", hd, ",) (hd from w1), got ",
              w2.sizes());
  const std::pair<const char*, const at::Tensor*> others[] = {{"w1", &w1}, {"b1", &b1}, {"w2", &w2}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == nodes.device(), fn, ": ", name, " is on ", t->device(), " but nodes is on ",
                nodes.device(), "; expected the same device");
    TORCH_CHECK(t->scalar_type() == nodes.scalar_type(), fn, ": ", name, " has dtype ", t->scalar_type(),
                " but nodes has ", nodes.scalar_type(), "; expected the same dtype");
  }
  TORCH_CHECK(nodes.device().is_cpu(), fn, ": this is the CPU kernel, got nodes on ", nodes.device());
}

std::tuple<at::Tensor, at::Tensor> graph_aggregate_cpu(const at::Tensor& nodes_in, const at::Tensor& w1,
                                                       const at::Tensor& b1, const at::Tensor& w2,
                                                       double negative_slope, bool return_adjacency) {
  check_args("graph_aggregate", nodes_in, w1, b1, w2);
  const at::Tensor nodes = nodes_in.contiguous();
  const int64_t B = nodes.size(0), P = nodes.size(1), C = nodes.size(2), H = nodes.size(3), W = nodes.size(4);
  const int64_t HW = H * W;
  at::Tensor out = at::empty({B, P, C, H, W}, nodes.options());
  at::Tensor adj = return_adjacency ? at::empty({B, P, P, H, W}, nodes.options()) : at::empty({0}, nodes.options());
  if (B == 0 || HW == 0) return {out, adj};
  const MlpStorage mlp(w1.contiguous(), b1.contiguous(), w2.contiguous());

  AT_DISPATCH_FLOATING_TYPES(nodes.scalar_type(), "graph_aggregate_cpu", [&] {
    const Kernels<scalar_t> k = kernels<scalar_t>();
    constexpr int64_t TP = tile_pixels<scalar_t>();
    FwdArgs<scalar_t> args;
    args.B = B;
    args.P = P;
    args.C = C;
    args.HW = HW;
    args.ntile = (HW + TP - 1) / TP;
    args.nodes = nodes.data_ptr<scalar_t>();
    args.out = out.data_ptr<scalar_t>();
    args.adj = return_adjacency ? adj.data_ptr<scalar_t>() : nullptr;
    args.mlp = mlp.view<scalar_t>(negative_slope);
    // A tile is TP * p(p-1)/2 * hd * c FMAs for the MLP alone: parallelise over tiles.
    at::parallel_for(0, B * args.ntile, 1, [&](int64_t begin, int64_t end) { k.forward(args, begin, end); });
  });
  return {out, adj};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> graph_aggregate_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& nodes_in, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, double negative_slope) {
  check_args("graph_aggregate_backward", nodes_in, w1, b1, w2);
  TORCH_CHECK(grad_out_in.sizes() == nodes_in.sizes(), "graph_aggregate_backward: grad_out must have nodes' shape ",
              nodes_in.sizes(), ", got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == nodes_in.scalar_type() && grad_out_in.device() == nodes_in.device(),
              "graph_aggregate_backward: grad_out must have nodes' dtype and device (", nodes_in.scalar_type(), ", ",
              nodes_in.device(), "), got ", grad_out_in.scalar_type(), ", ", grad_out_in.device());
  const at::Tensor nodes = nodes_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const int64_t B = nodes.size(0), P = nodes.size(1), C = nodes.size(2), H = nodes.size(3), W = nodes.size(4);
  const int64_t HW = H * W, hd = w1.size(0);
  at::Tensor grad_nodes = at::empty({B, P, C, H, W}, nodes.options());
  if (B == 0 || HW == 0) {
    return {grad_nodes, at::zeros({hd, C}, w1.options()), at::zeros({hd}, b1.options()),
            at::zeros({hd}, w2.options())};
  }
  const MlpStorage mlp(w1.contiguous(), b1.contiguous(), w2.contiguous());
  const int64_t Hp = mlp.Hp, Cp = mlp.Cp;
  const int64_t wlen = Hp * Cp + 2 * Hp;  // [dw1 (Hp, Cp) | db1 | dw2], float64
  at::Tensor wsum = at::zeros({wlen}, nodes.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(nodes.scalar_type(), "graph_aggregate_backward_cpu", [&] {
    const Kernels<scalar_t> k = kernels<scalar_t>();
    constexpr int64_t TP = tile_pixels<scalar_t>();
    BwdArgs<scalar_t> args;
    args.B = B;
    args.P = P;
    args.C = C;
    args.HW = HW;
    args.ntile = (HW + TP - 1) / TP;
    args.nodes = nodes.data_ptr<scalar_t>();
    args.grad_out = grad_out.data_ptr<scalar_t>();
    args.grad_nodes = grad_nodes.data_ptr<scalar_t>();
    args.mlp = mlp.view<scalar_t>(negative_slope);
    // One chunk of tiles per thread, each with its own float64 weight-gradient
    // buffer, summed below in chunk order: no atomics, no dependence on
    // thread ids, deterministic for a given thread count.
    const int64_t total = B * args.ntile;
    const int64_t nchunk = std::max<int64_t>(1, std::min<int64_t>(total, at::get_num_threads()));
    std::vector<double> chunk_sums(static_cast<size_t>(nchunk * wlen), 0.0);
    at::parallel_for(0, nchunk, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        const int64_t b0 = total * ch / nchunk, b1_ = total * (ch + 1) / nchunk;
        k.backward(args, b0, b1_, chunk_sums.data() + ch * wlen);
      }
    });
    double* ws = wsum.data_ptr<double>();
    for (int64_t ch = 0; ch < nchunk; ++ch)
      for (int64_t i = 0; i < wlen; ++i) ws[i] += chunk_sums[ch * wlen + i];
  });
  const at::Tensor gw = wsum.to(nodes.scalar_type());
  at::Tensor grad_w1 = gw.narrow(0, 0, Hp * Cp).view({Hp, Cp}).narrow(0, 0, hd).narrow(1, 0, C).clone();
  at::Tensor grad_b1 = gw.narrow(0, Hp * Cp, hd).clone();  // clone: outputs must not alias one buffer
  at::Tensor grad_w2 = gw.narrow(0, Hp * Cp + Hp, hd).clone();
  return {grad_nodes, grad_w1, grad_b1, grad_w2};
}

}  // namespace
}  // namespace megan_fast

TORCH_LIBRARY_IMPL(megan_fast, CPU, m) {
  m.impl("graph_aggregate", &megan_fast::graph_aggregate_cpu);
  m.impl("graph_aggregate_backward", &megan_fast::graph_aggregate_backward_cpu);
}
