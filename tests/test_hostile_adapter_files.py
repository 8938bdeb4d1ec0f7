"""Hostile adapter directories: malformed JSON and values, unknown options, bad regexes, forged
safetensors headers, duplicate keys, exotic dtypes, files changing under the reader. Each must give an
AdapterError naming the problem, and load nothing; a served slot keeps its adapter bit for bit."""

import json
import os
import shutil
import struct
import threading

import pytest
import torch

pytest.importorskip("transformers")
from moe_models import gpt_oss  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lora import adapter_files  # noqa: E402
from lora.adapter_io import AdapterError, RouterAdapter, load_adapter, read_adapter, save_adapter  # noqa: E402
from lora.registry import lora_layers  # noqa: E402
from moegate.transformers import replace_gpt_oss_routers  # noqa: E402

ROUTERS = ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
KEY_A = "base_model.model.model.layers.0.mlp.router.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.mlp.router.lora_B.weight"


def factors(seed, rank=4):
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(rank, 64, generator=generator), torch.randn(8, rank, generator=generator))
            for name in ROUTERS}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "adapter"
    save_adapter(RouterAdapter.from_weights(factors(1), lora_alpha=8), path)
    return path


@pytest.fixture(scope="module")
def served():
    """A model with slot 0 holding a known adapter: every refused load must leave it as it is."""
    model = gpt_oss(seed=3)
    replace_gpt_oss_routers(model, max_loras=2, max_rank=8)
    RouterAdapter.from_weights(factors(2), lora_alpha=4).bind(model).write(0)
    return model


def slot_state(model):
    return {name: (layer.lora_a_stacked.clone(), layer.lora_b_stacked.clone(), layer.scaling.clone(),
                   layer.slot_ranks) for name, layer in lora_layers(model).items()}


def assert_same(state, model):
    for name, (a, b, scaling, ranks) in state.items():
        layer = lora_layers(model)[name]
        assert torch.equal(layer.lora_a_stacked, a) and torch.equal(layer.lora_b_stacked, b)
        assert torch.equal(layer.scaling, scaling) and layer.slot_ranks == ranks


def copy_of(good, tmp_path, name="copy"):
    path = tmp_path / name
    shutil.copytree(good, path)
    return path


def with_config(good, tmp_path, text=None, **changes):
    path = copy_of(good, tmp_path)
    config_file = path / "adapter_config.json"
    if text is None:
        config = json.loads(config_file.read_text())
        config.update(changes)
        text = json.dumps(config)
    config_file.write_text(text)
    return path


def refused(path, model, *expected):
    """Loads ``path`` into slot 0 of ``model``: must raise AdapterError naming every ``expected``
    fragment, with slot 0 unchanged."""
    before = slot_state(model)
    with pytest.raises(AdapterError) as caught:
        load_adapter(path, model, slot=0)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, message
    assert "nothing was loaded" in message
    assert_same(before, model)
    return caught.value


