// How fast can any router kernel be, under the benchmark's protocol and issue 3's trigger rule?
//
// The "floor" kernel does only what every router kernel must: it reads the router's bytes once
// (each call's weight cold from HBM, coherent loads issued before griddepcontrol.wait as the
// shipped kernels do; x after the wait), split evenly over G CTAs with no byte read twice, folds
// them into one value per CTA (warp shuffles, one CTA barrier), stores all M x E bf16 outputs and
// triggers its dependents after the stores. No multiply, no bias, and no exchange of partial sums
// between CTAs, which a real kernel that reads each byte once would also need (it would have to
// split K): a real kernel is slower than this. "+exchange" adds that exchange as the tensor-core
// kernel does it (clusters of 8, partial sums through distributed shared memory), still without
// arithmetic. The best G of a few is kept; with --grids every G is printed (PDL off), with the
// exchange over clusters of 4, 8 and 16.
//
// Timed as benchmarks/router_gemm.py times the router (back-to-back launches in one CUDA graph,
// median of 20 replays; weights rotating over >= 96 MB; measured after the within-process step),
// next to the shipped kernels (the op's dispatch: decode kernel or tensor-core kernel, with bias)
// and next to the floor kernel with its trigger moved to the first instruction (which issue 3's
// rule forbids: it shows what the overlap the rule gives up is worth). Standalone, from the repo root:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /tmp/bytes_floor \
//     benchmarks/probes/bytes_floor.cu csrc/kernels/router_gemm_small_m.cu \
//     csrc/kernels/router_gemm_sm90.cu && /tmp/bytes_floor [--grids]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>

#include "graph_timing.cuh"
#include "kernels/router_gemm.h"
#include "kernels/cluster_exchange.cuh"  // the shipped kernels' split-K handoff,
#include "kernels/grid_dependency.cuh"   // PDL helpers
#include "kernels/memory_access.cuh"    // and loads

