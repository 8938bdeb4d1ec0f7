"""Router LoRA adapters in PEFT's file format: read, check, bind to a model's slots, write.

An adapter directory holds ``adapter_config.json``, read with PEFT's own config class so every
option means what it means in PEFT, and ``adapter_model.safetensors`` (pickle files are never read).
Router keys come in three forms, all mapped to the model's LoRA gate layers:
  ``…layers.N.mlp.router.lora_A.weight``        PEFT ``target_parameters=["mlp.router.weight"]``
  ``…layers.N.mlp.router.linear.lora_A.weight`` a router patched to hold an nn.Linear ``linear``
  ``…block_sparse_moe.gate.lora_A.weight``      an nn.Linear gate through ``target_modules``

Everything is checked before any slot is touched; an adapter that cannot be served exactly raises
one ``AdapterError`` listing every problem, and nothing is loaded. Loading is all or nothing: the
slot writes of every layer form one transaction (``lora.slots.SlotWrites``), undone if any fails.
The files are read as one consistent version (``lora.adapter_files``), and saved atomically.

    adapter = load_adapter("adapters/math")                  # file checks only
    adapter = load_adapter("adapters/math", model, slot=0)   # + checks against the model, then loads
    save_adapter(adapter, "adapters/math-copy")              # PEFT can load the result
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora import peft_keys
from lora.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_DIGEST,
    PICKLE_WEIGHTS,
    TornRead,
    config_digest,
    read_snapshot,
    write_directory,
)
from lora.casts import cast_problem, scaled_b_problem, scaling_problem
from lora.peft_keys import MODULE, PARAMETER
from lora.registry import lora_layers
from lora.slots import SlotWrites

if TYPE_CHECKING:  # peft (which imports transformers) loads on first use, not with `import lora`
    from peft import LoraConfig

# Factor dtypes an adapter may hold (the slots' dtype is decided by the model, at bind).
_FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Reads of a directory that a writer keeps changing, before giving up.
_READ_ATTEMPTS = 3
_RETRY_PAUSE_S = 0.01  # doubled per attempt: a writer's two renames are microseconds apart

# LoraConfig options that change what an adapter computes beyond scaling * B @ A: refused.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora=True)",
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "fan_in_fan_out": "fan_in_fan_out=True (transposed Conv1D weights)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora=True)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


# init_lora_weights values whose initialisation PEFT runs again when it loads the adapter, rewriting
# the base weight (W - scaling * B0 A0, or a quantised W): such a file is not base + scaling * B @ A.
_BASE_REWRITING_INITS = ("pissa", "corda", "astra", "olora", "loftq", "lora_ga")


class AdapterError(ValueError):
    """An adapter that cannot be served; ``problems`` lists every reason, one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"adapter {source} cannot be loaded ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}); nothing was loaded:\n  - {lines}")


