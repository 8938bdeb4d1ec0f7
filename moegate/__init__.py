"""moegate: the top of the import graph, where moegate meets model libraries and the command line.

    csrc (kernels <- bindings: gate._C) <- gate (ops, GateLinear) <- lora (LoRA layers, slots,
    adapter I/O, manager) <- moegate (integrations, CLI)

``moegate.routers``: ``replace_routers(model)``, every MoE router of a Hugging Face transformers
model (gpt-oss, Mixtral, Qwen-MoE, DeepSeek, Llama-4, MiniMax, ...) computed by GateLinear.
``moegate.transformers``: the gpt-oss router (``GateGptOssRouter``, ``replace_gpt_oss_routers``).
``moegate.verify``: routing agreement of an adapter with PEFT (``moegate verify``).
``moegate.__main__``: the ``moegate`` command (``python -m moegate``).
These import transformers; importing ``moegate`` itself imports none of them. ``gate`` and ``lora``
never import this package (tests/test_import_graph.py).
"""

from gate import __version__

__all__ = ["__version__"]
