"""replace_routers on transformers' MoE families, whole models: bit-identical to the unpatched model on
the CPU, the same checkpoints, and adapters that route as PEFT routes them (mixed batches too)."""

import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from moe_models import VOCAB, assert_router_logits, load_peft, needs_target_parameters, tiny_moe  # noqa: E402

from gate import GateLinear  # noqa: E402
from lora.adapter_io import RouterAdapter, save_adapter  # noqa: E402
from lora.layer import GateLinearWithLoRA  # noqa: E402
from lora.manager import AdapterManager  # noqa: E402
from lora.registry import get_token_slots  # noqa: E402
from moegate.routers import replace_routers, restore_routers  # noqa: E402
from moegate.transformers import GateGptOssRouter, replace_gpt_oss_routers  # noqa: E402

# One model type per routing scheme in transformers 5.x: softmax then top-k (Mixtral, Qwen, OLMoE,
# PhiMoE, Granite...), sigmoid with groups and a correction bias in float32 (DeepSeek V2/V3, GLM-4,
# dots1, Solar), sigmoid after top-k from an nn.Linear subclass (Llama-4), a forward with an extra
# argument (MiniMax-M2).
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "phimoe", "granitemoe", "minimax",
            "minimax_m2", "deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "solar_open", "cohere2_moe",
            "llama4_text", "aria_text", "exaone_moe"]
# Routers that compute in float32 from their weight: their bf16 weights are stored in float32.
FLOAT32_ROUTERS = ["deepseek_v3", "glm4_moe"]


def supported(model_type):
    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")


def tokens(batch=3, seq=7, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def routers_of(model, names):
    return [model.get_submodule(name) for name in names]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_whole_model_is_bit_identical_to_the_unpatched_model(model_type):
    supported(model_type)
    reference = tiny_moe(model_type, seed=1)
    patched = copy.deepcopy(reference)
    names = replace_routers(patched)
    assert names and all(type(r).__mro__[2] is type(reference.get_submodule(n))
                         for n, r in zip(names, routers_of(patched, names)))
    for router in routers_of(patched, names):
        assert isinstance(router.linear, GateLinear) and router.weight is router.linear.weight
    calls = []
    for router in routers_of(patched, names):  # the gate really computes every router's logits
        router.linear.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        got = patched(ids, output_router_logits=True)
    assert len(calls) == len(names)
    assert torch.equal(got.logits, expected.logits)
    assert len(got.router_logits) == len(expected.router_logits) == len(names)  # output recording
    for ours, theirs in zip(got.router_logits, expected.router_logits):
        assert torch.equal(ours, theirs)
    assert sorted(patched.state_dict()) == sorted(reference.state_dict())  # transformers' keys
    assert replace_routers(patched) == []  # a second call replaces nothing


@pytest.mark.parametrize("model_type", FLOAT32_ROUTERS)
def test_routers_computing_in_float32_keep_their_bits_in_a_bfloat16_model(model_type):
    supported(model_type)
    reference = tiny_moe(model_type, seed=2, dtype=torch.bfloat16)
    patched = copy.deepcopy(reference)
    names = replace_routers(patched, max_loras=1, max_rank=4)
    for router in routers_of(patched, names):  # stored in float32: exact, it computes in float32
        assert router.weight.dtype == torch.float32
    ids = tokens()
    get_token_slots(patched).fill(ids.numel(), -1)
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, reference(ids).logits)


def test_replace_and_restore_checkpoints_and_slot_minus_one():
    reference = tiny_moe("qwen3_moe", seed=3)
    patched = copy.deepcopy(reference)
    names = replace_routers(patched, max_loras=2, max_rank=4)
    routers = routers_of(patched, names)
    assert all(isinstance(r.linear, GateLinearWithLoRA) for r in routers)
    assert sorted(patched.state_dict()) == sorted(reference.state_dict())
    other = tiny_moe("qwen3_moe", seed=4)
    replace_routers(other, max_loras=2, max_rank=4)
    other.load_state_dict(reference.state_dict())  # an unpatched checkpoint loads strictly
    generator = torch.Generator().manual_seed(3)
    for router in routers:
        lora_a, lora_b = torch.randn(4, 64, generator=generator), torch.randn(8, 4, generator=generator)
        router.linear.set_lora(0, lora_a, lora_b, 2.0)
    ids = tokens(batch=2, seq=5)
    slots = get_token_slots(patched)
    with torch.no_grad():
        slots.fill(ids.numel(), -1)
        assert torch.equal(patched(ids).logits, reference(ids).logits)  # slot -1: the base, bit for bit
        slots.fill(ids.numel(), 0)
        assert (patched(ids).logits - reference(ids).logits).abs().max() > 1e-3
    assert restore_routers(patched) == names
    assert all(type(r) is type(reference.get_submodule(n)) for n, r in zip(names, routers_of(patched, names)))
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, reference(ids).logits)