@dataclass(frozen=True)
class LoraWeights:
    """One module's adapter: ``delta = scaling * (x @ lora_a.T) @ lora_b.T``.

    lora_a: [r, K]; lora_b: [E, r]; ``targeted`` is ``"parameter"`` (PEFT target_parameters) or
    ``"module"`` (target_modules), which decides how PEFT names the module in its rank patterns.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    targeted: str

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class RouterAdapter:
    """A router adapter in memory (CPU tensors as stored in the file).

    ``modules`` maps each module's name in the model's namespace (PEFT's key without
    ``base_model.model.``, e.g. ``model.layers.0.mlp.router``) to its weights. ``problems`` holds
    what ``read_adapter(strict=False)`` found wrong with the file (empty for a servable adapter).
    """

    config: LoraConfig
    modules: dict[str, LoraWeights]
    source: str = "<memory>"
    problems: list[str] = field(default_factory=list)

    @classmethod
    def from_weights(cls, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                     lora_alpha: float, use_rslora: bool = False, targeted: str = PARAMETER,
                     base_model_name_or_path: str | None = None) -> RouterAdapter:
        """An adapter from factors ``{module: (lora_a [r, K], lora_b [E, r])}``, with a PEFT config.

        ``targeted="parameter"`` writes ``target_parameters`` (how PEFT targets gpt-oss routers),
        ``"module"`` writes ``target_modules`` (nn.Linear gates); both list the exact module names.
        ``r`` is the largest rank; modules of other ranks get exact ``rank_pattern`` entries.
        """
        from peft import LoraConfig

        if targeted not in (PARAMETER, MODULE):
            raise ValueError(f"targeted must be {PARAMETER!r} or {MODULE!r}, got {targeted!r}")
        if not peft_keys.is_finite_real(lora_alpha):  # the config file's own check: what PEFT reads back
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if not weights:
            raise ValueError("an adapter needs at least one module")
        ranks = {module: a.shape[0] for module, (a, _) in weights.items()}
        r = max(ranks.values())
        rank_pattern = {re.escape(peft_keys.peft_key(module, targeted)): rank
                        for module, rank in ranks.items() if rank != r}
        names = sorted(weights)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, rank_pattern=rank_pattern,
            target_modules=names if targeted == MODULE else [],
            target_parameters=[f"{name}.weight" for name in names] if targeted == PARAMETER else None,
            base_model_name_or_path=base_model_name_or_path, inference_mode=True)
        raw = {module: {"lora_A": a.detach().cpu(), "lora_B": b.detach().cpu()}
               for module, (a, b) in weights.items()}
        modules, problems = _check_modules(config, raw, None)
        if problems:
            raise AdapterError("<memory>", problems)
        return cls(config, modules)

    @property
    def ranks(self) -> dict[str, int]:
        return {module: weights.rank for module, weights in self.modules.items()}

    def bind(self, model: nn.Module) -> BoundAdapter:
        """Matches every module to one of ``model``'s LoRA gate layers and casts the factors to the
        layers' slot dtype (on the CPU). Raises AdapterError listing every mismatch."""
        if self.problems:
            raise AdapterError(self.source, self.problems)
        layers = lora_layers(model)
        problems = []
        if not layers:
            raise AdapterError(self.source, [
                f"{type(model).__name__} has no LoRA gate layers; wrap its gates first "
                "(moegate.routers.replace_routers, lora.replace_modules or lora.AdapterManager)"])
        by_canonical = {_canonical(name): name for name in layers}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        claimed: dict[str, str] = {}
        for module, weights in sorted(self.modules.items()):
            name, problem = _resolve(module, by_canonical)
            if problem is not None:
                problems.append(problem)
                continue
            if name in claimed:
                problems.append(f"{module}: maps to the same layer {name} as {claimed[name]}")
                continue
            claimed[name] = module
            cast, layer_problems = _fit_to_layer(module, weights, layers[name])
            problems += layer_problems
            if not layer_problems:
                factors[name] = cast
        if problems:
            raise AdapterError(self.source, problems)
        return BoundAdapter(self, layers, factors)


@dataclass(frozen=True)
class BoundAdapter:
    """An adapter checked against one model: ``factors`` per LoRA layer name, ready for the slots.

    ``layers`` is every LoRA gate layer of the model; those the adapter does not cover are emptied
    in the slot it is written to, so a slot always holds exactly one adapter.
    """

    adapter: RouterAdapter
    layers: dict[str, nn.Module]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    def write(self, slot: int, writes: SlotWrites | None = None) -> None:
        """Loads the adapter into ``slot`` of every layer (in place, no allocation in the slots).

        All or nothing: everything a layer's set_lora could refuse is checked first, and the writes
        are one transaction, ``writes`` (the caller's, to make them part of a larger one) or a new
        one that is undone if any write fails.
        """
        for name, layer in self.layers.items():
            _, max_rank, in_features = layer.lora_a_stacked.shape
            if not 0 <= slot < layer.lora_a_stacked.shape[0]:
                raise ValueError(f"slot {slot} is out of range: {name} has "
                                 f"{layer.lora_a_stacked.shape[0]} slots")
            if getattr(layer, "merged_slot", None) == slot:
                raise RuntimeError(f"slot {slot} of {name} is merged into its weight; unmerge() first")
            if name not in self.factors:
                continue
            lora_a, lora_b, _ = self.factors[name]
            if (lora_a.dtype != layer.lora_a_stacked.dtype or lora_a.shape[0] > max_rank
                    or lora_a.shape[1] != in_features or lora_b.shape[0] != layer.lora_b_stacked.shape[1]):
                raise RuntimeError(f"{name}'s slots changed since the adapter was bound (now "
                                   f"{layer.lora_a_stacked.dtype}, rank <= {max_rank}, "
                                   f"{list(layer.lora_b_stacked.shape[1:2]) + [in_features]}): bind it again")
        with writes if writes is not None else SlotWrites() as transaction:
            for name, layer in self.layers.items():
                if name in self.factors:
                    lora_a, lora_b, scaling = self.factors[name]
                    device = layer.lora_a_stacked.device
                    transaction.set_lora(layer, slot, lora_a.to(device), lora_b.to(device), scaling)
                else:
                    transaction.reset_lora(layer, slot)


def _canonical(name: str) -> str:
    # `…router.linear` is the gate held by a patched router: the adapter may name either.
    return name[: -len(".linear")] if name.endswith(".linear") else name


