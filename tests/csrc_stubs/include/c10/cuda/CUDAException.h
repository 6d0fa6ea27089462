// Stand-in for torch's c10/cuda/CUDAException.h in the CPU build of the binding
// (tests/test_csrc_compile.py): the launch status check, without CUDA torch.
#pragma once
#include <cuda_runtime_api.h>
#include <c10/util/Exception.h>
#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "launch failed")
