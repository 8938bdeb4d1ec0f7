"""Where a GateLinearWithLoRA call's time goes: each of its stages alone, and the whole layer.

The layer computes the base router GEMM, the shrink (one router GEMM over every slot's A, fp32
out) and the expand (ops.lora_expand); where the decode kernel serves the base gate (and no gradient
is needed) the first two are one launch (ops.router_gemm_with_shrink). With its base gate's pdl on,
its kernels launch as PDL dependents. This times each stage alone (no PDL), the three as separate
ops, and the layer with its base gate's pdl off and on, on gpt-oss-120b's router (K = 2880,
E = 128), 4 slots of rank 64, CUDA-graph replay, cold weights and adapters (the benchmark's
protocol: every call reads another copy), and prints us per call.

    python benchmarks/probes/lora_breakdown.py [--m 1,16,128] [--replays 20] [--pdl-combinations]

--pdl-combinations also times the three ops, and the two of the fused path, with each choice of
which kernels launch as PDL dependents.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from router_gemm import Shape, Weights, bench_floor, per_call_us  # noqa: E402

from gate import GateLinear, ops  # noqa: E402
from lora import GateLinearWithLoRA, TokenSlots  # noqa: E402

SLOTS, RANK = 4, 64


# Which of (base, shrink, expand) launch as PDL dependents, for --pdl-combinations.
COMBINATIONS = [(False, False, False), (False, True, False), (False, False, True),
                (False, True, True), (True, True, True)]
# Which of (base gate + shrink in one launch, expand) launch as PDL dependents: the layer's two
# launches where the decode kernel serves, for --pdl-combinations.
FUSED_COMBINATIONS = [(False, False), (False, True), (True, True)]


def stage_times(M: int, replays: int, combinations: bool) -> dict:
    shape = Shape("gpt-oss-120b", 2880, 128, True, torch.bfloat16, (M,))
    generator = torch.Generator().manual_seed(M)
    weights = Weights(shape, True, generator)
    x = torch.randn(M, shape.K, generator=generator).to("cuda", torch.bfloat16)
    slots = TokenSlots(M, device="cuda")
    slots.set([i % SLOTS for i in range(M)])
    layers = []
    for i in range(weights.copies):
        layer = GateLinearWithLoRA(GateLinear.from_parameters(*weights[i]), SLOTS, RANK, slots)
        for slot in range(SLOTS):
            a = torch.randn(RANK, shape.K, generator=generator) / shape.K**0.5
            b = torch.randn(shape.E, RANK, generator=generator) / RANK**0.5
            layer.set_lora(slot, a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16), 2.0)
        layers.append(layer)
    slot_ids = slots.for_tokens(M)

    def layer_at(i):
        return layers[i % len(layers)]

    def base(i, pdl=False):
        gate = layer_at(i).base_layer
        return ops.router_gemm(x, gate.weight, gate.bias, pdl=pdl)

    def shrink(i, pdl=False):
        return ops.router_gemm(x, layer_at(i).lora_a_stacked.view(SLOTS * RANK, shape.K),
                               out_dtype=torch.float32, pdl=pdl)

    def expand(i, logits, xa, pdl=False):
        layer = layer_at(i)
        return ops.lora_expand(logits, xa, layer.lora_b_stacked, layer.scaling, slot_ids, pdl=pdl)

    def as_ops(pdl_base, pdl_shrink, pdl_expand):  # the three stages as separate ops
        return lambda i: expand(i, base(i, pdl_base), shrink(i, pdl_shrink), pdl_expand)

    def fused(pdl_first, pdl_expand):  # base + shrink in one op, then the expand
        def step(i):
            gate = layer_at(i).base_layer
            a = layer_at(i).lora_a_stacked.view(SLOTS * RANK, shape.K)
            return expand(i, *ops.router_gemm_with_shrink(x, gate.weight, gate.bias, a, pdl=pdl_first),
                          pdl_expand)
        return step

    def layer_call(pdl):
        def step(i):
            layer_at(i).base_layer.pdl = pdl  # governs all three kernels
            return layer_at(i)(x)
        return step

    logits, xa = base(0), shrink(0)
    stages = {"base": base, "shrink": shrink, "expand": lambda i: expand(i, logits, xa),
              "serial": as_ops(False, False, False), "layer": layer_call(False),
              "layer+pdl": layer_call(True)}
    if combinations:
        stages.update({flags: as_ops(*flags) for flags in COMBINATIONS})
        stages.update({("fused",) + flags: fused(*flags) for flags in FUSED_COMBINATIONS})
    with torch.no_grad():
        return {name: per_call_us(step, weights.calls, replays) for name, step in stages.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,128", help="comma-separated token counts")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--pdl-combinations", action="store_true",
                        help="also time the three ops with each choice of PDL launches")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("lora_breakdown: needs a CUDA GPU", file=sys.stderr)
        return 2
    bench_floor(args.replays)  # brings the process to the state the benchmark measures in
    columns = ["base", "shrink", "expand", "sum", "serial", "layer", "layer+pdl"]
    if args.pdl_combinations:
        columns += COMBINATIONS + [("fused",) + flags for flags in FUSED_COMBINATIONS]
    label = {flags: "pdl " + ",".join(str(int(f)) for f in flags) for flags in COMBINATIONS}
    label.update({("fused",) + flags: "fused " + ",".join(str(int(f)) for f in flags)
                  for flags in FUSED_COMBINATIONS})
    print("us per call, cold. serial: the three stages as separate ops; layer: GateLinearWithLoRA; "
          "pdl b,s,e: which of base, shrink, expand launch as PDL dependents; fused f,e: the same "
          "for the base gate and shrink in one launch, then the expand")
    print(f"{'M':>5} " + " ".join(f"{label.get(c, c):>10}" for c in columns))
    for M in (int(m) for m in args.m.split(",")):
        t = stage_times(M, args.replays, args.pdl_combinations)
        t["sum"] = t["base"] + t["shrink"] + t["expand"]
        print(f"{M:>5} " + " ".join(f"{t[c]:10.2f}" for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
