"""Generation with a KV cache per layer, and the attention of every generated token read from it.

The prompt is one forward pass over the caches (the prefill); each new token is then one pass of a
single position per sequence (the decode steps). Caches are allocated once for prompt + new tokens
(or rotate: ``max_cache`` positions, the first ``keep`` never evicted), so no step copies a cache.
With ``attentions=True`` each pass also returns its weights over the keys it attended, which are
placed at their absolute positions (0 where a window or a rotating cache hid a key): nothing runs
twice. Batched prompts are left-padded; padding keys are hidden and learned positions count from
each row's first real token, so a padded row generates what it would alone.

LongRoPE (Phi-3) rotates with its short factors up to ``original_max`` positions and its long ones
beyond; when a generation first reaches past it, the cache is rebuilt by one pass over the whole
sequence (the keys rotated with the long factors), as transformers' Phi-3 does; that step's
attention is the last row of this pass.

Sampling follows transformers' order: logits / temperature, then top-k, then top-p (the smallest set
of most likely tokens whose probability reaches top_p), then a draw from numpy's Generator(seed).
Temperature 0 is greedy (argmax, first of ties). A row stops at an EOS token; later positions hold
the pad token, and generation ends when every row has stopped.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .. import _validate
from .._backends import to_numpy
from ._ops import padded_positions


@dataclass
class Generation:
    """What :func:`generate` returns.

    ids: prompt + new ids, int64, (T,) for one prompt or (B, T) for a batch (left-padded);
    new_ids: (n,) or (B, n); prompt_length: P (the padded length of a batch); mask: (B, T) bool, True at
    real tokens (None for one prompt); text: the new text (a list for a batch; None without tokenizer);
    attentions: with ``attentions=True``, one array per forward step: step 0 (layers, H, P, P), step
    s >= 1 (layers, H, 1, P + s), with a leading B for a batch, keys at absolute positions; sink_mass:
    (steps, layers, H) ((B, steps, layers, H)), the weight a learned sink took (step 0: the last
    prompt row), 0 without sinks; finished: whether each row reached EOS.
    """

    ids: np.ndarray
    new_ids: np.ndarray
    prompt_length: int
    mask: np.ndarray | None = None
    text: object = None
    attentions: list | None = None
    sink_mass: np.ndarray | None = None
    finished: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    tokens: list = field(default_factory=list)


def check_ids(ids, vocab_size: int, name: str):
    """(ids (B, T) int64, batched) from (T,) or (B, T) ints in [0, V); ValueError/TypeError otherwise."""
    try:
        a = np.asarray(ids)
    except ValueError as err:
        raise ValueError(f"{name} must be a (T,) or (B, T) array of token ids (equal lengths; for a ragged batch "
                         f"pass a list of lists to generate): {err}") from None
    if a.ndim not in (1, 2) or a.shape[-1] == 0 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty (T,) or (B, T) array of token ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    bad = a[(a < 0) | (a >= vocab_size)]
    if bad.size:
        raise ValueError(f"{name} holds token id {int(bad.flat[0])}, outside the vocabulary [0, {vocab_size})")
    a = a.astype(np.int64)
    return (a, True) if a.ndim == 2 else (a[None], False)


def _prompt(model, prompt):
    """(ids (B, P), mask (B, P) bool or None, batched, text) of a text, list of texts, ids or list of ids."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if model.tokenizer is None:
            raise ValueError(f"the prompt is text but {model.name} has no tokenizer (no tokenizer.json in its "
                             f"folder); pass token ids instead")
        rows = [model.encode_text(t) for t in texts]
        batched = not isinstance(prompt, str)
    elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple, np.ndarray)):
        rows = [check_ids(r, model.vocab_size, f"prompt[{i}]")[0][0] for i, r in enumerate(prompt)]
        batched = True
    else:
        ids, batched = check_ids(prompt, model.vocab_size, "prompt")
        return ids, None, batched
    P = max(len(r) for r in rows)
    ids = np.full((len(rows), P), _pad_id(model), dtype=np.int64)
    mask = np.zeros((len(rows), P), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], mask[i, P - len(r):] = r, True
    return ids, None if mask.all() else mask, batched