def test_gpt_oss_is_one_case_of_replace_routers():
    from moe_models import gpt_oss

    model = gpt_oss(seed=5)
    names = replace_routers(model)
    assert names == [f"model.layers.{i}.mlp.router" for i in range(2)]
    assert all(isinstance(r, GateGptOssRouter) for r in routers_of(model, names))
    assert replace_gpt_oss_routers(model) == []


def test_refusals():
    with pytest.raises(ValueError, match="holds no transformers MoE router"):
        replace_routers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    # out_dtype reaches only gpt-oss's own forward: Llama-4's routing would compute its experts'
    # input in it (a crash in a bf16 model), so it is refused before anything changes.
    supported("llama4_text")
    model = tiny_moe("llama4_text", seed=3, dtype=torch.bfloat16)
    before = list(model.named_modules())
    with pytest.raises(ValueError, match="out_dtype applies to gpt-oss routers only.*Llama4Router"):
        replace_routers(model, out_dtype=torch.float32)
    assert all(a is b for (_, a), (_, b) in zip(model.named_modules(), before))
    with torch.no_grad():
        model(tokens())
    from moe_models import router_config
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = router_config(target_parameters=["gate.weight"])
        peft_model = get_peft_model(tiny_moe("mixtral", seed=6), config)
    with pytest.raises(ValueError, match="PEFT"):
        replace_routers(peft_model)


@pytest.mark.parametrize("product", [
    lambda x, w: x @ w.T,  # a transposed view
    lambda x, w: torch.nn.functional.linear(x, w.data),
    lambda x, w: torch.nn.functional.linear(x, w.half().float()),  # a real cast
    lambda x, w: torch.nn.functional.linear(x, w * 1),
    lambda x, w: torch.nn.functional.linear(x, w, torch.zeros(w.shape[0])),  # a bias not its own
])
def test_a_router_using_its_weight_another_way_raises_instead_of_skipping_the_gate(product):
    """A router whose forward reads its weight other than through F.linear(x, weight) would compute
    without the gate (and its adapters): it must raise, never run. Inspecting it is fine."""

    class OddRouter(torch.nn.Module):
        __module__ = "transformers.models.odd.modeling_odd"

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 64))

        def forward(self, hidden_states):
            assert self.weight.shape[0] == 8 and self.weight.dtype == self.weight.float().dtype
            return product(hidden_states, self.weight)

    model = torch.nn.ModuleDict({"router": OddRouter()})
    assert replace_routers(model) == ["router"]
    with pytest.raises(RuntimeError, match=r"uses its weight through .*not F.linear|a bias other"):
        model["router"](torch.randn(3, 64))


def adapters_for(model, names, tmp_path, seeds=(1, 2)):
    """Random non-zero router adapters on ``names``, targeted as PEFT targets routers (parameters)."""
    dirs = {}
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        rank = 2 + 2 * (seed % 2)
        weights = {}
        for name in names:
            experts, hidden = model.get_submodule(name).weight.shape
            weights[name] = (torch.randn(rank, hidden, generator=generator) / hidden**0.5,
                             torch.randn(experts, rank, generator=generator))
        dirs[f"a{seed}"] = tmp_path / f"a{seed}"
        save_adapter(RouterAdapter.from_weights(weights, lora_alpha=2 * rank), dirs[f"a{seed}"])
    return dirs


