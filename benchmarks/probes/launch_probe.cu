// Where the router kernel's time goes: the cost of each stage on its own, timed exactly as the
// benchmark times the router (200 launches in one CUDA graph, median of 20 replays, µs per launch).
// Standalone (CUDA runtime only):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -o /tmp/probe launch_probe.cu && /tmp/probe
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "graph_timing.cuh"


namespace cg = cooperative_groups;

constexpr int kLaunches = 200;
constexpr size_t kColdBytes = 96u << 20;

// Stage flags: what one probe kernel does.
enum : int {
  kLoad = 1,          // each thread: 3 x 16-byte loads from its slice of `src`
  kClusterSync = 2,   // one cluster barrier
  kClusterSync2 = 4,  // a second cluster barrier
  kStore = 8,         // each thread stores one float
  kWaitDep = 16,      // griddepcontrol.wait
  kTriggerFirst = 32, // launch_dependents at entry
  kTriggerLast = 64,  // launch_dependents at exit
  kLoadAfterWait = 128,  // the loads come after griddepcontrol.wait instead of before
};

template <int kFlags>
__global__ void probe_kernel(const uint4* __restrict__ src, float* __restrict__ dst, int stride) {
  if (kFlags & kTriggerFirst) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  uint32_t acc = 0;
  const size_t base = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 3;
  auto load = [&] {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      uint4 v = __ldg(src + base + static_cast<size_t>(i) * stride);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  };
  if ((kFlags & kLoad) && !(kFlags & kLoadAfterWait)) load();
  if (kFlags & kWaitDep) asm volatile("griddepcontrol.wait;" ::: "memory");
  if ((kFlags & kLoad) && (kFlags & kLoadAfterWait)) load();
  if (kFlags & kClusterSync) cg::this_cluster().sync();
  if (kFlags & kStore) dst[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<float>(acc);
  if (kFlags & kClusterSync2) cg::this_cluster().sync();
  if (kFlags & kTriggerLast) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

struct Probe {
  const char* name;
  void (*kernel)(const uint4*, float*, int);
  int ctas, threads, cluster;
  bool pdl, cold;
};

float time_probe(const Probe& p, char* cold_pool, float* dst) {
  const size_t bytes_per_launch = static_cast<size_t>(p.ctas) * p.threads * 3 * 16;
  const int copies = p.cold ? static_cast<int>(std::max<size_t>(1, kColdBytes / bytes_per_launch)) : 1;
  const int launches = std::max(kLaunches, p.cold ? std::min(copies, 4000) : 0);
  return time_graph(
      [&](int i, cudaStream_t stream) {
        const char* src = cold_pool + (i % copies) * bytes_per_launch;
        launch_1d(p.kernel, p.ctas, p.threads, 0, stream, p.cluster, p.pdl,
                  reinterpret_cast<const uint4*>(src), dst, 1);
      },
      launches);
}

int main() {
  char* pool;
  float* dst;
  CHECK(cudaMalloc(&pool, kColdBytes + (64u << 20)));
  CHECK(cudaMemset(pool, 1, kColdBytes + (64u << 20)));
  CHECK(cudaMalloc(&dst, 1 << 24));
  constexpr int L = kLoad, C = kClusterSync, C2 = kClusterSync2, S = kStore, W = kWaitDep;
  constexpr int TF = kTriggerFirst, TL = kTriggerLast, LW = kLoadAfterWait;
  const Probe probes[] = {
      {"empty 1x32", probe_kernel<0>, 1, 32, 1, false, false},
      {"empty 64x128", probe_kernel<0>, 64, 128, 1, false, false},
      {"empty 64x128 cluster8", probe_kernel<0>, 64, 128, 8, false, false},
      {"empty 64x128 cluster16", probe_kernel<0>, 64, 128, 16, false, false},
      {"sync 64x128 cluster8", probe_kernel<C>, 64, 128, 8, false, false},
      {"sync2 64x128 cluster8", probe_kernel<C | C2>, 64, 128, 8, false, false},
      {"store 64x128", probe_kernel<S>, 64, 128, 1, false, false},
      {"load+store 64x128 hot", probe_kernel<L | S>, 64, 128, 1, false, false},
      {"load+store 64x128 cold", probe_kernel<L | S>, 64, 128, 1, false, true},
      {"load+sync+store c8 hot", probe_kernel<L | C | S>, 64, 128, 8, false, false},
      {"load+sync+store c8 cold", probe_kernel<L | C | S>, 64, 128, 8, false, true},
      {"load+sync+store+sync c8 cold", probe_kernel<L | C | S | C2>, 64, 128, 8, false, true},
      {"pdl empty trigger-first", probe_kernel<W | TF>, 64, 128, 1, true, false},
      {"pdl empty trigger-last", probe_kernel<W | TL>, 64, 128, 1, true, false},
      {"pdl empty no-trigger", probe_kernel<W>, 64, 128, 1, true, false},
      {"pdl c8 load/wait/sync/store trigger-last cold",
       probe_kernel<L | W | C | S | TL>, 64, 128, 8, true, true},
      {"pdl c8 load/wait/sync/store trigger-first cold",
       probe_kernel<L | W | C | S | TF>, 64, 128, 8, true, true},
      {"nopdl c8 load/wait/sync/store cold", probe_kernel<L | W | C | S | TL>, 64, 128, 8, false, true},
      {"pdl c8 wait/load/sync/store trigger-last cold",
       probe_kernel<L | LW | W | C | S | TL>, 64, 128, 8, true, true},
  };
  cudaFuncSetAttribute(probe_kernel<0>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  std::printf("%-50s %8s\n", "probe", "us/launch");
  for (const Probe& p : probes) std::printf("%-50s %8.3f\n", p.name, time_probe(p, pool, dst));
  return 0;
}
