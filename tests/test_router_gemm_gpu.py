"""The CUDA kernels on a GPU: accuracy against float64 and cuBLAS, every element written, odd sizes,
every tile configuration, determinism, CUDA graphs and torch.compile through the op."""

import itertools
import re
import subprocess
import sys

import pytest
import torch
from gpu_helpers import (
    call_poisoned,
    kernels_launched,
    realistic_activations,
    reference_logits,
    rel_error,
    router_weights,
    topk_agreement,
)
from torch import nn

from gate import GateLinear, ops, tuning

pytestmark = pytest.mark.kernel


def check_against_cublas(fn, M, K, E, bias, out_dtype, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    x = realistic_activations(M, K, generator)
    weight, b = router_weights(E, K, generator, bias=bias)
    cublas = fn is ops.router_gemm and tuning.router_gemm_route(x, weight, out_dtype) == "cublas"
    out = call_poisoned(fn, (M, E), out_dtype or torch.bfloat16, x, weight, b, out_dtype,
                        require_poisoned=not cublas, **kwargs)  # cuBLAS allocates on its own terms
    assert out.shape == (M, E) and out.dtype == (out_dtype or torch.bfloat16)
    assert torch.isfinite(out).all(), "an output element was not written (NaN poison survived)"
    ref = reference_logits(x, weight, b)
    ours = rel_error(out, ref)
    cublas = rel_error(ops.router_gemm_cublas(x, weight, b, out_dtype), ref)
    assert ours <= 2 * cublas + 1e-7, f"error {ours:.3e} vs cuBLAS {cublas:.3e}"
    return out


@pytest.mark.parametrize("M", [1, 3, 7, 8, 17, 64, 100, 127, 128, 129, 256, 300])
@pytest.mark.parametrize("K,E", [(360, 32), (2880, 32), (2880, 128), (7168, 256), (2048, 128),
                                 (3072, 256), (5120, 128), (1000, 512)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_router_gemm_dispatch(M, K, E, out_dtype):
    for bias in (True, False):
        check_against_cublas(ops.router_gemm, M, K, E, bias, out_dtype, seed=M * 7 + K + E)


@pytest.mark.parametrize("M", [1, 5, 64, 129])
@pytest.mark.parametrize("K,E", [(1, 1), (13, 3), (360, 32), (2880, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_simple_kernel_any_shape_and_dtype(M, K, E, dtype):
    generator = torch.Generator().manual_seed(M + 31 * K + E)
    x = torch.randn(M, K, generator=generator).to("cuda", dtype)
    weight = torch.randn(E, K, generator=generator).to("cuda", dtype)
    bias = torch.randn(E, generator=generator).to("cuda", dtype)
    for out_dtype in (None, torch.float32):
        out = call_poisoned(tuning.router_gemm_simple, (M, E), out_dtype or dtype, x, weight, bias,
                            out_dtype)
        ref = reference_logits(x, weight, bias)
        expected = ref.to(out_dtype or dtype)  # one rounding of the exact result
        tolerance = 1e-5 if (out_dtype or dtype) == torch.float32 else 1e-2
        assert rel_error(out, ref) <= rel_error(expected, ref) + tolerance


CONFIGS = list(itertools.product([1, 2], [1, 2, 4], [4, 8]))


@pytest.mark.parametrize("expert_tiles,token_tiles,cluster", CONFIGS)
@pytest.mark.parametrize("M,K,E", [(1, 8, 8), (9, 40, 24), (33, 360, 40), (64, 2880, 128),
                                   (129, 7168, 256), (256, 1000, 512)])
def test_sm90_every_tile_config(expert_tiles, token_tiles, cluster, M, K, E):
    for out_dtype in (None, torch.float32):
        check_against_cublas(tuning.router_gemm_sm90, M, K, E, True, out_dtype, seed=M + K + E,
                             expert_tiles=expert_tiles, token_tiles=token_tiles, cluster=cluster)


@pytest.mark.parametrize("experts_per_cta", [0, 1, 2, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 17, 64])
@pytest.mark.parametrize("K,E", [(8, 1), (40, 3), (2880, 32), (2880, 128), (7168, 256), (4104, 513)])
def test_small_m_kernel(experts_per_cta, M, K, E):
    for out_dtype in (None, torch.float32):
        for bias in (True, False):
            check_against_cublas(tuning.router_gemm_small_m, M, K, E, bias, out_dtype, seed=M + K + E,
                                 experts_per_cta=experts_per_cta)


@pytest.mark.parametrize("tokens_per_cta", [1, 2, 4, 8])
@pytest.mark.parametrize("M", [1, 3, 5, 8, 31, 64])
@pytest.mark.parametrize("K,E,experts_per_cta", [(40, 3, 2), (2880, 32, 1), (4104, 513, 4)])
def test_small_m_kernel_token_split(tokens_per_cta, M, K, E, experts_per_cta):
    for out_dtype in (None, torch.float32):
        check_against_cublas(tuning.router_gemm_small_m, M, K, E, True, out_dtype, seed=M + K + E,
                             experts_per_cta=experts_per_cta, tokens_per_cta=tokens_per_cta)


def test_small_m_refuses_unsupported_shapes():
    w = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="M must be"):
        tuning.router_gemm_small_m(torch.randn(65, 16, device="cuda", dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="experts_per_cta"):
        tuning.router_gemm_small_m(torch.randn(2, 16, device="cuda", dtype=torch.bfloat16), w,
                                experts_per_cta=3)
    with pytest.raises(ValueError, match="tokens_per_cta"):
        tuning.router_gemm_small_m(torch.randn(2, 16, device="cuda", dtype=torch.bfloat16), w,
                                tokens_per_cta=3)


def test_sm90_refuses_unsupported_shapes():
    x = torch.randn(4, 12, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 12, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 8"):
        tuning.router_gemm_sm90(x, w)
    with pytest.raises(ValueError, match="M must be"):
        tuning.router_gemm_sm90(torch.randn(257, 16, device="cuda", dtype=torch.bfloat16),
                             torch.randn(8, 16, device="cuda", dtype=torch.bfloat16))


def test_misaligned_input_falls_back_correctly():
    generator = torch.Generator().manual_seed(2)
    flat = realistic_activations(1, 5 * 2880 + 1, generator).view(-1)
    x = flat[1:].view(5, 2880)  # data pointer 2 bytes off a 16-byte boundary
    weight, bias = router_weights(128, 2880, generator)
    out = ops.router_gemm(x, weight, bias)
    ref = reference_logits(x, weight, bias)
    assert rel_error(out, ref) <= 2 * rel_error(ops.router_gemm_cublas(x, weight, bias), ref) + 1e-7


def test_empty_batch_on_gpu():
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    assert ops.router_gemm(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16), w).shape == (0, 32)


# Each bad call straight into the C++ op runs in its own interpreter: a crash there fails this test
# instead of taking the whole GPU suite down with it.
BAD_OP_CALLS = {
    "K=32": "op.router_gemm(bf16(2, 32), bf16(32, 64), None, None, False)",
    "CUDA tensor": "op.router_gemm(bf16(2, 64, device='cpu'), bf16(32, 64), None, None, False)",
    "M must be": "op.router_gemm_small_m(bf16(65, 64), bf16(32, 64), None, None, False, 0)",
    "got 3": "op.router_gemm_small_m(bf16(2, 64), bf16(32, 64), None, None, False, 0, 3)",
    "multiple of 8": "op.router_gemm_sm90(bf16(2, 60), bf16(32, 60), None, None, False, 0, 0, 0)",
    "got 1-D": "op.router_gemm(bf16(2, 64), bf16(64), None, None, False)",
    "xa must be [2, 8], got [2, 5]": "op.lora_expand(bf16(2, 8), torch.zeros(2, 5, device='cuda'), "
                                     "bf16(2, 8, 4), torch.ones(2, device='cuda'), "
                                     "torch.zeros(2, dtype=torch.long, device='cuda'))",
    "lora_a must have S * R = 8 rows, got 5": "op.router_gemm_lora(bf16(2, 64), bf16(32, 64), None, "
                                              "bf16(5, 64), bf16(2, 32, 4), torch.ones(2, device='cuda'), "
                                              "torch.zeros(2, dtype=torch.long, device='cuda'), None, False)",
}


@pytest.mark.parametrize("message", sorted(BAD_OP_CALLS))
def test_cpp_op_rejects_bad_input_with_an_error(message):
    script = (
        "import torch, gate\n"
        "op = torch.ops.moegate\n"
        "def bf16(*shape, device='cuda'):\n"
        "    return torch.randn(*shape, device=device).to(torch.bfloat16)\n"
        "try:\n"
        f"    {BAD_OP_CALLS[message]}\n"
        "except RuntimeError as error:\n"
        "    print('RuntimeError:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"crashed (exit {result.returncode}): {result.stderr[-2000:]}"
    assert "RuntimeError:" in result.stdout and message in result.stdout, result.stdout


def test_nan_and_inf_propagate_like_cublas():
    generator = torch.Generator().manual_seed(4)
    x = realistic_activations(8, 2880, generator)
    x[1, 7] = float("nan")
    x[2, 9] = float("inf")
    weight, bias = router_weights(128, 2880, generator)
    ours, cublas = ops.router_gemm(x, weight, bias), ops.router_gemm_cublas(x, weight, bias)
    assert torch.equal(torch.isnan(ours), torch.isnan(cublas))
    assert torch.equal(torch.isinf(ours), torch.isinf(cublas))


@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("M", [1, 16, 128])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_top4_agreement_at_least_cublas(E, M, out_dtype):
    ours, cublas = 0.0, 0.0
    for seed in range(20):
        generator = torch.Generator().manual_seed(1000 + seed)
        x = realistic_activations(M, 2880, generator)
        weight, bias = router_weights(E, 2880, generator)
        ref = reference_logits(x, weight, bias)
        ours += topk_agreement(ops.router_gemm(x, weight, bias, out_dtype), ref)
        cublas += topk_agreement(ops.router_gemm_cublas(x, weight, bias, out_dtype), ref)
    assert ours >= cublas - 1e-9, f"top-4 agreement {ours / 20:.4f} < cuBLAS {cublas / 20:.4f}"


def test_bitwise_deterministic_with_and_without_load():
    generator = torch.Generator().manual_seed(9)
    x = realistic_activations(16, 2880, generator)
    weight, bias = router_weights(128, 2880, generator)
    first = ops.router_gemm(x, weight, bias)
    for _ in range(500):
        assert torch.equal(ops.router_gemm(x, weight, bias), first)
    noise = torch.randn(8192, 8192, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(4):
            noise = noise @ noise.t() / 8192
    for _ in range(500):
        assert torch.equal(ops.router_gemm(x, weight, bias), first)
    torch.cuda.synchronize()


@pytest.mark.parametrize("pdl", [False, True])
def test_cuda_graph_capture_and_replay(pdl):
    generator = torch.Generator().manual_seed(12)
    layer = GateLinear(2880, 128, dtype=torch.bfloat16, device="cuda", pdl=pdl)
    assert layer.backend == "moegate"
    static_x = realistic_activations(8, 2880, generator)
    layer(static_x)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    for _ in range(5):
        fresh = realistic_activations(8, 2880, generator)
        static_x.copy_(fresh)
        static_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, layer(fresh))


def test_compile_fullgraph_through_the_op():
    generator = torch.Generator().manual_seed(13)
    layer = GateLinear(2880, 32, dtype=torch.bfloat16, device="cuda", out_dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    for M in (1, 4, 4, 64):
        x = realistic_activations(M, 2880, generator)
        assert torch.equal(compiled(x), layer(x))


# One case per implementation behind router_gemm (router_gemm_route): the gradients do not depend
# on which one ran the forward.
GRAD_CASES = [
    (1, 2880, 128, torch.bfloat16, None),  # small_m
    (8, 2880, 32, torch.bfloat16, torch.float32),  # small_m, fp32 logits
    (48, 2880, 32, torch.bfloat16, None),  # sm90
    (64, 7168, 256, torch.bfloat16, torch.float32),  # sm90, fp32 logits
    (300, 2880, 32, torch.bfloat16, None),  # cublas
    (16, 2884, 128, torch.bfloat16, None),  # simple
    (16, 2880, 128, torch.float32, None),  # simple, fp32 everything
]


@pytest.mark.parametrize("M,K,E,dtype,out_dtype", GRAD_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_are_the_torch_paths_bit_for_bit(M, K, E, dtype, out_dtype, bias):
    generator = torch.Generator().manual_seed(M + K + E + bias)
    layer = GateLinear(K, E, bias=bias, dtype=dtype, device="cuda", out_dtype=out_dtype)
    assert layer.backend == "moegate"
    x = realistic_activations(M, K, generator).to(dtype)
    grad_out = torch.randn(M, E, generator=generator).to("cuda", out_dtype or dtype)
    params = [layer.weight] + ([layer.bias] if bias else [])

    def gradients(backend):
        x_leaf = x.clone().requires_grad_()
        out = ops.router_gemm(x_leaf, layer.weight, layer.bias, out_dtype, backend=backend)
        return torch.autograd.grad(out, [x_leaf, *params], grad_out)

    for name, ours, torch_path in zip(("x", "weight", "bias"), gradients("moegate"),
                                      gradients("torch")):
        assert ours.dtype == torch_path.dtype and ours.shape == torch_path.shape, name
        assert torch.equal(ours, torch_path), name


@pytest.mark.parametrize("op,kwargs", [
    (tuning.router_gemm_small_m, {"pdl": True, "experts_per_cta": 2, "tokens_per_cta": 4}),
    (tuning.router_gemm_sm90, {"pdl": True, "expert_tiles": 2, "token_tiles": 1, "cluster": 4}),
    (tuning.router_gemm_simple, {}),
])
def test_every_kernel_op_has_gradients(op, kwargs):
    generator = torch.Generator().manual_seed(21)
    weight, bias = router_weights(64, 2880, generator)
    weight.requires_grad_()
    bias.requires_grad_()
    x = realistic_activations(24, 2880, generator).requires_grad_()
    grad_out = torch.randn(24, 64, generator=generator).to("cuda", torch.float32)
    ours = torch.autograd.grad(op(x, weight, bias, torch.float32, **kwargs), [x, weight, bias],
                               grad_out)
    reference = torch.autograd.grad(ops.router_gemm_torch(x, weight, bias, torch.float32),
                                    [x, weight, bias], grad_out)
    for name, a, b in zip(("x", "weight", "bias"), ours, reference):
        assert torch.equal(a, b), name


def test_gate_linear_trains_under_torch_compile_like_eager():
    generator = torch.Generator().manual_seed(22)
    layer = GateLinear(2880, 32, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    x = realistic_activations(4, 2880, generator)
    grad_out = torch.randn(4, 32, generator=generator).to("cuda", torch.bfloat16)
    results = []
    for module in (layer, compiled):
        x_leaf = x.clone().requires_grad_()
        results.append(torch.autograd.grad(module(x_leaf), [x_leaf, layer.weight, layer.bias],
                                           grad_out))
    for name, eager, traced in zip(("x", "weight", "bias"), *results):
        assert torch.equal(eager, traced), name
    with torch.no_grad():
        assert not layer(x).requires_grad


def test_gate_linear_uses_the_kernel_and_matches_reference():
    generator = torch.Generator().manual_seed(14)
    layer = GateLinear(2880, 32, dtype=torch.bfloat16).cuda()
    assert layer.backend == "moegate"
    x = realistic_activations(3 * 5, 2880, generator).view(3, 5, 2880)
    out = layer(x)
    assert out.shape == (3, 5, 32)
    ref = reference_logits(x.view(15, 2880), layer.weight, layer.bias)
    cublas = ops.router_gemm_cublas(x.view(15, 2880), layer.weight, layer.bias)
    assert rel_error(out.view(15, 32), ref) <= 2 * rel_error(cublas, ref) + 1e-7
    assert GateLinear(16, 8).cuda().backend == "moegate"
    assert GateLinear(16, 8).backend == "torch"


BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("M,K,E,dtype,out_dtype,route", [
    (1, 2880, 128, BF16, None, "small_m"),
    (8, 2880, 32, BF16, FP32, "small_m"),
    (8, 2880, 128, BF16, None, "small_m"),  # 1024 logits: 2.62 vs 2.83 us
    (9, 2880, 128, BF16, None, "sm90"),
    (4, 7168, 256, BF16, FP32, "small_m"),  # 3.44 vs 3.92 us
    (8, 7168, 256, BF16, FP32, "sm90"),  # wide and long: 3.98 vs 4.17 us
    (8, 7168, 250, BF16, FP32, "small_m"),  # E not a multiple of 8: no sm90
    (8, 5120, 128, BF16, None, "small_m"),  # 3.09 vs 3.44 us
    (16, 5120, 128, BF16, None, "sm90"),  # 3.57 vs 3.91 us
    (16, 4096, 128, BF16, None, "sm90"),
    (8, 3072, 256, BF16, None, "sm90"),  # 2048 logits
    (16, 2880, 128, BF16, None, "sm90"),  # 2.95 vs 3.09 us
    (32, 2880, 32, BF16, None, "small_m"),  # 2.49 vs 2.67 us
    (33, 2880, 32, BF16, None, "sm90"),
    (48, 2880, 32, BF16, None, "sm90"),  # 2.71 vs 2.91 us
    (65, 2880, 32, BF16, None, "sm90"),  # past the decode kernel's M
    (16, 2880, 64, BF16, None, "small_m"),
    (64, 2880, 8, BF16, None, "small_m"),
    (64, 4096, 8, BF16, None, "small_m"),  # Mixtral: 2.34 vs 2.78 us
    (256, 2880, 128, BF16, None, "sm90"),  # 94M multiply-adds: 5.4 vs 8.0 us
    (64, 7168, 256, BF16, FP32, "sm90"),  # 117M: 6.5 vs 7.9 us
    (256, 5120, 128, BF16, None, "cublas"),  # 168M: a 3% lead, too thin
    (128, 7168, 256, BF16, FP32, "cublas"),
    (300, 2880, 32, BF16, None, "cublas"),
    (16, 2884, 128, BF16, None, "simple"),  # K not a multiple of 8
    (16, 2880, 128, FP32, None, "simple"),
])
def test_router_gemm_route_follows_the_measured_crossover(M, K, E, dtype, out_dtype, route):
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    weight = torch.randn(E, K, device="cuda", dtype=dtype)
    assert tuning.router_gemm_route(x, weight, out_dtype) == route


@pytest.mark.parametrize("E", [32, 128])
def test_pdl_gives_the_same_bits(E):
    generator = torch.Generator().manual_seed(E)
    weight, bias = router_weights(E, 2880, generator)
    for M in (1, 4, 8, 9, 16, 32, 33, 64, 128, 256):
        x = realistic_activations(M, 2880, generator)
        for out_dtype in (None, torch.float32):
            plain = ops.router_gemm(x, weight, bias, out_dtype, pdl=False)
            assert torch.equal(ops.router_gemm(x, weight, bias, out_dtype, pdl=True), plain), (M, out_dtype)


@pytest.mark.parametrize("E", [32, 128, 256])
@pytest.mark.parametrize("cluster", [4, 8])
def test_an_expert_tile_traded_for_a_token_tile_keeps_the_bits(E, cluster):
    """The plain call under PDL trades 1 x 2 tiles for 2 x 1 and 1 x 4 for 2 x 2
    (router_gemm_sm90.cu): the same MMA tiles a warp, the same chains and reduction lanes, so
    each pair must give the same bits, for any batch (padded token tiles included)."""
    generator = torch.Generator().manual_seed(E + cluster)
    weight, bias = router_weights(E, 2880, generator)
    for M in (1, 7, 16, 33, 64, 100, 128, 256):
        x = realistic_activations(M, 2880, generator)
        for out_dtype, token_tiles in itertools.product((None, torch.float32), (2, 4)):
            logits = [call_poisoned(tuning.router_gemm_sm90, (M, E), out_dtype or torch.bfloat16, x,
                                    weight, bias, out_dtype, pdl, expert_tiles, tokens, cluster)
                      for expert_tiles, tokens, pdl in ((1, token_tiles, False),
                                                        (2, token_tiles // 2, True))]
            assert torch.equal(*logits), (M, token_tiles, out_dtype)


@pytest.mark.parametrize("M,pdl,tiles", [(32, False, (1, 2)), (32, True, (2, 1)),
                                         (128, False, (1, 4)), (128, True, (2, 2))])
def test_pdl_takes_the_expert_heavy_tile(M, pdl, tiles):
    """gpt-oss-120b's router under PDL: two expert tiles a warp, whose weight rows load before the
    dependency wait (benchmarks/results/README.md, "Tiles for PDL")."""
    generator = torch.Generator().manual_seed(M)
    weight, bias = router_weights(128, 2880, generator)
    x = realistic_activations(M, 2880, generator)
    assert tuning.router_gemm_route(x, weight) == "sm90"
    launched = kernels_launched(lambda: ops.router_gemm(x, weight, bias, pdl=pdl))
    # The kernel's name, demangled or not: router_gemm_sm90_kernel<expert tiles, token tiles, ...>
    et, tt = tiles
    assert len(launched) == 1, launched
    assert re.search(rf"router_gemm_sm90_kernel(<{et}, {tt},|ILi{et}ELi{tt}E)", launched[0]), launched


@pytest.mark.parametrize("K,E,rows", [(2880, 32, 256), (2880, 128, 256), (2880, 128, 8),
                                      (2048, 128, 40), (360, 13, 5)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_router_gemm_with_shrink(K, E, rows, out_dtype):
    """The logits are router_gemm's bits wherever the call lands; xa is x A^T in fp32 (error
    against float64 no worse than twice cuBLAS's); every element written; one launch where one of
    our Hopper kernels serves the router."""
    generator = torch.Generator().manual_seed(K + E + rows)
    weight, bias = router_weights(E, K, generator)
    lora_a = (torch.randn(rows, K, generator=generator) / K**0.5).to("cuda", torch.bfloat16)
    for M in (1, 2, 3, 4, 5, 8, 9, 16, 31, 32, 33, 64, 65, 128, 200, 256):
        x = realistic_activations(M, K, generator)
        for b, pdl in ((bias, False), (None, True)):
            logits, xa = call_poisoned(ops.router_gemm_with_shrink, (M, rows), torch.float32, x, weight,
                                       b, lora_a, out_dtype, pdl, require_poisoned=False)
            assert torch.equal(logits, ops.router_gemm(x, weight, b, out_dtype, pdl=pdl)), (M, pdl)
            assert xa.shape == (M, rows) and xa.dtype == torch.float32
            assert torch.isfinite(xa).all(), f"M={M}: an xa element was not written"
            ref = reference_logits(x, lora_a, None)
            cublas = rel_error(ops.router_gemm_cublas(x, lora_a, None, torch.float32), ref)
            assert rel_error(xa, ref) <= 2 * cublas + 1e-7, M
        launches = kernels_launched(
            lambda x=x: ops.router_gemm_with_shrink(x, weight, bias, lora_a, out_dtype))
        if tuning.router_gemm_route(x, weight, out_dtype) in ("small_m", "sm90"):
            assert len(launches) == 1, (M, launches)
        else:
            assert len(launches) >= 2, (M, launches)


def test_router_gemm_with_shrink_poisoned_outputs():
    """The fused launches write every element of both outputs (NaN-filled blocks handed to them)."""
    generator = torch.Generator().manual_seed(5)
    weight, bias = router_weights(128, 2880, generator)
    lora_a = (torch.randn(256, 2880, generator=generator) / 54).to("cuda", torch.bfloat16)
    for M in (1, 7, 8, 16, 128):  # the decode kernel, then the tensor-core kernel
        x = realistic_activations(M, 2880, generator)
        poison = [torch.full((M, 128), float("nan"), device="cuda", dtype=torch.bfloat16),
                  torch.full((M, 256), float("nan"), device="cuda")]
        pointers = [t.data_ptr() for t in poison]
        del poison
        logits, xa = ops.router_gemm_with_shrink(x, weight, bias, lora_a)
        assert [logits.data_ptr(), xa.data_ptr()] == pointers
        assert torch.isfinite(logits).all() and torch.isfinite(xa).all()


def shrink_outputs(fused, x, weight, bias, lora_a, out_dtype):
    """router_gemm_with_shrink's (logits, xa), or the two router_gemm calls it stands for."""
    if fused:
        return ops.router_gemm_with_shrink(x, weight, bias, lora_a, out_dtype)
    return ops.router_gemm(x, weight, bias, out_dtype), ops.lora_shrink(x, lora_a)


@pytest.mark.parametrize("M", [4, 24, 129, 300])  # decode, tensor-core, tensor-core, cuBLAS
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_router_gemm_with_shrink_gradients_are_the_two_calls(M, out_dtype):
    """The op's autograd formula gives the two calls' gradients bit for bit, whichever inputs need
    one and whichever outputs are used (an unused one brings no gradient), with an x that has other
    uses before and after the op (autograd sums x's gradients in the order the two calls gave), and
    the outputs need gradients exactly where the two calls' outputs did."""
    generator = torch.Generator().manual_seed(M)
    weight, bias = router_weights(128, 2880, generator)
    lora_a = (torch.randn(64, 2880, generator=generator) / 54).to("cuda", torch.bfloat16)
    x = realistic_activations(M, 2880, generator)
    out_type = out_dtype or torch.bfloat16
    logits_grad = torch.randn(M, 128, generator=generator).to("cuda", out_type)
    xa_grad = torch.randn(M, 64, generator=generator).cuda()
    x_grad = torch.randn(M, 2880, generator=generator).to("cuda", torch.bfloat16)

    def gradients(fused, needs, used, other_use):
        leaves = [t.clone().requires_grad_(need) for t, need in zip((x, weight, bias, lora_a), needs)]
        x_leaf = leaves[0]
        before = x_leaf * 3 if other_use == "before" else None
        logits, xa = shrink_outputs(fused, *leaves[:3], leaves[3], out_dtype)
        after = x_leaf * 5 if other_use == "after" else None
        flags = (logits.requires_grad, xa.requires_grad)
        roots = [(logits, logits_grad), (xa, xa_grad), (before, x_grad), (after, x_grad)]
        roots = [(t, g) for (t, g), use in zip(roots, (used[0], used[1], True, True))
                 if use and t is not None and t.requires_grad]
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        if not roots:
            return flags, []
        return flags, torch.autograd.grad([t for t, _ in roots], wanted, [g for _, g in roots],
                                          allow_unused=True)

    for needs in itertools.product((False, True), repeat=4):
        if not any(needs):
            continue
        for used, other_use in itertools.product(((True, True), (True, False), (False, True)),
                                                 (None, "before", "after")):
            case = (needs, used, other_use)
            fused_flags, fused = gradients(True, needs, used, other_use)
            flags, separate = gradients(False, needs, used, other_use)
            assert fused_flags == flags, case
            assert len(fused) == len(separate), case
            for a, b in zip(fused, separate):
                assert (a is None) == (b is None), case
                assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), case


@pytest.mark.parametrize("M", [4, 24])  # the decode kernel, the tensor-core kernel
def test_router_gemm_with_shrink_is_one_launch_under_grad_mode(M):
    """Inputs that need gradients (as a plain script's parameters do) keep the fused launch: the
    forward launches what it launches under no_grad, the same bits."""
    generator = torch.Generator().manual_seed(M + 1)
    weight, bias = (nn.Parameter(t) for t in router_weights(128, 2880, generator))
    lora_a = (torch.randn(64, 2880, generator=generator) / 54).to("cuda", torch.bfloat16)
    x = realistic_activations(M, 2880, generator).requires_grad_()
    assert tuning.router_gemm_route(x.detach(), weight.detach()) in ("small_m", "sm90")

    def call():
        return ops.router_gemm_with_shrink(x, weight, bias, lora_a)

    with torch.no_grad():
        inference = kernels_launched(call)
        plain = call()
    with torch.enable_grad():
        training = kernels_launched(call)
        logits, xa = call()
    assert len(inference) == 1 and training == inference, (inference, training)
    assert logits.requires_grad and xa.requires_grad
    assert torch.equal(logits, plain[0]) and torch.equal(xa, plain[1])
