"""Routing on the GPU: the fused router + top-k launch and the routing kernel, bit for bit against
router_gemm -> route_torch, on random and adversarial logits, under CUDA graphs, torch.compile,
PDL chains and memory pressure."""

import pytest
import torch
from gpu_helpers import memory_hog, realistic_activations, router_weights
from test_route import reference_route, tied_logits

from gate import GateLinear, ops
from lora import GateLinearWithLoRA, TokenSlots

pytestmark = pytest.mark.kernel

ULP_BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}


def assert_weights_within_ulps(got, want, ulps=1):
    """|got - want| <= ulps units in the last place of want's dtype (8 of them in fp32, where the
    kernel's and PyTorch's sums of exponentials run in different orders)."""
    assert got.dtype == want.dtype
    if want.dtype == torch.float32:
        ulps = 8
    g, w = got.double(), want.double()
    both_nan = torch.isnan(g) & torch.isnan(w)
    spacing = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - (ULP_BITS[want.dtype] - 1))
    ok = both_nan | ((g - w).abs() <= ulps * spacing)
    assert ok.all(), f"{(~ok).sum().item()} weights off by more than {ulps} ulp: {g[~ok][:4]} vs {w[~ok][:4]}"


def check_routing(weights, ids, logits, top_k, scoring="softmax_topk", renormalize=False,
                  weights_dtype=None):
    """ids equal route_torch's on the same logits bits, weights within one ulp; ids in range and
    distinct per token."""
    want_weights, want_ids = ops.route_torch(logits, top_k, scoring, renormalize, weights_dtype,
                                             ids.dtype)
    assert torch.equal(ids, want_ids)
    assert_weights_within_ulps(weights, want_weights)
    assert ((ids >= 0) & (ids < logits.shape[1])).all()
    assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("E", [32, 128, 8, 24, 200, 512, 520])
@pytest.mark.parametrize("M", [1, 3, 7, 8, 17, 64, 100, 129, 256, 300])
def test_fused_route_equals_router_gemm_then_route(E, M):
    generator = torch.Generator().manual_seed(M * 1000 + E)
    K = 2880
    weight, bias = router_weights(E, K, generator)
    x = realistic_activations(M, K, generator)
    counters = torch.zeros(ops.ROUTE_COUNTERS, dtype=torch.int32, device="cuda")
    for top_k, scoring, renormalize, out_dtype, weights_dtype, ids_dtype, pdl in [
        (4, "softmax_topk", False, None, None, torch.int64, False),
        (1, "softmax", True, torch.float32, None, torch.int32, True),
        (8, "softmax", False, None, torch.float32, torch.int64, False),
        (min(E, 8), "softmax_topk", False, torch.float32, torch.bfloat16, torch.int32, True),
    ]:
        weights, ids, logits = ops.route(x, weight, bias, top_k, scoring, renormalize, out_dtype,
                                         weights_dtype, ids_dtype, pdl, counters=counters)
        assert torch.equal(logits, ops.router_gemm(x, weight, bias, out_dtype))
        check_routing(weights, ids, logits, top_k, scoring, renormalize, weights_dtype)
        assert not counters.any(), "the counters must be left zero"


@pytest.mark.parametrize("M,E", [(1, 32), (8, 128), (64, 32), (128, 128), (256, 128)])
def test_adversarial_biases(M, E):
    """Exact ties (duplicated expert rows), +-inf, huge outliers, all-equal rows and NaN."""
    generator = torch.Generator().manual_seed(M + E)
    K = 2880
    weight, bias = router_weights(E, K, generator)
    x = realistic_activations(M, K, generator)
    weight[1::4] = weight[0::4]  # experts 4i and 4i+1 tie exactly
    bias[1::4] = bias[0::4]
    cases = {
        "ties": bias.clone(),
        "inf": bias.clone().index_fill_(0, torch.tensor([3, 5], device="cuda"), float("inf"))
                          .index_fill_(0, torch.tensor([0], device="cuda"), -float("inf")),
        "huge": bias.clone().index_fill_(0, torch.tensor([E - 1], device="cuda"), 3e38),
        "nan": bias.clone().index_fill_(0, torch.tensor([2], device="cuda"), float("nan")),
    }
    for name, b in cases.items():
        weights, ids, logits = ops.route(x, weight, b, 4)
        check_routing(weights, ids, logits, 4)
        if name == "ties":
            assert (logits[:, 0::4] == logits[:, 1::4]).all()
    flat = torch.zeros_like(weight)  # every logit equal: the first k experts
    weights, ids, _ = ops.route(x, flat, torch.full_like(bias, 0.25), 4, weights_dtype=torch.float32)
    assert (ids == torch.arange(4, device="cuda")).all() and (weights == 0.25).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