@pytest.mark.parametrize("text, expected", [
    ("[]", "must hold a JSON object, got list"),
    ("null", "must hold a JSON object, got NoneType"),
    ("{", "is not valid JSON"),
    ("\udcff", "is not valid JSON"),
    (json.dumps({"peft_type": "IA3"}), "not a LoRA config (peft_type='IA3')"),
    (json.dumps({"r": 4}), "not a LoRA config (peft_type=None)"),
])
def test_configs_that_are_not_lora_configs(good, served, tmp_path, text, expected):
    path = copy_of(good, tmp_path)
    (path / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(path, served, expected)


@pytest.mark.parametrize("changes, expected", [
    ({"r": "4"}, "r must be an integer >= 1, got '4'"),
    ({"r": 4.0}, "r must be an integer >= 1, got 4.0"),
    ({"r": True}, "r must be an integer >= 1, got True"),
    ({"r": 0}, "r must be an integer >= 1, got 0"),
    ({"lora_alpha": "8"}, "lora_alpha must be a finite number, got '8'"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number, got inf"),
    ({"lora_alpha": 10**400}, "lora_alpha must be a finite number, got 1000"),  # past float's range
    ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),  # truthy to PEFT
    ({"rank_pattern": {"layers.0.mlp.router.weight": 0}}, "must be an integer >= 1, got 0"),
    ({"rank_pattern": {"[": 4}}, "rank_pattern key '[' is not a valid regular expression"),
    ({"rank_pattern": ["x"]}, "rank_pattern must be an object"),
    ({"alpha_pattern": {"layers.0.mlp.router.weight": "x"}}, "must be a finite number, got 'x'"),
    ({"target_modules": "(", "target_parameters": None}, "target_modules '(' is not a valid regular"),
    ({"exclude_modules": "["}, "exclude_modules '[' is not a valid regular expression"),
    ({"layers_pattern": ["("]}, "layers_pattern '(' is not a valid regular expression"),
    ({"layers_to_transform": ["0"]}, "layers_to_transform must be an integer or a list of integers"),
    ({"target_parameters": "mlp.router.weight"}, "target_parameters must be a list of strings"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of strings"),
    # PEFT drops options it does not know, with a warning, and would serve something else.
    ({"use_fancy_variant": True}, "option use_fancy_variant=True is unknown to the installed peft"),
])
def test_config_values_peft_would_misread_are_refused(good, served, tmp_path, changes, expected):
    refused(with_config(good, tmp_path, **changes), served, expected)


def test_unknown_options_at_their_neutral_value_are_what_a_newer_peft_writes(good, tmp_path):
    path = with_config(good, tmp_path, some_future_option=None, another_future_option=False)
    assert read_adapter(path).modules[ROUTERS[0]].scaling == 2.0


def test_modules_to_save_is_a_plain_suffix_as_in_peft(good, served, tmp_path):
    # PEFT saves every module whose name ends with the entry (a string suffix, not a regex): "(" is a
    # harmless entry, "mlp" covers the routers' parent, "r.router" ends "…mlp.router".
    assert read_adapter(with_config(good, tmp_path / "a", modules_to_save=["("])).modules
    refused(with_config(good, tmp_path / "b", modules_to_save=["mlp"]), served,
            "modules_to_save='mlp' covers the router model.layers.0.mlp.router")
    refused(with_config(good, tmp_path / "c", modules_to_save=["p.router"]), served, "covers the router")


def forged(good, tmp_path, tensors=None, blob=None):
    path = copy_of(good, tmp_path)
    weights = path / "adapter_model.safetensors"
    if blob is not None:
        weights.write_bytes(blob)
    else:
        save_file(tensors, weights)
    return path


def header_blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def duplicated_key_blob() -> bytes:
    entry = json.dumps({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    raw = f'{{"{KEY_A}": {entry}, "{KEY_A}": {entry}}}'.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4


@pytest.mark.parametrize("blob, expected", [
    (b"", "not a safetensors file: 0 bytes"),
    (b"\xff" * 64, "not a safetensors file: a header of 18446744073709551615 bytes"),
    (struct.pack("<Q", 10**12) + b"{}", "a header of 1000000000000 bytes"),
    (struct.pack("<Q", 50) + b"{}", "truncated or malformed safetensors header"),
    (header_blob({KEY_A: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}),
     "has a malformed or out-of-file header entry"),
    (header_blob({KEY_A: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 8]}}, b"\0" * 8),
     "byte range does not match its shape [4, 64]"),
    (header_blob({KEY_A: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "malformed"),
    (header_blob({KEY_A: "x"}), "malformed header entry"),
    (header_blob([1, 2]), "truncated or malformed"),
    # json keeps the last of two equal keys; safetensors (so PEFT) refuses the file
    (duplicated_key_blob(), "appears twice"),
    # byte ranges that overlap, or leave a gap: not a tiling of the data section
    (header_blob({KEY_A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                  KEY_B: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "not where the tensor before ends"),
    (header_blob({KEY_A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
     "the tensors end at byte 4 of a 8-byte data section"),
])
def test_forged_safetensors_files(good, served, tmp_path, blob, expected):
    refused(forged(good, tmp_path, blob=blob), served, expected)


def test_full_tensors_are_refused_from_the_header_without_being_read(good, served, tmp_path, monkeypatch):
    tensors = load_file(good / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(96, 64)
    path = forged(good, tmp_path, tensors)
    read_sizes = []
    real = adapter_files._read_safetensors

    def counting(handle, wanted):
        original_read = handle.read
        handle.read = lambda n=-1: read_sizes.append(n) or original_read(n)  # noqa: B023
        return real(handle, wanted)

    monkeypatch.setattr(adapter_files, "_read_safetensors", counting)
    refused(path, served, "lm_head.weight: a full tensor [96, 64]")
    assert 96 * 64 * 4 not in read_sizes and sum(n for n in read_sizes if n > 0) < 96 * 64 * 4


def test_weights_file_defects(good, served, tmp_path):
    tensors = load_file(good / "adapter_model.safetensors")
    # The same factor with and without PEFT's prefix: which one PEFT keeps depends on key order.
    twice = dict(tensors, **{KEY_A.removeprefix("base_model.model."): torch.zeros(4, 64)})
    refused(forged(good, tmp_path / "twice", twice), served, "lora_A is stored twice")
    for dtype, name in ((torch.int32, "I32"), (torch.float8_e4m3fn, "F8_E4M3"), (torch.bool, "BOOL")):
        odd = dict(tensors, **{KEY_A: tensors[KEY_A].to(dtype)})
        refused(forged(good, tmp_path / name, odd), served, f"lora_A is {name}, not float16/bfloat16")
    empty_rank = dict(tensors, **{KEY_A: torch.zeros(0, 64), KEY_B: torch.zeros(8, 0)})
    refused(forged(good, tmp_path / "rank0", empty_rank), served, "rank 0 in the file")
    named = {key.replace(".weight", ".default.weight"): value for key, value in tensors.items()}
    refused(forged(good, tmp_path / "named", named), served, "keyed with an adapter name")
    nan = dict(tensors, **{KEY_B: torch.full((8, 4), float("nan"))})
    refused(forged(good, tmp_path / "nan", nan), served, "lora_B holds non-finite values")


def test_float64_and_bfloat16_factors_are_read_exactly(good, tmp_path):
    tensors = load_file(good / "adapter_model.safetensors")
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        path = forged(good, tmp_path / str(dtype), {k: v.to(dtype) for k, v in tensors.items()})
        adapter = read_adapter(path)
        assert torch.equal(adapter.modules[ROUTERS[0]].lora_a, tensors[KEY_A].to(dtype))


def test_a_file_rewritten_during_the_read_is_read_again(good, tmp_path, monkeypatch):
    """A torn read (config of one version, weights of another) is detected by the files' identity
    and retried; a writer that never stops gives up with a clear error."""
    path = copy_of(good, tmp_path)
    other = tmp_path / "other"
    save_adapter(RouterAdapter.from_weights(factors(9, rank=2), lora_alpha=2), other)
    real = adapter_files._read_safetensors
    rewrites = []

    def rewrite_once(handle, wanted):
        if not rewrites:  # a writer replaces both files, by rename, between our two reads
            rewrites.append(1)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(other / name, path / (name + ".tmp"))
                os.replace(path / (name + ".tmp"), path / name)
        return real(handle, wanted)

    monkeypatch.setattr(adapter_files, "_read_safetensors", rewrite_once)
    adapter = read_adapter(path)
    assert rewrites and adapter.ranks == dict.fromkeys(ROUTERS, 2)  # the new version, whole
    assert torch.equal(adapter.modules[ROUTERS[0]].lora_a, factors(9, rank=2)[ROUTERS[0]][0])

    def always_rewrite(handle, wanted):
        os.utime(path / "adapter_config.json", ns=(0, len(rewrites) * 10**9))
        rewrites.append(1)
        return real(handle, wanted)

    monkeypatch.setattr(adapter_files, "_read_safetensors", always_rewrite)
    with pytest.raises(AdapterError, match="kept changing while they were read"):
        read_adapter(path)


def test_save_adapter_is_atomic_for_concurrent_readers(tmp_path):
    """A reader polling the directory while it is saved over and over sees whole versions only."""
    versions = [RouterAdapter.from_weights(factors(seed, rank=rank), lora_alpha=8)
                for seed, rank in ((11, 2), (12, 4))]
    path = tmp_path / "adapter"
    save_adapter(versions[0], path)
    # Over an existing adapter, each file is replaced by a new one (a rename), never rewritten in place.
    inodes = [os.stat(path / name).st_ino for name in ("adapter_config.json", "adapter_model.safetensors")]
    save_adapter(versions[1], path)
    assert all(os.stat(path / name).st_ino != inode
               for name, inode in zip(("adapter_config.json", "adapter_model.safetensors"), inodes))
    stop, seen, errors, saves, writer_errors = threading.Event(), set(), [], [], []

    def keep_saving():
        try:
            while not stop.is_set():
                save_adapter(versions[len(saves) % 2], path)
                saves.append(1)
        except BaseException as error:  # noqa: BLE001 - reported on the test's thread below
            writer_errors.append(error)

    writer = threading.Thread(target=keep_saving)
    writer.start()
    try:
        for _ in range(60):
            try:
                adapter = read_adapter(path)
            except AdapterError as error:  # only "kept changing", never a mixed adapter
                assert "kept changing" in str(error), str(error)
                errors.append(error)
                continue
            rank = adapter.modules[ROUTERS[0]].rank
            expected = versions[0 if rank == 2 else 1].modules[ROUTERS[0]]
            assert torch.equal(adapter.modules[ROUTERS[0]].lora_a, expected.lora_a)
            assert adapter.modules[ROUTERS[0]].scaling == expected.scaling
            seen.add(rank)
    finally:
        stop.set()
        writer.join()
    assert not writer_errors, f"the writer raised: {writer_errors[0]!r}"
    assert len(saves) > 1 and seen and len(errors) < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left


def test_save_over_a_file_and_into_a_fresh_path(good, tmp_path):
    adapter = read_adapter(good)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        save_adapter(adapter, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    save_adapter(adapter, tmp_path / "deep" / "er" / "adapter")
    assert read_adapter(tmp_path / "deep" / "er" / "adapter").ranks == adapter.ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "file"]


def test_weights_and_config_of_different_saves_are_a_torn_read(tmp_path, monkeypatch):
    """A reader between save_adapter's two renames sees stable files of two versions: the config
    digest in the weights' metadata tells, and the reader reads again once the writer is done."""
    from lora import adapter_io

    versions = {rank: RouterAdapter.from_weights(factors(rank, rank=rank), lora_alpha=8) for rank in (2, 4)}
    for rank, adapter in versions.items():
        save_adapter(adapter, tmp_path / str(rank))
    mixed = copy_of(tmp_path / "2", tmp_path, "mixed")
    shutil.copy(tmp_path / "4" / "adapter_model.safetensors", mixed / "adapter_model.safetensors")
    pauses = []

    def writer_finishes(seconds):  # the writer's second rename lands during the reader's pause
        pauses.append(seconds)
        shutil.copy(tmp_path / "4" / "adapter_config.json", mixed / "adapter_config.json")

    monkeypatch.setattr(adapter_io.time, "sleep", writer_finishes)
    adapter = read_adapter(mixed)
    assert len(pauses) == 1 and adapter.ranks == dict.fromkeys(ROUTERS, 4)
    assert torch.equal(adapter.modules[ROUTERS[0]].lora_b, versions[4].modules[ROUTERS[0]].lora_b)


def test_a_config_edited_by_hand_is_read_after_the_pauses(good, tmp_path, monkeypatch):
    from lora import adapter_io

    pauses = []
    monkeypatch.setattr(adapter_io.time, "sleep", pauses.append)
    edited = with_config(good, tmp_path, base_model_name_or_path="my/base", lora_alpha=16)
    assert read_adapter(edited).modules[ROUTERS[0]].scaling == 16 / 4
    assert len(pauses) == 2  # read three times, the same two files on the last two: not a writer


def test_a_mismatch_that_changes_between_reads_is_a_writer_never_a_hand_edit(good, tmp_path, monkeypatch):
    """A writer that keeps saving can leave each read between its two renames, each time with other
    files: that is never accepted as a hand-edited config (the reader gives up instead)."""
    from lora import adapter_io

    edited = with_config(good, tmp_path, base_model_name_or_path="my/base", lora_alpha=16)
    config = edited / "adapter_config.json"
    pauses = []

    def another_save_meanwhile(seconds):  # new config bytes, a new file: the weights' digest never matches
        pauses.append(seconds)
        staged = edited / "staged.json"
        staged.write_bytes(config.read_bytes() + b" " * len(pauses))
        os.replace(staged, config)

    monkeypatch.setattr(adapter_io.time, "sleep", another_save_meanwhile)
    with pytest.raises(AdapterError, match="kept changing while they were read"):
        read_adapter(edited)
    assert len(pauses) == 2
