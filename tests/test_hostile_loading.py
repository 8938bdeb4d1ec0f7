"""Loading is all or nothing: a write that fails part way (an error or an interrupt in any layer),
a request the manager must refuse, a merged layer, slots re-created since binding. Each leaves every
slot, the token mapping and the manager's bookkeeping exactly as before, and the next step serves
what a fresh manager serves."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from moe_models import VOCAB, gpt_oss  # noqa: E402

from lora.adapter_io import AdapterError, RouterAdapter  # noqa: E402
from lora.manager import AdapterManager  # noqa: E402
from lora.registry import lora_layers  # noqa: E402
from lora.slots import SlotWrites  # noqa: E402
from moegate.transformers import replace_gpt_oss_routers  # noqa: E402

ROUTERS = ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]


def adapter(seed, rank=4, alpha=8.0):
    generator = torch.Generator().manual_seed(seed)
    return RouterAdapter.from_weights(
        {name: (torch.randn(rank, 64, generator=generator) / 8, torch.randn(8, rank, generator=generator))
         for name in ROUTERS}, lora_alpha=alpha)


@pytest.fixture
def model():
    model = gpt_oss(seed=60)
    replace_gpt_oss_routers(model)
    return model


def state(model, manager=None):
    """Everything a load may change: slot buffers and ranks, the mapping, the manager's books."""
    slots = {name: (layer.lora_a_stacked.clone(), layer.lora_b_stacked.clone(), layer.scaling.clone(),
                    layer.slot_ranks) for name, layer in lora_layers(model).items()}
    if manager is None:
        return slots
    books = (list(manager._slot_contents), list(manager._slot_last_step), manager._step, dict(manager.stats))
    mapping = (manager.token_slots.slot_ids.clone(), manager.token_slots.num_tokens)
    return slots, books, mapping


