// What every binding unit shares: the tensor checks of the router ops, the kernel arguments they
// fill, launch checks, and error-message formatting. Inline, so each unit that includes this holds
// the same definitions; the ops themselves are declared in ops.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <optional>
#include <string>

#include "kernels/router_gemm.h"

namespace moegate::bindings {

// Numbers in error messages go through std::to_string, never an ostream: on the H200 image every
// TORCH_CHECK that streamed an integer (x.size(1), sizes()) crashed the process with a segfault
// instead of raising, while messages of strings, dtypes and devices raised cleanly (a libstdc++
// numeric-formatting mismatch between this build and the loaded runtime is the suspect).
inline std::string num(int64_t value) { return std::to_string(value); }

inline std::string shape(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + num(sizes[i]);
  return text + "]";
}

inline DType to_dtype(at::ScalarType type) {
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "moegate: unsupported dtype ", type, " (use bf16, fp16 or fp32)");
  if (type == at::kFloat) return DType::kFloat32;
  return type == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight,
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
inline RouterGemmArgs make_args(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::ScalarType out_type,
                                bool pdl) {
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

inline at::Tensor allocate_out(const at::Tensor& x, const at::Tensor& weight,
                               at::ScalarType out_type, RouterGemmArgs& args) {
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options().dtype(out_type));
  args.out = out.data_ptr();
  return out;
}

inline void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "moegate: launching ", kernel, " failed: ",
              cudaGetErrorString(status));
}

inline bool is_hopper(const at::Tensor& x) {
  return at::cuda::getDeviceProperties(x.get_device())->major == 9;
}

}  // namespace moegate::bindings
