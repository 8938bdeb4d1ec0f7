// The LoRA expand kernel (semantics in lora_expand.h). It replaces the eight small kernels of the
// batched-PyTorch expand (scale, bmm, clamp, gather, compare, add, cast, select) with one launch:
// at decode sizes each of those costs a launch, not bandwidth.
//
// One thread per output (token m, expert e): the token's slot is read once per thread, the xa
// values of that slot are the same for the whole block (broadcast loads), and the thread's row of
// B is R contiguous values. The sum runs over r in order: results are bitwise reproducible.
#include "kernels/float_convert.cuh"
#include "kernels/lora_expand.h"

namespace moegate {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxGridRows = 65535;  // gridDim.y limit; more tokens loop

template <typename Logit, typename B>
__global__ void __launch_bounds__(kThreads)
    lora_expand_kernel(const Logit* __restrict__ logits, const float* __restrict__ xa,
                       const B* __restrict__ lora_b, const float* __restrict__ scaling,
                       const int64_t* __restrict__ slot_ids, Logit* __restrict__ out, int M, int E,
                       int S, int R) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= E) return;
  for (long long m = blockIdx.y; m < M; m += gridDim.y) {
    const long long index = m * E + e;
    const int64_t s = slot_ids[m];
    if (s < 0 || s >= S) {
      out[index] = logits[index];
      continue;
    }
    const float* xa_row = xa + m * S * R + s * R;
    const B* b_row = lora_b + (s * E + e) * static_cast<long long>(R);
    float dot = 0.f;
#pragma unroll 8
    for (int r = 0; r < R; ++r) dot = fmaf(xa_row[r], to_float(b_row[r]), dot);
    out[index] = from_float<Logit>(to_float(logits[index]) + scaling[s] * dot);
  }
}

template <typename Logit, typename B>
cudaError_t launch_typed(const LoraExpandArgs& a) {
  const dim3 grid((a.E + kThreads - 1) / kThreads, a.M < kMaxGridRows ? a.M : kMaxGridRows);
  lora_expand_kernel<Logit, B><<<grid, kThreads, 0, a.stream>>>(
      static_cast<const Logit*>(a.logits), a.xa, static_cast<const B*>(a.lora_b), a.scaling,
      a.slot_ids, static_cast<Logit*>(a.out), a.M, a.E, a.S, a.R);
  return cudaGetLastError();
}

template <typename Logit>
cudaError_t launch_for_logits(const LoraExpandArgs& a) {
  switch (a.b_dtype) {
    case DType::kFloat32: return launch_typed<Logit, float>(a);
    case DType::kFloat16: return launch_typed<Logit, __half>(a);
    case DType::kBFloat16: return launch_typed<Logit, __nv_bfloat16>(a);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_lora_expand(const LoraExpandArgs& a) {
  if (a.M <= 0 || a.E <= 0 || a.S <= 0 || a.R <= 0) return cudaErrorInvalidValue;
  switch (a.logits_dtype) {
    case DType::kFloat32: return launch_for_logits<float>(a);
    case DType::kFloat16: return launch_for_logits<__half>(a);
    case DType::kBFloat16: return launch_for_logits<__nv_bfloat16>(a);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moegate
