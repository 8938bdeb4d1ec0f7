"""Per-instruction counts of an Nsight Compute report, on a machine without Nsight Compute.

    python benchmarks/probes/ncu_source_counters.py REPORT.ncu-rep [--out FILE]

Prints the profiled kernel's SASS (from the cubin the report embeds, through cuobjdump) with, per
instruction, how many times warps executed it (`inst_executed`) and how many PC samples landed on
it (`smsp__pcsamp_sample_count`), then totals. A report needs the SourceCounters section
(`ncu --set full`). Where Nsight Compute is installed, `ncu --import REPORT --page source --csv
--print-source sass` says the same; this reads the report file itself, so that the reports a GPU
run brings back can be read here.

The report format is not documented. What this relies on, observed in reports of Nsight Compute
2025-2026: after a 10-byte header the file is a sequence of blocks, each a little-endian uint32
length and a protobuf message; block 3 holds the metric names (repeated field 4.1), and the
later blocks hold the results, field 13 per metric: {1: name index, 2: value, 3: per-PC entries
{1: {5: address}, 2: {5: value}}}; field 5 of block 4 is the kernel's mangled name. A report that
does not parse so is refused with a message, never half-read.
"""

import argparse
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

METRICS = ("inst_executed", "smsp__pcsamp_sample_count")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def fields(data: bytes) -> list[tuple[int, int, object]] | None:
    """The (field, wire type, value) triples of a protobuf message, or None if `data` is not one."""
    out, i = [], 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            field, wire = key >> 3, key & 7
            if field == 0:
                return None
            if wire == 0:
                value, i = _varint(data, i)
            elif wire == 1:
                value, i = struct.unpack_from("<Q", data, i)[0], i + 8
            elif wire == 5:
                value, i = struct.unpack_from("<I", data, i)[0], i + 4
            elif wire == 2:
                size, i = _varint(data, i)
                if i + size > len(data):
                    return None
                value, i = data[i : i + size], i + size
            else:
                return None
            out.append((field, wire, value))
    except (IndexError, struct.error):
        return None
    return out


def _only(message: bytes, field: int):
    parsed = fields(message) or []
    return next((v for f, _, v in parsed if f == field), None)


def blocks(report: bytes) -> list[bytes]:
    out, i = [], 10
    while i + 4 <= len(report):
        size = struct.unpack_from("<I", report, i)[0]
        out.append(report[i + 4 : i + 4 + size])
        i += 4 + size
    return out


def per_pc(report: bytes) -> tuple[str, dict[str, dict[int, int]]]:
    """The kernel's mangled name and, for each of METRICS, its value at each instruction address."""
    parts = blocks(report)
    names_message = _only(parts[3], 4) if len(parts) > 4 else None
    if names_message is None:
        raise ValueError("no metric-name table where this reader expects one (block 3)")
    names = [v.decode() for f, w, v in fields(names_message) or [] if f == 1 and w == 2]
    kernel = _only(parts[4], 5)
    if not isinstance(kernel, bytes):
        raise ValueError("no kernel name where this reader expects one (block 4, field 5)")
    counts: dict[str, dict[int, int]] = {}
    for part in parts[4:]:
        for field, wire, value in fields(part) or []:
            if field != 13 or wire != 2:
                continue
            metric = fields(value) or []
            index = next((v for f, _, v in metric if f == 1), None)
            if index is None or index >= len(names) or names[index] not in METRICS:
                continue
            pcs = {}
            for f, _, entry in metric:
                if f == 3:
                    address, amount = _only(entry, 1), _only(entry, 2)
                    pcs[_only(address, 5)] = _only(amount, 5)
            if pcs:
                counts[names[index]] = pcs
    missing = [m for m in METRICS if m not in counts]
    if missing:
        raise ValueError(f"no per-instruction values of {missing}: was the report taken with --set full?")
    return kernel.decode(), counts


def embedded_sass(report: bytes, kernel: str, cuobjdump: str) -> list[tuple[int, str]]:
    """(offset, instruction) of `kernel` in the first cubin embedded in the report that holds it."""
    for match in re.finditer(rb"\x7fELF", report):
        elf = report[match.start() :]
        ph_offset, sh_offset = struct.unpack_from("<QQ", elf, 0x20)
        ph_size, ph_count, sh_size, sh_count = struct.unpack_from("<HHHH", elf, 0x36)
        end = max(ph_offset + ph_size * ph_count, sh_offset + sh_size * sh_count)
        for n in range(sh_count):
            header = sh_offset + n * sh_size
            if struct.unpack_from("<I", elf, header + 4)[0] != 8:  # SHT_NOBITS has no bytes
                offset, size = struct.unpack_from("<QQ", elf, header + 0x18)
                end = max(end, offset + size)
        cubin = Path("/tmp") / f"ncu_source_counters_{match.start()}.cubin"
        cubin.write_bytes(elf[:end])
        sass = subprocess.run(
            [cuobjdump, "-sass", "-fun", kernel, str(cubin)], capture_output=True, text=True
        ).stdout
        cubin.unlink()
        lines = [
            (int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)
        ]
        if lines:
            return lines
    raise ValueError(f"no embedded cubin holds {kernel}")


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for candidate in Path(sys.prefix).glob("lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump"):
        return str(candidate)
    raise SystemExit("cuobjdump not found: install the bench extra (pip install -e .[bench])")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--out", help="write the annotated SASS here instead of standard output")
    args = parser.parse_args()
    report = Path(args.report).read_bytes()
    try:
        kernel, counts = per_pc(report)
        sass = embedded_sass(report, kernel, find_cuobjdump())
    except ValueError as error:
        raise SystemExit(f"{args.report}: {error}") from None
    executed, samples = (counts[m] for m in METRICS)
    base = min(executed)  # the kernel's first instruction runs in every warp
    lines = [f"{'offset':>6} {'executed':>9} {'samples':>7}  instruction"]
    lines += [
        f"{offset:6x} {executed.get(base + offset, 0):9d} {samples.get(base + offset, 0):7d}  {text}"
        for offset, text in sass
    ]
    lines.append(
        f"# {kernel}: {sum(executed.values())} warp instructions executed, "
        f"{sum(samples.values())} PC samples, {len(sass)} SASS instructions"
    )
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(lines[-1])
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
