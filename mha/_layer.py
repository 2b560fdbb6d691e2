r"""``mha.MultiHeadAttention``: the class users see, and what both backends' layers share.

Calling the class builds the chosen backend's subclass (``mha_cpu.MultiHeadAttention`` or
``mha_mlx.MultiHeadAttention``); everything backend-free lives here, the backend supplies the hooks of
:mod:`mha._interface`.
"""

from __future__ import annotations

import os

from . import _prepare, _validate
from ._backends import check_name, layer_class, to_numpy
from ._cache import KVCache
from ._interface import BackendHooks
from ._reference import multi_head_attention
from ._rope import apply_rope
from ._weights import AttentionWeights


class MultiHeadAttention(BackendHooks):
    r"""Multi-head attention with twin backends (numpy and MLX) and one semantics.

    .. math::

        y = \mathrm{concat}_h\big(\mathrm{softmax}_{\text{visible}}(s\,Q_h K_{g(h)}^\top + A)\,V_{g(h)}\big)
            W_O^\top + b_O

    with :math:`Q = x_q W_q^\top + b_q` split into H heads of width D = E / H, K and V likewise into
    ``num_kv_heads`` heads (query head h reads key/value head :math:`g(h) = h // (H / H_{kv})`), scale
    :math:`s = 1/\sqrt{D}` unless given, and :math:`A` an additive mask.

    ``mha.MultiHeadAttention(...)`` returns the backend's own layer (``mha_cpu.MultiHeadAttention`` or
    ``mha_mlx.MultiHeadAttention``, the latter an ``mlx.nn.Module``), a subclass of this class.

    Args:
        embed_dim: E, the width of the query input and of the output.
        num_heads: H; must divide E.
        num_kv_heads: key/value heads for grouped-query attention (must divide H; 1 = multi-query).
        kdim, vdim: widths of the key and value inputs (default E).
        bias: biases on all four projections.
        scale: logit scale (default 1/sqrt(D)).
        dropout: probability of dropping a weight when called with ``training=True``.
        backend: "auto" (MLX on a GPU, else numpy; ``$MHA_BACKEND`` overrides), "numpy" or "mlx".
        dtype: "float32" (default), "float64" (numpy), "float16"/"bfloat16" (MLX).
        weights: an :class:`AttentionWeights` or a path to a saved one; default: seeded Xavier init.
        seed: seeds the initialisation and the dropout stream (an int in [0, 2**63) or None).
        head_dim: D, the width of each head (default E / H; another value lets H * D differ from E,
            as in a layer whose heads were pruned).
        rope: rotary position embeddings on queries and keys: None (off), True (RoFormer's defaults),
            an :class:`mha.RoPE` (base, fraction of each head rotated, traditional or split-half
            layout, position scale) or a dict of its settings.
        window: sliding-window attention: query i sees only keys j with |i + (S - T) - j| < window
            (with ``causal=True``: the last ``window`` keys, itself included). None: no window.
        softcap: c > 0 caps the logits as c * tanh(logit / c) before the additive mask (Gemma 2). None: off.
        qk_norm: eps > 0 RMS-normalises every query and key head over D with learned weights
            (``weights.q_norm``, ``weights.k_norm``), after the projection and before RoPE (Qwen3, Gemma 3).
        sinks: learned per-head sink logits (``weights.sinks``, (H,)): exp(sink_h) joins each row's
            softmax denominator with no value (gpt-oss), so the weights sum to less than 1.

    Decoding: ``cache = layer.init_cache(batch_size, max_length)`` and then ``layer(x_new, cache=cache,
    causal=True)`` for each new chunk of tokens (see :class:`mha.KVCache`).

    How it differs from other libraries: masks are True = may attend everywhere (torch's
    ``attn_mask``/``key_padding_mask`` use True = blocked); causal masks align at the end when T != S
    (as MLX and torch SDPA, unlike torch's ``is_causal`` square-mask helper); a query that can see no key
    gets zero weights and outputs the output bias (torch gives NaN, MLX's fused kernel the mean of V);
    weights are returned per head, never averaged.
    """

    def __new__(cls, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True, scale=None,
                dropout=0.0, backend="auto", dtype="float32", weights=None, seed=None, head_dim=None, rope=None,
                window=None, softcap=None, qk_norm=None, sinks=False):
        if cls is MultiHeadAttention:  # the facade: build the chosen backend's layer (then its __init__)
            cls = layer_class(backend)
        return super().__new__(cls)

    def __init__(self, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True,
                 scale=None, dropout=0.0, backend="auto", dtype="float32", weights=None, seed=None, head_dim=None,
                 rope=None, window=None, softcap=None, qk_norm=None, sinks=False):
        super().__init__()
        if check_name(backend) not in ("auto", self.backend):
            raise ValueError(f"{type(self).__module__.split('.')[0]}.MultiHeadAttention is the {self.backend} "
                             f"backend, got backend={backend!r}; use mha.MultiHeadAttention(..., backend={backend!r})")
        cfg = _validate.layer_config(embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim,
                                     vdim=vdim, head_dim=head_dim, bias=bias, scale=scale, dropout=dropout,
                                     dtype=dtype, backend=self.backend, rope=rope, window=window, softcap=softcap,
                                     qk_norm=qk_norm, sinks=sinks)
        self._config = cfg
        self._seed = _validate.seed_value(seed)
        if weights is None:
            weights = AttentionWeights.init(cfg.embed_dim, cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                            kdim=cfg.kdim, vdim=cfg.vdim, head_dim=cfg.head_dim, bias=cfg.bias,
                                            seed=self._seed, qk_norm=cfg.qk_norm is not None, sinks=cfg.sinks)
        elif isinstance(weights, (str, os.PathLike)):
            weights = AttentionWeights.load(weights)
        self._check_weights(weights)
        self._init_rng(self._seed)
        self._set_params(weights)

    @classmethod
    def from_weights(cls, weights, *, scale=None, dropout=0.0, backend="auto", dtype="float32", seed=None,
                     rope=None, window=None, softcap=None, qk_norm=None) -> "MultiHeadAttention":
        """A layer whose sizes (E, H, Hkv, D, kdim, vdim, bias, sinks) are taken from ``weights`` (an
        :class:`AttentionWeights` or a path); on a backend's class, that backend. Weights with q/k norms
        need ``qk_norm`` (their epsilon)."""
        if not isinstance(weights, AttentionWeights):
            weights = AttentionWeights.load(weights)
        return cls(weights.embed_dim, weights.num_heads, num_kv_heads=weights.num_kv_heads, kdim=weights.kdim,
                   vdim=weights.vdim, bias=weights.bias, scale=scale, dropout=dropout, backend=backend, dtype=dtype,
                   weights=weights, seed=seed, head_dim=weights.head_dim, rope=rope, window=window, softcap=softcap,
                   qk_norm=qk_norm, sinks=weights.sinks is not None)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> _validate.LayerConfig:
        """The layer's hyper-parameters, validated."""
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
        defaults = {"num_kv_heads": c.num_heads, "head_dim": c.embed_dim // c.num_heads}
        extra = "".join(f", {k}={v!r}" for k, v in (("num_kv_heads", c.num_kv_heads), ("kdim", c.kdim),
                                                    ("vdim", c.vdim), ("head_dim", c.head_dim))
                        if v != defaults.get(k, c.embed_dim))
        extra += "".join(f", {k}={v!r}" for k, v in (("rope", c.rope), ("window", c.window), ("softcap", c.softcap),
                                                    ("qk_norm", c.qk_norm)) if v is not None)
        extra += ", sinks=True" if c.sinks else ""
        return (f"{type(self).__module__.split('.')[0]}.MultiHeadAttention(embed_dim={c.embed_dim}, "
                f"num_heads={c.num_heads}{extra}, bias={c.bias}, backend={self.backend!r}, dtype={c.dtype!r})")

    def _check_weights(self, w) -> None:
        if not isinstance(w, AttentionWeights):
            raise TypeError(f"weights must be an mha.AttentionWeights or a path, got {type(w).__name__}")
        c = self._config
        wrong = [f"{name}: layer {a}, weights {b}"
                 for name, a, b in (("embed_dim", c.embed_dim, w.embed_dim), ("num_heads", c.num_heads, w.num_heads),
                                    ("num_kv_heads", c.num_kv_heads, w.num_kv_heads),
                                    ("head_dim", c.head_dim, w.head_dim), ("kdim", c.kdim, w.kdim),
                                    ("vdim", c.vdim, w.vdim), ("bias", c.bias, w.bias),
                                    ("qk_norm weights", c.qk_norm is not None, w.q_norm is not None),
                                    ("sinks", c.sinks, w.sinks is not None))
                 if a != b]
        if wrong:
            raise ValueError("weights do not match the layer (" + "; ".join(wrong) + "); build the layer with "
                             "mha.MultiHeadAttention.from_weights(weights) to take its sizes")

    # -- weights -----------------------------------------------------------------------------------
    @property
    def weights(self) -> AttentionWeights:
        """The current parameters as :class:`mha.AttentionWeights` (numpy copies)."""
        p = {k: None if v is None else to_numpy(v) for k, v in self._native_params().items()}
        return AttentionWeights(**p, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads)  # norms, sinks too

    def set_weights(self, weights) -> None:
        """Replace the parameters (an :class:`mha.AttentionWeights` or a file path) in place."""
        if isinstance(weights, (str, os.PathLike)):
            weights = AttentionWeights.load(weights)
        self._check_weights(weights)
        self._set_params(weights)

    def to(self, backend, *, dtype=None) -> "MultiHeadAttention":
        """The same layer (weights, sizes, scale, dropout, seed) on another backend."""
        kwargs = self._config.kwargs()
        if dtype is not None:
            kwargs["dtype"] = dtype
        return layer_class(backend)(self.embed_dim, self.num_heads, **kwargs, weights=self.weights, seed=self._seed)

    # -- decoding ----------------------------------------------------------------------------------
    def init_cache(self, batch_size, max_length=None, *, max_cache=None, keep=0) -> KVCache:
        """An empty key/value cache for decoding with this layer: ``layer(x_new, cache=cache, causal=True)``.

        Args:
            batch_size: B of the calls that will use it (unbatched calls: 1).
            max_length: the most positions it accepts in total (an unbounded cache is allocated at once
                to it); None: no limit, the buffers grow geometrically.
            max_cache: a rotating cache: each query sees at most ``max_cache`` keys, the first ``keep``
                positions and the latest others (older ones are evicted; keep=0 is a sliding window of
                max_cache); memory O(max_cache) however long the generation. A layer with a sliding
                ``window`` keeps at most its last window - 1 positions anyway.
            keep: positions at the start never evicted (StreamingLLM's attention sinks); needs max_cache.

        Returns:
            an :class:`mha.KVCache` holding (B, num_kv_heads, positions, head_dim) keys (after k norm and
            RoPE) and values in the layer's dtype, which positions were padding, and their absolute
            positions (``cache.positions``).
        """
        c = self._config
        batch_size = _validate.positive_int("batch_size", batch_size)
        max_length = None if max_length is None else _validate.positive_int("max_length", max_length)
        max_cache = None if max_cache is None else _validate.positive_int("max_cache", max_cache)
        keep = 0 if keep == 0 and not isinstance(keep, bool) else _validate.positive_int("keep", keep)
        if keep and (max_cache is None or keep >= max_cache):
            raise ValueError(f"keep={keep} needs a rotating cache larger than it: max_cache > keep, got "
                             f"max_cache={max_cache}")
        if c.kdim != c.embed_dim or c.vdim != c.embed_dim:
            raise ValueError(f"init_cache needs a self-attention layer (kdim = vdim = embed_dim), this one has "
                             f"embed_dim={c.embed_dim}, kdim={c.kdim}, vdim={c.vdim}")
        cache = KVCache(self._xp, batch_size=batch_size, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                        dtype=self._dtypes()[0], max_length=max_length, window=c.window, owner=self._cache_owner(),
                        max_cache=max_cache, keep=keep)
        self._settle(cache)
        return cache

    def _cache_owner(self) -> tuple:
        c = self._config
        return (self.backend, c.num_kv_heads, c.head_dim, c.dtype, c.rope, c.window, c.qk_norm)

    def _check_cache(self, cache, B: int) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from layer.init_cache(), got {type(cache).__name__}")
        if cache._owner != self._cache_owner():
            names = ("backend", "num_kv_heads", "head_dim", "dtype", "rope", "window", "qk_norm")
            diff = "; ".join(f"{n}: cache {a!r}, layer {b!r}" for n, a, b in zip(names, cache._owner,
                                                                                self._cache_owner()) if a != b)
            raise ValueError(f"cache was made for another kind of layer ({diff}); make it with this layer's "
                             f"init_cache()")
        if cache.batch_size != B:
            raise ValueError(f"cache holds batch_size={cache.batch_size} but the query has batch size {B}")

    def _rope(self, x, offset: int):
        """RoPE on (B, H, L, D) heads (the reference's rotation; a backend may use a fused kernel)."""
        return apply_rope(self._xp, x, self._config.rope, offset, self._dtypes()[1])

    # -- the call ----------------------------------------------------------------------------------
    def __call__(self, query, key=None, value=None, *, mask=None, key_mask=None, causal=False,
                 head_mask=None, return_weights=False, training=False, check_finite=False,
                 return_lse=False, cache=None):
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (B, T, E) or unbatched (T, E).
            key: (B, S, kdim); defaults to ``query`` (self-attention).
            value: (B, S, vdim); defaults to ``key``.
            mask: bool (True = may attend), int 0/1, or float (added to the logits; -inf hides, a finite
                value such as finfo.min or -1e9 leaves the key visible with a vanishing weight);
                broadcastable to (B, H, T, S) (a 3-D mask with batched input must have a leading 1:
                (B, T, S) and (H, T, S) could not be told apart).
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
        call = _prepare.prepare(self, query, key, value, mask=mask, key_mask=key_mask, causal=causal,
                                head_mask=head_mask, return_weights=return_weights, training=training,
                                check_finite=check_finite, return_lse=return_lse, cache=cache)
        with self._errstate():  # non-finite inputs propagate as documented, without warnings
            if call.route == "empty":
                out, weights, lse = self._empty(call)
            elif call.route == "reference":
                out, weights, lse = self._reference(call)
            else:
                out, weights, lse = self._forward(call)
        if call.pos.step is not None:
            self._settle(call.pos.step.cache)
        dt, acc = self._dtypes()
        results = [out]
        if call.return_weights:
            results.append(weights if weights.dtype == dt else weights.astype(dt))
        if call.return_lse:
            results.append(lse if lse.dtype == acc else lse.astype(acc))
        if not call.batched:
            results = [r[0] for r in results]
        return results[0] if len(results) == 1 else tuple(results)

    def _reference(self, call):
        """The readable path (mha._reference) on this backend: (output, weights, lse)."""
        c, pos = self._config, call.pos
        out, weights, lse = multi_head_attention(
            self._xp, call.query, call.key, call.value, self._native_params(), num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads, scale=c.effective_scale, masks=call.masks, head_mask=call.head_mask,
            dropout=call.dropout, acc_dtype=self._dtypes()[1], rope=c.rope, q_offset=pos.q_offset,
            k_offset=pos.k_offset, kv_step=pos.step, softcap=c.softcap, qk_norm=c.qk_norm,
            return_weights=call.return_weights)
        return out.astype(call.query.dtype), weights, lse

    def _empty(self, call):
        """No queries or no keys: every query sees nothing, so output = output bias, weights (B, H, T, 0)."""
        xp, (dt, acc) = self._xp, self._dtypes()
        B, T, S = call.shape
        out = xp.zeros((B, T, self.embed_dim), dtype=dt)
        o_bias = self._native_params()["o_bias"]
        if o_bias is not None:
            out = out + o_bias
        return (out.astype(dt), xp.zeros((B, self.num_heads, T, S), dtype=acc),
                xp.full((B, self.num_heads, T), float("-inf"), dtype=acc))
