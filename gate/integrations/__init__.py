"""Integrations of moegate's router gates into model libraries.

``gate.integrations.routers``: ``replace_routers(model)``, every MoE router of a Hugging Face
transformers model (gpt-oss, Mixtral, Qwen-MoE, DeepSeek, Llama-4, MiniMax, ...) computed by GateLinear.
``gate.integrations.transformers``: the gpt-oss router (``GateGptOssRouter``, ``replace_gpt_oss_routers``).
``gate.integrations.verify``: routing agreement of an adapter with PEFT (``moegate verify``).
These import transformers; nothing here imports it until one of them is imported.
"""
