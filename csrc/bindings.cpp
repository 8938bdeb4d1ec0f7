// The one binding file: op schemas (TORCH_LIBRARY), their CUDA implementations (tensor checks,
// allocation, stream), and the Python module gate._C. The math lives in csrc/kernels/.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "kernels/lora_expand.h"
#include "kernels/route.h"
#include "kernels/router_gemm.h"

namespace moegate {
namespace {

// cuBLAS beats the Hopper kernels once a call holds more than about 160M multiply-adds (cold tile
// sweeps, benchmarks/results/README.md, the `_tune` files). router_gemm hands such calls to cuBLAS
// inside the op, so the choice is made per call even under torch.compile and CUDA graphs.
constexpr int64_t kCublasCrossoverMacs = 160'000'000;

// Numbers in error messages go through std::to_string, never an ostream: on the H200 image every
// TORCH_CHECK that streamed an integer (x.size(1), sizes()) crashed the process with a segfault
// instead of raising, while messages of strings, dtypes and devices raised cleanly (a libstdc++
// numeric-formatting mismatch between this build and the loaded runtime is the suspect).
std::string num(int64_t value) { return std::to_string(value); }

std::string shape(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + num(sizes[i]);
  return text + "]";
}

DType to_dtype(at::ScalarType type) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "moegate: unsupported dtype ", type, " (use bf16, fp16 or fp32)");
  if (type == at::kFloat) return DType::kFloat32;
  return type == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "moegate: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "moegate: x must be 2-D [M, K], got ", num(x.dim()), "-D");
  TORCH_CHECK(weight.dim() == 2, "moegate: weight must be 2-D [E, K], got ", num(weight.dim()), "-D");
  TORCH_CHECK(weight.device() == x.device(), "moegate: x is on ", x.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(x.size(1) == weight.size(1), "moegate: x has K=", num(x.size(1)), " but weight has K=",
              num(weight.size(1)));
  TORCH_CHECK(weight.size(0) >= 1, "moegate: weight has E=0 experts");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "moegate: x is ", x.scalar_type(),
              " but weight is ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(),
              "moegate: x and weight must be contiguous (the ops layer makes them so)");
  TORCH_CHECK(x.size(0) <= INT32_MAX && weight.size(0) <= INT32_MAX && x.size(1) <= INT32_MAX,
              "moegate: sizes must fit in int32");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device(), "moegate: bias is on ", bias->device(),
                " but x is on ", x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "moegate: bias must be [",
                num(weight.size(0)), "], got ", shape(bias->sizes()));
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "moegate: bias is ",
                bias->scalar_type(), " but weight is ", weight.scalar_type());
    TORCH_CHECK(bias->is_contiguous(), "moegate: bias must be contiguous");
  }
}

// Fills the kernel arguments; the output is allocated by the caller that
// launches a kernel (the cuBLAS path allocates its own).
// Callers run check_inputs first (before their device guard).
RouterGemmArgs make_args(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, at::ScalarType out_type, bool pdl) {
  RouterGemmArgs a;
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.M = static_cast<int>(x.size(0));
  a.E = static_cast<int>(weight.size(0));
  a.K = static_cast<int>(x.size(1));
  a.in_dtype = to_dtype(x.scalar_type());
  a.out_dtype = to_dtype(out_type);
  a.pdl = pdl;
  a.stream = at::cuda::getCurrentCUDAStream(x.get_device()).stream();
  return a;
}

at::Tensor allocate_out(const at::Tensor& x, const at::Tensor& weight, at::ScalarType out_type,
                        RouterGemmArgs& args) {
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options().dtype(out_type));
  args.out = out.data_ptr();
  return out;
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "moegate: launching ", kernel, " failed: ",
              cudaGetErrorString(status));
}

bool is_hopper(const at::Tensor& x) {
  return at::cuda::getDeviceProperties(x.get_device())->major == 9;
}

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
  TORCH_CHECK(is_hopper(x), "moegate: router_gemm_sm90 needs a Hopper (sm_90) GPU");
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  at::Tensor out = allocate_out(x, weight, out_type, args);
  if (args.M == 0) return out;
  const char* why_not = router_gemm_sm90_unsupported(args);
  TORCH_CHECK(why_not == nullptr, "moegate: router_gemm_sm90 cannot take these inputs: ", why_not);
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
  TORCH_CHECK(is_hopper(x), "moegate: router_gemm_small_m needs a Hopper (sm_90) GPU");
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  at::Tensor out = allocate_out(x, weight, out_type, args);
  if (args.M == 0) return out;
  const char* why_not = router_gemm_small_m_unsupported(args);
  TORCH_CHECK(why_not == nullptr, "moegate: router_gemm_small_m cannot take these inputs: ", why_not);
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

