// CPU int8 GEMM kernels for ai.eqc::FusedInt8Gemm. cpu_kernels.cc is compiled once per ISA
// level (generic / avx2 / avx512) into its own namespace; cpu_gemm.cc picks one at run time.
#pragma once
#include <algorithm>
#include <cstdint>

namespace eqc {
namespace cpu {

// Per-token (row) activation quantization parameters, mirroring the QDQ graph:
//   s = max(max(absmax, absmax_floor) / 127, scale_floor); s = 1 if s == 0.
struct QuantParams {
  float absmax_floor = 0.0f;
  float scale_floor = 0.0f;
};

// Same formula and rounding as the QDQ graph: Abs -> ReduceMax -> Div(127) [-> Max(eps)].
inline float row_scale(float absmax, const QuantParams& p) {
  float s = std::max(absmax, p.absmax_floor) / 127.0f;
  s = std::max(s, p.scale_floor);
  return (s > 0.0f) ? s : 1.0f;  // all-zero row: any scale gives q = 0, pick 1 (no 0/0)
}

// One GEMM problem on already-quantized activations: Y[M,N] = acc * a_scale[m] * b_scale[n] (+bias[n]).
struct GemmArgs {
  const int8_t* aq = nullptr;      // [M, K] int8, row stride K
  const float* a_scale = nullptr;  // [M]
  const int8_t* b = nullptr;       // [N, K] int8, row stride K
  const float* b_scale = nullptr;  // [N]
  const float* bias = nullptr;     // [N] or null
  float* y = nullptr;              // [M, N]
  int64_t M = 0, N = 0, K = 0;
};

#define EQC_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                         \
  float quantize_row(const float* a, int64_t K, const QuantParams& p, int8_t* q);        \
  void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);     \
  }

EQC_DECLARE_ISA(generic)
EQC_DECLARE_ISA(avx2)
EQC_DECLARE_ISA(avx512)
EQC_DECLARE_ISA(avx512vnni)
#undef EQC_DECLARE_ISA

}  // namespace cpu
}  // namespace eqc
