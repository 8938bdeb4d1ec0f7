"""PEFT's conventions for LoRA adapter files: key names, which modules a config targets, ranks, scaling.

Written from PEFT's documented behaviour (checked against peft 0.21 in tests/test_peft_compat.py),
so a config means here what it means in PEFT:

  keys      ``base_model.model.<module>.lora_A.weight`` [r, K] and ``….lora_B.weight`` [E, r];
            ``<module>`` is the qualified name in the model given to ``get_peft_model``.
  targets   ``target_parameters`` (PEFT's ParamWrapper, how gpt-oss routers are targeted): the entry
            equals ``<module>.weight`` or is a dot-separated suffix of it. ``target_modules``: a str
            is a regex that must match the whole name; a list matches a name equal to an entry or
            ending in ``.<entry>``, then ``layers_to_transform`` / ``layers_pattern`` restrict by layer
            index (PEFT applies them to target_modules only). ``exclude_modules`` removes names.
  patterns  ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against the end of the
            module's PEFT key (at a dot boundary), the first match wins. The PEFT key is ``<module>``
            for target_modules and ``<module>.weight`` for target_parameters.
  scaling   ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
  config    PEFT trusts the JSON: ``r="4"`` or ``use_rslora="false"`` reach its arithmetic as they are,
            an invalid regex fails deep inside it, and options its version does not know are dropped
            with a warning. ``config_problems`` refuses all of these before anything is built.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable

PEFT_PREFIX = "base_model.model."
LORA_FACTORS = ("lora_A", "lora_B")

PARAMETER = "parameter"  # targeted through target_parameters (the weight is wrapped)
MODULE = "module"  # targeted through target_modules (the module is wrapped)

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
# PEFT's default layer-index pattern: the first numbered segment, "….layers.<idx>.…".
_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def strip_prefix(key: str) -> str:
    """The key in the model's namespace: PEFT writes every key under ``base_model.model.``."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``(module, "lora_A" | "lora_B")`` for a LoRA factor key (prefix stripped), else None."""
    match = _LORA_KEY.match(strip_prefix(key))
    if match is None:
        return None
    return match["module"], match["factor"]


def lora_key(module: str, factor: str) -> str:
    """The key PEFT writes for one factor of ``module``."""
    return f"{PEFT_PREFIX}{module}.{factor}.weight"


def _entries(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _excluded(config, module: str) -> bool:
    exclude = getattr(config, "exclude_modules", None)
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, module) is not None
    return any(module == entry or module.endswith("." + entry) for entry in exclude)


def _layer_index_allowed(config, module: str) -> bool:
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = [p for p in _entries(getattr(config, "layers_pattern", None)) if p]  # "": PEFT's default
    match = None
    if not patterns:
        match = _DEFAULT_LAYER_INDEX.match(module)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
        if match is not None:
            break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def targets_parameter(target_parameters: Iterable[str] | None, module: str) -> bool:
    """Whether ``target_parameters`` selects ``<module>.weight`` (PEFT ParamWrapper matching)."""
    key = module + ".weight"
    return any(key == entry or key.endswith("." + entry) for entry in _entries(target_parameters))


def targets_module(config, module: str) -> bool:
    """Whether ``config.target_modules`` (with exclusions and layer restrictions) selects ``module``."""
    if _excluded(config, module):
        return False
    target_modules = getattr(config, "target_modules", None)
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    if module in target_modules:
        return True
    if not any(module.endswith("." + entry) for entry in target_modules):
        return False
    return _layer_index_allowed(config, module)


def targeted_as(config, module: str, target_parameters=None) -> str | None:
    """``PARAMETER``, ``MODULE`` or None: how the config selects ``module`` for LoRA.

    ``target_parameters`` overrides the config's (for PEFT versions whose config class lacks it).
    """
    if target_parameters is None:
        target_parameters = getattr(config, "target_parameters", None)
    if targets_parameter(target_parameters, module):  # PEFT applies no exclusions to parameters
        return PARAMETER
    if targets_module(config, module):
        return MODULE
    return None


def peft_key(module: str, targeted: str) -> str:
    """The name PEFT matches rank/alpha patterns against."""
    return module + ".weight" if targeted == PARAMETER else module


