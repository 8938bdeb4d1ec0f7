// Can an adapted router gate cost <= 1.3x its base gate in one launch? Issue 22's question, for the
// decode kernel's shape at M = 1 (gpt-oss-120b: K = 2880, E = 128), before building it.
//
// Every variant launches E CTAs of 256 threads, one expert each, whole K per CTA, as the decode
// kernel does at M = 1, and reads each call's weight cold (copies rotating over >= 96 MB):
//   base         the expert's logit: one weight row and x, a dot product, a bf16 store
//   clusters C   the same launched in clusters of C CTAs (what clustering alone costs)
//   LoRA C, R    clusters of C that also hold a rank-R adapter for the token's slot: each CTA
//                computes R / C of the shrink's rows (x . A_s[r], whole K), pushes them to every
//                CTA of its cluster (16-byte st.async messages counted on each owner's mbarrier),
//                waits for its own inbox, and adds scale * (B_s[e, :] . xa) to its logit before
//                the one rounding. The slot's A and B rotate with the weights (cold too); B's row
//                is loaded at the start. No CTA waits for another outside its cluster.
//   slot read    the same, but the slot (one of kSlots adapters) is read from device memory, as the
//                library's kernel reads slot_ids after griddepcontrol.wait: A and B leave HBM one
//                dependent trip after it (the library kernel measured far slower than the rows
//                above: benchmarks/results/README.md, "The one-launch LoRA kernel's first GPU run")
//   prefetched   slot read, with every slot's A rows of the CTA and B row of its expert asked of
//                L2 (prefetch.global.L2) at entry, so that the dependent trip stops at L2
//   read late    slot read, but only after the whole weight row is asked for, as the library
//                kernel reads it (left alone, ptxas puts the slot's load first)
//   <= N an SM   slot read, launched with enough (unused) dynamic shared memory that an SM holds
//                at most N of its CTAs: the library's one launch holds two an SM (99 registers a
//                thread), the probe's kernel many; does the cap alone move the time?
// Each row's check launch records the SM of every CTA: the "SMs holding 1/2/3+" column counts
// the SMs that held one, two, three or more of the grid's CTAs in that launch.
// The math is the real one (fp32 sums in a fixed order), so the probe also checks its outputs
// against a host reference; the timing is what matters. Timed like every probe (graph_timing.cuh).
// Last, the library's own kernels on the same buffers and clock: launch_router_gemm_small_m (the
// base gate) and launch_router_gemm_small_m_lora (the one launch) at ranks 16 and 64, so that the
// probe's design and the library's kernel are compared without the torch op or the Python
// benchmark between them.
// Standalone, from the repo root:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /tmp/lora_cluster \
//     benchmarks/probes/lora_cluster.cu csrc/kernels/router_gemm_small_m.cu \
//     csrc/kernels/router_gemm_small_m_lora.cu && /tmp/lora_cluster [--check-only]
// --check-only runs every variant once and checks it, untimed (for compute-sanitizer); --library
// times and checks only the base row and the library's kernels (an A/B of a library change).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "graph_timing.cuh"
#include "probe_data.cuh"
#include "kernels/cluster_exchange.cuh"
#include "kernels/float_convert.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/memory_access.cuh"
#include "kernels/router_gemm.h"

