"""The MLX backend's one detector for NaN and inf in keys and values.

The rule (mha._reference): a NaN or inf at a key or value a query may not see never reaches that query's
output; one it may see makes its output NaN. The fused and blockwise paths apply it from flags saying
which keys hold one. :func:`flags` computes them over vectors (the last axis): one fused elementwise step
(x * 0 is 0, or NaN for NaN/inf) and a sum per vector, on whatever layout the caller has, so that the
numbers it reads are contiguous:

- :func:`per_batch`: on the (B, S, Hkv*D) projections, one number per batch element, 0 or NaN (when every
  query sees every key, a bad key makes the whole element's output NaN through W_O, so the layer adds it
  to the output projection's bias: no flag, no select over the output); two reductions, per position
  then over positions (one reduction over a whole batch element is a single long row, which MLX-CUDA
  reduces on few threads: on an H100 at B=1, T=16384, E=2048, bf16, the layer took 6.1 ms instead of
  4.9);
- :func:`per_key`: on the projections, (B, Hkv, S) (the same question asked over the (B, Hkv, S, D) head
  views took 0.74-1.4 ms on an H100 at B=4, T=4096, E=1024, bf16, more than the 0.63 ms kernel);
- :func:`flags` itself on (B, Hkv, S, D) heads (a cache's keys, after RoPE).
"""

from __future__ import annotations

import mlx.core as mx

from ._compile import compiled


def _flags(k, v):
    return mx.isnan((k * 0 + v * 0).sum(axis=-1))


def flags(k, v):
    """(...) bool: whether the vector k[..., :] or v[..., :] holds NaN or inf."""
    return compiled("nonfinite", _flags)(k, v)


def per_key(k, v, num_kv_heads: int):
    """(B, Hkv, S) bool from the (B, S, Hkv*D) key and value projections (heads not split yet)."""
    B, S, HD = k.shape
    shape = (B, S, num_kv_heads, HD // num_kv_heads)
    return flags(k.reshape(shape), v.reshape(shape)).swapaxes(1, 2)


def _poison(k, v):
    return (k * 0 + v * 0).sum(axis=-1).sum(axis=-1)[:, None, None]


def per_batch(k, v):
    """(B, 1, 1) from the (B, S, Hkv*D) projections, in their dtype: 0 for a batch element whose keys and
    values are all finite, NaN for one that holds NaN/inf (x * 0 is 0 for finite x, NaN otherwise)."""
    return compiled("poison", _poison)(k, v)
