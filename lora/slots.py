"""TokenSlots: which adapter slot each token of the current batch uses, in one fixed buffer."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

NO_ADAPTER = -1


class TokenSlots:
    """The batch's token -> adapter-slot mapping, shared by every LoRA layer of a model.

    ``slot_ids`` is an int64 buffer [max_tokens], allocated once and rewritten in place by ``set``
    and ``fill``. Compiled code and captured CUDA graphs read this one buffer, so a new mapping takes
    effect on the next call without recompiling or recapturing. Entry t is the slot of token t, in
    the order of the layer input flattened to [M, K]; ``-1`` means no adapter. Entries past
    ``num_tokens`` hold -1. It is int64 because that is the index dtype gather/index_select take
    natively, so forward needs no conversion kernel.

    Call ``set`` once per step, before the forward: every layer checks that its input has exactly
    ``num_tokens`` tokens (``for_tokens``). A CUDA graph captured at a padded batch size needs the
    mapping set for the padded size (padding tokens at -1).

    Args:
        max_tokens: capacity, the most tokens one forward may have.
        device: where the buffer lives (the device of the layers that read it).
        num_slots: optional bound, ids must be < num_slots. A LoRA layer lowers it to its
            ``max_loras`` when it attaches, so ``set`` rejects ids that some layer does not have.
    """

    def __init__(self, max_tokens: int, device=None, num_slots: int | None = None) -> None:
        max_tokens = _as_int(max_tokens, "max_tokens")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if num_slots is not None:
            num_slots = _as_int(num_slots, "num_slots")
            if num_slots < 1:
                raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.max_tokens = max_tokens
        self.num_slots = num_slots
        self.num_tokens = 0
        # The slot every token of the current mapping uses, when set() saw it on the host (a list,
        # a validated tensor, fill()); None for a mixed or unread mapping. Read by the CPU fast path.
        self.uniform_slot: int | None = None
        self.slot_ids = torch.full((max_tokens,), NO_ADAPTER, dtype=torch.int64, device=device)
        self._attach_buffer()

    @property
    def device(self) -> torch.device:
        return self.slot_ids.device

    def set(self, token_slots: Sequence[int] | torch.Tensor, validate: bool = True) -> None:
        """Writes a new mapping in place: one slot id (or -1) per token.

        ``token_slots`` is a list/tuple of ints or a 1-D integer tensor on any device. Validation
        (ids in [-1, num_slots), at most max_tokens of them) reads the ids on the host, which syncs
        once for a GPU tensor; ``validate=False`` skips it for mappings built on the GPU. Layers
        never fault on a bad id: anything outside [0, max_loras) reads as no adapter.
        On error nothing is written.
        """
        if isinstance(token_slots, (list, tuple)):
            self._set_list([_as_int(value, "a token's slot id") for value in token_slots], validate)
            return
        ids = _as_id_tensor(token_slots)
        count = ids.shape[0]
        if count > self.max_tokens:
            raise ValueError(f"{count} tokens do not fit in a TokenSlots of max_tokens={self.max_tokens}")
        uniform = None
        if validate and count:
            lowest, highest = int(ids.min()), int(ids.max())
            self._check_ids(lowest, highest)
            uniform = lowest if lowest == highest else None
        if self.slot_ids.is_cuda and not ids.is_cuda:
            # From pinned memory, asynchronously: a copy from pageable memory waits for the GPU to
            # finish all queued work, a host sync every step. The caching host allocator keeps the
            # pinned copy alive until the transfer is done.
            self.slot_ids[:count].copy_(ids.to(torch.int64).pin_memory(), non_blocking=True)
        else:
            self.slot_ids[:count].copy_(ids)
        self._set_count(count, uniform)

    def _set_list(self, ids: list[int], validate: bool) -> None:
        # A list is read on the host anyway: checked there, and written without a tensor on the way
        # into a CPU buffer (through its NumPy view), since a decode step sets a short list per step.
        count = len(ids)
        if count > self.max_tokens:
            raise ValueError(f"{count} tokens do not fit in a TokenSlots of max_tokens={self.max_tokens}")
        lowest, highest = (min(ids), max(ids)) if count else (NO_ADAPTER, NO_ADAPTER)
        if validate:
            self._check_ids(lowest, highest)
        if self._host_ids is not None:
            self._host_ids[:count] = ids
        elif self.slot_ids.is_cuda:  # pinned and asynchronous, as in set()
            self.slot_ids[:count].copy_(torch.tensor(ids, dtype=torch.int64).pin_memory(), non_blocking=True)
        else:
            self.slot_ids[:count].copy_(torch.tensor(ids, dtype=torch.int64))
        self._set_count(count, lowest if count and lowest == highest else None)

    def fill(self, num_tokens: int, slot: int) -> None:
        """Every one of ``num_tokens`` tokens uses ``slot`` (or -1): the single-adapter batch."""
        num_tokens = _as_int(num_tokens, "num_tokens")
        slot = _as_int(slot, "slot")
        if not 0 <= num_tokens <= self.max_tokens:
            raise ValueError(f"num_tokens must be in [0, {self.max_tokens}], got {num_tokens}")
        self._check_ids(slot, slot)
        self.slot_ids[:num_tokens].fill_(slot)
        self._set_count(num_tokens, slot if num_tokens else None)

    def for_tokens(self, num_tokens: int) -> torch.Tensor:
        """The mapping of a batch of ``num_tokens`` tokens: a [num_tokens] view of ``slot_ids``.

        Raises when ``num_tokens`` is not the count last ``set``, except while torch.compile traces:
        comparing the batch size with a Python int would specialise the compiled graph on it and
        recompile for every batch size, even with dynamic shapes. Eager calls (and so CUDA-graph
        capture) always check.
        """
        if torch.compiler.is_compiling():
            return self.slot_ids[:num_tokens]
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"the batch has {num_tokens} tokens but the token->slot mapping was set for "
                f"{self.num_tokens}; call TokenSlots.set() with one slot id per token before the forward")
        return self._current

    def limit_slots(self, num_slots: int) -> None:
        """Lowers the bound on slot ids to ``num_slots`` (never raises it).

        Raises, leaving the bound as it was, when the current mapping holds an id >= num_slots.
        """
        num_slots = self.check_limit(num_slots)
        if self.num_slots is None or self.num_slots > num_slots:
            self.num_slots = num_slots

    def check_limit(self, num_slots: int) -> int:
        """Raises what limit_slots(num_slots) would raise, changing nothing; returns num_slots."""
        num_slots = _as_int(num_slots, "num_slots")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if self.num_slots is not None and self.num_slots <= num_slots:
            return num_slots
        if self.num_tokens:
            highest = int(self.slot_ids[:self.num_tokens].max())
            if highest >= num_slots:
                raise ValueError(f"the current mapping uses slot {highest}, which a layer with "
                                 f"{num_slots} slots does not have")
        return num_slots

    def to(self, device) -> TokenSlots:
        """Moves the buffer to ``device`` (in place on this object, which every layer shares).

        A move allocates a new buffer: graphs captured before it must be captured again.
        """
        device = torch.device(device)
        if device != self.slot_ids.device:
            if self.slot_ids.is_meta:  # materialised (a model built on meta): no mapping yet
                self.slot_ids = torch.full_like(self.slot_ids, NO_ADAPTER, device=device)
                self.num_tokens, self.uniform_slot = 0, None
            else:
                self.slot_ids = self.slot_ids.to(device)
            self._attach_buffer()
        return self

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle, torch.save) get the views made anew from their own buffer: a
        # copied NumPy view is an array of its own, and set() would write there, not into slot_ids.
        state = self.__dict__.copy()
        del state["_host_ids"], state["_current"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach_buffer()

    def _attach_buffer(self) -> None:
        # The host's view of a CPU buffer (None where there is none: a GPU buffer, or no NumPy), and
        # for_tokens' view, made anew only when the token count changes.
        self._host_ids = None
        if self.slot_ids.device.type == "cpu":
            try:
                self._host_ids = self.slot_ids.numpy()
            except RuntimeError:  # PyTorch built or run without NumPy
                pass
        self._current = self.slot_ids[:self.num_tokens]

    def _set_count(self, num_tokens: int, uniform_slot: int | None) -> None:
        # Entries past num_tokens already hold -1 except those the previous mapping used: reset only
        # those, not the whole buffer, every step.
        if num_tokens < self.num_tokens:
            self.slot_ids[num_tokens:self.num_tokens].fill_(NO_ADAPTER)
        self.num_tokens = num_tokens
        self.uniform_slot = uniform_slot
        if self._current.shape[0] != num_tokens:
            self._current = self.slot_ids[:num_tokens]

    def _check_ids(self, lowest: int, highest: int) -> None:
        if lowest < NO_ADAPTER:
            raise ValueError(f"slot ids must be >= -1 (-1 = no adapter), got {lowest}")
        if self.num_slots is not None and highest >= self.num_slots:
            raise ValueError(f"slot id {highest} is out of range: the layers have {self.num_slots} "
                             f"slots (ids 0..{self.num_slots - 1}, or -1)")

    def __repr__(self) -> str:
        return (f"TokenSlots(max_tokens={self.max_tokens}, num_tokens={self.num_tokens}, "
                f"num_slots={self.num_slots}, device={self.device})")


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _as_id_tensor(token_slots) -> torch.Tensor:
    """A 1-D integer tensor of ids, without copying a tensor argument."""
    if not isinstance(token_slots, torch.Tensor):
        raise TypeError(f"token slots must be a list/tuple of ints or a 1-D integer tensor, "
                        f"got {type(token_slots).__name__}")
    if token_slots.dim() != 1:
        raise ValueError(f"token slots must be 1-D [num_tokens], got shape {tuple(token_slots.shape)}")
    if token_slots.dtype not in _ID_DTYPES:  # uint16-64: PyTorch has no min/max for them
        raise TypeError(f"token slots must be an integer tensor of {', '.join(map(str, _ID_DTYPES))}, "
                        f"got {token_slots.dtype}")
    return token_slots


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class SlotWrites:
    """Writes into the adapter slots of several LoRA layers, all or nothing.

    Each slot is saved (a copy of its A and B rows, its scaling and rank) the first time this
    transaction writes it; ``undo`` puts every saved slot back. Used as a context manager, any
    exception (KeyboardInterrupt included) undoes the writes made so far and propagates, so no layer
    is ever left holding half an adapter, or a model half of one adapter and half of another:

        with SlotWrites() as writes:
            for layer in layers:
                writes.set_lora(layer, slot, lora_a, lora_b, scaling)

    The saved copies are temporaries on the slots' device; the slot buffers themselves are written in
    place (never reallocated), so captured CUDA graphs stay valid.
    """

    def __init__(self) -> None:
        self._saved: dict[tuple[int, int], tuple] = {}

    def __enter__(self) -> SlotWrites:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.undo()

    def set_lora(self, layer, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        self._save(layer, slot)
        layer.set_lora(slot, lora_a, lora_b, scaling)

    def reset_lora(self, layer, slot: int) -> None:
        self._save(layer, slot)
        layer.reset_lora(slot)

    def undo(self) -> None:
        """Restores every slot written since the transaction began, most recent first."""
        saved, self._saved = self._saved, {}
        failed = []
        for layer, slot, lora_a, lora_b, scaling, rank in reversed(saved.values()):
            try:
                if rank == 0:
                    layer.reset_lora(slot)
                else:  # the slot's own previous contents: accepted now as they were before
                    layer.set_lora(slot, lora_a, lora_b, float(scaling))
            except Exception as error:  # restore every other slot before reporting it
                failed.append((slot, error))
        if failed:
            slot, error = failed[0]
            raise RuntimeError(f"{len(failed)} slot(s) could not be restored (first: slot {slot}: {error}); "
                               "the layers' slots are inconsistent: reload every adapter") from error

    def _save(self, layer, slot: int) -> None:
        key = (id(layer), slot)
        if key in self._saved:
            return
        if not 0 <= slot < len(layer.slot_ranks):
            raise ValueError(f"slot {slot} is out of range: the layer has {len(layer.slot_ranks)} slots")
        rank = layer.slot_ranks[slot]
        with torch.no_grad():
            self._saved[key] = (layer, slot, layer.lora_a_stacked[slot, :rank].clone(),
                                layer.lora_b_stacked[slot, :, :rank].clone(), layer.scaling[slot].clone(),
                                rank)
