// Hopper int8 GEMM: cp.async multi-stage shared-memory pipeline in the 128-byte swizzled layout
// that wgmma's shared-memory descriptors read, wgmma.mma_async m64n128k32 s8*s8->s32 issued by
// each warpgroup, and the same dequantize(+bias) epilogue from registers as the mma.sync kernel.
//
// Why cp.async and not TMA: the operands are re-laid out (swizzled) by the 16-byte copies
// themselves, so no tensor map has to be built per call on the host (the ORT kernel sees new
// pointers every run), and partial tiles are zero-filled with src_bytes = 0. wgmma only exists in
// sm_90a code; other targets compile an empty kernel and `available()` reports false, so the
// dispatcher falls back to mma.sync.
#include "int8_gemm_wgmma.h"
#include "launch.h"
#include "ptx.cuh"

#include <atomic>

namespace eqc_wgmma {
namespace {
using namespace eqc_ptx;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EQC_HAS_WGMMA 1
#else
#define EQC_HAS_WGMMA 0
#endif

constexpr int kBK = 128;  // bytes of K per stage = one 128-byte swizzle row

#if EQC_HAS_WGMMA  // helpers only exist in the sm_90a device pass

// Shared-memory matrix descriptor for a K-major tile whose rows are 128 bytes, 128B-swizzled:
// 8-row groups are 1024 bytes apart (stride byte offset); the leading byte offset is unused for
// swizzled K-major operands. Stage bases are 1024-byte aligned, so the base offset field is 0.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_u32(p);
  return ((addr & 0x3FFFFull) >> 4) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Byte offset of 16-byte chunk c of row r in a 128B-swizzled tile (chunk index XOR row % 8).
__device__ __forceinline__ int swizzled(int r, int c) { return r * kBK + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// D(64x128 s32) += A(64x32 s8, K-major, smem) * B(128x32 s8, K-major, smem).
__device__ __forceinline__ void wgmma_m64n128k32(int32_t (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
      "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, 1;\n"
      "}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b));
}

#endif  // EQC_HAS_WGMMA

// WGS warpgroups stacked along M, each computing MT x NT blocks of 64 x 128 (MT m64 blocks of
// its own rows, NT adjacent n128 blocks).
template <int WGS_, int MT_, int NT_, int STAGES_, int MIN_BLOCKS_ = 1>
struct WgTile {
  static constexpr int WGS = WGS_, MT = MT_, NT = NT_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;  // CTAs per SM the register budget must allow
  static constexpr int BM = 64 * WGS * MT, BN = 128 * NT, THREADS = 128 * WGS;
  static constexpr int STAGE_BYTES = (BM + BN) * kBK;
  static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;  // + slack to align the base to 1024
  static_assert(STAGES >= 3, "one stage computing, one possibly still read by wgmma, >= 1 loading");
};

template <class T>
__global__ void __launch_bounds__(T::THREADS, T::MIN_BLOCKS)
    wgmma_gemm_kernel(const int8_t* __restrict__ Aq, const float* __restrict__ a_scale, const int8_t* __restrict__ B,
                      const float* __restrict__ b_scale, const float* __restrict__ bias, float* __restrict__ Y, int M,
                      int N, int ld) {
#if EQC_HAS_WGMMA
  extern __shared__ __align__(16) int8_t smem_raw[];
  // The 128B swizzle pattern repeats every 1024 bytes; descriptors assume 1024-aligned stages.
  int8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);

  const int tid = threadIdx.x, wg = tid >> 7;
  const int m0 = blockIdx.x * T::BM, n0 = blockIdx.y * T::BN;
  const int ktiles = (ld + kBK - 1) / kBK;

  auto stage_a = [&](int s) { return smem + s * T::STAGE_BYTES; };
  auto stage_b = [&](int s) { return smem + s * T::STAGE_BYTES + T::BM * kBK; };

  auto load_a = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    int8_t* a_dst = stage_a(stage);
#pragma unroll
    for (int c = tid; c < T::BM * 8; c += T::THREADS) {
      const int r = c >> 3, kc = c & 7;
      const bool ok = (m0 + r < M) && (k0 + kc * 16 < ld);
      const int8_t* src = ok ? Aq + static_cast<size_t>(m0 + r) * ld + k0 + kc * 16 : Aq;
      cp_async16(a_dst + swizzled(r, kc), src, ok ? 16 : 0);
    }
  };
  auto load_b = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    int8_t* b_dst = stage_b(stage);
#pragma unroll
    for (int c = tid; c < T::BN * 8; c += T::THREADS) {
      const int r = c >> 3, kc = c & 7;
      const bool ok = (n0 + r < N) && (k0 + kc * 16 < ld);
      const int8_t* src = ok ? B + static_cast<size_t>(n0 + r) * ld + k0 + kc * 16 : B;
      cp_async16(b_dst + swizzled(r, kc), src, ok ? 16 : 0);
    }
  };

