"""PEFT adapter files: reading with PEFT's semantics, the three key forms, checks, writing."""

import copy
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from moe_models import (  # noqa: E402
    gate_config,
    gpt_oss,
    load_peft,
    logits_of,
    mixtral_style,
    needs_target_parameters,
    router_config,
    train_peft_adapter,
)
from peft import IA3Config, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lora.adapter_io import (  # noqa: E402
    AdapterError,
    RouterAdapter,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lora.peft_keys import MODULE, PARAMETER  # noqa: E402
from lora.registry import get_token_slots, lora_layers, replace_modules  # noqa: E402
from moegate.transformers import replace_gpt_oss_routers  # noqa: E402

pytestmark = needs_target_parameters
ROUTERS = ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]


@pytest.fixture(scope="module")
def base():
    return gpt_oss(seed=10)


@pytest.fixture(scope="module")
def adapter_dir(base, tmp_path_factory):
    return train_peft_adapter(base, tmp_path_factory.mktemp("router"), router_config(), seed=1)


def served(model, max_loras=2, max_rank=8):
    """A copy of ``model`` with GateLinear routers wrapped for LoRA."""
    model = copy.deepcopy(model)
    replace_gpt_oss_routers(model, max_loras=max_loras, max_rank=max_rank)
    return model


def test_reads_a_peft_router_adapter(adapter_dir):
    adapter = read_adapter(adapter_dir)
    assert sorted(adapter.modules) == ROUTERS
    assert adapter.ranks == dict.fromkeys(ROUTERS, 4)
    stored = load_file(adapter_dir / "adapter_model.safetensors")
    for name, weights in adapter.modules.items():
        assert weights.targeted == PARAMETER and weights.scaling == 8 / 4
        assert torch.equal(weights.lora_a, stored[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(weights.lora_b, stored[f"base_model.model.{name}.lora_B.weight"])
        assert weights.lora_b.abs().min() > 0  # trained: every factor non-zero


def test_rank_alpha_patterns_and_rslora_mean_what_peft_means(base, tmp_path):
    config = router_config(r=4, lora_alpha=8, use_rslora=True,
                           rank_pattern={"layers.1.mlp.router.weight": 2},
                           alpha_pattern={r"layers\.0\.mlp\.router\.weight": 16})
    path = train_peft_adapter(base, tmp_path, config, seed=2)
    adapter = read_adapter(path)
    peft_model = load_peft(base, {"default": path})
    for name, weights in adapter.modules.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert weights.rank == peft_layer.r["default"]
        assert weights.scaling == peft_layer.scaling["default"]
    assert adapter.modules[ROUTERS[0]].scaling == 16 / math.sqrt(4)
    assert adapter.modules[ROUTERS[1]].scaling == 8 / math.sqrt(2)


class LinearRouter(nn.Module):
    """A gpt-oss router patched to hold an nn.Linear ``linear`` (key form ``…router.linear.lora_A``)."""

    def __init__(self, router):
        super().__init__()
        self.top_k = router.top_k
        self.linear = nn.Linear(router.hidden_dim, router.num_experts)
        self.linear.weight, self.linear.bias = router.weight, router.bias

    def forward(self, hidden_states):
        logits = self.linear(hidden_states)
        top_values, indices = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(top_values, dim=1, dtype=top_values.dtype), indices


def linear_router_model(model):
    model = copy.deepcopy(model)
    for layer in model.model.layers:
        layer.mlp.router = LinearRouter(layer.mlp.router)
    return model


def test_all_three_key_forms_map_to_the_gate_layers(base, adapter_dir, tmp_path):
    model = served(base)
    layer_names = [f"{name}.linear" for name in ROUTERS]
    assert sorted(load_adapter(adapter_dir, model).bind(model).factors) == layer_names
    # Form 2: PEFT writes …mlp.router.linear.lora_A.weight for routers holding an nn.Linear.
    linear_dir = train_peft_adapter(linear_router_model(base), tmp_path / "linear",
                                    gate_config(target_modules=["router.linear"]))
    assert sorted(load_file(linear_dir / "adapter_model.safetensors")) == [
        f"base_model.model.{name}.linear.{factor}.weight"
        for name in ROUTERS for factor in ("lora_A", "lora_B")]
    assert sorted(load_adapter(linear_dir, model).bind(model).factors) == layer_names
    # Form 3: Mixtral-style nn.Linear gates, …block_sparse_moe.gate.lora_A.weight.
    mixtral = mixtral_style(seed=3)
    gate_dir = train_peft_adapter(mixtral, tmp_path / "gate", gate_config())
    replace_modules(mixtral, 2, 8, target=["gate"])
    bound = load_adapter(gate_dir, mixtral).bind(mixtral)
    assert sorted(bound.factors) == [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
    assert all(w.targeted == MODULE for w in read_adapter(gate_dir).modules.values())
    # An adapter trained on GptOssForCausalLM serves the inner GptOssModel too (suffix match).
    assert sorted(read_adapter(adapter_dir).bind(model.model).factors) == [
        f"layers.{i}.mlp.router.linear" for i in range(2)]


def test_router_linear_form_routes_as_peft(base, tmp_path):
    linear_model = linear_router_model(base)
    path = train_peft_adapter(linear_model, tmp_path, gate_config(target_modules=["router.linear"]), seed=4)
    model = served(base)
    load_adapter(path, model, slot=1)
    ids = torch.randint(3, 96, (2, 7))
    get_token_slots(model).fill(ids.numel(), 1)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = load_peft(linear_model, {"a": path})(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_layers_to_transform_and_slot_reset(tmp_path):
    mixtral = mixtral_style(seed=5)
    both = train_peft_adapter(mixtral, tmp_path / "both", gate_config(), seed=5)
    only_one = train_peft_adapter(mixtral, tmp_path / "one", gate_config(layers_to_transform=[1]), seed=6)
    assert sorted(read_adapter(only_one).modules) == ["model.layers.1.block_sparse_moe.gate"]
    empty_pattern = gate_config(layers_to_transform=[1], layers_pattern="")  # "": PEFT's default pattern
    empty_pattern = train_peft_adapter(mixtral, tmp_path / "empty", empty_pattern, seed=6)
    assert sorted(read_adapter(empty_pattern).modules) == ["model.layers.1.block_sparse_moe.gate"]
    replace_modules(mixtral, 2, 8, target=["gate"])
    layers = lora_layers(mixtral)
    load_adapter(both, mixtral, slot=0)
    assert [layer.slot_ranks[0] for layer in layers.values()] == [4, 4]
    load_adapter(only_one, mixtral, slot=0)  # the uncovered layer's slot is emptied
    assert [layer.slot_ranks[0] for layer in layers.values()] == [0, 4]
    assert layers["model.layers.0.block_sparse_moe.gate"].lora_b_stacked[0].abs().sum() == 0


def test_one_error_lists_every_problem_and_nothing_is_loaded(base, adapter_dir, tmp_path):
    other = gpt_oss(seed=11, num_layers=3, hidden=32)
    wrong = train_peft_adapter(other, tmp_path, router_config(r=16, lora_alpha=16))
    model = served(base, max_rank=8)
    load_adapter(adapter_dir, model, slot=0)
    before = {name: layer.lora_a_stacked.clone() for name, layer in lora_layers(model).items()}
    with pytest.raises(AdapterError) as caught:
        load_adapter(wrong, model, slot=0)
    problems = caught.value.problems
    assert any("model.layers.2.mlp.router" in p and "no LoRA gate layer" in p for p in problems)
    for name in ROUTERS:
        assert any(name in p and "K=64" in p for p in problems)
        assert any(name in p and "rank 16 exceeds" in p for p in problems)
    assert len(problems) == 5 and "nothing was loaded" in str(caught.value)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_a_stacked, before[name])


def _edit_config(path, **changes):
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))
    return path


def _problems(path):
    with pytest.raises(AdapterError) as caught:
        read_adapter(path)
    return "\n".join(caught.value.problems)


def test_unsupported_features_are_refused(base, adapter_dir, tmp_path):
    mixtral = mixtral_style(seed=7)
    assert "DoRA" in _problems(train_peft_adapter(mixtral, tmp_path / "dora", gate_config(use_dora=True)))
    # PiSSA and OLoRA: PEFT runs the initialisation again at load and serves W - s B0 A0 + s B A
    for init in ("pissa", "olora"):
        config = gate_config(init_lora_weights=init)
        rewrites = _problems(train_peft_adapter(mixtral, tmp_path / init, config))
        assert f"init_lora_weights={init!r}: PEFT rewrites the base weight" in rewrites
    lora_bias = _problems(train_peft_adapter(mixtral, tmp_path / "bias", gate_config(lora_bias=True)))
    assert "lora_bias=True" in lora_bias and "lora_B.bias" in lora_bias
    trained_bias = _problems(train_peft_adapter(base, tmp_path / "all", router_config(bias="all")))
    assert "bias='all'" in trained_bias and "router.base_layer.bias: a full tensor" in trained_bias
    saved = _problems(train_peft_adapter(base, tmp_path / "mts", router_config(modules_to_save=["lm_head"])))
    assert "lm_head.weight: a full tensor" in saved
    # PEFT itself refuses modules_to_save on a ParamWrapper router, so edit a valid file's config.
    save_adapter(read_adapter(adapter_dir), tmp_path / "edited")
    assert "covers the router" in _problems(_edit_config(tmp_path / "edited", modules_to_save=["router"]))


def test_file_level_errors(base, adapter_dir, tmp_path):
    pickled = train_peft_adapter(base, tmp_path / "bin", router_config(),
                                 save_kwargs={"safe_serialization": False})
    assert "pickle files are never read" in _problems(pickled)
    ia3 = mixtral_style(seed=8)
    with torch.no_grad():
        ia3_model = get_peft_model(ia3, IA3Config(target_modules=["gate"], feedforward_modules=[]))
    ia3_model.save_pretrained(tmp_path / "ia3")
    assert "not a LoRA config" in _problems(tmp_path / "ia3")
    peft_model = load_peft(base, {"default": adapter_dir})
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].mlp.router.lora_B["default"].weight[0, 0] = float("nan")
    peft_model.save_pretrained(tmp_path / "nan")
    assert "layers.1.mlp.router: lora_B holds non-finite values" in _problems(tmp_path / "nan")
    save_adapter(read_adapter(adapter_dir), tmp_path / "r")
    assert "rank 4 in the file but the config gives r=2" in _problems(_edit_config(tmp_path / "r", r=2))
    save_adapter(read_adapter(adapter_dir), tmp_path / "t")
    untargeted = _edit_config(tmp_path / "t", target_parameters=["x.weight"])
    assert "not selected by the config" in _problems(untargeted)
    with pytest.raises(AdapterError, match="is not a directory"):
        read_adapter(tmp_path / "missing")


