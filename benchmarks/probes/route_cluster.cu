// Can a router route its own logits in the launch that computes them, for about +0.3 us? Issue 21's
// question at M = 1, on gpt-oss-120b's router (K = 2880, E = 128), before building it.
//
// The shipped decode kernel spreads the experts over 128 CTAs, one an SM, and its last CTA routes
// behind a device-scope counter: about +2 us over the logits alone (benchmarks/results/README.md,
// "Routing inlined"). Any handoff between the CTAs of one launch costs 0.8-1.9 us (handoff.cu), so
// the routing has to run where all of a token's logits already are: in one cluster. This probe asks
// what putting all 128 experts on the 16 CTAs of one cluster costs, and what routing there adds.
// Every variant reads each call's weight cold (copies rotating over >= 96 MB) and stores the bf16
// logits; whole K per CTA, 16-byte coherent weight loads, x from L2:
//   base        E CTAs of 256 threads, one expert each (the shipped tile at M = 1)
//   wide T      16 CTAs of T threads, 8 experts each (groups of 256 threads share the 8), in one
//               cluster of 16 (what 16 SMs pulling the whole weight cost)
//   routed T    the same, and each CTA pushes its 8 logits (as rounded to bf16) into rank 0's
//               shared memory (st.async, counted on rank 0's mbarrier); rank 0's warp 0 routes
//               them as the library routes (routing.cuh: top-4, softmax over the 4, fp32 weights,
//               int64 ids), with no memory trip between the logits and the routing
// Outputs are checked against a float64 host reference (logits within one bf16 spacing) and the
// routing of the probe's own logits (ids equal, weights within 1e-6). Timed like every probe
// (graph_timing.cuh). Standalone, from the repo root:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /tmp/route_cluster \
//     benchmarks/probes/route_cluster.cu && /tmp/route_cluster
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <vector>

#include "graph_timing.cuh"
#include "probe_data.cuh"
#include "kernels/cluster_exchange.cuh"
#include "kernels/float_convert.cuh"
#include "kernels/memory_access.cuh"
#include "kernels/routing.cuh"

