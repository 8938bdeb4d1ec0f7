"""gpt-oss routers of transformers replaced by GateGptOssRouter: same outputs, same checkpoints."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from moe_models import VOCAB, assert_router_logits, gpt_oss  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter  # noqa: E402

from gate import GateLinear  # noqa: E402
from lora.layer import GateLinearWithLoRA  # noqa: E402
from lora.registry import get_token_slots  # noqa: E402
from moegate.transformers import (  # noqa: E402
    GateGptOssRouter,
    replace_gpt_oss_routers,
    restore_gpt_oss_routers,
    router_returns_logits,
)


class LegacyGptOssRouter(GptOssTopKRouter):
    """The transformers 4.55-4.57 router output: (dense scores [T, E], indices [T, k])."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight, self.bias)
        top_values, indices = torch.topk(logits, self.top_k, dim=-1)
        top_values = F.softmax(top_values, dim=1, dtype=top_values.dtype)
        return torch.zeros_like(logits).scatter_(1, indices, top_values), indices


def tokens(batch=3, seq=9, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_unpatched_model_on_cpu(dtype):
    reference = gpt_oss(seed=1).to(dtype)
    patched = copy.deepcopy(reference)
    names = replace_gpt_oss_routers(patched)
    assert names == [f"model.layers.{i}.mlp.router" for i in range(2)]
    for name in names:
        router = patched.get_submodule(name)
        assert isinstance(router, GateGptOssRouter) and isinstance(router.linear, GateLinear)
        assert router.weight is router.linear.weight  # shared, not copied
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        got = patched(ids, output_router_logits=True)
    assert torch.equal(got.logits, expected.logits)
    # transformers' output recording still finds the routers (they subclass GptOssTopKRouter).
    assert len(got.router_logits) == len(expected.router_logits) == 2
    for ours, theirs in zip(got.router_logits, expected.router_logits):
        assert torch.equal(ours, theirs)
    generated = patched.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference.generate(ids, max_new_tokens=6, do_sample=False))


def test_router_outputs_match_both_transformers_forms():
    model = gpt_oss(seed=2)
    x = torch.randn(17, 64, generator=torch.Generator().manual_seed(2))
    for router_cls, arity in ((GptOssTopKRouter, 3), (LegacyGptOssRouter, 2)):
        original = copy.deepcopy(model.model.layers[0].mlp.router)
        original.__class__ = router_cls
        assert router_returns_logits(original) is (arity == 3)
        holder = torch.nn.ModuleDict({"router": copy.deepcopy(original)})
        replace_gpt_oss_routers(holder)
        with torch.no_grad():
            expected, got = original(x), holder["router"](x)
        assert len(got) == arity
        for ours, theirs in zip(got, expected):
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_equal_logits_pick_the_experts_transformers_picks_on_cpu():
    """Experts with equal logits: torch.topk's choice between them is not the lower index, and the
    patched router must make transformers' choice (here every expert has a twin, so every token
    has ties at its top-k boundary or inside it)."""
    model = gpt_oss(seed=3).to(torch.bfloat16)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for router_cls in (GptOssTopKRouter, LegacyGptOssRouter):
        original = copy.deepcopy(model.model.layers[0].mlp.router)
        original.__class__ = router_cls
        with torch.no_grad():
            original.weight[1::2] = original.weight[0::2]
            original.bias[1::2] = original.bias[0::2]
        holder = torch.nn.ModuleDict({"router": copy.deepcopy(original)})
        replace_gpt_oss_routers(holder)
        with torch.no_grad():
            expected, got = original(x), holder["router"](x)
        for ours, theirs in zip(got, expected):
            assert torch.equal(ours, theirs)


def test_state_dict_keeps_transformers_keys():
    reference = gpt_oss(seed=3)
    original_state = reference.state_dict()
    patched = copy.deepcopy(reference)
    replace_gpt_oss_routers(patched, max_loras=2, max_rank=4)
    assert list(patched.state_dict()) == list(original_state)
    # A checkpoint of the unpatched model loads strictly into the patched one, and back.
    other = gpt_oss(seed=4)
    replace_gpt_oss_routers(other, max_loras=2, max_rank=4)
    other.load_state_dict(original_state)
    assert torch.equal(other.model.layers[1].mlp.router.weight, reference.model.layers[1].mlp.router.weight)
    fresh = gpt_oss(seed=5)
    fresh.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(tokens()).logits, reference(tokens()).logits)


def test_save_pretrained_of_a_patched_model_loads_unpatched(tmp_path):
    from transformers import GptOssForCausalLM

    reference = gpt_oss(seed=5)
    patched = copy.deepcopy(reference)
    replace_gpt_oss_routers(patched, max_loras=1, max_rank=4)
    patched.save_pretrained(tmp_path)
    loaded = GptOssForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.layers[0].mlp.router) is GptOssTopKRouter
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, reference(tokens()).logits)


