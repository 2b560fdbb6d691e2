"""Tiny random decoders of every family, built offline with transformers (the test reference) and saved
as Hugging Face folders; their v4 config form; switches that turn a family's feature off on our side.

Sizes are small and distinct (V 97, E 48, H 6, Hkv 2, D 8 or 10, F 56) and the init large
(initializer_range 1.0, TESTING.md section 7): at the default 0.02 a soft-cap or a RoPE scaling moves
the logits by less than the tolerance, and a loader ignoring it would pass. transformers initialises
biases to 0 and norms to 1 (Gemma: 0): :func:`build` draws them too, so that a dropped bias or a
missed (1 + w) shows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from mha._rope import RoPE

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=56, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=1.0)
NARROW = dict(BASE, head_dim=10)  # H * D = 60 != E = 48


def _plain_rope(cfg, weights):
    """Every layer's RoPE replaced by the unscaled one of the same base and dims."""
    layers = tuple(dataclasses.replace(s, rope=RoPE(dims=s.rope.dims, base=s.rope.base)) for s in cfg.layers)
    return dataclasses.replace(cfg, layers=layers), weights


def _whole_head(cfg, weights):
    """Partial rotation switched off: the whole head rotated."""
    layers = tuple(dataclasses.replace(s, rope=RoPE(base=s.rope.base)) for s in cfg.layers)
    return dataclasses.replace(cfg, layers=layers), weights


def _no_window(cfg, weights):
    return dataclasses.replace(cfg, layers=tuple(dataclasses.replace(s, window=None) for s in cfg.layers)), weights


def _replace(**changes):
    return lambda cfg, weights: (dataclasses.replace(cfg, **changes), weights)


def _zero(*suffixes):
    def off(cfg, weights):
        return cfg, {k: (np.zeros_like(v) if k.endswith(suffixes) else v) for k, v in weights.items()}
    return off


def _same_rope_everywhere(cfg, weights):
    full = next(s.rope for s in cfg.layers if s.window is None)
    return dataclasses.replace(cfg, layers=tuple(dataclasses.replace(s, rope=full) for s in cfg.layers)), weights


def _untransposed_c_proj(cfg, weights):
    return cfg, {k: (np.ascontiguousarray(v.T) if k.endswith("attn.o.w") else v) for k, v in weights.items()}


def _no_positions(cfg, weights):
    return cfg, {k: (np.zeros_like(v) if k == "pos_embed" else v) for k, v in weights.items()}


# name: (transformers config class, model class, config kwargs, {feature: switch on our side})
ZOO = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 50.0},
                                                      attention_bias=True),
              {"biases": _zero(".b")}),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(BASE, rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 100.0}),
                     {"linear": _plain_rope}),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM",
                      dict(BASE, max_position_embeddings=12,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}),
                      {"dynamic": _plain_rope}),
    "llama-llama3": ("LlamaConfig", "LlamaForCausalLM",
                     dict(BASE, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                 "rope_theta": 500.0}),
                     {"llama3": _plain_rope}),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(BASE, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 16, "rope_theta": 500.0}),
                   {"yarn": _plain_rope}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(BASE, sliding_window=5, head_dim=None),
                {"window": _no_window}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(BASE, use_sliding_window=True, sliding_window=4,
                                                      max_window_layers=1),
              {"window": _no_window, "biases": _zero("attn.q.b", "attn.k.b", "attn.v.b")}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(NARROW), {"qk_norm": _replace(qk_norm=False)}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(NARROW), {"embed_scale": _replace(embed_scale=None)}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(NARROW, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=20,
                    attn_logit_softcapping=3.0, final_logit_softcapping=9.0),
               {"attn_softcap": _replace(attn_softcap=None), "final_softcap": _replace(final_softcap=None),
                "window": _no_window, "sandwich": _replace(sandwich=False)}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(NARROW, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=20,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                          "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 1000.0}}),
                    {"qk_norm": _replace(qk_norm=False), "layer_ropes": _same_rope_everywhere}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 100.0,
                                                         "partial_rotary_factor": 0.5}),
             {"partial": _whole_head}),
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM",
                      dict(BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=48,
                           original_max_position_embeddings=12,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 100.0, "partial_rotary_factor": 1.0,
                                            "factor": 4.0,
                                            "short_factor": [1.0, 1.5, 2.0, 3.0],
                                            "long_factor": [2.0, 3.0, 5.0, 9.0]}),
                      {"longrope": _plain_rope}),
    "gpt2-layerscale": ("GPT2Config", "GPT2LMHeadModel",
                        dict(vocab_size=97, n_embd=48, n_head=6, n_layer=3, n_positions=64, n_inner=56,
                             activation_function="relu", scale_attn_by_inverse_layer_idx=True, bos_token_id=1,
                             eos_token_id=2),
                        {"layer_scale": lambda cfg, w: (dataclasses.replace(cfg, layers=tuple(
                            dataclasses.replace(s, scale=cfg.layers[0].scale) for s in cfg.layers)), w)}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=97, n_embd=48, n_head=6, n_layer=2, n_positions=64, n_inner=56, initializer_range=1.0,
                  bos_token_id=1, eos_token_id=2),
             {"conv1d": _untransposed_c_proj, "positions": _no_positions}),
}
FAMILY = {name: name.split("-")[0] for name in ZOO}


