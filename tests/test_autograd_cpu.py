"""The bindings' autograd formulas (csrc/bindings/autograd.cpp), checked on the CPU.

autograd.cpp is built here with the op schemas of registration.cpp and stand-in CPU kernels (no CUDA
needed): router_gemm computes the logits with PyTorch ops, router_gemm_with_shrink is the two
router_gemm calls it stands for, lora_expand its formula in PyTorch ops, and router_gemm_lora
router_gemm_with_shrink then lora_expand; the fused ones count their calls. In a subprocess, since
the stand-ins register the namespace moegate that a built gate._C registers too. Needs a C++
compiler and ninja; skipped without them.
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
at::Tensor lora_expand(const at::Tensor& logits, const at::Tensor& xa, const at::Tensor& lora_b,
                       const at::Tensor& scaling, const at::Tensor& slot_ids, bool) {
  const int64_t M = logits.size(0), S = lora_b.size(0), R = lora_b.size(2);
  const at::Tensor slot = slot_ids.clamp(0, S - 1);
  const at::Tensor xa_own = xa.view({M, S, R}).gather(1, slot.view({M, 1, 1}).expand({M, 1, R}));
  const at::Tensor b = lora_b.to(at::kFloat).index_select(0, slot);            // [M, E, R]
  const at::Tensor delta =
      at::bmm(b, xa_own.transpose(1, 2)).squeeze(2) * scaling.index_select(0, slot).unsqueeze(1);
  const at::Tensor adapted = (logits.to(at::kFloat) + delta).to(logits.scalar_type());
  return at::where(slot.eq(slot_ids).unsqueeze(1), adapted, logits);
}
int lora_calls = 0;
at::Tensor router_gemm_lora(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& scaling,
                            const at::Tensor& slot_ids, std::optional<at::ScalarType> out_dtype,
                            bool pdl) {
  ++lora_calls;
  const auto [logits, xa] = router_gemm_with_shrink(x, weight, bias, lora_a, out_dtype, pdl);
  --fused_calls;  // counted as the LoRA op's
  return lora_expand(logits, xa, lora_b, scaling, slot_ids, pdl);
}
}  // namespace

SCHEMAS

TORCH_LIBRARY_IMPL(moegate, CPU, m) {
  m.impl("router_gemm", &router_gemm);
  m.impl("router_gemm_with_shrink", &router_gemm_with_shrink);
  m.impl("lora_expand", &lora_expand);
  m.impl("router_gemm_lora", &router_gemm_lora);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("fused_calls", []() { return fused_calls; });
  module.def("lora_calls", []() { return lora_calls; });
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

# router_gemm_lora against router_gemm_with_shrink then lora_expand: 3 slots of rank 4, tokens in
# every slot, -1 and an unchecked id.
S, R4 = 3, 4
lora_a3 = torch.randn(S * R4, K, generator=generator).bfloat16()
lora_b3 = torch.randn(S, E, R4, generator=generator).bfloat16()
scaling3 = torch.rand(S, generator=generator) + 0.5
slot_ids = torch.tensor([0, 1, 2, -1, 0, 5, 2])


def lora_gradients(fused, needs, other_use, out_dtype, with_bias):
    leaves = [t.clone().requires_grad_(need)
              for t, need in zip((x, weight, bias, lora_a3, lora_b3, scaling3), needs)]
    x_, w, b, a, lb, sc = leaves
    b = b if with_bias else None
    before = x_ * 3 if other_use == "before" else None
    if fused:
        out = ops.router_gemm_lora(x_, w, b, a, lb, sc, slot_ids, out_dtype)
    else:
        logits, xa = ops.router_gemm_with_shrink(x_, w, b, a, out_dtype)
        out = ops.lora_expand(logits, xa, lb, sc, slot_ids)
    after = x_ * 5 if other_use == "after" else None
    roots = [(t, g) for t, g in ((out, logits_grads[out_dtype]), (before, x_grad), (after, x_grad))
             if t is not None and t.requires_grad]
    wanted = [leaf for leaf in leaves if leaf.requires_grad and (with_bias or leaf is not leaves[2])]
    grads = (torch.autograd.grad([t for t, _ in roots], wanted, [g for _, g in roots])
             if roots and wanted else ())
    return out, grads


lora_cases = 0
for needs in itertools.product((False, True), repeat=6):
    if not any(needs):
        continue
    for other_use, out_dtype, with_bias in itertools.product(
            (None, "before", "after"), (None, torch.float32), (True, False)):
        case = (needs, other_use, out_dtype, with_bias)
        calls = stand_ins.lora_calls()
        fused_out, fused = lora_gradients(True, needs, other_use, out_dtype, with_bias)
        assert stand_ins.lora_calls() == calls + 1, f"grad mode did not keep the one op: {case}"
        out, separate = lora_gradients(False, needs, other_use, out_dtype, with_bias)
        assert fused_out.requires_grad == out.requires_grad, case
        assert torch.equal(fused_out.detach().view(torch.uint8), out.detach().view(torch.uint8)), case
        assert len(fused) == len(separate), case
        for a, b in zip(fused, separate):
            assert a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                      b.contiguous().view(torch.uint8)), case
        lora_cases += 1
print("lora checked", lora_cases)

# router_gemm's gradients against the PyTorch path's (gate.ops.router_gemm_torch, F.linear between
# .to() casts), whatever out_dtype is: wider, narrower, or the other 16-bit type.
sys.path.insert(0, sys.argv[4])
from gate.ops import router_gemm_torch  # noqa: E402

path_cases = 0
for x_dtype, out_dtype in ((torch.bfloat16, None), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
                           (torch.float16, torch.bfloat16), (torch.float32, torch.float16)):
    inputs = [t.to(x_dtype) for t in (x, weight, bias)]
    grad = logits_grads[torch.float32].to(out_dtype or x_dtype)
    results = []
    for forward in (ops.router_gemm, router_gemm_torch):
        leaves = [t.clone().requires_grad_() for t in inputs]
        results.append(torch.autograd.grad(forward(*leaves, out_dtype), leaves, grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (
            x_dtype, out_dtype)
    path_cases += 1
print("path checked", path_cases)
"""


def test_fused_ops_have_the_gradients_of_the_calls_they_stand_for(tmp_path):
    """Under grad mode each fused op runs once, and its gradients are those of the calls it stands
    for bit for bit: router_gemm_with_shrink's outputs need gradients where the two router_gemm
    calls' did, router_gemm_lora's are router_gemm_with_shrink then lora_expand's; whichever inputs
    need one, whichever outputs are used, with or without bias and a wider out_dtype, and with an x
    that has other uses before and after (autograd sums x's gradients in the order the calls
    gave)."""
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
         str(ROOT / "csrc" / "bindings" / "autograd.cpp"), str(ROOT / "csrc"), str(ROOT)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checked 540" in result.stdout
    assert "lora checked 756" in result.stdout
    assert "path checked 6" in result.stdout
