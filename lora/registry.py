"""The layer-replacement registry: which LoRA class wraps which module, and ``replace_modules``.

A LoRA class is an ``nn.Module`` with two classmethods:
    can_replace(module) -> bool
    from_module(module, max_loras, max_rank, token_slots) -> the wrapper
the slot interface (``set_lora``, ``reset_lora``, buffers ``lora_a_stacked [S, R, K]`` and
``lora_b_stacked [S, E, R]``), and optionally ``replaces_by_default(module) -> bool``, which says
what ``replace_modules`` wraps when no target is given. Classes are tried in registration order and
the first whose ``can_replace`` is true wraps the module. ``GateLinearWithLoRA`` is registered at
import. A LoRA layer is an instance of a registered class (``is_lora_layer``): adapter loading,
the manager and ``replace_modules`` all go by this one definition.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from lora.layer import GateLinearWithLoRA
from lora.slots import TokenSlots

# Tokens one forward may carry with the TokenSlots that replace_modules creates: a long prefill
# still fits, and the int64 buffer is only 512 KiB.
DEFAULT_MAX_TOKENS = 65536

_LORA_LAYER_CLASSES: list[type[nn.Module]] = []


def register_lora_layer(cls: type[nn.Module] | None = None, *, first: bool = False):
    """Adds a LoRA class to the registry, at the end (or the front with ``first=True``, to take
    precedence over the built-in classes). Registering a class again moves it. Returns the class,
    so it also works as a decorator: ``@register_lora_layer`` or ``@register_lora_layer(first=True)``.
    """
    def register(lora_cls):
        if not (isinstance(lora_cls, type) and issubclass(lora_cls, nn.Module)):
            raise TypeError(f"a LoRA layer class must be an nn.Module subclass, got {lora_cls!r}")
        for method in ("can_replace", "from_module", "set_lora", "reset_lora"):
            if not callable(getattr(lora_cls, method, None)):
                raise TypeError(f"{lora_cls.__name__} has no method {method}(), which a LoRA layer "
                                "class needs (see lora.registry)")
        if lora_cls in _LORA_LAYER_CLASSES:
            _LORA_LAYER_CLASSES.remove(lora_cls)
        _LORA_LAYER_CLASSES.insert(0 if first else len(_LORA_LAYER_CLASSES), lora_cls)
        return lora_cls

    return register if cls is None else register(cls)


def unregister_lora_layer(cls: type[nn.Module]) -> None:
    """Removes a LoRA class from the registry."""
    if cls not in _LORA_LAYER_CLASSES:
        raise ValueError(f"{getattr(cls, '__name__', cls)} is not registered")
    _LORA_LAYER_CLASSES.remove(cls)


def lora_layer_classes() -> tuple[type[nn.Module], ...]:
    """The registered LoRA classes, in the order they are tried."""
    return tuple(_LORA_LAYER_CLASSES)


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a LoRA layer: an instance of a registered LoRA class."""
    return isinstance(module, tuple(_LORA_LAYER_CLASSES))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA layers (``is_lora_layer``) by qualified name."""
    lora_classes = tuple(_LORA_LAYER_CLASSES)
    return {name: module for name, module in model.named_modules() if isinstance(module, lora_classes)}


def get_token_slots(model: nn.Module) -> TokenSlots:
    """The TokenSlots shared by the LoRA layers of ``model`` (set it once per step).

    Raises when the model has no LoRA layer with a TokenSlots, or layers with different ones.
    """
    found = _attached_token_slots(model)
    if len(found) != 1:
        raise ValueError("the model has no LoRA layer with a TokenSlots attached" if not found else
                         f"the model's LoRA layers hold {len(found)} different TokenSlots objects")
    return found[0]


def replace_modules(
    model: nn.Module,
    max_loras: int,
    max_rank: int,
    target=None,
    token_slots: TokenSlots | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> list[str]:
    """Swaps every targeted module of ``model`` for its LoRA wrapper, in place; returns their names.

    target:
        None: every module some registered class ``replaces_by_default`` (every GateLinear, not
            plain nn.Linear: in a model every projection is an nn.Linear).
        PEFT's ``target_modules`` semantics: a str is a regular expression that must ``fullmatch``
            the whole module name (``r".*[.]mlp[.]gate"``); a list's str items match a module name
            suffix on dot boundaries (``["gate"]`` matches ``layers.0.block_sparse_moe.gate``, not
            ``...ungate``). A compiled ``re.Pattern``, alone or in a list, must ``fullmatch``.
    Each targeted module is wrapped by the first registered class whose ``can_replace`` accepts it.
    A targeted module that no class can replace, a target that matches no module, or an already
    wrapped target raises ValueError listing all of them, and nothing is replaced. LoRA layers
    already in the model are not descended into.

    token_slots: the mapping every wrapper reads. None reuses the one the model's LoRA layers
    already share, or creates ``TokenSlots(max_tokens, device=<the modules' device>,
    num_slots=max_loras)``. Afterwards ``get_token_slots(model)`` returns it.
    """
    if token_slots is not None and not isinstance(token_slots, TokenSlots):
        raise TypeError(f"token_slots must be a TokenSlots, got {type(token_slots).__name__}")
    targets = _normalise_target(target)
    lora_classes = tuple(_LORA_LAYER_CLASSES)
    plan: list[tuple[str, nn.Module, type[nn.Module], list[tuple[nn.Module, str]]]] = []
    problems: list[str] = []
    matched_targets: set[int] = set()
    for name, module, places, other_names in _walk(model, lora_classes):
        if targets is None:
            chosen = any(_by_default(cls, module) for cls in lora_classes)
        else:
            hits = [i for i, t in enumerate(targets) if any(_matches(t, n) for n in (name, *other_names))]
            matched_targets.update(hits)
            chosen = bool(hits)
        if not chosen:
            continue
        label = f"{name or '<the model itself>'} ({type(module).__name__})"
        if isinstance(module, lora_classes):
            problems.append(f"{label}: already a LoRA layer")
            continue
        lora_cls = next((cls for cls in lora_classes if cls.can_replace(module)), None)
        if lora_cls is None:
            problems.append(f"{label}: no registered LoRA class can replace it")
        elif not places:
            problems.append(f"{label}: the root module cannot be replaced in place")
        else:
            plan.append((name, module, lora_cls, places))
    if targets is not None:
        problems += [f"target {_shown(targets[i])} matches no module"
                     for i in range(len(targets)) if i not in matched_targets]
    if problems:
        registered = ", ".join(cls.__name__ for cls in lora_classes) or "none"
        raise ValueError("cannot replace the targeted modules (registered LoRA classes: "
                         f"{registered}):\n  " + "\n  ".join(problems))
    if not plan:
        return []
    if token_slots is None:
        token_slots = _default_token_slots(model, [module for _, module, _, _ in plan], max_loras,
                                           max_tokens)
    # Build every wrapper before installing any, so an error in one leaves the model unchanged, and
    # the shared mapping too: a wrapper built before the failing one may have lowered its bound.
    bound = token_slots.num_slots
    try:
        wrappers = [lora_cls.from_module(module, max_loras, max_rank, token_slots)
                    for _, module, lora_cls, _ in plan]
    except BaseException:
        token_slots.num_slots = bound
        raise
    for (_, _, _, places), wrapper in zip(plan, wrappers):
        for parent, child_name in places:
            setattr(parent, child_name, wrapper)
    return [name for name, _, _, _ in plan]


def _walk(model: nn.Module, lora_classes) -> Iterator[tuple[str, nn.Module, list[tuple[nn.Module, str]],
                                                           list[str]]]:
    """(name, module, places, other names) for each distinct module, places being every (parent,
    attribute) that holds it (a module shared by two parents is swapped in both, and a target may
    name it by either path). LoRA layers are yielded but not descended into, so a wrapped base layer
    is never wrapped again."""
    places: dict[int, list[tuple[nn.Module, str]]] = {id(model): []}
    other_names: dict[int, list[str]] = {}
    order: list[tuple[str, nn.Module]] = []
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        order.append((name, module))
        if isinstance(module, lora_classes):
            continue
        children = []
        for child_name, child in module.named_children():
            if child is None:
                continue
            if id(child) in places:
                places[id(child)].append((module, child_name))
                other_names.setdefault(id(child), []).append(f"{name}.{child_name}" if name else child_name)
                continue
            places[id(child)] = [(module, child_name)]
            children.append((f"{name}.{child_name}" if name else child_name, child))
        stack.extend(reversed(children))
    for name, module in order:
        yield name, module, places[id(module)], other_names.get(id(module), [])


def _normalise_target(target) -> list[str | re.Pattern] | None:
    if target is None:
        return None
    if isinstance(target, str):  # one string: a full-match regex, as PEFT's target_modules
        try:
            return [re.compile(target)]
        except re.error as error:
            raise ValueError(f"target {target!r} is not a valid regular expression ({error}); a single "
                             "string is a full-match regex (PEFT's target_modules): pass a list for "
                             "name suffixes") from None
    items = [target] if isinstance(target, re.Pattern) else list(target)
    if not items:
        raise ValueError("target is empty; pass None to replace every GateLinear")
    for item in items:
        if not isinstance(item, (str, re.Pattern)):
            raise TypeError(f"a target must be a str (name suffix) or a compiled re.Pattern, got {item!r}")
        if isinstance(item, str) and not item:
            raise ValueError("an empty target string would match nothing")
    return items


def _shown(target: str | re.Pattern) -> str:
    return f"regex {target.pattern!r} (a full match)" if isinstance(target, re.Pattern) else repr(target)


def _matches(target: str | re.Pattern, name: str) -> bool:
    if isinstance(target, re.Pattern):
        return target.fullmatch(name) is not None
    return name == target or name.endswith("." + target)


def _by_default(lora_cls, module: nn.Module) -> bool:
    replaces_by_default = getattr(lora_cls, "replaces_by_default", None)
    return callable(replaces_by_default) and bool(replaces_by_default(module))


def _attached_token_slots(model: nn.Module) -> list[TokenSlots]:
    found: list[TokenSlots] = []
    for module in lora_layers(model).values():
        slots = getattr(module, "token_slots", None)
        if isinstance(slots, TokenSlots) and all(slots is not seen for seen in found):
            found.append(slots)
    return found


def _default_token_slots(model, modules, max_loras: int, max_tokens: int) -> TokenSlots:
    existing = _attached_token_slots(model)
    if len(existing) > 1:
        raise ValueError(f"the model's LoRA layers already hold {len(existing)} different TokenSlots; "
                         "pass token_slots explicitly")
    if existing:
        return existing[0]
    devices = {tensor.device for module in modules
               for tensor in (*module.parameters(), *module.buffers())}
    if len(devices) > 1:
        raise ValueError(f"the targeted modules live on several devices ({sorted(map(str, devices))}); "
                         "one TokenSlots serves one device: wrap each device's modules with its own")
    device = devices.pop() if devices else torch.device("cpu")
    return TokenSlots(max_tokens, device=device, num_slots=max_loras)


register_lora_layer(GateLinearWithLoRA)
