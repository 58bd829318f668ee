// AVX512-VNNI int8 GEMM tile (compiled with -mavx512vnni; chosen at run time when the CPU has it).
// vpdpbusd multiplies unsigned x signed bytes, so A is shifted to unsigned (a + 128, an xor with
// 0x80) and the shift is removed exactly afterwards:  sum (a+128)*b = sum a*b + 128 * sum b.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_kernels.h"

namespace eqc {
namespace cpu {
namespace avx512vnni {

namespace {

// 64 bytes of row p from k; past K the bytes are zero (b = 0 there, so the shifted a is harmless).
inline __m512i load64(const int8_t* p, int64_t k, int64_t K) {
  const int64_t rem = K - k;
  if (rem >= 64) return _mm512_loadu_si512(p + k);
  return _mm512_maskz_loadu_epi8(_bzhi_u64(~0ULL, static_cast<unsigned>(rem)), p + k);
}

template <int MR, int NR>
inline void dot_block(const int8_t* const* a, const int8_t* const* b, int64_t K, int32_t* out) {
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    __m512i bv[NR];
    for (int j = 0; j < NR; ++j) bv[j] = load64(b[j], k, K);
    for (int i = 0; i < MR; ++i) {
      const __m512i av = _mm512_xor_si512(load64(a[i], k, K), flip);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * NR + j] = _mm512_reduce_add_epi32(acc[i][j]);
}

inline int32_t row_sum(const int8_t* __restrict b, int64_t K) {
  int32_t s = 0;
  for (int64_t k = 0; k < K; ++k) s += b[k];
  return s;
}

// dot_block minus the unsigned shift of each column (128 * column sum of B): the signed dot products.
template <int MR, int NR>
inline auto unshifted(const int32_t* shift) {
  return [shift](const int8_t* const* a, const int8_t* const* b, int64_t K, int32_t* out) {
    dot_block<MR, NR>(a, b, K, out);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) out[i * NR + j] -= shift[j];
  };
}

// The horizontal sums of v[0..7] as one vector of 8 int32: a transposing add tree (24 instructions instead
// of 8 full reductions, which took a quarter of a decode row's time at K = 576).
inline __m256i reduce8x(const __m512i* v) {
  auto pair = [](__m512i x, __m512i y) {  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
    return _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
  };
  auto quad = [](__m512i xy, __m512i zw) {  // per 128-bit lane: that lane's partial sum of x, y, z, w
    return _mm512_add_epi32(_mm512_unpacklo_epi64(xy, zw), _mm512_unpackhi_epi64(xy, zw));
  };
  const __m512i lo = quad(pair(v[0], v[1]), pair(v[2], v[3])), hi = quad(pair(v[4], v[5]), pair(v[6], v[7]));
  // [lo.L0+lo.L2, lo.L1+lo.L3, hi.L0+hi.L2, hi.L1+hi.L3], then the two halves of each added
  const __m512i r = _mm512_add_epi32(_mm512_shuffle_i32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_i32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i t = _mm512_add_epi32(_mm512_shuffle_i32x4(r, r, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_i32x4(r, r, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_castsi512_si256(t);
}

// One row (decode) x 8 columns [n0, n0 + nr), dequantized and stored. A row streams B once, so without
// precomputed column sums (g.b_colsum) the unsigned-shift correction is summed from the same loaded vectors
// (a second vpdpbusd with 0x80 bytes) rather than in a separate pass over B, which at M = 1 cost as much as
// the product itself. The epilogue is store_dequantized's float order, 8 columns at once.
template <bool kSumB>
inline void row_block8(const GemmArgs& g, int64_t m, int64_t n0, int nr) {
  constexpr int NR = 8;
  const int64_t K = g.K;
  const int8_t* a = g.aq + m * K;
  const int8_t* b[NR];
  for (int j = 0; j < NR; ++j) b[j] = g.b + (n0 + std::min(j, nr - 1)) * K;
  __m512i acc[NR], sum[NR];
  for (int j = 0; j < NR; ++j) acc[j] = sum[j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    const __m512i av = _mm512_xor_si512(load64(a, k, K), flip);
    for (int j = 0; j < NR; ++j) {
      const __m512i bv = load64(b[j], k, K);
      acc[j] = _mm512_dpbusd_epi32(acc[j], av, bv);
      if (kSumB) sum[j] = _mm512_dpbusd_epi32(sum[j], flip, bv);
    }
  }
  if (kSumB)
    for (int j = 0; j < NR; ++j) acc[j] = _mm512_sub_epi32(acc[j], sum[j]);
  const __mmask8 mask = static_cast<__mmask8>((1u << nr) - 1);
  __m256i dots = reduce8x(acc);
  if (!kSumB) dots = _mm256_sub_epi32(dots, _mm256_slli_epi32(_mm256_maskz_loadu_epi32(mask, g.b_colsum + n0), 7));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(g.a_scale[m])),
                           _mm256_maskz_loadu_ps(mask, g.b_scale + n0));
  if (g.bias) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(mask, g.bias + n0));
  _mm256_mask_storeu_ps(g.y + m * g.N + n0, mask, y);
}

// 32 int8 of B widened to int16 / 32 int16 of A, zero from k1 on (the end of the K block).
inline __m512i load_b16(const int8_t* p, int64_t k, int64_t k1) {
  const int64_t rem = k1 - k;
  if (rem >= 32) return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k)));
  return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(_bzhi_u32(~0u, static_cast<unsigned>(rem)), p + k));
}
inline __m512i load_a16(const int16_t* p, int64_t k, int64_t k1) {
  const int64_t rem = k1 - k;
  if (rem >= 32) return _mm512_loadu_si512(p + k);
  return _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, static_cast<unsigned>(rem)), p + k);
}

