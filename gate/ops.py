"""The ops layer: the one place between moegate's modules and its kernels.

Modules call the functions here and never touch ``torch.ops.moegate`` themselves. This file owns
contiguity, allocation, the fake (meta) implementations that let ``torch.compile`` and CUDA-graph
capture trace the custom ops, and the PyTorch paths used where the extension cannot run.

Backends, in the order a router layer prefers them:
  ``"moegate"``  our CUDA kernels (``torch.ops.moegate.router_gemm``), CUDA device of a built arch;
  ``"cublas"``   ``torch.addmm`` / ``torch.mm`` on a CUDA device without a usable extension;
  ``"torch"``    ``F.linear`` everywhere else (CPU).

Every public op checks its arguments. Layers, which check their parameters when built or changed,
call the ``*_unchecked`` twins with the backend they decided: per call they check only x, once,
with ``check_input`` (its shape, dtype and device are all that can change between calls).
The kernels' tuning entry points (one kernel alone, with its tiles) are in ``gate.tuning``.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

try:
    # importing registers torch.ops.moegate.*; by its full name, since `from gate import _C` while
    # gate is still importing reports a circular import instead of what went wrong
    _C = importlib.import_module("gate._C")

    _EXTENSION_ERROR: str | None = None
except ImportError as error:  # the pure-Python install: every op still works through PyTorch
    _C = None
    _EXTENSION_ERROR = f"{type(error).__name__}: {error}"

BACKENDS = ("moegate", "cublas", "torch")

# dtypes the extension's kernels accept for x and weight (bf16 is the fast path).
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def extension_available() -> bool:
    """True when the CUDA extension ``gate._C`` was built and imported."""
    return _C is not None


def extension_error() -> str | None:
    """Why ``gate._C`` could not be imported (None when it was)."""
    return _EXTENSION_ERROR


def kernel_limits() -> dict[str, int] | None:
    """The kernels' limits as the built extension defines them (``gate._C.limits``, from
    csrc/kernels: router_gemm.h, dispatch.h, route.h), or None without the extension. Keys:
    ``sm90_max_m``, ``sm90_max_e``, ``small_m_max_m``, ``cublas_crossover_macs``, ``route_max_k``,
    ``route_max_e``."""
    return None if _C is None else dict(_C.limits)


@functools.cache
def _kernel_runs_on(device_index: int) -> bool:
    """Whether the extension holds machine code for this GPU (sm_90a code runs on sm_90 only)."""
    return _C is not None and _C.kernels_run_on(device_index)


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """The backend a router with weights of this device and dtype uses (one of ``BACKENDS``)."""
    if device.type != "cuda":
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if dtype in _KERNEL_DTYPES and _kernel_runs_on(index):
        return "moegate"
    return "cublas"


def check_router_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raises ValueError naming the problem (and the fix) unless x [M, K], weight [E, K] and bias
    [E] or None fit together: the checks of every public op here."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [E, K], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has E=0 experts; a router needs at least one")
    if bias is not None:
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias is {bias.dtype} but weight is {weight.dtype}; they must match")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    check_input(x, weight)


def check_input(x: torch.Tensor, weight: torch.Tensor) -> None:
    """What a router's input x [..., K] must share with its weight [E, K]: the only per-call check
    of a layer, whose parameters were checked when it was built. Raises ValueError saying the fix."""
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        got = f"K={x.shape[-1]}" if x.dim() else "a 0-d tensor"
        raise ValueError(f"x has {got} but the router's weight has K={weight.shape[1]}: x must have "
                         f"shape [..., {weight.shape[1]}], got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but the router's weight is {weight.dtype}: cast the input "
                         f"(x.to({weight.dtype})) or the router (.to({x.dtype}))")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the router's weight is on {weight.device}: move the "
                         f"input (x.to('{weight.device}')) or the router (.to('{x.device}'))")


def router_gemm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The PyTorch path (CPU, or any device): the same semantics as ``router_gemm``.

    When ``out_dtype`` is x's dtype this is exactly ``F.linear(x, weight, bias)``, so routers on the
    CPU give bit-identical logits to an unpatched ``nn.Linear`` / transformers router. Otherwise the
    product is computed in the wider of the two dtypes (float32 for bfloat16 x and float16 logits,
    or the reverse) and rounded once to ``out_dtype``: the operands are never cast down, so the
    logits are neither rounded to x's dtype on the way nor computed from operands that overflow.
    """
    out_dtype = out_dtype or x.dtype
    if out_dtype == x.dtype:
        return F.linear(x, weight, bias)
    wide = torch.promote_types(x.dtype, out_dtype)
    if wide == x.dtype:
        return F.linear(x, weight, bias).to(out_dtype)
    bias_wide = None if bias is None else bias.to(wide)
    return F.linear(x.to(wide), weight.to(wide), bias_wide).to(out_dtype)