at::Tensor router_gemm_cublas(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::ScalarType out_type) {
  if (out_type == x.scalar_type()) {
    return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  // fp32 logits straight from cuBLAS's fp32 accumulator.
  return bias.has_value() ? at::addmm(bias->to(at::kFloat), x, weight.t(), out_type)
                          : at::mm(x, weight.t(), out_type);
}

// What the dispatching op runs; the values are router_gemm_route's (gate/ops.py names them).
enum class Route : int64_t { kCublas = 0, kSmallM = 1, kSm90 = 2, kSimple = 3 };

// On Hopper, the decode kernel for small M (router_gemm_small_m_preferred, or whenever it alone
// takes the call) and the tensor-core kernel up to the cuBLAS crossover; cuBLAS for large
// bf16/fp16 calls; the foundation kernel for everything else.
Route route_for(const at::Tensor& x, const RouterGemmArgs& a) {
  const bool half_input = a.in_dtype != DType::kFloat32;
  const bool cublas_out = a.out_dtype == a.in_dtype || (half_input && a.out_dtype == DType::kFloat32);
  if (half_input && cublas_out &&
      (a.M > kSm90MaxM || int64_t{a.M} * a.E * a.K > kCublasCrossoverMacs)) {
    return Route::kCublas;
  }
  if (is_hopper(x)) {
    // The kernels' checks include shape, dtype and 16-byte alignment of x and weight.
    const bool small_m_ok = router_gemm_small_m_unsupported(a) == nullptr;
    if (small_m_ok && router_gemm_small_m_preferred(a)) return Route::kSmallM;
    if (router_gemm_sm90_unsupported(a) == nullptr) return Route::kSm90;
    if (small_m_ok) return Route::kSmallM;
  }
  return Route::kSimple;
}

at::Tensor router_gemm(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype, bool pdl) {
  check_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  const Route route = route_for(x, args);
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
  return static_cast<int64_t>(route_for(x, args));  // the same with or without PDL
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
  const int rows = static_cast<int>(lora_a.size(0));
  const void* a = lora_a.data_ptr();
  const Route route = args.M > 0 ? route_for(x, args) : Route::kSimple;
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
  return {router_gemm(x, weight, bias, out_dtype, pdl),
          router_gemm(x, lora_a, std::nullopt, at::kFloat, pdl)};
}

// Routing (kernels/route.h). The ops take scoring by name; unknown names are refused here.
Scoring to_scoring(c10::string_view scoring) {
  if (scoring == "softmax_topk") return Scoring::kSoftmaxTopk;
  TORCH_CHECK(scoring == "softmax", "moegate: scoring must be \"softmax_topk\" or \"softmax\", got \"",
              scoring, "\"");
  return Scoring::kSoftmax;
}

// The routing outputs of M tokens, allocated, and the RouteArgs that point at them.
struct RouteOutputs {
  at::Tensor weights, ids;
  RouteArgs args;
};

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

// Routes logits [M, E] into `o`: one launch of the routing kernel, or PyTorch ops past 512 experts.
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

// The router and the routing of its logits: one launch where the decode or the tensor-core kernel
// serves the router call (the last CTA of each token tile routes it, behind `counters`), else
// router_gemm then route_logits. The logits are router_gemm's bits either way.
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
  const Route path = args.M > 0 ? route_for(x, args) : Route::kSimple;
  const bool routable = route_unsupported(o.args, args.E) == nullptr;
  if (routable && (path == Route::kSmallM || path == Route::kSm90)) {
    const int needed = path == Route::kSmallM ? router_gemm_small_m_route_counters(args)
                                              : router_gemm_sm90_route_counters(args);
    TORCH_CHECK(counters.numel() >= needed, "moegate: route needs ", num(needed),
                " counters for M=", num(args.M), ", got ", num(counters.numel()));
    o.args.counters = reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>());
    o.args.num_counters = static_cast<int>(counters.numel());
    at::Tensor logits = allocate_out(x, weight, out_type, args);
    check_launch(path == Route::kSmallM ? launch_router_gemm_small_m_route(args, o.args)
                                        : launch_router_gemm_sm90_route(args, o.args),
                 "router_gemm_route");
    return {o.weights, o.ids, logits};
  }
  at::Tensor logits = router_gemm(x, weight, bias, out_dtype, pdl);
  route_logits_into(logits, o, pdl);
  return {o.weights, o.ids, logits};
}

