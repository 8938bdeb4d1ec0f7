// The decode-size router GEMM (M <= 64): one CTA per group of experts and group of tokens, whole K
// per CTA, CUDA-core FMAs, and no communication between CTAs at all.
//
// Why a second kernel. For small batches (up to about 1000-2000 logits) the tensor-core kernel
// (router_gemm_sm90.cuh) pays more for handing its K slices' partial sums between CTAs than this
// kernel pays for its re-reads (benchmarks/results/README.md, "Where the decode kernel's time
// goes").
// Here each CTA owns whole weight rows, so its 256 threads cover K = 2880 with two 16-byte loads
// each, 512 threads up to K = 8192 (all issued before the first FMA: one trip to memory), reduce
// through warp shuffles and one __syncthreads, and store. Small CTA tiles (1 expert x 2 tokens;
// 2 x 2 from 512 logits, 2 x 4 from 768) spread the weight over many SMs, which keeps each SM's
// share small (2 x 2880 bytes per expert), and each group of tokens gets its own row of such CTAs
// (launch_router_gemm_small_m picks the tile).
// Summation order is fixed: bitwise deterministic.
//
// Fused form (launch_router_gemm_small_m_with_shrink): a LoRA layer's shrink x A^T rides along as
// extra CTAs of the same grid, with the same code and tiles, so the logits keep their bits and the
// layer saves a launch. Fused routing (launch_router_gemm_small_m_route): the last CTA of each row
// of the grid routes that row's tokens (routing.cuh). Fused LoRA (launch_router_gemm_small_m_lora):
// the grid in clusters along the experts, each adding a LoRA layer's delta to its logits
// (lora_cluster.cuh).
//
// The launch chain below is templated on the launch form; router_gemm_small_m.cu instantiates the
// plain and shrink forms, router_gemm_small_m_route.cu the routing form, router_gemm_small_m_lora.cu
// the LoRA form (one unit for all of them took minutes to compile).
//
// PDL: launch_dependents fires at entry, weight loads are issued before griddepcontrol.wait, x and
// then the bias after it, and nothing is written before it (router_gemm_sm90.cuh explains why each
// of these matters).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/float_convert.cuh"
#include "kernels/fused_launch.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/lora_cluster.cuh"
#include "kernels/memory_access.cuh"
#include "kernels/route.h"
#include "kernels/router_gemm.h"
#include "kernels/routing.cuh"

namespace moegate {
namespace {

constexpr int kChunksPerThread = 2;  // 16-byte chunks per thread per pass
// CTA size: 256 threads cover K <= 4096 in one pass (one trip to memory); longer rows get 512, so
// that K <= 8192 still takes one pass. Where one pass needs no more, 256 threads were the fastest
// size measured (benchmarks/results/README.md).
constexpr int kShortRowThreads = 256;
constexpr int kLongRowThreads = 512;
constexpr int kShortRowMaxK = kShortRowThreads * kChunksPerThread * 8;
// A 512-thread CTA holds an SM's registers alone unless its tile is tiny: the kernel asks ptxas
// for two per SM (at most 64 registers a thread; 1 x 1, 1 x 2 and 2 x 1 tiles use 32-48) and
// takes the 512-thread form only while the grid fits in one wave of a 132-SM H100/H200: a second
// wave costs more than the second pass it saves.
constexpr int kWaveSms = 132;
__host__ __device__ constexpr int long_row_ctas_per_sm(int outputs) { return outputs <= 2 ? 2 : 1; }
// A one-launch LoRA grid runs only where all its clusters of 16 are resident at once
// (router_gemm_small_m_lora.cu): two CTAs per SM (at most 128 registers a thread, without
// spilling: tests/test_kernel_sass.py). One CTA an SM sent the probe design's M = 1 grid into a
// second wave on an H100 (benchmarks/results/README.md, "One straight path").
constexpr int kLoraCtasPerSm = 2;
constexpr int kMaxTokensPerCta = 8;  // the largest token group launch_tokens instantiates

// Sums each of the N values of `v` over the warp's 32 lanes and returns one of those sums: lane l
// gets output l / (32 / N). Each of the first log2(N) steps pairs lanes `offset` apart; one keeps
// the lower half of its values, the other the upper half, and each adds the half its partner sent:
// N / 2 shuffles halve the values per lane. Then a plain butterfly over the 32 / N lanes that share
// an output. N - 1 + log2(32 / N) shuffles in all instead of 5N for N separate butterflies: at
// 8 outputs 9 instead of 40, at 32 outputs 31 instead of 160. Fixed order: bitwise deterministic.
// Below 8 outputs separate butterflies were faster (the same depth of five shuffles, and no
// lane-dependent selects; benchmarks/results/README.md, "Decode kernel: 2 x 4 tiles, a
// scatter-reduce epilogue"), so the kernel uses this from 8 outputs up.
// One halving step per level (template recursion: nested unrolled loops whose inner trip count
// depends on the outer index left the N = 32 case in local memory).
template <int N, int kHalf = N / 2>
__device__ __forceinline__ void fold_halves(float (&v)[N], int lane) {
  if constexpr (kHalf >= 1) {
    constexpr int kOffset = 32 * kHalf / N;
    const bool upper = lane & kOffset;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float send = upper ? v[i] : v[i + kHalf];
      const float keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
    }
    fold_halves<N, kHalf / 2>(v, lane);
  }
}

template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "a power of two up to 32");
  fold_halves(v, lane);
  float sum = v[0];
