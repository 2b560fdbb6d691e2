"""Reading and writing arrays: safetensors (written and read here, no dependency) and ``.npz``.

Never pickle. Every malformed file raises ``ValueError`` naming the file and what is wrong. Writes go
to a temporary file in the same folder, are flushed to disk and then renamed over the target, so an
interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _target(path: Path) -> Path:
    """The file a write to ``path`` lands in: ``path`` itself, or the file its symlink (chain) names."""
    if not os.path.islink(path):
        return path
    target = Path(os.path.realpath(path))
    if os.path.islink(target):
        raise OSError(errno.ELOOP, "symlink loop", str(path))
    return target


def check_writable(path) -> Path:
    """Check that ``path`` can be written as a file: returns the file a write lands in (see
    :func:`atomic_write`); raises ``ValueError`` naming ``path`` when it is a folder or its folder is
    missing."""
    path = Path(path)
    target = _target(path)
    if target.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: it is a folder; give a file name")
    folder = target.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"cannot write {str(path)!r}: the folder {str(folder)!r} {what}")
    return target


def _temp_beside(target: Path, path: Path) -> tuple[int, Path]:
    """Create a new hidden file beside ``target`` with the mode ``open()`` gives (0o666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as err:  # name the file asked for, not the hidden temporary one
            raise type(err)(err.errno, f"cannot write here ({err.strerror})", str(path)) from None
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file beside the target and rename it over the target.

    The target is ``path``, or the file a symlink at ``path`` names (the link stays, even a dangling
    one or one into another folder). A new file gets the permissions ``open(path, "w")`` would give
    (0o666 less the umask); a replaced file keeps its permissions. A device or pipe (``/dev/stdout``)
    cannot be renamed over and is written in place. Raises ``ValueError`` (see :func:`check_writable`)
    before writing anything.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        with open(path, "wb") as f:
            write(f)
        return
    target = check_writable(path)
    fd, tmp = _temp_beside(target, path)
    try:
        with os.fdopen(fd, "wb") as f:
            if st is not None:
                os.chmod(f.fileno() if os.chmod in os.supports_fd else tmp, stat.S_IMODE(st.st_mode))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
    """Read a safetensors file; returns ``(tensors, metadata)`` with numpy arrays (bf16 -> float32)."""
    path = Path(path)
    data = path.read_bytes()
    where = f"{path}: not a valid safetensors file"
    if len(data) < 8:
        raise ValueError(f"{where} (only {len(data)} bytes; truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise ValueError(f"{where} (header of {n} bytes announced, file has {len(data)}; truncated?)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{where} (header is not JSON: {str(err)[:100]})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{where} (__metadata__ must map names to strings, got {_short(metadata)})")
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        code, shape, start, end = _entry(where, name, info)
        dtype = np.dtype("<u2") if code == "BF16" else _DTYPES[code]
        expected = math.prod(shape) * dtype.itemsize
        if not (0 <= start <= end <= len(body)) or end - start != expected:
            raise ValueError(
                f"{where} (tensor {name!r} of shape {shape} and dtype {code} needs {expected} bytes at "
                f"[{start}, {end}), the data section has {len(body)} bytes; truncated or corrupt)"
            )
        array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        tensors[name] = _bf16_to_f32(array) if code == "BF16" else array.astype(dtype.newbyteorder("="))
    return tensors, metadata


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


def load_npz(path) -> tuple[dict, dict]:
    """Read an ``.npz`` member by member, checking each ``.npy`` header against the member's size before
    reading its data (a crafted header cannot make it allocate more than the file holds)."""
    path = Path(path)
    where = f"{path}: not a valid .npz file"
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"{where} (no zip signature)")
    items, member = {}, ""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                member = f"member {info.filename!r}: "
                items[info.filename.removesuffix(".npy")] = _npy_member(z, info)
    except _NPZ_ERRORS as err:
        raise ValueError(f"{where} ({member}{_why(err)})") from None
    metadata = {k.split(".", 1)[1]: str(v) for k, v in items.items() if k.startswith("__metadata__.")}
    tensors = {k: v for k, v in items.items() if not k.startswith("__metadata__.")}
    return tensors, metadata


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
        data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


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


def save_arrays(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save as ``.npz`` when the path ends with it, otherwise as safetensors."""
    if str(path).endswith(".npz"):
        save_npz(path, tensors, metadata)
    else:
        save_safetensors(path, tensors, metadata)
