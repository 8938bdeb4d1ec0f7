"""Host time per eager router call: what an un-graphed decode step pays.

At decode sizes the GPU finishes a router call in about 2 us, so eager calls are bound by the host
(and on the CPU the arithmetic of a small router is cheaper than the Python around it).

Layers (default): the modules a model calls, back to back, in inference mode, beside ``nn.Linear``
and ``F.linear`` on the same weight. One CPU thread, K=64, E=8, M=1 by default (the protocol of
benchmarks/results/README.md, "Host time per call"); ``--device cuda`` runs the same rows on a GPU.
Prints the best of --repeats runs of --calls calls each, in us per call, and each row's ratio to
``nn.Linear``; ``--json PATH`` writes them with the machine and the date.

    python benchmarks/probes/host_overhead.py [--device cpu|cuda] [--k 64] [--e 8] [--m 1] [--json PATH]

Op (``--op``, GPU only): ``torch.ops.moegate.router_gemm`` (or the cuBLAS path) alone, with
parameters that require grad as a GateLinear's do, under inference_mode, no_grad and grad mode.

    python benchmarks/probes/host_overhead.py --op [--backend moegate|cublas] [--m 1] [--e 128] [--k 2880]
"""

import argparse
import datetime
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from gate import GateLinear, ops
from lora import GateLinearWithLoRA, TokenSlots

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
         "grad": torch.enable_grad}
TOP_K = 2
MAX_LORAS, MAX_RANK = 4, 8


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(call, mode, calls, device="cuda"):
    with MODES[mode]():
        for _ in range(calls // 10):  # warm-up: allocator, cuBLAS handles, first-call paths
            call()
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        _synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def layer_calls(device: torch.device, k: int, e: int, m: int) -> dict:
    """The calls the layers protocol times, by row name: each makes one router call on x [m, k]."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    linear = nn.Linear(k, e, device=device, dtype=dtype)
    gate = GateLinear.from_linear(linear)
    slots = TokenSlots(max_tokens=max(m, 16), device=device)
    lora = GateLinearWithLoRA(GateLinear.from_linear(linear), MAX_LORAS, MAX_RANK, token_slots=slots)
    for slot in range(MAX_LORAS):
        lora.set_lora(slot, torch.randn(MAX_RANK, k, device=device, dtype=dtype) / k**0.5,
                      torch.randn(e, MAX_RANK, device=device, dtype=dtype), scaling=2.0)
    mapping = [slot % MAX_LORAS for slot in range(m)]
    slots.set(mapping)
    x = torch.randn(m, k, device=device, dtype=dtype)
    weight, bias = linear.weight, linear.bias
    return {
        "nn.Linear": lambda: linear(x),
        "F.linear": lambda: F.linear(x, weight, bias),
        "GateLinear": lambda: gate(x),
        "GateLinear.route": lambda: gate.route(x, TOP_K),
        "GateLinearWithLoRA": lambda: lora(x),
        "GateLinearWithLoRA.route": lambda: lora.route(x, TOP_K),
        f"TokenSlots.set({mapping})": lambda: slots.set(mapping),
    }


def layers_main(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    torch.set_num_threads(args.threads)
    calls = layer_calls(device, args.k, args.e, args.m)
    rows = {name: min(time_calls(call, "inference_mode", args.calls, device)
                      for _ in range(args.repeats)) for name, call in calls.items()}
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else
               platform.processor() or platform.machine())
    header = (f"{machine}, torch {torch.__version__}, {args.threads} thread(s), backend "
              f"{ops.backend_for(device, torch.bfloat16 if device.type == 'cuda' else torch.float32)}, "
              f"K={args.k} E={args.e} M={args.m}, inference mode, best of {args.repeats} x {args.calls}")
    print(header)
    print(f"{'call':34s} {'us':>7s} {'x nn.Linear':>12s}")
    for name, us in rows.items():
        print(f"{name:34s} {us:7.2f} {us / rows['nn.Linear']:12.2f}")
    if args.json:
        record = {"date": datetime.date.today().isoformat(), "machine": machine,
                  "platform": platform.platform(), "torch": torch.__version__, "device": str(device),
                  "threads": args.threads, "K": args.k, "E": args.e, "M": args.m, "top_k": TOP_K,
                  "max_loras": MAX_LORAS, "max_rank": MAX_RANK, "calls": args.calls,
                  "repeats": args.repeats, "us_per_call": rows,
                  "ratio_to_nn_linear": {name: us / rows["nn.Linear"] for name, us in rows.items()}}
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)
            out.write("\n")


def op_main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py --op needs a CUDA GPU")
    if args.backend == "moegate" and ops.backend_for(torch.device("cuda"), torch.bfloat16) != "moegate":
        raise SystemExit(f"the moegate backend cannot run here: {ops.extension_error() or 'no sm_90a GPU'}")
    weight = torch.randn(args.e, args.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(args.e, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    if args.backend == "moegate":  # the op itself, as GateLinearWithLoRA calls it
        def call():
            return torch.ops.moegate.router_gemm(x, weight, bias, None, False)
    else:
        def call():
            return ops.router_gemm_cublas(x, weight, bias)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backend {args.backend}, "
          f"M={args.m} E={args.e} K={args.k}")
    for mode in MODES:
        best = min(time_calls(call, mode, args.calls) for _ in range(args.repeats))
        print(f"{mode:15s} {best:6.2f} us per call")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="store_true", help="the op alone by autograd mode (GPU)")
    parser.add_argument("--device", default="cpu", help="layers protocol: cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="layers protocol: torch threads")
    parser.add_argument("--json", default=None, help="layers protocol: write the rows here")
    parser.add_argument("--backend", default="moegate", choices=("moegate", "cublas"))
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--e", type=int, default=None, help="default: 8 (layers), 128 (--op)")
    parser.add_argument("--k", type=int, default=None, help="default: 64 (layers), 2880 (--op)")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.e = args.e or (128 if args.op else 8)
    args.k = args.k or (2880 if args.op else 64)
    op_main(args) if args.op else layers_main(args)


if __name__ == "__main__":
    main()