  int32_t acc[T::MT][T::NT][64];
#pragma unroll
  for (int i = 0; i < T::MT; ++i)
#pragma unroll
    for (int j = 0; j < T::NT; ++j)
#pragma unroll
      for (int r = 0; r < 64; ++r) acc[i][j][r] = 0;

  // STAGES-2 tiles ahead: at iteration kt, stage (kt-1) may still be read by in-flight wgmma.
  // Weights first: under programmatic dependent launch only Aq / a_scale come from the kernel
  // that may still be running (griddep_wait is a no-op otherwise).
#pragma unroll
  for (int s = 0; s < T::STAGES - 2; ++s)
    if (s < ktiles) load_b(s, s);
  griddep_wait();
#pragma unroll
  for (int s = 0; s < T::STAGES - 2; ++s) {
    if (s < ktiles) load_a(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<T::STAGES - 3>();  // this thread's copies of tile kt have landed
    fence_async_shared();            // make them visible to the async (wgmma) proxy
    __syncthreads();                 // everyone's copies; every warpgroup finished wgmma(kt-2)
    const int next = kt + T::STAGES - 2;
    if (next < ktiles) {
      load_a(next % T::STAGES, next);
      load_b(next % T::STAGES, next);
    }
    cp_async_commit();

    const int s = kt % T::STAGES;
    const int8_t* a_s = stage_a(s) + wg * T::MT * 64 * kBK;
    const int8_t* b_s = stage_b(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
#pragma unroll
      for (int i = 0; i < T::MT; ++i) {
        const uint64_t da = smem_desc(a_s + i * 64 * kBK + kk);
#pragma unroll
        for (int j = 0; j < T::NT; ++j) wgmma_m64n128k32(acc[i][j], da, smem_desc(b_s + j * 128 * kBK + kk));
      }
    }
    wgmma_commit();
    wgmma_wait<1>();  // wgmma(kt-1) done; wgmma(kt) may run on while the next tile is waited for
  }
  wgmma_wait<0>();
  cp_async_wait<0>();

  // Accumulator layout of m64nNk32, per warp w of the warpgroup (g = lane/4, t = lane%4): for n8
  // block i, registers 4i+0,1 -> (row 16w+g, cols 8i+2t+{0,1}), 4i+2,3 -> (row 16w+g+8, same cols).
  const int lane = tid & 31, w = (tid >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < T::MT; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + (wg * T::MT + mi) * 64 + w * 16 + g + half * 8;
      if (row >= M) continue;
      const float sa = a_scale[row];
      float* yrow = Y + static_cast<size_t>(row) * N;
#pragma unroll
      for (int j = 0; j < T::NT; ++j) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = n0 + j * 128 + i * 8 + 2 * t + e;
            if (col >= N) continue;
            float y = __fmul_rn(__fmul_rn(__int2float_rn(acc[mi][j][4 * i + half * 2 + e]), sa), b_scale[col]);
            if (bias) y = __fadd_rn(y, bias[col]);
            yrow[col] = y;
          }
        }
      }
    }
  }
