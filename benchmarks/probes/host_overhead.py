"""Host time per eager router call, by autograd mode: what an un-graphed decode step pays.

At decode sizes the GPU finishes a router call in about 2 us, so eager calls are bound by the host.
This times `torch.ops.moegate.router_gemm` (or the cuBLAS path) back to back, with parameters
that require grad as a GateLinear's do, under inference_mode, no_grad and grad mode, and prints
the best of --repeats runs of --calls calls each, in us per call.

    python benchmarks/probes/host_overhead.py [--backend moegate|cublas] [--m 1] [--e 128] [--k 2880]
"""

import argparse
import time

import torch

from gate import ops

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
         "grad": torch.enable_grad}


def time_calls(call, mode, calls):
    with MODES[mode]():
        for _ in range(calls // 10):  # warm-up: allocator, cuBLAS handles, first-call paths
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="moegate", choices=("moegate", "cublas"))
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--e", type=int, default=128)
    parser.add_argument("--k", type=int, default=2880)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py needs a CUDA GPU")
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


if __name__ == "__main__":
    main()
