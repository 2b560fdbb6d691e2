"""The facade: ``mha.MultiHeadAttention(...)`` builds the chosen backend's layer."""

from __future__ import annotations

import abc

from ._backends import layer_class
from ._base import LayerBase
from ._weights import AttentionWeights


class MultiHeadAttention(abc.ABC):
    r"""Multi-head attention with twin backends (numpy and MLX) and one semantics.

    .. math::

        y = \mathrm{concat}_h\big(\mathrm{softmax}_{\text{visible}}(s\,Q_h K_{g(h)}^\top + A)\,V_{g(h)}\big)
            W_O^\top + b_O

    with :math:`Q = x_q W_q^\top + b_q` split into H heads of width D = E / H, K and V likewise into
    ``num_kv_heads`` heads (query head h reads key/value head :math:`g(h) = h // (H / H_{kv})`), scale
    :math:`s = 1/\sqrt{D}` unless given, and :math:`A` an additive mask.

    Calling the class returns the backend's own layer (``mha_cpu.MultiHeadAttention`` or
    ``mha_mlx.MultiHeadAttention``, the latter an ``mlx.nn.Module``); both are instances of this class.

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
        seed: seeds the initialisation and the dropout stream.
        head_dim: D, the width of each head (default E / H; another value lets H * D differ from E,
            as in a layer whose heads were pruned).
        rope: rotary position embeddings on queries and keys: None (off), True (RoFormer's defaults),
            an :class:`mha.RoPE` (base, fraction of each head rotated, traditional or split-half
            layout, position scale) or a dict of its settings.
        window: sliding-window attention: query i sees only keys j with |i + (S - T) - j| < window
            (with ``causal=True``: the last ``window`` keys, itself included); its cache keeps only
            those. None: no window.

    Decoding: ``cache = layer.init_cache(batch_size, max_length)`` and then ``layer(x_new, cache=cache,
    causal=True)`` for each new chunk of tokens (see :class:`mha.KVCache`).

    How it differs from other libraries: masks are True = may attend everywhere (torch's
    ``attn_mask``/``key_padding_mask`` use True = blocked); causal masks align at the end when T != S
    (as MLX and torch SDPA, unlike torch's ``is_causal`` square-mask helper); a query that can see no key
    gets zero weights and outputs the output bias (torch gives NaN, MLX's fused kernel the mean of V);
    weights are returned per head, never averaged.
    """

    def __new__(cls, embed_dim, num_heads, *, num_kv_heads=None, kdim=None, vdim=None, bias=True,
                scale=None, dropout=0.0, backend="auto", dtype="float32", weights=None, seed=None, head_dim=None,
                rope=None, window=None):
        impl = layer_class(backend)
        return impl(embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim, bias=bias,
                    scale=scale, dropout=dropout, dtype=dtype, weights=weights, seed=seed, head_dim=head_dim,
                    rope=rope, window=window)

    @staticmethod
    def from_weights(weights, *, scale=None, dropout=0.0, backend="auto", dtype="float32", seed=None, rope=None,
                     window=None):
        """A layer whose sizes (E, H, Hkv, D, kdim, vdim, bias) are taken from ``weights``
        (an :class:`AttentionWeights` or a path)."""
        if not isinstance(weights, AttentionWeights):
            weights = AttentionWeights.load(weights)
        return MultiHeadAttention(weights.embed_dim, weights.num_heads, num_kv_heads=weights.num_kv_heads,
                                  kdim=weights.kdim, vdim=weights.vdim, bias=weights.bias, scale=scale,
                                  dropout=dropout, backend=backend, dtype=dtype, weights=weights, seed=seed,
                                  head_dim=weights.head_dim, rope=rope, window=window)


MultiHeadAttention.register(LayerBase)
