"""Self- and cross-attention, masks and per-head weights, on every backend installed here.

Run: python examples/basic.py
"""

import numpy as np

import mha

rng = np.random.default_rng(0)
B, T, S, E, H = 2, 5, 7, 16, 4
x = rng.normal(size=(B, T, E)).astype(np.float32)  # queries (and keys/values for self-attention)
memory = rng.normal(size=(B, S, 24)).astype(np.float32)  # keys/values of another width for cross-attention

outputs = {}
for backend in mha.available_backends():
    attn = mha.MultiHeadAttention(E, H, backend=backend, seed=0)

    # Self-attention, causal: query i sees keys 0..i.
    y = attn(x, causal=True)

    # Per-head weights (B, H, T, S), never averaged; rows sum to 1.
    y, w = attn(x, causal=True, return_weights=True)
    w = mha.to_numpy(w)
    assert w.shape == (B, H, T, T) and np.allclose(w.sum(-1), 1, atol=1e-5)

    # Padding: key_mask is True for real tokens. Batch element 1 has only 3 real tokens.
    key_mask = np.ones((B, T), bool)
    key_mask[1, 3:] = False
    y_pad = attn(x, key_mask=key_mask)

    # Cross-attention with grouped-query heads: 4 query heads share 2 key/value heads.
    cross = mha.MultiHeadAttention(E, H, num_kv_heads=2, kdim=24, vdim=24, backend=backend, seed=1)
    # Boolean masks mean True = may attend; this one hides the last two memory slots from every query.
    keep = np.ones((S,), bool)
    keep[-2:] = False
    z, zw = cross(x, memory, mask=keep, return_weights=True)
    assert np.all(mha.to_numpy(zw)[..., -2:] == 0)

    # A query that can see nothing outputs the output bias (never NaN).
    nothing = np.zeros((T, S), bool)
    empty = mha.to_numpy(cross(x, memory, mask=nothing))
    assert np.allclose(empty, cross.weights.o_bias)

    outputs[backend] = mha.to_numpy(y_pad)
    print(f"{backend:>5}: self {mha.to_numpy(y).shape}, cross {mha.to_numpy(z).shape}, "
          f"mean |y| = {np.abs(mha.to_numpy(y)).mean():.4f}")

if len(outputs) == 2:
    diff = np.abs(outputs["numpy"] - outputs["mlx"]).max()
    print(f"numpy vs mlx, same weights and inputs: max |difference| = {diff:.2e}")
    assert diff < 1e-5
