// AVX2 int8 GEMM tile and row quantization (compiled with -mavx2; chosen at run time on CPUs
// without AVX-512). Without VNNI the int8 dot product is vpmovsxbw (16 int8 -> int16) followed by
// vpmaddwd (int16 x int16, adjacent products summed into int32): exact for every int8 input, which
// vpmaddubsw is not (its int16 pair sums saturate; the trap onnxruntime's u8s8 AVX2 path falls into).
// GCC does not find this form on its own: from the portable loops it emits vpmullw + two
// vpmovsxwd per 16 products, about 3x slower (tools/results/cpu_fused_gemm_avx2.md).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

namespace eqc {
namespace cpu {
namespace avx2 {

namespace {

inline __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// MR x NR int32 dot products over the full K. The K % 16 tail is summed in scalar code.
template <int MR, int NR>
inline void dot_block(const int8_t* const* a, const int8_t* const* b, int64_t K, int32_t* out) {
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256i bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = widen16(b[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256i av = widen16(a[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av, bv[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      int32_t s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += int32_t(a[i][t]) * int32_t(b[j][t]);
      out[i * NR + j] = s;
    }
}

// 8 quantized values as int32: x / s rounded half to even (the MXCSR default, as std::nearbyint),
// NaN -> 0 (what the portable kernel's float -> int conversion gives), clamped to [-128, 127].
inline __m256i quantize8(const float* p, __m256 s) {
  const __m256 x = _mm256_div_ps(_mm256_loadu_ps(p), s);
  __m256 r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_and_ps(r, _mm256_cmp_ps(x, x, _CMP_ORD_Q));
  r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-128.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(r);
}

// ---- weight-only: float A x int8 B (see WeightGemmArgs for the summation order) ----------------

inline __m256 widen8f(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Same tree as reduce_lanes: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
inline float reduce8(__m256 v) {
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
}

// Decode (M < 16): MR rows x NR columns in kFloatLanes lanes, B widened from int8 on the fly and
// shared by the MR rows (the order of each output's sum does not depend on MR or NR).
template <int MR, int NR>
inline void weight_rows(const WeightGemmArgs& g, int64_t m0, int64_t n0, int nr) {
  const int64_t K = g.K;
  const float* a[MR];
  const int8_t* b[NR];
  for (int i = 0; i < MR; ++i) a[i] = g.a + (m0 + i) * K;
  for (int j = 0; j < NR; ++j) b[j] = g.b + (n0 + std::min(j, nr - 1)) * K;
  prefetch_rows(g.b, g.N, K, n0 + NR, NR);
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + kFloatLanes <= K; k += kFloatLanes) {
    __m256 bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = widen8f(b[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_loadu_ps(a[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  float sums[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) sums[i][j] = reduce8(acc[i][j]);  // constant indices (see outer_block)
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < nr; ++j) {
      float s = sums[i][j];
      for (int64_t t = k; t < K; ++t) s = std::fma(a[i][t], static_cast<float>(b[j][t]), s);
      store_weight_gemm(g, m0 + i, n0 + j, s);
    }
}

// Prefill: kRowsTile (16) rows x 6 columns as outer products, every output one sequential FMA chain
// over k. A is packed transposed ([K][16], zero rows past the tile) so each k reads 2 vectors of
// rows; B's float panel ([cols][K]) is read by broadcasts. 12 accumulators + 2 A + 1 B registers,
// as named variables: GCC kept an accumulator array in memory, storing it on every k.
constexpr int kRowsTile = int(kPackRows);
constexpr int kOuterCols = int(kWeightOuterCols);
constexpr int64_t kKBlock = 256;

// k in [k0, k1) only: the running sums of the 16 x 6 outputs are kept in `saved` (12 vectors)
// between K blocks, exactly, so the chain is the same as one pass over all of K.
inline void outer_block(const WeightGemmArgs& g, const float* at, const float* panel, int64_t m0, int rows,
                        int64_t n0, int64_t pc, int nr, int64_t k0, int64_t k1, float* saved) {
  const int64_t K = g.K;
  const float* b0 = panel + (pc + std::min(0, nr - 1)) * K;
  const float* b1 = panel + (pc + std::min(1, nr - 1)) * K;
  const float* b2 = panel + (pc + std::min(2, nr - 1)) * K;
  const float* b3 = panel + (pc + std::min(3, nr - 1)) * K;
  const float* b4 = panel + (pc + std::min(4, nr - 1)) * K;
  const float* b5 = panel + (pc + std::min(5, nr - 1)) * K;
  __m256 c00, c01, c02, c03, c04, c05, c10, c11, c12, c13, c14, c15;
  if (k0 == 0) {
    c00 = c01 = c02 = c03 = c04 = c05 = c10 = c11 = c12 = c13 = c14 = c15 = _mm256_setzero_ps();
  } else {
    c00 = _mm256_loadu_ps(saved), c10 = _mm256_loadu_ps(saved + 8), c01 = _mm256_loadu_ps(saved + 16);
    c11 = _mm256_loadu_ps(saved + 24), c02 = _mm256_loadu_ps(saved + 32), c12 = _mm256_loadu_ps(saved + 40);
    c03 = _mm256_loadu_ps(saved + 48), c13 = _mm256_loadu_ps(saved + 56), c04 = _mm256_loadu_ps(saved + 64);
    c14 = _mm256_loadu_ps(saved + 72), c05 = _mm256_loadu_ps(saved + 80), c15 = _mm256_loadu_ps(saved + 88);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 a0 = _mm256_loadu_ps(at + k * kRowsTile), a1 = _mm256_loadu_ps(at + k * kRowsTile + 8);
    __m256 bv = _mm256_broadcast_ss(b0 + k);
    c00 = _mm256_fmadd_ps(a0, bv, c00), c10 = _mm256_fmadd_ps(a1, bv, c10);
    bv = _mm256_broadcast_ss(b1 + k);
    c01 = _mm256_fmadd_ps(a0, bv, c01), c11 = _mm256_fmadd_ps(a1, bv, c11);
    bv = _mm256_broadcast_ss(b2 + k);
    c02 = _mm256_fmadd_ps(a0, bv, c02), c12 = _mm256_fmadd_ps(a1, bv, c12);
    bv = _mm256_broadcast_ss(b3 + k);
    c03 = _mm256_fmadd_ps(a0, bv, c03), c13 = _mm256_fmadd_ps(a1, bv, c13);
    bv = _mm256_broadcast_ss(b4 + k);
    c04 = _mm256_fmadd_ps(a0, bv, c04), c14 = _mm256_fmadd_ps(a1, bv, c14);
    bv = _mm256_broadcast_ss(b5 + k);
    c05 = _mm256_fmadd_ps(a0, bv, c05), c15 = _mm256_fmadd_ps(a1, bv, c15);
  }
  const __m256 lo[kOuterCols] = {c00, c01, c02, c03, c04, c05}, hi[kOuterCols] = {c10, c11, c12, c13, c14, c15};
  for (int j = 0; j < kOuterCols; ++j) {  // saved[j] = column j's 16 rows
    _mm256_storeu_ps(saved + j * kRowsTile, lo[j]);
    _mm256_storeu_ps(saved + j * kRowsTile + 8, hi[j]);
  }
  if (k1 < K) return;
  for (int j = 0; j < nr; ++j)
    for (int i = 0; i < rows; ++i) store_weight_gemm(g, m0 + i, n0 + pc + j, saved[j * kRowsTile + i]);
}

}  // namespace

void weight_gemm_tile(const WeightGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* panel) {
  if (g.M < kWeightGemmOuterRows) {  // decode: widen B on the fly, 4 x 2 blocks then 1 x 4 rows
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4)
      for (int64_t n = n0; n < n1; n += 2) weight_rows<4, 2>(g, m, n, int(std::min<int64_t>(2, n1 - n)));
    for (; m < m1; ++m)
      for (int64_t n = n0; n < n1; n += 4) weight_rows<1, 4>(g, m, n, int(std::min<int64_t>(4, n1 - n)));
    return;
  }
  // Widen the tile's columns once (exact: int8 -> float), then reuse them for every row block.
  const int64_t cols = n1 - n0;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* src = g.b + n * g.K;
    float* dst = panel + (n - n0) * g.K;
    int64_t k = 0;
    for (; k + kFloatLanes <= g.K; k += kFloatLanes) _mm256_storeu_ps(dst + k, widen8f(src + k));
    for (; k < g.K; ++k) dst[k] = static_cast<float>(src[k]);
  }
  float* saved = panel + cols * g.K;
  for (int64_t r0 = m0; r0 < m1; r0 += kRowsTile) {  // m0 is a multiple of kRowsTile (kWeightRowBlock)
    const int rows = int(std::min<int64_t>(kRowsTile, m1 - r0));
    const float* at = g.a_packed + (r0 / kRowsTile) * kRowsTile * g.K;
    // K blocks: the 16-row A block (kKBlock x 64 bytes) stays in L1 while every column group of the
    // tile passes over it; each group's running sums wait in `saved` for the next block.
    for (int64_t k0 = 0; k0 == 0 || k0 < g.K; k0 += kKBlock) {  // K = 0 still writes y = bias
      const int64_t k1 = std::min(g.K, k0 + kKBlock);
      for (int64_t c = 0; c < cols; c += kOuterCols)
        outer_block(g, at, panel, r0, rows, n0, c, int(std::min<int64_t>(kOuterCols, cols - c)), k0, k1,
                    saved + (c / kOuterCols) * kOuterCols * kRowsTile);
    }
  }
}

// MR rows x NR columns of weight16: per K block, vpmaddwd on int16 A and B widened from int8 (exact int32),
// each block's sum added to a float in block order (Weight16GemmArgs).
template <int MR, int NR>
inline void weight16_block(const Weight16GemmArgs& g, int64_t m0, int mr, int64_t n0, int nr) {
  const int64_t K = g.K;
  const int16_t* a[MR];
  const int8_t* b[NR];
  for (int i = 0; i < MR; ++i) a[i] = g.aq + (m0 + std::min(i, mr - 1)) * K;
  for (int j = 0; j < NR; ++j) b[j] = g.b + (n0 + std::min(j, nr - 1)) * K;
  float sum[MR][NR] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kInt16Block) {
    const int64_t k1 = std::min(K, k0 + kInt16Block);
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      __m256i bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = widen16(b[j] + k);
      for (int i = 0; i < MR; ++i) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[i] + k));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av, bv[j]));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) {
        int32_t s = hsum(acc[i][j]);
        for (int64_t t = k; t < k1; ++t) s += int32_t(a[i][t]) * int32_t(b[j][t]);
        sum[i][j] += static_cast<float>(s);
      }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) store_weight16_gemm(g, m0 + i, n0 + j, sum[i][j]);
}

void weight16_gemm_tile(const Weight16GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4)
    for (int64_t n = n0; n < n1; n += 2) weight16_block<4, 2>(g, m, 4, n, int(std::min<int64_t>(2, n1 - n)));
  for (; m < m1; ++m)
    for (int64_t n = n0; n < n1; n += 4) {
      prefetch_rows(g.b, g.N, g.K, n + 4, 4);
      weight16_block<1, 4>(g, m, 1, n, int(std::min<int64_t>(4, n1 - n)));
    }
}

float quantize_row(const float* a, int64_t K, const QuantParams& p, int8_t* q) {
  // absmax; max_ps returns its second operand when the first is NaN, so NaNs are skipped like
  // std::max(lane, NaN) in the portable kernel.
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    m0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(a + k), abs_mask), m0);
    m1 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(a + k + 8), abs_mask), m1);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
  float absmax = 0.0f;
  for (float v : lanes) absmax = std::max(absmax, v);
  for (; k < K; ++k) absmax = std::max(absmax, std::fabs(a[k]));

  const float s = row_scale(absmax, p);
  const __m256 sv = _mm256_set1_ps(s);
  // packs interleaves 128-bit lanes; this dword permutation puts the 32 bytes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256i lo = _mm256_packs_epi32(quantize8(a + k, sv), quantize8(a + k + 8, sv));
    const __m256i hi = _mm256_packs_epi32(quantize8(a + k + 16, sv), quantize8(a + k + 24, sv));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), bytes);
  }
  for (; k < K; ++k) {
    float v = std::nearbyint(a[k] / s);
    v = std::min(std::max(v, -128.0f), 127.0f);
    q[k] = static_cast<int8_t>(static_cast<int32_t>(v));
  }
  return s;
}

void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  // 8 accumulators + 2 B + 1 A + the vpmaddwd result: 12 of the 16 ymm registers. 4 x 3 needs 17
  // and spills; on the Zen 3 CI machine 4 x 2 ran ~1.3x faster than 4 x 3 or 3 x 4.
  constexpr int MR = 4, NR = 2;
  constexpr int NR1 = 8;         // single rows (decode, row remainders): 1 x 8
  int64_t m = m0;
  for (; m + MR <= m1; m += MR)
    for (int64_t n = n0; n < n1; n += NR) gemm_block<MR, NR>(g, m, MR, n, int(std::min<int64_t>(NR, n1 - n)), dot_block<MR, NR>);
  for (; m < m1; ++m)
    for (int64_t n = n0; n < n1; n += NR1) {
      prefetch_rows(g.b, g.N, g.K, n + NR1, NR1);  // single rows stream B once
      gemm_block<1, NR1>(g, m, 1, n, int(std::min<int64_t>(NR1, n1 - n)), dot_block<1, NR1>);
    }
}

}  // namespace avx2
}  // namespace cpu
}  // namespace eqc
