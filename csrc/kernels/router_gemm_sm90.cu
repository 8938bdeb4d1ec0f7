// Launcher of the Hopper router GEMM (router_gemm_sm90.cuh): eligibility, tile heuristic,
// cluster + PDL launch attributes.
#include <cuda_bf16.h>
#include <cstdint>

#include "kernels/route.h"
#include "kernels/router_gemm.h"
#include "kernels/router_gemm_sm90.cuh"

namespace moegate {
namespace {

// Grid of the kernel (router_gemm_sm90_kernel): (cluster, expert tiles, token tiles).
dim3 grid_for(const RouterGemmArgs& a, const RouterGemmSm90Config& c) {
  return dim3(c.cluster, sm90::ceil_div(a.E, 16 * c.expert_tiles),
              sm90::ceil_div(a.M, 8 * c.token_tiles));
}

using sm90::aligned_16B;
using sm90::FusedPart;
using sm90::Fusion;
using sm90::ShrinkPart;

// The plain launch, or a fused one (a shrink: its tiles after the expert tiles; or routing).
template <int kExpertTiles, int kTokenTiles, int kCluster, typename Out>
cudaError_t launch_tiles(const RouterGemmArgs& a, const FusedPart& fused) {
  const RouterGemmSm90Config tiles{kExpertTiles, kTokenTiles, kCluster};
  cudaLaunchConfig_t config = {};
  config.gridDim = grid_for(a, tiles);
  config.blockDim = dim3(sm90::kWarps * 32, 1, 1);
  config.dynamicSmemBytes = 0;
  config.stream = a.stream;
  cudaLaunchAttribute attributes[2];
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = kCluster;
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1] = sm90::programmatic_dependent_launch();
  config.attrs = attributes;
  config.numAttrs = a.pdl ? 2 : 1;
  const auto* x = static_cast<const __nv_bfloat16*>(a.x);
  const auto* weight = static_cast<const __nv_bfloat16*>(a.weight);
  const auto* bias = static_cast<const __nv_bfloat16*>(a.bias);
  Out* out = static_cast<Out*>(a.out);
  if (fused.kind == Fusion::kShrink) {
    ShrinkPart part = fused.shrink;
    part.first_expert_block = static_cast<int>(config.gridDim.y);
    config.gridDim.y += sm90::ceil_div(part.rows, 16 * kExpertTiles);
    return cudaLaunchKernelEx(
        &config,
        sm90::router_gemm_sm90_kernel<kExpertTiles, kTokenTiles, kCluster, Out, Fusion::kShrink>,
        x, weight, bias, out, a.M, a.E, a.K, a.pdl, part, fused.route);
  }
  if (fused.kind == Fusion::kRoute) {
    return cudaLaunchKernelEx(
        &config,
        sm90::router_gemm_sm90_kernel<kExpertTiles, kTokenTiles, kCluster, Out, Fusion::kRoute>,
        x, weight, bias, out, a.M, a.E, a.K, a.pdl, fused.shrink, fused.route);
  }
  return cudaLaunchKernelEx(
      &config,
      sm90::router_gemm_sm90_kernel<kExpertTiles, kTokenTiles, kCluster, Out, Fusion::kNone>, x,
      weight, bias, out, a.M, a.E, a.K, a.pdl, fused.shrink, fused.route);
}

template <int kExpertTiles, int kTokenTiles, typename Out>
cudaError_t launch_cluster(const RouterGemmArgs& a, int cluster, const FusedPart& fused) {
  switch (cluster) {
    case 4: return launch_tiles<kExpertTiles, kTokenTiles, 4, Out>(a, fused);
    case 8: return launch_tiles<kExpertTiles, kTokenTiles, 8, Out>(a, fused);
  }
  return cudaErrorInvalidValue;
}

template <int kExpertTiles, typename Out>
cudaError_t launch_token_tiles(const RouterGemmArgs& a, const RouterGemmSm90Config& c,
                               const FusedPart& fused) {
  switch (c.token_tiles) {
    case 1: return launch_cluster<kExpertTiles, 1, Out>(a, c.cluster, fused);
    case 2: return launch_cluster<kExpertTiles, 2, Out>(a, c.cluster, fused);
    case 4: return launch_cluster<kExpertTiles, 4, Out>(a, c.cluster, fused);
  }
  return cudaErrorInvalidValue;
}

template <typename Out>
cudaError_t launch_out(const RouterGemmArgs& a, const RouterGemmSm90Config& c,
                       const FusedPart& fused) {
  switch (c.expert_tiles) {
    case 1: return launch_token_tiles<1, Out>(a, c, fused);
    case 2: return launch_token_tiles<2, Out>(a, c, fused);
  }
  return cudaErrorInvalidValue;
}

// The plain launch of launch_router_gemm_sm90, and the fused ones with `fused`.
cudaError_t launch_resolved(const RouterGemmArgs& a, RouterGemmSm90Config c,
                            const FusedPart& fused) {
  c = router_gemm_sm90_resolve(a, c);
  if (a.out_dtype == DType::kFloat32) return launch_out<float>(a, c, fused);
  return launch_out<__nv_bfloat16>(a, c, fused);
}

}  // namespace

