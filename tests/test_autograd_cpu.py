"""The bindings' autograd formulas (csrc/bindings/autograd.cpp), checked on the CPU.

autograd.cpp is built here with the op schemas of registration.cpp and stand-in CPU kernels (no CUDA
needed): router_gemm computes the logits with PyTorch ops, and router_gemm_with_shrink is the two
router_gemm calls it stands for, counting its calls. In a subprocess, since the stand-ins register
the namespace moegate that a built gate._C registers too. Needs a C++ compiler and ninja; skipped
without them.
"""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STAND_INS = r"""
#include <torch/extension.h>
#include <torch/library.h>

namespace {
at::Tensor router_gemm(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype, bool) {
  const at::ScalarType out = out_dtype.value_or(x.scalar_type());
  const at::Tensor logits = at::mm(x.to(out), weight.to(out).t());
  return bias.has_value() ? logits + bias->to(out) : logits;
}
int fused_calls = 0;
std::tuple<at::Tensor, at::Tensor> router_gemm_with_shrink(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_a, std::optional<at::ScalarType> out_dtype, bool pdl) {
  ++fused_calls;
  return {router_gemm(x, weight, bias, out_dtype, pdl),
          router_gemm(x, lora_a, std::nullopt, at::kFloat, pdl)};
}
}  // namespace

SCHEMAS

TORCH_LIBRARY_IMPL(moegate, CPU, m) {
  m.impl("router_gemm", &router_gemm);
  m.impl("router_gemm_with_shrink", &router_gemm_with_shrink);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fused_calls", []() { return fused_calls; });
}
"""

CHECKS = r"""
import itertools, sys
import torch
from torch.utils.cpp_extension import load

build = sys.argv[1]
stand_ins = load(name="moegate_autograd_check", sources=[sys.argv[2], build + "/stand_ins.cpp"],
                 extra_include_paths=[sys.argv[3]], extra_cflags=["-O0"], build_directory=build)
ops = torch.ops.moegate
generator = torch.Generator().manual_seed(0)
M, K, E, R = 7, 64, 16, 12
x = (3 * torch.randn(M, K, generator=generator)).bfloat16()
weight = torch.randn(E, K, generator=generator).bfloat16()
bias = torch.randn(E, generator=generator).bfloat16()
lora_a = torch.randn(R, K, generator=generator).bfloat16()
xa_grad, x_grad = torch.randn(M, R, generator=generator), torch.randn(M, K, generator=generator).bfloat16()
logits_grads = {None: torch.randn(M, E, generator=generator).bfloat16(),
                torch.float32: torch.randn(M, E, generator=generator)}


def gradients(fused, needs, used, other_use, out_dtype, with_bias):
    leaves = [t.clone().requires_grad_(need) for t, need in zip((x, weight, bias, lora_a), needs)]
    b = leaves[2] if with_bias else None
    before = leaves[0] * 3 if other_use == "before" else None
    if fused:
        logits, xa = ops.router_gemm_with_shrink(leaves[0], leaves[1], b, leaves[3], out_dtype)
    else:
        logits = ops.router_gemm(leaves[0], leaves[1], b, out_dtype)
        xa = ops.router_gemm(leaves[0], leaves[3], None, torch.float32)
    after = leaves[0] * 5 if other_use == "after" else None
    candidates = ((logits, logits_grads[out_dtype], used[0]), (xa, xa_grad, used[1]),
                  (before, x_grad, True), (after, x_grad, True))
    roots = [(t, g) for t, g, use in candidates
             if use and t is not None and t.requires_grad]
    wanted = [leaf for leaf in leaves if leaf.requires_grad and (with_bias or leaf is not leaves[2])]
    grads = (torch.autograd.grad([t for t, _ in roots], wanted, [g for _, g in roots], allow_unused=True)
             if roots and wanted else ())
    return (logits.requires_grad, xa.requires_grad), grads


cases = 0
for needs in itertools.product((False, True), repeat=4):
    if not any(needs):
        continue
    for used, other_use, out_dtype, with_bias in itertools.product(
            ((True, True), (True, False), (False, True)), (None, "before", "after"),
            (None, torch.float32), (True, False)):
        case = (needs, used, other_use, out_dtype, with_bias)
        calls = stand_ins.fused_calls()
        fused_flags, fused = gradients(True, needs, used, other_use, out_dtype, with_bias)
        assert stand_ins.fused_calls() == calls + 1, f"grad mode did not keep the fused op: {case}"
        flags, separate = gradients(False, needs, used, other_use, out_dtype, with_bias)
        assert fused_flags == flags, case
        assert len(fused) == len(separate), case
        for a, b in zip(fused, separate):
            assert (a is None) == (b is None), case
            assert a is None or (a.dtype == b.dtype and torch.equal(a.view(torch.uint8),
                                                                    b.view(torch.uint8))), case
        cases += 1
print("checked", cases)
"""


def test_router_gemm_with_shrink_has_the_two_calls_gradients(tmp_path):
    """Under grad mode the fused op runs once, its outputs need gradients where the two router_gemm
    calls' did, and its gradients are theirs bit for bit: whichever inputs need one, whichever
    outputs are used, with or without bias and a wider out_dtype, and with an x that has other uses
    before and after (autograd sums x's gradients in the order the two calls gave)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++ compiler")
    if shutil.which("ninja") is None:
        pytest.skip("needs ninja (torch.utils.cpp_extension builds with it)")
    registration = (ROOT / "csrc" / "bindings" / "registration.cpp").read_text()
    schemas = re.search(r"^TORCH_LIBRARY\(moegate, m\) \{.*?^\}", registration, re.S | re.M).group(0)
    (tmp_path / "stand_ins.cpp").write_text(STAND_INS.replace("SCHEMAS", schemas))
    (tmp_path / "checks.py").write_text(textwrap.dedent(CHECKS))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "checks.py"), str(tmp_path),
         str(ROOT / "csrc" / "bindings" / "autograd.cpp"), str(ROOT / "csrc")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checked 540" in result.stdout
