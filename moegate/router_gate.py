"""What every router moegate installs shares (``GateGptOssRouter`` and the ``Gate<RouterClass>``
classes of ``replace_routers``): its gate is the child ``linear`` (a GateLinear, or a LoRA layer
wrapping one), and its ``weight`` / ``bias`` read through to the gate's base parameters."""

from __future__ import annotations

from torch import nn

from gate.layer import GateLinear
from lora.registry import replace_modules


class HoldsGate:
    """The router's ``weight`` and ``bias`` as the replaced router had them: the gate's base
    parameters (without LoRA), shared, not copied. (GateLinearWithLoRA reads through to its
    ``base_layer`` the same way: a mirror of the nn.Linear interface, not shared code.)"""

    @property
    def weight(self) -> nn.Parameter:
        """The base gate weight ``[E, K]``."""
        return self.linear.weight

    @property
    def bias(self) -> nn.Parameter | None:
        """The base gate bias ``[E]`` (None without one)."""
        return self.linear.bias


def wrap_gates_with_lora(model: nn.Module, router_classes: tuple[type, ...], max_loras: int, max_rank: int,
                         token_slots) -> None:
    """Wraps the gate of every router of ``router_classes`` in ``model`` with a LoRA layer
    (``lora.replace_modules``, sharing ``token_slots``). Gates a LoRA layer already wraps keep it."""
    plain = [name for name, module in model.named_modules()
             if isinstance(module, router_classes) and isinstance(module.linear, GateLinear)]
    if plain:
        replace_modules(model, max_loras, max_rank, target=[f"{name}.linear" for name in plain],
                        token_slots=token_slots)


def install(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Puts ``new`` wherever ``model`` holds ``old``: a router shared by two parents (tied layers)
    is replaced at both, so neither path computes without the gate."""
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children() if child is old]
    for parent, name in places:
        setattr(parent, name, new)


def put_back(model: nn.Module, originals: list[tuple[str, nn.Module]]) -> None:
    """Puts each module of ``originals`` back where its qualified name now holds a replacement: a
    replacement that failed part way (wrapping the new gates for LoRA) leaves the model as it was."""
    for name, module in originals:
        current = model.get_submodule(name)
        if current is not module:
            install(model, current, module)


# nn.Module's forward hook tables: shared (the same dicts) between a router and its replacement.
_FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                       "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def share_module_state(old: nn.Module, new: nn.Module) -> None:
    """What a router and its replacement (either way) share beyond parameters: the train / eval mode
    of the module itself, and its forward hooks (the same tables, so the user's handles still
    remove them)."""
    new.training = old.training
    for hooks in _FORWARD_HOOK_DICTS:
        setattr(new, hooks, getattr(old, hooks))