def check_float_dtype(name: str, dtype: torch.dtype | None) -> None:
    """Raises unless ``dtype`` is None or a floating-point dtype (logits and routing weights are)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{name} must be a floating-point torch.dtype (or None), got {dtype!r}")


def router_gemm_cublas(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The cuBLAS path: ``addmm``/``mm``, with fp32 output straight from the fp32 accumulator."""
    out_dtype = out_dtype or x.dtype
    if out_dtype == x.dtype:
        if bias is None:
            return torch.mm(x, weight.t())
        return torch.addmm(bias.to(x.dtype), x, weight.t())
    if out_dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16):
        if bias is None:
            return torch.mm(x, weight.t(), out_dtype=torch.float32)
        return torch.addmm(bias.float(), x, weight.t(), out_dtype=torch.float32)
    return router_gemm_torch(x, weight, bias, out_dtype)


def router_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Router logits.

    Semantics: out[m, e] = sum_k x[m, k] * weight[e, k] + bias[e]   (fp32 accumulate, one rounding)

    x: [M, K], weight: [E, K], bias: [E] or None; returns [M, E] in ``out_dtype`` (default x.dtype).
    ``pdl`` launches the CUDA kernel with programmatic dependent launch (ignored elsewhere).
    ``backend`` forces one of ``BACKENDS``; None picks the best for the weight's device and dtype.
    """
    check_router_inputs(x, weight, bias)
    check_float_dtype("out_dtype", out_dtype)
    return router_gemm_unchecked(x, weight, bias, out_dtype, pdl,
                                 backend or backend_for(weight.device, weight.dtype))


def router_gemm_unchecked(x, weight, bias, out_dtype, pdl, backend: str) -> torch.Tensor:
    """``router_gemm`` for a caller that has checked its inputs (a layer: its parameters when built,
    x with ``check_input`` per call), on a given backend. Nothing is checked again here."""
    if backend == "torch":
        return router_gemm_torch(x, weight, bias, out_dtype)
    if backend == "moegate":
        return torch.ops.moegate.router_gemm(
            x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            out_dtype, pdl)
    if backend == "cublas":
        return router_gemm_cublas(x, weight, bias, out_dtype)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, pdl: bool = False, backend: str | None = None
) -> torch.Tensor:
    """A LoRA shrink for every slot at once: x @ lora_a^T as a router GEMM (lora_a: [rows, K], every
    slot's A flattened), in float32 straight from the fp32 accumulator (float64 for float64 x)."""
    return router_gemm(x, lora_a, None, torch.promote_types(x.dtype, torch.float32), pdl, backend)


def lora_shrink_unchecked(x, lora_a, pdl, backend: str) -> torch.Tensor:
    """``lora_shrink`` for a caller that has checked its inputs (see ``router_gemm_unchecked``)."""
    return router_gemm_unchecked(x, lora_a, None, torch.promote_types(x.dtype, torch.float32), pdl,
                                 backend)


def router_gemm_with_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's logits and a LoRA shrink over the same x, as one call.

    Semantics: ``(router_gemm(x, weight, bias, out_dtype, pdl), lora_shrink(x, lora_a, pdl))``, the
    logits bit for bit. lora_a: [rows, K] in x's dtype (every slot's A, flattened). Where one of our
    Hopper kernels serves the router call (bf16; the decode kernel with K <= 4096, or the
    tensor-core kernel), both come from one launch: the shrink's rows ride as extra CTAs of the
    router's grid, under grad mode too. Elsewhere (cuBLAS, the foundation kernel) they are the two
    calls. The gradients are the two calls' bit for bit (the op has their autograd formulas).
    """
    check_router_inputs(x, weight, bias)
    if lora_a.dim() != 2 or lora_a.shape[1] != x.shape[1] or lora_a.shape[0] == 0:
        raise ValueError(f"lora_a must be [rows >= 1, {x.shape[1]}], got {tuple(lora_a.shape)}")
    if lora_a.dtype != x.dtype or lora_a.device != x.device:
        raise ValueError(f"lora_a must be {x.dtype} on {x.device}, got {lora_a.dtype} on {lora_a.device}")
    return router_gemm_with_shrink_unchecked(x, weight, bias, lora_a, out_dtype, pdl,
                                             backend or backend_for(weight.device, weight.dtype))


def router_gemm_with_shrink_unchecked(x, weight, bias, lora_a, out_dtype, pdl,
                                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_gemm_with_shrink`` for a caller that has checked its inputs (see
    ``router_gemm_unchecked``)."""
    if backend == "moegate" and x.dtype != torch.float64:  # the op's shrink is float32
        return torch.ops.moegate.router_gemm_with_shrink(
            x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            lora_a.contiguous(), out_dtype, pdl)
    return (router_gemm_unchecked(x, weight, bias, out_dtype, pdl, backend),
            lora_shrink_unchecked(x, lora_a, pdl, backend))


