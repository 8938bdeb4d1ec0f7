"""moegate.lora: LoRA-capable router layers, the layer-replacement registry and adapter slots."""
