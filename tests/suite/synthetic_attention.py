"""Small hand-written numpy attentions, one for each value of each convention (and planted bugs), for
the tests of mha.testing's conventions and detection. Vectorised float32, written without the
project's code: projections, a per-convention mask fill, softmax, values, W_O. The arithmetic runs in
float64 (cast to float32 at the end): numpy's float32 products round a row differently depending on
the memory alignment of the whole array, which would break the suite's bitwise properties."""

from __future__ import annotations

import math

import numpy as np

from mha.testing.adapters import Adapter

FEATURES = {"cross", "kdim", "bias", "mask", "additive_mask", "key_mask", "causal", "gqa", "weights", "scale"}


def attention_fn(weights, *, causal_align="bottom_right", empty_row="output_bias", nonfinite="isolated",
                 scale=None, bug=None):
    """fn(query, key, value, *, mask, key_mask, causal, return_weights) following the given conventions.

    ``bug``: None, "scale" (twice the default scale), "top_left" (top-left causal whatever
    ``causal_align`` says), "leak" (NaN at hidden values reaches the output through 0 * NaN),
    "finfo_fill" (what fused kernels do: a key hidden by a bool mask, key_mask or the causal rule gets
    finfo(float32).min added to its logit instead of being removed, so it ties with visible keys that
    carry that value in an additive mask: Hugging Face's left padding)."""
    H, Hkv, D = weights.num_heads, weights.num_kv_heads, weights.head_dim
    s = (1.0 / math.sqrt(D) if scale is None else scale) * (2.0 if bug == "scale" else 1.0)
    w = {n: None if a is None else np.asarray(a, np.float64) for n, a in weights.to_dict().items()}

    isolated = nonfinite == "isolated" and bug != "leak"

    def proj(x, name, heads):
        x = x.astype(np.float64)
        if isolated:  # BLAS may round other rows differently when some hold NaN: project clean rows
            x = np.where(np.isfinite(x).all(-1, keepdims=True), x, 0)
        y = x @ w[f"{name}_weight"].T
        if w[f"{name}_bias"] is not None:
            y = y + w[f"{name}_bias"]
        B, L, _ = y.shape
        return y.reshape(B, L, heads, D).transpose(0, 2, 1, 3)  # (B, heads, L, D)

    def fn(query, key, value, *, mask=None, key_mask=None, causal=False, return_weights=False):
        with np.errstate(all="ignore"):  # NaN/inf inputs and the 'nan' convention's 0/0 are on purpose
            return _fn(query, key, value, mask=mask, key_mask=key_mask, causal=causal, return_weights=return_weights)

    def _fn(query, key, value, *, mask, key_mask, causal, return_weights):
        q, k, v = proj(query, "q", H), proj(key, "k", Hkv), proj(value, "v", Hkv)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)  # (B, H, S, D)
        B, _, T, _ = q.shape
        S = k.shape[2]
        logits = s * (q @ k.transpose(0, 1, 3, 2))  # (B, H, T, S)
        if isolated:  # a non-finite query or key makes its logits NaN, a non-finite value its products
            logits = np.where(~np.isfinite(query).all(-1)[:, None, :, None], np.nan, logits)
            logits = np.where(~np.isfinite(key).all(-1)[:, None, None, :], np.nan, logits)
            bad_v = ~np.isfinite(value).all(-1)[:, None, None, :, None]  # (B, 1, 1, S, 1)
        vis = np.ones((B, H, T, S), bool)
        minus_inf = np.zeros((B, H, T, S), bool)  # keys an additive -inf hides
        if mask is not None:
            m = np.asarray(mask)
            m = m.reshape((1,) * (4 - m.ndim) + m.shape)
            if m.dtype.kind == "f":
                minus_inf |= m == -np.inf
                vis &= m != -np.inf
                logits = logits + np.where(np.isneginf(m), 0, m).astype(np.float64)
            else:
                vis &= m != 0
        if key_mask is not None:
            vis &= np.asarray(key_mask, bool)[:, None, None, :]
        if causal:
            offset = S - T if causal_align == "bottom_right" and bug != "top_left" else 0
            vis &= np.arange(S)[None, :] <= np.arange(T)[:, None] + offset
        empty = ~vis.any(-1, keepdims=True)  # (B, H, T, 1)
        z = np.where(vis, logits, -np.inf)
        if bug == "finfo_fill":
            z = np.where(vis | minus_inf, z, logits + np.float64(np.finfo(np.float32).min))
        reach = vis | empty if empty_row == "mean_value" else vis
        top = z.max(-1, keepdims=True)
        if empty_row != "nan":
            top = np.where(np.isneginf(top), 0, top)
        e = np.exp(z - top)
        P = e / e.sum(-1, keepdims=True)
        if empty_row == "output_bias":
            P = np.where(empty, 0, P)
        elif empty_row == "mean_value":  # uniform over every key
            P = np.where(empty, 1.0 / S, P)
        if bug == "finfo_fill":
            reach = reach | (P > 0)  # a hidden key tied with the visible ones takes weight like them
        if isolated:
            terms = np.where(bad_v, np.nan, P[..., None] * v[:, :, None])  # (B, H, T, S, D)
            ctx = np.where(reach[..., None], terms, 0).sum(-2)  # (B, H, T, D)
        else:
            ctx = P @ v
        if empty_row == "nan":
            ctx = np.where(empty, np.nan, ctx)
        out = ctx.transpose(0, 2, 1, 3).reshape(B, T, H * D) @ w["o_weight"].T
        if w["o_bias"] is not None:
            out = out + w["o_bias"]
        out = out.astype(np.float32)
        return (out, P.astype(np.float32)) if return_weights else out

    return fn