#endif
}

// Writes 1 only where the sm_90a image (with wgmma) is the one the device runs.
__global__ void probe_kernel(int* out) { *out = EQC_HAS_WGMMA; }

constexpr int kMaxDevices = 64;

int probe_device() {
  int* d = nullptr;
  int h = 0;
  if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) return 0;
  probe_kernel<<<1, 1>>>(d);
  const bool ok = cudaGetLastError() == cudaSuccess && cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(d);
  return ok ? h : 0;
}

template <class T>
cudaError_t launch_tile(const int8_t* Aq, const float* sa, const int8_t* B, const float* sb, const float* bias,
                        float* Y, int M, int N, int ld, cudaStream_t stream, bool pdl) {
  static std::atomic<bool> attr_set[kMaxDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= kMaxDevices || !attr_set[dev].load(std::memory_order_acquire)) {
    err = cudaFuncSetAttribute(wgmma_gemm_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::SMEM);
    if (err != cudaSuccess) return err;
    if (dev < kMaxDevices) attr_set[dev].store(true, std::memory_order_release);
  }
  const dim3 grid((M + T::BM - 1) / T::BM, (N + T::BN - 1) / T::BN);
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;
  return eqc_launch::launch(wgmma_gemm_kernel<T>, grid, dim3(T::THREADS), T::SMEM, stream, pdl, Aq, sa, B, sb, bias,
                            Y, M, N, ld);
}

}  // namespace

bool available() {
  // Per device, probed once (cached as 0 = unknown, 1 = no, 2 = yes).
  static std::atomic<int> state[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= kMaxDevices) return false;
  int s = state[dev].load(std::memory_order_acquire);
  if (s == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    s = (major == 9 && minor == 0 && probe_device() == 1) ? 2 : 1;
    state[dev].store(s, std::memory_order_release);
  }
  return s == 2;
}

cudaError_t launch(Shape shape, const int8_t* Aq, const float* a_scale, const int8_t* B, const float* b_scale,
                   const float* bias, float* Y, int M, int N, int ld, cudaStream_t stream, bool pdl) {
  switch (shape) {
    case Shape::k64x128:
      return launch_tile<WgTile<1, 1, 1, 4>>(Aq, a_scale, B, b_scale, bias, Y, M, N, ld, stream, pdl);
    case Shape::k128x128:
      return launch_tile<WgTile<2, 1, 1, 4>>(Aq, a_scale, B, b_scale, bias, Y, M, N, ld, stream, pdl);
    case Shape::k128x256:
      return launch_tile<WgTile<2, 1, 2, 3>>(Aq, a_scale, B, b_scale, bias, Y, M, N, ld, stream, pdl);
    case Shape::k128x256s4:
      return launch_tile<WgTile<2, 1, 2, 4>>(Aq, a_scale, B, b_scale, bias, Y, M, N, ld, stream, pdl);
    case Shape::k256x128:
      return launch_tile<WgTile<2, 2, 1, 4>>(Aq, a_scale, B, b_scale, bias, Y, M, N, ld, stream, pdl);
    case Shape::k128x128x2:
      return launch_tile<WgTile<2, 1, 1, 3, 2>>(Aq, a_scale, B, b_scale, bias, Y, M, N, ld, stream, pdl);
  }
  return cudaErrorInvalidValue;
}

}  // namespace eqc_wgmma

namespace eqc_launch {

bool pdl_supported() {
  static std::atomic<int> state[64];  // per device: 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return false;
  int s = state[dev].load(std::memory_order_acquire);
  if (s == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    s = major >= 9 ? 2 : 1;
    state[dev].store(s, std::memory_order_release);
  }
  return s == 2;
}

}  // namespace eqc_launch
