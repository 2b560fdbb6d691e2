"""Crafted and corrupted weight files: every one loads or raises ValueError naming the file, never another
exception (TypeError, OverflowError, MemoryError, NotImplementedError...) and never a huge allocation.

The fuzz tests run four times the profile's example count: 200 (dev), 600 (ci), 8,000 (thorough).
"""

from __future__ import annotations

import copy
import io
import json
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mha

from tests.helpers import random_weights, tiny_bert

FUZZ = settings(max_examples=settings.default.max_examples * 4, deadline=None)
GOOD = random_weights(6, 3, seed=0)


def loads_or_names(path) -> None:
    """The only two acceptable outcomes of loading a bad file."""
    try:
        mha.AttentionWeights.load(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}: "), err


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _parts(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


class Valid:
    """One valid weights file as a safetensors header and body, a stored and a compressed npz, and a folder to
    write mutants to (a short repr, for Hypothesis' failure reports)."""

    def __init__(self, folder):
        GOOD.save(folder / "w.safetensors")
        GOOD.save(folder / "w.npz")
        arrays = {k: v for k, v in GOOD.to_dict().items() if v is not None}
        np.savez_compressed(folder / "c.npz", **arrays, **{"__metadata__.num_heads": np.array("3")})
        self.header, self.body = _parts((folder / "w.safetensors").read_bytes())
        self.npz = {"stored": (folder / "w.npz").read_bytes(), "compressed": (folder / "c.npz").read_bytes()}
        self.folder = folder

    def __repr__(self) -> str:
        return "Valid()"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return Valid(tmp_path_factory.mktemp("bad"))


def entry(**change):
    e = {"dtype": "F32", "shape": [6, 6], "data_offsets": [0, 144]}
    e.update(change)
    return e


@pytest.mark.parametrize("header, message", [
    ({"q_weight": entry(data_offsets=[0.0, 144.0])}, r"data_offsets must be two ints \[start, end\], got \[0\.0, 144"),
    ({"q_weight": entry(data_offsets=["0", "144"])}, r"data_offsets must be two ints \[start, end\], got \['0'"),
    ({"q_weight": entry(data_offsets=[0, 144, 288])}, r"data_offsets must be two ints"),
    ({"q_weight": entry(shape=[-4, -9])}, r"shape must be a list of at most 32 ints >= 0, got \[-4, -9\]"),
    ({"q_weight": entry(shape=[2**32, 2**32], data_offsets=[0, 0])}, r"shape \[4294967296, 4294967296\] is too large"),
    ({"q_weight": entry(shape=[0, 2**62, 2**62], data_offsets=[0, 0])}, r"is too large"),
    ({"q_weight": entry(shape=[6, 1e308])}, r"shape must be a list of at most 32 ints >= 0"),
    ({"q_weight": entry(shape={"a": 1})}, r"shape must be a list"),
    ({"q_weight": entry(shape=[True, 36])}, r"shape must be a list"),
    ({"q_weight": entry(dtype=["F32"])}, r"tensor 'q_weight' has unsupported dtype \['F32'\]"),
    ({"q_weight": entry(dtype="F8_E4M3")}, r"unsupported dtype 'F8_E4M3'"),
    ({"q_weight": 3}, r"entry 'q_weight' lacks dtype, shape or data_offsets"),
    ({"q_weight": entry(), "__metadata__": 5}, r"__metadata__ must map names to strings, got 5"),
    ({"q_weight": entry(), "__metadata__": {"num_heads": 3}}, r"__metadata__ must map names to strings"),
])
def test_crafted_safetensors_headers_name_the_file(tmp_path, header, message):
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(144)))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a valid safetensors file \(.*{message}"):
        mha.AttentionWeights.load(path)


@pytest.mark.parametrize("pad, message", [(0, r"header of 200000 bytes holds 100000 JSON lists or objects"),
                                          (1_600_000, r"header is not JSON")])
def test_a_deeply_nested_header_is_not_json(tmp_path, pad, message):
    """Dense nesting is refused before parsing (it would take ~30x its size in memory); nesting padded out
    to pass that count is too deep for the parser: both a ValueError naming the file."""
    path = tmp_path / "deep.safetensors"
    text = b"[" * 100_000 + b" " * pad + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ValueError, match=rf"deep\.safetensors: not a valid safetensors file \({message}"):
        mha.AttentionWeights.load(path)


