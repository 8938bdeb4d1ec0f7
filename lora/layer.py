"""GateLinearWithLoRA: a GateLinear serving many router LoRA adapters at once (the slot model)."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from gate import ops
from gate.layer import GateLinear
from lora.casts import FACTOR_DTYPES, cast_factor, cast_problem, scaled_b_problem, scaling_problem
from lora.slots import TokenSlots, _as_int


# The adapter arguments (lora_b, scaling, slot_ids, pdl, backend) are gate.ops.lora_expand's, in
# its order, deliberately: one meaning per name.
def add_lora_delta(
    logits: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    slot_ids: torch.Tensor,
    pdl: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Adds each token's adapter delta to the base logits; tokens without an adapter are untouched.

    Semantics: out[m] = logits[m] + scaling[s] * B_s @ (A_s @ x[m])   where s = slot_ids[m] in [0, S)
               out[m] = logits[m]  (bit for bit)                      for any other slot id
    The delta is computed in fp32 (at least) and added to the logits once, then rounded once to the
    logits' dtype: PEFT's arithmetic with its default fp32 adapter weights.

    logits: [M, E]; x: [M, K]; lora_a: [S, R, K], lora_b: [S, E, R] (x's dtype); scaling: [S] fp32;
    slot_ids: [M] int64. Returns [M, E] in logits' dtype. Batched ops only, no host sync.

    pdl: launch the shrink as a programmatic dependent of the kernel before it, as GateLinear's
    ``pdl``: its launch and its loads of A overlap that kernel's tail, and x is read only after that
    kernel completes, so it must not write lora_a or lora_b. The expand always starts behind the
    shrink (``gate.ops.EXPAND_PDL``): it reads logits, xa and slot_ids only after the shrink
    completes, and the shrink, which waited for the kernels before it, writes no adapter.
    """
    num_slots, rank, in_features = lora_a.shape
    # Shrink for every slot at once, through the same ops path as the base gate (our kernel on the GPU).
    xa = ops.lora_shrink(x, lora_a.view(num_slots * rank, in_features), pdl=pdl, backend=backend)
    # Expand: each token's slot of xa through its B, scaled, added once (one kernel on the GPU).
    return ops.lora_expand(logits, xa, lora_b, scaling, slot_ids, pdl=ops.EXPAND_PDL, backend=backend)


