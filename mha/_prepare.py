"""The call front end: every argument of a layer call checked once, then planned, into one record.

:func:`check` converts and checks the inputs, masks and flags (raising ValueError/TypeError that name
the argument before any arithmetic); :func:`plan` works out what needs the key length (a cache's step,
the mask's last axis), casts to the compute dtype, builds the :class:`mha._masks.MaskSet` with the
queries' and keys' positions, and decides the route once: ``"empty"`` (no query or no key),
``"reference"`` (dropout, or weights/lse asked of a backend whose fast path gives neither) or
``"fast"``. :func:`prepare` is the two in turn, with one branch for the decode step (the new tokens
and a cache, nothing else): the same record from fewer checks, since the cache vouches for the rest.
The backend receives the :class:`Prepared` record as is. Shape letters: B batch, T query length,
S key length, H heads, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _masks, _validate
from ._backends import to_numpy
from ._cache import KVCache

_FLAGS = ("causal", "return_weights", "training", "return_lse", "check_finite")


@dataclass(frozen=True)
class Positions:
    """Where a call's tokens sit: RoPE positions of the first query and the first key, and the cache step
    (mha._cache) or None."""

    q_offset: int
    k_offset: int
    step: object = None


@dataclass(frozen=True)
class Checked:
    """One call's arguments, checked: query (B, T, E), key (B, L, kdim), value (B, L, vdim) native and
    batched (self-attention: ``key is query``); key_mask (B, L) bool; mask (native, its last axis checked
    only when L is the key length, i.e. without a cache); head_mask native; flags by name."""

    query: object
    key: object
    value: object
    mask: object
    key_mask: object
    head_mask: object
    flags: dict
    cache: object
    batched: bool


@dataclass(frozen=True)
class Prepared:
    """One checked and planned layer call.

    query (B, T, E), key (B, L, kdim), value (B, L, vdim): native arrays in the compute dtype, batched;
        for self-attention ``key is query`` and ``value is key`` (a backend may fuse the projections).
        With a cache, L = T new tokens, and S = the keys attended (kept + new).
    masks: the MaskSet of mask, key_mask, causal, the layer's window and the positions, over (B, H, T, S).
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
    """Check and plan one call's arguments (see :meth:`mha.MultiHeadAttention.__call__`)."""
    if (cache is not None and key is None and value is None and mask is None and key_mask is None
            and head_mask is None and training is False and check_finite is False):
        call = _decode_step(layer, query, cache, causal, return_weights, return_lse)
        if call is not None:
            return call
    return plan(layer, check(layer, query, key, value, mask=mask, key_mask=key_mask, causal=causal,
                             head_mask=head_mask, return_weights=return_weights, training=training,
                             check_finite=check_finite, return_lse=return_lse, cache=cache))


def _decode_step(layer, query, cache, causal, return_weights, return_lse) -> Prepared | None:
    """The record of a decode step, ``layer(x_new, cache=cache, causal=..., return_weights=...,
    return_lse=...)``, or None (then the general checks run and raise what they must): query a native
    (B, 1, E) array of the compute dtype (copied into the backend's layout if need be), the flags bools,
    the cache this layer's, for B sequences, with room left, the layer one of self-attention. What
    :func:`check` would test beyond that holds by construction: B, E and the dtype are the layer's."""
    c = layer.config
    if (not (type(causal) is type(return_weights) is type(return_lse) is bool)
            or c.kdim != c.embed_dim or c.vdim != c.embed_dim
            or not layer._is_native(query) or query.ndim != 3
            or query.shape[1] != 1 or query.shape[2] != c.embed_dim or query.dtype != layer._dtypes()[0]
            or type(cache) is not KVCache
            or cache._owner != layer._cache_owner() or cache.batch_size != query.shape[0]
            or (cache.max_length is not None and cache.offset >= cache.max_length)):
        return None
    query = layer._as_input(query)
    step = cache._plan(1, None)
    keep = None if step.key_mask is None else step.key_mask[:, None, None, :]  # (B, 1, 1, S)
    masks = _masks.MaskSet(keep, None, causal, c.window, step.q_pos, step.k_pos)
    pos = Positions(step.offset, step.offset, step)
    return Prepared(query, query, query, masks, pos, None, None, return_weights, return_lse, True,
                    _route(layer, None, return_weights, return_lse, query.shape[0], 1, step.S))


