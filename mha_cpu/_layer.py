"""The numpy backend: runs anywhere numpy does."""

from __future__ import annotations

import numpy as np

from mha._base import LayerBase

from . import _fast


def _zero_nonfinite(k, v, aug: bool, own: bool):
    """(k, v, bad_k, bad_v): (B, S, Hkv, D) keys and values with every vector that holds NaN/inf zeroed
    (the augmented form's ones column kept), and which were: (B, S, Hkv) bools.

    Zeroed in place when the call owns the arrays (``own``: views of its own projections), else in copies
    laid out like them (a cache's buffers keep what they hold). Either way what follows runs on the
    memory layout of a clean call: BLAS's rounding depends on it, and a compact copy of strided keys once
    moved a row that cannot see the NaN by one ulp (window 2, tiny blocks), breaking the promise that
    such rows stay bitwise equal."""
    bad_k, bad_v = ~np.isfinite(k).all(-1), ~np.isfinite(v).all(-1)
    if not own:
        k, v = _copy_like(k), _copy_like(v)
    k[bad_k] = 0
    v[bad_v] = 0
    if aug:
        k[..., -1] = v[..., -1] = 1
    return k, v, bad_k, bad_v


def _copy_like(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` with the same strides (``a`` has non-negative strides)."""
    span = sum((n - 1) * st for n, st in zip(a.shape, a.strides)) + a.itemsize if a.size else a.itemsize
    out = np.lib.stride_tricks.as_strided(np.empty(span // a.itemsize, a.dtype), a.shape, a.strides)
    np.copyto(out, a)
    return out


def _full_keep(masks):
    """The masks' combined keep rule as a 4-D bool broadcastable to (B, H, T, S), or None (all visible)."""
    full = masks.full_keep(np)
    return None if full is None else full.reshape((1,) * (4 - full.ndim) + full.shape)


def _poison(bad_k, bad_v, full, G: int, T: int):
    """(rows, key_rows), (B, H, T) bools: the queries that see a non-finite key or value (their output is
    NaN) and those that see a non-finite key (their weights and lse too), from bad_k, bad_v (B, S, Hkv)
    and the combined keep mask ``full`` (from _full_keep: 4-D, or None when every key is visible)."""
    B, S, Hkv = bad_k.shape
    full = np.ones((1, 1, 1, S), bool) if full is None else full

    def sees(bad):
        rep = np.repeat(bad.transpose(0, 2, 1), G, axis=1)[:, :, None, :]  # (B, H, 1, S)
        return np.broadcast_to((rep & full).any(-1), (B, Hkv * G, T))

    by_key = sees(bad_k)
    return by_key | sees(bad_v), by_key


class MultiHeadAttention(LayerBase):
    """Multi-head attention on numpy (float32 or float64).

    Same constructor and call as :class:`mha.MultiHeadAttention` (without ``backend``); see there.
    The fast path (mha_cpu._fast) fuses the Q/K/V projections of self-attention into one GEMM and
    runs blockwise attention with an online softmax on a thread pool; with ``return_weights`` it writes
    the weights in the same single pass; keys or values holding NaN/inf are zeroed and the rows that see
    them poisoned afterwards. Self-attention whose (batch element, group of key/value heads) tasks share
    the workers out evenly runs each task start to finish on one worker (``_forward_groups``); the rest
    projects all rows first and splits the attention by blocks of queries. Dropout takes the reference
    path.
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
        self._groups = {}  # (aug, groups) -> per group: its rows of the fused projection, its columns of W_O
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
        # into this thread's scratch buffers (_fast.scratch): the projections never outlive the call (a
        # cache copies what it keeps; RoPE and the NaN clean-up make new arrays)
        if key is query and value is query and "qkv" in pr:  # self-attention: one GEMM
            y = par.linear(query, *pr["qkv"], slot="qkv")
            q = y[..., :H * D]
            k, v = y[..., H * D:(H + Hkv) * D], y[..., (H + Hkv) * D:]
        else:
            q = par.linear(query, *pr["q"], slot="q")
            if value is key and "kv" in pr:
                kv = par.linear(key, *pr["kv"], slot="kv")
                k, v = kv[..., :Hkv * D], kv[..., Hkv * D:]
            else:
                k, v = par.linear(key, *pr["k"], slot="k"), par.linear(value, *pr["v"], slot="v")
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
        split = _fast.options.split
        if split not in ("auto", "rows", "groups"):
            raise ValueError(f"mha_cpu.options.split must be 'auto', 'rows' or 'groups', got {split!r}")
        if (split != "rows" and key is query and value is query and pos.step is None and c.rope is None
                and "qkv" in self._proj[False]):
            B, Hkv = query.shape[0], c.num_kv_heads
            g = _fast.head_groups(B, Hkv, par.n) if par.n > 1 else None
            if split == "groups" and g is None:  # forced: as many groups as fill the workers, at most
                g = max(d for d in range(1, Hkv + 1) if Hkv % d == 0 and d <= max(1, -(-par.n // max(B, 1))))
            if g is not None:
                return self._forward_groups(par, query, masks, head_mask, return_weights, return_lse, g)
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
        if not finite:  # NaN/inf at a key or value: zeroed here, and the rows that see it poisoned after
            k, v, bad_k, bad_v = _zero_nonfinite(k, v, aug, own=pos.step is None)
        B, T, H = q.shape[:3]
        D = c.head_dim
        S = k.shape[1]
        dt = q.dtype
        ctx = _fast.scratch("ctx", (B, T, H, D), dt)
        weights = np.empty((B, H, T, S), dt) if return_weights else None
        lse = np.empty((B, H, T), dt) if return_lse else None
        hm = None if head_mask is None else head_mask.reshape(-1, H)
        poison = None if bad_k is None else _poison(bad_k, bad_v, _full_keep(masks), H // c.num_kv_heads, T)
        out = np.empty((B, T, c.embed_dim), dt)
        _fast.attention(q, k, v, ctx, keep=masks.keep, bias=masks.bias, causal=masks.causal, window=masks.window,
                        head_mask=hm,
                        weights=weights, lse=lse, par=par, poison=poison,
                        project=(self._params["o_weight"], self._params["o_bias"], out))
        return out, weights, lse

    def _group_params(self, aug: bool, g: int) -> list:
        """Per group of key/value heads (g groups): (first, end) kv head, its rows of the fused Q/K/V
        projection (weight, bias) and its columns of W_O, contiguous. Cached per (aug, g)."""
        found = self._groups.get((aug, g))
        if found is not None:
            return found
        c = self._config
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G, Dq = H // Hkv, D + aug
        w, b = self._proj[aug]["qkv"]
        found = []
        for i in range(g):
            g0, g1 = i * Hkv // g, (i + 1) * Hkv // g
            rows = np.concatenate([np.arange(g0 * G * Dq, g1 * G * Dq), H * Dq + np.arange(g0 * Dq, g1 * Dq),
                                   (H + Hkv) * Dq + np.arange(g0 * Dq, g1 * Dq)])
            found.append((g0, g1, np.ascontiguousarray(w[rows]), b[rows],
                          np.ascontiguousarray(self._params["o_weight"][:, g0 * G * D:g1 * G * D])))
        self._groups[(aug, g)] = found
        return found

    def _forward_groups(self, par, query, masks, head_mask, return_weights, return_lse, g):
        """Self-attention with one task per (batch element, group of key/value heads), each start to
        finish on one worker: its rows of the fused projection, the attention of its heads, and their
        share of the output projection (summed over groups at the end). No barrier between projection
        and attention, and a worker's keys and values never leave its cache. (output, weights, lse)."""
        c = self._config
        aug = _fast.options.augment
        B, T, E = query.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G, Dq = H // Hkv, D + aug
        dt = query.dtype
        params = self._group_params(aug, g)
        weights = np.empty((B, H, T, T), dt) if return_weights else None
        lse = np.empty((B, H, T), dt) if return_lse else None
        out = np.empty((B, T, E), dt)  # group 0's share of the output projection, then the sum
        rest = _fast.scratch("groups", (g - 1, B, T, E), dt)  # the other groups' shares
        hm = None if head_mask is None else head_mask.reshape(-1, H)
        o_bias = self._params["o_bias"]

        def pick(a, b, h0, h1):
            """a (B?, H?, ...) for batch element b and heads h0:h1 (broadcast axes kept)."""
            if a is None:
                return None
            a = a[b:b + 1] if a.shape[0] > 1 else a
            return a[:, h0:h1] if a.shape[1] > 1 else a

        def task(i):
            b, gi = divmod(i, g)
            g0, g1, w, bias, w_o = params[gi]
            h0, h1 = g0 * G, g1 * G
            nq, nk = (h1 - h0) * Dq, (g1 - g0) * Dq
            y = np.matmul(query[b], w.T, out=_fast.scratch("group_qkv", (T, w.shape[0]), dt))
            y += bias
            q = y[:, :nq].reshape(1, T, h1 - h0, Dq)
            k = y[:, nq:nq + nk].reshape(1, T, g1 - g0, Dq)
            v = y[:, nq + nk:].reshape(1, T, g1 - g0, Dq)
            poison = None
            if not np.isfinite(y[:, nq:]).all():  # as in _forward: zero, attend, poison who sees it
                k, v, bad_k, bad_v = _zero_nonfinite(k, v, aug, own=True)
                poison = _poison(bad_k, bad_v, pick(_full_keep(masks), b, h0, h1), G, T)
            ctx = _fast.scratch("group_ctx", (1, T, h1 - h0, D), dt)
            _fast.attention(q, k, v, ctx, keep=pick(masks.keep, b, h0, h1), bias=pick(masks.bias, b, h0, h1),
                            causal=masks.causal, window=masks.window, head_mask=pick(hm, b, h0, h1),
                            weights=None if weights is None else weights[b:b + 1, h0:h1],
                            lse=None if lse is None else lse[b:b + 1, h0:h1],
                            project=(w_o, o_bias if gi == 0 else None,
                                     out[b:b + 1] if gi == 0 else rest[gi - 1, b:b + 1]),
                            poison=poison)  # no par: on the calling worker alone

        par.map(task, range(B * g))
        for share in rest:
            out += share
        return out, weights, lse
