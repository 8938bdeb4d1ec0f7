// The launch chain of the Hopper router GEMM (router_gemm_sm90.cuh): grid, cluster and PDL
// attributes, one template per launch form (plain and shrink, instantiated in router_gemm_sm90.cu).
#pragma once

#include <cuda_bf16.h>

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

// The launch of one form (kFusion; a shrink's tiles come after the expert tiles).
template <Fusion kFusion, int kExpertTiles, int kTokenTiles, int kCluster, typename Out>
cudaError_t launch_tiles(const RouterGemmArgs& a, const FusedPart& fused) {
  const RouterGemmSm90Config tiles{kExpertTiles, kTokenTiles, kCluster};
  cudaLaunchAttribute attributes[2];
  cudaLaunchConfig_t config = sm90::cluster_launch_config(
      grid_for(a, tiles), dim3(sm90::kWarps * 32, 1, 1), a.stream, kCluster, a.pdl, attributes);
  const auto* x = static_cast<const __nv_bfloat16*>(a.x);
  const auto* weight = static_cast<const __nv_bfloat16*>(a.weight);
  const auto* bias = static_cast<const __nv_bfloat16*>(a.bias);
  Out* out = static_cast<Out*>(a.out);
  ShrinkPart shrink = fused.shrink;
  if constexpr (kFusion == Fusion::kShrink) {
    shrink.first_expert_block = static_cast<int>(config.gridDim.y);
    config.gridDim.y += sm90::ceil_div(shrink.rows, 16 * kExpertTiles);
  }
  return cudaLaunchKernelEx(
      &config, sm90::router_gemm_sm90_kernel<kExpertTiles, kTokenTiles, kCluster, Out, kFusion>, x,
      weight, bias, out, a.M, a.E, a.K, a.pdl, shrink, fused.route);
}

template <Fusion kFusion, int kExpertTiles, int kTokenTiles, typename Out>
cudaError_t launch_cluster(const RouterGemmArgs& a, int cluster, const FusedPart& fused) {
  switch (cluster) {
    case 4: return launch_tiles<kFusion, kExpertTiles, kTokenTiles, 4, Out>(a, fused);
    case 8: return launch_tiles<kFusion, kExpertTiles, kTokenTiles, 8, Out>(a, fused);
  }
  return cudaErrorInvalidValue;
}

template <Fusion kFusion, int kExpertTiles, typename Out>
cudaError_t launch_token_tiles(const RouterGemmArgs& a, const RouterGemmSm90Config& c,
                               const FusedPart& fused) {
  switch (c.token_tiles) {
    case 1: return launch_cluster<kFusion, kExpertTiles, 1, Out>(a, c.cluster, fused);
    case 2: return launch_cluster<kFusion, kExpertTiles, 2, Out>(a, c.cluster, fused);
    case 4: return launch_cluster<kFusion, kExpertTiles, 4, Out>(a, c.cluster, fused);
  }
  return cudaErrorInvalidValue;
}

template <Fusion kFusion, typename Out>
cudaError_t launch_out(const RouterGemmArgs& a, const RouterGemmSm90Config& c,
                       const FusedPart& fused) {
  switch (c.expert_tiles) {
    case 1: return launch_token_tiles<kFusion, 1, Out>(a, c, fused);
    case 2: return launch_token_tiles<kFusion, 2, Out>(a, c, fused);
  }
  return cudaErrorInvalidValue;
}

// A launch of form kFusion with the tiles router_gemm_sm90_resolve completes from `c`.
template <Fusion kFusion>
cudaError_t launch_resolved(const RouterGemmArgs& a, RouterGemmSm90Config c,
                            const FusedPart& fused) {
  c = router_gemm_sm90_resolve(a, c);
  if (a.out_dtype == DType::kFloat32) return launch_out<kFusion, float>(a, c, fused);
  return launch_out<kFusion, __nv_bfloat16>(a, c, fused);
}

}  // namespace
}  // namespace moegate
