// CUDA kernels for ai.eqc::FusedInt8Gemm (W8A8-dynamic linear layer):
//   1. quantize_rows_kernel : per-token absmax -> scale -> int8 (round half to even, saturate)
//   2. int8_gemm_kernel     : int8 x int8 -> int32 on tensor cores, dequantize(+bias) epilogue
//
// Why mma.sync.m16n8k32 (inline PTX) rather than WMMA or CUTLASS:
//   * WMMA's int8 shape is m16n16k16 and its fragment layout is opaque, so the per-row /
//     per-column dequantization epilogue would have to round-trip the accumulators through
//     shared memory. mma.sync has a documented register layout: the epilogue reads row/column
//     indices straight from the lane id and writes Y from registers, and each instruction does
//     k=32 (half the instruction count of WMMA's k16).
//   * ldmatrix feeds the documented A (row) / B (col) fragment layouts directly because B is
//     stored [N, K] (K contiguous), i.e. exactly the "col" operand mma.sync wants.
//   * CUTLASS would give a faster, autotuned kernel but is a large header-only dependency
//     (and its template instantiation alone would blow the 3-minute CI build budget for two
//     architectures). The same instruction runs on sm_80 and sm_90 (Hopper's wgmma would be
//     faster on sm_90, but needs TMA descriptors and is sm_90a-only).
//
// Numerics match the QDQ graph / CPU kernel bit for bit: IEEE division for x / s, nearest-even
// rounding, exact int32 accumulation, and an epilogue without FMA contraction
// ((float)acc * s_a) * s_b (+ bias).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "eqc_ops_cuda.h"
#include "int8_gemm_wgmma.h"
#include "launch.h"
#include "ptx.cuh"

namespace {
using namespace eqc_ptx;

// ------------------------------------------------------------------------------ quantization
constexpr int kQuantThreads = 256;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide max of per-thread values (THREADS a multiple of 32, at most 1024).
template <int THREADS>
__device__ __forceinline__ float block_max(float m) {
  __shared__ float red[32];
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < THREADS / 32 ? red[threadIdx.x] : 0.0f;
    m = warp_max(m);
    if (threadIdx.x == 0) red[0] = m;
  }
  __syncthreads();
  return red[0];
}

// The per-row scale of the op: max(max(absmax, absmax_floor) / 127, scale_floor), 1 for an all-zero row.
__device__ __forceinline__ float row_scale(float absmax, float absmax_floor, float scale_floor) {
  float s = fmaxf(__fdiv_rn(fmaxf(absmax, absmax_floor), 127.0f), scale_floor);
  return s > 0.0f ? s : 1.0f;
}

__device__ __forceinline__ int8_t quantize_one(float x, float s) {
  return static_cast<int8_t>(__float2int_rn(fminf(fmaxf(__fdiv_rn(x, s), -128.0f), 127.0f)));
}

