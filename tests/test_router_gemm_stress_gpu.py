"""Race hunting on the GPU: >= 100,000 router calls under a lagging memory system, and PDL chains
(producer -> router -> router -> consumer) checked bit for bit against the same chain without PDL."""

import pytest
import torch
from gpu_helpers import memory_hog, realistic_activations, router_weights

from gate import ops, tuning

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CALLS_PER_BATCH = 1000
BATCHES = 100  # 100,000 checked calls


@pytest.mark.parametrize("M,E,K,kernel", [(4, 128, 2880, "small_m"), (32, 32, 2880, "small_m"),
                                          (128, 128, 2880, "sm90")])
def test_100k_calls_under_memory_pressure_are_exact(M, E, K, kernel):
    probe = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    assert tuning.router_gemm_route(probe, torch.empty(E, K, device="cuda", dtype=torch.bfloat16)) == kernel
    generator = torch.Generator().manual_seed(77)
    gpu_generator = torch.Generator(device="cuda").manual_seed(78)
    weight, bias = router_weights(E, K, generator)
    side = torch.cuda.Stream()
    big_a = torch.empty(512 * 1024 * 1024 // 4, device="cuda")
    big_b = torch.zeros_like(big_a)
    mismatches = 0
    for batch in range(BATCHES):
        xs = realistic_activations(CALLS_PER_BATCH * M, K, gpu_generator).view(CALLS_PER_BATCH, M, K)
        pdl = batch % 2 == 1
        torch.cuda.synchronize()
        memory_hog(side, big_a, big_b, rounds=6)
        loaded = torch.stack([ops.router_gemm(xs[i], weight, bias, pdl=pdl)
                              for i in range(CALLS_PER_BATCH)])
        torch.cuda.synchronize()
        quiet = torch.stack([ops.router_gemm(xs[i], weight, bias) for i in range(CALLS_PER_BATCH)])
        mismatches += (loaded != quiet).any(dim=(1, 2)).sum().item()
        # And the quiet answers are right: on every tenth call, no more than twice cuBLAS's error
        # against float64 (the float64 reference of all 1000 large calls would dominate the run).
        sample = slice(0, CALLS_PER_BATCH, 10)
        ref = torch.einsum("cmk,ek->cme", xs[sample].double(), weight.double()) + bias.double()
        cublas = torch.stack([ops.router_gemm_cublas(x, weight, bias) for x in xs[sample]])
        err_ours = (quiet[sample].double() - ref).norm().item()
        err_cublas = (cublas.double() - ref).norm().item()
        assert err_ours <= 2 * err_cublas, f"batch {batch}: error {err_ours:.4g} vs cuBLAS {err_cublas:.4g}"
    assert mismatches == 0, f"{mismatches} of {BATCHES * CALLS_PER_BATCH} calls differed under load"


@pytest.mark.parametrize("M", [1, 8, 64])
def test_pdl_chain_in_a_cuda_graph_matches_serial(M):
    generator = torch.Generator().manual_seed(5 + M)
    iterations = 200
    K, E1, E2 = 2880, 128, 32
    w1, b1 = router_weights(E1, K, generator)
    w2, b2 = router_weights(E2, E1, generator)
    sources = realistic_activations(iterations * M, K, generator).view(iterations, M, K)
    x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    results = torch.full((iterations, M, E2), float("nan"), device="cuda", dtype=torch.bfloat16)

    def chain(i, pdl):
        torch.mul(sources[i], 2.0, out=x)                    # producer writes x
        logits = ops.router_gemm(x, w1, b1, pdl=pdl)         # router reads x
        second = ops.router_gemm(logits, w2, b2, pdl=pdl)    # dependent router reads logits
        results[i].copy_(second)                             # consumer reads logits

    chain(0, True)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iterations):
            chain(i, True)
    def serial(i):
        # Without PDL and with synchronisations: no launch overlaps any other.
        first = ops.router_gemm(sources[i] * 2.0, w1, b1, pdl=False)
        torch.cuda.synchronize()
        second = ops.router_gemm(first, w2, b2, pdl=False)
        torch.cuda.synchronize()
        return second

    expected = torch.stack([serial(i) for i in range(iterations)])
    for _ in range(5):
        results.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(results, expected)
    results.fill_(float("nan"))
    for i in range(iterations):  # the same chain eagerly, PDL on
        chain(i, True)
    torch.cuda.synchronize()
    assert torch.equal(results, expected)
