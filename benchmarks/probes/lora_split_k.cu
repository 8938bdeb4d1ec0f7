// Can the tensor-core kernel carry a LoRA layer's whole delta in its one launch? Issue 22 past
// M = 4, before any library change. There the layer takes two launches (the tensor-core kernel
// with the shrink's extra clusters, then the expand as its programmatic dependent), and the probe
// of one decode-kernel launch at M = 8 (lora_token_group) was no faster than those two.
//
// The idea tested: A's rows ride in the router's own split-K clusters. Each cluster of kCluster
// CTAs splits K for one 16-expert tile and 8 kTokenTiles tokens, as the library's tensor-core
// kernel does (router_gemm_sm90.cuh, whose loads, MMAs and handoff this kernel calls), and its
// warps also multiply every slot's rows of A ([S * R, K], the library's layout) with the same x
// fragments: no A load waits for a slot, all of them are issued before griddepcontrol.wait (A is a
// parameter, like the weight; at rank 16, that is: at rank 64 only the first 4 of its 16 tiles fit
// the registers, and the other three groups load after the wait, one trip each), and no CTA waits
// for another cluster. The price is that every
// expert tile's cluster computes the shrink again (8 clusters at E = 128: A leaves HBM once, L2
// serves it 8 times). Then:
//   1. each warp keeps, of its A-row sums, the items its tokens need (token t: the R rows of its
//      slot), the CTA adds them in warp order, and pushes them with its base-logit partials to
//      the owners (st.async counted on one mbarrier), the base logits exactly as the library does;
//   2. each owner adds its items' partials in rank order and pushes the sums to every CTA of the
//      cluster (a second mbarrier): every CTA then holds the xa rows of its tile's tokens;
//   3. each CTA's owned outputs take round(round(base) + scaling[s] * dot) with dot in the order of
//      lora_expand's group_dot (8 lanes an output, 8 ranks a lane, three shuffles), B's rows of
//      every slot read before the wait. Tokens without an adapter (slot outside [0, S), or -1)
//      store the base gate's bits.
// xa's summation order is not the library's shrink (one MMA chain a tile, items added by their
// owner in rank order), so adapted logits may differ from the two launches' by a rounding; the
// check is a float64 host reference (<= 1 bf16 spacing, of the base logit too where an adapter
// adds to it) and, for clusters of 8, the base gate's bits for tokens without an adapter (the
// library's kernel with the same tiles).
//
// gpt-oss-120b's router (K = 2880, E = 128, bias), 4 adapters in slots, rank 16 and 64, M = 8, 16
// and 32, tokens spread over the slots; weights, bias, A and B cold (copies rotating over >= 96
// MB), x hot. Rows, us per call with PDL off and on (every launch of a row a programmatic
// dependent; the expand always is, as the library launches it):
//   library base gate, decode / tensor-core   launch_router_gemm_small_m, launch_router_gemm_sm90
//   library two launches, decode / tensor-core  the fused shrink of either kernel, then the expand
//   one launch 1 x T, cN                      this kernel: tiles of 16 experts x 8T tokens, clusters
//                                             of N = 8 or 16 CTAs along K (16 is non-portable)
// "x base" divides by the library's tensor-core base gate of the same M and PDL setting.
// Every row is checked before it is timed, with the outputs poisoned first, under two slot
// mappings (the spread one, and one with tokens of no adapter and an out-of-range slot), and at
// M = 5, 13 and 29 (tiles with tokens past M: checked, not timed); the probe exits 1 if any check
// fails. Standalone, from the repo root:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /tmp/lora_split_k \
//     benchmarks/probes/lora_split_k.cu csrc/kernels/router_gemm_sm90.cu \
//     csrc/kernels/router_gemm_small_m.cu csrc/kernels/lora_expand.cu \
//     csrc/kernels/route_logits.cu && /tmp/lora_split_k [--check-only]
// --check-only runs every variant once and checks it, untimed (for compute-sanitizer).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "graph_timing.cuh"
#include "library_expand.cuh"
#include "probe_data.cuh"
#include "kernels/cluster_exchange.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/memory_access.cuh"
#include "kernels/router_gemm.h"
#include "kernels/router_gemm_sm90.cuh"