def assert_unchanged(before, after):
    assert repr(before) == repr(after)  # tensors' reprs are exact at these sizes, and cover dtypes
    flat_before, flat_after = [], []
    for side, flat in ((before, flat_before), (after, flat_after)):
        stack = [side]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                flat.append(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    assert len(flat_before) == len(flat_after)
    assert all(torch.equal(a, b) for a, b in zip(flat_before, flat_after))


class Failure(Exception):
    pass


def fail_in(layer, after_writing: bool, error=Failure, on_call: int = 1, calls=None):
    """Makes call number ``on_call`` of ``layer.set_lora`` raise ``error`` (the others write as
    usual); with ``after_writing``, after it wrote the slot (a failure past the point of no return,
    e.g. a device error on the last copy). ``calls`` collects the slot of every call."""
    real = layer.set_lora
    calls = [] if calls is None else calls

    def failing(slot, lora_a, lora_b, scaling):
        calls.append(slot)
        if after_writing or len(calls) != on_call:
            real(slot, lora_a, lora_b, scaling)
        if len(calls) == on_call:
            raise error("injected")

    layer.set_lora = failing
    return lambda: delattr(layer, "set_lora")


@pytest.mark.parametrize("after_writing", [False, True])
@pytest.mark.parametrize("error", [Failure, KeyboardInterrupt])
def test_a_write_failing_in_the_last_layer_leaves_every_layer_as_it_was(model, after_writing, error):
    replace_gpt_oss_routers(model, max_loras=2, max_rank=8)
    adapter(1).bind(model).write(0)
    bound = adapter(2, rank=8).bind(model)
    before = state(model)
    restore = fail_in(lora_layers(model)[ROUTERS[-1] + ".linear"], after_writing, error)
    with pytest.raises(error, match="injected"):
        bound.write(0)
    restore()
    assert_unchanged(before, state(model))
    bound.write(0)  # and the layer works again
    assert [layer.slot_ranks[0] for layer in lora_layers(model).values()] == [8, 8]


def test_slot_writes_undo_restores_empty_and_full_slots_in_order(model):
    replace_gpt_oss_routers(model, max_loras=3, max_rank=8)
    adapter(3).bind(model).write(1)
    before = state(model)
    layer = lora_layers(model)[ROUTERS[0] + ".linear"]
    writes = SlotWrites()
    generator = torch.Generator().manual_seed(3)
    for slot in (0, 1, 1):  # slot 1 twice: the first saved contents are the ones restored
        writes.set_lora(layer, slot, torch.randn(2, 64, generator=generator),
                        torch.randn(8, 2, generator=generator), 3.0)
    writes.reset_lora(layer, 1)
    writes.undo()
    assert_unchanged(before, state(model))
    with pytest.raises(ValueError, match="slot 5 is out of range"):
        writes.set_lora(layer, 5, torch.zeros(2, 64), torch.zeros(8, 2), 1.0)
    with pytest.raises(ValueError, match="slot -1 is out of range"):
        writes.reset_lora(layer, -1)


def run(model, manager, names, tokens):
    manager.activate(names, tokens.shape[1])
    with torch.no_grad():
        return model(tokens).logits


def test_activate_failing_part_way_restores_slots_mapping_and_books(model):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    for seed, name in enumerate("abc"):
        manager.add(name, adapter(10 + seed))
    tokens = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    served = run(model, manager, ["a", "b"], tokens)
    manager.remove("b")  # its slot is stale: emptied by the next activate, before the writes
    before = state(model, manager)
    # Loading c then d: c lands in b's emptied slot, d must evict a, and d's write fails in the
    # last layer, after c's went through there.
    manager.add("d", adapter(20))
    calls = []
    restore = fail_in(lora_layers(model)[ROUTERS[-1] + ".linear"], after_writing=True, on_call=2,
                      calls=calls)
    with pytest.raises(Failure):
        manager.activate(["c", "d"], 5)
    restore()
    assert calls[:2] == [1, 0]  # c into slot 1, then d into a's slot 0, which failed
    after = state(model, manager)
    assert_unchanged(before, after)
    assert manager.resident == {0: "a", 1: "b"}  # as before the call (b is emptied at the next one)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, served)  # the previous step's forward, unchanged
    fresh_model = copy.deepcopy(model)
    fresh = AdapterManager(fresh_model, max_loras=2, max_rank=4)
    fresh.add("c", adapter(12))
    fresh.add("d", adapter(20))
    assert torch.equal(run(model, manager, ["c", "d"], tokens), run(fresh_model, fresh, ["c", "d"], tokens))


@pytest.mark.parametrize("names, counts, error, message", [
    ("ab", 1, TypeError, "must be a list with one adapter name"),
    ([["a"]], 1, TypeError, "adapter names must be str or None"),
    ([b"a"], 1, TypeError, "adapter names must be str or None"),
    (["a"], True, TypeError, "a token count must be an int, got True"),
    (["a"], 2.5, TypeError, "a token count must be an int, got float 2.5"),
    (["a", "a"], [1, 2.0], TypeError, "a token count must be an int"),
    (["a"], [1, 2], ValueError, "2 token counts for 1 sequences"),
    (["a"], -1, ValueError, "token counts must be >= 0"),
    (["a", "b"], 40000, ValueError, "the batch has 80000 tokens but the token->slot mapping holds at most"),
    (["a", "zzz"], 1, KeyError, "no adapter named 'zzz'"),
    (["a", "b", "c"], 1, ValueError, "uses 3 adapters but only 2 slots"),
])
def test_refused_requests_change_nothing(model, names, counts, error, message):
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    for seed, name in enumerate("abc"):
        manager.add(name, adapter(30 + seed))
    manager.activate(["c", None], 3)
    before = state(model, manager)
    with pytest.raises(error, match=message):
        manager.activate(names, counts)
    assert_unchanged(before, state(model, manager))


def test_token_counts_from_numpy_and_tensors(model):
    np = pytest.importorskip("numpy")
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", adapter(40))
    assert manager.activate(["a", None], np.int64(2)).tolist() == [0, 0, -1, -1]
    assert manager.activate(["a", None], torch.tensor([1, 2])).tolist() == [0, -1, -1]


def test_a_merged_layer_is_refused_by_activate(model):
    """A merged layer serves its adapter to every token whatever the mapping: the manager refuses
    to serve a batch through it rather than route tokens to the wrong adapter."""
    manager = AdapterManager(model, max_loras=2, max_rank=4)
    manager.add("a", adapter(41))
    manager.add("b", adapter(42))
    manager.activate(["a"], 1)
    layer = lora_layers(model)[ROUTERS[1] + ".linear"]
    layer.merge(manager.slot_of("a"))
    before = state(model, manager)
    for names in (["b", None], ["a", None], [None]):
        with pytest.raises(RuntimeError, match=r"router\.linear has an adapter merged.*unmerge\(\) before"):
            manager.activate(names, 2)
    assert_unchanged(before, state(model, manager))
    layer.unmerge()
    assert manager.activate(["b", None], 1).tolist() == [1, -1]


def test_slots_recreated_since_binding_are_refused_before_any_write(model):
    replace_gpt_oss_routers(model, max_loras=2, max_rank=8)
    bound = adapter(43, rank=8).bind(model)
    for layer in lora_layers(model).values():
        layer.create_lora_weights(2, 4)  # smaller slots: the bound rank-8 factors no longer fit
    before = state(model)
    with pytest.raises(RuntimeError, match="slots changed since the adapter was bound.*bind it again"):
        bound.write(0)
    assert_unchanged(before, state(model))


def test_adapters_with_non_finite_scaling_are_refused_at_add(model):
    manager = AdapterManager(model, max_loras=1, max_rank=4)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number, got nan"):
        adapter(44, alpha=float("nan"))
    # finite, but a scaling the slots' float32 cannot hold
    with pytest.raises(AdapterError, match=r"scaling 4e\+40 \(lora_alpha=1.6e\+41, r=4\) overflows float32"):
        adapter(44, alpha=1.6e41)
    forged = adapter(45)
    name = ROUTERS[0]
    weights = forged.modules[name]
    forged.modules[name] = type(weights)(weights.lora_a, weights.lora_b, float("inf"), weights.targeted)
    with pytest.raises(AdapterError, match="scaling inf is not finite"):
        manager.add("a", forged)
    assert manager.names == []


def test_undo_restores_every_other_slot_when_one_restore_fails(model):
    replace_gpt_oss_routers(model, max_loras=2, max_rank=8)
    adapter(46).bind(model).write(0)
    before = state(model)
    layers = list(lora_layers(model).values())
    writes = SlotWrites()
    for layer in layers:
        writes.reset_lora(layer, 0)
    layers[-1].set_lora = lambda *args: (_ for _ in ()).throw(Failure("device lost"))
    with pytest.raises(RuntimeError, match=r"1 slot\(s\) could not be restored .*device lost.*reload"):
        writes.undo()
    del layers[-1].set_lora
    first = ROUTERS[0] + ".linear"
    assert_unchanged(before[first], state(model)[first])  # restored despite the other's failure