def test_route_logits_kernel_on_adversarial_logits(dtype, top_k):
    generator = torch.Generator().manual_seed(top_k)
    nan, inf = float("nan"), float("inf")
    special = torch.tensor([nan, inf, -inf, -0.0, 0.0, 3e38, -3e38, 1.0])
    for E in (8, 31, 32, 33, 128, 512):
        logits = tied_logits(257, E, generator, torch.float32)
        logits[::7] = special[torch.randint(0, 8, (E,), generator=generator)]
        logits[3::11] = 1.0  # all-equal rows
        logits = logits.to(dtype).cuda()
        for scoring, renormalize in (("softmax_topk", False), ("softmax", True), ("softmax", False)):
            weights, ids = ops.route_logits(logits, top_k, scoring, renormalize)
            check_routing(weights, ids, logits, top_k, scoring, renormalize)
            ref_weights, ref_ids = reference_route(logits[:64].cpu(), top_k, scoring, renormalize)
            assert torch.equal(ids[:64].cpu(), ref_ids)


def test_outputs_are_fully_written_and_deterministic():
    generator = torch.Generator().manual_seed(9)
    weight, bias = router_weights(128, 2880, generator)
    counters = torch.zeros(ops.ROUTE_COUNTERS, dtype=torch.int32, device="cuda")  # no allocation per call
    for M in (1, 5, 33, 128):
        x = realistic_activations(M, 2880, generator)
        for _ in range(3):  # poison the blocks the outputs will get
            junk = [torch.full((M, 4), -7, dtype=torch.int64, device="cuda"),
                    torch.full((M, 4), float("nan"), dtype=torch.bfloat16, device="cuda"),
                    torch.full((M, 128), float("nan"), dtype=torch.bfloat16, device="cuda")]
            del junk
        first = ops.route(x, weight, bias, 4, counters=counters)
        for _ in range(20):
            again = ops.route(x, weight, bias, 4, counters=counters)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
        # every logit is the router's (an unwritten one would be routed consistently all the same),
        # and every weight and id the routing of these logits (a poisoned or stale one would not be)
        assert torch.equal(first[2], ops.router_gemm(x, weight, bias))
        check_routing(*first, 4)


def test_gate_route_in_a_cuda_graph_and_compiled():
    torch.manual_seed(4)
    gate = GateLinear(2880, 128, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(16, 2880, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        gate.route(x, 4)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = gate.route(x, 4)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, b) for a, b in zip(captured, gate.route(x, 4)))
        compiled = torch.compile(lambda t: gate.route(t, 4, ids_dtype=torch.int32), fullgraph=True)
        assert all(torch.equal(a, b) for a, b in zip(compiled(x), gate.route(x, 4, ids_dtype=torch.int32)))
    assert not gate.route_counters.any()


