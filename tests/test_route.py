"""Routing (top-k + softmax) on the CPU: the semantics every backend shares, against a reference
written out by hand in float64."""

import math

import pytest
import torch

from gate import GateLinear, ops
from lora import GateLinearWithLoRA, TokenSlots


def reference_route(logits, top_k, scoring="softmax_topk", renormalize=False):
    """Per token: experts by value, NaN first, ties to the lower index; weights in float64."""
    all_ids, all_weights = [], []
    for row in logits.double().tolist():
        def rank(e, row=row):
            value = row[e]
            return (0, 0.0, e) if math.isnan(value) else (1, -value, e)
        ids = sorted(range(len(row)), key=rank)[:top_k]
        if scoring == "softmax_topk":
            top = row[ids[0]]
            exps = [math.exp(row[i] - top) if not math.isnan(row[i] - top) else math.nan for i in ids]
            weights = [e / sum(exps) for e in exps]
        else:
            top = max(row) if not any(math.isnan(v) for v in row) else math.nan
            total = sum(math.exp(v - top) for v in row)
            weights = [math.exp(row[i] - top) / total for i in ids]
            if renormalize:
                weights = [w / sum(weights) for w in weights]
        all_ids.append(ids)
        all_weights.append(weights)
    return torch.tensor(all_weights, dtype=torch.float64), torch.tensor(all_ids)


def tied_logits(M, E, generator, dtype=torch.bfloat16):
    """Few distinct values: most rows have ties inside their top k."""
    return torch.randint(-3, 4, (M, E), generator=generator).to(dtype) * 0.5


@pytest.mark.parametrize("scoring,renormalize", [("softmax_topk", False), ("softmax", False),
                                                 ("softmax", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("top_k", [1, 4, 8])
def test_route_logits_matches_the_reference(scoring, renormalize, dtype, top_k):
    generator = torch.Generator().manual_seed(top_k)
    for logits in (torch.randn(37, 32, generator=generator).to(dtype), tied_logits(37, 32, generator, dtype)):
        weights, ids = ops.route_logits(logits, top_k, scoring, renormalize)
        ref_weights, ref_ids = reference_route(logits, top_k, scoring, renormalize)
        assert torch.equal(ids, ref_ids)
        assert weights.dtype == dtype and ids.dtype == torch.int64
        if dtype == torch.bfloat16:  # one rounding of an fp32 result: within one bf16 spacing
            torch.testing.assert_close(weights.double(), ref_weights, rtol=2**-7, atol=0)
        else:
            torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-6, atol=1e-6)


def test_ties_nan_inf_and_signed_zero():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [-0.0, 0.0, -inf, -0.0, -1.0],
                           [2.0, nan, inf, 5.0, nan],
                           [-inf, -inf, -inf, -inf, -inf]])
    _, ids = ops.route_logits(logits, 3)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 3], [1, 4, 2], [0, 1, 2]]
    weights, _ = ops.route_logits(logits, 3)
    assert torch.isnan(weights[2]).all() and torch.isnan(weights[3]).all()  # visible, never hidden


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cpu_sort_orders_as_the_selection_keys(dtype):
    """route_torch sorts the logits themselves on the CPU and ``selection_keys`` elsewhere: the two
    orders must be the same one, NaN (either sign) first, -0.0 equal to +0.0, ties by index."""
    generator = torch.Generator().manual_seed(7)
    specials = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"), 3e38])
    for M, E in ((3, 1), (17, 32), (9, 129), (4, 600)):
        logits = torch.randn(M, E, generator=generator)
        special = torch.rand(M, E, generator=generator) < 0.3
        picks = specials[torch.randint(0, len(specials), (M, E), generator=generator)]
        logits = torch.where(special, picks, logits)
        logits = torch.where(torch.rand(M, E, generator=generator) < 0.3, logits.round(), logits).to(dtype)
        by_keys = torch.sort(ops.selection_keys(logits), dim=-1, descending=True, stable=True).indices
        by_values = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        assert torch.equal(by_keys, by_values)
        assert torch.equal(ops.route_torch(logits, 1)[1][:, 0], by_keys[:, 0])


def test_weights_and_ids_dtypes():
    logits = torch.randn(5, 16, dtype=torch.bfloat16)
    weights, ids = ops.route_logits(logits, 4, weights_dtype=torch.float32, ids_dtype=torch.int32)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    torch.testing.assert_close(weights.sum(-1), torch.ones(5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"top_k": 0}, "top_k"), ({"top_k": 17}, "top_k"), ({"top_k": 2.0}, "top_k"), ({"top_k": True}, "top_k"),
    ({"top_k": 2, "scoring": "sigmoid"}, "scoring"),
    ({"top_k": 2, "renormalize": True}, "renormalize"),
    ({"top_k": 2, "ids_dtype": torch.float32}, "ids_dtype"),
])
def test_bad_options_raise(kwargs, message):
    logits = torch.randn(3, 16)
    with pytest.raises(ValueError, match=message):
        ops.route_logits(logits, **kwargs)
    gate = GateLinear(8, 16)
    with pytest.raises(ValueError, match=message):
        gate.route(torch.randn(3, 8), **kwargs)


def test_integer_logits_are_refused():
    with pytest.raises(ValueError, match="logits must be a floating-point tensor, got torch.int64"):
        ops.route_logits(torch.arange(16).view(2, 8), 2)


def test_gate_route_is_forward_then_route_logits():
    torch.manual_seed(0)
    gate = GateLinear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    weights, ids, logits = gate.route(x, 4)
    assert torch.equal(logits, gate(x))
    ref_weights, ref_ids = ops.route_torch(logits.view(-1, 32), 4)
    assert ids.shape == (2, 5, 4) and torch.equal(ids.view(-1, 4), ref_ids)
    assert torch.equal(weights.view(-1, 4), ref_weights)


def test_gate_route_is_differentiable():
    torch.manual_seed(1)
    gate = GateLinear(16, 8)
    x = torch.randn(6, 16, requires_grad=True)
    weights, _, _ = gate.route(x, 2, "softmax", renormalize=False)
    (weights * torch.randn_like(weights)).sum().backward()
    assert x.grad is not None and gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_route_counters_stay_out_of_the_state_dict_and_are_zeroed_on_to_empty():
    gate = GateLinear(16, 8, device="meta")
    assert set(gate.state_dict()) == {"weight", "bias"}
    gate = gate.to_empty(device="cpu")
    assert gate.route_counters.shape == (ops.ROUTE_COUNTERS,)
    assert not gate.route_counters.any()
    shared = GateLinear.from_parameters(torch.randn(8, 16), None)
    assert not shared.route_counters.any()


def test_lora_route_routes_the_adapted_logits():
    torch.manual_seed(2)
    slots = TokenSlots(max_tokens=16)
    layer = GateLinearWithLoRA(GateLinear(32, 16), max_loras=2, max_rank=4, token_slots=slots)
    layer.set_lora(0, torch.randn(4, 32), torch.randn(16, 4), scaling=2.0)
    slots.set([0, -1, 0, 0, -1])
    x = torch.randn(5, 32)
    with torch.no_grad():
        weights, ids, logits = layer.route(x, 3)
        assert torch.equal(logits, layer(x))
        ref_weights, ref_ids = ops.route_torch(logits, 3)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    base_ids = layer.base_layer.route(x, 3)[1]
    assert not torch.equal(ids[[0, 2, 3]], base_ids[[0, 2, 3]])  # the adapter moves the routing
    assert torch.equal(ids[[1, 4]], base_ids[[1, 4]])


def test_compiled_route_matches_eager():
    torch.manual_seed(3)
    gate = GateLinear(32, 16)
    x = torch.randn(7, 32)
    compiled = torch.compile(lambda t: gate.route(t, 4, "softmax", True), fullgraph=True)
    with torch.no_grad():
        (weights, ids, logits), (want_weights, want_ids, want_logits) = (
            compiled(x), gate.route(x, 4, "softmax", True))
    assert torch.equal(ids, want_ids) and torch.equal(logits, want_logits)
    torch.testing.assert_close(weights, want_weights)  # inductor fuses its own softmax on the CPU
