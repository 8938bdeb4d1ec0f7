// The CUDA-key implementations of the ops torch.ops.moegate.* (schemas in registration.cpp), by
// unit: router ops (router_ops.cpp), routing ops (routing_ops.cpp), LoRA ops (lora_ops.cpp). Each
// checks its tensors, allocates its outputs and launches on the current stream; declared here for
// registration.cpp and for the ops that fall back on one another (route and the fused LoRA ops).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels/dispatch.h"
#include "kernels/route.h"

namespace moegate::bindings {

// -- router_ops.cpp: the router GEMM, each kernel alone, and the base gate with a LoRA shrink ----

at::Tensor router_gemm(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype, bool pdl);
at::Tensor router_gemm_simple(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              std::optional<at::ScalarType> out_dtype);
at::Tensor router_gemm_sm90(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype, bool pdl,
                            int64_t expert_tiles, int64_t token_tiles, int64_t cluster);
at::Tensor router_gemm_small_m(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               std::optional<at::ScalarType> out_dtype, bool pdl,
                               int64_t experts_per_cta, int64_t tokens_per_cta);
// router_gemm after its checks, under the caller's device guard: the logits from the path
// `route_for` chose for `args` (whose `out` it sets), for the ops that fall back on router_gemm
// and have already checked, guarded and dispatched.
at::Tensor router_gemm_dispatched(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::ScalarType out_type,
                                  RouterGemmArgs& args, Route route);
int64_t router_gemm_route(const at::Tensor& x, const at::Tensor& weight,
                          std::optional<at::ScalarType> out_dtype);
std::tuple<at::Tensor, at::Tensor> router_gemm_with_shrink(const at::Tensor& x,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_a,
                                                           std::optional<at::ScalarType> out_dtype,
                                                           bool pdl);

// router_gemm_with_shrink after its checks, under the caller's device guard, with the path
// `route_for` chose for the base call (`args`, whose `out` it sets).
std::tuple<at::Tensor, at::Tensor> router_gemm_with_shrink_dispatched(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, at::ScalarType out_type, RouterGemmArgs& args, Route route);

// -- routing_ops.cpp: top-k and softmax of logits, alone or fused into the router ----------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> route(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::Tensor& counters, int64_t top_k, c10::string_view scoring, bool renormalize,
    std::optional<at::ScalarType> out_dtype, std::optional<at::ScalarType> weights_dtype,
    std::optional<at::ScalarType> ids_dtype, bool pdl);
std::tuple<at::Tensor, at::Tensor> route_logits(const at::Tensor& logits, int64_t top_k,
                                                c10::string_view scoring, bool renormalize,
                                                std::optional<at::ScalarType> weights_dtype,
                                                std::optional<at::ScalarType> ids_dtype, bool pdl);

// The routing outputs of M tokens, allocated, and the RouteArgs that point at them.
struct RouteOutputs {
  at::Tensor weights, ids;
  RouteArgs args;
};

// The routing options' checks (top_k, scoring, renormalize, ids dtype), and the outputs.
RouteOutputs allocate_route(const at::Tensor& like, int64_t M, int64_t E, int64_t top_k,
                            c10::string_view scoring, bool renormalize,
                            at::ScalarType weights_type, at::ScalarType ids_type);

// Routes logits [M, E] into `o`: one launch of the routing kernel, or PyTorch ops past 512 experts.
void route_logits_into(const at::Tensor& logits, RouteOutputs& o, bool pdl);

// -- lora_ops.cpp: the multi-adapter LoRA expand, alone or with the routing of its output --------

at::Tensor lora_expand(const at::Tensor& logits, const at::Tensor& xa, const at::Tensor& lora_b,
                       const at::Tensor& scaling, const at::Tensor& slot_ids, bool pdl);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_route(
    const at::Tensor& logits, const at::Tensor& xa, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& slot_ids, int64_t top_k, c10::string_view scoring,
    bool renormalize, std::optional<at::ScalarType> weights_dtype,
    std::optional<at::ScalarType> ids_dtype, bool pdl);

// A LoRA layer's logits: lora_expand(router_gemm_with_shrink(x, weight, bias, lora_a), lora_b,
// scaling, slot_ids) bit for bit, in one launch where the decode kernel takes the call and was
// measured faster (kernels/router_gemm.h, router_gemm_small_m_lora), else in those two.
// lora_a [S * R, K], lora_b [S, E, R].
at::Tensor router_gemm_lora(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& scaling,
                            const at::Tensor& slot_ids, std::optional<at::ScalarType> out_dtype,
                            bool pdl);

}  // namespace moegate::bindings
