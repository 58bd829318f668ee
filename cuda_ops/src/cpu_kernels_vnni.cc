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

}  // namespace

float quantize_row(const float* a, int64_t K, const QuantParams& p, int8_t* q) {
  return avx512::quantize_row(a, K, p, q);
}

void weight_gemm_tile(const WeightGemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* panel) {
  avx512::weight_gemm_tile(g, m0, m1, n0, n1, panel);
}

void gemm_tile(const GemmArgs& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = 4, NR = 4;
  // 128 * column sum of B for this tile's columns (the unsigned-shift correction).
  constexpr int64_t kMaxCols = 1024;
  int32_t shift[kMaxCols + NR] = {0};  // past the last column: read for dropped edge results only
  for (int64_t c0 = n0; c0 < n1; c0 += kMaxCols) {
    const int64_t c1 = std::min(n1, c0 + kMaxCols);
    for (int64_t n = c0; n < c1; ++n) shift[n - c0] = 128 * row_sum(g.b + n * g.K, g.K);
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
