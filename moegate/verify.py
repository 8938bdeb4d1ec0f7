"""Routing agreement with PEFT for one adapter on random inputs (``moegate verify``).

One model copy serves every side, one after the other: moegate patches the gates, loads the
adapter into slot 0 (checking it completely first), runs, and puts the original gates back; then
PEFT loads the adapter (``PeftModel.from_pretrained``), runs the same tokens and unloads it. Hooks
on every adapted module record what each side routed.

Two checks:

  routers alone (the verdict in every dtype): the hidden states each adapted router was served in
      our run, with the adapter, through (a) float64 ``x @ (W + scaling * B @ A).T + b`` from the
      adapter file's factors, (b) our gate, (c) PEFT's own router module in the model's dtype. Our
      top-k expert sets must equal float64's at every token that is not a near-tie (k-th and
      (k+1)-th float64 logits within NEAR_TIE_ULPS units in the last place of the serving dtype at
      the token's largest |logit|: there rounding may pick either expert, whoever computes), and
      our largest logit error, in those units, at most twice PEFT's on the same inputs or
      ERROR_FLOOR_ULPS (PEFT rounds once; our unmerged path rounds the base logits and then the sum,
      with the factors held in the slots' dtype; in fp32 only summation order differs). PEFT's own
      router in float32 on the same inputs must be within READING_UNITS of (a) too: float64 is
      built from our reading of the file, and only so is PEFT's error evidence of rounding, not of
      PEFT reading the file another way (which would widen the bound instead of failing).
  end to end (informative below fp32): PEFT in fp32 (a bf16 model is widened for that run, exactly,
      and narrowed back) on the same tokens; per-module top-k agreement and the output logits. In
      bf16 this mostly measures how attention and experts drift the hidden states ahead of the
      routers, not the routers, so it does not decide; in fp32 it must reach ``--min-agreement``.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lora.adapter_io import RouterAdapter, read_adapter
from lora.registry import get_token_slots, lora_layers, replace_modules

# A module name's layer index (…layers.N…, DBRX's …blocks.N…: the first number that follows a name,
# as PEFT finds it), where a truncated model may lack it.
_LAYER_INDEX = re.compile(r"(?:^|\.)[^.]+\.(\d+)(?:\.|$)")
# Near-tie width in units in the last place of the serving dtype (at the token's largest |logit|).
# Our path rounds each logit twice in bf16 (the base logits, then base + delta), half a unit each; the
# third unit covers the adapter factors held in the slots' dtype (the demo measured <= 1.2 units).
NEAR_TIE_ULPS = 3
# Logit errors always allowed, in those units: two roundings (1) plus bf16 factors (measured <= 1.2
# units, see the demo) below fp32; in fp32, summation order over K (PEFT's error can be ~0 there).
ERROR_FLOOR_ULPS = {torch.float32: 64.0}
DEFAULT_ERROR_FLOOR_ULPS = 2.5
# PEFT's float32 router against float64 of our reading, per logit, in units of float32's eps times the
# sum of the logit's terms' sizes: summation order loses a few; another reading of the file (a
# scaling 10% off) thousands.
READING_UNITS = 64.0


@dataclass
class ModuleAgreement:
    """One adapted module: end to end against the fp32 PEFT reference, and alone (float64)."""

    module: str
    max_abs_diff: float  # end to end: router logits (the dense scores for the 2-tuple gpt-oss form)
    topk_agreement: float  # end to end: fraction of tokens whose top-k expert sets are equal
    peft_topk_agreement: float | None  # end to end, PEFT in the model's dtype (None when that is fp32)
    decisions: int = 0  # alone: tokens routed
    near_ties: int = 0  # alone: tokens whose k-th and (k+1)-th float64 logits are within NEAR_TIE_ULPS
    disagree: int = 0  # alone: our top-k != float64's, outside near-ties
    peft_disagree: int = 0  # alone: PEFT's (model dtype) top-k != float64's, outside near-ties
    max_error: float = 0.0  # alone: our max |logit - float64|, in ulps at each token's max |logit|
    peft_max_error: float = 0.0  # alone: PEFT's (model dtype), in the same units
    error_bound: float = 0.0  # alone: the most ``max_error`` may be (2x PEFT's, or the floor)
    peft_fp32_error: float = 0.0  # alone: PEFT's in float32, in units of float32 sums (READING_UNITS)

    @property
    def peft_reads_as_we_do(self) -> bool:
        """PEFT in float32 computes the float64 reference of our reading, up to summation order."""
        return self.peft_fp32_error <= READING_UNITS

    @property
    def routes_exactly(self) -> bool:
        """The routers-alone verdict of this module."""
        return self.disagree == 0 and self.max_error <= self.error_bound and self.peft_reads_as_we_do


@dataclass
class VerifyReport:
    modules: list[ModuleAgreement]
    skipped: list[str]  # adapter modules in the layers a truncated model lacks
    logits_max_abs_diff: float
    greedy_agreement: float
    num_tokens: int
    dtype: torch.dtype = torch.float32


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
    """Wraps the model's gates for one adapter of the adapter's largest rank; returns the undo.
    transformers' routers through ``replace_routers``, nn.Linear gates through ``replace_modules``."""
    from moegate.routers import is_router, replace_routers, restore_routers
    from moegate.transformers import GptOssTopKRouter

    max_rank = max(adapter.ranks.values())
    if any(is_router(module) or isinstance(module, GptOssTopKRouter) for module in model.modules()):
        # Routers computing in float32 get float32 weights (exact): put the dtypes back on undo.
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        replace_routers(model, max_loras=1, max_rank=max_rank)

        def undo_routers():
            restore_routers(model)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if parameter.dtype != dtypes.get(name, parameter.dtype):
                        parameter.data = parameter.data.to(dtypes[name])
        return undo_routers
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


