"""Tensor names and layouts of each decoder family: what a checkpoint must hold, checked from the
headers alone, and how each tensor becomes the model's canonical weights.

Canonical names (what :mod:`mha.models._decoder` reads), per layer ``{i}.``: ``norm1.w`` (``.b``),
``attn.{q,k,v,o}.w`` (``.b``), ``attn.q_norm``/``attn.k_norm``, ``norm_post_attn.w``, ``norm2.w`` (``.b``),
``mlp.{gate,up,down}.w`` (``.b``), ``norm_post_mlp.w``; and ``embed``, ``pos_embed``, ``norm.w`` (``.b``),
``lm_head``. Every weight in the (out, in) layout of ``Linear``.

Layout quirks handled here (mlx-lm calls this ``sanitize``): GPT-2's Conv1D weights stored (in, out)
and its fused ``c_attn``; Phi-3's fused ``qkv_proj`` and ``gate_up_proj``; Gemma's norms stored as
w for a scale of (1 + w) (the canonical weight is 1 + w); tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_tensors
from ._decoder_config import DecoderConfig


@dataclass(frozen=True)
class Source:
    """One stored tensor: its shape, and the canonical tensors cut from it (rows ``a:b`` of the
    possibly transposed array), with ``plus_one`` for Gemma norms."""

    shape: tuple
    targets: tuple  # ((canonical name, (a, b) or None), ...)
    transpose: bool = False
    plus_one: bool = False


def _one(shape, name, **kw) -> Source:
    return Source(tuple(shape), ((name, None),), **kw)


def _llama_like(c: DecoderConfig) -> dict:
    E, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    gemma = c.embed_scale is not None
    norm = dict(plus_one=gemma)
    out = {"model.embed_tokens.weight": _one((V, E), "embed"), "model.norm.weight": _one((E,), "norm.w", **norm)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = _one((V, E), "lm_head")
    for i in range(c.num_layers):
        p, q = f"model.layers.{i}.", f"{i}."
        out[p + "input_layernorm.weight"] = _one((E,), q + "norm1.w", **norm)
        if c.family == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = Source(
                ((H + 2 * Hkv) * D, E), ((q + "attn.q.w", (0, H * D)), (q + "attn.k.w", (H * D, (H + Hkv) * D)),
                                         (q + "attn.v.w", ((H + Hkv) * D, (H + 2 * Hkv) * D))))
            out[p + "mlp.gate_up_proj.weight"] = Source((2 * F, E), ((q + "mlp.gate.w", (0, F)),
                                                                     (q + "mlp.up.w", (F, 2 * F))))
        else:
            for n, rows in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
                out[p + f"self_attn.{n}_proj.weight"] = _one((rows, E), q + f"attn.{n}.w")
                if c.attention_bias:
                    out[p + f"self_attn.{n}_proj.bias"] = _one((rows,), q + f"attn.{n}.b")
            for n in ("gate", "up") if c.moe is None else ():
                out[p + f"mlp.{n}_proj.weight"] = _one((F, E), q + f"mlp.{n}.w")
                if c.mlp_bias:
                    out[p + f"mlp.{n}_proj.bias"] = _one((F,), q + f"mlp.{n}.b")
        out[p + "self_attn.o_proj.weight"] = _one((E, H * D), q + "attn.o.w")
        if c.o_bias:
            out[p + "self_attn.o_proj.bias"] = _one((E,), q + "attn.o.b")
        if c.sinks:
            out[p + "self_attn.sinks"] = _one((H,), q + "attn.sinks")
        if c.moe is not None:
            out.update(_experts(p, q, c.moe[0], E, F))
        else:
            out[p + "mlp.down_proj.weight"] = _one((E, F), q + "mlp.down.w")
        if c.mlp_bias:
            out[p + "mlp.down_proj.bias"] = _one((E,), q + "mlp.down.b")
        if c.qk_norm:
            out[p + "self_attn.q_norm.weight"] = _one((D,), q + "attn.q_norm", **norm)
            out[p + "self_attn.k_norm.weight"] = _one((D,), q + "attn.k_norm", **norm)
        if c.sandwich:  # Gemma 2/3: post_attention_layernorm follows attention; pre_feedforward precedes the MLP
            out[p + "post_attention_layernorm.weight"] = _one((E,), q + "norm_post_attn.w", **norm)
            out[p + "pre_feedforward_layernorm.weight"] = _one((E,), q + "norm2.w", **norm)
            out[p + "post_feedforward_layernorm.weight"] = _one((E,), q + "norm_post_mlp.w", **norm)
        else:
            out[p + "post_attention_layernorm.weight"] = _one((E,), q + "norm2.w", **norm)
    return out


def _experts(p: str, q: str, n: int, E: int, F: int) -> dict:
    """gpt-oss's router and experts (mha.models._moe), stored as transformers saves them: the experts'
    projections (in, out), gate and up interleaved in gate_up_proj's columns."""
    return {p + "mlp.router.weight": _one((n, E), q + "mlp.router.w"),
            p + "mlp.router.bias": _one((n,), q + "mlp.router.b"),
            p + "mlp.experts.gate_up_proj": _one((n, E, 2 * F), q + "mlp.experts.gate_up"),
            p + "mlp.experts.gate_up_proj_bias": _one((n, 2 * F), q + "mlp.experts.gate_up.b"),
            p + "mlp.experts.down_proj": _one((n, F, E), q + "mlp.experts.down"),
            p + "mlp.experts.down_proj_bias": _one((n, E), q + "mlp.experts.down.b")}


