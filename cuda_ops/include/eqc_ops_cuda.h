/* Plain C entry points of libeqc_ops_cuda.so, for ctypes / torch harnesses that have no
 * onnxruntime-gpu. All pointers are device pointers; work is queued on `stream` (0 = legacy
 * default stream). Functions return 0 on success or a cudaError_t code; see
 * eqc_cuda_error_string(). */
#ifndef EQC_OPS_CUDA_H_
#define EQC_OPS_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EQC_EXPORT __attribute__((visibility("default")))

/* Y[M,N] = dequant(quant_rows(A)[M,K] x B[N,K]^T) * B_scale[n] (+ bias[n]).
 * Scratch memory comes from the stream-ordered allocator (cudaMallocAsync). */
EQC_EXPORT int eqc_fused_int8_gemm_cuda(const float* A, const int8_t* B, const float* B_scale,
                                        const float* bias, float* Y, int M, int N, int K, void* stream);

/* Same, with the QDQ floors (see README) and caller-provided scratch of at least
 * eqc_fused_int8_gemm_cuda_workspace_size(M, N, K) bytes (workspace may be NULL = allocate). */
EQC_EXPORT size_t eqc_fused_int8_gemm_cuda_workspace_size(int M, int N, int K);
EQC_EXPORT int eqc_fused_int8_gemm_cuda_ex(const float* A, const int8_t* B, const float* B_scale,
                                           const float* bias, float* Y, int M, int N, int K,
                                           float absmax_floor, float scale_floor, void* workspace,
                                           size_t workspace_bytes, void* stream);

/* The two stages separately (for benchmarks against torch._int_mm):
 * per-token quantization A[M,K] -> Aq[M,ldq] int8 (zero padded to ldq >= K) and scales[M]. */
EQC_EXPORT int eqc_quantize_rows_cuda(const float* A, int8_t* Aq, float* a_scale, int M, int K, int ldq,
                                      float absmax_floor, float scale_floor, void* stream);
/* int8 tensor-core GEMM with dequantize(+bias) epilogue. Aq [M,ld], B [N,ld] with ld % 16 == 0,
 * both 16-byte aligned, zero padded beyond K. */
EQC_EXPORT int eqc_int8_gemm_dequant_cuda(const int8_t* Aq, const float* a_scale, const int8_t* B,
                                          const float* B_scale, const float* bias, float* Y, int M, int N,
                                          int ld, void* stream);

/* The GEMM stage with a chosen kernel, for benchmarks: 0 = auto (what the op uses), 1..count-1 =
 * the variants named by eqc_cuda_variant_name. Returns cudaErrorNotSupported (801) for a wgmma
 * variant where no sm_90a code runs. */
EQC_EXPORT int eqc_int8_gemm_dequant_cuda_variant(const int8_t* Aq, const float* a_scale, const int8_t* B,
                                                  const float* B_scale, const float* bias, float* Y, int M, int N,
                                                  int ld, int variant, void* stream);
EQC_EXPORT int eqc_cuda_variant_count(void);
EQC_EXPORT const char* eqc_cuda_variant_name(int variant);
/* The variant auto picks for an [M,K] x [K,N] product on the current device. */
EQC_EXPORT int eqc_cuda_chosen_variant(int M, int N, int K);
/* 1 when the Hopper (wgmma, sm_90a) kernels run on the current device. */
EQC_EXPORT int eqc_cuda_wgmma_available(void);

EQC_EXPORT const char* eqc_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* EQC_OPS_CUDA_H_ */
