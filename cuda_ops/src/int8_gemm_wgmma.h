// Hopper (sm_90a) int8 GEMM on warpgroup MMA (wgmma), same contract as the mma.sync kernel:
// Y[M,N] = ((float)(Aq[M,ld] . B[N,ld]^T) * a_scale[m]) * b_scale[n] (+ bias[n]).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace eqc_wgmma {

// CTA tile shapes (rows x columns of Y); s4 = four pipeline stages instead of three; x2 = sized
// (3 stages, <= 128 registers) so that two CTAs share an SM and overlap each other's prologue/epilogue.
enum class Shape { k64x128, k128x128, k128x256, k128x256s4, k256x128, k128x128x2 };

// True when this library holds sm_90a code and the current device runs it (compute 9.0).
bool available();

cudaError_t launch(Shape shape, const int8_t* Aq, const float* a_scale, const int8_t* B, const float* b_scale,
                   const float* bias, float* Y, int M, int N, int ld, cudaStream_t stream, bool pdl);

}  // namespace eqc_wgmma
