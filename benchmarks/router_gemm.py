"""Router-GEMM benchmark: CUDA-graph replay, hot and cold weights, PDL on/off.

Each measurement captures `calls` back-to-back router calls in one CUDA graph and reports the median
over `--replays` replays of (replay time / calls). "cold" rotates distinct weight copies, >= 96 MB
in all per replay, so every call's weights come from HBM as in serving; "hot" reuses one copy.
cuBLAS (F.linear with bias, or addmm with fp32 output) is measured in the same run.

    python benchmarks/router_gemm.py                 # full sweep: table, JSON, PNG, markdown
    python benchmarks/router_gemm.py --quick         # gpt-oss shapes at a few M
    python benchmarks/router_gemm.py --tune          # also every tile configuration of the kernel

Results go to benchmarks/results/router_gemm_<gpu>_<date>.{json,md,png} (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from gate import ops, tuning  # noqa: E402

COLD_BYTES = 96 * 1024 * 1024
SETTLE_GRAPHS = 4  # floor measurements before the first kept row (bench_floor)
MIN_CALLS = 200
M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
M_SHORT = (1, 8, 32, 128, 256)


@dataclass(frozen=True)
class Shape:
    name: str
    K: int
    E: int
    bias: bool
    out_dtype: torch.dtype
    m_values: tuple


GPT_OSS = [
    Shape("gpt-oss-20b", 2880, 32, True, torch.bfloat16, M_SWEEP),
    Shape("gpt-oss-120b", 2880, 128, True, torch.bfloat16, M_SWEEP),
    Shape("gpt-oss-20b fp32", 2880, 32, True, torch.float32, M_SWEEP),
    Shape("gpt-oss-120b fp32", 2880, 128, True, torch.float32, M_SWEEP),
]
OTHERS = [
    Shape("DeepSeek-V3 fp32", 7168, 256, False, torch.float32, M_SHORT),
    Shape("Qwen3-MoE", 2048, 128, False, torch.bfloat16, M_SHORT),
    Shape("Llama-4", 5120, 128, False, torch.bfloat16, M_SHORT),
    Shape("Mixtral", 4096, 8, False, torch.bfloat16, M_SHORT),
    Shape("MiniMax-M2", 3072, 256, False, torch.bfloat16, M_SHORT),
]


@dataclass
class Row:
    shape: str
    K: int
    E: int
    M: int
    out_dtype: str
    cache: str
    provider: str
    us: float


def per_call_us(step, calls: int, replays: int) -> float:
    """Median µs per call of `calls` steps captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: allocator pools, lazy inits
        for i in range(min(calls, 3)):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(samples)