const char* router_gemm_sm90_unsupported(const RouterGemmArgs& a) {
  if (a.in_dtype != DType::kBFloat16) return "x and weight must be bfloat16";
  if (a.out_dtype != DType::kBFloat16 && a.out_dtype != DType::kFloat32)
    return "out dtype must be bfloat16 or float32";
  if (a.M < 1 || a.M > kSm90MaxM) return "M must be in [1, 256]";
  if (a.E < 8 || a.E > kSm90MaxE || a.E % 8 != 0) return "E must be a multiple of 8 in [8, 512]";
  if (a.K < 8 || a.K % 8 != 0) return "K must be a positive multiple of 8";
  if (!aligned_16B(a.x) || !aligned_16B(a.weight)) return "x and weight must be 16-byte aligned";
  return nullptr;
}

RouterGemmSm90Config router_gemm_sm90_resolve(const RouterGemmArgs& a, RouterGemmSm90Config c) {
  // From cold-weight tile sweeps of seven router shapes (K 2048-7168, E 8-256) at M = 16-256, every
  // configuration, PDL on and off (benchmarks/results/README.md, "Coherent weight loads, and the
  // tile rule they called for"). Start from the finest grid: one 16-expert x 8-token tile per
  // warp, clusters of 8 (of 4 when K < 2560: too few k32 blocks per warp). Past one CTA per SM (128), two token tiles;
  // past two CTAs per SM (256), coarsen in the order that measured best: four token tiles,
  // clusters of 4, two expert tiles. A token step that would pad the batch (M = 24 in 16-token
  // tiles, M = 48 in 32-token ones) is skipped while the grid can fit without it. Over the swept
  // cells this rule stays close to the best configuration of each; the worst cells are in that
  // section. Fields the caller set are kept.
  constexpr int kOneWaveCtas = 128;  // one CTA per SM of a 132-SM H100/H200
  constexpr int kMaxCtas = 256;      // two per SM
  const RouterGemmSm90Config fixed = c;
  if (c.cluster == 0) c.cluster = a.K >= 2560 ? 8 : 4;
  if (c.token_tiles == 0) c.token_tiles = 1;
  if (c.expert_tiles == 0) c.expert_tiles = 1;
  auto ctas = [&] {
    const dim3 grid = grid_for(a, c);
    return static_cast<int>(grid.x * grid.y * grid.z);
  };
  auto padded_rows = [&](int token_tiles) {
    return sm90::ceil_div(a.M, 8 * token_tiles) * 8 * token_tiles;
  };
  auto pads = [&](int tiles) { return padded_rows(tiles) > padded_rows(c.token_tiles); };
  const bool tokens_free = fixed.token_tiles == 0;
  if (tokens_free && ctas() > kOneWaveCtas && !(pads(2) && ctas() <= kMaxCtas)) c.token_tiles = 2;
  if (tokens_free && ctas() > kMaxCtas && !pads(4)) c.token_tiles = 4;
  if (fixed.cluster == 0 && ctas() > kMaxCtas) c.cluster = 4;
  if (fixed.expert_tiles == 0 && ctas() > kMaxCtas) c.expert_tiles = 2;
  if (tokens_free && ctas() > kMaxCtas) c.token_tiles = 4;  // the padding step after all
  return c;
}

cudaError_t launch_router_gemm_sm90(const RouterGemmArgs& a, RouterGemmSm90Config c) {
  return launch_resolved(a, c, FusedPart{});
}

const char* router_gemm_sm90_with_shrink_unsupported(const RouterGemmArgs& a, const void* lora_a,
                                                     int rows) {
  if (const char* why = router_gemm_sm90_unsupported(a)) return why;
  return ShrinkPart::unsupported(lora_a, rows);
}

cudaError_t launch_router_gemm_sm90_with_shrink(const RouterGemmArgs& a, const void* lora_a,
                                                int rows, float* xa) {
  FusedPart fused;
  fused.kind = Fusion::kShrink;
  fused.shrink = ShrinkPart::of(lora_a, rows, xa);
  return launch_resolved(a, RouterGemmSm90Config{}, fused);
}

// Routing rides in the tiles of the plain call, so the logits keep its bits; one counter per
// token tile (grid z).
int router_gemm_sm90_route_counters(const RouterGemmArgs& a) {
  const RouterGemmSm90Config c = router_gemm_sm90_resolve(a, RouterGemmSm90Config{});
  return static_cast<int>(grid_for(a, c).z);
}

cudaError_t launch_router_gemm_sm90_route(const RouterGemmArgs& a, const RouteArgs& route) {
  FusedPart fused;
  fused.kind = Fusion::kRoute;
  fused.route = route;
  return launch_resolved(a, RouterGemmSm90Config{}, fused);
}

}  // namespace moegate