namespace {

using moegate::sm90::ceil_div;

constexpr int K = 2880;  // gpt-oss
constexpr int kThreads = 256;
constexpr int kMaxChunksPerThread = 12;  // 16-byte chunks of each operand per thread (48 KB a CTA)
constexpr int kMinLaunches = 200;
constexpr size_t kColdBytes = 96u << 20;

// Loads chunks [begin, end) of `src` (16 bytes each), thread t taking begin + t + j * kThreads,
// and xors them into one word. All loads are issued before the first xor.
template <bool kWeight>
__device__ __forceinline__ uint32_t fold_chunks(const __nv_bfloat16* src, int begin, int end) {
  uint4 v[kMaxChunksPerThread];
#pragma unroll
  for (int j = 0; j < kMaxChunksPerThread; ++j) {
    const int chunk = begin + j * kThreads + static_cast<int>(threadIdx.x);
    const bool valid = chunk < end;
    const __nv_bfloat16* p = src + 8LL * (valid ? chunk : 0);
    v[j] = kWeight ? moegate::sm90::load_weight_16B(p, valid)
                   : moegate::sm90::load_activation_16B(p, valid);
  }
  uint32_t acc = 0;
#pragma unroll
  for (int j = 0; j < kMaxChunksPerThread; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  return acc;
}

// CTA c reads chunks [c * w_per_cta, (c + 1) * w_per_cta) of the weight (and likewise of x): the
// host divides, so that no division sits on the kernel's critical path (64-bit divisions there
// cost this probe 0.7 us per call). kCluster == 1: the CTA stores outputs [c * out_per_cta, ...)
// from its own value. kCluster > 1: the split-K exchange of a cluster kernel (router_gemm_sm90.cuh)
// without its arithmetic: the cluster owns `out_per_cta * kCluster` outputs, each CTA pushes one
// partial for every one of them (16-byte st.async messages counted on the owner's mbarrier), each
// owner waits for its inbox, adds its kCluster partials per output and stores.
template <int kCluster>
__global__ void __launch_bounds__(kThreads, 1)
    floor_kernel(const __nv_bfloat16* __restrict__ weight, const __nv_bfloat16* __restrict__ x,
                 __nv_bfloat16* __restrict__ out, int w_chunks, int w_per_cta, int x_chunks,
                 int x_per_cta, int outputs, int out_per_cta, bool pdl, bool trigger_first) {
  namespace sm90 = moegate::sm90;
  extern __shared__ __align__(16) float inbox[];  // [kCluster][out_per_cta], kCluster > 1
  __shared__ __align__(8) uint64_t inbox_full;
  if (trigger_first) sm90::trigger_dependents();
  if constexpr (kCluster > 1) {
    if (threadIdx.x == 0) sm90::mbarrier_init_for_cluster(sm90::shared_address(&inbox_full));
    sm90::cluster_arrive_relaxed();
  }
  const int c = static_cast<int>(blockIdx.x);
  uint32_t acc = fold_chunks<true>(weight, c * w_per_cta, min(w_chunks, (c + 1) * w_per_cta));
  sm90::grid_dependency_wait(pdl);
  acc ^= fold_chunks<false>(x, c * x_per_cta, min(x_chunks, (c + 1) * x_per_cta));
  float value;
  if constexpr (kCluster == 1) {
    for (int offset = 16; offset > 0; offset /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
    __shared__ uint32_t warp_acc[kThreads / 32];
    if (threadIdx.x % 32 == 0) warp_acc[threadIdx.x / 32] = acc;
    __syncthreads();
    uint32_t cta_acc = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) cta_acc ^= warp_acc[w];
    value = static_cast<float>(cta_acc & 0xff);
  } else {
    // Partials for the cluster's kCluster * out_per_cta outputs: thread t sends outputs
    // [4t, 4t + 4) (out_per_cta is a multiple of 4), owned by rank 4t / out_per_cta.
    const uint32_t rank = static_cast<uint32_t>(c % kCluster);
    const uint32_t bar = sm90::shared_address(&inbox_full);
    sm90::cluster_wait_acquire();
    for (int idx = 4 * static_cast<int>(threadIdx.x); idx < kCluster * out_per_cta;
         idx += 4 * kThreads) {
      const float v[4] = {static_cast<float>(acc & 0xff), static_cast<float>(acc >> 8 & 0xff),
                          static_cast<float>(acc >> 16 & 0xff), static_cast<float>(acc >> 24)};
      const uint32_t owner = static_cast<uint32_t>(idx / out_per_cta);
      sm90::push_to_rank(
          sm90::map_to_rank(sm90::shared_address(&inbox[rank * out_per_cta + idx % out_per_cta]),
                            owner),
          v, sm90::map_to_rank(bar, owner));
    }
    if (threadIdx.x == 0) sm90::mbarrier_expect_bytes(bar, kCluster * out_per_cta * 4);
    sm90::mbarrier_wait_phase0(bar);
    value = 0.f;  // each output's sum is formed in the store loop below
  }
  const int out_begin = c * out_per_cta, out_end = min(outputs, (c + 1) * out_per_cta);
  for (int i = out_begin + static_cast<int>(threadIdx.x); i < out_end; i += kThreads) {
    float sum = value;
    if constexpr (kCluster > 1) {
#pragma unroll
      for (int r = 0; r < kCluster; ++r) sum += inbox[r * out_per_cta + i - out_begin];
    }
    out[i] = __float2bfloat16(sum);
  }
  sm90::cta_barrier();
  if (!trigger_first) sm90::trigger_dependents();
}

struct Problem {
  int E, M, copies, launches;
  const __nv_bfloat16 *weights, *bias, *x;
  __nv_bfloat16* out;
  const __nv_bfloat16* weight(int i) const { return weights + 1LL * (i % copies) * E * K; }
};

// kCluster > 1 needs out_per_cta (the outputs each CTA owns) a multiple of 4; the grid is rounded
// up to whole clusters.
template <int kCluster>
float time_floor(const Problem& p, int ctas, bool pdl, bool trigger_first) {
  ctas = ceil_div(ctas, kCluster) * kCluster;
  const int w_chunks = p.E * K / 8, x_chunks = p.M * K / 8;
  if (ceil_div(std::max(w_chunks, x_chunks), ctas) > kMaxChunksPerThread * kThreads) return -1.f;
  int out_per_cta = ceil_div(p.M * p.E, ctas);
  if (kCluster > 1) out_per_cta = ceil_div(out_per_cta, 4) * 4;
  const int smem = kCluster > 1 ? kCluster * out_per_cta * 4 : 0;
  if (smem > 48 * 1024) return -1.f;
  return time_graph(
      [&](int i, cudaStream_t stream) {
        launch_1d(floor_kernel<kCluster>, ctas, kThreads, smem, stream, kCluster, pdl,
                  p.weight(i), p.x, p.out, w_chunks, ceil_div(w_chunks, ctas), x_chunks,
                  ceil_div(x_chunks, ctas), p.M * p.E, out_per_cta, pdl, trigger_first);
      },
      p.launches);
}

float time_shipped(const Problem& p, bool pdl) {
  return time_graph(
      [&](int i, cudaStream_t stream) {
        moegate::RouterGemmArgs a;
        a.x = p.x;
        a.weight = p.weight(i);
        a.bias = p.bias + 1LL * (i % p.copies) * p.E;
        a.out = p.out;
        a.M = p.M;
        a.E = p.E;
        a.K = K;
        a.pdl = pdl;
        a.stream = stream;
        CHECK(moegate::router_gemm_small_m_preferred(a)
                  ? moegate::launch_router_gemm_small_m(a, 0, 0)
                  : moegate::launch_router_gemm_sm90(a, moegate::RouterGemmSm90Config{}));
      },
      p.launches);
}

constexpr int kGrids[] = {16, 32, 64, 128, 132, 256};

// The best floor over the grid sizes, and the grid that gave it.
template <int kCluster>
float best_floor(const Problem& p, bool pdl, bool trigger_first, int* best_ctas) {
  float best = 1e9f;
  for (int ctas : kGrids) {
    const float us = time_floor<kCluster>(p, ctas, pdl, trigger_first);
    if (us > 0.f && us < best) best = us, *best_ctas = ctas;
  }
  return best;
}

__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * 0.1f);
  }
}

