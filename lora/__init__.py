"""moegate.lora: LoRA-capable router layers, the layer-replacement registry and adapter slots.

    ts = TokenSlots(max_tokens)                 # or let replace_modules create it
    names = replace_modules(model, max_loras=8, max_rank=64, target=["mlp.gate"])
    ts = get_token_slots(model)
    layer.set_lora(slot, lora_a, lora_b, scaling)   # per wrapped layer
    ts.set(slot_of_each_token)                      # once per step, before the forward
"""

from lora.layer import GateLinearWithLoRA, add_lora_delta
from lora.registry import (
    get_token_slots,
    lora_layer_classes,
    register_lora_layer,
    replace_modules,
    unregister_lora_layer,
)
from lora.slots import TokenSlots

__all__ = [
    "GateLinearWithLoRA",
    "TokenSlots",
    "add_lora_delta",
    "get_token_slots",
    "lora_layer_classes",
    "register_lora_layer",
    "replace_modules",
    "unregister_lora_layer",
]

# ---------------------------------------------------------------------------------------------
# Adapter I/O (load_adapter, save_adapter, AdapterManager): appended below by its own module.
# ---------------------------------------------------------------------------------------------
