"""AdapterManager: named router adapters served from a model's LoRA slots, swapped while serving.

    manager = AdapterManager(model, max_loras=4, max_rank=16)
    manager.add("math", "adapters/math")            # read + checked now, loaded into a slot on demand
    slots = manager.activate(["math", None, "code"], tokens_per_sequence=prompt_len)
    logits = model(input_ids).logits                # sequence i routes with its adapter
    manager.swap("math", "adapters/math-v2")         # any thread; lands at the next activate()

Slots. ``max_loras`` slots in every LoRA gate layer hold the adapters of the current batch; an
adapter not resident is written into a free slot, or into the least recently used slot the batch
does not need. Writes go into the preallocated slot buffers in place: no allocation, so compiled
code and captured CUDA graphs stay valid.

CPU cache. Every registered adapter is kept on the CPU already cast to the slots' dtype (at most
``max_cpu_adapters`` of them, least recently used dropped first; a dropped one is re-read from its
directory, or re-cast from its in-memory adapter, when next needed). A re-read must find the
adapter that was registered: files changed since ``add`` / ``swap`` (a trainer saving its next
checkpoint into the same directory) make that ``activate`` raise AdapterError, changing nothing;
``swap`` registers the new files.

Threads. ``add`` / ``swap`` / ``remove`` may be called from any thread at any time: they check the
new adapter completely, then change only the registry (a short lock). Slots are written only by
``activate``, at the start of a step, under the step lock, and every slot a step needs is written
before its token mapping is set: a forward never sees half an adapter or a half-applied swap.
``activate`` is all or nothing: its slot writes are one transaction (``lora.slots.SlotWrites``), and
if anything fails (a bad request, a device error, an interrupt) every slot, the mapping and the
manager's bookkeeping are as they were before the call. Run
each forward after ``activate`` in the same thread (or inside ``with manager.step(...)``, which
holds the step lock for the whole block, so an ``activate`` from another thread waits for it).
On the GPU, slot writes and the forward are ordered by the current CUDA stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lora.adapter_io import AdapterError, BoundAdapter, RouterAdapter, read_adapter
from lora.registry import get_token_slots, lora_layers, replace_modules
from lora.slots import NO_ADAPTER, SlotWrites, _as_int

# Registry snapshots activate tries when swaps or removes keep landing while it reads adapters.
_SNAPSHOTS = 3


class _Superseded(Exception):
    """The adapter activate was reading was swapped or removed meanwhile (internal: it retries)."""


@dataclass
class _Entry:
    """A registered adapter: where it comes from, its version (new for every add and swap), and the
    fingerprint of what was checked then (a re-read must find the same adapter)."""

    source: str | RouterAdapter
    version: int
    fingerprint: str


def _fingerprint(adapter: RouterAdapter) -> str:
    """A digest of what an adapter computes: every module's name, factors' bits and scaling."""
    digest = hashlib.sha256()
    for name, weights in sorted(adapter.modules.items()):
        digest.update(f"{name}\0{weights.scaling!r}\0{weights.lora_a.dtype}\0{weights.targeted}\0".encode())
        for factor in (weights.lora_a, weights.lora_b):
            digest.update(repr(tuple(factor.shape)).encode())
            digest.update(memoryview(factor.detach().cpu().contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


class AdapterManager:
    """Serves named router adapters from ``max_loras`` slots of rank up to ``max_rank``.

    Args:
        model: a model whose gates are LoRA layers already (``lora.replace_modules``,
            ``moegate.routers.replace_routers(max_loras=...)``) or GateLinears, which are
            wrapped here (after ``replace_routers(model)``, every transformers router holds one)
            (``target`` is passed to ``replace_modules``: needed for plain nn.Linear gates).
        max_loras: adapters resident at once (at most the layers' slot count).
        max_rank: the largest adapter rank accepted (at most the layers' max_rank).
        max_cpu_adapters: adapters kept cast on the CPU; None keeps all.

    Build it once the model is on its device and in its dtype: adapters are cast for the slots
    as they are when added.
    """

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, *, target=None,
                 max_cpu_adapters: int | None = None) -> None:
        max_loras, max_rank = _as_int(max_loras, "max_loras"), _as_int(max_rank, "max_rank")
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be >= 1, got {max_loras} and {max_rank}")
        if max_cpu_adapters is not None:
            max_cpu_adapters = _as_int(max_cpu_adapters, "max_cpu_adapters")
        if max_cpu_adapters is not None and max_cpu_adapters < 1:
            raise ValueError(f"max_cpu_adapters must be >= 1 or None, got {max_cpu_adapters}")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # One token -> slot mapping a forward: the encoder's tokens and the decoder's differ.
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model: AdapterManager maps one "
                             "token sequence a forward and cannot serve its encoder and decoder; wrap the "
                             "gates with lora.replace_modules and set each stack's TokenSlots yourself")
        if not lora_layers(model) and not replace_modules(model, max_loras, max_rank, target=target):
            raise ValueError(f"{type(model).__name__} has no gate to serve adapters on: no LoRA layer "
                             "and no GateLinear (patch transformers routers with replace_routers, "
                             "or pass target= for nn.Linear gates)")
        self._layers = lora_layers(model)
        for name, layer in self._layers.items():
            slots, rank = layer.lora_a_stacked.shape[:2]
            if slots < max_loras or rank < max_rank:
                raise ValueError(f"{name} has {slots} slots of rank {rank}, fewer than the "
                                 f"max_loras={max_loras}, max_rank={max_rank} asked for")
        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_adapters = max_cpu_adapters
        self.token_slots = get_token_slots(model)
        self._registry: dict[str, _Entry] = {}
        self._versions = 0
        self._registry_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._cpu_cache: OrderedDict[tuple[str, int], BoundAdapter] = OrderedDict()
        self._cpu_lock = threading.Lock()
        # Slot state, touched only under the step lock: (name, version) loaded, and last use.
        self._slot_contents: list[tuple[str, int] | None] = [None] * max_loras
        self._slot_last_step = [-1] * max_loras
        self._step = 0
        self.stats = {"slot_loads": 0, "slot_hits": 0, "evictions": 0, "disk_reads": 0}

    # -- registry: any thread --------------------------------------------------------------------

    def add(self, name: str, adapter: str | os.PathLike | RouterAdapter) -> None:
        """Registers ``adapter`` (a PEFT directory or a RouterAdapter) under ``name``.

        It is read and checked against the model now (AdapterError lists every problem, and
        nothing is registered); it reaches a slot when a batch first uses it.
        """
        self._register(name, adapter, replace=False)

    def swap(self, name: str, adapter: str | os.PathLike | RouterAdapter) -> None:
        """Replaces the adapter registered as ``name``; steps from the next ``activate`` use the new
        one (a resident slot is rewritten there). Checked completely first: on error the old
        adapter stays."""
        self._register(name, adapter, replace=True)

    def remove(self, name: str) -> None:
        """Unregisters ``name``; its slot is emptied at the next ``activate``."""
        with self._registry_lock:
            if name not in self._registry:
                raise KeyError(f"no adapter named {name!r} (registered: {sorted(self._registry)})")
            entry = self._registry.pop(name)
            self._cache_drop((name, entry.version))

    @property
    def names(self) -> list[str]:
        with self._registry_lock:
            return sorted(self._registry)

    @property
    def resident(self) -> dict[int, str]:
        """``{slot: name}`` of the adapters in the slots after the last ``activate``."""
        with self._step_lock:
            return {slot: content[0] for slot, content in enumerate(self._slot_contents) if content}

    def slot_of(self, name: str) -> int | None:
        """The slot holding ``name`` after the last ``activate`` (None when not resident)."""
        return {n: slot for slot, n in self.resident.items()}.get(name)

    def _register(self, name: str, adapter, replace: bool) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"an adapter name must be a non-empty str, got {name!r}")
        source = adapter if isinstance(adapter, RouterAdapter) else os.fspath(adapter)
        bound, fingerprint = self._bind(source)  # the slow part (disk, checks), outside every lock
        with self._registry_lock:
            previous = self._registry.get(name)
            if replace and previous is None:
                raise KeyError(f"no adapter named {name!r} to swap (registered: {sorted(self._registry)})")
            if not replace and previous is not None:
                raise ValueError(f"an adapter named {name!r} is registered already; use swap()")
            # Versions are unique across names and time: a slot loaded with a removed adapter can
            # never pass for a later one registered under the same name.
            self._versions += 1
            entry = _Entry(source, self._versions, fingerprint)
            # Cached before it is visible, so the next activate() finds it without re-reading.
            self._cache_put((name, entry.version), bound)
            self._registry[name] = entry
            if previous is not None:
                self._cache_drop((name, previous.version))

    def _bind(self, source: str | RouterAdapter) -> tuple[BoundAdapter, str]:
        adapter = source if isinstance(source, RouterAdapter) else read_adapter(source)
        too_big = [f"{module}: rank {rank} exceeds the manager's max_rank {self.max_rank}"
                   for module, rank in sorted(adapter.ranks.items()) if rank > self.max_rank]
        if too_big:
            raise AdapterError(adapter.source, too_big)
        return adapter.bind(self.model), _fingerprint(adapter)

    # -- CPU cache -------------------------------------------------------------------------------

    def _cache_put(self, key: tuple[str, int], bound: BoundAdapter) -> None:
        with self._cpu_lock:
            self._cpu_cache[key] = bound
            self._cpu_cache.move_to_end(key)
            while self.max_cpu_adapters is not None and len(self._cpu_cache) > self.max_cpu_adapters:
                self._cpu_cache.popitem(last=False)

    def _cache_drop(self, key: tuple[str, int]) -> None:
        with self._cpu_lock:
            self._cpu_cache.pop(key, None)

    def _superseded(self, name: str, entry: _Entry) -> bool:
        """Whether a swap or remove replaced ``entry`` since activate took its snapshot."""
        with self._registry_lock:
            return self._registry.get(name) is not entry

    def _cached(self, name: str, entry: _Entry) -> BoundAdapter:
        """``entry``'s adapter cast for the slots: from the CPU cache, or read again. Raises
        _Superseded when a concurrent swap or remove replaced it (the old files may be gone or
        rewritten: activate takes a new snapshot instead)."""
        key = (name, entry.version)
        with self._cpu_lock:
            bound = self._cpu_cache.get(key)
            if bound is not None:
                self._cpu_cache.move_to_end(key)
                return bound
        if self._superseded(name, entry):
            raise _Superseded
        if not isinstance(entry.source, RouterAdapter):
            self.stats["disk_reads"] += 1
        try:
            bound, fingerprint = self._bind(entry.source)
        except AdapterError:
            if self._superseded(name, entry):
                raise _Superseded from None
            raise
        if fingerprint != entry.fingerprint:
            if self._superseded(name, entry):
                raise _Superseded
            source = entry.source if isinstance(entry.source, str) else entry.source.source
            raise AdapterError(source, [f"adapter {name!r} changed since it was registered (add or "
                                        f"swap): register the new version with swap({name!r}, ...)"])
        if not self._superseded(name, entry):  # a version replaced while it was read: not cached
            self._cache_put(key, bound)
        return bound

    # -- steps: the serving thread -----------------------------------------------------------------

    def activate(self, adapter_per_sequence: Sequence[str | None],
                 tokens_per_sequence: int | Sequence[int] = 1) -> torch.Tensor:
        """Makes the batch's adapters resident and sets the token -> slot mapping.

        adapter_per_sequence: one adapter name per sequence, or None for the base model.
        tokens_per_sequence: tokens each sequence has in this forward, in the order the layer input
            is flattened (sequence-major): an int for a rectangular [B, S] batch (S, or 1 when
            decoding), or one count per sequence for a packed batch.
        Returns the mapping [num_tokens] int64 on the slots' device: a view of ``token_slots``'
        shared buffer, which the next ``activate`` overwrites.
        Applies every add/swap/remove issued since the last call, before the mapping is set.
        """
        names = _adapter_names(adapter_per_sequence)
        counts = self._token_counts(len(names), tokens_per_sequence)
        if sum(counts) > self.token_slots.max_tokens:
            raise ValueError(f"the batch has {sum(counts)} tokens but the token->slot mapping holds at most "
                             f"{self.token_slots.max_tokens}; split the batch")
        with self._step_lock:
            merged = sorted(name for name, layer in self._layers.items()
                            if getattr(layer, "merged_slot", None) is not None)
            if merged:
                # A merged layer serves its merged adapter to every token, whatever the mapping says.
                others = f" (and {len(merged) - 1} more layers)" if len(merged) > 1 else ""
                raise RuntimeError(f"{merged[0]}{others} has an adapter merged into its weight, which would "
                                   "serve it to every token: unmerge() before serving through the manager")
            for _ in range(_SNAPSHOTS):
                try:
                    return self._activate_snapshot(names, counts)
                except _Superseded:  # a swap or remove landed mid-step: the next snapshot has it
                    continue
            raise RuntimeError(f"the adapters this batch uses were swapped or removed during each of "
                               f"{_SNAPSHOTS} attempts to activate them; nothing changed, try again")

    def _activate_snapshot(self, names, counts) -> torch.Tensor:
        """activate for one snapshot of the registry, under the step lock; all or nothing."""
        with self._registry_lock:
            registry = dict(self._registry)
        unknown = sorted({n for n in names if n is not None and n not in registry})
        if unknown:
            raise KeyError(f"no adapter named {', '.join(map(repr, unknown))} "
                           f"(registered: {sorted(registry)})")
        wanted = {name: registry[name].version
                  for name in dict.fromkeys(n for n in names if n is not None)}
        if len(wanted) > self.max_loras:
            raise ValueError(f"the batch uses {len(wanted)} adapters but only {self.max_loras} "
                             "slots exist; split it or raise max_loras")
        saved = (list(self._slot_contents), list(self._slot_last_step), self._step, dict(self.stats))
        try:
            # Read (or re-read) everything that must be written before writing anything.
            loads = {name: self._cached(name, registry[name]) for name, version in wanted.items()
                     if (name, version) not in self._slot_contents}
            with SlotWrites() as writes:
                mapping = self._load_and_map(names, counts, registry, wanted, loads, writes)
        except BaseException:
            self._slot_contents, self._slot_last_step, self._step, self.stats = saved
            raise
        return self.token_slots.for_tokens(mapping.shape[0])

    def _load_and_map(self, names, counts, registry, wanted, loads, writes: SlotWrites) -> torch.Tensor:
        """activate's mutations, every slot write through ``writes``: returns the mapping set."""
        self._step += 1
        self._empty_stale_slots(registry, writes)
        slot_of = {}
        for name, version in wanted.items():
            if name in loads:
                slot = self._free_slot(wanted)
                loads[name].write(slot, writes)
                self._slot_contents[slot] = (name, version)
                self.stats["slot_loads"] += 1
            else:
                slot = self._slot_contents.index((name, version))
                self.stats["slot_hits"] += 1
            self._slot_last_step[slot] = self._step
            slot_of[name] = slot
        per_sequence = torch.tensor([NO_ADAPTER if n is None else slot_of[n] for n in names],
                                    dtype=torch.int64)
        mapping = per_sequence.repeat_interleave(torch.tensor(counts, dtype=torch.int64))
        # Unchecked: every id is -1 or a slot below max_loras, which every layer has (__init__). Last:
        # TokenSlots.set writes nothing when it fails, so the previous mapping stays with the slots.
        self.token_slots.set(mapping, validate=False)
        return mapping

    @contextlib.contextmanager
    def step(self, adapter_per_sequence: Sequence[str | None],
             tokens_per_sequence: int | Sequence[int] = 1) -> Iterator[torch.Tensor]:
        """``activate`` and hold the step lock for the block (run the forward inside it)."""
        with self._step_lock:
            yield self.activate(adapter_per_sequence, tokens_per_sequence)

    @contextlib.contextmanager
    def generating(self, adapter_per_sequence: Sequence[str | None]) -> Iterator[None]:
        """Activates the adapters before every forward of ``self.model`` in the block, with the
        token count read from ``input_ids`` / ``inputs_embeds`` [B, S], so transformers'
        ``model.generate`` serves a mixed batch (prefill, then one token per step). Swaps issued
        meanwhile land between generation steps."""
        names = list(adapter_per_sequence)

        def before_forward(module, args, kwargs):
            tokens = kwargs.get("input_ids")
            if tokens is None:
                tokens = kwargs.get("inputs_embeds")
            if tokens is None and args:
                tokens = args[0]
            if tokens is None or tokens.dim() < 2 or tokens.shape[0] != len(names):
                shape = None if tokens is None else tuple(tokens.shape)
                raise ValueError(f"expected input_ids [B={len(names)}, S] (or inputs_embeds), got {shape}")
            self.activate(names, tokens.shape[1])

        handle = self.model.register_forward_pre_hook(before_forward, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _empty_stale_slots(self, registry: dict[str, _Entry], writes: SlotWrites) -> None:
        """Empties the slots whose adapter was removed or swapped since it was loaded."""
        for slot, content in enumerate(self._slot_contents):
            if content is None:
                continue
            name, version = content
            entry = registry.get(name)
            if entry is None or entry.version != version:
                for layer in self._layers.values():
                    writes.reset_lora(layer, slot)
                self._slot_contents[slot] = None

    def _free_slot(self, wanted: dict[str, int]) -> int:
        """An empty slot, else the least recently used one this batch does not need."""
        if None in self._slot_contents:
            return self._slot_contents.index(None)
        candidates = [slot for slot, (name, version) in enumerate(self._slot_contents)
                      if wanted.get(name) != version]
        slot = min(candidates, key=lambda s: self._slot_last_step[s])
        self.stats["evictions"] += 1
        return slot

    @staticmethod
    def _token_counts(num_sequences: int, tokens_per_sequence) -> list[int]:
        if isinstance(tokens_per_sequence, (list, tuple)) or (
                isinstance(tokens_per_sequence, torch.Tensor) and tokens_per_sequence.dim() > 0):
            counts = [_count(c) for c in tokens_per_sequence]
            if len(counts) != num_sequences:
                raise ValueError(f"{len(counts)} token counts for {num_sequences} sequences")
        else:
            counts = [_count(tokens_per_sequence)] * num_sequences
        if any(c < 0 for c in counts):
            raise ValueError(f"token counts must be >= 0, got {counts}")
        return counts

    def __repr__(self) -> str:
        return (f"AdapterManager(max_loras={self.max_loras}, max_rank={self.max_rank}, "
                f"registered={self.names}, resident={self.resident})")


def _adapter_names(adapter_per_sequence) -> list[str | None]:
    """One adapter name (or None) per sequence; a bare string is refused, not read letter by letter."""
    if isinstance(adapter_per_sequence, (str, bytes)) or not isinstance(adapter_per_sequence, Sequence):
        raise TypeError("adapter_per_sequence must be a list with one adapter name (or None) per sequence, "
                        f"got {type(adapter_per_sequence).__name__}")
    names = list(adapter_per_sequence)
    bad = [name for name in names if name is not None and not isinstance(name, str)]
    if bad:
        raise TypeError(f"adapter names must be str or None (the base model), got {bad[0]!r}")
    return names


def _count(value) -> int:
    """A token count: an int (numpy and 0-d tensor ints too), never a bool or a float."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise TypeError(f"a token count must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"a token count must be an int, got {type(value).__name__} {value!r}") from None
