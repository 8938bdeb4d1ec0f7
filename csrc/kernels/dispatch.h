// The dispatch policy of the router op torch.ops.moegate.router_gemm: which kernel, or cuBLAS,
// serves a call. One place, next to the kernels it chooses between; the bindings ask it per call
// (router_gemm, and the fused ops that follow its choice). Torch-free: CUDA runtime types only.
#pragma once

#include <cstdint>

#include "kernels/router_gemm.h"

namespace moegate {

// What the dispatching op runs; the values are router_gemm_route's (gate/tuning.py names them).
enum class Route : int64_t { kCublas = 0, kSmallM = 1, kSm90 = 2, kSimple = 3 };

// cuBLAS beats the Hopper kernels once a call holds more than about 160M multiply-adds (cold tile
// sweeps, benchmarks/results/README.md, the `_tune` files). router_gemm hands such calls to cuBLAS
// inside the op, so the choice is made per call even under torch.compile and CUDA graphs.
constexpr int64_t kCublasCrossoverMacs = 160'000'000;

// On Hopper (`hopper`: the call's device is sm_90), the decode kernel for small M
// (router_gemm_small_m_preferred, or whenever it alone takes the call) and the tensor-core kernel
// up to the cuBLAS crossover; cuBLAS for large bf16/fp16 calls; the foundation kernel for
// everything else. The same with or without PDL.
Route route_for(const RouterGemmArgs& args, bool hopper);

}  // namespace moegate