namespace {

namespace sm90 = moegate::sm90;
using namespace gpt_oss_router;
using bf16 = __nv_bfloat16;

constexpr int kSlots = 4;
constexpr int kMaxRank = 64;  // lora_expand's one pass: 8 lanes x 8 ranks
constexpr int kMaxM = 32;
constexpr float kScale = 2.f;
constexpr int kThreads = sm90::kWarps * 32;
constexpr int kLanesPerOutput = 8;  // lora_expand's group_dot
constexpr int kValuesPerLane = 8;
constexpr int kOutputsPerPass = kThreads / kLanesPerOutput;
constexpr int kMinLaunches = 200;
static_assert(E % 16 == 0, "whole expert tiles: no expert row needs a bound check");

// k32 blocks of one warp's K slice at most (the library's split: kCluster x kWarps slices).
constexpr int slice_blocks(int cluster) {
  return sm90::ceil_div(sm90::ceil_div(K, sm90::kBlockK), cluster * sm90::kWarps);
}

template <int kTokenTiles, int kRank, int kClusterSize>
struct Tile {
  static constexpr int kCluster = kClusterSize;
  static constexpr int kTileM = 8 * kTokenTiles;
  static constexpr int kTileOut = 16 * kTileM;  // the CTA's base outputs
  static constexpr int kPerRank = kTileOut / kCluster;
  static constexpr int kTilesPerSlot = kRank / 16;
  static constexpr int kRideTiles = kSlots * kTilesPerSlot;  // every slot's rows of A
  static constexpr int kGroupTiles = kRideTiles < 4 ? kRideTiles : 4;  // loaded together
  static constexpr int kItems = kTileM * kRank;  // xa values the tile's tokens need
  static constexpr int kItemsPerRank = kItems / kCluster;
  static constexpr int kBlocks = slice_blocks(kClusterSize);
  static constexpr int kChains = sm90::chains_per_tile(kTokenTiles);  // the library's, 1 x T
  // The base sums' final reduction, as the library's kernel does it.
  static constexpr int kLanes = sm90::lanes_per_output(kThreads, kPerRank, kCluster);
  static constexpr int kBasePasses = sm90::ceil_div(kPerRank, kThreads / kLanes);
  static constexpr int kExpandPasses = sm90::ceil_div(kPerRank, kOutputsPerPass);
  static_assert(kRank % 16 == 0 && kRank <= kMaxRank, "whole MMA tiles, one expand pass");
  static_assert(kTileOut % (4 * kCluster) == 0 && kItemsPerRank % 4 == 0, "whole messages");
  static_assert(kBlocks <= sm90::kBlocksPerChunk, "a warp's K slice in one chunk");
  static_assert(kRideTiles % kGroupTiles == 0, "whole load groups");
};

template <class T>
struct Shared {
  alignas(16) float staged[sm90::kWarps][T::kTileOut];  // base partials, fragment order
  alignas(16) float items[sm90::kWarps][T::kItems];     // xa partials: token t at [t * R, (t + 1) * R)
  alignas(16) float inbox[T::kCluster][T::kPerRank];
  alignas(16) float item_inbox[T::kCluster][T::kItemsPerRank];
  alignas(16) float xa[T::kItems];  // the tile's xa rows, summed, item order
  float base[T::kPerRank];          // owned logits, rounded as the base gate rounds them
  alignas(8) uint64_t inbox_full, xa_full;
};

__device__ __forceinline__ int64_t slot_of(const int64_t* slot_ids, int m, int M) {
  return m < M ? slot_ids[m] : -1;
}
__device__ __forceinline__ bool adapted(int64_t s) { return s >= 0 && s < kSlots; }

// Grid (kCluster, E / 16, ceil(M / (8 kTokenTiles))), clusters (kCluster, 1, 1); bf16 logits.
template <int kTokenTiles, int kRank, int kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    split_k_lora_kernel(const bf16* __restrict__ x, const bf16* __restrict__ weight,
                        const bf16* __restrict__ bias, const bf16* __restrict__ lora_a,
                        const bf16* __restrict__ lora_b, const float* __restrict__ scaling,
                        const int64_t* __restrict__ slot_ids, bf16* __restrict__ out, int M,
                        bool pdl) {
  using T = Tile<kTokenTiles, kRank, kCluster>;
  constexpr int kBlocksPerChunk = sm90::kBlocksPerChunk;
  __shared__ Shared<T> sh;
  const uint32_t inbox_bar = sm90::shared_address(&sh.inbox_full);
  const uint32_t xa_bar = sm90::shared_address(&sh.xa_full);

  sm90::trigger_dependents();  // at entry (grid_dependency.cuh)
  if (threadIdx.x == 0) {
    sm90::mbarrier_init_for_cluster(inbox_bar);
    sm90::mbarrier_init_for_cluster(xa_bar);
  }
  sm90::cluster_arrive_relaxed();
  const int rank = static_cast<int>(sm90::cluster_rank());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int e0 = blockIdx.y * 16, m0 = blockIdx.z * T::kTileM;
  const int num_blocks = sm90::ceil_div(K, sm90::kBlockK);
  const int slice = rank * sm90::kWarps + warp;
  const int block_begin = num_blocks * slice / (kCluster * sm90::kWarps);
  const int block_end = num_blocks * (slice + 1) / (kCluster * sm90::kWarps);
  auto in_k = [&](int b) {
    const int block = block_begin + b;
    return block < block_end && block * sm90::kBlockK + 8 * quad < K;
  };
  const int k_offset = block_begin * sm90::kBlockK + 8 * quad;

  // Before the wait: the weight's rows, every slot's rows of A (first load group), and B's rows
  // of every slot for this thread's expand outputs (the slots are not known yet).
  uint4 w_frag[kBlocksPerChunk][1][2];
#pragma unroll
  for (int b = 0; b < kBlocksPerChunk; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      w_frag[b][0][h] = sm90::load_weight_16B(
          weight + static_cast<long long>(e0 + 8 * h + group) * K + k_offset + b * sm90::kBlockK,
          in_k(b));
  uint4 a_frag[T::kGroupTiles][T::kBlocks][2];
  auto load_a_group = [&](int g) {
#pragma unroll
    for (int i = 0; i < T::kGroupTiles; ++i)
#pragma unroll
      for (int b = 0; b < T::kBlocks; ++b)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = 16 * (g * T::kGroupTiles + i) + 8 * h + group;
          a_frag[i][b][h] = sm90::load_weight_16B(
              lora_a + static_cast<long long>(row) * K + k_offset + b * sm90::kBlockK, in_k(b));
        }
  };
  load_a_group(0);
  const int out_begin = rank * T::kPerRank;
  const int expand_lane = threadIdx.x % kLanesPerOutput;
  int out_token[T::kExpandPasses], out_expert[T::kExpandPasses];
  uint4 b_raw[T::kExpandPasses][kSlots];
#pragma unroll
  for (int p = 0; p < T::kExpandPasses; ++p) {
    const int local = p * kOutputsPerPass + static_cast<int>(threadIdx.x) / kLanesPerOutput;
    sm90::fragment_output<kTokenTiles>(out_begin + local, out_expert[p], out_token[p]);
    const bool valid = local < T::kPerRank && kValuesPerLane * expand_lane < kRank;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      b_raw[p][s] = sm90::load_weight_16B(
          lora_b + (static_cast<long long>(s) * E + e0 + (valid ? out_expert[p] : 0)) * kRank +
              kValuesPerLane * expand_lane,
          valid);
  }

  sm90::grid_dependency_wait(pdl);
  // After it: x, the slots of this thread's tokens, the scalings, the bias.
  uint4 x_frag[kBlocksPerChunk][kTokenTiles];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) {
    const int m = m0 + 8 * t + group;
    const bf16* row = x + static_cast<long long>(m < M ? m : 0) * K + k_offset;
#pragma unroll
    for (int b = 0; b < kBlocksPerChunk; ++b)
      x_frag[b][t] = sm90::load_activation_16B(row + b * sm90::kBlockK, in_k(b) && m < M);
  }
  int64_t acc_slot[kTokenTiles][2];  // tokens 8j + 2 quad + c of the accumulators
#pragma unroll
  for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) acc_slot[j][c] = slot_of(slot_ids, m0 + 8 * j + 2 * quad + c, M);
  int64_t out_slot[T::kExpandPasses];
