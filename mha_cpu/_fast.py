"""The numpy fast path: blockwise attention with an online softmax, on a thread pool.

Work is split into tasks (batch, head, block of queries). A task computes its logits block by block
over the keys with FlashAttention's recurrence (running max m, running sum l, unnormalised context)
when the keys are many, or in one block when they fit, so memory stays O(T * block) unless weights
are asked for (then the weights *are* the output and are written in the same single pass). Causal
tasks skip key blocks that lie wholly in their future. Numpy's elementwise ops are single-threaded
but release the GIL, so tasks run on threads; BLAS is limited to one thread per task meanwhile
(threadpoolctl, the ``fast`` extra) so that the two levels of threading do not fight.

The arithmetic is the reference's (mha._reference), reordered: tested against it within the derived
tolerance T2 by the property suite.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf


@dataclass
class Options:
    """Tuning of the numpy fast path; None = chosen automatically per call.

    block_q: queries per task; block_k: keys per online-softmax step; single_pass_max: up to this
    many keys a task handles all keys in one block; threads: worker threads (1 = no pool).
    """

    block_q: int | None = None
    block_k: int = 1024
    single_pass_max: int = 4096
    threads: int | None = None


options = Options()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_controller = None


def _threads() -> int:
    if options.threads is not None:
        return max(1, int(options.threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="mha_cpu")
            _pool_size = n
        return _pool


def _blas_one_thread():
    """A context limiting BLAS to one thread (threadpoolctl), or None without threadpoolctl."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas") if _controller else None


def _index(a, b, h, rows, cols):
    """Slice a mask/bias broadcastable to (B, H, T, S) for batch b, head h, query rows, key cols."""
    return a[b if a.shape[0] > 1 else 0, h if a.shape[1] > 1 else 0,
             rows if a.shape[2] > 1 else slice(0, 1), cols if a.shape[3] > 1 else slice(0, 1)]


def attention(q, k, v, out, *, keep=None, bias=None, causal=False, head_mask=None, weights=None, lse=None):
    """Blockwise attention of pre-scaled queries, written into ``out``.

    Args:
        q: (B, T, H, D) queries already multiplied by the scale (any strides with unit last stride).
        k, v: (B, S, Hkv, D).
        out: (B, T, H, D) preallocated output (context per head), written in place.
        keep: bool (B?, H?, T?, S?) 4-D, or None; bias: float, the same shapes, finite.
        causal: query i sees keys j <= i + (S - T).
        head_mask: (B?, H) multipliers on each head's context, or None.
        weights: (B, H, T, S) preallocated to receive the weights (forces single-pass), or None.
        lse: (B, H, T) preallocated to receive log-sum-exp of the visible logits (-inf if none), or None.
    """
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    single = weights is not None or S <= options.single_pass_max
    bq = options.block_q or int(np.clip((1 << 20) // (4 * (S if single else options.block_k)), 32, 512))
    bq = min(bq, T)
    tasks = [(b, h, i0, min(i0 + bq, T)) for b in range(B) for h in range(H) for i0 in range(0, T, bq)]
    dtype = q.dtype
    off = S - T

    def run(task):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # thread-local: set per task
            run_task(task)

    def run_task(task):
        b, h, i0, i1 = task
        g = h // G
        qb = q[b, i0:i1, h]  # (bq, D)
        rows = np.arange(i0, i1)
        end = S if not causal else min(S, i1 + off)  # keys beyond the block's last visible one are skipped
        n = i1 - i0
        ob = out[b, i0:i1, h]  # (bq, D) view into the output
        if end <= 0:
            ob[...] = 0
            if weights is not None:
                weights[b, h, i0:i1] = 0
            if lse is not None:
                lse[b, h, i0:i1] = NEG_INF
            return
        step = end if single else options.block_k
        m = np.full((n, 1), NEG_INF, dtype)
        l_sum = np.zeros((n, 1), dtype)
        acc = np.zeros((n, D), dtype)
        for j0 in range(0, end, step):
            j1 = min(j0 + step, end)
            cols = slice(j0, j1)
            s = qb @ k[b, cols, g].T  # (bq, bk) logits
            if bias is not None:
                s += _index(bias, b, h, slice(i0, i1), cols)
            if keep is not None:
                np.copyto(s, NEG_INF, where=~_index(keep, b, h, slice(i0, i1), cols))
            if causal and j1 - 1 > i0 + off:  # the block crosses the diagonal
                np.copyto(s, NEG_INF, where=np.arange(j0, j1)[None, :] > rows[:, None] + off)
            m_new = np.maximum(m, s.max(axis=1, keepdims=True))
            m_safe = np.where(m_new == NEG_INF, 0.0, m_new).astype(dtype)
            s -= m_safe
            np.exp(s, out=s)  # hidden -> exactly 0
            alpha = np.exp(m - m_safe)  # rescales what was accumulated under the old max
            l_sum *= alpha
            l_sum += s.sum(axis=1, keepdims=True)
            acc *= alpha
            acc += s @ v[b, cols, g]
            m = m_new
            if weights is not None:  # single pass: s holds exp(logit - max); normalised below
                weights[b, h, i0:i1, :j1] = s
                weights[b, h, i0:i1, j1:] = 0
        denom = np.where(l_sum == 0, 1.0, l_sum).astype(dtype)
        np.divide(acc, denom, out=ob)
        if head_mask is not None:
            ob *= head_mask[b if head_mask.shape[0] > 1 else 0, h]
        if weights is not None:
            weights[b, h, i0:i1] /= denom
        if lse is not None:
            lse[b, h, i0:i1] = np.where(l_sum[:, 0] == 0, NEG_INF, m[:, 0] + np.log(denom[:, 0]))

    n_threads = min(_threads(), len(tasks))
    if n_threads <= 1:
        for t in tasks:
            run(t)
        return out
    chunks = [tasks[i::n_threads] for i in range(n_threads)]
    limit = _blas_one_thread()
    if limit is None:  # without threadpoolctl, BLAS threads and ours would oversubscribe: stay serial
        for t in tasks:
            run(t)
        return out
    with limit:
        list(_executor(n_threads).map(lambda ch: [run(t) for t in ch], chunks))
    return out
