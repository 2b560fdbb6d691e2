"""The numpy backend: runs anywhere numpy does."""

from __future__ import annotations

import numpy as np

from mha._base import LayerBase

from . import _fast


class MultiHeadAttention(LayerBase):
    """Multi-head attention on numpy (float32 or float64).

    Same constructor and call as :class:`mha.MultiHeadAttention` (without ``backend``); see there.
    The fast path (mha_cpu._fast) fuses the Q/K/V projections of self-attention into one GEMM and
    runs blockwise attention with an online softmax on a thread pool; with ``return_weights`` it writes
    the weights in the same single pass; keys or values holding NaN/inf are zeroed and the rows that see
    them poisoned afterwards. Dropout takes the reference path.
    """

    backend = "numpy"
    _xp = np

    def _errstate(self):
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")

    def _dtypes(self):
        dt = np.dtype(self._config.dtype)
        return dt, dt  # float32 accumulates in float32 (as BLAS does), float64 in float64

    def _init_rng(self, seed) -> None:
        # A stream of its own for dropout, so that dropout draws never shift the initialisation.
        self._rng = np.random.default_rng(None if seed is None else [seed, 1])

    def _is_native(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def _from_numpy(self, x):
        return x

    def _set_params(self, weights) -> None:
        c = self._config
        dt = np.dtype(c.dtype)
        p = {k: None if v is None else np.array(v, dtype=dt, copy=True) for k, v in weights.to_dict().items()}
        self._params = p
        # Fused projections for the fast path, the scale folded into the query rows; and the same with
        # one more output per head (q: 0, k and v: bias 1), the fast path's augmented form (_fast.attention)
        s = dt.type(c.effective_scale)
        zeros = {n: np.zeros(p[f"{n}_weight"].shape[0], dt) for n in "qkv"}
        qb, kb, vb = ((p[f"{n}_bias"] if p[f"{n}_bias"] is not None else zeros[n]) for n in "qkv")
        plain = {"q": (p["q_weight"] * s, qb * s), "k": (p["k_weight"], kb), "v": (p["v_weight"], vb)}
        heads = {"q": c.num_heads, "k": c.num_kv_heads, "v": c.num_kv_heads}

        def augment(n):
            w, b = plain[n]
            h = heads[n]
            w = np.concatenate([w.reshape(h, -1, w.shape[-1]), np.zeros((h, 1, w.shape[-1]), dt)], axis=1)
            b = np.concatenate([b.reshape(h, -1), np.full((h, 1), 0 if n == "q" else 1, dt)], axis=1)
            return w.reshape(-1, w.shape[-1]), b.reshape(-1)

        self._proj = {False: plain, True: {n: augment(n) for n in "qkv"}}
        for mode in (False, True):
            pr = self._proj[mode]
            if c.kdim == c.vdim == c.embed_dim:
                pr["qkv"] = tuple(np.concatenate([pr[n][i] for n in "qkv"]) for i in (0, 1))
            if c.kdim == c.vdim:
                pr["kv"] = tuple(np.concatenate([pr[n][i] for n in "kv"]) for i in (0, 1))

    def _native_params(self) -> dict:
        return self._params

    def _dropout_multiplier(self, shape, p, dtype):
        keep = self._rng.random(shape) >= p
        return keep.astype(dtype) / dtype.type(1.0 - p)

    def _project(self, query, key, value, par, aug=False):
        """(q, k, v) as (B, L, heads, D) views of one or two GEMM outputs; q pre-scaled. With ``aug``,
        (B, L, heads, D + 1): k and v with a last column of ones, q with a free one (_fast.attention)."""
        c = self._config
        pr = self._proj[aug]
        B, T, _ = query.shape
        S = key.shape[1]
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim + aug
        if key is query and value is query and "qkv" in pr:  # self-attention: one GEMM
            y = par.linear(query, *pr["qkv"])
            q = y[..., :H * D]
            k, v = y[..., H * D:(H + Hkv) * D], y[..., (H + Hkv) * D:]
        else:
            q = par.linear(query, *pr["q"])
            if value is key and "kv" in pr:
                kv = par.linear(key, *pr["kv"])
                k, v = kv[..., :Hkv * D], kv[..., Hkv * D:]
            else:
                k, v = par.linear(key, *pr["k"]), par.linear(value, *pr["v"])
        return q.reshape(B, T, H, D), k.reshape(B, S, Hkv, D), v.reshape(B, S, Hkv, D)

    def _fast_forward(self, query, key, value, masks, head_mask, pos, return_weights, return_lse):
        c = self._config
        B, T, E = query.shape
        L, S = key.shape[1], masks.S  # keys projected (with a cache: the new ones), keys attended
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        flops = 2.0 * B * (T * E * (E + E) + L * (c.kdim + c.vdim) * Hkv * D + 2 * T * S * H * D)
        with _fast.Parallel(flops) as par:
            return self._forward(par, query, key, value, masks, head_mask, pos, return_weights, return_lse)

    def _forward(self, par, query, key, value, masks, head_mask, pos, return_weights, return_lse):
        c = self._config
        aug = _fast.options.augment and c.rope is None and pos.step is None  # RoPE, cache: plain heads
        q, k, v = self._project(query, key, value, par, aug)
        # LayerBase._positions, inlined: the finiteness check must see the new keys before the cache
        if c.rope is not None:  # in (B, heads, L, D) layout, and back (views)
            q, k = (self._rope(a.transpose(0, 2, 1, 3), o).transpose(0, 2, 1, 3)
                    for a, o in ((q, pos.q_offset), (k, pos.k_offset)))
        finite = bool(np.isfinite(k).all() and np.isfinite(v).all())  # with a cache: the new tokens only
        if pos.step is not None:
            cache = pos.step.cache
            k, v = (a.transpose(0, 2, 1, 3) for a in pos.step.append(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)))
            cache._nonfinite = cache._nonfinite or not finite  # sticky: a NaN stays in the cache
            finite = not cache._nonfinite
        bad_k, bad_v = None, None
        if not finite:
            # NaN/inf at a key or value: zero it, attend, then poison only the rows that can see it.
            bad_k, bad_v = ~np.isfinite(k).all(-1), ~np.isfinite(v).all(-1)  # (B, S, Hkv)
            k = np.where(bad_k[..., None], 0, k)
            v = np.where(bad_v[..., None], 0, v)
            if aug:
                k[..., -1] = v[..., -1] = 1
        B, T, H = q.shape[:3]
        D = c.head_dim
        S = k.shape[1]
        dt = q.dtype
        ctx = np.empty((B, T, H, D), dt)
        weights = np.empty((B, H, T, S), dt) if return_weights else None
        lse = np.empty((B, H, T), dt) if return_lse else None
        hm = None if head_mask is None else head_mask.reshape(-1, H)
        poison = None
        if bad_k is not None:  # which rows see a non-finite key (row NaN, weights too) or value (row NaN)
            full = masks.full_keep(np)
            full = np.ones((1, 1, 1, S), bool) if full is None else full.reshape((1,) * (4 - full.ndim) + full.shape)
            G = H // c.num_kv_heads

            def sees(bad):
                rep = np.repeat(bad.transpose(0, 2, 1), G, axis=1)[:, :, None, :]  # (B, H, 1, S)
                return np.broadcast_to((rep & full).any(-1), (B, H, T))

            by_key = sees(bad_k)
            poison = (by_key | sees(bad_v), by_key)
        out = np.empty((B, T, c.embed_dim), dt)
        _fast.attention(q, k, v, ctx, keep=masks.keep, bias=masks.bias, causal=masks.causal, window=masks.window,
                        head_mask=hm,
                        weights=weights, lse=lse, par=par, poison=poison,
                        project=(self._params["o_weight"], self._params["o_bias"], out))
        return out, weights, lse
