"""AdapterManager: slots on demand, LRU eviction, CPU cache, swaps from other threads."""

import contextlib
import copy
import threading

import pytest
import torch

pytest.importorskip("transformers")
from moe_models import VOCAB, gpt_oss, mixtral_style  # noqa: E402

from lora.adapter_io import AdapterError, RouterAdapter, save_adapter  # noqa: E402
from lora.manager import AdapterManager  # noqa: E402
from lora.registry import lora_layers  # noqa: E402
from moegate.transformers import replace_gpt_oss_routers  # noqa: E402

ROUTERS = ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]


def random_adapter(seed, rank=4, names=ROUTERS, hidden=64, experts=8):
    generator = torch.Generator().manual_seed(seed)
    weights = {name: (torch.randn(rank, hidden, generator=generator) / hidden**0.5,
                      torch.randn(experts, rank, generator=generator)) for name in names}
    return RouterAdapter.from_weights(weights, lora_alpha=2 * rank)


@pytest.fixture
def model():
    model = gpt_oss(seed=20)
    replace_gpt_oss_routers(model)  # GateLinear routers; the manager wraps them for LoRA
    return model


def ids(batch=4, seq=6, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, manager, names, tokens):
    manager.activate(names, tokens.shape[1])
    with torch.no_grad():
        return model(tokens).logits


def test_activate_maps_each_token_to_its_sequence_slot(model):
    manager = AdapterManager(model, max_loras=3, max_rank=8)
    manager.add("a", random_adapter(1))
    manager.add("b", random_adapter(2, rank=8))
    mapping = manager.activate(["a", None, "b", "a"], 3)
    slot = {name: s for s, name in manager.resident.items()}
    a, b = slot["a"], slot["b"]
    assert mapping.tolist() == [a] * 3 + [-1] * 3 + [b] * 3 + [a] * 3
    assert manager.activate(["b", "a", None], [1, 2, 0]).tolist() == [b, a, a]
    assert manager.stats["slot_loads"] == 2 and manager.stats["slot_hits"] == 2
    assert manager.token_slots.num_tokens == 3


def test_mixed_batch_rows_match_single_adapter_batches(model):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", random_adapter(3))
    manager.add("b", random_adapter(4))
    tokens = ids()
    mixed = run(model, manager, ["a", None, "b", "a"], tokens)
    for row, name in enumerate(["a", None, "b", "a"]):
        alone = run(model, manager, [name] * 4, tokens)
        torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=1e-5)
    base = run(model, manager, [None] * 4, tokens)
    assert (mixed[0] - base[0]).abs().max() > 1e-3  # the adapters do change the routing


def test_lru_eviction_and_cpu_cache_reads_from_disk(model, tmp_path):
    for seed, name in enumerate("abc"):
        save_adapter(random_adapter(seed), tmp_path / name)
    manager = AdapterManager(model, max_loras=2, max_rank=4, max_cpu_adapters=1)
    for name in "abc":
        manager.add(name, tmp_path / name)
    manager.activate(["a"])
    manager.activate(["b"])
    manager.activate(["a"])  # b is now the least recently used
    manager.activate(["c"])
    assert sorted(manager.resident.values()) == ["a", "c"] and manager.stats["evictions"] == 1
    assert manager.stats["disk_reads"] == 3  # a, b and c each fell out of the one-entry CPU cache
    with pytest.raises(ValueError, match="uses 3 adapters but only 2 slots"):
        manager.activate(["a", "b", "c"])


def test_a_refused_activate_leaves_the_books_as_they_were(model, tmp_path):
    """An adapter fallen out of the CPU cache whose directory went bad: each refused activate
    counts no disk read (the books are part of what activate restores)."""
    import shutil

    for seed, name in enumerate("ab"):
        save_adapter(random_adapter(seed), tmp_path / name)
    manager = AdapterManager(model, max_loras=2, max_rank=4, max_cpu_adapters=1)
    manager.add("a", tmp_path / "a")
    manager.add("b", tmp_path / "b")  # a drops out of the one-entry CPU cache
    shutil.rmtree(tmp_path / "a")
    stats = dict(manager.stats)
    for _ in range(3):
        with pytest.raises(AdapterError, match="cannot be"):
            manager.activate(["a"])
    assert manager.stats == stats


