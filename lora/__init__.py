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

# Adapter I/O and serving sit on the layers above, so they import last.
from lora.adapter_io import AdapterError, RouterAdapter, load_adapter, read_adapter, save_adapter  # noqa: E402
from lora.manager import AdapterManager  # noqa: E402

__all__ += ["AdapterError", "AdapterManager", "RouterAdapter", "load_adapter", "read_adapter", "save_adapter"]
