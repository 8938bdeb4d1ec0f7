// Routing: the top-k experts of each token and their weights, from router logits. Torch-free:
// CUDA runtime types only.
//
// Semantics, for each token m, with l = its E logits as stored in the logits' dtype, widened to fp32:
//   ids[m, :k]     the k largest l, in descending order; ties go to the lower expert index; NaN
//                  ranks above +inf (as torch.sort does); -0.0 equals +0.0. Always k distinct ids
//                  in [0, E).
//   kSoftmaxTopk   weights[m, j] = exp(l[id_j] - l[id_0]) / sum_i<k exp(l[id_i] - l[id_0])
//                  (gpt-oss: softmax over the k selected logits only)
//   kSoftmax       p = exp(l - max l) / sum_e exp(l[e] - max l) over all E;
//                  weights[m, j] = p[id_j], divided by sum_i<k p[id_i] when `renormalize`
//                  (Mixtral, Qwen-MoE). Selecting on p equals selecting on l: exp is monotonic.
// All arithmetic in fp32 with expf, sums in a fixed order (bitwise deterministic), one rounding
// to the weights' dtype.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/router_gemm.h"

namespace moegate {

enum class Scoring : int { kSoftmaxTopk = 0, kSoftmax = 1 };

constexpr int kRouteMaxK = 8;    // experts per token
constexpr int kRouteMaxE = 512;  // logits per token that one warp holds in registers (16 a lane)

// The routing half of a fused launch, and of launch_route_logits.
struct RouteArgs {
  void* weights = nullptr;  // [M, top_k], dtype weights_dtype
  void* ids = nullptr;      // [M, top_k], int64 when ids_int64, else int32
  int top_k = 0;
  Scoring scoring = Scoring::kSoftmaxTopk;
  bool renormalize = false;  // kSoftmax only
  DType weights_dtype = DType::kFloat32;
  bool ids_int64 = true;
  // Fused launches only: one counter per token tile of the grid (route_counters_needed), zero
  // before the launch and left zero by it. The last CTA to finish a token tile routes its tokens.
  // Launches that may run at the same time need counters of their own.
  unsigned* counters = nullptr;
  int num_counters = 0;
};

// Why RouteArgs cannot route logits of E experts, or null.
const char* route_unsupported(const RouteArgs& route, int E);

// Routing of given logits [M, E] (dtype logits_dtype, contiguous) in one launch, one warp per
// token. pdl: launched as a programmatic dependent of the kernel before it (logits are read after
// griddepcontrol.wait).
cudaError_t launch_route_logits(const void* logits, DType logits_dtype, int M, int E,
                                const RouteArgs& route, bool pdl, cudaStream_t stream);

// The decode-size router GEMM (router_gemm_small_m.cu) and the routing of its logits in one launch:
// RouterGemmArgs::out receives the logits, with the bits launch_router_gemm_small_m(args, 0, 0)
// gives. Its tiles hold at most 8 tokens on at least 8 warps, so the last CTA of a row of the grid
// routes each token in a warp of its own. (The tensor-core kernel's tiles hold up to 32 tokens on
// 4 warps: routed in its last CTA they cost more than a second launch; benchmarks/results/README.md,
// "Every kernel triggers at entry, and routing fused where a warp gets one token".) Callers check router_gemm_small_m_unsupported and
// route_unsupported first, and pass at least router_gemm_small_m_route_counters counters.
int router_gemm_small_m_route_counters(const RouterGemmArgs& args);
cudaError_t launch_router_gemm_small_m_route(const RouterGemmArgs& args, const RouteArgs& route);

}  // namespace moegate