def test_a_directory_rewritten_after_add_is_not_served_under_the_old_registration(model, tmp_path):
    """A trainer saves its next checkpoint into a registered directory: once the adapter falls out
    of the CPU cache, the re-read finds other factors. activate refuses (nothing changes) until
    swap registers the new version; then the new factors are served."""
    save_adapter(random_adapter(0), tmp_path / "a")
    save_adapter(random_adapter(1), tmp_path / "b")
    manager = AdapterManager(model, max_loras=2, max_rank=4, max_cpu_adapters=1)
    manager.add("a", tmp_path / "a")
    manager.add("b", tmp_path / "b")  # a drops out of the one-entry CPU cache
    save_adapter(random_adapter(2), tmp_path / "a")
    tokens = ids()
    mapping = manager.activate(["b"] * tokens.shape[0], tokens.shape[1]).clone()
    with pytest.raises(AdapterError, match="adapter 'a' changed since it was registered"):
        manager.activate(["a"] * tokens.shape[0], tokens.shape[1])
    assert manager.resident == {0: "b"}
    assert torch.equal(manager.token_slots.for_tokens(tokens.numel()), mapping)
    manager.swap("a", tmp_path / "a")
    manager.add("same as the new a", random_adapter(2))
    assert torch.equal(run(model, manager, ["a"] * tokens.shape[0], tokens),
                       run(model, manager, ["same as the new a"] * tokens.shape[0], tokens))


@pytest.mark.parametrize("how", ["same directory rewritten", "new directory, old one deleted", "removed"])
def test_a_swap_or_remove_landing_while_activate_reads_is_taken_not_refused(model, tmp_path, how):
    """activate reads an adapter fallen out of the CPU cache while another thread swaps or removes
    it (and the old files change or go): it takes a new snapshot of the registry and serves what is
    registered then, instead of failing on the old files; no superseded version stays cached."""
    import shutil

    save_adapter(random_adapter(0), tmp_path / "a")
    save_adapter(random_adapter(1), tmp_path / "b")
    manager = AdapterManager(model, max_loras=2, max_rank=4, max_cpu_adapters=1)
    manager.add("a", tmp_path / "a")
    manager.add("b", tmp_path / "b")  # a drops out of the one-entry CPU cache
    read = manager._bind
    landed = []

    def read_while_another_thread_changes_the_registry(source):
        if not landed and source == str(tmp_path / "a"):
            landed.append(how)
            if how == "same directory rewritten":
                save_adapter(random_adapter(2), tmp_path / "a")
                manager.swap("a", tmp_path / "a")
            elif how == "new directory, old one deleted":
                save_adapter(random_adapter(2), tmp_path / "a2")
                manager.swap("a", tmp_path / "a2")
                shutil.rmtree(tmp_path / "a")
            else:
                manager.remove("a")
                shutil.rmtree(tmp_path / "a")
        return read(source)

    manager._bind = read_while_another_thread_changes_the_registry
    tokens = ids()
    if how == "removed":
        with pytest.raises(KeyError, match="no adapter named 'a'"):
            manager.activate(["a"] * tokens.shape[0], tokens.shape[1])
        return
    served = run(model, manager, ["a"] * tokens.shape[0], tokens)
    assert landed == [how] and [name for name, _ in manager._cpu_cache] == ["a"]
    manager.add("the new a", random_adapter(2))
    assert torch.equal(served, run(model, manager, ["the new a"] * tokens.shape[0], tokens))


def test_add_refuses_what_set_lora_would_refuse(model):
    """scaling * B past float32 (the PyTorch path scales B): refused when added, not at activate."""
    generator = torch.Generator().manual_seed(5)
    weights = {name: (torch.randn(4, 64, generator=generator), torch.full((8, 4), 1e30)) for name in ROUTERS}
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    with pytest.raises(AdapterError, match="scaling \\* lora_B overflows"):
        manager.add("huge", RouterAdapter.from_weights(weights, lora_alpha=4e10))
    assert manager.names == []


def test_encoder_decoder_models_are_refused_before_anything_is_wrapped(model):
    """One mapping a forward cannot cover an encoder's tokens and a decoder's (Switch, NLLB-MoE)."""
    model.config.is_encoder_decoder = True
    with pytest.raises(ValueError, match="is an encoder-decoder model"):
        AdapterManager(model, max_loras=2, max_rank=4)
    assert not lora_layers(model)


