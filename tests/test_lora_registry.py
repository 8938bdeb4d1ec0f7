"""The layer-replacement registry and replace_modules, on small MoE-shaped models (CPU)."""

import re

import pytest
import torch
from torch import nn

import lora
from gate import GateLinear
from lora import GateLinearWithLoRA, TokenSlots, get_token_slots, register_lora_layer, replace_modules
from lora import registry as registry_module

K, E = 48, 8


class Block(nn.Module):
    """One layer: an attention projection (nn.Linear, never a router), a Mixtral-style nn.Linear
    gate and a GateLinear router."""

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(K, K, dtype=torch.bfloat16)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(K, E, bias=False, dtype=torch.bfloat16)
        self.mlp.router = GateLinear(K, E, dtype=torch.bfloat16)

    def forward(self, x):
        return self.mlp.gate(x), self.mlp.router(self.q_proj(x))


class Model(nn.Module):
    def __init__(self, num_layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(num_layers))

    def forward(self, x):
        return [out for layer in self.layers for out in layer(x)]


@pytest.fixture
def restore_registry():
    saved = list(registry_module._LORA_LAYER_CLASSES)
    yield
    registry_module._LORA_LAYER_CLASSES[:] = saved


def test_default_target_wraps_every_gate_linear_and_shares_one_token_slots():
    torch.manual_seed(0)
    model = Model()
    names = replace_modules(model, max_loras=4, max_rank=8)
    assert names == ["layers.0.mlp.router", "layers.1.mlp.router"]
    routers = [layer.mlp.router for layer in model.layers]
    assert all(isinstance(r, GateLinearWithLoRA) for r in routers)
    for layer in model.layers:
        assert type(layer.mlp.gate) is nn.Linear and type(layer.q_proj) is nn.Linear
    slots = get_token_slots(model)
    assert all(r.token_slots is slots for r in routers)
    assert slots.num_slots == 4 and slots.max_tokens == registry_module.DEFAULT_MAX_TOKENS
    assert routers[0].max_loras == 4 and routers[0].max_rank == 8
    # A second call finds nothing new: wrapped layers are not descended into.
    assert replace_modules(model, 4, 8) == []


def test_nn_linear_gates_convert_sharing_parameters_and_keep_base_bits():
    torch.manual_seed(1)
    model = Model()
    gates = [layer.mlp.gate for layer in model.layers]
    x = torch.randn(5, K).to(torch.bfloat16)
    before = model(x)
    names = replace_modules(model, 2, 4, target=["mlp.gate"])
    assert names == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    for layer, gate in zip(model.layers, gates):
        assert isinstance(layer.mlp.gate, GateLinearWithLoRA)
        assert layer.mlp.gate.base_layer.weight is gate.weight and layer.mlp.gate.bias is None
    slots = get_token_slots(model)
    slots.set([-1] * 5)
    after = model(x)
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(before, after))
    # Adapters then change exactly the mapped tokens of the layer that holds them.
    model.layers[1].mlp.gate.set_lora(1, torch.ones(2, K, dtype=torch.bfloat16),
                                      torch.ones(E, 2, dtype=torch.bfloat16), 0.5)
    slots.set([1, -1, 1, -1, 0])
    adapted = model(x)
    assert torch.equal(adapted[0], before[0])
    changed = (adapted[2] != before[2]).any(dim=1)
    assert changed.tolist() == [True, False, True, False, False]
    # Wrapping more modules later reuses the model's TokenSlots.
    assert replace_modules(model, 2, 4) == ["layers.0.mlp.router", "layers.1.mlp.router"]
    assert model.layers[0].mlp.router.token_slots is slots


def test_regex_targets_fullmatch_and_suffixes_respect_dots():
    model = Model(3)
    names = replace_modules(model, 2, 2, target=[re.compile(r"layers\.[02]\.mlp\.(gate|router)")])
    assert names == ["layers.0.mlp.gate", "layers.0.mlp.router", "layers.2.mlp.gate", "layers.2.mlp.router"]
    with pytest.raises(ValueError, match="'ate' matches no module"):
        replace_modules(Model(), 2, 2, target=["ate"])  # a suffix on dot boundaries only


