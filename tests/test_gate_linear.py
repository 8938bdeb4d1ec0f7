"""GateLinear and the ops layer on the CPU: float64 reference, odd shapes, bad inputs, compile."""

import pytest
import torch
from torch import nn

import gate
from gate import GateLinear, ops


def reference_logits(x, weight, bias):
    """float64 on the same (already rounded) inputs: the answer every path approximates."""
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def rel_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_gate(K, E, bias, dtype, generator):
    layer = GateLinear(K, E, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(E, K, generator=generator) / K**0.5)
        if bias:
            layer.bias.copy_(torch.randn(E, generator=generator))
    return layer


@pytest.mark.parametrize("K", [8, 360, 2880, 7168])
@pytest.mark.parametrize("E", [8, 32, 128, 256])
@pytest.mark.parametrize("M", [0, 1, 7, 128, 1000])
def test_matches_float64_reference(K, E, M):
    generator = torch.Generator().manual_seed(K * 1_000_003 + E * 1009 + M)
    for bias in (True, False):
        layer = random_gate(K, E, bias, torch.bfloat16, generator)
        x = torch.randn(M, K, generator=generator).to(torch.bfloat16)
        out = layer(x)
        assert out.shape == (M, E) and out.dtype == torch.bfloat16
        if M == 0:
            continue
        ref = reference_logits(x, layer.weight, layer.bias)
        assert torch.isfinite(out).all()
        # bf16 output: the one rounding to bf16 bounds the error (2^-8 relative, with slack for
        # the bias add rounding of F.linear).
        assert rel_error(out, ref) < 8e-3


@pytest.mark.parametrize("M,K,E", [(1, 360, 32), (17, 2880, 128), (100, 7168, 256)])
def test_fp32_logits_skip_bf16_rounding(M, K, E):
    generator = torch.Generator().manual_seed(M + K + E)
    layer = random_gate(K, E, True, torch.bfloat16, generator)
    layer.out_dtype = torch.float32
    x = torch.randn(M, K, generator=generator).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.float32
    ref = reference_logits(x, layer.weight, layer.bias)
    assert rel_error(out, ref) < 1e-5  # fp32 accumulation, no bf16 rounding of the result


def test_constructor_out_dtype_and_3d_input():
    generator = torch.Generator().manual_seed(3)
    layer = GateLinear(64, 16, out_dtype=torch.float32, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64, generator=generator).to(torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 5, 16) and out.dtype == torch.float32
    flat = layer(x.reshape(10, 64))
    assert torch.equal(out.reshape(10, 16), flat)


def test_bitwise_equal_to_nn_linear_on_cpu():
    linear = nn.Linear(360, 32, dtype=torch.bfloat16)
    layer = GateLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(33, 360).to(torch.bfloat16)
    assert torch.equal(layer(x), linear(x))
    # Inputs of more dimensions: nn.Linear's bits where it adds the bias inside the product
    # (contiguous inputs); a non-contiguous one it computes as matmul, then the bias, two roundings
    # of the logits, where GateLinear keeps its one (its bits are nn.Linear's of x.contiguous()).
    for dtype in (torch.float32, torch.bfloat16):
        linear = nn.Linear(2880, 32, dtype=dtype)
        layer = GateLinear.from_linear(linear)
        for x in (torch.randn(3, 5, 2880).to(dtype), torch.randn(2, 3, 4, 2880).to(dtype)):
            assert torch.equal(layer(x), linear(x))
        for x in (torch.randn(5, 3, 2880).to(dtype).transpose(0, 1),
                  torch.randn(3, 5, 5760).to(dtype)[..., ::2]):
            assert torch.equal(layer(x), linear(x.contiguous()))


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_gradients_on_cpu_are_nn_linears(out_dtype):
    """The GPU tests hold the kernels' gradients to this same path (test_router_gemm_gpu.py)."""
    linear = nn.Linear(360, 32, dtype=torch.bfloat16)
    layer = GateLinear.from_linear(linear, out_dtype=out_dtype)
    x = torch.randn(9, 360).to(torch.bfloat16)
    grad_out = torch.randn(9, 32).to(out_dtype or torch.bfloat16)
    wide = out_dtype or torch.bfloat16
    reference = nn.Linear(360, 32, dtype=wide)
    results = []
    for module in (layer, lambda x: reference(x.to(wide))):
        with torch.no_grad():
            reference.weight.copy_(linear.weight)
            reference.bias.copy_(linear.bias)
        x_leaf = x.clone().requires_grad_()
        params = [layer.weight, layer.bias] if module is layer else [reference.weight, reference.bias]
        results.append(torch.autograd.grad(module(x_leaf), [x_leaf, *params], grad_out))
    for name, ours, theirs in zip(("x", "weight", "bias"), *results):
        assert ours.dtype == x.dtype and torch.equal(ours, theirs.to(x.dtype)), name
    with torch.no_grad():
        assert not layer(x).requires_grad


