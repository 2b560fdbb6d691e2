"""The numpy backend: runs anywhere numpy does."""

from __future__ import annotations

import contextlib

import numpy as np

import mha
from mha._reference import rms_norm

from . import _kernel, _options
from ._proj import Projections
from ._options import thresholds
from ._workers import TASKS_PER_WORKER, Slot, Workers

GROUP_QKV = Slot("group QKV")


class MultiHeadAttention(mha.MultiHeadAttention):
    """Multi-head attention on numpy (float32 or float64).

    Same constructor and call as :class:`mha.MultiHeadAttention` (its ``backend`` can only be "numpy"
    or "auto" here); see there. The fast path (:meth:`_forward`) projects (Q/K/V fused into one GEMM for
    self-attention, the scale folded into W_q), normalises and rotates q and k when the layer says so,
    appends to the cache, runs the core (:func:`mha_cpu.attend`: blockwise attention with an online
    softmax on a thread pool, weights in the same pass), then head_mask and W_O. Dropout takes the
    reference path.
    """

    backend = "numpy"
    _xp = np
    fast_weights = True

    # -- the backend's hooks (mha._interface) --------------------------------------------------------
    def _errstate(self):
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")

    def _dtypes(self):
        return self._dtype, self._dtype  # float32 accumulates in float32 (as BLAS does), float64 in float64

    def _init_rng(self, seed) -> None:
        self._dtype = np.dtype(self.config.dtype)
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
        """Tiny blocks and a pool for any problem (mha_cpu.small_blocks)."""
        return _options.small_blocks(block_q, block_k)

    def _attend(self, q, k, v, masks, **kwargs):
        return _kernel.attend(q, k, v, masks, **kwargs)

    def _forward(self, call):
        """Projections, q/k norm, RoPE, the cache, the core (mha_cpu._kernel), head_mask and W_O."""
        c, pos = self.config, call.pos
        B, T, S = call.shape
        H, Hkv, D, E = c.num_heads, c.num_kv_heads, c.head_dim, c.embed_dim
        flops = 2.0 * B * (T * E * 2 * H * D + call.key.shape[1] * (c.kdim + c.vdim) * Hkv * D + 2 * T * S * H * D)
        out = np.empty((B, T, E), call.query.dtype)
        with Workers(flops) as workers, contextlib.ExitStack() as stack:
            g = self._head_groups(call, workers.n, flops)
            if g:
                ctx, weights, lse = self._by_head_groups(call, workers, g)
                workers.linear(ctx.reshape(B, T, H * D), self._proj.o_weight_t, self._params["o_bias"], out)
                return out, weights, lse
            q, k, v = self._proj.heads(call, workers, stack)  # (B, L, heads, D)
            if c.qk_norm is not None:
                q = rms_norm(np, q, self._params["q_norm"], c.qk_norm)
                k = rms_norm(np, k, self._params["k_norm"], c.qk_norm)
            q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, heads, L, D) views
            if c.rope is not None:
                q, k = self._rope(q, pos.q_offset), self._rope(k, pos.k_offset)
            finite = None
            if pos.step is not None:  # only the new keys and values are checked: the cache remembers
                k, v = pos.step.append(k, v, _kernel.all_finite(k) and _kernel.all_finite(v))
                finite = pos.step.cache.holds_nonfinite is False
            ctx, lse, *weights = _kernel.attend(q, k, v, call.masks, scale=self._proj.logit_scale, softcap=c.softcap,
                                                sinks=self._params.get("sinks"), return_weights=call.return_weights,
                                                finite=finite)
            ctx = ctx.transpose(0, 2, 1, 3)  # (B, T, H, D), the core's own (contiguous) array
            if call.head_mask is not None:
                ctx *= call.head_mask.transpose(0, 2, 1, 3)  # (B or 1, 1, H, 1)
            workers.linear(ctx.reshape(B, T, H * D), self._proj.o_weight_t, self._params["o_bias"], out)
        return out, (weights[0] if weights else None), lse

    def _head_groups(self, call, n: int, flops: float) -> int:
        """How many groups of key/value heads to cut each batch element into for the split by head groups
        (0: the split by query rows): self-attention without a cache on several workers, with at least two
        (batch element, key/value head) tasks per worker; the fewest groups that give every worker about
        four tasks of at least ``thresholds.task_flops`` work each."""
        B, Hkv = call.query.shape[0], self.config.num_kv_heads
        if n == 1 or not call.self_attention or call.pos.step is not None or B * Hkv < 2 * n:
            return 0
        want = max(n, min(TASKS_PER_WORKER * n, int(flops // max(thresholds.task_flops, 1.0))))
        return next((g for g in range(1, Hkv + 1) if Hkv % g == 0 and B * g >= want), Hkv)

    def _by_head_groups(self, call, workers, g: int):
        """Context (B, T, H, D), weights, lse by tasks of one batch element and a group of key/value heads,
        each start to finish on one worker: its columns of the fused projection, q/k norm, RoPE and the
        core on its heads, so its keys and values never leave that worker's cache."""
        c, x, pos = self.config, call.query, call.pos
        B, T, _ = x.shape
        H, D, G = c.num_heads, c.head_dim, c.num_heads // c.num_kv_heads
        ctx, lse = np.empty((B, T, H, D), x.dtype), np.empty((B, H, T), x.dtype)
        weights = np.empty((B, H, T, T), x.dtype) if call.return_weights else None
        parts, sinks = self._proj.groups(g), self._params.get("sinks")

        def task(i):
            b, (g0, g1, w, bias) = i // g, parts[i % g]
            h0, h1 = g0 * G, g1 * G
            with GROUP_QKV.lease((T, w.shape[1]), x.dtype) as y:
                np.matmul(x[b], w, out=y)
                y += bias
                q, k, v = (y[:, a:z].reshape(1, T, -1, D).transpose(0, 2, 1, 3) for a, z in
                           ((0, (h1 - h0) * D), ((h1 - h0) * D, (h1 - h0 + g1 - g0) * D), ((h1 - h0 + g1 - g0) * D, None)))
                if c.qk_norm is not None:
                    q, k = (rms_norm(np, a, self._params[n], c.qk_norm) for a, n in ((q, "q_norm"), (k, "k_norm")))
                if c.rope is not None:
                    q, k = self._rope(q, pos.q_offset), self._rope(k, pos.k_offset)
                _kernel.attend(q, k, v, call.masks.cut(batch=(b, b + 1), heads=(h0, h1)), scale=self._proj.logit_scale,
                               softcap=c.softcap, sinks=None if sinks is None else sinks[h0:h1],
                               out=(ctx[b:b + 1, :, h0:h1], lse[b:b + 1, h0:h1],
                                    None if weights is None else weights[b:b + 1, h0:h1]))

        workers.map(task, range(B * g))
        if call.head_mask is not None:
            ctx *= call.head_mask.transpose(0, 2, 1, 3)  # (B or 1, 1, H, 1)
        return ctx, weights, lse
