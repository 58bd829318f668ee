// Compiled once per ISA (EQC_ISA = generic | avx512): plain C++ loops written so that
// GCC's vectorizer turns the int8 dot products into widening multiply-adds (pmaddwd / vpmaddwd).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

#ifndef EQC_ISA
#error "EQC_ISA must name the ISA namespace"
#endif

namespace eqc {
namespace cpu {
namespace EQC_ISA {

namespace {

// Row absmax with 16 independent lanes so the loop vectorizes without -ffast-math.
inline float row_absmax(const float* __restrict a, int64_t K) {
  float lane[16] = {0};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int j = 0; j < 16; ++j) lane[j] = std::max(lane[j], std::fabs(a[k + j]));
  float m = 0.0f;
  for (int j = 0; j < 16; ++j) m = std::max(m, lane[j]);
  for (; k < K; ++k) m = std::max(m, std::fabs(a[k]));
  return m;
}

// MR x NR block of int32 dot products over the full K. Pointer arrays are indexed by constants
// after unrolling, so every accumulator lives in its own vector register.
template <int MR, int NR>
inline void dot_block(const int8_t* const* __restrict a, const int8_t* const* __restrict b, int64_t K,
                      int32_t* __restrict out) {
  int32_t acc[MR * NR] = {0};
  const int8_t* ap[MR];
  const int8_t* bp[NR];
  for (int i = 0; i < MR; ++i) ap[i] = a[i];
  for (int j = 0; j < NR; ++j) bp[j] = b[j];
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i * NR + j] += int32_t(ap[i][k]) * int32_t(bp[j][k]);
    }
  }
  for (int i = 0; i < MR * NR; ++i) out[i] = acc[i];
}

}  // namespace

float quantize_row(const float* __restrict a, int64_t K, const QuantParams& p, int8_t* __restrict q) {
  const float s = row_scale(row_absmax(a, K), p);
  // QuantizeLinear: saturate(round_half_to_even(x / s)). Division (not x * (1/s)) and the
  // default rounding mode (nearest-even) make this bit-identical to onnxruntime's kernel.
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(a[k] / s);
    v = std::min(std::max(v, -128.0f), 127.0f);
    q[k] = static_cast<int8_t>(static_cast<int32_t>(v));
  }
  return s;
}

void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  constexpr int MR = 4, NR = 4;  // 16 accumulators + 8 operands fit the 32 zmm registers
#else
  constexpr int MR = 4, NR = 2;  // 8 accumulators + 6 operands fit the 16 ymm/xmm registers
#endif
  constexpr int NR1 = 4;         // single-row (decode) kernel: 1 x 4
  int64_t m = m0;
  for (; m + MR <= m1; m += MR)
    for (int64_t n = n0; n < n1; n += NR) gemm_block<MR, NR>(g, m, MR, n, int(std::min<int64_t>(NR, n1 - n)), dot_block<MR, NR>);
  for (; m < m1; ++m)
    for (int64_t n = n0; n < n1; n += NR1) gemm_block<1, NR1>(g, m, 1, n, int(std::min<int64_t>(NR1, n1 - n)), dot_block<1, NR1>);
}

void weight_gemm_tile(const WeightGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* panel) {
#if defined(__AVX512F__)
  // Every AVX-512 CPU runs the AVX2 kernel (same order, so the same bits); these scalar loops would
  // make the weight-only op slow exactly on the CPUs that prefer this variant.
  return avx2::weight_gemm_tile(g, m0, m1, n0, n1, panel);
#endif
  (void)panel;
  // Reference order (see kWeightGemmOuterRows): FMA lanes + reduce_lanes + tail, or one FMA chain.
  for (int64_t m = m0; m < m1; ++m) {
    const float* a = g.a + m * g.K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* b = g.b + n * g.K;
      float s = 0.0f;
      int64_t k = 0;
      if (g.M < kWeightGemmOuterRows) {
        float lane[kFloatLanes] = {0};
        for (; k + kFloatLanes <= g.K; k += kFloatLanes)
          for (int j = 0; j < kFloatLanes; ++j) lane[j] = std::fma(a[k + j], static_cast<float>(b[k + j]), lane[j]);
        s = reduce_lanes(lane);
      }
      for (; k < g.K; ++k) s = std::fma(a[k], static_cast<float>(b[k]), s);
      store_weight_gemm(g, m, n, s);
    }
  }
}

void weight16_gemm_tile(const Weight16GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
#if defined(__AVX512F__)
  return avx2::weight16_gemm_tile(g, m0, m1, n0, n1);  // exact integer sums: the same bits, vectorized
#endif
  for (int64_t m = m0; m < m1; ++m) {
    const int16_t* a = g.aq + m * g.K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* b = g.b + n * g.K;
      float s = 0.0f;
      for (int64_t k0 = 0; k0 < g.K; k0 += kInt16Block) {
        const int64_t k1 = std::min(g.K, k0 + kInt16Block);
        int32_t block = 0;
        for (int64_t k = k0; k < k1; ++k) block += int32_t(a[k]) * int32_t(b[k]);
        s += static_cast<float>(block);
      }
      store_weight16_gemm(g, m, n, s);
    }
  }
}

}  // namespace EQC_ISA
}  // namespace cpu
}  // namespace eqc