def synthetic(name="synthetic", *, causal="bottom_right", empty_row="output_bias", nonfinite="isolated",
              declare=None, bug=None, features=FEATURES) -> Adapter:
    """An adapter for :func:`attention_fn` with these conventions; ``declare`` overrides what it declares
    (default: the conventions it follows)."""
    followed = {"causal": causal, "empty_row": empty_row, "nonfinite": nonfinite}

    def build(weights, scale=None):
        return attention_fn(weights, causal_align=causal, empty_row=empty_row, nonfinite=nonfinite, scale=scale,
                            bug=bug)

    return Adapter(name, set(features), build, conventions=dict(followed if declare is None else declare))


def correct():
    """A factory for the pytest plugin's tests: the default conventions, no bug."""
    return synthetic("synthetic-ok")


def planted_scale():
    """A factory for the pytest plugin's tests: twice the default scale."""
    return synthetic("synthetic-scale", bug="scale")


def broken(kind: str, name=None, *, features=FEATURES) -> Adapter:
    """The correct synthetic attention with its answers broken as an adapter may break them: "complex"
    (a garbage imaginary part), "nan" (every entry NaN), "none", "scalar", "shape" (one query row only),
    "pair" (the output alone when weights are asked for), "hang" (never answers), "crash" (raises)."""
    import time

    def build(weights, scale=None):
        fn = attention_fn(weights, scale=scale)

        def call(query, key, value, **kwargs):
            if kind == "hang":
                time.sleep(3600)
            if kind == "crash":
                raise IndexError("tuple index out of range (a bug inside the implementation)")
            res = fn(query, key, value, **kwargs)
            pair = isinstance(res, tuple)
            y = res[0] if pair else res
            if kind in ("none", "scalar"):
                return None if kind == "none" else 1.5
            if kind == "pair":
                return y
            y = {"complex": lambda: y + 1j * np.random.default_rng(0).normal(size=y.shape).astype(np.float32),
                 "nan": lambda: np.full_like(y, np.nan), "shape": lambda: y[:, :1]}[kind]()
            return (y, res[1]) if pair else y

        return call

    return Adapter(name or f"broken-{kind}", set(features), build)


def hanging():
    """A factory for the pytest plugin's tests: an implementation that never answers."""
    return broken("hang")