def build(name: str, root: Path, *, dtype=None, seed: int = 0, init: float = 1.0, vocab_size=None) -> Path:
    """A saved folder of ZOO[name] (random weights from ``seed`` with initializer_range ``init``; ``dtype``
    "bfloat16"/"float16" to store them so; another ``vocab_size`` if given), eager attention."""
    import torch
    import transformers as tr

    cfg_cls, model_cls, kwargs, _ = ZOO[name]
    kwargs = dict(copy.deepcopy(kwargs), initializer_range=init)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    cfg = getattr(tr, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(tr, model_cls)._from_config(cfg, attn_implementation="eager")
    gemma = cfg_cls.startswith("Gemma")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:  # biases ~ N(0, 0.5^2); norm scales ~ N(1, 0.5^2) (Gemma's w of 1 + w: N(0, 0.5^2))
                centre = 1.0 if pname.endswith("weight") and not gemma else 0.0
                p.copy_(centre + 0.5 * init * torch.randn_like(p))
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    folder = root / "-".join([name] + ([dtype] if dtype else []) + ([f"init{init:g}"] if init != 1.0 else []))
    model.save_pretrained(folder)
    return folder


def reference(folder: Path, **config_changes):
    """transformers' model of a folder, float32, eager attention (config keys overridden if given)."""
    import torch
    import transformers as tr

    kwargs = {"config": tr.AutoConfig.from_pretrained(folder, **config_changes)} if config_changes else {}
    model = tr.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32,
                                                    **kwargs)
    return model.eval()


def to_v4(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` whose config.json is in transformers v4's form: rope_theta (+
    rope_local_base_freq for Gemma 3) and rope_scaling instead of rope_parameters, torch_dtype for dtype.
    Old-style {"type": ...} for Llama's linear and dynamic (Llama 2 era configs), {"rope_type": ...} for
    the others, as real configs write them (transformers 5.18 drops a Gemma 3 {"type": "linear"}: it
    keeps the "default" it starts from; this loader reads either)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json":
            shutil.copy(f, dest / f.name)
    raw = json.loads((folder / "config.json").read_text())
    if "dtype" in raw:
        raw["torch_dtype"] = raw.pop("dtype")
    rope = raw.pop("rope_parameters", None)
    if rope is not None:
        nested = "full_attention" in rope
        full = dict(rope["full_attention"] if nested else rope)
        raw["rope_theta"] = full.pop("rope_theta")
        if nested:
            raw["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        if "partial_rotary_factor" in full:
            raw["partial_rotary_factor"] = full.pop("partial_rotary_factor")
        kind = full.pop("rope_type")
        if kind == "default":
            raw["rope_scaling"] = None
        else:
            old_style = kind in ("linear", "dynamic") and raw["model_type"] == "llama"  # as Llama 2 era configs
            raw["rope_scaling"] = {("type" if old_style else "rope_type"): kind, **full}
    (dest / "config.json").write_text(json.dumps(raw, indent=2))
    return dest


SENTENCES = ["The cat sat on the mat.", "A dog ran after the ball in the park.", "Attention heads look back at tokens.",
             "Induction heads copy what followed an earlier token.", "the the cat cat sat sat on on"]


def add_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer (special tokens <pad> 0, <s> 1, </s> 2; BOS added) saved into ``folder``
    through transformers' PreTrainedTokenizerFast, as a real checkpoint ships it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder
