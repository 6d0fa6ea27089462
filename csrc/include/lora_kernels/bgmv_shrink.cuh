// Multi-adapter shrink for decode batches (BGMV: batched gather matrix-vector).
//
//   s[i, j] = x_lora[i] . A[a, j]   for j < rank(a),   a = row_ids[i]
//   s[i, j] = 0                     for j >= rank(a), or when a < 0 or a >= L (base layer only)
//   x_lora [M, K], A [L, r, K], s [M, r] fp32
//
// Every row may use a different adapter, so no two rows share a row of A and the work is M * r
// independent dot products of length K. One block of 128 threads per (j, i): the dot product is
// split over the whole block (16-byte vectors of x and A, fp32 accumulation), which keeps the
// kernel short for the K of real models (4096 / 8 / 128 = 4 vectors per thread, all requested
// before the first is used), then reduced
// in a fixed order (warp butterfly, then the 4 warp sums in order): the same bits on every run,
// which CUDA-graph replay and the tests rely on. Ids out of range never read A: such rows get
// zeros, exactly as id -1.
//
// The expand half (y += scale_a * s @ B[a].T) is not a separate kernel: it is the epilogue of the
// fused decode kernel (lora_linear.cuh), so y is written once and W is read once.
#pragma once

#include "lora_kernels/common.cuh"
#include "lora_kernels/params.h"

namespace lora_kernels {

constexpr int kBgmvThreads = 128;
constexpr int kBgmvVecsPerBatch = 2;

// grid (r, M); block kBgmvThreads.
template <typename T>
__global__ void __launch_bounds__(kBgmvThreads) bgmv_shrink_kernel(const LoraLinearParams p) {
  // The fused kernel launched after this one may start now: it reads s only after it waits.
  pdl_launch_dependents();
  const int j = blockIdx.x;
  const int i = blockIdx.y;
  const int adapter = __ldg(p.row_ids + i);
  int rank = 0;
  if (adapter >= 0 && adapter < p.num_adapters) {
    rank = p.ranks != nullptr ? min(max(__ldg(p.ranks + adapter), 0), p.r) : p.r;
  }
  float* out = p.s + static_cast<int64_t>(i) * p.r + j;
  if (j >= rank) {
    // Uniform over the block: the whole block leaves here.
    if (threadIdx.x == 0) *out = 0.f;
    return;
  }

  const T* x_row = static_cast<const T*>(p.x_lora) + static_cast<int64_t>(i) * p.ldx_lora;
  const T* a_row = static_cast<const T*>(p.lora_a) + adapter * p.a_adapter_stride + j * p.lda;
  const int num_vecs = p.k / kVecElems;
  float acc = 0.f;
  // Double-buffered like the fused kernel's K loop: the next batch of vectors is requested
  // before the current one is used, so 2 * kBgmvVecsPerBatch loads per thread are in flight
  // (the whole dot product for K <= 4096). Loads past the end are clamped, then skipped.
  struct Batch {
    uint4 x[kBgmvVecsPerBatch];
    uint4 a[kBgmvVecsPerBatch];
  };
  constexpr int kBatchStride = kBgmvVecsPerBatch * kBgmvThreads;
  auto load_batch = [&](int v0, Batch& batch) {
#pragma unroll
    for (int u = 0; u < kBgmvVecsPerBatch; ++u) {
      const int v = min(v0 + u * kBgmvThreads, num_vecs - 1);
      batch.x[u] = load16_cached(x_row + v * kVecElems);
      batch.a[u] = load16_cached(a_row + v * kVecElems);
    }
  };
  if (static_cast<int>(threadIdx.x) < num_vecs) {
    Batch cur;
    load_batch(threadIdx.x, cur);
    for (int v0 = threadIdx.x; v0 < num_vecs; v0 += kBatchStride) {
      Batch next;
      const bool has_next = v0 + kBatchStride < num_vecs;
      if (has_next) load_batch(v0 + kBatchStride, next);
#pragma unroll
      for (int u = 0; u < kBgmvVecsPerBatch; ++u) {
        if (v0 + u * kBgmvThreads < num_vecs) acc = dot8<T>(cur.x[u], cur.a[u], acc);
      }
      if (has_next) cur = next;
    }
  }

  acc = warp_sum(acc);
  constexpr int kWarps = kBgmvThreads / kWarpSize;
  __shared__ float warp_sums[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) warp_sums[threadIdx.x / kWarpSize] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    *out = total;
  }
}

}  // namespace lora_kernels
