"""The two files of a PEFT adapter directory, read as one consistent snapshot and written atomically.

Reading. A trainer may rewrite an adapter while a server loads it. Each file is read once, from one
open file descriptor (a writer that replaces a file by rename leaves that descriptor on the old
version), and both files' identity (inode, size, modification time) must be the same before and
after: otherwise the read is refused as torn (``config`` from one version, weights from another),
and the caller may simply read again. Weights are parsed from the safetensors header first: only
LoRA factors of a floating-point dtype are read into memory; every other tensor is reported from
its header entry (a 1 GB ``lm_head`` in ``modules_to_save`` is refused without being read). Data is
read with ``read``, not memory-mapped, so a file truncated under us gives an error, never a SIGBUS.

Writing. A new directory is written under a temporary name beside it and renamed into place: a
reader sees no adapter or the whole adapter. An existing directory gets each file replaced by
rename, weights first. A reader can fall between the two renames without either file changing
during its read, so the weights carry the SHA-256 of the config bytes written with them in their
safetensors metadata (``CONFIG_DIGEST``): a read whose two files disagree is read again after a
pause. A disagreement that lasts through every read, the same two files (identity as above) on the
last two, is not a writer at work but a config edited by hand (PEFT users edit
``base_model_name_or_path``), and is accepted; one that changes from read to read is a writer that
keeps saving, and the read gives up.
Files written by PEFT carry no digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"

# safetensors dtype names -> torch dtypes of the factors we read; any other dtype is reported.
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# safetensors metadata key: the SHA-256 (hex) of the adapter_config.json written with the weights.
CONFIG_DIGEST = "moegate.config_sha256"
# safetensors itself refuses headers above 100 MB; an adapter's header is a few KB.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class TornRead(Exception):
    """The adapter's files changed while they were read."""


def _identity(path: str) -> tuple[int, int, int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def read_snapshot(directory: str,
                  wanted: Callable[[str], bool]) -> tuple[bytes, dict, list[str], bool, tuple]:
    """``(config bytes, {key: tensor or header entry}, problems, config matches, version)`` of one
    version of the directory.

    ``config matches`` is False when the weights name a config digest the config bytes do not have.
    ``version`` is both files' identity: equal versions are the same two files, unchanged.

    ``wanted(key)`` says which tensors to read (LoRA factors); the others are returned as their
    header entry ``{"dtype", "shape", ...}``, unread, as are wanted tensors of a non-float dtype.
    Raises TornRead when either file changed during the read, OSError when one cannot be opened.
    """
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    before = (_identity(config_path), _identity(weights_path))
    with open(config_path, "rb") as handle:
        config_bytes = handle.read()
    with open(weights_path, "rb") as handle:
        entries, metadata, problems = _read_safetensors(handle, wanted)
    if (_identity(config_path), _identity(weights_path)) != before:
        raise TornRead(f"{ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} changed while it was read")
    digest = metadata.get(CONFIG_DIGEST) if isinstance(metadata, dict) else None
    return config_bytes, entries, problems, digest in (None, config_digest(config_bytes)), before


def config_digest(config_bytes: bytes) -> str:
    return hashlib.sha256(config_bytes).hexdigest()


def _read_safetensors(handle, wanted: Callable[[str], bool]) -> tuple[dict, dict, list[str]]:
    """``(entries, metadata, problems)`` of an open safetensors file (see ``read_snapshot``)."""
    prefix = handle.read(8)
    if len(prefix) != 8:
        return {}, {}, [f"{ADAPTER_WEIGHTS} is not a safetensors file: {len(prefix)} bytes"]
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > _MAX_HEADER_BYTES:
        return {}, {}, [f"{ADAPTER_WEIGHTS} is not a safetensors file: a header of {header_size} bytes"]
    header_bytes = handle.read(header_size)
    try:
        header = json.loads(header_bytes, object_pairs_hook=_refuse_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as error:
        return {}, {}, [f"{ADAPTER_WEIGHTS} has an unreadable safetensors header: {error}"]
    if len(header_bytes) != header_size or not isinstance(header, dict):
        return {}, {}, [f"{ADAPTER_WEIGHTS} has a truncated or malformed safetensors header"]
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_size
    data_size = os.fstat(handle.fileno()).st_size - data_start
    valid, problems = {}, []
    for key, entry in header.items():
        problem = _entry_problem(key, entry, data_size)
        if problem is not None:
            problems.append(problem)
        else:
            valid[key] = entry
    if not problems:
        problem = _tiling_problem({key: entry["data_offsets"] for key, entry in valid.items()}, data_size)
        if problem is not None:
            return {}, metadata, [problem]
    entries = {}
    for key, entry in valid.items():
        dtype = _FLOAT_DTYPES.get(entry["dtype"])
        if not wanted(key) or dtype is None:
            entries[key] = entry
            continue
        begin, end = entry["data_offsets"]
        handle.seek(data_start + begin)
        data = handle.read(end - begin)
        if len(data) != end - begin:
            problems.append(f"{ADAPTER_WEIGHTS} is truncated: {key} ends past the end of the file")
            continue
        tensor = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        entries[key] = tensor.reshape(entry["shape"])
    return entries, metadata, problems


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, or ValueError when a key repeats: json keeps the last copy silently, and
    safetensors (so PEFT) refuses such a file."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice")
        seen[key] = value
    return seen


def _tiling_problem(entries: dict[str, list[int]], data_size: int) -> str | None:
    """safetensors' rule for the tensors' byte ranges: in order of offset they tile the data
    section exactly, no gap, no overlap (its loader, hence PEFT's, refuses anything else)."""
    end = 0
    for key, (begin, stop) in sorted(entries.items(), key=lambda item: tuple(item[1])):
        if begin != end:
            return (f"{ADAPTER_WEIGHTS}: {key}'s bytes start at {begin}, not where the tensor before "
                    f"ends ({end})")
        end = stop
    if end != data_size:
        return f"{ADAPTER_WEIGHTS}: the tensors end at byte {end} of a {data_size}-byte data section"
    return None


def _entry_problem(key: str, entry, data_size: int) -> str | None:
    """Why a header entry does not describe a tensor inside the file, else None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return f"{ADAPTER_WEIGHTS}: {key} has a malformed header entry"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(n, int) for n in offsets) and 0 <= offsets[0] <= offsets[1] <= data_size):
        return f"{ADAPTER_WEIGHTS}: {key} has a malformed or out-of-file header entry"
    dtype = _FLOAT_DTYPES.get(entry["dtype"])
    if dtype is not None and offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
        return f"{ADAPTER_WEIGHTS}: {key}'s byte range does not match its shape {shape} and dtype"
    return None


def write_directory(directory: str, write_files: Callable[[str], None]) -> None:
    """Runs ``write_files(tmp)`` into a temporary directory beside ``directory``, then moves the
    result into place atomically (see the module docstring); on error nothing is left behind."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        write_files(staging)
        for name in os.listdir(staging):
            with open(os.path.join(staging, name), "rb") as handle:
                os.fsync(handle.fileno())
        if not os.path.exists(directory):
            try:
                os.rename(staging, directory)
                return
            except OSError:
                if not os.path.isdir(directory):  # created meanwhile: fall through to replacing files
                    raise
        if not os.path.isdir(directory):
            raise NotADirectoryError(f"{directory} exists and is not a directory")
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # config last: it names what the weights mean
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