def _pad_id(model) -> int:
    c, tok = model.config, model.tokenizer
    for v in (c.pad_token_id, getattr(tok, "pad_id", None), *c.eos_token_ids, *(getattr(tok, "eos_ids", ()) or ())):
        if v is not None and 0 <= v < c.vocab_size:
            return int(v)
    return 0


def _options(model, max_new_tokens, temperature, top_k, top_p, seed, max_cache, keep):
    """Every option checked (ValueError/TypeError naming it) before any work."""
    integer = _validate.int_at_least
    max_new_tokens = integer("max_new_tokens", max_new_tokens, 1)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    top_k = integer("top_k", top_k, 1, allow_none=True)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if seed is not None:
        integer("seed", seed, 0)
    max_cache = integer("max_cache", max_cache, 1, allow_none=True)
    keep = integer("keep", keep, 0)
    if keep and (max_cache is None or keep >= max_cache):
        raise ValueError(f"keep={keep} needs a rotating cache larger than it: max_cache > keep (got max_cache="
                         f"{max_cache})")
    return max_new_tokens, float(temperature), top_k, top_p, max_cache, keep


def pick(logits: np.ndarray, temperature: float, top_k, top_p, rng) -> np.ndarray:
    """Next ids (B,) from logits (B, V): greedy at temperature 0, else sampled (module docstring)."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b, row in enumerate(logits.astype(np.float64) / temperature):
        if top_k is not None and top_k < row.size:
            kth = np.partition(row, -top_k)[-top_k]
            row = np.where(row < kth, -np.inf, row)
        p = np.exp(row - row.max())
        p /= p.sum()
        if top_p is not None and top_p < 1:
            order = np.argsort(p, kind="stable")  # ascending, as transformers' TopPLogitsWarper
            cum = np.cumsum(p[order])
            drop = cum <= 1 - top_p
            drop[-1] = False  # the most likely token always stays
            p[order[drop]] = 0
            p /= p.sum()
        out[b] = min(int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right")), p.size - 1)
        while p[out[b]] == 0:  # the draw fell on a removed token's empty interval at the top end
            out[b] -= 1
    return out


def _key_positions(cache, S: int) -> np.ndarray:
    """Absolute positions of the S keys a cache call attended (cache.positions when it has them)."""
    pos = getattr(cache, "positions", None)
    if pos is not None and len(pos) == S:
        return np.asarray(to_numpy(pos), dtype=np.int64)
    return np.arange(cache.offset - S, cache.offset)


def _place(weights: list, caches, width: int) -> np.ndarray:
    """Per-layer (B, H, T, S) weights over the attended keys -> (B, layers, H, T, width) at absolute positions."""
    ws = [to_numpy(w).astype(np.float32) for w in weights]
    B, H, T = ws[0].shape[:3]
    out = np.zeros((B, len(ws), H, T, width), dtype=np.float32)
    for i, (w, cache) in enumerate(zip(ws, caches)):
        out[:, i, :, :, _key_positions(cache, w.shape[-1])] = w.transpose(3, 0, 1, 2)
    return out


def generate(model, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k=None, top_p=None, seed=None,
             attentions: bool = False, max_cache=None, keep: int = 0, stop_at_eos: bool = True, head_mask=None,
             on_token=None) -> Generation:
    """Continue ``prompt`` (text, list of texts, ids (T,) or (B, T), or a list of id lists) by at most
    ``max_new_tokens`` tokens (see the module docstring and :class:`Generation`).

    ``on_token(step, ids, attentions)`` is called as each token comes (streaming) with its ids (B,) and,
    with ``attentions=True``, the step's weights (B, layers, H, T, P + step) (else None).
    ``head_mask={layer: [query heads]}`` ablates those heads at every step (mha.models._heads): their
    context is zeroed before o_proj, in the prefill and in every decode step."""
    n, temperature, top_k, top_p, max_cache, keep = _options(model, max_new_tokens, temperature, top_k, top_p,
                                                             seed, max_cache, keep)
    from ._heads import multipliers

    head_mask = multipliers(model, head_mask)  # {layer: [heads]} -> {layer: (H,) multipliers}, checked
    ids, mask, batched = _prompt(model, prompt)
    B, P = ids.shape
    model._check_length(P + n, f"the prompt ({P} tokens) with max_new_tokens={n}")
    eos = set(model.config.eos_token_ids) | set(getattr(model.tokenizer, "eos_ids", ()) or ())
    rng = np.random.default_rng(seed)
    new_caches = lambda: [layer.init_cache(B, P + n) if max_cache is None else  # noqa: E731
                          layer.init_cache(B, max_cache=max_cache, keep=keep) for layer in model.layers]
    switch = min((s.rope.original_max for s in model.config.layers
                  if s.rope is not None and s.rope.long_inv_freq is not None), default=-1)
    out = np.full((B, n), _pad_id(model), dtype=np.int64)
    finished = np.zeros(B, dtype=bool)
    steps, sinks = [], []
    run = dict(attentions=attentions, head_mask=head_mask, last_only=True)
    caches = new_caches()
    run["sink_out"] = sink_step = [] if attentions and model.config.sinks else None
    logits, ws, _ = model.forward(ids, caches=caches, key_mask=mask, positions=padded_positions(mask), **run)
    next_pos = (mask.sum(axis=1) if mask is not None else np.full(B, P)).astype(np.int64)  # learned positions
    for s in range(n):
        if attentions:
            steps.append(_place(ws, caches, P + s))
            sinks.append(_sink_mass(steps[-1], sink_step))
        new = np.where(finished, out[:, s], pick(np.asarray(to_numpy(logits)[:, -1], np.float32), temperature, top_k,
                                                 top_p, rng))
        out[:, s] = new
        if on_token is not None:
            on_token(s, new.copy(), steps[-1] if attentions else None)
        if stop_at_eos and eos:
            finished |= np.isin(new, list(eos))
        if s == n - 1 or finished.all():
            out = out[:, :s + 1]
            break
        if P + s == switch:  # LongRoPE switches to its long factors: the cache is rebuilt (module docstring)
            seq = np.concatenate([ids, out[:, :s + 1]], axis=1)
            seq_mask = None if mask is None else np.concatenate([mask, np.ones((B, s + 1), bool)], axis=1)
            caches = new_caches()
            run["sink_out"] = sink_step = [] if run["sink_out"] is not None else None
            logits, ws, _ = model.forward(seq, caches=caches, key_mask=seq_mask, positions=padded_positions(seq_mask),
                                          **run)
            ws = [w[:, :, -1:] for w in ws]
        else:
            run["sink_out"] = sink_step = [] if run["sink_out"] is not None else None
            logits, ws, _ = model.forward(new[:, None], caches=caches, positions=next_pos[:, None], **run)
        next_pos += 1
    return _result(model, ids, out, mask, steps, sinks, finished, batched, eos if stop_at_eos else set())


def _result(model, ids, out, mask, steps, sinks, finished, batched: bool, eos: set) -> Generation:
    full = np.concatenate([ids, out], axis=1)
    full_mask = None if mask is None else np.concatenate([mask, np.ones_like(out, dtype=bool)], axis=1)
    text = None if model.tokenizer is None else [model.tokenizer.decode(_until_eos(r, eos)) for r in out]
    atts = [a if batched else a[0] for a in steps] if steps else None
    sink = np.stack(sinks, axis=1) if sinks else None  # (B, steps, layers, H)
    g = Generation(full, out, ids.shape[1], full_mask, text, atts, sink, finished)
    if not batched:
        g.ids, g.new_ids, g.text = full[0], out[0], None if text is None else text[0]
        g.sink_mass = None if sink is None else sink[0]
    g.tokens = model.tokens(full[0]) if not batched else [model.tokens(r) for r in full]
    return g


def _until_eos(row: np.ndarray, eos: set) -> np.ndarray:
    for i, t in enumerate(row):
        if int(t) in eos:
            return row[:i + 1]
    return row


def _sink_mass(step: np.ndarray, per_layer) -> np.ndarray:
    """(B, layers, H) weight of each learned sink in the step's last row, from the layers' log-sum-exp
    (``per_layer``: (B, H, T) each, mha.models._decoder._sink_mass); zeros without sinks (None)."""
    if per_layer is None:
        return np.zeros(step.shape[:3], dtype=np.float32)
    return np.stack([m[:, :, -1] for m in per_layer], axis=1)
