"""The numpy backend's projection weights, in the forms the fast path uses: Q/K/V fused into one GEMM for
self-attention (K/V for cross-attention with kdim == vdim); the scale folded into W_q and b_q, unless
the layer normalises q (the norm would undo it) or the folded weights would pass 2^64 (then
:attr:`Projections.logit_scale` is the scale, for the core); every weight transposed, (in, out) and
contiguous, for ``x @ wt`` (OpenBLAS packs an (out, in) operand's transpose at every call)."""

from __future__ import annotations

import math

import numpy as np

_FOLD_LIMIT = 2.0**64  # the folded query weights stay below this


class Projections:
    """See the module docstring. ``params``: the layer's (out, in) weights and biases, numpy, its dtype."""

    def __init__(self, params: dict, config):
        c = self.config = config
        dt = params["q_weight"].dtype
        self.o_weight_t = np.ascontiguousarray(params["o_weight"].T)  # W_O^T (H D, E); its bias stays in params
        w = {n: params[f"{n}_weight"] for n in "qkv"}
        b = {n: params[f"{n}_bias"] if params[f"{n}_bias"] is not None else np.zeros(w[n].shape[0], dt)
             for n in "qkv"}
        if c.qk_norm is None:
            wmax = max(np.abs(w["q"]).max(initial=0), np.abs(b["q"]).max(initial=0))
            s, self.logit_scale = _fold(c.effective_scale, float(wmax))  # Python floats: |W| * 1e38 overflows
            w["q"], b["q"] = w["q"] * dt.type(s), b["q"] * dt.type(s)
        else:
            self.logit_scale = c.effective_scale
        form = {n: (w[n], b[n]) for n in "qkv"}
        if c.kdim == c.vdim == c.embed_dim:
            form["qkv"] = tuple(np.concatenate([form[n][i] for n in "qkv"]) for i in (0, 1))
        if c.kdim == c.vdim:
            form["kv"] = tuple(np.concatenate([form[n][i] for n in "kv"]) for i in (0, 1))
        self.form = {name: (np.ascontiguousarray(w_.T), b_) for name, (w_, b_) in form.items()}  # (in, out)
        self._groups = {}

    def groups(self, g: int) -> list:
        """Per group of key/value heads (g groups): (first, end) kv head and its columns of the fused Q/K/V
        projection (weight (in, out), bias), contiguous; made once per g."""
        if g not in self._groups:
            c = self.config
            G, D, (w, b) = c.num_heads // c.num_kv_heads, c.head_dim, self.form["qkv"]
            H, found = c.num_heads, []
            for i in range(g):
                g0, g1 = i * c.num_kv_heads // g, (i + 1) * c.num_kv_heads // g
                cols = np.r_[g0 * G * D:g1 * G * D, H * D + g0 * D:H * D + g1 * D,
                             (H + c.num_kv_heads) * D + g0 * D:(H + c.num_kv_heads) * D + g1 * D]
                found.append((g0, g1, np.ascontiguousarray(w[:, cols]), b[cols]))
            self._groups[g] = found
        return self._groups[g]

    def heads(self, call, workers):
        """(q, k, v) as (B, L, heads, D) views of one or two GEMM outputs; q scaled when the scale is folded."""
        c, form = self.config, self.form
        query, key, value = call.query, call.key, call.value
        (B, T, _), L = query.shape, key.shape[1]
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim

        def linear(x, wb):
            out = np.empty(x.shape[:-1] + (wb[0].shape[1],), query.dtype)
            return workers.linear(x, wb[0], wb[1] if c.bias else None, out)  # (no bias: no zeros added)

        if call.self_attention and "qkv" in form:  # one GEMM
            y = linear(query, form["qkv"])
            q, k, v = y[..., :H * D], y[..., H * D:(H + Hkv) * D], y[..., (H + Hkv) * D:]
        else:
            q = linear(query, form["q"])
            if value is key and "kv" in form:
                kv = linear(key, form["kv"])
                k, v = kv[..., :Hkv * D], kv[..., Hkv * D:]
            else:
                k, v = linear(key, form["k"]), linear(value, form["v"])
        return q.reshape(B, T, H, D), k.reshape(B, L, Hkv, D), v.reshape(B, L, Hkv, D)


def _fold(scale: float, wmax: float) -> tuple[float, float]:
    """(folded into W_q, logit_scale left for the core): the scale whole when the folded weights stay
    below _FOLD_LIMIT, else nothing (the core scales q, in steps that cannot overflow)."""
    if scale == 0 or wmax == 0 or math.log2(wmax) + math.log2(abs(scale)) <= math.log2(_FOLD_LIMIT):
        return scale, 1.0
    return 1.0, scale
