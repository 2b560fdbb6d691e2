"""Reading and writing arrays: safetensors (written and read here, no dependency) and ``.npz``.

Never pickle. Every malformed file raises ``ValueError`` naming the file and what is wrong. Writes go
to a temporary file in the same folder, are flushed to disk and then renamed over the target, so an
interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ._write import atomic_write, check_writable  # noqa: F401  (the writer of every format here)

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``{name: numpy array}`` (and string metadata) as a safetensors file, atomically."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, array in tensors.items():
        a = np.ascontiguousarray(array)
        a = a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
        code = _CODES.get(a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype)
        if code is None:
            raise TypeError(f"cannot save {name!r}: dtype {a.dtype} has no safetensors code")
        data = a.tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)

    atomic_write(path, write)


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def load_safetensors(path) -> tuple[dict, dict]:
    """Read a safetensors file; returns ``(tensors, metadata)`` with numpy arrays (bf16 -> float32).

    The header is checked against the file before anything is expanded: its announced length, the
    number of JSON containers it may hold (:func:`_check_header_text`), and every tensor's shape,
    dtype and byte range, which must lie in the data section without overlapping another's. Memory
    stays within a small multiple of the file's size whatever the file declares."""
    path = Path(path)
    where = f"{path}: not a valid safetensors file"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{where} (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{where} (header of {n} bytes announced, file has {size}; truncated?)")
        text = f.read(n)
        header = _parse_header(where, text)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{where} (__metadata__ must map names to strings, got {_short(metadata)})")
        entries = _entries(where, header, size - 8 - n)
        body = f.read()
    tensors = {}
    for name, (code, shape, start, end) in entries.items():
        dtype = np.dtype("<u2") if code == "BF16" else _DTYPES[code]
        count = (end - start) // dtype.itemsize
        array = (np.frombuffer(body, dtype=dtype, count=count, offset=start) if count
                 else np.empty(0, dtype)).reshape(shape)
        tensors[name] = _bf16_to_f32(array) if code == "BF16" else array.astype(dtype.newbyteorder("="))
    return tensors, metadata


def _check_header_text(where: str, text: bytes) -> None:
    """Refuse a header with more JSON containers than any real one has (one dict and two lists per
    tensor of at least 50 bytes): Python builds ~90 bytes per container, so a header of empty lists
    (``[[],[],...]``) would take 25-30x its size in memory."""
    containers = text.count(b"[") + text.count(b"{")
    if containers * 16 > len(text) + 64:
        raise ValueError(f"{where} (header of {len(text)} bytes holds {containers} JSON lists or objects, more "
                         f"than tensors' entries can have; crafted?)")


def _parse_header(where: str, text: bytes) -> dict:
    _check_header_text(where, text)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{where} (header is not JSON: {str(err)[:100]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} (header is not a JSON object)")
    return header


def _entries(where: str, header: dict, data_size: int) -> dict:
    """{name: (code, shape, start, end)}, each range inside the data section and none overlapping."""
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code, shape, start, end = _entry(where, name, info)
        itemsize = 2 if code == "BF16" else _DTYPES[code].itemsize
        expected = math.prod(shape) * itemsize
        if not (0 <= start <= end <= data_size) or end - start != expected:
            raise ValueError(
                f"{where} (tensor {name!r} of shape {shape} and dtype {code} needs {expected} bytes at "
                f"[{start}, {end}), the data section has {data_size} bytes; truncated or corrupt)"
            )
        entries[name] = (code, shape, start, end)
    spans = sorted((s, e, n) for n, (_, _, s, e) in entries.items() if e > s)
    for (_, e1, n1), (s2, _, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise ValueError(f"{where} (tensors {n1!r} and {n2!r} overlap in the data section; crafted?)")
    return entries


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(where: str, name: str, info) -> tuple[str, tuple, int, int]:
    """(dtype code, shape, start, end) of one header entry, each checked for type and range."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{where} (entry {name!r} lacks dtype, shape or data_offsets)")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or (code != "BF16" and code not in _DTYPES):
        raise ValueError(f"{where} (tensor {name!r} has unsupported dtype {_short(code)})")
    if not isinstance(shape, list) or len(shape) > 32 or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"{where} (tensor {name!r}: shape must be a list of at most 32 ints >= 0, "
                         f"got {_short(shape)})")
    if math.prod(max(d, 1) for d in shape) >= 2**60:  # numpy refuses such shapes even when one size is 0
        raise ValueError(f"{where} (tensor {name!r}: shape {_short(shape)} is too large)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise ValueError(f"{where} (tensor {name!r}: data_offsets must be two ints [start, end], "
                         f"got {_short(offsets)})")
    return code, tuple(shape), offsets[0], offsets[1]


def save_npz(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write an uncompressed ``.npz`` (metadata as 0-d string arrays under ``__metadata__.KEY``)."""
    items = {k: np.asarray(v) for k, v in tensors.items()}
    for k, v in (metadata or {}).items():
        items[f"__metadata__.{k}"] = np.array(str(v))
    atomic_write(path, lambda f: np.savez(f, **items))


# What a corrupt zip or .npy header can raise from zipfile, zlib and numpy's header parser.
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError, SyntaxError,
               KeyError, struct.error, zlib.error, tokenize.TokenError)


# A member may expand to at most this many times the file's size (plus _NPZ_SLACK in all): np.savez_compressed
# shrinks real weights by ~1.1x and zero biases by ~1000x, a zip bomb of zeros by ~1000x.
_NPZ_RATIO, _NPZ_SLACK = 8, 1 << 20


def load_npz(path) -> tuple[dict, dict]:
    """Read an ``.npz`` member by member. Before anything is expanded, the members' declared sizes are
    checked against the file (:func:`_check_members`: in all at most 8x the file's size plus 1 MiB,
    stored members as large as their data); each ``.npy`` header is checked against its member's size
    before its data is read. Memory stays within a small multiple of the file's size."""
    path = Path(path)
    where = f"{path}: not a valid .npz file"
    items, member = {}, ""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"{where} (no zip signature)")
        size = os.fstat(f.fileno()).st_size
        try:
            with zipfile.ZipFile(f) as z:
                infos = z.infolist()
                _check_members(infos, size)
                for info in infos:
                    member = f"member {info.filename!r}: "
                    items[info.filename.removesuffix(".npy")] = _npy_member(z, info)
        except _NPZ_ERRORS as err:
            raise ValueError(f"{where} ({member}{_why(err)})") from None
    metadata = {k.split(".", 1)[1]: str(v) for k, v in items.items() if k.startswith("__metadata__.")}
    tensors = {k: v for k, v in items.items() if not k.startswith("__metadata__.")}
    return tensors, metadata


def _check_members(infos, size: int) -> None:
    """ValueError for a zip whose members could not come from a file of ``size`` bytes: names that
    repeat, stored data larger than the file, or declared sizes that expand past the bound above."""
    seen = set()
    for info in infos:
        if info.filename in seen:
            raise ValueError(f"member {info.filename!r} appears twice")
        seen.add(info.filename)
        if info.compress_size > size or (info.compress_type == zipfile.ZIP_STORED
                                         and info.file_size != info.compress_size):
            raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes stored in "
                             f"{info.compress_size}, in a file of {size}; truncated or corrupt")
    declared = sum(info.file_size for info in infos)
    if declared > _NPZ_RATIO * size + _NPZ_SLACK:
        worst = max(infos, key=lambda i: i.file_size)
        raise ValueError(f"its members declare {declared} bytes in a file of {size} (member {worst.filename!r}: "
                         f"{worst.compress_size} bytes expanding to {worst.file_size}); more than "
                         f"{_NPZ_RATIO}x the file is refused before expanding anything (a zip bomb?); "
                         f"save such arrays uncompressed (numpy.savez)")


