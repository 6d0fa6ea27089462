// In-place merge / unmerge of a LoRA adapter into its base weight.
//
//   W[n, k] = round(W[n, k] + scale * sum_j B[n, j] * A[j, k])     (unmerge: scale < 0)
//   W [N, K], A [r, K], B [N, r]
//
// Memory-bound: W is read once and written once; the delta B @ A is never materialised, each
// tile of it is computed in registers right before the update, accumulated in fp32, and the sum
// W + scale * delta is rounded once (PEFT adds a delta already rounded to the weight's dtype and
// so rounds twice).
//
// fp16 / bf16 (`merge_mma_kernel`): the delta tile comes from m16n8k16 tensor-core steps whose
// products of 16-bit inputs are exact in fp32. A block covers 64 x 64 elements of W, a warp
// 16 rows x 32 columns as four n8 tiles. The reduction index j (the rank) is permuted the same
// way in both operands so a thread's B fragment is 4 consecutive elements of a B row:
//   logical j 2t, 2t+1 <- physical 4t, 4t+1;   2t+8, 2t+9 <- 4t+2, 4t+3   (per 16 ranks)
// and the output columns are permuted so a thread's results are 8 consecutive elements of a W
// row: the B-operand column g of n8 tile q is the physical column 8 * (g / 2) + 2q + (g % 2),
// which puts C[g][2t + e] of tile q at column 8t + 2q + e. Each thread then reads and writes W
// as one 16-byte vector per row (two rows: g and g + 8), and the load is issued before the
// delta is computed, so the HBM latency overlaps the math.
//
// fp32 (`merge_f32_kernel`): one thread per 4 consecutive elements of a W row, fp32 FMA over j.
#pragma once

#include "lora_kernels/common.cuh"
#include "lora_kernels/params.h"

namespace lora_kernels {

constexpr int kMergeThreads = 256;
constexpr int kMergeTileRows = 64;  // 4 warps along N, 16 rows each
constexpr int kMergeTileCols = 64;  // 2 warps along K, 32 columns each

// grid (ceil(K / 64), ceil(N / 64)); block kMergeThreads. K % 8 == 0.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_mma_kernel(const MergeParams p) {
  T* weight = static_cast<T*>(p.weight);
  const T* lora_a = static_cast<const T*>(p.lora_a);
  const T* lora_b = static_cast<const T*>(p.lora_b);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kMergeTileRows + 16 * (warp % 4);
  const int col0 = blockIdx.x * kMergeTileCols + 32 * (warp / 4);

  const int64_t row_lo = row0 + g;
  const int64_t row_hi = row0 + g + 8;
  const bool lo_row_ok = row_lo < p.n;
  const bool hi_row_ok = row_hi < p.n;
  // This thread's 8 output columns: col .. col + 7, all inside or all outside (K % 8 == 0).
  const int col = col0 + kVecElems * t;
  const bool col_ok = col < p.k;
  // Clamped so that no pointer leaves its tensor; masked lanes never dereference them.
  const int64_t last_row = p.n - 1;
  T* w_lo = weight + min(row_lo, last_row) * p.ldw + min(col, p.k - kVecElems);
  T* w_hi = weight + min(row_hi, last_row) * p.ldw + min(col, p.k - kVecElems);
  const bool lo_ok = lo_row_ok && col_ok;
  const bool hi_ok = hi_row_ok && col_ok;
  // Issued first: the HBM latency overlaps the delta's loads and mma steps below.
  const uint4 old_lo = lo_ok ? __ldcs(reinterpret_cast<const uint4*>(w_lo)) : zero16();
  const uint4 old_hi = hi_ok ? __ldcs(reinterpret_cast<const uint4*>(w_hi)) : zero16();

  const T* b_lo = lora_b + min(row_lo, last_row) * p.ldb;
  const T* b_hi = lora_b + min(row_hi, last_row) * p.ldb;
  // B-operand column of n8 tile q is b_col + 2q (see the top of the file).
  const int b_col = col0 + 8 * (g / 2) + (g % 2);

