// Fused LoRA linear for decode-sized batches (M <= 64 rows), one or many adapters.
//
//   y = x @ W.T + bias + scale * S @ B.T,   S = x_lora @ A.T   (fp32, kept for the backward)
//   x [M, K], W [N, K], bias [N], A [r, K], B [N, r], y [M, N], S [M, r]
//
// With M <= 64 the product is memory-bound on W: the whole job is to stream W from HBM once, at
// full bandwidth, and to touch y once. Two launches on one stream:
//
// 1. S (tiny). Single adapter: `lora_skinny_kernel<..., kShrink>` streams A with the same
//    tensor-core tile as phase 2. Several adapters: `bgmv_shrink_kernel` (bgmv_shrink.cuh), one
//    dot product per (row, rank index) with that row's adapter.
// 2. y: `lora_skinny_kernel<..., kFused>`. Each block owns 16 rows of W (one m16 tile) over the
//    full K; its warps split K and each keeps a [16 x 8*MT] fp32 accumulator of x @ W.T in the
//    registers of m16n8k16 fragments. The partial sums meet in shared memory, then the block adds
//    bias and scale * S @ B.T (B rows of this tile, per row's adapter) in fp32 and rounds once as
//    it writes y. On sm_90 phase 2 is a programmatic dependent launch: its blocks start while
//    phase 1 runs, stream their share of W, and wait for S only before the epilogue.
//
// Loading W straight into mma fragments with 16-byte loads: thread (g = lane / 4, t = lane % 4)
// loads the 8 consecutive elements k0 + 8t .. k0 + 8t + 7 of W rows g and g + 8, and of x row g.
// A k-chunk of 32 then holds two m16n8k16 steps whose k order is permuted the same way in both
// operands (registers .x .y feed the first step, .z .w the second):
//   logical k 2t, 2t+1 <- physical 8t, 8t+1;  2t+8, 2t+9 <- 8t+2, 8t+3  (second step: +4)
// A dot product does not care about the order of its terms, so no shuffle or shared-memory
// staging is needed and every global load is a full 16-byte vector: a warp reads 64 contiguous
// bytes of each of its 16 W rows per chunk. W is read through the non-allocating L1 path (it is
// read once); x through L1 (every warp on the SM walks the same k-chunks of it).
#pragma once

#include "lora_kernels/common.cuh"
#include "lora_kernels/params.h"

namespace lora_kernels {

// Rows of the streamed matrix (W or A) per block: one m16 tile.
constexpr int kTileRows = 16;
// k values per chunk: 4 threads x one 16-byte vector of 8 elements.
constexpr int kChunk = 4 * kVecElems;
// Row pitch of the fp32 partial sums in shared memory: with 20 floats, the fragment writes of a
// warp, at (8mt + 2t + e) * 20 + g, land in 32 distinct banks (8t + g + const, mod 32).
constexpr int kRedPitch = kTileRows + 4;

enum class Epilogue { kShrink, kFused };

// MT = number of n8 tiles that cover the rows of x: M <= 8 * MT.
template <int MT>
struct SkinnyTraits {
  // k-chunks per load group. The K loop is double-buffered (the next group is loaded before the
  // current one is multiplied), so 2 groups are in flight: 4 chunks = 128 B of W per thread for
  // MT <= 2, 2 chunks for MT >= 4, where the rows of x take the registers.
  static constexpr int kChunksPerGroup = MT <= 2 ? 2 : 1;
  // Phase 2 runs ceil(N / 16) blocks of 8 warps; their registers let two share an SM for
  // M <= 32 (one for M > 32, where each thread holds 8 n8 tiles of accumulators).
  static constexpr int kFusedWarps = 8;
  // Phase 1 runs only ceil(r / 16) blocks, so each gets more warps to shorten its K loop; the
  // shared-memory reduction buffer (warps x 8*MT x kRedPitch floats) stays <= 40 KB.
  static constexpr int kShrinkWarps = MT <= 4 ? 16 : 8;
};

// One load group: U k-chunks of 16 rows of W (rows g and g + 8 of the tile) and 8*MT rows of x.
template <int MT, int U>
struct ChunkGroup {
  uint4 w_lo[U];
  uint4 w_hi[U];
  uint4 x[U][MT];
};

// acc[mt] += rows[row0 + 0..15, :] . x[8*mt + 0..7, :] over this warp's k-chunks (chunks
// warp, warp + NW, ...), in m16n8k16 C-fragment layout. Rows >= n_rows, rows of x >= m and
// k >= k are read as zeros; K % 8 == 0, so a thread's 8-element vector is all in or all out.
template <typename T, int MT, int NW>
__device__ __forceinline__ void skinny_accumulate(float (&acc)[MT][4], const T* rows,
                                                  int64_t ld_rows, int64_t row0, int n_rows,
                                                  const T* x, int64_t ldx, int m, int k,
                                                  int warp, int g, int t) {
  constexpr int U = SkinnyTraits<MT>::kChunksPerGroup;
  constexpr int kGroupStride = U * NW;  // chunks between two groups of the same warp
  // Loads are unconditional, from addresses clamped into their tensor, and masked afterwards:
  // a clamped load is never wasted bandwidth that matters (tail rows or the tail of K only).
  const bool lo_ok = row0 + g < n_rows;
  const bool hi_ok = row0 + g + 8 < n_rows;
  const int64_t last_row = n_rows - 1;
  const T* w_lo = rows + min(row0 + g, last_row) * ld_rows;
  const T* w_hi = rows + min(row0 + g + 8, last_row) * ld_rows;
  const T* x_rows[MT];
  bool x_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int xm = 8 * mt + g;
    x_ok[mt] = xm < m;
    x_rows[mt] = x + static_cast<int64_t>(min(xm, m - 1)) * ldx;
  }
  const int last_vec = k - kVecElems;
  // Element offset of this thread's vector in chunk c (may lie past K: masked by the caller).
  auto offset = [&](int c) { return c * kChunk + kVecElems * t; };
  auto load_group = [&](int c0, ChunkGroup<MT, U>& grp) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int off = min(offset(c0 + u * NW), last_vec);
      grp.w_lo[u] = load16_stream(w_lo + off);
      grp.w_hi[u] = load16_stream(w_hi + off);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) grp.x[u][mt] = load16_cached(x_rows[mt] + off);
    }
  };

  const int num_chunks = (k + kChunk - 1) / kChunk;
  if (warp >= num_chunks) return;
  ChunkGroup<MT, U> cur;
  load_group(warp, cur);
  for (int c0 = warp; c0 < num_chunks; c0 += kGroupStride) {
    // The next group's loads go out before this group's mma steps wait on theirs.
    ChunkGroup<MT, U> next;
    const bool has_next = c0 + kGroupStride < num_chunks;
    if (has_next) load_group(c0 + kGroupStride, next);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool k_ok = offset(c0 + u * NW) < k;
      const uint4 wl = (k_ok && lo_ok) ? cur.w_lo[u] : zero16();
      const uint4 wh = (k_ok && hi_ok) ? cur.w_hi[u] : zero16();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 xv = (k_ok && x_ok[mt]) ? cur.x[u][mt] : zero16();
        mma_m16n8k16<T>(acc[mt], wl.x, wh.x, wl.y, wh.y, xv.x, xv.y);
        mma_m16n8k16<T>(acc[mt], wl.z, wh.z, wl.w, wh.w, xv.z, xv.w);
      }
    }
    if (has_next) cur = next;
  }
}