def _layer_index(module: str) -> int | None:
    match = _LAYER_INDEX.search(module)
    return None if match is None else int(match[1])


def experts_per_token(config) -> int:
    """The top-k of a transformers MoE config: ``num_experts_per_tok`` (most families), Aria's
    ``moe_topk`` or DBRX's ``ffn_config.moe_top_k``; ValueError when the config names none."""
    ffn = getattr(config, "ffn_config", None)
    for value in (getattr(config, "num_experts_per_tok", None), getattr(config, "moe_top_k", None),
                  getattr(config, "moe_topk", None),  # Aria
                  ffn.get("moe_top_k") if isinstance(ffn, dict) else getattr(ffn, "moe_top_k", None)):
        if isinstance(value, int) and value >= 1:
            return value
    raise ValueError(f"cannot tell how many experts a token takes from {type(config).__name__} (no "
                     "num_experts_per_tok or moe_top_k)")


def verify_adapter(model: nn.Module, adapter_dir: str, *, batch: int = 4, seq: int = 32,
                   seed: int = 0, truncated: bool = False) -> VerifyReport:
    """Runs moegate, then PEFT, on the same random tokens [batch, seq] through ``model``.

    Raises AdapterError (every problem listed) when moegate cannot serve the adapter, and
    ValueError when the model lacks one of its modules; PEFT only runs on adapters that passed.
    ``truncated``: the model keeps only its first ``config.num_hidden_layers`` layers (``build_model``
    with ``num_layers``), so modules of the layers past them are skipped, not missing.
    """
    adapter = read_adapter(adapter_dir)
    present = {name for name, _ in model.named_modules()}
    kept = {name: w for name, w in adapter.modules.items() if name in present}
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    skipped = sorted(name for name in set(adapter.modules) - set(kept)
                     if truncated and layers is not None and (_layer_index(name) or 0) >= layers)
    missing = sorted(set(adapter.modules) - set(kept) - set(skipped))
    if missing:
        raise ValueError(f"{len(missing)} of the adapter's {len(adapter.modules)} modules do not exist "
                         f"in the model (first: {missing[0]}): an adapter for another model cannot be "
                         "served here")
    if not kept:
        raise ValueError(f"none of the adapter's {len(skipped)} modules exists in the model "
                         f"(first: {skipped[0]})")
    adapter = RouterAdapter(adapter.config, kept, source=adapter.source)
    names = sorted(kept)
    config = getattr(model, "config", None)
    top_k = experts_per_token(config)
    vocab = getattr(config, "vocab_size", 32000)
    device = next(model.parameters()).device
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)

    dtype = next(model.parameters()).dtype
    undo = _patch(model, adapter)
    try:
        adapter.bind(model).write(0)
        get_token_slots(model).fill(tokens.numel(), 0)
        inputs: dict[str, torch.Tensor] = {}
        hooks = [model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs.__setitem__(name, args[0].detach())) for name in names]
        try:
            our_logits, ours = _run(model, names, tokens, top_k)
        finally:
            for hook in hooks:
                hook.remove()
        # Our gates' logits on the recorded inputs: deterministic, the same slots and mapping.
        gates = {name: _gate_of(model, name) for name in names}
        with torch.no_grad():
            served = {name: (inputs[name].reshape(-1, gates[name].in_features),
                             gates[name](inputs[name].reshape(-1, gates[name].in_features)
                                         .to(gates[name].weight.dtype)))
                      for name in names}
            bases = {name: (gates[name].weight.detach().clone(), None if gates[name].bias is None
                            else gates[name].bias.detach().clone()) for name in names}
    finally:
        undo()
    peft_alone = _peft_router_logits(model, adapter_dir, names, {n: x for n, (x, _) in served.items()})
    same_dtype = None if dtype == torch.float32 else _run_peft(model, adapter_dir, names, tokens, top_k)[1]
    model.float()  # exact for bf16/fp16 weights
    peft_fp32 = peft_alone if dtype == torch.float32 else _peft_router_logits(
        model, adapter_dir, names, {n: x.float() for n, (x, _) in served.items()})
    ref_logits, reference = _run_peft(model, adapter_dir, names, tokens, top_k)
    model.to(dtype)

    def agreement(ids, name):
        return (ids == reference[name][1]).all(dim=-1).double().mean().item()

    modules = []
    for name in names:
        x, logits = served[name]
        weight, bias = bases[name]
        alone = routers_alone(x, logits, peft_alone[name], peft_fp32[name], weight, bias,
                              adapter.modules[name], top_k, dtype)
        peft_agreement = None if same_dtype is None else agreement(same_dtype[name][1], name)
        modules.append(ModuleAgreement(
            name, (ours[name][0].float() - reference[name][0].float()).abs().max().item(),
            agreement(ours[name][1], name), peft_agreement, **alone))
    return VerifyReport(modules, skipped, (our_logits - ref_logits).abs().max().item(),
                        (our_logits.argmax(-1) == ref_logits.argmax(-1)).double().mean().item(),
                        tokens.numel(), dtype)


