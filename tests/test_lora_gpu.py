"""GateLinearWithLoRA on the GPU, bf16: float64 reference, slot -1 bits, no host sync, and CUDA-graph
capture / torch.compile with slot contents and the token -> slot mapping swapped between calls.

The reference, the error bounds and the builders come from tests/test_lora_layer.py.
"""

import pytest
import torch
import torch._dynamo
from gpu_helpers import kernels_launched
from test_lora_layer import (
    assert_matches_reference,
    bits,
    error_bound,
    loaded_layer,
    merged_error_bound,
    random_adapter,
    random_gate,
)
from torch import nn

from gate import ops
from lora import GateLinearWithLoRA, TokenSlots, add_lora_delta, get_token_slots, replace_modules

pytestmark = pytest.mark.gpu
K = 2880


@pytest.mark.kernel
@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("M, num_adapters", [(1, 1), (3, 3), (8, 8), (17, 8), (128, 5), (129, 8), (512, 8)])
def test_mixed_batch_on_the_kernel_path(M, num_adapters, E):
    generator = torch.Generator().manual_seed(M * 1009 + E)
    layer, adapters, mapping = loaded_layer(K, E, 8, 64, num_adapters, M, torch.bfloat16, generator,
                                            device="cuda")
    assert layer.base_layer.backend == "moegate"
    x = torch.randn(M, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    unadapted = (mapping < 0).cuda()
    # Grad mode on and off: the base gate and the shrink in one launch either way, where one of our
    # Hopper kernels serves the base gate.
    for grad_mode in (True, False):
        with torch.set_grad_enabled(grad_mode):
            out = layer(x)
            base_out = layer.base_layer(x)
        assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
        assert_matches_reference(out, x, layer, adapters, mapping)
        assert torch.equal(bits(out[unadapted]), bits(base_out[unadapted])), grad_mode


@pytest.mark.kernel
@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_chain_matches_serial_launches(pdl):
    """With its base gate's pdl on, the layer's first kernel is a PDL dependent of the kernel before
    it; on or off, the expand is one of the first kernel's. 200 rounds in one CUDA graph, each with
    x written by the kernel right before the layer: every output has the bits of the same ops
    launched without PDL."""
    M, E, rounds = 8, 128, 200
    generator = torch.Generator().manual_seed(77)
    layer, _, _ = loaded_layer(K, E, 4, 64, 4, M, torch.bfloat16, generator, device="cuda")
    layer.base_layer.pdl = pdl
    sources = torch.randn(rounds, M, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    static_x = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    outs = torch.empty(rounds, M, E, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(static_x.copy_(sources[0]))  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(rounds):
                torch.mul(sources[i], 1, out=static_x)  # a producer kernel (copy_ is a memcpy node)
                outs[i] = layer(static_x)
        outs.fill_(float("nan"))
        graph.replay()
        slot_ids = layer.token_slots.for_tokens(M)
        S, R = layer.lora_a_stacked.shape[:2]
        for i in range(rounds):
            x = sources[i]
            logits, xa = ops.router_gemm_with_shrink(x, layer.base_layer.weight, layer.base_layer.bias,
                                                     layer.lora_a_stacked.view(S * R, K))
            serial = ops.lora_expand(logits, xa, layer.lora_b_stacked, layer.scaling, slot_ids)
            assert torch.equal(bits(outs[i]), bits(serial)), f"round {i}"


@pytest.mark.kernel
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_gradients_reach_x_and_the_base_gate_as_on_the_torch_path(out_dtype):
    generator = torch.Generator().manual_seed(41)
    layer, _, mapping = loaded_layer(K, 128, 8, 64, 5, 24, torch.bfloat16, generator,
                                     out_dtype=out_dtype, device="cuda")
    base = layer.base_layer.requires_grad_(True)  # random_gate freezes it
    x = torch.randn(24, K, generator=generator).to("cuda", torch.bfloat16)
    grad_out = torch.randn(24, 128, generator=generator).to("cuda", out_dtype or torch.bfloat16)
    params = [base.weight, base.bias]

    def gradients(forward):
        x_leaf = x.clone().requires_grad_()
        return torch.autograd.grad(forward(x_leaf), [x_leaf, *params], grad_out)

    def composed(backend):  # the layer's forward, on a chosen backend
        def forward(x_leaf):
            logits = ops.router_gemm(x_leaf, base.weight, base.bias, out_dtype, backend=backend)
            return add_lora_delta(logits, x_leaf, layer.lora_a_stacked, layer.lora_b_stacked,
                                  layer.scaling, mapping.cuda(), backend=backend)
        return forward

    through_layer, kernels, torch_path = (gradients(layer), gradients(composed("moegate")),
                                          gradients(composed("torch")))
    for name, a, b, c in zip(("x", "weight", "bias"), through_layer, kernels, torch_path):
        assert torch.equal(a, b) and torch.equal(b, c), name


@pytest.mark.kernel
@pytest.mark.parametrize("M", [4, 24])  # the decode kernel, the tensor-core kernel
def test_grad_mode_keeps_the_fused_launch(M):
    """A plain script (grad mode on, the base gate's parameters requiring gradients, x too) launches
    what inference does: the base gate and every slot's shrink in one kernel, then the expand; the
    same output bits, and gradients that reach x and the base gate."""
    generator = torch.Generator().manual_seed(M + 5)
    layer, _, _ = loaded_layer(K, 128, 8, 64, 5, M, torch.bfloat16, generator, device="cuda")
    layer.base_layer.requires_grad_(True)  # random_gate freezes it
    x = torch.randn(M, K, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
    with torch.no_grad():
        inference = kernels_launched(lambda: layer(x))
        plain = layer(x)
    with torch.enable_grad():
        training = kernels_launched(lambda: layer(x))
        out = layer(x)
    assert len(inference) == 2 and training == inference, (inference, training)
    assert out.requires_grad and torch.equal(bits(out), bits(plain))
    out.float().square().sum().backward()
    assert x.grad is not None and layer.base_layer.weight.grad is not None


@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_mixed_batch_any_backend(out_dtype):
    generator = torch.Generator().manual_seed(31)
    layer, adapters, mapping = loaded_layer(K, 128, 8, 64, 8, 200, torch.bfloat16, generator,
                                            out_dtype=out_dtype, device="cuda")
    x = torch.randn(200, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    assert_matches_reference(out, x, layer, adapters, mapping)
    unadapted = (mapping < 0).cuda()
    assert torch.equal(bits(out[unadapted]), bits(layer.base_layer(x)[unadapted]))


def test_forward_makes_no_host_sync():
    generator = torch.Generator().manual_seed(32)
    layer, _, _ = loaded_layer(K, 32, 8, 16, 4, 64, torch.bfloat16, generator, device="cuda")
    x = torch.randn(64, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    layer(x)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class TwoRouters(nn.Module):
    """A GateLinear router and a Mixtral-style nn.Linear gate, on the GPU."""

    def __init__(self, generator, E):
        super().__init__()
        self.router = random_gate(K, E, torch.bfloat16, generator, device="cuda")
        self.gate = nn.Linear(K, E, bias=False, dtype=torch.bfloat16, device="cuda").requires_grad_(False)

    def forward(self, x):
        return self.router(x), self.gate(2 * x)


def _wrapped_model(generator, E=128):
    model = TwoRouters(generator, E)
    replace_modules(model, 4, 64, target=["router", "gate"])
    return model, get_token_slots(model)


def _swap(model, generator, E, first):
    """Loads a fresh set of adapters (slot 0 emptied on the second round) and returns them."""
    adapters = {}
    for name in ("router", "gate"):
        layer = getattr(model, name)
        if first:
            adapters[name] = {0: random_adapter(64, K, E, torch.bfloat16, generator, "cuda"),
                              2: random_adapter(5, K, E, torch.bfloat16, generator, "cuda")}
        else:
            layer.reset_lora(0)
            adapters[name] = {2: random_adapter(16, K, E, torch.bfloat16, generator, "cuda"),
                              3: random_adapter(1, K, E, torch.bfloat16, generator, "cuda")}
        for slot, adapter in adapters[name].items():
            layer.set_lora(slot, *adapter)
    return adapters


def _check(outputs, x, model, adapters, mapping):
    router_out, gate_out = outputs
    assert_matches_reference(router_out, x, model.router, adapters["router"], mapping)
    assert_matches_reference(gate_out, 2 * x, model.gate, adapters["gate"], mapping)


@pytest.mark.parametrize("M", [1, 8, 100])
def test_cuda_graph_replay_follows_slot_and_mapping_changes(M):
    E = 128
    generator = torch.Generator().manual_seed(33 + M)
    model, slots = _wrapped_model(generator, E)
    adapters = _swap(model, generator, E, first=True)
    mapping = torch.tensor([0, 2, -1])[torch.randint(0, 3, (M,), generator=generator)]
    mapping[0] = 0  # an adapted token at every M, M = 1 included
    slots.set(mapping)
    x = torch.randn(M, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        outputs = model(static_x)
    graph.replay()
    torch.cuda.synchronize()
    _check(outputs, x, model, adapters, mapping)

    # Swap slot contents, the mapping and the input, then replay the same graph.
    adapters = _swap(model, generator, E, first=False)
    mapping = torch.tensor([3, 2, -1, 0])[torch.randint(0, 4, (M,), generator=generator)]
    mapping[0] = 3  # the new contents of a slot reach the replay at every M
    slots.set(mapping)
    x = torch.randn(M, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    _check(outputs, x, model, adapters, mapping)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_model_follows_slot_and_mapping_changes(mode):
    E, M = 32, 24
    generator = torch.Generator().manual_seed(34)
    model, slots = _wrapped_model(generator, E)
    adapters = _swap(model, generator, E, first=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    with torch.no_grad():
        mapping = torch.tensor([0, 2, -1])[torch.randint(0, 3, (M,), generator=generator)]
        slots.set(mapping)
        x = torch.randn(M, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
        _check([out.clone() for out in compiled(x)], x, model, adapters, mapping)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                adapters = _swap(model, generator, E, first=False)
                mapping = torch.tensor([3, 2, -1, 0])[torch.randint(0, 4, (M,), generator=generator)]
                slots.set(mapping)
                x = torch.randn(M, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
                _check([out.clone() for out in compiled(x)], x, model, adapters, mapping)


def test_merge_keeps_graphs_of_the_base_layer_valid():
    generator = torch.Generator().manual_seed(35)
    layer = GateLinearWithLoRA(random_gate(K, 128, torch.bfloat16, generator, device="cuda"), 4, 64,
                               TokenSlots(64, device="cuda"))
    adapter = random_adapter(32, K, 128, torch.bfloat16, generator, "cuda")
    layer.set_lora(1, *adapter)
    x = torch.randn(64, K, generator=generator).to(device="cuda", dtype=torch.bfloat16)
    layer.token_slots.fill(64, 1)
    unmerged = layer(x)
    original = layer.weight.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        layer.base_layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        base_out = layer.base_layer(x)
    graph.replay()
    before = base_out.clone()

    layer.merge(1)
    graph.replay()  # the weight was rewritten in place: the graph serves the merged adapter
    # The float64 references run on the CPU.
    x_cpu, original_cpu, bias_cpu = x.cpu(), original.cpu(), layer.bias.cpu()
    adapter_cpu = (adapter[0].cpu(), adapter[1].cpu(), adapter[2])
    ref, bound = merged_error_bound(torch.bfloat16, x_cpu, original_cpu, bias_cpu, adapter_cpu)
    assert ((base_out.double().cpu() - ref).abs() <= bound).all()
    _, unmerged_bound = error_bound(torch.bfloat16, x_cpu, original_cpu, bias_cpu, {0: adapter_cpu},
                                    torch.zeros(64, dtype=torch.int64))
    assert ((base_out.double() - unmerged.double()).abs().cpu() <= bound + unmerged_bound).all()

    layer.unmerge()
    assert torch.equal(bits(layer.weight), bits(original))
    graph.replay()
    assert torch.equal(bits(base_out), bits(before))


def test_device_checks_and_moves():
    generator = torch.Generator().manual_seed(36)
    layer = GateLinearWithLoRA(random_gate(64, 8, torch.bfloat16, generator), 2, 4, TokenSlots(8))
    layer.set_lora(0, *random_adapter(2, 64, 8, torch.bfloat16, generator))
    layer.cuda()
    assert layer.token_slots.device.type == "cuda" and layer.lora_a_stacked.device.type == "cuda"
    assert layer.scaling.device.type == "cuda" and layer.scaling.dtype == torch.float32
    with pytest.raises(ValueError, match="on cpu"):
        layer.set_lora(1, *random_adapter(2, 64, 8, torch.bfloat16, generator))
    with pytest.raises(ValueError, match="token_slots is on cpu"):
        layer.set_token_slots(TokenSlots(8))
