"""Reading a Hugging Face model folder: config.json and the safetensors weights, single or sharded.

Everything is checked before any tensor is read: the config parses, every shard named by
``model.safetensors.index.json`` exists, and every header is valid; then :meth:`Checkpoint.read` maps
the files (``mmap``) and converts tensor by tensor, so a 2 GB bfloat16 checkpoint never sits in memory
twice. bfloat16 is widened to float32 by a bit shift (no torch); float16 and float32 are read as they
are. ``pytorch_model.bin`` is never read (a pickle).
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np

from .. import _io

INDEX = "model.safetensors.index.json"


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (mha._io.read_json: size checked first); ValueError naming the file
    when it is missing, unreadable or not an object."""
    raw = _io.read_json(path, f"the {what}")
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object, got a {type(raw).__name__}")
    return raw


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: ``model.safetensors``, or the shards its index names
    (each checked to exist), or the single ``*.safetensors`` file there is."""
    index = folder / INDEX
    if index.is_file():
        raw = read_json(index, "shard index")
        wmap = raw.get("weight_map")
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(wmap.values()))
        for name in shards:
            if Path(name).name != name:
                raise ValueError(f"{index}: shard {name!r} is not a file name in the model folder")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{index}: missing shard {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + f" of {len(shards)}; download every model-*.safetensors file the index names")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if len(found) > 1:
        raise ValueError(f"{folder}: {len(found)} .safetensors files but no {INDEX} saying which tensor is where")
    extra = " (pytorch_model.bin is not read: it is a pickle)" if any(folder.glob("pytorch_model*.bin")) else ""
    raise ValueError(f"{folder}: no model weights: model.safetensors or {INDEX} with its shards{extra}")


class Entry:
    """One tensor of a safetensors file: dtype code, shape, byte range in the data section."""

    __slots__ = ("path", "code", "shape", "start", "end", "base")

    def __init__(self, path: Path, code: str, shape: tuple, start: int, end: int, base: int):
        self.path, self.code, self.shape, self.start, self.end, self.base = path, code, shape, start, end, base


def read_header(path: Path) -> dict:
    """``{name: Entry}`` of a safetensors file, every entry checked against the file's size."""
    where = f"{path}: not a valid safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{where} (only {len(head)} bytes; truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _io._MAX_HEADER):
            raise ValueError(f"{where} (header of {n} bytes announced, file has {size}; truncated?)")
        text = f.read(n)
    entries = {}  # parsed and checked by mha._io's reader: ranges inside the data section, none overlapping
    for name, (code, shape, start, end) in _io._entries(where, _io._parse_header(where, text), size - 8 - n).items():
        if code not in ("F32", "F16", "BF16", "F64"):
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}; model weights must be F32, F16 or BF16")
        entries[name] = Entry(path, code, shape, start, end, 8 + n)
    return entries


class Checkpoint:
    """The tensors of a model folder, by name, read on demand (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = weight_files(folder)
        self.entries: dict = {}
        for path in self.files:
            for name, entry in read_header(path).items():
                if name in self.entries:
                    raise ValueError(f"{path}: tensor {name!r} is also in {self.entries[name].path.name}")
                self.entries[name] = entry
        self._maps: dict = {}

    @property
    def dtypes(self) -> set:
        """The safetensors dtype codes present (F32, F16, BF16)."""
        return {e.code for e in self.entries.values()}

    def read(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor ``name`` as a new numpy array of ``dtype`` (bfloat16 widened to float32 first)."""
        e = self.entries[name]
        buf = self._maps.get(e.path)
        if buf is None:
            with open(e.path, "rb") as f:
                buf = self._maps[e.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw_dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}[e.code]
        raw = np.frombuffer(buf, dtype=raw_dtype, count=math.prod(e.shape), offset=e.base + e.start).reshape(e.shape)
        if e.code == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
        return raw.astype(dtype)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