def test_manager_sizes_must_be_ints(model):
    for kwargs, match in (({"max_loras": 2.0}, "max_loras must be an int"),
                          ({"max_rank": "8"}, "max_rank must be an int"),
                          ({"max_cpu_adapters": 1.5}, "max_cpu_adapters must be an int")):
        with pytest.raises(TypeError, match=match):
            AdapterManager(model, **{"max_loras": 2, "max_rank": 4, **kwargs})
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", random_adapter(3))
    assert manager.activate(["a"], torch.tensor(3)).shape == (3,)  # a 0-d tensor: one count for all


def test_swap_and_remove_land_at_the_next_activate(model):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", random_adapter(5))
    reference = AdapterManager(copy.deepcopy(model), max_loras=1, max_rank=4)
    reference.add("new", random_adapter(6))
    tokens = ids(batch=2)
    old = run(model, manager, ["a", "a"], tokens)
    manager.swap("a", random_adapter(6))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, old)  # no activate yet: the old adapter still serves
    expected = run(reference.model, reference, ["new", "new"], tokens)
    assert torch.equal(run(model, manager, ["a", "a"], tokens), expected)
    layers = lora_layers(model)
    manager.remove("a")
    manager.activate([None, None])
    assert all(layer.slot_ranks == (0, 0) for layer in layers.values())
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        manager.activate(["a"])
    # Re-registered under the same name with no step in between: the new weights serve, not the
    # old slot contents.
    manager.add("b", random_adapter(5))
    manager.activate(["b", "b"])
    manager.remove("b")
    manager.add("b", random_adapter(6))
    assert torch.equal(run(model, manager, ["b", "b"], tokens), expected)


def test_serving_never_reallocates(model):
    manager = AdapterManager(model, max_loras=2, max_rank=8)
    layers = list(lora_layers(model).values())
    pointers = lambda: [t.data_ptr() for layer in layers  # noqa: E731
                        for t in (layer.lora_a_stacked, layer.lora_b_stacked, layer.scaling)] + [
        manager.token_slots.slot_ids.data_ptr()]
    before = pointers()
    for seed, name in enumerate("abc"):
        manager.add(name, random_adapter(seed, rank=2 + 2 * seed))
        manager.activate([name, None], 5)
    manager.swap("a", random_adapter(9))
    manager.remove("b")
    manager.activate(["a", "c"])
    assert pointers() == before


def test_bad_requests_are_refused_and_change_nothing(model):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", random_adapter(1))
    tokens = ids(batch=1)
    served = run(model, manager, ["a"], tokens)
    with pytest.raises(ValueError, match="registered already"):
        manager.add("a", random_adapter(2))
    with pytest.raises(KeyError, match="to swap"):
        manager.swap("zzz", random_adapter(2))
    with pytest.raises(AdapterError, match="exceeds the manager's max_rank 4"):
        manager.swap("a", random_adapter(2, rank=8))
    with pytest.raises(AdapterError, match="no LoRA gate layer"):
        manager.swap("a", random_adapter(2, names=["model.layers.7.mlp.router"]))
    assert torch.equal(run(model, manager, ["a"], tokens), served)  # the failed swaps changed nothing
    assert manager.stats["slot_loads"] == 1  # and left version 0 in its slot: nothing was reloaded
    with pytest.raises(ValueError, match="2 token counts for 3 sequences"):
        manager.activate(["a", None, None], [1, 2])
    with pytest.raises(ValueError, match="fewer than"):
        AdapterManager(model, max_loras=4, max_rank=4)


def test_a_swap_during_a_forward_lands_after_it(model):
    """A swap issued while a forward is between its two routers must not reach the second one."""
    manager = AdapterManager(model, max_loras=1, max_rank=4)
    manager.add("a", random_adapter(7))
    tokens = ids(batch=2)
    old = run(model, manager, ["a", "a"], tokens)
    new_model = copy.deepcopy(model)
    new_manager = AdapterManager(new_model, max_loras=1, max_rank=4)
    new_manager.add("a", random_adapter(8))
    new = run(new_model, new_manager, ["a", "a"], tokens)

    swapped = threading.Event()

    def swap_in_another_thread(module, args):
        worker = threading.Thread(target=manager.swap, args=("a", random_adapter(8)))
        worker.start()
        worker.join(timeout=10)  # the swap must not wait for the forward to finish
        if not worker.is_alive():
            swapped.set()

    hook = model.model.layers[1].mlp.router.register_forward_pre_hook(swap_in_another_thread)
    with manager.step(["a", "a"], tokens.shape[1]), torch.no_grad():
        during = model(tokens).logits
    hook.remove()
    assert swapped.is_set(), "the swap waited for the forward in flight"
    assert torch.equal(during, old)
    assert torch.equal(run(model, manager, ["a", "a"], tokens), new)


