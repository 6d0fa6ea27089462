// Parameter structs and launch functions of the CUDA C++ kernels.
//
// Torch-free: this header is shared by the kernel translation units (nvcc) and the torch binding
// (host compiler). Every pointer is device memory; every stride counts elements, not bytes.
// The launch functions enqueue on `stream` and return the launch status; they never synchronise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lora_kernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// The fused kernels keep every row of x in the registers of one warp: at most 64 rows (decode).
constexpr int kMaxDecodeRows = 64;
// Largest LoRA rank the fused kernels accept (the bound; nothing in them is sized by r).
constexpr int kMaxRank = 256;
// fp16/bf16 elements in one 16-byte vector load: K and every row stride that the kernels read
// with vector loads must be multiples of this, and those rows must start 16-byte aligned.
constexpr int kVecElems = 8;

// y = x @ weight.T + bias + scale_a * (x_lora @ lora_a[a].T) @ lora_b[a].T, row by row, with
// a = row_ids[i] (multi-adapter) or a = 0 with scale_a = scale (single adapter, row_ids null).
// Also writes s = x_lora @ lora_a[a].T in fp32 (zeros for rows with no adapter), kept by the
// caller for the backward. fp16 and bf16 only; M <= kMaxDecodeRows, 1 <= r <= kMaxRank,
// K % kVecElems == 0, and x, x_lora, weight, lora_a rows 16-byte aligned.
struct LoraLinearParams {
  // Pointers.
  const void* x;           // [M, K], row stride ldx
  const void* x_lora;      // [M, K], row stride ldx_lora: the LoRA branch's input (x or dropout)
  const void* weight;      // [N, K], row stride ldw
  const void* bias;        // [N] contiguous, or nullptr
  const void* lora_a;      // [L, r, K], strides (a_adapter_stride, lda, 1)
  const void* lora_b;      // [L, N, r], strides (b_adapter_stride, ldb, 1)
  const float* scales;     // [L] fp32 (multi-adapter only)
  const int32_t* row_ids;  // [M] adapter of each row (multi only); < 0 or >= L: base layer only
  const int32_t* ranks;    // [L] rank of each adapter, clamped to [0, r]; nullptr: all have rank r
  void* y;                 // [M, N] output, row stride ldy, unit column stride
  float* s;                // [M, r] output, contiguous fp32
  // Sizes.
  int m;
  int n;
  int k;
  int r;
  int num_adapters;  // L (1 for the single-adapter launch)
  // Strides.
  int64_t ldx;
  int64_t ldx_lora;
  int64_t ldw;
  int64_t lda;
  int64_t ldb;
  int64_t ldy;
  int64_t a_adapter_stride;
  int64_t b_adapter_stride;
  // Scalars.
  float scale;  // single adapter only
  DType dtype;
};

// weight += scale * lora_b @ lora_a in place, accumulated in fp32 and rounded once.
// fp16/bf16 need K % kVecElems == 0 and 16-byte aligned weight rows; fp32 needs K % 4 == 0 and
// 16-byte aligned weight and lora_a rows. Any rank.
struct MergeParams {
  // Pointers.
  void* weight;        // [N, K], row stride ldw, updated in place
  const void* lora_a;  // [r, K], row stride lda, unit column stride
  const void* lora_b;  // [N, r], row stride ldb, unit column stride
  // Sizes.
  int n;
  int k;
  int r;
  // Strides.
  int64_t ldw;
  int64_t lda;
  int64_t ldb;
  // Scalars.
  float scale;  // negative to unmerge
  DType dtype;
};

// Single adapter: p.row_ids, p.scales and p.ranks must be null, p.num_adapters 1.
cudaError_t launch_lora_linear(const LoraLinearParams& p, cudaStream_t stream);
// Several adapters, one per row: p.row_ids and p.scales must be set.
cudaError_t launch_lora_linear_multi(const LoraLinearParams& p, cudaStream_t stream);
cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream);

}  // namespace lora_kernels
