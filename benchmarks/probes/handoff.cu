// What does it cost one CTA to read values that every other CTA of the same launch just stored?
// Fused routing (and a one-launch LoRA expand) need exactly that: the logits of a token are stored
// by many CTAs, and one CTA must then read all of them.
//
// Every variant launches G CTAs of 256 threads that read a 5.76 KB weight row each (a router
// CTA's load, warm in L2), fold it to one value and store it; then:
//   store only      nothing else (the floor)
//   atom acq_rel    the shipped protocol (routing.cuh, last_of_tile): a CTA barrier, then thread 0
//                   adds 1 to a counter with atom.acq_rel.gpu; the CTA that sees G - 1 resets it,
//                   and its first warp reads the G values (ld.global.cg) and stores their sum
//   atom release    the same with atom.release.gpu, and fence.acq_rel.gpu in the last CTA only
//   tagged spin     each CTA stores its value with a tag in one 64-bit word (no fence, no atomic);
//                   CTA G - 1 polls the G words until every tag is set, clears them, sums. Needs
//                   every CTA resident at once (a probe may assume it; the shipped kernels may not)
//   PDL pair        store only, then a second kernel launched as its programmatic dependent reads
//                   the G values after griddepcontrol.wait (the two-launch path)
// Timed like every probe (graph_timing.cuh): back-to-back launches in one CUDA graph, median of 20
// replays, us per iteration; the sum each variant stores is checked against the values.
// Standalone, from the repo root:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -o /tmp/handoff \
//     benchmarks/probes/handoff.cu && /tmp/handoff
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "graph_timing.cuh"
#include "kernels/grid_dependency.cuh"
#include "kernels/memory_access.cuh"

namespace {

constexpr int K = 2880;
constexpr int kThreads = 256;
constexpr int kChunks = K / 8;  // 16-byte chunks of a row
constexpr int kMaxCtas = 1024;
constexpr int kLaunches = 200;

enum Variant { kStoreOnly, kAtomAcqRel, kAtomRelease, kTaggedSpin, kPdlPair, kVariants };
const char* const kNames[kVariants] = {"store only", "atom acq_rel", "atom release", "tagged spin",
                                       "PDL pair"};

// Thread 0's fold of CTA blockIdx.x's row (every thread takes part), as a small integer-valued
// float so that sums are exact in any order.
__device__ float fold_row(const __nv_bfloat16* weight) {
  __shared__ uint32_t warp_xor[kThreads / 32];
  const __nv_bfloat16* row = weight + static_cast<long long>(blockIdx.x) * K;
  uint32_t acc = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int chunk = j * kThreads + static_cast<int>(threadIdx.x);
    const uint4 v = moegate::sm90::load_weight_16B(row + 8 * (chunk < kChunks ? chunk : 0),
                                                   chunk < kChunks);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
  if (threadIdx.x % 32 == 0) warp_xor[threadIdx.x / 32] = acc;
  __syncthreads();
  uint32_t all = 0;
  for (int w = 0; w < kThreads / 32; ++w) all ^= warp_xor[w];
  return static_cast<float>(all % 1024);
}

__device__ float load_cg(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
  return v;
}

// Warp 0 sums values[0, ctas) into *sum (fixed order per lane, then a butterfly).
__device__ void sum_values(const float* values, int ctas, float* sum) {
  if (threadIdx.x >= 32) return;
  float s = 0.f;
  for (int i = static_cast<int>(threadIdx.x); i < ctas; i += 32) s += load_cg(values + i);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (threadIdx.x == 0) *sum = s;
}

template <Variant kVariant>
__global__ void __launch_bounds__(kThreads) handoff_kernel(const __nv_bfloat16* weight,
                                                           float* values, uint64_t* tagged,
                                                           unsigned* counter, float* sum) {
  const float value = fold_row(weight);
  const int ctas = static_cast<int>(gridDim.x);
  if constexpr (kVariant == kTaggedSpin) {
    if (threadIdx.x == 0) {
      const uint64_t word = 1ull << 32 | __float_as_uint(value);
      asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(tagged + blockIdx.x), "l"(word)
                   : "memory");
    }
    if (blockIdx.x == ctas - 1 && threadIdx.x < 32) {
      float s = 0.f;
      for (int i = static_cast<int>(threadIdx.x); i < ctas; i += 32) {
        uint64_t word = 0;
        while ((word >> 32) == 0)
          asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(tagged + i) : "memory");
        asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(tagged + i), "l"(0ull) : "memory");
        s += __uint_as_float(static_cast<uint32_t>(word));
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (threadIdx.x == 0) *sum = s;
    }
  } else {
    if (threadIdx.x == 0) values[blockIdx.x] = value;
    if constexpr (kVariant == kAtomAcqRel || kVariant == kAtomRelease) {
      __shared__ bool last;
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned before;
        if constexpr (kVariant == kAtomAcqRel)
          asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;"
                       : "=r"(before) : "l"(counter) : "memory");
        else
          asm volatile("atom.add.release.gpu.global.u32 %0, [%1], 1;"
                       : "=r"(before) : "l"(counter) : "memory");
        last = before == static_cast<unsigned>(ctas) - 1;
        if (last) {
          if constexpr (kVariant == kAtomRelease) asm volatile("fence.acq_rel.gpu;" ::: "memory");
          asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(counter) : "memory");
        }
      }
      __syncthreads();
      if (last) sum_values(values, ctas, sum);
    }
  }
  __syncthreads();
  moegate::sm90::trigger_dependents();
}

