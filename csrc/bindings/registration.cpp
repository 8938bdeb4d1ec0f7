// Registration: the op schemas torch.ops.moegate.* (TORCH_LIBRARY, this unit only), their CUDA
// kernels (ops.h; the Autograd kernels are registered in autograd.cpp, next to their formulas),
// and the Python module gate._C: kernels_run_on, and `limits`, the kernels' limits and the dispatch
// crossover as the C++ defines them (gate.ops.kernel_limits reads them).
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "bindings/ops.h"
#include "kernels/dispatch.h"
#include "kernels/route.h"
#include "kernels/router_gemm.h"

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
  m.def("router_gemm_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "Tensor scaling, Tensor slot_ids, ScalarType? out_dtype=None, bool pdl=False) -> Tensor");
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
  using namespace moegate::bindings;
  m.impl("router_gemm", &router_gemm);
  m.impl("router_gemm_simple", &router_gemm_simple);
  m.impl("router_gemm_sm90", &router_gemm_sm90);
  m.impl("router_gemm_small_m", &router_gemm_small_m);
  m.impl("router_gemm_route", &router_gemm_route);
  m.impl("router_gemm_with_shrink", &router_gemm_with_shrink);
  m.impl("router_gemm_lora", &router_gemm_lora);
  m.impl("lora_expand", &lora_expand);
  m.impl("route", &route);
  m.impl("route_logits", &route_logits);
  m.impl("lora_expand_route", &lora_expand_route);
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
  // The constants themselves: Python reads them here (gate.ops.kernel_limits), not from copies.
  pybind11::dict limits;
  limits["sm90_max_m"] = moegate::kSm90MaxM;                       // kernels/router_gemm.h
  limits["sm90_max_e"] = moegate::kSm90MaxE;
  limits["small_m_max_m"] = moegate::kSmallMaxM;
  limits["cublas_crossover_macs"] = moegate::kCublasCrossoverMacs;  // kernels/dispatch.h
  limits["route_max_k"] = moegate::kRouteMaxK;                      // kernels/route.h
  limits["route_max_e"] = moegate::kRouteMaxE;
  module.attr("limits") = limits;
}
