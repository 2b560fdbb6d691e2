"""The numpy fast path: blockwise attention with an online softmax, on a thread pool.

Work is split into tasks (batch, head, block of queries). A task computes its logits block by block
over the keys with FlashAttention's recurrence (running max m, running sum l, unnormalised context)
when the keys are many, or in one block when they fit, so memory stays O(T * block) unless weights
are asked for (then the weights *are* the output and are written in the same single pass). Causal
tasks skip key blocks that lie wholly in their future, windowed ones those wholly outside the window. Numpy's elementwise ops are single-threaded
but release the GIL, so tasks run on threads; BLAS is limited to one thread per task meanwhile
(threadpoolctl, the ``fast`` extra) so that the two levels of threading do not fight. Self-attention
can also be shared out by (batch element, group of key/value heads), each task running its own rows of
the projection, attention() on one worker, and its share of the output projection (the layer's
``_forward_groups``; ``options.split``): one hand-off per call instead of two, and each worker's keys
and values stay in its own cache (T=512: 15% faster than splitting by query blocks).

The arithmetic is the reference's (mha._reference), reordered: tested against it within the derived
tolerance T2 by the property suite.
"""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf
SHIFT = 20.0  # |logit - offset| <= 20: exp stays within 2e-9 .. 5e8, far from float32's under/overflow
LIMIT = float(np.exp(SHIFT + 10.0))  # a block's row sum above this (terms up to e^30) is done again, centred
FLOOR = float(np.exp(-60.0))  # a first block's row sum below this is done again, centred (see attention)


@dataclass
class Options:
    """Tuning of the numpy fast path; None = chosen automatically per call.

    block_q: queries per task; block_k: keys per online-softmax step; single_pass_max: up to this
    many keys a task handles all keys in one block; single_pass_floats: ... and also when the logits of
    the whole call (T x H x S per batch element) fit in this many floats (decoding: a few queries against
    a long cache); threads: worker threads (1 = no pool); split: how self-attention is shared out over
    the workers (see below).
    """

    block_q: int | None = None
    block_k: int = 512
    single_pass_max: int = 4096
    single_pass_floats: int = 1 << 21
    threads: int | None = None
    scratch_bytes: int = 16 << 20  # temporaries up to this size are reused across calls (0: never) ...
    scratch_min: int = 64 << 10  # ... and from this size on (smaller ones come from malloc's heap, cheaply)
    min_parallel_flops: float = 4e6  # below this much work per call, threads cost more than they give
    min_split_work: int = 1 << 16  # split heads over idle workers only from this many logits (T * S * H) on
    augment: bool = True  # the augmented form of attention() (offset and row sums ride in the GEMMs)
    # self-attention: "groups" runs each (batch element, group of key/value heads) start to finish on one
    # worker (its rows of the fused projection, attention, its share of W_O); "rows" projects all rows,
    # then splits the attention by query blocks; "auto": groups when they share the workers out evenly
    split: str = "auto"
    first_block_unchecked: bool = True  # augmented form: no max pass on a row's first block either


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


def _blas_controller():
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controller = False
        else:
            _controller = ThreadpoolController()
    return _controller