namespace {

namespace sm90 = moegate::sm90;

using namespace gpt_oss_router;
constexpr int kTopK = 4;
constexpr int kGroupThreads = kRowThreads;  // threads that share one set of experts
constexpr int kCluster = 16;
constexpr int kMinLaunches = 200;

// kExperts experts a CTA (E / kExperts CTAs); kThreads / 256 groups of threads split them.
template <int kThreads, int kExperts, bool kRouted>
__global__ void __launch_bounds__(kThreads, 1)
    gate_kernel(const __nv_bfloat16* __restrict__ weight, const __nv_bfloat16* __restrict__ x,
                __nv_bfloat16* __restrict__ out, moegate::RouteArgs route) {
  constexpr int kGroups = kThreads / kGroupThreads;
  constexpr int kGroupExperts = kExperts / kGroups;
  constexpr int kWarps = kThreads / 32;
  constexpr int kGroupWarps = kGroupThreads / 32;
  static_assert(kGroups * kGroupExperts == kExperts, "groups split the experts evenly");
  static_assert(!kRouted || (kExperts == 8 && E / kExperts == kCluster), "8 logits = 2 messages");
  __shared__ float warp_sums[kWarps][kGroupExperts];
  __shared__ __align__(16) float logits[kExperts];
  __shared__ __align__(16) float inbox[E];  // rank 0: every CTA's logits
  __shared__ __align__(8) uint64_t inbox_full;
  const uint32_t bar = sm90::shared_address(&inbox_full);
  if constexpr (kRouted) {
    if (threadIdx.x == 0) sm90::mbarrier_init_for_cluster(bar);
    sm90::cluster_arrive_relaxed();
  }
  const int t = static_cast<int>(threadIdx.x);
  const int group = t / kGroupThreads, g = t % kGroupThreads;
  const int e0 = static_cast<int>(blockIdx.x) * kExperts + group * kGroupExperts;

  uint4 w[kGroupExperts][kChunksPerThread], xv[kChunksPerThread];
#pragma unroll
  for (int e = 0; e < kGroupExperts; ++e)
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j) {
      const int chunk = j * kGroupThreads + g;
      w[e][j] = sm90::load_weight_16B(weight + static_cast<long long>(e0 + e) * K + 8 * chunk,
                                      chunk < kChunks);
    }
#pragma unroll
  for (int j = 0; j < kChunksPerThread; ++j) {
    const int chunk = j * kGroupThreads + g;
    xv[j] = sm90::load_activation_16B(x + 8 * chunk, chunk < kChunks);
  }
#pragma unroll
  for (int e = 0; e < kGroupExperts; ++e) {
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j) acc = moegate::dot8_bf16(w[e][j], xv[j], acc);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (t % 32 == 0) warp_sums[t / 32][e] = acc;
  }
  __syncthreads();
  if (t < kExperts) {  // expert t of the CTA: group t / kGroupExperts's warps
    const int first_warp = t / kGroupExperts * kGroupWarps;
    float sum = 0.f;
#pragma unroll
    for (int w8 = 0; w8 < kGroupWarps; ++w8) sum += warp_sums[first_warp + w8][t % kGroupExperts];
    const __nv_bfloat16 rounded = __float2bfloat16(sum);
    out[static_cast<int>(blockIdx.x) * kExperts + t] = rounded;
    logits[t] = __bfloat162float(rounded);
  }
  if constexpr (kRouted) {
    __syncthreads();  // logits complete
    const uint32_t q = sm90::cluster_rank();
    sm90::cluster_wait_acquire();  // rank 0's mbarrier is initialised
    if (t < 2) {
      const float v[4] = {logits[4 * t], logits[4 * t + 1], logits[4 * t + 2], logits[4 * t + 3]};
      sm90::push_to_rank(sm90::map_to_rank(sm90::shared_address(&inbox[8 * q + 4 * t]), 0), v,
                         sm90::map_to_rank(bar, 0));
    }
    if (q == 0 && t < 32) {
      if (t == 0) sm90::mbarrier_expect_bytes(bar, E * sizeof(float));
      sm90::mbarrier_wait_phase0(bar);
      moegate::routing::route_shared_row<float>(inbox, E, 0, route);
    }
  }
}

struct Buffers {
  __nv_bfloat16 *weights, *x, *out;
  float* weights_out;
  int64_t* ids;
  int copies;
  moegate::RouteArgs route() const {
    moegate::RouteArgs r;
    r.weights = weights_out;
    r.ids = ids;
    r.top_k = kTopK;
    r.scoring = moegate::Scoring::kSoftmaxTopk;
    r.weights_dtype = moegate::DType::kFloat32;
    r.ids_int64 = true;
    return r;
  }
};

template <int kThreads, int kExperts, bool kRouted>
void launch(const Buffers& p, int copy, cudaStream_t stream) {
  auto kernel = gate_kernel<kThreads, kExperts, kRouted>;
  const int ctas = E / kExperts;
  const int cluster = ctas == kCluster ? kCluster : 1;
  if (cluster > 8)
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  launch_1d(kernel, ctas, kThreads, 0, stream, cluster, false,
            static_cast<const __nv_bfloat16*>(p.weights + static_cast<long long>(copy) * E * K),
            static_cast<const __nv_bfloat16*>(p.x), p.out, p.route());
}

