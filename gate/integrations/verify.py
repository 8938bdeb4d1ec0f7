"""Routing agreement with PEFT for one adapter on random inputs (``moegate verify``).

One model copy serves every side, one after the other: moegate patches the gates, loads the
adapter into slot 0 (checking it completely first), runs, and puts the original gates back; then
PEFT loads the adapter (``PeftModel.from_pretrained``), runs the same tokens and unloads it. Hooks
on every adapted module record what each side routed.

The reference is PEFT in fp32 (a bf16 model is widened for that run, exactly, and narrowed back).
In bf16, rounding flips experts that are nearly tied, whoever computes: PEFT's own run in the
model's dtype, measured against the same reference, is reported as the bar.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora.adapter_io import RouterAdapter, read_adapter
from lora.registry import get_token_slots, replace_modules


@dataclass
class ModuleAgreement:
    """One adapted module, moegate against the fp32 PEFT reference."""

    module: str
    max_abs_diff: float  # of the router logits (the dense scores for the 2-tuple gpt-oss form)
    topk_agreement: float  # fraction of tokens whose top-k expert sets are equal
    peft_topk_agreement: float | None  # PEFT in the model's dtype (None when that is fp32)


@dataclass
class VerifyReport:
    modules: list[ModuleAgreement]
    skipped: list[str]  # adapter modules the (truncated) model lacks
    logits_max_abs_diff: float
    greedy_agreement: float
    num_tokens: int


@contextlib.contextmanager
def peft_adapter(peft_model, name: str | None):
    """A PEFT model with adapter ``name`` active, or with its adapters disabled for None."""
    if name is None:
        with peft_model.disable_adapter():
            yield
    else:
        peft_model.set_adapter(name)
        yield


def build_model(config_or_dir: str, *, random_weights: bool = False, num_layers: int | None = None,
                device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A causal LM from a transformers ``config.json`` (random weights) or a local model directory
    (its checkpoint, unless ``random_weights``). Nothing is downloaded. ``num_layers`` truncates."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_or_dir)
    if path.is_file():
        fields = json.loads(path.read_text())
        if "model_type" not in fields:
            raise ValueError(f"{path} has no model_type: not a transformers config.json")
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    elif path.is_dir():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    else:
        raise FileNotFoundError(f"{path} is neither a config.json nor a model directory")
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"--num-layers must be in [1, {config.num_hidden_layers}], got {num_layers}")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    if path.is_dir() and any(path.glob("*.safetensors")) and not random_weights:
        return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True,
                                                    dtype=dtype).to(device).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _logits_and_ids(output, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(router logits or dense scores [T, E], sorted top-k ids [T, k]) from a gate's output: a
    gpt-oss router tuple (ids last) or an nn.Linear gate's logits."""
    if isinstance(output, tuple):
        return output[0].reshape(output[-1].shape[0], -1), output[-1].sort(dim=-1).values
    logits = output.reshape(-1, output.shape[-1])
    return logits, torch.topk(logits, top_k, dim=-1).indices.sort(dim=-1).values


def _patch(model: nn.Module, adapter: RouterAdapter):
    """Wraps the model's gates for one adapter of the adapter's largest rank; returns the undo."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    from gate.integrations.transformers import replace_gpt_oss_routers, restore_gpt_oss_routers

    max_rank = max(adapter.ranks.values())
    if any(isinstance(module, GptOssTopKRouter) for module in model.modules()):
        replace_gpt_oss_routers(model, max_loras=1, max_rank=max_rank)
        return lambda: restore_gpt_oss_routers(model)
    originals = {name: model.get_submodule(name) for name in adapter.modules}
    replace_modules(model, 1, max_rank, target=sorted(adapter.modules))

    def undo():
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
    return undo


def _run(model: nn.Module, names: list[str], tokens: torch.Tensor, top_k: int):
    """(logits [B, S, V] fp32, {module: (router logits, sorted top-k ids)}) of one forward."""
    outputs: dict = {}

    def hook(name):
        return lambda module, args, output: outputs.__setitem__(name, output)

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            logits = model(tokens).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, {name: _logits_and_ids(output, top_k) for name, output in outputs.items()}


def verify_adapter(model: nn.Module, adapter_dir: str, *, batch: int = 4, seq: int = 32,
                   seed: int = 0) -> VerifyReport:
    """Runs moegate, then PEFT, on the same random tokens [batch, seq] through ``model``.

    Raises AdapterError (every problem listed) when moegate cannot serve the adapter; PEFT only
    runs on adapters that passed.
    """
    adapter = read_adapter(adapter_dir)
    present = {name for name, _ in model.named_modules()}
    kept = {name: w for name, w in adapter.modules.items() if name in present}
    skipped = sorted(set(adapter.modules) - set(kept))
    if not kept:
        raise ValueError(f"none of the adapter's {len(skipped)} modules exists in the model "
                         f"(first: {skipped[0]})")
    adapter = RouterAdapter(adapter.config, kept, source=adapter.source)
    names = sorted(kept)
    config = getattr(model, "config", None)
    top_k = getattr(config, "num_experts_per_tok", 2)
    vocab = getattr(config, "vocab_size", 32000)
    device = next(model.parameters()).device
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)

    undo = _patch(model, adapter)
    adapter.bind(model).write(0)
    get_token_slots(model).fill(tokens.numel(), 0)
    our_logits, ours = _run(model, names, tokens, top_k)
    undo()
    dtype = next(model.parameters()).dtype
    same_dtype = None if dtype == torch.float32 else _run_peft(model, adapter_dir, names, tokens, top_k)[1]
    model.float()  # exact for bf16/fp16 weights
    ref_logits, reference = _run_peft(model, adapter_dir, names, tokens, top_k)
    model.to(dtype)

    def agreement(ids, name):
        return (ids == reference[name][1]).all(dim=-1).double().mean().item()

    modules = [ModuleAgreement(name, (ours[name][0].float() - reference[name][0].float()).abs().max().item(),
                               agreement(ours[name][1], name),
                               None if same_dtype is None else agreement(same_dtype[name][1], name))
               for name in names]
    return VerifyReport(modules, skipped, (our_logits - ref_logits).abs().max().item(),
                        (our_logits.argmax(-1) == ref_logits.argmax(-1)).double().mean().item(),
                        tokens.numel())


def _run_peft(model: nn.Module, adapter_dir: str, names: list[str], tokens: torch.Tensor, top_k: int):
    """``_run`` under PEFT with the adapter loaded, then unloaded again."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about keys of layers a truncated model lacks
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    try:
        return _run(peft_model.base_model.model, names, tokens, top_k)
    finally:
        peft_model.unload()