#pragma unroll
  for (int p = 0; p < T::kExpandPasses; ++p) out_slot[p] = slot_of(slot_ids, m0 + out_token[p], M);
  float scale[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) scale[s] = scaling[s];
  unsigned short bias_bits[T::kBasePasses];
  sm90::load_owned_bias_bits<kTokenTiles, T::kLanes, T::kPerRank>(bias, e0, E, out_begin, bias_bits);

  // The base gate's MMAs, as the library's kernel runs them (its chains, its order); then A's
  // rows, one chain a tile, with the same x fragments.
  float acc[T::kChains][1][kTokenTiles][4];
#pragma unroll
  for (int s = 0; s < T::kChains; ++s)
#pragma unroll
    for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[s][0][j][c] = 0.f;
  sm90::multiply_chunk(acc, w_frag, x_frag);
  float ride[T::kRideTiles][kTokenTiles][4];
#pragma unroll
  for (int i = 0; i < T::kRideTiles; ++i)
#pragma unroll
    for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) ride[i][j][c] = 0.f;
#pragma unroll
  for (int g = 0; g < T::kRideTiles / T::kGroupTiles; ++g) {
    if (g > 0) load_a_group(g);
#pragma unroll
    for (int b = 0; b < T::kBlocks; ++b)
#pragma unroll
      for (int i = 0; i < T::kGroupTiles; ++i)
#pragma unroll
        for (int j = 0; j < kTokenTiles; ++j) {
          const uint4& lo = a_frag[i][b][0];
          const uint4& hi = a_frag[i][b][1];
          const uint4& xv = x_frag[b][j];
          float(&c)[4] = ride[g * T::kGroupTiles + i][j];
          sm90::mma_bf16_16816(c, lo.x, hi.x, lo.y, hi.y, xv.x, xv.y);
          sm90::mma_bf16_16816(c, lo.z, hi.z, lo.w, hi.w, xv.z, xv.w);
        }
  }

  // 1. The warp's partials: the base tile in fragment order, and of A's rows the items of its
  // tokens (the slot's R rows; zeros for a token without an adapter, so every item is written).
  sm90::stage_warp_sums(acc, sh.staged, warp, lane);
