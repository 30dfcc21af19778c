// x2 bilinear upsampling times a scale, fused CPU kernels: forward and backward.
//
// input (n, c, h, w) -> out (n, c, 2h, 2w) = scale * interpolate(input,
// scale_factor=2, mode="bilinear", align_corners=False): the pyramids of PCD
// alignment upsample every coarser level this way, the offsets with scale 2
// (docs/DESIGN.md section 2).
//
// Along one axis of length L, output o reads source (o + 0.5) / 2 - 0.5,
// clamped at 0, so with j = o / 2:
//   o = 0          y = x[0]
//   o = 2j, j > 0  y = 0.25 x[j-1] + 0.75 x[j]
//   o = 2j + 1     y = 0.75 x[j]   + 0.25 x[min(j+1, L-1)]
// The 2-D value is PyTorch's order: h0 (w0 x00 + w1 x01) + h1 (w0 x10 + w1 x11).
//
// The backward gathers instead of scattering: input i receives from at most
// four outputs per axis (2i-1 .. 2i+2, fewer at the borders), so each input
// gradient is a sum of at most 16 terms written once (no atomics, no zero
// fill, deterministic).  Both passes work a plane at a time: the horizontal
// pass row by row into a scratch plane, then the vertical pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "isa.h"

namespace megan_fast {
namespace {

// Forward taps of one axis: output o = w0[o] x[i0[o]] + w1[o] x[i1[o]].
// Backward taps: input i = sum over k < n[i] of rw[4i+k] g[ro[4i+k]].
template <typename T>
struct Axis {
  std::vector<int64_t> i0, i1, ro;
  std::vector<T> w0, w1, rw;
  std::vector<int> n;

  explicit Axis(int64_t L) : i0(2 * L), i1(2 * L), ro(4 * L), w0(2 * L), w1(2 * L), rw(4 * L), n(L, 0) {
    for (int64_t o = 0; o < 2 * L; ++o) {
      const int64_t j = o / 2;
      if (o == 0) {
        i0[o] = 0, i1[o] = 0, w0[o] = T(1), w1[o] = T(0);
      } else if (o % 2 == 0) {
        i0[o] = j - 1, i1[o] = j, w0[o] = T(0.25), w1[o] = T(0.75);
      } else {
        i0[o] = j, i1[o] = std::min(j + 1, L - 1), w0[o] = T(0.75), w1[o] = T(0.25);
      }
    }
    // Outputs in increasing order; a clamped tap (i0 == i1) gives one entry with both weights.
    for (int64_t o = 0; o < 2 * L; ++o) {
      for (int side = 0; side < 2; ++side) {
        const int64_t i = side == 0 ? i0[o] : i1[o];
        const T w = side == 0 ? w0[o] : w1[o];
        if (w == T(0)) continue;
        const int64_t k = n[i];
        if (k > 0 && ro[4 * i + k - 1] == o) {
          rw[4 * i + k - 1] += w;
        } else {
          ro[4 * i + k] = o, rw[4 * i + k] = w, n[i] = static_cast<int>(k + 1);
        }
      }
    }
  }
};

// One plane: x (H, W) -> y (2H, 2W); tmp holds (H, 2W).
template <typename T>
MEGAN_FAST_INLINE void forward_plane(const T* x, T* y, T* tmp, int64_t H, int64_t W, const Axis<T>& ay,
                                     const Axis<T>& ax, T scale) {
  for (int64_t r = 0; r < H; ++r) {
    const T* xr = x + r * W;
    T* tr = tmp + r * 2 * W;
    for (int64_t o = 0; o < 2 * W; ++o) tr[o] = ax.w0[o] * xr[ax.i0[o]] + ax.w1[o] * xr[ax.i1[o]];
  }
  for (int64_t o = 0; o < 2 * H; ++o) {
    const T* t0 = tmp + ay.i0[o] * 2 * W;
    const T* t1 = tmp + ay.i1[o] * 2 * W;
    const T h0 = ay.w0[o], h1 = ay.w1[o];
    T* yr = y + o * 2 * W;
    if (scale == T(1)) {
      for (int64_t q = 0; q < 2 * W; ++q) yr[q] = h0 * t0[q] + h1 * t1[q];
    } else {
      for (int64_t q = 0; q < 2 * W; ++q) yr[q] = scale * (h0 * t0[q] + h1 * t1[q]);
    }
  }
}

// One plane: g (2H, 2W) -> gx (H, W); tmp holds (2H, W).
template <typename T>
MEGAN_FAST_INLINE void backward_plane(const T* g, T* gx, T* tmp, int64_t H, int64_t W, const Axis<T>& ay,
                                      const Axis<T>& ax, T scale) {
  for (int64_t r = 0; r < 2 * H; ++r) {
    const T* gr = g + r * 2 * W;
    T* tr = tmp + r * W;
    for (int64_t i = 0; i < W; ++i) {
      T acc = T(0);
      for (int k = 0; k < ax.n[i]; ++k) acc += ax.rw[4 * i + k] * gr[ax.ro[4 * i + k]];
      tr[i] = acc;
    }
  }
  for (int64_t i = 0; i < H; ++i) {
    T* gr = gx + i * W;
    const int n = ay.n[i];
    for (int64_t q = 0; q < W; ++q) {
      T acc = T(0);
      for (int k = 0; k < n; ++k) acc += ay.rw[4 * i + k] * tmp[ay.ro[4 * i + k] * W + q];
      gr[q] = scale * acc;
    }
  }
}

#define UP_PLANES(PATH, ATTR, T)                                                                             \
  ATTR void forward_planes_##PATH(const T* x, T* y, int64_t p0, int64_t p1, int64_t H, int64_t W,          \
                                  const Axis<T>& ay, const Axis<T>& ax, T scale) {                          \
    std::vector<T> tmp(static_cast<size_t>(H * 2 * W));                                                     \
    for (int64_t p = p0; p < p1; ++p) forward_plane(x + p * H * W, y + p * 4 * H * W, tmp.data(), H, W, ay, ax, scale); \
  }                                                                                                          \
  ATTR void backward_planes_##PATH(const T* g, T* gx, int64_t p0, int64_t p1, int64_t H, int64_t W,        \
                                   const Axis<T>& ay, const Axis<T>& ax, T scale) {                         \
    std::vector<T> tmp(static_cast<size_t>(2 * H * W));                                                     \
    for (int64_t p = p0; p < p1; ++p) backward_plane(g + p * 4 * H * W, gx + p * H * W, tmp.data(), H, W, ay, ax, scale); \
  }