__global__ void empty_kernel(float* p) {
  if (threadIdx.x == 0) p[0] += 1.f;
}

}  // namespace

int main(int argc, char** argv) {
  const bool every_grid = argc > 1 && std::string(argv[1]) == "--grids";
  constexpr int kMaxE = 128, kMaxM = 128;
  const int copies = static_cast<int>(kColdBytes / (2LL * 32 * K)) + 1;  // enough for E = 32
  __nv_bfloat16 *weights, *bias, *x, *out;
  float* scratch;
  CHECK(cudaMalloc(&weights, 2LL * copies * kMaxE * K));
  CHECK(cudaMalloc(&bias, 2LL * copies * kMaxE));
  CHECK(cudaMalloc(&x, 2LL * kMaxM * K));
  CHECK(cudaMalloc(&out, 4LL * kMaxM * kMaxE));
  CHECK(cudaMalloc(&scratch, 4));
  fill<<<1024, 256>>>(weights, 1ULL * copies * kMaxE * K, 1);
  fill<<<64, 256>>>(bias, 1ULL * copies * kMaxE, 2);
  fill<<<256, 256>>>(x, 1ULL * kMaxM * K, 3);
  CHECK(cudaDeviceSynchronize());
  // Graph timings step up once within a process after a few measurements (benchmarks/results/
  // README.md); like the benchmark, take every row after the step.
  float empty_us = 0.f;
  for (int i = 0; i < 4; ++i)
    empty_us = time_graph([&](int, cudaStream_t s) { empty_kernel<<<1, 32, 0, s>>>(scratch); },
                          kMinLaunches);
  std::printf("empty kernel (one float read-modify-write): %.2f us per launch\n", empty_us);
  if (every_grid) {
    std::printf("us per call, PDL off, K = %d, at every grid size G: the floor / +exchange over "
                "clusters of 4 / 8 / 16 (G rounded up to whole clusters)\n", K);
    CHECK(cudaFuncSetAttribute(floor_kernel<16>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    for (int E : {32, 128}) {
      for (int M : {1, 8, 16, 32, 64, 128}) {
        const int problem_copies = static_cast<int>(kColdBytes / (2LL * E * K)) + 1;
        const Problem p{E, M, problem_copies, std::max(kMinLaunches, problem_copies), weights,
                        bias, x, out};
        std::printf("E = %3d, M = %3d:", E, M);
        for (int ctas : kGrids)
          std::printf("  G %3d: %5.2f / %5.2f / %5.2f / %5.2f", ctas,
                      time_floor<1>(p, ctas, false, false), time_floor<4>(p, ctas, false, false),
                      time_floor<8>(p, ctas, false, false), time_floor<16>(p, ctas, false, false));
        std::printf("\n");
      }
    }
    return 0;
  }
  std::printf(
      "us per call, K = %d, bf16 out, cold weights. floor: the router's bytes read once, no "
      "arithmetic; +xchg: the same with a split-K exchange over clusters of 8 (no arithmetic); "
      "[G]: the best grid; shipped: the op's kernels; early: the floor with its trigger first "
      "(not allowed)\n", K);
  std::printf("%4s %4s | %11s %11s %7s | %11s %11s %7s %11s | %6s %5s\n", "", "", "pdl off", "",
              "", "pdl on", "", "", "", "target", "");
  std::printf("%4s %4s | %11s %11s %7s | %11s %11s %7s %11s | %6s %5s\n", "E", "M", "floor [G]",
              "+xchg [G]", "shipped", "floor [G]", "+xchg [G]", "shipped", "early [G]", "off",
              "on");
  for (int E : {32, 128}) {
    for (int M : {1, 8, 16, 32, 64, 128}) {
      const int problem_copies = static_cast<int>(kColdBytes / (2LL * E * K)) + 1;
      const Problem p{E, M, problem_copies, std::max(kMinLaunches, problem_copies), weights, bias, x,
                      out};
      int g[5] = {};
      const float floor_off = best_floor<1>(p, false, false, &g[0]);
      const float xchg_off = best_floor<8>(p, false, false, &g[1]);
      const float floor_on = best_floor<1>(p, true, false, &g[2]);
      const float xchg_on = best_floor<8>(p, true, false, &g[3]);
      const float early = best_floor<1>(p, true, true, &g[4]);
      const float shipped_off = time_shipped(p, false), shipped_on = time_shipped(p, true);
      std::printf("%4d %4d | %5.2f [%3d] %5.2f [%3d] %7.2f | %5.2f [%3d] %5.2f [%3d] %7.2f "
                  "%5.2f [%3d] | ", E, M, floor_off, g[0], xchg_off, g[1], shipped_off, floor_on,
                  g[2], xchg_on, g[3], shipped_on, early, g[4]);
      if (M <= 32 || M == 128)
        std::printf("%6.2f %5.2f\n", M <= 32 ? 2.4 : 2.8, M <= 32 ? 1.7 : 2.2);
      else
        std::printf("%6s %5s\n", "-", "-");
    }
  }
  return 0;
}