// One block per row: absmax reduction, then a second (cache-hot) pass that writes int8.
// VEC: 16-byte loads and 4-byte stores (K % 4 == 0, aligned rows); same arithmetic per element.
template <bool VEC>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const float* __restrict__ A, int8_t* __restrict__ Aq, float* __restrict__ a_scale,
                         int K, int ldq, float absmax_floor, float scale_floor) {
  griddep_launch_dependents();  // the GEMM may start streaming B while rows are quantized
  const int row = blockIdx.x;
  const float* a = A + static_cast<size_t>(row) * K;
  float m = 0.0f;
  if constexpr (VEC) {
    const float4* a4 = reinterpret_cast<const float4*>(a);
#pragma unroll 4
    for (int i = threadIdx.x; i < K / 4; i += kQuantThreads) {
      const float4 v = a4[i];
      m = fmaxf(fmaxf(m, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
    }
  } else {
    for (int k = threadIdx.x; k < K; k += kQuantThreads) m = fmaxf(m, fabsf(a[k]));
  }
  const float s = row_scale(block_max<kQuantThreads>(m), absmax_floor, scale_floor);
  if (threadIdx.x == 0) a_scale[row] = s;
  int8_t* q = Aq + static_cast<size_t>(row) * ldq;
  if constexpr (VEC) {
    const float4* a4 = reinterpret_cast<const float4*>(a);
    char4* q4 = reinterpret_cast<char4*>(q);
#pragma unroll 4
    for (int i = threadIdx.x; i < ldq / 4; i += kQuantThreads) {
      char4 o = make_char4(0, 0, 0, 0);
      if (i < K / 4) {
        const float4 v = a4[i];
        o = make_char4(quantize_one(v.x, s), quantize_one(v.y, s), quantize_one(v.z, s), quantize_one(v.w, s));
      }
      q4[i] = o;
    }
  } else {
    for (int k = threadIdx.x; k < ldq; k += kQuantThreads) q[k] = k < K ? quantize_one(a[k], s) : int8_t(0);
  }
}

// Rows of K = 4 * (at most R * THREADS) floats: each thread keeps its R float4 in registers
// between the absmax and the quantization pass, so A is read from memory once. Same arithmetic
// per element as quantize_rows_kernel.
template <int THREADS, int R>
__global__ void __launch_bounds__(THREADS)
    quantize_rows_reg_kernel(const float* __restrict__ A, int8_t* __restrict__ Aq, float* __restrict__ a_scale,
                             int K, int ldq, float absmax_floor, float scale_floor) {
  griddep_launch_dependents();  // the GEMM may start streaming B while rows are quantized
  const int row = blockIdx.x, k4 = K / 4, ld4 = ldq / 4;
  const float4* a4 = reinterpret_cast<const float4*>(A + static_cast<size_t>(row) * K);
  float4 v[R];
  float m = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * THREADS;
    v[r] = i < k4 ? a4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    m = fmaxf(fmaxf(m, fmaxf(fabsf(v[r].x), fabsf(v[r].y))), fmaxf(fabsf(v[r].z), fabsf(v[r].w)));
  }
  const float s = row_scale(block_max<THREADS>(m), absmax_floor, scale_floor);
  if (threadIdx.x == 0) a_scale[row] = s;
  char4* q4 = reinterpret_cast<char4*>(Aq + static_cast<size_t>(row) * ldq);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = threadIdx.x + r * THREADS;
    if (i >= ld4) break;
    q4[i] = i < k4 ? make_char4(quantize_one(v[r].x, s), quantize_one(v[r].y, s), quantize_one(v[r].z, s),
                                quantize_one(v[r].w, s))
                   : make_char4(0, 0, 0, 0);
  }
  for (int i = R * THREADS + threadIdx.x; i < ld4; i += THREADS) q4[i] = make_char4(0, 0, 0, 0);  // ldq padding
}

using QuantKernel = void (*)(const float*, int8_t*, float*, int, int, float, float);

// The register-cached kernel for rows up to 16384 floats (256 threads up to 4096, else 1024).
bool pick_reg_quantizer(int K, QuantKernel* kernel, int* threads) {
  const int k4 = K / 4;
  static const QuantKernel small[4] = {quantize_rows_reg_kernel<256, 1>, quantize_rows_reg_kernel<256, 2>,
                                       quantize_rows_reg_kernel<256, 3>, quantize_rows_reg_kernel<256, 4>};
  static const QuantKernel large[4] = {quantize_rows_reg_kernel<1024, 1>, quantize_rows_reg_kernel<1024, 2>,
                                       quantize_rows_reg_kernel<1024, 3>, quantize_rows_reg_kernel<1024, 4>};
  if (k4 <= 4 * 256) {
    *kernel = small[k4 <= 256 ? 0 : (k4 - 1) / 256];
    *threads = 256;
    return true;
  }
  if (k4 <= 4 * 1024) {
    *kernel = large[(k4 - 1) / 1024];
    *threads = 1024;
    return true;
  }
  return false;
}

// Copies B [N, K] into a zero-padded [N, ld] buffer (only for K % 16 != 0 or unaligned B).
__global__ void pad_rows_kernel(const int8_t* __restrict__ B, int8_t* __restrict__ Bp, int N, int K, int ld) {
  const size_t total = static_cast<size_t>(N) * ld;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
    const size_t n = i / ld, k = i % ld;
    Bp[i] = k < static_cast<size_t>(K) ? B[n * K + k] : int8_t(0);
  }
}

