"""Reading and writing arrays: safetensors (written and read here, no dependency) and ``.npz``.

Never pickle. Every malformed file raises ``ValueError`` naming the file and what is wrong. Writes go
to a temporary file in the same folder, are flushed to disk and then renamed over the target, so an
interrupted save leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import struct
import zipfile
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
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where} (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            code, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(s) for s in shape)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{where} (entry {name!r} lacks dtype, shape or data_offsets)") from None
        if code == "BF16":
            dtype = np.dtype("<u2")
        elif code in _DTYPES:
            dtype = _DTYPES[code]
        else:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= start <= end <= len(body)) or end - start != expected:
            raise ValueError(
                f"{where} (tensor {name!r} of shape {shape} and dtype {code} needs {expected} bytes at "
                f"[{start}, {end}), the data section has {len(body)} bytes; truncated or corrupt)"
            )
        array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        tensors[name] = _bf16_to_f32(array) if code == "BF16" else array.astype(dtype.newbyteorder("="))
    return tensors, metadata


def save_npz(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write an uncompressed ``.npz`` (metadata as 0-d string arrays under ``__metadata__.KEY``)."""
    items = {k: np.asarray(v) for k, v in tensors.items()}
    for k, v in (metadata or {}).items():
        items[f"__metadata__.{k}"] = np.array(str(v))
    atomic_write(path, lambda f: np.savez(f, **items))


def load_npz(path) -> tuple[dict, dict]:
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"{path}: not a valid .npz file (no zip signature)")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:  # we own the file handle
            items = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a valid .npz file ({err})") from None
    metadata = {k.split(".", 1)[1]: str(v) for k, v in items.items() if k.startswith("__metadata__.")}
    tensors = {k: v for k, v in items.items() if not k.startswith("__metadata__.")}
    return tensors, metadata


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