namespace {

namespace sm90 = moegate::sm90;

using namespace gpt_oss_router;
constexpr int kThreads = kRowThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kMinLaunches = 200;
constexpr float kScale = 2.f;
constexpr int kSlots = 4;  // adapters a copy holds (the LoRA rows' protocol: 4 slots)
constexpr int kUsedSlot = kSlots - 1;

// Where a CTA's adapter rows come from: a slot fixed at compile time (slot 0, loads at entry), or
// the slot read from memory first, with or without an L2 prefetch of every slot's rows at entry.
// kReadLate: the slot read from memory only after the whole weight row is asked for, behind a
// grid-dependency wait that is never taken, as the library kernel reads it (left alone, ptxas
// issues the slot's load first and half the weight row behind its arrival).
enum class Slot { kFixed, kRead, kReadPrefetched, kReadLate };


// kCluster 1: base. kRowsPerCta 0: no adapter. Otherwise the cluster's rank is
// kCluster * kRowsPerCta, and CTA rank q computes shrink rows [q * kRowsPerCta, ...).
// A copy holds kSlots adapters: slot s's A rows at lora_a + s * 64 * K, its B at lora_b + s * E * 64.
// sm_of_cta: null, or where each CTA records its SM. wait: whether kReadLate's grid-dependency wait
// is taken (never: every launch here passes false; the branch only gives the code its shape).
template <int kCluster, int kRowsPerCta, Slot kSlot = Slot::kFixed>
__global__ void __launch_bounds__(kThreads, 1)
    gate_kernel(const __nv_bfloat16* __restrict__ weight, const __nv_bfloat16* __restrict__ x,
                const __nv_bfloat16* __restrict__ lora_a, const __nv_bfloat16* __restrict__ lora_b,
                const int* __restrict__ slot, __nv_bfloat16* __restrict__ out,
                int* __restrict__ sm_of_cta, bool wait) {
  constexpr int kRank = kCluster * kRowsPerCta;
  static_assert(kRank <= 64, "warp 0 holds B's row in two values a lane");
  constexpr int kRows = 1 + kRowsPerCta;  // the expert's row, then its shrink rows
  constexpr int kMessages = kRowsPerCta > 0 ? (kRowsPerCta + 3) / 4 : 1;  // 4 floats each
  __shared__ float warp_sums[kWarps][kRows];
  __shared__ __align__(16) float inbox[kCluster][4 * kMessages];  // [sender rank][its rows]
  __shared__ __align__(8) uint64_t inbox_full;
  const uint32_t bar = sm90::shared_address(&inbox_full);
  if constexpr (kRowsPerCta > 0) {
    if (threadIdx.x == 0) sm90::mbarrier_init_for_cluster(bar);
    sm90::cluster_arrive_relaxed();
  }
  const int e = static_cast<int>(blockIdx.x);
  const int q = static_cast<int>(blockIdx.x) % kCluster;
  const int t = static_cast<int>(threadIdx.x);
  if (sm_of_cta != nullptr && t == 0) {  // the check launch only
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    sm_of_cta[e] = static_cast<int>(sm);
  }
  if constexpr (kSlot == Slot::kReadPrefetched) {
    for (int s = 0; s < kSlots; ++s) {
      sm90::prefetch_l2<kThreads>(
          reinterpret_cast<const char*>(lora_a + (static_cast<long long>(s) * 64 + q * kRowsPerCta) * K),
          2LL * K * kRowsPerCta);
      sm90::prefetch_l2<kThreads>(
          reinterpret_cast<const char*>(lora_b + static_cast<long long>(s) * E * 64 + e * kRank),
          2LL * kRank);
    }
  }
  uint4 weight_row[kChunksPerThread];  // issued first, as the library kernel issues it
#pragma unroll
  for (int j = 0; j < kChunksPerThread; ++j)
    weight_row[j] = sm90::load_weight_16B(weight + static_cast<long long>(e) * K + 8 * (j * kThreads + t),
                                          j * kThreads + t < kChunks);
  uint4 xv[kChunksPerThread];
  constexpr bool kSlotLate = kSlot == Slot::kReadLate;
  if constexpr (kSlotLate) {
    // The library kernel's shape: a grid-dependency wait taken only under PDL (never here) between
    // the weight row and the rest. Without the branch and the coherent load below, ptxas issues
    // the slot's load first. (ptxas puts the slot's load ahead of x's, behind the wait.)
    if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j)
      xv[j] = sm90::load_activation_16B(x + 8 * (j * kThreads + t), j * kThreads + t < kChunks);
  }
  if constexpr (kSlot != Slot::kFixed) {
    int s;  // the adapters' addresses wait for this load
    if constexpr (kSlotLate)  // coherent, as the library reads slot_ids (ptxas hoists a .nc load)
      asm volatile("ld.global.u32 %0, [%1];" : "=r"(s) : "l"(slot) : "memory");
    else
      s = *slot;
    lora_a += static_cast<long long>(s) * 64 * K;
    lora_b += static_cast<long long>(s) * E * 64;
  }

