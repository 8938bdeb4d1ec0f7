"""The ``moegate`` command line (also ``python -m moegate``).

    moegate inspect ADAPTER_DIR                      targets, ranks, scaling, validation verdict
    moegate verify ADAPTER_DIR --config CONFIG_OR_MODEL_DIR
                                                     routing agreement with PEFT on random inputs
    moegate bench [benchmark args...]                runs benchmarks/router_gemm.py (source checkout)

Exit status: 0 fine, 1 the adapter failed inspection or verification, 2 usage or setup errors.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "router_gemm.py"


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def inspect_command(args) -> int:
    from lora.adapter_io import AdapterError, read_adapter
    from lora.peft_keys import looks_like_router

    try:
        adapter = read_adapter(args.adapter_dir, strict=False)
    except AdapterError as error:
        print(error)
        return 1
    config = adapter.config
    print(f"adapter   {adapter.source}")
    print(f"peft      {getattr(config, 'peft_version', None) or '?'}  LoRA r={config.r} "
          f"lora_alpha={config.lora_alpha} use_rslora={config.use_rslora}")
    print(f"targets   target_parameters={getattr(config, 'target_parameters', None)} "
          f"target_modules={_listed(config.target_modules)} "
          f"layers_to_transform={config.layers_to_transform}")
    if config.rank_pattern or config.alpha_pattern:
        print(f"patterns  rank_pattern={config.rank_pattern} alpha_pattern={config.alpha_pattern}")
    rows = [[name, weights.targeted, weights.rank, f"{weights.scaling:.6g}", list(weights.lora_a.shape),
             list(weights.lora_b.shape), str(weights.lora_a.dtype).replace("torch.", "")]
            for name, weights in sorted(adapter.modules.items())]
    print(f"modules   {len(rows)}")
    _print_table(rows, ["module", "target", "rank", "scaling", "lora_A", "lora_B", "dtype"])
    unusual = [name for name in adapter.modules if not looks_like_router(name)]
    if unusual:
        print(f"note      {len(unusual)} module(s) not named like a router gate (router / gate): "
              f"{', '.join(sorted(unusual)[:4])}; loading checks them against the model")
    if adapter.problems:
        print(f"verdict   NOT SERVABLE: {len(adapter.problems)} problem(s)")
        for problem in adapter.problems:
            print(f"  - {problem}")
        return 1
    print("verdict   OK: servable as far as the files tell (`moegate verify` checks it against a model)")
    return 0


def _listed(value):
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def bench_command(extra: list[str]) -> int:
    if not BENCHMARK.is_file():
        print(f"moegate bench: {BENCHMARK} not found. The benchmark ships with the source tree, not "
              "with the installed package: run it from a checkout of moegate.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(BENCHMARK), *extra])


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:  # NaN included
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1] (0.99 for 99%), got {value}")
    return number


def _device(value: str) -> str:
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {value}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda was asked for, but this torch sees no CUDA device")
    return value


def verify_command(args) -> int:
    import torch

    from lora.adapter_io import AdapterError
    from moegate.verify import NEAR_TIE_ULPS, READING_UNITS, build_model, experts_per_token, verify_adapter

    if not os.path.isdir(args.adapter_dir):  # before building a model for nothing
        print(f"moegate verify: {args.adapter_dir} is not a directory", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    try:
        model = build_model(args.config, random_weights=args.random_weights, num_layers=args.num_layers,
                            device=device, dtype=dtype, seed=args.seed)
        experts_per_token(model.config)  # a config that does not say it is a usage error too
    except Exception as error:  # noqa: BLE001 - any config transformers refuses (its own error types)
        print(f"moegate verify: cannot build the model: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(f"model     {type(model).__name__}, {model.config.num_hidden_layers} layers, {device} "
          f"{str(dtype).replace('torch.', '')}")
    try:
        report = verify_adapter(model, args.adapter_dir, batch=args.batch, seq=args.seq, seed=args.seed,
                                truncated=args.num_layers is not None)
    except (AdapterError, ValueError) as error:
        print(error)
        return 1
    print(f"adapter   {args.adapter_dir}: {len(report.modules)} modules checked"
          + (f", {len(report.skipped)} skipped (layers beyond --num-layers)" if report.skipped else ""))
    dtype_name = str(dtype).replace("torch.", "")
    below_fp32 = dtype != torch.float32
    print(f"routers   alone: the hidden states each router was served, with the adapter, against float64 "
          f"x @ (W + scaling * B @ A).T + b; PEFT's router in {dtype_name} on the same inputs beside ours")
    rows = [[m.module, m.decisions, m.near_ties, m.disagree, m.peft_disagree, f"{m.max_error:.3g}",
             f"{m.peft_max_error:.3g}", f"{m.error_bound:.3g}", f"{m.peft_fp32_error:.3g}",
             "ok" if m.routes_exactly else "FAIL"]
            for m in report.modules]
    _print_table(rows, ["module", "tokens", "near-ties", "top-k != float64", f"PEFT {dtype_name} !=",
                        "max |d logit| ulps", f"PEFT {dtype_name}", "allowed", "PEFT fp32 (sum units)",
                        "alone"])
    print(f"          ulps: of {dtype_name} at each token's max |logit|; near-tie: k-th and (k+1)-th float64 "
          f"logits within {NEAR_TIE_ULPS} ulps; ok: no top-k difference outside near-ties, max |d logit| "
          f"within 2x PEFT's or the floor, and PEFT in float32 within {READING_UNITS:g} sum units of float64 "
          "(float32's eps x the sum of a logit's terms' sizes: it reads the adapter file as we do)")
    print("end to end" + (f" (informative in {dtype_name}: it measures the drift of attention and experts "
                          "ahead of the routers, not the routers)" if below_fp32 else "")
          + ": PEFT in float32 on the same tokens")
    with_bar = report.modules[0].peft_topk_agreement is not None
    header = ["module", "max |d logits|", "top-k agreement"] + ([f"PEFT {dtype_name}"] if with_bar else [])
    rows = [[m.module, f"{m.max_abs_diff:.3g}", f"{100 * m.topk_agreement:.2f}%"]
            + ([f"{100 * m.peft_topk_agreement:.2f}%"] if with_bar else []) for m in report.modules]
    _print_table(rows, header)
    print(f"outputs   max |d logits| {report.logits_max_abs_diff:.3g}, greedy-token agreement "
          f"{100 * report.greedy_agreement:.2f}% over {report.num_tokens} random tokens")
    # The routers alone decide in every dtype; in fp32 only summation order separates us from PEFT,
    # so end-to-end agreement must reach --min-agreement too.
    failing = [m.module for m in report.modules if not m.routes_exactly]
    if not below_fp32:
        failing += [m.module for m in report.modules
                    if m.topk_agreement < args.min_agreement and m.module not in failing]
    lowest = min(m.topk_agreement for m in report.modules)
    rule = ("routers alone" if below_fp32 else
            f"routers alone, and end-to-end top-k agreement >= {100 * args.min_agreement:.2f}%")
    print(f"verdict   {'PASS' if not failing else 'FAIL'}: {rule}; lowest end-to-end top-k agreement "
          f"{100 * lowest:.2f}%" + (f"; failing: {', '.join(failing)}" if failing else ""))
    return 0 if not failing else 1


def main(argv: list[str] | None = None) -> int:
    from gate import __version__

    parser = argparse.ArgumentParser(prog="moegate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"moegate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="targets, ranks, scaling and the verdict of an adapter")
    inspect.add_argument("adapter_dir")
    verify = commands.add_parser("verify", help="routing agreement with PEFT on random inputs")
    verify.add_argument("adapter_dir")
    verify.add_argument("--config", required=True, metavar="CONFIG_OR_MODEL_DIR",
                        help="a transformers config.json (random weights), or a local model directory")
    verify.add_argument("--random-weights", action="store_true",
                        help="random weights even when the directory holds a checkpoint")
    verify.add_argument("--num-layers", type=_positive_int, default=None,
                        help="build only the first N layers (adapter modules beyond are skipped)")
    verify.add_argument("--device", type=_device, default=None, help="default: cuda when available, else cpu")
    verify.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on cuda, float32 on cpu")
    verify.add_argument("--batch", type=_positive_int, default=4)
    verify.add_argument("--seq", type=_positive_int, default=32)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--min-agreement", type=_fraction, default=0.99,
                        help="in float32: the lowest end-to-end top-k agreement of any layer that passes "
                             "(default 0.99); below float32 the routers-alone check decides")
    commands.add_parser("bench", help="run benchmarks/router_gemm.py; other arguments pass through",
                        add_help=False)
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench_command(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "inspect":
        return inspect_command(args)
    return verify_command(args)


if __name__ == "__main__":
    sys.exit(main())
