// The router ops: router_gemm (dispatching per call by kernels/dispatch.h), each kernel alone for
// tuning and tests (router_gemm_simple, _sm90, _small_m), router_gemm_route (which one
// router_gemm runs), and router_gemm_with_shrink (the base gate and a LoRA shrink in one launch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "bindings/common.h"
#include "bindings/ops.h"
#include "kernels/dispatch.h"
#include "kernels/router_gemm.h"

namespace moegate::bindings {
namespace {

at::Tensor router_gemm_cublas(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::ScalarType out_type) {
  if (out_type == x.scalar_type()) {
    return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  // fp32 logits straight from cuBLAS's fp32 accumulator.
  return bias.has_value() ? at::addmm(bias->to(at::kFloat), x, weight.t(), out_type)
                          : at::mm(x, weight.t(), out_type);
}

// What the two Hopper tuning ops share, after check_inputs and under the caller's device guard:
// the GPU check, the kernel arguments, the output, and the kernel's own refusal of these inputs.
// Launches nothing; M == 0 leaves nothing to launch.
at::Tensor start_hopper_call(const char* kernel, const char* (*unsupported)(const RouterGemmArgs&),
                             const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             std::optional<at::ScalarType> out_dtype, bool pdl,
                             RouterGemmArgs& args) {
  TORCH_CHECK(is_hopper(x), "moegate: ", kernel, " needs a Hopper (sm_90) GPU");
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  args = make_args(x, weight, bias, out_type, pdl);
  at::Tensor out = allocate_out(x, weight, out_type, args);
  if (args.M == 0) return out;
  const char* why_not = unsupported(args);
  TORCH_CHECK(why_not == nullptr, "moegate: ", kernel, " cannot take these inputs: ", why_not);
  return out;
}

}  // namespace

at::Tensor router_gemm_simple(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              std::optional<at::ScalarType> out_dtype) {
  check_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, /*pdl=*/false);
  at::Tensor out = allocate_out(x, weight, out_type, args);
  if (args.M > 0) check_launch(launch_router_gemm_simple(args), "router_gemm_simple");
  return out;
}

at::Tensor router_gemm_sm90(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype, bool pdl,
                            int64_t expert_tiles, int64_t token_tiles, int64_t cluster) {
  check_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  RouterGemmArgs args;
  at::Tensor out = start_hopper_call("router_gemm_sm90", router_gemm_sm90_unsupported, x, weight,
                                     bias, out_dtype, pdl, args);
  if (args.M == 0) return out;
  RouterGemmSm90Config config;
  config.expert_tiles = static_cast<int>(expert_tiles);
  config.token_tiles = static_cast<int>(token_tiles);
  config.cluster = static_cast<int>(cluster);
  check_launch(launch_router_gemm_sm90(args, config), "router_gemm_sm90");
  return out;
}

at::Tensor router_gemm_small_m(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               std::optional<at::ScalarType> out_dtype, bool pdl,
                               int64_t experts_per_cta, int64_t tokens_per_cta) {
  check_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  RouterGemmArgs args;
  at::Tensor out = start_hopper_call("router_gemm_small_m", router_gemm_small_m_unsupported, x,
                                     weight, bias, out_dtype, pdl, args);
  if (args.M == 0) return out;
  TORCH_CHECK(experts_per_cta == 0 || experts_per_cta == 1 || experts_per_cta == 2 ||
                  experts_per_cta == 4,
              "moegate: experts_per_cta must be 0 (auto), 1, 2 or 4, got ", num(experts_per_cta));
  TORCH_CHECK(tokens_per_cta == 0 || tokens_per_cta == 1 || tokens_per_cta == 2 ||
                  tokens_per_cta == 4 || tokens_per_cta == 8,
              "moegate: tokens_per_cta must be 0 (auto), 1, 2, 4 or 8, got ", num(tokens_per_cta));
  check_launch(launch_router_gemm_small_m(args, static_cast<int>(experts_per_cta),
                                          static_cast<int>(tokens_per_cta)),
               "router_gemm_small_m");
  return out;
}

at::Tensor router_gemm(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype, bool pdl) {
  check_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  return router_gemm_dispatched(x, weight, bias, out_type, args, route_for(args, is_hopper(x)));
}

at::Tensor router_gemm_dispatched(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::ScalarType out_type,
                                  RouterGemmArgs& args, Route route) {
  if (route == Route::kCublas) return router_gemm_cublas(x, weight, bias, out_type);
  at::Tensor out = allocate_out(x, weight, out_type, args);
  if (args.M == 0) return out;
  switch (route) {
    case Route::kSmallM:
      check_launch(launch_router_gemm_small_m(args, 0, 0), "router_gemm_small_m");
      break;
    case Route::kSm90:
      check_launch(launch_router_gemm_sm90(args, RouterGemmSm90Config{}), "router_gemm_sm90");
      break;
    default: check_launch(launch_router_gemm_simple(args), "router_gemm_simple");
  }
  return out;
}

int64_t router_gemm_route(const at::Tensor& x, const at::Tensor& weight,
                          std::optional<at::ScalarType> out_dtype) {
  check_inputs(x, weight, std::nullopt);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  const RouterGemmArgs args = make_args(x, weight, std::nullopt, out_type, /*pdl=*/false);
  return static_cast<int64_t>(route_for(args, is_hopper(x)));  // the same with or without PDL
}

// The base gate and a LoRA shrink over the same x: router_gemm(x, weight, bias, out_dtype, pdl)
// and router_gemm(x, lora_a, None, float32, pdl). Where one of our Hopper kernels takes the base
// call, both come from one launch of it (kernels/router_gemm.h, *_with_shrink), and the logits have
// the bits router_gemm gives; elsewhere (cuBLAS, the foundation kernel) they are those two calls.
std::tuple<at::Tensor, at::Tensor> router_gemm_with_shrink(const at::Tensor& x,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_a,
                                                           std::optional<at::ScalarType> out_dtype,
                                                           bool pdl) {
  check_inputs(x, weight, bias);
  check_inputs(x, lora_a, std::nullopt);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  const Route route = args.M > 0 ? route_for(args, is_hopper(x)) : Route::kSimple;
  return router_gemm_with_shrink_dispatched(x, weight, bias, lora_a, out_type, args, route);
}

std::tuple<at::Tensor, at::Tensor> router_gemm_with_shrink_dispatched(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, at::ScalarType out_type, RouterGemmArgs& args, Route route) {
  const int rows = static_cast<int>(lora_a.size(0));
  const void* a = lora_a.data_ptr();
  const bool small_m = route == Route::kSmallM &&
                       router_gemm_small_m_with_shrink_unsupported(args, a, rows) == nullptr;
  const bool sm90 =
      route == Route::kSm90 && router_gemm_sm90_with_shrink_unsupported(args, a, rows) == nullptr;
  if (small_m || sm90) {
    at::Tensor logits = allocate_out(x, weight, out_type, args);
    at::Tensor xa = at::empty({x.size(0), lora_a.size(0)}, x.options().dtype(at::kFloat));
    float* xa_ptr = xa.data_ptr<float>();
    check_launch(small_m ? launch_router_gemm_small_m_with_shrink(args, a, rows, xa_ptr)
                         : launch_router_gemm_sm90_with_shrink(args, a, rows, xa_ptr),
                 "router_gemm_with_shrink");
    return {logits, xa};
  }
  return {router_gemm_dispatched(x, weight, bias, out_type, args, route),
          router_gemm(x, lora_a, std::nullopt, at::kFloat, args.pdl)};
}

}  // namespace moegate::bindings
