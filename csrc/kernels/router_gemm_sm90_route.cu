// The Hopper router GEMM with the routing of its logits in the same launch (route.h): the plain
// call's tiles, so the logits keep its bits.
#include "kernels/route.h"
#include "kernels/router_gemm.h"
#include "kernels/router_gemm_sm90_launch.cuh"

namespace moegate {

// Routing rides in the tiles of the plain call, so the logits keep its bits; one counter per
// token tile (grid z).
int router_gemm_sm90_route_counters(const RouterGemmArgs& a) {
  const RouterGemmSm90Config c = router_gemm_sm90_resolve(a, RouterGemmSm90Config{});
  return static_cast<int>(grid_for(a, c).z);
}

cudaError_t launch_router_gemm_sm90_route(const RouterGemmArgs& a, const RouteArgs& route) {
  FusedPart fused;
  fused.route = route;
  return launch_resolved<Fusion::kRoute>(a, RouterGemmSm90Config{}, fused);
}

}  // namespace moegate
