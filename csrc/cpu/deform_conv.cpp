// CPU kernels of megan_fast::modulated_deform_conv2d (DCNv2) and its backward,
// numerically matching torchvision.ops.deform_conv2d.
//
// Notation: input x (b, C, H, W), G conv groups of cg = C/G channels, og offset
// groups of cog = C/og channels, K = kh*kw taps (k = i*kw + j), c_out outputs.
// For output pixel p = (oy, ox), offset group g, tap k:
//   y = oy*sh - ph + i*dh + dy,  x = ox*sw - pw + j*dw + dx,  m = mask (or 1)
//   dy = offset[2(gK+k)], dx = offset[2(gK+k)+1], m = mask[gK+k]
//   y0 = floor(y), x0 = floor(x), ly = y - y0, lx = x - x0
//   w00 = (1-ly)(1-lx), w01 = (1-ly)lx, w10 = ly(1-lx), w11 = ly lx, each zeroed when
//   its corner (y0 or y0+1, x0 or x0+1) lies outside the image.
//   col[p, k, c] = m * sum_ab w_ab v_ab[c]     (v_ab[c] = x[c, corner ab], 0 outside)
//   out[co, p]   = bias[co] + sum_{k, c in group} W[co, c, k] col[p, k, c]
// torchvision returns 0 when y <= -1, y >= H, x <= -1 or x >= W; those are exactly
// the points whose corners are all outside or carry zero weight, so the zeroed
// weights above give the same values.
//
// Backward, with gcol[p, k, c] = sum_co W[co, c, k] gout[co, p] and sums over
// the channels c of offset group g:
//   grad_x[corner ab, c] += m w_ab gcol[c]
//   grad_mask = sum_c gcol[c] val[c],   val[c] = sum_ab w_ab v_ab[c]   (col = m val)
//   grad_dy   = m sum_c gcol[c] (lx (v11 - v01) + (1-lx) (v10 - v00))[c]  (d val/dy)
//   grad_dx   = m sum_c gcol[c] (ly (v11 - v10) + (1-ly) (v01 - v00))[c]  (d val/dx)
//   grad_W[co, c, k] += sum_p gout[co, p] col[p, k, c]
// The offset derivative follows torchvision: it uses the corners of floor(y),
// floor(x) with no early-out, so a point exactly on y = -1 (or x = -1) has zero
// value but a one-sided non-zero derivative from row (column) 0.  Points with
// y < -1, y >= H (same for x), NaN or infinite coordinates have no corner inside:
// value and gradients 0, and no memory is touched (coordinates are clamped to
// [-2, H] / [-2, W] before any float -> int conversion).
//
// Layout and work split (why it is fast):
// * The input is read channels-last (b, H, W, C), so the cog channels of one
//   offset group at one pixel are contiguous: a bilinear sample is four short
//   contiguous vectors, and corner indices and weights are computed once per
//   (pixel, tap, offset group) and reused for all its channels.
// * Output pixels are processed in chunks of kChunk; a chunk's columns live in
//   a per-thread buffer [P, G, K, cg] (row stride K*C), so conv group G's block
//   is a [P, K*cg] matrix for one BLAS GEMM against the weight permuted to
//   (c_out, kh, kw, cg).  No full-size column buffer is ever allocated.
// * Per (offset group, tap), sample coordinates for all pixels of the chunk are
//   computed first in a vectorisable pass (structure of arrays), then a second
//   pass gathers/scatters channels.  The backward does one fused pass: sampled
//   columns (for grad_W), grad_offset, grad_mask and the grad_x scatter.
// * Threads (at::parallel_for) take contiguous ranges of (sample, chunk) tasks.
//   Every output / grad_offset / grad_mask element belongs to one task.  grad_x
//   of a sample wholly inside one range is accumulated in place; a sample split
//   between ranges gets a zeroed partial buffer per range, summed afterwards.
//   grad_W is accumulated per range and summed in range order (deterministic).
//   BLAS calls inside the parallel region run single-threaded.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"  // hot loops compiled per code path, chosen at run time

#define DCN_INLINE MEGAN_FAST_INLINE

// BLAS: the Fortran sgemm_/dgemm_ that libtorch_cpu exports (MKL on x86-64
// wheels; at::native::cpublas::gemm's float/double overloads are not exported).
// Weak, so a torch without them still loads and uses the loop below.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace megan_fast {
namespace {

#ifndef DCN_CHUNK
#define DCN_CHUNK 256
#endif
constexpr int64_t kChunk = DCN_CHUNK;  // output pixels per task

// Column-major C (m x n, ldc) = op(A) op(B) + beta C, op(A) m x k; ta/tb 'N' or 'T'.
template <typename T>
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int im = int(m), in = int(n), ik = int(k), ia = int(lda), ib = int(ldb), ic = int(ldc);
  const T one = 1;
  if (k > 0) {
    if constexpr (std::is_same_v<T, float>) {
      if (sgemm_) return sgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
    } else {
      if (dgemm_) return dgemm_(&ta, &tb, &im, &in, &ik, &one, a, &ia, b, &ib, &beta, c, &ic);
    }
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      T s = 0;
      for (int64_t l = 0; l < k; ++l)
        s += (ta == 'N' ? a[i + l * lda] : a[l + i * lda]) * (tb == 'N' ? b[l + j * ldb] : b[j + l * ldb]);
      c[i + j * ldc] = beta == T(0) ? s : s + beta * c[i + j * ldc];
    }
}

