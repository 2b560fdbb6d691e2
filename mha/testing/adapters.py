"""Adapters: how the suite calls an implementation.

An adapter is any object with ``name`` (str), ``features`` (a set drawn from :data:`FEATURES`) and
``build(weights)`` returning ``fn(query, key, value, *, mask=None, key_mask=None, causal=False,
return_weights=False)`` on batch-first numpy arrays, in this project's semantics (bool masks True = may
attend, int 0/1 masks, float masks added to the logits with -inf hiding, key_mask True = real key, causal
aligned at the end). Only arguments of declared features are passed. An adapter may also declare
``conventions`` (mha.testing.conventions: causal alignment, empty rows, non-finite inputs): the suite
then holds it to those instead of this project's. An adapter that computes in other precisions lists
them in ``dtypes`` (e.g. ``("float32", "float16", "bfloat16")``) and takes ``build(weights, dtype=d)``
(inputs still come as float32 numpy arrays, already rounded to ``d``): mha.testing.numerics uses it. With "scale" the suite also calls
``build(weights, scale=s)``; with "head_mask", ``fn(..., head_mask=c)``; with "rope",
``build(weights, rope=mha.RoPE(...))`` (query i at position S - T + i, key j at j); with "sinks",
``build(weights)`` where ``weights.sinks`` (H,) holds the learned sink logits; with "window",
``build(weights, window=W)`` (query i sees keys j with |i + S - T - j| < W). With "cache" the function
also has ``fn.init_cache(batch_size, max_length)`` and takes ``fn(x_new, None, None, cache=c,
causal=True, key_mask=m_new)``: self-attention over everything appended so far (key_mask marks which new
tokens are padding). With "grad" the function also has ``fn.vjp(query, key, value, d_out, **call_kwargs)
-> (output, grads)``, grads mapping "query", "key", "value" and the weight names of mha.AttentionWeights
(None for absent biases) to the gradients of <d_out, output> (mha.testing.properties.gradients).

Shipped: :class:`BackendAdapter` (this project's numpy and MLX layers), :class:`TorchAdapter`
(``torch.nn.MultiheadAttention``) and :class:`MlxNNAdapter` (``mlx.nn.MultiHeadAttention``), both held
to this project's conventions; mha.testing.zoo has many more peers, each declaring its own. Wrap your
own function with :class:`Adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .zoo._common import keep_mask

FEATURES = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa", "weights",
                      "head_mask", "scale", "rope", "window", "cache", "grad"})
FEATURES |= {"sinks"}  # learned per-head sink logits (gpt-oss): weights.sinks (H,) joins each row's denominator


@dataclass
class Adapter:
    """A user's implementation: ``Adapter("mine", {"mask", "causal"}, build)``, optionally with
    ``conventions={"causal": "top_left", ...}`` (mha.testing.conventions)."""

    name: str
    features: frozenset
    build: Callable
    notes: dict = field(default_factory=dict)
    conventions: dict = field(default_factory=dict)

    def __post_init__(self):
        from .conventions import validate

        self.features = frozenset(self.features)
        unknown = self.features - FEATURES
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
        validate(self.conventions)


class BackendAdapter:
    """This project's layer on one backend (every feature).

    ``blocks=(block_q, block_k)`` runs it inside the backend's ``small_blocks(block_q, block_k)``
    (mha._interface): the numpy fast path then takes tiny blocks, the online softmax from more than
    ``block_k`` keys on, a pool of workers and the split by head groups even for tiny problems, so that
    small problems exercise every branch of the blockwise code, and MLX takes its blockwise path (the one
    of long sequences) in tiny blocks; ``mha check --impl numpy-blocks`` / ``--impl mlx-blocks``.
    """

    features = FEATURES

    def __init__(self, backend: str, blocks: tuple[int, int] | None = None):
        self.backend = backend
        if not _has_sinks(backend):
            self.features = FEATURES - {"sinks"}
        self.blocks = blocks
        self.name = backend if blocks is None else f"{backend}-blocks"
        self.dtypes = ("float32", "float64") if backend == "numpy" else ("float32", "float16", "bfloat16")

    def build(self, weights, scale=None, rope=None, window=None, dtype="float32"):
        import contextlib

        import mha

        layer = mha.MultiHeadAttention.from_weights(weights, backend=self.backend, scale=scale, rope=rope,
                                                    window=window, dtype=dtype)

        def out(a):
            return mha.to_numpy(a if dtype in ("float32", "float64") else a.astype(_mx_float32()))

        def fn(query, key, value, **kwargs):
            with layer.small_blocks(*self.blocks) if self.blocks else contextlib.nullcontext():
                res = layer(query, key, value, **kwargs)
            if kwargs.get("return_weights"):
                return out(res[0]), out(res[1])
            return out(res)

        def vjp(query, key, value, d_out, **kwargs):
            with layer.small_blocks(*self.blocks) if self.blocks else contextlib.nullcontext():
                res, pull = mha.vjp(layer, query, key, value, **kwargs)
                g = pull(d_out)
            grads = dict(query=g.query, key=g.key, value=g.value, **g.weights.to_dict())
            return out(res), {n: None if a is None else np.asarray(mha.to_numpy(a), np.float64)
                              for n, a in grads.items()}

        fn.init_cache = layer.init_cache
        fn.vjp = vjp
        return fn


def _has_sinks(backend: str) -> bool:
    """Whether the backend's layer takes learned sinks (AttentionWeights.sinks) yet."""
    import mha

    try:
        w = mha.AttentionWeights.init(4, 2, sinks=True, seed=0)
        mha.MultiHeadAttention.from_weights(w, backend=backend)
    except (TypeError, ValueError, ImportError):
        return False
    return True


