// The LoRA ops (kernels/lora_expand.h): lora_expand, the multi-adapter expand that adds each
// token's low-rank delta to its logits (xa is the fp32 shrink for every slot, from
// router_gemm_with_shrink), lora_expand_route, the expand and the routing of its output, and
// router_gemm_lora, a LoRA layer's logits in one op (one launch where the decode kernel takes the
// call and was measured faster, else two).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "bindings/common.h"
#include "bindings/ops.h"
#include "kernels/lora_expand.h"
#include "kernels/route.h"
#include "kernels/router_gemm.h"

namespace moegate::bindings {
namespace {

// The adapters' checks shared by the LoRA ops, for M tokens and E experts on `device`: lora_b
// [S, E, R], scaling [S] float32, slot_ids [M] int64, each contiguous and on `device`.
void check_adapters(const char* op, const at::Device& device, int64_t M, int64_t E,
                    const at::Tensor& lora_b, const at::Tensor& scaling, const at::Tensor& slot_ids) {
  for (const at::Tensor* t : {&lora_b, &scaling, &slot_ids}) {
    TORCH_CHECK(t->device() == device, "moegate: ", op, "'s tensors must all be on ", device,
                ", one is on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "moegate: ", op, "'s tensors must be contiguous");
  }
  TORCH_CHECK(lora_b.dim() == 3, "moegate: lora_b must be [S, E, R], got ", shape(lora_b.sizes()));
  TORCH_CHECK(lora_b.size(1) == E, "moegate: lora_b has E=", num(lora_b.size(1)), " but the logits have E=",
              num(E));
  const int64_t S = lora_b.size(0);
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == S && scaling.scalar_type() == at::kFloat,
              "moegate: scaling must be float32 [", num(S), "]");
  TORCH_CHECK(slot_ids.dim() == 1 && slot_ids.size(0) == M && slot_ids.scalar_type() == at::kLong,
              "moegate: slot_ids must be int64 [", num(M), "]");
}

// lora_expand's checks; fills every field of the kernel arguments but `out`.
LoraExpandArgs lora_expand_args(const at::Tensor& logits, const at::Tensor& xa,
                                const at::Tensor& lora_b, const at::Tensor& scaling,
                                const at::Tensor& slot_ids, bool pdl) {
  TORCH_CHECK(logits.is_cuda(), "moegate: logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "moegate: logits must be a contiguous [M, E]");
  TORCH_CHECK(xa.device() == logits.device() && xa.is_contiguous(),
              "moegate: xa must be contiguous on ", logits.device());
  const int64_t M = logits.size(0), E = logits.size(1);
  check_adapters("lora_expand", logits.device(), M, E, lora_b, scaling, slot_ids);
  const int64_t S = lora_b.size(0), R = lora_b.size(2);
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == S * R, "moegate: xa must be [", num(M),
              ", ", num(S * R), "], got ", shape(xa.sizes()));
  TORCH_CHECK(xa.scalar_type() == at::kFloat, "moegate: xa must be float32, got ", xa.scalar_type());
  TORCH_CHECK(M <= INT32_MAX && E * std::max<int64_t>(R, 1) * std::max<int64_t>(S, 1) <= INT32_MAX,
              "moegate: lora_expand sizes must fit in int32");
  LoraExpandArgs args;
  args.logits = logits.data_ptr();
  args.xa = xa.data_ptr<float>();
  args.lora_b = lora_b.data_ptr();
  args.scaling = scaling.data_ptr<float>();
  args.slot_ids = slot_ids.data_ptr<int64_t>();
  args.M = static_cast<int>(M);
  args.E = static_cast<int>(E);
  args.S = static_cast<int>(S);
  args.R = static_cast<int>(R);
  args.logits_dtype = to_dtype(logits.scalar_type());
  args.b_dtype = to_dtype(lora_b.scalar_type());
  args.pdl = pdl;
  args.stream = at::cuda::getCurrentCUDAStream(logits.get_device()).stream();
  return args;
}

}  // namespace

at::Tensor lora_expand(const at::Tensor& logits, const at::Tensor& xa, const at::Tensor& lora_b,
                       const at::Tensor& scaling, const at::Tensor& slot_ids, bool pdl) {
  LoraExpandArgs args = lora_expand_args(logits, xa, lora_b, scaling, slot_ids, pdl);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty_like(logits);
  if (args.M == 0 || args.E == 0) return out;
  if (args.S == 0 || args.R == 0) return out.copy_(logits);
  args.out = out.data_ptr();
  check_launch(launch_lora_expand(args), "lora_expand");
  return out;
}

// lora_expand and the routing of its outputs: one launch where the routing kernels take E and
// top_k (kernels/lora_expand.h), else lora_expand then route_logits. `out` has lora_expand's bits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_route(
    const at::Tensor& logits, const at::Tensor& xa, const at::Tensor& lora_b,
    const at::Tensor& scaling, const at::Tensor& slot_ids, int64_t top_k, c10::string_view scoring,
    bool renormalize, std::optional<at::ScalarType> weights_dtype,
    std::optional<at::ScalarType> ids_dtype, bool pdl) {
  LoraExpandArgs args = lora_expand_args(logits, xa, lora_b, scaling, slot_ids, pdl);
  TORCH_CHECK(args.E >= 1, "moegate: logits must be [M, E >= 1]");
  const c10::cuda::CUDAGuard guard(logits.device());
  RouteOutputs o = allocate_route(logits, args.M, args.E, top_k, scoring, renormalize,
                                  weights_dtype.value_or(logits.scalar_type()),
                                  ids_dtype.value_or(at::kLong));
  if (args.M > 0 && args.S > 0 && args.R > 0 && route_unsupported(o.args, args.E) == nullptr) {
    at::Tensor out = at::empty_like(logits);
    args.out = out.data_ptr();
    check_launch(launch_lora_expand_route(args, o.args), "lora_expand_route");
    return {out, o.weights, o.ids};
  }
  at::Tensor out = lora_expand(logits, xa, lora_b, scaling, slot_ids, pdl);
  route_logits_into(out, o, /*pdl=*/true);  // behind our expand, as route() routes behind its GEMM
  return {out, o.weights, o.ids};
}

