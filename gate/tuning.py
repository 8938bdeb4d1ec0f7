"""Tuning and test entry points: each router kernel alone, and which one ``router_gemm`` picks.

Not the library's API (that is ``gate.ops``): these pin one kernel and expose its tile
configuration for benchmarks/router_gemm.py --tune, the GPU tests and the sanitizer workload.
They need the built extension ``gate._C`` on a GPU it was compiled for.
"""

from __future__ import annotations

import torch

from gate.ops import check_router_inputs, extension_available, kernel_limits, logits_like

# Each function's signature mirrors its op's schema (torch.ops.moegate.*, csrc), as gate.ops' do:
# the repeated parameter lists are that mirror.

# The Hopper kernels' limits, read from the extension where it is built. Without it (where no
# kernel runs) these copies of the C++ constants kSm90MaxM, kSm90MaxE and kSmallMaxM
# (csrc/kernels/router_gemm.h) stand in: tests/test_kernel_limits.py checks them against the header,
# and against gate._C where the extension is built.
MIRRORED_LIMITS = {"sm90_max_m": 256, "sm90_max_e": 512, "small_m_max_m": 64}
_LIMITS = kernel_limits() or MIRRORED_LIMITS
SM90_MAX_M = _LIMITS["sm90_max_m"]
SM90_MAX_E = _LIMITS["sm90_max_e"]
SMALL_M_MAX_M = _LIMITS["small_m_max_m"]


def _check_hopper_kernel_inputs(x, weight, bias, out_dtype, max_m, kernel):
    """The Hopper kernels' limits, checked here so that bad input is a ValueError before any launch
    (the C++ side checks the same things again)."""
    problems = []
    if x.dtype != torch.bfloat16:
        problems.append(f"x and weight must be bfloat16, got {x.dtype}")
    if out_dtype not in (None, torch.bfloat16, torch.float32):
        problems.append(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    if not 1 <= x.shape[0] <= max_m:
        problems.append(f"M must be in [1, {max_m}], got {x.shape[0]}")
    if x.shape[1] % 8 != 0:
        problems.append(f"K must be a multiple of 8, got {x.shape[1]}")
    if problems:
        raise ValueError(f"{kernel} cannot take these inputs: " + "; ".join(problems))


def router_gemm_simple(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The foundation CUDA kernel alone (any shape, bf16/fp16/fp32); ``router_gemm``'s semantics."""
    check_router_inputs(x, weight, bias)
    return torch.ops.moegate.router_gemm_simple(x.contiguous(), weight.contiguous(),
                                                None if bias is None else bias.contiguous(),
                                                out_dtype)


def router_gemm_sm90(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
    expert_tiles: int = 0,
    token_tiles: int = 0,
    cluster: int = 0,
) -> torch.Tensor:
    """The Hopper kernel alone, with its tile configuration exposed for tuning and tests.

    bf16 x/weight/bias, bf16 or fp32 out, 1 <= M <= 256, E a multiple of 8 up to 512, K a multiple
    of 8. ``expert_tiles`` (1, 2: 16 experts each), ``token_tiles`` (1, 2, 4: 8 tokens each) and
    ``cluster`` (4 or 8 CTAs splitting K) are per warp / per cluster; 0 picks the heuristic.
    """
    check_router_inputs(x, weight, bias)
    _check_hopper_kernel_inputs(x, weight, bias, out_dtype, SM90_MAX_M, "router_gemm_sm90")
    E = weight.shape[0]
    if E % 8 != 0 or E > SM90_MAX_E:
        raise ValueError(f"router_gemm_sm90 needs E a multiple of 8 up to {SM90_MAX_E}, got {E}")
    if expert_tiles not in (0, 1, 2) or token_tiles not in (0, 1, 2, 4) or cluster not in (0, 4, 8):
        raise ValueError(f"unsupported tile configuration expert_tiles={expert_tiles}, "
                         f"token_tiles={token_tiles}, cluster={cluster}")
    return torch.ops.moegate.router_gemm_sm90(x.contiguous(), weight.contiguous(),
                                              None if bias is None else bias.contiguous(),
                                              out_dtype, pdl, expert_tiles, token_tiles, cluster)


def router_gemm_small_m(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
    experts_per_cta: int = 0,
    tokens_per_cta: int = 0,
) -> torch.Tensor:
    """The decode-size Hopper kernel alone (one CTA per expert group and token group, CUDA-core FMA).

    bf16 x/weight/bias, bf16 or fp32 out, 1 <= M <= 64, any E, K a multiple of 8.
    ``experts_per_cta`` is 1, 2 or 4; ``tokens_per_cta`` is 1, 2, 4 or 8; 0 picks by E and M (the
    measured best: 2 x 2 from 512 logits and 2 x 4 from 768, else 1 x 2).
    """
    check_router_inputs(x, weight, bias)
    _check_hopper_kernel_inputs(x, weight, bias, out_dtype, SMALL_M_MAX_M, "router_gemm_small_m")
    if experts_per_cta not in (0, 1, 2, 4):
        raise ValueError(f"experts_per_cta must be 0 (auto), 1, 2 or 4, got {experts_per_cta}")
    if tokens_per_cta not in (0, 1, 2, 4, 8):
        raise ValueError(f"tokens_per_cta must be 0 (auto), 1, 2, 4 or 8, got {tokens_per_cta}")
    return torch.ops.moegate.router_gemm_small_m(x.contiguous(), weight.contiguous(),
                                                 None if bias is None else bias.contiguous(),
                                                 out_dtype, pdl, experts_per_cta, tokens_per_cta)


ROUTES = ("cublas", "small_m", "sm90", "simple")  # router_gemm_route's answers, by code


def router_gemm_route(x: torch.Tensor, weight: torch.Tensor,
                      out_dtype: torch.dtype | None = None) -> str:
    """Which implementation ``router_gemm`` on the ``"moegate"`` backend runs for these inputs:
    ``"small_m"`` (decode kernel), ``"sm90"`` (tensor-core kernel), ``"cublas"`` (above the measured
    crossover) or ``"simple"`` (the foundation kernel). Decided inside the op, per call, and the
    same with or without ``pdl``."""
    check_router_inputs(x, weight, None)
    return ROUTES[torch.ops.moegate.router_gemm_route(x.contiguous(), weight.contiguous(), out_dtype)]


if extension_available():

    @torch.library.register_fake("moegate::router_gemm_simple")
    def _router_gemm_simple_fake(x, weight, bias=None, out_dtype=None):
        return logits_like(x, weight, out_dtype)

    @torch.library.register_fake("moegate::router_gemm_sm90")
    def _router_gemm_sm90_fake(x, weight, bias=None, out_dtype=None, pdl=False, expert_tiles=0,
                               token_tiles=0, cluster=0):
        return logits_like(x, weight, out_dtype)

    @torch.library.register_fake("moegate::router_gemm_small_m")
    def _router_gemm_small_m_fake(x, weight, bias=None, out_dtype=None, pdl=False,
                                  experts_per_cta=0, tokens_per_cta=0):
        return logits_like(x, weight, out_dtype)