struct Geom {
  int64_t B, C, H, W, Ho, Wo, HWo, kh, kw, K, sh, sw, ph, pw, dh, dw;
  int64_t G, cg, og, cog, cout, coutg, ldcol;  // ldcol = K*C
  int64_t nchunks;
};

// Sample data of one (offset group, tap) for the n pixels of a chunk, SoA.
template <typename T>
struct Row {
  int32_t* idx[4];  // corner pixel index y*W + x (00, 01, 10, 11), -1 outside
  T* w[4];          // bilinear weights, 0 for corners outside (no mask)
  T *ly, *lx, *m;
};

// Coordinates -> corners and weights.  by/bx: oy*sh - ph, ox*sw - pw per pixel;
// ky/kx: i*dh, j*dw.  (by + ky) is an exact integer, then + dy, as torchvision.
// mask: the mask row, or ones.  Branch-free so that it vectorises over pixels.
template <typename T>
DCN_INLINE void sample_row_impl(int64_t n, const T* __restrict by, const T* __restrict bx, T ky, T kx,
                                const T* __restrict dy, const T* __restrict dx, const T* __restrict mask, int64_t H,
                                int64_t W, const Row<T>& r) {
  const T fh = T(H), fw = T(W);
  const int32_t h = int32_t(H), w = int32_t(W);
  int32_t *__restrict i00 = r.idx[0], *__restrict i01 = r.idx[1], *__restrict i10 = r.idx[2],
                      *__restrict i11 = r.idx[3];
  T *__restrict w00 = r.w[0], *__restrict w01 = r.w[1], *__restrict w10 = r.w[2], *__restrict w11 = r.w[3];
  T *__restrict rly = r.ly, *__restrict rlx = r.lx, *__restrict rm = r.m;
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const T y = (by[p] + ky) + dy[p];
    const T x = (bx[p] + kx) + dx[p];
    // Clamp to [-2, H] (NaN -> -2): corners inside the image and their weights
    // are unchanged (a corner is inside only for -1 <= y < H), and the int cast
    // below is safe for huge, infinite or NaN coordinates.
    const T yc = std::min(fh, std::max(T(-2), y)), xc = std::min(fw, std::max(T(-2), x));
    // floor as truncation corrected for negatives (std::floor does not vectorise here).
    const int32_t y0 = int32_t(yc) - (T(int32_t(yc)) > yc), x0 = int32_t(xc) - (T(int32_t(xc)) > xc);
    const T y0f = T(y0), x0f = T(x0);
    const T ly = yc - y0f, lx = xc - x0f, hy = T(1) - ly, hx = T(1) - lx;
    // Validity as 0/1 integers and arithmetic instead of selects: GCC then
    // vectorises the loop (with selects it re-creates branches and gives up).
    const int32_t vy0 = (y0 >= 0) & (y0 < h), vy1 = (y0 + 1 >= 0) & (y0 + 1 < h);
    const int32_t vx0 = (x0 >= 0) & (x0 < w), vx1 = (x0 + 1 >= 0) & (x0 + 1 < w);
    const int32_t v00 = vy0 & vx0, v01 = vy0 & vx1, v10 = vy1 & vx0, v11 = vy1 & vx1;
    const int32_t base = y0 * w + x0;  // idx = v ? corner : -1
    i00[p] = v00 * (base + 1) - 1;
    i01[p] = v01 * (base + 2) - 1;
    i10[p] = v10 * (base + w + 1) - 1;
    i11[p] = v11 * (base + w + 2) - 1;
    w00[p] = hy * hx * T(v00);
    w01[p] = hy * lx * T(v01);
    w10[p] = ly * hx * T(v10);
    w11[p] = ly * lx * T(v11);
    rly[p] = ly;
    rlx[p] = lx;
    rm[p] = mask[p];
  }
}
#define DCN_SAMPLE_ROW(PATH, ATTR, T)                                                                        \
  ATTR void sample_row_##PATH(int64_t n, const T* by, const T* bx, T ky, T kx, const T* dy, const T* dx,       \
                              const T* mask, int64_t H, int64_t W, const Row<T>& r) {                         \
    sample_row_impl(n, by, bx, ky, kx, dy, dx, mask, H, W, r);                                                \
  }
DCN_SAMPLE_ROW(baseline, , float)
DCN_SAMPLE_ROW(baseline, , double)
#if MEGAN_FAST_X86_PATHS
DCN_SAMPLE_ROW(avx2, MEGAN_FAST_TARGET_AVX2, float)
DCN_SAMPLE_ROW(avx2, MEGAN_FAST_TARGET_AVX2, double)
DCN_SAMPLE_ROW(avx512, MEGAN_FAST_TARGET_AVX512, float)
DCN_SAMPLE_ROW(avx512, MEGAN_FAST_TARGET_AVX512, double)
#endif
#undef DCN_SAMPLE_ROW

