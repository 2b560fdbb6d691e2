"""The MLX backend's one detector for NaN and inf in keys and values.

The rule (mha._reference): a NaN or inf at a key or value a query may not see never reaches that query's
output; one it may see makes its output NaN. The fused and blockwise paths apply it from flags saying
which keys hold one. :func:`scan` computes them over vectors (the last axis), together with the largest
|key| entry (which bounds the logits: mha_mlx._range): one fused elementwise step and a max per vector
(:func:`_marked`), on whatever layout the caller has, so that the numbers it reads are contiguous:

- :func:`per_batch`: on the (B, S, Hkv*D) projections, one number per batch element, 0 or NaN (when every
  query sees every key, a bad key makes the whole element's output NaN through W_O, so the layer adds it
  to the output projection's bias: no flag, no select over the output); two reductions, per position
  then over positions (one reduction over a whole batch element is a single long row, which MLX-CUDA
  reduces on few threads: slower on a GPU, see docs/performance.md);
- :func:`per_key`: on the projections, (B, Hkv, S) (the same question asked over the (B, Hkv, S, D) head
  views reads strided memory: slower on a GPU than the kernel itself, see docs/performance.md);
- :func:`scan` itself on (B, Hkv, S, D) heads (a cache's keys, after RoPE).

:func:`scan` is compiled without shapes (``mx.compile(shapeless=True)``): decoding calls it with one more
key at each step, and a graph traced anew for each length costs more than the scan.
"""

from __future__ import annotations

import mlx.core as mx

from ._compile import compiled


def _marked(k, v):
    """Per vector, max|k| over its entries, or inf where k or v holds NaN/inf: |k| + k * 0 + v * 0 is NaN
    there (x * 0 is 0 for finite x), and NaN becomes inf before the max, since a GPU's max reduction may
    drop NaN (its sum does not; nor does it drop inf). One fused elementwise step and one reduction."""
    t = mx.abs(k) + k * 0 + v * 0
    return mx.where(mx.isnan(t), float("inf"), t).max(axis=-1)


def _scan(k, v):
    m = _marked(k, v)
    bad = mx.isinf(m)
    return bad, mx.stop_gradient(mx.max(mx.where(bad, 0, m)).astype(mx.float32))


def scan(k, v):
    """(bad, top): whether each vector k[..., :] or v[..., :] holds NaN or inf (bool, k's shape without
    the last axis), and the largest |k| entry among the vectors that do not (a 0-d float32 without a
    gradient; 0 for none), which :func:`mha_mlx._range.scaled_queries` needs."""
    if k.size == 0:
        return mx.zeros(k.shape[:-1], mx.bool_), mx.array(0.0, mx.float32)
    wide = k.shape[-1] > 1  # MLX 0.32's shapeless graphs crash reducing an axis of length 1
    return compiled(("nonfinite", wide), _scan, shapeless=wide)(k, v)


def per_key(k, v, num_kv_heads: int):
    """(bad (B, Hkv, S) bool, top) of :func:`scan` from the (B, S, Hkv*D) key and value projections (heads
    not split yet)."""
    B, S, HD = k.shape
    shape = (B, S, num_kv_heads, HD // num_kv_heads)
    bad, top = scan(k.reshape(shape), v.reshape(shape))
    return bad.swapaxes(1, 2), top


def _poison(k, v):
    # no gradient: a flag, not a function of the values (its derivative is 0 * the sum of the output's
    # cotangents, which in float16 overflows to inf for T x E near 65504 and makes 0 * inf = NaN)
    m = _marked(k, v)  # (B, S): max |k| at each position, inf where it holds NaN/inf
    poison = (m * 0).sum(axis=-1)[:, None, None].astype(k.dtype)  # inf * 0 = NaN
    top = mx.max(mx.where(mx.isinf(m), 0, m)).astype(mx.float32)
    return mx.stop_gradient(poison), mx.stop_gradient(top)


def per_batch(k, v):
    """(poison, top) from the (B, S, Hkv*D) projections: ``poison`` (B, 1, 1) in their dtype, 0 for a batch
    element whose keys and values are all finite, NaN for one that holds NaN/inf (x * 0 is 0 for finite x,
    NaN otherwise); ``top`` as :func:`scan`'s, over the positions without NaN/inf."""
    if k.size == 0:
        return mx.zeros((k.shape[0], 1, 1), k.dtype), mx.array(0.0, mx.float32)
    return compiled("poison", _poison)(k, v)
