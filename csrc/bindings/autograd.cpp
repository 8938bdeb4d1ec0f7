// Autograd for the differentiable ops: the formulas (torch::autograd::Function classes, C++ so that
// a call needing no gradient costs no Python) and the Autograd-key kernels, registered here next
// to them. Below autograd each op runs its CUDA kernel (or its fake one while tracing).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace moegate::bindings {
namespace {

// Autograd for the four router ops: logits = x W^T + b, so dx = g W, dW = g^T x and
// db = sum_m g, each product taken in the wider of x's and g's dtypes and cast to its input's
// dtype. These are the products F.linear's backward takes, in the same layouts and dtype, so the
// gradients are the PyTorch path's (gate.ops.router_gemm_torch: F.linear in that dtype, between
// .to() casts where out_dtype differs) and a GateLinear trains the same on every backend. (Without
// this, PyTorch's fallback warned and left x, weight and bias without gradients on the GPU.) C++,
// not torch.library.register_autograd: a Python autograd kernel runs on every call outside
// inference_mode, no_grad included, and a decode-size router's cost is host time.
at::ScalarType compute_type(const at::Tensor& grad, const at::Tensor& x) {
  return at::promote_types(grad.scalar_type(), x.scalar_type());
}
at::Tensor grad_of_x(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  const at::ScalarType compute = compute_type(grad, x);
  return at::mm(grad.to(compute), weight.to(compute)).to(x.scalar_type());
}
at::Tensor grad_of_weight(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  const at::ScalarType compute = compute_type(grad, x);
  return at::mm(grad.t().to(compute), x.to(compute)).to(weight.scalar_type());
}
at::Tensor grad_of_bias(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight) {
  return grad.to(compute_type(grad, x)).sum(0).to(weight.scalar_type());
}

torch::autograd::variable_list router_gemm_grads(torch::autograd::AutogradContext* ctx,
                                                 const at::Tensor& grad, size_t num_inputs) {
  const torch::autograd::variable_list saved = ctx->get_saved_variables();
  const at::Tensor& x = saved[0];
  const at::Tensor& weight = saved[1];
  // Gradients by argument position, none for out_dtype and the launch options; needs_input_grad
  // counts tensor arguments only, so an absent bias has no index.
  torch::autograd::variable_list grads(num_inputs);
  if (ctx->needs_input_grad(0)) grads[0] = grad_of_x(grad, x, weight);
  if (ctx->needs_input_grad(1)) grads[1] = grad_of_weight(grad, x, weight);
  if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2))
    grads[2] = grad_of_bias(grad, x, weight);
  return grads;
}

// Calls op kName (signature Signature) through the dispatcher below autograd: the CUDA kernel, or
// the fake one while tracing. The Autograd kernels below use it both where no gradient is needed
// and inside forward(). The schema lookup happens once per op.
template <const char* kName, typename Signature, typename... Args>
auto call_below_autograd(const Args&... args) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<Signature>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(args...);
}

// The ops' names, for the Autograd kernels' calls below autograd.
constexpr char kRouterGemm[] = "moegate::router_gemm";
constexpr char kRouterGemmSimple[] = "moegate::router_gemm_simple";
constexpr char kRouterGemmSm90[] = "moegate::router_gemm_sm90";
constexpr char kRouterGemmSmallM[] = "moegate::router_gemm_small_m";
constexpr char kRouterGemmWithShrink[] = "moegate::router_gemm_with_shrink";
constexpr char kLoraExpand[] = "moegate::lora_expand";
constexpr char kRouterGemmLora[] = "moegate::router_gemm_lora";

// kOp names the op; Options are its arguments after out_dtype (pdl, tile choices).
template <const char* kOp, typename... Options>
class RouterGemmFunction : public torch::autograd::Function<RouterGemmFunction<kOp, Options...>> {
 public:
  // The Autograd-key kernel. Where nothing will need a gradient (no_grad, or no input requiring
  // one) it goes straight to the kernel, as cheap as before autograd was registered (building
  // the node anyway cost microseconds of host time per eager call; benchmarks/results/README.md,
  // "Host time per eager call, and autograd").
  static at::Tensor call(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias,
                         std::optional<at::ScalarType> out_dtype, Options... options) {
    if (!torch::autograd::compute_requires_grad(x, weight, bias))
      return below_autograd(x, weight, bias, out_dtype, options...);
    return RouterGemmFunction::apply(x, weight, bias, out_dtype, options...);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype, Options... options) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = bias.has_value();
    return below_autograd(x, weight, bias, out_dtype, options...);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return router_gemm_grads(ctx, grads[0], 4 + sizeof...(Options));
  }

 private:
  static at::Tensor below_autograd(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias,
                                   std::optional<at::ScalarType> out_dtype, Options... options) {
    return call_below_autograd<kOp, at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&,
                                               std::optional<at::ScalarType>, Options...)>(
        x, weight, bias, out_dtype, options...);
  }
};