def npz_with(npz: bytes, member: str, edit) -> bytes:
    """``npz`` with the bytes of one member passed through ``edit``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(npz)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, edit(data) if info.filename == member else data)
    return out.getvalue()


def npy_shape(shape: str):
    """Replace the shape in a .npy header (same header length)."""
    def edit(data: bytes) -> bytes:
        n = struct.unpack("<H", data[8:10])[0]
        header = data[10:10 + n].decode("latin1").replace("(6, 6)", shape)
        header = header.rstrip("\n ").ljust(n - 1) + "\n"
        return data[:10] + header.encode("latin1") + data[10 + n:]
    return edit


@pytest.mark.parametrize("shape, message", [
    ("(1099511627776,)", r"shape \(1099511627776,\) and dtype float32 need 4398046511104 bytes, the member holds 144"),
    ("(99999999999, 99999999999)", r"impossible shape \(99999999999, 99999999999\)"),
    ("(-4, -9)", r"impossible shape \(-4, -9\)"),
    ("(6, 6", r"TokenError: \('EOF in multi-line statement'"),
    ("'x'", r"shape is not valid: 'x'"),
])
def test_crafted_npy_headers_name_the_file(tmp_path, valid, shape, message):
    path = tmp_path / "crafted.npz"
    path.write_bytes(npz_with(valid.npz["stored"], "q_weight.npy", npy_shape(shape)))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a valid \.npz file \(member 'q_weight\.npy': "
                                         rf"{message}"):
        mha.AttentionWeights.load(path)


def test_an_unknown_zip_compression_names_the_file(tmp_path, valid):
    blob = bytearray(valid.npz["stored"])
    for sig, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers: method 99
        for m in re.finditer(re.escape(sig), bytes(blob)):
            blob[m.start() + at:m.start() + at + 2] = struct.pack("<H", 99)
    path = tmp_path / "odd.npz"
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"odd\.npz: not a valid \.npz file \(.*compression method"):
        mha.AttentionWeights.load(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
                    max_leaves=5)
SIZES = st.sampled_from([-1, 0, 1, 6, 36, 144, 2**31, 2**32, 2**62, 2**63, 2**64 + 1, -(2**70), 0.5, 6.0, "6"])
VALUES = JSON | SIZES | st.lists(SIZES, max_size=4)


@st.composite
def mutated_header(draw, header: dict) -> dict:
    """One to three edits: a field, one item of a shape or offsets list, a whole entry, a missing field, an
    extra entry, or the metadata."""
    header = copy.deepcopy(header)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(header)))
        kind = draw(st.sampled_from(["field", "item", "entry", "drop", "add", "metadata"]))
        e = header[name]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if kind == "entry":
            header[name] = draw(VALUES)
        elif kind == "add":
            header[draw(st.text(max_size=4))] = draw(VALUES)
        elif kind == "metadata":
            header["__metadata__"] = draw(VALUES | st.dictionaries(st.sampled_from(["num_heads", "num_kv_heads"]),
                                                                  VALUES, max_size=2))
        elif isinstance(e, dict) and kind == "drop":
            e.pop(field, None)
        elif isinstance(e, dict) and kind == "item" and isinstance(e.get(field), list) and e[field]:
            e[field][draw(st.integers(0, len(e[field]) - 1))] = draw(VALUES)
        elif isinstance(e, dict):
            e[field] = draw(VALUES)
    return header


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_safetensors_headers(valid, data):
    blob = bytearray(safetensors_bytes(data.draw(mutated_header(valid.header)), valid.body))
    n = struct.unpack("<Q", blob[:8])[0]
    for at, value in data.draw(st.lists(st.tuples(st.integers(0, 8 + n), st.integers(0, 255)), max_size=3)):
        blob[min(at, len(blob) - 1)] = value  # a few flipped bytes in the length prefix or the header
    cut = data.draw(st.none() | st.integers(0, len(blob)))
    path = valid.folder / "fuzz.safetensors"
    path.write_bytes(bytes(blob[:cut]))
    loads_or_names(path)


@FUZZ
@given(data=st.data())
def test_fuzz_corrupted_npz(valid, data):
    blob = bytearray(valid.npz[data.draw(st.sampled_from(sorted(valid.npz)))])
    for at, value in data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)),
                                        min_size=1, max_size=6)):
        blob[at] = value
    cut = data.draw(st.none() | st.integers(0, len(blob)))
    path = valid.folder / "fuzz.npz"
    path.write_bytes(bytes(blob[:cut]))
    loads_or_names(path)


def test_a_crafted_model_file_is_one_cli_line(tmp_path):
    pytest.importorskip("tokenizers")
    folder = tiny_bert(tmp_path / "tiny")
    header, body = _parts((folder / "model.safetensors").read_bytes())
    header["embeddings.LayerNorm.bias"]["data_offsets"] = ["0", "24"]
    (folder / "model.safetensors").write_bytes(safetensors_bytes(header, body))
    res = subprocess.run([sys.executable, "-m", "mha_cli", "demo", "--model", str(folder), "the cat sat"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and f"{folder / 'model.safetensors'}: not a valid safetensors file" in errors[0]
    assert "data_offsets must be two ints" in errors[0]
