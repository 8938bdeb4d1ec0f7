"""Adapters trained and saved by the real PEFT route here as they do in PEFT.

gpt-oss routers are targeted as PEFT does it (``target_parameters=["mlp.router.weight"]``,
PEFT's ParamWrapper); nn.Linear gates (Mixtral style) through ``target_modules=["gate"]``.
PEFT computes ``F.linear(x, W + s·B@A, b)``, we compute ``F.linear(x, W, b) + s·(x@Aᵀ)@Bᵀ``: the
unmerged results differ by fp32 rounding only (tolerance 1e-5 on O(1) logits), greedy tokens must
be identical, and our merged mode is PEFT's arithmetic exactly (bitwise on the CPU).
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from moe_models import (  # noqa: E402
    VOCAB,
    gate_config,
    gpt_oss,
    load_peft,
    logits_of,
    mixtral_style,
    needs_target_parameters,
    peft_supports_target_parameters,
    router_config,
    train_peft_adapter,
)

from lora.manager import AdapterManager  # noqa: E402
from lora.registry import lora_layers  # noqa: E402
from moegate.transformers import replace_gpt_oss_routers  # noqa: E402
from moegate.verify import peft_adapter  # noqa: E402

ATOL = 1e-5



def peft_mixed(peft_model, run, names, adapter_names=False):
    """``run()`` rows under PEFT with a different adapter per row.

    ``adapter_names=True`` uses PEFT's mixed batches (``run(adapter_names=[...])``), which work only
    for LoRA layers that see the batch dimension; gate layers that see flattened tokens, and PEFT's
    ParamWrapper (gpt-oss routers), cannot mix, so then each adapter runs the whole batch once and
    keeps its rows. ``run(**kwargs)`` returns a [B, ...] tensor.
    """
    if adapter_names:
        return run(adapter_names=[name or "__base__" for name in names])

    def under(name):
        with peft_adapter(peft_model, name):
            return run()

    return rows_by_adapter(names, under)


def rows_by_adapter(names, result_for):
    """Row i of ``result_for(names[i])`` for every row; ``result_for(name)`` runs the whole batch
    under that adapter (None: none) once per distinct name and returns a [B, ...] tensor."""
    out = None
    for name in dict.fromkeys(names):
        result = result_for(name)
        out = torch.empty_like(result) if out is None else out
        rows = [i for i, n in enumerate(names) if n == name]
        out[rows] = result[rows]
    return out


def prompts(batch, seq=7, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gpt_oss_setup(tmp_path_factory):
    """A tiny gpt-oss, two router adapters trained with PEFT, PEFT's model and ours."""
    if not peft_supports_target_parameters():
        pytest.skip("the installed PEFT has no target_parameters")
    base = gpt_oss(seed=30)
    root = tmp_path_factory.mktemp("gpt_oss_adapters")
    patterned = router_config(r=8, lora_alpha=4, use_rslora=True,
                              rank_pattern={"layers.1.mlp.router.weight": 2})
    dirs = {"a": train_peft_adapter(base, root / "a", router_config(), seed=31),
            "b": train_peft_adapter(base, root / "b", patterned, seed=32)}
    ours = copy.deepcopy(base)
    replace_gpt_oss_routers(ours)
    manager = AdapterManager(ours, max_loras=2, max_rank=8)
    for name, path in dirs.items():
        manager.add(name, path)
    return ours, manager, load_peft(base, dirs)


@needs_target_parameters
@pytest.mark.parametrize("name", ["a", "b"])
def test_gpt_oss_single_adapter_logits_and_greedy_tokens(gpt_oss_setup, name):
    ours, manager, peft_model = gpt_oss_setup
    tokens = prompts(3)
    manager.activate([name] * 3, tokens.shape[1])
    with torch.no_grad(), peft_adapter(peft_model, name):
        expected = peft_model(tokens).logits
        got = ours(tokens).logits
        with peft_model.disable_adapter():
            base = peft_model(tokens).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    with peft_adapter(peft_model, name):
        want = peft_model.generate(input_ids=tokens, max_new_tokens=8, do_sample=False)
    with manager.generating([name] * 3):
        assert torch.equal(ours.generate(tokens, max_new_tokens=8, do_sample=False), want)


