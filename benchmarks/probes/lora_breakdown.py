"""Where a GateLinearWithLoRA call's time goes: each of its stages alone, and the whole layer.

The layer runs three kernels: the base router GEMM, the shrink (one router GEMM over every slot's A,
fp32 out) and the expand (ops.lora_expand); with its base gate's pdl on, all three launch as PDL
dependents. This times each alone (no PDL), the three as plain ops, and the layer with its base
gate's pdl off and on, on gpt-oss-120b's router (K = 2880, E = 128), 4 slots of rank 64,
CUDA-graph replay, cold weights and adapters (the benchmark's protocol: every call reads another
copy), and prints us per call.

    python benchmarks/probes/lora_breakdown.py [--m 1,16,128] [--replays 20]
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


def stage_times(M: int, replays: int) -> dict:
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
    logits = layers[0].base_layer(x)
    xa = ops.router_gemm(x, layers[0].lora_a_stacked.view(SLOTS * RANK, shape.K), out_dtype=torch.float32)

    def layer_at(i):
        return layers[i % len(layers)]

    def shrink(i):
        return ops.router_gemm(x, layer_at(i).lora_a_stacked.view(SLOTS * RANK, shape.K),
                               out_dtype=torch.float32)

    def expand(i):
        layer = layer_at(i)
        return ops.lora_expand(logits, xa, layer.lora_b_stacked, layer.scaling, slot_ids)

    def serial(i):  # the layer's three kernels, none launched as a PDL dependent
        layer = layer_at(i)
        logits = layer.base_layer(x)
        xa = ops.router_gemm(x, layer.lora_a_stacked.view(SLOTS * RANK, shape.K), out_dtype=torch.float32)
        return ops.lora_expand(logits, xa, layer.lora_b_stacked, layer.scaling, slot_ids)

    stages = {"base": lambda i: layer_at(i).base_layer(x), "shrink": shrink, "expand": expand,
              "serial": serial, "layer": lambda i: layer_at(i)(x)}

    def layer_pdl(i):  # the base gate's pdl on: all three kernels PDL-launched
        layer = layer_at(i)
        layer.base_layer.pdl = True
        try:
            return layer(x)
        finally:
            layer.base_layer.pdl = False

    stages["layer+pdl"] = layer_pdl
    with torch.no_grad():
        return {name: per_call_us(step, weights.calls, replays) for name, step in stages.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,16,128", help="comma-separated token counts")
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("lora_breakdown: needs a CUDA GPU", file=sys.stderr)
        return 2
    bench_floor(args.replays)  # brings the process to the state the benchmark measures in
    print("us per call, cold. serial: the layer's three kernels as ops; layer: GateLinearWithLoRA")
    print(f"{'M':>5} {'base':>7} {'shrink':>7} {'expand':>7} {'sum':>7} {'serial':>7} {'layer':>7} "
          f"{'layer+pdl':>9}")
    for M in (int(m) for m in args.m.split(",")):
        t = stage_times(M, args.replays)
        total = t["base"] + t["shrink"] + t["expand"]
        print(f"{M:>5} {t['base']:7.2f} {t['shrink']:7.2f} {t['expand']:7.2f} {total:7.2f} "
              f"{t['serial']:7.2f} {t['layer']:7.2f} {t['layer+pdl']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