def test_targeted_modules_that_cannot_be_replaced_are_all_listed_and_nothing_changes():
    class QuantLinear(nn.Linear):  # a subclass: its weight need not be a plain [E, K] matrix
        pass

    model = Model()
    model.layers[1].mlp.gate = QuantLinear(K, E, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as raised:
        replace_modules(model, 2, 2, target=["mlp.gate", "layers.0.mlp", "missing"])
    message = str(raised.value)
    assert "layers.1.mlp.gate (QuantLinear)" in message
    assert "layers.0.mlp (Module)" in message
    assert "'missing' matches no module" in message
    assert "GateLinearWithLoRA" in message  # the registered classes are named
    assert type(model.layers[0].mlp.gate) is nn.Linear
    assert all(isinstance(layer.mlp.router, GateLinear) for layer in model.layers)


def test_already_wrapped_and_root_targets_are_errors():
    model = Model()
    replace_modules(model, 2, 2)
    with pytest.raises(ValueError, match="layers.0.mlp.router .*already a LoRA layer"):
        replace_modules(model, 2, 2, target=["layers.0.mlp.router"])
    with pytest.raises(ValueError, match="root module"):
        replace_modules(GateLinear(K, E), 2, 2)


def test_explicit_token_slots_subclasses_and_shared_modules():
    class MyGate(GateLinear):
        pass

    model = Model()
    shared = MyGate(K, E, dtype=torch.bfloat16)
    model.layers[0].mlp.router = shared
    model.layers[1].mlp.router = shared
    slots = TokenSlots(16, num_slots=3)
    names = replace_modules(model, 8, 2, token_slots=slots)
    assert names == ["layers.0.mlp.router"]  # one module, swapped in both places
    wrapper = model.layers[0].mlp.router
    assert model.layers[1].mlp.router is wrapper and wrapper.base_layer is shared
    assert wrapper.token_slots is slots and slots.num_slots == 3
    with pytest.raises(TypeError, match="TokenSlots"):
        replace_modules(Model(), 2, 2, token_slots=[0])
    model = Model()  # a target may name a shared module by its second path
    model.layers[1].mlp.router = model.layers[0].mlp.router
    assert replace_modules(model, 2, 2, target=["layers.1.mlp.router"]) == ["layers.0.mlp.router"]
    assert model.layers[1].mlp.router is model.layers[0].mlp.router
    assert isinstance(model.layers[1].mlp.router, GateLinearWithLoRA)


def test_modules_on_several_devices_need_their_own_token_slots():
    model = Model()
    model.layers[1].mlp.router = GateLinear(K, E, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        replace_modules(model, 2, 2)
    assert isinstance(model.layers[0].mlp.router, GateLinear)


def test_get_token_slots_errors():
    with pytest.raises(ValueError, match="no LoRA layer"):
        get_token_slots(Model())
    model = Model()
    replace_modules(model, 2, 2, target="layers.0.mlp.router")
    replace_modules(model, 2, 2, target="layers.1.mlp.router", token_slots=TokenSlots(4))
    with pytest.raises(ValueError, match="2 different TokenSlots"):
        get_token_slots(model)


class Router(nn.Module):
    """A router that is neither GateLinear nor nn.Linear, as transformers' TopKRouter modules are."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(E, K, dtype=torch.bfloat16))

    def forward(self, x):
        return x @ self.weight.t()


class RouterWithLoRA(GateLinearWithLoRA):
    @classmethod
    def can_replace(cls, module):
        return isinstance(module, Router)

    @classmethod
    def replaces_by_default(cls, module):
        return isinstance(module, Router)

    @classmethod
    def from_module(cls, module, max_loras, max_rank, token_slots=None):
        return cls(GateLinear.from_parameters(module.weight, None), max_loras, max_rank, token_slots)


def test_user_classes_are_tried_in_order(restore_registry):
    model = Model()
    model.layers[0].mlp.router = Router()
    assert register_lora_layer(RouterWithLoRA) is RouterWithLoRA
    assert lora.lora_layer_classes() == (GateLinearWithLoRA, RouterWithLoRA)
    names = replace_modules(model, 2, 2)
    assert names == ["layers.0.mlp.router", "layers.1.mlp.router"]
    assert type(model.layers[0].mlp.router) is RouterWithLoRA
    assert type(model.layers[1].mlp.router) is GateLinearWithLoRA

    @register_lora_layer(first=True)
    class Everything(RouterWithLoRA):
        @classmethod
        def can_replace(cls, module):
            return isinstance(module, (Router, GateLinear))

        @classmethod
        def from_module(cls, module, max_loras, max_rank, token_slots=None):
            return cls(module, max_loras, max_rank, token_slots)

    assert lora.lora_layer_classes()[0] is Everything
    model = Model()
    replace_modules(model, 2, 2, target=["mlp.router"])
    assert all(type(layer.mlp.router) is Everything for layer in model.layers)
    lora.unregister_lora_layer(Everything)
    assert Everything not in lora.lora_layer_classes()


def test_register_checks_the_protocol(restore_registry):
    class NoFromModule(nn.Module):
        @classmethod
        def can_replace(cls, module):
            return False

    with pytest.raises(TypeError, match="from_module"):
        register_lora_layer(NoFromModule)
    with pytest.raises(TypeError, match="nn.Module"):
        register_lora_layer(object)
    with pytest.raises(ValueError, match="not registered"):
        lora.unregister_lora_layer(NoFromModule)
    with pytest.raises(ValueError, match="empty"):
        replace_modules(Model(), 2, 2, target=[])
    with pytest.raises(TypeError, match="re.Pattern"):
        replace_modules(Model(), 2, 2, target=[3])


def test_target_follows_peft_target_modules():
    # PEFT: a single string is a regex that must match the whole name; a list holds name suffixes.
    model = Model()
    with pytest.raises(ValueError, match=r"regex 'mlp.gate' \(a full match\) matches no module"):
        replace_modules(model, 2, 2, target="mlp.gate")
    assert replace_modules(model, 2, 2, target=r"layers\.1\.mlp\.(gate|router)") == [
        "layers.1.mlp.gate", "layers.1.mlp.router"]
    assert replace_modules(Model(), 2, 2, target=["gate"]) == ["layers.0.mlp.gate", "layers.1.mlp.gate"]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        replace_modules(Model(), 2, 2, target="mlp.(gate")


def test_a_refused_replacement_leaves_the_shared_token_slots_bound_as_it_was():
    model = Model()
    model.layers[1].mlp.router = GateLinear(K, E, device="meta")  # its wrapper refuses the cpu slots
    slots = TokenSlots(16)
    with pytest.raises(ValueError, match="token_slots is on cpu"):
        replace_modules(model, 2, 2, token_slots=slots)
    assert slots.num_slots is None and isinstance(model.layers[0].mlp.router, GateLinear)
    slots.set([5])  # still any id: no layer limits it
