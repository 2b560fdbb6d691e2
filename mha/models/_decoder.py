r"""Decoder language models (Llama, Mistral, Qwen 2/3, Gemma 1/2/3, Phi-3, GPT-2, mha_attn_only) whose
every attention layer is this project's :class:`mha.MultiHeadAttention`, on numpy or MLX.

One pre-norm block serves every family, its options from :class:`DecoderConfig`:

.. math::

    a &= \mathrm{Attn}_i(\mathrm{N}_1(x)),\quad x \leftarrow x + \mathrm{N}_{pa}(a) \\
    m &= W_{down}\,(\phi(W_{gate} \mathrm{N}_2(x)) \odot W_{up} \mathrm{N}_2(x)),\quad
    x \leftarrow x + \mathrm{N}_{pm}(m)

with N RMSNorm (LayerNorm for GPT-2), :math:`\mathrm{N}_{pa}, \mathrm{N}_{pm}` Gemma 2/3's extra norms
(identity elsewhere), :math:`\phi` the activation, the gate absent for GPT-2's MLP, and no norm nor MLP
for ``mha_attn_only``. The embeddings are scaled by sqrt(E) for Gemma, learned positions added for
GPT-2 and mha_attn_only; logits = N(x) W_E^T (tied) or the LM head, soft-capped for Gemma 2. RoPE,
sliding windows, q/k norms and attention soft-caps are features of each attention layer.
"""

from __future__ import annotations

import numpy as np

from .._backends import resolve, to_numpy
from .._layer import MultiHeadAttention
from .._validate import dtype_name
from .._weights import AttentionWeights
from ._common import Encoding, check_text
from ._decoder_config import DecoderConfig
from ._ops import ACTIVATIONS, buffer, gated, layer_norm, padded_positions, rms_norm, softcap


