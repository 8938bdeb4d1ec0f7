"""GateLinearWithLoRA on the CPU: float64 reference per token, slot -1 bits, bad inputs, merge mode.

The reference and the error bound here are also used by tests/test_lora_gpu.py and test_lora_compile.py.
"""

import pytest
import torch
import torch.nn.functional as F

from gate import GateLinear, ops
from lora import GateLinearWithLoRA, TokenSlots, get_token_slots, replace_modules
from lora.layer import add_lora_delta

_SAME_SIZE_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
                  torch.float32: torch.int32, torch.float64: torch.int64}


def bits(t):
    """The raw bits, so -0.0 and +0.0 (and NaN payloads) compare as different."""
    return t.view(_SAME_SIZE_INT[t.dtype])


def random_gate(K, E, dtype, generator, bias=True, out_dtype=None, device="cpu"):
    layer = GateLinear(K, E, bias=bias, out_dtype=out_dtype, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(E, K, generator=generator) / K**0.5)
        if bias:
            layer.bias.copy_(torch.randn(E, generator=generator))
    return layer.requires_grad_(False).to(device)


def random_adapter(rank, K, E, dtype, generator, device="cpu"):
    """A non-zero adapter whose delta is about as large as the base logits (so a wrong one shows)."""
    lora_a = (torch.randn(rank, K, generator=generator) / K**0.5).to(device=device, dtype=dtype)
    lora_b = (torch.randn(E, rank, generator=generator) / rank**0.5).to(device=device, dtype=dtype)
    scaling = 0.5 + 1.5 * torch.rand((), generator=generator).item()
    return lora_a, lora_b, scaling


def reference_logits(x, weight, bias, adapters, slot_ids):
    """float64, one token at a time: W x + b, plus scaling * B (A x) when the token's slot holds an
    adapter. ``adapters``: {slot: (lora_a [r, K], lora_b [E, r], scaling)}, unpadded."""
    x = x.reshape(-1, x.shape[-1]).double().cpu()
    weight = weight.double().cpu()
    rows = []
    for m, slot in enumerate(slot_ids.tolist()):
        row = weight @ x[m]
        if bias is not None:
            row = row + bias.double().cpu()
        if slot in adapters:
            lora_a, lora_b, scaling = adapters[slot]
            row = row + scaling * (lora_b.double().cpu() @ (lora_a.double().cpu() @ x[m]))
        rows.append(row)
    return torch.stack(rows) if rows else x.new_zeros(0, weight.shape[0])


def error_bound(out_dtype, x, weight, bias, adapters, slot_ids):
    """Per-element bound on |out - reference|: one rounding of the base logits and one of
    base + delta to ``out_dtype``, plus fp32 accumulation over K (Higham's gamma_K, doubled)."""
    ref = reference_logits(x, weight, bias, adapters, slot_ids)
    base_ref = reference_logits(x, weight, bias, {}, slot_ids)
    magnitude = reference_logits(x.abs(), weight.abs(), None if bias is None else bias.abs(),
                                 {s: (a.abs(), b.abs(), abs(c)) for s, (a, b, c) in adapters.items()},
                                 slot_ids)
    unit_roundoff = torch.finfo(out_dtype).eps / 2
    return ref, 1.01 * unit_roundoff * (base_ref.abs() + ref.abs()) + 2 * x.shape[-1] * 2**-24 * magnitude


def assert_matches_reference(out, x, layer, adapters, slot_ids):
    ref, bound = error_bound(out.dtype, x, layer.weight, layer.bias, adapters, slot_ids)
    out = out.reshape(ref.shape).double().cpu()
    assert torch.isfinite(out).all()
    error = (out - ref).abs()
    assert (error <= bound).all(), f"error/bound up to {(error / bound).max().item():.3g}"
    return ref, bound


