// A LoRA layer's whole delta inside the decode kernel's launch (Fusion::kLora,
// router_gemm_small_m.cuh): what a CTA adds to its router GEMM.
//
// The grid's CTAs along the experts form clusters of kLoraCluster. The shrink of a token group,
// x[m] . A_s[r] for its tokens m (slot s = slot_ids[m]) and ranks r < rank, is split into
// "items" (m, r), `items` consecutive ones per CTA of the cluster: each CTA computes its items with
// the same per-thread chunks, warp butterfly and warp order as the fused shrink's CTAs
// (sm90::ShrinkPart), so every value has the two-launch path's bits. Each CTA pushes its items to
// every CTA of its cluster (one 16-byte st.async per target, counted on the target's mbarrier),
// waits for its own inbox, and each of its outputs (e, m) takes
//   out = round(base + scaling[s] * dot),  dot = sum_r xa[m, r] * B[s, e, r]
// in the order of lora_expand's group_dot: 8 lanes per output, lane l summing ranks [8l, 8l + 8)
// with fmaf, then three shuffles. base is the output rounded as the base gate rounds it. Tokens
// without an adapter store the base gate's bits. No CTA waits for a CTA outside its cluster: the
// handoff between clusters that costs 1.25-1.9 us (benchmarks/results/README.md, "What a handoff
// between the CTAs of one launch costs") is replaced by recomputing the shrink in every cluster.
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
static_assert(kMaxItems == 4, "one 16-byte message carries a CTA's items");
constexpr int kLanesPerOutput = 8;  // lora_expand's group_dot
constexpr int kValuesPerLane = 8;
constexpr int kMaxRank = kLanesPerOutput * kValuesPerLane;

template <int kWarps, int kOutputs>
struct Shared {
  float item_sums[kWarps][kMaxItems];
  __align__(16) float inbox[kCluster][kMaxItems];  // [sender's cluster rank][its items]
  float base[kOutputs];                            // outputs of adapted tokens, rounded
  __align__(8) uint64_t inbox_full;
};