// The gradients of lora_expand's inputs xa, lora_b and scaling (those asked for; xa's value is
// read only for the last two), from its output's gradient `grad`: LoraExpandFunction's formulas
// below, shared with RouterGemmLoraFunction.
struct LoraExpandGrads {
  at::Tensor xa, lora_b, scaling;
};
LoraExpandGrads lora_expand_grads(const at::Tensor& grad, const at::Tensor& xa,
                                  const at::Tensor& lora_b, const at::Tensor& scaling,
                                  const at::Tensor& slot_ids, bool need_xa, bool need_b,
                                  bool need_scaling) {
  const int64_t M = grad.size(0), E = grad.size(1), S = lora_b.size(0), R = lora_b.size(2);
  LoraExpandGrads result;
  if (S == 0 || R == 0) {  // no adapter anywhere: the deltas were empty
    if (need_xa) result.xa = at::zeros({M, S * R}, grad.options().dtype(at::kFloat));
    if (need_b) result.lora_b = at::zeros_like(lora_b);
    if (need_scaling) result.scaling = at::zeros_like(scaling);
    return result;
  }
  const at::Tensor slot = slot_ids.clamp(0, S - 1);
  const at::Tensor has_adapter = slot.eq(slot_ids).unsqueeze(1);
  const at::Tensor delta_grad =
      at::where(has_adapter, grad, at::zeros({}, grad.options())).to(at::kFloat);
  const at::Tensor per_slot = at::zeros({S, M, E}, delta_grad.options())
                                  .scatter_add(0, slot.view({1, M, 1}).expand({1, M, E}),
                                               delta_grad.unsqueeze(0));
  const at::Tensor b = lora_b.to(at::kFloat);
  const at::Tensor scale = scaling.view({S, 1, 1});
  if (need_xa)
    result.xa = at::bmm(per_slot, b * scale).transpose(0, 1).reshape({M, S * R});
  if (need_b || need_scaling) {
    const at::Tensor xa_by_slot = xa.view({M, S, R}).transpose(0, 1).to(at::kFloat);
    const at::Tensor scaled_b_grad = at::bmm(xa_by_slot.transpose(1, 2), per_slot).transpose(1, 2);
    if (need_b) result.lora_b = (scaled_b_grad * scale).to(lora_b.scalar_type());
    if (need_scaling)
      result.scaling =
          (scaled_b_grad * b).sum({1, 2}, /*keepdim=*/true).view({S}).to(scaling.scalar_type());
  }
  return result;
}

// Autograd for lora_expand: the products autograd takes through gate.ops.lora_expand_torch, in
// the same layouts, so the two paths give the same gradients bit for bit (a GateLinearWithLoRA
// passes gradients to x and the base gate on the GPU as on the CPU). With d = per-token delta
// gradients (grad where the token has a valid slot, else 0, in fp32) scattered into their slots'
// rows of P [S, M, E], and B' = scaling * B: dlogits = grad, dxa = P B' (token m's slot block only),
// dB' = (xa_s^T P_s)^T, dB = scaling * dB', dscaling = sum(dB' * B).
class LoraExpandFunction : public torch::autograd::Function<LoraExpandFunction> {
 public:
  static at::Tensor call(const at::Tensor& logits, const at::Tensor& xa, const at::Tensor& lora_b,
                         const at::Tensor& scaling, const at::Tensor& slot_ids, bool pdl) {
    if (!torch::autograd::compute_requires_grad(logits, xa, lora_b, scaling))
      return below_autograd(logits, xa, lora_b, scaling, slot_ids, pdl);
    return LoraExpandFunction::apply(logits, xa, lora_b, scaling, slot_ids, pdl);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& xa, const at::Tensor& lora_b,
                            const at::Tensor& scaling, const at::Tensor& slot_ids, bool pdl) {
    ctx->save_for_backward({xa, lora_b, scaling, slot_ids});
    return below_autograd(logits, xa, lora_b, scaling, slot_ids, pdl);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    torch::autograd::variable_list result(6);  // none for slot_ids and pdl
    if (ctx->needs_input_grad(0)) result[0] = grads[0];
    LoraExpandGrads g = lora_expand_grads(grads[0], saved[0], saved[1], saved[2], saved[3],
                                          ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                          ctx->needs_input_grad(3));
    result[1] = g.xa;
    result[2] = g.lora_b;
    result[3] = g.scaling;
    return result;
  }

