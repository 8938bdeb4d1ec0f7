"""ops.lora_expand, the expand half of the multi-adapter LoRA delta: the PyTorch path on the CPU and
the CUDA kernel on the GPU, against a float64 reference that loops over tokens."""

import pytest
import torch
from gpu_helpers import call_poisoned

from gate import ops


def make_inputs(M, E, S, R, logits_dtype, b_dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(M, E, generator=generator)).to(device, logits_dtype)
    xa = torch.randn(M, S * R, generator=generator).to(device)
    lora_b = (torch.randn(S, E, R, generator=generator) / R**0.5).to(device, b_dtype)
    scaling = (0.5 + torch.rand(S, generator=generator)).to(device)
    # Every slot, "no adapter" (-1) and ids outside [0, S) that must also mean "no adapter".
    slot_ids = torch.randint(-2, S + 2, (M,), generator=generator)
    slot_ids[:min(M, S)] = torch.arange(min(M, S))  # and at least one adapted token, at every M
    return logits, xa, lora_b, scaling, slot_ids.to(device)



def reference(logits, xa, lora_b, scaling, slot_ids):
    """float64, one token at a time; tokens without a valid slot keep their logits."""
    S, _, R = lora_b.shape
    out = logits.double().clone()
    for m, s in enumerate(slot_ids.tolist()):
        if 0 <= s < S:
            out[m] += scaling[s].double() * (lora_b[s].double() @ xa[m, s * R:(s + 1) * R].double())
    return out


def check(out, logits, xa, lora_b, scaling, slot_ids):
    ref = reference(logits, xa, lora_b, scaling, slot_ids)
    S = lora_b.shape[0]
    no_adapter = (slot_ids < 0) | (slot_ids >= S)
    assert len(slot_ids) == 0 or not no_adapter.all(), "nothing to expand: the test checks nothing"
    assert out.dtype == logits.dtype and out.shape == logits.shape
    assert torch.equal(out[no_adapter].view(torch.uint8), logits[no_adapter].view(torch.uint8)), \
        "no-adapter tokens changed"
    # One rounding of the exact value, plus fp32 summation slack.
    rounding = (ref.to(logits.dtype).double() - ref).abs()
    slack = 1e-5 * (ref.abs() + 1)
    assert ((out.double() - ref).abs() <= 2 * rounding + slack).all()


@pytest.mark.parametrize("M,E,S,R", [(0, 8, 2, 4), (1, 32, 1, 1), (7, 13, 3, 5), (128, 128, 4, 16),
                                     (33, 300, 8, 64)])
def test_torch_path_matches_float64(M, E, S, R):
    args = make_inputs(M, E, S, R, torch.bfloat16, torch.bfloat16, "cpu", seed=M + E + S + R)
    check(ops.lora_expand(*args, backend="torch"), *args)


def test_bad_shapes_are_value_errors():
    logits, xa, lora_b, scaling, slot_ids = make_inputs(4, 8, 2, 4, torch.float32, torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="xa must be"):
        ops.lora_expand(logits, xa[:, :5], lora_b, scaling, slot_ids)
    with pytest.raises(ValueError, match="logits must be"):
        ops.lora_expand(logits[:, :7], xa, lora_b, scaling, slot_ids)
    with pytest.raises(ValueError, match="slot_ids"):
        ops.lora_expand(logits, xa, lora_b, scaling, slot_ids[:3])
    with pytest.raises(ValueError, match=r"lora_b must be 3-D \[S, E, R\]"):
        ops.lora_expand(logits, xa, lora_b[0], scaling, slot_ids)
    # dtypes: integer logits had the delta truncated into them (1 + 1.4 -> 2), silently
    for args, match in (((logits.long(), xa, lora_b, scaling, slot_ids), "logits must be a floating"),
                        ((logits, xa, lora_b.long(), scaling, slot_ids), "lora_b must be a floating"),
                        ((logits, xa, lora_b, scaling.long(), slot_ids), "scaling must be a floating"),
                        ((logits, xa, lora_b, scaling, slot_ids.float()), "slot_ids must be an integer")):
        with pytest.raises(ValueError, match=match):
            ops.lora_expand(*args)


def test_float64_scaling_is_read_as_the_kernel_reads_it():
    """The kernel takes scaling.float(); the PyTorch path did float64 * float32 and failed in bmm."""
    logits, xa, lora_b, scaling, slot_ids = make_inputs(5, 8, 2, 4, torch.bfloat16, torch.bfloat16, "cpu", 6)
    out = ops.lora_expand(logits, xa, lora_b, scaling.double(), slot_ids, backend="torch")
    assert torch.equal(out, ops.lora_expand(logits, xa, lora_b, scaling, slot_ids, backend="torch"))


@pytest.mark.kernel
@pytest.mark.parametrize("M,E,S,R", [(1, 32, 1, 1), (1, 128, 4, 64), (7, 13, 3, 5), (128, 128, 8, 16),
                                     (1000, 300, 2, 8), (70000, 8, 2, 4)])
@pytest.mark.parametrize("logits_dtype,b_dtype", [(torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float16),
                                                  (torch.float32, torch.float32)])
@pytest.mark.parametrize("pdl", [False, True])
def test_kernel_matches_float64(M, E, S, R, logits_dtype, b_dtype, pdl):
    args = make_inputs(M, E, S, R, logits_dtype, b_dtype, "cuda", seed=M * 3 + E + S + R)
    out = call_poisoned(ops.lora_expand, (M, E), logits_dtype, *args, pdl=pdl)
    check(out.cpu(), *(a.cpu() for a in args))


