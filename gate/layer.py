"""GateLinear: the MoE router layer, ``logits = x @ weight.T + bias``."""

from __future__ import annotations

import math

import torch
from torch import nn

from gate import ops


class GateLinear(nn.Module):
    """A drop-in router gate backed by moegate's kernels.

    Parameters are named as in ``nn.Linear`` (``weight [E, K]``, ``bias [E]``) so state dicts of
    ``nn.Linear`` gates and of transformers' routers load unchanged.

    Args:
        in_features: K, the hidden size.
        num_experts: E, the number of experts (logits per token).
        bias: whether the gate has a bias.
        out_dtype: dtype of the logits; None means the input's dtype. ``torch.float32`` gives fp32
            logits straight from the fp32 accumulator (no bf16 rounding on the way).
        pdl: launch the CUDA kernel with programmatic dependent launch, so its weight loads overlap
            the previous kernel's tail. Only for weights that no kernel writes right before the router.
            It pays only next to kernels that trigger their dependents early (ours do): between
            ordinary PyTorch kernels it measured slower (benchmarks/results/README.md, the chain
            rows). The logits are the same bits either way.

    Forward takes x of shape [..., K] and returns [..., E]. It is differentiable on every backend,
    with the gradients F.linear gives (bit for bit on the same device). The parameters are checked
    when the layer is built or moved and the backend (``"moegate"``, ``"cublas"`` or ``"torch"``,
    see ``gate.ops``) decided then, so a call checks only x (``ops.check_input``); ``backend``
    says which one it is.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        bias: bool = True,
        out_dtype: torch.dtype | None = None,
        pdl: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        ops.check_float_dtype("out_dtype", out_dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.num_experts = num_experts
        self.out_dtype = out_dtype
        self.pdl = pdl
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, **factory)) if bias else None
        self.reset_parameters()
        self._add_route_counters()
        self._refresh_backend()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, so a fresh GateLinear behaves like a fresh nn.Linear."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype | None = None,
                    pdl: bool = False) -> GateLinear:
        """A GateLinear sharing ``linear``'s parameters (no copy), on its device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_parameters(linear.weight, linear.bias, out_dtype=out_dtype, pdl=pdl)

    @classmethod
    def from_parameters(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                        out_dtype: torch.dtype | None = None, pdl: bool = False) -> GateLinear:
        """A GateLinear holding these parameters ([E, K] and [E] or None) without copying them."""
        if weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"weight must be 2-D [E, K] with E, K >= 1, got shape {tuple(weight.shape)}")
        ops.check_float_dtype("out_dtype", out_dtype)
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
            raise ValueError(f"bias is {bias.dtype} on {bias.device} but weight is {weight.dtype} on "
                             f"{weight.device}; convert the bias with .to(weight.dtype, weight.device)")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = weight.shape[1]
        layer.num_experts = weight.shape[0]
        layer.out_dtype = out_dtype
        layer.pdl = pdl
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if bias is None:
            layer.bias = None
        else:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        layer._add_route_counters()
        layer._refresh_backend()
        return layer

    def _add_route_counters(self) -> None:
        # The fused routing launch's counters (ops.route): zero at rest, on the weight's device,
        # not in the state dict. One set per layer: a layer must not route on two streams at once.
        self.register_buffer("route_counters", torch.zeros(
            ops.ROUTE_COUNTERS, dtype=torch.int32, device=self.weight.device), persistent=False)

    def _refresh_backend(self) -> None:
        self._backend = ops.backend_for(self.weight.device, self.weight.dtype)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() come through here: re-decide the backend once, not per forward.
        # The counters are zeroed again: to_empty() (meta-device construction) leaves them garbage.
        result = super()._apply(fn, recurse)
        self.route_counters.zero_()
        self._refresh_backend()
        return result

    @property
    def backend(self) -> str:
        """The backend every forward uses: ``"moegate"``, ``"cublas"`` or ``"torch"`` (decided from
        the weight's device and dtype, as ``ops.backend_for``, when the layer is built or moved)."""
        return self._backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The parameters through the module's own dict: nn.Module's attribute lookup of each costs
        # more than the whole per-call check.
        parameters = self._parameters
        weight, bias = parameters["weight"], parameters.get("bias")
        ops.check_input(x, weight)
        if x.dim() == 2:  # what transformers' routers pass: no reshape on the way
            return ops.router_gemm_unchecked(x, weight, bias, self.out_dtype, self.pdl, self._backend)
        logits = ops.router_gemm_unchecked(x.reshape(-1, self.in_features), weight, bias,
                                           self.out_dtype, self.pdl, self._backend)
        return logits.view(*x.shape[:-1], self.num_experts)

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
        """The routing a MoE layer consumes: ``(weights [..., top_k], ids [..., top_k],
        logits [..., E])`` with ``ops.route``'s semantics (the logits are this layer's forward, bit
        for bit). On the ``"moegate"`` backend one launch where the decode kernel serves the call,
        two where the tensor-core kernel does (``ops.route``)."""
        ops.check_input(x, self.weight)
        leading = x.shape[:-1]
        weights, ids, logits = ops.route_unchecked(
            x.reshape(-1, self.in_features), self.weight, self.bias, top_k, scoring, renormalize,
            self.out_dtype, weights_dtype, ids_dtype, self.pdl, self._backend, self.route_counters)
        return (weights.view(*leading, top_k), ids.view(*leading, top_k),
                logits.view(*leading, self.num_experts))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, "
                f"bias={self.bias is not None}, out_dtype={self.out_dtype}, "
                f"backend={self._backend!r}")
