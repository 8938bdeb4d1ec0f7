// Device code of routing (semantics in route.h): one warp routes one token, and the "last CTA of a
// token tile" protocol that lets a router GEMM route its own logits in the same launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/grid_dependency.cuh"
#include "kernels/route.h"

namespace moegate {
namespace routing {

constexpr int kPerLane = kRouteMaxE / 32;

// An unsigned key whose order is the selection order of the values: NaN above +inf, -0.0 equal
// to +0.0. Every real value's key is above 0x7fffff, so 0 marks "no value here".
__device__ __forceinline__ uint32_t order_key(float v) {
  if (v != v) return 0xffffffffu;
  const uint32_t bits = __float_as_uint(v == 0.f ? 0.f : v);
  return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float(key & 0x80000000u ? key & 0x7fffffffu : ~key);
}

// A logit's raw bits (16 or 32 of them), 0 when !valid. Read at L2 (ld.global.cg): in a fused
// launch other CTAs wrote them moments ago. Predicated inside the asm so that a token's loads stay
// one straight-line block, all issued before the first use: written as `valid ? load : 0`, each
// load sat in its own branch and waited for the one before it (SASS).
__device__ __forceinline__ uint32_t load_logit_bits(const float* p, bool valid) {
  uint32_t v;
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b32 %0, 0;\n"
               " @q ld.global.cg.b32 %0, [%1];\n}\n"
               : "=r"(v) : "l"(p), "r"(static_cast<int>(valid)) : "memory");
  return v;
}
template <typename Half>  // __nv_bfloat16 or __half
__device__ __forceinline__ uint32_t load_logit_bits(const Half* p, bool valid) {
  unsigned short v;
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b16 %0, 0;\n"
               " @q ld.global.cg.b16 %0, [%1];\n}\n"
               : "=h"(v) : "l"(p), "r"(static_cast<int>(valid)) : "memory");
  return v;
}
__device__ __forceinline__ float logit_value(uint32_t bits, float) { return __uint_as_float(bits); }
__device__ __forceinline__ float logit_value(uint32_t bits, __nv_bfloat16) {
  return __uint_as_float(bits << 16);
}
__device__ __forceinline__ float logit_value(uint32_t bits, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

__device__ __forceinline__ void store_weight(const RouteArgs& r, long long i, float w) {
  if (r.weights_dtype == DType::kFloat32)
    static_cast<float*>(r.weights)[i] = w;
  else if (r.weights_dtype == DType::kBFloat16)
    static_cast<__nv_bfloat16*>(r.weights)[i] = __float2bfloat16_rn(w);
  else
    static_cast<__half*>(r.weights)[i] = __float2half_rn(w);
}

// Routes token `token` from its E logits `row` (E <= kRouteMaxE): called by all 32 lanes of a warp.
// Selection: k rounds, each a warp-wide max of keys (redux.sync), then the lowest index holding
// that key (a second redux), which its lane then clears. The sums run in a fixed order.
template <typename Logit>
__device__ __forceinline__ void route_token(const Logit* row, int E, long long token,
                                            const RouteArgs& r) {
  const int lane = threadIdx.x % 32;
  uint32_t keys[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) keys[i] = load_logit_bits(row + 32 * i + lane, 32 * i + lane < E);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i)
    keys[i] = 32 * i + lane < E ? order_key(logit_value(keys[i], Logit{})) : 0u;
  auto lane_best = [&](uint32_t& best_key, int& best_slot) {
    best_key = 0u;
    best_slot = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i)
      if (keys[i] > best_key) best_key = keys[i], best_slot = i;  // ties: the lower index
  };
  uint32_t best_key;
  int best_slot;
  lane_best(best_key, best_slot);

  float denominator = 0.f;  // kSoftmax: sum over all E of exp(l - max)
  if (r.scoring == Scoring::kSoftmax) {
    const float max_value = key_value(__reduce_max_sync(0xffffffffu, best_key));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float term = expf(key_value(keys[i]) - max_value);
      sum += keys[i] != 0u ? term : 0.f;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    denominator = sum;
  }

  float top_value[kRouteMaxK];
  int top_id[kRouteMaxK];
#pragma unroll
  for (int j = 0; j < kRouteMaxK; ++j) {
    top_value[j] = 0.f;
    top_id[j] = 0;
    if (j < r.top_k) {
      if (j > 0) lane_best(best_key, best_slot);
      const uint32_t key = __reduce_max_sync(0xffffffffu, best_key);
      const uint32_t candidate = best_key == key ? 32u * best_slot + lane : 0xffffffffu;
      const int id = static_cast<int>(__reduce_min_sync(0xffffffffu, candidate));
      top_value[j] = key_value(key);
      top_id[j] = id;
      if (id % 32 == lane) {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          if (i == id / 32) keys[i] = 0u;
      }
    }
  }

  float weight[kRouteMaxK];
  float total = 0.f;
#pragma unroll
  for (int j = 0; j < kRouteMaxK; ++j) {
    weight[j] = 0.f;
    if (j < r.top_k) {
      const float e = expf(top_value[j] - top_value[0]);
      weight[j] = r.scoring == Scoring::kSoftmax ? e / denominator : e;
      total += weight[j];
    }
  }
  const bool divide = r.scoring == Scoring::kSoftmaxTopk || r.renormalize;
#pragma unroll
  for (int j = 0; j < kRouteMaxK; ++j) {
    if (j < r.top_k && lane == j) {
      const long long i = token * r.top_k + j;
      store_weight(r, i, divide ? weight[j] / total : weight[j]);
      if (r.ids_int64)
        static_cast<int64_t*>(r.ids)[i] = top_id[j];
      else
        static_cast<int32_t*>(r.ids)[i] = top_id[j];
    }
  }
}

// Called by every thread of a CTA after its logit stores: whether this CTA is the last of the
// `ctas` CTAs of token tile `tile` to get here. Thread 0 releases the CTA's stores (ordered before
// it by the barrier) with its arrival and, in the last CTA, acquires everyone else's and resets
// the counter for the next launch. Returns the same answer in every thread.
__device__ __forceinline__ bool last_of_tile(const RouteArgs& r, int tile, unsigned ctas) {
  __shared__ bool last;
  sm90::cta_barrier();
  if (threadIdx.x == 0) {
    unsigned* counter = r.counters + tile;
    unsigned before;
    asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;"
                 : "=r"(before) : "l"(counter) : "memory");
    last = before == ctas - 1;
    if (last) asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(counter) : "memory");
  }
  sm90::cta_barrier();
  return last;
}

// The last CTA of a token tile routes its `tokens` tokens (rows of `logits`, E each), a warp per
// token in turn.
template <typename Logit>
__device__ __forceinline__ void route_tile(const Logit* logits, int E, long long first_token,
                                           int tokens, const RouteArgs& r) {
  const int warps = static_cast<int>(blockDim.x) / 32;
  for (int t = static_cast<int>(threadIdx.x) / 32; t < tokens; t += warps)
    route_token(logits + static_cast<long long>(t) * E, E, first_token + t, r);
}

}  // namespace routing
}  // namespace moegate