// Before anything else: the inbox's mbarrier, published to the cluster (cluster_exchange.cuh).
template <int kWarps, int kOutputs>
__device__ __forceinline__ void start(Shared<kWarps, kOutputs>& shared) {
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

// Where item i of a cluster's shrink sits in every CTA's inbox: inbox[i / items][i % items] (sender
// i / items, which holds items consecutive ones), as a flat index. items is 1, 2 or 4
// (kLoraItemsPerCta's powers of two), so shifts and masks: divisions by a run-time value cost the
// expand a serial chain behind the exchange.
__host__ __device__ constexpr int inbox_index(int item, int items) {
  return (item >> (items >> 1)) * kMaxItems + (item & (items - 1));
}
constexpr bool inbox_index_is_the_division() {  // every item of a cluster, every items
  for (int items = 1; items <= kMaxItems; items *= 2)
    for (int item = 0; item < kCluster * items; ++item)
      if (inbox_index(item, items) != item / items * kMaxItems + item % items) return false;
  return true;
}
static_assert(inbox_index_is_the_division(), "inbox_index must equal the division form");

// What a thread knows of its CTA's token group after griddepcontrol.wait: the tokens' slots (-1:
// no adapter) and its items' A rows (read_items); then, once those rows' loads are issued, as an
// expand lane (thread t: output t / 8, lane t % 8), its output's slot, scale and 8 values of B
// (zeros past the rank; read_expand). The A rows go first: each starts a K-long dot product, the
// critical path, while B is needed only after the exchange (B first put about 25 SASS
// instructions more between the slots' arrival and the first A load).
template <int kExperts, int kTokens>
struct Tile {
  static constexpr int kOutputs = kExperts * kTokens;
  int slot[kTokens];
  const __nv_bfloat16* item_row[kMaxItems];  // null: no such item, or its token has no adapter
  int item_token[kMaxItems];
  int out_slot = -1;
  float scale = 0.f;
  uint4 b = make_uint4(0u, 0u, 0u, 0u);

  // tokens: the group's tokens (<= kTokens), from token m0.
  __device__ __forceinline__ void read_items(const LoraAdapters& lora, int items, int tokens,
                                             long long m0, int K) {
#pragma unroll
    for (int m = 0; m < kTokens; ++m) {
      const int64_t s = m < tokens ? lora.slot_ids[m0 + m] : -1;
      slot[m] = s >= 0 && s < lora.S ? static_cast<int>(s) : -1;
    }
    const auto* a = static_cast<const __nv_bfloat16*>(lora.lora_a);
    // Item first + u is (token m, rank row r): one division for the CTA's first item; the next
    // ones step r and wrap at most once (u < kMaxItems <= 8 <= rank).
    const int first = static_cast<int>(sm90::cluster_rank()) * items;
    const int m_first = first / lora.rank, r_first = first - m_first * lora.rank;
#pragma unroll
    for (int u = 0; u < kMaxItems; ++u) {
      const int wrap = r_first + u >= lora.rank ? 1 : 0;
      const int m = m_first + wrap, r = r_first + u - wrap * lora.rank;
      const int s = m < kTokens ? token_entry(slot, m) : -1;
      item_token[u] = m;
      item_row[u] = u < items && s >= 0 ? a + (static_cast<long long>(s) * lora.rank + r) * K
                                        : nullptr;
    }
  }

  // e0: the CTA's first expert.
  __device__ __forceinline__ void read_expand(const LoraAdapters& lora, int e0, int E) {
    const int t = static_cast<int>(threadIdx.x);
    const int o = t / kLanesPerOutput, lane = t % kLanesPerOutput;
    const int e = e0 + o / kTokens;
    if (o < kOutputs && e < E) {
      out_slot = token_entry(slot, o % kTokens);
      if (out_slot >= 0) {
        scale = lora.scaling[out_slot];
        const auto* row = static_cast<const __nv_bfloat16*>(lora.lora_b) +
                          (static_cast<long long>(out_slot) * E + e) * lora.rank;
        b = sm90::load_activation_16B(row + kValuesPerLane * lane, kValuesPerLane * lane < lora.rank);
      }
    }
  }
};

// The items' share of one pass: chunk j of each item's A row (xv: the chunk of every token of the
// group) into its accumulator, as the shrink's CTAs add it (dot8_bf16, the same operand order).
template <int kTokens>
// Items past `items` (the CTA's count, uniform) are skipped here and below: at rank 16, M = 1 a
// CTA has one item, and the other three's arithmetic was the critical path's.
__device__ __forceinline__ void add_items(const uint4 (&a)[kMaxItems], const uint4 (&xv)[kTokens],
                                          const int (&item_token)[kMaxItems], int items,
                                          float (&acc)[kMaxItems]) {
#pragma unroll
  for (int u = 0; u < kMaxItems; ++u)
    if (u < items)
      acc[u] = dot8_bf16(a[u], token_entry(xv, item_token[u] < kTokens ? item_token[u] : 0), acc[u]);
}

// Each warp's item sums into shared memory (the warp butterfly; the shrink's reduction adds in the
// same tree, whichever tile it runs in).
template <int kWarps, int kOutputs>
__device__ __forceinline__ void reduce_items(float (&acc)[kMaxItems], int items,
                                             Shared<kWarps, kOutputs>& sh) {
  const int t = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int u = 0; u < kMaxItems; ++u) {
    float v = 0.f;  // stored for absent items too: exchange reads each warp's 4 sums as one vector
    if (u < items) {
      v = acc[u];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    if (t % 32 == 0) sh.item_sums[t / 32][u] = v;
  }
}

// After the CTA's base outputs are in sh.base (and a CTA barrier): every CTA's items to every CTA
// of the cluster, then this CTA's inbox complete. All threads call it.
template <int kWarps, int kOutputs>
__device__ __forceinline__ void exchange(Shared<kWarps, kOutputs>& sh, int items) {
  const int t = static_cast<int>(threadIdx.x);
  const uint32_t bar = sm90::shared_address(&sh.inbox_full);
  sm90::cluster_wait_acquire();  // every mbarrier of the cluster is initialised
  if (t < kCluster) {
    float v[kMaxItems];
#pragma unroll
    for (int u = 0; u < kMaxItems; ++u) {
      float sum = 0.f;  // the shrink's order, and its "+ bias" of an absent bias
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += sh.item_sums[w][u];
      v[u] = u < items ? sum + 0.f : 0.f;
    }
    const uint32_t mine = sm90::shared_address(&sh.inbox[sm90::cluster_rank()][0]);
    sm90::push_to_rank(sm90::map_to_rank(mine, t), v, sm90::map_to_rank(bar, t));
  }
  if (t == 0) sm90::mbarrier_expect_bytes(bar, kCluster * sizeof(sh.inbox[0]));
  sm90::mbarrier_wait_phase0(bar);
}

__device__ __forceinline__ float2 widen_bf16x2(uint32_t bits) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
}

// The expand of an adapted token's outputs, group_dot's arithmetic; stores them.
template <int kWarps, int kExperts, int kTokens, typename Out>
__device__ __forceinline__ void expand(const Tile<kExperts, kTokens>& tile,
                                       const Shared<kWarps, kExperts * kTokens>& sh, int items,
                                       int rank, Out* out, int E, int e0) {
  if (tile.out_slot < 0) return;  // the same in the 8 lanes of an output
  const int t = static_cast<int>(threadIdx.x);
  const int o = t / kLanesPerOutput, lane = t % kLanesPerOutput;
  const int m = o % kTokens;
  const uint32_t words[4] = {tile.b.x, tile.b.y, tile.b.z, tile.b.w};
  // Every read issued before the first use (a rank row past the rank reads entry 0 and drops it).
  const float* inbox = &sh.inbox[0][0];
  float xa[kValuesPerLane];
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) {
    const int r = kValuesPerLane * lane + i;
    xa[i] = inbox[r < rank ? inbox_index(m * rank + r, items) : 0];
  }
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kValuesPerLane; ++i) {
    const int r = kValuesPerLane * lane + i;
    const float2 pair = widen_bf16x2(words[i / 2]);
    dot = fmaf(r < rank ? xa[i] : 0.f, i % 2 == 0 ? pair.x : pair.y, dot);
  }
  const unsigned group_mask = 0xffu << (t % 32 / kLanesPerOutput * kLanesPerOutput);
#pragma unroll
  for (int offset = kLanesPerOutput / 2; offset > 0; offset /= 2)
    dot += __shfl_xor_sync(group_mask, dot, offset);
  if (lane == 0)
    out[static_cast<long long>(m) * E + e0 + o / kTokens] = from_float<Out>(sh.base[o] + tile.scale * dot);
}

}  // namespace lora_cluster
}  // namespace moegate