class DecoderModel:
    """A decoder checkpoint running on this project's attention (see the module docstring).

    ``logits(ids)`` -> numpy float32 (T, V) or (B, T, V); ``generate(prompt, max_new_tokens, ...)``
    (mha.models._generate); ``encode(text)`` -> :class:`Encoding` (tokens, hidden states, causal
    attentions) for ``mha demo`` and ``mha heads``. Built by :func:`mha.models.load`.
    """

    def __init__(self, config: DecoderConfig, weights: dict, tokenizer=None, *, backend="auto", dtype="float32",
                 name: str = "decoder"):
        self.config = config
        self.name = name
        self.tokenizer = tokenizer
        self.source = None  # (folder, raw config.json) of a loaded checkpoint: what save() starts from
        self.head_map = None  # after prune_heads: {layer: [original query head, or None for a dead head]}
        self.dead_heads: dict = {}
        self.backend = resolve(backend)
        self.dtype = dtype_name(dtype, self.backend)
        self._build(weights)

    def _build(self, w: dict) -> None:
        """The backend's arrays and layers from canonical weights ``w``; of these only the embeddings and
        norms stay here as given (:meth:`canonical_weights` reads the rest back from the layers)."""
        c = self.config
        self._weights = {k: v for k, v in w.items() if k in ("embed", "pos_embed") or k.startswith("norm")
                         or ".norm" in k}
        if self.backend == "mlx":
            import mlx.core as mx

            self._xp, dt = mx, getattr(mx, self.dtype)
            native = lambda a: mx.array(a).astype(dt)  # noqa: E731
        else:
            self._xp, dt = np, np.dtype(self.dtype)
            native = lambda a: np.ascontiguousarray(a, dtype=dt)  # noqa: E731
        self._native = native
        self._embed = native(w["embed"])  # (V, E)
        self._pos = native(w["pos_embed"]) if "pos_embed" in w else None  # (P, E)
        head = w["embed"] if c.tie_embeddings else w["lm_head"]
        self._head_t = native(head.T)  # (E, V)
        self._norm = self._norm_params("norm") if c.norm else None
        self.layers, self._blocks = [], []
        for i, spec in enumerate(c.layers):
            self.layers.append(self._attention(w, i, spec))
            self._blocks.append(self._block(w, i))
        self._act = ACTIVATIONS[c.activation] if c.activation else None

    def _norm_params(self, name: str):
        w = self._weights
        return self._native(w[name + ".w"]), (self._native(w[name + ".b"]) if name + ".b" in w else None)

    def _attention(self, w: dict, i: int, spec) -> MultiHeadAttention:
        c, p = self.config, f"{i}.attn."
        bias = c.attention_bias or c.o_bias
        zeros = lambda n: np.zeros(n, np.float32)  # noqa: E731 (a family with some of the four biases)
        HD, KD = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        biases = [w.get(p + f"{n}.b", zeros(m)) if bias else None
                  for n, m in (("q", HD), ("k", KD), ("v", KD), ("o", c.hidden_size))]
        norms = {n: w[p + n] for n, on in (("q_norm", c.qk_norm), ("k_norm", c.qk_norm), ("sinks", c.sinks)) if on}
        aw = AttentionWeights(w[p + "q.w"], w[p + "k.w"], w[p + "v.w"], w[p + "o.w"], *biases, num_heads=c.num_heads,
                              num_kv_heads=c.num_kv_heads, **norms)
        extra = {}
        if c.attn_softcap is not None:
            extra["softcap"] = c.attn_softcap
        if c.qk_norm:
            extra["qk_norm"] = c.norm_eps
        return MultiHeadAttention.from_weights(aw, backend=self.backend, dtype=self.dtype, scale=spec.scale,
                                               rope=spec.rope, window=spec.window, **extra)

    def _block(self, w: dict, i: int) -> dict:
        """Layer i's norms and MLP in the backend's arrays; MLP weights stored (in, out) for x @ W."""
        c, p = self.config, f"{i}."
        b: dict = {}
        if c.norm:
            b["norm1"] = self._norm_params(p + "norm1")
            if c.activation:
                b["norm2"] = self._norm_params(p + "norm2")
        if c.sandwich:
            b["post_attn"], b["post_mlp"] = self._norm_params(p + "norm_post_attn"), self._norm_params(p + "norm_post_mlp")
        if c.moe is not None:
            from . import _moe

            b.update(_moe.params(w, p, self._native))
        elif c.activation:
            up = [w[p + "mlp.gate.w"], w[p + "mlp.up.w"]] if c.gated else [w[p + "mlp.up.w"]]
            b["in_t"] = self._native(np.concatenate(up).T)  # (E, 2F) gate then up, or (E, F)
            b["down"] = self._native(w[p + "mlp.down.w"])  # (E, F) as stored: a decode step's product reads rows
            if c.mlp_bias:
                ups = [w[p + "mlp.gate.b"], w[p + "mlp.up.b"]] if c.gated else [w[p + "mlp.up.b"]]
                b["in_b"], b["down_b"] = self._native(np.concatenate(ups)), self._native(w[p + "mlp.down.b"])
        return b

    # -- sizes -------------------------------------------------------------------------------------
    family = property(lambda self: self.config.family, doc="The model_type, e.g. 'llama'.")
    num_layers = property(lambda self: self.config.num_layers, doc="L, the number of layers.")
    num_heads = property(lambda self: self.config.num_heads, doc="H, query heads per layer.")
    num_kv_heads = property(lambda self: self.config.num_kv_heads, doc="Hkv, key/value heads per layer.")
    vocab_size = property(lambda self: self.config.vocab_size, doc="V, the vocabulary size.")

    @property
    def max_length(self) -> int:
        """The most positions a sequence may span: max_position_embeddings (times the dynamic-NTK
        factor, whose RoPE is made to reach that far)."""
        c = self.config
        rope = c.layers[0].rope if c.layers else None
        factor = rope.dynamic_factor if rope is not None and rope.dynamic_factor else 1.0
        return int(c.max_positions * factor)

    def __repr__(self) -> str:
        c = self.config
        return (f"DecoderModel({self.name!r}, family={c.family!r}, layers={c.num_layers}, heads={c.num_heads}, "
                f"kv_heads={c.num_kv_heads}, hidden={c.hidden_size}, vocab={c.vocab_size}, backend={self.backend!r}, "
                f"dtype={self.dtype!r})")

    def to(self, backend, dtype=None) -> "DecoderModel":
        """The same model on another backend (and dtype)."""
        new = DecoderModel(self.config, self.canonical_weights(), self.tokenizer, backend=backend,
                           dtype=self.dtype if dtype is None else dtype, name=self.name)
        new.source, new.head_map, new.dead_heads = self.source, self.head_map, self.dead_heads
        return new

    def canonical_weights(self) -> dict:
        """Every weight by its canonical name (mha.models._layouts): numpy float32, (out, in) layout,
        Gemma's norms as 1 + w; read back from the layers and blocks in use."""
        c = self.config
        f32 = lambda a: np.ascontiguousarray(to_numpy(a), dtype=np.float32)  # noqa: E731
        out = {k: f32(v) for k, v in self._weights.items()}
        if not c.tie_embeddings:
            out["lm_head"] = f32(to_numpy(self._head_t).T)
        for i, (layer, blk) in enumerate(zip(self.layers, self._blocks)):
            aw, p = layer.weights, f"{i}."
            for n in "qkvo":
                out[p + f"attn.{n}.w"] = f32(getattr(aw, f"{n}_weight"))
                if c.attention_bias if n != "o" else c.o_bias:
                    out[p + f"attn.{n}.b"] = f32(getattr(aw, f"{n}_bias"))
            for n in ("q_norm", "k_norm", "sinks"):
                if getattr(aw, n, None) is not None:
                    out[p + f"attn.{n}"] = f32(getattr(aw, n))
            if c.moe is not None:
                from . import _moe

                out.update(_moe.canonical(blk, p))
            elif c.activation:
                up = f32(to_numpy(blk["in_t"]).T)
                F = c.intermediate_size
                out.update({p + "mlp.gate.w": up[:F], p + "mlp.up.w": up[F:]} if c.gated else {p + "mlp.up.w": up})
                out[p + "mlp.down.w"] = f32(to_numpy(blk["down"]))
                if c.mlp_bias:
                    ub = f32(blk["in_b"])
                    out.update({p + "mlp.gate.b": ub[:F], p + "mlp.up.b": ub[F:]} if c.gated else {p + "mlp.up.b": ub})
                    out[p + "mlp.down.b"] = f32(blk["down_b"])
        return out

    # -- the forward pass ----------------------------------------------------------------------------
    def _apply_norm(self, x, params):
        c, (w, b) = self.config, params
        if c.norm == "layer":
            return layer_norm(self._xp, x, w, b, c.norm_eps)
        return rms_norm(self._xp, x, w, c.norm_eps)

    def _mlp(self, x, b: dict, scratch: dict | None):
        """The MLP of one block: x (B, T, E) -> (B, T, E). ``scratch``: numpy buffers for the (B, T, 2F)
        and (B, T, F) intermediates that every layer of one forward reuses (None: fresh arrays; MLX)."""
        xp, c = self._xp, self.config
        if c.moe is not None:
            from ._moe import moe

            return moe(xp, x, b, c.moe[1], c.moe[2])
        if scratch is None:
            h = x @ b["in_t"]  # (B, T, 2F) or (B, T, F)
        else:
            h = np.matmul(x, b["in_t"], out=buffer(scratch, "mlp_in", x.shape[:-1] + (b["in_t"].shape[1],), x.dtype))
        if "in_b" in b:
            h = h + b["in_b"]
        if c.gated:
            h = gated(xp, h, c.intermediate_size, c.activation, None if scratch is None else scratch)
        else:
            h = self._act(xp, h)
        out = h @ b["down"].T  # (B, T, E)
        return out + b["down_b"] if "down_b" in b else out

    def forward(self, ids, *, caches=None, key_mask=None, positions=None, attentions: bool = False,
                head_mask=None, last_only: bool = False, sink_out=None):
        """(logits (B, T or 1, V), per-layer weights (B, H, T, S) when asked (else []), hidden states
        (B, T or 1, E) after the final norm), as native arrays.

        ids (B, T) int numpy; caches: one KVCache per layer (new tokens appended) or None; key_mask
        (B, T) bool, False at padding (or None); positions (B, T) int positions of learned embeddings
        (default 0 .. T - 1, after a cache's offset); head_mask: {layer: (H,) multipliers};
        last_only: logits of the last position only (the last layer's MLP then runs on that row alone);
        sink_out: a list that receives, for a model with learned sinks, each layer's sink mass (B, H, T)
        numpy float32, exp(sink_h - lse) from the layer's log-sum-exp (which counts the sink), independent
        of the weights.

        On numpy, a decode step (one token per sequence) runs with BLAS at ``mha_cpu.options.step_blas_threads``
        threads (default 1; None: as configured) for the whole step, its attention layers' calls included, a
        rule on the call's shape and that setting; longer passes keep BLAS's own setting (their GEMMs are
        compute-bound)."""
        if self.backend == "numpy" and ids.shape[1] == 1:
            import mha_cpu

            n = mha_cpu.options.step_blas_threads
            if n is not None:
                from mha_cpu._workers import blas_threads  # its layers' calls keep n (they are on this thread)

                with blas_threads(n):
                    return self._forward(ids, caches, key_mask, positions, attentions, head_mask, last_only, sink_out)
        return self._forward(ids, caches, key_mask, positions, attentions, head_mask, last_only, sink_out)

    def _forward(self, ids, caches, key_mask, positions, attentions, head_mask, last_only, sink_out=None):
        xp, c = self._xp, self.config
        B, T = ids.shape
        x = xp.take(self._embed, xp.array(ids) if xp is not np else ids, axis=0)  # (B, T, E)
        if c.embed_scale is not None:
            x = x * xp.array(c.embed_scale, dtype=x.dtype) if xp is not np else x * x.dtype.type(c.embed_scale)
        if self._pos is not None:
            if positions is None:
                start = 0 if caches is None else caches[0].offset
                positions = np.broadcast_to(np.arange(start, start + T), (B, T))
            x = x + xp.take(self._pos, xp.array(positions) if xp is not np else positions, axis=0)
        km = None if key_mask is None else (xp.array(key_mask) if xp is not np else key_mask)
        weights, scratch = [], {} if xp is np and T > 1 else None  # a prefill's MLP buffers, reused by every layer
        for i, (attn, blk) in enumerate(zip(self.layers, self._blocks)):
            h = self._apply_norm(x, blk["norm1"]) if "norm1" in blk else x
            kwargs = {"key_mask": km} if km is not None else {}
            if head_mask is not None and i in head_mask:
                kwargs["head_mask"] = head_mask[i]
            if sink_out is not None and c.sinks:
                kwargs["return_lse"] = True
            res = attn(h, cache=None if caches is None else caches[i], causal=True, return_weights=attentions,
                       **kwargs)
            a = res[0] if isinstance(res, tuple) else res
            if attentions:
                weights.append(res[1])
            if "return_lse" in kwargs:
                sink_out.append(self._sink_mass(i, res[-1]))
            x = x + (self._apply_norm(a, blk["post_attn"]) if "post_attn" in blk else a)
            if last_only and i == len(self.layers) - 1:  # the rest is row by row: only the last row is needed
                x = x[:, -1:]
            if self._act is not None:
                m = self._mlp(self._apply_norm(x, blk["norm2"]), blk, scratch)
                x = x + (self._apply_norm(m, blk["post_mlp"]) if "post_mlp" in blk else m)
        if last_only:
            x = x[:, -1:]
        if self._norm is not None:
            x = self._apply_norm(x, self._norm)
        logits = x @ self._head_t  # (B, T, V)
        if c.final_softcap is not None:
            logits = softcap(xp, logits, c.final_softcap)
        return logits, weights, x

    def _sink_mass(self, i: int, lse) -> np.ndarray:
        """(B, H, T) float32 weight of layer i's learned sinks: exp(sink_h - lse), the lse counting the sink."""
        if getattr(self, "_sink_logits", None) is None:
            self._sink_logits = [np.asarray(layer.weights.sinks, np.float64) for layer in self.layers]  # (H,) each
        return np.exp(self._sink_logits[i][None, :, None] - np.asarray(to_numpy(lse), np.float64)).astype(np.float32)

    # -- public entry points ---------------------------------------------------------------------------
    def logits(self, ids, *, key_mask=None, head_mask=None) -> np.ndarray:
        """Next-token logits at every position: ids (T,) or (B, T) ints -> numpy float32 (T, V) or (B, T, V).

        ``key_mask`` (B, T) bool marks real tokens of a left-padded batch (False at padding); a padded
        row's logits equal those of its tokens alone (learned positions counted from its first real token).
        ``head_mask={layer: [query heads]}`` ablates those heads: their context is zeroed before o_proj
        (mha.models._heads)."""
        from ._generate import check_ids
        from ._heads import multipliers

        head_mask = multipliers(self, head_mask)
        ids, batched = check_ids(ids, self.config.vocab_size, "ids")
        key_mask, positions = _padding(ids, key_mask)
        self._check_length(ids.shape[1])
        out, _, _ = self.forward(ids, key_mask=key_mask, positions=positions, head_mask=head_mask)
        out = to_numpy(out).astype(np.float32)
        return out if batched else out[0]

    def _check_length(self, n: int, what: str = "the sequence") -> None:
        if n > self.max_length:
            raise ValueError(f"{what} spans {n} positions, more than the model's max_position_embeddings="
                             f"{self.max_length} ({self.name})")

    def prune_heads(self, heads: dict) -> "DecoderModel":
        """A new model without ``{layer: [query heads]}`` (0-based), keeping num_heads % num_kv_heads == 0
        (whole key/value groups, or the same number of query heads from every group): see
        :mod:`mha.models._heads`. It equals this model with those heads masked."""
        from ._heads import prune

        return prune(self, heads)

    def group_heads(self, kv_head: int) -> list:
        """The query heads of key/value group ``kv_head`` (to ablate or prune a whole group)."""
        from ._heads import group_heads

        return group_heads(self, kv_head)

    def save(self, folder) -> None:
        """Write a Hugging Face folder that transformers' AutoModelForCausalLM loads: config.json (the
        source config with this model's head counts and head_dim stated), model.safetensors (float32)
        and the source folder's tokenizer files (mha.models._save)."""
        from ._save import save

        save(self, folder)

    def generate(self, prompt, max_new_tokens: int, **kwargs):
        """Continue ``prompt`` by up to ``max_new_tokens`` tokens: see :func:`mha.models._generate.generate`."""
        from ._generate import generate

        return generate(self, prompt, max_new_tokens, **kwargs)

    def encode_text(self, text: str) -> np.ndarray:
        """Token ids (T,) int64 of ``text`` (with the tokenizer's BOS when it adds one)."""
        return self._require_tokenizer().encode(check_text(text))

    def decode_text(self, ids) -> str:
        """The text of token ids (special tokens left out)."""
        return self._require_tokenizer().decode(ids)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer (no tokenizer.json in its folder); give token ids")
        return self.tokenizer

    def encode(self, text) -> Encoding:
        """Tokens, last hidden states (T, E) and causal attentions (layers, H, T, T) of one text, as the
        encoder models give them (``mha demo``, ``mha heads``); hidden states after the final norm. A model
        without a tokenizer reads ``text`` as token ids separated by spaces (or takes an int array), and
        labels them "t<id>"."""
        ids = self.prompt_ids(text)
        self._check_length(len(ids), "the text")
        _, atts, hidden = self.forward(ids[None], attentions=True)
        att = np.stack([to_numpy(a)[0] for a in atts]).astype(np.float32)  # (layers, H, T, T)
        return Encoding(self.tokens(ids), ids, to_numpy(hidden)[0].astype(np.float32), att, 0, model=self.name,
                        text=text if isinstance(text, str) else " ".join(map(str, ids)))

    def encode_many(self, texts, **_) -> list:
        """:meth:`encode` of each text (``mha heads --corpus``)."""
        return [self.encode(t) for t in texts]

    def prompt_ids(self, text) -> np.ndarray:
        """Token ids (T,) int64 of a text (the tokenizer's), of token ids written as text ("5 9 2") for a model
        without a tokenizer, or of a (T,) int array as it is; ValueError/TypeError otherwise."""
        if not isinstance(text, str):
            from ._generate import check_ids

            ids, batched = check_ids(text, self.vocab_size, "ids")
            if batched:
                raise ValueError(f"encode takes one sequence, got ids of shape {ids.shape}")
            return ids[0]
        if self.tokenizer is not None:
            return self.encode_text(text)
        words = check_text(text).split()
        if not all(w.isascii() and w.isdigit() for w in words):
            raise ValueError(f"{self.name} has no tokenizer: give token ids separated by spaces (e.g. \"5 9 2\"), "
                             f"got {text[:40]!r}")
        from ._generate import check_ids

        return check_ids([int(w) for w in words], self.vocab_size, "text")[0][0]

    def tokens(self, ids) -> list:
        """Display labels of ids: the tokenizer's, or "t<id>" without one."""
        if self.tokenizer is None:
            return [f"t{int(i)}" for i in ids]
        return self.tokenizer.tokens(ids)


def _padding(ids: np.ndarray, key_mask):
    """(key_mask or None, positions or None) of a batch: positions count real tokens from 0."""
    if key_mask is None:
        return None, None
    km = np.asarray(key_mask)
    if km.shape != ids.shape or km.dtype != np.bool_:
        raise ValueError(f"key_mask must be a bool array of the ids' shape {ids.shape}, got {km.dtype} {km.shape}")
    if km.all():
        return None, None
    return km, padded_positions(km)
