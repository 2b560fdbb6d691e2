"""config.json of each decoder family -> :class:`DecoderConfig`, in both transformers config forms.

One table, :data:`FAMILIES`, says per model_type the defaults transformers' config class gives an
absent key (so that a folder missing a key loads as transformers loads it; ``config.defaults`` lists
them) and what the family adds to the Llama block: sliding layers (Mistral, Qwen 2/3, Gemma 2/3,
Phi-3), q/k biases (Qwen 2), q/k RMSNorm (Qwen 3, Gemma 3), Gemma's (1 + w) norms, sqrt(E) embedding
scale, soft-caps and ``query_pre_attn_scalar``. GPT-2 and the project's ``mha_attn_only`` have their own
readers. Tensor names and layouts are in :mod:`mha.models._layouts`.
"""

from __future__ import annotations

import math

from ._decoder_config import REQUIRED, DecoderConfig, LayerSpec, Reader
from ._rope_config import rope_from_params

ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
_ACT = {"swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_fast"}

# Per family: transformers' defaults for absent keys, and the features of its block. "window": which
# layers slide ("never"; "all" with the default sliding_window; "qwen": use_sliding_window and
# max_window_layers; "pattern": every n-th layer full, the rest sliding).
FAMILIES = {
    "llama": dict(head_dim=None, max_pos=2048, eps=1e-6, act="silu", tie=False, bias_key=True, window=("never",)),
    "mistral": dict(head_dim=None, max_pos=131072, eps=1e-6, act="silu", tie=False, window=("all", 4096), kv=8),
    "qwen2": dict(head_dim=None, max_pos=32768, eps=1e-6, act="silu", tie=False, qkv_bias=True, window=("qwen",)),
    "qwen3": dict(head_dim=128, max_pos=32768, eps=1e-6, act="silu", tie=False, bias_key=True, window=("qwen",),
                  qk_norm=True),
    "gemma": dict(head_dim=256, max_pos=8192, eps=1e-6, act="gelu_pytorch_tanh", tie=True, bias_key=True,
                  gemma=True, window=("never",)),
    "gemma2": dict(head_dim=256, max_pos=8192, eps=1e-6, act="gelu_pytorch_tanh", act_key="hidden_activation",
                   tie=True, bias_key=True, gemma=True, sandwich=True, softcaps=(50.0, 30.0),
                   window=("pattern", 4096, 2)),
    "gemma3_text": dict(head_dim=256, max_pos=131072, eps=1e-6, act="gelu_pytorch_tanh", act_key="hidden_activation",
                        tie=True, bias_key=True, gemma=True, sandwich=True, softcaps=(None, None),
                        window=("pattern", 4096, 6), qk_norm=True, theta=(1e6, 1e4)),
    "phi3": dict(head_dim=None, max_pos=4096, eps=1e-5, act="silu", tie=False, window=("all", None), phi3=True),
    "gpt_oss": dict(head_dim=64, max_pos=131072, eps=1e-5, act="silu", tie=False, bias_key=True, bias_default=True,
                    window=("pattern", 128, 2), sinks=True, moe=True, rope_required=True),
}
SUPPORTED = tuple(FAMILIES) + ("gpt2", "mha_attn_only")
LAYER_TYPES = ("full_attention", "sliding_attention")


def parse(raw: dict, path) -> DecoderConfig:
    """The :class:`DecoderConfig` of a decoder's config.json (``raw``, read from ``path``)."""
    family = raw.get("model_type")
    if family == "gpt2":
        return _gpt2(Reader(raw, path, family))
    if family == "mha_attn_only":
        return _attn_only(Reader(raw, path, family))
    if family not in FAMILIES:
        raise ValueError(f"{path}: model_type {family!r} is not supported; supported decoders: "
                         f"{', '.join(SUPPORTED)} (and BERT-family encoders)")
    spec = FAMILIES[family]
    if family == "gpt_oss" and raw.get("quantization_config"):
        raise ValueError(f"{path}: quantized experts (quantization_config {raw['quantization_config'].get('quant_method')!r}"
                         f") are not read here: dequantize first (transformers: from_pretrained(..., quantization_config="
                         f"Mxfp4Config(dequantize=True)), then save_pretrained)")
    # the activation key transformers does not read for this family (Gemma 2/3 configs carry both)
    other = {"hidden_act": "hidden_activation", "hidden_activation": "hidden_act"}[spec.get("act_key", "hidden_act")]
    return _llama_like(Reader(raw, path, family, ignored=(other,) if family.startswith("gemma") else ()), spec)