// The PDL pair's second kernel.
__global__ void __launch_bounds__(32) sum_kernel(const float* values, int ctas, float* sum) {
  moegate::sm90::grid_dependency_wait(true);
  sum_values(values, ctas, sum);
}

struct Buffers {
  __nv_bfloat16* weight;
  float* values;
  uint64_t* tagged;
  unsigned* counter;
  float* sum;
};

void launch(Variant v, int ctas, const Buffers& b, cudaStream_t stream) {
  auto one = [&](auto kernel) {
    launch_1d(kernel, ctas, kThreads, 0, stream, 1, false, b.weight, b.values, b.tagged, b.counter,
              b.sum);
  };
  switch (v) {
    case kStoreOnly: one(handoff_kernel<kStoreOnly>); break;
    case kAtomAcqRel: one(handoff_kernel<kAtomAcqRel>); break;
    case kAtomRelease: one(handoff_kernel<kAtomRelease>); break;
    case kTaggedSpin: one(handoff_kernel<kTaggedSpin>); break;
    case kPdlPair:
      one(handoff_kernel<kStoreOnly>);
      launch_1d(sum_kernel, 1, 32, 0, stream, 1, true, static_cast<const float*>(b.values), ctas,
                b.sum);
      break;
    default: break;
  }
}

}  // namespace

int main() {
  Buffers b;
  CHECK(cudaMalloc(&b.weight, sizeof(__nv_bfloat16) * K * kMaxCtas));
  CHECK(cudaMalloc(&b.values, sizeof(float) * kMaxCtas));
  CHECK(cudaMalloc(&b.tagged, sizeof(uint64_t) * kMaxCtas));
  CHECK(cudaMalloc(&b.counter, sizeof(unsigned)));
  CHECK(cudaMalloc(&b.sum, sizeof(float)));
  std::vector<uint16_t> host(static_cast<size_t>(K) * kMaxCtas);
  uint32_t state = 12345;
  for (auto& h : host) h = static_cast<uint16_t>((state = state * 1664525u + 1013904223u) >> 16);
  CHECK(cudaMemcpy(b.weight, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(b.tagged, 0, sizeof(uint64_t) * kMaxCtas));
  CHECK(cudaMemset(b.counter, 0, sizeof(unsigned)));

  std::printf("| CTAs |");
  for (int v = 0; v < kVariants; ++v) std::printf(" %s |", kNames[v]);
  std::printf("\n|---|");
  for (int v = 0; v < kVariants; ++v) std::printf("---|");
  std::printf("\n");
  for (int ctas : {64, 132, 192, 264}) {
    // The reference sum: every CTA's value, from the store-only kernel.
    launch(kStoreOnly, ctas, b, nullptr);
    CHECK(cudaDeviceSynchronize());
    std::vector<float> values(ctas);
    CHECK(cudaMemcpy(values.data(), b.values, sizeof(float) * ctas, cudaMemcpyDeviceToHost));
    float expected = 0.f;
    for (float v : values) expected += v;
    std::printf("| %d |", ctas);
    for (int v = 0; v < kVariants; ++v) {
      CHECK(cudaMemset(b.sum, 0xff, sizeof(float)));
      const float us = time_graph([&](int, cudaStream_t s) { launch(static_cast<Variant>(v), ctas, b, s); },
                                  kLaunches);
      float sum = 0.f;
      CHECK(cudaMemcpy(&sum, b.sum, sizeof(float), cudaMemcpyDeviceToHost));
      const bool ok = v == kStoreOnly || sum == expected;
      std::printf(" %.2f%s |", us, ok ? "" : " (WRONG SUM)");
    }
    std::printf("\n");
  }
  return 0;
}
