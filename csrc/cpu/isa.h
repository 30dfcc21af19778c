// One CPU instruction-set dispatch for every kernel in csrc/cpu (docs/DESIGN.md section 2).
//
// The build has no -march flag.  A kernel's hot loops are force-inlined
// templates; each code path instantiates them inside a function carrying one
// of the target attributes below (the inlined code takes on the caller's
// target), and megan_fast::cpu_isa() picks the path once, at run time, from
// the CPU's features.  MEGAN_FAST_CPU_ISA=avx2|baseline caps the choice (tests
// and benchmarks of the narrower paths).  Paths: AVX-512 (x86-64-v4), AVX2 +
// FMA (x86-64-v3) and the portable baseline (SSE2 on x86-64, NEON elsewhere).
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEGAN_FAST_X86_PATHS 1
#if __GNUC__ >= 12
#define MEGAN_FAST_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define MEGAN_FAST_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define MEGAN_FAST_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define MEGAN_FAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
#else
#define MEGAN_FAST_X86_PATHS 0
#define MEGAN_FAST_TARGET_AVX512
#define MEGAN_FAST_TARGET_AVX2
#endif

#if defined(__GNUC__)
#define MEGAN_FAST_INLINE inline __attribute__((always_inline))
#else
#define MEGAN_FAST_INLINE inline
#endif

namespace megan_fast {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest path this CPU runs, capped by MEGAN_FAST_CPU_ISA; detected once.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if MEGAN_FAST_X86_PATHS
    __builtin_cpu_init();
#if __GNUC__ >= 12
    if (__builtin_cpu_supports("x86-64-v4"))
      best = Isa::kAvx512;
    else if (__builtin_cpu_supports("x86-64-v3"))
      best = Isa::kAvx2;
#else
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
      best = Isa::kAvx512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      best = Isa::kAvx2;
#endif
#endif
    if (const char* cap = std::getenv("MEGAN_FAST_CPU_ISA")) {
      const std::string v(cap);
      if (v == "baseline") best = Isa::kBaseline;
      else if (v == "avx2" && best == Isa::kAvx512) best = Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

}  // namespace megan_fast
