// The LoRA expand kernel (semantics in lora_expand.h). It replaces the eight small kernels of the
// batched-PyTorch expand (scale, bmm, clamp, gather, compare, add, cast, select) with one launch:
// at decode sizes each of those costs a launch, not bandwidth.
//
// Eight lanes per output (token m, expert e). Lane k of a group reads values [8k, 8k + 8) of each
// 64-value chunk of the expert's row of B and the matching xa values, so one warp-wide load covers
// four whole rows of B (coalesced) and every load of a chunk is issued before its first FMA: a rank
// up to 64 costs one trip to memory. (The kernel before this one gave each thread a whole row and
// walked r eight values per loop trip, each trip's loads waiting for the last trip's FMAs: at
// R = 64, eight dependent trips to memory, in its SASS.) Each lane sums its values in order, then
// three shuffles add the group's eight partial sums in a fixed tree: the result is bitwise
// reproducible.
//
// Every CTA works on one token at a time (grid rows), so the token's slot, its xa row and the
// choice between "adapter" and "no adapter" are the same for the whole CTA.
//
// PDL (when the launch asks for it), by the rules of the router kernels (router_gemm_sm90.cuh):
// before griddepcontrol.wait the kernel only prefetches B into L2, every slot's rows of its
// experts, since the token's slot is not known yet (slot_ids may be written by the kernel before);
// slot_ids, logits, xa and scaling are read after the wait, nothing is written before it, and
// launch_dependents fires at entry (grid_dependency.cuh). B is a parameter no kernel writes
// while routers run. In a GateLinearWithLoRA the expand follows the kernel that computes xa, so
// B's HBM trip overlaps that kernel's tail and the expand pays L2 trips only.
#include <cstdint>

#include "kernels/float_convert.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/lora_expand.h"
#include "kernels/memory_access.cuh"
#include "kernels/route.h"
#include "kernels/routing.cuh"

namespace moegate {
namespace {

constexpr int kThreads = 128;
constexpr int kLanesPerOutput = 8;
constexpr int kValuesPerLane = 8;
constexpr int kChunk = kLanesPerOutput * kValuesPerLane;    // rank values per pass
constexpr int kOutputsPerCta = kThreads / kLanesPerOutput;  // experts per CTA
constexpr int kMaxGridRows = 65535;                         // gridDim.y limit; more tokens loop
constexpr int kRouteThreads = 256;  // the routing form: 32 outputs per pass over a token's E

__device__ __forceinline__ float2 widen2(uint32_t bits, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}
__device__ __forceinline__ float2 widen2(uint32_t bits, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&bits));
}

// p[0, 8) as floats, in 16-byte loads (p 16-byte aligned).
__device__ __forceinline__ void load8_vector(const float* p, float (&v)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + 4);
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
  v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}
template <typename Half>  // __half or __nv_bfloat16
__device__ __forceinline__ void load8_vector(const Half* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = widen2(words[i], Half{});
    v[2 * i] = pair.x;
    v[2 * i + 1] = pair.y;
  }
}