def _sizes(r: Reader, spec: dict) -> dict:
    E, H = r.int("hidden_size"), r.int("num_attention_heads")
    if spec["head_dim"] is None and "head_dim" not in r.raw and E % H:
        raise ValueError(f"{r.path}: hidden_size={E} is not a multiple of num_attention_heads={H} and no head_dim "
                         f"is given")
    D = r.int("head_dim", spec["head_dim"] or E // H)
    Hkv = r.int("num_key_value_heads", spec.get("kv", H))
    if H % Hkv:
        raise ValueError(f"{r.path}: num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
    return dict(vocab_size=r.int("vocab_size"), hidden_size=E, num_layers=r.int("num_hidden_layers"), num_heads=H,
                num_kv_heads=Hkv, head_dim=D, intermediate_size=r.int("intermediate_size"),
                max_positions=r.int("max_position_embeddings", spec["max_pos"]))


def _llama_like(r: Reader, spec: dict) -> DecoderConfig:
    s = _sizes(r, spec)
    a = r.choice(spec.get("act_key", "hidden_act"), ACTIVATIONS, spec["act"])
    types, windows = _windows(r, spec, s["num_layers"])
    ropes = _ropes(r, spec, s, types)
    scale = 1.0 / math.sqrt(s["head_dim"])
    if spec.get("sandwich"):  # Gemma 2 and 3
        scale = r.float("query_pre_attn_scalar", 256.0) ** -0.5
    if r.family == "gemma3_text" and r.bool("use_bidirectional_attention", False):
        raise ValueError(f"{r.path}: use_bidirectional_attention=true (an encoder-style Gemma 3) is not supported")
    caps = spec.get("softcaps")
    attn_cap = None if caps is None else r.float("attn_logit_softcapping", caps[0])
    final_cap = None if caps is None else r.float("final_logit_softcapping", caps[1])
    layers = tuple(LayerSpec(ropes[t], w, scale) for t, w in zip(types, windows))
    biased = bool(spec.get("bias_key") and r.bool("attention_bias", spec.get("bias_default", False)))
    return DecoderConfig(
        r.family, **s, layers=layers, norm="rms", norm_eps=r.float("rms_norm_eps", spec["eps"]),
        activation=_ACT.get(a, a), gated=True, attention_bias=biased or spec.get("qkv_bias", False), o_bias=biased,
        mlp_bias=r.family == "llama" and r.bool("mlp_bias", False), attn_softcap=attn_cap, final_softcap=final_cap,
        qk_norm=spec.get("qk_norm", False), sandwich=spec.get("sandwich", False), sinks=spec.get("sinks", False),
        moe=_moe(r) if spec.get("moe") else None,
        embed_scale=math.sqrt(s["hidden_size"]) if spec.get("gemma") else None,
        tie_embeddings=r.bool("tie_word_embeddings", spec["tie"]), **_tokens(r), defaults=r.finish())


def _moe(r: Reader) -> tuple:
    """gpt-oss's (experts, experts per token, swiglu limit); ``experts_per_token`` (the original
    checkpoints' name) must agree with ``num_experts_per_tok`` when both are given."""
    n, k = r.int("num_local_experts", 128), r.int("num_experts_per_tok", 4)
    alias = r.int("experts_per_token", None)
    if alias is not None and alias != k:
        raise r.bad("experts_per_token", alias, f"the same as num_experts_per_tok={k}")
    if k > n:
        raise r.bad("num_experts_per_tok", k, f"at most num_local_experts={n}")
    r.int("initial_context_length", None)  # the original checkpoints' name of the yarn RoPE's original length
    return n, k, r.float("swiglu_limit", 7.0)


def _windows(r: Reader, spec: dict, L: int) -> tuple[list, list]:
    """(layer types, sliding window per layer or None), as the family's config class derives them."""
    kind = spec["window"]
    if kind[0] == "never":
        return ["full_attention"] * L, [None] * L
    if kind[0] == "all":  # Mistral, Phi-3: one window (or none) for every layer
        size = r.int("sliding_window", kind[1])
        return ["full_attention"] * L, [size] * L
    if kind[0] == "qwen":  # sliding_window counts only with use_sliding_window
        size = r.int("sliding_window", 4096) if r.bool("use_sliding_window", False) else None
        r.used.add("sliding_window")
        first = r.int("max_window_layers", 28, minimum=0)
        default = ["sliding_attention" if size is not None and i >= first else "full_attention" for i in range(L)]
    else:  # Gemma 2 and 3: every n-th layer full
        size = r.int("sliding_window", kind[1])
        n = r.int("sliding_window_pattern", kind[2]) if r.family == "gemma3_text" else kind[2]
        default = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(L)]
    given = r.raw_value("layer_types")
    if given is not None and (not isinstance(given, list) or len(given) != L
                              or not all(t in LAYER_TYPES for t in given)):
        raise r.bad("layer_types", given, f"a list of {L} entries, each one of {', '.join(LAYER_TYPES)}")
    types = default if given is None else list(given)
    return types, [size if t == "sliding_attention" else None for t in types]


def _ropes(r: Reader, spec: dict, s: dict, types: list) -> dict:
    """{layer type: RoPE} from either config form (v5 rope_parameters, flat or nested per layer type; v4
    rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq)), standardised as transformers does."""
    v5, v4 = r.raw_value("rope_parameters"), r.raw_value("rope_scaling")
    for key, v in (("rope_parameters", v5), ("rope_scaling", v4)):
        if v is not None and not isinstance(v, dict):
            raise r.bad(key, v, "a JSON object")
    default = spec.get("theta", (10000.0, 10000.0))
    top = {"full_attention": r.float("rope_theta", None),
           "sliding_attention": r.float("rope_local_base_freq", None) if "theta" in spec else None}
    part = r.float("partial_rotary_factor", None)
    if spec.get("rope_required") and v5 is None and v4 is None:
        raise ValueError(f"{r.path}: the config has neither rope_parameters nor rope_scaling, which model_type "
                         f"{r.family!r} needs (transformers would take its yarn default)")
    nested = v5 is not None and any(k in LAYER_TYPES for k in v5)
    where = "rope_parameters" if v5 is not None else "rope_scaling" if v4 is not None else "rope_theta"
    out = {}
    for t in sorted(set(types)):
        if nested:
            params = v5.get(t)
            if not isinstance(params, dict):
                raise r.bad("rope_parameters", v5, f"an object for each layer type, here {t!r}")
        elif "theta" in spec and t == "sliding_attention":  # Gemma 3: scaling applies to full attention only
            params = {}
        else:
            params = v4 or v5 or {}
        params = dict(params)
        if "type" in params:
            params.setdefault("rope_type", params.pop("type"))
        params.setdefault("rope_type", "default")
        if "rope_theta" not in params:
            theta = top[t] if top[t] is not None else top["full_attention"] if "theta" not in spec else None
            if theta is None:
                r.defaults.append("rope_theta" if t == "full_attention" else "rope_local_base_freq")
            params["rope_theta"] = theta if theta is not None else default[LAYER_TYPES.index(t) if "theta" in spec
                                                                            else 0]
        if part is not None:
            params.setdefault("partial_rotary_factor", part)
        if spec.get("phi3"):
            if params["rope_type"] in ("su", "yarn"):  # Phi-3's old names of longrope
                params["rope_type"] = "longrope"
            if params["rope_type"] not in ("default", "longrope"):
                raise ValueError(f"{r.path}: rope type {params['rope_type']!r} is not one Phi-3 takes "
                                 f"(default, longrope)")
            if "original_max_position_embeddings" in r.raw and params["rope_type"] == "longrope":
                params["original_max_position_embeddings"] = r.int("original_max_position_embeddings")
            r.used.add("original_max_position_embeddings")
        elif params["rope_type"] == "default":
            params.pop("partial_rotary_factor", None)  # Llama-like blocks rotate the whole head by default
        if params["rope_type"] in ("llama3", "yarn", "longrope"):
            params.setdefault("original_max_position_embeddings", s["max_positions"])
        out[t] = rope_from_params(params, head_dim=s["head_dim"], max_positions=s["max_positions"],
                                  where=f"{r.path}: {where}" + (f"[{t!r}]" if nested else ""))
    return out


def _tokens(r: Reader) -> dict:
    bos, pad = r.token_ids("bos_token_id"), r.token_ids("pad_token_id")
    return dict(bos_token_id=bos[0] if bos else None, eos_token_ids=r.token_ids("eos_token_id"),
                pad_token_id=pad[0] if pad else None)


def _gpt2(r: Reader) -> DecoderConfig:
    E, H, L = r.int("n_embd"), r.int("n_head"), r.int("n_layer")
    if E % H:
        raise ValueError(f"{r.path}: n_embd={E} is not a multiple of n_head={H}")
    if r.bool("add_cross_attention", False):
        raise ValueError(f"{r.path}: add_cross_attention=true (an encoder-decoder GPT-2) is not supported")
    act = _ACT.get(a := r.choice("activation_function", ACTIVATIONS, "gelu_new"), a)
    D = E // H
    base = 1.0 / math.sqrt(D) if r.bool("scale_attn_weights", True) else 1.0
    by_layer = r.bool("scale_attn_by_inverse_layer_idx", False)
    r.bool("reorder_and_upcast_attn", False)  # float32 throughout already: no effect on the numbers here
    r.used.add("n_ctx")  # old configs' copy of n_positions; transformers 5 does not read it
    layers = tuple(LayerSpec(None, None, base / (i + 1) if by_layer else base) for i in range(L))
    return DecoderConfig(
        "gpt2", vocab_size=r.int("vocab_size"), hidden_size=E, num_layers=L, num_heads=H, num_kv_heads=H,
        head_dim=D, intermediate_size=r.int("n_inner", 4 * E), max_positions=r.int("n_positions", 1024),
        layers=layers, norm="layer", norm_eps=r.float("layer_norm_epsilon", 1e-5), activation=act, gated=False,
        attention_bias=True, o_bias=True, mlp_bias=True, positions="learned",
        tie_embeddings=r.bool("tie_word_embeddings", True), **_tokens(r), defaults=r.finish())


def _attn_only(r: Reader) -> DecoderConfig:
    """The project's own attention-only family (seam.md): embeddings (+ learned positions or RoPE),
    attention layers with residuals, an unembedding; no norms, no MLP."""
    E, H = r.int("hidden_size"), r.int("num_attention_heads")
    D, L = r.int("head_dim"), r.int("num_hidden_layers")
    Hkv = r.int("num_key_value_heads")
    if H % Hkv:
        raise ValueError(f"{r.path}: num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
    positions = r.choice("positions", ("learned", "rope"))
    P = r.int("max_position_embeddings")
    rope = rope_from_params({"rope_theta": r.float("rope_theta")}, head_dim=D, max_positions=P,
                            where=f"{r.path}: rope_theta") if positions == "rope" else None
    bias = r.bool("attention_bias", REQUIRED)
    return DecoderConfig(
        "mha_attn_only", vocab_size=r.int("vocab_size"), hidden_size=E, num_layers=L, num_heads=H, num_kv_heads=Hkv,
        head_dim=D, intermediate_size=0, max_positions=P,
        layers=tuple(LayerSpec(rope, None, 1.0 / math.sqrt(D)) for _ in range(L)), norm=None, activation=None,
        attention_bias=bias, o_bias=bias, positions=positions,
        tie_embeddings=r.bool("tie_word_embeddings", REQUIRED), **_tokens(r), defaults=r.finish())