def loaded_layer(K, E, max_loras, max_rank, num_adapters, M, dtype, generator, bias=True,
                 out_dtype=None, device="cpu"):
    """A wrapped gate with ``num_adapters`` adapters of ranks 1..max_rank in random slots, and a
    mapping of M tokens over those slots and -1 (each used at least once when M allows)."""
    layer = GateLinearWithLoRA(random_gate(K, E, dtype, generator, bias, out_dtype, device),
                               max_loras, max_rank, TokenSlots(max(M, 1), device=device))
    slots = torch.randperm(max_loras, generator=generator)[:num_adapters].tolist()
    ranks = [1, max_rank] + torch.randint(1, max_rank + 1, (num_adapters,), generator=generator).tolist()
    adapters = {}
    for slot, rank in zip(slots, ranks):
        adapters[slot] = random_adapter(rank, K, E, dtype, generator, device)
        layer.set_lora(slot, *adapters[slot])
    choices = torch.tensor(slots + [-1])
    mapping = choices[torch.randint(0, len(choices), (M,), generator=generator)]
    mapping[:len(choices)] = choices[:M]
    layer.token_slots.set(mapping)
    return layer, adapters, mapping


@pytest.mark.parametrize("K, E, M, num_adapters, dtype, bias, out_dtype", [
    (64, 8, 1, 1, torch.bfloat16, True, None),
    (360, 32, 7, 2, torch.bfloat16, True, None),
    (360, 32, 17, 3, torch.bfloat16, False, None),
    (2880, 128, 129, 8, torch.bfloat16, True, None),
    (2880, 32, 100, 5, torch.bfloat16, True, torch.float32),
    (7168, 256, 3, 8, torch.bfloat16, False, torch.float32),
    (128, 16, 33, 4, torch.float32, True, None),
])
def test_mixed_batch_matches_float64_reference(K, E, M, num_adapters, dtype, bias, out_dtype):
    generator = torch.Generator().manual_seed(K * 31 + E * 7 + M)
    layer, adapters, mapping = loaded_layer(K, E, 8, 64, num_adapters, M, dtype, generator, bias, out_dtype)
    x = torch.randn(M, K, generator=generator).to(dtype)
    out = layer(x)
    assert out.shape == (M, E) and out.dtype == (out_dtype or dtype)
    ref, bound = assert_matches_reference(out, x, layer, adapters, mapping)
    # The check can tell: without the deltas the adapted tokens are far outside the bound.
    adapted = mapping >= 0
    no_delta = reference_logits(x, layer.weight, layer.bias, {}, mapping)
    assert ((no_delta - ref).abs() > bound)[adapted].any()
    # Tokens without an adapter are the base layer's output, bit for bit.
    base = layer.base_layer(x)
    assert torch.equal(bits(out[~adapted]), bits(base[~adapted]))


def test_all_slots_full_rank_every_token_adapted():
    generator = torch.Generator().manual_seed(5)
    layer, adapters, _ = loaded_layer(256, 32, 8, 16, 8, 64, torch.bfloat16, generator)
    mapping = torch.arange(64) % 8
    layer.token_slots.set(mapping)
    x = torch.randn(64, 256, generator=generator).to(torch.bfloat16)
    assert_matches_reference(layer(x), x, layer, adapters, mapping)


def test_3d_strided_and_empty_inputs():
    generator = torch.Generator().manual_seed(6)
    layer, adapters, mapping = loaded_layer(96, 16, 4, 8, 3, 10, torch.bfloat16, generator)
    wide = torch.randn(2, 5, 192, generator=generator).to(torch.bfloat16)
    x = wide[..., ::2]  # [2, 5, 96], not contiguous
    out = layer(x)
    assert out.shape == (2, 5, 16)
    assert_matches_reference(out, x, layer, adapters, mapping)
    unadapted = (mapping == -1).view(2, 5)
    transposed = torch.randn(5, 2, 96, generator=generator).to(torch.bfloat16).transpose(0, 1)
    for strided in (x, transposed):  # tokens of no adapter keep the base gate's bits
        assert torch.equal(bits(layer(strided)[unadapted]), bits(layer.base_layer(strided)[unadapted]))
    layer.token_slots.fill(10, -1)  # one slot for every token: the uniform path
    assert torch.equal(bits(layer(transposed)), bits(layer.base_layer(transposed)))
    layer.token_slots.set([])
    empty = layer(torch.empty(0, 96, dtype=torch.bfloat16))
    assert empty.shape == (0, 16)


