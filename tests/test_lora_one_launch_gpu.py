"""A GateLinearWithLoRA's logits in one launch (torch.ops.moegate.router_gemm_lora: the decode kernel in
clusters that share the shrink through distributed shared memory), on the layer's own buffers. Every
output is compared bit for bit with the layer's two-launch path (router_gemm_with_shrink, then
lora_expand), which tests/test_lora_gpu.py checks against float64; odd sizes, slot -1 and
out-of-range slots, PDL, gradients, CUDA graphs with slots rewritten between replays, and a lagging
producer."""

import pytest
import torch
from gpu_helpers import call_poisoned, kernels_launched, memory_hog, realistic_activations
from test_lora_layer import bits, random_adapter, random_gate

from gate import ops
from lora import GateLinearWithLoRA, TokenSlots

pytestmark = [pytest.mark.gpu, pytest.mark.kernel]


def adapted_layer(K, E, M, max_rank, ranks, generator, bias=True, out_dtype=None, max_loras=4):
    """Adapters of the given ranks in slots 0.., tokens over every slot, -1 and an unchecked id."""
    layer = GateLinearWithLoRA(random_gate(K, E, torch.bfloat16, generator, bias, out_dtype, "cuda"),
                               max_loras, max_rank, TokenSlots(M, device="cuda"))
    for slot, rank in enumerate(ranks):
        layer.set_lora(slot, *random_adapter(rank, K, E, torch.bfloat16, generator, "cuda"))
    choices = list(range(len(ranks))) + [-1]
    mapping = [choices[(i * 7 + 3) % len(choices)] for i in range(M)]
    layer.token_slots.set(mapping)
    return layer


def one_op(layer, x):
    """The layer's logits through router_gemm_lora, with the layer's buffers and options."""
    base = layer.base_layer
    return ops.router_gemm_lora_unchecked(
        x, base.weight, base.bias, layer.lora_a_stacked.view(-1, base.in_features), layer.lora_b_stacked,
        layer.scaling, layer.token_slots.for_tokens(x.shape[0]), base.out_dtype, base.pdl, "moegate")


def two_launches(layer, x):
    """The layer's logits as the two ops the one launch stands for."""
    base = layer.base_layer
    S, R = layer.lora_a_stacked.shape[:2]
    logits, xa = ops.router_gemm_with_shrink(x, base.weight, base.bias,
                                             layer.lora_a_stacked.view(S * R, -1), base.out_dtype)
    return ops.lora_expand(logits, xa, layer.lora_b_stacked, layer.scaling,
                           layer.token_slots.for_tokens(x.shape[0]))


# Slot ids that mean "no adapter" without being -1: past the slots and below -1 (set unchecked).
UNCHECKED_IDS = [7, -5]


def mappings(M, adapters):
    """The token slots each case runs: a single token through every slot, -1 and the unchecked ids
    (the one launch's cases), else the layer's spread."""
    choices = list(range(adapters)) + [-1]
    if M == 1:
        return [[c] for c in choices + UNCHECKED_IDS]
    return [[choices[(i * 7 + 3) % len(choices)] for i in range(M - 1)] + UNCHECKED_IDS[:1]]


# (K, E, M, max_rank, ranks, bias, out_dtype, launches): gpt-oss shapes, odd E and K, the slots'
# rank (max_rank) at its bounds (8 and 64) and between, adapters of smaller ranks, fp32 logits, no
# bias, grids padded to whole clusters (E = 8, 40, 129). launches: the op's kernels with PDL off
# and on. The one launch takes single tokens (M = 1), rank 16 or less under PDL, where it was
# measured faster than the two; the other cases check that the op keeps the two launches' bits.
CASES = [
    (2880, 128, 1, 16, (16, 8, 3), True, None, (1, 1)),
    (2880, 128, 1, 64, (16, 16, 1), True, None, (1, 2)),
    (2880, 128, 1, 64, (64, 40), True, None, (1, 2)),
    (2880, 128, 1, 32, (16, 5), True, torch.float32, (1, 2)),
    (2880, 32, 1, 64, (64,), True, None, (1, 2)),
    (2880, 32, 1, 32, (32, 7), True, torch.float32, (1, 2)),
    (360, 40, 1, 8, (8, 1), True, None, (1, 1)),
    (64, 8, 1, 24, (24, 17), False, None, (1, 2)),
    (4096, 129, 1, 16, (16,), True, torch.float32, (1, 1)),
    (2880, 128, 2, 16, (16, 16), True, None, (2, 2)),
    (2880, 128, 8, 16, (16, 12, 16, 9), True, None, (2, 2)),
    (2880, 32, 5, 32, (32, 7), True, torch.float32, (2, 2)),
]


@pytest.mark.parametrize("K, E, M, max_rank, ranks, bias, out_dtype, launches", CASES)
def test_one_launch_has_the_two_launch_bits(K, E, M, max_rank, ranks, bias, out_dtype, launches):
    generator = torch.Generator().manual_seed(K + 7 * E + 31 * M + max_rank)
    layer = adapted_layer(K, E, M, max_rank, ranks, generator, bias, out_dtype)
    x = realistic_activations(M, K, generator)
    base_out = layer.base_layer(x)
    for mapping in mappings(M, len(ranks)):
        layer.token_slots.set(mapping, validate=False)
        expected = two_launches(layer, x)
        slots = layer.token_slots.for_tokens(M)
        no_adapter = (slots < 0) | (slots >= layer.max_loras)
        for pdl, kernels in zip((False, True), launches):
            layer.base_layer.pdl = pdl
            for _ in range(2):
                # the one launch's output lands in a NaN block (checked): every element is written;
                # the two launches allocate logits and xa first, so theirs may land elsewhere
                out = call_poisoned(one_op, (M, E), out_dtype or torch.bfloat16, layer, x,
                                    require_poisoned=kernels == 1)
                assert torch.equal(bits(out), bits(expected)), (mapping, pdl)
            assert torch.equal(bits(out[no_adapter]), bits(base_out[no_adapter]))
            assert len(kernels_launched(lambda: one_op(layer, x))) == kernels, (mapping, pdl)


