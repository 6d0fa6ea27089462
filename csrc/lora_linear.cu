// Instantiations and launchers of the decode kernels (lora_linear.cuh, bgmv_shrink.cuh) for
// fp16 and bf16. Torch-free: the torch binding calls launch_lora_linear[_multi]().
#include <cstdlib>
#include <cstring>

#include "lora_kernels/bgmv_shrink.cuh"
#include "lora_kernels/lora_linear.cuh"
#include "lora_kernels/params.h"

namespace lora_kernels {
namespace {

// Programmatic dependent launch needs sm_90; LORA_KERNELS_PDL=0 turns it off (to measure it, or
// to rule it out when chasing a problem).
bool use_pdl() {
  static const bool enabled = [] {
    const char* env = std::getenv("LORA_KERNELS_PDL");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  if (!enabled) return false;
  int device = 0;
  int major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  return major >= 9;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T, int MT>
cudaError_t launch_typed(const LoraLinearParams& p, cudaStream_t stream) {
  using Traits = SkinnyTraits<MT>;
  // Phase 1: S.
  if (p.row_ids == nullptr) {
    constexpr int kWarps = Traits::kShrinkWarps;
    lora_skinny_kernel<T, MT, kWarps, Epilogue::kShrink>
        <<<ceil_div(p.r, kTileRows), kWarps * kWarpSize, 0, stream>>>(p);
  } else {
    bgmv_shrink_kernel<T><<<dim3(p.r, p.m), kBgmvThreads, 0, stream>>>(p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.n == 0) return err;

  // Phase 2: y, allowed to start before phase 1 ends (it waits for S in its epilogue).
  constexpr int kWarps = Traits::kFusedWarps;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(ceil_div(p.n, kTileRows));
  config.blockDim = dim3(kWarps * kWarpSize);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = use_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&config, lora_skinny_kernel<T, MT, kWarps, Epilogue::kFused>, p);
}

template <typename T>
cudaError_t launch_rows(const LoraLinearParams& p, cudaStream_t stream) {
  if (p.m <= 8) return launch_typed<T, 1>(p, stream);
  if (p.m <= 16) return launch_typed<T, 2>(p, stream);
  if (p.m <= 32) return launch_typed<T, 4>(p, stream);
  return launch_typed<T, 8>(p, stream);
}

cudaError_t launch(const LoraLinearParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.m > kMaxDecodeRows || p.n < 0 || p.k < 0 || p.k % kVecElems != 0 ||
      p.r < 1 || p.r > kMaxRank || p.num_adapters < 1) {
    return cudaErrorInvalidValue;
  }
  // Nothing to compute for an empty batch; with N == 0 there is still S to write.
  if (p.m == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat16:
      return launch_rows<__half>(p, stream);
    case DType::kBFloat16:
      return launch_rows<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_lora_linear(const LoraLinearParams& p, cudaStream_t stream) {
  if (p.row_ids != nullptr || p.scales != nullptr || p.ranks != nullptr || p.num_adapters != 1) {
    return cudaErrorInvalidValue;
  }
  return launch(p, stream);
}

cudaError_t launch_lora_linear_multi(const LoraLinearParams& p, cudaStream_t stream) {
  if (p.row_ids == nullptr || p.scales == nullptr) return cudaErrorInvalidValue;
  return launch(p, stream);
}

}  // namespace lora_kernels
