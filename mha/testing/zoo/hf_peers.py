"""Hugging Face transformers: ``BertSelfAttention`` and ``LlamaAttention``, eager and sdpa.

Each layer is built from its own config class with the suite's weights, and given its masks the way
the models do: a 2D padding mask (key_mask) made 4D by ``masking_utils.create_bidirectional_mask`` or
``create_causal_mask`` for the configured attention implementation.
"""

from __future__ import annotations

import numpy as np

from ._common import f32

_NOTES = {"cross": "self-attention only (hidden_states)", "kdim": "self-attention only",
          "mask": "masks come from a 2D padding mask, as in the models", "additive_mask": "as mask",
          "head_mask": "no head_mask argument", "scale": "the scale is fixed at 1/sqrt(head_dim)",
          "window": "no sliding window", "cache": "the cache is the model's"}


def _tensors(weights):
    import torch

    return {n: None if a is None else torch.from_numpy(f32(a)) for n, a in weights.to_dict().items()}


def _load(linear, W, b):
    import torch

    with torch.no_grad():
        linear.weight.copy_(W)
        if linear.bias is not None:
            linear.bias.copy_(torch.zeros_like(linear.bias) if b is None else b)


def _mask(config, x, key_mask, causal):
    """The 4D mask (or None) the models build from a 2D padding mask, for this attention implementation."""
    import torch
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

    km = None if key_mask is None else torch.from_numpy(np.asarray(key_mask, bool)).long()
    if causal:
        return create_causal_mask(config=config, inputs_embeds=x, attention_mask=km, past_key_values=None)
    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=km)


class HFBert:
    """``BertSelfAttention`` (BertConfig); it has no output projection (that is BertSelfOutput, with its
    residual and LayerNorm), so W_O is applied after it with ``F.linear``."""

    features_by_attn = {"eager": {"bias", "key_mask", "weights"}, "sdpa": {"bias", "key_mask"}}

    def __init__(self, attn: str):
        if attn not in self.features_by_attn:
            raise ValueError(f"attn must be 'eager' or 'sdpa', got {attn!r}")
        self.attn = attn
        self.name = f"hf-bert-{attn}"
        # eager adds a finfo.min mask (uniform rows); sdpa passes a bool mask to torch's SDPA (zero rows)
        self.conventions = {"empty_row": "mean_value" if attn == "eager" else "output_bias", "nonfinite": "propagates"}
        self.features = frozenset(self.features_by_attn[attn])
        self.notes = dict(_NOTES, gqa="no grouped-query heads", causal="an encoder layer",
                          rope="absolute position embeddings are the model's")
        if attn == "sdpa":
            self.notes["weights"] = "the sdpa path returns no weights"

    def build(self, weights):
        import torch
        import torch.nn.functional as F
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertSelfAttention

        E, H = weights.embed_dim, weights.num_heads
        config = BertConfig(hidden_size=E, num_attention_heads=H, intermediate_size=4, num_hidden_layers=1,
                            vocab_size=8, attention_probs_dropout_prob=0.0, attn_implementation=self.attn)
        layer = BertSelfAttention(config).eval()
        t = _tensors(weights)
        for lin, p in ((layer.query, "q"), (layer.key, "k"), (layer.value, "v")):
            _load(lin, t[f"{p}_weight"], t[f"{p}_bias"])

        def fn(query, key, value, *, key_mask=None, return_weights=False):
            x = torch.from_numpy(f32(query))
            with torch.no_grad():
                ctx, P = layer(x, attention_mask=_mask(config, x, key_mask, False))
                y = F.linear(ctx, t["o_weight"], t["o_bias"]).numpy()
            return (y, P.numpy()) if return_weights else y

        return fn


class HFLlama:
    """``LlamaAttention`` (LlamaConfig; GQA by num_key_value_heads, attention_bias for every projection).
    RoPE is its caller's: the adapter passes the identity rotation (cos = 1, sin = 0). A non-causal call
    passes ``is_causal=False`` (the sdpa path would otherwise assume causal when no mask is built)."""

    def __init__(self, attn: str):
        if attn not in ("eager", "sdpa"):
            raise ValueError(f"attn must be 'eager' or 'sdpa', got {attn!r}")
        self.attn = attn
        self.name = f"hf-llama-{attn}"
        self.conventions = {"empty_row": "mean_value" if attn == "eager" else "output_bias", "nonfinite": "propagates"}
        self.features = frozenset({"bias", "gqa", "key_mask", "causal"} | ({"weights"} if attn == "eager" else set()))
        self.notes = dict(_NOTES, rope="RoPE is applied by the caller (identity here)")
        if attn == "sdpa":
            self.notes["weights"] = "the sdpa path returns no weights"

    def build(self, weights):
        import torch
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention

        E, H, Hkv, D = weights.embed_dim, weights.num_heads, weights.num_kv_heads, weights.head_dim
        # LlamaConfig refuses an odd head_dim (RoPE rotates pairs): set it after validation; the rotation
        # given here is the identity, so every head width is fine
        config = LlamaConfig(hidden_size=E, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=2 * D,
                             attention_bias=weights.bias, intermediate_size=4, num_hidden_layers=1, vocab_size=8,
                             attn_implementation=self.attn)
        config.head_dim = D
        layer = LlamaAttention(config, layer_idx=0).eval()
        t = _tensors(weights)
        for lin, p in ((layer.q_proj, "q"), (layer.k_proj, "k"), (layer.v_proj, "v"), (layer.o_proj, "o")):
            _load(lin, t[f"{p}_weight"], t[f"{p}_bias"])

        def fn(query, key, value, *, key_mask=None, causal=False, return_weights=False):
            x = torch.from_numpy(f32(query))
            B, T, _ = x.shape
            rope = (torch.ones(B, T, D), torch.zeros(B, T, D))
            kwargs = {} if causal else {"is_causal": False}
            with torch.no_grad():
                y, P = layer(x, position_embeddings=rope, attention_mask=_mask(config, x, key_mask, causal), **kwargs)
            return (y.numpy(), P.numpy()) if return_weights else y.numpy()

        return fn