  float b_low = 0.f, b_high = 0.f;  // warp 0: B[e, lane] and B[e, lane + 32]
  if constexpr (kRank > 0) {
    const __nv_bfloat16* b_row = lora_b + static_cast<long long>(e) * kRank;
    if (t < kRank) b_low = __bfloat162float(b_row[t]);
    if (t < 32 && t + 32 < kRank) b_high = __bfloat162float(b_row[t + 32]);
  }

  uint4 rows[kRows][kChunksPerThread];
#pragma unroll
  for (int j = 0; j < kChunksPerThread; ++j) {
    const int chunk = j * kThreads + t;
    const bool valid = chunk < kChunks;
    rows[0][j] = weight_row[j];
#pragma unroll
    for (int r = 1; r < kRows; ++r)
      rows[r][j] = sm90::load_weight_16B(
          lora_a + static_cast<long long>(q * kRowsPerCta + r - 1) * K + 8 * chunk, valid);
    if constexpr (!kSlotLate) xv[j] = sm90::load_activation_16B(x + 8 * chunk, valid);
  }
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    acc[r] = 0.f;
#pragma unroll
    for (int j = 0; j < kChunksPerThread; ++j)
      acc[r] = moegate::dot8_bf16(rows[r][j], xv[j], acc[r]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
    if (t % 32 == 0) warp_sums[t / 32][r] = acc[r];
  }
  __syncthreads();
  float sums[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    sums[r] = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sums[r] += warp_sums[w][r];
  }
  const float logit = __bfloat162float(__float2bfloat16(sums[0]));  // the base gate's rounding
  if constexpr (kRowsPerCta == 0) {
    if (t == 0) out[e] = __float2bfloat16(logit);
  } else {
    // Thread p < kCluster pushes this CTA's shrink values to rank p, four floats a message.
    sm90::cluster_wait_acquire();
    if (t < kCluster) {
#pragma unroll
      for (int m = 0; m < kMessages; ++m) {
        float v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = 4 * m + i < kRowsPerCta ? sums[1 + 4 * m + i] : 0.f;
        sm90::push_to_rank(sm90::map_to_rank(sm90::shared_address(&inbox[q][4 * m]), t), v,
                           sm90::map_to_rank(bar, t));
      }
    }
    if (t == 0) sm90::mbarrier_expect_bytes(bar, kCluster * kMessages * 16);
    sm90::mbarrier_wait_phase0(bar);
    if (t < 32) {  // warp 0: delta = B[e, :] . xa, lane l taking ranks l and l + 32
      auto xa = [&](int r) { return r < kRank ? inbox[r / kRowsPerCta][r % kRowsPerCta] : 0.f; };
      float delta = fmaf(xa(t), b_low, 0.f);
      delta = fmaf(xa(t + 32), b_high, delta);
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2)
        delta += __shfl_xor_sync(0xffffffffu, delta, offset);
      if (t == 0) out[e] = __float2bfloat16(logit + kScale * delta);
    }
  }
}

struct Buffers {
  __nv_bfloat16 *weights, *a, *b, *x, *out;
  int* sm_of_cta;        // [E]: each CTA's SM, in check launches
  int* slot;             // kUsedSlot
  int64_t* slot_ids;     // kUsedSlot, as the library reads a token's slot
  float* scaling;        // kScale for every slot
  int copies;
};

