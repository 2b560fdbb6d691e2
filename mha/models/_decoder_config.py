"""The family-neutral description of a decoder checkpoint, read from a Hugging Face ``config.json``.

:class:`DecoderConfig` holds what the forward pass needs (sizes, norms, activation, biases, positions,
soft-caps, q/k norms, and per layer its RoPE and sliding window); the family modules
(:mod:`mha.models._families`) fill it from either config form (transformers v4: ``rope_theta`` +
``rope_scaling``; v5: ``rope_parameters``, nested per layer type for Gemma 3).

:class:`Reader` is how they read keys: each typed, each error naming the file and the key, what came
and what was expected. A key the family does not read must be one known not to change the numbers
(metadata, training-only, generation defaults) or be null/false: any other is refused, since a value
this loader ignored could change results silently.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .._rope import RoPE

REQUIRED = object()

# Keys that never change a forward pass: metadata, training-only settings, generation defaults; auto_map
# names remote code, which is never run here (the families' own implementations are, as transformers does
# without trust_remote_code).
IGNORED = frozenset("""
_name_or_path architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
attention_dropout resid_pdrop embd_pdrop attn_pdrop summary_type summary_use_proj summary_activation
summary_proj_to_labels summary_first_dropout output_attentions output_hidden_states return_dict torchscript
id2label label2id problem_type tokenizer_class prefix task_specific_params is_encoder_decoder is_decoder
add_cross_attention cross_attention_hidden_size tie_encoder_decoder chunk_size_feed_forward pruned_heads
finetuning_task decoder_start_token_id sep_token_id num_labels max_length min_length do_sample early_stopping
num_beams temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
begin_suppress_tokens diversity_penalty num_beam_groups tf_legacy_loss use_bfloat16 cache_implementation
pretraining_tp output_logits min_p auto_map is_llama_config router_aux_loss_coef output_router_logits
""".split())


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention settings: its RoPE (None: no rotary), sliding window W (a query sees
    distances 0 .. W - 1; None: all earlier keys) and logit scale."""

    rope: RoPE | None
    window: int | None
    scale: float


@dataclass(frozen=True)
class DecoderConfig:
    """What the forward pass of a decoder needs (see the module docstring). Sizes: V vocab, E hidden,
    L layers, H heads, Hkv key/value heads, D head_dim, F the MLP's width (0: no MLP), P positions."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    layers: tuple
    norm: str | None = "rms"  # "rms", "layer" or None (no norms)
    norm_eps: float = 1e-6
    activation: str | None = "silu"  # of the MLP; None: no MLP
    gated: bool = True  # act(gate(x)) * up(x), else act(up(x))
    attention_bias: bool = False  # q, k, v biases
    o_bias: bool = False
    mlp_bias: bool = False
    positions: str = "rope"  # "rope" or "learned"
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qk_norm: bool = False  # RMSNorm over D of every query and key head (eps = norm_eps)
    sinks: bool = False  # learned per-head sink logits (gpt-oss): out.sink_mass reports their weight
    moe: tuple | None = None  # gpt-oss: (experts, experts per token, swiglu limit) of its MLP (mha.models._moe)
    sandwich: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(E)
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    defaults: tuple = field(default=(), compare=False)  # optional keys absent from the file


class Reader:
    """Typed access to a config dict (see the module docstring)."""

    def __init__(self, raw: dict, path, family: str, ignored=()):
        self.raw, self.path, self.family = raw, path, family
        self.used: set = {"model_type", *ignored}
        self.defaults: list = []

    def _get(self, key: str, default):
        self.used.add(key)
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key], True
        if default is REQUIRED:
            raise ValueError(f"{self.path}: the config lacks {key!r}, which model_type {self.family!r} needs")
        if key not in self.raw and default is not None:
            self.defaults.append(key)
        return default, False

    def bad(self, key: str, value, expected: str) -> ValueError:
        return ValueError(f"{self.path}: {key}={value!r} in the config; expected {expected}")

    def int(self, key: str, default=REQUIRED, minimum: int = 1):
        v, given = self._get(key, default)
        if given and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum):
            raise self.bad(key, v, f"an int >= {minimum}")
        return None if v is None else int(v)

    def float(self, key: str, default=REQUIRED, positive: bool = True):
        v, given = self._get(key, default)
        if given and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                      or (positive and v <= 0)):
            raise self.bad(key, v, "a positive number" if positive else "a finite number")
        return None if v is None else float(v)

    def bool(self, key: str, default=False):
        v, given = self._get(key, default)
        if given and not isinstance(v, bool):
            raise self.bad(key, v, "true or false")
        return v

    def choice(self, key: str, options, default=REQUIRED):
        v, _ = self._get(key, default)
        if v not in options:
            raise ValueError(f"{self.path}: {key}={v!r} is not supported for model_type {self.family!r}; "
                             f"supported: {', '.join(map(str, options))}")
        return v

    def raw_value(self, key: str):
        self.used.add(key)
        return self.raw.get(key)

    def token_ids(self, key: str) -> tuple:
        """An int, a list of ints, or null, as a tuple."""
        v = self.raw_value(key)
        vals = [] if v is None else v if isinstance(v, list) else [v]
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in vals):
            raise self.bad(key, v, "a token id, a list of them, or null")
        return tuple(int(t) for t in vals)

    def finish(self, supported: str = "") -> tuple:
        """Refuse keys neither read nor known to be harmless (unless null/false); the defaults taken."""
        left = sorted(k for k, v in self.raw.items()
                      if k not in self.used and k not in IGNORED and not k.startswith("_")
                      and v is not None and v is not False)
        if left:
            raise ValueError(f"{self.path}: option {left[0]!r} (= {_short(self.raw[left[0]])}) is not supported for "
                             f"model_type {self.family!r}" + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                             + "; an option this loader ignored could change the results")
        return tuple(self.defaults)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