#pragma unroll
  for (int offset = 16 / N; offset > 0; offset /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

using sm90::aligned_16B;
using sm90::FusedPart;
using sm90::Fusion;
using sm90::ShrinkPart;  // the second GEMM of a fused launch (expert blocks along the grid's x)

// Grid: (ceil(E / kExperts), ceil(M / kTokens)) CTAs of kThreads; CTA (i, j) owns experts
// [i * kExperts, ...) of tokens [j * kTokens, ...). Thread t reads 16-byte chunk
// c = pass + j * kThreads + t of each row (consecutive threads, consecutive chunks: coalesced).
// Fusion::kShrink: the grid has ceil(shrink.rows / kExperts) more CTAs along x, for the ShrinkPart.
// Fusion::kRoute: the last CTA of each row of the grid routes that row's tokens (routing.cuh).
// Fusion::kLora: clusters of lora_cluster::kCluster CTAs along x (gridDim.x a multiple of it; CTAs
// past E compute shrink items only), each CTA with kLoraItems shrink items (lora_cluster.cuh).
template <int kThreads, int kExperts, int kTokens, typename Out, Fusion kFusion, int kLoraItems = 0>
__global__ void __launch_bounds__(kThreads, kFusion == Fusion::kLora ? kLoraCtasPerSm
                                            : kThreads == kLongRowThreads
                                                ? long_row_ctas_per_sm(kExperts * kTokens)
                                                : 1)
    router_gemm_small_m_kernel(const __nv_bfloat16* __restrict__ x,
                               const __nv_bfloat16* __restrict__ weight,
                               const __nv_bfloat16* __restrict__ bias, Out* __restrict__ out, int M,
                               int E, int K, bool pdl, ShrinkPart shrink, RouteArgs route,
                               LoraAdapters lora) {
  constexpr bool kWithShrink = kFusion == Fusion::kShrink;
  constexpr bool kWithLora = kFusion == Fusion::kLora;
  constexpr int kWarps = kThreads / 32;
  constexpr int kOutputs = kExperts * kTokens;
  static_assert(kOutputs <= 32, "one lane per output in the warp reduction");
  static_assert(!kWithLora || kThreads == kShortRowThreads, "the shrink's 256-thread sums");
  static_assert(kWithLora == (kLoraItems > 0), "shrink items in the LoRA form only");
  constexpr int kItems = kWithLora ? kLoraItems : 1;  // array sizes of the unused LoRA state
  __shared__ float warp_sums[kWarps][kOutputs];
  sm90::trigger_dependents();  // at entry (grid_dependency.cuh)
  using LoraShared = lora_cluster::Shared<kWarps>;
  __shared__ __align__(16) unsigned char lora_bytes[kWithLora ? sizeof(LoraShared) : 1];
  auto& lora_shared = *reinterpret_cast<LoraShared*>(lora_bytes);
  if constexpr (kWithLora) lora_cluster::start(lora_shared);

  int cta = blockIdx.x;
  bool shrink_cta = false;  // a shrink CTA: the same work on the other matrix
  float* shrink_out = nullptr;
  if constexpr (kWithShrink)
    shrink_cta = shrink.claim(cta, weight, bias, E, shrink_out,
                              static_cast<long long>(blockIdx.y) * kTokens);
  const int e0 = cta * kExperts;
  const int m0 = blockIdx.y * kTokens;  // this CTA's tokens: rows m0.. of x and out
  x += static_cast<long long>(m0) * K;
  out += static_cast<long long>(m0) * E;
  M -= m0;
  const int num_chunks = K / 8;
  const int t = threadIdx.x;

  // Epilogue mapping: this thread stores output (my_e, my_m) if `stores`.
  const int my_e = e0 + t / kTokens, my_m = t % kTokens;
  const bool stores = t < kOutputs && my_e < E && my_m < M;
  unsigned short bias_bits = 0;

  float acc[kOutputs];  // acc[e * kTokens + m]: expert e0 + e, token m0 + m
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) acc[i] = 0.f;
  lora_cluster::Tile<kExperts, kTokens, kItems> tile;  // Fusion::kLora only, read after the wait
  float item_acc[kItems];
#pragma unroll
  for (int u = 0; u < kItems; ++u) item_acc[u] = 0.f;

  // The LoRA form's rows take one pass (its launcher checks K): a loop of one known trip, so that
  // its pass-0 reads are straight-line code that ptxas schedules with x's loads (inside a
  // conditional block they sat after it, x's loads behind the slots' arrival).
  const int passes_end = kWithLora ? 1 : num_chunks;
  for (int pass = 0; pass < passes_end; pass += kThreads * kChunksPerThread) {
    uint4 w[kChunksPerThread][kExperts];
    uint4 xv[kChunksPerThread][kTokens];
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j) {
      const int chunk = pass + j * kThreads + t;
#pragma unroll
      for (int e = 0; e < kExperts; ++e)
        w[j][e] = sm90::load_weight_16B(weight + static_cast<long long>(e0 + e) * K + 8 * chunk,
                           chunk < num_chunks && e0 + e < E);
    }
    if (pass == 0) sm90::grid_dependency_wait(pdl);
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j) {
      const int chunk = pass + j * kThreads + t;
#pragma unroll
      for (int m = 0; m < kTokens; ++m)
        xv[j][m] = sm90::load_activation_16B(x + static_cast<long long>(m) * K + 8 * chunk,
                            chunk < num_chunks && m < M);
    }
    if (kWithLora && pass == 0) tile.read_slots(lora, M < kTokens ? M : kTokens, m0);
    if (pass == 0) bias_bits = sm90::load_bias_bits(bias, my_e, stores);  // behind the rows
    uint4 a[kWithLora ? kChunksPerThread : 1][kItems];
    if constexpr (kWithLora) {
      if (pass == 0) tile.find_items(lora, K);
#pragma unroll
      for (int j = 0; j < kChunksPerThread; ++j) {
        const int chunk = pass + j * kThreads + t;
#pragma unroll
        for (int u = 0; u < kItems; ++u)
          a[j][u] = sm90::load_weight_16B(tile.item_row[u] + 8 * chunk,
                                          chunk < num_chunks && tile.item_live[u]);
      }
      if (pass == 0) tile.read_expand(lora, bias, e0, E);
    }
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j)
#pragma unroll
      for (int e = 0; e < kExperts; ++e)