// Lets `kernel` launch in clusters of `cluster` with `reserved` bytes of dynamic shared memory. The
// attributes are set before a kernel's first launch and when its reservation grows, never again:
// the launches in a graph capture change nothing.
template <typename Kernel>
void allow_launch(Kernel kernel, int cluster, int reserved) {
  static std::map<const void*, int> allowed;  // kernel -> its reservation so far
  const void* key = reinterpret_cast<const void*>(kernel);
  const auto known = allowed.find(key);
  if (known != allowed.end() && known->second >= reserved) return;
  if (cluster > 8) CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  if (reserved > 0) CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, reserved));
  allowed[key] = reserved;
}

// Clusters of the variant the GPU holds at once with `reserved` bytes a CTA (0: it cannot launch).
template <int kCluster, int kRowsPerCta, Slot kSlot>
int resident_clusters(int reserved) {
  auto kernel = gate_kernel<kCluster, kRowsPerCta, kSlot>;
  allow_launch(kernel, kCluster, reserved);
  cudaLaunchAttribute attributes[2];
  cudaLaunchConfig_t config =
      sm90::cluster_launch_config(dim3(E), dim3(kThreads), nullptr, kCluster, false, attributes);
  config.dynamicSmemBytes = reserved;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return clusters;
}

// One launch of a variant on copy c, with `reserved` bytes of dynamic shared memory that the kernel
// does not use (0, or enough to cap the CTAs an SM holds), recording each CTA's SM when `record`.
template <int kCluster, int kRowsPerCta, Slot kSlot>
void launch_variant(const Buffers& p, long long c, int reserved, bool record, cudaStream_t stream) {
  auto kernel = gate_kernel<kCluster, kRowsPerCta, kSlot>;
  allow_launch(kernel, kCluster, reserved);
  launch_1d(kernel, E, kThreads, reserved, stream, kCluster, false,
            static_cast<const __nv_bfloat16*>(p.weights + c * E * K), static_cast<const __nv_bfloat16*>(p.x),
            static_cast<const __nv_bfloat16*>(p.a + c * kSlots * 64 * K),
            static_cast<const __nv_bfloat16*>(p.b + c * kSlots * E * 64), static_cast<const int*>(p.slot),
            p.out, record ? p.sm_of_cta : nullptr, false);
}

template <int kCluster, int kRowsPerCta, Slot kSlot = Slot::kFixed>
float time_variant(const Buffers& p, int reserved = 0) {
  return time_graph(
      [&](int i, cudaStream_t stream) {
        launch_variant<kCluster, kRowsPerCta, kSlot>(p, i % p.copies, reserved, false, stream);
      },
      std::max(kMinLaunches, p.copies));
}

// "a/b/c": how many SMs held one, two, three or more CTAs in the last recorded launch.
std::string placement(const Buffers& p) {
  std::vector<int> sm(E);
  CHECK(cudaMemcpy(sm.data(), p.sm_of_cta, sizeof(int) * E, cudaMemcpyDeviceToHost));
  std::map<int, int> ctas;
  for (int s : sm) ++ctas[s];
  int held[3] = {0, 0, 0};
  for (const auto& entry : ctas) ++held[std::min(entry.second, 3) - 1];
  return std::to_string(held[0]) + "/" + std::to_string(held[1]) + "/" + std::to_string(held[2]);
}