def check(layer, query, key, value, *, mask, key_mask, causal, head_mask, return_weights, training,
          check_finite, return_lse, cache) -> Checked:
    """Every argument converted and checked (module docstring); nothing computed yet."""
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
    B, T, L, batched = _validate.qkv_shapes(query, key, value)
    flags = {n: _validate.boolean(n, v) for n, v in zip(_FLAGS, (causal, return_weights, training, return_lse,
                                                                  check_finite))}
    if cache is not None:
        layer._check_cache(cache, B)
    if key_mask is not None:
        what = "key_mask (of the new tokens, with cache=)" if cache is not None else "key_mask"
        key_mask = _native_mask(layer, key_mask, "key_mask",
                                lambda m: _validate.key_mask_shape(m, B, L, batched, name=what))
        key_mask = _masks.key_mask_bool(xp, key_mask, B, L)  # (B, L)
    if mask is not None:
        S = None if cache is not None else L  # with a cache the last axis is checked by plan()
        mask = _native_mask(layer, mask, "mask", lambda m: _validate.mask_shape(m, B, c.num_heads, T, S, batched))
    if head_mask is not None:
        head_mask = _native_mask(layer, head_mask, "head_mask",
                                 lambda m: _validate.head_mask_shape(m, B, c.num_heads, batched))
    if flags["check_finite"]:
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not bool(xp.all(xp.isfinite(x))):
                raise ValueError(f"{name} holds NaN or inf (check_finite=True)")
    return Checked(query, key, value, mask, key_mask, head_mask, flags, cache, batched)


def plan(layer, call: Checked) -> Prepared:
    """The checked call planned: a cache's step (raises if full; changes nothing yet), the mask's last
    axis against S, the compute dtype (without copying what has it; self-attention keeps key is query),
    the MaskSet with positions, dropout, and the route."""
    c, xp = layer.config, layer._xp
    query, key, value, flags = call.query, call.key, call.value, call.flags
    B, T, L = query.shape[-3] if call.batched else 1, query.shape[-2], key.shape[-2]
    key_mask, step, q_pos, k_pos, evicted = call.key_mask, None, None, range(L), None
    if call.cache is not None:
        step = call.cache._plan(T, key_mask)
        key_mask, q_pos, k_pos, evicted = step.key_mask, step.q_pos, step.k_pos, step.evicted
    S = len(k_pos)
    if call.mask is not None and step is not None:
        _validate.mask_shape(call.mask, B, c.num_heads, T, S, call.batched)
    dt, acc = layer._dtypes()
    same_k, same_v = key is query, value is key
    if not call.batched:
        query, key, value = query[None], key[None], value[None]
    query = query if query.dtype == dt else query.astype(dt)
    key = query if same_k else key if key.dtype == dt else key.astype(dt)
    value = key if same_v else value if value.dtype == dt else value.astype(dt)
    masks = _masks.prepare(xp, mask=call.mask, key_mask=key_mask, causal=flags["causal"], T=T, bias_dtype=acc,
                           window=c.window, q_pos=q_pos, k_pos=k_pos, rule_keep=evicted)
    pos = Positions(step.offset, step.offset, step) if step is not None else Positions(S - T, 0)
    head_mask = call.head_mask
    if head_mask is not None:
        head_mask = head_mask.astype(dt).reshape(-1, c.num_heads, 1, 1)  # (B or 1, H, 1, 1)
    dropout = None
    if flags["training"] and c.dropout > 0:
        dropout = layer._dropout_multiplier((B, c.num_heads, T, S), c.dropout, acc)
    return Prepared(query, key, value, masks, pos, head_mask, dropout, flags["return_weights"],
                    flags["return_lse"], call.batched,
                    _route(layer, dropout, flags["return_weights"], flags["return_lse"], B, T, S))


def _route(layer, dropout, return_weights: bool, return_lse: bool, B: int, T: int, S: int) -> str:
    wants = return_weights or return_lse
    gives = not wants or layer.fast_weights or (not return_weights and layer._fast_lse(B, T, S))
    return "empty" if T == 0 or S == 0 else "reference" if dropout is not None or not gives else "fast"