// kShrink: s[m, j] = x_lora[m] . A[j] for the 16 rank indices j of this block (grid ceil(r/16)).
// kFused:  y[m, n] for the 16 output features n of this block (grid ceil(N/16)), see the top.
template <typename T, int MT, int NW, Epilogue EPI>
__global__ void __launch_bounds__(NW* kWarpSize) lora_skinny_kernel(const LoraLinearParams p) {
  constexpr bool kShrink = EPI == Epilogue::kShrink;
  if constexpr (kShrink) {
    // Phase 2 may start now: it reads S only after pdl_wait_primary().
    pdl_launch_dependents();
  }
  const T* rows = static_cast<const T*>(kShrink ? p.lora_a : p.weight);
  const int64_t ld_rows = kShrink ? p.lda : p.ldw;
  const int n_rows = kShrink ? p.r : p.n;
  const T* x = static_cast<const T*>(kShrink ? p.x_lora : p.x);
  const int64_t ldx = kShrink ? p.ldx_lora : p.ldx;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0.f;
  }
  skinny_accumulate<T, MT, NW>(acc, rows, ld_rows, row0, n_rows, x, ldx, p.m, p.k, warp, g, t);

  // Per-warp partial sums, indexed [warp][row of x][row of the tile].
  __shared__ float partial[NW][8 * MT][kRedPitch];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      partial[warp][8 * mt + 2 * t + (i & 1)][g + 8 * (i >> 1)] = acc[mt][i];
    }
  }
  __syncthreads();

  // One output per (tile row, row of x); consecutive threads take consecutive tile rows, so a
  // warp writes y in 32-byte runs.
  const int num_out = kTileRows * p.m;
  if constexpr (kShrink) {
    for (int idx = threadIdx.x; idx < num_out; idx += NW * kWarpSize) {
      const int row = idx % kTileRows;
      const int m = idx / kTileRows;
      const int64_t j = row0 + row;
      if (j >= p.r) continue;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) v += partial[w][m][row];
      p.s[static_cast<int64_t>(m) * p.r + j] = v;
    }
  } else {
    // Everything below reads S, written by phase 1.
    pdl_wait_primary();
    const T* bias = static_cast<const T*>(p.bias);
    const T* lora_b = static_cast<const T*>(p.lora_b);
    T* y = static_cast<T*>(p.y);
    for (int idx = threadIdx.x; idx < num_out; idx += NW * kWarpSize) {
      const int row = idx % kTileRows;
      const int m = idx / kTileRows;
      const int64_t n = row0 + row;
      if (n >= p.n) continue;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) v += partial[w][m][row];
      if (bias != nullptr) v += to_float(__ldg(bias + n));

      int adapter = 0;
      int rank = p.r;
      float scale = p.scale;
      if (p.row_ids != nullptr) {
        adapter = __ldg(p.row_ids + m);
        if (adapter < 0 || adapter >= p.num_adapters) {
          // No adapter (-1), or an id out of range: the base layer only, nothing else is read.
          rank = 0;
        } else {
          scale = __ldg(p.scales + adapter);
          if (p.ranks != nullptr) rank = min(max(__ldg(p.ranks + adapter), 0), p.r);
        }
      }
      if (rank > 0) {
        const T* b_row = lora_b + adapter * p.b_adapter_stride + n * p.ldb;
        // S comes from the previous grid: read it at L2 (__ldcg), never from a stale L1 line.
        const float* s_row = p.s + static_cast<int64_t>(m) * p.r;
        float lora = 0.f;
#pragma unroll 4
        for (int j = 0; j < rank; ++j) {
          lora = fmaf(__ldcg(s_row + j), to_float(__ldg(b_row + j)), lora);
        }
        v = fmaf(scale, lora, v);
      }
      y[static_cast<int64_t>(m) * p.ldy + n] = from_float<T>(v);
    }
  }
}

}  // namespace lora_kernels
