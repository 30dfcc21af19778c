// Schemas of every megan_fast op, defined once.  Device kernels register
// themselves beside their code: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(..., CPU))
// and, from Python, the Triton kernels for CUDA (megan_fast/triton/).
// Fake (meta) kernels and autograd formulas are registered in Python by
// megan_fast/ops/ (import megan_fast before using torch.ops.megan_fast.*).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

extern "C" {
// `import megan_fast._C` loads this library, which runs the registrations
// below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "megan_fast C++ kernels (registered as torch.ops.megan_fast.*)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// The CPU code path the C++ kernels run (cpu/isa.h), for `megan-fast info` and the tests.
std::string cpu_isa_name() {
  switch (megan_fast::cpu_isa()) {
    case megan_fast::Isa::kAvx512: return "avx512";
    case megan_fast::Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}
}  // namespace

TORCH_LIBRARY(megan_fast, m) {
  // Which code path the CPU kernels take: "avx512", "avx2" or "baseline" (MEGAN_FAST_CPU_ISA caps it).
  m.def("cpu_isa() -> str", &cpu_isa_name);

  // Modulated deformable convolution (DCNv2), torchvision's layout and numerics.
  // mask None means all ones.  groups = input.size(1) / weight.size(1);
  // offset groups = offset.size(1) / (2 * kh * kw).
  m.def(
      "modulated_deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, Tensor? mask, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // Returns (grad_input, grad_offset, grad_weight, grad_mask); grad_mask is an
  // empty (0,) tensor when mask is None.  The bias gradient is grad_output's sum.
  m.def(
      "modulated_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor weight, "
      "Tensor? mask, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor, Tensor)");

  // Dot-product non-local attention: out = softmax(scale * q k^T, dim=-1) v,
  // q (b, n, d), k (b, m, d), v (b, m, dv) -> out (b, n, dv) in q's dtype and
  // lse (b, n) float32 (float64 for float64 q), the log-sum-exp of each row of
  // scale * q k^T, saved for the backward, which recomputes the n x m matrix
  // block by block.
  m.def("nonlocal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v).
  m.def(
      "nonlocal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor)");

  // LMGA graph aggregation over p nodes per pixel: nodes (b, p, c, h, w),
  // w1 (hd, c), b1 (hd,), w2 (hd,).  For p != q:
  //   s[p,q] = w2 . leaky_relu(w1 @ |E_p - E_q| + b1, negative_slope)
  //   A[p,:] = softmax over q != p of s[p,q];  out[p] = sum_{q != p} A[p,q] E_q
  // Returns (out (b, p, c, h, w), A (b, p, p, h, w) with a zero diagonal if
  // return_adjacency else an empty (0,) tensor).
  m.def(
      "graph_aggregate(Tensor nodes, Tensor w1, Tensor b1, Tensor w2, float negative_slope, "
      "bool return_adjacency) -> (Tensor, Tensor)");
  // Returns (grad_nodes, grad_w1, grad_b1, grad_w2); recomputes s and A.
  m.def(
      "graph_aggregate_backward(Tensor grad_out, Tensor nodes, Tensor w1, Tensor b1, Tensor w2, "
      "float negative_slope) -> (Tensor, Tensor, Tensor, Tensor)");

  // x2 bilinear upsampling (align_corners=False) times scale: input (n, c, h, w)
  // -> (n, c, 2h, 2w) = scale * interpolate(input, scale_factor=2, mode="bilinear").
  m.def("upsample_bilinear2x(Tensor input, float scale) -> Tensor");
  // Returns grad_input (n, c, h, w) from grad_output (n, c, 2h, 2w).
  m.def("upsample_bilinear2x_backward(Tensor grad_output, float scale) -> Tensor");
}
