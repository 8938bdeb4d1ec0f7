"""A small, representative router workload for compute-sanitizer (memcheck, racecheck, synccheck).

Every kernel path once or twice: the Hopper kernel in each tile configuration at tile-boundary
sizes, PDL on and off, bias on and off, bf16 and fp32 output; both kernels fused with a LoRA
shrink; both kernels fused with routing (top-k + softmax) and the routing kernel alone; the
foundation kernel on odd sizes; the LoRA expand kernel with every slot, no adapter and
out-of-range ids; a LoRA layer's logits in one launch (the decode kernel in clusters).
Exits non-zero if any result is off, so the sanitizer run checks answers as well as accesses.
Runs every part, or the parts named (`--help` lists them), so a tool can look at one alone.
"""

import argparse
import itertools
import sys

import torch

from gate import ops, tuning


def check(out, x, w, b):
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        sys.exit(f"wrong result: relative error {err:.3e}")


def check_routing(weights, ids, logits, top_k, scoring="softmax_topk", renormalize=False):
    want_weights, want_ids = ops.route_torch(logits, top_k, scoring, renormalize)
    if not torch.equal(ids, want_ids):
        sys.exit(f"wrong routing ids for E={logits.shape[1]}, top_k={top_k}")
    if not torch.allclose(weights.double(), want_weights.double(), rtol=1e-2, atol=1e-6):
        sys.exit(f"wrong routing weights for E={logits.shape[1]}, top_k={top_k}")


SM90_TILES = list(itertools.product((1, 2), (1, 2, 4), (4, 8)))  # expert tiles, token tiles, cluster
SMALL_M_TILES = ((1, 0, False), (2, 1, True), (2, 2, True), (2, 4, False), (4, 8, False), (0, 0, True))


def router_data(generator, M, K, E):
    x = torch.randn(M, K, generator=generator).to("cuda", torch.bfloat16)
    w = (torch.randn(E, K, generator=generator) / K**0.5).to("cuda", torch.bfloat16)
    b = torch.randn(E, generator=generator).to("cuda", torch.bfloat16)
    return x, w, b


def each_tile(x, w, b):
    """Both router kernels in each of their tile configurations (the decode kernel where M allows),
    PDL off with bias and bf16 logits, PDL on without bias and fp32 logits."""
    for et, tt, cluster in SM90_TILES:
        for pdl, out_dtype, bias in ((False, None, b), (True, torch.float32, None)):
            check(tuning.router_gemm_sm90(x, w, bias, out_dtype, pdl, et, tt, cluster), x, w, bias)
    if x.shape[0] <= tuning.SMALL_M_MAX_M:
        for experts_per_cta, tokens_per_cta, pdl in SMALL_M_TILES:
            check(tuning.router_gemm_small_m(x, w, b, None, pdl, experts_per_cta, tokens_per_cta), x, w, b)


def router_tiles(generator):
    """Each tile configuration once, at one size with partial tiles (M = 9, E = 24): racecheck's
    share, since its clock cannot take router_kernels' every configuration at every size."""
    each_tile(*router_data(generator, 9, 2880, 24))


def router_kernels(generator):
    """The router kernels in every tile configuration, each fused with a LoRA shrink and routing."""
    shapes = [(1, 2880, 32), (5, 7168, 256), (9, 360, 24), (33, 2880, 32), (129, 2880, 128),
              (256, 7168, 256)]
    for M, K, E in shapes:
        x, w, b = router_data(generator, M, K, E)
        each_tile(x, w, b)
        if tuning.router_gemm_route(x, w) != "cublas":  # cuBLAS's kernels are not ours to check
            check(ops.router_gemm(x, w, b), x, w, b)
        if tuning.router_gemm_route(x, w) in ("small_m", "sm90"):  # the base gate + a LoRA shrink
            lora_a = (torch.randn(72, K, generator=generator) / K**0.5).to("cuda", torch.bfloat16)
            for pdl in (False, True):
                logits, xa = ops.router_gemm_with_shrink(x, w, b, lora_a, pdl=pdl)
                check(logits, x, w, b)
                check(xa, x, lora_a, None)
        counters = torch.zeros(ops.ROUTE_COUNTERS, dtype=torch.int32, device="cuda")
        for top_k, scoring, renormalize, pdl in ((4, "softmax_topk", False, False),
                                                 (8, "softmax", True, True)):
            weights, ids, logits = ops.route(x, w, b, top_k, scoring, renormalize, pdl=pdl,
                                             counters=counters)
            check_routing(weights, ids, logits, top_k, scoring, renormalize)
        if counters.any():
            sys.exit("route left its counters non-zero")