  float acc[4][4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[q][i] = 0.f;
  }
  for (int j0 = 0; j0 < p.r; j0 += 16) {
    // Ranks ja .. ja + 3 of this thread; indices >= r read as zeros.
    const int ja = j0 + 4 * t;
    const bool j_ok[4] = {ja < p.r, ja + 1 < p.r, ja + 2 < p.r, ja + 3 < p.r};
    const uint32_t a0 = load_bits16(b_lo + ja, lo_row_ok && j_ok[0]) |
                        (load_bits16(b_lo + ja + 1, lo_row_ok && j_ok[1]) << 16);
    const uint32_t a1 = load_bits16(b_hi + ja, hi_row_ok && j_ok[0]) |
                        (load_bits16(b_hi + ja + 1, hi_row_ok && j_ok[1]) << 16);
    const uint32_t a2 = load_bits16(b_lo + ja + 2, lo_row_ok && j_ok[2]) |
                        (load_bits16(b_lo + ja + 3, lo_row_ok && j_ok[3]) << 16);
    const uint32_t a3 = load_bits16(b_hi + ja + 2, hi_row_ok && j_ok[2]) |
                        (load_bits16(b_hi + ja + 3, hi_row_ok && j_ok[3]) << 16);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int c = b_col + 2 * q;
      const bool c_ok = c < p.k;
      const T* a_col = lora_a + min(c, p.k - 1);
      const uint32_t b0 = load_bits16(a_col + ja * p.lda, c_ok && j_ok[0]) |
                          (load_bits16(a_col + (ja + 1) * p.lda, c_ok && j_ok[1]) << 16);
      const uint32_t b1 = load_bits16(a_col + (ja + 2) * p.lda, c_ok && j_ok[2]) |
                          (load_bits16(a_col + (ja + 3) * p.lda, c_ok && j_ok[3]) << 16);
      mma_m16n8k16<T>(acc[q], a0, a1, a2, a3, b0, b1);
    }
  }

  // Element 2q + e of a row's 8 columns is acc[q][e] (row g) or acc[q][2 + e] (row g + 8).
  if (lo_ok) {
    const uint32_t old[4] = {old_lo.x, old_lo.y, old_lo.z, old_lo.w};
    uint32_t merged[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 w = unpack2<T>(old[q]);
      merged[q] = pack2<T>(fmaf(p.scale, acc[q][0], w.x), fmaf(p.scale, acc[q][1], w.y));
    }
    __stcs(reinterpret_cast<uint4*>(w_lo), make_uint4(merged[0], merged[1], merged[2], merged[3]));
  }
  if (hi_ok) {
    const uint32_t old[4] = {old_hi.x, old_hi.y, old_hi.z, old_hi.w};
    uint32_t merged[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 w = unpack2<T>(old[q]);
      merged[q] = pack2<T>(fmaf(p.scale, acc[q][2], w.x), fmaf(p.scale, acc[q][3], w.y));
    }
    __stcs(reinterpret_cast<uint4*>(w_hi), make_uint4(merged[0], merged[1], merged[2], merged[3]));
  }
}

constexpr int kMergeF32Threads = 256;

// 1-D grid-stride over the N * K / 4 float4 vectors of W; K % 4 == 0.
__global__ void __launch_bounds__(kMergeF32Threads) merge_f32_kernel(const MergeParams p) {
  float* weight = static_cast<float*>(p.weight);
  const float* lora_a = static_cast<const float*>(p.lora_a);
  const float* lora_b = static_cast<const float*>(p.lora_b);
  const int vecs_per_row = p.k / 4;
  const int64_t total = static_cast<int64_t>(p.n) * vecs_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kMergeF32Threads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kMergeF32Threads + threadIdx.x;
       idx < total; idx += step) {
    const int64_t n = idx / vecs_per_row;
    const int col = static_cast<int>(idx % vecs_per_row) * 4;
    float4* w = reinterpret_cast<float4*>(weight + n * p.ldw + col);
    float4 out = __ldcs(w);
    const float* b_row = lora_b + n * p.ldb;
    float4 delta = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < p.r; ++j) {
      const float b = __ldg(b_row + j);
      const float4 a = __ldg(reinterpret_cast<const float4*>(lora_a + j * p.lda + col));
      delta.x = fmaf(b, a.x, delta.x);
      delta.y = fmaf(b, a.y, delta.y);
      delta.z = fmaf(b, a.z, delta.z);
      delta.w = fmaf(b, a.w, delta.w);
    }
    out.x = fmaf(p.scale, delta.x, out.x);
    out.y = fmaf(p.scale, delta.y, out.y);
    out.z = fmaf(p.scale, delta.z, out.z);
    out.w = fmaf(p.scale, delta.w, out.w);
    __stcs(w, out);
  }
}

}  // namespace lora_kernels
