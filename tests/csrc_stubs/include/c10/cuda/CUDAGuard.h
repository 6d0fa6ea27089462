// Stand-in for torch's c10/cuda/CUDAGuard.h in the CPU build of the binding
// (tests/test_csrc_compile.py): a device guard that does nothing.
#pragma once
#include <c10/core/Device.h>
namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