def _gate_of(model: nn.Module, name: str) -> nn.Module:
    """The LoRA gate layer serving adapter module ``name`` (the router's ``linear``, or the gate)."""
    layers = lora_layers(model)
    return layers[name] if name in layers else layers[name + ".linear"]


def routers_alone(x: torch.Tensor, logits: torch.Tensor, peft_logits: torch.Tensor,
                  peft_fp32_logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora,
                  top_k: int, dtype: torch.dtype) -> dict:
    """Our logits [T, E] and PEFT's (model dtype, and float32) on the same inputs x [T, K] against
    float64 ``x @ (W + scaling * B @ A).T + b``: the ``ModuleAgreement`` fields of the routers-alone
    check."""
    delta = lora.scaling * (lora.lora_b.double() @ lora.lora_a.double())
    reference = F.linear(x.double(), weight.double() + delta.to(weight.device),
                         None if bias is None else bias.double())
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(reference.abs().amax(-1))))
    if top_k < reference.shape[-1]:
        top = reference.topk(top_k + 1, dim=-1).values
        near_tie = top[:, top_k - 1] - top[:, top_k] <= NEAR_TIE_ULPS * ulp
    else:  # every expert is taken: no choice to tie
        near_tie = torch.zeros(reference.shape[0], dtype=torch.bool, device=reference.device)
    reference_ids = reference.topk(top_k, dim=-1).indices.sort(-1).values

    def disagree(candidate):
        ids = candidate.double().topk(top_k, dim=-1).indices.sort(-1).values
        return int(((ids != reference_ids).any(-1) & ~near_tie).sum())

    def error_ulps(candidate):  # per token, in units of its own scale: big logits are not favoured
        return ((candidate.double() - reference).abs().amax(-1) / ulp).max().item()

    # What float32 sums may lose on each logit, whichever order they take: eps times the sum of its
    # terms' sizes, sum_k |x_k| (|W_ek| + |scaling| sum_r |B_er A_rk|) + |b_e| (a logit that cancels
    # between large terms loses more than its own size suggests).
    magnitude = F.linear(x.double().abs(), weight.double().abs() + abs(lora.scaling) * (
        lora.lora_b.double().abs() @ lora.lora_a.double().abs()).to(weight.device),
        None if bias is None else bias.double().abs())
    unit32 = (torch.finfo(torch.float32).eps * magnitude).clamp_min(torch.finfo(torch.float64).tiny)
    error, peft_error = error_ulps(logits), error_ulps(peft_logits)
    floor = ERROR_FLOOR_ULPS.get(dtype, DEFAULT_ERROR_FLOOR_ULPS)
    return {"decisions": reference.shape[0], "near_ties": int(near_tie.sum()), "disagree": disagree(logits),
            "peft_disagree": disagree(peft_logits), "max_error": error, "peft_max_error": peft_error,
            "error_bound": max(2 * peft_error, floor),
            "peft_fp32_error": ((peft_fp32_logits.double() - reference).abs() / unit32).max().item()}


class _CaptureLinear(TorchFunctionMode):
    """Records the outputs of F.linear calls that produce ``num_experts`` columns (a router's logits
    inside its forward, whatever the router returns)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (F.linear, torch._C._nn.linear) and result.shape[-1] == self.num_experts:
            self.outputs.append(result)
        return result


def _peft_router_logits(model: nn.Module, adapter_dir: str, names: list[str],
                        inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's own router modules, in the model's dtype, with the adapter, on ``inputs``: logits."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    try:
        logits = {}
        for name in names:
            module = peft_model.base_model.model.get_submodule(name)
            weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
            capture = _CaptureLinear(weight.shape[0])
            with torch.no_grad(), capture:
                output = module(inputs[name])
            logits[name] = output if isinstance(output, torch.Tensor) else capture.outputs[0]
        return logits
    finally:
        peft_model.unload()


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
