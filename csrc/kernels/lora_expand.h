// Launcher of the LoRA expand kernel: the second half of a multi-adapter router LoRA delta.
// Torch-free: CUDA runtime types only.
//
// Semantics, for every token m with slot s = slot_ids[m]:
//   0 <= s < S:  out[m, e] = round(logits[m, e] + scaling[s] * sum_r xa[m, s*R + r] * lora_b[s, e, r])
//   otherwise:   out[m, e] = logits[m, e], bit for bit (the token has no adapter)
// with the sum and the add in fp32 and one rounding to the logits' dtype. `xa` is the shrink
// x @ A^T for every slot at once ([M, S*R], fp32), computed by the router GEMM.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "kernels/route.h"
#include "kernels/router_gemm.h"

namespace moegate {

struct LoraExpandArgs {
  const void* logits = nullptr;      // [M, E], dtype logits_dtype
  const float* xa = nullptr;         // [M, S * R]
  const void* lora_b = nullptr;      // [S, E, R], dtype b_dtype
  const float* scaling = nullptr;    // [S]
  const int64_t* slot_ids = nullptr; // [M]; any value outside [0, S) means "no adapter"
  void* out = nullptr;               // [M, E], dtype logits_dtype; may not alias logits
  int M = 0, E = 0, S = 0, R = 0;
  DType logits_dtype = DType::kBFloat16;
  DType b_dtype = DType::kBFloat16;
  // Launch as a programmatic dependent of the kernel before (PDL): lora_b may then be read before
  // that kernel completes, so it must not write lora_b; everything else is read after it completes.
  bool pdl = false;
  cudaStream_t stream = nullptr;
};

cudaError_t launch_lora_expand(const LoraExpandArgs& args);

// The expand and the routing of its outputs (route.h) in one launch: `out` gets the bits of
// launch_lora_expand, and `route` the routing of out. Needs route_unsupported(route, E) == null.
cudaError_t launch_lora_expand_route(const LoraExpandArgs& args, const RouteArgs& route);

}  // namespace moegate