def _mx_float32():
    import mlx.core as mx

    return mx.float32


def _combined_keep(B, H, T, S, mask, key_mask, causal):
    """(B, H, T, S) bool keep mask and (B, H, T, S) additive float part (or None) in our semantics."""
    return keep_mask(B, H, T, S, mask, key_mask, causal, align="bottom_right")


class TorchAdapter:
    """``torch.nn.MultiheadAttention`` (batch_first), masks translated to torch's convention
    (True = blocked; key_padding_mask True = padding; a float attn_mask (B*H, T, S))."""

    name = "torch"
    features = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "weights"})
    notes = {"gqa": "nn.MultiheadAttention has no grouped-query heads",
             "head_mask": "no head_mask argument", "scale": "the scale is fixed at 1/sqrt(head_dim)",
             "rope": "no rotary position embeddings", "window": "no sliding window", "cache": "no key/value cache"}

    dtypes = ("float32", "float16", "bfloat16")

    def build(self, weights, dtype="float32"):
        import torch

        E, H = weights.embed_dim, weights.num_heads
        m = torch.nn.MultiheadAttention(E, H, bias=weights.bias, kdim=weights.kdim, vdim=weights.vdim,
                                        batch_first=True)
        t = {n: None if a is None else torch.from_numpy(np.ascontiguousarray(a, np.float32))
             for n, a in weights.to_dict().items()}
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                m.in_proj_weight.copy_(torch.cat([t["q_weight"], t["k_weight"], t["v_weight"]]))
            else:
                m.q_proj_weight.copy_(t["q_weight"])
                m.k_proj_weight.copy_(t["k_weight"])
                m.v_proj_weight.copy_(t["v_weight"])
            m.out_proj.weight.copy_(t["o_weight"])
            if weights.bias:
                m.in_proj_bias.copy_(torch.cat([t["q_bias"], t["k_bias"], t["v_bias"]]))
                m.out_proj.bias.copy_(t["o_bias"])
        m.eval()
        dt = getattr(torch, dtype)
        m.to(dt)

        def fn(query, key, value, *, mask=None, key_mask=None, causal=False, return_weights=False):
            B, T, _ = query.shape
            S = key.shape[1]
            kwargs = {}
            if mask is not None or causal:
                keep, add = _combined_keep(B, H, T, S, mask, None, causal)
                if add is None:
                    kwargs["attn_mask"] = torch.from_numpy(~keep).reshape(B * H, T, S)
                else:
                    kwargs["attn_mask"] = torch.from_numpy(np.where(keep, add, -np.inf).astype(np.float32)
                                                           ).reshape(B * H, T, S)
            if key_mask is not None:
                pad = ~np.asarray(key_mask, bool)
                if "attn_mask" in kwargs and kwargs["attn_mask"].dtype != torch.bool:
                    kwargs["key_padding_mask"] = torch.from_numpy(np.where(pad, -np.inf, 0.0).astype(np.float32))
                else:
                    kwargs["key_padding_mask"] = torch.from_numpy(pad)
            q = torch.from_numpy(np.ascontiguousarray(query)).to(dt)
            k = q if key is query else torch.from_numpy(np.ascontiguousarray(key)).to(dt)
            v = k if value is key else torch.from_numpy(np.ascontiguousarray(value)).to(dt)
            with torch.no_grad():
                out, w = m(q, k, v, need_weights=return_weights, average_attn_weights=False, **kwargs)
            if return_weights:
                return out.float().numpy(), w.float().numpy()
            return out.float().numpy()

        return fn