def _pattern_value(patterns: dict | None, key: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def rank_and_alpha(config, module: str, targeted: str) -> tuple[int, float]:
    """``(r, lora_alpha)`` of ``module`` after ``rank_pattern`` / ``alpha_pattern``."""
    key = peft_key(module, targeted)
    rank = _pattern_value(getattr(config, "rank_pattern", None), key, config.r)
    alpha = _pattern_value(getattr(config, "alpha_pattern", None), key, config.lora_alpha)
    return int(rank), float(alpha)


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling of the product B @ A."""
    if rank < 1:
        raise ValueError(f"a LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def covered_by_modules_to_save(entries, module: str) -> str | None:
    """The ``modules_to_save`` entry whose full copy would replace ``module`` (or an ancestor of it),
    else None. PEFT saves every module whose name ends with an entry, as a plain string suffix."""
    parts = module.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return next((entry for entry in _entries(entries) for name in ancestors if name.endswith(entry)), None)


# Options whose value PEFT uses in a regex, and those whose entries are regexes (pattern keys).
_REGEX_OPTIONS = ("target_modules", "exclude_modules", "layers_pattern")
_PATTERN_OPTIONS = ("rank_pattern", "alpha_pattern")
# Options the installed PEFT may not know that are safe to read without it: target_parameters is read
# here directly (PEFT < 0.17 lacks it); runtime_config is dropped by PEFT itself (never saved state).
_READ_WITHOUT_PEFT = {"target_parameters", "runtime_config"}


def config_problems(raw: dict, known_options: Iterable[str]) -> list[str]:
    """Why the JSON of an adapter config cannot be served as PEFT means it, one line each.

    ``known_options``: the fields of the installed PEFT's LoraConfig. An unknown option is refused
    unless it holds a neutral value (null, false, 0, "", [] or {}: what a newer PEFT writes for
    features left off), since PEFT would drop it silently and serve something else.
    """
    problems = []
    known = set(known_options) | _READ_WITHOUT_PEFT
    for option, value in sorted(raw.items()):
        if option not in known and value not in (None, False, 0, "", [], {}):
            problems.append(f"option {option}={value!r} is unknown to the installed peft and may change "
                            "what the adapter computes: upgrade peft, or drop the option if it is a default")
    r = raw.get("r", 8)
    if not _is_int(r) or r < 1:
        problems.append(f"r must be an integer >= 1, got {r!r}")
    if not is_finite_real(raw.get("lora_alpha", 8)):
        problems.append(f"lora_alpha must be a finite number, got {raw.get('lora_alpha')!r}")
    for option in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(raw.get(option, False), bool):
            problems.append(f"{option} must be true or false, got {raw[option]!r}")
    for option in _PATTERN_OPTIONS:
        patterns = raw.get(option) or {}
        if not isinstance(patterns, dict):
            problems.append(f"{option} must be an object {{regex: value}}, got {patterns!r}")
            continue
        valid = _is_rank if option == "rank_pattern" else is_finite_real
        for pattern, value in patterns.items():
            problems += _regex_problems(f"{option} key", pattern)
            if not valid(value):
                what = "an integer >= 1" if option == "rank_pattern" else "a finite number"
                problems.append(f"{option}[{pattern!r}] must be {what}, got {value!r}")
    for option in _REGEX_OPTIONS:
        value = raw.get(option)
        if value is None:
            continue
        if isinstance(value, str):
            problems += _regex_problems(option, value)
        elif isinstance(value, (list, tuple)) and all(isinstance(entry, str) for entry in value):
            if option == "layers_pattern":
                for entry in value:
                    problems += _regex_problems(option, entry)
        else:
            problems.append(f"{option} must be a string or a list of strings, got {value!r}")
    for option in ("target_parameters", "modules_to_save"):
        value = raw.get(option)
        if value is not None and not (isinstance(value, list) and all(isinstance(e, str) for e in value)):
            problems.append(f"{option} must be a list of strings, got {value!r}")
    layers = raw.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or (
            isinstance(layers, list) and all(_is_int(layer) for layer in layers))):
        problems.append(f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
    return problems


def lora_config_options() -> set[str]:
    """The option names the installed PEFT's LoraConfig knows."""
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_rank(value) -> bool:
    return _is_int(value) and value >= 1


def is_finite_real(value) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past float's range
        return False


def _regex_problems(option: str, pattern) -> list[str]:
    if not isinstance(pattern, str):
        return [f"{option} {pattern!r} must be a string (a regular expression)"]
    try:
        re.compile(pattern)
    except re.error as error:
        return [f"{option} {pattern!r} is not a valid regular expression: {error}"]
    return []


def looks_like_router(module: str) -> bool:
    """A naming heuristic for ``inspect`` without a model: ``…router``, ``…gate``, ``…router.linear``."""
    parts = module.split(".")
    return parts[-1] in ("router", "gate") or (len(parts) > 1 and parts[-2] in ("router", "gate"))
