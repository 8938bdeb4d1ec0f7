"""Tiny MoE models and real PEFT adapters for the adapter / integration / manager / CLI tests.

Models are built from small configs with random weights (no download). Adapters are trained with
PEFT for a few optimizer steps and written by PEFT's own ``save_pretrained``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96


def gpt_oss_config(num_layers=2, hidden=64, experts=8, top_k=2):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"]
        * (num_layers % 2), pad_token_id=0, eos_token_id=1, bos_token_id=2)


def gpt_oss(seed=0, **config):
    """A random-init GptOssForCausalLM in eval mode; routers get weights with a realistic spread."""
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    model = GptOssForCausalLM(gpt_oss_config(**config)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            # transformers' init (std 0.02) makes near-uniform routing; spread the logits so top-k
            # choices are decided by clear margins, as in a trained router.
            layer.mlp.router.weight.normal_(0.0, 0.5)
    return model


class MoeBlock(nn.Module):
    """Mixtral-style sparse MoE: an nn.Linear ``gate``, softmax, top-k, renormalised weights.

    The gate sees x as [B, S, K] (transformers' Mixtral flattens to [B*S, K] first): PEFT's mixed
    batches (``adapter_names=``) need the batch dimension, and this keeps them usable as a reference.
    """

    def __init__(self, hidden, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(),
                                                   nn.Linear(2 * hidden, hidden)) for _ in range(experts))

    def forward(self, x):
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)
        probs = F.softmax(self.gate(x).reshape(batch * seq, -1).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view(batch, seq, hidden)


class MixtralStyleLM(nn.Module):
    """Embedding -> [x + MoE(norm(x))] * layers -> lm_head, named as transformers 4.x Mixtral:
    gates at ``model.layers.N.block_sparse_moe.gate``."""

    def __init__(self, layers=2, hidden=64, experts=8, top_k=2):
        super().__init__()
        self.model = nn.ModuleDict({
            "embed_tokens": nn.Embedding(VOCAB, hidden),
            "layers": nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(hidden),
                                                   "block_sparse_moe": MoeBlock(hidden, experts, top_k)})
                                    for _ in range(layers))})
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.model["embed_tokens"](input_ids)
        for layer in self.model["layers"]:
            x = x + layer["block_sparse_moe"](layer["norm"](x))
        return self.lm_head(x)


def mixtral_style(seed=0, **kwargs):
    torch.manual_seed(seed)
    return MixtralStyleLM(**kwargs).eval()


def logits_of(model, input_ids, **kwargs):
    out = model(input_ids, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def train_peft_adapter(model, path, lora_config, seed=0, steps=3, lr=3e-2, save_kwargs=None):
    """Trains a PEFT LoRA adapter on a copy of ``model`` for a few steps, saves it with PEFT.

    The objective (next-token loss on random sequences) only has to make every factor non-zero and
    differ per seed. Returns the directory.
    """
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), lora_config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    peft_model.train()
    for _ in range(steps):
        tokens = torch.randint(3, VOCAB, (4, 12))
        logits = logits_of(peft_model, tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.save_pretrained(str(path), **(save_kwargs or {}))
    return path


def router_config(**overrides):
    """PEFT LoRA config targeting the gpt-oss routers as PEFT does (``target_parameters``)."""
    from peft import LoraConfig

    kwargs = dict(r=4, lora_alpha=8, target_modules=[], target_parameters=["mlp.router.weight"])
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def gate_config(**overrides):
    """PEFT LoRA config targeting nn.Linear gates (``target_modules=["gate"]``)."""
    from peft import LoraConfig

    kwargs = dict(r=4, lora_alpha=8, target_modules=["gate"])
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def peft_supports_target_parameters() -> bool:
    import dataclasses

    from peft import LoraConfig

    return "target_parameters" in {f.name for f in dataclasses.fields(LoraConfig)}


# Tests of gpt-oss router adapters need PEFT's parameter targeting (``target_parameters``).
needs_target_parameters = pytest.mark.skipif(not peft_supports_target_parameters(),
                                             reason="the installed PEFT has no target_parameters")


def load_peft(model, adapters: dict):
    """A PeftModel over a copy of ``model`` with each ``{name: directory}`` loaded, in eval mode."""
    from peft import PeftModel

    names = list(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapters[names[0]]),
                                               adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    return peft_model.eval()


# Sizes that shrink any transformers MoE config to a tiny model (fields a config lacks are skipped).
_TINY = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, num_local_experts=8,
             num_experts=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, shared_expert_intermediate_size=32,
             n_shared_experts=1, num_shared_experts=1, decoder_sparse_step=1, mlp_only_layers=[],
             max_position_embeddings=128, sliding_window=8, interleave_moe_layer_step=1,
             intermediate_size_mlp=64, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def tiny_moe(model_type: str, seed: int = 0, dtype=torch.float32):
    """A tiny random-init ``AutoModelForCausalLM`` of a transformers MoE family, in eval mode.

    Router weights get a realistic spread (as ``gpt_oss``), so top-k choices have clear margins.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    for key, value in _TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    if hasattr(config, "qk_rope_head_dim"):  # multi-head latent attention: rope on part of the head
        config.head_dim = config.qk_rope_head_dim
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("Router"):
                module.weight.normal_(0.0, 0.5)
    return model.to(dtype)


def assert_router_logits(logits, x, router, adapter, module: str, requests, tokens_per_request: int):
    """A LoRA router's logits for tokens x: its base gate's, bit for bit, where ``requests`` maps no
    adapter, and base + ``adapter``'s delta for ``module`` (a float64 reference) where it maps one:
    an independent check of what the router served, not a comparison with itself."""
    from lora.layer import GateLinearWithLoRA

    gate = next(m for m in router.modules() if isinstance(m, GateLinearWithLoRA)).base_layer
    weights = adapter.modules[module]
    with torch.no_grad():
        base = gate(x)
        delta = weights.scaling * (x.double() @ weights.lora_a.double().T) @ weights.lora_b.double().T
    mapped = torch.tensor([name is not None for name in requests]).repeat_interleave(tokens_per_request)
    assert torch.equal(logits[~mapped], base[~mapped])
    torch.testing.assert_close(logits[mapped].double(), (base.double() + delta)[mapped], rtol=1e-5, atol=1e-5)
