// Instantiations and launcher of the in-place merge kernels (merge.cuh). Torch-free: the torch
// binding calls launch_merge().
#include <algorithm>

#include "lora_kernels/merge.cuh"
#include "lora_kernels/params.h"

namespace lora_kernels {

cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream) {
  if (p.n < 0 || p.k < 0 || p.r < 0) return cudaErrorInvalidValue;
  if (p.n == 0 || p.k == 0 || p.r == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: {
      if (p.k % kVecElems != 0) return cudaErrorInvalidValue;
      const dim3 grid((p.k + kMergeTileCols - 1) / kMergeTileCols,
                      (p.n + kMergeTileRows - 1) / kMergeTileRows);
      if (grid.y > 65535u) return cudaErrorInvalidValue;
      if (p.dtype == DType::kFloat16) {
        merge_mma_kernel<__half><<<grid, kMergeThreads, 0, stream>>>(p);
      } else {
        merge_mma_kernel<__nv_bfloat16><<<grid, kMergeThreads, 0, stream>>>(p);
      }
      return cudaGetLastError();
    }
    case DType::kFloat32: {
      if (p.k % 4 != 0) return cudaErrorInvalidValue;
      const int64_t vecs = static_cast<int64_t>(p.n) * (p.k / 4);
      // Grid-stride: enough blocks to fill any GPU several times over, never past the 2^31 limit.
      const int64_t blocks =
          std::min<int64_t>((vecs + kMergeF32Threads - 1) / kMergeF32Threads, int64_t{1} << 20);
      merge_f32_kernel<<<static_cast<unsigned>(blocks), kMergeF32Threads, 0, stream>>>(p);
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace lora_kernels
