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

// Weight-only problem: Y[M,N] = (sum_k A[m,k] * float(B[n,k])) * b_scale[n] (+bias[n]), float math.
// Every variant sums in the same order (below), so results do not depend on the CPU, the thread
// count or the tiling.
struct WeightGemmArgs {
  const float* a = nullptr;        // [M, K] float, row stride K
  const int8_t* b = nullptr;       // [N, K] int8, row stride K
  const float* b_scale = nullptr;  // [N]
  const float* bias = nullptr;     // [N] or null
  float* y = nullptr;              // [M, N]
  int64_t M = 0, N = 0, K = 0;
  // M >= kWeightGemmOuterRows: A packed once per call as [ceil(M/16)][K][16] (rows zero-padded),
  // see pack_rows_transposed; variants that do not use it ignore it.
  const float* a_packed = nullptr;
};
constexpr int kFloatLanes = 8;
constexpr int64_t kPackRows = 16;

// Row tile t of A ([16 rows][K]) stored transposed as [K][16], rows past M zero.
inline void pack_rows_transposed(const float* a, int64_t M, int64_t K, int64_t t, float* out) {
  float* dst = out + t * kPackRows * K;
  for (int64_t i = 0; i < kPackRows; ++i) {
    const int64_t m = t * kPackRows + i;
    if (m < M) {
      const float* src = a + m * K;
      for (int64_t k = 0; k < K; ++k) dst[k * kPackRows + i] = src[k];
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k * kPackRows + i] = 0.0f;
    }
  }
}
// Two summation orders, picked by M alone (so every CPU variant and thread count agrees):
//   M <  kWeightGemmOuterRows (decode): kFloatLanes FMA lanes over k, reduce_lanes, then the K tail;
//   M >= kWeightGemmOuterRows (prefill): one sequential FMA chain over k per output.
constexpr int64_t kWeightGemmOuterRows = 16;
// Scratch floats weight_gemm_tile needs for a tile of `cols` columns: the widened B panel, then
// kWeightSavedPerGroup running sums per group of up to 6 columns.
constexpr int64_t kWeightSavedPerGroup = 96;
inline int64_t weight_panel_floats(int64_t cols, int64_t K) { return cols * K + (cols / 6 + 1) * kWeightSavedPerGroup; }

// The lane reduction every variant uses: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
inline float reduce_lanes(const float* l) {
  const float x0 = l[0] + l[4], x1 = l[1] + l[5], x2 = l[2] + l[6], x3 = l[3] + l[7];
  return (x0 + x2) + (x1 + x3);
}

// `panel` is scratch of weight_panel_floats(n1 - n0, K) floats: a variant may widen B there once
// and reuse it for every row of the tile.
#define EQC_DECLARE_ISA(ns)                                                                      \
  namespace ns {                                                                                 \
  float quantize_row(const float* a, int64_t K, const QuantParams& p, int8_t* q);                \
  void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);             \
  void weight_gemm_tile(const WeightGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, \
                        float* panel);                                                           \
  }

EQC_DECLARE_ISA(generic)
EQC_DECLARE_ISA(avx2)
EQC_DECLARE_ISA(avx512)
EQC_DECLARE_ISA(avx512vnni)
#undef EQC_DECLARE_ISA

}  // namespace cpu
}  // namespace eqc