template <typename T>
void sample_row(int64_t n, const T* by, const T* bx, T ky, T kx, const T* dy, const T* dx, const T* mask, int64_t H,
                int64_t W, const Row<T>& r) {
#if MEGAN_FAST_X86_PATHS
  switch (cpu_isa()) {
    case Isa::kAvx512: return sample_row_avx512(n, by, bx, ky, kx, dy, dx, mask, H, W, r);
    case Isa::kAvx2: return sample_row_avx2(n, by, bx, ky, kx, dy, dx, mask, H, W, r);
    default: break;
  }
#endif
  sample_row_baseline(n, by, bx, ky, kx, dy, dx, mask, H, W, r);
}

// The channels of one offset group may span several conv groups; each piece
// [c0, c0 + len) (relative to the offset group's first channel) lands at column
// offset col + k*cg within a pixel's row.
struct Segment {
  int64_t c0, len, col;
};

// Everything a channel pass needs besides the Row.
template <typename T>
struct PassArgs {
  const T* img;       // channels-last sample, already offset to the offset group's first channel
  int64_t C;          // pixel stride of img / gin
  const T* zeros;     // cog zeros: read in place of corners outside the image
  T* sink;            // cog scratch: written in place of corners outside the image
  T* col;             // chunk columns, already offset by k*cg; row stride ldcol
  const T* gcol;      // backward: gradient columns, same layout
  T* gin;             // backward: channels-last grad accumulator, offset like img
  T *gdy, *gdx, *gm;  // backward: grad_offset (dy, dx) and grad_mask (or null) rows
  int64_t ldcol;
  const Segment* seg;
  int64_t nseg;
};

// Channel passes.  CW > 0: the offset group is one segment of CW channels
// (compile-time width, fully unrolled vectors); CW = 0: any segments.
// Struct fields are copied to locals so stores cannot be assumed to alias them.

// Forward gather: col[p, seg] = m * sum_ab w_ab v_ab.
template <typename T, int CW>
DCN_INLINE void fwd_pass_impl(int64_t n, const Row<T>& r, const PassArgs<T>& a) {
  const T* img = a.img;
  const T* zeros = a.zeros;
  T* col = a.col;
  const int64_t C = a.C, ldcol = a.ldcol, nseg = CW > 0 ? 1 : a.nseg;
  const Segment* seg = a.seg;
  const Row<T> rr = r;
  for (int64_t p = 0; p < n; ++p) {
    const T* v[4];
    T wm[4];
    for (int q = 0; q < 4; ++q) {
      v[q] = rr.idx[q][p] >= 0 ? img + int64_t(rr.idx[q][p]) * C : zeros;
      wm[q] = rr.m[p] * rr.w[q][p];
    }
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t c0 = CW > 0 ? 0 : seg[s].c0, len = CW > 0 ? CW : seg[s].len;
      T* __restrict dst = col + p * ldcol + seg[s].col;
      const T *v0 = v[0] + c0, *v1 = v[1] + c0, *v2 = v[2] + c0, *v3 = v[3] + c0;
#pragma omp simd
      for (int64_t c = 0; c < len; ++c) dst[c] = wm[0] * v0[c] + wm[1] * v1[c] + wm[2] * v2[c] + wm[3] * v3[c];
    }
  }
}