class MlxNNAdapter:
    """``mlx.nn.MultiHeadAttention``: masks combined into one bool (or additive) mask, as it accepts."""

    name = "mlx-nn"
    features = frozenset({"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal"})
    notes = {"weights": "it does not return attention weights", "gqa": "no grouped-query heads",
             "head_mask": "no head_mask argument", "scale": "the scale is fixed at 1/sqrt(head_dim)",
             "rope": "RoPE is a separate nn.RoPE", "window": "no sliding window", "cache": "no key/value cache"}

    dtypes = ("float32", "float16", "bfloat16")

    def build(self, weights, dtype="float32"):
        import mlx.core as mx
        import mlx.nn as nn

        E, H = weights.embed_dim, weights.num_heads
        dt = getattr(mx, dtype)
        m = nn.MultiHeadAttention(E, H, query_input_dims=E, key_input_dims=weights.kdim,
                                  value_input_dims=weights.vdim, bias=weights.bias)
        mx.eval(m.parameters())  # cut the lazy chain of global-key splits its random init leaves behind
        for proj, p in (("query_proj", "q"), ("key_proj", "k"), ("value_proj", "v"), ("out_proj", "o")):
            layer = getattr(m, proj)
            layer.weight = mx.array(np.asarray(getattr(weights, f"{p}_weight"), np.float32)).astype(dt)
            if weights.bias:
                layer.bias = mx.array(np.asarray(getattr(weights, f"{p}_bias"), np.float32)).astype(dt)

        def fn(query, key, value, *, mask=None, key_mask=None, causal=False):
            B, T, _ = query.shape
            S = key.shape[1]
            arg = None
            if mask is not None or key_mask is not None or causal:
                keep, add = _combined_keep(B, H, T, S, mask, key_mask, causal)
                arg = mx.array(keep) if add is None else mx.array(np.where(keep, add, -np.inf).astype(np.float32))
                arg = arg if add is None else arg.astype(dt)
            out = m(mx.array(query).astype(dt), mx.array(key).astype(dt), mx.array(value).astype(dt), mask=arg)
            return np.array(out.astype(mx.float32))

        return fn


def builtin(name: str):
    """An adapter by the name ``mha check --impl`` uses: numpy, numpy-blocks, mlx, mlx-blocks, torch, mlx-nn."""
    if name in ("numpy", "mlx"):
        return BackendAdapter(name)
    if name in ("numpy-blocks", "mlx-blocks"):
        return BackendAdapter(name.split("-")[0], blocks=(2, 3))
    if name == "torch":
        return TorchAdapter()
    if name == "mlx-nn":
        return MlxNNAdapter()
    raise ValueError(f"unknown implementation {name!r}; choose numpy, numpy-blocks, mlx, mlx-blocks, torch or mlx-nn")
