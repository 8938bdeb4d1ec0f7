"""moegate.lora: LoRA-capable router layers, the layer-replacement registry and adapter slots.

    ts = TokenSlots(max_tokens)                 # or let replace_modules create it
    names = replace_modules(model, max_loras=8, max_rank=64, target=["mlp.gate"])
    ts = get_token_slots(model)
    layer.set_lora(slot, lora_a, lora_b, scaling)   # per wrapped layer
    ts.set(slot_of_each_token)                      # once per step, before the forward

Adapter I/O (``read_adapter``, ``load_adapter``, ``save_adapter``, ...) and ``AdapterManager`` load
on first use: ``import lora`` needs neither PEFT nor safetensors.
"""

import importlib

from lora.layer import GateLinearWithLoRA, add_lora_delta
from lora.registry import (
    get_token_slots,
    is_lora_layer,
    lora_layer_classes,
    lora_layers,
    register_lora_layer,
    replace_modules,
    unregister_lora_layer,
)
from lora.slots import TokenSlots

# name -> the module that defines it, imported when the name is first used.
_LAZY = {"AdapterError": "lora.adapter_io", "RouterAdapter": "lora.adapter_io",
         "load_adapter": "lora.adapter_io", "read_adapter": "lora.adapter_io",
         "save_adapter": "lora.adapter_io", "AdapterManager": "lora.manager"}

__all__ = [
    "GateLinearWithLoRA",
    "TokenSlots",
    "add_lora_delta",
    "get_token_slots",
    "is_lora_layer",
    "lora_layer_classes",
    "lora_layers",
    "register_lora_layer",
    "replace_modules",
    "unregister_lora_layer",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
