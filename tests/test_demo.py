"""The main demo (examples/serve_router_adapters.py) runs, verifies against PEFT and passes."""

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from moe_models import needs_target_parameters  # noqa: E402

import moegate.__main__ as cli  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "examples" / "serve_router_adapters.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("serve_router_adapters", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_target_parameters
def test_demo_trains_serves_swaps_and_matches_peft(tmp_path, capsys):
    demo = load_demo()
    args = ["--quick", "--device", "cpu", "--new-tokens", "6", "--adapter-dir", str(tmp_path)]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "trained 'code_v2' with PEFT" in out and "the swap lands at step 4" in out
    assert out.count("code -> code_v2") == 2 and "verdict   PASS" in out
    # What it made can be checked by the command it prints: the config is next to the adapters.
    verify = f"moegate verify {tmp_path / 'math'} --config {tmp_path}"
    assert verify in out and (tmp_path / "config.json").is_file()
    assert cli.main(["verify", str(tmp_path / "math"), "--config", str(tmp_path)]) == 0
    assert "verdict   PASS" in capsys.readouterr().out
    assert demo.main(args) == 0  # the second run loads the saved adapters
    assert "adapters  loading math, code, chat, code_v2" in capsys.readouterr().out


def test_a_temporary_adapter_directory_is_removed_and_said_so(capsys):
    demo = load_demo()
    with pytest.raises(KeyboardInterrupt), demo.adapter_directory(None) as directory:
        assert os.path.basename(directory).startswith("moegate_adapters_") and os.path.isdir(directory)
        open(os.path.join(directory, "config.json"), "w").close()
        raise KeyboardInterrupt  # removed whatever ends the run
    assert not os.path.exists(directory)
    assert f"removed the temporary {directory}" in capsys.readouterr().out


@needs_target_parameters
def test_demo_in_bf16_judges_the_routers_alone(tmp_path, capsys):
    args = ["--quick", "--device", "cpu", "--dtype", "bfloat16", "--new-tokens", "4", "--adapter-dir",
            str(tmp_path)]
    assert load_demo().main(args) == 0
    out = capsys.readouterr().out
    assert "verdict   PASS: routers alone: top-k = float64" in out and "end to end (informative)" in out


@pytest.mark.gpu
@needs_target_parameters
def test_demo_on_the_gpu(tmp_path, capsys):
    assert load_demo().main(["--quick", "--device", "cuda", "--adapter-dir", str(tmp_path)]) == 0
    assert "verdict   PASS: routers alone" in capsys.readouterr().out
