"""The numpy backend: runs anywhere numpy does."""

from __future__ import annotations

import math

import numpy as np

import mha

from . import _attend, _decode, _kernel, _nonfinite, _options
from ._pool import TASKS_PER_WORKER, BlasChoice, Slot, Workers, on_worker, timed
from ._proj import Projections

GROUP_QKV, CTX = Slot("group QKV"), Slot("context")


class MultiHeadAttention(mha.MultiHeadAttention):
    """Multi-head attention on numpy (float32 or float64).

    Same constructor and call as :class:`mha.MultiHeadAttention` (its ``backend`` can only be "numpy"
    or "auto" here); see there. The fast path projects (Q/K/V fused into one GEMM for self-attention),
    then runs blockwise attention with an online softmax (mha_cpu._kernel) on a thread pool whose
    workers take tasks as they come free; with ``return_weights`` it writes the weights in the same
    single pass. Self-attention with at least two (batch element, key/value head) tasks per worker runs
    in tasks of groups of key/value heads, each start to finish on one worker, then W_O in tiles
    (:meth:`_forward_groups`); the rest projects all rows first and splits the attention by blocks of
    queries, each projected through W_O while its context is in cache (:meth:`_forward_rows`). Calls
    below ``tuning.min_parallel_flops`` run on the calling thread; decode steps take mha_cpu._decode.
    Dropout takes the reference path.
    """

    backend = "numpy"
    _xp = np
    fast_weights = True

    # -- the backend's hooks (mha._interface) --------------------------------------------------------
    def _errstate(self):
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")

    def _dtypes(self):
        dt = np.dtype(self.config.dtype)
        return dt, dt  # float32 accumulates in float32 (as BLAS does), float64 in float64

    def _init_rng(self, seed) -> None:
        # A stream of its own for dropout, so that dropout draws never shift the initialisation.
        self._rng = np.random.default_rng(None if seed is None else [seed, 1])

    def _is_native(self, x) -> bool:
        return isinstance(x, np.ndarray)

    def _from_numpy(self, x):
        return x

    def _as_input(self, x):
        """C order, native byte order: BLAS runs another kernel on a transposed (Fortran-ordered) operand,
        whose sums may round differently, and a (B, 1, E) token in Fortran order reshapes to such a view,
        so the same numbers would not give the same bits."""
        if x.flags.c_contiguous and x.dtype.isnative:
            return x
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))

    def _set_params(self, weights) -> None:
        dt = self._dtype = np.dtype(self.config.dtype)
        self._decode_blas, self._small_blas = BlasChoice(), BlasChoice()
        self._params = {k: None if v is None else np.array(v, dtype=dt, copy=True)
                        for k, v in weights.to_dict().items()}
        self._proj = Projections(self._params, self.config)

    def _native_params(self) -> dict:
        return self._params

    def _dropout_multiplier(self, shape, p, dtype):
        keep = self._rng.random(shape) >= p
        return keep.astype(dtype) / dtype.type(1.0 - p)

    @classmethod
    def small_blocks(cls, block_q: int = 2, block_k: int = 3):
        """Tiny blocks, a pool and the split by head groups for any problem (mha_cpu.small_blocks)."""
        return _options.small_blocks(block_q, block_k)

    def _decode_lane(self, query, cache):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            out = _decode.lane(self, query, cache)
        if out is not None:
            self._settle(cache)
        return out

    def _attend(self, q, k, v, masks, **kwargs):
        return _attend.attend(q, k, v, masks, **kwargs)

    # -- the fast path ---------------------------------------------------------------------------------
    def _forward(self, call):
        if _decode.applies(call):  # one token per sequence, nothing masked: a few GEMVs on this thread
            found = _decode.step(self, call)
            if found is not None:
                return found
        c = self.config
        B, T, S = call.shape
        E, L = c.embed_dim, call.key.shape[1]
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        flops = 2.0 * B * (T * E * 2 * H * D + L * (c.kdim + c.vdim) * Hkv * D + 2 * T * S * H * D)
        with Workers(flops) as workers:
            if workers.n == 1 and not on_worker():  # this thread alone: BLAS's threads or not, as learnt
                return timed(self._small_blas, flops, self._run, call, workers, flops)
            return self._run(call, workers, flops)

    def _run(self, call, workers, flops: float):
        g = self._groups(call, workers, flops)
        if g is None:
            return self._forward_rows(call, workers)
        try:
            return self._forward_groups(call, workers, False, g)
        except _kernel.Overflow:  # logits past float32's range: again, scaled down by powers of two
            return self._forward_groups(call, workers, True, g)

    def _groups(self, call, workers, flops: float) -> int | None:
        """How many groups of key/value heads to cut each batch element into for the split by head
        groups (self-attention without RoPE or a cache), or None for the split by query rows: the fewest
        that give every worker about four tasks (the workers take tasks as they come free, so the more
        tasks, the less a slower core holds the call up) while each task keeps at least
        ``tuning.min_task_flops`` of work, at most one per key/value head; and the split by rows when even
        one task per key/value head would not give every worker two."""
        split, t = _options.tuning.split, _options.tuning
        if split == "rows" or not call.self_attention or call.pos.step is not None or self.config.rope is not None:
            return None
        B, Hkv, n = call.query.shape[0], self.config.num_kv_heads, workers.n
        if split != "groups" and (n == 1 or B * Hkv < 2 * n):
            return None
        want = max(n, min(TASKS_PER_WORKER * n, int(flops // max(t.min_task_flops, 1.0))))
        return next((g for g in range(1, Hkv + 1) if Hkv % g == 0 and B * g >= want), Hkv)

    def _outputs(self, call):
        """Fresh arrays for what the call returns: output (B, T, E), weights or None, lse or None."""
        c, dt = self.config, call.query.dtype
        B, T, S = call.shape
        weights = np.empty((B, c.num_heads, T, S), dt) if call.return_weights else None
        lse = np.empty((B, c.num_heads, T), dt) if call.return_lse else None
        return np.empty((B, T, c.embed_dim), dt), weights, lse

    def _forward_rows(self, call, workers):
        """All rows projected (split over the workers), then attention by (batch, block of queries), each
        block projected through W_O while its context is in cache. Logits past float32's range: the
        kernel again on q and k scaled down by powers of two (the projection, and a cache's append, once)."""
        c, pos = self.config, call.pos
        aug = c.rope is None and pos.step is None  # RoPE and the cache work on D-wide heads
        out, weights, lse = self._outputs(call)
        with self._proj.heads(call, workers, aug) as (q, k, v):
            if c.rope is not None:  # in (B, heads, L, D) layout, and back (views)
                q, k = (self._rope(a.transpose(0, 2, 1, 3), o).transpose(0, 2, 1, 3)
                        for a, o in ((q, pos.q_offset), (k, pos.k_offset)))
            finite = bool(np.isfinite(k).all() and np.isfinite(v).all())  # with a cache: the new tokens
            if pos.step is not None:
                k, v = (a.transpose(0, 2, 1, 3) for a in pos.step.append(k.transpose(0, 2, 1, 3),
                                                                       v.transpose(0, 2, 1, 3), finite))
                finite = not pos.step.cache.holds_nonfinite
            poison = None
            if not finite:  # NaN/inf at a key or value: zeroed, and the rows that see it poisoned
                k, v, bad_k, bad_v = _nonfinite.zero_nonfinite(k, v, aug, own=pos.step is None)
                poison = _nonfinite.poisoned_rows(bad_k, bad_v, call.masks, c.num_heads // c.num_kv_heads)
            B, T, H = q.shape[:3]
            with CTX.lease((B, T, H, c.head_dim), q.dtype) as ctx:
                def run(rescale: bool):
                    q_, k_, factor = _rescaled(q, k, c.head_dim, rescale, own=pos.step is None)
                    kc = _kernel.Call(q_, k_, v, c.head_dim, call.masks, ctx, weights, lse,
                                      None if call.head_mask is None else call.head_mask.reshape(-1, H), poison,
                                      (self._proj.o_weight_t, self._params["o_bias"], out),
                                      self._proj.logit_scale * factor)
                    _kernel.attention(kc, workers)

                try:
                    run(False)
                except _kernel.Overflow:  # every row is written again
                    run(True)
        return out, weights, lse

    def _forward_groups(self, call, workers, rescale: bool, g: int):
        """Self-attention with one task per (batch element, group of key/value heads), each start to
        finish on one worker: its rows of the fused projection and the attention of its heads, into the
        context; then the output projection of every row, shared out by tiles. No barrier between
        projection and attention, and a task's keys and values never leave its worker's cache."""
        c = self.config
        x = call.query
        B, T, E = x.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        G, Dq = H // Hkv, D + 1  # the augmented form
        params = self._proj.groups(g)
        out, weights, lse = self._outputs(call)
        hm = None if call.head_mask is None else call.head_mask.reshape(-1, H)

        def task(i, ctx):
            b, gi = divmod(i, g)
            g0, g1, w, bias = params[gi]
            h0, h1 = g0 * G, g1 * G
            nq, nk = (h1 - h0) * Dq, (g1 - g0) * Dq
            with GROUP_QKV.lease((T, w.shape[1]), x.dtype) as y:
                np.matmul(x[b], w, out=y)
                y += bias
                q = y[:, :nq].reshape(1, T, h1 - h0, Dq)
                k = y[:, nq:nq + nk].reshape(1, T, g1 - g0, Dq)
                v = y[:, nq + nk:].reshape(1, T, g1 - g0, Dq)
                poison = None
                if not np.isfinite(y[:, nq:]).all():  # as in _forward_rows: zero, attend, poison who sees it
                    k, v, bad_k, bad_v = _nonfinite.zero_nonfinite(k, v, True, own=True)
                    poison = _nonfinite.poisoned_rows(bad_k, bad_v, call.masks, G, b, h0)
                q, k, factor = _rescaled(q, k, D, rescale, own=True)
                kc = _kernel.Call(q, k, v, D, _task_masks(call.masks, b, h0, h1), ctx[b:b + 1, :, h0:h1],
                                  None if weights is None else weights[b:b + 1, h0:h1],
                                  None if lse is None else lse[b:b + 1, h0:h1], _pick(hm, b, h0, h1), poison,
                                  None, self._proj.logit_scale * factor)
                _kernel.attention(kc)  # on this worker alone

        with CTX.lease((B, T, H, D), x.dtype) as ctx:
            workers.map(lambda i: task(i, ctx), range(B * g))
            workers.linear(ctx.reshape(B, T, H * D), self._proj.o_weight_t, self._params["o_bias"], out)
        return out, weights, lse


def _pick(a, b: int, h0: int, h1: int):
    """A (B?, H?, ...) array at batch element b and heads h0:h1 (broadcast axes kept)."""
    if a is None:
        return None
    a = a[b:b + 1] if a.shape[0] > 1 else a
    return a[:, h0:h1] if a.shape[1] > 1 else a


def _task_masks(masks, b: int, h0: int, h1: int):
    """The call's MaskSet as seen by one task of the split by head groups (batch element b, heads h0:h1)."""
    return masks.cut(batch=(b, b + 1), heads=(h0, h1))


def _rescaled(q, k, D: int, rescale: bool, own: bool):
    """(q, k, factor): when ``rescale``, q and k (their first D columns) scaled down by powers of two so
    that no logit can leave float32's range (|q.k| <= 2^100), and the factor c = 2^(p_q + p_k) the kernel
    multiplies back at the exp; else as they are, c = 1. ``own``: q and k may be changed in place."""
    if not rescale:
        return q, k, 1.0
    p = [_kernel.shrink_exponent(a[..., :D], D) for a in (q, k)]
    if not own:
        k = k.copy()
    for a, e in zip((q, k), p):
        a[..., :D] *= a.dtype.type(math.ldexp(1.0, -e))
    return q, k, math.ldexp(1.0, p[0] + p[1])
