// Stand-in for torch's c10/cuda/CUDAStream.h in the CPU build of the binding
// (tests/test_csrc_compile.py): the current stream is the null stream.
#pragma once
#include <cuda_runtime_api.h>
#include <c10/core/Device.h>
namespace c10::cuda {
struct StubStream {
  operator cudaStream_t() const { return nullptr; }
};
inline StubStream getCurrentCUDAStream(c10::DeviceIndex) { return {}; }
}  // namespace c10::cuda
