// CPU driver for ai.eqc::FusedInt8Gemm: quantize rows, then a tiled int8 GEMM, with work split
// over a caller-supplied parallel-for (onnxruntime's intra-op thread pool inside the op).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "cpu_kernels.h"

namespace eqc {
namespace cpu {

// parallel_for(total, fn) must call fn(i) exactly once for every i in [0, total).
using ParallelFor = std::function<void(int64_t total, const std::function<void(int64_t)>& fn)>;

// Name of the kernel variant picked for this CPU ("avx512", "avx2" or "generic").
const char* isa_name();

// Full op: Y[M,N] = dequant(int8(A) x B^T). A [M,K] float, B [N,K] int8. `workspace` must hold
// M*K bytes + M floats (see workspace_bytes). Serial when parallel_for is empty. `b_colsum` ([N], may be
// null): each row of B summed, precomputed when B is a constant (column_sums), else summed per call.
size_t workspace_bytes(int64_t M, int64_t K);
void fused_int8_gemm(const float* A, const int8_t* B, const float* b_scale, const float* bias, float* Y,
                     int64_t M, int64_t N, int64_t K, const QuantParams& qp, void* workspace,
                     const ParallelFor& parallel_for, const int32_t* b_colsum = nullptr);

// Sum of each of B's N rows of K int8 codes (what the VNNI kernel subtracts after its unsigned shift).
std::vector<int32_t> column_sums(const int8_t* B, int64_t N, int64_t K);

// Weight-only op: Y[M,N] = (A x float(B)^T) * b_scale (+ bias). activation_bits 0: float math (no activation
// quantization), summation order fixed by WeightGemmArgs; 16: A's rows as int16 (Weight16GemmArgs).
void int8_weight_gemm(const float* A, const int8_t* B, const float* b_scale, const float* bias, float* Y,
                      int64_t M, int64_t N, int64_t K, const ParallelFor& parallel_for, int activation_bits = 0);

// One row of A as int16 codes (absmax / 32767 per row, half to even, NaN -> 0); returns its scale.
float quantize_row16(const float* a, int64_t K, int16_t* q);

}  // namespace cpu
}  // namespace eqc
