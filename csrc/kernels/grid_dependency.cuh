// Programmatic dependent launch (PDL) and a CTA barrier for divergent code, shared by every kernel
// of the library (sm_90+).
//
// The contract. griddepcontrol.wait waits until the prerequisite grids have completed and their
// memory operations are performed and visible, wherever those grids triggered; launch_dependents
// only lets dependents be scheduled earlier (PTX ISA). So a kernel of ours may trigger as early as
// it likes, provided that:
//  1. every thread that reads anything a previous kernel may have written waits first (the wait
//     is per thread: a loading or TMA-issuing warp needs its own);
//  2. nothing is written before the wait that a previous kernel may still read (our outputs may
//     reuse memory it is reading; the routing counters are touched only after the wait);
//  3. every kernel launched as our programmatic dependent waits before reading our outputs (the
//     PTX rule for any dependent; our LoRA and routing kernels do).
// Weights, parameters no kernel writes while routers run, may be read before the wait. Every
// kernel of ours triggers at entry (trigger_dependents first): the next kernel's CTAs may then
// start, and fetch their own weights, while this one runs, which back to back is worth about half
// a microsecond a call (benchmarks/results/README.md, "What the trigger rule costs under PDL").
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
// (benchmarks/results/README.md, "a dependency wait that does not wait for the weights"). The
// skip branch sits inside the asm, which measured faster than a C++ `if (pdl)` around a bare wait.
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

// The configuration of a launch in clusters of `cluster` CTAs along x, as a programmatic dependent
// of the kernel before it when `pdl`. It points at `attributes`, which must outlive the launch.
inline cudaLaunchConfig_t cluster_launch_config(dim3 grid, dim3 block, cudaStream_t stream,
                                                unsigned cluster, bool pdl,
                                                cudaLaunchAttribute (&attributes)[2]) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  attributes[0].id = cudaLaunchAttributeClusterDimension;
  attributes[0].val.clusterDim.x = cluster;
  attributes[0].val.clusterDim.y = 1;
  attributes[0].val.clusterDim.z = 1;
  attributes[1] = programmatic_dependent_launch();
  config.attrs = attributes;
  config.numAttrs = pdl ? 2 : 1;
  return config;
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
