// The decode-size router GEMM with a LoRA layer's whole delta in the same launch (router_gemm.h,
// lora_cluster.cuh): the plain call's tiles, so tokens without an adapter keep its bits, in
// clusters of lora_cluster::kCluster CTAs along the experts.
#include <type_traits>

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

template <int kExperts, int kTokens, int kItems, typename Out>
constexpr auto lora_kernel =
    router_gemm_small_m_kernel<kShortRowThreads, kExperts, kTokens, Out, Fusion::kLora, kItems>;

// How many clusters of this kernel the device holds at once (0: none). Clusters of 16 are a
// non-portable size (allowed here) and need 16 CTAs resident in one GPC, which Hopper parts with
// small GPCs do not give kernels of one CTA an SM; and a grid with more clusters than fit runs in
// two waves (the 2 x 4 tiles at E = 128, M = 8 did, at 3.5x the base gate:
// benchmarks/results/README.md, "The one-launch LoRA kernel's first GPU run"). Asked once per
// kernel (a thread-safe static: one kind of GPU per process).
template <int kExperts, int kTokens, int kItems, typename Out>
int resident_clusters() {
  static const int clusters = [] {
    const auto kernel = lora_kernel<kExperts, kTokens, kItems, Out>;
    cudaLaunchAttribute attributes[2];
    const cudaLaunchConfig_t config = sm90::cluster_launch_config(
        dim3(kCluster, 1, 1), dim3(kShortRowThreads, 1, 1), nullptr, kCluster, false, attributes);
    int count = 0;
    const bool ok =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
            cudaSuccess &&
        cudaOccupancyMaxActiveClusters(&count, kernel, &config) == cudaSuccess;
    if (!ok) cudaGetLastError();  // a refusal is an answer here, not an error for the next launch
    return ok ? count : 0;
  }();
  return clusters;
}

// The plain call's grid, padded along the experts to whole clusters.
template <int kExperts, int kTokens>
dim3 lora_grid(const RouterGemmArgs& a) {
  dim3 grid = grid_for<kExperts, kTokens>(a);
  grid.x = sm90::ceil_div(static_cast<int>(grid.x), kCluster) * kCluster;
  return grid;
}

template <int kValue>
using Int = std::integral_constant<int, kValue>;

// Calls f(Int<experts>, Int<tokens>, Int<items>, Out{}) for the instantiated tiles, shrink items
// per CTA and output dtype: the one place that maps run-time shapes to kernels (the fit check and
// the launch both go through it). A group of kTokens takes at least kTokens / 2 items (rank >= 8),
// so only those are instantiated.
template <typename R, typename F>
R with_lora_kernel(int experts_per_cta, int tokens_per_cta, int items, DType out_dtype, R otherwise,
                   F f) {
  auto by_out = [&](auto experts, auto tokens, auto items_per_cta) -> R {
    if constexpr (decltype(items_per_cta)::value * 2 < decltype(tokens)::value) {
      return otherwise;
    } else {
      if (out_dtype == DType::kFloat32) return f(experts, tokens, items_per_cta, float{});
      return f(experts, tokens, items_per_cta, __nv_bfloat16{});
    }
  };
  auto by_items = [&](auto experts, auto tokens) -> R {
    switch (items) {
      case 1: return by_out(experts, tokens, Int<1>{});
      case 2: return by_out(experts, tokens, Int<2>{});
      case 4: return by_out(experts, tokens, Int<4>{});
    }
    return otherwise;
  };
  auto by_tokens = [&](auto experts) -> R {
    switch (tokens_per_cta) {
      case 1: return by_items(experts, Int<1>{});
      case 2: return by_items(experts, Int<2>{});
      case 4: return by_items(experts, Int<4>{});
    }
    return otherwise;
  };
  switch (experts_per_cta) {
    case 1: return by_tokens(Int<1>{});
    case 2: return by_tokens(Int<2>{});
  }
  return otherwise;
}

template <int kExperts, int kTokens, int kItems, typename Out>
cudaError_t launch_lora_tiles(const RouterGemmArgs& a, const FusedPart& fused) {
  const dim3 grid = lora_grid<kExperts, kTokens>(a);
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config = sm90::cluster_launch_config(
      grid, dim3(kShortRowThreads, 1, 1), a.stream, kCluster, a.pdl, attributes);
  return cudaLaunchKernelEx(&config, lora_kernel<kExperts, kTokens, kItems, Out>,
                            static_cast<const __nv_bfloat16*>(a.x),
                            static_cast<const __nv_bfloat16*>(a.weight),
                            static_cast<const __nv_bfloat16*>(a.bias), static_cast<Out*>(a.out),
                            a.M, a.E, a.K, a.pdl, fused.shrink, fused.route, fused.lora);
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
  const int items = items_per_cta(tokens_per_cta, lora.rank);
  if (items == 0) return "token group x rank exceeds the shrink items a cluster takes";
  const bool fit = with_lora_kernel(
      experts_per_cta, tokens_per_cta, items, a.out_dtype, false,
      [&](auto experts, auto tokens, auto items_per_cta, auto out) {
        constexpr int kExperts = decltype(experts)::value, kTokens = decltype(tokens)::value;
        const dim3 grid = lora_grid<kExperts, kTokens>(a);
        const int clusters = static_cast<int>(grid.x / kCluster * grid.y);
        return clusters <= resident_clusters<kExperts, kTokens, decltype(items_per_cta)::value,
                                             decltype(out)>();
      });
  if (!fit) return "the grid's clusters of 16 CTAs do not all fit on this GPU at once";
  return nullptr;
}

cudaError_t launch_router_gemm_small_m_lora(const RouterGemmArgs& a, const LoraAdapters& lora) {
  int experts_per_cta = 0, tokens_per_cta = 0;
  resolve_tiles(a, experts_per_cta, tokens_per_cta);
  FusedPart fused;
  fused.lora = lora;
  return with_lora_kernel(experts_per_cta, tokens_per_cta, items_per_cta(tokens_per_cta, lora.rank),
                          a.out_dtype, cudaErrorInvalidValue,
                          [&](auto experts, auto tokens, auto items, auto out) {
                            return launch_lora_tiles<decltype(experts)::value,
                                                     decltype(tokens)::value,
                                                     decltype(items)::value, decltype(out)>(a, fused);
                          });
}

}  // namespace moegate
