// Device helpers shared by the kernels: conversions, 16-byte loads, the m16n8k16 tensor-core
// instruction, and programmatic dependent launch (PDL).
//
// Everything here compiles with torch's default nvcc flags, which define
// __CUDA_NO_HALF_OPERATORS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ and friends: only explicit
// conversion intrinsics are used, never the implicit operators of __half / __nv_bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace lora_kernels {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even: the one rounding of every output element.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Two 16-bit elements packed in a 32-bit register, the first in the low half (the order of
// memory and of the mma fragments).
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t bits);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t bits) {
  __half2 h;
  static_assert(sizeof(h) == sizeof(bits), "half2 is 32 bits");
  memcpy(&h, &bits, sizeof(bits));
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t bits) {
  __nv_bfloat162 h;
  static_assert(sizeof(h) == sizeof(bits), "bfloat162 is 32 bits");
  memcpy(&h, &bits, sizeof(bits));
  return __bfloat1622float2(h);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}

// Raw 16-bit pattern of one fp16/bf16 element, or 0 (+0.0 in both formats) when masked off.
__device__ __forceinline__ uint32_t load_bits16(const void* p, bool ok) {
  return ok ? static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(p))) : 0u;
}

// Read-only 16-byte loads. `volatile` keeps them in program order with the other volatile asm
// (the mma steps): a kernel that writes all its loads before its first mma gets them all in
// flight at once, where the compiler would otherwise sink each load next to its use to save
// registers, and leave one load in flight per thread.
//
// 16 bytes that this kernel reads exactly once (the base weight): skip L1 so that the vectors
// which are reused (rows of x, lora_a) keep it.
__device__ __forceinline__ uint4 load16_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 16 bytes that other warps of this SM read too.
__device__ __forceinline__ uint4 load16_cached(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 zero16() { return make_uint4(0u, 0u, 0u, 0u); }

// Dot product of two vectors of 8 fp16/bf16 elements, accumulated in fp32.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b, float acc) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w};
  const uint32_t bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = unpack2<T>(av[i]);
    const float2 fb = unpack2<T>(bv[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

// D = A B + D for one m16n8k16 tile with fp32 accumulators (sm_80+). With g = lane / 4 and
// t = lane % 4 (PTX ISA "matrix fragments for mma.m16n8k16"), each register holds two
// consecutive elements along k:
//   a0: A[g][2t..2t+1]     a1: A[g+8][2t..2t+1]   a2: A[g][2t+8..2t+9]   a3: A[g+8][2t+8..2t+9]
//   b0: B[2t..2t+1][g]     b1: B[2t+8..2t+9][g]
//   c[0..1]: C[g][2t..2t+1]                       c[2..3]: C[g+8][2t..2t+1]
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                             uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], uint32_t a0, uint32_t a1,
                                                     uint32_t a2, uint32_t a3, uint32_t b0,
                                                     uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], uint32_t a0,
                                                            uint32_t a1, uint32_t a2,
                                                            uint32_t a3, uint32_t b0,
                                                            uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (sm_90+; no-ops when compiled for older targets, and when the
// kernel was launched without the PDL attribute). A primary kernel calls
// pdl_launch_dependents() to let the next kernel on the stream start early; that kernel calls
// pdl_wait_primary() before its first read of the primary's output: the wait returns once the
// primary grid has completed and its writes are visible.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace lora_kernels