// Autograd for the four router ops: logits = x W^T + b, so dx = g W, dW = g^T x and
// db = sum_m g, each product taken in g's dtype and cast to its input's dtype. These are the
// products F.linear's backward takes, in the same layouts, so the gradients are the PyTorch
// path's (gate.ops.router_gemm_torch: F.linear, after .to() where out_dtype is wider) and a
// GateLinear trains the same on every backend. (Without this, PyTorch's fallback warned and left
// x, weight and bias without gradients on the GPU.) C++, not torch.library.register_autograd: a
// Python autograd kernel runs on every call outside inference_mode, no_grad included, and a
// decode-size router's cost is host time.
torch::autograd::variable_list router_gemm_grads(torch::autograd::AutogradContext* ctx,
                                                 const at::Tensor& grad, size_t num_inputs) {
  const torch::autograd::variable_list saved = ctx->get_saved_variables();
  const at::Tensor& x = saved[0];
  const at::Tensor& weight = saved[1];
  const at::ScalarType type = grad.scalar_type();
  // Gradients by argument position, none for out_dtype and the launch options; needs_input_grad
  // counts tensor arguments only, so an absent bias has no index.
  torch::autograd::variable_list grads(num_inputs);
  if (ctx->needs_input_grad(0)) grads[0] = at::mm(grad, weight.to(type)).to(x.scalar_type());
  if (ctx->needs_input_grad(1)) grads[1] = at::mm(grad.t(), x.to(type)).to(weight.scalar_type());
  if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2))
    grads[2] = grad.sum(0).to(weight.scalar_type());
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
    const at::Tensor &xa = saved[0], &lora_b = saved[1], &scaling = saved[2], &slot_ids = saved[3];
    const at::Tensor& grad = grads[0];
    const int64_t M = grad.size(0), E = grad.size(1), S = lora_b.size(0), R = lora_b.size(2);
    torch::autograd::variable_list result(6);  // none for slot_ids and pdl
    if (ctx->needs_input_grad(0)) result[0] = grad;
    if (S == 0 || R == 0) {  // no adapter anywhere: the deltas were empty
      if (ctx->needs_input_grad(1)) result[1] = at::zeros_like(xa);
      if (ctx->needs_input_grad(2)) result[2] = at::zeros_like(lora_b);
      if (ctx->needs_input_grad(3)) result[3] = at::zeros_like(scaling);
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
    if (ctx->needs_input_grad(1)) {
      result[1] =
          at::bmm(per_slot, b * scale).to(xa.scalar_type()).transpose(0, 1).reshape({M, S * R});
    }
    if (ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
      const at::Tensor xa_by_slot = xa.view({M, S, R}).transpose(0, 1).to(at::kFloat);
      const at::Tensor scaled_b_grad =
          at::bmm(xa_by_slot.transpose(1, 2), per_slot).transpose(1, 2);
      if (ctx->needs_input_grad(2)) result[2] = (scaled_b_grad * scale).to(lora_b.scalar_type());
      if (ctx->needs_input_grad(3)) {
        result[3] =
            (scaled_b_grad * b).sum({1, 2}, /*keepdim=*/true).view({S}).to(scaling.scalar_type());
      }
    }
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

// The Autograd kernel of router_gemm_with_shrink: where a gradient is needed, the two router_gemm
// calls it stands for, each with its formula; else the fused op.
std::tuple<at::Tensor, at::Tensor> router_gemm_with_shrink_autograd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, std::optional<at::ScalarType> out_dtype, bool pdl) {
  using RouterGemm = RouterGemmFunction<kRouterGemm, bool>;
  if (torch::autograd::compute_requires_grad(x, weight, bias, lora_a)) {
    return {RouterGemm::call(x, weight, bias, out_dtype, pdl),
            RouterGemm::call(x, lora_a, std::nullopt, at::kFloat, pdl)};
  }
  return call_below_autograd<kRouterGemmWithShrink,
                             std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, const at::Tensor&,
                                 std::optional<at::ScalarType>, bool)>(x, weight, bias, lora_a,
                                                                       out_dtype, pdl);
}

// The multi-adapter LoRA expand (kernels/lora_expand.h); xa is the fp32 shrink for every slot.
// lora_expand's checks; fills every field of the kernel arguments but `out`.
LoraExpandArgs lora_expand_args(const at::Tensor& logits, const at::Tensor& xa,
                                const at::Tensor& lora_b, const at::Tensor& scaling,
                                const at::Tensor& slot_ids, bool pdl) {
  TORCH_CHECK(logits.is_cuda(), "moegate: logits must be a CUDA tensor, got device ", logits.device());
  for (const at::Tensor* t : {&xa, &lora_b, &scaling, &slot_ids}) {
    TORCH_CHECK(t->device() == logits.device(), "moegate: lora_expand's tensors must all be on ",
                logits.device(), ", one is on ", t->device());
    TORCH_CHECK(t->is_contiguous(), "moegate: lora_expand's tensors must be contiguous");
  }
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "moegate: logits must be a contiguous [M, E]");
  TORCH_CHECK(lora_b.dim() == 3, "moegate: lora_b must be [S, E, R], got ", shape(lora_b.sizes()));
  const int64_t M = logits.size(0), E = logits.size(1), S = lora_b.size(0), R = lora_b.size(2);
  TORCH_CHECK(lora_b.size(1) == E, "moegate: lora_b has E=", num(lora_b.size(1)), " but logits have E=", num(E));
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) == S * R, "moegate: xa must be [", num(M),
              ", ", num(S * R), "], got ", shape(xa.sizes()));
  TORCH_CHECK(xa.scalar_type() == at::kFloat, "moegate: xa must be float32, got ", xa.scalar_type());
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == S && scaling.scalar_type() == at::kFloat,
              "moegate: scaling must be float32 [", num(S), "]");
  TORCH_CHECK(slot_ids.dim() == 1 && slot_ids.size(0) == M && slot_ids.scalar_type() == at::kLong,
              "moegate: slot_ids must be int64 [", num(M), "]");
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
  route_logits_into(out, o, pdl);
  return {out, o.weights, o.ids};
}

}  // namespace
}  // namespace moegate

