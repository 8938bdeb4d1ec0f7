// A LoRA layer's whole delta inside the decode kernel's launch (Fusion::kLora,
// router_gemm_small_m.cuh): what a CTA adds to its router GEMM.
//
// The grid's CTAs along the experts form clusters of kLoraCluster. The shrink of a token group,
// x[m] . A_s[r] for its tokens m (slot s = slot_ids[m]) and ranks r < rank, is split into
// "items" (m, r), kItems consecutive ones per CTA of the cluster: each CTA computes its items with
// the same per-thread chunks, warp butterfly and warp order as the fused shrink's CTAs
// (sm90::ShrinkPart), so every value has the two-launch path's bits. Each CTA pushes its items to
// every CTA of its cluster (one st.async of kItems floats per target, counted on the target's
// mbarrier), waits for its own inbox, and each of its outputs (e, m) takes
//   out = round(base + scaling[s] * dot),  dot = sum_r xa[m, r] * B[s, e, r]
// in the order of lora_expand's group_dot: 8 lanes per output, lane l summing ranks [8l, 8l + 8)
// with fmaf, then three shuffles. base is the output rounded as the base gate rounds it. Tokens
// without an adapter store the base gate's bits.
// The CTA's threads run one straight path (kItems a template parameter, the inbox in item order,
// the base sum in the storing lane): here the kernel is latency-bound, one or two warps per
// scheduler, so every instruction on a warp's path costs its latency, and the first form, with
// items, the inbox index and a second CTA barrier decided at run time, ran 480 instructions a
// warp against the probe design's 300 (benchmarks/results/README.md, "One straight path").
// No CTA waits for a CTA outside its cluster: the handoff between clusters that costs 1.25-1.9 us
// (benchmarks/results/README.md, "What a handoff between the CTAs of one launch costs") is
// replaced by recomputing the shrink in every cluster.
//
// PDL: the slots, hence which rows of A and B to read, are known only after
// griddepcontrol.wait, so every LoRA load comes after it; the mbarrier set-up before it touches
// only this CTA's shared memory.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cluster_exchange.cuh"
#include "kernels/float_convert.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/memory_access.cuh"
#include "kernels/router_gemm.h"

namespace moegate {
namespace lora_cluster {

constexpr int kCluster = 16;  // CTAs a cluster (non-portable size: the launcher allows it)
constexpr int kMaxItems = kLoraItemsPerCta;
constexpr int kLanesPerOutput = 8;  // lora_expand's group_dot
constexpr int kValuesPerLane = 8;
constexpr int kMaxRank = kLanesPerOutput * kValuesPerLane;

template <int kWarps>
struct Shared {
  float item_sums[kWarps][kMaxItems];
  // The cluster's items in order: item i = (token i / rank, rank row i % rank) at inbox[i], from
  // the CTA of cluster rank i / kItems. A token's xa row is then rank consecutive floats.
  __align__(16) float inbox[kCluster * kMaxItems];
  __align__(8) uint64_t inbox_full;
};

// Before anything else: the inbox's mbarrier, published to the cluster (cluster_exchange.cuh).
template <int kWarps>
__device__ __forceinline__ void start(Shared<kWarps>& shared) {
  if (threadIdx.x == 0) sm90::mbarrier_init_for_cluster(sm90::shared_address(&shared.inbox_full));
  sm90::cluster_arrive_relaxed();
}

// Entry t of a token group's per-token values (t < kTokens; unrolled selects, not a dynamically
// indexed array, which would live in local memory).
template <int kTokens, typename T>
__device__ __forceinline__ T token_entry(const T (&values)[kTokens], int t) {
  T v = values[0];
#pragma unroll
  for (int n = 1; n < kTokens; ++n) v = n == t ? values[n] : v;
  return v;
}

// Threads with work after the CTA's sums: the pushes (one a cluster rank) and the expand lanes
// (8 an output). The others leave; those stay until the inbox is complete, which keeps the CTA
// resident while its cluster still writes into it.
template <int kOutputs>
__device__ __forceinline__ bool has_exchange_role() {
  constexpr int kLanes = kOutputs * kLanesPerOutput;
  return static_cast<int>(threadIdx.x) < (kLanes > kCluster ? kLanes : kCluster);
}

// What a thread knows of its CTA's token group after griddepcontrol.wait: the tokens' slots (-1:
// no adapter) and its items' A rows (read_slots, find_items); then, once those rows' loads are
// issued, as an expand lane (thread t: output t / 8, lane t % 8), its output's slot, scale, bias
// and 8 values of B (zeros past the rank; read_expand). The A rows go first: each starts a K-long
// dot product, the critical path, while B is needed only after the exchange.
template <int kExperts, int kTokens, int kItems>
struct Tile {
  static constexpr int kOutputs = kExperts * kTokens;
  int slot[kTokens];
  const __nv_bfloat16* item_row[kItems];
  bool item_live[kItems];  // false: the item's token is past the group or has no adapter
  int item_token[kItems];  // its token in the group (0 where past it: never read then)
  int out_slot = -1;
  float scale = 0.f;
  unsigned short bias_bits = 0;
  uint4 b = make_uint4(0u, 0u, 0u, 0u);

