// The routing ops (kernels/route.h): route_logits (top-k and softmax of logits in memory) and
// route (the router GEMM and the routing of its logits, one launch where a Hopper kernel serves the
// router), and the pieces the LoRA ops' lora_expand_route shares: the routing options' checks and
// outputs (allocate_route) and the routing of given logits (route_logits_into).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "bindings/common.h"
#include "bindings/ops.h"
#include "kernels/dispatch.h"
#include "kernels/route.h"
#include "kernels/router_gemm.h"

namespace moegate::bindings {
namespace {

// The ops take scoring by name; unknown names are refused here.
Scoring to_scoring(c10::string_view scoring) {
  if (scoring == "softmax_topk") return Scoring::kSoftmaxTopk;
  TORCH_CHECK(scoring == "softmax", "moegate: scoring must be \"softmax_topk\" or \"softmax\", got \"",
              scoring, "\"");
  return Scoring::kSoftmax;
}

// Routing by PyTorch ops (E above the kernels' 512): the same semantics as kernels/route.h
// (stable descending sort: ties to the lower index, NaN first), in fp32.
void route_with_torch_ops(const at::Tensor& logits, RouteOutputs& o) {
  const at::Tensor values = logits.to(at::kFloat);
  const at::Tensor order = std::get<1>(values.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor ids = order.narrow(1, 0, o.args.top_k);
  const at::Tensor top = values.gather(1, ids);
  at::Tensor weights;
  if (o.args.scoring == Scoring::kSoftmaxTopk) {
    weights = top.softmax(1);
  } else {
    weights = values.softmax(1).gather(1, ids);
    if (o.args.renormalize) weights = weights / weights.sum(1, /*keepdim=*/true);
  }
  o.weights.copy_(weights);
  o.ids.copy_(ids);
}

}  // namespace

RouteOutputs allocate_route(const at::Tensor& like, int64_t M, int64_t E, int64_t top_k,
                            c10::string_view scoring, bool renormalize,
                            at::ScalarType weights_type, at::ScalarType ids_type) {
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moegate: top_k must be in [1, ", num(E), "] for E=",
              num(E), ", got ", num(top_k));
  TORCH_CHECK(ids_type == at::kLong || ids_type == at::kInt, "moegate: ids_dtype must be int64 or "
              "int32, got ", ids_type);
  RouteOutputs o;
  o.args.top_k = static_cast<int>(top_k);
  o.args.scoring = to_scoring(scoring);
  o.args.renormalize = renormalize;
  TORCH_CHECK(!renormalize || o.args.scoring == Scoring::kSoftmax,
              "moegate: renormalize applies to scoring=\"softmax\" only");
  o.args.weights_dtype = to_dtype(weights_type);
  o.args.ids_int64 = ids_type == at::kLong;
  o.weights = at::empty({M, top_k}, like.options().dtype(weights_type));
  o.ids = at::empty({M, top_k}, like.options().dtype(ids_type));
  o.args.weights = o.weights.data_ptr();
  o.args.ids = o.ids.data_ptr();
  return o;
}

void route_logits_into(const at::Tensor& logits, RouteOutputs& o, bool pdl) {
  if (logits.size(0) == 0) return;
  if (route_unsupported(o.args, static_cast<int>(logits.size(1))) != nullptr)
    return route_with_torch_ops(logits, o);
  check_launch(launch_route_logits(logits.data_ptr(), to_dtype(logits.scalar_type()),
                                   static_cast<int>(logits.size(0)),
                                   static_cast<int>(logits.size(1)), o.args, pdl,
                                   at::cuda::getCurrentCUDAStream(logits.get_device()).stream()),
               "route_logits");
}

std::tuple<at::Tensor, at::Tensor> route_logits(const at::Tensor& logits, int64_t top_k,
                                                c10::string_view scoring, bool renormalize,
                                                std::optional<at::ScalarType> weights_dtype,
                                                std::optional<at::ScalarType> ids_dtype, bool pdl) {
  TORCH_CHECK(logits.is_cuda(), "moegate: logits must be a CUDA tensor, got device ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, "moegate: logits must be [M, E >= 1], got ",
              shape(logits.sizes()));
  TORCH_CHECK(logits.size(0) <= INT32_MAX && logits.size(1) <= INT32_MAX,
              "moegate: sizes must fit in int32");
  to_dtype(logits.scalar_type());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor rows = logits.contiguous();
  RouteOutputs o = allocate_route(rows, rows.size(0), rows.size(1), top_k, scoring, renormalize,
                                  weights_dtype.value_or(rows.scalar_type()),
                                  ids_dtype.value_or(at::kLong));
  route_logits_into(rows, o, pdl);
  return {o.weights, o.ids};
}

// The router and the routing of its logits: one launch where the decode kernel serves the router
// call (the last CTA of each token tile routes it, behind `counters`; kernels/route.h), else
// router_gemm then route_logits, launched as router_gemm's programmatic dependent (it reads the
// logits after its grid-dependency wait, whatever ran before). The logits are router_gemm's bits
// either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::Tensor& counters, int64_t top_k, c10::string_view scoring, bool renormalize,
    std::optional<at::ScalarType> out_dtype, std::optional<at::ScalarType> weights_dtype,
    std::optional<at::ScalarType> ids_dtype, bool pdl) {
  check_inputs(x, weight, bias);
  TORCH_CHECK(counters.device() == x.device() && counters.scalar_type() == at::kInt &&
                  counters.dim() == 1 && counters.is_contiguous(),
              "moegate: counters must be a contiguous 1-D int32 tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  RouteOutputs o = allocate_route(x, x.size(0), weight.size(0), top_k, scoring, renormalize,
                                  weights_dtype.value_or(out_type), ids_dtype.value_or(at::kLong));
  const Route path = args.M > 0 ? route_for(args, is_hopper(x)) : Route::kSimple;
  const bool routable = route_unsupported(o.args, args.E) == nullptr;
  if (routable && path == Route::kSmallM) {
    const int needed = router_gemm_small_m_route_counters(args);
    TORCH_CHECK(counters.numel() >= needed, "moegate: route needs ", num(needed),
                " counters for M=", num(args.M), ", got ", num(counters.numel()));
    o.args.counters = reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>());
    o.args.num_counters = static_cast<int>(counters.numel());
    at::Tensor logits = allocate_out(x, weight, out_type, args);
    check_launch(launch_router_gemm_small_m_route(args, o.args), "router_gemm_small_m_route");
    return {o.weights, o.ids, logits};
  }
  at::Tensor logits = router_gemm_dispatched(x, weight, bias, out_type, args, path);
  route_logits_into(logits, o, /*pdl=*/true);
  return {o.weights, o.ids, logits};
}

}  // namespace moegate::bindings
