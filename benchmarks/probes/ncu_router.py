"""Nsight Compute's view of one router call: how long a CTA lives, what its warps wait for.

Runs itself under `ncu` (full section set, `--clock-control none`, `--cache-control none`) and
profiles one eager call of `torch.ops.moegate.router_gemm` (with --lora R: `router_gemm_lora`, 4
slots of rank R, the tokens spread over them) after a few warm-up calls. Weights (and adapters)
rotate through >= 96 MB of copies, so each call reads them from HBM, while x stays in L2: the cold
case of `benchmarks/router_gemm.py`. Prints the kernel, its duration, the busiest SM's active cycles (a
CTA's lifetime), instructions per warp, DRAM bytes and the warps' top stall reasons (cycles per
issued instruction); the full report is kept as a .ncu-rep under --out.

    python benchmarks/probes/ncu_router.py [--e 128] [--m 8] [--k 2880] [--fp32] [--pdl] [--lora R]
                                          [--out DIR]

A single eager launch under ncu is not a CUDA-graph replay: durations come out longer than the
benchmark's. Compare the parts, not the totals.
"""

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile

import torch

WARMUP_CALLS = 4
LORA_SLOTS = 4
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def run_calls(args):
    """The profiled process: WARMUP_CALLS calls, then the one ncu records."""
    from gate import ops

    if ops.backend_for(torch.device("cuda"), torch.bfloat16) != "moegate":
        raise SystemExit(f"the moegate backend cannot run here: {ops.extension_error() or 'no sm_90a GPU'}")
    copies = max(1, (96 << 20) // (args.e * args.k * 2) + 1)
    weights = torch.randn(copies, args.e, args.k, device="cuda", dtype=torch.bfloat16) * 0.05
    bias = torch.randn(args.e, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    out_dtype = torch.float32 if args.fp32 else None
    if args.lora:
        S, R = LORA_SLOTS, args.lora
        lora_a = torch.randn(copies, S * R, args.k, device="cuda", dtype=torch.bfloat16) * 0.02
        lora_b = torch.randn(copies, S, args.e, R, device="cuda", dtype=torch.bfloat16) * 0.1
        scaling = torch.full((S,), 2.0, device="cuda")
        slot_ids = torch.arange(args.m, device="cuda") % S
    for i in range(WARMUP_CALLS + 1):
        c = i % copies
        if args.lora:
            torch.ops.moegate.router_gemm_lora(x, weights[c], bias, lora_a[c], lora_b[c], scaling,
                                               slot_ids, out_dtype, args.pdl)
        else:
            torch.ops.moegate.router_gemm(x, weights[c], bias, out_dtype, args.pdl)
    torch.cuda.synchronize()


def summarize(report: str, ncu: str) -> str:
    raw = subprocess.run([ncu, "--import", report, "--page", "raw", "--csv"], check=True,
                         capture_output=True, text=True).stdout
    rows = list(csv.reader(io.StringIO(raw)))
    if len(rows) < 3:
        raise SystemExit(f"ncu recorded no router kernel:\n{raw[-2000:]}")
    values = dict(zip(rows[0], rows[2]))
    units = dict(zip(rows[0], rows[1]))

    def number(key):
        return float(values[key].replace(",", ""))

    def measured(key):  # value with ncu's unit, which ncu scales to the magnitude (us, Kbyte, ...)
        return f"{number(key):.2f} {units[key]}"

    warps = number("launch__grid_size") * number("launch__block_size") / 32
    stalls = sorted(((number(k), k[len(STALL_PREFIX):-len(STALL_SUFFIX)]) for k in values
                     if k.startswith(STALL_PREFIX) and k.endswith(STALL_SUFFIX)), reverse=True)
    lines = [
        f"kernel               {values['Kernel Name'][:100]}",
        f"grid x block         {values['launch__grid_size']} x {values['launch__block_size']}"
        f"  ({values['launch__registers_per_thread']} registers/thread)",
        f"duration             {measured('gpu__time_duration.sum')} at "
        f"{measured('smsp__cycles_elapsed.avg.per_second')}",
        f"busiest SM active    {number('sm__cycles_active.max'):.0f} cycles",
        f"instructions/warp    {number('smsp__inst_executed.sum') / warps:.0f}",
        f"DRAM read            {measured('dram__bytes_read.sum')}",
        "stalls (cycles per issued instruction): "
        + ", ".join(f"{name} {value:.2f}" for value, name in stalls[:6]),
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e", type=int, default=128)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--k", type=int, default=2880)
    parser.add_argument("--fp32", action="store_true", help="fp32 logits")
    parser.add_argument("--pdl", action="store_true", help="launch with programmatic dependent launch")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help=f"profile router_gemm_lora with {LORA_SLOTS} slots of rank R instead")
    parser.add_argument("--out", default=None, help="where the .ncu-rep goes (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_router.py needs a CUDA GPU")
    if args.child:
        run_calls(args)
        return
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on PATH")
    out_dir = args.out or tempfile.mkdtemp(prefix="moegate-ncu-")
    os.makedirs(out_dir, exist_ok=True)
    name = (f"router_e{args.e}_m{args.m}_k{args.k}{'_fp32' if args.fp32 else ''}"
            f"{'_pdl' if args.pdl else ''}{f'_lora{args.lora}' if args.lora else ''}")
    report = os.path.join(out_dir, name)
    child = [sys.executable, os.path.abspath(__file__), "--child", "--e", str(args.e), "--m",
             str(args.m), "--k", str(args.k), "--lora", str(args.lora)] + ["--fp32"] * args.fp32 + \
        ["--pdl"] * args.pdl
    profile = [ncu, "--set", "full", "--clock-control", "none", "--cache-control", "none",
               "-k", "regex:router_gemm", "--launch-skip", str(WARMUP_CALLS), "--launch-count", "1",
               "-f", "-o", report]
    done = subprocess.run(profile + child, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ncu failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    print(f"{torch.cuda.get_device_name()}, M={args.m} E={args.e} K={args.k}, "
          f"{'fp32' if args.fp32 else 'bf16'} logits, pdl={args.pdl}, lora rank {args.lora or '-'}; "
          f"report {report}.ncu-rep")
    print(summarize(report + ".ncu-rep", ncu))


if __name__ == "__main__":
    main()
