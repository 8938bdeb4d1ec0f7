"""Adapter factors into the slots' dtype: PEFT keeps its factors in float32, serving slots hold the
base weight's dtype (bf16, fp16). A cast is accepted unless it changes what the adapter computes
beyond rounding: a finite value that becomes inf (overflow), or a factor whose non-zero values all
round to zero (underflow: the adapter would silently compute nothing). Single values that round to
zero among larger ones are rounding, as in any cast.
"""

from __future__ import annotations

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


def cast_factor(name: str, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``factor`` in ``dtype``; ValueError naming the problem and the fix when the cast loses it."""
    if not factor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {factor.dtype}")
    cast = factor.to(dtype)
    problem = cast_problem(name, factor, cast)
    if problem is not None:
        raise ValueError(problem)
    return cast