@contextlib.contextmanager
def swapping_in_background(manager, name, versions):
    """Another thread swaps adapter ``name`` between ``versions`` for as long as the block runs; a
    swap that raised, or fewer than two swaps, fails the test (the block then checked nothing)."""
    stop = threading.Event()
    swaps, errors = [], []

    def keep_swapping():
        try:
            while not stop.is_set():
                manager.swap(name, versions[len(swaps) % len(versions)])
                swaps.append(1)
        except BaseException as error:  # noqa: BLE001 - reported on the test's thread below
            errors.append(error)

    worker = threading.Thread(target=keep_swapping)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
    assert not errors, f"a swap in the background raised: {errors[0]!r}"
    assert len(swaps) >= 2, f"only {len(swaps)} swaps ran while the block ran"


def test_steps_see_whole_adapters_under_concurrent_swaps(model):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    versions = [random_adapter(10), random_adapter(11)]
    manager.add("a", versions[0])
    tokens = ids(batch=2, seq=4)
    references = []
    for version in versions:
        manager.swap("a", version)
        references.append(run(model, manager, ["a", None], tokens))
    with swapping_in_background(manager, "a", versions):
        for _ in range(25):
            logits = run(model, manager, ["a", None], tokens)
            assert any(torch.equal(logits, reference) for reference in references)
    assert len(manager._cpu_cache) <= 2  # swapped-out versions leave the CPU cache


def test_generate_serves_a_mixed_batch(model):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", random_adapter(12))
    manager.add("b", random_adapter(13))
    prompts = ids(batch=3, seq=5)
    seen = []  # tokens mapped at each router call
    model.model.layers[0].mlp.router.register_forward_pre_hook(
        lambda module, args: seen.append(manager.token_slots.num_tokens))
    with manager.generating(["a", None, "b"]):
        mixed = model.generate(prompts, max_new_tokens=4, do_sample=False)
    assert seen == [15, 3, 3, 3]  # the prefill, then one token per sequence per step
    for row, name in enumerate(["a", None, "b"]):
        with manager.generating([name] * 3):
            alone = model.generate(prompts, max_new_tokens=4, do_sample=False)
        assert torch.equal(mixed[row], alone[row])


def test_wraps_nn_linear_gates_with_a_target():
    model = mixtral_style(seed=21)
    manager = AdapterManager(model, max_loras=2, max_rank=4, target=["gate"])
    names = [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]
    assert sorted(lora_layers(model)) == names
    manager.add("a", random_adapter(14, names=names))
    manager.activate(["a"], 3)
    with pytest.raises(ValueError, match="no gate to serve"):
        AdapterManager(torch.nn.Sequential(torch.nn.Linear(4, 4)), max_loras=1, max_rank=1)


@pytest.mark.gpu
def test_gpu_steps_see_whole_adapters_under_concurrent_swaps(cuda_device):
    """gpt-oss-20b router shapes, bf16: slot writes and forwards share the CUDA stream, so a swap
    from another thread shows up whole, between steps. A step mixing two versions (one layer old,
    one new) would be far from both references; rounding noise is far below their gap."""
    model = gpt_oss(seed=22, hidden=2880, experts=32, top_k=4).to(cuda_device, torch.bfloat16)
    replace_gpt_oss_routers(model)
    manager = AdapterManager(model, max_loras=2, max_rank=16)
    versions = [random_adapter(seed, rank=16, hidden=2880, experts=32) for seed in (30, 31)]
    manager.add("a", versions[0])
    tokens = ids(batch=4, seq=8).to(cuda_device)
    references = []
    for version in versions:
        manager.swap("a", version)
        references.append(run(model, manager, ["a", None, "a", "a"], tokens).float())
    gap = (references[0] - references[1]).abs().max().item()
    assert gap > 0.1
    with swapping_in_background(manager, "a", versions):
        for _ in range(40):
            logits = run(model, manager, ["a", None, "a", "a"], tokens).float()
            nearest = min((logits - reference).abs().max().item() for reference in references)
            assert nearest <= 0.01 * gap