#pragma unroll
        for (int m = 0; m < kTokens; ++m)
          acc[e * kTokens + m] = dot8_bf16(w[j][e], xv[j][m], acc[e * kTokens + m]);
    if constexpr (kWithLora) {
#pragma unroll
      for (int j = 0; j < kChunksPerThread; ++j)
        lora_cluster::add_items(a[j], xv[j], tile.item_token, item_acc);
    }
  }

  const int lane = t % 32;
  if constexpr (kOutputs >= 8) {
    const float warp_sum = warp_reduce_scatter(acc, lane);
    if (lane % (32 / kOutputs) == 0) warp_sums[t / 32][lane / (32 / kOutputs)] = warp_sum;
  } else {  // one butterfly per output (see warp_reduce_scatter for why not below 8)
#pragma unroll
    for (int i = 0; i < kOutputs; ++i) {
      float v = acc[i];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) warp_sums[t / 32][i] = v;
    }
  }
  if constexpr (kWithLora) lora_cluster::reduce_items(item_acc, lora_shared);
  __syncthreads();
  if (stores) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][t];
    // An adapted token's outputs are the expand's to store, with their deltas.
    const bool expanded = kWithLora && lora_cluster::token_entry(tile.slot, my_m) >= 0;
    if (kWithShrink && shrink_cta)
      shrink_out[static_cast<long long>(my_m) * E + my_e] = sum + sm90::bias_value(bias_bits);
    else if (!expanded)
      out[static_cast<long long>(my_m) * E + my_e] =
          sm90::store_cast<Out>(sum + sm90::bias_value(bias_bits));
  }
  if constexpr (kWithLora) {
    lora_cluster::push_items<kItems>(lora_shared);
    if (!lora_cluster::has_exchange_role<kOutputs>()) return;
    // An adapted output's base, summed and rounded as above by the lane that stores it, while the
    // inbox fills.
    float base = 0.f;
    const int o = t / lora_cluster::kLanesPerOutput;
    if (tile.out_slot >= 0 && t % lora_cluster::kLanesPerOutput == 0) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][o];
      base = to_float(sm90::store_cast<Out>(sum + sm90::bias_value(tile.bias_bits)));
    }
    lora_cluster::wait_inbox(lora_shared);
    lora_cluster::expand<kWarps>(tile, lora_shared, lora.rank, base, out, E, e0);
  }
  if constexpr (kFusion == Fusion::kRoute) {
    if (routing::last_of_tile(route, blockIdx.y, gridDim.x))
      routing::route_tile(out, E, m0, M < kTokens ? M : kTokens, route);
  }
}

