"""The moegate command line: inspect, verify (against the real PEFT), bench pass-through."""

import json
import re

import pytest
import torch

pytest.importorskip("transformers")
from moe_models import (  # noqa: E402
    gate_config,
    gpt_oss,
    mixtral_style,
    needs_target_parameters,
    router_config,
    tiny_moe,
    train_peft_adapter,
)

import moegate.__main__ as cli  # noqa: E402

pytestmark = needs_target_parameters


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny gpt-oss config and a PEFT router adapter trained on that model."""
    root = tmp_path_factory.mktemp("cli")
    model = gpt_oss(seed=0)  # the seed verify builds with: same random weights
    model.config.save_pretrained(root / "model")
    train_peft_adapter(model, root / "adapter", router_config(), seed=50)
    return root


def test_inspect_reports_targets_ranks_scaling_and_verdict(workspace, capsys):
    assert cli.main(["inspect", str(workspace / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "target_parameters=['mlp.router.weight']" in out
    for layer in range(2):
        assert f"model.layers.{layer}.mlp.router  parameter  4     2 " in out
    assert "verdict   OK" in out


def test_inspect_lists_every_problem(tmp_path, capsys):
    path = train_peft_adapter(mixtral_style(seed=1), tmp_path / "dora", gate_config(use_dora=True))
    assert cli.main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NOT SERVABLE" in out and "DoRA (use_dora=True) is not supported" in out
    assert "lora_magnitude_vector" in out
    assert cli.main(["inspect", str(tmp_path / "nowhere")]) == 1
    assert "is not a directory" in capsys.readouterr().out


def test_verify_passes_against_peft(workspace, capsys):
    assert cli.main(["verify", str(workspace / "adapter"), "--config", str(workspace / "model"),
                     "--batch", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.router" in out and "100.00%" in out and "verdict   PASS" in out


def verify_bf16(workspace, *extra):
    return cli.main(["verify", str(workspace / "adapter"), "--config", str(workspace / "model"),
                     "--dtype", "bfloat16", "--seq", "16", *extra])


def test_verify_in_bf16_judges_the_routers_alone_against_float64(workspace, capsys):
    assert verify_bf16(workspace) == 0
    out = capsys.readouterr().out
    assert "against float64 x @ (W + scaling * B @ A).T + b" in out and "PEFT bfloat16 !=" in out
    for layer in range(2):
        assert re.search(rf"model\.layers\.{layer}\.mlp\.router +64 +\d+ +0 +\d+ .* ok\n", out), out
    assert "end to end (informative in bfloat16" in out and "verdict   PASS: routers alone" in out


def test_verify_in_bf16_fails_an_adapter_served_wrongly(workspace, capsys, monkeypatch):
    """A serving defect (every slot's scaling 10% off) must fail the bf16 verdict: top-k sets differ
    from float64 outside near-ties, and the logit error exceeds twice PEFT's."""
    from lora import adapter_io

    write = adapter_io.BoundAdapter.write

    def scaled_wrongly(self, slot, writes=None):
        object.__setattr__(self, "factors", {name: (a, b, 1.1 * scaling)
                                             for name, (a, b, scaling) in self.factors.items()})
        return write(self, slot, writes)

    monkeypatch.setattr(adapter_io.BoundAdapter, "write", scaled_wrongly)
    assert verify_bf16(workspace) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "verdict   FAIL: routers alone" in out
    assert "failing: model.layers.0.mlp.router, model.layers.1.mlp.router" in out


def test_verify_fails_where_peft_reads_the_file_another_way(workspace, capsys, monkeypatch):
    """Our reading of the file builds the float64 reference: if it differed from PEFT's (here every
    module's scaling 10% off in our reading, served consistently), PEFT's larger error must not
    widen the bound. PEFT in float32 against the reference says which reading it took."""
    import dataclasses

    from moegate import verify

    read = verify.read_adapter

    def misread(path):
        adapter = read(path)
        modules = {name: dataclasses.replace(w, scaling=1.1 * w.scaling)
                   for name, w in adapter.modules.items()}
        return verify.RouterAdapter(adapter.config, modules, source=adapter.source)

    monkeypatch.setattr(verify, "read_adapter", misread)
    assert verify_bf16(workspace) == 1
    out = capsys.readouterr().out
    assert "verdict   FAIL: routers alone" in out
    assert "failing: model.layers.0.mlp.router, model.layers.1.mlp.router" in out


def test_verify_refuses_modules_the_model_lacks_unless_truncated(workspace, tmp_path, capsys):
    """An adapter for a deeper model: its modules past the model's layers are skipped only where
    --num-layers cut them off; otherwise the adapter cannot be served here (exit 1)."""
    deeper = train_peft_adapter(gpt_oss(seed=4, num_layers=3), tmp_path / "deeper", router_config(), seed=4)
    assert cli.main(["verify", str(deeper), "--config", str(workspace / "model"), "--seq", "4"]) == 1
    assert "1 of the adapter's 3 modules do not exist in the model (first: model.layers.2.mlp.router)" in (
        capsys.readouterr().out)


def test_experts_per_token_comes_from_the_config_and_every_expert_taken_has_no_tie():
    from types import SimpleNamespace

    from transformers import DbrxConfig

    from moegate.verify import experts_per_token, routers_alone

    assert experts_per_token(SimpleNamespace(num_experts_per_tok=4)) == 4
    assert experts_per_token(DbrxConfig(ffn_config={"moe_num_experts": 2, "moe_top_k": 1})) == 1
    assert experts_per_token(SimpleNamespace(ffn_config={"moe_top_k": 3})) == 3
    assert experts_per_token(SimpleNamespace(moe_topk=2)) == 2  # Aria
    from moegate.verify import _layer_index

    assert [_layer_index(n) for n in ("model.layers.3.mlp.router", "transformer.blocks.1.ffn.router.layer",
                                      "lm_head")] == [3, 1, None]  # DBRX names its layers blocks
    with pytest.raises(ValueError, match="cannot tell how many experts a token takes"):
        experts_per_token(SimpleNamespace(hidden_size=8))
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(5, 8, generator=generator), torch.randn(2, 8, generator=generator)
    lora = SimpleNamespace(scaling=1.0, lora_a=torch.zeros(1, 8), lora_b=torch.zeros(2, 1))
    logits = x @ weight.T
    alone = routers_alone(x, logits, logits, logits, weight, None, lora, 2, torch.float32)  # k = E
    assert alone["near_ties"] == 0 and alone["disagree"] == 0


def test_verify_a_generic_transformers_router_in_bf16(tmp_path, capsys):
    """A Qwen3-MoE (replace_routers' generic router), its adapter written here, PEFT as the bar."""
    from lora.adapter_io import RouterAdapter, save_adapter

    model = tiny_moe("qwen3_moe", seed=0)
    model.config.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    weights = {name: (torch.randn(4, 64, generator=generator) / 8, torch.randn(8, 4, generator=generator))
               for name in names}
    save_adapter(RouterAdapter.from_weights(weights, lora_alpha=8), tmp_path / "adapter")
    assert verify_bf16(tmp_path) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.gate" in out and "verdict   PASS" in out


def test_verify_a_truncated_model_from_a_config_file(workspace, capsys):
    config_file = workspace / "model" / "config.json"
    assert json.loads(config_file.read_text())["model_type"] == "gpt_oss"
    assert cli.main(["verify", str(workspace / "adapter"), "--config", str(config_file),
                     "--num-layers", "1", "--seq", "4"]) == 0
    assert "1 skipped (layers beyond --num-layers)" in capsys.readouterr().out


def test_verify_fails_below_the_agreement_threshold_and_on_bad_adapters(workspace, tmp_path, capsys,
                                                                       monkeypatch):
    from moegate import verify

    args = ["verify", str(workspace / "adapter"), "--config", str(workspace / "model"), "--seq", "4"]
    real = verify.verify_adapter

    def agreeing_less(*arguments, **options):  # end to end, one token in ten routed otherwise
        report = real(*arguments, **options)
        report.modules[1].topk_agreement = 0.9
        return report

    monkeypatch.setattr(verify, "verify_adapter", agreeing_less)
    assert cli.main(args) == 1
    assert "verdict   FAIL" in capsys.readouterr().out
    assert cli.main([*args, "--min-agreement", "0.9"]) == 0
    monkeypatch.undo()
    wide = train_peft_adapter(gpt_oss(seed=2, hidden=32), tmp_path / "wide", router_config())
    assert cli.main(["verify", str(wide), "--config", str(workspace / "model"), "--seq", "4"]) == 1
    assert "K=64" in capsys.readouterr().out
    assert cli.main(["verify", str(wide), "--config", str(tmp_path / "missing")]) == 2


def test_verify_usage_errors_exit_2_with_a_message_before_any_model_is_built(workspace, tmp_path, capsys):
    args = ["verify", str(workspace / "adapter"), "--config", str(workspace / "model")]
    for extra in (["--batch", "0"], ["--seq", "-1"], ["--num-layers", "0"], ["--device", "foo"],
                  ["--device", "meta"], ["--min-agreement", "99"], ["--min-agreement", "nan"],
                  ["--min-agreement", "-1"]):
        with pytest.raises(SystemExit) as caught:
            cli.main([*args, *extra])
        assert caught.value.code == 2, extra
        assert extra[0] in capsys.readouterr().err
    assert cli.main(["verify", str(tmp_path / "nowhere"), "--config", str(tmp_path / "no-config")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    bad_config = tmp_path / "config.json"
    bad_config.write_text((workspace / "model" / "config.json").read_text().replace(
        '"hidden_size": 64', '"hidden_size": "abc"'))
    assert '"abc"' in bad_config.read_text()
    assert cli.main(["verify", str(workspace / "adapter"), "--config", str(bad_config), "--seq", "4"]) == 2
    assert "cannot build the model" in capsys.readouterr().err


def test_bench_runs_the_benchmark_with_its_arguments(capfd, monkeypatch, tmp_path):
    if not cli.BENCHMARK.is_file():
        pytest.skip("benchmarks/router_gemm.py is not in this checkout")
    assert cli.main(["bench", "--help"]) == 0
    assert "--quick" in capfd.readouterr().out  # the benchmark's own usage
    monkeypatch.setattr(cli, "BENCHMARK", tmp_path / "router_gemm.py")
    assert cli.main(["bench", "--quick"]) == 2
    assert "ships with the source tree" in capfd.readouterr().err


def test_usage_errors():
    with pytest.raises(SystemExit) as caught:
        cli.main(["inspect"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["inspect", "x", "--bogus"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0
