// Routing of logits already in memory (route.h): where no fused launch serves the router (cuBLAS
// above the crossover, the foundation kernel) and after the LoRA expand. One warp per token.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/route.h"
#include "kernels/routing.cuh"

namespace moegate {
namespace {

constexpr int kThreads = 128;
constexpr int kTokensPerCta = kThreads / 32;

template <typename Logit>
__global__ void __launch_bounds__(kThreads)
    route_logits_kernel(const Logit* __restrict__ logits, int M, int E, RouteArgs route, bool pdl) {
  sm90::trigger_dependents();  // at entry (grid_dependency.cuh)
  sm90::grid_dependency_wait(pdl);
  const long long first = static_cast<long long>(blockIdx.x) * kTokensPerCta;
  const int count = M - first < kTokensPerCta ? static_cast<int>(M - first) : kTokensPerCta;
  routing::route_rows(logits + first * E, E, first, static_cast<int>(threadIdx.x) / 32, count,
                      kTokensPerCta, route);
}

template <typename Logit>
cudaError_t launch_typed(const void* logits, int M, int E, const RouteArgs& route, bool pdl,
                         cudaStream_t stream) {
  const dim3 grid((M + kTokensPerCta - 1) / kTokensPerCta);
  return sm90::launch_maybe_dependent(route_logits_kernel<Logit>, grid, dim3(kThreads), stream, pdl,
                                      static_cast<const Logit*>(logits), M, E, route, pdl);
}

}  // namespace

const char* route_unsupported(const RouteArgs& route, int E) {
  static_assert(kRouteMaxK == 8 && kRouteMaxE == 512, "keep the messages below in step");
  if (route.top_k < 1 || route.top_k > kRouteMaxK) return "top_k must be in [1, 8]";
  if (route.top_k > E) return "top_k must be at most the number of experts";
  if (E > kRouteMaxE) return "the routing kernels take at most 512 experts";
  if (route.renormalize && route.scoring != Scoring::kSoftmax)
    return "renormalize applies to softmax scoring only";
  return nullptr;
}

cudaError_t launch_route_logits(const void* logits, DType logits_dtype, int M, int E,
                                const RouteArgs& route, bool pdl, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  switch (logits_dtype) {
    case DType::kFloat32: return launch_typed<float>(logits, M, E, route, pdl, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(logits, M, E, route, pdl, stream);
    case DType::kFloat16: return launch_typed<__half>(logits, M, E, route, pdl, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moegate
