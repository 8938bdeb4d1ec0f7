"""Every transformers MoE router computed by GateLinear: ``replace_routers(model)``.

transformers' MoE routers (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, ``DeepseekV3TopkRouter``,
``Llama4Router``, ``MiniMaxM2TopKRouter``, … some ninety classes in transformers 5.x) hold a gate
``weight [E, K]`` (some a ``bias [E]``) and compute ``F.linear(hidden, self.weight[, self.bias])``,
then each its own routing: softmax then top-k, top-k then softmax, sigmoid with expert groups and a
score-correction bias, and so on. ``replace_routers`` keeps every router's own forward and swaps only
that one product for moegate's gate:

  gpt-oss      ``GateGptOssRouter`` (moegate/transformers.py), its own explicit forward.
  all others   ``Gate<RouterClass>``, a subclass of the router's class made once per class, holding
               the gate as the child ``linear`` (a GateLinear, or a GateLinearWithLoRA once wrapped).
               Its forward is the router class's forward, run under a torch function mode that
               sends ``F.linear(x, weight, bias)`` of the router's own weight to ``linear`` and
               passes every other op through unchanged. Any other use of the weight raises, so a
               router is never silently computed without its gate (or its adapter).

So the routing arithmetic stays transformers' own, bit for bit: on the CPU (``F.linear`` backend) a
patched model's outputs are bit-identical to the unpatched model's (tests/test_routers_*.py).

Routers that compute in float32 from a lower-precision weight (``F.linear(x.float(),
self.weight.float())``: the DeepSeek family, GLM-4-MoE, ...) get their weight stored in float32 (an
exact conversion, the same Parameter object): the gate then computes what the router computed.
State dicts keep transformers' keys (``…gate.weight``), as for gpt-oss. The router stays an
instance of its class, so transformers' output recording (``router_logits``) and weight
initialisation still find it. Routers that hold an ``nn.Linear`` child instead of a weight (AFMoE,
DBRX, Switch, NLLB-MoE, ...) are not routers here: wrap that child with ``lora.replace_modules``.
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gate.layer import GateLinear
from moegate.router_gate import HoldsGate, install, put_back, share_module_state, wrap_gates_with_lora

_PUBLIC_PARAMETERS = ("weight", "bias")
# Router classes: defined by transformers, named ...Router (TopKRouter, TopkRouter, Router) and
# holding their gate as a direct 2-D parameter ``weight``.
_ROUTER_NAME = re.compile(r"Router$")
# A forward that casts the router weight to float32 before the product.
_FLOAT32_WEIGHT = re.compile(r"self\.weight\.(float\(\)|type\(torch\.float32\)|to\(torch\.float32\))")
_LINEAR = {F.linear, torch._C._nn.linear}

_gate_classes: dict[type, type] = {}


class _GateRouterMixin:
    """The part of ``Gate<RouterClass>`` that is not the router class: the gate and its forward."""

    # HoldsGate's properties, not HoldsGate as a base: the router class stays second in the MRO.
    weight = HoldsGate.weight
    bias = HoldsGate.bias

    def forward(self, *args, **kwargs):
        with _GateLinearMode(self):
            return self._router_class.forward(self, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # A router that computes in float32 from its weight keeps its gate in float32 through
        # .to(dtype) / .half(): the base values rounded as the router's own weight would be, computed
        # in float32 as its forward does (exact), and the dtype its weight would have, for
        # restore_router. A LoRA layer's slots only move: they hold float32 adapters, which a
        # round trip through the new dtype would round (or refuse).
        if self._weight_dtype is None:
            return super()._apply(fn, recurse)
        linear = self._modules.pop("linear")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._modules["linear"] = linear
        converted = fn(torch.empty(0, dtype=self._weight_dtype))
        linear.to(converted.device)
        with torch.no_grad():
            for parameter in (self.weight, self.bias):
                if parameter is not None:
                    parameter.data = fn(parameter.data).to(torch.float32)
        self._weight_dtype = converted.dtype
        return result

    def __reduce_ex__(self, protocol):
        # Gate<RouterClass> is made at run time (gate_router_class): pickled by its router class,
        # so that torch.save / pickle of a patched model loads in a fresh process too.
        return _new_gate_router, (self._router_class,), self.__getstate__()

    def gate_parameter_keys(self) -> dict[str, str]:
        """``{"weight": key[, "bias": key]}``: where the gate's parameters sit under ``linear.``."""
        owner = {id(p): name for name, p in self.linear.named_parameters(remove_duplicate=False)}
        return {public: "linear." + owner[id(getattr(self, public))] for public in _PUBLIC_PARAMETERS
                if getattr(self, public) is not None}