at::Tensor router_gemm_lora(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& scaling,
                            const at::Tensor& slot_ids, std::optional<at::ScalarType> out_dtype,
                            bool pdl) {
  check_inputs(x, weight, bias);
  check_inputs(x, lora_a, std::nullopt);
  check_adapters("router_gemm_lora", x.device(), x.size(0), weight.size(0), lora_b, scaling,
                 slot_ids);
  const int64_t S = lora_b.size(0), R = lora_b.size(2);
  TORCH_CHECK(lora_a.size(0) == S * R, "moegate: lora_a must have S * R = ", num(S * R),
              " rows, got ", num(lora_a.size(0)));
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  LoraAdapters lora;
  lora.lora_a = lora_a.data_ptr();
  lora.lora_b = lora_b.data_ptr();
  lora.scaling = scaling.data_ptr<float>();
  lora.slot_ids = slot_ids.data_ptr<int64_t>();
  lora.S = static_cast<int>(S);
  lora.rank = static_cast<int>(R);
  const Route route = args.M > 0 ? route_for(args, is_hopper(x)) : Route::kSimple;
  if (route == Route::kSmallM && S > 0 && R > 0 && lora_b.scalar_type() == at::kBFloat16 &&
      router_gemm_small_m_lora_unsupported(args, lora) == nullptr) {
    at::Tensor out = allocate_out(x, weight, out_type, args);
    check_launch(launch_router_gemm_small_m_lora(args, lora), "router_gemm_lora");
    return out;
  }
  const auto [logits, xa] =
      router_gemm_with_shrink_dispatched(x, weight, bias, lora_a, out_type, args, route);
  // The expand reads that launch's logits and xa only after its grid-dependency wait, and that
  // launch (ours) triggers at entry: PDL-launched behind it whatever `pdl` says, the expand starts
  // and fetches B while it runs (`pdl` governs only the first launch's overlap with the caller's
  // kernel before it).
  return lora_expand(logits, xa, lora_b, scaling, slot_ids, /*pdl=*/true);
}

}  // namespace moegate::bindings