// After a launch on copy 0: the largest error of its output against the host reference
// round(round(w_e . x) + kScale * (B_e . (A x))) for `rank` rows of A from `a` and B as [E, rank]
// from `b` (rank 0: the base gate), in units of the output's bf16 spacing (<= 1 expected: the sums'
// order differs from the host's).
float worst_error(const Buffers& p, const std::vector<uint16_t>& w, const uint16_t* a, const uint16_t* b,
                  int rank, const std::vector<uint16_t>& x) {
  CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(E);
  CHECK(cudaMemcpy(out.data(), p.out, 2 * E, cudaMemcpyDeviceToHost));
  std::vector<double> xa(rank);
  for (int r = 0; r < rank; ++r) {
    double s = 0;
    for (int k = 0; k < K; ++k) s += double(bf16_to_float(a[r * K + k])) * bf16_to_float(x[k]);
    xa[r] = s;
  }
  float worst = 0.f;
  for (int e = 0; e < E; ++e) {
    double logit = 0;
    for (int k = 0; k < K; ++k) logit += double(bf16_to_float(w[e * K + k])) * bf16_to_float(x[k]);
    double delta = 0;
    for (int r = 0; r < rank; ++r) delta += xa[r] * bf16_to_float(b[e * rank + r]);
    const float expected = round_bf16(static_cast<float>(round_bf16(static_cast<float>(logit)) +
                                                         kScale * delta));
    const float spacing = std::ldexp(1.f, std::ilogb(std::fabs(expected) + 1e-30f) - 7);
    worst = std::max(worst, std::fabs(bf16_to_float(out[e]) - expected) / spacing);
  }
  return worst;
}

// Runs the variant once on copy 0 and returns worst_error. a and b: copy 0's adapters, every slot.
template <int kCluster, int kRowsPerCta, Slot kSlot = Slot::kFixed>
float check_variant(const Buffers& p, const std::vector<uint16_t>& w, const std::vector<uint16_t>& all_a,
                    const std::vector<uint16_t>& all_b, const std::vector<uint16_t>& x, int reserved) {
  constexpr int kRank = kCluster * kRowsPerCta;
  const int used = kSlot == Slot::kFixed ? 0 : kUsedSlot;
  const uint16_t* a = all_a.data() + static_cast<size_t>(used) * 64 * K;
  const uint16_t* b = all_b.data() + static_cast<size_t>(used) * E * 64;
  launch_variant<kCluster, kRowsPerCta, kSlot>(p, 0, reserved, true, nullptr);
  return worst_error(p, w, a, b, kRank, x);
}

// Prints one row of the table (us 0: checked only, not timed; held: the placement column).
void print_row(const char* name, int cluster, int rank, float us, float base_us, float error,
               const std::string& held) {
  if (us > 0.f)
    std::printf("| %s | %d | %d | %.2f | %.2fx | %.2f | %s |\n", name, cluster, rank, us, us / base_us,
                error, held.c_str());
  else
    std::printf("| %s | %d | %d | - | - | %.2f | %s |\n", name, cluster, rank, error, held.c_str());
  std::fflush(stdout);
}

// One row of the table; reserved: as launch_variant's.
template <int kCluster, int kRowsPerCta, Slot kSlot = Slot::kFixed>
void row(const char* name, const Buffers& p, const std::vector<uint16_t>& w,
         const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
         const std::vector<uint16_t>& x, float base_us, int reserved = 0) {  // base_us 0: checked only
  if (kCluster > 1 && resident_clusters<kCluster, kRowsPerCta, kSlot>(reserved) == 0) {
    std::printf("| %s | %d | %d | - | - | not launched: no cluster fits | - |\n", name, kCluster,
                kCluster * kRowsPerCta);
    return;
  }
  const float us = base_us > 0.f ? time_variant<kCluster, kRowsPerCta, kSlot>(p, reserved) : 0.f;
  const float error = check_variant<kCluster, kRowsPerCta, kSlot>(p, w, a, b, x, reserved);
  print_row(name, kCluster, kCluster * kRowsPerCta, us, base_us, error, placement(p));
}

// The library's kernels on copy c: the base gate (rank 0), or the one launch with kSlots adapters
// of `rank` (A as [kSlots * rank, K], B as [kSlots, E, rank], from the start of the copy's buffers).
moegate::RouterGemmArgs library_args(const Buffers& p, long long c) {
  moegate::RouterGemmArgs args;
  args.x = p.x;
  args.weight = p.weights + c * E * K;
  args.out = p.out;
  args.M = 1;
  args.E = E;
  args.K = K;
  return args;
}