class Parallel:
    """The workers of one call: ``with Parallel(flops) as par: par.map(fn, items)``.

    With more than one worker, BLAS is held at one thread for the whole call and *every* GEMM and
    attention task runs on this pool: OpenBLAS's own threads keep spinning for a while after each
    multi-threaded GEMM, and would steal the cores from the attention tasks that follow. Without
    threadpoolctl (or for small work) everything runs on the calling thread with BLAS as configured.
    """

    def __init__(self, flops: float, threads: int | None = None):
        n = threads or (_threads() if flops >= options.min_parallel_flops else 1)
        self.controller = _blas_controller() if n > 1 else None
        self.n = n if self.controller else 1
        self._limit = None

    def __enter__(self):
        if self.n > 1:
            self._limit = self.controller.limit(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._limit is not None:
            self._limit.restore_original_limits()

    def map(self, fn, items) -> None:
        """Run ``fn`` on every item, spread over the workers (every n-th item each)."""
        items = list(items)
        # serially from inside a worker: waiting there on the pool's other workers could wait forever
        if self.n <= 1 or len(items) <= 1 or threading.current_thread().name.startswith("mha_cpu"):
            for it in items:
                fn(it)
            return
        n = min(self.n, len(items))
        chunks = [items[i::n] for i in range(n)]  # interleaved: causal blocks grow in cost with i0

        def work(chunk):
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # thread-local state
                for it in chunk:
                    fn(it)

        # the calling thread takes the first chunk itself instead of waiting idle: one hand-off fewer
        # (an empty map over 2 workers took 66 us when every chunk went to the pool)
        pending = [_executor(n - 1).submit(work, chunk) for chunk in chunks[1:]]
        try:
            work(chunks[0])
        finally:  # never return (or raise) while workers still write into the caller's buffers
            for f in pending:
                f.result()

    def linear(self, x, weight, bias, slot=None):
        """``x @ weight.T + bias`` for x (..., in), rows split over the workers; with ``slot``, into the
        calling thread's scratch buffer of that name (see scratch()), else a fresh array."""
        x2 = x.reshape(-1, x.shape[-1])
        shape = (x2.shape[0], weight.shape[0])
        out = np.empty(shape, x.dtype) if slot is None else scratch(slot, shape, x.dtype)
        rows = x2.shape[0]
        step = max(1, -(-rows // self.n))

        def part(r0):
            o = out[r0:r0 + step]
            np.matmul(x2[r0:r0 + step], weight.T, out=o)
            if bias is not None:
                o += bias

        self.map(part, range(0, rows, step))
        return out.reshape(x.shape[:-1] + (weight.shape[0],))


class _Buffers(dict):
    """One thread's reusable temporaries: slot name -> bytes (a dict a WeakSet can hold: by identity)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


_scratch_lock = threading.Lock()
_scratch_sets: weakref.WeakSet = weakref.WeakSet()
_local = threading.local()


def scratch(slot: str, shape, dtype) -> np.ndarray:
    """An uninitialised array for a temporary that never leaves the call, reused by this thread from
    call to call (up to ``options.scratch_bytes``; larger ones are fresh).

    Fresh large arrays are not free: glibc hands them back to the kernel when they are freed, and the
    next call takes a page fault for every 4 KiB it touches again (measured: ~1000 faults and ~2 ms of
    a 11.5 ms call at B=1, T=512, E=512 on a 2-core VM). Each slot holds one live array per thread: a
    caller must be done with it before the same thread asks for the slot again.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    if n > options.scratch_bytes or n < options.scratch_min:
        return np.empty(shape, dtype)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = _Buffers()
        with _scratch_lock:
            _scratch_sets.add(bufs)
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < n:
        buf = bufs[slot] = np.empty(max(n, 1), np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def free_scratch() -> None:
    """Drop every thread's reusable temporaries (call it while no layer call is running)."""
    with _scratch_lock:
        for bufs in list(_scratch_sets):
            bufs.clear()


def head_groups(B: int, Hkv: int, workers: int) -> int | None:
    """How many groups of key/value heads to cut each batch element into so that the B x groups tasks
    share ``workers`` out evenly (the fewest such groups; a divisor of Hkv), or None if none does."""
    for g in range(1, Hkv + 1):
        if Hkv % g == 0 and (B * g) % workers == 0:
            return g
    return None


def _index(a, b, rows, cols):
    """Slice a mask/bias broadcastable to (B, H, T, S) for batch b, all heads, query rows, key cols:
    a (H or 1, rows or 1, cols or 1) view that broadcasts against the (H, rows, cols) logits."""
    return a[b if a.shape[0] > 1 else 0, :, rows if a.shape[2] > 1 else slice(0, 1),
             cols if a.shape[3] > 1 else slice(0, 1)]


def attention(q, k, v, out, *, keep=None, bias=None, causal=False, window=None, head_mask=None, weights=None,
              lse=None, par: Parallel | None = None, project=None, poison=None):
    """Blockwise attention of pre-scaled queries, written into ``out``.

    A task is one block of queries of one batch element, all heads at once: (H, bq, keys) logits from
    one batched GEMM per key block (GQA groups share their key/value head without copies).

    Args:
        q: (B, T, H, D) queries already multiplied by the scale (any strides with unit last stride).
        k, v: (B, S, Hkv, D).
            Augmented form (q, k and v of width D + 1 while ``out`` has width D): k and v carry a last
            column of ones and q's last column is free to overwrite. The running offset m then rides in
            q's last column (q' k' = q k - m, so no pass over the logits subtracts it) and the row sums
            in the context's (P [V, 1] = [P V, sum P], so no pass sums them): two passes of the four
            elementwise ones saved for one more column in each GEMM.
        out: (B, T, H, D) preallocated output (context per head), written in place.
        keep: bool (B?, H?, T?, S?) 4-D, or None; bias: float, the same shapes, finite.
        causal: query i sees keys j <= i + (S - T).
        window: query i sees keys j with |i + (S - T) - j| < window (None: all); key blocks wholly outside
            every query's window are skipped.
        head_mask: (B?, H) multipliers on each head's context, or None.
        weights: (B, H, T, S) preallocated to receive the weights (forces single-pass), or None.
        lse: (B, H, T) preallocated to receive log-sum-exp of the visible logits (-inf if none), or None.
        par: the call's workers (default: the calling thread only).
        project: (W_O (E, H*D), b_O or None, final (B, T, E)): each task also writes its rows of
            ``out @ W_O.T + b_O`` into ``final`` (the output projection, while the context is in cache).
        poison: (rows, key_rows), (B, H, T) bools: contexts of ``rows`` are set to NaN (they see a
            non-finite key or value, zeroed before the call), and for ``key_rows`` the weights and lse too.
    """
    B, T, H, Dq = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    D = out.shape[-1]
    aug = Dq == D + 1  # the augmented form (see above)
    G = H // Hkv
    single = weights is not None or S <= options.single_pass_max or T * H * S <= options.single_pass_floats
    par = par or Parallel(0, threads=1)
    bq = options.block_q
    if bq is None:  # logits of a task up to ~16 MiB (bigger GEMMs win here), and a task for every worker
        bq = int(np.clip((16 << 20) // (4 * H * (S if single else options.block_k)), 32, 256))
        bq = max(16, min(bq, -(-T // max(1, -(-par.n // max(B, 1))))))
    bq = min(bq, T)
    tasks = [(b, i0, min(i0 + bq, T)) for b in range(B) for i0 in range(0, T, bq)]
    # Fewer tasks than workers (decoding: one query against a long cache): split the key/value heads too
    splits = min(Hkv, par.n // len(tasks)) if len(tasks) < par.n and T * S * H >= options.min_split_work else 1
    groups = [(g * Hkv // splits, (g + 1) * Hkv // splits) for g in range(splits)]
    dtype = q.dtype
    off = S - T

    def project_rows(b, i0, i1):
        w_o, b_o, final = project
        dst = final[b, i0:i1]
        np.matmul(out[b, i0:i1].reshape(i1 - i0, H * D), w_o.T, out=dst)
        if b_o is not None:
            dst += b_o

    def run(task):
        """All heads of one block of queries, then (optionally) their rows of the output projection."""
        b, i0, i1 = task
        block(b, i0, i1, 0, Hkv)
        if project is not None:
            project_rows(b, i0, i1)

    def block(b, i0, i1, g0, g1):
        n = i1 - i0
        Hkv_, H_ = g1 - g0, (g1 - g0) * G
        hs = slice(g0 * G, g1 * G)  # the query heads of this task
        qb = q[b, i0:i1, hs].reshape(n, Hkv_, G, Dq).transpose(1, 2, 0, 3)  # (Hkv_, G, bq, Dq) view
        rows = np.arange(i0, i1)
        # keys outside [start, end) are hidden from every query of the block (causal future, window)
        end = S if not causal else min(S, i1 + off)
        start = 0
        if window is not None:
            start = max(0, i0 + off - window + 1)
            end = min(end, i1 - 1 + off + window)
        ob = out[b, i0:i1, hs]  # (bq, H_, D) view into the output
        if end <= start:
            ob[...] = 0
            if weights is not None:
                weights[b, hs, i0:i1] = 0
            if lse is not None:
                lse[b, hs, i0:i1] = NEG_INF
            return

        def logits(j0, j1, buf):
            """Masked, scaled logits of this task's queries against keys j0:j1, written into ``buf``
            (H_, bq, j1 - j0)."""
            cols = slice(j0, j1)
            kt = k[b, cols, g0:g1].transpose(1, 2, 0)[:, None]  # (Hkv_, 1, D, keys)
            s4 = np.matmul(qb, kt, out=buf.reshape(Hkv_, G, n, j1 - j0))
            s = s4.reshape(H_, n, j1 - j0)
            if bias is not None:
                s += _index(bias, b, slice(i0, i1), cols)[hs if bias.shape[1] > 1 else slice(None)]
            if keep is not None:
                np.copyto(s, NEG_INF, where=~_index(keep, b, slice(i0, i1), cols)[hs if keep.shape[1] > 1
                                                                                  else slice(None)])
            if causal and j1 - 1 > i0 + off:  # the block crosses the diagonal
                np.copyto(s, NEG_INF, where=np.arange(j0, j1)[None, None, :] > rows[None, :, None] + off)
            if window is not None and (j0 <= i1 - 1 + off - window or j1 - 1 >= i0 + off + window):
                dist = np.abs(rows[:, None] + off - np.arange(j0, j1)[None, :])  # (bq, keys)
                np.copyto(s, NEG_INF, where=(dist >= window)[None])
            return s

        def times_v(p, j0, j1, out=None):
            """(H_, bq, keys) weights times the values of keys j0:j1: (H_, bq, D), into ``out`` if given."""
            vb = v[b, j0:j1, g0:g1].transpose(1, 0, 2)[:, None]  # (Hkv_, 1, keys, Dq)
            return np.matmul(p.reshape(Hkv_, G, n, j1 - j0), vb,
                             out=None if out is None else out.reshape(Hkv_, G, n, Dq)).reshape(H_, n, Dq)

        # FlashAttention's recurrence over key blocks (one block when the keys fit), with a per-row
        # offset m instead of the exact running max: exp(s - m) is taken directly while every visible
        # logit of the block stays within SHIFT of m (no overflow, no underflow of the row's largest
        # terms), which saves a full pass over the logits; a row whose block maximum leaves that band
        # is re-centred on it (subtract, and rescale what it accumulated). Rows that see nothing stay 0.
        step = end - start if single else options.block_k
        m = np.zeros((H_, n, 1), dtype)
        l_sum = np.zeros((H_, n, 1), dtype)
        ctx = None
        sums = not aug  # row sums by a pass over the logits (else: in ctx's last column)
        # the careful path with weights normalises them before the PV GEMM; the unchecked one after it
        normalised = weights is not None and (sums or not options.first_block_unchecked)
        if aug:
            q_m = q[b, i0:i1, hs, D].T[:, :, None]  # (H_, bq, 1) view of q's free column: holds -m
            q_m[...] = 0
        for j0 in range(start, end, step):
            j1 = min(j0 + step, end)
            buf = None
            if weights is not None:  # single block: computed in place in the output buffer
                weights[b, hs, i0:i1, end:] = 0  # keys wholly in the causal future or past the window
                weights[b, hs, i0:i1, :start] = 0
                buf = weights[b, hs, i0:i1, start:end]
            s = logits(j0, j1, scratch("logits", (H_, n, j1 - j0), dtype) if buf is None else buf)
            # the PV product into scratch, unless it becomes the context that later blocks add to
            pv = scratch("pv", (H_, n, Dq), dtype) if single or ctx is not None else None
            if not sums and (ctx is not None or options.first_block_unchecked):
                # The exp runs at once, without a pass for the max: the row sums that the PV GEMM returns
                # (the values' ones column) tell after the fact whether a term left the band — a sum above
                # LIMIT, inf or NaN, and on a row's first block also a sum below FLOOR (0: no visible key;
                # above it the largest term, >= sum / keys, is a normal float for up to e^27 keys) — and
                # only those rows are done again, centred. After the first block, rows still without terms
                # get the band rule first. Every row's arithmetic depends on its own numbers only.
                first = ctx is None
                if not first:
                    emp = ctx[..., D:] == 0  # (H, bq, 1)
                    if emp.any():
                        top = s.max(axis=2, keepdims=True)
                        move = emp & np.isfinite(top) & (np.abs(top) > SHIFT)
                        if move.any():
                            delta = np.where(move, top, 0.0).astype(dtype)
                            s -= delta
                            m = m + delta
                            q_m[...] = -m
                np.exp(s, out=s)  # hidden -> exactly 0
                part = times_v(s, j0, j1, pv)
                row = part[..., D:]
                bad = ~((row <= LIMIT) & (row >= FLOOR)) if first else ~(row <= LIMIT)  # NaN and inf fail too
                if bad.any():  # s is done with (its terms are in part, or in the weights), part is not
                    s = logits(j0, j1, scratch("logits", (H_, n, j1 - j0), dtype))
                    top = s.max(axis=2, keepdims=True)
                    delta = np.where(bad & np.isfinite(top) & (np.abs(top) > SHIFT), top, 0.0).astype(dtype)
                    s -= delta
                    if not first:
                        ctx *= np.exp(-delta).astype(dtype)
                    m = m + delta
                    q_m[...] = -m
                    np.exp(s, out=s)
                    # a fresh product: part may be in scratch (rows not redone come out the same anyway)
                    part = np.where(bad, times_v(s, j0, j1), part)
                    if buf is not None:  # the redone rows' terms into the weights
                        np.copyto(buf, s, where=bad)
                if first:
                    ctx = part
                else:
                    ctx += part
                continue
            # The careful way (max pass first): every block of the plain form (RoPE, a cache, or
            # options.augment off), and the augmented form's first block when first_block_unchecked is off.
            top = s.max(axis=2, keepdims=True)  # (H, bq, 1)
            rel = top - m  # the block's maximum relative to the offset
            # up: a term would exceed e^SHIFT; down: only while nothing is accumulated yet (the row's
            # largest terms would underflow); once terms are accumulated, far smaller ones are negligible
            empty = l_sum == 0
            move = np.isfinite(top) & ((rel > SHIFT) | (empty & (-rel > SHIFT)))
            if move.any():
                delta = np.where(move, rel, 0.0).astype(dtype)
                s -= m + delta
                if ctx is not None:
                    alpha = np.where(empty, 1.0, np.exp(-delta)).astype(dtype)  # <= e^-SHIFT where used
                    l_sum *= alpha
                    ctx *= alpha
                m = m + delta
                if aug:
                    q_m[...] = -m
            elif m.any():
                s -= m
            np.exp(s, out=s)  # hidden -> exactly 0
            if sums:
                l_sum += s.sum(axis=2, keepdims=True)
            if normalised:
                s /= np.where(l_sum == 0, 1.0, l_sum).astype(dtype)  # final weights; ctx = P V
            part = times_v(s, j0, j1, pv)
            if ctx is None:
                ctx = part
            else:
                ctx += part
        if not sums:
            l_sum = ctx[..., D:].copy()
        if aug:
            ctx = ctx[..., :D]
        denom = np.where(l_sum == 0, 1.0, l_sum).astype(dtype)
        if not normalised:
            ctx /= denom
            if weights is not None:  # the unchecked path: the exp terms are in the weights, unnormalised
                weights[b, hs, i0:i1, start:end] /= denom
        if head_mask is not None:
            ctx *= head_mask[b if head_mask.shape[0] > 1 else 0][hs, None, None]
        if lse is not None:
            lse[b, hs, i0:i1] = np.where(l_sum[..., 0] == 0, NEG_INF, m[..., 0] + np.log(denom[..., 0]))
        if poison is not None:
            rows_nan, key_nan = poison[0][b, hs, i0:i1], poison[1][b, hs, i0:i1]  # (H_, bq)
            ctx[rows_nan] = np.nan
            if weights is not None:
                weights[b, hs, i0:i1][key_nan] = np.nan  # a NaN logit makes its whole row NaN
            if lse is not None:
                lse[b, hs, i0:i1][key_nan] = np.nan
        ob[...] = ctx.transpose(1, 0, 2)

    if splits == 1:
        par.map(run, tasks)
    else:  # every (task, head group) on the pool, then the output projection of all rows
        par.map(lambda t: block(*t), [(b, i0, i1, g0, g1) for b, i0, i1 in tasks for g0, g1 in groups])
        if project is not None:
            for b, i0, i1 in tasks:
                project_rows(b, i0, i1)
    return out