def test_values_that_overflow_the_slot_dtype_are_refused(base):
    model = served(base).to(torch.float16)
    huge = {name: (torch.full((2, 64), 1e5), torch.full((8, 2), 1.0)) for name in ROUTERS}
    with pytest.raises(AdapterError, match="lora_A overflows torch.float16 .* serve it in a wider dtype"):
        RouterAdapter.from_weights(huge, lora_alpha=2).bind(model)


def test_factors_that_underflow_the_slot_dtype_are_refused(base):
    model = served(base).to(torch.float16)
    tiny = {name: (torch.full((2, 64), 1.0), torch.full((8, 2), 1e-9)) for name in ROUTERS}
    with pytest.raises(AdapterError, match="lora_B underflows torch.float16: every non-zero value"):
        RouterAdapter.from_weights(tiny, lora_alpha=2).bind(model)
    small = {name: (torch.full((2, 64), 1.0), torch.full((8, 2), 1e-3)) for name in ROUTERS}
    RouterAdapter.from_weights(small, lora_alpha=2).bind(model)  # rounded, not lost: served


def test_saved_adapter_loads_in_peft_unchanged(base, adapter_dir, tmp_path):
    adapter = read_adapter(adapter_dir)
    save_adapter(adapter, tmp_path / "copy")
    again = read_adapter(tmp_path / "copy")
    for name, weights in adapter.modules.items():
        assert torch.equal(again.modules[name].lora_a, weights.lora_a)
        assert again.modules[name].scaling == weights.scaling
    ids = torch.randint(3, 96, (2, 6))
    with torch.no_grad():
        original = load_peft(base, {"a": adapter_dir})(ids).logits
        copied = load_peft(base, {"a": tmp_path / "copy"})(ids).logits
    assert torch.equal(original, copied)