def _resolve(module: str, by_canonical: dict[str, str]) -> tuple[str | None, str | None]:
    """The layer name for an adapter module: exact, else a unique match at a dot boundary (an
    adapter trained on ``GptOssModel`` served in ``GptOssForCausalLM``, or the reverse)."""
    canonical = _canonical(module)
    if canonical in by_canonical:
        return by_canonical[canonical], None
    matches = [name for key, name in by_canonical.items()
               if key.endswith("." + canonical) or canonical.endswith("." + key)]
    if len(matches) == 1:
        return matches[0], None
    if matches:
        return None, f"{module}: ambiguous, matches the layers {sorted(matches)}"
    known = sorted(by_canonical)
    shown = ", ".join(known[:4]) + (f", … ({len(known)} in all)" if len(known) > 4 else "")
    return None, f"{module}: the model has no LoRA gate layer of that name (it has {shown})"


def _fit_to_layer(module: str, weights: LoraWeights, layer: nn.Module):
    """Checks shapes and rank against the layer; casts to its slot dtype. ``(factors, problems)``."""
    _, max_rank, in_features = layer.lora_a_stacked.shape
    num_experts = layer.lora_b_stacked.shape[1]
    dtype = layer.lora_a_stacked.dtype
    problems = []
    if weights.lora_a.shape[1] != in_features:
        problems.append(f"{module}: lora_A is {list(weights.lora_a.shape)} but the layer has K={in_features}")
    if weights.lora_b.shape[0] != num_experts:
        problems.append(f"{module}: lora_B is {list(weights.lora_b.shape)} but the layer has "
                        f"E={num_experts} experts")
    if weights.rank > max_rank:
        problems.append(f"{module}: rank {weights.rank} exceeds the layer's max_rank {max_rank}")
    problem = scaling_problem(f"{module}: scaling", weights.scaling)
    if problem is not None:
        problems.append(problem)
    lora_a = weights.lora_a.to(dtype)
    lora_b = weights.lora_b.to(dtype)
    for factor, original, cast in (("lora_A", weights.lora_a, lora_a), ("lora_B", weights.lora_b, lora_b)):
        problem = cast_problem(f"{module}: {factor}", original, cast)
        if problem is not None:
            problems.append(problem)
    if not problems:  # set_lora's last check, on the factors as the slot will hold them
        problem = scaled_b_problem(module, lora_b, weights.scaling)
        if problem is not None:
            problems.append(problem)
    return (lora_a, lora_b, weights.scaling), problems


def _config_problems(config: LoraConfig, modules: list[str]) -> list[str]:
    problems = []
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if getattr(config, option, None):
            problems.append(f"{what} is not supported")
    if getattr(config, "bias", "none") != "none":
        problems.append(f"bias={config.bias!r} trains base biases; only bias='none' is supported")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights={init!r}: PEFT rewrites the base weight when it loads this "
                        "adapter; save it as a plain LoRA (PEFT's save_pretrained with "
                        "path_initial_model_for_weight_conversion) to serve it")
    for module in modules:
        entry = peft_keys.covered_by_modules_to_save(getattr(config, "modules_to_save", None), module)
        if entry is not None:
            problems.append(f"modules_to_save={entry!r} covers the router {module}: full router "
                            "weights are not supported")
            break
    return problems


def _key_problem(key: str, shape: list[int]) -> str:
    """Why a key that is not ``<module>.lora_A/B.weight`` cannot be served."""
    name = peft_keys.strip_prefix(key)
    if "lora_magnitude_vector" in name:
        return f"{name}: a DoRA magnitude vector; DoRA is not supported"
    if re.search(r"\.lora_B\.bias$", name):
        return f"{name}: a bias on lora_B (lora_bias=True) is not supported"
    if ".lora_embedding_" in name:
        return f"{name}: an embedding LoRA factor, not a router gate's"
    if re.search(r"\.lora_[AB]\.[^.]+\.weight$", name):
        return (f"{name}: a factor keyed with an adapter name; PEFT's save_pretrained writes keys "
                "without it (…lora_A.weight): save the adapter with PEFT")
    if ".lora_" in name:
        return f"{name}: an unrecognised LoRA tensor"
    return (f"{name}: a full tensor {list(shape)} (modules_to_save or bias training); "
            "only router LoRA factors are supported")


