// Launchers of the decode-size router GEMM (router_gemm_small_m.cuh), plain and fused with a LoRA
// shrink; the routing form is in router_gemm_small_m_route.cu.
#include "kernels/router_gemm.h"
#include "kernels/router_gemm_small_m.cuh"

namespace moegate {

const char* router_gemm_small_m_unsupported(const RouterGemmArgs& a) {
  if (a.in_dtype != DType::kBFloat16) return "x and weight must be bfloat16";
  if (a.out_dtype != DType::kBFloat16 && a.out_dtype != DType::kFloat32)
    return "out dtype must be bfloat16 or float32";
  static_assert(kSmallMaxM == 64, "keep the message below in step");
  if (a.M < 1 || a.M > kSmallMaxM) return "M must be in [1, 64]";
  if (a.E < 1) return "E must be positive";
  if (a.K < 8 || a.K % 8 != 0) return "K must be a positive multiple of 8";
  if (!aligned_16B(a.x) || !aligned_16B(a.weight)) return "x and weight must be 16-byte aligned";
  return nullptr;
}

bool router_gemm_small_m_preferred(const RouterGemmArgs& a) {
  if (a.M > kSmallMaxM) return false;
  const long long logits = static_cast<long long>(a.M) * a.E;
  if (a.M <= 4) return true;
  return logits <= 1024 && (a.K <= 5120 || a.E < 128);
}

cudaError_t launch_router_gemm_small_m(const RouterGemmArgs& a, int experts_per_cta,
                                       int tokens_per_cta) {
  return launch_resolved<Fusion::kNone>(a, experts_per_cta, tokens_per_cta, FusedPart{});
}

const char* router_gemm_small_m_with_shrink_unsupported(const RouterGemmArgs& a,
                                                        const void* lora_a, int rows) {
  if (const char* why = router_gemm_small_m_unsupported(a)) return why;
  if (a.K > kShortRowMaxK) return "K must be at most 4096 (rows of one pass)";
  return ShrinkPart::unsupported(lora_a, rows);
}

cudaError_t launch_router_gemm_small_m_with_shrink(const RouterGemmArgs& a, const void* lora_a,
                                                   int rows, float* xa) {
  FusedPart fused;
  fused.shrink = ShrinkPart::of(lora_a, rows, xa);
  return launch_resolved<Fusion::kShrink>(a, 0, 0, fused);
}

}  // namespace moegate
