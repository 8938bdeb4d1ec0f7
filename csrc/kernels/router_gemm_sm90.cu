// Launchers of the Hopper router GEMM (router_gemm_sm90.cuh), plain and fused with a LoRA shrink:
// eligibility and the tile heuristic.
#include <cuda_bf16.h>
#include <cstdint>

#include "kernels/router_gemm.h"
#include "kernels/router_gemm_sm90_launch.cuh"

namespace moegate {

const char* router_gemm_sm90_unsupported(const RouterGemmArgs& a) {
  if (a.in_dtype != DType::kBFloat16) return "x and weight must be bfloat16";
  if (a.out_dtype != DType::kBFloat16 && a.out_dtype != DType::kFloat32)
    return "out dtype must be bfloat16 or float32";
  if (a.M < 1 || a.M > kSm90MaxM) return "M must be in [1, 256]";
  if (a.E < 8 || a.E > kSm90MaxE || a.E % 8 != 0) return "E must be a multiple of 8 in [8, 512]";
  if (a.K < 8 || a.K % 8 != 0) return "K must be a positive multiple of 8";
  if (!aligned_16B(a.x) || !aligned_16B(a.weight)) return "x and weight must be 16-byte aligned";
  return nullptr;
}

RouterGemmSm90Config router_gemm_sm90_resolve(const RouterGemmArgs& a, RouterGemmSm90Config c) {
  // From cold-weight tile sweeps of seven router shapes (K 2048-7168, E 8-256) at M = 16-256, every
  // configuration, PDL on and off (benchmarks/results/README.md, "Coherent weight loads, and the
  // tile rule they called for", and "Tiles for PDL"). Start from the finest grid: one 16-expert x
  // 8-token tile per warp, clusters of 8 (of 4 when K < 2560: too few k32 blocks per warp). Past
  // one CTA per SM (128), two token tiles, then four where two still leave more than one CTA an SM;
  // past two CTAs per SM (256), coarsen in the order that measured best: clusters of 4, two expert
  // tiles. A token step that would pad the batch (M = 24 in 16-token tiles, M = 48 in 32-token
  // ones) is skipped while the grid can fit without it. Over the swept cells this rule stays close
  // to the best configuration of each; the worst cells are in those sections. Fields the caller
  // set are kept.
  constexpr int kOneWaveCtas = 128;  // one CTA per SM of a 132-SM H100/H200
  constexpr int kMaxCtas = 256;      // two per SM
  const RouterGemmSm90Config fixed = c;
  if (c.cluster == 0) c.cluster = a.K >= 2560 ? 8 : 4;
  if (c.token_tiles == 0) c.token_tiles = 1;
  if (c.expert_tiles == 0) c.expert_tiles = 1;
  auto ctas = [&] {
    const dim3 grid = grid_for(a, c);
    return static_cast<int>(grid.x * grid.y * grid.z);
  };
  auto padded_rows = [&](int token_tiles) {
    return sm90::ceil_div(a.M, 8 * token_tiles) * 8 * token_tiles;
  };
  auto pads = [&](int tiles) { return padded_rows(tiles) > padded_rows(c.token_tiles); };
  const bool tokens_free = fixed.token_tiles == 0;
  if (tokens_free && ctas() > kOneWaveCtas && !(pads(2) && ctas() <= kMaxCtas)) c.token_tiles = 2;
  if (tokens_free && ctas() > kOneWaveCtas && !pads(4)) c.token_tiles = 4;
  if (fixed.cluster == 0 && ctas() > kMaxCtas) c.cluster = 4;
  if (fixed.expert_tiles == 0 && ctas() > kMaxCtas) c.expert_tiles = 2;
  if (tokens_free && ctas() > kMaxCtas) c.token_tiles = 4;  // the padding step after all
  return c;
}

namespace {

// The plain call's tiles. Under PDL a warp of two or more tiles trades a token tile for an expert
// tile: weight rows load before griddepcontrol.wait, x rows after it, so a tile of more experts
// and fewer tokens leaves less behind the wait (benchmarks/results/README.md, "Tiles for PDL").
// The trade keeps the MMA tiles per warp, hence the chain count (chains_per_tile) and the final
// reduction's lanes (owned_sum), hence the bits: the logits are the same with PDL on or off, and
// the fused shrink launch, which keeps router_gemm_sm90_resolve's tiles (its grids need the four
// CTAs an SM of 1 x 2 tiles; 2 x 1 hold three), still has the plain call's bits. E a multiple of
// 32, so that the grid does not grow.
RouterGemmSm90Config plain_tiles(const RouterGemmArgs& a, const RouterGemmSm90Config& fixed) {
  RouterGemmSm90Config c = router_gemm_sm90_resolve(a, fixed);
  if (a.pdl && fixed.expert_tiles == 0 && fixed.token_tiles == 0 && c.expert_tiles == 1 &&
      c.token_tiles >= 2 && a.E % 32 == 0) {
    c.expert_tiles = 2;
    c.token_tiles /= 2;
  }
  return c;
}

}  // namespace

cudaError_t launch_router_gemm_sm90(const RouterGemmArgs& a, RouterGemmSm90Config c) {
  return launch_resolved<Fusion::kNone>(a, plain_tiles(a, c), FusedPart{});
}

const char* router_gemm_sm90_with_shrink_unsupported(const RouterGemmArgs& a, const void* lora_a,
                                                     int rows) {
  if (const char* why = router_gemm_sm90_unsupported(a)) return why;
  return ShrinkPart::unsupported(lora_a, rows);
}

cudaError_t launch_router_gemm_sm90_with_shrink(const RouterGemmArgs& a, const void* lora_a,
                                                int rows, float* xa) {
  FusedPart fused;
  fused.shrink = ShrinkPart::of(lora_a, rows, xa);
  return launch_resolved<Fusion::kShrink>(a, RouterGemmSm90Config{}, fused);
}

}  // namespace moegate
