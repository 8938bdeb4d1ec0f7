"""Adapter factors into the slots' dtype: PEFT keeps its factors in float32, serving slots hold the
base weight's dtype (bf16, fp16). A cast is accepted unless it changes what the adapter computes
beyond rounding: a finite value that becomes inf (overflow), or a factor whose non-zero values all
round to zero (underflow: the adapter would silently compute nothing). Single values that round to
zero among larger ones are rounding, as in any cast. The same two rules hold an adapter's
scaling to the float32 its slot keeps it in.
"""

from __future__ import annotations

import math

import torch


def cast_problem(name: str, factor: torch.Tensor, cast: torch.Tensor) -> str | None:
    """Why ``cast`` (``factor`` converted to another dtype) does not hold the same adapter, or None."""
    if cast.dtype == factor.dtype:
        return None
    if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(factor).all()):
        largest = factor.abs().max().item()
        return (f"{name} overflows {cast.dtype} (largest |value| {largest:.3g}, the dtype's largest "
                f"{torch.finfo(cast.dtype).max:.3g}); serve it in a wider dtype (float32 slots: the "
                "model in float32) or rescale the factors (scaling * B @ A is what counts)")
    if bool(factor.any()) and not bool(cast.any()):
        largest = factor.abs().max().item()
        return (f"{name} underflows {cast.dtype}: every non-zero value (the largest |value| is "
                f"{largest:.3g}) rounds to zero, the adapter would compute nothing; serve it in a wider "
                "dtype or rescale the factors (scaling * B @ A is what counts)")
    return None


# Factor dtypes an adapter may come in (PEFT's float32, and what a checkpoint may hold): the float8
# and float4 types have no isfinite / abs on every device, and e8m0's NaN passes isfinite.
FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def cast_factor(name: str, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``factor`` in ``dtype``; ValueError naming the problem and the fix when the cast loses it."""
    if not factor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {factor.dtype}")
    cast = factor.to(dtype)
    problem = cast_problem(name, factor, cast)
    if problem is not None:
        raise ValueError(problem)
    return cast


def scaling_problem(name: str, scaling: float, context: str = "") -> str | None:
    """Why ``scaling`` cannot be a slot's float32 scaling (not finite, or lost in the cast), or None.
    ``context`` follows the value in the message (where it came from)."""
    if not math.isfinite(scaling):
        return f"{name} {scaling}{context} is not finite"
    kept = torch.tensor(scaling, dtype=torch.float32).item()
    # torch.tensor rounds values just past float32's largest down to it; a slot's fill_ refuses them
    if not math.isfinite(kept) or abs(scaling) > torch.finfo(torch.float32).max:
        return (f"{name} {scaling:.3g}{context} overflows float32, the dtype slots keep scalings in "
                f"(largest {torch.finfo(torch.float32).max:.3g}); rescale the factors (scaling * B @ A "
                "is what counts)")
    if scaling != 0 and kept == 0:
        return (f"{name} {scaling:.3g}{context} underflows float32 to zero, the adapter would compute "
                "nothing; rescale the factors (scaling * B @ A is what counts)")
    return None


def scaled_b_problem(name: str, lora_b: torch.Tensor, scaling: float) -> str | None:
    """Why ``scaling * lora_b`` (as a slot holds B: ``lora_b`` in the slots' dtype) overflows the
    float32 the PyTorch path scales B in, or None."""
    scaled = lora_b.to(torch.promote_types(lora_b.dtype, torch.float32)) * scaling
    if bool(torch.isfinite(scaled).all()):
        return None
    return (f"{name}: scaling * lora_B overflows {scaled.dtype} (scaling {scaling:.3g}, largest |lora_B| "
            f"{lora_b.abs().max().item():.3g}); rescale the factors (scaling * B @ A is what counts)")