def test_state_dict_round_trip_with_nn_linear():
    linear = nn.Linear(48, 8)
    layer = GateLinear(48, 8)
    layer.load_state_dict(linear.state_dict())
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    back = nn.Linear(48, 8)
    back.load_state_dict(layer.state_dict())
    x = torch.randn(4, 48)
    assert torch.equal(back(x), linear(x))
    assert set(layer.state_dict()) == {"weight", "bias"}
    no_bias = GateLinear(48, 8, bias=False)
    assert set(no_bias.state_dict()) == {"weight"}


def test_backend_is_torch_on_cpu_and_decided_once():
    layer = GateLinear(16, 8)
    assert layer.backend == "torch"
    assert ops.backend_for(torch.device("cpu"), torch.bfloat16) == "torch"
    assert "backend='torch'" in repr(layer)
    layer.to(torch.bfloat16)
    assert layer.backend == ops.backend_for(layer.weight.device, torch.bfloat16)


def test_inputs_on_another_device_or_dtype_say_the_fix():
    layer = GateLinear(16, 8)
    with pytest.raises(ValueError, match=r"x is on meta .* on cpu: move the input \(x.to\('cpu'\)\)"):
        layer(torch.randn(2, 16, device="meta"))
    with pytest.raises(ValueError, match=r"cast the input \(x.to\(torch.float32\)\) or the router "
                                         r"\(.to\(torch.bfloat16\)\)"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"x has K=12 .* K=16"):
        layer.route(torch.randn(3, 12), 2)
    with pytest.raises(ValueError, match="0-d"):
        layer(torch.tensor(1.0))


def test_non_contiguous_input_is_correct():
    generator = torch.Generator().manual_seed(5)
    layer = random_gate(64, 8, True, torch.float32, generator)
    wide = torch.randn(64, 10, generator=generator)
    x = wide.t()  # [10, 64], not contiguous
    assert not x.is_contiguous()
    assert torch.allclose(layer(x), layer(x.contiguous()))


def test_nan_and_inf_propagate():
    layer = GateLinear(16, 4, dtype=torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    out = layer(x)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0]).all()  # a NaN input reaches every logit of its token
    assert torch.equal(torch.isinf(out[1]), torch.isinf(ref[1])) and torch.isinf(out[1]).any()
    assert torch.equal(out[1][torch.isinf(out[1])], ref[1][torch.isinf(ref[1])])  # the sign too
    assert torch.isfinite(out[2]).all()


@pytest.mark.parametrize(
    "make_input, match",
    [
        (lambda: torch.randn(4, 15), r"x has K=15 but the router's weight has K=16"),
        (lambda: torch.randn(4, 16, dtype=torch.float64),
         r"x is torch\.float64 but the router's weight is torch\.float32"),
        (lambda: torch.randn(16), None),  # 1-D: a single token [K] is valid
    ],
)
def test_bad_or_edge_inputs(make_input, match):
    layer = GateLinear(16, 4)
    x = make_input()
    if match is None:
        assert layer(x).shape == (4,)
        return
    with pytest.raises(ValueError, match=match):  # ours, not a PyTorch error from deeper down
        layer(x)


def test_ops_layer_rejects_bad_inputs():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="2-D"):
        ops.router_gemm(torch.randn(2, 3, 16), w)
    with pytest.raises(ValueError, match="K=12"):
        ops.router_gemm(torch.randn(2, 12), w)
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        ops.router_gemm(torch.randn(2, 16).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="bias"):
        ops.router_gemm(torch.randn(2, 16), w, torch.randn(7))
    with pytest.raises(ValueError, match="bias is torch.bfloat16"):
        ops.router_gemm(torch.randn(2, 16), w, torch.randn(8).to(torch.bfloat16))
    with pytest.raises(ValueError, match="E=0"):
        ops.router_gemm(torch.randn(2, 16), torch.randn(0, 16))
    with pytest.raises(ValueError, match="backend"):
        ops.router_gemm(torch.randn(2, 16), w, backend="nope")


def test_router_gemm_with_shrink_is_the_two_calls_on_cpu():
    generator = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(5, 64, generator=generator), torch.randn(8, 64, generator=generator), None
    lora_a = torch.randn(12, 64, generator=generator)
    for dtype in (torch.bfloat16, torch.float64):
        args = [t.to(dtype) for t in (x, w, lora_a)]
        logits, xa = ops.router_gemm_with_shrink(args[0], args[1], b, args[2])
        assert torch.equal(logits, ops.router_gemm(args[0], args[1], b))
        assert xa.dtype == torch.promote_types(dtype, torch.float32)
        assert torch.equal(xa, ops.router_gemm(args[0], args[2], None, xa.dtype))
    with pytest.raises(ValueError, match="lora_a must be \\[rows >= 1, 64\\]"):
        ops.router_gemm_with_shrink(x, w, b, torch.randn(12, 63))
    with pytest.raises(ValueError, match="lora_a must be torch.float32"):
        ops.router_gemm_with_shrink(x, w, b, lora_a.double())