 private:
  static at::Tensor below_autograd(const at::Tensor& logits, const at::Tensor& xa,
                                   const at::Tensor& lora_b, const at::Tensor& scaling,
                                   const at::Tensor& slot_ids, bool pdl) {
    return call_below_autograd<kLoraExpand,
                               at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, bool)>(
        logits, xa, lora_b, scaling, slot_ids, pdl);
  }
};

// Autograd for router_gemm_with_shrink, so that grad mode keeps its one launch: the formulas of the
// two router_gemm calls it stands for, logits = router_gemm(x, weight, bias, out_dtype) and
// xa = router_gemm(x, lora_a, None, float32), and their gradients bit for bit. With g the logits'
// gradient and h xa's (fp32): dx = g W + h A, dW = g^T x, db = sum_m g, dA = h^T x, each product
// taken as router_gemm_grads takes it. x enters apply() twice, once per product, so autograd adds
// the two x gradients into x's as it did for the two calls' nodes, and in the same order (the
// shrink's first: its node was the later one), also where x has other uses. An output that nothing
// used brings no gradient (undefined, not zeros: its call's node would not have run), and each
// output needs a gradient exactly where its call's output did (the logits: x, weight or bias; xa: x
// or lora_a).
class RouterGemmWithShrinkFunction
    : public torch::autograd::Function<RouterGemmWithShrinkFunction> {
 public:
  // The Autograd-key kernel; no gradient needed: straight to the kernel, as RouterGemmFunction.
  static std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 const at::Tensor& lora_a,
                                                 std::optional<at::ScalarType> out_dtype,
                                                 bool pdl) {
    if (!torch::autograd::compute_requires_grad(x, weight, bias, lora_a))
      return below_autograd(x, weight, bias, lora_a, out_dtype, pdl);
    const torch::autograd::variable_list outputs =
        RouterGemmWithShrinkFunction::apply(x, lora_a, x, weight, bias, out_dtype, pdl);
    return {outputs[0], outputs[1]};
  }

  // The tensor arguments in needs_input_grad's numbering: 0 x (the shrink's), 1 lora_a, 2 x (the
  // logits'), 3 weight, 4 bias where given (last, so that its absence moves no other index).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& /*x, the shrink's*/,
                                                const at::Tensor& lora_a, const at::Tensor& x,
                                                const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                std::optional<at::ScalarType> out_dtype, bool pdl) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, lora_a});
    ctx->saved_data["bias"] = bias.has_value();
    auto [logits, xa] = below_autograd(x, weight, bias, lora_a, out_dtype, pdl);
    torch::autograd::variable_list without_gradient;
    const bool bias_needs_grad = bias.has_value() && bias->requires_grad();
    if (!x.requires_grad() && !weight.requires_grad() && !bias_needs_grad)
      without_gradient.push_back(logits);
    if (!x.requires_grad() && !lora_a.requires_grad()) without_gradient.push_back(xa);
    if (!without_gradient.empty()) ctx->mark_non_differentiable(without_gradient);
    return {logits, xa};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2];
    const at::Tensor &logits_grad = grads[0], &xa_grad = grads[1];
    torch::autograd::variable_list result(7);  // by argument position; none for out_dtype and pdl
    if (xa_grad.defined()) {
      if (ctx->needs_input_grad(0)) result[0] = grad_of_x(xa_grad, x, lora_a);
      if (ctx->needs_input_grad(1)) result[1] = grad_of_weight(xa_grad, x, lora_a);
    }
    if (logits_grad.defined()) {
      if (ctx->needs_input_grad(2)) result[2] = grad_of_x(logits_grad, x, weight);
      if (ctx->needs_input_grad(3)) result[3] = grad_of_weight(logits_grad, x, weight);
      if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(4))
        result[4] = grad_of_bias(logits_grad, x, weight);
    }
    return result;
  }

 private:
  static std::tuple<at::Tensor, at::Tensor> below_autograd(
      const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& lora_a, std::optional<at::ScalarType> out_dtype, bool pdl) {
    return call_below_autograd<kRouterGemmWithShrink,
                               std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, const at::Tensor&,
                                   std::optional<at::ScalarType>, bool)>(x, weight, bias, lora_a,
                                                                         out_dtype, pdl);
  }
};