def test_smaller_rank_overwrites_without_stale_values():
    generator = torch.Generator().manual_seed(7)
    layer, _, mapping = loaded_layer(128, 16, 2, 32, 2, 12, torch.bfloat16, generator)
    slot = mapping[mapping >= 0][0].item()
    adapter = random_adapter(3, 128, 16, torch.bfloat16, generator)
    layer.set_lora(slot, *adapter)
    assert layer.slot_ranks[slot] == 3
    assert not layer.lora_a_stacked[slot, 3:].any() and not layer.lora_b_stacked[slot, :, 3:].any()
    x = torch.randn(12, 128, generator=generator).to(torch.bfloat16)
    adapters = {s: random_adapter(1, 128, 16, torch.bfloat16, generator) for s in range(2) if s != slot}
    for other, adapter_other in adapters.items():
        layer.set_lora(other, *adapter_other)
    adapters[slot] = adapter
    assert_matches_reference(layer(x), x, layer, adapters, mapping)


def test_reset_and_out_of_range_ids_give_the_base_logits():
    generator = torch.Generator().manual_seed(8)
    layer, _, _ = loaded_layer(64, 8, 4, 8, 4, 6, torch.bfloat16, generator)
    x = torch.randn(6, 64, generator=generator).to(torch.bfloat16)
    base = layer.base_layer(x)
    layer.reset_lora(2)
    assert layer.slot_ranks[2] == 0 and layer.scaling[2] == 0
    layer.token_slots.fill(6, 2)
    assert torch.equal(layer(x), base)  # values: an empty slot adds +0.0
    # ids written past validation never fault: outside [0, max_loras) they read as no adapter.
    layer.token_slots.set(torch.tensor([4, 99, -7, -1, 4, 1000]), validate=False)
    assert torch.equal(bits(layer(x)), bits(base))


def test_forward_needs_token_slots_and_the_right_token_count():
    generator = torch.Generator().manual_seed(9)
    layer = GateLinearWithLoRA(random_gate(32, 8, torch.bfloat16, generator), 2, 4)
    x = torch.randn(3, 32, generator=generator).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="no TokenSlots"):
        layer(x)
    layer.set_token_slots(TokenSlots(8))
    layer.token_slots.set([0, -1])
    with pytest.raises(ValueError, match="3 tokens"):
        layer(x)
    with pytest.raises(ValueError, match=r"\[\.\.\., 32\]"):  # 96 values would reshape to [3, 32]
        layer(torch.randn(2, 3, 16).to(torch.bfloat16))
    with pytest.raises(ValueError, match="out of range"):
        layer.token_slots.set([0, 2, -1])  # the layer lowered the bound to its 2 slots
    with pytest.raises(TypeError, match="TokenSlots"):
        layer.set_token_slots([0, 1])


