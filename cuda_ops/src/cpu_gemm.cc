#include "cpu_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace eqc {
namespace cpu {

namespace {

using QuantFn = float (*)(const float*, int64_t, const QuantParams&, int8_t*);
using TileFn = void (*)(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);
using WeightTileFn = void (*)(const WeightGemmArgs&, int64_t, int64_t, int64_t, int64_t, float*);
using Weight16TileFn = void (*)(const Weight16GemmArgs&, int64_t, int64_t, int64_t, int64_t);

struct Isa {
  const char* name;
  QuantFn quantize_row;
  TileFn gemm_tile;
  WeightTileFn weight_gemm_tile;
  Weight16TileFn weight16_gemm_tile;
};

bool cpu_has(const char* name) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const std::string n = name;
  if (n == "avx512vnni")
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
  if (n == "avx512")
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
  if (n == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
#endif
  return std::string(name) == "generic";
}

// Fastest variant this CPU runs; EQC_CPU_ISA=<name> forces a slower one (tests use it to cover
// every variant on one machine). An unknown or unsupported name is ignored.
Isa pick_isa() {
  const Isa all[] = {
#if defined(EQC_HAVE_AVX512VNNI)
      {"avx512vnni", avx512vnni::quantize_row, avx512vnni::gemm_tile, avx512vnni::weight_gemm_tile, avx512vnni::weight16_gemm_tile},
#endif
#if defined(EQC_HAVE_AVX512)
      {"avx512", avx512::quantize_row, avx512::gemm_tile, avx512::weight_gemm_tile, avx512::weight16_gemm_tile},
#endif
#if defined(EQC_HAVE_AVX2)
      {"avx2", avx2::quantize_row, avx2::gemm_tile, avx2::weight_gemm_tile, avx2::weight16_gemm_tile},
#endif
      {"generic", generic::quantize_row, generic::gemm_tile, generic::weight_gemm_tile, generic::weight16_gemm_tile},
  };
  const char* forced = std::getenv("EQC_CPU_ISA");
  if (forced != nullptr)
    for (const Isa& v : all)
      if (std::string(forced) == v.name && cpu_has(v.name)) return v;
  for (const Isa& v : all)
    if (cpu_has(v.name)) return v;
  return all[sizeof(all) / sizeof(all[0]) - 1];
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

constexpr int64_t kRowBlock = 32;     // rows per task (multiple of the 4-row micro-kernel)
constexpr int64_t kL2Bytes = 256 << 10;
constexpr int64_t kWeightRowBlock = 128;  // rows per weight-only task: the widened B panel is reused 128x

// Column block: enough columns that a task does real work, few enough that its slice of B
// (cols x K bytes) stays in L2 while the task's rows stream past it.
int64_t col_block(int64_t N, int64_t K) {
  int64_t cols = std::max<int64_t>(8, kL2Bytes / std::max<int64_t>(K, 1));
  cols = std::min<int64_t>(cols, 256);
  cols = (cols + 3) / 4 * 4;
  return std::min(cols, std::max<int64_t>(N, 1));
}

// Column block of an M-row problem. Decode (a few rows): the work is N x K bytes of B, so split N finely
// enough that both cores of a small layer get an even share (576 columns in 256-column blocks gave one core
// 2 of 3 tasks).
constexpr int64_t kDecodeRows = 4;
int64_t tile_cols(int64_t M, int64_t N, int64_t K) {
  if (M >= kDecodeRows) return col_block(N, K);
  const int64_t even = std::max<int64_t>(32, (N / 16 + 7) / 8 * 8);
  return std::min(col_block(N, K), even);
}

void run(const ParallelFor& pf, int64_t total, const std::function<void(int64_t)>& fn) {
  if (total <= 0) return;
  if (!pf || total == 1) {
    for (int64_t i = 0; i < total; ++i) fn(i);
    return;
  }
  pf(total, fn);
}

// Weight-only column block: its float panel (cols x K x 4 bytes) stays in a core's L2 share.
int64_t weight_col_block(int64_t N, int64_t K) {
  int64_t cols = std::max<int64_t>(8, (192 << 10) / (4 * std::max<int64_t>(K, 1)));
  cols = std::min<int64_t>(cols, 256) / 4 * 4;
  return std::min(cols, std::max<int64_t>(N, 1));
}

// Row blocks x column blocks as parallel tasks: fn(m0, m1, n0, n1) once per tile.
void for_each_tile(const ParallelFor& pf, int64_t M, int64_t N, int64_t rows, int64_t cols,
                   const std::function<void(int64_t, int64_t, int64_t, int64_t)>& fn) {
  const int64_t ncol = (N + cols - 1) / cols;
  const int64_t nrow = (M + rows - 1) / rows;
  run(pf, nrow * ncol, [&](int64_t t) {
    const int64_t r = t / ncol, c = t % ncol;
    fn(r * rows, std::min(M, (r + 1) * rows), c * cols, std::min(N, (c + 1) * cols));
  });
}

// Row tile t of A ([kPackRows rows][K]) stored transposed as [K][kPackRows], rows past M zero.
void pack_rows_transposed(const float* a, int64_t M, int64_t K, int64_t t, float* out) {
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

}  // namespace

const char* isa_name() { return isa().name; }

size_t workspace_bytes(int64_t M, int64_t K) {
  const size_t q = static_cast<size_t>(M) * static_cast<size_t>(K);
  return (q + 63) / 64 * 64 + static_cast<size_t>(M) * sizeof(float);
}

void fused_int8_gemm(const float* A, const int8_t* B, const float* b_scale, const float* bias, float* Y,
                     int64_t M, int64_t N, int64_t K, const QuantParams& qp, void* workspace,
                     const ParallelFor& parallel_for, const int32_t* b_colsum) {
  if (M <= 0 || N <= 0) return;
  const Isa& k = isa();
  auto* aq = static_cast<int8_t*>(workspace);
  auto* a_scale = reinterpret_cast<float*>(aq + (static_cast<size_t>(M) * K + 63) / 64 * 64);

  // 1) per-token quantization; chunks of rows so tiny rows don't drown in scheduling overhead.
  const int64_t qrows = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(K, 1));
  const int64_t qtasks = (M + qrows - 1) / qrows;
  run(parallel_for, qtasks, [&](int64_t t) {
    const int64_t m1 = std::min(M, (t + 1) * qrows);
    for (int64_t m = t * qrows; m < m1; ++m) a_scale[m] = k.quantize_row(A + m * K, K, qp, aq + m * K);
  });

  // 2) tiled int8 GEMM + dequantize epilogue, tasks = row blocks x column blocks.
  GemmArgs g;
  g.aq = aq;
  g.a_scale = a_scale;
  g.b = B;
  g.b_scale = b_scale;
  g.bias = bias;
  g.y = Y;
  g.M = M;
  g.N = N;
  g.K = K;
  g.b_colsum = b_colsum;
  for_each_tile(parallel_for, M, N, kRowBlock, tile_cols(M, N, K),
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.gemm_tile(g, m0, m1, n0, n1); });
}

std::vector<int32_t> column_sums(const int8_t* B, int64_t N, int64_t K) {
  std::vector<int32_t> sums(static_cast<size_t>(std::max<int64_t>(N, 0)));
  for (int64_t n = 0; n < N; ++n) {
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) s += B[n * K + k];
    sums[static_cast<size_t>(n)] = s;
  }
  return sums;
}

