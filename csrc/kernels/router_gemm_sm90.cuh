// The Hopper router GEMM: split-K over a thread-block cluster, tensor-core MMAs straight from
// registers, partial sums pushed through distributed shared memory and added in a fixed order.
//
// Why this shape. At decode sizes the router moves < 1 MB and does < 0.1 GFLOP: its cost is the
// launch plus one trip to HBM, not bandwidth. So the kernel spreads the weight over many CTAs
// (experts x K slices), every warp issues all of its 16-byte loads before its first MMA (one
// memory round trip per warp), and the K slices of one expert tile meet in a cluster's shared
// memory instead of a global workspace (no memset, no atomics, bitwise-deterministic order).
// Per CTA: loads, MMAs, the warps' partials added in shared memory, asynchronous pushes of those
// sums to their owners, a wait on its own mbarrier until every partial it owns has landed, sums,
// stores. No closing cluster barrier: it cost more than this handoff
// (benchmarks/results/README.md).
//
// The MMA is mma.sync m16n8k16 bf16 -> fp32 with the operands swapped (logits^T = W x^T): experts
// fill the 16-row side, tokens the 8-column side, so M = 1 wastes 7/8 of a tile, not 15/16.
// A dot product may visit k in any order as long as both operands use the same one, so each
// thread loads 8 consecutive bf16 (16 bytes) of a weight row and of an x row and feeds them to two
// consecutive k16 MMAs; the permutation is identical for both operands.
//
// Programmatic dependent launch (PDL), when the launch asks for it:
//  * weight loads may be issued BEFORE griddepcontrol.wait: the weight is a parameter no kernel
//    writes while routers run, so its HBM latency can overlap the previous kernel's tail (in the
//    SASS every first-chunk weight load is; load_weight_16B says why they are coherent loads);
//  * x is loaded only AFTER the wait: the previous kernel produces it; the bias after x (see
//    load_bias_bits: issued before the rows, it delayed them);
//  * nothing is written to global memory before the wait: our output buffer may reuse memory the
//    previous kernel is still reading;
//  * launch_dependents fires at entry (the contract in grid_dependency.cuh): the next kernel's
//    weight fetch overlaps this one's whole body.
// Without the PDL launch attribute both instructions are no-ops.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "kernels/cluster_exchange.cuh"
#include "kernels/fused_launch.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/memory_access.cuh"