// Backward fused pass.  Per channel c of the point, with v_ab the corners
// (zeros outside) and g = gcol[c]:
//   val = sum_ab w_ab v_ab,  col = m val                           (for grad_W)
//   grad_dy   += m g (lx (v11 - v01) + (1-lx) (v10 - v00))        (d val / dy)
//   grad_dx   += m g (ly (v11 - v10) + (1-ly) (v01 - v00))        (d val / dx)
//   grad_mask += g val
//   grad_x[corner ab, c] += m w_ab g
// Corners outside read zeros and write to the sink, so the channel loop has
// no branches; distinct inside corners never alias.  Channels go in 32-byte
// GCC/Clang vectors (a scalar loop takes any remainder); the three per-point
// dot products are reduced together with shuffles at the end (an OpenMP simd
// reduction summed each lane by lane, about a third of this pass).  Vectors
// are passed by reference only, so no function has a vector-ABI signature.
template <typename T>
struct Vec {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int L = 32 / sizeof(T);
};
template <typename V>
DCN_INLINE void vload(V& v, const void* p) {
  std::memcpy(&v, p, sizeof v);
}
template <typename V>
DCN_INLINE void vstore(void* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}
// out[i] += sum of the lanes of x, y, z (i = 0, 1, 2).
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define DCN_HAVE_SHUFFLE 1
#endif
#endif
#ifdef DCN_HAVE_SHUFFLE
DCN_INLINE void hsum3(const Vec<float>::V& x, const Vec<float>::V& y, const Vec<float>::V& z, float* out) {
  typedef float V4 __attribute__((vector_size(16)));
  const V4 x4 = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
  const V4 y4 = __builtin_shufflevector(y, y, 0, 1, 2, 3) + __builtin_shufflevector(y, y, 4, 5, 6, 7);
  const V4 z4 = __builtin_shufflevector(z, z, 0, 1, 2, 3) + __builtin_shufflevector(z, z, 4, 5, 6, 7);
  const V4 zero = {0, 0, 0, 0};
  const V4 xy = __builtin_shufflevector(x4, y4, 0, 4, 1, 5) + __builtin_shufflevector(x4, y4, 2, 6, 3, 7);
  const V4 zw = __builtin_shufflevector(z4, zero, 0, 4, 1, 5) + __builtin_shufflevector(z4, zero, 2, 6, 3, 7);
  const V4 r = __builtin_shufflevector(xy, zw, 0, 1, 4, 5) + __builtin_shufflevector(xy, zw, 2, 3, 6, 7);
  out[0] += r[0], out[1] += r[1], out[2] += r[2];
}
DCN_INLINE void hsum3(const Vec<double>::V& x, const Vec<double>::V& y, const Vec<double>::V& z, double* out) {
  typedef double V2 __attribute__((vector_size(16)));
  const V2 x2 = __builtin_shufflevector(x, x, 0, 1) + __builtin_shufflevector(x, x, 2, 3);
  const V2 y2 = __builtin_shufflevector(y, y, 0, 1) + __builtin_shufflevector(y, y, 2, 3);
  const V2 z2 = __builtin_shufflevector(z, z, 0, 1) + __builtin_shufflevector(z, z, 2, 3);
  const V2 xy = __builtin_shufflevector(x2, y2, 0, 2) + __builtin_shufflevector(x2, y2, 1, 3);
  out[0] += xy[0], out[1] += xy[1], out[2] += z2[0] + z2[1];
}
#else
template <typename V, typename T>
DCN_INLINE void hsum3(const V& x, const V& y, const V& z, T* out) {
  for (int l = 0; l < Vec<T>::L; ++l) out[0] += x[l], out[1] += y[l], out[2] += z[l];
}
#endif

template <typename T, int CW>
DCN_INLINE void bwd_pass_impl(int64_t n, const Row<T>& r, const PassArgs<T>& a) {
  typedef typename Vec<T>::V V;
  constexpr int64_t L = Vec<T>::L;
  const Row<T> rr = r;
  const T *img = a.img, *zeros = a.zeros, *gcol = a.gcol;
  T *col = a.col, *gin = a.gin, *sink = a.sink;
  const int64_t C = a.C, ldcol = a.ldcol, nseg = CW > 0 ? 1 : a.nseg;
  const Segment* seg = a.seg;
  for (int64_t p = 0; p < n; ++p) {
    const T m = rr.m[p], ly = rr.ly[p], lx = rr.lx[p], hy = T(1) - ly, hx = T(1) - lx;
    const T* v[4];
    T* gv[4];
    T w[4], wm[4];
    for (int q = 0; q < 4; ++q) {
      const bool in = rr.idx[q][p] >= 0;
      v[q] = in ? img + int64_t(rr.idx[q][p]) * C : zeros;
      gv[q] = in ? gin + int64_t(rr.idx[q][p]) * C : sink;
      w[q] = rr.w[q][p];
      wm[q] = m * w[q];
    }
    V vy = {}, vx = {}, vm = {};
    T acc[3] = {0, 0, 0};  // grad_dy / m, grad_dx / m, grad_mask
    for (int64_t s = 0; s < nseg; ++s) {
      const int64_t c0 = CW > 0 ? 0 : seg[s].c0, len = CW > 0 ? CW : seg[s].len;
      T* dst = col + p * ldcol + seg[s].col;
      const T* gc = gcol + p * ldcol + seg[s].col;
      int64_t c = 0;
      for (; c + L <= len; c += L) {
        V g, a0, a1, a2, a3, gq;
        vload(g, gc + c);
        vload(a0, v[0] + c0 + c), vload(a1, v[1] + c0 + c), vload(a2, v[2] + c0 + c), vload(a3, v[3] + c0 + c);
        const V val = w[0] * a0 + w[1] * a1 + w[2] * a2 + w[3] * a3, mval = m * val;
        vstore(dst + c, mval);
        vy += g * (lx * (a3 - a1) + hx * (a2 - a0));
        vx += g * (ly * (a3 - a2) + hy * (a1 - a0));
        vm += g * val;
        for (int q = 0; q < 4; ++q) vload(gq, gv[q] + c0 + c), vstore(gv[q] + c0 + c, gq + wm[q] * g);
      }
      for (; c < len; ++c) {  // remainder (never runs when CW is a multiple of L)
        const T g = gc[c], a0 = v[0][c0 + c], a1 = v[1][c0 + c], a2 = v[2][c0 + c], a3 = v[3][c0 + c];
        const T val = w[0] * a0 + w[1] * a1 + w[2] * a2 + w[3] * a3;
        dst[c] = m * val;
        acc[0] += g * (lx * (a3 - a1) + hx * (a2 - a0));
        acc[1] += g * (ly * (a3 - a2) + hy * (a1 - a0));
        acc[2] += g * val;
        for (int q = 0; q < 4; ++q) gv[q][c0 + c] += wm[q] * g;
      }
    }
    hsum3(vy, vx, vm, acc);
    a.gdy[p] = m * acc[0];
    a.gdx[p] = m * acc[1];
    if (a.gm) a.gm[p] = acc[2];
  }
}