template <int kExperts, int kTokens>
dim3 grid_for(const RouterGemmArgs& a) {
  return dim3(sm90::ceil_div(a.E, kExperts), sm90::ceil_div(a.M, kTokens), 1);
}

template <int kThreads, int kExperts, int kTokens, typename Out, Fusion kFusion>
cudaError_t launch_threads(const RouterGemmArgs& a, dim3 grid, const FusedPart& fused) {
  return sm90::launch_maybe_dependent(
      router_gemm_small_m_kernel<kThreads, kExperts, kTokens, Out, kFusion>, grid,
      dim3(kThreads, 1, 1), a.stream, a.pdl, static_cast<const __nv_bfloat16*>(a.x),
      static_cast<const __nv_bfloat16*>(a.weight), static_cast<const __nv_bfloat16*>(a.bias),
      static_cast<Out*>(a.out), a.M, a.E, a.K, a.pdl, fused.shrink, fused.route, fused.lora);
}

// The launch of one form (kFusion; a shrink: short rows only, 256 threads, its CTAs after the
// router's along x).
template <Fusion kFusion, int kExperts, int kTokens, typename Out>
cudaError_t launch_typed(const RouterGemmArgs& a, const FusedPart& fused) {
  dim3 grid = grid_for<kExperts, kTokens>(a);
  if constexpr (kFusion == Fusion::kShrink) {
    FusedPart part = fused;
    part.shrink.first_expert_block = static_cast<int>(grid.x);
    grid.x += sm90::ceil_div(part.shrink.rows, kExperts);
    return launch_threads<kShortRowThreads, kExperts, kTokens, Out, kFusion>(a, grid, part);
  } else {
    // 4 x 8 tiles need more than the 128 registers a thread of a 512-thread CTA may have (ptxas
    // spilled): they keep 256 threads and take two passes over long rows.
    if constexpr (kExperts * kTokens <= 16) {
      const long long ctas = static_cast<long long>(grid.x) * grid.y;
      if (a.K > kShortRowMaxK && ctas <= kWaveSms * long_row_ctas_per_sm(kExperts * kTokens))
        return launch_threads<kLongRowThreads, kExperts, kTokens, Out, kFusion>(a, grid, fused);
    }
    return launch_threads<kShortRowThreads, kExperts, kTokens, Out, kFusion>(a, grid, fused);
  }
}

