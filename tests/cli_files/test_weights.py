"""AttentionWeights: initialisation, files (safetensors/npz), corrupt files, atomic saves."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

import mha
from mha import _io

from tests.helpers import normal, random_weights


def test_init_is_seeded_xavier_with_zero_biases():
    a = mha.AttentionWeights.init(24, 4, num_kv_heads=2, kdim=9, vdim=13, seed=3)
    b = mha.AttentionWeights.init(24, 4, num_kv_heads=2, kdim=9, vdim=13, seed=3)
    c = mha.AttentionWeights.init(24, 4, num_kv_heads=2, kdim=9, vdim=13, seed=4)
    assert a == b and a != c
    assert a.k_weight.shape == (12, 9) and a.v_weight.shape == (12, 13) and a.o_weight.shape == (24, 24)
    assert np.abs(a.k_weight).max() <= math.sqrt(6 / (9 + 12))
    assert np.abs(a.q_weight).max() > 0.8 * math.sqrt(6 / 48)  # spans the range, not a narrower one
    assert all(np.all(getattr(a, n) == 0) for n in ("q_bias", "k_bias", "v_bias", "o_bias"))
    assert a.dtype == np.float32
    assert mha.AttentionWeights.init(8, 2, bias=False).o_bias is None


def test_layer_seed_reproduces_weights(backend):
    a = mha.MultiHeadAttention(12, 4, seed=7, backend=backend)
    b = mha.MultiHeadAttention(12, 4, seed=7, backend=backend)
    assert a.weights == b.weights == mha.AttentionWeights.init(12, 4, seed=7)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("bias", [True, False])
def test_save_load_round_trip_is_exact(tmp_path, suffix, bias):
    w = random_weights(18, 6, Hkv=3, kdim=7, vdim=5, bias=bias, seed=1)
    path = tmp_path / f"w{suffix}"
    w.save(path)
    back = mha.AttentionWeights.load(path)
    assert back == w and back.num_kv_heads == 3
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_safetensors_interoperates_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    w = random_weights(12, 4, seed=2)
    w.save(tmp_path / "a.safetensors")
    theirs = st.load_file(str(tmp_path / "a.safetensors"))
    for name, arr in w.to_dict().items():
        np.testing.assert_array_equal(theirs[name], arr)
    st.save_file({k: v for k, v in w.to_dict().items()}, str(tmp_path / "b.safetensors"),
                 metadata={"num_heads": "4"})
    assert mha.AttentionWeights.load(tmp_path / "b.safetensors") == w
    assert mha.AttentionWeights.load(tmp_path / "a.safetensors", num_heads=4) == w


def test_layer_loads_from_path_and_round_trips(tmp_path, backend):
    w = random_weights(12, 4, seed=3)
    w.save(tmp_path / "w.safetensors")
    layer = mha.MultiHeadAttention(12, 4, weights=tmp_path / "w.safetensors", backend=backend)
    assert layer.weights == w
    layer2 = mha.MultiHeadAttention.from_weights(tmp_path / "w.safetensors", backend=backend)
    x = normal((2, 3, 12), 1)
    np.testing.assert_array_equal(mha.to_numpy(layer(x)), mha.to_numpy(layer2(x)))


def test_truncated_file_is_a_named_error(tmp_path):
    path = tmp_path / "w.safetensors"
    random_weights(12, 4).save(path)
    data = path.read_bytes()
    for cut in (4, 20, len(data) - 7):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"w\.safetensors: not a valid safetensors file .*truncated"):
            mha.AttentionWeights.load(path)


def test_corrupt_and_foreign_files(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 8)
    with pytest.raises(ValueError, match=r"junk\.safetensors: .*header is not JSON"):
        mha.AttentionWeights.load(p)
    foreign = tmp_path / "foreign.safetensors"
    _io.save_safetensors(foreign, {"embeddings.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r"missing keys \['k_weight', 'o_weight', 'q_weight', 'v_weight'\], "
                                         r"unexpected keys \['embeddings.weight'\]"):
        mha.AttentionWeights.load(foreign)
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"bad\.npz: not a valid \.npz file"):
        mha.AttentionWeights.load(bad_npz)
    with pytest.raises(ValueError, match="no such file"):
        mha.AttentionWeights.load(tmp_path / "missing.safetensors")


def test_npz_with_pickled_object_is_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, q_weight=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match=r"evil\.npz: not a valid \.npz file .*allow_pickle"):
        mha.AttentionWeights.load(p)


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    w = random_weights(12, 4, seed=4).to_dict()
    w["k_weight"] = w["k_weight"][:, :5].copy()  # becomes kdim=5: consistent; now break v_bias
    w["v_bias"] = np.zeros(7, np.float32)
    p = tmp_path / "w.safetensors"
    _io.save_safetensors(p, w, {"num_heads": 4})
    with pytest.raises(ValueError, match=r"v_bias: expected \(12,\), got \(7,\)"):
        mha.AttentionWeights.load(p)


def test_header_offsets_out_of_range(tmp_path):
    p = tmp_path / "w.safetensors"
    header = json.dumps({"q_weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)
    with pytest.raises(ValueError, match=r"tensor 'q_weight' of shape \(4, 4\) and dtype F32 needs 64 bytes"):
        mha.AttentionWeights.load(p)


def test_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    old = random_weights(12, 4, seed=5)
    old.save(path)
    new = random_weights(12, 4, seed=6)

    real_write = _io.save_safetensors.__globals__["atomic_write"]

    def failing_atomic_write(p, write):
        def half(f):
            class Half:
                def __init__(self):
                    self.n = 0

                def write(self, data):
                    if self.n > 100:
                        raise OSError("disk full (simulated)")
                    self.n += len(data)
                    return f.write(data)

            write(Half())

        return real_write(p, half)

    monkeypatch.setattr(_io, "atomic_write", failing_atomic_write)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    assert mha.AttentionWeights.load(path) == old
    assert list(tmp_path.iterdir()) == [path]


def test_weights_constructor_checks():
    w = random_weights(12, 4).to_dict()
    with pytest.raises(ValueError, match="biases must be given for all of q/k/v/o or none; missing o_bias"):
        mha.AttentionWeights(**{**w, "o_bias": None}, num_heads=4)
    with pytest.raises(ValueError, match=r"q_weight has 12 rows, not a multiple of num_heads=5"):
        mha.AttentionWeights(**w, num_heads=5)
    with pytest.raises(ValueError, match=r"o_weight: expected \(12, 12\), got \(12, 8\)"):
        mha.AttentionWeights(**{**w, "o_weight": np.zeros((12, 8))}, num_heads=4)
    with pytest.raises(TypeError, match="q_weight must hold real numbers"):
        mha.AttentionWeights(**{**w, "q_weight": np.array([["a"]])}, num_heads=4)


def test_layer_rejects_mismatched_weights(backend):
    w = random_weights(12, 4, bias=False)
    with pytest.raises(ValueError, match=r"weights do not match the layer \(bias: layer True, weights False\)"):
        mha.MultiHeadAttention(12, 4, weights=w, backend=backend)
    with pytest.raises(ValueError, match=r"num_heads: layer 3, weights 4"):
        mha.MultiHeadAttention(12, 3, bias=False, weights=w, backend=backend)


def test_set_weights_and_to(backend):
    layer = mha.MultiHeadAttention(12, 4, seed=1, backend=backend)
    w = random_weights(12, 4, seed=8)
    layer.set_weights(w)
    assert layer.weights == w
    other = layer.to("numpy" if backend == "mlx" else "mlx") if len(mha.available_backends()) == 2 else layer
    assert other.weights == w
    x = normal((2, 3, 12), 1)
    np.testing.assert_allclose(mha.to_numpy(other(x)), mha.to_numpy(layer(x)), atol=1e-5)