class GateLinearWithLoRA(nn.Module):
    """A GateLinear (wrapped, not copied) plus ``max_loras`` adapter slots of rank up to ``max_rank``.

    forward(x [..., K]) -> [..., E]: the base gate's fast path, plus for each token mapped to slot s
    ``scaling[s] * (x A_s^T) B_s^T`` (``add_lora_delta``). The token -> slot mapping comes from the
    attached ``TokenSlots``, shared by all wrapped layers of a model; a forward with none attached
    raises. The output dtype is the base layer's (``base_layer.out_dtype``, default x's dtype), and
    so is the PDL setting (``base_layer.pdl``) of its first kernel; the expand always starts behind
    that kernel (``gate.ops.EXPAND_PDL``).

    Slots are buffers written in place, so compiled code and captured CUDA graphs see new slot
    contents and a new mapping without recompiling or recapturing:
        lora_a_stacked [S, R, K] and lora_b_stacked [S, E, R] in the base weight's dtype, ranks
        below R zero-padded; scaling [S] fp32 (it stays fp32 through ``.to(dtype)``/``.half()``).
    They are non-persistent (not in ``state_dict``): adapters are loaded into slots, not checkpoints.
    The slots are not Parameters (adapters are served, not trained here), but the forward is
    differentiable on every backend: gradients reach x and the base gate as they would through
    PEFT's arithmetic (ops.lora_expand's PyTorch path, bit for bit on the same device).

    Merge mode, for serving one adapter at the base kernel's exact cost: ``merge(slot)`` folds the
    slot into the base weight and the forward becomes the base forward alone, serving that adapter to
    every token whatever the mapping (the mapping is not read). ``unmerge()`` restores the original
    weight bit for bit, in place. merge/unmerge change the computation: recompile and recapture.
    """

    def __init__(self, base_layer: GateLinear, max_loras: int, max_rank: int,
                 token_slots: TokenSlots | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, GateLinear):
            raise TypeError(f"base_layer must be a GateLinear, got {type(base_layer).__name__}; "
                            f"use GateLinearWithLoRA.from_module for an nn.Linear")
        if not base_layer.weight.is_floating_point():
            raise TypeError(f"the base weight must be floating point, got {base_layer.weight.dtype}")
        self.base_layer = base_layer
        self.merged_slot: int | None = None
        # The pre-merge weight, kept (not recomputed by subtraction) so unmerge is bit-exact.
        self.register_buffer("_original_weight", None, persistent=False)
        self.token_slots: TokenSlots | None = None
        self.create_lora_weights(max_loras, max_rank)
        if token_slots is not None:
            self.set_token_slots(token_slots)

    # -- construction and the registry protocol --------------------------------------------------

    @classmethod
    def can_replace(cls, module: nn.Module) -> bool:
        """GateLinear (and subclasses), or a plain nn.Linear gate (Mixtral / Qwen-MoE style).

        Only exactly ``nn.Linear``: its subclasses are often quantised layers whose weight is not a
        plain [E, K] matrix.
        """
        if isinstance(module, GateLinear):
            return True
        return type(module) is nn.Linear and module.weight.is_floating_point()

    @classmethod
    def replaces_by_default(cls, module: nn.Module) -> bool:
        """What ``replace_modules(target=None)`` wraps: GateLinears only, since any projection of a
        model is an nn.Linear; nn.Linear gates need an explicit target."""
        return isinstance(module, GateLinear)

    @classmethod
    def from_module(cls, module: nn.Module, max_loras: int, max_rank: int,
                    token_slots: TokenSlots | None = None) -> GateLinearWithLoRA:
        """Wraps a GateLinear as is, or an nn.Linear through ``GateLinear.from_linear`` (which shares
        its parameters, no copy)."""
        if isinstance(module, GateLinear):
            base = module
        elif cls.can_replace(module):
            base = GateLinear.from_linear(module)
        else:
            raise TypeError(f"{cls.__name__} cannot wrap a {type(module).__name__}")
        return cls(base, max_loras, max_rank, token_slots)

    def create_lora_weights(self, max_loras: int, max_rank: int) -> None:
        """(Re)allocates empty slots on the base weight's device and dtype.

        Allocation happens here only; graphs captured before a re-allocation must be captured again.
        """
        max_loras = _as_int(max_loras, "max_loras")
        max_rank = _as_int(max_rank, "max_rank")
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        if self.merged_slot is not None:
            raise RuntimeError("cannot re-create the slots while an adapter is merged; unmerge() first")
        if self.token_slots is not None:  # before anything is replaced: a refusal changes nothing
            self.token_slots.check_limit(max_loras)
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.register_buffer("lora_a_stacked", torch.zeros(max_loras, max_rank, self.in_features,
                                                           **factory), persistent=False)
        self.register_buffer("lora_b_stacked", torch.zeros(max_loras, self.num_experts, max_rank,
                                                           **factory), persistent=False)
        self.register_buffer("scaling", torch.zeros(max_loras, dtype=torch.float32, device=weight.device),
                             persistent=False)
        self._slot_ranks = [0] * max_loras
        self._make_slot_views()
        if self.token_slots is not None:
            self.token_slots.limit_slots(max_loras)

    def _make_slot_views(self) -> None:
        # Every slot's A as one [S*R, K] matrix (the shrink's operand, a view made once, not per
        # forward), and for the PyTorch backend's one-slot forward, every slot's B scaled (B^T
        # [S, R, E] in the compute dtype, as ops.lora_expand_torch scales it), a slot's rewritten
        # when it is written.
        compute = torch.promote_types(self.lora_b_stacked.dtype, torch.float32)
        self._scaled_b = torch.empty(self.lora_b_stacked.shape, dtype=compute,
                                     device=self.lora_b_stacked.device)
        self._lora_a_flat = self.lora_a_stacked.view(-1, self.in_features)
        self._scaled_b_t = self._scaled_b.transpose(1, 2)
        for slot in range(self.max_loras):
            self._scale_b(slot)

    def _scale_b(self, slot: int) -> None:
        with torch.no_grad():
            self._scaled_b[slot] = self.lora_b_stacked[slot].to(self._scaled_b.dtype) * self.scaling[slot]

    def set_token_slots(self, token_slots: TokenSlots | None) -> None:
        """Attaches the shared token -> slot mapping (None detaches it)."""
        if token_slots is not None:
            if not isinstance(token_slots, TokenSlots):
                raise TypeError(f"token_slots must be a TokenSlots, got {type(token_slots).__name__}")
            if token_slots.device != self.weight.device:
                raise ValueError(f"token_slots is on {token_slots.device} but the gate's weight is on "
                                 f"{self.weight.device}")
            token_slots.limit_slots(self.max_loras)
        self.token_slots = token_slots

    # -- slot contents ---------------------------------------------------------------------------

    def set_lora(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Loads one adapter into ``slot``, in place: lora_a [r, K], lora_b [E, r], 1 <= r <= max_rank.

        lora_a/lora_b may be float32 (PEFT's), bfloat16, float16 or float64 and are cast to the
        slots' (``lora_a_stacked.dtype``), refused when the cast overflows or loses a whole factor
        (``lora.casts``), or when scaling * lora_b overflows float32 (the PyTorch path computes
        with B scaled); they must be on the slots' device. Everything is checked before anything
        is written, so on error the slot keeps its previous adapter.
        """
        slot = self._check_slot(slot)
        if slot == self.merged_slot:
            raise RuntimeError(f"slot {slot} is merged into the base weight; unmerge() before changing it")
        rank = self._check_adapter(lora_a, lora_b)
        scale = _check_scaling(scaling)
        lora_a = cast_factor("lora_a", lora_a, self.lora_a_stacked.dtype)
        lora_b = cast_factor("lora_b", lora_b, self.lora_b_stacked.dtype)
        problem = scaled_b_problem("set_lora", lora_b, scale)
        if problem is not None:
            raise ValueError(problem)
        with torch.no_grad():
            slot_a = self.lora_a_stacked[slot]
            slot_a[:rank].copy_(lora_a)
            slot_a[rank:].zero_()
            slot_b = self.lora_b_stacked[slot]
            slot_b[:, :rank].copy_(lora_b)
            slot_b[:, rank:].zero_()
            # Scaling last: with the base gate's pdl on, the next forward's kernels may read A and B
            # before the kernel just ahead of them completes (PDL weights), scaling only after it.
            self.scaling[slot].fill_(scale)
        self._slot_ranks[slot] = rank
        self._scale_b(slot)

    def reset_lora(self, slot: int) -> None:
        """Empties ``slot`` (zero A, B and scaling) in place."""
        slot = self._check_slot(slot)
        if slot == self.merged_slot:
            raise RuntimeError(f"slot {slot} is merged into the base weight; unmerge() before changing it")
        with torch.no_grad():
            self.lora_a_stacked[slot].zero_()
            self.lora_b_stacked[slot].zero_()
            self.scaling[slot].zero_()
        self._slot_ranks[slot] = 0
        self._scale_b(slot)

    @property
    def slot_ranks(self) -> tuple[int, ...]:
        """The rank loaded in each slot, 0 for an empty slot."""
        return tuple(self._slot_ranks)

    # -- merge mode ------------------------------------------------------------------------------

    def merge(self, slot: int) -> None:
        """Folds ``slot`` into the base weight: W' = W + scaling * B @ A, in fp32, rounded once.

        Refused (nothing changes) when the slot is empty, another adapter is merged, or W' would
        not be finite in the weight's dtype. The weight is rewritten in place (same Parameter, same
        storage), so graphs captured on the base layer alone stay valid.
        """
        slot = self._check_slot(slot)
        if self.merged_slot is not None:
            raise RuntimeError(f"slot {self.merged_slot} is already merged; unmerge() first")
        rank = self._slot_ranks[slot]
        if rank == 0:
            raise ValueError(f"slot {slot} is empty; set_lora() it before merging")
        weight = self.base_layer.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        with torch.no_grad():
            lora_a = self.lora_a_stacked[slot, :rank].to(compute)
            lora_b = self.lora_b_stacked[slot, :, :rank].to(compute)
            # B scaled first, as the PyTorch forward scales it (set_lora made sure that fits)
            merged = weight.to(compute) + (self.scaling[slot].to(compute) * lora_b) @ lora_a
            merged = merged.to(weight.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise ValueError(f"merging slot {slot} would give non-finite {weight.dtype} weights; refused")
            self._original_weight = weight.detach().clone()
            weight.copy_(merged)
        self.merged_slot = slot

    def unmerge(self) -> None:
        """Restores the weight saved by ``merge`` bit for bit, in place. A no-op when not merged."""
        if self.merged_slot is None:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._original_weight)
        self._original_weight = None
        self.merged_slot = None

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base layer, its parameters and the slots through the modules' own dicts: nn.Module's
        # attribute lookup of each costs more than the whole per-call check.
        base = self._modules["base_layer"]
        if self.merged_slot is not None:
            return base(x)
        token_slots = self.token_slots
        if token_slots is None:
            raise RuntimeError("GateLinearWithLoRA has no TokenSlots attached: call set_token_slots(), "
                               "or wrap the model with lora.replace_modules()")
        # The slots and the mapping were checked when written and attached (same device as the
        # weight, moved with the layer): per call only x is checked, once.
        parameters = base._parameters
        weight, bias = parameters["weight"], parameters.get("bias")
        ops.check_input(x, weight)
        flat = x.dim() == 2
        x_flat = x if flat else x.reshape(-1, base.in_features)
        slot_ids = token_slots.for_tokens(x_flat.shape[0])
        backend = base._backend
        # The PyTorch backend's shortcut, eager only: compiled code must not depend on the mapping
        # (reading it would guard on it, and recompile for every slot a uniform batch uses).
        slot = (token_slots.uniform_slot if backend == "torch" and not torch.compiler.is_compiling()
                else None)
        if slot is not None:
            # Every token uses one slot (the host saw the mapping): the shrink of every slot, then
            # that slot's expand alone, with lora_expand_torch's ops and operand layouts, so its
            # bits with a third of its ops.
            out = ops.router_gemm_torch(x_flat, weight, bias, base.out_dtype)
            if 0 <= slot < self.max_loras:  # else -1 (or an unchecked id): the base bits
                scaled_b_t = self._scaled_b_t
                xa = ops.router_gemm_torch(x_flat, self._lora_a_flat, None, scaled_b_t.dtype)
                out = ops.lora_expand_one_slot_torch(out, xa, slot, scaled_b_t)
        else:
            # One op: on our kernels it picks one launch or the two (shrink with the base gate, then
            # the expand) per call, whichever was measured faster for the shape; the same bits.
            buffers = self._buffers
            out = ops.router_gemm_lora_unchecked(
                x_flat, weight, bias, self._lora_a_flat, buffers["lora_b_stacked"], buffers["scaling"],
                slot_ids, base.out_dtype, base.pdl, backend)
        return out if flat else out.view(*x.shape[:-1], base.num_experts)

    def _base_and_shrink(self, base, x_flat, weight, bias, backend):
        """The base gate's logits and every slot's shrink x A^T in one op: one launch where our
        Hopper kernels serve the base gate, with the base gate's logits bit for bit."""
        return ops.router_gemm_with_shrink_unchecked(x_flat, weight, bias, self._lora_a_flat,
                                                     base.out_dtype, base.pdl, backend)

    # The routing options mirror gate.ops.route_logits's (names, order, defaults), deliberately.
    def route(
        self,
        x: torch.Tensor,
        top_k: int,
        scoring: str = "softmax_topk",
        renormalize: bool = False,
        weights_dtype: torch.dtype | None = None,
        ids_dtype: torch.dtype = torch.int64,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routing of the adapted logits: ``(weights [..., top_k], ids [..., top_k],
        logits [..., E])``, where the logits are this layer's forward bit for bit and the rest is
        ``gate.ops.route_logits`` on them. On our GPU kernels the expand routes its own output
        (``gate.ops.lora_expand_route``): the layer's two launches, no third."""
        base = self._modules["base_layer"]
        if self.merged_slot is None and self.token_slots is not None and base.backend == "moegate":
            parameters = base._parameters
            weight, bias = parameters["weight"], parameters.get("bias")
            ops.check_input(x, weight)
            x_flat = x if x.dim() == 2 else x.reshape(-1, base.in_features)
            buffers = self._buffers
            logits, xa = self._base_and_shrink(base, x_flat, weight, bias, "moegate")
            out, weights, ids = ops.lora_expand_route(
                logits, xa, buffers["lora_b_stacked"], buffers["scaling"],
                self.token_slots.for_tokens(x_flat.shape[0]), top_k, scoring, renormalize,
                weights_dtype, ids_dtype, pdl=ops.EXPAND_PDL, backend="moegate")
            leading = x.shape[:-1]
            return (weights.view(*leading, top_k), ids.view(*leading, top_k),
                    out.view(*leading, base.num_experts))
        logits = self(x)
        flat = logits.reshape(-1, self.base_layer.num_experts)
        weights, ids = ops.route_logits(flat, top_k, scoring, renormalize, weights_dtype, ids_dtype,
                                        pdl=self.base_layer.pdl, backend=self.base_layer.backend)
        leading = logits.shape[:-1]
        return weights.view(*leading, top_k), ids.view(*leading, top_k), logits

    # -- delegation to the base layer ------------------------------------------------------------

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) must not round the fp32 scaling: it follows the device only. The
        # shared TokenSlots follows the layer's device too (it moves once; the others see it moved).
        # Loaded slots take set_lora's cast rules: a conversion that would turn an adapter into inf
        # or zeros is refused before anything is converted.
        for name in ("lora_a_stacked", "lora_b_stacked"):
            slots = self._buffers[name]
            if fn(slots.new_empty(0)).dtype == slots.dtype:  # a move: nothing to check, nothing copied
                continue
            converted = fn(slots)
            for slot, rank in enumerate(self._slot_ranks):  # each adapter on its own: one that
                # would round to zeros is lost even where another slot keeps values
                problem = rank and cast_problem(f"{name}[{slot}] (a loaded adapter)", slots[slot],
                                                converted[slot])
                if problem:
                    raise ValueError(f"converting this layer would change its adapters: {problem}")
        scaling = self._buffers.pop("scaling")
        try:
            result = super()._apply(fn, recurse)
        finally:
            self._buffers["scaling"] = scaling
        device = self.base_layer.weight.device
        if scaling.is_meta and device.type != "meta":
            # Materialised from the meta device (to_empty): nothing was ever loaded there, and the
            # slots hold whatever memory they got. Empty slots, as a new layer has them.
            self._buffers["lora_a_stacked"].zero_()
            self._buffers["lora_b_stacked"].zero_()
            self._buffers["scaling"] = torch.zeros(scaling.shape, dtype=scaling.dtype, device=device)
            self._slot_ranks = [0] * self.max_loras
        else:
            self._buffers["scaling"] = scaling.to(device)
        self._make_slot_views()
        if self.token_slots is not None:
            self.token_slots.to(device)
        return result

    def extra_repr(self) -> str:
        return f"max_loras={self.max_loras}, max_rank={self.max_rank}, merged_slot={self.merged_slot}"

    # -- validation (host side, never per forward) -----------------------------------------------

    def _check_slot(self, slot) -> int:
        slot = _as_int(slot, "slot")
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"slot {slot} is out of range: this layer has {self.max_loras} slots "
                             f"(0..{self.max_loras - 1})")
        return slot

    def _check_adapter(self, lora_a, lora_b) -> int:
        """Returns the adapter's rank after checking types, shapes, dtype, device and finiteness."""
        for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
            if tensor.dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
            if tensor.dtype not in FACTOR_DTYPES:
                raise TypeError(f"{name} must be a {', '.join(map(str, FACTOR_DTYPES))} tensor, got "
                                f"{tensor.dtype}")
            if tensor.device != self.lora_a_stacked.device:
                slots = self.lora_a_stacked.device
                raise ValueError(f"{name} is on {tensor.device} but the slots are on {slots}; move it "
                                 f"with .to('{slots}')")
        rank = lora_a.shape[0]
        if lora_a.shape[1] != self.in_features:
            raise ValueError(f"lora_a must be [r, K={self.in_features}], got {tuple(lora_a.shape)}")
        if lora_b.shape != (self.num_experts, rank):
            raise ValueError(f"lora_b must be [E={self.num_experts}, r={rank}] to match lora_a "
                             f"{tuple(lora_a.shape)}, got {tuple(lora_b.shape)}")
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"adapter rank {rank} is out of range: this layer holds ranks "
                             f"1..{self.max_rank}")
        for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name} holds non-finite values")
        return rank


def _check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise ValueError(f"scaling must be a number, got a tensor of shape {tuple(scaling.shape)}")
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    try:
        scaling = float(scaling)
    except OverflowError:  # an int past float's range
        raise ValueError("scaling overflows float32, the dtype slots keep scalings in; rescale the "
                         "factors (scaling * B @ A is what counts)") from None
    problem = scaling_problem("scaling", scaling)
    if problem is not None:
        raise ValueError(problem)
    return scaling