def lora_expand_torch(
    logits: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    slot_ids: torch.Tensor,
) -> torch.Tensor:
    """The PyTorch path of ``lora_expand`` (CPU, or any device), batched ops only, no host sync."""
    num_slots, num_experts, rank = lora_b.shape
    num_tokens = logits.shape[0]
    compute = torch.promote_types(xa.dtype, lora_b.dtype)
    # Per slot, scaling folded into B: [S, M, R] @ [S, R, E] -> [S, M, E]; cheaper than gathering a
    # [M, E, R] B per token for S <= 8, R <= 64.
    lora_b_scaled = lora_b.to(compute) * scaling.to(compute).view(num_slots, 1, 1)
    per_slot = torch.bmm(xa.view(num_tokens, num_slots, rank).transpose(0, 1).to(compute),
                         lora_b_scaled.transpose(1, 2))
    # Out-of-range ids (-1 = no adapter) clamp to a real slot for the gather, then fail the
    # equality and keep the base logits: a bad id never faults on the device.
    slot = slot_ids.clamp(0, num_slots - 1)
    delta = per_slot.gather(0, slot.view(1, num_tokens, 1).expand(1, num_tokens, num_experts))
    has_adapter = (slot == slot_ids).unsqueeze(1)
    # torch.where, not a zero delta for no-adapter tokens: -0.0 + 0.0 is +0.0, not the base bits.
    return torch.where(has_adapter, (logits + delta.squeeze(0)).to(logits.dtype), logits)


def lora_expand_one_slot_torch(logits: torch.Tensor, xa: torch.Tensor, slot: int,
                               scaled_b_t: torch.Tensor) -> torch.Tensor:
    """``lora_expand_torch`` when every token uses slot ``slot``, with B scaled ahead of time.

    xa: [M, S*R], the shrink of every slot, contiguous (as ``router_gemm_torch`` returns it);
    scaled_b_t: [S, R, E], ``(lora_b.to(xa.dtype) * scaling[:, None, None]).transpose(1, 2)`` of a
    contiguous [S, E, R]. The same bmm on operands of the same layouts as ``lora_expand_torch`` (a
    BLAS may sum a batch of one in another order than a batch of S: all S are multiplied), then
    one addition and one rounding, so the same bits, with none of its per-token gather.
    """
    num_slots, rank, _ = scaled_b_t.shape
    per_slot = torch.bmm(xa.view(xa.shape[0], num_slots, rank).transpose(0, 1), scaled_b_t)
    out = logits + per_slot[slot]
    return out if out.dtype == logits.dtype else out.to(logits.dtype)