@needs_target_parameters
def test_gpt_oss_merged_adapter_is_bitwise_peft(gpt_oss_setup):
    ours, manager, peft_model = gpt_oss_setup
    tokens = prompts(2)
    manager.activate(["a", "a"], tokens.shape[1])
    slot = manager.slot_of("a")
    layers = lora_layers(ours).values()
    for layer in layers:
        layer.merge(slot)
    try:
        with torch.no_grad(), peft_adapter(peft_model, "a"):
            assert torch.equal(ours(tokens).logits, peft_model(tokens).logits)
    finally:
        for layer in layers:
            layer.unmerge()


@needs_target_parameters
def test_gpt_oss_mixed_batch_matches_peft(gpt_oss_setup):
    ours, manager, peft_model = gpt_oss_setup
    names = ["a", None, "b", "a", "b"]
    tokens = prompts(len(names), seed=1)
    manager.activate(names, tokens.shape[1])
    with torch.no_grad():
        got = ours(tokens).logits
        expected = peft_mixed(peft_model, lambda **kw: peft_model(tokens, **kw).logits, names)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    want = peft_mixed(peft_model, lambda **kw: peft_model.generate(
        input_ids=tokens, max_new_tokens=8, do_sample=False, **kw), names)
    with manager.generating(names):
        assert torch.equal(ours.generate(tokens, max_new_tokens=8, do_sample=False), want)


@needs_target_parameters
def test_layers_to_transform_with_target_parameters_means_what_it_means_in_peft(tmp_path):
    """Whatever PEFT makes of layers_to_transform with target_parameters (0.21 ignores it and trains
    every router), the file records it and we serve exactly that."""
    base = gpt_oss(seed=39, num_layers=3)
    path = train_peft_adapter(base, tmp_path, router_config(layers_to_transform=[1]), seed=39)
    ours = copy.deepcopy(base)
    replace_gpt_oss_routers(ours)
    manager = AdapterManager(ours, max_loras=1, max_rank=4)
    manager.add("a", path)
    tokens = prompts(2)
    manager.activate(["a", "a"], tokens.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, load_peft(base, {"a": path})(tokens).logits,
                                   rtol=0, atol=ATOL)