@pytest.mark.kernel
def test_pdl_chain_reads_what_the_kernel_before_wrote():
    """Under PDL the expand may start while the kernel before it runs. Here that kernel writes the
    logits, xa and slot_ids the expand reads (only B may be read before the wait): 300 rounds in
    one CUDA graph, fresh data each round, every result equal to the serial launch's bits."""
    M, E, S, R, rounds = 16, 128, 4, 64, 300
    sources = [make_inputs(M, E, S, R, torch.bfloat16, torch.bfloat16, "cuda", seed=100 + i)
               for i in range(rounds)]
    _, _, lora_b, scaling, _ = sources[0]
    logits, xa, slot_ids = (torch.empty_like(t) for t in (sources[0][0], sources[0][1], sources[0][4]))
    outs = torch.empty(rounds, M, E, device="cuda", dtype=torch.bfloat16)
    ops.lora_expand(logits, xa, lora_b, scaling, slot_ids, pdl=True)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i, (fresh_logits, fresh_xa, _, _, fresh_ids) in enumerate(sources):
            # One producer kernel per buffer (a multiply: copy_ would be a memcpy node, not a
            # kernel), the last (slot_ids) right before the expand.
            torch.mul(fresh_logits, 1, out=logits)
            torch.mul(fresh_xa, 1, out=xa)
            torch.mul(fresh_ids, 1, out=slot_ids)
            outs[i] = ops.lora_expand(logits, xa, lora_b, scaling, slot_ids, pdl=True)
    outs.fill_(float("nan"))
    graph.replay()
    for i, (fresh_logits, fresh_xa, _, _, fresh_ids) in enumerate(sources):
        serial = ops.lora_expand(fresh_logits, fresh_xa, lora_b, scaling, fresh_ids, pdl=False)
        assert torch.equal(outs[i].view(torch.int16), serial.view(torch.int16)), f"round {i}"


@pytest.mark.kernel
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float32])
def test_kernel_unaligned_rows_match_aligned_bit_for_bit(b_dtype):
    """xa and B one element off a 16-byte boundary take the kernel's scalar loads, aligned ones its
    16-byte loads; the sums run in the same order, so the bits must agree."""
    args = make_inputs(9, 40, 3, 16, torch.bfloat16, b_dtype, "cuda", seed=4)
    logits, xa, lora_b, scaling, slot_ids = args

    def off_by_one_element(t):
        flat = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
        return flat[1:].view_as(t).copy_(t)

    xa_off, b_off = off_by_one_element(xa), off_by_one_element(lora_b)
    assert xa_off.data_ptr() % 16 and b_off.data_ptr() % 16
    aligned = ops.lora_expand(*args)
    unaligned = ops.lora_expand(logits, xa_off, b_off, scaling, slot_ids)
    assert torch.equal(aligned.view(torch.int16), unaligned.view(torch.int16))
    check(unaligned.cpu(), *(a.cpu() for a in args))


@pytest.mark.kernel
def test_kernel_keeps_signed_zeros_and_nans_of_no_adapter_tokens():
    logits, xa, lora_b, scaling, _ = make_inputs(4, 16, 2, 4, torch.bfloat16, torch.bfloat16, "cuda", 1)
    logits[0, 0], logits[1, 1] = -0.0, float("nan")
    slot_ids = torch.tensor([-1, 5, 0, 1], device="cuda")
    out = ops.lora_expand(logits, xa, lora_b, scaling, slot_ids)
    assert torch.equal(out[:2].view(torch.int16), logits[:2].view(torch.int16))


@pytest.mark.kernel
def test_kernel_under_cuda_graph_sees_new_slots_and_adapters():
    args = make_inputs(16, 32, 4, 8, torch.bfloat16, torch.bfloat16, "cuda", 2)
    logits, xa, lora_b, scaling, slot_ids = args
    ops.lora_expand(logits, xa, lora_b, scaling, slot_ids)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.lora_expand(logits, xa, lora_b, scaling, slot_ids)
    for seed in range(3):
        fresh = make_inputs(16, 32, 4, 8, torch.bfloat16, torch.bfloat16, "cuda", 10 + seed)
        for buffer, value in zip((logits, xa, lora_b, scaling, slot_ids), fresh):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        check(out.cpu(), *(a.cpu() for a in fresh))


@pytest.mark.kernel
def test_kernel_and_torch_path_agree_within_rounding():
    args = make_inputs(64, 128, 4, 16, torch.bfloat16, torch.bfloat16, "cuda", 3)
    ours, torch_path = ops.lora_expand(*args), ops.lora_expand(*args, backend="torch")
    ulp = torch.finfo(torch.bfloat16).eps * torch_path.float().abs().clamp_min(1)
    assert ((ours.float() - torch_path.float()).abs() <= ulp).all()


@pytest.mark.kernel
@pytest.mark.parametrize("logits_dtype,b_dtype", [(torch.bfloat16, torch.bfloat16),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float32)])
@pytest.mark.parametrize("M,E,S,R", [(33, 128, 4, 16), (5, 13, 3, 5)])
def test_kernel_gradients_are_the_torch_paths_bit_for_bit(M, E, S, R, logits_dtype, b_dtype):
    *differentiable, slot_ids = make_inputs(M, E, S, R, logits_dtype, b_dtype, "cuda", seed=M + E)
    grad_out = torch.randn(M, E, generator=torch.Generator().manual_seed(E)).to("cuda", logits_dtype)

    def gradients(backend):
        leaves = [t.clone().requires_grad_() for t in differentiable]
        out = ops.lora_expand(*leaves, slot_ids, backend=backend)
        return torch.autograd.grad(out, leaves, grad_out)

    for name, ours, torch_path in zip(("logits", "xa", "lora_b", "scaling"), gradients(None),
                                      gradients("torch")):
        assert ours.dtype == torch_path.dtype and ours.shape == torch_path.shape, name
        assert torch.equal(ours, torch_path), name
