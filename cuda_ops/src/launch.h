// Kernel launch with optional programmatic dependent launch (PDL), shared by both GEMM paths.
#pragma once
#include <cuda_runtime.h>

namespace eqc_launch {

// True on devices of compute capability >= 9.0 (PDL's launch attribute is honoured there).
bool pdl_supported();

// Launches kernel<<<grid, block, smem, stream>>>(args...); with pdl, it may begin while the
// previous kernel in the stream runs, and must call griddep_wait() before reading its outputs.
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                   Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = (pdl && pdl_supported()) ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace eqc_launch
