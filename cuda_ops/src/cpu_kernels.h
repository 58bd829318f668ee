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
  const int32_t* b_colsum = nullptr;  // [N] sums of B's rows, or null (variants that need them sum per call)
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
  // M >= kWeightGemmOuterRows: A packed once per call (cpu_gemm.cc) as [ceil(M/kPackRows)][K][kPackRows],
  // rows zero-padded; variants that do not use it ignore it.
  const float* a_packed = nullptr;
};
constexpr int kFloatLanes = 8;
// Two summation orders, picked by M alone (so every CPU variant and thread count agrees):
//   M <  kWeightGemmOuterRows (decode): kFloatLanes FMA lanes over k, reduce_lanes, then the K tail;
//   M >= kWeightGemmOuterRows (prefill): one sequential FMA chain over k per output.
constexpr int64_t kWeightGemmOuterRows = 16;
// The AVX2 prefill kernel's tile: kPackRows rows (the packed A tile) x kWeightOuterCols columns.
constexpr int64_t kPackRows = 16;
constexpr int64_t kWeightOuterCols = 6;
// Scratch floats weight_gemm_tile needs for a tile of `cols` columns: the widened B panel, then the
// running sums (kPackRows x kWeightOuterCols) of every column group.
inline int64_t weight_panel_floats(int64_t cols, int64_t K) {
  return cols * K + (cols / kWeightOuterCols + 1) * kWeightOuterCols * kPackRows;
}

// Weight-only with int16 activations (Int8WeightGemm activation_bits=16): each row of A quantized to int16
// (a_scale = absmax / 32767, round half to even), then exact integer products summed in int32 over blocks of
// kInt16Block along K (512 * 32767 * 128 < 2^31: no block can overflow), each block's sum converted to float and
// added in block order: Y[m,n] = (sum_blocks float(block)) * a_scale[m] * b_scale[n] (+bias[n]). Integer sums are
// exact, so every variant, tiling and thread count gives the same bits.
struct Weight16GemmArgs {
  const int16_t* aq = nullptr;     // [M, K] int16, row stride K
  const float* a_scale = nullptr;  // [M]
  const int8_t* b = nullptr;       // [N, K] int8, row stride K
  const float* b_scale = nullptr;  // [N]
  const float* bias = nullptr;     // [N] or null
  float* y = nullptr;              // [M, N]
  int64_t M = 0, N = 0, K = 0;
};
constexpr int64_t kInt16Block = 512;
constexpr float kInt16Max = 32767.0f;

inline void store_weight16_gemm(const Weight16GemmArgs& g, int64_t m, int64_t n, float sum) {
  float y = (sum * g.a_scale[m]) * g.b_scale[n];
  if (g.bias) y += g.bias[n];
  g.y[m * g.N + n] = y;
}

// Decode reads each weight row once: ask for rows [row0, row0 + rows) of B ([N, K], contiguous) now.
// A row is one short stream (K bytes), too short for the hardware prefetcher to reach DRAM speed on
// its own (M = 1, K = 576, N = 49152 weight-only: 6.0 -> 2.9 ms on one core of the CI machine).
inline void prefetch_rows(const int8_t* b, int64_t N, int64_t K, int64_t row0, int64_t rows) {
  const int64_t end = std::min(N, row0 + rows) * K;
  for (int64_t off = row0 * K; off < end; off += 64) __builtin_prefetch(b + off, 0, 3);  // read, keep in all levels
}

// The epilogues every variant uses, in the numpy reference's float order (no FMA contraction).
inline void store_dequantized(const GemmArgs& g, int64_t m, int64_t n, int32_t acc) {
  float y = (static_cast<float>(acc) * g.a_scale[m]) * g.b_scale[n];
  if (g.bias) y += g.bias[n];
  g.y[m * g.N + n] = y;
}

inline void store_weight_gemm(const WeightGemmArgs& g, int64_t m, int64_t n, float sum) {
  float y = sum * g.b_scale[n];
  if (g.bias) y += g.bias[n];
  g.y[m * g.N + n] = y;
}

// Rows [m0, m0+mr) x cols [n0, n0+nr) through an ISA's fixed MR x NR int8 dot product
// dot(a_rows, b_rows, K, acc[MR*NR]); missing rows/cols reuse a valid pointer and their results are
// dropped (only at tile edges).
template <int MR, int NR, typename Dot>
inline void gemm_block(const GemmArgs& g, int64_t m0, int mr, int64_t n0, int nr, Dot&& dot) {
  const int8_t* a[MR];
  const int8_t* b[NR];
  for (int i = 0; i < MR; ++i) a[i] = g.aq + (m0 + std::min(i, mr - 1)) * g.K;
  for (int j = 0; j < NR; ++j) b[j] = g.b + (n0 + std::min(j, nr - 1)) * g.K;
  int32_t acc[MR * NR];
  dot(a, b, g.K, acc);
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) store_dequantized(g, m0 + i, n0 + j, acc[i * NR + j]);
}

// The lane reduction every variant uses: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
inline float reduce_lanes(const float* l) {
  const float x0 = l[0] + l[4], x1 = l[1] + l[5], x2 = l[2] + l[6], x3 = l[3] + l[7];
  return (x0 + x2) + (x1 + x3);
}

// `panel` is scratch of weight_panel_floats(n1 - n0, K) floats when M >= kWeightGemmOuterRows (else
// it may be null): a variant may widen B there once and reuse it for every row of the tile.
#define EQC_DECLARE_ISA(ns)                                                                      \
  namespace ns {                                                                                 \
  float quantize_row(const float* a, int64_t K, const QuantParams& p, int8_t* q);                \
  void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1);             \
  void weight_gemm_tile(const WeightGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, \
                        float* panel);                                                           \
  void weight16_gemm_tile(const Weight16GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1); \
  }

EQC_DECLARE_ISA(generic)
EQC_DECLARE_ISA(avx2)
EQC_DECLARE_ISA(avx512)
EQC_DECLARE_ISA(avx512vnni)
#undef EQC_DECLARE_ISA

}  // namespace cpu
}  // namespace eqc