def greedy(model, tokens, steps, **kwargs):
    """Greedy decoding without a cache (the Mixtral-style test model has no generate)."""
    for _ in range(steps):
        next_token = logits_of(model, tokens, **kwargs)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def test_nn_linear_gates_mixed_batch_matches_peft_adapter_names(tmp_path):
    base = mixtral_style(seed=33)
    dirs = {"x": train_peft_adapter(base, tmp_path / "x", gate_config(), seed=34),
            "y": train_peft_adapter(base, tmp_path / "y", gate_config(r=2, lora_alpha=16), seed=35)}
    peft_model = load_peft(base, dirs)
    ours = copy.deepcopy(base)
    manager = AdapterManager(ours, max_loras=2, max_rank=4, target=["gate"])
    for name, path in dirs.items():
        manager.add(name, path)
    names = ["x", "y", None, "y"]
    tokens = prompts(len(names), seed=2)
    with torch.no_grad():
        expected = peft_mixed(peft_model, lambda **kw: peft_model(tokens, **kw), names, adapter_names=True)
        manager.activate(names, tokens.shape[1])
        torch.testing.assert_close(ours(tokens), expected, rtol=0, atol=ATOL)
        want = peft_mixed(peft_model, lambda **kw: greedy(peft_model, tokens, 6, **kw), names,
                          adapter_names=True)
        got = tokens
        for _ in range(6):
            manager.activate(names, got.shape[1])
            got = torch.cat([got, ours(got)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)


def test_afmoe_nn_linear_router_gates_match_peft(tmp_path):
    """A real transformers MoE whose router holds an nn.Linear (AFMoE: ``mlp.router.gate``)."""
    afmoe = pytest.importorskip("transformers.models.afmoe.modeling_afmoe")
    from transformers import AfmoeConfig

    config = AfmoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=3, num_dense_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                         num_shared_experts=1, sliding_window=8, pad_token_id=0, eos_token_id=1,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(36)
    base = afmoe.AfmoeForCausalLM(config).eval()
    dirs = {name: train_peft_adapter(base, tmp_path / name, gate_config(target_modules=["router.gate"], r=r),
                                     seed=seed) for name, r, seed in (("x", 4, 37), ("y", 2, 38))}
    # One PeftModel per adapter: PEFT 0.22 maps a target "*.gate" of a qwen2_moe-style model to the
    # parameter gate.weight once the first adapter has made that Linear a LoRA layer, and refuses
    # to load the second adapter there; ours holds both, as the mixed rows below check.
    peft_models = {name: load_peft(base, {name: path}) for name, path in dirs.items()}

    def under(name, run):  # rows without an adapter: the first model, its adapter disabled
        model = peft_models[name] if name is not None else next(iter(peft_models.values()))
        with peft_adapter(model, name):
            return run(model)

    ours = copy.deepcopy(base)
    manager = AdapterManager(ours, max_loras=2, max_rank=4, target=["router.gate"])
    for name, path in dirs.items():
        manager.add(name, path)
    names = ["y", None, "x"]
    tokens = prompts(len(names), seed=3)
    manager.activate(names, tokens.shape[1])
    with torch.no_grad():
        expected = rows_by_adapter(names, lambda name: under(name, lambda model: model(tokens).logits))
        torch.testing.assert_close(ours(tokens).logits, expected, rtol=0, atol=ATOL)
    want = rows_by_adapter(names, lambda name: under(name, lambda model: model.generate(
        input_ids=tokens, max_new_tokens=6, do_sample=False)))
    with manager.generating(names):
        assert torch.equal(ours.generate(tokens, max_new_tokens=6, do_sample=False), want)


def _recording_routers(model, run):
    """``run()``'s output and each gpt-oss router's sorted top-k ids [T, k], in call order."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    recorded = []
    hooks = [m.register_forward_hook(lambda mod, args, out: recorded.append(out[-1].sort(-1).values))
             for m in model.modules() if isinstance(m, GptOssTopKRouter)]
    try:
        with torch.no_grad():
            return run(), recorded
    finally:
        for hook in hooks:
            hook.remove()


def _peft_routing(peft_model, tokens, names):
    """PEFT's logits [B, S, V] and top-k ids per layer [B, S, k], one run per adapter, rows kept."""
    batch, seq = tokens.shape
    logits, ids = None, None
    for name in dict.fromkeys(names):
        with peft_adapter(peft_model, name):
            out, recorded = _recording_routers(peft_model, lambda: peft_model(tokens).logits.float())
        rows = [i for i, n in enumerate(names) if n == name]
        if logits is None:
            logits, ids = torch.empty_like(out), [torch.empty_like(r.view(batch, seq, -1)) for r in recorded]
        logits[rows] = out[rows]
        for layer, layer_ids in enumerate(recorded):
            ids[layer][rows] = layer_ids.view(batch, seq, -1)[rows]
    return logits, ids


def _agreement(ids, reference_ids):
    return torch.stack([(a == b).all(-1) for a, b in zip(ids, reference_ids)]).double().mean().item()


@pytest.mark.gpu
@needs_target_parameters
def test_gpu_bf16_mixed_batch_routes_as_faithfully_as_peft(tmp_path, cuda_device):
    """gpt-oss-20b router shapes, bf16, a mixed batch. The reference is PEFT in fp32; in bf16 near-
    tied experts flip with rounding, so PEFT's own bf16 run against that reference is the bar: our
    top-k agreement must reach it, our logit error stay within twice PEFT's."""
    base = gpt_oss(seed=40, hidden=2880, experts=32, top_k=4)
    dirs = {name: train_peft_adapter(base, tmp_path / name, router_config(r=16, lora_alpha=32), seed=seed)
            for name, seed in (("a", 41), ("b", 42))}
    reference = load_peft(copy.deepcopy(base).to(cuda_device), dirs)
    bf16 = copy.deepcopy(base).to(cuda_device, torch.bfloat16)
    peft_bf16 = load_peft(bf16, dirs)
    ours = copy.deepcopy(bf16)
    replace_gpt_oss_routers(ours)
    manager = AdapterManager(ours, max_loras=2, max_rank=16)
    for name, path in dirs.items():
        manager.add(name, path)
    names = ["a", None, "b", "a", "b", None, "a", "b"]
    tokens = prompts(len(names), seq=128).to(cuda_device)
    manager.activate(names, tokens.shape[1])
    our_logits, our_ids = _recording_routers(ours, lambda: ours(tokens).logits.float())
    our_ids = [layer_ids.view(len(names), tokens.shape[1], -1) for layer_ids in our_ids]
    ref_logits, ref_ids = _peft_routing(reference, tokens, names)
    peft_logits, peft_ids = _peft_routing(peft_bf16, tokens, names)
    assert _agreement(our_ids, ref_ids) >= _agreement(peft_ids, ref_ids) - 0.01
    assert (our_logits - ref_logits).abs().max() <= 2 * (peft_logits - ref_logits).abs().max()