// Width dispatch, one entry per pass, dtype and code path (cpu/isa.h).
// Compile-time widths of 1, 2, 4 and 8 vectors (8-64 floats, 4-32 doubles);
// other widths and split offset groups take the generic case (CW = 0).
#define DCN_PASS(NAME, PATH, ATTR, T)                                                 \
  ATTR void NAME##_##PATH(int64_t n, const Row<T>& r, const PassArgs<T>& a) {         \
    if (a.nseg == 1) switch (a.seg[0].len) {                                          \
        case Vec<T>::L: return NAME##_impl<T, Vec<T>::L>(n, r, a);                    \
        case 2 * Vec<T>::L: return NAME##_impl<T, 2 * Vec<T>::L>(n, r, a);            \
        case 4 * Vec<T>::L: return NAME##_impl<T, 4 * Vec<T>::L>(n, r, a);            \
        case 8 * Vec<T>::L: return NAME##_impl<T, 8 * Vec<T>::L>(n, r, a);            \
      }                                                                               \
    NAME##_impl<T, 0>(n, r, a);                                                       \
  }
#define DCN_PASSES(PATH, ATTR)            \
  DCN_PASS(fwd_pass, PATH, ATTR, float)   \
  DCN_PASS(fwd_pass, PATH, ATTR, double)  \
  DCN_PASS(bwd_pass, PATH, ATTR, float)   \
  DCN_PASS(bwd_pass, PATH, ATTR, double)
DCN_PASSES(baseline, )
#if MEGAN_FAST_X86_PATHS
DCN_PASSES(avx2, MEGAN_FAST_TARGET_AVX2)
DCN_PASSES(avx512, MEGAN_FAST_TARGET_AVX512)
#endif
#undef DCN_PASSES
#undef DCN_PASS

#if MEGAN_FAST_X86_PATHS
#define DCN_DISPATCH(NAME)                                                      \
  template <typename T>                                                         \
  void NAME(int64_t n, const Row<T>& r, const PassArgs<T>& a) {                 \
    switch (cpu_isa()) {                                                        \
      case Isa::kAvx512: return NAME##_avx512(n, r, a);                         \
      case Isa::kAvx2: return NAME##_avx2(n, r, a);                             \
      default: return NAME##_baseline(n, r, a);                                 \
    }                                                                           \
  }
#else
#define DCN_DISPATCH(NAME)                                                      \
  template <typename T>                                                         \
  void NAME(int64_t n, const Row<T>& r, const PassArgs<T>& a) {                 \
    NAME##_baseline(n, r, a);                                                   \
  }
#endif
DCN_DISPATCH(fwd_pass)
DCN_DISPATCH(bwd_pass)
#undef DCN_DISPATCH

// Per-range scratch: one chunk's columns (and gradient columns), pixel bases,
// the Row arrays, zeros and sink.
template <typename T>
struct Scratch {
  std::vector<T> col, gcol, by, bx, rowT, zeros, sink, ones;
  std::vector<int32_t> rowI;
  Row<T> row;
  std::vector<std::vector<Segment>> segs;  // per offset group
  Scratch(const Geom& g, bool backward)
      : col(kChunk * g.ldcol), gcol(backward ? kChunk * g.ldcol : 0), by(kChunk), bx(kChunk), rowT(7 * kChunk),
        zeros(g.cog, T(0)), sink(backward ? g.cog : 0), ones(kChunk, T(1)), rowI(4 * kChunk) {
    for (int q = 0; q < 4; ++q) {
      row.idx[q] = rowI.data() + q * kChunk;
      row.w[q] = rowT.data() + q * kChunk;
    }
    row.ly = rowT.data() + 4 * kChunk;
    row.lx = rowT.data() + 5 * kChunk;
    row.m = rowT.data() + 6 * kChunk;
    segs.resize(g.og);
    for (int64_t o = 0; o < g.og; ++o)
      for (int64_t c = o * g.cog, end = (o + 1) * g.cog; c < end;) {
        const int64_t grp = c / g.cg, e = std::min(end, (grp + 1) * g.cg);
        segs[o].push_back({c - o * g.cog, e - c, grp * g.K * g.cg + (c - grp * g.cg)});
        c = e;
      }
  }
};