def _gpt2(c: DecoderConfig) -> dict:
    E, F, V, P = c.hidden_size, c.intermediate_size, c.vocab_size, c.max_positions
    out = {"transformer.wte.weight": _one((V, E), "embed"), "transformer.wpe.weight": _one((P, E), "pos_embed"),
           "transformer.ln_f.weight": _one((E,), "norm.w"), "transformer.ln_f.bias": _one((E,), "norm.b")}
    if not c.tie_embeddings:
        out["lm_head.weight"] = _one((V, E), "lm_head")
    qkv = lambda q, s: tuple((q + f"attn.{n}{s}", (k * E, (k + 1) * E)) for k, n in enumerate("qkv"))  # noqa: E731
    for i in range(c.num_layers):
        p, q = f"transformer.h.{i}.", f"{i}."
        for ln, name in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = _one((E,), q + name + ".w"), _one((E,), q + name + ".b")
        out[p + "attn.c_attn.weight"] = Source((E, 3 * E), qkv(q, ".w"), transpose=True)  # Conv1D: (in, out)
        out[p + "attn.c_attn.bias"] = Source((3 * E,), qkv(q, ".b"))
        out[p + "attn.c_proj.weight"] = _one((E, E), q + "attn.o.w", transpose=True)
        out[p + "attn.c_proj.bias"] = _one((E,), q + "attn.o.b")
        out[p + "mlp.c_fc.weight"] = _one((E, F), q + "mlp.up.w", transpose=True)
        out[p + "mlp.c_fc.bias"] = _one((F,), q + "mlp.up.b")
        out[p + "mlp.c_proj.weight"] = _one((F, E), q + "mlp.down.w", transpose=True)
        out[p + "mlp.c_proj.bias"] = _one((E,), q + "mlp.down.b")
    return out


def _attn_only(c: DecoderConfig) -> dict:
    E, V, P = c.hidden_size, c.vocab_size, c.max_positions
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    out = {"embed_tokens.weight": _one((V, E), "embed")}
    if c.positions == "learned":
        out["embed_positions.weight"] = _one((P, E), "pos_embed")
    if not c.tie_embeddings:
        out["lm_head.weight"] = _one((V, E), "lm_head")
    for i in range(c.num_layers):
        p, q = f"layers.{i}.self_attn.", f"{i}.attn."
        for n, shape in (("q", (H * D, E)), ("k", (Hkv * D, E)), ("v", (Hkv * D, E)), ("o", (E, H * D))):
            out[p + f"{n}_proj.weight"] = _one(shape, q + f"{n}.w")
            if c.attention_bias:
                out[p + f"{n}_proj.bias"] = _one(shape[:1], q + f"{n}.b")
    return out


def layout(c: DecoderConfig) -> dict:
    """``{stored name: Source}`` every checkpoint of this config must hold."""
    if c.family == "gpt2":
        return _gpt2(c)
    if c.family == "mha_attn_only":
        return _attn_only(c)
    return _llama_like(c)


_LAYERS = {"gpt2": r"(?:transformer\.)?h\.(\d+)\.", "mha_attn_only": r"layers\.(\d+)\."}


def match(c: DecoderConfig, tensors: dict, where: str) -> dict:
    """``{stored name: (name in the file, Source)}``: the layout matched against the file's tensors
    (anything with a ``shape``: the headers' entries; GPT-2's ``transformer.`` prefix optional);
    ValueError listing a layer-count disagreement, missing, misshapen and unexpected tensors (a config
    that disagrees with the weights) before any tensor is read (mha.models._checks.check_tensors)."""
    want = layout(c)
    names = {k: k for k in want}
    if c.family == "gpt2" and "transformer.wte.weight" not in tensors and "wte.weight" in tensors:
        names = {k: k.removeprefix("transformer.") for k in want}
    ignored = [r".*rotary_emb\.inv_freq$", r".*attn\.(masked_)?bias$"] + ([r"lm_head\.weight$"] if c.tie_embeddings
                                                                          else [])
    summary = (f"{where} (model_type {c.family!r}: {c.num_layers} layers, {c.num_heads} heads, {c.num_kv_heads} "
               f"key/value heads, head_dim {c.head_dim})")
    check_tensors(summary, tensors, {names[k]: s.shape for k, s in want.items()}, ignored=ignored,
                  layers=(c.num_layers, "num_hidden_layers", _LAYERS.get(c.family, r"model\.layers\.(\d+)\.")))
    return {k: (names[k], s) for k, s in want.items()}


def convert(matched: dict, read, dtype) -> dict:
    """The canonical weights: ``read(name, dtype)`` of each stored tensor, transposed, split and
    shifted as its :class:`Source` says."""
    out = {}
    for stored, src in matched.values():
        a = read(stored, dtype)
        if src.transpose:
            a = a.T
        if src.plus_one:
            a = a + a.dtype.type(1)
        for name, rows in src.targets:
            out[name] = np.ascontiguousarray(a if rows is None else a[rows[0]:rows[1]])
    return out