def test_adapters_the_one_launch_does_not_take_keep_the_two_launches():
    """Where the one launch is not taken (here M = 8: two launches were measured faster) the op runs
    the two, with the same bits."""
    generator = torch.Generator().manual_seed(3)
    layer = adapted_layer(2880, 128, 8, 64, (64, 16), generator)
    x = realistic_activations(8, 2880, generator)
    assert len(kernels_launched(lambda: one_op(layer, x))) == 2
    assert torch.equal(bits(one_op(layer, x)), bits(two_launches(layer, x)))


def test_gradients_are_the_two_ops_gradients_and_grad_mode_keeps_one_launch():
    generator = torch.Generator().manual_seed(11)
    M, K, E = 1, 2880, 128  # a single token at rank 16: the one launch
    layer = adapted_layer(K, E, M, 16, (16, 8), generator)
    base = layer.base_layer
    S, R = layer.lora_a_stacked.shape[:2]
    x = realistic_activations(M, K, generator)
    slot_ids = layer.token_slots.for_tokens(M)
    grad_out = torch.randn(M, E, generator=generator).to("cuda", torch.bfloat16)
    inputs = (x, base.weight, base.bias, layer.lora_a_stacked.view(S * R, K), layer.lora_b_stacked,
              layer.scaling)

    def gradients(fused):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        x_, w, b, a, lb, sc = leaves
        if fused:
            out = torch.ops.moegate.router_gemm_lora(x_, w, b, a, lb, sc, slot_ids, None, False)
        else:
            logits, xa = ops.router_gemm_with_shrink(x_, w, b, a)
            out = ops.lora_expand(logits, xa, lb, sc, slot_ids)
        return out, torch.autograd.grad(out, leaves, grad_out)

    fused_out, fused = gradients(True)
    two_out, two = gradients(False)
    assert torch.equal(bits(fused_out), bits(two_out))
    for name, a, b in zip(("x", "weight", "bias", "lora_a", "lora_b", "scaling"), fused, two):
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), name
    leaf = x.clone().requires_grad_()
    base.requires_grad_(True)
    with torch.enable_grad():
        assert len(kernels_launched(lambda: one_op(layer, leaf))) == 1


@pytest.mark.parametrize("M", [1, 8])
def test_cuda_graph_replay_follows_slot_and_adapter_changes(M):
    generator = torch.Generator().manual_seed(20 + M)
    K, E = 2880, 128
    layer = adapted_layer(K, E, M, 16, (16, 16, 8), generator)
    layer.base_layer.pdl = True
    static_x = realistic_activations(M, K, generator)
    with torch.no_grad():
        one_op(layer, static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = one_op(layer, static_x)
    for step in range(6):
        static_x.copy_(realistic_activations(M, K, generator))
        layer.token_slots.set([(i + step) % 5 - 1 for i in range(M)])
        if step % 2 == 1:
            adapter = random_adapter(8 * (1 + step % 2), K, E, torch.bfloat16, generator, "cuda")
            layer.set_lora(step % 3, *adapter)
        graph.replay()
        assert torch.equal(bits(static_out), bits(two_launches(layer, static_x))), step


@pytest.mark.slow
@pytest.mark.parametrize("M", [1, 4, 8])
def test_lagging_producer_and_rewritten_slots_in_a_pdl_chain(M):
    """Rounds of producer -> adapted gate -> consumer, all PDL-launched in one CUDA graph, the x of
    each round written by the kernel right before the gate and the token slots rewritten between
    replays, while a side stream hammers memory: every round's output has the serial bits."""
    rounds, replays, K, E = 200, 10, 2880, 128
    generator = torch.Generator().manual_seed(90 + M)
    layer = adapted_layer(K, E, M, 16, (16, 16, 16, 8), generator)
    layer.base_layer.pdl = True
    sources = realistic_activations(rounds * M, K, generator).view(rounds, M, K)
    static_x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    outs = torch.empty(rounds, M, E, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    big_a = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    big_b = torch.zeros_like(big_a)
    with torch.no_grad():
        one_op(layer, static_x.copy_(sources[0]))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(rounds):
                torch.mul(sources[i], 1, out=static_x)  # a producer kernel the gate waits for
                outs[i] = one_op(layer, static_x) * 1    # and a consumer that waits for the gate
        mismatches = 0
        for replay in range(replays):
            layer.token_slots.set([(i * 3 + replay) % 5 - 1 for i in range(M)])
            outs.fill_(float("nan"))
            torch.cuda.synchronize()
            memory_hog(side, big_a, big_b, rounds=4)
            graph.replay()
            torch.cuda.synchronize()
            for i in range(rounds):
                mismatches += not torch.equal(bits(outs[i]), bits(two_launches(layer, sources[i])))
    assert mismatches == 0, f"{mismatches} of {rounds * replays} rounds differed"