def test_lora_wrapping_keeps_base_tokens_bit_identical():
    reference = gpt_oss(seed=6)
    patched = copy.deepcopy(reference)
    replace_gpt_oss_routers(patched, max_loras=3, max_rank=8)
    routers = [layer.mlp.router for layer in patched.model.layers]
    assert all(isinstance(r.linear, GateLinearWithLoRA) for r in routers)
    assert len({id(r.linear.token_slots) for r in routers}) == 1
    generator = torch.Generator().manual_seed(6)
    for router in routers:  # a non-zero adapter in slot 0
        router.linear.set_lora(0, torch.randn(8, 64, generator=generator),
                               torch.randn(8, 8, generator=generator), 0.5)
    ids = tokens(batch=2, seq=5)
    slots = get_token_slots(patched)
    slots.fill(ids.numel(), -1)
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, reference(ids).logits)
        slots.fill(ids.numel(), 0)
        assert not torch.allclose(patched(ids).logits, reference(ids).logits)
    # A second call wraps nothing again and does not fail.
    assert replace_gpt_oss_routers(patched, max_loras=3, max_rank=8) == []


def test_restore_gives_back_plain_routers():
    reference = gpt_oss(seed=7)
    model = copy.deepcopy(reference)
    replace_gpt_oss_routers(model)
    assert restore_gpt_oss_routers(model) == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    assert all(type(layer.mlp.router) is GptOssTopKRouter for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference(tokens()).logits)


def test_refuses_models_without_routers_and_peft_wrapped_routers():
    with pytest.raises(ValueError, match="no GptOssTopKRouter"):
        replace_gpt_oss_routers(torch.nn.Linear(4, 4))
    from moe_models import router_config
    from peft import get_peft_model

    peft_model = get_peft_model(gpt_oss(seed=8), router_config())
    with pytest.raises(ValueError, match="PEFT"):
        replace_gpt_oss_routers(peft_model)


@pytest.mark.gpu
def test_gpu_bf16_gpt_oss_20b_router_shapes_match_transformers(cuda_device):
    """gpt-oss-20b router shapes in bf16: within bf16 rounding, same top-k except true near-ties."""
    from gpu_helpers import realistic_activations, reference_logits

    reference = gpt_oss(seed=9, hidden=2880, experts=32, top_k=4).to(cuda_device, torch.bfloat16)
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.mlp.router.bias.normal_(0.0, 1.0)
    patched = copy.deepcopy(reference)
    replace_gpt_oss_routers(patched)
    generator = torch.Generator().manual_seed(9)
    for ours, theirs in zip(patched.model.layers, reference.model.layers):
        x = realistic_activations(512, 2880, generator, device=cuda_device)
        with torch.no_grad():
            got_logits, _, got_ids = ours.mlp.router(x)
            _, _, want_ids = theirs.mlp.router(x)
        exact = reference_logits(x, theirs.mlp.router.weight, theirs.mlp.router.bias)
        # One bf16 rounding (half a bf16 ulp <= |v| * 2^-8) plus fp32 accumulation slack. Our kernel
        # rounds once; cuBLAS (no kernel built) may reduce partial sums in bf16: allow it 4 roundings.
        rounding = exact.abs() * 2.0**-8 + 1e-3
        roundings = 1 if ours.mlp.router.linear.backend == "moegate" else 4
        assert ((got_logits.double() - exact).abs() <= roundings * rounding).all()
        top = torch.topk(exact, 5, dim=-1).values
        # Tokens whose 4th and 5th logits differ by more than any rounding of either side.
        clear = (top[:, 3] - top[:, 4]) > 8 * rounding.max(dim=-1).values
        same = (got_ids.sort(-1).values == want_ids.sort(-1).values).all(-1)
        assert same[clear].all()
        assert same.double().mean() >= 0.99
    ids = tokens(batch=4, seq=16).to(cuda_device)
    with torch.no_grad():
        got, want = patched(ids).logits.float(), reference(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).double().mean() >= 0.95


def test_compiled_router_follows_adapter_swaps_without_recompiling():
    """torch.compile(fullgraph=True) of a LoRA router: swaps and new mappings need no recompile."""
    import torch._dynamo

    from lora.adapter_io import RouterAdapter
    from lora.manager import AdapterManager

    model = gpt_oss(seed=10)
    replace_gpt_oss_routers(model)
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    generator = torch.Generator().manual_seed(10)

    def adapter():
        return RouterAdapter.from_weights(
            {f"model.layers.{i}.mlp.router": (torch.randn(4, 64, generator=generator),
                                               torch.randn(8, 4, generator=generator)) for i in range(2)},
            lora_alpha=8)

    current = adapter()
    manager.add("a", current)
    router = model.model.layers[0].mlp.router
    compiled = torch.compile(router, fullgraph=True)
    x = torch.randn(6, 64, generator=generator)
    for step, names in enumerate((["a", None, "a"], [None, "a", "a"], ["a", "a", None])):
        if step:
            current = adapter()
            manager.swap("a", current)
        manager.activate(names, 2)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=step > 0):
            got, want = compiled(x), router(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])  # logits, expert ids
        torch.testing.assert_close(got[1], want[1])  # inductor fuses the softmax: not bit-exact
        # this step's mapping and adapter, not the first step's
        assert_router_logits(got[0], x, router, current, "model.layers.0.mlp.router", names, 2)