moegate::LoraAdapters library_adapters(const Buffers& p, long long c, int rank) {
  moegate::LoraAdapters lora;
  lora.lora_a = p.a + c * kSlots * 64 * K;
  lora.lora_b = p.b + c * kSlots * E * 64;
  lora.scaling = p.scaling;
  lora.slot_ids = p.slot_ids;
  lora.S = kSlots;
  lora.rank = rank;
  return lora;
}

void launch_library(const Buffers& p, long long c, int rank, cudaStream_t stream) {
  moegate::RouterGemmArgs args = library_args(p, c);
  args.stream = stream;
  CHECK(rank == 0 ? moegate::launch_router_gemm_small_m(args, 0, 0)
                  : moegate::launch_router_gemm_small_m_lora(args, library_adapters(p, c, rank)));
}

// One row for the library's kernel at `rank` (0: the base gate), checked on copy 0 against the
// host reference in the library's adapter layout.
void library_row(const char* name, int rank, const Buffers& p, const std::vector<uint16_t>& w,
                 const std::vector<uint16_t>& all_a, const std::vector<uint16_t>& all_b,
                 const std::vector<uint16_t>& x, float base_us) {
  if (rank > 0) {
    if (const char* why = moegate::router_gemm_small_m_lora_unsupported(library_args(p, 0),
                                                                         library_adapters(p, 0, rank))) {
      std::printf("| %s | 16 | %d | - | - | not launched: %s | - |\n", name, rank, why);
      return;
    }
  }
  const float us = base_us > 0.f
                       ? time_graph([&](int i, cudaStream_t stream) { launch_library(p, i % p.copies, rank, stream); },
                                    std::max(kMinLaunches, p.copies))
                       : 0.f;
  launch_library(p, 0, rank, nullptr);
  const float worst = worst_error(p, w, all_a.data() + static_cast<size_t>(kUsedSlot) * rank * K,
                                  all_b.data() + static_cast<size_t>(kUsedSlot) * E * rank, rank, x);
  print_row(name, rank > 0 ? 16 : 1, rank, us, base_us, worst, "-");
}

void library_rows(const Buffers& p, const std::vector<uint16_t>& w, const std::vector<uint16_t>& all_a,
                  const std::vector<uint16_t>& all_b, const std::vector<uint16_t>& x, float base_us) {
  library_row("library base gate", 0, p, w, all_a, all_b, x, base_us);
  library_row("library one launch", 16, p, w, all_a, all_b, x, base_us);
  library_row("library one launch", 64, p, w, all_a, all_b, x, base_us);
}

}  // namespace

