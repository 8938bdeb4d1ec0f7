// The dispatch policy of router_gemm (dispatch.h): which kernel, or cuBLAS, serves a call.
#include "kernels/dispatch.h"

namespace moegate {

Route route_for(const RouterGemmArgs& a, bool hopper) {
  const bool half_input = a.in_dtype != DType::kFloat32;
  const bool cublas_out = a.out_dtype == a.in_dtype || (half_input && a.out_dtype == DType::kFloat32);
  if (half_input && cublas_out &&
      (a.M > kSm90MaxM || int64_t{a.M} * a.E * a.K > kCublasCrossoverMacs)) {
    return Route::kCublas;
  }
  if (hopper) {
    // The kernels' checks include shape, dtype and 16-byte alignment of x and weight.
    const bool small_m_ok = router_gemm_small_m_unsupported(a) == nullptr;
    if (small_m_ok && router_gemm_small_m_preferred(a)) return Route::kSmallM;
    if (router_gemm_sm90_unsupported(a) == nullptr) return Route::kSm90;
    if (small_m_ok) return Route::kSmallM;
  }
  return Route::kSimple;
}

}  // namespace moegate
