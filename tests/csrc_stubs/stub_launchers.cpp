// Launchers that record their parameters, and an op that returns the last record: the CPU
// build of the binding (tests/test_csrc_compile.py) links these instead of the CUDA kernels.
#include <torch/library.h>
#include <vector>
#include "lora_kernels/params.h"

namespace lora_kernels {
namespace {
std::vector<double> last;
double ptr(const void* p) { return static_cast<double>(reinterpret_cast<uintptr_t>(p)); }
void record(double kind, const LoraLinearParams& p) {
  last = {kind, ptr(p.x), ptr(p.x_lora), ptr(p.weight), ptr(p.bias), ptr(p.lora_a),
          ptr(p.lora_b), ptr(p.scales), ptr(p.row_ids), ptr(p.ranks), ptr(p.y), ptr(p.s),
          double(p.m), double(p.n), double(p.k), double(p.r), double(p.num_adapters),
          double(p.ldx), double(p.ldx_lora), double(p.ldw), double(p.lda), double(p.ldb),
          double(p.ldy), double(p.a_adapter_stride), double(p.b_adapter_stride), p.scale,
          double(static_cast<int>(p.dtype))};
}
}  // namespace
cudaError_t launch_lora_linear(const LoraLinearParams& p, cudaStream_t) {
  record(1, p);
  return cudaSuccess;
}
cudaError_t launch_lora_linear_multi(const LoraLinearParams& p, cudaStream_t) {
  record(2, p);
  return cudaSuccess;
}
cudaError_t launch_merge(const MergeParams& p, cudaStream_t) {
  last = {3, ptr(p.weight), ptr(p.lora_a), ptr(p.lora_b), double(p.n), double(p.k),
          double(p.r), double(p.ldw), double(p.lda), double(p.ldb), p.scale,
          double(static_cast<int>(p.dtype))};
  return cudaSuccess;
}
}  // namespace lora_kernels

std::vector<double> last_launch() { return lora_kernels::last; }

TORCH_LIBRARY(lora_kernels_stub, m) { m.def("last_launch() -> float[]", &last_launch); }
