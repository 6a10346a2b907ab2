"""A Hugging Face checkpoint folder read without loading the model: its safetensors shards, checked,
and its tensors read one at a time.

A folder holds either one `model.safetensors` or a `model.safetensors.index.json` whose weight_map
names the shard of every tensor. `open_checkpoint` checks what a loader would trip over, each as a
one-line `CheckpointError` naming the file: no config.json, a missing shard, a header that is not a
safetensors header, a shard shorter than its header says (truncated), an index naming absent shards
or tensors. It reads only the headers (a few KB per shard), never the weights.

Tensors are read through safetensors' `safe_open` (memory-mapped), a slice at a time, so a matrix
never needs a second full copy in memory (`Checkpoint.chunks`).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open

from analysis.errors import AlphascopeError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format caps its JSON header at 100 MB
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(AlphascopeError, ValueError):
    """A checkpoint folder a loader would fail on; the message is one line naming the file."""


@dataclass(frozen=True)
class TensorInfo:
    key: str  # tensor name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"
    shard: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder: its shards (in index order) and where each tensor lives."""

    folder: Path
    shards: tuple[Path, ...]
    index: Path | None  # the index file, None for a single model.safetensors
    tensors: dict[str, TensorInfo]

    def fingerprint(self) -> str:
        """Hex digest of what identifies the weights without reading them: every shard's name, size
        and modification time (ns), and the index's and config.json's bytes. A rewritten shard
        changes its mtime, so results keyed by this go stale when the weights do."""
        h = _stamps(self.shards)
        for p in (self.index, self.folder / "config.json"):
            if p is not None:
                h.update(p.read_bytes())
        return h.hexdigest()

    def chunks(self, key: str, elements: int) -> Iterator[torch.Tensor]:
        """Slices of the 2-D tensor `key` along its longer side, each about `elements` entries, in the
        stored dtype: row blocks W[a:b] of a tall matrix, column blocks W[:, a:b] of a wide one. The
        shard is mapped only while the generator runs."""
        info = self.tensors[key]
        rows, cols = info.shape
        tall = rows >= cols
        long, short = (rows, cols) if tall else (cols, rows)
        step = max(1, elements // short)
        with safe_open(str(info.shard), framework="pt") as f:
            sl = f.get_slice(key)
            for a in range(0, long, step):
                b = min(long, a + step)
                yield sl[a:b] if tall else sl[:, a:b]

    def tensor(self, key: str) -> torch.Tensor:
        """The whole tensor `key` in its stored dtype (a copy, not tied to the file)."""
        with safe_open(str(self.tensors[key].shard), framework="pt") as f:
            return f.get_tensor(key)

    def entry(self, key: str, index: int) -> torch.Tensor:
        """`tensor(key)[index]` in its stored dtype, read alone: one expert of a fused (experts, ...) tensor."""
        with safe_open(str(self.tensors[key].shard), framework="pt") as f:
            return f.get_slice(key)[index]


def _read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, checked against the file's size."""
    if not path.is_file():
        raise CheckpointError(f"{path}: shard is missing.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
        n = struct.unpack("<Q", head)[0]
        if n > HEADER_LIMIT or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (says {n} header bytes, file has {size}).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")
    data = size - 8 - n
    for key, t in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            count = 1
            for d in t["shape"]:
                count *= int(d)
            width = DTYPE_BYTES.get(t["dtype"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header (entry {key!r}).") from e
        if width is not None and end - begin != count * width:
            raise CheckpointError(f"{path}: corrupt safetensors header ({key!r} has the wrong byte length).")
        if end > data:
            raise CheckpointError(f"{path}: truncated: {key!r} ends at byte {end} of {data} data bytes.")
    return header


def _infos(shard: Path, header: dict) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, shard, t["dtype"], tuple(int(d) for d in t["shape"]))
            for k, t in header.items() if k != "__metadata__"}


def _check_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e}).") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: its weight_map is empty or not a mapping.")
    return weight_map


def stored_dtype(folder: str | Path) -> str | None:
    """The torch dtype name ("bfloat16", ...) a checkpoint folder stores its floating-point tensors in, or None
    when they are of several dtypes or the folder is not a readable safetensors checkpoint."""
    try:
        kinds = {t.dtype for t in open_checkpoint(folder).tensors.values() if t.dtype in _FLOAT_NAMES}
    except CheckpointError:
        return None
    return _FLOAT_NAMES[kinds.pop()] if len(kinds) == 1 else None


_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def has_safetensors(folder: str | Path) -> bool:
    """Whether the folder keeps its weights as safetensors (a single file or an index)."""
    p = Path(folder)
    return (p / SINGLE).exists() or (p / INDEX).exists()


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Check a checkpoint folder and list its tensors (headers only). Raises CheckpointError."""
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder.")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: not a model folder: it has no config.json.")
    if (p / INDEX).exists():
        index = p / INDEX
        weight_map = _check_index(index)
        names = list(dict.fromkeys(weight_map.values()))
        absent = [n for n in names if not (p / n).is_file()]
        if absent:
            raise CheckpointError(f"{index}: names {len(absent)} absent shard(s): {', '.join(absent[:3])}"
                                  + (" ..." if len(absent) > 3 else "") + ".")
        tensors: dict[str, TensorInfo] = {}
        for n in names:
            tensors |= _infos(p / n, _read_header(p / n))
        for key, n in weight_map.items():
            if key not in tensors or tensors[key].shard.name != n:
                raise CheckpointError(f"{index}: says {key!r} is in {n}, which has no such tensor.")
        return Checkpoint(p, tuple(p / n for n in names), index, tensors)
    if (p / SINGLE).exists():
        return Checkpoint(p, (p / SINGLE,), None, _infos(p / SINGLE, _read_header(p / SINGLE)))
    raise CheckpointError(f"{p}: has no {SINGLE} or {INDEX} (only safetensors checkpoints can be streamed).")


def folder_fingerprint(folder: str | Path) -> str:
    """Hex digest of what a model folder holds, without reading the weights: every file's name, size and
    modification time (ns), links followed (the HF cache's snapshots link to blobs). Weights written over
    in place change it."""
    return _stamps(p for p in sorted(Path(folder).expanduser().iterdir()) if p.is_file()).hexdigest()


def _stamps(files: Iterable[Path]):
    """A sha256 of each file's name, size and modification time (ns), links followed (the HF cache's
    snapshots link to blobs)."""
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h


def local_folder(path_or_id: str) -> Path | None:
    """The local folder holding a checkpoint: the path itself when it is a folder with config.json,
    else, for a Hugging Face id, its snapshot in the local HF cache; None when neither exists."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p if (p / "config.json").is_file() else None
    try:
        config = try_to_load_from_cache(path_or_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) and os.path.isfile(config) else None


__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "folder_fingerprint", "has_safetensors", "local_folder",
           "open_checkpoint"]