def simple_kernel(generator):
    """The foundation kernel on odd sizes."""
    for M, K, E in [(3, 13, 5), (17, 100, 1)]:
        x = torch.randn(M, K, generator=generator).cuda()
        w = torch.randn(E, K, generator=generator).cuda()
        check(tuning.router_gemm_simple(x, w, None), x, w, None)


def lora_expand(generator):
    """The LoRA expand kernel with every slot, no adapter and out-of-range ids."""
    for M, E, S, R in [(1, 32, 4, 16), (7, 13, 3, 5), (129, 128, 8, 64), (5, 40, 2, 72)]:
        logits = torch.randn(M, E, generator=generator).to("cuda", torch.bfloat16)
        xa = torch.randn(M, S * R, generator=generator).cuda()
        lora_b = torch.randn(S, E, R, generator=generator).to("cuda", torch.bfloat16)
        scaling = torch.rand(S, generator=generator).cuda()
        slot_ids = torch.randint(-1, S + 1, (M,), generator=generator).cuda()
        expected = ops.lora_expand(logits, xa, lora_b, scaling, slot_ids, backend="torch").double()
        for pdl in (False, True):
            out = ops.lora_expand(logits, xa, lora_b, scaling, slot_ids, pdl=pdl).double()
            if not torch.allclose(out, expected, rtol=1e-2, atol=1e-2):
                sys.exit(f"wrong lora_expand result at M={M}, E={E}, S={S}, R={R}, pdl={pdl}")


def lora_one_launch(generator):
    """A LoRA layer's logits in one launch (the decode kernel in clusters; M = 8 at rank 64 takes
    the two launches), against those two launches."""
    for M, E, S, R in [(1, 128, 4, 16), (3, 32, 2, 32), (8, 128, 4, 16), (2, 40, 3, 64), (8, 128, 2, 64)]:
        K = 2880
        x = torch.randn(M, K, generator=generator).to("cuda", torch.bfloat16)
        w = (torch.randn(E, K, generator=generator) / K**0.5).to("cuda", torch.bfloat16)
        b = torch.randn(E, generator=generator).to("cuda", torch.bfloat16)
        lora_a = (torch.randn(S * R, K, generator=generator) / K**0.5).to("cuda", torch.bfloat16)
        lora_b = torch.randn(S, E, R, generator=generator).to("cuda", torch.bfloat16)
        scaling = torch.rand(S, generator=generator).cuda()
        slot_ids = torch.randint(-1, S + 1, (M,), generator=generator).cuda()
        logits, xa = ops.router_gemm_with_shrink(x, w, b, lora_a)
        expected = ops.lora_expand(logits, xa, lora_b, scaling, slot_ids)
        for pdl in (False, True):
            out = torch.ops.moegate.router_gemm_lora(x, w, b, lora_a, lora_b, scaling, slot_ids, None, pdl)
            if not torch.equal(out, expected):
                sys.exit(f"wrong router_gemm_lora result at M={M}, E={E}, S={S}, R={R}, pdl={pdl}")


def routing_kernel(generator):
    """The routing kernel alone."""
    for M, E in [(1, 8), (7, 33), (129, 128), (5, 512)]:
        logits = torch.randn(M, E, generator=generator).to("cuda", torch.bfloat16)
        weights, ids = ops.route_logits(logits, 4, "softmax", False, pdl=True)
        check_routing(weights, ids, logits, 4, "softmax")


PARTS = {part.__name__: part for part in (router_kernels, router_tiles, simple_kernel, lora_expand,
                                           lora_one_launch, routing_kernel)}
DEFAULT_PARTS = [part for part in PARTS if part != "router_tiles"]  # router_kernels covers it


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"the parts to run, in this order: {', '.join(PARTS)} (default: all but "
                             "router_tiles)")
    parts = parser.parse_args().parts or DEFAULT_PARTS
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    generator = torch.Generator().manual_seed(0)
    for part in parts:
        PARTS[part](generator)
    torch.cuda.synchronize()
    print(f"sanitize workload ({', '.join(parts)}): all results correct")


if __name__ == "__main__":
    main()