def _check_modules(config: LoraConfig, raw: dict[str, dict[str, torch.Tensor]],
                   target_parameters) -> tuple[dict[str, LoraWeights], list[str]]:
    """Per-module checks of the factors against each other and the config."""
    modules, problems = {}, []
    for module in sorted(raw):
        factors = raw[module]
        missing = [f for f in peft_keys.LORA_FACTORS if f not in factors]
        if missing:
            problems.append(f"{module}: {' and '.join(missing)} missing")
            continue
        lora_a, lora_b = factors["lora_A"], factors["lora_B"]
        shape_ok = True
        for factor, tensor in factors.items():
            if isinstance(tensor, dict):  # a header entry of the file: a dtype we do not read
                problems.append(f"{module}: {factor} is {tensor['dtype']}, not float16/bfloat16/float32/"
                                "float64")
                shape_ok = False
                continue
            if tensor.dim() != 2:
                problems.append(f"{module}: {factor} must be 2-D, got {list(tensor.shape)}")
                shape_ok = False
            if tensor.dtype not in _FACTOR_DTYPES:
                problems.append(f"{module}: {factor} is {tensor.dtype}, not float16/bfloat16/float32/float64")
                shape_ok = False
        if not shape_ok:
            continue
        if lora_a.dtype != lora_b.dtype:
            problems.append(f"{module}: lora_A is {lora_a.dtype} but lora_B is {lora_b.dtype}")
        rank = lora_a.shape[0]
        if lora_b.shape[1] != rank:
            problems.append(f"{module}: lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)} "
                            "disagree on the rank")
            continue
        for factor, tensor in factors.items():
            if not bool(torch.isfinite(tensor).all()):
                problems.append(f"{module}: {factor} holds non-finite values")
        targeted = peft_keys.targeted_as(config, module, target_parameters)
        if targeted is None:
            problems.append(f"{module}: not selected by the config's target_modules="
                            f"{_show(config.target_modules)} / target_parameters={_show(target_parameters)}")
            continue
        config_rank, alpha = peft_keys.rank_and_alpha(config, module, targeted)
        if rank != config_rank or rank < 1:
            problems.append(f"{module}: rank {rank} in the file but the config gives r={config_rank}")
            continue
        scaling = peft_keys.lora_scaling(rank, alpha, config.use_rslora)
        problem = scaling_problem(f"{module}: scaling", scaling, f" (lora_alpha={alpha}, r={rank})")
        if problem is not None:
            problems.append(problem)
            continue
        modules[module] = LoraWeights(lora_a, lora_b, scaling, targeted)
    return modules, problems + _config_problems(config, sorted(raw))


def _show(value) -> str:
    return repr(sorted(value)) if isinstance(value, (set, list, tuple)) else repr(value)


def _read_config(config_bytes: bytes) -> tuple[LoraConfig | None, object, list[str]]:
    """PEFT's LoraConfig built from the file's bytes, the raw ``target_parameters`` (kept even by a
    PEFT too old to know it), and problems. The JSON is checked first (``peft_keys.config_problems``):
    PEFT would accept values its arithmetic then misreads, and drop options it does not know."""
    from peft import LoraConfig, PeftConfig

    try:
        raw = json.loads(config_bytes)
    except (UnicodeDecodeError, ValueError) as error:
        return None, None, [f"{ADAPTER_CONFIG} is not valid JSON: {error}"]
    if not isinstance(raw, dict):
        return None, None, [f"{ADAPTER_CONFIG} must hold a JSON object, got {type(raw).__name__}"]
    if raw.get("peft_type") != "LORA":
        return None, None, [f"{ADAPTER_CONFIG} is not a LoRA config (peft_type={raw.get('peft_type')!r})"]
    problems = peft_keys.config_problems(raw, peft_keys.lora_config_options())
    if problems:
        return None, None, [f"{ADAPTER_CONFIG}: {problem}" for problem in problems]
    raw.pop("runtime_config", None)  # as PEFT's own reader: runtime options are never saved state
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown options were checked above
            config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**raw))
    except (ValueError, TypeError, KeyError) as error:
        return None, None, [f"{ADAPTER_CONFIG} is not a valid PEFT LoRA config: {error}"]
    if not isinstance(config, LoraConfig):
        return None, None, [f"{ADAPTER_CONFIG} is a {type(config).__name__}, not a LoRA config"]
    target_parameters = getattr(config, "target_parameters", None) or raw.get("target_parameters")
    return config, target_parameters, []


