"""gpt-oss routers of Hugging Face transformers, computed by GateLinear (with LoRA when asked).

``replace_gpt_oss_routers(model)`` swaps every ``GptOssTopKRouter`` of a model (``GptOssForCausalLM``,
``GptOssModel``, ...) for a ``GateGptOssRouter`` that returns what the installed transformers returns:

  transformers 5.x (5.17, 5.24): (router_logits [T, E], router_scores [T, k], router_indices [T, k])
  transformers 4.55-4.57:        (router_scores [T, E], router_indices [T, k]), the scores dense:
                                 softmax over the top-k at their experts, 0 elsewhere

The form is detected by running the original router on one token (once per router class), so both
work. On the CPU, top-k and softmax are transformers' own ops on the gate's logits (``F.linear``
there), so the patched model's outputs are bit-identical to the unpatched one, ties between equal
logits included. On a GPU the gate's routing call (``GateLinear.route``) takes the same top-k and
softmax, ties to the lower expert index, in one launch where our decode kernel serves the call.

Layout. The router holds its gate as the child ``linear`` (a GateLinear, or a GateLinearWithLoRA
once ``lora.replace_modules`` wrapped it), which is what LoRA wrapping looks for. ``router.weight`` /
``router.bias`` read through to the gate's parameters, shared with the replaced router (no copy).
State dicts keep transformers' keys: a post-hook renames ``…router.linear[.base_layer].weight`` to
``…router.weight`` (same for bias) and a load pre-hook maps them back, so checkpoints of the
unpatched model load into the patched one and ``save_pretrained`` writes the usual layout.
The class subclasses ``GptOssTopKRouter`` so transformers' output recording (``router_logits``)
and weight initialisation still find it.

Not covered: ``use_kernels=True`` replaces ``GptOssMLP.forward`` with a hub kernel that reads
``router.weight`` directly; it bypasses this module's forward (and any LoRA on it).
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
except ImportError as error:
    raise ImportError(
        "moegate.transformers needs transformers with gpt-oss support (>= 4.55): "
        f"{error}") from error

from gate.layer import GateLinear
from moegate.router_gate import HoldsGate, install, put_back, share_module_state, wrap_gates_with_lora

_PUBLIC_PARAMETERS = ("weight", "bias")


class GateGptOssRouter(HoldsGate, GptOssTopKRouter):
    """A gpt-oss top-k router whose logits come from moegate's gate layer.

    Args:
        linear: the gate, a GateLinear with ``weight [E, K]`` and ``bias [E]`` (or a LoRA layer
            wrapping one); called on hidden states ``[T, K]`` it returns logits ``[T, E]``.
        top_k: experts per token.
        returns_logits: True for the 3-tuple output form, False for the 2-tuple dense-scores form.

    Forward: hidden_states ``[T, K]`` (the 2-tuple form also accepts ``[..., K]`` and flattens it,
    as that transformers version does) -> the tuple described in the module docstring.
    """

    def __init__(self, linear: nn.Module, top_k: int, returns_logits: bool) -> None:
        # GptOssTopKRouter.__init__ would create its own weight and bias; here they live in `linear`.
        nn.Module.__init__(self)
        num_experts, hidden_dim = linear.weight.shape
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.top_k = top_k
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.returns_logits = returns_logits
        self.linear = linear
        self.register_state_dict_post_hook(_save_in_transformers_layout)
        self.register_load_state_dict_pre_hook(_load_from_transformers_layout)

    def forward(self, hidden_states: torch.Tensor):
        if not self.returns_logits:
            hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        if hidden_states.device.type == "cpu":
            # transformers' own top-k and softmax on the gate's logits: torch.topk's choice among
            # equal logits is not always the lower expert index, and the patched model must give
            # the unpatched one's bits (bf16 logits tie often enough to change outputs).
            router_logits = self.linear(hidden_states)
            top_values, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
            top_scores = torch.softmax(top_values, dim=1, dtype=top_values.dtype)
        else:
            # The gate's routing call: our GPU kernels where they serve (one launch at decode
            # sizes), gate.ops.route_logits's semantics (ties to the lower expert index).
            top_scores, router_indices, router_logits = self.linear.route(hidden_states, self.top_k)
        if self.returns_logits:
            return router_logits, top_scores, router_indices
        router_scores = torch.zeros_like(router_logits).scatter_(1, router_indices, top_scores)
        return router_scores, router_indices

    def gate_parameter_keys(self) -> dict[str, str]:
        """``{"weight": key, "bias": key}``: where the gate's parameters sit under ``linear.``.

        ``"weight"`` for a bare GateLinear, ``"base_layer.weight"`` once a LoRA layer wraps it.
        Found by identity, so any wrapper that keeps the base parameters is handled.
        """
        owner = {id(p): name for name, p in self.linear.named_parameters(remove_duplicate=False)}
        keys = {}
        for public in _PUBLIC_PARAMETERS:
            parameter = getattr(self, public)
            if parameter is not None:
                keys[public] = "linear." + owner[id(parameter)]
        return keys

    def extra_repr(self) -> str:
        form = "(logits, scores, indices)" if self.returns_logits else "(dense_scores, indices)"
        return f"top_k={self.top_k}, num_experts={self.num_experts}, returns={form}"


def _save_in_transformers_layout(module: GateGptOssRouter, state_dict, prefix, local_metadata) -> None:
    for public, inner in module.gate_parameter_keys().items():
        if prefix + inner in state_dict:
            state_dict[prefix + public] = state_dict.pop(prefix + inner)


def _load_from_transformers_layout(module: GateGptOssRouter, state_dict, prefix, *unused) -> None:
    for public, inner in module.gate_parameter_keys().items():
        if prefix + public in state_dict:
            state_dict[prefix + inner] = state_dict.pop(prefix + public)


def router_returns_logits(router: GptOssTopKRouter) -> bool:
    """True when this transformers version's router returns (logits, scores, indices).

    Runs the router's own forward on one zero token (bypassing hooks): 3 outputs -> True,
    2 outputs (dense scores, indices) -> False.
    """
    probe = torch.zeros(1, router.hidden_dim, dtype=router.weight.dtype, device=router.weight.device)
    with torch.no_grad():
        outputs = router.forward(probe)
    if not isinstance(outputs, tuple) or len(outputs) not in (2, 3):
        raise TypeError(f"{type(router).__name__}.forward returned {type(outputs).__name__} of "
                        f"length {len(outputs) if isinstance(outputs, tuple) else '?'}; "
                        "expected a 2- or 3-tuple")
    return len(outputs) == 3


def _check_replaceable(model: nn.Module, name: str, router: nn.Module) -> None:
    if hasattr(router, "parametrizations"):
        raise ValueError(f"{name} has parametrized parameters (a PEFT adapter is active on it); "
                         "replace the routers of the base model before wrapping it with PEFT")
    if "forward" in router.__dict__:
        raise ValueError(f"{name}'s forward was replaced on the instance (accelerate's hooks do "
                         "this, e.g. device_map='auto' offloading); its replacement would run that "
                         "forward and bypass moegate's gate: remove the hooks first "
                         "(accelerate.hooks.remove_hook_from_module) or replace the routers before "
                         "dispatching the model")
    parent = model.get_submodule(name.rpartition(".")[0])
    if getattr(parent, "base_layer", None) is router:
        raise ValueError(f"{name} is wrapped by {type(parent).__name__} (PEFT?); replace the routers "
                         "of the base model, or call merge_and_unload() first")


def replace_gpt_oss_routers(
    model: nn.Module,
    *,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
    max_loras: int = 0,
    max_rank: int = 0,
    token_slots=None,
) -> list[str]:
    """Replaces every ``GptOssTopKRouter`` of ``model`` in place by a ``GateGptOssRouter``.

    Args:
        model: any module holding gpt-oss routers (``GptOssForCausalLM``, ``GptOssModel``, ...).
        out_dtype: dtype of the gate's logits; None (default) keeps the model's dtype, as transformers.
        pdl: launch the CUDA kernel with programmatic dependent launch (see ``GateLinear``).
        max_loras, max_rank: when ``max_loras > 0``, also wrap every new gate with
            ``lora.GateLinearWithLoRA`` (``max_loras`` adapter slots of rank up to ``max_rank``)
            through ``lora.replace_modules``, sharing ``token_slots`` (one is made if None).

    Returns the qualified names of the replaced routers (``model.layers.N.mlp.router``). Routers
    already replaced are left alone; a model without gpt-oss routers raises ValueError.
    """
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, GptOssTopKRouter) and not isinstance(module, GateGptOssRouter)]
    already = [name for name, module in model.named_modules() if isinstance(module, GateGptOssRouter)]
    if not found and not already:
        raise ValueError(f"{type(model).__name__} holds no GptOssTopKRouter to replace")
    for name, router in found:
        _check_replaceable(model, name, router)
    returns_logits: dict[type, bool] = {}  # probed once per router class
    replaced = []
    for name, router in found:
        if type(router) not in returns_logits:
            returns_logits[type(router)] = router_returns_logits(router)
        linear = GateLinear.from_parameters(router.weight, router.bias, out_dtype=out_dtype, pdl=pdl)
        gate = GateGptOssRouter(linear, router.top_k, returns_logits[type(router)])
        share_module_state(router, gate)
        install(model, router, gate)
        replaced.append(name)
    if max_loras > 0:
        try:
            wrap_gates_with_lora(model, (GateGptOssRouter,), max_loras, max_rank, token_slots)
        except BaseException:
            put_back(model, found)  # refused LoRA options: the model as it was
            raise
    return replaced


def restore_gpt_oss_routers(model: nn.Module) -> list[str]:
    """Puts plain ``GptOssTopKRouter`` modules back, holding the gates' base parameters.

    The inverse of ``replace_gpt_oss_routers`` (any LoRA layer is dropped; unmerge adapters first
    if merged weights are not wanted). Returns the names of the restored routers.
    """
    restored = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, GateGptOssRouter):
            continue
        router = GptOssTopKRouter.__new__(GptOssTopKRouter)
        nn.Module.__init__(router)
        router.top_k = module.top_k
        router.num_experts = module.num_experts
        router.hidden_dim = module.hidden_dim
        router.weight = module.weight
        router.bias = module.bias
        share_module_state(module, router)
        install(model, module, router)
        restored.append(name)
    return restored
