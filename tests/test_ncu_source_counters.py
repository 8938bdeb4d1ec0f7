"""The Nsight Compute report reader of benchmarks/probes/ncu_source_counters.py, on a made-up report
in the layout it documents (no GPU, no Nsight Compute): the per-instruction counts a GPU run brings
back must be read right or refused, never half-read."""

import importlib.util
import os
import struct

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reader():
    spec = importlib.util.spec_from_file_location(
        "ncu_source_counters", os.path.join(ROOT, "benchmarks", "probes", "ncu_source_counters.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number, value):
    """One protobuf field: an int as a varint, bytes as a length-delimited value."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def fixed32(number, value):
    return varint(number << 3 | 5) + struct.pack("<I", value)


def metric(index, per_pc):
    entries = b"".join(field(3, field(1, fixed32(5, pc)) + field(2, fixed32(5, n)))
                       for pc, n in per_pc.items())
    return field(13, field(1, index) + field(2, fixed32(5, sum(per_pc.values()))) + entries)


def report(names, kernel, metrics):
    blocks = [field(1, 7), field(1, 1), field(1, 2)]
    blocks.append(field(4, b"".join(field(1, name.encode()) for name in names)))
    blocks.append(field(5, kernel.encode()) + b"".join(metrics))
    return b"NVR\0" + bytes(6) + b"".join(struct.pack("<I", len(b)) + b for b in blocks)


def test_reads_each_instructions_counts_by_metric_name(reader):
    names = ["launch__grid_size", "smsp__pcsamp_sample_count", "thread_inst_executed", "inst_executed"]
    executed = {0x1000: 1024, 0x1010: 1024, 0x1020: 128, 0x1030: 3430}
    samples = {0x1000: 7, 0x1020: 42}
    data = report(names, "_Z6kernelv", [metric(2, {0x1000: 99}), metric(3, executed), metric(1, samples)])
    kernel, counts = reader.per_pc(data)
    assert kernel == "_Z6kernelv"
    assert counts["inst_executed"] == executed  # not thread_inst_executed's
    assert counts["smsp__pcsamp_sample_count"] == samples


def test_a_report_without_source_counters_is_refused(reader):
    names = ["inst_executed", "smsp__pcsamp_sample_count"]
    with pytest.raises(ValueError, match="--set full"):
        reader.per_pc(report(names, "_Z6kernelv", [metric(0, {0x1000: 1})]))


def test_a_file_that_is_not_a_report_is_refused(reader):
    with pytest.raises(ValueError, match="metric-name table"):
        reader.per_pc(b"| shape | M | us |\n|---|---|---|\n" * 10)