class _GateLinearMode(TorchFunctionMode):
    """Sends the router's ``F.linear(x, weight, bias)`` to its gate; refuses any other use of the
    weight. (A mode handler runs with the mode off, so the gate's own ops are not seen here.)"""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.weight = router.linear.weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        weight = self.weight
        if func in _LINEAR and len(args) >= 2 and args[1] is weight:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is not self.router.linear.bias:
                raise RuntimeError(f"{type(self.router).__name__}.forward calls F.linear with a bias other "
                                   "than its own: moegate's gate cannot compute it")
            return self.router.linear(args[0])
        uses_weight = any(a is weight for a in args) or any(v is weight for v in kwargs.values())
        result = func(*args, **kwargs)
        # The weight may be inspected (shape, dtype, a cast to the dtype it has), not computed with:
        # a tensor derived from it (a transpose, a real cast, .data) would bypass the gate.
        if not uses_weight or result is weight or not _holds_tensor(result):
            return result
        raise RuntimeError(f"{type(self.router).__name__}.forward uses its weight through "
                           f"{getattr(func, '__qualname__', func)}, not F.linear(x, weight): moegate's "
                           "gate would not compute it (restore_routers gives the original router back)")


def _holds_tensor(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(item) for item in value)
    return isinstance(value, torch.Tensor)


def gate_router_class(router_class: type) -> type:
    """``Gate<RouterClass>``: the router class with its product computed by the child ``linear``."""
    if router_class not in _gate_classes:
        _gate_classes[router_class] = type(f"Gate{router_class.__name__}", (_GateRouterMixin, router_class),
                                           {"_router_class": router_class, "__module__": __name__})
    return _gate_classes[router_class]


def _new_gate_router(router_class: type) -> nn.Module:
    """An empty ``Gate<router_class>``, for pickle to fill with its state."""
    cls = gate_router_class(router_class)
    return cls.__new__(cls)


def is_router(module: nn.Module) -> bool:
    """A transformers MoE router this module can serve (see the module docstring)."""
    cls = type(module)
    weight = module._parameters.get("weight")
    return (cls.__module__.startswith("transformers.models.") and _ROUTER_NAME.search(cls.__name__)
            is not None and not isinstance(module, _GateRouterMixin) and isinstance(weight, nn.Parameter)
            and weight.dim() == 2)


def _computes_in_float32(router_class: type) -> bool:
    try:
        return _FLOAT32_WEIGHT.search(inspect.getsource(router_class.forward)) is not None
    except (OSError, TypeError):
        return False


def make_gate_router(router: nn.Module, *, pdl: bool = False) -> nn.Module:
    """The ``Gate<RouterClass>`` of ``router``: its state (attributes, buffers, children) shared, its
    ``weight`` / ``bias`` moved into a GateLinear ``linear`` (the same Parameter objects)."""
    weight, bias = router._parameters["weight"], router._parameters.get("bias")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{type(router).__name__}.bias has shape {tuple(bias.shape)}, not "
                         f"({weight.shape[0]},): not a router gate")
    weight_dtype = weight.dtype if _computes_in_float32(type(router)) else None
    if weight_dtype is not None and weight_dtype != torch.float32:
        with torch.no_grad():  # exact: the forward computes with weight.float() anyway
            weight.data = weight.data.float()
            if bias is not None:
                bias.data = bias.data.float()
    cls = gate_router_class(type(router))
    gate = cls.__new__(cls)
    nn.Module.__init__(gate)
    gate._weight_dtype = weight_dtype  # the router's own weight dtype, where the gate keeps float32
    state = {key: value for key, value in router.__dict__.items() if not key.startswith("_")}
    gate.__dict__.update(state)
    gate._buffers.update(router._buffers)
    gate._modules.update(router._modules)
    gate._parameters.update({k: p for k, p in router._parameters.items() if k not in _PUBLIC_PARAMETERS})
    share_module_state(router, gate)  # the user's forward hooks keep firing, their handles work
    gate.linear = GateLinear.from_parameters(weight, bias, pdl=pdl)
    from moegate.transformers import _load_from_transformers_layout, _save_in_transformers_layout

    gate.register_state_dict_post_hook(_save_in_transformers_layout)
    gate.register_load_state_dict_pre_hook(_load_from_transformers_layout)
    return gate