#pragma unroll
  for (int i = 0; i < T::kRideTiles; ++i)
#pragma unroll
    for (int j = 0; j < kTokenTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int token = 8 * j + 2 * quad + c % 2;
        const int64_t s = acc_slot[j][c % 2];
        const int tile_slot = i / T::kTilesPerSlot;
        const int r = 16 * (i % T::kTilesPerSlot) + 8 * (c / 2) + group;
        if (adapted(s) ? tile_slot == s : tile_slot == 0)
          sh.items[warp][token * kRank + r] = adapted(s) ? ride[i][j][c] : 0.f;
      }
  __syncthreads();
  sm90::cluster_wait_acquire();  // every mbarrier of the cluster is initialised
  sm90::push_cta_sums(sh.staged, sh.inbox, rank, 0u, inbox_bar);
  for (int q = threadIdx.x; q < T::kItems / 4; q += kThreads) {
    const int idx = 4 * q;
    float4 sum = *reinterpret_cast<const float4*>(&sh.items[0][idx]);
#pragma unroll
    for (int w = 1; w < sm90::kWarps; ++w) {
      const float4 part = *reinterpret_cast<const float4*>(&sh.items[w][idx]);
      sum = make_float4(sum.x + part.x, sum.y + part.y, sum.z + part.z, sum.w + part.w);
    }
    const float message[4] = {sum.x, sum.y, sum.z, sum.w};
    const uint32_t owner = static_cast<uint32_t>(idx / T::kItemsPerRank);
    sm90::push_to_rank(
        sm90::map_to_rank(sm90::shared_address(&sh.item_inbox[rank][idx % T::kItemsPerRank]), owner),
        message, sm90::map_to_rank(inbox_bar, owner));
  }
  if (threadIdx.x == 0) {
    sm90::mbarrier_expect_bytes(inbox_bar, kCluster * (T::kPerRank + T::kItemsPerRank) * sizeof(float));
    sm90::mbarrier_expect_bytes(xa_bar, T::kItems * sizeof(float));
  }
  sm90::mbarrier_wait_phase0(inbox_bar);

  // 2. The owned items, added in rank order, to every CTA of the cluster.
  constexpr int kMessages = T::kItemsPerRank / 4;
  for (int task = threadIdx.x; task < kMessages * kCluster; task += kThreads) {
    const int u = task % kMessages;
    const uint32_t target = static_cast<uint32_t>(task / kMessages);
    float message[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float sum = 0.f;
#pragma unroll
      for (int sender = 0; sender < kCluster; ++sender) sum += sh.item_inbox[sender][4 * u + c];
      message[c] = sum;
    }
    sm90::push_to_rank(
        sm90::map_to_rank(sm90::shared_address(&sh.xa[rank * T::kItemsPerRank + 4 * u]), target),
        message, sm90::map_to_rank(xa_bar, target));
  }
  // The owned base logits, as the library's kernel adds and rounds them.
  const int sub = static_cast<int>(threadIdx.x) % T::kLanes;
#pragma unroll
  for (int p = 0; p < T::kBasePasses; ++p) {
    const int local = p * (kThreads / T::kLanes) + static_cast<int>(threadIdx.x) / T::kLanes;
    const float sum = sm90::owned_sum<T::kLanes>(sh.inbox, local, sub);
    if (sub == 0 && local < T::kPerRank)
      sh.base[local] = __bfloat162float(__float2bfloat16_rn(sum + sm90::bias_value(bias_bits[p])));
  }
  sm90::mbarrier_wait_phase0(xa_bar);
  __syncthreads();  // sh.base

  // 3. The expand of the owned outputs, in lora_expand's order.
  const unsigned group_mask = 0xffu << (threadIdx.x % 32 / kLanesPerOutput * kLanesPerOutput);
#pragma unroll
  for (int p = 0; p < T::kExpandPasses; ++p) {
    const int local = p * kOutputsPerPass + static_cast<int>(threadIdx.x) / kLanesPerOutput;
    if (local >= T::kPerRank) continue;  // whole groups of 8 lanes
    const int64_t s = out_slot[p];
    uint4 raw = b_raw[p][0];
    float scale_s = scale[0];
#pragma unroll
    for (int n = 1; n < kSlots; ++n) {
      raw = s == n ? b_raw[p][n] : raw;
      scale_s = s == n ? scale[n] : scale_s;
    }
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kValuesPerLane; ++i) {
      const float2 pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&words[i / 2]));
      const int r = kValuesPerLane * expand_lane + i;
      const float xv = r < kRank ? sh.xa[out_token[p] * kRank + r] : 0.f;
      dot = fmaf(xv, i % 2 == 0 ? pair.x : pair.y, dot);
    }
