"""torch.compile(fullgraph=True) of a model with wrapped gates, on the CPU: new slot contents and a new
token -> slot mapping take effect on the next call, with no recompilation."""

import torch
import torch._dynamo
from test_lora_layer import assert_matches_reference, bits, random_adapter, random_gate
from torch import nn

from lora import get_token_slots, replace_modules

K, E, M = 96, 16, 12


class TwoRouters(nn.Module):
    """A GateLinear router and a Mixtral-style nn.Linear gate reading the same hidden states."""

    def __init__(self, generator):
        super().__init__()
        self.router = random_gate(K, E, torch.bfloat16, generator)
        self.gate = nn.Linear(K, E, bias=False, dtype=torch.bfloat16).requires_grad_(False)

    def forward(self, x):
        return self.router(x), self.gate(2 * x)  # exact in bf16, so eager and compiled see the same input


def check(outputs, x, model, adapters, mapping):
    router_out, gate_out = outputs
    assert_matches_reference(router_out, x, model.router, adapters["router"], mapping)
    assert_matches_reference(gate_out, 2 * x, model.gate, adapters["gate"], mapping)


def load(model, adapters):
    for name, per_slot in adapters.items():
        for slot, adapter in per_slot.items():
            getattr(model, name).set_lora(slot, *adapter)


def test_compiled_model_follows_slot_and_mapping_changes_without_recompiling():
    generator = torch.Generator().manual_seed(21)
    model = TwoRouters(generator)
    assert replace_modules(model, 4, 16, target=["router", "gate"]) == ["router", "gate"]
    slots = get_token_slots(model)
    adapters = {name: {0: random_adapter(16, K, E, torch.bfloat16, generator),
                       2: random_adapter(3, K, E, torch.bfloat16, generator)} for name in ("router", "gate")}
    load(model, adapters)
    mapping = torch.tensor([0, 2, -1, 2, 0, -1, 0, 0, 2, -1, 2, 2])
    slots.set(mapping)
    x = torch.randn(M, K, generator=generator).to(torch.bfloat16)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        first = compiled(x)
        check(first, x, model, adapters, mapping)
        base = model.router.base_layer(x)
        unadapted = mapping < 0
        assert torch.equal(bits(first[0][unadapted]), bits(base[unadapted]))

        # New contents: slot 2 replaced (another rank), slot 0 emptied, slot 3 loaded; new mapping.
        for name in adapters:
            getattr(model, name).reset_lora(0)
            adapters[name] = {2: random_adapter(7, K, E, torch.bfloat16, generator),
                              3: random_adapter(1, K, E, torch.bfloat16, generator)}
        load(model, adapters)
        mapping = torch.tensor([3, 3, 2, -1, 0, 2, -1, 3, 2, 0, -1, 3])
        slots.set(mapping)
        x = torch.randn(M, K, generator=generator).to(torch.bfloat16)
        second = compiled(x)
        check(second, x, model, adapters, mapping)
        eager = model(x)
        for ours, theirs in zip(second, eager):
            torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=1e-5)


def test_dynamic_batch_sizes_do_not_recompile():
    # The mapping's token count is not a guard, so one dynamic-shape graph serves every batch size.
    generator = torch.Generator().manual_seed(22)
    model = TwoRouters(generator)
    replace_modules(model, 2, 4, target=["router", "gate"])
    slots = get_token_slots(model)
    adapters = {name: {1: random_adapter(4, K, E, torch.bfloat16, generator)} for name in ("router", "gate")}
    load(model, adapters)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    slots.set([1, -1, 1])
    with torch.no_grad():
        compiled(torch.randn(3, K, generator=generator).to(torch.bfloat16))
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for num_tokens in (5, 17, 2):
            mapping = torch.randint(-1, 2, (num_tokens,), generator=generator)
            slots.set(mapping)
            x = torch.randn(num_tokens, K, generator=generator).to(torch.bfloat16)
            check(compiled(x), x, model, adapters, mapping)


def test_one_slot_batches_do_not_recompile_and_keep_the_eager_bits():
    """A mapping with every token on one slot lets eager calls take a shortcut; compiled code must
    not read it (a guard on the slot recompiled for every slot, until fullgraph hit the recompile
    limit), and the shortcut keeps the general path's bits (float32, where a BLAS may sum a batch
    of one in another order than a batch of all slots)."""
    generator = torch.Generator().manual_seed(23)
    model = TwoRouters(generator).float()
    replace_modules(model, 12, 4, target=["router", "gate"])
    slots = get_token_slots(model)
    for slot in range(12):
        for name in ("router", "gate"):
            getattr(model, name).set_lora(slot, *random_adapter(4, K, E, torch.float32, generator))
    x = torch.randn(M, K, generator=generator)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    slots.fill(M, 0)
    with torch.no_grad():
        compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for slot in [*range(12), -1]:
            slots.fill(M, slot)  # uniform: eager takes the one-slot shortcut
            eager = model(x)
            slots.set(torch.full((M,), slot), validate=False)  # not known uniform: the general path
            general = model(x)
            got = compiled(x)
            for ours, shortcut, theirs in zip(got, eager, general):
                assert torch.equal(bits(shortcut), bits(theirs))
                assert torch.equal(bits(ours), bits(theirs))