template <Fusion kFusion, int kExperts, typename Out>
cudaError_t launch_tokens(const RouterGemmArgs& a, int tokens_per_cta, const FusedPart& fused) {
  switch (tokens_per_cta) {
    case 1: return launch_typed<kFusion, kExperts, 1, Out>(a, fused);
    case 2: return launch_typed<kFusion, kExperts, 2, Out>(a, fused);
    case 4: return launch_typed<kFusion, kExperts, 4, Out>(a, fused);
    case 8: return launch_typed<kFusion, kExperts, 8, Out>(a, fused);
  }
  return cudaErrorInvalidValue;
}

// Fused forms use the tiles resolve_tiles picks, never 4 experts per CTA: only the plain form
// (a caller's explicit choice, for tuning) instantiates that tile.
template <Fusion kFusion, typename Out>
cudaError_t launch_out(const RouterGemmArgs& a, int experts_per_cta, int tokens_per_cta,
                       const FusedPart& fused) {
  switch (experts_per_cta) {
    case 1: return launch_tokens<kFusion, 1, Out>(a, tokens_per_cta, fused);
    case 2: return launch_tokens<kFusion, 2, Out>(a, tokens_per_cta, fused);
    case 4:
      if constexpr (kFusion == Fusion::kNone)
        return launch_tokens<kFusion, 4, Out>(a, tokens_per_cta, fused);
  }
  return cudaErrorInvalidValue;
}

// Tokens per CTA: two, or more while the grid would exceed 384 CTAs, never more than 8 or than M
// needs. Splitting the tokens over the grid's second dimension cuts each CTA's activation load
// (M x K x 2 bytes unsplit) at the price of re-reading its weight rows from L2
// (benchmarks/results/README.md, "Decode kernel: splitting the tokens over the grid").
int auto_tokens_per_cta(const RouterGemmArgs& a, int experts_per_cta) {
  constexpr int kMaxCtas = 384;
  int all = 1;
  while (all < a.M) all *= 2;
  const int expert_ctas = sm90::ceil_div(a.E, experts_per_cta);
  int tokens = all < 2 ? all : 2;
  while (tokens < all && tokens < kMaxTokensPerCta &&
         expert_ctas * sm90::ceil_div(a.M, tokens) > kMaxCtas)
    tokens *= 2;
  return tokens;
}


// Fills the zero tile sizes (experts and tokens per CTA) for this problem.
void resolve_tiles(const RouterGemmArgs& a, int& experts_per_cta, int& tokens_per_cta) {
  // Square-ish CTA tiles from 512 logits on (M >= 4): 2 experts x 2 tokens, and 2 x 4 from 768.
  // Each CTA loads 4 or 6 rows where 1 x 4 or 1 x 8 would load 5 or 9 (the bytes each SM moves
  // into registers are what costs here; benchmarks/results/README.md, "Where the decode kernel's
  // time goes"), and the grid stays at <= 256 CTAs up to 1024 (2 x 2) or 2048 logits (2 x 4). Below
  // 512 logits one expert x 2 tokens per CTA (more CTAs, each with less to load) was best or
  // within noise of it ("Decode kernel: 2 x 2 tiles at 512-767 logits").
  const long long logits = static_cast<long long>(a.M) * a.E;
  const int square_tokens = a.M < 4 || logits < 512 ? 0 : logits < 768 ? 2 : 4;  // 0: 1 x auto
  if (experts_per_cta == 0) experts_per_cta = square_tokens > 0 && tokens_per_cta == 0 ? 2 : 1;
  if (tokens_per_cta == 0)
    tokens_per_cta = square_tokens > 0 && experts_per_cta == 2
                         ? square_tokens
                         : auto_tokens_per_cta(a, experts_per_cta);
}

// A launch of form kFusion with the tiles resolve_tiles completes.
template <Fusion kFusion>
cudaError_t launch_resolved(const RouterGemmArgs& a, int experts_per_cta, int tokens_per_cta,
                            const FusedPart& fused) {
  resolve_tiles(a, experts_per_cta, tokens_per_cta);
  if (a.out_dtype == DType::kFloat32)
    return launch_out<kFusion, float>(a, experts_per_cta, tokens_per_cta, fused);
  return launch_out<kFusion, __nv_bfloat16>(a, experts_per_cta, tokens_per_cta, fused);
}

}  // namespace
}  // namespace moegate