// Runs the variant once on copy 0. Returns the largest logit error in bf16 spacings against a
// float64 reference, or -1 if its routing differs from the host's routing of its own logits.
template <int kThreads, int kExperts, bool kRouted>
float check_variant(const Buffers& p, const std::vector<uint16_t>& w, const std::vector<uint16_t>& x) {
  CHECK(cudaMemset(p.out, 0xff, 2 * E));  // poisoned: NaN bits
  CHECK(cudaMemset(p.ids, 0xff, sizeof(int64_t) * kTopK));
  launch<kThreads, kExperts, kRouted>(p, 0, nullptr);
  CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(E);
  CHECK(cudaMemcpy(out.data(), p.out, 2 * E, cudaMemcpyDeviceToHost));
  float worst = 0.f;
  std::vector<float> logits(E);
  for (int e = 0; e < E; ++e) {
    double logit = 0;
    for (int k = 0; k < K; ++k) logit += double(bf16_to_float(w[e * K + k])) * bf16_to_float(x[k]);
    logits[e] = bf16_to_float(out[e]);
    const float spacing = std::ldexp(1.f, std::ilogb(std::fabs(static_cast<float>(logit)) + 1e-30f) - 7);
    const float error = std::fabs(logits[e] - static_cast<float>(logit)) / spacing;
    worst = std::max(worst, error == error ? error : 1e30f);
  }
  if constexpr (kRouted) {
    std::vector<int64_t> ids(kTopK);
    std::vector<float> weights(kTopK);
    CHECK(cudaMemcpy(ids.data(), p.ids, sizeof(int64_t) * kTopK, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(weights.data(), p.weights_out, sizeof(float) * kTopK, cudaMemcpyDeviceToHost));
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    double total = 0;
    for (int j = 0; j < kTopK; ++j) total += std::exp(double(logits[order[j]]) - logits[order[0]]);
    for (int j = 0; j < kTopK; ++j) {
      const double want = std::exp(double(logits[order[j]]) - logits[order[0]]) / total;
      if (ids[j] != order[j] || std::fabs(weights[j] - want) > 1e-6) return -1.f;
    }
  }
  return worst;
}

template <int kThreads, int kExperts, bool kRouted>
float row(const char* name, const Buffers& p, const std::vector<uint16_t>& w,
          const std::vector<uint16_t>& x, float base_us) {
  const float us = time_graph([&](int i, cudaStream_t stream) {
    launch<kThreads, kExperts, kRouted>(p, i % p.copies, stream);
  }, std::max(kMinLaunches, p.copies));
  const float error = check_variant<kThreads, kExperts, kRouted>(p, w, x);
  if (base_us > 0.f)
    std::printf("| %s | %d | %d | %.2f | %+.2f | %s |\n", name, E / kExperts, kThreads, us,
                us - base_us, error < 0.f ? "WRONG ROUTING" : error <= 1.f ? "ok" : "WRONG LOGITS");
  std::fflush(stdout);
  return us;
}

}  // namespace

int main() {
  Buffers p;
  p.copies = cold_copies(2LL * E * K, false);
  CHECK(cudaMalloc(&p.weights, 2LL * p.copies * E * K));
  CHECK(cudaMalloc(&p.x, 2LL * K));
  CHECK(cudaMalloc(&p.out, 2LL * E));
  CHECK(cudaMalloc(&p.weights_out, sizeof(float) * kTopK));
  CHECK(cudaMalloc(&p.ids, sizeof(int64_t) * kTopK));
  fill<<<1024, 256>>>(p.weights, 1ULL * p.copies * E * K, 1, 0.1f);
  fill<<<16, 256>>>(p.x, K, 4, 2.f);
  CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> w(E * K), x(K);
  CHECK(cudaMemcpy(w.data(), p.weights, 2 * w.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(x.data(), p.x, 2 * x.size(), cudaMemcpyDeviceToHost));
  // Graph timings step up once within a process after a few measurements (benchmarks/results/
  // README.md): settle first, as the benchmark does.
  for (int i = 0; i < 4; ++i) row<256, 1, false>("", p, w, x, 0.f);
  const float base = row<256, 1, false>("", p, w, x, 0.f);
  std::printf("K = %d, E = %d, M = 1, top-%d, cold, us per call; + = over base; check: logits "
              "within a bf16 spacing of float64, routing equal to the host's\n\n"
              "| variant | CTAs | threads | us | + | check |\n|---|---|---|---|---|---|\n",
              K, E, kTopK);
  row<256, 1, false>("base", p, w, x, base);
  row<256, 8, false>("wide", p, w, x, base);
  row<512, 8, false>("wide", p, w, x, base);
  row<1024, 8, false>("wide", p, w, x, base);
  row<256, 8, true>("routed", p, w, x, base);
  row<512, 8, true>("routed", p, w, x, base);
  row<1024, 8, true>("routed", p, w, x, base);
  return 0;
}