float quantize_row16(const float* a, int64_t K, int16_t* q) {
  float absmax = 0.0f;
  for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::fabs(a[k]));  // NaN skipped, as quantize_row
  float s = absmax / kInt16Max;
  if (!(s > 0.0f)) s = 1.0f;  // an all-zero row: any scale gives q = 0
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(a[k] / s);
    if (v != v) v = 0.0f;  // NaN -> 0
    v = std::min(std::max(v, -kInt16Max), kInt16Max);
    q[k] = static_cast<int16_t>(v);
  }
  return s;
}

namespace {

void int8_weight_gemm16(const float* A, const int8_t* B, const float* b_scale, const float* bias, float* Y,
                        int64_t M, int64_t N, int64_t K, const ParallelFor& parallel_for) {
  std::vector<int16_t> aq(static_cast<size_t>(M * K));
  std::vector<float> a_scale(static_cast<size_t>(M));
  const int64_t qrows = std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(K, 1));
  run(parallel_for, (M + qrows - 1) / qrows, [&](int64_t t) {
    for (int64_t m = t * qrows; m < std::min(M, (t + 1) * qrows); ++m)
      a_scale[static_cast<size_t>(m)] = quantize_row16(A + m * K, K, aq.data() + m * K);
  });
  Weight16GemmArgs g;
  g.aq = aq.data();
  g.a_scale = a_scale.data();
  g.b = B;
  g.b_scale = b_scale;
  g.bias = bias;
  g.y = Y;
  g.M = M;
  g.N = N;
  g.K = K;
  const Isa& k = isa();
  for_each_tile(parallel_for, M, N, kRowBlock, tile_cols(M, N, K),
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) { k.weight16_gemm_tile(g, m0, m1, n0, n1); });
}

}  // namespace

void int8_weight_gemm(const float* A, const int8_t* B, const float* b_scale, const float* bias, float* Y,
                      int64_t M, int64_t N, int64_t K, const ParallelFor& parallel_for, int activation_bits) {
  if (M <= 0 || N <= 0) return;
  if (activation_bits == 16) return int8_weight_gemm16(A, B, b_scale, bias, Y, M, N, K, parallel_for);
  const Isa& k = isa();
  WeightGemmArgs g;
  g.a = A;
  g.b = B;
  g.b_scale = b_scale;
  g.bias = bias;
  g.y = Y;
  g.M = M;
  g.N = N;
  g.K = K;
  // Prefill: A transposed into kPackRows-row tiles once, shared by every column block.
  const bool prefill = M >= kWeightGemmOuterRows;
  std::vector<float> packed;
  if (prefill) {
    const int64_t tiles = (M + kPackRows - 1) / kPackRows;
    packed.resize(static_cast<size_t>(tiles * kPackRows * K));
    run(parallel_for, tiles, [&](int64_t t) { pack_rows_transposed(A, M, K, t, packed.data()); });
    g.a_packed = packed.data();
  }
  const int64_t nb = weight_col_block(N, K);
  for_each_tile(parallel_for, M, N, kWeightRowBlock, nb, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    thread_local std::vector<float> panel;  // per pool thread, grown once
    const auto need = static_cast<size_t>(weight_panel_floats(nb, K));
    if (prefill && panel.size() < need) panel.resize(need);  // decode tiles need no scratch
    k.weight_gemm_tile(g, m0, m1, n0, n1, panel.data());
  });
}

}  // namespace cpu
}  // namespace eqc