def _bad_set_lora_cases():
    K, E, R = 48, 8, 4
    bf16 = torch.bfloat16
    ok_a, ok_b = torch.ones(2, K, dtype=bf16), torch.ones(E, 2, dtype=bf16)
    nan_a = ok_a.clone()
    nan_a[1, 3] = float("nan")
    inf_b = ok_b.clone()
    inf_b[0, 0] = float("inf")
    return [
        ("slot too high", (4, ok_a, ok_b, 1.0), ValueError, "out of range"),
        ("slot negative", (-1, ok_a, ok_b, 1.0), ValueError, "out of range"),
        ("slot a float", (1.0, ok_a, ok_b, 1.0), TypeError, "slot"),
        ("slot a bool", (True, ok_a, ok_b, 1.0), TypeError, "bool"),
        ("rank > max_rank", (1, torch.ones(R + 1, K, dtype=bf16), torch.ones(E, R + 1, dtype=bf16), 1.0),
         ValueError, "rank 5"),
        ("rank 0", (1, torch.ones(0, K, dtype=bf16), torch.ones(E, 0, dtype=bf16), 1.0),
         ValueError, "rank 0"),
        ("wrong K", (1, torch.ones(2, K + 1, dtype=bf16), ok_b, 1.0), ValueError, "K=48"),
        ("wrong E", (1, ok_a, torch.ones(E + 1, 2, dtype=bf16), 1.0), ValueError, "E=8"),
        ("rank mismatch", (1, ok_a, torch.ones(E, 3, dtype=bf16), 1.0), ValueError, "r=2"),
        ("1-D A", (1, torch.ones(K, dtype=bf16), ok_b, 1.0), ValueError, "2-D"),
        ("3-D B", (1, ok_a, ok_b[None], 1.0), ValueError, "2-D"),
        ("integer A", (1, ok_a.int(), ok_b, 1.0), TypeError, "got torch.int32"),
        ("float8 A", (1, ok_a.to(torch.float8_e4m3fn), ok_b, 1.0), TypeError, "got torch.float8_e4m3fn"),
        ("scaled B overflows", (1, ok_a, torch.full((E, 2), 1e30), 1e10), ValueError,
         "scaling \\* lora_B overflows"),
        ("int scaling past float", (1, ok_a, ok_b, 10**400), ValueError, "overflows float32"),
        ("B overflows bf16", (1, ok_a, torch.full((E, 2), 3.4e38), 1.0), ValueError, "lora_b overflows"),
        ("wrong device", (1, ok_a, ok_b.to("meta"), 1.0), ValueError, "meta"),
        ("not a tensor", (1, ok_a.tolist(), ok_b, 1.0), TypeError, "tensor"),
        ("NaN in A", (1, nan_a, ok_b, 1.0), ValueError, "non-finite"),
        ("inf in B", (1, ok_a, inf_b, 1.0), ValueError, "non-finite"),
        ("NaN scaling", (1, ok_a, ok_b, float("nan")), ValueError, "finite"),
        ("inf scaling", (1, ok_a, ok_b, float("inf")), ValueError, "finite"),
        ("str scaling", (1, ok_a, ok_b, "1"), TypeError, "real number"),
        ("tensor scaling", (1, ok_a, ok_b, torch.ones(2)), ValueError, "number"),
    ]


@pytest.mark.parametrize("case", _bad_set_lora_cases(), ids=lambda case: case[0])
def test_bad_set_lora_raises_and_leaves_the_slot_unchanged(case):
    _, args, error, match = case
    generator = torch.Generator().manual_seed(10)
    layer = GateLinearWithLoRA(random_gate(48, 8, torch.bfloat16, generator), 4, 4, TokenSlots(4))
    layer.set_lora(1, *random_adapter(3, 48, 8, torch.bfloat16, generator))
    before = [t.clone() for t in (layer.lora_a_stacked, layer.lora_b_stacked, layer.scaling)]
    with pytest.raises(error, match=match):
        layer.set_lora(*args)
    after = (layer.lora_a_stacked, layer.lora_b_stacked, layer.scaling)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(before, after))
    assert layer.slot_ranks == (0, 3, 0, 0)


