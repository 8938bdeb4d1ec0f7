// The decode-size router GEMM with a LoRA layer's whole delta in the same launch (router_gemm.h,
// lora_cluster.cuh): the plain call's tiles, so tokens without an adapter keep its bits, in
// clusters of lora_cluster::kCluster CTAs along the experts.
#include "kernels/router_gemm.h"
#include "kernels/router_gemm_small_m.cuh"

namespace moegate {
namespace {

constexpr int kCluster = lora_cluster::kCluster;

// Shrink items per CTA for these tiles: the token group's (token, rank row) pairs over a cluster,
// rounded up to 1, 2 or 4 (0: more than a CTA takes).
int items_per_cta(int tokens_per_cta, int rank) {
  const int items = sm90::ceil_div(tokens_per_cta * rank, kCluster);
  for (int allowed = 1; allowed <= kLoraItemsPerCta; allowed *= 2)
    if (items <= allowed) return allowed;
  return 0;
}

template <int kExperts, int kTokens, typename Out>
cudaError_t launch_lora_tiles(const RouterGemmArgs& a, const FusedPart& fused) {
  auto kernel = router_gemm_small_m_kernel<kShortRowThreads, kExperts, kTokens, Out, Fusion::kLora>;
  // Clusters of 16 are a non-portable size: each kernel allows them once (thread-safe static).
  static const cudaError_t allowed =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (allowed != cudaSuccess) return allowed;
  dim3 grid = grid_for<kExperts, kTokens>(a);
  grid.x = sm90::ceil_div(static_cast<int>(grid.x), kCluster) * kCluster;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kShortRowThreads, 1, 1);
  config.stream = a.stream;
  cudaLaunchAttribute attributes[2];
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = kCluster;
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1] = sm90::programmatic_dependent_launch();
  config.attrs = attributes;
  config.numAttrs = a.pdl ? 2 : 1;
  return cudaLaunchKernelEx(&config, kernel, static_cast<const __nv_bfloat16*>(a.x),
                            static_cast<const __nv_bfloat16*>(a.weight),
                            static_cast<const __nv_bfloat16*>(a.bias), static_cast<Out*>(a.out),
                            a.M, a.E, a.K, a.pdl, fused.shrink, fused.route, fused.lora,
                            fused.lora_items);
}

template <int kExperts, typename Out>
cudaError_t launch_lora_tokens(const RouterGemmArgs& a, int tokens_per_cta, const FusedPart& fused) {
  switch (tokens_per_cta) {
    case 1: return launch_lora_tiles<kExperts, 1, Out>(a, fused);
    case 2: return launch_lora_tiles<kExperts, 2, Out>(a, fused);
    case 4: return launch_lora_tiles<kExperts, 4, Out>(a, fused);
  }
  return cudaErrorInvalidValue;
}

template <typename Out>
cudaError_t launch_lora_out(const RouterGemmArgs& a, int experts_per_cta, int tokens_per_cta,
                            const FusedPart& fused) {
  switch (experts_per_cta) {
    case 1: return launch_lora_tokens<1, Out>(a, tokens_per_cta, fused);
    case 2: return launch_lora_tokens<2, Out>(a, tokens_per_cta, fused);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

const char* router_gemm_small_m_lora_unsupported(const RouterGemmArgs& a, const LoraAdapters& lora) {
  if (const char* why = router_gemm_small_m_unsupported(a)) return why;
  if (a.K > kShortRowMaxK) return "K must be at most 4096 (rows of one pass)";
  if (lora.S < 1) return "needs at least one slot";
  if (lora.rank < 1 || lora.rank > lora_cluster::kMaxRank || lora.rank % 8 != 0)
    return "rank must be a multiple of 8 in [8, 64]";
  if (!aligned_16B(lora.lora_a) || !aligned_16B(lora.lora_b))
    return "lora_a and lora_b must be 16-byte aligned";
  int experts_per_cta = 0, tokens_per_cta = 0;
  resolve_tiles(a, experts_per_cta, tokens_per_cta);
  if (tokens_per_cta > 4) return "token groups of 8 are not instantiated";
  if (items_per_cta(tokens_per_cta, lora.rank) == 0)
    return "token group x rank exceeds the shrink items a cluster takes";
  return nullptr;
}

cudaError_t launch_router_gemm_small_m_lora(const RouterGemmArgs& a, const LoraAdapters& lora) {
  if (router_gemm_small_m_lora_unsupported(a, lora) != nullptr) return cudaErrorInvalidValue;
  int experts_per_cta = 0, tokens_per_cta = 0;
  resolve_tiles(a, experts_per_cta, tokens_per_cta);
  FusedPart fused;
  fused.lora = lora;
  fused.lora_items = items_per_cta(tokens_per_cta, lora.rank);
  if (a.out_dtype == DType::kFloat32)
    return launch_lora_out<float>(a, experts_per_cta, tokens_per_cta, fused);
  return launch_lora_out<__nv_bfloat16>(a, experts_per_cta, tokens_per_cta, fused);
}

}  // namespace moegate
