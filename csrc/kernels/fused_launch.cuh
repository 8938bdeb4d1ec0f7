// What a launch of a router kernel adds to the router GEMM: nothing, a second GEMM over the same x
// (a LoRA layer's shrink), the routing of the logits (routing.cuh; the decode kernel only, route.h
// says why), or a LoRA layer's whole delta (the decode kernel only, in clusters). Shared by the decode and the tensor-core kernels, whose fused forms run the
// plain form's code and tiles.
#pragma once

#include <cuda_bf16.h>

#include "kernels/memory_access.cuh"
#include "kernels/route.h"
#include "kernels/router_gemm.h"

namespace moegate {
namespace sm90 {

// The second GEMM of a fused launch (a LoRA layer's shrink next to its base gate; router_gemm.h):
// the CTAs whose expert-dimension grid index is first_expert_block or more compute
// out[m, r] = sum_k x[m, k] * weight[r, k] in fp32, no bias, for `rows` rows, with the same code
// and tiles as the first GEMM's CTAs (so the first GEMM's outputs keep their bits).
struct ShrinkPart {
  const __nv_bfloat16* weight = nullptr;
  float* out = nullptr;
  int rows = 0;
  int first_expert_block = 0;

  // Host: the shrink's part of a fused launch's arguments; first_expert_block is the launcher's.
  static ShrinkPart of(const void* lora_a, int rows, float* xa) {
    ShrinkPart part;
    part.weight = static_cast<const __nv_bfloat16*>(lora_a);
    part.out = xa;
    part.rows = rows;
    return part;
  }
  // Host: why both fused launchers refuse these shrink arguments, or null.
  static const char* unsupported(const void* lora_a, int rows) {
    if (rows < 1) return "the shrink needs at least one row";
    if (!aligned_16B(lora_a)) return "lora_a must be 16-byte aligned";
    return nullptr;
  }
  // Device: whether expert-dimension grid index `block` is one of the shrink's. If it is, `block`
  // becomes its index among the shrink's blocks, the matrix (weight, no bias, E rows) the shrink's,
  // so that the CTA runs the first GEMM's code on the second, and `out` points at row
  // `first_token` of the shrink's output.
  __device__ __forceinline__ bool claim(int& block, const __nv_bfloat16* __restrict__& matrix,
                                        const __nv_bfloat16* __restrict__& bias, int& E,
                                        float*& shrink_out, long long first_token) const {
    const bool mine = block >= first_expert_block;
    if (mine) {
      block -= first_expert_block;
      matrix = weight;
      bias = nullptr;
      E = rows;
      shrink_out = out + first_token * rows;
    }
    return mine;
  }
};

enum class Fusion { kNone, kShrink, kRoute, kLora };
struct FusedPart {
  ShrinkPart shrink;
  RouteArgs route;
  LoraAdapters lora;
};

}  // namespace sm90
}  // namespace moegate