@pytest.mark.parametrize("targeted", [PARAMETER, MODULE])
def test_adapters_built_here_load_in_peft_with_their_ranks(targeted, tmp_path):
    generator = torch.Generator().manual_seed(12)
    if targeted == PARAMETER:
        model, names = gpt_oss(seed=12), ROUTERS
    else:
        model, names = mixtral_style(seed=12), [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
    ranks = dict(zip(names, (4, 2)))
    weights = {name: (torch.randn(r, 64, generator=generator), torch.randn(8, r, generator=generator))
               for name, r in ranks.items()}
    save_adapter(RouterAdapter.from_weights(weights, lora_alpha=8, targeted=targeted), tmp_path)
    peft_model = load_peft(model, {"default": tmp_path})
    for name, r in ranks.items():
        layer = peft_model.get_submodule("base_model.model." + name)
        assert layer.r["default"] == r and layer.scaling["default"] == 8 / r
        assert torch.equal(layer.lora_A["default"].weight, weights[name][0])
        assert torch.equal(layer.lora_B["default"].weight, weights[name][1])
    ours = copy.deepcopy(model)
    if targeted == PARAMETER:
        replace_gpt_oss_routers(ours, max_loras=1, max_rank=4)
    else:
        replace_modules(ours, 1, 4, target=["gate"])
    load_adapter(tmp_path, ours, slot=0)
    ids = torch.randint(3, 96, (2, 5))
    get_token_slots(ours).fill(ids.numel(), 0)
    with torch.no_grad():
        adapted = logits_of(peft_model, ids)
        torch.testing.assert_close(logits_of(ours, ids), adapted, rtol=0, atol=1e-4)
        assert (adapted - logits_of(model, ids)).abs().max() > 1e-3  # the adapters route differently
