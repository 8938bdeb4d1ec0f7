"""The benchmark's tables, results files and plot, on made-up rows (no GPU): a GPU run is scarce, and
a benchmark that fails after its measurements loses them."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("router_gemm_bench",
                                                  os.path.join(ROOT, "benchmarks", "router_gemm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def made_up_rows(bench):
    """Every provider the benchmark writes, with times that tell the columns apart."""
    Row = bench.Row
    rows = []
    for E in (32, 128):
        for M in (1, 8):
            for i, provider in enumerate(("cublas", "moegate", "moegate+pdl")):
                rows.append(Row(f"gpt-oss E={E}", 2880, E, M, "bfloat16", "cold", provider, 7.0 - 2 * i))
            for i, provider in enumerate(("route logits", "route logits+pdl", "route fused",
                                          "route fused+pdl", "route unfused", "route transformers",
                                          "route GateGptOssRouter", "route lora logits+pdl",
                                          "route lora routed+pdl")):
                rows.append(Row(f"routing E={E}", 2880, E, M, "bfloat16", "cold", provider, 1.0 + i))
    for rank in (16, 64):
        for M in (1, 8):
            for provider, us in (("lora base", 2.0), ("lora base+pdl", 1.0), ("lora moegate", 4.0),
                                 ("lora moegate+pdl", 3.0), ("lora peft-style", 20.0),
                                 ("lora moegate+pdl grad", 3.1), ("lora two launches", 5.0),
                                 ("lora two launches+pdl", 4.5)):
                rows.append(Row(f"gpt-oss-120b lora r={rank}", 2880, 128, M, "bfloat16", "cold",
                                provider, us))
    return rows


def test_lora_table_compares_each_layer_with_its_base(bench):
    table = bench.lora_table(made_up_rows(bench))
    lines = table.strip().splitlines()
    assert lines[0].startswith("| rank | M | base | LoRA | ratio | base pdl | LoRA pdl | ratio |")
    assert len(lines) == 2 + 4  # header, rule, two ranks x two M
    assert ("| 16 | 1 | 2.00 | 4.00 | 2.00x | 1.00 | 3.00 | 3.00x | 3.10 | +0.10 | 5.00 | 4.50 | 20.00 |"
            in lines)


def test_route_table_has_a_row_per_shape_and_m(bench):
    table = bench.route_table(made_up_rows(bench))
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 4
    # routed minus logits, and transformers over ours
    assert "| routing E=128 | 1 | 1.00 | 3.00 | +2.00 |" in table
    assert "| 6.00 | 7.00 | 0.86 |" in table


def test_results_files_and_plot_are_written(bench, tmp_path):
    pytest.importorskip("matplotlib")
    meta = {"gpu": "made-up GPU", "gpu_slug": "gpu", "torch": "x", "cuda": "x", "date": "2026-01-01"}
    rows = made_up_rows(bench)
    stem = bench.write_results(rows, str(tmp_path), meta)
    with open(stem + ".json") as f:
        assert len(json.load(f)["rows"]) == len(rows)
    with open(stem + ".md") as f:
        text = f.read()
    assert "## An adapted gate against its base gate" in text and "## Routing" in text
    assert os.path.getsize(stem + ".png") > 0
    assert bench.format_table(rows)  # the console table
