"""The call front end: every argument of a layer call checked once, into one record both backends use.

:func:`prepare` converts and checks the inputs, masks and flags (raising ValueError/TypeError that name
the argument before any arithmetic), plans a cache step, casts to the compute dtype, builds the
:class:`mha._masks.MaskSet`, and decides the route once: ``"empty"`` (no query or no key),
``"reference"`` (dropout, or weights/lse asked of a backend whose fast path gives neither) or
``"fast"``. The backend receives the :class:`Prepared` record as is. Shape letters: B batch, T query
length, S key length, H heads, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _masks, _validate
from ._backends import to_numpy
from ._cache import KVCache


@dataclass(frozen=True)
class Positions:
    """Where a call's tokens sit: RoPE positions of the first query and the first key, and the cache step
    (mha._cache) or None."""

    q_offset: int
    k_offset: int
    step: object = None


@dataclass(frozen=True)
class Prepared:
    """One checked layer call.

    query (B, T, E), key (B, L, kdim), value (B, L, vdim): native arrays in the compute dtype, batched;
        for self-attention ``key is query`` and ``value is key`` (a backend may fuse the projections).
        With a cache, L = T new tokens, and S = the keys attended (kept + new).
    masks: the MaskSet of mask, key_mask, causal and the layer's window, over (B, H, T, S).
    pos: RoPE offsets and the cache step.
    head_mask: (B or 1, H, 1, 1) in the compute dtype, or None.
    dropout: the weights' multiplier (B, H, T, S), or None.
    route: "empty", "reference" or "fast" (see the module docstring).
    """

    query: object
    key: object
    value: object
    masks: _masks.MaskSet
    pos: Positions
    head_mask: object
    dropout: object
    return_weights: bool
    return_lse: bool
    batched: bool
    route: str

    @property
    def self_attention(self) -> bool:
        return self.key is self.query and self.value is self.query

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, S)."""
        return self.query.shape[0], self.masks.T, self.masks.S


def convert(layer, x, name: str, dim: int, dim_name: str):
    """One input as the layer's native array, checked: real numbers, (B, L, dim) or (L, dim)."""
    if not layer._is_native(x):
        try:
            x = to_numpy(x)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{name} must be an array of numbers with a regular shape (B, L, {dim_name}) or "
                             f"(L, {dim_name}): {err}") from None
        _validate.feature_input(name, x, dim, dim_name)
        return layer._as_input(layer._from_numpy(x))
    _validate.feature_input(name, x, dim, dim_name)
    return layer._as_input(x)


def _native_mask(layer, x, name: str, check):
    """``mask``, ``key_mask`` or ``head_mask`` checked by ``check(array)`` (dtype and shape), then native."""
    if layer._is_native(x):
        check(x)
        return _in_range(layer, x) if name == "mask" else x
    try:
        x = to_numpy(x)
    except ValueError as err:
        raise ValueError(f"{name} must be an array with a regular shape: {err}") from None
    check(x)
    return layer._from_numpy(_in_range(layer, x) if name == "mask" else x)


def _in_range(layer, x):
    """A numpy float mask wider than float32, its finite entries clipped to float32's range when the layer
    adds it in float32: cast as they are, finfo(float64).min (Hugging Face's padding fill in float64
    models) or -1e300 would become -inf and hide their keys, where a finite number never hides one."""
    if (not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.dtype.itemsize <= 4
            or layer.config.dtype == "float64"):
        return x
    lim = _validate.F32_MAX
    with np.errstate(invalid="ignore"):
        if not (np.abs(x) > lim).any():
            return x
    return np.where(np.isfinite(x), np.clip(x, -lim, lim), x)


