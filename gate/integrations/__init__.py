"""Integrations of moegate's router gates into model libraries.

``gate.integrations.transformers``: gpt-oss routers of Hugging Face transformers backed by GateLinear
(imports transformers; nothing here imports it until that module is imported).
"""