// MR x NR (8 or 16 outputs) of weight16 with vpdpwssd: exact int32 per K block, then each block's 8 sums at
// once (reduce8x) converted and added to the float sums, lane by lane in block order (Weight16GemmArgs).
template <int MR, int NR>
inline void weight16_block(const Weight16GemmArgs& g, int64_t m0, int mr, int64_t n0, int nr) {
  constexpr int T = MR * NR;
  static_assert(T % 8 == 0, "outputs are reduced 8 at a time");
  const int64_t K = g.K;
  const int16_t* a[MR];
  const int8_t* b[NR];
  for (int i = 0; i < MR; ++i) a[i] = g.aq + (m0 + std::min(i, mr - 1)) * K;
  for (int j = 0; j < NR; ++j) b[j] = g.b + (n0 + std::min(j, nr - 1)) * K;
  __m256 sum[T / 8];
  for (int t = 0; t < T / 8; ++t) sum[t] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += kInt16Block) {
    const int64_t k1 = std::min(K, k0 + kInt16Block);
    __m512i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32) {
      __m512i bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = load_b16(b[j], k, k1);
      for (int i = 0; i < MR; ++i) {
        const __m512i av = load_a16(a[i], k, k1);
        for (int j = 0; j < NR; ++j) acc[i * NR + j] = _mm512_dpwssd_epi32(acc[i * NR + j], av, bv[j]);
      }
    }
    for (int t = 0; t < T / 8; ++t) sum[t] = _mm256_add_ps(sum[t], _mm256_cvtepi32_ps(reduce8x(acc + 8 * t)));
  }
  float out[T];
  for (int t = 0; t < T / 8; ++t) _mm256_storeu_ps(out + 8 * t, sum[t]);
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) store_weight16_gemm(g, m0 + i, n0 + j, out[i * NR + j]);
}

}  // namespace

void weight16_gemm_tile(const Weight16GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4)
    for (int64_t n = n0; n < n1; n += 4) weight16_block<4, 4>(g, m, 4, n, int(std::min<int64_t>(4, n1 - n)));
  for (; m < m1; ++m)
    for (int64_t n = n0; n < n1; n += 8) {
      prefetch_rows(g.b, g.N, g.K, n + 8, 8);
      weight16_block<1, 8>(g, m, 1, n, int(std::min<int64_t>(8, n1 - n)));
    }
}

float quantize_row(const float* a, int64_t K, const QuantParams& p, int8_t* q) {
  return avx512::quantize_row(a, K, p, q);
}

void weight_gemm_tile(const WeightGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* panel) {
  avx512::weight_gemm_tile(g, m0, m1, n0, n1, panel);
}

void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = 4, NR = 4;
  constexpr int NR1 = 8;  // single rows: 1 x 8
  if (m1 - m0 < MR) {     // decode (or a short tail): every row streams B once
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = n0; n < n1; n += NR1) {
        prefetch_rows(g.b, g.N, g.K, n + NR1, NR1);
        const int nr = int(std::min<int64_t>(NR1, n1 - n));
        if (g.b_colsum)
          row_block8<false>(g, m, n, nr);
        else
          row_block8<true>(g, m, n, nr);
      }
    return;
  }
  // 128 * column sum of B for this tile's columns (the unsigned-shift correction).
  constexpr int64_t kMaxCols = 1024;
  int32_t shift[kMaxCols + NR] = {0};  // past the last column: read for dropped edge results only
  for (int64_t c0 = n0; c0 < n1; c0 += kMaxCols) {
    const int64_t c1 = std::min(n1, c0 + kMaxCols);
    for (int64_t n = c0; n < c1; ++n) shift[n - c0] = 128 * (g.b_colsum ? g.b_colsum[n] : row_sum(g.b + n * g.K, g.K));
    int64_t m = m0;
    for (; m + MR <= m1; m += MR)
      for (int64_t n = c0; n < c1; n += NR)
        gemm_block<MR, NR>(g, m, MR, n, int(std::min<int64_t>(NR, c1 - n)), unshifted<MR, NR>(shift + (n - c0)));
    for (; m < m1; ++m)
      for (int64_t n = c0; n < c1; n += NR)
        gemm_block<1, NR>(g, m, 1, n, int(std::min<int64_t>(NR, c1 - n)), unshifted<1, NR>(shift + (n - c0)));
  }
}

}  // namespace avx512vnni
}  // namespace cpu
}  // namespace eqc