// row[first, first + 8) as floats, zeros from index `count` on. kVector: count % 8 == 0 and the
// row 16-byte aligned, so a lane's eight values are all inside the row or all past its end.
template <bool kVector, typename T>
__device__ __forceinline__ void load8(const T* row, int first, int count, float (&v)[8]) {
  if constexpr (kVector) {
    if (first < count) {
      load8_vector(row + first, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = first + i < count ? to_float(row[first + i]) : 0.f;
  }
}

// sum_r xa_row[r] * b_row[r] for r < R, over the kLanesPerOutput lanes of a group (group_mask):
// each lane sums its values in order, then three shuffles add the group's partial sums in a fixed
// tree. Every lane of the group gets the sum.
template <bool kVector, typename B>
__device__ __forceinline__ float group_dot(const float* xa_row, const B* b_row, int R, int lane,
                                           unsigned group_mask) {
  float dot = 0.f;
  for (int r0 = 0; r0 < R; r0 += kChunk) {
    const int first = r0 + lane * kValuesPerLane;
    float b[kValuesPerLane], x[kValuesPerLane];
    load8<kVector>(b_row, first, R, b);
    load8<kVector>(xa_row, first, R, x);
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) dot = fmaf(x[i], b[i], dot);
  }
#pragma unroll
  for (int offset = kLanesPerOutput / 2; offset > 0; offset /= 2)
    dot += __shfl_xor_sync(group_mask, dot, offset);
  return dot;
}

// Grid: (ceil(E / kOutputsPerCta), min(M, kMaxGridRows)); group g of a CTA owns expert
// blockIdx.x * kOutputsPerCta + g, and CTA row y tokens y, y + gridDim.y, ...
template <bool kVector, typename Logit, typename B>
__global__ void __launch_bounds__(kThreads)
    lora_expand_kernel(const Logit* __restrict__ logits, const float* __restrict__ xa,
                       const B* __restrict__ lora_b, const float* __restrict__ scaling,
                       const int64_t* __restrict__ slot_ids, Logit* __restrict__ out, int M, int E,
                       int S, int R, bool pdl) {
  sm90::trigger_dependents();  // at entry (grid_dependency.cuh)
  const int e_begin = blockIdx.x * kOutputsPerCta;
  if (pdl) {  // slot s's rows of this CTA's experts are contiguous; CTA row y takes slots y, ...
    const int experts = min(kOutputsPerCta, E - e_begin);
#pragma unroll 1
    for (int s = blockIdx.y; s < S; s += gridDim.y) {
      const B* rows = lora_b + (static_cast<long long>(s) * E + e_begin) * R;
      sm90::prefetch_l2<kThreads>(
          reinterpret_cast<const char*>(rows),
          static_cast<long long>(experts) * R * static_cast<long long>(sizeof(B)));
    }
  }
  sm90::grid_dependency_wait(pdl);

  const int e = e_begin + threadIdx.x / kLanesPerOutput;
  const int lane = threadIdx.x % kLanesPerOutput;
  const unsigned group_mask = 0xffu << (threadIdx.x % 32 / kLanesPerOutput * kLanesPerOutput);
  // Groups past E skip the loop as a whole (the shuffles stay within a group).
  for (long long m = blockIdx.y; e < E && m < M; m += gridDim.y) {
    const long long index = m * E + e;
    const int64_t s = slot_ids[m];
    if (s < 0 || s >= S) {
      if (lane == 0) out[index] = logits[index];
      continue;
    }
    const float base = to_float(logits[index]);  // issued with the rows, not after the sum
    const float scale = scaling[s];
    const float* xa_row = xa + (m * S + s) * R;
    const B* b_row = lora_b + (s * E + e) * static_cast<long long>(R);
    const float dot = group_dot<kVector>(xa_row, b_row, R, lane, group_mask);
    if (lane == 0) out[index] = from_float<Logit>(base + scale * dot);
  }
}

// The expand and the routing of its outputs (route.h) in one launch. Grid: (1, min(M,
// kMaxGridRows)); a CTA computes all E outputs of its tokens (token y, y + gridDim.y, ...), each as
// lora_expand_kernel does (the same bits), keeps them in shared memory too, and its first warp
// routes the token. No CTA needs another's outputs, so no counters.
template <bool kVector, typename Logit, typename B>
__global__ void __launch_bounds__(kRouteThreads)
    lora_expand_route_kernel(const Logit* __restrict__ logits, const float* __restrict__ xa,
                             const B* __restrict__ lora_b, const float* __restrict__ scaling,
                             const int64_t* __restrict__ slot_ids, Logit* __restrict__ out, int M,
                             int E, int S, int R, bool pdl, RouteArgs route) {
  __shared__ Logit row[kRouteMaxE];
  sm90::trigger_dependents();  // at entry (grid_dependency.cuh)
  if (pdl) {  // every slot's B (the token's slot is not known yet); CTA row y takes slots y, ...
#pragma unroll 1
    for (int s = blockIdx.y; s < S; s += gridDim.y)
      sm90::prefetch_l2<kRouteThreads>(
          reinterpret_cast<const char*>(lora_b + static_cast<long long>(s) * E * R),
          static_cast<long long>(E) * R * static_cast<long long>(sizeof(B)));
  }
  sm90::grid_dependency_wait(pdl);
  const int lane = threadIdx.x % kLanesPerOutput;
  const unsigned group_mask = 0xffu << (threadIdx.x % 32 / kLanesPerOutput * kLanesPerOutput);
  for (long long m = blockIdx.y; m < M; m += gridDim.y) {
    const int64_t s = slot_ids[m];
    const bool adapted = s >= 0 && s < S;  // the same in the whole CTA
    for (int e = threadIdx.x / kLanesPerOutput; e < E; e += kRouteThreads / kLanesPerOutput) {
      const long long index = m * E + e;
      Logit value = logits[index];
      if (adapted) {
        const float dot = group_dot<kVector>(xa + (m * S + s) * R,
                                             lora_b + (s * E + e) * static_cast<long long>(R), R,
                                             lane, group_mask);
        value = from_float<Logit>(to_float(value) + scaling[s] * dot);
      }
      if (lane == 0) {
        out[index] = value;
        row[e] = value;
      }
    }
    sm90::cta_barrier();
    if (threadIdx.x < 32) routing::route_shared_row(row, E, m, route);
    sm90::cta_barrier();  // the row is rewritten for the next token
  }
}

using sm90::aligned_16B;

template <bool kVector, typename Logit, typename B>
cudaError_t launch_shaped(const LoraExpandArgs& a) {
  const dim3 grid((a.E + kOutputsPerCta - 1) / kOutputsPerCta,
                  a.M < kMaxGridRows ? a.M : kMaxGridRows);
  return sm90::launch_maybe_dependent(lora_expand_kernel<kVector, Logit, B>, grid,
                                      dim3(kThreads, 1, 1), a.stream, a.pdl,
                                      static_cast<const Logit*>(a.logits), a.xa,
                                      static_cast<const B*>(a.lora_b), a.scaling, a.slot_ids,
                                      static_cast<Logit*>(a.out), a.M, a.E, a.S, a.R, a.pdl);
}

template <bool kVector, typename Logit, typename B>
cudaError_t launch_routed(const LoraExpandArgs& a, const RouteArgs& route) {
  const dim3 grid(1, a.M < kMaxGridRows ? a.M : kMaxGridRows);
  return sm90::launch_maybe_dependent(lora_expand_route_kernel<kVector, Logit, B>, grid,
                                      dim3(kRouteThreads, 1, 1), a.stream, a.pdl,
                                      static_cast<const Logit*>(a.logits), a.xa,
                                      static_cast<const B*>(a.lora_b), a.scaling, a.slot_ids,
                                      static_cast<Logit*>(a.out), a.M, a.E, a.S, a.R, a.pdl, route);
}

// route null: the plain expand; else the routing form.
template <typename Logit, typename B>
cudaError_t launch_typed(const LoraExpandArgs& a, const RouteArgs* route) {
  // 16-byte loads when every lane's eight values are whole vectors: ranks in multiples of 8
  // (what adapters use) and aligned buffers (what the allocator gives).
  const bool vector = a.R % kValuesPerLane == 0 && aligned_16B(a.lora_b) && aligned_16B(a.xa);
  if (route != nullptr)
    return vector ? launch_routed<true, Logit, B>(a, *route)
                  : launch_routed<false, Logit, B>(a, *route);
  return vector ? launch_shaped<true, Logit, B>(a) : launch_shaped<false, Logit, B>(a);
}

template <typename Logit>
cudaError_t launch_for_logits(const LoraExpandArgs& a, const RouteArgs* route) {
  switch (a.b_dtype) {
    case DType::kFloat32: return launch_typed<Logit, float>(a, route);
    case DType::kFloat16: return launch_typed<Logit, __half>(a, route);
    case DType::kBFloat16: return launch_typed<Logit, __nv_bfloat16>(a, route);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch(const LoraExpandArgs& a, const RouteArgs* route) {
  if (a.M <= 0 || a.E <= 0 || a.S <= 0 || a.R <= 0) return cudaErrorInvalidValue;
  switch (a.logits_dtype) {
    case DType::kFloat32: return launch_for_logits<float>(a, route);
    case DType::kFloat16: return launch_for_logits<__half>(a, route);
    case DType::kBFloat16: return launch_for_logits<__nv_bfloat16>(a, route);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_lora_expand(const LoraExpandArgs& a) { return launch(a, nullptr); }

cudaError_t launch_lora_expand_route(const LoraExpandArgs& a, const RouteArgs& route) {
  if (route_unsupported(route, a.E) != nullptr) return cudaErrorInvalidValue;
  return launch(a, &route);
}

}  // namespace moegate
