// The library's LoRA expand as GateLinearWithLoRA launches it, for the probes that time the
// library's two launches (the fused shrink, then this) beside their own one-launch designs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "graph_timing.cuh"
#include "kernels/lora_expand.h"

// out[m, e] = logits[m, e] + scaling[s] * xa[m, s * R:] . lora_b[s, e, :] for each token's slot s
// (lora_expand.h; bf16 logits and B), as a programmatic dependent of the kernel before it, which
// is how the layer launches it (gate.ops.EXPAND_PDL).
inline void launch_library_expand(const void* logits, const float* xa, const void* lora_b,
                                  const float* scaling, const int64_t* slot_ids, void* out, int M,
                                  int E, int S, int R, cudaStream_t stream) {
  moegate::LoraExpandArgs expand;
  expand.logits = logits;
  expand.xa = xa;
  expand.lora_b = lora_b;
  expand.scaling = scaling;
  expand.slot_ids = slot_ids;
  expand.out = out;
  expand.M = M;
  expand.E = E;
  expand.S = S;
  expand.R = R;
  expand.pdl = true;
  expand.stream = stream;
  CHECK(moegate::launch_lora_expand(expand));
}