def restore_router(gate: nn.Module) -> nn.Module:
    """The original router class holding the gate's base parameters (adapters are dropped)."""
    cls = gate._router_class
    router = cls.__new__(cls)
    nn.Module.__init__(router)
    router.__dict__.update({k: v for k, v in gate.__dict__.items() if not k.startswith("_")})
    router._buffers.update(gate._buffers)
    router._modules.update({k: m for k, m in gate._modules.items() if k != "linear"})
    router._parameters.update(gate._parameters)
    share_module_state(gate, router)
    router.weight = gate.weight
    if gate.bias is not None:
        router.bias = gate.bias
    if gate._weight_dtype is not None:  # the dtype the router's weight had (or was converted to)
        with torch.no_grad():
            for parameter in router.parameters(recurse=False):  # weight, and bias where it has one
                if parameter is gate.weight or parameter is gate.bias:
                    parameter.data = parameter.data.to(gate._weight_dtype)
    return router


def replace_routers(model: nn.Module, *, out_dtype: torch.dtype | None = None, pdl: bool = False,
                    max_loras: int = 0, max_rank: int = 0, token_slots=None) -> list[str]:
    """Replaces every transformers MoE router of ``model`` in place (see the module docstring).

    Args as ``replace_gpt_oss_routers``: ``max_loras > 0`` also wraps every gate with
    ``lora.GateLinearWithLoRA`` (``max_loras`` slots of rank up to ``max_rank``), sharing
    ``token_slots``. ``out_dtype`` applies to gpt-oss routers only: every other router's own
    routing code receives the dtype of its own product (Llama-4's multiplies the hidden states by
    scores in the logits' dtype, and its experts then fail), so a model holding one refuses it.
    Returns the qualified names of the replaced routers. Routers already replaced are left alone; a
    model with no router raises ValueError naming what was looked for. A refusal changes nothing.
    """
    from moegate.transformers import GateGptOssRouter, GptOssTopKRouter, replace_gpt_oss_routers

    modules = list(model.named_modules())
    gpt_oss = any(isinstance(m, GptOssTopKRouter) for _, m in modules)
    found = [(name, m) for name, m in modules if is_router(m) and not isinstance(m, GptOssTopKRouter)]
    already = [name for name, m in modules if isinstance(m, (_GateRouterMixin, GateGptOssRouter))]
    if not found and not gpt_oss and not already:
        raise ValueError(f"{type(model).__name__} holds no transformers MoE router (a transformers "
                         "class named …Router with a 2-D weight); for nn.Linear gates use "
                         "lora.replace_modules(model, ..., target=[...])")
    from moegate.transformers import _check_replaceable

    for name, router in found:
        _check_replaceable(model, name, router)
    if out_dtype is not None and found:
        raise ValueError(f"out_dtype applies to gpt-oss routers only; {found[0][0]} "
                         f"({type(found[0][1]).__name__}) computes its routing from its own product's "
                         "dtype: leave out_dtype None for this model")
    replaced = []
    originals = [(name, m) for name, m in modules if isinstance(m, GptOssTopKRouter)
                 and not isinstance(m, GateGptOssRouter)] + found
    # make_gate_router may store a router's weight in float32 (the same Parameter objects).
    dtypes = [(p, p.dtype) for _, router in found for p in router._parameters.values() if p is not None]
    try:
        if gpt_oss:
            replaced += replace_gpt_oss_routers(model, out_dtype=out_dtype, pdl=pdl)
        gates = [(name, router, make_gate_router(router, pdl=pdl)) for name, router in found]
        for name, router, gate in gates:
            install(model, router, gate)
            replaced.append(name)
        if max_loras > 0:
            wrap_gates_with_lora(model, (_GateRouterMixin, GateGptOssRouter), max_loras, max_rank,
                                 token_slots)
    except BaseException:  # refused part way (LoRA options): the model as it was
        put_back(model, originals)
        with torch.no_grad():
            for parameter, dtype in dtypes:
                parameter.data = parameter.data.to(dtype)
        raise
    return sorted(replaced, key=[name for name, _ in modules].index)


def restore_routers(model: nn.Module) -> list[str]:
    """Puts the original routers back (the inverse of ``replace_routers``); returns their names."""
    from moegate.transformers import restore_gpt_oss_routers

    restored = restore_gpt_oss_routers(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, _GateRouterMixin):
            install(model, module, restore_router(module))
            restored.append(name)
    return restored