def _why(err: Exception) -> str:
    text = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
    return text if len(text) <= 200 else text[:197] + "..."


def _npy_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member of an open zip as an array; ValueError when it is anything else."""
    fmt = np.lib.format
    if not info.filename.endswith(".npy"):
        raise ValueError("not a .npy array")
    with z.open(info) as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy version {version} is not supported")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject:
            raise ValueError("it holds Python objects, which need allow_pickle (a pickle); never loaded")
        if any(d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) >= 2**60:
            raise ValueError(f"impossible shape {shape}")
        size = math.prod(shape) * dtype.itemsize
        if info.file_size - f.tell() != size:
            raise ValueError(f"shape {shape} and dtype {dtype} need {size} bytes, the member holds "
                             f"{info.file_size - f.tell()}; truncated or corrupt")
        array = np.empty(shape, dtype, order="F" if fortran else "C")
        _read_into(f, array.reshape(-1, order="A").view(np.uint8) if size else None)
    return array


def _read_into(f, out) -> None:
    """Fill the bytes ``out`` (a 1-D uint8 view, or None for nothing) from ``f`` a MiB at a time, so that
    reading needs no second copy of the data; ValueError when ``f`` ends first."""
    done, n = 0, 0 if out is None else out.size
    while done < n:
        chunk = f.read(min(n - done, 1 << 20))
        if not chunk:
            raise ValueError("truncated")
        out[done:done + len(chunk)] = np.frombuffer(chunk, np.uint8)
        done += len(chunk)


def load_arrays(path) -> tuple[dict, dict]:
    """Read safetensors or npz (chosen by content, not only by suffix)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" or path.suffix == ".npz":
        return load_npz(path)
    return load_safetensors(path)


CONFIG_BYTES = 1 << 20  # the largest config.json read: real ones are a few kB (id2label tables: ~100 kB)


def read_json(path, what: str = "the model config", max_bytes: int = CONFIG_BYTES):
    """Parse a small JSON file (a model's config.json), checking its size before reading it: ValueError
    naming ``path`` and ``what`` when it is larger than ``max_bytes`` (Python's objects take up to ~30x
    the text), unreadable, not UTF-8 or not JSON."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ValueError(f"{path}: {what} is {size} bytes, more than the {max_bytes} such a file can need; "
                                 f"not a config?")
            return json.loads(f.read(max_bytes + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: cannot read {what} ({str(err)[:200]})") from None


def metadata_int(metadata: dict, key: str, where, default=None) -> int | None:
    """The positive integer stored as text under ``key`` in a file's metadata (``default`` when absent).
    Only ASCII digits count ("2", "12"): "nan", " 2", "2_0", "+2", "02" or "\u0662" (an Arabic-Indic 2),
    which Python's ``int()`` reads or misreads, raise ValueError naming ``where``, the field and its text."""
    if key not in metadata:
        return default
    text = metadata[key]
    if not isinstance(text, str) or not _POSITIVE.fullmatch(text):
        raise ValueError(f"{where}: corrupt metadata {key}={text!r} (expected a positive integer in ASCII digits)")
    return int(text)


_POSITIVE = re.compile(r"[1-9][0-9]{0,8}")


def save_arrays(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save as ``.npz`` when the path ends with it, otherwise as safetensors."""
    if str(path).endswith(".npz"):
        save_npz(path, tensors, metadata)
    else:
        save_safetensors(path, tensors, metadata)
