"""What both backends' layers share: construction, argument checks, masks, and the call front end.

A backend subclasses :class:`LayerBase` and supplies the array namespace and five small hooks; the
arithmetic itself is :mod:`mha._reference` (readable path) or the backend's own fast path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from . import _masks, _validate
from ._backends import to_numpy
from ._cache import KVCache
from ._reference import multi_head_attention
from ._rope import apply_rope
from ._weights import AttentionWeights


@dataclass(frozen=True)
class _Positions:
    """Where a call's tokens sit: RoPE offsets of the first query and the first key, and the cache step."""

    q_offset: int
    k_offset: int
    step: object = None


class LayerBase:
    """Shared implementation of ``mha_cpu.MultiHeadAttention`` and ``mha_mlx.MultiHeadAttention``.

    Subclasses set ``backend`` and ``_xp`` and implement ``_is_native``, ``_from_numpy``,
    ``_set_params``, ``_native_params``, ``_dropout_multiplier`` and ``_fast_forward``.
    """

    backend: str = ""
    _xp = None

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True,
                 scale=None, dropout=0.0, dtype="float32", weights=None, seed=None, head_dim=None, rope=None,
                 window=None):
        super().__init__()
        cfg = _validate.layer_config(embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim,
                                     vdim=vdim, head_dim=head_dim, bias=bias, scale=scale, dropout=dropout,
                                     dtype=dtype, backend=self.backend, rope=rope, window=window)
        self._config = cfg
        self._seed = _validate.seed_value(seed)
        if weights is None:
            weights = AttentionWeights.init(cfg.embed_dim, cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                            kdim=cfg.kdim, vdim=cfg.vdim, head_dim=cfg.head_dim, bias=cfg.bias,
                                            seed=self._seed)
        elif isinstance(weights, (str, os.PathLike)):
            weights = AttentionWeights.load(weights)
        self._check_weights(weights)
        self._init_rng(self._seed)
        self._set_params(weights)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> _validate.LayerConfig:
        return self._config

    embed_dim = property(lambda self: self._config.embed_dim, doc="E, the query and output width.")
    num_heads = property(lambda self: self._config.num_heads, doc="H, the number of query heads.")
    num_kv_heads = property(lambda self: self._config.num_kv_heads, doc="Hkv, key/value heads (GQA).")
    head_dim = property(lambda self: self._config.head_dim, doc="D, the width of each head (E / H by default).")
    kdim = property(lambda self: self._config.kdim, doc="Width of the key input.")
    vdim = property(lambda self: self._config.vdim, doc="Width of the value input.")
    scale = property(lambda self: self._config.effective_scale, doc="The logit scale in use.")
    dropout = property(lambda self: self._config.dropout, doc="Dropout probability on the weights.")
    dtype = property(lambda self: self._config.dtype, doc="Compute dtype name, e.g. 'float32'.")
    rope = property(lambda self: self._config.rope, doc="The rotary position embedding (mha.RoPE) or None.")
    window = property(lambda self: self._config.window, doc="The sliding window W (None: no window).")

    def __repr__(self) -> str:
        c = self._config
        extra = "".join(
            f", {k}={v!r}" for k, v in (("num_kv_heads", c.num_kv_heads), ("kdim", c.kdim), ("vdim", c.vdim),
                                        ("head_dim", c.head_dim))
            if v != {"num_kv_heads": c.num_heads, "head_dim": c.embed_dim // c.num_heads}.get(k, c.embed_dim)
        ) + "".join(f", {k}={v!r}" for k, v in (("rope", c.rope), ("window", c.window)) if v is not None)
        return (f"{type(self).__module__.split('.')[0]}.MultiHeadAttention(embed_dim={c.embed_dim}, "
                f"num_heads={c.num_heads}{extra}, bias={c.bias}, backend={self.backend!r}, dtype={c.dtype!r})")

    def _check_weights(self, w) -> None:
        if not isinstance(w, AttentionWeights):
            raise TypeError(f"weights must be an mha.AttentionWeights or a path, got {type(w).__name__}")
        c = self._config
        wrong = [
            f"{name}: layer {a}, weights {b}"
            for name, a, b in (("embed_dim", c.embed_dim, w.embed_dim), ("num_heads", c.num_heads, w.num_heads),
                               ("num_kv_heads", c.num_kv_heads, w.num_kv_heads), ("head_dim", c.head_dim, w.head_dim),
                               ("kdim", c.kdim, w.kdim), ("vdim", c.vdim, w.vdim), ("bias", c.bias, w.bias))
            if a != b
        ]
        if wrong:
            raise ValueError("weights do not match the layer (" + "; ".join(wrong) + "); build the layer with "
                             "mha.MultiHeadAttention.from_weights(weights) to take its sizes")

    # -- weights -----------------------------------------------------------------------------------
    @property
    def weights(self) -> AttentionWeights:
        """The current parameters as :class:`mha.AttentionWeights` (numpy copies)."""
        p = {k: None if v is None else to_numpy(v) for k, v in self._native_params().items()}
        return AttentionWeights(**p, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)

    def set_weights(self, weights) -> None:
        """Replace the parameters (an :class:`mha.AttentionWeights` or a file path) in place."""
        if isinstance(weights, (str, os.PathLike)):
            weights = AttentionWeights.load(weights)
        self._check_weights(weights)
        self._set_params(weights)

    def to(self, backend, *, dtype=None):
        """The same layer (weights, sizes, scale, dropout, seed) on another backend."""
        from ._layer import MultiHeadAttention

        kwargs = self._config.kwargs()
        if dtype is not None:
            kwargs["dtype"] = dtype
        return MultiHeadAttention(self.embed_dim, self.num_heads, **kwargs, backend=backend,
                                  weights=self.weights, seed=self._seed)

    # -- decoding ----------------------------------------------------------------------------------
    def init_cache(self, batch_size, max_length=None) -> KVCache:
        """An empty key/value cache for decoding with this layer: ``layer(x_new, cache=cache, causal=True)``.

        Args:
            batch_size: B of the calls that will use it (unbatched calls: 1).
            max_length: the most positions it will hold in total, allocated at once; None grows it as
                needed. A layer with a sliding ``window`` keeps only the last window - 1 positions
                (memory O(window) however long the generation).

        Returns:
            an :class:`mha.KVCache` holding (B, num_kv_heads, positions, head_dim) keys and values
            (after RoPE) in the layer's dtype, and which positions were padding.
        """
        c = self._config
        batch_size = _validate.positive_int("batch_size", batch_size)
        max_length = None if max_length is None else _validate.positive_int("max_length", max_length)
        if c.kdim != c.embed_dim or c.vdim != c.embed_dim:
            raise ValueError(f"init_cache needs a self-attention layer (kdim = vdim = embed_dim), this one has "
                             f"embed_dim={c.embed_dim}, kdim={c.kdim}, vdim={c.vdim}")
        return KVCache(self._xp, batch_size=batch_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                       dtype=self._dtypes()[0], max_length=max_length, window=c.window, owner=self._cache_owner())

    def _cache_owner(self) -> tuple:
        c = self._config
        return (self.backend, c.num_kv_heads, c.head_dim, c.dtype, c.rope, c.window)

    def _check_cache(self, cache, B: int) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from layer.init_cache(), got {type(cache).__name__}")
        if cache._owner != self._cache_owner():
            names = ("backend", "num_kv_heads", "head_dim", "dtype", "rope", "window")
            diff = "; ".join(f"{n}: cache {a!r}, layer {b!r}" for n, a, b in zip(names, cache._owner,
                                                                                self._cache_owner()) if a != b)
            raise ValueError(f"cache was made for another kind of layer ({diff}); make it with this layer's "
                             f"init_cache()")
        if cache.batch_size != B:
            raise ValueError(f"cache holds batch_size={cache.batch_size} but the query has batch size {B}")

    def _rope(self, x, offset: int):
        """RoPE on (B, H, L, D) heads (the reference's rotation; a backend may use a fused kernel)."""
        return apply_rope(self._xp, x, self._config.rope, offset, self._dtypes()[1])

    def _positions(self, q, k, v, pos: _Positions):
        """RoPE and the cache on (B, H, T, D) queries and (B, Hkv, L, D) keys/values: what a fast path
        does between the projections and the attention (the reference does the same; the numpy
        backend inlines it to check the new keys for NaN/inf before they enter the cache)."""
        if self._config.rope is not None:
            q, k = self._rope(q, pos.q_offset), self._rope(k, pos.k_offset)
        if pos.step is not None:
            k, v = pos.step.append(k, v)
        return q, k, v

    # -- the call ----------------------------------------------------------------------------------
    def _convert(self, x, name):
        if self._is_native(x):
            return x
        try:
            x = to_numpy(x)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{name} must be an array of numbers with a regular shape (B, L, E) or (L, E): "
                             f"{err}") from None
        if x.dtype.kind not in "biufc":
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        return self._from_numpy(x)

    def __call__(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False,
                 head_mask=None, return_weights=False, training=False, check_finite=False,
                 return_lse=False, cache=None):
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (B, T, E) or unbatched (T, E).
            key: (B, S, kdim); defaults to ``query`` (self-attention).
            value: (B, S, vdim); defaults to ``key``.
            mask: bool (True = may attend), int 0/1, or float (added to the logits; -inf hides);
                broadcastable to (B, H, T, S).
            key_mask: (B, S) bool/int, False marks padding keys; with ``cache``, (B, T): which of the new
                tokens are padding (the cache remembers it for later calls).
            causal: query i sees keys j <= i + (S - T) (aligned at the end). The layer's ``window`` W
                adds |i + (S - T) - j| < W.
            head_mask: (H,) or (B, H) multipliers on each head's context before the output projection.
            return_weights: also return the per-head weights (B, H, T, S).
            training: apply dropout to the weights (when the layer's dropout > 0).
            check_finite: raise ValueError if query, key or value hold NaN or inf.
            return_lse: also return (B, H, T), the log-sum-exp of each query's visible logits (-inf when
                it sees none): any weight can be recomputed later as exp(logit - lse).
            cache: a :class:`mha.KVCache` from :meth:`init_cache` (self-attention; pass only the new
                tokens as ``query``): their keys and values are appended to it and the queries attend
                over all it keeps, S = kept + T keys, the new ones last; RoPE positions continue from it.

        Returns:
            output (B, T, E) as the backend's native array; ``(output, weights)``, ``(output, lse)`` or
            ``(output, weights, lse)`` when asked. A query with no visible key has zero weights and
            output equal to the output bias.
        """
        xp, c = self._xp, self._config
        query = self._convert(query, "query")
        _validate.feature_input("query", query, c.embed_dim, "E")
        if cache is not None and (key is not None or value is not None):
            raise TypeError("cache= is for self-attention: pass only the new tokens as query (key and value "
                            "are projected from them and from the cache)")
        if key is None and value is not None:
            raise TypeError("value was given without key; pass key too (value defaults to key)")
        if key is None and c.kdim != c.embed_dim:
            raise TypeError(f"key is required: kdim={c.kdim} differs from embed_dim={c.embed_dim}")
        key = query if key is None else self._convert(key, "key")
        _validate.feature_input("key", key, c.kdim, "kdim")
        if value is None and c.vdim != c.kdim:
            raise TypeError(f"value is required: vdim={c.vdim} differs from kdim={c.kdim}")
        value = key if value is None else self._convert(value, "value")
        _validate.feature_input("value", value, c.vdim, "vdim")
        B, T, S, batched = _validate.qkv_shapes(query, key, value)
        H = c.num_heads
        step = None
        if key_mask is not None:
            key_mask = self._convert(key_mask, "key_mask")
            if cache is not None:
                _validate.key_mask_shape(key_mask, B, T, batched, name="key_mask (of the new tokens, with cache=)")
            else:
                _validate.key_mask_shape(key_mask, B, S, batched)
        if cache is not None:
            self._check_cache(cache, B)
            if key_mask is not None:
                _masks.check_values(xp, "key_mask", key_mask)
                key_mask = (key_mask if _validate.array_kind(key_mask) == "b" else key_mask != 0).reshape(B, T)
            step = cache._plan(T, key_mask)  # raises if full; changes nothing yet
            S, key_mask = step.S, step.key_mask
            if not batched and key_mask is not None:
                key_mask = key_mask[0]
        if mask is not None:
            mask = self._convert(mask, "mask")
            _validate.mask_shape(mask, B, H, T, S, batched)
        if head_mask is not None:
            head_mask = self._convert(head_mask, "head_mask")
            _validate.head_mask_shape(head_mask, B, H, batched)
        causal = _validate.boolean("causal", causal)
        return_weights = _validate.boolean("return_weights", return_weights)
        training = _validate.boolean("training", training)
        return_lse = _validate.boolean("return_lse", return_lse)
        if _validate.boolean("check_finite", check_finite):
            for name, x in (("query", query), ("key", key), ("value", value)):
                if x.dtype != bool and not bool(xp.all(xp.isfinite(x))):
                    raise ValueError(f"{name} holds NaN or inf (check_finite=True)")

        dt, acc = self._dtypes()
        # Cast without copying what already has the dtype, and keep self-attention's identity
        # (key is query) so that a backend can fuse the projections.
        same_k, same_v = key is query, value is key
        if not batched:
            query, key, value = query[None], key[None], value[None]
        query = query if query.dtype == dt else query.astype(dt)
        key = query if same_k else key if key.dtype == dt else key.astype(dt)
        value = key if same_v else value if value.dtype == dt else value.astype(dt)
        masks = _masks.prepare(xp, mask=mask, key_mask=key_mask, causal=causal, T=T, S=S, bias_dtype=acc,
                               window=c.window)
        pos = _Positions(step.offset if step else S - T, step.offset if step else 0, step)
        if head_mask is not None:
            head_mask = head_mask.astype(dt).reshape(-1, H, 1, 1)  # (B or 1, H, 1, 1)
        dropout = None
        if training and c.dropout > 0:
            dropout = self._dropout_multiplier((B, H, T, S), c.dropout, acc)

        with self._errstate():  # non-finite inputs propagate as documented, without warnings
            if T == 0 or S == 0:
                out, weights, lse = self._empty(B, T, S, dt, acc)
            elif dropout is not None:
                out, weights, lse = self._reference(query, key, value, masks, head_mask, pos, dropout)
            else:
                out, weights, lse = self._fast_forward(query, key, value, masks, head_mask, pos, return_weights,
                                                       return_lse)
        results = [out]
        if return_weights:
            results.append(weights if weights.dtype == dt else weights.astype(dt))
        if return_lse:
            results.append(lse if lse.dtype == acc else lse.astype(acc))
        if not batched:
            results = [r[0] for r in results]
        return results[0] if len(results) == 1 else tuple(results)

    def _reference(self, query, key, value, masks, head_mask, pos=None, dropout=None):
        """The readable path (mha._reference) on this backend: (output, weights, lse)."""
        c = self._config
        pos = pos or _Positions(masks.S - masks.T, 0)
        out, weights, lse = multi_head_attention(
            self._xp, query, key, value, self._native_params(), num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads, scale=c.effective_scale, masks=masks, head_mask=head_mask,
            dropout=dropout, acc_dtype=self._dtypes()[1], rope=c.rope, q_offset=pos.q_offset,
            k_offset=pos.k_offset, kv_step=pos.step)
        return out.astype(query.dtype), weights, lse

    def _empty(self, B, T, S, dt, acc):
        """No queries or no keys: every query sees nothing, so output = output bias, weights (B, H, T, 0)."""
        xp = self._xp
        out = xp.zeros((B, T, self.embed_dim), dtype=dt)
        o_bias = self._native_params()["o_bias"]
        if o_bias is not None:
            out = out + o_bias
        return (out.astype(dt), xp.zeros((B, self.num_heads, T, S), dtype=acc),
                xp.full((B, self.num_heads, T), float("-inf"), dtype=acc))

    # -- hooks -------------------------------------------------------------------------------------
    def _errstate(self):
        return contextlib.nullcontext()

    def _dtypes(self):
        """(compute dtype, accumulation dtype) as native dtype objects."""
        raise NotImplementedError

    def _init_rng(self, seed) -> None:
        raise NotImplementedError

    def _is_native(self, x) -> bool:
        raise NotImplementedError

    def _from_numpy(self, x: np.ndarray):
        raise NotImplementedError

    def _set_params(self, weights: AttentionWeights) -> None:
        raise NotImplementedError

    def _native_params(self) -> dict:
        raise NotImplementedError

    def _dropout_multiplier(self, shape, p: float, dtype):
        raise NotImplementedError

    def _fast_forward(self, query, key, value, masks, head_mask, pos, return_weights: bool, return_lse: bool):
        """(output, weights or None, lse or None) without dropout, by the backend's fastest way."""
        raise NotImplementedError