// Autograd for router_gemm_lora, so that grad mode keeps its one launch: the formulas of the two
// ops it stands for, (logits, xa) = router_gemm_with_shrink(x, weight, bias, lora_a) and
// out = lora_expand(logits, xa, lora_b, scaling, slot_ids), and their gradients bit for bit. The
// backward recomputes xa (router_gemm_with_shrink, which gives the fused launch's xa bits) where
// lora_b or scaling needs a gradient. With g the output's gradient: the logits' gradient is g, xa's
// is lora_expand_grads's, and then RouterGemmWithShrinkFunction's products, with x entering
// apply() twice in the same order, so autograd adds its two gradients as it did there.
class RouterGemmLoraFunction : public torch::autograd::Function<RouterGemmLoraFunction> {
 public:
  static at::Tensor call(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                         const at::Tensor& lora_b, const at::Tensor& scaling,
                         const at::Tensor& slot_ids, std::optional<at::ScalarType> out_dtype,
                         bool pdl) {
    if (!torch::autograd::compute_requires_grad(x, weight, bias, lora_a, lora_b, scaling))
      return below_autograd(x, weight, bias, lora_a, lora_b, scaling, slot_ids, out_dtype, pdl);
    return RouterGemmLoraFunction::apply(x, lora_a, x, weight, lora_b, scaling, slot_ids, bias,
                                         out_dtype, pdl);
  }

  // The tensor arguments in needs_input_grad's numbering: 0 x (the shrink's), 1 lora_a, 2 x (the
  // logits'), 3 weight, 4 lora_b, 5 scaling, 6 slot_ids, 7 bias where given (last, so that its
  // absence moves no other index).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& /*x*/,
                            const at::Tensor& lora_a, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& lora_b, const at::Tensor& scaling,
                            const at::Tensor& slot_ids, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype, bool pdl) {
    ctx->save_for_backward({x, weight, lora_a, lora_b, scaling, slot_ids});
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["pdl"] = pdl;
    return below_autograd(x, weight, bias, lora_a, lora_b, scaling, slot_ids, out_dtype, pdl);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3],
                     &scaling = saved[4], &slot_ids = saved[5];
    const at::Tensor& grad = grads[0];
    const bool need_xa = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    const bool need_b = ctx->needs_input_grad(4), need_scaling = ctx->needs_input_grad(5);
    at::Tensor xa;
    if (need_b || need_scaling)
      xa = std::get<1>(call_below_autograd<kRouterGemmWithShrink,
                                           std::tuple<at::Tensor, at::Tensor>(
                                               const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const at::Tensor&,
                                               std::optional<at::ScalarType>, bool)>(
          x, weight, std::optional<at::Tensor>(), lora_a, std::optional<at::ScalarType>(),
          ctx->saved_data["pdl"].toBool()));
    const LoraExpandGrads expand =
        lora_expand_grads(grad, xa, lora_b, scaling, slot_ids, need_xa, need_b, need_scaling);
    torch::autograd::variable_list result(10);  // by argument position; none for the options
    if (need_xa) {
      if (ctx->needs_input_grad(0)) result[0] = grad_of_x(expand.xa, x, lora_a);
      if (ctx->needs_input_grad(1)) result[1] = grad_of_weight(expand.xa, x, lora_a);
    }
    if (ctx->needs_input_grad(2)) result[2] = grad_of_x(grad, x, weight);
    if (ctx->needs_input_grad(3)) result[3] = grad_of_weight(grad, x, weight);
    result[4] = expand.lora_b;
    result[5] = expand.scaling;
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(7))
      result[7] = grad_of_bias(grad, x, weight);
    return result;
  }

 private:
  static at::Tensor below_autograd(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                   const at::Tensor& lora_b, const at::Tensor& scaling,
                                   const at::Tensor& slot_ids,
                                   std::optional<at::ScalarType> out_dtype, bool pdl) {
    return call_below_autograd<kRouterGemmLora,
                               at::Tensor(const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          std::optional<at::ScalarType>, bool)>(
        x, weight, bias, lora_a, lora_b, scaling, slot_ids, out_dtype, pdl);
  }
};

}  // namespace
}  // namespace moegate::bindings

TORCH_LIBRARY_IMPL(moegate, Autograd, m) {
  using namespace moegate::bindings;
  m.impl("router_gemm", &RouterGemmFunction<kRouterGemm, bool>::call);
  m.impl("router_gemm_simple", &RouterGemmFunction<kRouterGemmSimple>::call);
  m.impl("router_gemm_sm90",
         &RouterGemmFunction<kRouterGemmSm90, bool, int64_t, int64_t, int64_t>::call);
  m.impl("router_gemm_small_m",
         &RouterGemmFunction<kRouterGemmSmallM, bool, int64_t, int64_t>::call);
  m.impl("router_gemm_with_shrink", &RouterGemmWithShrinkFunction::call);
  m.impl("lora_expand", &LoraExpandFunction::call);
  m.impl("router_gemm_lora", &RouterGemmLoraFunction::call);
}