int main(int argc, char** argv) {
  // --check-only: every variant once on one copy, checked and not timed (for compute-sanitizer);
  // --library: the base row and the library's rows alone
  const bool check_only = argc > 1 && std::strcmp(argv[1], "--check-only") == 0;
  const bool library_only = argc > 1 && std::strcmp(argv[1], "--library") == 0;
  Buffers p;
  p.copies = cold_copies(2LL * E * K, check_only);
  CHECK(cudaMalloc(&p.weights, 2LL * p.copies * E * K));
  CHECK(cudaMalloc(&p.a, 2LL * p.copies * kSlots * 64 * K));
  CHECK(cudaMalloc(&p.b, 2LL * p.copies * kSlots * E * 64));
  CHECK(cudaMalloc(&p.slot, sizeof(int)));
  CHECK(cudaMemcpy(p.slot, &kUsedSlot, sizeof(int), cudaMemcpyHostToDevice));
  const int64_t used_slot = kUsedSlot;
  CHECK(cudaMalloc(&p.slot_ids, sizeof(int64_t)));
  CHECK(cudaMemcpy(p.slot_ids, &used_slot, sizeof(int64_t), cudaMemcpyHostToDevice));
  const std::vector<float> scaling(kSlots, kScale);
  CHECK(cudaMalloc(&p.scaling, sizeof(float) * kSlots));
  CHECK(cudaMemcpy(p.scaling, scaling.data(), sizeof(float) * kSlots, cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&p.x, 2LL * K));
  CHECK(cudaMalloc(&p.out, 2LL * E));
  CHECK(cudaMalloc(&p.sm_of_cta, sizeof(int) * E));
  fill<<<1024, 256>>>(p.weights, 1ULL * p.copies * E * K, 1, 0.1f);
  fill<<<1024, 256>>>(p.a, 1ULL * p.copies * kSlots * 64 * K, 2, 0.1f);
  fill<<<256, 256>>>(p.b, 1ULL * p.copies * kSlots * E * 64, 3, 0.5f);
  fill<<<16, 256>>>(p.x, K, 4, 2.f);
  CHECK(cudaDeviceSynchronize());
  // The host reference reads copy 0; a rank-R variant uses B as [E, R] (the first E * R values).
  std::vector<uint16_t> w(E * K), a(kSlots * 64 * K), b(kSlots * E * 64), x(K);
  CHECK(cudaMemcpy(w.data(), p.weights, 2 * w.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(a.data(), p.a, 2 * a.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(b.data(), p.b, 2 * b.size(), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(x.data(), p.x, 2 * x.size(), cudaMemcpyDeviceToHost));
  // Graph timings step up once within a process after a few measurements (benchmarks/results/
  // README.md): settle first, as the benchmark does.
  if (!check_only)
    for (int i = 0; i < 4; ++i) time_variant<1, 0>(p);
  const float base = check_only ? 0.f : time_variant<1, 0>(p);
  std::printf("K = %d, E = %d, M = 1, cold, us per call; error: worst |out - reference| in bf16 "
              "spacings; SMs holding 1/2/3+: of the grid's CTAs, in the check launch\n\n"
              "| variant | cluster | rank | us | x base | error | SMs holding 1/2/3+ |\n"
              "|---|---|---|---|---|---|---|\n",
              K, E);
  row<1, 0>("base", p, w, a, b, x, base);
  if (library_only) {
    library_rows(p, w, a, b, x, base);
    return 0;
  }
  row<8, 0>("clusters", p, w, a, b, x, base);
  row<8, 2>("LoRA", p, w, a, b, x, base);
  row<8, 8>("LoRA", p, w, a, b, x, base);
  // Clusters of 16 are non-portable: last, so that a GPU that cannot launch them keeps the rows above.
  row<16, 0>("clusters", p, w, a, b, x, base);
  row<16, 1>("LoRA", p, w, a, b, x, base);
  row<16, 4>("LoRA", p, w, a, b, x, base);
  row<16, 1, Slot::kRead>("LoRA, slot read", p, w, a, b, x, base);
  row<16, 4, Slot::kRead>("LoRA, slot read", p, w, a, b, x, base);
  row<16, 1, Slot::kReadPrefetched>("LoRA, slot read, prefetched", p, w, a, b, x, base);
  row<16, 4, Slot::kReadPrefetched>("LoRA, slot read, prefetched", p, w, a, b, x, base);
  row<16, 1, Slot::kReadLate>("LoRA, slot read late", p, w, a, b, x, base);
  library_rows(p, w, a, b, x, base);
  // Shared memory per SM is 228 KB on H100 and H200: 90 KB a CTA leaves room for two, 120 KB one.
  // Last: a cap that leaves clusters of 16 no room must not cost the rows above.
  row<16, 1, Slot::kRead>("LoRA, slot read, <= 2 an SM", p, w, a, b, x, base, 90 << 10);
  row<16, 1, Slot::kRead>("LoRA, slot read, 1 an SM", p, w, a, b, x, base, 120 << 10);
  return 0;
}