  // First after griddepcontrol.wait, ahead of x: the slots start the longest chain of loads (slot,
  // A row, then the dot product). tokens: the group's tokens (<= kTokens), from token m0.
  __device__ __forceinline__ void read_slots(const LoraAdapters& lora, int tokens, long long m0) {
#pragma unroll
    for (int m = 0; m < kTokens; ++m) {
      const int64_t s = m < tokens ? lora.slot_ids[m0 + m] : -1;
      slot[m] = s >= 0 && s < lora.S ? static_cast<int>(s) : -1;
    }
  }

  // After read_slots: where the items' A rows are.
  __device__ __forceinline__ void find_items(const LoraAdapters& lora, int K) {
    // Item first + u is (token m, rank row r), m = the multiples of rank it has reached: compares,
    // not a division by the run-time rank (m = kTokens: past the group).
    const int first = static_cast<int>(sm90::cluster_rank()) * kItems;
    const auto* a = static_cast<const __nv_bfloat16*>(lora.lora_a);
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      int m = 0;
#pragma unroll
      for (int k = 1; k <= kTokens; ++k) m += first + u >= k * lora.rank ? 1 : 0;
      item_token[u] = m < kTokens ? m : 0;
      const int s = m < kTokens ? token_entry(slot, m) : -1;
      item_live[u] = s >= 0;
      const int r = first + u - m * lora.rank;
      item_row[u] = item_live[u] ? a + (static_cast<long long>(s) * lora.rank + r) * K : a;
    }
  }

  // e0: the CTA's first expert. Predicated loads in one straight-line block, no branch: in a
  // branch ptxas placed B's load after the base gate's FMAs, which wait for x and A, so B took
  // a second trip to memory after the first (SASS); here it is issued with the A rows.
  __device__ __forceinline__ void read_expand(const LoraAdapters& lora,
                                              const __nv_bfloat16* bias, int e0, int E) {
    const int t = static_cast<int>(threadIdx.x);
    const int o = t / kLanesPerOutput, lane = t % kLanesPerOutput;
    const int e = e0 + o / kTokens;
    out_slot = o < kOutputs && e < E ? token_entry(slot, o % kTokens) : -1;
    const bool live = out_slot >= 0;
    const int s = live ? out_slot : 0, e_read = live ? e : 0;  // addresses in bounds when !live
    scale = sm90::load_activation_f32(lora.scaling + s, live);
    bias_bits = sm90::load_bias_bits(bias, e_read, live && lane == 0);
    const auto* row = static_cast<const __nv_bfloat16*>(lora.lora_b) +
                      (static_cast<long long>(s) * E + e_read) * lora.rank;
    b = sm90::load_activation_16B(row + kValuesPerLane * lane,
                                  live && kValuesPerLane * lane < lora.rank);
  }
};

// The items' share of one pass: chunk j of each item's A row (xv: the chunk of every token of the
// group) into its accumulator, as the shrink's CTAs add it (dot8_bf16, the same operand order).
template <int kTokens, int kItems>
__device__ __forceinline__ void add_items(const uint4 (&a)[kItems], const uint4 (&xv)[kTokens],
                                          const int (&item_token)[kItems], float (&acc)[kItems]) {
#pragma unroll
  for (int u = 0; u < kItems; ++u) acc[u] = dot8_bf16(a[u], token_entry(xv, item_token[u]), acc[u]);
}

// Each warp's item sums into shared memory (the warp butterfly; the shrink's reduction adds in the
// same tree, whichever tile it runs in).
template <int kWarps, int kItems>
__device__ __forceinline__ void reduce_items(float (&acc)[kItems], Shared<kWarps>& sh) {
  const int t = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    float v = acc[u];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (t % 32 == 0) sh.item_sums[t / 32][u] = v;
  }
}