#pragma unroll
    for (int offset = kLanesPerOutput / 2; offset > 0; offset /= 2)
      dot += __shfl_xor_sync(group_mask, dot, offset);
    const int m = m0 + out_token[p];
    if (expand_lane == 0 && m < M) {
      const float base = sh.base[local];
      out[static_cast<long long>(m) * E + e0 + out_expert[p]] =
          __float2bfloat16_rn(adapted(s) ? base + scale_s * dot : base);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host: buffers, launches, the reference, the rows.

constexpr long long kWeightElems = static_cast<long long>(E) * K;
constexpr long long kAElems = static_cast<long long>(kSlots) * kMaxRank * K;  // rank R: first S R rows
constexpr long long kBElems = static_cast<long long>(kSlots) * E * kMaxRank;  // rank R: [S, E, R]

struct Buffers {
  bf16 *weights, *bias, *a, *b, *x, *out, *logits;
  int64_t* slot_ids;
  float *scaling, *xa;
  int copies;
};

bool g_failed = false;

// The kernel's launch configuration; clusters of 16 are a non-portable size, allowed once per
// kernel before its first launch (never inside a graph capture).
template <int kTokenTiles, int kRank, int kCluster>
cudaLaunchConfig_t one_launch_config(int M, bool pdl, cudaStream_t stream,
                                     cudaLaunchAttribute (&attributes)[2]) {
  if constexpr (kCluster > 8) {
    static const bool allowed = [] {
      CHECK(cudaFuncSetAttribute(split_k_lora_kernel<kTokenTiles, kRank, kCluster>,
                                 cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      return true;
    }();
    (void)allowed;
  }
  return sm90::cluster_launch_config(dim3(kCluster, E / 16, sm90::ceil_div(M, 8 * kTokenTiles)),
                                     dim3(kThreads), stream, kCluster, pdl, attributes);
}

// Whether one cluster of the kernel fits on this GPU at all (a non-portable size may not).
template <int kTokenTiles, int kRank, int kCluster>
bool cluster_fits() {
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config =
      one_launch_config<kTokenTiles, kRank, kCluster>(8 * kTokenTiles, false, nullptr, attributes);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, split_k_lora_kernel<kTokenTiles, kRank, kCluster>,
                                     &config) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return clusters > 0;
}

template <int kTokenTiles, int kRank, int kCluster>
void launch_one(const Buffers& p, long long c, int M, bool pdl, cudaStream_t stream) {
  auto kernel = split_k_lora_kernel<kTokenTiles, kRank, kCluster>;
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config =
      one_launch_config<kTokenTiles, kRank, kCluster>(M, pdl, stream, attributes);
  CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<const bf16*>(p.x),
                           static_cast<const bf16*>(p.weights + c * kWeightElems),
                           static_cast<const bf16*>(p.bias + c * E),
                           static_cast<const bf16*>(p.a + c * kAElems),
                           static_cast<const bf16*>(p.b + c * kBElems),
                           static_cast<const float*>(p.scaling),
                           static_cast<const int64_t*>(p.slot_ids), p.out, M, pdl));
}

enum class Library { kDecode, kTensorCore };
const char* const kLibraryNames[] = {"decode", "tensor-core"};

moegate::RouterGemmArgs router_args(const Buffers& p, long long c, int M, bool pdl, void* out,
                                    cudaStream_t stream) {
  moegate::RouterGemmArgs args;
  args.x = p.x;
  args.weight = p.weights + c * kWeightElems;
  args.bias = p.bias + c * E;
  args.out = out;
  args.M = M;
  args.E = E;
  args.K = K;
  args.pdl = pdl;
  args.stream = stream;
  return args;
}

// The library's base gate (rank 0) or its two launches (rank R) on copy c.
void launch_library(const Buffers& p, long long c, int M, int rank, Library kernel, bool pdl,
                    cudaStream_t stream) {
  moegate::RouterGemmArgs args = router_args(p, c, M, pdl, rank > 0 ? p.logits : p.out, stream);
  if (rank == 0) {
    CHECK(kernel == Library::kDecode ? moegate::launch_router_gemm_small_m(args, 0, 0)
                                     : moegate::launch_router_gemm_sm90(args, {}));
    return;
  }
  const bf16* a = p.a + c * kAElems;
  CHECK(kernel == Library::kDecode
            ? moegate::launch_router_gemm_small_m_with_shrink(args, a, kSlots * rank, p.xa)
            : moegate::launch_router_gemm_sm90_with_shrink(args, a, kSlots * rank, p.xa));
  launch_library_expand(p.logits, p.xa, p.b + c * kBElems, p.scaling, p.slot_ids, p.out, M, E, kSlots,
                        rank, stream);
}

