// Data shared by the torch-free probes that check their outputs on the host: a deterministic fill
// of bf16 buffers on the device, bf16 bits widened on the host, and a float rounded to bf16 there.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

// The router the M = 1 probes (lora_cluster, route_cluster) run: gpt-oss-120b's, rows read by 256
// threads of 16-byte chunks, and enough copies of the problem to exceed the L2 (cold calls).
namespace gpt_oss_router {
constexpr int K = 2880;
constexpr int E = 128;
constexpr int kChunks = K / 8;  // 16-byte chunks of a row
constexpr int kRowThreads = 256;
constexpr int kChunksPerThread = 2;
static_assert(kRowThreads * kChunksPerThread >= kChunks, "a row in one pass");
constexpr size_t kColdBytes = 96u << 20;

// Copies of a problem of `bytes` (the router's weights) that rotate past the L2: every call cold.
// One for an untimed check run.
inline int cold_copies(long long bytes, bool check_only) {
  return check_only ? 1 : static_cast<int>(kColdBytes / bytes) + 1;
}
}  // namespace gpt_oss_router

// p[i] uniform in [-amplitude / 2, amplitude / 2), from a hash of i and seed (no RNG state).
__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed, float amplitude) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * amplitude);
  }
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// f rounded to the nearest bf16 (ties to even), as a float.
inline float round_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits = (bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &bits, 4);
  return r;
}