@needs_target_parameters
@pytest.mark.parametrize("model_type", FAMILIES)
def test_mixed_batch_routes_as_peft(model_type, tmp_path):
    """PEFT (target_parameters on each router's weight) runs each adapter on the whole batch; our
    mixed batch must give every row what PEFT gives it (fp32: summation order only)."""
    supported(model_type)
    base = tiny_moe(model_type, seed=7)
    ours = copy.deepcopy(base)
    names = replace_routers(ours)
    dirs = adapters_for(base, names, tmp_path)
    manager = AdapterManager(ours, max_loras=2, max_rank=4)
    for name, path in dirs.items():
        manager.add(name, path)
    peft_model = load_peft(base, dirs)
    requests = ["a1", None, "a2", "a1"]
    ids = tokens(batch=len(requests), seq=6, seed=1)
    manager.activate(requests, ids.shape[1])
    with torch.no_grad():
        got = ours(ids).logits
        for name in dict.fromkeys(requests):
            rows = [i for i, n in enumerate(requests) if n == name]
            if name is None:
                with peft_model.disable_adapter():
                    expected = peft_model(ids).logits
            else:
                peft_model.set_adapter(name)
                expected = peft_model(ids).logits
            torch.testing.assert_close(got[rows], expected[rows], rtol=0, atol=1e-5)
            assert torch.equal(got[rows].argmax(-1), expected[rows].argmax(-1))
        base_logits = base(ids).logits
    assert (got[0] - base_logits[0]).abs().max() > 1e-3  # the adapters change the routing


def test_compiled_generic_router_with_lora_follows_swaps_without_recompiling():
    import torch._dynamo

    model = tiny_moe("qwen3_moe", seed=8)
    names = replace_routers(model)
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    generator = torch.Generator().manual_seed(8)

    def adapter():
        return RouterAdapter.from_weights({name: (torch.randn(4, 64, generator=generator),
                                                  torch.randn(8, 4, generator=generator)) for name in names},
                                          lora_alpha=8)

    current = adapter()
    manager.add("a", current)
    router = model.get_submodule(names[0])
    compiled = torch.compile(router, fullgraph=True)
    x = torch.randn(6, 64, generator=generator)
    for step, requests in enumerate((["a", None, "a"], [None, "a", "a"])):
        if step:
            current = adapter()
            manager.swap("a", current)
        manager.activate(requests, 2)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=step > 0):
            got, want = compiled(x), router(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])  # logits, expert ids
        torch.testing.assert_close(got[1], want[1])  # inductor fuses the softmax: not bit-exact
        # this step's mapping and adapter, not the first step's
        assert_router_logits(got[0], x, router, current, names[0], requests, 2)


@pytest.mark.parametrize("model_type,dtype", [("gpt_oss", torch.float32), ("mixtral", torch.float32),
                                              ("deepseek_v3", torch.bfloat16)])