def test_tensor_scaling_and_constructor_checks():
    generator = torch.Generator().manual_seed(11)
    layer = GateLinearWithLoRA(random_gate(16, 4, torch.float32, generator), 2, 2)
    layer.set_lora(0, torch.ones(1, 16), torch.ones(4, 1), torch.tensor(0.25))
    assert layer.scaling[0].item() == 0.25
    with pytest.raises(TypeError, match="GateLinear"):
        GateLinearWithLoRA(torch.nn.Linear(16, 4), 2, 2)
    with pytest.raises(ValueError, match="max_loras"):
        GateLinearWithLoRA(random_gate(16, 4, torch.float32, generator), 0, 2)
    with pytest.raises(ValueError, match="max_rank"):
        GateLinearWithLoRA(random_gate(16, 4, torch.float32, generator), 1, 0)


def test_buffers_delegation_and_dtype_moves():
    generator = torch.Generator().manual_seed(12)
    layer = GateLinearWithLoRA(random_gate(40, 8, torch.float32, generator), 3, 5, TokenSlots(4))
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias
    assert (layer.in_features, layer.num_experts) == (40, 8)
    assert layer.lora_a_stacked.shape == (3, 5, 40) and layer.lora_b_stacked.shape == (3, 8, 5)
    assert layer.scaling.shape == (3,) and layer.scaling.dtype == torch.float32
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias"}
    layer.set_lora(2, torch.ones(1, 40), torch.ones(8, 1), 1 / 3)
    layer.to(torch.bfloat16)
    assert layer.lora_a_stacked.dtype == layer.lora_b_stacked.dtype == torch.bfloat16
    assert layer.scaling.dtype == torch.float32 and layer.scaling[2].item() == torch.tensor(1 / 3).item()
    assert "max_loras=3" in repr(layer)


# -- merge mode -------------------------------------------------------------------------------------

def merged_error_bound(out_dtype, x, weight, bias, adapter):
    """Like error_bound, for the base kernel on W + scaling * B A rounded once to W's dtype
    (``weight`` is the original, unmerged W)."""
    lora_a, lora_b, scaling = adapter
    merged_weight = weight.double() + scaling * lora_b.double() @ lora_a.double()
    mapping = torch.zeros(x.shape[0], dtype=torch.int64)
    ref, accumulation = error_bound(torch.float64, x, weight, bias, {0: adapter}, mapping)
    unit_roundoff = torch.finfo(out_dtype).eps / 2
    weight_rounding = unit_roundoff * (x.double().abs() @ merged_weight.abs().t())
    return ref, 1.01 * (unit_roundoff * ref.abs() + weight_rounding) + accumulation


def test_merged_equals_unmerged_and_unmerge_restores_exact_bits():
    generator = torch.Generator().manual_seed(13)
    layer = GateLinearWithLoRA(random_gate(360, 32, torch.bfloat16, generator), 4, 16, TokenSlots(20))
    adapters = {slot: random_adapter(rank, 360, 32, torch.bfloat16, generator)
                for slot, rank in ((0, 16), (3, 5))}
    for slot, adapter in adapters.items():
        layer.set_lora(slot, *adapter)
    x = torch.randn(20, 360, generator=generator).to(torch.bfloat16)
    layer.token_slots.fill(20, 3)
    unmerged = layer(x)
    weight = layer.weight
    original = weight.clone()
    pointer = weight.data_ptr()

    layer.merge(3)
    assert layer.merged_slot == 3 and layer.weight is weight and weight.data_ptr() == pointer
    layer.token_slots.set([-1, 0] * 10)  # ignored: the merged adapter serves every token
    merged = layer(x)
    # Exactly the base kernel on the merged weight.
    assert torch.equal(bits(merged), bits(F.linear(x, weight, layer.bias)))
    ref, bound = merged_error_bound(torch.bfloat16, x, original, layer.bias, adapters[3])
    assert ((merged.double() - ref).abs() <= bound).all()
    # Merged == unmerged within the rounding both carry (bounds taken against the original weight).
    _, unmerged_bound = error_bound(torch.bfloat16, x, original, layer.bias, {0: adapters[3]},
                                    torch.zeros(20, dtype=torch.int64))
    assert ((merged.double() - unmerged.double()).abs() <= bound + unmerged_bound).all()
    assert not torch.equal(weight, original)

    layer.unmerge()
    assert layer.merged_slot is None and layer.weight is weight and weight.data_ptr() == pointer
    assert torch.equal(bits(weight), bits(original))
    layer.token_slots.fill(20, 3)
    assert torch.equal(bits(layer(x)), bits(unmerged))
    layer.unmerge()  # a no-op when nothing is merged