def _check_expand_inputs(logits, xa, lora_b, scaling, slot_ids) -> None:
    if lora_b.dim() != 3:
        raise ValueError(f"lora_b must be 3-D [S, E, R] (every slot's B), got shape {tuple(lora_b.shape)}")
    num_slots, num_experts, rank = lora_b.shape
    if logits.dim() != 2 or logits.shape[1] != num_experts:
        raise ValueError(f"logits must be [M, {num_experts}], got {tuple(logits.shape)}")
    num_tokens = logits.shape[0]
    if xa.shape != (num_tokens, num_slots * rank) or xa.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"xa must be float32 (or float64) [{num_tokens}, {num_slots * rank}], got "
                         f"{xa.dtype} {tuple(xa.shape)}")
    if scaling.shape != (num_slots,) or slot_ids.shape != (num_tokens,):
        raise ValueError(f"scaling must be [{num_slots}] and slot_ids [{num_tokens}], got "
                         f"{tuple(scaling.shape)} and {tuple(slot_ids.shape)}")
    for name, tensor in (("logits", logits), ("lora_b", lora_b), ("scaling", scaling)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if slot_ids.is_floating_point() or slot_ids.is_complex() or slot_ids.dtype == torch.bool:
        raise ValueError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")


# The expand launched right behind our own base-gate-and-shrink kernel is always its programmatic
# dependent, whatever the caller's pdl: it reads that kernel's logits and xa only after its
# grid-dependency wait, and that kernel triggers at entry, so the expand's launch and its fetch of
# B overlap the GEMM (0.3-0.4 us a layer call: benchmarks/results/README.md, "The expand behind its
# own GEMM"). The caller's pdl governs the first kernel's overlap with the caller's kernel before it.
EXPAND_PDL = True


def lora_expand(
    logits: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    slot_ids: torch.Tensor,
    pdl: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The expand half of a multi-adapter LoRA delta on router logits.

    Semantics, for each token m with slot s = slot_ids[m]:
        0 <= s < S:  out[m] = logits[m] + scaling[s] * B_s @ xa[m, s*R:(s+1)*R]   (fp32, one rounding)
        otherwise:   out[m] = logits[m], bit for bit
    logits: [M, E]; xa: [M, S*R] fp32, or fp64 for fp64 models (the shrink x @ A^T of every slot);
    lora_b: [S, E, R];
    scaling: [S] fp32; slot_ids: [M] int64. Returns [M, E] in logits' dtype. One kernel on the
    GPU (``"moegate"`` backend), batched PyTorch ops elsewhere.

    pdl: launch the kernel as a programmatic dependent of the kernel before it, as ``router_gemm``'s
    ``pdl``: it may start before that kernel completes and prefetch ``lora_b`` (so that kernel must
    not write ``lora_b``); everything else is read after it completes. Ignored off the kernel path.
    """
    _check_expand_inputs(logits, xa, lora_b, scaling, slot_ids)
    return lora_expand_unchecked(logits, xa, lora_b, scaling, slot_ids, pdl,
                                 backend or backend_for(logits.device, lora_b.dtype))


def lora_expand_unchecked(logits, xa, lora_b, scaling, slot_ids, pdl, backend: str) -> torch.Tensor:
    """``lora_expand`` for a caller whose slots were checked when built (see
    ``router_gemm_unchecked``)."""
    if backend == "moegate" and xa.dtype == torch.float32:
        return torch.ops.moegate.lora_expand(logits.contiguous(), xa.contiguous(), lora_b.contiguous(),
                                             scaling.float().contiguous(), slot_ids.long().contiguous(),
                                             pdl)
    return lora_expand_torch(logits, xa, lora_b, scaling, slot_ids)


def router_gemm_lora_unchecked(x, weight, bias, lora_a, lora_b, scaling, slot_ids, out_dtype, pdl: bool,
                               backend: str) -> torch.Tensor:
    """A multi-adapter LoRA layer's logits, for a caller that has checked its inputs (see
    ``router_gemm_unchecked``): ``lora_expand(*router_gemm_with_shrink(x, weight, bias, lora_a,
    out_dtype), lora_b, scaling, slot_ids)``, bit for bit. lora_a: [S*R, K] (every slot's A),
    lora_b: [S, E, R].

    On our kernels (``"moegate"``) this is one op, torch.ops.moegate.router_gemm_lora: one launch
    where the decode kernel takes the call and was measured faster than the two (a single token,
    bf16 slots, rank <= 64 in multiples of 8, <= 16 under PDL), under grad mode too (its gradients
    are the two ops' bit for bit). Elsewhere, and on other backends, the two ops.
    """
    if backend == "moegate" and x.dtype != torch.float64:
        return torch.ops.moegate.router_gemm_lora(
            x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            lora_a.contiguous(), lora_b.contiguous(), scaling.float().contiguous(),
            slot_ids.long().contiguous(), out_dtype, pdl)
    logits, xa = router_gemm_with_shrink_unchecked(x, weight, bias, lora_a, out_dtype, pdl, backend)
    return lora_expand_unchecked(logits, xa, lora_b, scaling, slot_ids, EXPAND_PDL, backend)


SCORINGS = ("softmax_topk", "softmax")
# Counters a fused routing launch may need (one per token tile of the decode kernel: up to 64);
# GateLinear keeps this many.
ROUTE_COUNTERS = 64


def _check_route_options(num_experts: int, top_k: int, scoring: str, renormalize: bool,
                         ids_dtype: torch.dtype, weights_dtype: torch.dtype | None) -> None:
    check_float_dtype("weights_dtype", weights_dtype)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}] (the number of experts), "
                         f"got {top_k!r}")
    if renormalize and scoring != "softmax":
        raise ValueError("renormalize applies to scoring='softmax' only (softmax_topk weights "
                         "already sum to 1)")
    if ids_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids_dtype must be torch.int64 or torch.int32, got {ids_dtype}")


def selection_keys(logits: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the routing's selection order of the logits: NaN above +inf, -0.0
    equal to +0.0, every other value by value. Integers sort the same on every device; float sorts
    do not (CUDA's radix sort puts +0.0 above -0.0, the CPU's comparison sort does not)."""
    if logits.dtype == torch.float64:
        bits, magnitude = (logits + 0.0).view(torch.int64), 0x7FFFFFFFFFFFFFFF
    else:  # bf16, fp16 and fp32 widen to fp32 exactly
        bits, magnitude = (logits.float() + 0.0).view(torch.int32).long(), 0x7FFFFFFF
    keys = torch.where(bits >= 0, bits, -1 - (bits & magnitude))  # + 0.0 made every zero +0.0
    return keys.masked_fill(torch.isnan(logits), magnitude)  # above +inf's bits, in int64 for fp64


def route_torch(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    weights_dtype: torch.dtype | None = None,
    ids_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path of ``route_logits`` (CPU, or any device); differentiable in the weights.

    A stable descending sort gives the kernels' selection order (ties to the lower expert index):
    on the CPU of the logits themselves (its comparison sort ranks NaN first and -0.0 equal to
    +0.0, as the kernels do), elsewhere of ``selection_keys`` (CUDA's radix sort ranks +0.0 above
    -0.0), which cost the CPU path more than half of its time. The softmax is PyTorch's, in fp32
    for half logits; with weights in the logits' own dtype it is transformers'
    ``softmax(top, dim=1, dtype=top.dtype)`` exactly.
    """
    weights_dtype = weights_dtype or logits.dtype
    order = logits.detach() if logits.device.type == "cpu" else selection_keys(logits)
    ids = torch.sort(order, dim=-1, descending=True, stable=True).indices[:, :top_k]
    if scoring == "softmax_topk":
        top = logits.gather(1, ids)
        if weights_dtype == logits.dtype:
            weights = torch.softmax(top, dim=-1, dtype=weights_dtype)
        else:  # softmax's dtype= casts its input first: the logits would be rounded to it
            weights = torch.softmax(top, dim=-1, dtype=torch.promote_types(top.dtype, torch.float32))
            weights = weights.to(weights_dtype)
    else:
        wide = torch.promote_types(logits.dtype, torch.float32)
        probabilities = torch.softmax(logits, dim=-1, dtype=wide).gather(1, ids)
        if renormalize:
            probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        weights = probabilities.to(weights_dtype)
    return weights, ids.to(ids_dtype)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The routing options (top_k .. ids_dtype) are the same in route, route_logits and
# lora_expand_route and the layers' route methods, deliberately: one meaning per name.
def route_logits(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    weights_dtype: torch.dtype | None = None,
    ids_dtype: torch.dtype = torch.int64,
    pdl: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of router logits: each token's ``top_k`` experts and their weights.

    Semantics, per token, on the logits l as stored (their dtype), widened to fp32:
        ids      the top_k largest l in descending order; ties to the lower expert index; NaN
                 ranks above +inf (a NaN logit is selected and its weights are NaN: visible, never
                 an out-of-range id); -0.0 equals +0.0. Always distinct ids in [0, E).
        "softmax_topk" (gpt-oss):  weights = softmax(l[ids])
        "softmax" (Mixtral, Qwen-MoE): weights = softmax(l)[ids], divided by their sum if
                 ``renormalize``
    in fp32, rounded once to ``weights_dtype`` (default: the logits' dtype). Returns
    ``(weights [M, top_k], ids [M, top_k] ids_dtype)``. On the GPU (``"moegate"`` backend) one
    kernel, a warp per token, whose weights are within one unit in the last place of
    ``route_torch``'s in bf16/fp16 (a few fp32 ulps in fp32) and whose ids are the same.
    pdl: launch the kernel as a programmatic dependent of the kernel before it (it reads the
    logits after that kernel completes). Where a gradient is needed: ``route_torch``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [M, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    _check_route_options(logits.shape[1], top_k, scoring, renormalize, ids_dtype, weights_dtype)
    if backend is None:
        backend = backend_for(logits.device, logits.dtype)
    if backend == "moegate" and logits.dtype in _KERNEL_DTYPES and not _needs_grad(logits):
        return torch.ops.moegate.route_logits(logits, top_k, scoring, renormalize, weights_dtype,
                                              ids_dtype, pdl)
    return route_torch(logits, top_k, scoring, renormalize, weights_dtype, ids_dtype)


def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    out_dtype: torch.dtype | None = None,
    weights_dtype: torch.dtype | None = None,
    ids_dtype: torch.dtype = torch.int64,
    pdl: bool = False,
    backend: str | None = None,
    counters: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole router: logits, then each token's top_k experts and weights.

    Semantics: ``logits = router_gemm(x, weight, bias, out_dtype)`` (bit for bit), then
    ``route_logits(logits, top_k, scoring, renormalize, weights_dtype, ids_dtype)`` on the logits
    as rounded to ``out_dtype``; weights_dtype defaults to the logits' dtype.
    Returns ``(weights [M, top_k], ids [M, top_k], logits [M, E])``.

    One launch where our decode kernel serves the router call (E <= 512, top_k <= 8): the last CTA
    to finish each token tile routes its tokens, a warp per token. It finds out through
    ``counters`` (int32, at least ``ROUTE_COUNTERS``, all zero, and left zero by every call): calls
    that may run at the same time on one GPU need counters of their own (a GateLinear holds its
    own). None allocates fresh zeros per call (one more small kernel). Elsewhere: router_gemm then
    route_logits (where the tensor-core kernel serves, launched as its programmatic dependent: its
    tiles hold too many tokens a warp to route them in its last CTA).
    Where a gradient is needed: router_gemm (differentiable) then ``route_torch``.
    """
    check_router_inputs(x, weight, bias)
    check_float_dtype("out_dtype", out_dtype)
    return route_unchecked(x, weight, bias, top_k, scoring, renormalize, out_dtype, weights_dtype,
                           ids_dtype, pdl, backend or backend_for(weight.device, weight.dtype), counters)


def route_unchecked(x, weight, bias, top_k, scoring, renormalize, out_dtype, weights_dtype, ids_dtype,
                    pdl, backend: str, counters) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route`` for a caller that has checked x, weight and bias (see ``router_gemm_unchecked``);
    the routing options, which may change per call, are checked here."""
    _check_route_options(weight.shape[0], top_k, scoring, renormalize, ids_dtype, weights_dtype)
    if backend == "moegate" and not _needs_grad(x, weight, bias):
        if counters is None:
            counters = torch.zeros(ROUTE_COUNTERS, dtype=torch.int32, device=x.device)
        return torch.ops.moegate.route(
            x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            counters, top_k, scoring, renormalize, out_dtype, weights_dtype, ids_dtype, pdl)
    logits = router_gemm_unchecked(x, weight, bias, out_dtype, pdl, backend)
    weights, ids = route_logits(logits, top_k, scoring, renormalize, weights_dtype, ids_dtype, pdl,
                                backend)
    return weights, ids, logits


def lora_expand_route(
    logits: torch.Tensor,
    xa: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    slot_ids: torch.Tensor,
    top_k: int,
    scoring: str = "softmax_topk",
    renormalize: bool = False,
    weights_dtype: torch.dtype | None = None,
    ids_dtype: torch.dtype = torch.int64,
    pdl: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lora_expand`` and the routing of its output: ``(out, weights, ids)`` with
    ``out = lora_expand(...)`` bit for bit and ``(weights, ids) = route_logits(out, ...)``.

    One kernel on the GPU (E <= 512, top_k <= 8): a CTA per token computes its E outputs and its
    first warp routes them. Elsewhere, and where a gradient is needed, the two calls.
    """
    _check_expand_inputs(logits, xa, lora_b, scaling, slot_ids)
    _check_route_options(logits.shape[1], top_k, scoring, renormalize, ids_dtype, weights_dtype)
    backend = backend or backend_for(logits.device, lora_b.dtype)
    if (backend == "moegate" and xa.dtype == torch.float32 and logits.dtype in _KERNEL_DTYPES
            and not _needs_grad(logits, xa, lora_b, scaling)):
        return torch.ops.moegate.lora_expand_route(
            logits.contiguous(), xa.contiguous(), lora_b.contiguous(), scaling.float().contiguous(),
            slot_ids.long().contiguous(), top_k, scoring, renormalize, weights_dtype, ids_dtype, pdl)
    out = lora_expand_unchecked(logits, xa, lora_b, scaling, slot_ids, pdl, backend)
    weights, ids = route_logits(out, top_k, scoring, renormalize, weights_dtype, ids_dtype, pdl,
                                backend)
    return out, weights, ids


def logits_like(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    """An uninitialised [M, E] output of a router GEMM (the fake kernels' answer)."""
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype or x.dtype)


if _C is not None:

    @torch.library.register_fake("moegate::router_gemm")
    def _router_gemm_fake(x, weight, bias=None, out_dtype=None, pdl=False):
        return logits_like(x, weight, out_dtype)

    @torch.library.register_fake("moegate::router_gemm_with_shrink")
    def _router_gemm_with_shrink_fake(x, weight, bias, lora_a, out_dtype=None, pdl=False):
        return logits_like(x, weight, out_dtype), logits_like(x, lora_a, torch.float32)

    @torch.library.register_fake("moegate::router_gemm_lora")
    def _router_gemm_lora_fake(x, weight, bias, lora_a, lora_b, scaling, slot_ids, out_dtype=None,
                               pdl=False):
        return logits_like(x, weight, out_dtype)

    @torch.library.register_fake("moegate::lora_expand")
    def _lora_expand_fake(logits, xa, lora_b, scaling, slot_ids, pdl=False):
        return torch.empty_like(logits)

    def _route_outputs(like, num_tokens, top_k, weights_dtype, ids_dtype):
        return (like.new_empty((num_tokens, top_k), dtype=weights_dtype),
                like.new_empty((num_tokens, top_k), dtype=ids_dtype or torch.int64))

    @torch.library.register_fake("moegate::route")
    def _route_fake(x, weight, bias, counters, top_k, scoring="softmax_topk", renormalize=False,
                    out_dtype=None, weights_dtype=None, ids_dtype=None, pdl=False):
        logits = logits_like(x, weight, out_dtype)
        return (*_route_outputs(x, x.shape[0], top_k, weights_dtype or logits.dtype, ids_dtype),
                logits)

    @torch.library.register_fake("moegate::route_logits")
    def _route_logits_fake(logits, top_k, scoring="softmax_topk", renormalize=False,
                           weights_dtype=None, ids_dtype=None, pdl=False):
        return _route_outputs(logits, logits.shape[0], top_k, weights_dtype or logits.dtype,
                              ids_dtype)

    @torch.library.register_fake("moegate::lora_expand_route")
    def _lora_expand_route_fake(logits, xa, lora_b, scaling, slot_ids, top_k,
                                scoring="softmax_topk", renormalize=False, weights_dtype=None,
                                ids_dtype=None, pdl=False):
        return (torch.empty_like(logits),
                *_route_outputs(logits, logits.shape[0], top_k, weights_dtype or logits.dtype,
                                ids_dtype))