TORCH_LIBRARY(moegate, m) {
  m.def("router_gemm(Tensor x, Tensor weight, Tensor? bias, ScalarType? out_dtype=None, "
        "bool pdl=False) -> Tensor");
  m.def("router_gemm_simple(Tensor x, Tensor weight, Tensor? bias, ScalarType? out_dtype=None) "
        "-> Tensor");
  m.def("router_gemm_sm90(Tensor x, Tensor weight, Tensor? bias, ScalarType? out_dtype=None, "
        "bool pdl=False, int expert_tiles=0, int token_tiles=0, int cluster=0) -> Tensor");
  m.def("router_gemm_small_m(Tensor x, Tensor weight, Tensor? bias, ScalarType? out_dtype=None, "
        "bool pdl=False, int experts_per_cta=0, int tokens_per_cta=0) -> Tensor");
  m.def("router_gemm_route(Tensor x, Tensor weight, ScalarType? out_dtype=None) -> int");
  m.def("router_gemm_with_shrink(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, "
        "ScalarType? out_dtype=None, bool pdl=False) -> (Tensor, Tensor)");
  m.def("lora_expand(Tensor logits, Tensor xa, Tensor lora_b, Tensor scaling, Tensor slot_ids, "
        "bool pdl=False) -> Tensor");
  m.def("route(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) counters, int top_k, "
        "str scoring=\"softmax_topk\", bool renormalize=False, ScalarType? out_dtype=None, "
        "ScalarType? weights_dtype=None, ScalarType? ids_dtype=None, bool pdl=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("lora_expand_route(Tensor logits, Tensor xa, Tensor lora_b, Tensor scaling, "
        "Tensor slot_ids, int top_k, str scoring=\"softmax_topk\", bool renormalize=False, "
        "ScalarType? weights_dtype=None, ScalarType? ids_dtype=None, bool pdl=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("route_logits(Tensor logits, int top_k, str scoring=\"softmax_topk\", "
        "bool renormalize=False, ScalarType? weights_dtype=None, ScalarType? ids_dtype=None, "
        "bool pdl=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moegate, CUDA, m) {
  m.impl("router_gemm", &moegate::router_gemm);
  m.impl("router_gemm_simple", &moegate::router_gemm_simple);
  m.impl("router_gemm_sm90", &moegate::router_gemm_sm90);
  m.impl("router_gemm_small_m", &moegate::router_gemm_small_m);
  m.impl("router_gemm_route", &moegate::router_gemm_route);
  m.impl("router_gemm_with_shrink", &moegate::router_gemm_with_shrink);
  m.impl("lora_expand", &moegate::lora_expand);
  m.impl("route", &moegate::route);
  m.impl("route_logits", &moegate::route_logits);
  m.impl("lora_expand_route", &moegate::lora_expand_route);
}

TORCH_LIBRARY_IMPL(moegate, Autograd, m) {
  using moegate::RouterGemmFunction;
  m.impl("router_gemm", &RouterGemmFunction<moegate::kRouterGemm, bool>::call);
  m.impl("router_gemm_simple", &RouterGemmFunction<moegate::kRouterGemmSimple>::call);
  m.impl("router_gemm_sm90",
         &RouterGemmFunction<moegate::kRouterGemmSm90, bool, int64_t, int64_t, int64_t>::call);
  m.impl("router_gemm_small_m",
         &RouterGemmFunction<moegate::kRouterGemmSmallM, bool, int64_t, int64_t>::call);
  m.impl("router_gemm_with_shrink", &moegate::router_gemm_with_shrink_autograd);
  m.impl("lora_expand", &moegate::LoraExpandFunction::call);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "moegate's CUDA kernels; the ops are torch.ops.moegate.*, wrapped by gate.ops";
  module.def(
      "kernels_run_on",
      [](int device) {
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        return moegate::kernels_run_on_current_device();
      },
      "Whether this build holds machine code that CUDA device `device` can run");
}