def test_merge_refusals_change_nothing():
    generator = torch.Generator().manual_seed(14)
    layer = GateLinearWithLoRA(random_gate(64, 8, torch.bfloat16, generator), 3, 4, TokenSlots(4))
    original = layer.weight.clone()
    with pytest.raises(ValueError, match="empty"):
        layer.merge(0)
    layer.set_lora(1, torch.full((2, 64), 100.0, dtype=torch.bfloat16),
                   torch.full((8, 2), 100.0, dtype=torch.bfloat16), 1e35)  # W' ~ 2e39
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(1)
    assert layer.merged_slot is None and torch.equal(bits(layer.weight), bits(original))
    with pytest.raises(ValueError, match="out of range"):
        layer.merge(3)
    layer.set_lora(2, *random_adapter(2, 64, 8, torch.bfloat16, generator))
    layer.merge(2)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge(1)
    with pytest.raises(RuntimeError, match="merged"):
        layer.set_lora(2, *random_adapter(2, 64, 8, torch.bfloat16, generator))
    with pytest.raises(RuntimeError, match="merged"):
        layer.reset_lora(2)
    with pytest.raises(RuntimeError, match="merged"):
        layer.create_lora_weights(3, 4)
    layer.set_lora(0, *random_adapter(1, 64, 8, torch.bfloat16, generator))  # other slots: fine
    layer.unmerge()
    assert torch.equal(bits(layer.weight), bits(original))


def test_merge_refuses_overflow_after_rounding_to_the_weight_dtype():
    # Finite in fp32 but beyond fp16's 65504: the check must look at the rounded weight.
    generator = torch.Generator().manual_seed(15)
    layer = GateLinearWithLoRA(random_gate(32, 4, torch.float16, generator), 1, 1)
    layer.set_lora(0, torch.ones(1, 32, dtype=torch.float16), torch.ones(4, 1, dtype=torch.float16), 1e5)
    original = layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(0)
    assert torch.equal(bits(layer.weight), bits(original))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("K, E, rank, M", [(64, 8, 8, 1), (360, 32, 16, 3), (2880, 128, 64, 17)])
def test_one_slot_batches_give_the_mixed_paths_bits(K, E, rank, M, dtype):
    # When set() saw every token use one slot, the CPU forward runs that slot's expand alone: it
    # must give exactly what the mixed-mapping path gives for the same mapping.
    generator = torch.Generator().manual_seed(K + M)
    layer = GateLinearWithLoRA(random_gate(K, E, dtype, generator), 4, rank, TokenSlots(32))
    for slot in range(3):
        layer.set_lora(slot, *random_adapter(rank - slot, K, E, dtype, generator))
    x = torch.randn(M, K, generator=generator).to(dtype)
    for slot in (-1, 0, 2, 3):
        layer.token_slots.set([slot] * M)
        assert layer.token_slots.uniform_slot == slot
        one_slot = layer(x)
        layer.token_slots.set(torch.full((M,), slot), validate=False)  # not read on the host
        assert layer.token_slots.uniform_slot is None
        assert torch.equal(bits(one_slot), bits(layer(x)))
    layer.token_slots.set([0] * (M - 1) + [1])
    assert layer.token_slots.uniform_slot is (None if M > 1 else 1)