namespace moegate {
namespace sm90 {

namespace cg = cooperative_groups;

constexpr int kWarps = 4;           // warps per CTA, each on its own K slice (8, 16: slower)
constexpr int kBlockK = 32;         // k per 16-byte load per thread quad: 4 threads x 8 bf16
constexpr int kBlocksPerChunk = 4;  // k32 blocks a warp loads before its first MMA

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a1,
                                               uint32_t a2, uint32_t a3, uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Lanes that share one output in the final reduction: a power of two that divides 32 and the
// number of partial sums per output, as many as keep every thread of the CTA busy on one pass
// over the CTA's outputs.
__host__ __device__ constexpr int lanes_per_output(int threads, int outputs, int partials) {
  int lanes = 1;
  while (lanes < 32 && lanes < partials && partials % (2 * lanes) == 0 &&
         outputs * 2 * lanes <= threads)
    lanes *= 2;
  return lanes;
}

// Independent accumulator sets per MMA tile, for a warp with `tiles` MMA tiles. Every MMA into one
// accumulator waits for the one before it: with one tile per warp, a chain of 2 * kBlocksPerChunk
// MMAs stood between the warp's last load and its handoff, and eight chains recover part of that
// (benchmarks/results/README.md, "Current build: independent MMA chains"). The chain count fixes
// the summation order, so every launch form of one tile shape (plain, fused with a shrink, fused
// with routing) must use the same count for the logits to keep their bits. More chains cost
// registers, and registers set the CTAs per SM that let a grid of clusters fit in one wave
// (tests/test_kernel_sass.py holds each kernel to what its grids need): two chains on two-tile
// warps pushed the fused shrink launch, whose grids are up to three times the plain call's, from
// four CTAs per SM to three, so warps of two or more tiles keep one chain in every form.
__host__ __device__ constexpr int chains_per_tile(int tiles) { return tiles == 1 ? 8 : 1; }

// Where output number `idx` of a CTA's [16 kExpertTiles x 8 kTokenTiles] tile lives, in fragment
// order: idx = ((i * kTokenTiles + j) * 32 + lane) * 4 + c is accumulator c of `lane` in MMA tile
// (expert tile i, token tile j), which holds expert 16i + lane/4 (+8 for c >= 2) and token
// 8j + 2(lane%4) + c%2 (the m16n8 accumulator layout, operands swapped).
template <int kTokenTiles>
__device__ __forceinline__ void fragment_output(int idx, int& expert, int& token) {
  const int tile = idx / 128, lane = idx / 4 % 32, c = idx % 4;
  expert = 16 * (tile / kTokenTiles) + lane / 4 + 8 * (c / 2);
  token = 8 * (tile % kTokenTiles) + 2 * (lane % 4) + c % 2;
}

// The bias bits of the outputs this thread stores after the cluster reduction: in pass p, the
// CTA's output out_begin + p * (threads / kLanes) + threadIdx.x / kLanes while it is one of the
// kPerRank the CTA owns (owned_sum's layout). Issued behind the first chunk's rows
// (load_bias_bits), so that no HBM trip is left after the MMAs.
template <int kTokenTiles, int kLanes, int kPerRank, int kPasses>
__device__ __forceinline__ void load_owned_bias_bits(const __nv_bfloat16* bias, int e0, int E,
                                                     int out_begin,
                                                     unsigned short (&bits)[kPasses]) {
  constexpr int kOutPerPass = kWarps * 32 / kLanes;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int idx = out_begin + p * kOutPerPass + static_cast<int>(threadIdx.x) / kLanes;
    int expert, token;
    fragment_output<kTokenTiles>(idx, expert, token);
    const int e = e0 + expert;
    bits[p] = load_bias_bits(bias, e, idx < out_begin + kPerRank && e < E);
  }
}

// One chunk's MMAs: the two k16 MMAs of k32 block b add into chain (2b + h) % kChains.
template <int kChains, int kExpertTiles, int kTokenTiles>
__device__ __forceinline__ void multiply_chunk(
    float (&acc)[kChains][kExpertTiles][kTokenTiles][4],
    const uint4 (&w_frag)[kBlocksPerChunk][kExpertTiles][2],
    const uint4 (&x_frag)[kBlocksPerChunk][kTokenTiles]) {
#pragma unroll
  for (int b = 0; b < kBlocksPerChunk; ++b)
#pragma unroll
    for (int i = 0; i < kExpertTiles; ++i)
#pragma unroll
      for (int j = 0; j < kTokenTiles; ++j) {
        const uint4& lo = w_frag[b][i][0];  // expert row group
        const uint4& hi = w_frag[b][i][1];  // expert row group + 8
        const uint4& xv = x_frag[b][j];
        mma_bf16_16816(acc[(2 * b) % kChains][i][j], lo.x, hi.x, lo.y, hi.y, xv.x, xv.y);
        mma_bf16_16816(acc[(2 * b + 1) % kChains][i][j], lo.z, hi.z, lo.w, hi.w, xv.z, xv.w);
      }
}

// The end of a warp's K slice: its chains added pairwise (a fixed order), then its partial sums of
// the CTA's tile written to staged[warp] in fragment order (fragment_output).
template <int kChains, int kExpertTiles, int kTokenTiles, int kTileOut>
__device__ __forceinline__ void stage_warp_sums(float (&acc)[kChains][kExpertTiles][kTokenTiles][4],
                                                float (&staged)[kWarps][kTileOut], int warp,
                                                int lane) {
#pragma unroll
  for (int half = kChains / 2; half > 0; half /= 2)
#pragma unroll
    for (int s = 0; s < half; ++s)
#pragma unroll
      for (int i = 0; i < kExpertTiles; ++i)
#pragma unroll
        for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[s][i][j][c] += acc[s + half][i][j][c];
#pragma unroll
  for (int i = 0; i < kExpertTiles; ++i)
#pragma unroll
    for (int j = 0; j < kTokenTiles; ++j) {
      const int idx = ((i * kTokenTiles + j) * 32 + lane) * 4;
      *reinterpret_cast<float4*>(&staged[warp][idx]) =
          make_float4(acc[0][i][j][0], acc[0][i][j][1], acc[0][i][j][2], acc[0][i][j][3]);
    }
}

// The CTA's sums (the warps' partials added in warp order), four outputs a message, pushed to the
// inboxes of their owners: output idx goes to cluster rank first_owner + idx / kPerRank, into
// inbox[sender][idx % kPerRank] there. After a CTA barrier (staged complete) and the cluster wait
// (every owner's mbarrier initialised).
template <int kTileOut, int kPerRank, int kSenders>
__device__ __forceinline__ void push_cta_sums(const float (&staged)[kWarps][kTileOut],
                                              float (&inbox)[kSenders][kPerRank], int sender,
                                              uint32_t first_owner, uint32_t inbox_bar) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kMessages = kTileOut / 4;
#pragma unroll
  for (int first = 0; first < kMessages; first += kThreads) {
    const int idx = 4 * (first + static_cast<int>(threadIdx.x));
    if (kMessages % kThreads == 0 || idx < kTileOut) {
      float4 sum = *reinterpret_cast<const float4*>(&staged[0][idx]);
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        const float4 part = *reinterpret_cast<const float4*>(&staged[w][idx]);
        sum = make_float4(sum.x + part.x, sum.y + part.y, sum.z + part.z, sum.w + part.w);
      }
      const float message[4] = {sum.x, sum.y, sum.z, sum.w};
      const uint32_t owner = first_owner + static_cast<uint32_t>(idx / kPerRank);
      push_to_rank(map_to_rank(shared_address(&inbox[sender][idx % kPerRank]), owner), message,
                   map_to_rank(inbox_bar, owner));
    }
  }
}