// Sample b, chunk t: n pixels from p0.  Fills pixel bases, then per (offset
// group, tap) the Row and a channel pass.  `backward` selects the fused pass.
template <typename T>
void sample_chunk(const Geom& g, Scratch<T>& s, const T* img, const T* off, const T* mask, T* gin, T* goff,
                  T* gmask, int64_t p0, int64_t n, bool backward) {
  for (int64_t p = 0; p < n; ++p) {
    const int64_t oy = (p0 + p) / g.Wo, ox = (p0 + p) % g.Wo;
    s.by[p] = T(oy * g.sh - g.ph);
    s.bx[p] = T(ox * g.sw - g.pw);
  }
  PassArgs<T> a;
  a.C = g.C;
  a.zeros = s.zeros.data();
  a.sink = s.sink.data();
  a.ldcol = g.ldcol;
  for (int64_t o = 0; o < g.og; ++o) {
    a.img = img + o * g.cog;
    a.gin = gin ? gin + o * g.cog : nullptr;
    a.seg = s.segs[o].data();
    a.nseg = int64_t(s.segs[o].size());
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t ch = o * g.K + k;  // mask channel; offset channels 2ch, 2ch+1
      const T* dy = off + 2 * ch * g.HWo + p0;
      const T* mk = mask ? mask + ch * g.HWo + p0 : s.ones.data();
      sample_row(n, s.by.data(), s.bx.data(), T((k / g.kw) * g.dh), T((k % g.kw) * g.dw), dy, dy + g.HWo, mk,
                    g.H, g.W, s.row);
      a.col = s.col.data() + k * g.cg;
      if (!backward) {
        fwd_pass(n, s.row, a);
      } else {
        a.gcol = s.gcol.data() + k * g.cg;
        a.gdy = goff + 2 * ch * g.HWo + p0;
        a.gdx = a.gdy + g.HWo;
        a.gm = gmask ? gmask + ch * g.HWo + p0 : nullptr;
        bwd_pass(n, s.row, a);
      }
    }
  }
}

Geom make_geom(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
               const c10::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, const char* fn) {
  TORCH_CHECK(input.dim() == 4, fn, ": input must be 4-D (b, c_in, h, w), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, fn, ": weight must be 4-D (c_out, c_in/groups, kh, kw), got shape ", weight.sizes());
  TORCH_CHECK(offset.dim() == 4, fn, ": offset must be 4-D (b, 2*og*kh*kw, h_out, w_out), got shape ",
              offset.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, fn,
              ": stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0,
              fn, ": expected stride >= 1, dilation >= 1, padding >= 0, got stride ", stride, ", padding ", padding,
              ", dilation ", dilation);
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, fn,
              ": the CPU kernel supports float32 and float64, got ", input.scalar_type());
  for (const at::Tensor* t : {&input, &offset, &weight}) {
    TORCH_CHECK(t->device().is_cpu(), fn, ": expected CPU tensors");
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), fn, ": input, offset, weight (and mask, bias) must share ",
                "a dtype, got ", input.scalar_type(), " and ", t->scalar_type());
  }
  Geom g;
  g.B = input.size(0), g.C = input.size(1), g.H = input.size(2), g.W = input.size(3);
  g.cout = weight.size(0), g.cg = weight.size(1), g.kh = weight.size(2), g.kw = weight.size(3);
  TORCH_CHECK(g.cg > 0 && g.kh > 0 && g.kw > 0 && g.cout > 0, fn,
              ": weight (c_out, c_in/groups, kh, kw) must have non-zero sizes, got ", weight.sizes());
  TORCH_CHECK(g.C % g.cg == 0, fn, ": input channels ", g.C, " must be a multiple of weight.size(1) = ", g.cg);
  g.G = g.C / g.cg;
  TORCH_CHECK(g.cout % g.G == 0, fn, ": weight.size(0) = ", g.cout, " must be divisible by groups = ", g.G);
  g.coutg = g.cout / g.G;
  g.K = g.kh * g.kw;
  TORCH_CHECK(offset.size(1) > 0 && offset.size(1) % (2 * g.K) == 0, fn,
              ": offset.size(1) must be a positive multiple of 2*kh*kw = ", 2 * g.K, ", got ", offset.size(1));
  g.og = offset.size(1) / (2 * g.K);
  TORCH_CHECK(g.C % g.og == 0, fn, ": input channels ", g.C, " must be divisible by offset groups ", g.og);
  g.cog = g.C / g.og;
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Ho = (g.H + 2 * g.ph - (g.dh * (g.kh - 1) + 1)) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - (g.dw * (g.kw - 1) + 1)) / g.sw + 1;
  TORCH_CHECK(g.H + 2 * g.ph - (g.dh * (g.kh - 1) + 1) >= 0 && g.W + 2 * g.pw - (g.dw * (g.kw - 1) + 1) >= 0, fn,
              ": input ", g.H, "x", g.W, " is too small for a ", g.kh, "x", g.kw, " kernel with padding ", padding,
              " and dilation ", dilation, " (empty output)");
  g.HWo = g.Ho * g.Wo;
  // Pixel indices are int32 and BLAS sizes / leading dimensions int.
  TORCH_CHECK(g.H * g.W < (int64_t(1) << 30) && g.HWo < (int64_t(1) << 31) && g.K * g.C < (int64_t(1) << 31), fn,
              ": input or output too large (h*w must be < 2^30, h_out*w_out and kh*kw*c_in < 2^31)");
  TORCH_CHECK(offset.sizes() == at::IntArrayRef({g.B, 2 * g.og * g.K, g.Ho, g.Wo}), fn, ": offset must have shape (",
              g.B, ", ", 2 * g.og * g.K, ", ", g.Ho, ", ", g.Wo, ") (b, 2*og*kh*kw, h_out, w_out), got ",
              offset.sizes());
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == input.scalar_type(), fn,
                ": mask must be a CPU tensor of input's dtype");
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({g.B, g.og * g.K, g.Ho, g.Wo}), fn, ": mask must have shape (", g.B,
                ", ", g.og * g.K, ", ", g.Ho, ", ", g.Wo, ") (b, og*kh*kw, h_out, w_out), got ", mask->sizes());
  }
  g.ldcol = g.K * g.C;
  g.nchunks = (g.HWo + kChunk - 1) / kChunk;
  return g;
}

