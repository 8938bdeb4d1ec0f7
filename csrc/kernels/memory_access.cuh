// Memory access shared by the router kernels (sm_90): 16-byte operand loads that keep their place
// around griddepcontrol.wait, the output cast, the bias, L2 prefetches, and the launchers' size
// helpers.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace moegate {
namespace sm90 {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The launchers' alignment check for operands read with 16-byte loads.
inline bool aligned_16B(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// 16-byte loads, predicated inside the asm (zero when !valid) so that the load sequence stays one
// straight-line block: with `if (valid) load` every load sat in its own branch and ptxas interleaved
// them with the MMAs, paying one memory round trip per k block instead of one in all (seen in SASS).
//
// Weights use coherent loads that skip L1 (ld.global.L1::no_allocate; SASS LDG.E.NA): every row is
// read once per CTA, and ptxas keeps coherent loads where the source puts them, before
// griddepcontrol.wait. Non-coherent loads (ld.global.nc) it moved across the wait, losing the
// overlap with the previous kernel (benchmarks/results/README.md, "Coherent weight loads").
__device__ __forceinline__ uint4 load_weight_16B(const __nv_bfloat16* ptr, bool valid) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "r"(static_cast<int>(valid)));
  return v;
}

// Activations are written by the previous kernel: a coherent load, with a "memory" clobber so that
// the compiler keeps it after griddepcontrol.wait (an __ldg here was hoisted above the wait, which
// under PDL reads x before its producer has finished).
__device__ __forceinline__ uint4 load_activation_16B(const __nv_bfloat16* ptr, bool valid) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "r"(static_cast<int>(valid))
      : "memory");
  return v;
}

// The same for one float (zero when !valid).
__device__ __forceinline__ float load_activation_f32(const float* ptr, bool valid) {
  float v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, 0f00000000;\n"
      " @p ld.global.f32 %0, [%1];\n}\n"
      : "=f"(v)
      : "l"(ptr), "r"(static_cast<int>(valid))
      : "memory");
  return v;
}

template <typename Out>
__device__ __forceinline__ Out store_cast(float v);
template <>
__device__ __forceinline__ float store_cast<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// One bias element as raw bits (0 when there is none), widened only where it is added, so that no
// instruction waits for it before the epilogue. Kernels issue it after their first weight and
// activation loads: every CTA reads the same one or two bias lines, and issued before the rows
// that read held them up (benchmarks/results/README.md, "Bias behind the rows").
__device__ __forceinline__ unsigned short load_bias_bits(const __nv_bfloat16* bias, int e,
                                                         bool ok) {
  return ok && bias != nullptr ? __bfloat16_as_ushort(bias[e]) : 0;
}
__device__ __forceinline__ float bias_value(unsigned short bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

// Asks L2 for every line of bytes [begin, begin + size) (size > 0), one line per thread and pass.
template <int kCtaThreads>
__device__ __forceinline__ void prefetch_l2(const char* begin, long long size) {
  constexpr int kLine = 128;
  const char* first = begin - reinterpret_cast<std::uintptr_t>(begin) % kLine;
  const int lines = static_cast<int>((begin + size - first + kLine - 1) / kLine);
#pragma unroll 1
  for (int i = threadIdx.x; i < lines; i += kCtaThreads)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(first + static_cast<long long>(i) * kLine));
}

}  // namespace sm90
}  // namespace moegate
