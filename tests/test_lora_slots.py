"""TokenSlots: the shared token -> slot mapping, written in place into one fixed buffer."""

import copy
import io
import pickle

import pytest
import torch

from lora import TokenSlots


def test_set_writes_in_place_and_pads_with_minus_one():
    slots = TokenSlots(8, num_slots=4)
    buffer, pointer = slots.slot_ids, slots.slot_ids.data_ptr()
    slots.set([0, 3, -1, 2, 1])
    assert slots.num_tokens == 5
    assert slots.slot_ids.tolist() == [0, 3, -1, 2, 1, -1, -1, -1]
    slots.set(torch.tensor([2, 2], dtype=torch.int32))  # widened into the int64 buffer
    assert slots.num_tokens == 2 and slots.slot_ids.tolist() == [2, 2] + [-1] * 6
    slots.set((1, -1, 3))
    assert slots.slot_ids.tolist() == [1, -1, 3, -1, -1, -1, -1, -1]
    assert slots.slot_ids is buffer and slots.slot_ids.data_ptr() == pointer
    assert slots.slot_ids.dtype == torch.int64


def test_for_tokens_is_a_view_and_checks_the_count():
    slots = TokenSlots(16)
    slots.set([1, 0, -1])
    view = slots.for_tokens(3)
    assert view.tolist() == [1, 0, -1]
    assert view.data_ptr() == slots.slot_ids.data_ptr()
    with pytest.raises(ValueError, match="4 tokens but the token->slot mapping was set for 3"):
        slots.for_tokens(4)
    slots.set([])
    assert slots.for_tokens(0).shape == (0,)


def test_fill_maps_every_token_to_one_slot():
    slots = TokenSlots(6, num_slots=3)
    slots.fill(4, 2)
    assert slots.slot_ids.tolist() == [2, 2, 2, 2, -1, -1] and slots.num_tokens == 4
    slots.fill(2, -1)
    assert slots.slot_ids.tolist() == [-1] * 6 and slots.num_tokens == 2
    with pytest.raises(ValueError, match="out of range"):
        slots.fill(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        slots.fill(7, 0)


@pytest.mark.parametrize("bad, error, match", [
    ([0, -2], ValueError, ">= -1"),
    ([0, 4], ValueError, "out of range"),
    (list(range(4)) * 3, ValueError, "do not fit"),
    ([0.0, 1.0], TypeError, "must be an int"),
    ([True, False], TypeError, "bool"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer tensor"),
    (torch.tensor([True]), TypeError, "integer tensor"),
    (torch.tensor([0, 1], dtype=torch.uint16), TypeError, "integer tensor of"),
    (torch.zeros(2, 2, dtype=torch.int64), ValueError, "1-D"),
    ("0 1", TypeError, "list/tuple"),
])
def test_bad_mappings_raise_and_leave_the_buffer_unchanged(bad, error, match):
    slots = TokenSlots(10, num_slots=4)
    slots.set([3, 1, -1])
    before = slots.slot_ids.clone()
    with pytest.raises(error, match=match):
        slots.set(bad)
    assert torch.equal(slots.slot_ids, before) and slots.num_tokens == 3


def test_validate_false_writes_as_given():
    slots = TokenSlots(4, num_slots=2)
    slots.set(torch.tensor([7, -5]), validate=False)
    assert slots.slot_ids.tolist() == [7, -5, -1, -1]


def test_limit_slots_only_lowers_and_checks_the_current_mapping():
    slots = TokenSlots(4)
    assert slots.num_slots is None
    slots.set([5, 0])  # no bound yet
    with pytest.raises(ValueError, match="uses slot 5"):
        slots.limit_slots(4)
    assert slots.num_slots is None
    slots.limit_slots(6)
    slots.limit_slots(8)
    assert slots.num_slots == 6
    slots.set([1])
    slots.limit_slots(2)
    assert slots.num_slots == 2


def test_constructor_and_move_checks():
    with pytest.raises(ValueError, match="max_tokens"):
        TokenSlots(0)
    with pytest.raises(ValueError, match="num_slots"):
        TokenSlots(4, num_slots=0)
    with pytest.raises(TypeError, match="max_tokens"):
        TokenSlots(4.0)
    slots = TokenSlots(4, device="cpu")
    buffer = slots.slot_ids
    assert slots.to("cpu") is slots and slots.slot_ids is buffer
    assert "max_tokens=4" in repr(slots)


@pytest.mark.parametrize("copy_of", [
    copy.deepcopy,
    lambda slots: pickle.loads(pickle.dumps(slots)),
    lambda slots: torch.load(_saved(slots), weights_only=False),
])
def test_a_copy_writes_its_own_buffer(copy_of):
    """set(list) writes through a NumPy view of the CPU buffer: a copy gets its own view, not a
    copied array that the buffer never sees."""
    slots = TokenSlots(8, num_slots=4)
    slots.set([1, 2])
    copied = copy_of(slots)
    copied.set([0, -1, 3])
    assert copied.slot_ids[:4].tolist() == [0, -1, 3, -1] and copied.for_tokens(3).tolist() == [0, -1, 3]
    assert slots.slot_ids[:3].tolist() == [1, 2, -1] and slots.for_tokens(2).tolist() == [1, 2]


def _saved(slots):
    buffer = io.BytesIO()
    torch.save(slots, buffer)
    buffer.seek(0)
    return buffer


def test_materialised_from_meta():
    """A model built on the meta device and then materialised (to_empty): no mapping yet, -1 all
    through, and set() works."""
    slots = TokenSlots(8, device="meta", num_slots=4).to("cpu")
    assert slots.slot_ids.tolist() == [-1] * 8 and slots.num_tokens == 0
    slots.set([3, 0])
    assert slots.for_tokens(2).tolist() == [3, 0]