def test_zero_experts_or_features_refused_at_construction():
    with pytest.raises(ValueError, match="num_experts"):
        GateLinear(16, 0)
    with pytest.raises(ValueError, match="in_features"):
        GateLinear(0, 8)


def test_empty_batch():
    layer = GateLinear(16, 4)
    out = layer(torch.randn(0, 16))
    assert out.shape == (0, 4)
    out3 = layer(torch.randn(2, 0, 16))
    assert out3.shape == (2, 0, 4)


def test_compile_fullgraph_matches_eager():
    generator = torch.Generator().manual_seed(11)
    layer = random_gate(96, 16, True, torch.bfloat16, generator)
    layer.out_dtype = torch.float32
    compiled = torch.compile(layer, fullgraph=True)
    for M in (3, 3, 5):
        x = torch.randn(M, 96, generator=generator).to(torch.bfloat16)
        assert torch.equal(compiled(x), layer(x))


def test_from_parameters_validates_shapes():
    with pytest.raises(ValueError, match="2-D"):
        GateLinear.from_parameters(torch.randn(8), None)
    with pytest.raises(ValueError, match="bias"):
        GateLinear.from_parameters(torch.randn(8, 4), torch.randn(3))
    with pytest.raises(TypeError, match="nn.Linear"):
        GateLinear.from_linear(GateLinear(4, 2))


def test_extension_status_is_reported():
    assert isinstance(ops.extension_available(), bool)
    if not ops.extension_available():  # the import's own reason, not a circular import of gate
        assert ops.extension_error() and "circular import" not in ops.extension_error()
    assert gate.__version__


def test_a_narrower_out_dtype_rounds_the_logits_once():
    """fp32 x with bf16 logits: fp32 products and sums, one rounding at the end (the operands are
    not cast down first, which changed half the logits and some top-4 choices)."""
    generator = torch.Generator().manual_seed(17)
    x, weight, bias = (torch.randn(64, 256, generator=generator), torch.randn(32, 256, generator=generator),
                       torch.randn(32, generator=generator))
    out = ops.router_gemm(x, weight, bias, out_dtype=torch.bfloat16)
    once = torch.nn.functional.linear(x, weight, bias).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, once)
    layer = GateLinear.from_parameters(weight, bias, out_dtype=torch.bfloat16)
    assert torch.equal(layer(x), once)


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.bfloat16, torch.float16),
                                               (torch.float16, torch.bfloat16)])
def test_the_other_half_dtype_is_computed_in_float32(x_dtype, out_dtype):
    """bf16 x with fp16 logits (or the reverse): float32 products and sums, one rounding; the
    operands cast to the logits' dtype overflowed (a bf16 activation of 1e5 is inf in fp16) or
    lost bits (fp16 to bf16 changed half the logits)."""
    generator = torch.Generator().manual_seed(19)
    x = torch.randn(64, 2880, generator=generator)
    x[:, 0] = 1e5 if x_dtype == torch.bfloat16 else 1e4
    weight, bias = torch.randn(32, 2880, generator=generator) / 1000, torch.randn(32, generator=generator)
    x, weight, bias = x.to(x_dtype), weight.to(x_dtype), bias.to(x_dtype)
    once = torch.nn.functional.linear(x.float(), weight.float(), bias.float()).to(out_dtype)
    assert torch.isfinite(once).all()
    out = ops.router_gemm(x, weight, bias, out_dtype=out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, once)
    assert torch.equal(GateLinear.from_parameters(weight, bias, out_dtype=out_dtype)(x), once)


@pytest.mark.parametrize("make", [
    lambda: GateLinear(8, 4, out_dtype=torch.int64),
    lambda: GateLinear.from_parameters(torch.randn(4, 8), None, out_dtype=torch.int32),
    lambda: ops.router_gemm(torch.randn(2, 8), torch.randn(4, 8), out_dtype=torch.int32),
    lambda: ops.route_logits(torch.randn(2, 8), 2, weights_dtype=torch.int32),
])
def test_integer_logit_and_weight_dtypes_are_refused(make):
    with pytest.raises(ValueError, match="must be a floating-point torch.dtype"):
        make()


def test_from_parameters_refuses_an_empty_weight():
    for shape in ((0, 16), (4, 0)):
        with pytest.raises(ValueError, match=r"weight must be 2-D \[E, K\] with E, K >= 1"):
            GateLinear.from_parameters(torch.randn(*shape), None)
