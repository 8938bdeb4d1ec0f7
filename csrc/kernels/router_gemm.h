// Launchers of moegate's router-GEMM kernels. Torch-free: CUDA runtime types only, so these units
// compile with plain nvcc (and report registers/spills) on a machine with no GPU and no CUDA torch.
//
// Semantics of every launcher: out[m, e] = sum_k x[m, k] * weight[e, k] + bias[e]
//   x [M, K] row-major, weight [E, K] row-major, bias [E] or null, out [M, E] row-major;
//   products and sums in fp32, one rounding to the output dtype at the end.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moegate {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct RouterGemmArgs {
  const void* x = nullptr;       // [M, K], dtype in_dtype
  const void* weight = nullptr;  // [E, K], dtype in_dtype
  const void* bias = nullptr;    // [E], dtype in_dtype, or null
  void* out = nullptr;           // [M, E], dtype out_dtype
  int M = 0, E = 0, K = 0;
  DType in_dtype = DType::kBFloat16;
  DType out_dtype = DType::kBFloat16;
  bool pdl = false;  // launch with programmatic dependent launch (sm_90+)
  cudaStream_t stream = nullptr;
};

// Whether this binary holds machine code the current CUDA device can run (sm_90a code runs on
// sm_90 only); asks the runtime rather than trusting build flags.
bool kernels_run_on_current_device();

// The foundation kernel: any M >= 1, E >= 1, K >= 1, any of the three dtypes, no alignment needs.
cudaError_t launch_router_gemm_simple(const RouterGemmArgs& args);

// The decode-size kernel (router_gemm_small_m.cu): bf16 x/weight/bias, bf16 or fp32 out,
// 1 <= M <= kSmallMaxM, any E, K a multiple of 8, 16-byte aligned x and weight. Needs sm_90 for PDL.
constexpr int kSmallMaxM = 64;
// Whether the dispatching op should give a call the decode kernel rather than the tensor-core
// kernel: always for M <= 4, and up to 1024 logits (M x E) unless the router is both wide and long
// (E >= 128 and K > 5120). Past that the tensor-core kernel's cluster handoff costs less than the
// decode kernel's re-reads of x and weights and its CUDA-core FMAs. The choice does not depend on
// PDL, so pdl=True and pdl=False give the same bits. The line comes from tile sweeps of both
// kernels (benchmarks/results/README.md, the `_tune-dispatch-coherent` files).
bool router_gemm_small_m_preferred(const RouterGemmArgs& args);
const char* router_gemm_small_m_unsupported(const RouterGemmArgs& args);

// experts_per_cta: 1, 2 or 4; tokens_per_cta: 1, 2, 4 or 8 (the grid's second dimension splits the
// tokens). 0 picks by E and M: 2 x 2 from 512 logits and 2 x 4 from 768 (M >= 4), else 1 x 2 (more
// tokens per CTA while the grid would exceed 384 CTAs).
cudaError_t launch_router_gemm_small_m(const RouterGemmArgs& args, int experts_per_cta,
                                       int tokens_per_cta);

// The decode kernel and a second GEMM over the same x in one launch: xa = x A^T (fp32, no bias;
// A [rows, K] bf16, xa [M, rows]), which is a LoRA layer's shrink next to its base gate. Extra
// CTAs run the same code with the same tiles on A, so `out` gets exactly the bits of
// launch_router_gemm_small_m(args, 0, 0); one launch and one trip to memory fewer than two calls.
// Needs K <= 4096 (the 256-thread form) and a 16-byte aligned A, besides the decode kernel's needs.
const char* router_gemm_small_m_with_shrink_unsupported(const RouterGemmArgs& args,
                                                        const void* lora_a, int rows);
cudaError_t launch_router_gemm_small_m_with_shrink(const RouterGemmArgs& args, const void* lora_a,
                                                   int rows, float* xa);

// A LoRA layer's adapters, one slot per token: for every token m with slot s = slot_ids[m] in
// [0, S), logit (m, e) gets scaling[s] * sum_{r < rank} xa[r] * lora_b[s, e, r], where
// xa[r] = x[m] . lora_a[s * rank + r] (lora_expand.h has the exact arithmetic).
struct LoraAdapters {
  const void* lora_a = nullptr;       // [S * rank, K] bf16
  const void* lora_b = nullptr;       // [S, E, rank] bf16
  const float* scaling = nullptr;     // [S]
  const int64_t* slot_ids = nullptr;  // [M]; any value outside [0, S) means "no adapter"
  int S = 0, rank = 0;
};

// The decode kernel with a LoRA layer's whole delta in the same launch: clusters of CTAs along the
// experts split the shrink of their token group's slots, exchange it through distributed shared
// memory, and each CTA adds its own experts' deltas before its one store
// (router_gemm_small_m.cuh). `out` gets the bits of the two-launch path:
// launch_router_gemm_small_m_with_shrink, then launch_lora_expand. Null where it takes these
// arguments: the decode kernel's needs, K <= 4096, 1 <= rank <= 64 in multiples of 8, 16-byte
// aligned A and B, one token (M = 1), rank <= 16 under PDL, and all of the grid's clusters of 16
// CTAs resident at once on this GPU (a second wave would cost more than the two launches); the
// reason string says which fails. Where it returns one, the two launches were measured faster or
// are the only way.
constexpr int kLoraItemsPerCta = 4;
const char* router_gemm_small_m_lora_unsupported(const RouterGemmArgs& args,
                                                 const LoraAdapters& lora);
// Callers check router_gemm_small_m_lora_unsupported() first.
cudaError_t launch_router_gemm_small_m_lora(const RouterGemmArgs& args, const LoraAdapters& lora);

// Tile configuration of the Hopper kernel; zero fields are chosen by a heuristic on M, E, K.
struct RouterGemmSm90Config {
  int expert_tiles = 0;  // 16-expert MMA tiles per warp: 1 or 2
  int token_tiles = 0;   // 8-token MMA tiles per warp: 1, 2 or 4
  int cluster = 0;       // CTAs splitting K in one cluster: 4 or 8 (16 was slower everywhere
                         // measured, and compute-sanitizer's synccheck flagged it)
};

// Why the Hopper kernel cannot take these arguments, or null when it can: bf16 x/weight/bias,
// bf16 or fp32 out, 1 <= M <= kSm90MaxM, E a multiple of 8 up to kSm90MaxE, K a multiple of 8,
// 16-byte aligned x and weight.
constexpr int kSm90MaxM = 256;
constexpr int kSm90MaxE = 512;
const char* router_gemm_sm90_unsupported(const RouterGemmArgs& args);

// Fills the zero fields of `config` for this problem; returns the resolved configuration.
RouterGemmSm90Config router_gemm_sm90_resolve(const RouterGemmArgs& args, RouterGemmSm90Config config);

// The Hopper kernel (sm_90a). Callers check router_gemm_sm90_unsupported() first.
cudaError_t launch_router_gemm_sm90(const RouterGemmArgs& args, RouterGemmSm90Config config);

// The Hopper kernel with a LoRA shrink in the same launch, as router_gemm_small_m_with_shrink
// (above): extra clusters run the same code with the tiles router_gemm_sm90_resolve picks for the
// router call alone, so `out` gets exactly the bits of launch_router_gemm_sm90(args, {}).
const char* router_gemm_sm90_with_shrink_unsupported(const RouterGemmArgs& args,
                                                     const void* lora_a, int rows);
cudaError_t launch_router_gemm_sm90_with_shrink(const RouterGemmArgs& args, const void* lora_a,
                                                int rows, float* xa);

}  // namespace moegate