// Output `local` of this CTA's share, once its inbox is complete: kLanes neighbouring lanes share
// it, lane `sub` adding the inbox rows of senders sub, sub + kLanes, ..., then a butterfly over
// the kLanes lanes. Both orders are fixed, so the result is bitwise deterministic. Every lane of
// the warp calls it (the shuffles).
template <int kLanes, int kSenders, int kPerRank>
__device__ __forceinline__ float owned_sum(const float (&inbox)[kSenders][kPerRank], int local,
                                           int sub) {
  float sum = 0.f;
  if (local < kPerRank) {
#pragma unroll
    for (int q = 0; q < kSenders / kLanes; ++q) sum += inbox[q * kLanes + sub][local];
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

// Grid: (kCluster, ceil(E / (16 * kExpertTiles)), ceil(M / (8 * kTokenTiles))); cluster
// (kCluster, 1, 1). CTA rank r of a cluster and warp w own K slice p = r * kWarps + w of
// kCluster * kWarps contiguous slices of whole k32 blocks. Fusion::kShrink: ceil(shrink.rows /
// (16 * kExpertTiles)) more expert tiles along y, for the ShrinkPart (whole clusters). No routing
// form (route.h says why); `route` is the launch chain's shared argument, unused here.
template <int kExpertTiles, int kTokenTiles, int kCluster, typename Out, Fusion kFusion>
__global__ void __launch_bounds__(kWarps * 32, 1)
    router_gemm_sm90_kernel(const __nv_bfloat16* __restrict__ x,
                            const __nv_bfloat16* __restrict__ weight,
                            const __nv_bfloat16* __restrict__ bias, Out* __restrict__ out, int M,
                            int E, int K, bool pdl, ShrinkPart shrink, RouteArgs route) {
  static_assert(kFusion != Fusion::kRoute, "the tensor-core kernel has no routing form");
  constexpr bool kWithShrink = kFusion == Fusion::kShrink;
  constexpr int kTileE = 16 * kExpertTiles;  // experts of one CTA
  constexpr int kTileM = 8 * kTokenTiles;    // tokens of one CTA
  constexpr int kTileOut = kTileE * kTileM;

  // The cluster's outputs are numbered in accumulator-fragment order (fragment_output below) and
  // split evenly between its CTAs: rank r owns [r * kPerRank, (r + 1) * kPerRank). Each CTA first
  // adds its warps' partial sums in shared memory (staged[warp][output], warps in order), then
  // pushes the CTA's sums into the owners' inboxes (inbox[sender rank][offset]), one 16-byte
  // message per four neighbouring outputs. The handoff is bound by message count, so 16-byte
  // messages, and adding the warps' sums first sends a quarter of the messages each warp would
  // push itself (benchmarks/results/README.md). Once its inbox is full, each owner adds it up in
  // rank order: no remote reads, and the same summation order on every run.
  static_assert(kTileOut % (4 * kCluster) == 0, "every CTA owns as many whole fragments");
  constexpr int kPerRank = kTileOut / kCluster;
  constexpr int kSlices = kCluster * kWarps;  // K slices, one per warp of the cluster
  __shared__ alignas(16) float staged[kWarps][kTileOut];
  __shared__ alignas(16) float inbox[kCluster][kPerRank];
  __shared__ alignas(8) uint64_t inbox_full;  // the mbarrier counting the inbox's bytes
  const uint32_t inbox_bar = shared_address(&inbox_full);

  trigger_dependents();  // at entry (grid_dependency.cuh)
  if (threadIdx.x == 0) mbarrier_init_for_cluster(inbox_bar);
  cluster_arrive_relaxed();
  const int rank = static_cast<int>(cg::this_cluster().block_rank());
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // MMA row (expert) / column (token) index
  const int quad = lane % 4;   // which 8-element piece of a k32 block
  int expert_block = blockIdx.y;
  bool shrink_cta = false;  // a shrink cluster: the same work on the other matrix
  float* shrink_out = nullptr;
  if constexpr (kWithShrink)
    shrink_cta = shrink.claim(expert_block, weight, bias, E, shrink_out, 0);
  const int e0 = expert_block * kTileE;
  const int m0 = blockIdx.z * kTileM;

  const int num_blocks = (K + kBlockK - 1) / kBlockK;
  const int slice = rank * kWarps + warp;
  const int block_begin = static_cast<int>(static_cast<long long>(num_blocks) * slice / kSlices);
  const int block_end = static_cast<int>(static_cast<long long>(num_blocks) * (slice + 1) / kSlices);

  // Row pointers and validity of this thread's weight rows (expert e0 + 16t + group [+ 8]) and
  // x rows (token m0 + 8t + group); invalid rows read as zeros and are never stored.
  const __nv_bfloat16* w_rows[kExpertTiles][2];
  bool w_valid[kExpertTiles][2];
#pragma unroll
  for (int t = 0; t < kExpertTiles; ++t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int e = e0 + 16 * t + 8 * h + group;
      w_valid[t][h] = e < E;
      w_rows[t][h] = weight + static_cast<long long>(w_valid[t][h] ? e : 0) * K + 8 * quad;
    }
  }
  const __nv_bfloat16* x_rows[kTokenTiles];
  bool x_valid[kTokenTiles];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) {
    const int m = m0 + 8 * t + group;
    x_valid[t] = m < M;
    x_rows[t] = x + static_cast<long long>(x_valid[t] ? m : 0) * K + 8 * quad;
  }

  // Independent accumulators (chains_per_tile): the two k16 MMAs of k32 block b add into chain
  // (2b + h) % kChains; the chains are added in a fixed order at the end.
  constexpr int kChains = chains_per_tile(kExpertTiles * kTokenTiles);
  float acc[kChains][kExpertTiles][kTokenTiles][4];
#pragma unroll
  for (int s = 0; s < kChains; ++s)
#pragma unroll
    for (int i = 0; i < kExpertTiles; ++i)
#pragma unroll
      for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[s][i][j][c] = 0.f;

  uint4 w_frag[kBlocksPerChunk][kExpertTiles][2];
  uint4 x_frag[kBlocksPerChunk][kTokenTiles];

  // Two loaders of the same shape, deliberately: the first chunk's weights are issued before the
  // grid-dependency wait and its activations after it, each with its own load (memory_access.cuh).
  auto load_weights = [&](int chunk_begin) {
#pragma unroll
    for (int b = 0; b < kBlocksPerChunk; ++b) {
      const int block = chunk_begin + b;
      const int k = block * kBlockK + 8 * quad;
      const bool in_k = block < block_end && k < K;
#pragma unroll
      for (int t = 0; t < kExpertTiles; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          w_frag[b][t][h] = load_weight_16B(w_rows[t][h] + block * kBlockK, in_k && w_valid[t][h]);
    }
  };
  auto load_activations = [&](int chunk_begin) {
#pragma unroll
    for (int b = 0; b < kBlocksPerChunk; ++b) {
      const int block = chunk_begin + b;
      const int k = block * kBlockK + 8 * quad;
      const bool in_k = block < block_end && k < K;
#pragma unroll
      for (int t = 0; t < kTokenTiles; ++t)
        x_frag[b][t] = load_activation_16B(x_rows[t] + block * kBlockK, in_k && x_valid[t]);
    }
  };

  // Final reduction (owned_sum, after the pushes below): kLanes neighbouring lanes share one output.
  constexpr int kThreads = kWarps * 32;
  constexpr int kLanes = lanes_per_output(kThreads, kPerRank, kCluster);
  constexpr int kOutPerPass = kThreads / kLanes;
  constexpr int kPasses = (kPerRank + kOutPerPass - 1) / kOutPerPass;
  const int sub = static_cast<int>(threadIdx.x) % kLanes;
  const int out_begin = rank * kPerRank;

  // First chunk: weights before the dependency wait, activations after it.
  load_weights(block_begin);
  grid_dependency_wait(pdl);
  load_activations(block_begin);
  unsigned short bias_bits[kPasses];
  load_owned_bias_bits<kTokenTiles, kLanes, kPerRank>(bias, e0, E, out_begin, bias_bits);
  multiply_chunk(acc, w_frag, x_frag);
  for (int chunk = block_begin + kBlocksPerChunk; chunk < block_end; chunk += kBlocksPerChunk) {
    load_weights(chunk);
    load_activations(chunk);
    multiply_chunk(acc, w_frag, x_frag);
  }

  // The chains, added pairwise; then the warps' partial sums, added in warp order, then pushed
  // four outputs per message to the inbox of the CTA that owns them.
  stage_warp_sums(acc, staged, warp, lane);
  __syncthreads();
  cluster_wait_acquire();  // every inbox mbarrier of the cluster is initialised
  push_cta_sums(staged, inbox, rank, 0u, inbox_bar);
  if (threadIdx.x == 0) mbarrier_expect_bytes(inbox_bar, kCluster * kPerRank * sizeof(float));
  mbarrier_wait_phase0(inbox_bar);  // every push of the cluster to this CTA has landed

#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int local = p * kOutPerPass + static_cast<int>(threadIdx.x) / kLanes;
    const int idx = out_begin + local;
    const float sum = owned_sum<kLanes>(inbox, local, sub);
    int expert, token;
    fragment_output<kTokenTiles>(idx, expert, token);
    const int out_m = m0 + token, out_e = e0 + expert;
    if (sub == 0 && local < kPerRank && out_m < M && out_e < E) {
      if (kWithShrink && shrink_cta)
        shrink_out[static_cast<long long>(out_m) * E + out_e] = sum + bias_value(bias_bits[p]);
      else
        out[static_cast<long long>(out_m) * E + out_e] =
            store_cast<Out>(sum + bias_value(bias_bits[p]));
    }
  }
}

}  // namespace sm90
}  // namespace moegate