// After a CTA barrier behind reduce_items: the CTA's items to every CTA of the cluster (thread t
// pushes to cluster rank t), and thread 0 announces the inbox's bytes. Every thread calls it.
template <int kItems, int kWarps>
__device__ __forceinline__ void push_items(Shared<kWarps>& sh) {
  const int t = static_cast<int>(threadIdx.x);
  const uint32_t bar = sm90::shared_address(&sh.inbox_full);
  sm90::cluster_wait_acquire();  // every mbarrier of the cluster is initialised
  if (t < kCluster) {
    float v[kItems];
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += sh.item_sums[w][u];
      v[u] = sum + 0.f;  // the shrink's order, and its "+ bias" of an absent bias
    }
    const uint32_t mine = sm90::shared_address(&sh.inbox[sm90::cluster_rank() * kItems]);
    sm90::push_to_rank(sm90::map_to_rank(mine, t), v, sm90::map_to_rank(bar, t));
  }
  if (t == 0) sm90::mbarrier_expect_bytes(bar, kCluster * kItems * sizeof(float));
}

template <int kWarps>
__device__ __forceinline__ void wait_inbox(Shared<kWarps>& sh) {
  sm90::mbarrier_wait_phase0(sm90::shared_address(&sh.inbox_full));
}

__device__ __forceinline__ float2 widen_bf16x2(uint32_t bits) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

// The expand of an adapted token's outputs, group_dot's arithmetic, after wait_inbox; lane 0 of
// each output adds it to `base` (its base output, rounded as the base gate rounds it) and stores.
template <int kWarps, int kExperts, int kTokens, int kItems, typename Out>
__device__ __forceinline__ void expand(const Tile<kExperts, kTokens, kItems>& tile,
                                       const Shared<kWarps>& sh, int rank, float base, Out* out,
                                       int E, int e0) {
  if (tile.out_slot < 0) return;  // the same in the 8 lanes of an output
  const int t = static_cast<int>(threadIdx.x);
  const int o = t / kLanesPerOutput, lane = t % kLanesPerOutput;
  const int m = o % kTokens;
  const uint32_t words[4] = {tile.b.x, tile.b.y, tile.b.z, tile.b.w};
  // The lane's 8 ranks of its token's xa row (rank is a multiple of 8: all in or all past it).
  float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
  if (kValuesPerLane * lane < rank) {
    const auto* xa = reinterpret_cast<const float4*>(&sh.inbox[m * rank + kValuesPerLane * lane]);
    lo = xa[0];
    hi = xa[1];
  }
  const float xa[kValuesPerLane] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) {
    const float2 pair = widen_bf16x2(words[i / 2]);
    dot = fmaf(xa[i], i % 2 == 0 ? pair.x : pair.y, dot);
  }
  const unsigned group_mask = 0xffu << (t % 32 / kLanesPerOutput * kLanesPerOutput);
#pragma unroll
  for (int offset = kLanesPerOutput / 2; offset > 0; offset /= 2)
    dot += __shfl_xor_sync(group_mask, dot, offset);
  if (lane == 0)
    out[static_cast<long long>(m) * E + e0 + o / kTokens] = from_float<Out>(base + tile.scale * dot);
}

}  // namespace lora_cluster
}  // namespace moegate
