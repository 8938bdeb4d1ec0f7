// The decode-size router GEMM with a LoRA layer's whole delta in the same launch (router_gemm.h,
// lora_cluster.cuh): the plain call's tiles, so tokens without an adapter keep its bits, in
// clusters of lora_cluster::kCluster CTAs along the experts; for single tokens, where it was
// measured faster than the two launches.
#include <type_traits>

#include "kernels/router_gemm.h"
#include "kernels/router_gemm_small_m.cuh"

namespace moegate {
namespace {

constexpr int kCluster = lora_cluster::kCluster;

// The one launch is taken only where it was measured faster than the two (benchmarks/results/
// README.md, "One straight path"): single-token groups (M = 1; M = 8 lost by 1 us, the A rows
// waiting for a slot behind a register-capped schedule), with one shrink item a CTA (rank <= 16)
// whether or not PDL is on, with more only without PDL (under it the expand's launch hides behind
// the base gate's, and rank 64 lost by 0.3 us). M = 1 gets 1 x 1 tiles (resolve_tiles), the only
// ones instantiated.
constexpr int kOneLaunchTokens = 1;

// Shrink items per CTA: the token's rank rows over a cluster, rounded up to 1, 2 or 4 (rank <= 64,
// checked by the caller).
int items_per_cta(int rank) {
  const int items = sm90::ceil_div(kOneLaunchTokens * rank, kCluster);
  return items <= 1 ? 1 : items <= 2 ? 2 : kLoraItemsPerCta;
}

template <int kItems, typename Out>
constexpr auto lora_kernel =
    router_gemm_small_m_kernel<kShortRowThreads, 1, kOneLaunchTokens, Out, Fusion::kLora, kItems>;

// How many clusters of this kernel the device holds at once (0: none). Clusters of 16 are a
// non-portable size (allowed here) and need 16 CTAs resident in one GPC, which Hopper parts with
// small GPCs do not give kernels of one CTA an SM; and a grid with more clusters than fit runs in
// two waves (2 x 4 tiles at E = 128, M = 8 did, at 3.5x the base gate: benchmarks/results/
// README.md, "The one-launch LoRA kernel's first GPU run"). Asked once per kernel (a thread-safe
// static: one kind of GPU per process).
template <int kItems, typename Out>
int resident_clusters() {
  static const int clusters = [] {
    const auto kernel = lora_kernel<kItems, Out>;
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

// The plain call's grid (1 x 1 tiles), padded along the experts to whole clusters.
dim3 lora_grid(const RouterGemmArgs& a) {
  dim3 grid = grid_for<1, kOneLaunchTokens>(a);
  grid.x = sm90::ceil_div(static_cast<int>(grid.x), kCluster) * kCluster;
  return grid;
}

template <int kValue>
using Int = std::integral_constant<int, kValue>;

// Calls f(Int<items>, Out{}) for the instantiated shrink items per CTA and output dtype: the one
// place that maps run-time shapes to kernels (the fit check and the launch both go through it).
template <typename R, typename F>
R with_lora_kernel(int items, DType out_dtype, R otherwise, F f) {
  auto by_out = [&](auto items_per_cta) -> R {
    if (out_dtype == DType::kFloat32) return f(items_per_cta, float{});
    return f(items_per_cta, __nv_bfloat16{});
  };
  switch (items) {
    case 1: return by_out(Int<1>{});
    case 2: return by_out(Int<2>{});
    case 4: return by_out(Int<4>{});
  }
  return otherwise;
}

template <int kItems, typename Out>
cudaError_t launch_lora_kernel(const RouterGemmArgs& a, const FusedPart& fused) {
  const dim3 grid = lora_grid(a);
  cudaLaunchAttribute attributes[2];
  const cudaLaunchConfig_t config = sm90::cluster_launch_config(
      grid, dim3(kShortRowThreads, 1, 1), a.stream, kCluster, a.pdl, attributes);
  return cudaLaunchKernelEx(&config, lora_kernel<kItems, Out>,
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
  if (experts_per_cta != 1 || tokens_per_cta != kOneLaunchTokens)
    return "token groups of more than one token: two launches were measured faster";
  const int items = items_per_cta(lora.rank);
  if (items > 1 && a.pdl) return "ranks above 16 under PDL: two launches were measured faster";
  const bool fit = with_lora_kernel(items, a.out_dtype, false, [&](auto items_per_cta, auto out) {
    const dim3 grid = lora_grid(a);
    const int clusters = static_cast<int>(grid.x / kCluster * grid.y);
    return clusters <= resident_clusters<decltype(items_per_cta)::value, decltype(out)>();
  });
  if (!fit) return "the grid's clusters of 16 CTAs do not all fit on this GPU at once";
  return nullptr;
}

cudaError_t launch_router_gemm_small_m_lora(const RouterGemmArgs& a, const LoraAdapters& lora) {
  FusedPart fused;
  fused.lora = lora;
  return with_lora_kernel(items_per_cta(lora.rank), a.out_dtype,
                          cudaErrorInvalidValue, [&](auto items, auto out) {
                            return launch_lora_kernel<decltype(items)::value, decltype(out)>(a, fused);
                          });
}

}  // namespace moegate
