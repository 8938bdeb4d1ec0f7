// The decode-size router GEMM with the routing of its logits in the same launch (route.h): the
// plain call's tiles, so the logits keep its bits.
#include "kernels/route.h"
#include "kernels/router_gemm.h"
#include "kernels/router_gemm_small_m.cuh"

namespace moegate {

// Routing rides in the tiles of the plain call, so the logits keep its bits; one counter per row
// of the grid (a token group).
int router_gemm_small_m_route_counters(const RouterGemmArgs& a) {
  int experts_per_cta = 0, tokens_per_cta = 0;
  resolve_tiles(a, experts_per_cta, tokens_per_cta);
  return sm90::ceil_div(a.M, tokens_per_cta);
}

cudaError_t launch_router_gemm_small_m_route(const RouterGemmArgs& a, const RouteArgs& route) {
  FusedPart fused;
  fused.route = route;
  return launch_resolved<Fusion::kRoute>(a, 0, 0, fused);
}

}  // namespace moegate