// The distance between neighbouring bf16 values at v (8 significant bits).
float spacing_of(float v) { return std::ldexp(1.f, std::ilogb(std::fabs(v) + 1e-30f) - 7); }

// Copy 0's problem on the host in float64.
struct Reference {
  std::vector<double> logits;      // [kMaxM, E]: w . x + bias
  std::vector<double> xa16, xa64;  // [kMaxM, S, R]: x . A_s rows, for either rank
  std::vector<uint16_t> b;         // copy 0's B buffer

  const std::vector<double>& xa(int rank) const { return rank == 16 ? xa16 : xa64; }

  // The worst error of p.out (M tokens) in bf16 spacings, inf for a non-finite output or one not
  // written (the outputs are poisoned with NaN before the launch).
  float worst_error(const Buffers& p, const std::vector<int64_t>& slots, int M, int rank) const {
    CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> out(static_cast<size_t>(M) * E);
    CHECK(cudaMemcpy(out.data(), p.out, 2 * out.size(), cudaMemcpyDeviceToHost));
    float worst = 0.f;
    for (int m = 0; m < M; ++m) {
      const int64_t s = slots[m];
      const bool lora = rank > 0 && s >= 0 && s < kSlots;
      for (int e = 0; e < E; ++e) {
        double delta = 0;
        for (int r = 0; lora && r < rank; ++r)
          delta += xa(rank)[(m * kSlots + s) * rank + r] * bf16_to_float(b[(s * E + e) * rank + r]);
        const float base = round_bf16(static_cast<float>(logits[m * E + e]));
        const float expected = lora ? round_bf16(static_cast<float>(base + kScale * delta)) : base;
        // An adapted output adds the delta to the base logit rounded once (in fp32 by the GPU):
        // where that rounding falls the other way, the output moves by a spacing of the base.
        const float spacing = std::max(spacing_of(expected), lora ? spacing_of(base) : 0.f);
        const float error = std::fabs(bf16_to_float(out[m * E + e]) - expected) / spacing;
        if (!(error <= worst)) worst = std::isfinite(error) ? error : INFINITY;
      }
    }
    return worst;
  }
};

