"""Small shared builders for the tests: random weights with non-zero biases, inputs, masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import mha


def random_weights(E, H, *, Hkv=None, kdim=None, vdim=None, bias=True, seed=0, dtype=np.float32):
    """Weights ~ N(0, 1/E) and biases ~ N(0, 0.5^2) (non-zero, so a dropped bias shows)."""
    rng = np.random.default_rng(seed)
    Hkv = H if Hkv is None else Hkv
    kdim = E if kdim is None else kdim
    vdim = E if vdim is None else vdim
    D = E // H

    def w(o, i):
        return (rng.normal(size=(o, i)) / np.sqrt(i)).astype(dtype)

    def b(n):
        return (0.5 * rng.normal(size=n)).astype(dtype) if bias else None

    return mha.AttentionWeights(
        w(H * D, E), w(Hkv * D, kdim), w(Hkv * D, vdim), w(E, H * D),
        b(H * D), b(Hkv * D), b(Hkv * D), b(E), num_heads=H, num_kv_heads=Hkv,
    )


def normal(shape, seed, dtype=np.float32, sigma=1.0):
    return (sigma * np.random.default_rng(seed).normal(size=shape)).astype(dtype)


def random_bool(shape, seed, p=0.7):
    return np.random.default_rng(seed).random(shape) < p


LONG_TEXT = Path(__file__).parent / "data" / "long_text.txt"  # 615 words: 730 MiniLM tokens, cut to 512


def minilm_available() -> bool:
    import mha.models as mm

    try:
        mm.resolve("minilm")
        import tokenizers  # noqa: F401
    except (ValueError, ImportError):
        return False
    return True