def test_lora_route_on_the_gpu():
    torch.manual_seed(5)
    slots = TokenSlots(max_tokens=64, device="cuda")
    base = GateLinear(2880, 128, dtype=torch.bfloat16, device="cuda", pdl=True)
    layer = GateLinearWithLoRA(base, max_loras=4, max_rank=16, token_slots=slots)
    for s in range(4):
        layer.set_lora(s, torch.randn(16, 2880, device="cuda").bfloat16() * 0.02,
                       torch.randn(128, 16, device="cuda").bfloat16(), scaling=1.5)
    slots.set([s % 5 - 1 for s in range(32)])
    x = torch.randn(32, 2880, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        weights, ids, logits = layer.route(x, 4)
        assert torch.equal(logits, layer(x))
        check_routing(weights, ids, logits, 4)


@pytest.mark.slow
@pytest.mark.parametrize("M,E", [(4, 128), (32, 32), (128, 128)])
def test_100k_routed_calls_under_memory_pressure(M, E):
    """Every routing of 34,000 calls per shape (102,000 over the three; PDL in half the batches),
    made while copies saturate HBM on another stream, equals a quiet rerun bit for bit; the quiet
    answers equal route_torch's."""
    K, calls, batches = 2880, 1000, 34
    generator = torch.Generator().manual_seed(M)
    gpu_generator = torch.Generator(device="cuda").manual_seed(M + 1)
    weight, bias = router_weights(E, K, generator)
    counters = torch.zeros(ops.ROUTE_COUNTERS, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    big_a = torch.empty(512 * 1024 * 1024 // 4, device="cuda")
    big_b = torch.zeros_like(big_a)
    mismatches = 0
    for batch in range(batches):
        xs = realistic_activations(calls * M, K, gpu_generator).view(calls, M, K)
        torch.cuda.synchronize()
        memory_hog(side, big_a, big_b, rounds=6)
        loaded = [ops.route(xs[i], weight, bias, 4, pdl=batch % 2 == 1, counters=counters)
                  for i in range(calls)]
        torch.cuda.synchronize()
        quiet = [ops.route(xs[i], weight, bias, 4, counters=counters) for i in range(calls)]
        for got, want in zip(loaded, quiet):
            mismatches += not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
        for i in range(0, calls, 50):
            check_routing(quiet[i][0], quiet[i][1], quiet[i][2], 4)
    assert mismatches == 0, f"{mismatches} of {batches * calls} routings differed under load"
    assert not counters.any()


@pytest.mark.parametrize("M", [1, 8, 128])
def test_pdl_chain_producer_route_consumer(M):
    """producer writes x -> fused route (PDL) -> our PDL-launched consumer reads its logits ->
    the producer overwrites x for the next step; in a CUDA graph and eagerly, against a serial run."""
    generator = torch.Generator().manual_seed(11 + M)
    steps, K, E = 100, 2880, 128
    weight, bias = router_weights(E, K, generator)
    sources = realistic_activations(steps * M, K, generator).view(steps, M, K)
    x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    ids_out = torch.full((steps, M, 4), -1, device="cuda", dtype=torch.int64)
    consumer_out = torch.full((steps, M, 2), -1, device="cuda", dtype=torch.int64)
    counters = torch.zeros(ops.ROUTE_COUNTERS, dtype=torch.int32, device="cuda")

    def chain(i):
        torch.mul(sources[i], 2.0, out=x)
        _, ids, logits = ops.route(x, weight, bias, 4, pdl=True, counters=counters)
        _, second = ops.route_logits(logits, 2, pdl=True)
        ids_out[i].copy_(ids)
        consumer_out[i].copy_(second)

    chain(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(steps):
            chain(i)
    expected_ids, expected_second = [], []
    for i in range(steps):
        _, ids, logits = ops.route(sources[i] * 2.0, weight, bias, 4)
        torch.cuda.synchronize()
        expected_ids.append(ids)
        expected_second.append(ops.route_logits(logits, 2)[1])
        torch.cuda.synchronize()
    expected_ids, expected_second = torch.stack(expected_ids), torch.stack(expected_second)
    for _ in range(3):
        ids_out.fill_(-1)
        consumer_out.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(ids_out, expected_ids) and torch.equal(consumer_out, expected_second)
    for i in range(steps):
        chain(i)
    torch.cuda.synchronize()
    assert torch.equal(ids_out, expected_ids) and torch.equal(consumer_out, expected_second)