// ------------------------------------------------------------------------------------ GEMM
// Tile: BM x BN outputs per CTA, BK bytes of K per pipeline stage, WARPS_M x WARPS_N warps.
// Shared-memory rows are padded to BK + 16 bytes: with BK a multiple of 64 the 8 row addresses
// of every ldmatrix 8x8 phase land in 8 distinct 16-byte bank groups (no conflicts, no swizzle).
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int LDS = BK + 16;
  static constexpr int SMEM = STAGES * (BM + BN) * LDS;
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of the mma shape");
  static_assert(BK % 64 == 0, "BK must be a multiple of 64 for the conflict-free padding");
  static_assert(NI == 1 || NI % 2 == 0, "B fragments are loaded two n8 blocks at a time");
};

template <class T>
__global__ void __launch_bounds__(T::THREADS)
    int8_gemm_kernel(const int8_t* __restrict__ Aq, const float* __restrict__ a_scale, const int8_t* __restrict__ B,
                     const float* __restrict__ b_scale, const float* __restrict__ bias, float* __restrict__ Y, int M,
                     int N, int ld) {
  extern __shared__ __align__(16) int8_t smem[];
  int8_t* sA = smem;
  int8_t* sB = smem + T::STAGES * T::BM * T::LDS;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / T::WARPS_N, wn = warp % T::WARPS_N;
  const int m0 = blockIdx.x * T::BM, n0 = blockIdx.y * T::BN;
  const int ktiles = (ld + T::BK - 1) / T::BK;

  // Global -> shared for one K tile; 16-byte chunks, rows past M/N and K past ld zero-filled.
  constexpr int CPR = T::BK / 16;
  auto load_a = [&](int stage, int kt) {
    const int k0 = kt * T::BK;
    int8_t* a_dst = sA + stage * T::BM * T::LDS;
#pragma unroll
    for (int c = tid; c < T::BM * CPR; c += T::THREADS) {
      const int r = c / CPR, kc = (c % CPR) * 16;
      const bool ok = (m0 + r < M) && (k0 + kc < ld);
      const int8_t* src = ok ? Aq + static_cast<size_t>(m0 + r) * ld + k0 + kc : Aq;
      cp_async16(a_dst + r * T::LDS + kc, src, ok ? 16 : 0);
    }
  };
  auto load_b = [&](int stage, int kt) {
    const int k0 = kt * T::BK;
    int8_t* b_dst = sB + stage * T::BN * T::LDS;
#pragma unroll
    for (int c = tid; c < T::BN * CPR; c += T::THREADS) {
      const int r = c / CPR, kc = (c % CPR) * 16;
      const bool ok = (n0 + r < N) && (k0 + kc < ld);
      const int8_t* src = ok ? B + static_cast<size_t>(n0 + r) * ld + k0 + kc : B;
      cp_async16(b_dst + r * T::LDS + kc, src, ok ? 16 : 0);
    }
  };

  int32_t acc[T::MI][T::NI][4];
#pragma unroll
  for (int i = 0; i < T::MI; ++i)
#pragma unroll
    for (int j = 0; j < T::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Prologue: STAGES-1 tiles in flight (empty groups keep the wait_group arithmetic uniform).
  // The weights are issued first: under programmatic dependent launch they do not depend on the
  // quantization kernel still running, only Aq / a_scale do (griddep_wait is a no-op otherwise).
#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s)
    if (s < ktiles) load_b(s, s);
  griddep_wait();
#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < ktiles) load_a(s, s);
    cp_async_commit();
  }

  // ldmatrix lane addressing (see PTX ISA "mma.m16n8k32" fragment layouts):
  //  A x4: matrices (rows 0-7,k 0-15) (rows 8-15,k 0-15) (rows 0-7,k 16-31) (rows 8-15,k 16-31)
  //        = registers a0..a3; lane l supplies row l%16, k offset (l/16)*16.
  //  B x4: matrices (n 0-7,k 0-15) (n 0-7,k 16-31) (n 8-15,k 0-15) (n 8-15,k 16-31)
  //        = b0,b1 of n-block j and b0,b1 of n-block j+1; lane l supplies n (l%8)+(l/16)*8,
  //        k offset ((l/8)%2)*16.
  const int a_row = wm * T::WM + (lane & 15);
  const int a_kof = (lane >> 4) * 16;
  const int b_row = wn * T::WN + (lane & 7) + ((lane >> 4) << 3);
  const int b_kof = ((lane >> 3) & 1) * 16;

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<T::STAGES - 2>();  // tile kt has landed (for this thread's copies) ...
    __syncthreads();                 // ... for everyone's, and stage (kt-1) is no longer read
    const int next = kt + T::STAGES - 1;
    if (next < ktiles) {
      load_a(next % T::STAGES, next);
      load_b(next % T::STAGES, next);
    }
    cp_async_commit();

    const int8_t* a_s = sA + (kt % T::STAGES) * T::BM * T::LDS;
    const int8_t* b_s = sB + (kt % T::STAGES) * T::BN * T::LDS;
#pragma unroll
    for (int kk = 0; kk < T::BK; kk += 32) {
      uint32_t af[T::MI][4];
      uint32_t bf[T::NI][2];
#pragma unroll
      for (int i = 0; i < T::MI; ++i) ldmatrix_x4(af[i], a_s + (a_row + i * 16) * T::LDS + kk + a_kof);
      if constexpr (T::NI == 1) {
        ldmatrix_x2(bf[0], b_s + (wn * T::WN + (lane & 7)) * T::LDS + kk + b_kof);
      } else {
#pragma unroll
        for (int j = 0; j < T::NI; j += 2) {
          uint32_t r[4];
          ldmatrix_x4(r, b_s + (b_row + j * 8) * T::LDS + kk + b_kof);
          bf[j][0] = r[0];
          bf[j][1] = r[1];
          bf[j + 1][0] = r[2];
          bf[j + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int i = 0; i < T::MI; ++i)
#pragma unroll
        for (int j = 0; j < T::NI; ++j) mma_s8(acc[i][j], af[i], bf[j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue straight from the accumulator layout: c0,c1 -> (row g, cols 2t,2t+1),
  // c2,c3 -> (row g+8, same cols), g = lane/4, t = lane%4.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < T::MI; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + wm * T::WM + i * 16 + g + half * 8;
      if (row >= M) continue;
      const float sa = a_scale[row];
      float* yrow = Y + static_cast<size_t>(row) * N;
#pragma unroll
      for (int j = 0; j < T::NI; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + wn * T::WN + j * 8 + 2 * t + e;
          if (col >= N) continue;
          float y = __fmul_rn(__fmul_rn(__int2float_rn(acc[i][j][half * 2 + e]), sa), b_scale[col]);
          if (bias) y = __fadd_rn(y, bias[col]);
          yrow[col] = y;
        }
      }
    }
  }
}

// Decode (M <= 16): one m16 row block, narrow N tiles so many CTAs stream B; deep K stages.
using SmallTile = Tile<16, 32, 128, 1, 4, 4>;
using SmallWideTile = Tile<16, 64, 128, 1, 4, 4>;
// Decode with twice the bytes in flight per CTA (large K, few CTAs).
using SmallDeepTile = Tile<16, 32, 256, 1, 4, 4>;
// Deeper decode pipelines: more weight bytes in flight per SM (the decode GEMM streams B once).
using NarrowDeepTile = Tile<16, 16, 256, 1, 2, 6>;   // 2x the CTAs of a 32-wide tile, 6 stages
using SmallDeeperTile = Tile<16, 32, 256, 1, 4, 8>;  // 8 stages (104 KB of shared memory)
using SmallWideKTile = Tile<16, 32, 512, 1, 4, 4>;   // 512-byte K stages
// Mid-size M or too few 128x128 tiles to fill the GPU.
using MediumTile = Tile<64, 64, 64, 2, 2, 4>;
// Prefill: 128x128 CTA tile, 8 warps of 64x32, 3 stages (61,440 B shared memory).
using LargeTile = Tile<128, 128, 64, 2, 4, 3>;

int sm_count() {
  static int count = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      n = 108;
    return n;
  }();
  return count;
}

constexpr int kMaxDevices = 64;

template <class T>
cudaError_t launch_gemm(const int8_t* Aq, const float* sa, const int8_t* B, const float* sb, const float* bias,
                        float* Y, int M, int N, int ld, cudaStream_t stream, bool pdl) {
  // > 48 KiB of dynamic shared memory must be opted into once per kernel and device.
  static std::atomic<bool> attr_set[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= kMaxDevices || !attr_set[dev].load(std::memory_order_acquire)) {
    err = cudaFuncSetAttribute(int8_gemm_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM);
    if (err != cudaSuccess) return err;
    if (dev < kMaxDevices) attr_set[dev].store(true, std::memory_order_release);
  }
  const dim3 grid((M + T::BM - 1) / T::BM, (N + T::BN - 1) / T::BN);
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  return eqc_launch::launch(int8_gemm_kernel<T>, grid, dim3(T::THREADS), T::SMEM, stream, pdl, Aq, sa, B, sb, bias, Y,
                            M, N, ld);
}

// Kernel variants; the numbering is the C API's (eqc_int8_gemm_dequant_cuda_variant).
enum Variant : int {
  kAuto = 0,
  kMma16x32,
  kMma16x64,
  kMma16x32k256,
  kMma16x16k256s6,
  kMma16x32k256s8,
  kMma16x32k512,
  kMma64x64,
  kMma128x128,
  kWgmma64x128,
  kWgmma128x128,
  kWgmma128x256,
  kWgmma128x256s4,
  kWgmma256x128,
  kWgmma128x128x2,
  kVariantCount
};
const char* const kVariantNames[kVariantCount] = {
    "auto",           "mma_16x32",   "mma_16x64",    "mma_16x32_k256", "mma_16x16_k256_s6",
    "mma_16x32_k256_s8", "mma_16x32_k512", "mma_64x64",   "mma_128x128",  "wgmma_64x128",
    "wgmma_128x128",  "wgmma_128x256", "wgmma_128x256_s4", "wgmma_256x128", "wgmma_128x128_x2"};

long long tiles(int M, int N, int bm, int bn) {
  return static_cast<long long>((M + bm - 1) / bm) * ((N + bn - 1) / bn);
}

// Picks a kernel from the problem shape. The thresholds come from the variant sweep on an H100
// (tools/results/cuda_gemm.md, "GEMM TOPS by kernel variant").
Variant choose_variant(int M, int N, int K) {
  const int sms = sm_count();
  const bool hopper = eqc_wgmma::available();
  if (M <= 16) {
    // Decode streams the weights once: deep K stages keep bytes in flight when few 32-column
    // CTAs share the SMs; with many CTAs (or short K) the 4-stage 256-byte tile is better.
    if (K <= 1024 || tiles(M, N, 16, 32) >= 2LL * sms) return kMma16x32k256;
    return kMma16x32k512;
  }
  if (M <= 64) {
    if (hopper && 2 * tiles(M, N, 64, 128) >= sms) return kWgmma64x128;
    return K <= 1024 ? kMma16x32k256 : kMma16x32k512;
  }
  if (hopper) {
    if (M >= 1024 && K >= 2048 && 10 * tiles(M, N, 256, 128) >= 9LL * sms) return kWgmma256x128;
    if (2 * tiles(M, N, 128, 128) >= sms) return K <= 2048 ? kWgmma128x128x2 : kWgmma128x128;
    return kWgmma64x128;
  }
  if (tiles(M, N, LargeTile::BM, LargeTile::BN) >= sms) return kMma128x128;
  return kMma64x64;
}

cudaError_t gemm_run(Variant v, const int8_t* Aq, const float* sa, const int8_t* B, const float* sb, const float* bias,
                     float* Y, int M, int N, int ld, cudaStream_t stream, bool pdl) {
  if (v == kAuto) v = choose_variant(M, N, ld);
  switch (v) {
    case kMma16x32: return launch_gemm<SmallTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma16x64: return launch_gemm<SmallWideTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma16x32k256: return launch_gemm<SmallDeepTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma16x16k256s6: return launch_gemm<NarrowDeepTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma16x32k256s8: return launch_gemm<SmallDeeperTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma16x32k512: return launch_gemm<SmallWideKTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma64x64: return launch_gemm<MediumTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kMma128x128: return launch_gemm<LargeTile>(Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    case kWgmma64x128:
    case kWgmma128x128:
    case kWgmma128x256:
    case kWgmma128x256s4:
    case kWgmma256x128:
    case kWgmma128x128x2: {
      if (!eqc_wgmma::available()) return cudaErrorNotSupported;  // needs sm_90a code on a 9.0 device
      using S = eqc_wgmma::Shape;
      const S shape = v == kWgmma64x128      ? S::k64x128
                      : v == kWgmma128x128   ? S::k128x128
                      : v == kWgmma128x256   ? S::k128x256
                      : v == kWgmma128x256s4 ? S::k128x256s4
                      : v == kWgmma256x128   ? S::k256x128
                                             : S::k128x128x2;
      return eqc_wgmma::launch(shape, Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
    }
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t gemm_dispatch(const int8_t* Aq, const float* sa, const int8_t* B, const float* sb, const float* bias,
                          float* Y, int M, int N, int ld, cudaStream_t stream, bool pdl) {
  return gemm_run(kAuto, Aq, sa, B, sb, bias, Y, M, N, ld, stream, pdl);
}

constexpr size_t align256(size_t n) { return (n + 255) / 256 * 256; }
int padded_ld(int K) { return (K + 15) / 16 * 16; }
bool needs_b_copy(const int8_t* B, int K) {
  return (K % 16) != 0 || (reinterpret_cast<uintptr_t>(B) % 16) != 0;
}

// Keep freed scratch in the stream-ordered pool instead of returning it to the driver at
// every synchronization (the default release threshold is 0).
void keep_pool_memory() {
  static std::once_flag once;
  std::call_once(once, [] {
    int dev = 0;
    cudaMemPool_t pool;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
      uint64_t threshold = UINT64_MAX;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
    }
  });
}

}  // namespace

extern "C" {

size_t eqc_fused_int8_gemm_cuda_workspace_size(int M, int N, int K) {
  const size_t ld = static_cast<size_t>(padded_ld(K));
  // A copy of B is only needed for K % 16 != 0 or an unaligned B; budget for it always.
  return align256(static_cast<size_t>(M) * ld) + align256(static_cast<size_t>(M) * sizeof(float)) +
         align256(static_cast<size_t>(N) * ld);
}

int eqc_quantize_rows_cuda(const float* A, int8_t* Aq, float* a_scale, int M, int K, int ldq, float absmax_floor,
                           float scale_floor, void* stream) {
  if (M < 0 || K < 0 || ldq < K) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const bool vec = K % 4 == 0 && ldq % 4 == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(Aq) % 4 == 0;
  QuantKernel kernel = vec ? quantize_rows_kernel<true> : quantize_rows_kernel<false>;
  int threads = kQuantThreads;
  if (vec && !pick_reg_quantizer(K, &kernel, &threads)) kernel = quantize_rows_kernel<true>;
  kernel<<<M, threads, 0, static_cast<cudaStream_t>(stream)>>>(A, Aq, a_scale, K, ldq, absmax_floor, scale_floor);
  return cudaGetLastError();
}

int eqc_int8_gemm_dequant_cuda(const int8_t* Aq, const float* a_scale, const int8_t* B, const float* B_scale,
                               const float* bias, float* Y, int M, int N, int ld, void* stream) {
  if (M < 0 || N < 0 || ld < 0 || ld % 16 != 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(Aq) % 16 || reinterpret_cast<uintptr_t>(B) % 16) return cudaErrorMisalignedAddress;
  if (M == 0 || N == 0) return cudaSuccess;
  return gemm_dispatch(Aq, a_scale, B, B_scale, bias, Y, M, N, ld, static_cast<cudaStream_t>(stream), false);
}

int eqc_int8_gemm_dequant_cuda_variant(const int8_t* Aq, const float* a_scale, const int8_t* B,
                                       const float* B_scale, const float* bias, float* Y, int M, int N, int ld,
                                       int variant, void* stream) {
  if (variant < 0 || variant >= kVariantCount) return cudaErrorInvalidValue;
  if (M < 0 || N < 0 || ld < 0 || ld % 16 != 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(Aq) % 16 || reinterpret_cast<uintptr_t>(B) % 16) return cudaErrorMisalignedAddress;
  if (M == 0 || N == 0) return cudaSuccess;
  return gemm_run(static_cast<Variant>(variant), Aq, a_scale, B, B_scale, bias, Y, M, N, ld,
                  static_cast<cudaStream_t>(stream), false);
}

int eqc_cuda_variant_count(void) { return kVariantCount; }

const char* eqc_cuda_variant_name(int variant) {
  return variant >= 0 && variant < kVariantCount ? kVariantNames[variant] : nullptr;
}

int eqc_cuda_chosen_variant(int M, int N, int K) {
  return M <= 0 || N <= 0 || K < 0 ? kAuto : choose_variant(M, N, padded_ld(K));
}

int eqc_cuda_wgmma_available(void) { return eqc_wgmma::available() ? 1 : 0; }

int eqc_fused_int8_gemm_cuda_ex(const float* A, const int8_t* B, const float* B_scale, const float* bias, float* Y,
                                int M, int N, int K, float absmax_floor, float scale_floor, void* workspace,
                                size_t workspace_bytes, void* stream) {
  if (M < 0 || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int ld = padded_ld(K);
  const size_t need = eqc_fused_int8_gemm_cuda_workspace_size(M, N, K);
  void* ws = workspace;
  cudaError_t err = cudaSuccess;
  if (ws == nullptr) {
    keep_pool_memory();
    if ((err = cudaMallocAsync(&ws, need, s)) != cudaSuccess) return err;
  } else if (workspace_bytes < need) {
    return cudaErrorInvalidValue;
  }
  auto* base = static_cast<char*>(ws);
  auto* aq = reinterpret_cast<int8_t*>(base);
  auto* sa = reinterpret_cast<float*>(base + align256(static_cast<size_t>(M) * ld));
  auto* bp = reinterpret_cast<int8_t*>(base + align256(static_cast<size_t>(M) * ld) +
                                       align256(static_cast<size_t>(M) * sizeof(float)));
  const int8_t* b_use = B;
  if (needs_b_copy(B, K)) {
    const size_t total = static_cast<size_t>(N) * ld;
    const int blocks = static_cast<int>((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
    pad_rows_kernel<<<blocks, 256, 0, s>>>(B, bp, N, K, ld);
    err = cudaGetLastError();
    b_use = bp;
  }
  if (err == cudaSuccess) err = static_cast<cudaError_t>(eqc_quantize_rows_cuda(A, aq, sa, M, K, ld, absmax_floor, scale_floor, s));
    // PDL: the GEMM's predecessor is the quantization kernel, launched normally, so everything
  // before it (the padded copy of B too) has completed when the GEMM may start.
  if (err == cudaSuccess) err = gemm_dispatch(aq, sa, b_use, B_scale, bias, Y, M, N, ld, s, true);
  if (workspace == nullptr) {
    const cudaError_t free_err = cudaFreeAsync(ws, s);
    if (err == cudaSuccess) err = free_err;
  }
  return err;
}

int eqc_fused_int8_gemm_cuda(const float* A, const int8_t* B, const float* B_scale, const float* bias, float* Y, int M,
                             int N, int K, void* stream) {
  return eqc_fused_int8_gemm_cuda_ex(A, B, B_scale, bias, Y, M, N, K, 0.0f, 0.0f, nullptr, 0, stream);
}

const char* eqc_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
