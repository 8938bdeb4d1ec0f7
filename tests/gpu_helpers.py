"""Shared pieces of the GPU tests: realistic inputs, float64 references, poisoned outputs."""

import torch


def realistic_activations(M, K, generator, device="cuda", outliers=8, outlier_scale=20.0):
    """Hidden states as routers see them: normal, with a few large outlier channels. Drawn on the
    generator's device (a CUDA generator keeps large batches off the CPU)."""
    x = torch.randn(M, K, generator=generator, device=generator.device)
    channels = torch.randperm(K, generator=generator, device=generator.device)[:outliers]
    x[:, channels] *= outlier_scale
    return x.to(device=device, dtype=torch.bfloat16)


def router_weights(E, K, generator, bias=True, device="cuda"):
    weight = (torch.randn(E, K, generator=generator) / K**0.5).to(device=device, dtype=torch.bfloat16)
    b = torch.randn(E, generator=generator).to(device=device, dtype=torch.bfloat16) if bias else None
    return weight, b


def reference_logits(x, weight, bias):
    """float64 on the same bf16 inputs."""
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def rel_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def call_poisoned(fn, shape, dtype, *args, require_poisoned=True, **kwargs):
    """Calls an op that allocates its output, after filling the block it will get with NaN.

    The caching allocator hands the most recently freed block of a size class to the next request
    on the same stream, so the op's output starts as NaN: any element it fails to write stays NaN.
    ``require_poisoned=False`` is for calls that may go to cuBLAS, which allocates on its own terms.
    """
    poison = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    poisoned_ptr = poison.data_ptr()
    del poison
    out = fn(*args, **kwargs)
    if require_poisoned:
        assert out.data_ptr() == poisoned_ptr, "the output did not land in the poisoned block"
    return out


def topk_agreement(logits, ref, k=4):
    """Fraction of tokens whose top-k expert set equals the float64 reference's."""
    ours = torch.topk(logits.double(), k, dim=-1).indices.sort(dim=-1).values
    theirs = torch.topk(ref, k, dim=-1).indices.sort(dim=-1).values
    return (ours == theirs).all(dim=-1).double().mean().item()


def memory_hog(stream, big_a, big_b, rounds):
    """Copies that saturate HBM on another stream, so a router's loads arrive late and unevenly."""
    with torch.cuda.stream(stream):
        for _ in range(rounds):
            big_a.copy_(big_b)
            big_b.add_(1.0)


def kernels_launched(fn):
    """Names of the CUDA kernels one call of fn launches."""
    fn()  # warm-up: allocator and lazy loading outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
