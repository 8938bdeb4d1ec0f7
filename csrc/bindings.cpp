// The one binding file: op schemas (TORCH_LIBRARY), their CUDA implementations (tensor checks,
// allocation, stream), and the Python module gate._C. The math lives in csrc/kernels/.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>

#include "kernels/router_gemm.h"

namespace moegate {
namespace {

// Above this many tokens cuBLAS beats the Hopper kernel (measured on an H200, see
// benchmarks/results/); router_gemm hands such batches to cuBLAS inside the op, so the choice is
// made per call even under torch.compile and CUDA graphs.
constexpr int64_t kCublasCrossoverM = 256;

DType to_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "moegate: unsupported dtype ", type, " (use bf16, fp16 or fp32)");
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "moegate: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "moegate: x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "moegate: weight must be 2-D [E, K], got ", weight.dim(), "-D");
  TORCH_CHECK(weight.device() == x.device(), "moegate: x is on ", x.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(x.size(1) == weight.size(1), "moegate: x has K=", x.size(1), " but weight has K=",
              weight.size(1));
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
                weight.size(0), "], got ", bias->sizes());
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
                               int64_t experts_per_cta) {
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
              "moegate: experts_per_cta must be 0 (auto), 1, 2 or 4, got ", experts_per_cta);
  check_launch(launch_router_gemm_small_m(args, static_cast<int>(experts_per_cta)),
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

// The dispatching op: on Hopper, the decode kernel for M <= 4 and the tensor-core kernel up to
// the cuBLAS crossover; cuBLAS for large bf16/fp16 batches; the foundation kernel for the rest.
at::Tensor router_gemm(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype, bool pdl) {
  check_inputs(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  RouterGemmArgs args = make_args(x, weight, bias, out_type, pdl);
  const bool half_input = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool cublas_out = out_type == x.scalar_type() || (half_input && out_type == at::kFloat);
  if (half_input && cublas_out && args.M > kCublasCrossoverM) {
    return router_gemm_cublas(x, weight, bias, out_type);
  }
  at::Tensor out = allocate_out(x, weight, out_type, args);
  if (args.M == 0) return out;
  // The Hopper kernels' checks include shape, dtype and 16-byte alignment of x and weight.
  if (is_hopper(x) && args.M <= kSmallDispatchMaxM &&
      router_gemm_small_m_unsupported(args) == nullptr) {
    check_launch(launch_router_gemm_small_m(args, 0), "router_gemm_small_m");
    return out;
  }
  if (is_hopper(x) && router_gemm_sm90_unsupported(args) == nullptr) {
    check_launch(launch_router_gemm_sm90(args, RouterGemmSm90Config{}), "router_gemm_sm90");
    return out;
  }
  check_launch(launch_router_gemm_simple(args), "router_gemm_simple");
  return out;
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
        "bool pdl=False, int experts_per_cta=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(moegate, CUDA, m) {
  m.impl("router_gemm", &moegate::router_gemm);
  m.impl("router_gemm_simple", &moegate::router_gemm_simple);
  m.impl("router_gemm_sm90", &moegate::router_gemm_sm90);
  m.impl("router_gemm_small_m", &moegate::router_gemm_small_m);
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