def _read_files(path: str) -> tuple[bytes, dict]:
    """The config bytes and the weights of one version of the directory, or AdapterError.

    A read that a writer tore (the files changed meanwhile, or the weights' config digest does not
    match, see ``lora.adapter_files``) is read again after a short pause, a few times. A digest
    mismatch is accepted as a hand edit only on the last read, and only when the read before it
    saw the same two files: a writer stalled between its renames for less than the pauses, or one
    that keeps saving, is not taken for one.
    """
    mismatched = None  # the version of the last read whose config digest did not match
    for attempt in range(_READ_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_PAUSE_S * 2 ** attempt)
        try:
            config_bytes, tensors, problems, config_matches, version = read_snapshot(
                path, lambda key: peft_keys.parse_lora_key(key) is not None)
        except TornRead:
            mismatched = None
            continue
        except OSError as error:
            raise AdapterError(path, [f"the adapter files cannot be read: {error}"]) from error
        if not config_matches and (attempt < _READ_ATTEMPTS - 1 or version != mismatched):
            mismatched = version  # a writer between its two renames, or a hand edit: read again
            continue
        if problems:
            raise AdapterError(path, problems)
        return config_bytes, tensors
    raise AdapterError(path, [f"the files kept changing while they were read ({_READ_ATTEMPTS} attempts): "
                              "load it once the writer is done, or write adapters with save_adapter, "
                              "which replaces them atomically"])


def read_adapter(path: str | os.PathLike, strict: bool = True) -> RouterAdapter:
    """Reads a PEFT adapter directory, checking the file on its own (no model).

    ``strict`` raises AdapterError on any problem; ``strict=False`` returns what could be read
    with the problems in ``adapter.problems`` (for ``moegate inspect``), or raises when not even
    the config could be read.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise AdapterError(path, [f"{path} is not a directory"])
    problems = []
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        problems.append(f"{ADAPTER_CONFIG} is missing")
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        pickle_note = (f" ({PICKLE_WEIGHTS} is there, but pickle files are never read: re-save with "
                       "safe_serialization=True)" if os.path.isfile(os.path.join(path, PICKLE_WEIGHTS))
                       else "")
        problems.append(f"{ADAPTER_WEIGHTS} is missing{pickle_note}")
    if problems:
        raise AdapterError(path, problems)
    config_bytes, tensors = _read_files(path)
    config, target_parameters, problems = _read_config(config_bytes)
    if config is None:
        raise AdapterError(path, problems)
    raw: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = peft_keys.parse_lora_key(key)
        if parsed is None:
            problems.append(_key_problem(key, tensor["shape"] if isinstance(tensor, dict) else tensor.shape))
            continue
        module, factor = parsed
        if factor in raw.get(module, {}):
            # With and without PEFT's prefix: which one PEFT would use depends on the key order.
            problems.append(f"{module}: {factor} is stored twice (keys with and without "
                            f"{peft_keys.PEFT_PREFIX!r})")
            continue
        raw.setdefault(module, {})[factor] = tensor
    if not raw:
        problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA factors (…lora_A.weight / …lora_B.weight)")
    modules, module_problems = _check_modules(config, raw, target_parameters)
    adapter = RouterAdapter(config, modules, source=path, problems=problems + module_problems)
    if strict and adapter.problems:
        raise AdapterError(path, adapter.problems)
    return adapter


def load_adapter(path: str | os.PathLike, model: nn.Module | None = None, *,
                 slot: int | None = None) -> RouterAdapter:
    """Reads and checks a PEFT adapter; with ``model``, checks it against the model's LoRA gate
    layers too; with ``slot``, then loads it into that slot of every layer.

    Raises AdapterError listing every problem before anything is written.
    """
    if slot is not None and model is None:
        raise ValueError("loading into a slot needs the model")
    adapter = read_adapter(path)
    if model is not None:
        bound = adapter.bind(model)
        if slot is not None:
            bound.write(slot)
    return adapter


def save_adapter(adapter: RouterAdapter, path: str | os.PathLike) -> None:
    """Writes ``adapter`` in PEFT's format (config through PEFT's own writer, safetensors weights),
    atomically: a reader sees the old adapter or the new one (``lora.adapter_files``).

    PEFT loads the result (``PeftModel.from_pretrained``) into the model the module names refer to.
    """
    if adapter.problems:
        raise AdapterError(adapter.source, adapter.problems)
    tensors = {}
    for module, weights in adapter.modules.items():
        tensors[peft_keys.lora_key(module, "lora_A")] = weights.lora_a.detach().cpu().contiguous()
        tensors[peft_keys.lora_key(module, "lora_B")] = weights.lora_b.detach().cpu().contiguous()

    from safetensors.torch import save_file  # on first save, not with `import lora`

    def write_files(directory: str) -> None:
        adapter.config.save_pretrained(directory)
        with open(os.path.join(directory, ADAPTER_CONFIG), "rb") as handle:
            digest = config_digest(handle.read())
        save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS),
                  metadata={"format": "pt", CONFIG_DIGEST: digest})

    write_directory(os.fspath(path), write_files)