// Weight (c_out, cg, kh, kw) -> (c_out, kh, kw, cg), matching the column layout.
at::Tensor permute_weight(const at::Tensor& weight) { return weight.permute({0, 2, 3, 1}).contiguous(); }

at::Tensor deform_conv_forward(const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& mask,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* fn = "modulated_deform_conv2d";
  const Geom g = make_geom(input, offset, weight, mask, stride, padding, dilation, fn);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.cout && bias->scalar_type() == input.scalar_type() &&
                    bias->device().is_cpu(),
                fn, ": bias must be a CPU tensor of shape (", g.cout, ") and input's dtype, got ", bias->sizes());
  }
  at::Tensor out = at::empty({g.B, g.cout, g.Ho, g.Wo}, input.options());
  if (g.B == 0) return out;
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor off = offset.contiguous(), wp = permute_weight(weight);
  const at::Tensor mk = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor bs = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "modulated_deform_conv2d_cpu", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *op = off.data_ptr<scalar_t>(), *wpp = wp.data_ptr<scalar_t>();
    const scalar_t* mp = mk.defined() ? mk.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bs.defined() ? bs.data_ptr<scalar_t>() : nullptr;
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t kcg = g.K * g.cg;
    at::parallel_for(0, g.B * g.nchunks, 1, [&](int64_t t0, int64_t t1) {
      Scratch<scalar_t> s(g, false);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / g.nchunks, p0 = (t % g.nchunks) * kChunk, n = std::min(kChunk, g.HWo - p0);
        sample_chunk<scalar_t>(g, s, xp + b * g.H * g.W * g.C, op + b * 2 * g.og * g.K * g.HWo,
                               mp ? mp + b * g.og * g.K * g.HWo : nullptr, nullptr, nullptr, nullptr, p0, n, false);
        scalar_t* ob = outp + b * g.cout * g.HWo + p0;
        if (bp)
          for (int64_t co = 0; co < g.cout; ++co) std::fill_n(ob + co * g.HWo, n, bp[co]);
        // out^T[p, co] (col-major, ld HWo) = col[p, :] W_G^T
        for (int64_t G = 0; G < g.G; ++G)
          gemm<scalar_t>('T', 'N', n, g.coutg, kcg, s.col.data() + G * kcg, g.ldcol, wpp + G * g.coutg * kcg, kcg,
                         bp ? scalar_t(1) : scalar_t(0), ob + G * g.coutg * g.HWo, g.HWo);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset, const at::Tensor& weight,
    const c10::optional<at::Tensor>& mask, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  const char* fn = "modulated_deform_conv2d_backward";
  const Geom g = make_geom(input, offset, weight, mask, stride, padding, dilation, fn);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.B, g.cout, g.Ho, g.Wo}) && grad_output.device().is_cpu() &&
                  grad_output.scalar_type() == input.scalar_type(),
              fn, ": grad_output must be a CPU tensor of input's dtype and shape (", g.B, ", ", g.cout, ", ", g.Ho, ", ",
              g.Wo, "), got ", grad_output.sizes());
  // grad_input accumulates channels-last; returned in input's memory format.
  at::Tensor gin = at::zeros({g.B, g.H, g.W, g.C}, input.options()).permute({0, 3, 1, 2});
  // Every grad_offset / grad_mask element is written exactly once.
  at::Tensor goff = at::empty_like(offset, at::MemoryFormat::Contiguous);
  at::Tensor gmask = mask.has_value() ? at::empty_like(*mask, at::MemoryFormat::Contiguous)
                                      : at::empty({0}, input.options());
  at::Tensor gw = at::zeros({g.cout, g.K, g.cg}, weight.options());
  // Gradients get the strides of empty_like(x) (what the fake kernel promises),
  // which costs a copy only when they differ from the layout computed here.
  auto like = [](const at::Tensor& grad, const at::Tensor& x) {
    at::Tensor out = at::empty_like(x);
    if (out.strides() == grad.strides()) return grad;
    return out.copy_(grad);
  };
  auto finish = [&] {
    at::Tensor gwt = gw.permute({0, 2, 1}).reshape(weight.sizes());  // back to (c_out, cg, kh, kw)
    return std::make_tuple(like(gin, input), like(goff, offset), like(gwt, weight),
                           mask.has_value() ? like(gmask, *mask) : gmask);
  };
  if (g.B == 0) return finish();
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor go = grad_output.contiguous(), off = offset.contiguous(), wp = permute_weight(weight);
  const at::Tensor mk = mask.has_value() ? mask->contiguous() : at::Tensor();
  std::mutex mu;
  std::vector<std::tuple<int64_t, int64_t, at::Tensor>> gin_parts;  // (sample, range start, (H, W, C))
  std::vector<std::pair<int64_t, at::Tensor>> gw_parts;              // (range start, (c_out, K, cg))
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "modulated_deform_conv2d_backward_cpu", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *op = off.data_ptr<scalar_t>(), *wpp = wp.data_ptr<scalar_t>();
    const scalar_t *mp = mk.defined() ? mk.data_ptr<scalar_t>() : nullptr, *gop = go.data_ptr<scalar_t>();
    scalar_t *ginp = gin.data_ptr<scalar_t>(), *goffp = goff.data_ptr<scalar_t>();
    scalar_t* gmp = mk.defined() ? gmask.data_ptr<scalar_t>() : nullptr;
    const int64_t kcg = g.K * g.cg, HWC = g.H * g.W * g.C;
    at::parallel_for(0, g.B * g.nchunks, 1, [&](int64_t t0, int64_t t1) {
      Scratch<scalar_t> s(g, true);
      at::Tensor gwl = at::zeros({g.cout, g.K, g.cg}, gw.options());
      scalar_t* gwp = gwl.data_ptr<scalar_t>();
      for (int64_t b = t0 / g.nchunks; b * g.nchunks < t1; ++b) {
        const int64_t c_lo = std::max(t0 - b * g.nchunks, int64_t(0));
        const int64_t c_hi = std::min(t1 - b * g.nchunks, g.nchunks);
        scalar_t* gib = ginp + b * HWC;  // in place when this range owns the whole sample
        if (c_lo > 0 || c_hi < g.nchunks) {
          at::Tensor part = at::zeros({g.H, g.W, g.C}, input.options());
          gib = part.data_ptr<scalar_t>();
          std::lock_guard<std::mutex> lock(mu);
          gin_parts.emplace_back(b, t0, part);
        }
        for (int64_t c = c_lo; c < c_hi; ++c) {
          const int64_t p0 = c * kChunk, n = std::min(kChunk, g.HWo - p0);
          const scalar_t* gob = gop + b * g.cout * g.HWo + p0;
          // gcol[p, G block] = gout[G rows, p]^T W_G   (col-major: gcol^T = W_G^T gout)
          for (int64_t G = 0; G < g.G; ++G)
            gemm<scalar_t>('N', 'T', kcg, n, g.coutg, wpp + G * g.coutg * kcg, kcg, gob + G * g.coutg * g.HWo, g.HWo,
                           scalar_t(0), s.gcol.data() + G * kcg, g.ldcol);
          sample_chunk<scalar_t>(g, s, xp + b * HWC, op + b * 2 * g.og * g.K * g.HWo,
                                 mp ? mp + b * g.og * g.K * g.HWo : nullptr, gib, goffp + b * 2 * g.og * g.K * g.HWo,
                                 gmp ? gmp + b * g.og * g.K * g.HWo : nullptr, p0, n, true);
          // grad_W_G (col-major (kcg, coutg)) += col^T gout_G
          for (int64_t G = 0; G < g.G; ++G)
            gemm<scalar_t>('N', 'N', kcg, g.coutg, n, s.col.data() + G * kcg, g.ldcol, gob + G * g.coutg * g.HWo,
                           g.HWo, scalar_t(1), gwp + G * g.coutg * kcg, kcg);
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      gw_parts.emplace_back(t0, gwl);
    });
  });
  // Deterministic reductions, in range order.
  std::sort(gw_parts.begin(), gw_parts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& part : gw_parts) gw.add_(part.second);
  std::sort(gin_parts.begin(), gin_parts.end(), [](const auto& a, const auto& b) {
    return std::get<0>(a) != std::get<0>(b) ? std::get<0>(a) < std::get<0>(b) : std::get<1>(a) < std::get<1>(b);
  });
  for (auto& part : gin_parts) gin.select(0, std::get<0>(part)).add_(std::get<2>(part).permute({2, 0, 1}));
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(megan_fast, CPU, m) {
  m.impl("modulated_deform_conv2d", &deform_conv_forward);
  m.impl("modulated_deform_conv2d_backward", &deform_conv_backward);
}

}  // namespace megan_fast