UP_PLANES(baseline, , float)
UP_PLANES(baseline, , double)
#if MEGAN_FAST_X86_PATHS
UP_PLANES(avx2, MEGAN_FAST_TARGET_AVX2, float)
UP_PLANES(avx2, MEGAN_FAST_TARGET_AVX2, double)
UP_PLANES(avx512, MEGAN_FAST_TARGET_AVX512, float)
UP_PLANES(avx512, MEGAN_FAST_TARGET_AVX512, double)
#endif
#undef UP_PLANES

template <typename T>
void run_planes(bool backward, const T* src, T* dst, int64_t p0, int64_t p1, int64_t H, int64_t W,
                const Axis<T>& ay, const Axis<T>& ax, T scale) {
#if MEGAN_FAST_X86_PATHS
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return backward ? backward_planes_avx512(src, dst, p0, p1, H, W, ay, ax, scale)
                      : forward_planes_avx512(src, dst, p0, p1, H, W, ay, ax, scale);
    case Isa::kAvx2:
      return backward ? backward_planes_avx2(src, dst, p0, p1, H, W, ay, ax, scale)
                      : forward_planes_avx2(src, dst, p0, p1, H, W, ay, ax, scale);
    default: break;
  }
#endif
  backward ? backward_planes_baseline(src, dst, p0, p1, H, W, ay, ax, scale)
           : forward_planes_baseline(src, dst, p0, p1, H, W, ay, ax, scale);
}

// src (n, c, h, w) planes -> dst; H, W are the input's (low-resolution) sizes.
at::Tensor run(const at::Tensor& src_in, double scale, bool backward) {
  TORCH_CHECK(src_in.dim() == 4, "upsample_bilinear2x: expected a 4-D tensor");
  const at::Tensor src = src_in.contiguous();
  const int64_t N = src.size(0), C = src.size(1);
  const int64_t H = backward ? src.size(2) / 2 : src.size(2), W = backward ? src.size(3) / 2 : src.size(3);
  TORCH_CHECK(!backward || (src.size(2) == 2 * H && src.size(3) == 2 * W),
              "upsample_bilinear2x_backward: grad_output sizes must be even");
  at::Tensor dst = backward ? at::empty({N, C, H, W}, src.options()) : at::empty({N, C, 2 * H, 2 * W}, src.options());
  const int64_t planes = N * C;
  if (planes == 0 || H == 0 || W == 0) return dst;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "upsample_bilinear2x_cpu", [&] {
    const Axis<scalar_t> ay(H), ax(W);
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / (4 * H * W));
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
      run_planes<scalar_t>(backward, s, d, p0, p1, H, W, ay, ax, static_cast<scalar_t>(scale));
    });
  });
  return dst;
}

at::Tensor upsample_bilinear2x_cpu(const at::Tensor& input, double scale) { return run(input, scale, false); }

at::Tensor upsample_bilinear2x_backward_cpu(const at::Tensor& grad_output, double scale) {
  return run(grad_output, scale, true);
}

}  // namespace
}  // namespace megan_fast

TORCH_LIBRARY_IMPL(megan_fast, CPU, m) {
  m.impl("upsample_bilinear2x", &megan_fast::upsample_bilinear2x_cpu);
  m.impl("upsample_bilinear2x_backward", &megan_fast::upsample_bilinear2x_backward_cpu);
}