def test_set_lora_casts_float32_factors_and_refuses_what_the_cast_loses():
    generator = torch.Generator().manual_seed(12)
    layer = GateLinearWithLoRA(random_gate(48, 8, torch.float16, generator), 2, 4, TokenSlots(4))
    lora_a, lora_b = torch.randn(3, 48, generator=generator), torch.randn(8, 3, generator=generator)
    layer.set_lora(0, lora_a, lora_b, 2.0)  # PEFT's float32 factors
    assert torch.equal(layer.lora_a_stacked[0, :3], lora_a.half())
    assert torch.equal(layer.lora_b_stacked[0, :, :3], lora_b.half())
    with pytest.raises(ValueError, match="lora_a overflows torch.float16 .* rescale the factors"):
        layer.set_lora(1, lora_a * 1e6, lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_b underflows torch.float16: every non-zero value"):
        layer.set_lora(1, lora_a, lora_b * 1e-12, 1.0)
    assert layer.slot_ranks == (3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_gemm_lora_off_the_kernels_is_the_layers_two_ops(dtype):
    """gate.ops.router_gemm_lora_unchecked (one op on our kernels) on the PyTorch backend: the
    layer's logits bit for bit, slot -1 and unchecked ids included."""
    generator = torch.Generator().manual_seed(5)
    K, E, M = 360, 32, 9
    layer = GateLinearWithLoRA(random_gate(K, E, dtype, generator), 4, 16, TokenSlots(M))
    adapters = {slot: random_adapter(rank, K, E, dtype, generator)
                for slot, rank in ((0, 16), (1, 5), (3, 9))}
    for slot, adapter in adapters.items():
        layer.set_lora(slot, *adapter)
    slot_ids = torch.tensor([0, 1, -1, 3, 2, 0, 7, 1, 3])
    layer.token_slots.set(slot_ids, validate=False)
    x = torch.randn(M, K, generator=generator).to(dtype)
    base = layer.base_layer
    out = ops.router_gemm_lora_unchecked(
        x, base.weight, base.bias, layer.lora_a_stacked.view(-1, K), layer.lora_b_stacked,
        layer.scaling, layer.token_slots.for_tokens(M), None, False, "torch")
    # the two ops it stands for, called on their own: the base gate, then the delta
    two_ops = add_lora_delta(ops.router_gemm(x, base.weight, base.bias, backend="torch"), x,
                             layer.lora_a_stacked, layer.lora_b_stacked, layer.scaling, slot_ids,
                             backend="torch")
    assert torch.equal(bits(out), bits(two_ops))
    assert torch.equal(bits(out), bits(layer(x)))
    assert_matches_reference(out, x, base, adapters, slot_ids)
    adapted = torch.tensor([s in adapters for s in slot_ids.tolist()])
    assert not torch.equal(out[adapted], base(x)[adapted])  # the deltas are there


def served_layer(seed, max_loras, slot):
    """A float32 layer (K = 32, E = 4, max rank 4) with a rank-2 adapter in ``slot`` and two tokens,
    one mapped to it and one to none: (layer, x, the layer's logits for x, the generator)."""
    generator = torch.Generator().manual_seed(seed)
    layer = GateLinearWithLoRA(random_gate(32, 4, torch.float32, generator), max_loras, 4, TokenSlots(2))
    layer.set_lora(slot, *random_adapter(2, 32, 4, torch.float32, generator))
    layer.token_slots.set([slot, -1])
    x = torch.randn(2, 32, generator=generator)
    return layer, x, layer(x), generator


def test_a_scaling_float32_cannot_hold_is_refused_before_anything_is_written():
    """The slots keep scalings in float32: one that overflows it, or rounds to zero there, is
    refused with the slot as it was (it used to write A and B, then fail on the scaling)."""
    layer, x, before, generator = served_layer(21, max_loras=2, slot=0)
    slots = (layer.lora_a_stacked.clone(), layer.lora_b_stacked.clone(), layer.scaling.clone())
    lora_a, lora_b, _ = random_adapter(3, 32, 4, torch.float32, generator)
    for scaling, match in ((1e39, "overflows float32"), (3.4028235e38, "overflows float32"),
                           (-3.4028235e38, "overflows float32"), (1e-50, "underflows float32 to zero")):
        with pytest.raises(ValueError, match=match):
            layer.set_lora(0, lora_a, lora_b, scaling)
    assert torch.equal(layer(x), before) and layer.slot_ranks == (2, 0)
    assert all(torch.equal(a, b) for a, b in zip(slots, (layer.lora_a_stacked, layer.lora_b_stacked,
                                                         layer.scaling)))


def test_create_lora_weights_refused_by_the_mapping_changes_nothing():
    layer, x, before, _ = served_layer(22, max_loras=8, slot=5)
    with pytest.raises(ValueError, match="the current mapping uses slot 5"):
        layer.create_lora_weights(2, 4)
    assert (layer.max_loras, layer.max_rank, layer.slot_ranks[5]) == (8, 4, 2)
    assert torch.equal(layer(x), before)


def test_a_conversion_that_would_overflow_the_loaded_adapters_is_refused():
    """.half() follows set_lora's cast rules: adapters that fp16 cannot hold are not turned into inf."""
    generator = torch.Generator().manual_seed(23)
    layer = GateLinearWithLoRA(random_gate(16, 4, torch.float32, generator), 2, 4, TokenSlots(2))
    lora_a, lora_b, scaling = random_adapter(2, 16, 4, torch.float32, generator)
    layer.set_lora(0, lora_a * 1e6, lora_b, scaling)
    with pytest.raises(ValueError, match=r"would change its adapters: lora_a_stacked\[0\] .* overflows"):
        layer.half()
    assert layer.weight.dtype == layer.lora_a_stacked.dtype == torch.float32  # nothing converted
    layer.set_lora(0, lora_a, lora_b, scaling)
    layer.set_lora(1, lora_a * 1e-9, lora_b, scaling)  # all of it rounds to zero in fp16
    with pytest.raises(ValueError, match=r"lora_a_stacked\[1\] \(a loaded adapter\) underflows"):
        layer.half()  # though slot 0 keeps values: each adapter on its own
    layer.reset_lora(1)
    layer.half()
    assert layer.lora_a_stacked.dtype == torch.float16 and torch.isfinite(layer.lora_a_stacked).all()


def test_merge_scales_b_first_as_the_forward_does():
    """B @ A alone would overflow float32 where scaling * B @ A (and W') does not: the merge
    computes (scaling * B) @ A, so it merges what the unmerged forward serves."""
    generator = torch.Generator().manual_seed(24)
    layer = GateLinearWithLoRA(random_gate(8, 4, torch.float32, generator), 1, 1, TokenSlots(2))
    layer.set_lora(0, torch.full((1, 8), 1e20), torch.full((4, 1), 1e20), 1e-10)
    layer.token_slots.set([0, 0])
    x = torch.randn(2, 8, generator=generator)
    unmerged = layer(x)
    layer.merge(0)
    assert torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-6, atol=0)


def test_a_model_wrapped_on_the_meta_device_materialises_with_empty_slots():
    """Built on meta (no memory), wrapped, then to_empty(): the slots hold whatever memory they got,
    so they start empty as a new layer's do; adapters then load and serve as usual."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    replace_modules(model, 2, 4, target=["0"])
    model.to_empty(device="cpu")
    layer = model[0]
    assert layer.scaling.tolist() == [0.0, 0.0] and layer.slot_ranks == (0, 0)
    assert not layer.lora_a_stacked.any() and not layer.lora_b_stacked.any()
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.randn(8, 16, generator=generator))
        layer.base_layer.bias.copy_(torch.randn(8, generator=generator))
    adapter = random_adapter(4, 16, 8, torch.float32, generator)
    layer.set_lora(1, *adapter)
    get_token_slots(model).set([1, -1, 0])
    x = torch.randn(3, 16, generator=generator)
    assert_matches_reference(layer(x), x, layer, {1: adapter}, torch.tensor([1, -1, 0]))
