"""Pruning heads by weight surgery: a smaller layer equal to the original with those heads masked.

Removing query head h deletes rows h*D:(h+1)*D of W_q (and b_q) and the same columns of W_O. A
key/value head is kept while a surviving query head reads it. GQA groups are respected: when every
surviving group keeps the same number of query heads, the result is again grouped-query attention
with fewer key/value heads; when the groups end up uneven, each surviving query head gets its own copy
of its key/value head (plain MHA), which computes exactly the same thing.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._weights import AttentionWeights


def head_indices(heads, what: str = "heads") -> list[int]:
    """``heads`` (one index or an iterable of them) as a list of ints, in order; TypeError naming ``what``
    for anything but ints (a float such as 1.0, a bool, a str)."""
    def is_index(h) -> bool:
        return isinstance(h, numbers.Integral) and not isinstance(h, bool)

    if is_index(heads):
        return [int(heads)]
    try:
        items = list(heads) if not isinstance(heads, (str, bytes)) else None
    except TypeError:
        items = None
    if items is None or not all(is_index(h) for h in items):
        bad = heads if items is None else next(h for h in items if not is_index(h))
        raise TypeError(f"{what} must be an iterable of head indices (0-based ints), got {bad!r} "
                        f"({type(bad).__name__})" + ("" if items is None else f" in {heads!r}"))
    return [int(h) for h in items]


def _heads(heads, num_heads: int, what: str = "heads") -> list[int]:
    out = sorted(set(head_indices(heads, what)))
    bad = [h for h in out if not 0 <= h < num_heads]
    if bad:
        raise ValueError(f"{what}: head {bad[0]} is out of range; the layer has {num_heads} heads, 0 to {num_heads - 1}")
    if len(out) == num_heads:
        raise ValueError(f"{what}: cannot prune all {num_heads} heads; keep at least one (or drop the layer)")
    return out


def prune_weights(weights: AttentionWeights, heads) -> AttentionWeights:
    """The weights without the listed query heads (0-based), see the module docstring."""
    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    drop = set(_heads(heads, H))
    keep = [h for h in range(H) if h not in drop]
    G = H // Hkv
    groups: dict[int, list[int]] = {}
    for h in keep:
        groups.setdefault(h // G, []).append(h)
    sizes = {len(v) for v in groups.values()}
    kv_heads = sorted(groups) if len(sizes) == 1 else [h // G for h in keep]  # uneven: one copy per query head

    def rows(a, idx):
        return None if a is None else np.concatenate([a[i * D:(i + 1) * D] for i in idx], axis=0)

    w = weights
    return AttentionWeights(
        rows(w.q_weight, keep), rows(w.k_weight, kv_heads), rows(w.v_weight, kv_heads),
        np.concatenate([w.o_weight[:, h * D:(h + 1) * D] for h in keep], axis=1),
        rows(w.q_bias, keep), rows(w.k_bias, kv_heads), rows(w.v_bias, kv_heads), w.o_bias,
        num_heads=len(keep), num_kv_heads=len(kv_heads), q_norm=w.q_norm, k_norm=w.k_norm,
        sinks=None if w.sinks is None else w.sinks[keep])


def prune_heads(layer_or_model, heads):
    """A new layer (or model) without the listed heads, equal to the original with them masked.

    Args:
        layer_or_model: an ``mha`` attention layer, or a model from ``mha.models`` (then ``heads`` is
            ``{layer: [heads]}``).
        heads: 0-based indices of the query heads to remove.

    Returns:
        a layer on the same backend, dtype and scale (the original is left unchanged).
    """
    if hasattr(layer_or_model, "prune_heads") and hasattr(layer_or_model, "layers"):
        return layer_or_model.prune_heads(heads)
    from ._layer import MultiHeadAttention

    if not isinstance(layer_or_model, MultiHeadAttention):
        raise TypeError(f"prune_heads expects an mha attention layer or model, got {type(layer_or_model).__name__}")
    layer = layer_or_model
    pruned = prune_weights(layer.weights, heads)
    c = layer.config
    return MultiHeadAttention.from_weights(pruned, scale=layer.scale, dropout=layer.dropout, backend=layer.backend,
                                           dtype=layer.dtype, rope=layer.rope, window=layer.window, softcap=c.softcap,
                                           qk_norm=c.qk_norm)