class Weights:
    """One hot copy or enough cold copies of a router's weight (and bias) to exceed the L2."""

    def __init__(self, shape: Shape, cold: bool, generator: torch.Generator):
        bytes_per_copy = shape.E * shape.K * 2
        self.copies = max(1, -(-COLD_BYTES // bytes_per_copy)) if cold else 1
        self.calls = max(MIN_CALLS, self.copies)
        w = (torch.randn(shape.E, shape.K, generator=generator) / shape.K**0.5).to("cuda", torch.bfloat16)
        b = torch.randn(shape.E, generator=generator).to("cuda", torch.bfloat16) if shape.bias else None
        self.weight = [w.clone() for _ in range(self.copies)]
        self.bias = [None if b is None else b.clone() for _ in range(self.copies)]

    def __getitem__(self, i):
        j = i % self.copies
        return self.weight[j], self.bias[j]


def providers(shape: Shape):
    """name -> fn(x, weight, bias) for the rows of one shape."""
    out_dtype = shape.out_dtype

    def cublas(x, w, b):
        if out_dtype == torch.bfloat16:
            return F.linear(x, w, b)
        return ops.router_gemm_cublas(x, w, b, out_dtype)

    return {
        "cublas": cublas,
        "moegate": lambda x, w, b: ops.router_gemm(x, w, b, out_dtype, pdl=False),
        "moegate+pdl": lambda x, w, b: ops.router_gemm(x, w, b, out_dtype, pdl=True),
    }


def tuning_providers(shape: Shape, M: int):
    """Every tile configuration of the Hopper kernel that applies to this M, PDL on and off."""
    if M > 256:
        return {}
    result = {}
    for pdl in (False, True):  # the Hopper kernel's own defaults, whatever the dispatch picks
        result["sm90 auto" + ("+pdl" if pdl else "")] = _sm90_config(shape.out_dtype, pdl, 0, 0, 0)
    if M <= tuning.SMALL_M_MAX_M:
        for experts in (1, 2, 4):
            for pdl in (False, True):
                name = f"small_m x{experts}" + ("+pdl" if pdl else "")
                result[name] = _small_m_config(shape.out_dtype, pdl, experts, 0)
        for tokens in (1, 2, 4, 8):
            if tokens < 2 * M:  # tokens per CTA; wider than the batch would only repeat a row
                for pdl in (False, True):
                    name = f"small_m x1 m{tokens}" + ("+pdl" if pdl else "")
                    result[name] = _small_m_config(shape.out_dtype, pdl, 1, tokens)
    for et in (1, 2):
        for tt in (1, 2, 4):
            if 8 * tt > 4 * max(M, 8):  # token tiles far wider than the batch: nothing to learn
                continue
            for cluster in (4, 8):
                for pdl in (False, True):
                    name = f"sm90 e{et} t{tt} c{cluster}" + ("+pdl" if pdl else "")
                    result[name] = _sm90_config(shape.out_dtype, pdl, et, tt, cluster)
    return result


def _small_m_config(out_dtype, pdl, experts_per_cta, tokens_per_cta):
    return lambda x, w, b: tuning.router_gemm_small_m(x, w, b, out_dtype, pdl, experts_per_cta,
                                                   tokens_per_cta)


def _sm90_config(out_dtype, pdl, expert_tiles, token_tiles, cluster):
    return lambda x, w, b: tuning.router_gemm_sm90(x, w, b, out_dtype, pdl, expert_tiles, token_tiles,
                                                cluster)


def bench_router(shapes, caches, replays, tune, progress) -> list[Row]:
    rows = []
    jobs = [(s, M, cache) for s in shapes for M in s.m_values for cache in caches]
    for shape, M, cache in progress(jobs, desc="router_gemm"):
        fns = providers(shape)
        if tune and cache == "cold":
            fns.update(tuning_providers(shape, M))
        rows += _bench_job(shape, M, cache, fns, replays)
    return rows


def _bench_job(shape: Shape, M: int, cache: str, fns: dict, replays: int) -> list[Row]:
    generator = torch.Generator().manual_seed(M * 31 + shape.E)
    weights = Weights(shape, cache == "cold", generator)
    x = torch.randn(M, shape.K, generator=generator).to("cuda", torch.bfloat16)
    dtype = str(shape.out_dtype).split(".")[-1]
    return [Row(shape.name, shape.K, shape.E, M, dtype, cache, name,
                per_call_us(lambda i, fn=fn: fn(x, *weights[i]), weights.calls, replays))
            for name, fn in fns.items()]


def bench_floor(replays) -> list[Row]:
    """An elementwise kernel on one element: the per-launch floor of a graph node.

    Measured SETTLE_GRAPHS times and the last kept. Within one process, graph timings step up once
    after the first few measurements and stay there (on an H200 this floor went 0.86 -> 1.03 us
    after two; benchmarks/results/README.md), so the first measurements also bring the process to
    the state in which every later row is taken."""
    t = torch.zeros(1, device="cuda")
    for _ in range(SETTLE_GRAPHS):
        us = per_call_us(lambda i: t.add_(1.0), MIN_CALLS, replays)
    return [Row("empty kernel", 0, 0, 1, "float32", "hot", "floor", us)]


def bench_chain(replays, progress) -> list[Row]:
    """Per layer: producer writes x -> router -> consumer top-4 reads the logits, weights rotating
    cold. The router's share is the chain time minus the chain without the router."""
    rows = []
    jobs = [(E, M) for E in (32, 128) for M in (1, 8, 64)]
    for E, M in progress(jobs, desc="chain"):
        rows += _chain_job(E, M, replays)
    return rows


def _chain_job(E: int, M: int, replays: int) -> list[Row]:
    shape = Shape(f"chain E={E}", 2880, E, True, torch.bfloat16, (M,))
    generator = torch.Generator().manual_seed(E + M)
    weights = Weights(shape, True, generator)
    source = torch.randn(M, 2880, generator=generator).to("cuda", torch.bfloat16)
    x = torch.empty_like(source)
    fixed_logits = torch.randn(M, E, device="cuda", dtype=torch.bfloat16)

    def layer(router):
        def step(i):
            torch.mul(source, 1.0 + 1e-3 * (i % 7), out=x)
            logits = fixed_logits if router is None else router(x, *weights[i])
            torch.topk(logits, 4, dim=-1)
        return step

    chain = {"no router": None, **providers(shape)}
    return [Row(shape.name, 2880, E, M, "bfloat16", "cold", f"chain {name}",
                per_call_us(layer(router), weights.calls, replays))
            for name, router in chain.items()]


LORA_M = (1, 8, 32, 128)


def bench_lora(replays, progress, m_values=LORA_M) -> list[Row]:
    """Issue-22 rows, gpt-oss-120b's router, cold: the base gate and GateLinearWithLoRA with 4
    adapters of the rank in its slots (max_rank = the rank, as a server sizes them) and the tokens
    spread over them, each with pdl off, then on (the layer's op picks one launch or two per call);
    the same logits as the two ops (router_gemm_with_shrink, lora_expand), pdl off and on; the
    layer in grad mode (parameters requiring grad, no inference_mode, pdl on); and the PEFT-style
    single-adapter computation F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s. Under
    inference_mode but the grad row, as a server runs."""
    from gate import GateLinear
    from lora import GateLinearWithLoRA, TokenSlots

    rows = []
    jobs = [(M, r) for r in (16, 64) for M in m_values]
    for M, rank in progress(jobs, desc="lora"):
        rows += _lora_job(M, rank, replays, GateLinear, GateLinearWithLoRA, TokenSlots)
    return rows


def _lora_job(M, rank, replays, GateLinear, GateLinearWithLoRA, TokenSlots) -> list[Row]:
    shape = Shape("gpt-oss-120b lora", 2880, 128, True, torch.bfloat16, (M,))
    adapters = 4
    generator = torch.Generator().manual_seed(M + rank)
    weights = Weights(shape, True, generator)
    x = torch.randn(M, shape.K, generator=generator).to("cuda", torch.bfloat16)
    slots = TokenSlots(M, device="cuda")
    slots.set([i % adapters for i in range(M)])
    a = (torch.randn(adapters, rank, shape.K, generator=generator) / shape.K**0.5).to("cuda", torch.bfloat16)
    b = (torch.randn(adapters, shape.E, rank, generator=generator) / rank**0.5).to("cuda", torch.bfloat16)
    layers = []
    for i in range(weights.copies):
        layer = GateLinearWithLoRA(GateLinear.from_parameters(*weights[i]), adapters, rank, slots)
        for slot in range(adapters):
            layer.set_lora(slot, a[slot], b[slot], 2.0)
        layers.append(layer)
    name = f"{shape.name} r={rank}"
    base = [layer.base_layer for layer in layers]

    def peft_style(i):
        w, bias = weights[i]
        return F.linear(x, w, bias) + F.linear(F.linear(x, a[0]), b[0]) * 2.0

    def base_gate(pdl):
        def step(i):
            gate = base[i % len(base)]
            gate.pdl = pdl
            return gate(x)
        return step

    def lora_layer(pdl):
        def step(i):
            layer = layers[i % len(layers)]
            layer.base_layer.pdl = pdl  # the base gate's setting governs all of the layer's kernels
            return layer(x)
        return step

    def two_launches(pdl):  # the layer's logits as the two ops, whatever the layer's op picks
        slot_ids = slots.for_tokens(M)

        def step(i):
            layer = layers[i % len(layers)]
            gate = layer.base_layer
            logits, xa = ops.router_gemm_with_shrink_unchecked(
                x, gate.weight, gate.bias, layer.lora_a_stacked.view(-1, shape.K), None, pdl, "moegate")
            return ops.lora_expand_unchecked(logits, xa, layer.lora_b_stacked, layer.scaling, slot_ids,
                                             ops.EXPAND_PDL, "moegate")
        return step

    def row(provider, fn):
        return Row(name, shape.K, shape.E, M, "bfloat16", "cold", provider,
                   per_call_us(fn, weights.calls, replays))

    with torch.inference_mode():
        rows = [row("lora base", base_gate(False)),
                row("lora base+pdl", base_gate(True)),
                row("lora moegate", lora_layer(False)),
                row("lora moegate+pdl", lora_layer(True)),
                row("lora two launches", two_launches(False)),
                row("lora two launches+pdl", two_launches(True)),
                row("lora peft-style", peft_style)]
    for layer in layers:
        layer.base_layer.weight.requires_grad_(True)
    with torch.enable_grad():
        rows.append(row("lora moegate+pdl grad", lora_layer(True)))
    return rows


def lora_table(rows: list[Row]) -> str:
    """The issue-22 view: the adapted gate against its base gate, in one run."""
    table = _lookup(rows)
    keys = sorted({(r.shape, r.M) for r in rows if r.provider == "lora base"},
                  key=lambda k: (int(k[0].split("r=")[1]), k[1]))
    head = ["rank", "M", "base", "LoRA", "ratio", "base pdl", "LoRA pdl", "ratio", "grad mode, pdl",
            "+ grad", "two launches", "two launches pdl", "PEFT-style"]
    lines = []
    for shape, M in keys:
        get = lambda p, shape=shape, M=M: table.get((shape, M, "cold", p), float("nan"))  # noqa: E731
        base, base_pdl = get("lora base"), get("lora base+pdl")
        lora, pdl, grad = get("lora moegate"), get("lora moegate+pdl"), get("lora moegate+pdl grad")
        lines.append([shape.split("r=")[1], str(M), f"{base:.2f}", f"{lora:.2f}", f"{lora / base:.2f}x",
                      f"{base_pdl:.2f}", f"{pdl:.2f}", f"{pdl / base_pdl:.2f}x", f"{grad:.2f}",
                      f"{grad - pdl:+.2f}", f"{get('lora two launches'):.2f}",
                      f"{get('lora two launches+pdl'):.2f}", f"{get('lora peft-style'):.2f}"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def bench_route(replays, progress) -> list[Row]:
    """Issue-21 rows, gpt-oss routers, cold: the logits alone (router_gemm), the fused routing call
    (ops.route: logits + top-4 + softmax), transformers' GptOssTopKRouter and our GateGptOssRouter
    as a model runs them, and a GateLinearWithLoRA's logits and routing (4 rank-16 adapters)."""
    rows = []
    jobs = [(E, M) for E in (32, 128) for M in (1, 8, 32, 128)]
    for E, M in progress(jobs, desc="route"):
        rows += _route_job(E, M, replays)
    return rows


def _route_job(E: int, M: int, replays: int) -> list[Row]:
    from torch import nn

    from gate import GateLinear
    from lora import GateLinearWithLoRA, TokenSlots

    shape = Shape(f"routing E={E}", 2880, E, True, torch.bfloat16, (M,))
    generator = torch.Generator().manual_seed(E * 7 + M)
    weights = Weights(shape, True, generator)
    x = torch.randn(M, shape.K, generator=generator).to("cuda", torch.bfloat16)
    gates = [GateLinear.from_parameters(*weights[i]) for i in range(weights.copies)]
    counters = torch.zeros(ops.ROUTE_COUNTERS, dtype=torch.int32, device="cuda")
    fns = {
        "route logits": lambda i: ops.router_gemm(x, *weights[i]),
        "route logits+pdl": lambda i: ops.router_gemm(x, *weights[i], pdl=True),
        "route fused": lambda i: ops.route(x, *weights[i], 4, counters=counters),
        "route fused+pdl": lambda i: ops.route(x, *weights[i], 4, pdl=True, counters=counters),
        "route unfused": lambda i: torch.softmax(
            torch.topk(ops.router_gemm(x, *weights[i]), 4, dim=-1).values, dim=1,
            dtype=torch.bfloat16),
    }
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

        from moegate.transformers import GateGptOssRouter
    except ImportError:
        print("transformers is not importable: no transformers router rows", file=sys.stderr)
    else:
        theirs = []
        for i in range(weights.copies):
            router = GptOssTopKRouter.__new__(GptOssTopKRouter)
            nn.Module.__init__(router)
            router.top_k, router.num_experts, router.hidden_dim = 4, E, shape.K
            router.weight, router.bias = (nn.Parameter(t, requires_grad=False) for t in weights[i])
            theirs.append(router)
        ours = [GateGptOssRouter(gate, 4, returns_logits=True) for gate in gates]
        fns["route transformers"] = lambda i: theirs[i % len(theirs)](x)
        fns["route GateGptOssRouter"] = lambda i: ours[i % len(ours)](x)
    slots = TokenSlots(M, device="cuda")
    slots.set([i % 5 - 1 for i in range(M)])
    a = (torch.randn(4, 16, shape.K, generator=generator) / shape.K**0.5).to("cuda", torch.bfloat16)
    b = (torch.randn(4, E, 16, generator=generator) / 4).to("cuda", torch.bfloat16)
    layers = []
    for gate in gates:
        layer = GateLinearWithLoRA(GateLinear.from_parameters(gate.weight, gate.bias, pdl=True), 4, 16,
                                   slots)
        for slot in range(4):
            layer.set_lora(slot, a[slot], b[slot], 2.0)
        layers.append(layer)
    fns["route lora logits+pdl"] = lambda i: layers[i % len(layers)](x)
    fns["route lora routed+pdl"] = lambda i: layers[i % len(layers)].route(x, 4)
    with torch.no_grad():
        return [Row(shape.name, shape.K, E, M, "bfloat16", "cold", name,
                    per_call_us(fn, weights.calls, replays)) for name, fn in fns.items()]


def route_table(rows: list[Row]) -> str:
    """The issue-21 view: fused routing against the logits alone and against transformers."""
    table = _lookup(rows)
    keys = sorted({(r.shape, r.M) for r in rows if r.provider == "route fused"})
    head = ["shape", "M", "logits", "routed", "+", "logits pdl", "routed pdl", "+", "transformers",
            "GateGptOssRouter", "x", "LoRA logits", "LoRA routed", "+"]
    lines = []
    for shape, M in keys:
        get = lambda p, shape=shape, M=M: table.get((shape, M, "cold", p), float("nan"))  # noqa: E731
        t, g = get("route transformers"), get("route GateGptOssRouter")
        lines.append([shape, str(M), f"{get('route logits'):.2f}", f"{get('route fused'):.2f}",
                      f"{get('route fused') - get('route logits'):+.2f}",
                      f"{get('route logits+pdl'):.2f}", f"{get('route fused+pdl'):.2f}",
                      f"{get('route fused+pdl') - get('route logits+pdl'):+.2f}", f"{t:.2f}",
                      f"{g:.2f}", f"{t / g:.2f}", f"{get('route lora logits+pdl'):.2f}",
                      f"{get('route lora routed+pdl'):.2f}",
                      f"{get('route lora routed+pdl') - get('route lora logits+pdl'):+.2f}"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"


def write_results(rows: list[Row], out_dir: str, meta: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"router_gemm_{meta['gpu_slug']}_{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# router_gemm on {meta['gpu']} ({meta['date']}, torch {meta['torch']})\n\n")
        f.write("µs per call, CUDA-graph replay, median; ratio = cuBLAS / moegate.\n\n")
        f.write(format_table(rows, markdown=True))
        if any(r.provider == "lora base" for r in rows):
            f.write("\n## An adapted gate against its base gate, cold, µs per call\n\n")
            f.write(lora_table(rows))
        if any(r.provider == "route fused" for r in rows):
            f.write("\n## Routing (logits + top-k + softmax), cold, µs per call\n\n")
            f.write(route_table(rows))
    plot(rows, stem + ".png")
    return stem


def _lookup(rows):
    return {(r.shape, r.M, r.cache, r.provider): r.us for r in rows}


def format_table(rows: list[Row], markdown: bool = False) -> str:
    table = _lookup(rows)
    keys = sorted({(r.shape, r.M, r.cache) for r in rows if r.provider == "cublas"},
                  key=lambda k: (k[0], k[2], k[1]))
    head = ["shape", "M", "cache", "cuBLAS", "moegate", "moegate+pdl", "x cuBLAS", "x cuBLAS pdl"]
    lines = []
    for shape, M, cache in keys:
        cublas = table[(shape, M, cache, "cublas")]
        ours, pdl = table[(shape, M, cache, "moegate")], table[(shape, M, cache, "moegate+pdl")]
        lines.append([shape, str(M), cache, f"{cublas:.2f}", f"{ours:.2f}", f"{pdl:.2f}",
                      f"{cublas / ours:.2f}", f"{cublas / pdl:.2f}"])
    extra = [r for r in rows
             if r.provider == "floor" or r.provider.startswith(("chain", "lora", "route"))]
    for r in extra:
        lines.append([r.shape, str(r.M), r.cache, r.provider, f"{r.us:.2f}", "", "", ""])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [head, *lines]) + "\n"


# What each panel of the plot draws: router shapes (their cuBLAS rows mark them), the routing rows
# and the LoRA rows, cold weights, µs against M.
PLOT_PROVIDERS = {
    "router": ("cublas", "moegate", "moegate+pdl"),
    "routing": ("route logits", "route fused", "route transformers", "route GateGptOssRouter",
                "route lora logits+pdl", "route lora routed+pdl"),
    "lora": ("lora base", "lora base+pdl", "lora moegate", "lora moegate+pdl", "lora moegate+pdl grad",
             "lora two launches+pdl"),
}


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plot", file=sys.stderr)
        return
    panels = []
    for names in PLOT_PROVIDERS.values():
        panels += [(shape, names) for shape in sorted({r.shape for r in rows if r.provider == names[0]})]
    if not panels:
        return
    cols = min(3, len(panels))
    rows_ = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.5 * cols, 3.4 * rows_), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (shape, names) in zip(axes.flat, panels):
        for provider in names:
            pts = sorted((r.M, r.us) for r in rows
                         if r.shape == shape and r.cache == "cold" and r.provider == provider)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("µs per call (cold)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="gpt-oss shapes at M in {1, 32, 128}")
    parser.add_argument("--tune", action="store_true", help="also time every kernel tile configuration")
    parser.add_argument("--no-chain", action="store_true", help="skip the producer->router->consumer chain")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    parser.add_argument("--no-route", action="store_true", help="skip the routing rows")
    parser.add_argument("--only", default=None, metavar="REGEX", help="shapes whose name matches")
    parser.add_argument("--m", default=None, help="comma-separated M values (default: the sweep)")
    parser.add_argument("--lora-m", default=",".join(map(str, LORA_M)),
                        help="comma-separated M values of the LoRA rows (default: %(default)s)")
    parser.add_argument("--caches", default="hot,cold", help="hot, cold or both (default)")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("router_gemm benchmark: needs a CUDA GPU (this machine has none)", file=sys.stderr)
        return 2
    if ops.backend_for(torch.device("cuda"), torch.bfloat16) != "moegate":
        print(f"warning: moegate kernels unavailable here ({ops.extension_error() or 'no sm90 image'}); "
              "'moegate' rows measure the fallback", file=sys.stderr)
    try:
        from tqdm import tqdm as progress
    except ImportError:
        def progress(items, desc=""):
            return items
    shapes = GPT_OSS[:2] if args.quick else GPT_OSS + OTHERS
    if args.only:
        shapes = [s for s in shapes if re.search(args.only, s.name)]
    m_values = (1, 32, 128) if args.quick else None
    if args.m:
        m_values = tuple(int(m) for m in args.m.split(","))
    if m_values:
        shapes = [Shape(s.name, s.K, s.E, s.bias, s.out_dtype, m_values) for s in shapes]
    rows = bench_floor(args.replays)
    rows += bench_router(shapes, tuple(args.caches.split(",")), args.replays, args.tune, progress)
    if not args.no_chain:
        rows += bench_chain(args.replays, progress)
    if not args.no_lora:
        rows += bench_lora(args.replays, progress, tuple(int(m) for m in args.lora_m.split(",")))
    if not args.no_route:
        rows += bench_route(args.replays, progress)
    gpu = torch.cuda.get_device_name()
    meta = {"gpu": gpu, "gpu_slug": gpu.split()[-1].lower(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
            "replays": args.replays, "cold_bytes": COLD_BYTES, "min_calls": MIN_CALLS}
    stem = write_results(rows, args.out, meta)
    print(format_table(rows))
    if not args.no_lora:
        print(lora_table(rows))
    if not args.no_route:
        print(route_table(rows))
    if args.tune:
        best = {}
        for r in rows:
            if r.provider.startswith(("sm90", "small_m")):
                key = (r.shape, r.M, r.provider.endswith("+pdl"))
                if key not in best or r.us < best[key][1]:
                    best[key] = (r.provider, r.us)
        for key in sorted(best):
            print("best", key, best[key])
    print(f"wrote {stem}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