Reference make_reference(const Buffers& p) {
  std::vector<uint16_t> w(kWeightElems), bias(E), a(kAElems), x(static_cast<size_t>(kMaxM) * K);
  Reference ref;
  ref.b.resize(kBElems);
  CHECK(cudaMemcpy(w.data(), p.weights, 2 * w.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(bias.data(), p.bias, 2 * bias.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(a.data(), p.a, 2 * a.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(ref.b.data(), p.b, 2 * ref.b.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(x.data(), p.x, 2 * x.size(), cudaMemcpyDeviceToHost));
  auto dot = [&](const std::vector<uint16_t>& rows, long long row, int m) {
    double sum = 0;
    for (int k = 0; k < K; ++k)
      sum += double(bf16_to_float(rows[row * K + k])) * bf16_to_float(x[static_cast<long long>(m) * K + k]);
    return sum;
  };
  ref.logits.resize(static_cast<size_t>(kMaxM) * E);
  for (int m = 0; m < kMaxM; ++m)
    for (int e = 0; e < E; ++e) ref.logits[m * E + e] = dot(w, e, m) + bf16_to_float(bias[e]);
  for (int rank : {16, 64}) {
    std::vector<double>& xa = rank == 16 ? ref.xa16 : ref.xa64;
    xa.resize(static_cast<size_t>(kMaxM) * kSlots * rank);
    for (int m = 0; m < kMaxM; ++m)
      for (int row = 0; row < kSlots * rank; ++row) xa[m * kSlots * rank + row] = dot(a, row, m);
  }
  return ref;
}

// The timed mapping (the tokens spread over the slots), and a checked one with tokens of no
// adapter (-1) and an out-of-range slot (7: no adapter either, lora_expand.h).
std::vector<int64_t> spread_slots() {
  std::vector<int64_t> slots(kMaxM);
  for (int m = 0; m < kMaxM; ++m) slots[m] = m % kSlots;
  return slots;
}
std::vector<int64_t> mixed_slots() {
  const int64_t pattern[8] = {2, -1, 0, 3, -1, 7, 1, 2};
  std::vector<int64_t> slots(kMaxM);
  for (int m = 0; m < kMaxM; ++m) slots[m] = pattern[m % 8];
  return slots;
}

void set_slots(const Buffers& p, const std::vector<int64_t>& slots) {
  CHECK(cudaMemcpy(p.slot_ids, slots.data(), sizeof(int64_t) * slots.size(), cudaMemcpyHostToDevice));
}
void poison(const Buffers& p) { CHECK(cudaMemset(p.out, 0xff, 2LL * kMaxM * E)); }  // bf16 NaN

// Whether the tokens without an adapter (mixed mapping) got the bits of the library's tensor-core
// kernel with the same tiles (1 x T, clusters of 8, PDL off). p.out holds the variant's outputs.
bool base_bits_match(const Buffers& p, int M, int token_tiles) {
  std::vector<uint16_t> mine(static_cast<size_t>(M) * E), library(mine.size());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(mine.data(), p.out, 2 * mine.size(), cudaMemcpyDeviceToHost));
  moegate::RouterGemmSm90Config config;
  config.expert_tiles = 1;
  config.token_tiles = token_tiles;
  config.cluster = 8;
  CHECK(moegate::launch_router_gemm_sm90(router_args(p, 0, M, false, p.logits, nullptr), config));
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(library.data(), p.logits, 2 * library.size(), cudaMemcpyDeviceToHost));
  const std::vector<int64_t> slots = mixed_slots();
  for (int m = 0; m < M; ++m)
    if (slots[m] < 0 || slots[m] >= kSlots)
      for (int e = 0; e < E; ++e)
        if (mine[m * E + e] != library[m * E + e]) return false;
  return true;
}

struct Timing {
  float off = 0.f, on = 0.f;  // us per call, PDL off and on; 0: not timed
};

// Checks `launch(copy, pdl, stream)` under both mappings (outputs poisoned first), then times it
// with the spread one, PDL off and on. Returns the timing; error: the worst over both mappings.
template <typename Launch>
Timing check_and_time(const Buffers& p, const Reference& ref, int M, int rank, bool timed,
                      const Launch& launch, float& error, bool& bits, int bits_tiles) {
  error = 0.f;
  bits = true;
  const std::vector<int64_t> mixed = mixed_slots(), spread = spread_slots();
  for (const auto* slots : {&mixed, &spread}) {
    set_slots(p, *slots);
    poison(p);
    launch(0, false, nullptr);
    error = std::max(error, ref.worst_error(p, *slots, M, rank));
    if (bits_tiles > 0 && slots == &mixed) bits = base_bits_match(p, M, bits_tiles);
  }
  if (!(error <= 1.f) || !bits) g_failed = true;
  Timing t;
  if (!timed) return t;
  const int launches = std::max(kMinLaunches, p.copies);
  t.off = time_graph([&](int i, cudaStream_t s) { launch(i % p.copies, false, s); }, launches);
  t.on = time_graph([&](int i, cudaStream_t s) { launch(i % p.copies, true, s); }, launches);
  return t;
}

void print_row(int M, int rank, const char* name, const Timing& t, const Timing& base, float error,
               const char* bits) {
  std::printf("| %d | %s | %s |", M, rank > 0 ? (rank == 16 ? "16" : "64") : "-", name);
  if (t.off > 0.f)
    std::printf(" %.2f | %.2fx | %.2f | %.2fx |", t.off, t.off / base.off, t.on, t.on / base.on);
  else
    std::printf(" - | - | - | - |");
  std::printf(" %.2f%s | %s |\n", error, error <= 1.f ? "" : " FAIL", bits);
  std::fflush(stdout);
}

Timing library_row(const Buffers& p, const Reference& ref, int M, int rank, Library kernel,
                   bool timed, const Timing& base) {
  float error;
  bool bits;
  const Timing t = check_and_time(
      p, ref, M, rank, timed,
      [&](long long c, bool pdl, cudaStream_t s) { launch_library(p, c, M, rank, kernel, pdl, s); },
      error, bits, 0);
  char name[64];
  std::snprintf(name, sizeof(name), "library %s, %s", rank > 0 ? "two launches" : "base gate",
                kLibraryNames[static_cast<int>(kernel)]);
  print_row(M, rank, name, t, base.off > 0.f ? base : t, error, "-");
  return t;
}

template <int kTokenTiles, int kRank, int kCluster>
void one_launch_row(const Buffers& p, const Reference& ref, int M, bool timed, const Timing& base) {
  const bool padded = M % (8 * kTokenTiles) != 0;  // tokens past M: checked, not timed
  char name[64];
  std::snprintf(name, sizeof(name), "one launch 1 x %d, c%d", kTokenTiles, kCluster);
  if (!cluster_fits<kTokenTiles, kRank, kCluster>()) {
    std::printf("| %d | %d | %s: not launched, no cluster fits this GPU | | | | | | |\n", M, kRank, name);
    return;
  }
  float error;
  bool bits;
  const Timing t = check_and_time(
      p, ref, M, kRank, timed && !padded,
      [&](long long c, bool pdl, cudaStream_t s) {
        launch_one<kTokenTiles, kRank, kCluster>(p, c, M, pdl, s);
      },
      error, bits, kCluster == 8 ? kTokenTiles : 0);
  print_row(M, kRank, name, t, base, error, kCluster == 8 ? (bits ? "yes" : "NO, FAIL") : "-");
}

template <int kRank>
void rank_rows(const Buffers& p, const Reference& ref, int M, bool timed, const Timing& base) {
  library_row(p, ref, M, kRank, Library::kDecode, timed, base);
  library_row(p, ref, M, kRank, Library::kTensorCore, timed, base);
  one_launch_row<1, kRank, 8>(p, ref, M, timed, base);
  one_launch_row<2, kRank, 8>(p, ref, M, timed, base);
  if constexpr (kRank == 16) one_launch_row<4, kRank, 8>(p, ref, M, timed, base);
  // Clusters of 16 are non-portable: last, so that a GPU that cannot launch them keeps the rows above.
  one_launch_row<1, kRank, 16>(p, ref, M, timed, base);
  one_launch_row<2, kRank, 16>(p, ref, M, timed, base);
  if constexpr (kRank == 16) one_launch_row<4, kRank, 16>(p, ref, M, timed, base);
}

}  // namespace

int main(int argc, char** argv) {
  const bool check_only = argc > 1 && std::strcmp(argv[1], "--check-only") == 0;
  Buffers p;
  p.copies = cold_copies(2 * kWeightElems, check_only);  // the weights alone exceed the L2
  CHECK(cudaMalloc(&p.weights, 2 * kWeightElems * p.copies));
  CHECK(cudaMalloc(&p.bias, 2LL * E * p.copies));
  CHECK(cudaMalloc(&p.a, 2 * kAElems * p.copies));
  CHECK(cudaMalloc(&p.b, 2 * kBElems * p.copies));
  CHECK(cudaMalloc(&p.x, 2LL * kMaxM * K));
  CHECK(cudaMalloc(&p.out, 2LL * kMaxM * E));
  CHECK(cudaMalloc(&p.logits, 2LL * kMaxM * E));
  CHECK(cudaMalloc(&p.xa, sizeof(float) * kMaxM * kSlots * kMaxRank));
  CHECK(cudaMalloc(&p.slot_ids, sizeof(int64_t) * kMaxM));
  const std::vector<float> scaling(kSlots, kScale);
  CHECK(cudaMalloc(&p.scaling, sizeof(float) * kSlots));
  CHECK(cudaMemcpy(p.scaling, scaling.data(), sizeof(float) * kSlots, cudaMemcpyHostToDevice));
  fill<<<1024, 256>>>(p.weights, 1ULL * kWeightElems * p.copies, 1, 0.1f);
  fill<<<64, 256>>>(p.bias, 1ULL * E * p.copies, 2, 0.5f);
  fill<<<1024, 256>>>(p.a, 1ULL * kAElems * p.copies, 3, 0.1f);
  fill<<<256, 256>>>(p.b, 1ULL * kBElems * p.copies, 4, 0.5f);
  fill<<<64, 256>>>(p.x, 1ULL * kMaxM * K, 5, 2.f);
  CHECK(cudaDeviceSynchronize());
  const Reference ref = make_reference(p);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  // Graph timings step up once within a process after a few measurements (benchmarks/results/
  // README.md): settle first, as the benchmark does.
  if (!check_only)
    for (int i = 0; i < 4; ++i)
      time_graph([&](int n, cudaStream_t s) { launch_library(p, n % p.copies, 8, 0, Library::kTensorCore, false, s); },
                 std::max(kMinLaunches, p.copies));
  std::printf("%s; K = %d, E = %d, %d slots, cold (%d copies), us per call; x base: over the library's "
              "tensor-core base gate, same M and PDL; error: worst |out - float64 reference| in bf16 "
              "spacings over two slot mappings; base bits: tokens without an adapter equal the "
              "library's kernel with the same tiles\n\n"
              "| M | rank | variant | us | x base | us, pdl | x base, pdl | error | base bits |\n"
              "|---|---|---|---|---|---|---|---|---|\n",
              prop.name, K, E, kSlots, p.copies);
  for (int M : {8, 16, 32, 5, 13, 29}) {
    const bool timed = !check_only && M % 8 == 0;
    const moegate::RouterGemmSm90Config tiles =
        moegate::router_gemm_sm90_resolve(router_args(p, 0, M, false, p.out, nullptr), {});
    std::printf("| %d | - | (the library's tensor-core tiles: %d x %d, c%d) | | | | | | |\n", M,
                tiles.expert_tiles, tiles.token_tiles, tiles.cluster);
    library_row(p, ref, M, 0, Library::kDecode, timed, Timing{});
    const Timing base = library_row(p, ref, M, 0, Library::kTensorCore, timed, Timing{});
    rank_rows<16>(p, ref, M, timed, base);
    rank_rows<64>(p, ref, M, timed, base);
  }
  std::printf("\n%s\n", g_failed ? "FAILED: a row's error is above 1 bf16 spacing or its base bits differ"
                                 : "every row checked");
  return g_failed ? 1 : 0;
}