def test_refused_lora_options_leave_the_model_as_it_was(model_type, dtype):
    """The LoRA wrap comes after the routers are swapped: when it refuses its options, every router
    swapped so far is put back, with its weight's dtype (DeepSeek's gate had stored it in float32)."""
    supported(model_type)
    model = tiny_moe(model_type, seed=3, dtype=dtype)
    before = [(name, module) for name, module in model.named_modules()]
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="max_rank must be >= 1"):
        replace_routers(model, max_loras=2, max_rank=0)
    after = list(model.named_modules())
    assert [name for name, _ in after] == [name for name, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    if model_type == "gpt_oss":
        with pytest.raises(ValueError, match="max_rank must be >= 1"):
            replace_gpt_oss_routers(model, max_loras=2, max_rank=0)
        assert all(a is b for (_, a), (_, b) in zip(model.named_modules(), before))


@pytest.mark.parametrize("model_type", ["gpt_oss", "mixtral"])
def test_forward_hooks_and_eval_mode_carry_over_and_hooked_forwards_are_refused(model_type):
    model = tiny_moe(model_type, seed=4).eval()
    name = next(n for n, m in model.named_modules() if type(m).__name__.endswith("Router"))
    calls = []
    handle = model.get_submodule(name).register_forward_hook(lambda module, args, out: calls.append(1))
    ids = tokens(batch=1, seq=4, seed=2)
    replace_routers(model)
    router = model.get_submodule(name)
    assert not router.training
    with torch.no_grad():
        model(ids)
    assert len(calls) == 1  # the hook fired on the replacement
    handle.remove()  # and its handle still removes it
    with torch.no_grad():
        model(ids)
    assert len(calls) == 1
    restore_routers(model)
    assert not model.get_submodule(name).training

    hooked = tiny_moe(model_type, seed=4)
    original = hooked.get_submodule(name)
    forward = original.forward
    original.forward = lambda *args, **kwargs: forward(*args, **kwargs)  # as accelerate's hooks do
    with pytest.raises(ValueError, match="forward was replaced on the instance"):
        replace_routers(hooked)
    assert hooked.get_submodule(name) is original


def test_a_patched_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of a model with Gate<RouterClass> routers (classes made at run time)."""
    import subprocess
    import sys

    model = tiny_moe("mixtral", seed=5)
    replace_routers(model)
    ids = tokens(batch=1, seq=5, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"model": model, "ids": ids, "expected": expected}, tmp_path / "patched.pt")
    code = ("import sys, torch\n"
            f"saved = torch.load({str(tmp_path / 'patched.pt')!r}, weights_only=False)\n"
            "with torch.no_grad():\n"
            "    out = saved['model'](saved['ids']).logits\n"
            "assert type(saved['model'].model.layers[0].mlp.gate).__name__ == 'GateMixtralTopKRouter'\n"
            "assert torch.equal(out, saved['expected'])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("model_type", FLOAT32_ROUTERS)
@pytest.mark.parametrize("max_loras", [0, 2])
def test_float32_routers_follow_a_dtype_conversion_after_replacement_and_restore_to_it(model_type, max_loras):
    """A patched float32 model converted to bfloat16: the gate stays float32 holding the rounded
    values (the router computes in float32), the logits stay the unpatched model's, and
    restore_routers gives the weight the dtype the router's own would have."""
    supported(model_type)
    reference = tiny_moe(model_type, seed=2)
    patched = copy.deepcopy(reference)
    names = replace_routers(patched, max_loras=max_loras, max_rank=4)
    reference, patched = reference.to(torch.bfloat16), patched.to(torch.bfloat16)
    assert all(router.weight.dtype == torch.float32 for router in routers_of(patched, names))
    ids = tokens()
    if max_loras:
        get_token_slots(patched).fill(ids.numel(), -1)
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, reference(ids).logits)
    restore_routers(patched)
    assert {n: t.dtype for n, t in patched.state_dict().items()} == \
        {n: t.dtype for n, t in reference.state_dict().items()}


@pytest.mark.parametrize("model_type", FLOAT32_ROUTERS)
def test_float32_routers_keep_their_loaded_adapters_through_a_dtype_conversion(model_type):
    """The gate of a router computing in float32 keeps float32 slots: a conversion moves them and
    rounds nothing in them (it rounded them through bf16, or refused them past fp16's range)."""
    supported(model_type)
    model = tiny_moe(model_type, seed=1)
    names = replace_routers(model, max_loras=2, max_rank=4)
    layer = model.get_submodule(names[0]).linear
    generator = torch.Generator().manual_seed(2)
    lora_a = torch.randn(4, layer.in_features, generator=generator) / 3
    lora_b = torch.randn(layer.num_experts, 4, generator=generator) * 1e5  # past fp16's range
    layer.set_lora(0, lora_a, lora_b, 2.0)
    model.half()
    assert layer.weight.dtype == layer.lora_a_stacked.dtype == torch.float32
    assert torch.equal(layer.lora_a_stacked[0, :4], lora_a)
    assert torch.equal(layer.lora_b_stacked[0, :, :4], lora_b)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_a_router_shared_by_two_layers_is_replaced_and_restored_at_both(model_type):
    """Tied layers: one router object at two paths. Both get the one gate (the second path ran the
    unpatched router, without the gate or its adapters), and restore puts one router back at both."""
    model = tiny_moe(model_type, seed=4)
    attribute = "router" if model_type == "gpt_oss" else "gate"
    mlps = [layer.mlp for layer in model.model.layers[:2]]
    setattr(mlps[1], attribute, getattr(mlps[0], attribute))
    names = replace_routers(model, max_loras=1, max_rank=4)
    first, second = (getattr(mlp, attribute) for mlp in mlps)
    assert first is second and names[0].startswith("model.layers.0.")
    assert isinstance(first.linear, GateLinearWithLoRA)
    restore_routers(model)
    first, second = (getattr(mlp, attribute) for mlp in mlps)
    assert first is second and not hasattr(first, "linear")