def prepare(layer, query, key, value, *, mask, key_mask, causal, head_mask, return_weights, training,
            check_finite, return_lse, cache) -> Prepared:
    """Check and convert one call's arguments (see :meth:`mha.MultiHeadAttention.__call__`)."""
    c, xp = layer.config, layer._xp
    # one array passed as query and key (or key and value) stays one array, which is how self-attention
    # is told (Prepared.self_attention): a conversion or copy of each must not hide it
    given = query, key
    query = convert(layer, query, "query", c.embed_dim, "E")
    if cache is not None and (key is not None or value is not None):
        raise TypeError("cache= is for self-attention: pass only the new tokens as query (key and value "
                        "are projected from them and from the cache)")
    if key is None and value is not None:
        raise TypeError("value was given without key; pass key too (value defaults to key)")
    if key is None and c.kdim != c.embed_dim:
        raise TypeError(f"key is required: kdim={c.kdim} differs from embed_dim={c.embed_dim}")
    if key is None or (key is given[0] and c.kdim == c.embed_dim):
        key = query
    else:
        key = convert(layer, key, "key", c.kdim, "kdim")
    if value is None and c.vdim != c.kdim:
        raise TypeError(f"value is required: vdim={c.vdim} differs from kdim={c.kdim}")
    if value is None or (value is given[1] and c.vdim == c.kdim):
        value = key
    else:
        value = convert(layer, value, "value", c.vdim, "vdim")
    B, T, S, batched = _validate.qkv_shapes(query, key, value)
    flags = {n: _validate.boolean(n, v) for n, v in (("causal", causal), ("return_weights", return_weights),
                                                     ("training", training), ("return_lse", return_lse),
                                                     ("check_finite", check_finite))}
    if key_mask is not None:
        L, what = (T, "key_mask (of the new tokens, with cache=)") if cache is not None else (S, "key_mask")
        key_mask = _native_mask(layer, key_mask, "key_mask",
                                lambda m: _validate.key_mask_shape(m, B, L, batched, name=what))
        key_mask = _masks.key_mask_bool(xp, key_mask, B, L)  # (B, L)
    step = None
    if cache is not None:
        layer._check_cache(cache, B)
        step = cache._plan(T, key_mask)  # raises if full; changes nothing yet
        S, key_mask = step.S, step.key_mask
    if mask is not None:
        mask = _native_mask(layer, mask, "mask", lambda m: _validate.mask_shape(m, B, c.num_heads, T, S, batched))
    if head_mask is not None:
        head_mask = _native_mask(layer, head_mask, "head_mask",
                                 lambda m: _validate.head_mask_shape(m, B, c.num_heads, batched))
    if flags["check_finite"]:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not bool(xp.all(xp.isfinite(x))):
                raise ValueError(f"{name} holds NaN or inf (check_finite=True)")
    return _record(layer, query, key, value, mask, key_mask, head_mask, step, flags, B, T, S, batched)


def _record(layer, query, key, value, mask, key_mask, head_mask, step, flags, B, T, S, batched) -> Prepared:
    """Cast to the compute dtype (without copying what has it; self-attention keeps key is query), build
    the masks, positions and dropout, and choose the route."""
    c = layer.config
    dt, acc = layer._dtypes()
    same_k, same_v = key is query, value is key
    if not batched:
        query, key, value = query[None], key[None], value[None]
    query = query if query.dtype == dt else query.astype(dt)
    key = query if same_k else key if key.dtype == dt else key.astype(dt)
    value = key if same_v else value if value.dtype == dt else value.astype(dt)
    masks = _masks.prepare(layer._xp, mask=mask, key_mask=key_mask, causal=flags["causal"], T=T, S=S,
                           bias_dtype=acc, window=c.window)
    pos = Positions(step.offset, step.offset, step) if step is not None else Positions(S - T, 0)
    if head_mask is not None:
        head_mask = head_mask.astype(dt).reshape(-1, c.num_heads, 1, 1)  # (B or 1, H, 1, 1)
    dropout = None
    if flags["training"] and c.dropout > 0:
        dropout = layer._dropout_multiplier((B, c.num_heads, T, S), c.dropout, acc)
    wants = flags["return_weights"] or flags["return_lse"]
    gives = not wants or layer.fast_weights or (not flags["return_weights"] and layer._fast_lse(B, T, S))
    route = ("empty" if T == 0 or S == 0 else
             "reference" if dropout is not None or not gives else "fast")
    return Prepared(query, key, value, masks, pos, head_mask, dropout, flags["return_weights"],
                    flags["return_lse"], batched, route)
