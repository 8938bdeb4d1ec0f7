// Programmatic dependent launch (PDL) and the CTA barrier before its trigger, shared by every
// kernel of the library (sm_90+). router_gemm_sm90.cuh explains the rules the kernels keep: weights
// may be read before grid_dependency_wait, activations only after it, nothing written before it,
// and trigger_dependents only after the CTA's last output store (cta_barrier first).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moegate {
namespace sm90 {

// griddepcontrol.wait when the launch asked for PDL (`pdl`). The router kernels place it in the
// source after their first weight loads. It needs no data dependency on them: the weights are
// coherent loads (load_weight_16B), which ptxas keeps on their side of the wait, so every
// first-chunk weight load is in flight before it in every instantiation (tests/test_kernel_sass.py
// checks the SASS). A data dependency (as the decode kernel once had) would make each warp wait
// for its weights to ARRIVE before it may issue its activation loads: two memory trips in a row
// (H200, cold, back-to-back PDL calls, decode kernel, K = 2880, E = 32, M = 1: 1.68 us pinned /
// 1.50 not; benchmarks/results/README.md). The skip branch sits inside the asm: 0.02-0.03 us
// faster at M = 1 than a C++ `if (pdl)` around a bare wait, in the same harness runs.
__device__ __forceinline__ void grid_dependency_wait(bool pdl) {
  asm volatile(
      "{\n .reg .pred p;\n setp.eq.u32 p, %0, 0;\n @p bra.uni SKIP_GRID_WAIT_%=;\n"
      " griddepcontrol.wait;\n SKIP_GRID_WAIT_%=:\n}\n" ::"r"(static_cast<uint32_t>(pdl))
      : "memory");
}

__device__ __forceinline__ void trigger_dependents() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// __syncthreads() is the .aligned barrier, which requires each warp to arrive converged; this one
// does not, so it is safe after the divergent store epilogue (compute-sanitizer's synccheck flagged
// the aligned form there).
__device__ __forceinline__ void cta_barrier() { asm volatile("barrier.sync 0;" ::: "memory"); }

// The launch attribute that lets a launch start before the kernel ahead of it in the stream
// completes (it then waits in grid_dependency_wait).
inline cudaLaunchAttribute programmatic_dependent_launch() {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return attribute;
}

// Launches `kernel` on `stream`, as a programmatic dependent of the kernel before it when `pdl`.
template <typename... Params, typename... Args>
cudaError_t launch_maybe_dependent(void (*kernel)(Params...), dim3 grid, dim3 block,
                                   cudaStream_t stream, bool pdl, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  cudaLaunchAttribute attribute = programmatic_dependent_launch();
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace sm90
}  // namespace moegate
