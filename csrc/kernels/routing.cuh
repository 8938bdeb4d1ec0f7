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

// A token's E logits as raw bits: lane l holds logits l, l + 32, ..., kSlots of them (0 past E).
template <int kSlots, typename Logit>
__device__ __forceinline__ void load_row(const Logit* row, int E, uint32_t (&bits)[kSlots]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) bits[i] = load_logit_bits(row + 32 * i + lane, 32 * i + lane < E);
}

// Routes token `token` from its loaded logits (load_row): called by all 32 lanes of a warp.
// Selection: expert e's rank is (key, -e), unique per expert. Round j takes the largest rank below
// round j-1's: a warp-wide max of the keys (redux.sync), then of -e among the lanes holding that
// key (a second redux). Nothing is written back into the lanes' arrays (a cleared slot would be a
// dynamically indexed store, which sent the array to local memory). Sums run in a fixed order.
template <int kSlots, typename Logit>
__device__ __forceinline__ void route_loaded(const uint32_t (&bits)[kSlots], int E, long long token,
                                             const RouteArgs& r) {
  const int lane = threadIdx.x % 32;
  uint32_t keys[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    keys[i] = 32 * i + lane < E ? order_key(logit_value(bits[i], Logit{})) : 0u;
  auto rank = [&](int i) {  // (key, 0xffffffff - expert): larger is selected first
    return static_cast<unsigned long long>(keys[i]) << 32 | (0xffffffffu - (32u * i + lane));
  };

  // Lane j < top_k keeps selection j; every lane keeps the largest logit (selection 0).
  float top = 0.f, mine = 0.f;
  int my_id = 0;
  unsigned long long previous = 0ull;
#pragma unroll
  for (int j = 0; j < kRouteMaxK; ++j) {
    if (j < r.top_k) {
      unsigned long long best = 0ull;
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        const unsigned long long candidate = rank(i);
        if ((j == 0 || candidate < previous) && candidate > best) best = candidate;
      }
      const uint32_t key = __reduce_max_sync(0xffffffffu, static_cast<uint32_t>(best >> 32));
      const uint32_t low = __reduce_max_sync(
          0xffffffffu, static_cast<uint32_t>(best >> 32) == key ? static_cast<uint32_t>(best) : 0u);
      previous = static_cast<unsigned long long>(key) << 32 | low;
      if (j == 0) top = key_value(key);
      if (lane == j) {
        mine = key_value(key);
        my_id = static_cast<int>(0xffffffffu - low);
      }
    }
  }

  // Weights: lane j's exp, and sums over lanes in a fixed butterfly (bitwise deterministic).
  const bool selected = lane < r.top_k;
  float weight = selected ? expf(mine - top) : 0.f;
  if (r.scoring == Scoring::kSoftmax) {  // divided by the sum over all E of exp(l - max)
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const float term = expf(key_value(keys[i]) - top);
      sum += keys[i] != 0u ? term : 0.f;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    weight /= sum;
  }
  if (r.scoring == Scoring::kSoftmaxTopk || r.renormalize) {
    float total = weight;
#pragma unroll
    for (int offset = kRouteMaxK / 2; offset > 0; offset /= 2)
      total += __shfl_xor_sync(0xffffffffu, total, offset);  // lanes >= k hold 0
    weight /= total;
  }
  if (selected) {
    const long long i = token * r.top_k + lane;
    store_weight(r, i, weight);
    if (r.ids_int64)
      static_cast<int64_t*>(r.ids)[i] = my_id;
    else
      static_cast<int32_t*>(r.ids)[i] = my_id;
  }
}

// One warp routes rows first, first + step, ... below `count` of `rows` (E logits each; row i is
// token first_token + i). Every caller gives a warp one row (a warp per token): routing a token is
// a chain of dependent instructions, and a warp with several rows runs their chains one after
// another.
template <int kSlots, typename Logit>
__device__ __forceinline__ void route_rows_sized(const Logit* rows, int E, long long first_token,
                                                 int first, int count, int step,
                                                 const RouteArgs& r) {
  for (int i = first; i < count; i += step) {
    uint32_t bits[kSlots];
    load_row(rows + static_cast<long long>(i) * E, E, bits);
    route_loaded<kSlots, Logit>(bits, E, first_token + i, r);
  }
}

// route_rows_sized with as few logits a lane as E allows (E <= kRouteMaxE). Inlined: called as a
// function it passed RouteArgs through a stack frame and cost the decode kernel's fused routing
// 0.3-0.6 us a call (benchmarks/results/README.md, "Routing inlined").
template <typename Logit>
__device__ __forceinline__ void route_rows(const Logit* rows, int E, long long first_token,
                                           int first, int count, int step, const RouteArgs& r) {
  if (E <= 32)
    route_rows_sized<1>(rows, E, first_token, first, count, step, r);
  else if (E <= 128)
    route_rows_sized<4>(rows, E, first_token, first, count, step, r);
  else
    route_rows_sized<kPerLane>(rows, E, first_token, first, count, step, r);
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

// A token's logits from shared memory, as load_row.
__device__ __forceinline__ uint32_t raw_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t raw_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t raw_bits(__half v) { return __half_as_ushort(v); }

template <int kSlots, typename Logit>
__device__ __forceinline__ void route_shared_row_sized(const Logit* row, int E, long long token,
                                                       const RouteArgs& r) {
  const int lane = threadIdx.x % 32;
  uint32_t bits[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) bits[i] = 32 * i + lane < E ? raw_bits(row[32 * i + lane]) : 0u;
  route_loaded<kSlots, Logit>(bits, E, token, r);
}

// One warp routes token `token` from its E logits in shared memory (E <= kRouteMaxE).
template <typename Logit>
__device__ __forceinline__ void route_shared_row(const Logit* row, int E, long long token,
                                                 const RouteArgs& r) {
  if (E <= 32)
    route_shared_row_sized<1>(row, E, token, r);
  else if (E <= 128)
    route_shared_row_sized<4>(row, E, token, r);
  else
    route_shared_row_sized<kPerLane>(row, E, token, r);
}

// The last CTA of a token tile routes its `tokens` tokens (rows of `logits`, E each), its warps
// taking every warps-th token.
template <typename Logit>
__device__ __forceinline__ void route_tile(const Logit* logits, int E, long long first_token,
                                           int tokens, const RouteArgs& r) {
  const int warps = static_cast<int>(blockDim.x) / 32;
  route_rows(logits, E, first_token, static_cast<int>(threadIdx.x) / 32, tokens, warps, r);
}

}  // namespace routing
}  // namespace moegate
