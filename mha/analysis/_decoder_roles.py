r"""Roles of decoder heads, each scored against chance with a 95% interval over sequences.

A decoder's head at query position i sees keys 0..i (causal). For its weights P (T, T) on one sequence,
every role's score is a mean over the query rows i >= 1 (row 0 sees only itself):

==========  ============================================================================================
role        score of one sequence                                   chance (uniform over visible keys)
==========  ============================================================================================
previous    P[i, i-1]                                               mean 1 / (i + 1)
induction   sum of P[i, j+1] over earlier copies j < i of token i   (copies of token i) / (i + 1)
            (Olsson et al.; :func:`mha.analysis.induction_scores`), on repeated random tokens
duplicate   sum of P[i, j] over earlier copies j < i of token i,    (copies of token i) / (i + 1)
            on repeated random tokens
first       P[i, 0] (the BOS token when the model has one)          mean 1 / (i + 1)
sink        1 - sum_j P[i, j]: the learned sink's weight            mean 1 / (i + 2): the sink as one
            (gpt-oss; only for models with learned sinks)           more key
self        P[i, i]                                                 mean 1 / (i + 1)
local       sum of P[i, j] over 1 <= i - j <= LOCAL (4), itself     mean min(i, 4) / (i + 1)
            excluded (the encoder table's "local", causal rows)
broad       H(P[i]) / log(n_i), the row's entropy normalised by     1 (uniform is the top of the scale)
            its n_i visible keys (+ the sink)
==========  ============================================================================================

Induction and duplicate are measured on ``sequences`` repeated random token sequences r r (each r of
``length`` distinct random tokens; :func:`mha.analysis.repeated_tokens`, after the model's BOS when it
has one), where only queries of the second half have an earlier copy. The other roles are measured
on the texts given (a corpus), or on the same random sequences when there are none.

The role of a head: the pointed role (all but broad) with the largest excess score - chance, if that
excess is at least ``MARGIN`` (0.25); otherwise "broad" if its broad score is at least 0.7; otherwise
that largest excess anyway. ``ci`` is a 95% percentile bootstrap interval of the mean over sequences
(2,000 resamples of the sequences, fixed seed), as the encoder corpus table has it; ``specialised``:
the interval lies wholly above chance (never for broad). With grouped-query attention every record of
a key/value group pools its query heads (their per-sequence scores averaged before the bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._validate import int_at_least
from ._corpus import BOOTSTRAP, CorpusRole, _bootstrap
from ._induction import induction_scores, repeated_tokens
from ._roles import BROAD, nan_mean
from ._roles import head_roles as _encoder_roles

DECODER_ROLES = ("previous", "induction", "duplicate", "first", "sink", "self", "local", "broad")
REPEAT_ROLES = ("induction", "duplicate")  # measured on repeated random tokens only
MARGIN = 0.25
LOCAL = 4  # the encoder table's "local" window (mha.analysis._roles.LOCAL once it lands there): one meaning
RULE = (f"role: the largest excess score - chance among {', '.join(r for r in DECODER_ROLES if r != 'broad')} if "
        f"that excess is at least {MARGIN:.2f}; else broad if the rows' normalised entropy is at least {BROAD:.2f}; "
        f"else the largest excess. Chance: uniform attention over the visible keys of the same sequences.")


@dataclass
class DecoderRole(CorpusRole):
    """One head (or one key/value group, ``head`` None) of a decoder: :class:`CorpusRole`'s fields
    (``role``, mean ``score``, ``chance``, 95% interval ``ci``, ``specialised``, every role's mean in
    ``scores``) plus ``kv_head``, the query ``heads`` pooled, and every role's ``chances`` and
    ``intervals``."""

    kv_head: int = 0
    heads: tuple = ()
    chances: dict = field(default_factory=dict)
    intervals: dict = field(default_factory=dict)

    @property
    def excess(self) -> float:
        """score - chance of its role."""
        return self.score - self.chance

    def as_dict(self) -> dict:
        r4 = lambda v: None if v is None or np.isnan(v) else round(float(v), 4)  # noqa: E731
        out = super().as_dict()
        out.update(kv_head=self.kv_head, heads=list(self.heads),
                   scores={k: r4(v) for k, v in self.scores.items()},
                   chances={k: r4(v) for k, v in self.chances.items()},
                   intervals={k: [r4(a), r4(b)] for k, (a, b) in self.intervals.items()})
        return out


@dataclass
class RoleTable:
    """What :func:`decoder_roles` found: one record per query head (``heads``) and per key/value group
    (``groups``), how many random repeated ``sequences`` of ``length`` tokens and how many ``texts``
    were scored, and the ``roles`` measured."""

    heads: list
    groups: list
    sequences: int
    length: int
    texts: int
    roles: tuple
    rule: str = RULE

    def ranking(self, role: str, *, groups: bool = False) -> list:
        """Records ordered by their ``role``'s excess score - chance, the largest first."""
        if role not in self.roles:
            raise ValueError(f"role {role!r} was not measured; measured: {', '.join(self.roles)}")
        records = self.groups if groups else self.heads
        return sorted(records, key=lambda r: -(r.scores[role] - r.chances[role]))

    def as_dict(self) -> dict:
        return {"sequences": self.sequences, "length": self.length, "texts": self.texts, "roles": list(self.roles),
                "rule": self.rule, "heads": [r.as_dict() for r in self.heads],
                "kv_groups": [r.as_dict() for r in self.groups]}


# -- scores of one batch ----------------------------------------------------------------------------------
def positional_scores(A: np.ndarray, sinks: bool) -> dict:
    """{role: (..., ) score} of the positional roles for weights A (..., T, T) (module docstring)."""
    T = A.shape[-1]
    i = np.arange(1, T)
    rows = A[..., 1:, :]  # (..., T-1, T)
    dist = i[:, None] - np.arange(T)[None, :]  # (T-1, T)
    mass = rows.sum(-1)  # (..., T-1)
    out = {"previous": A[..., i, i - 1].mean(-1), "self": A[..., i, i].mean(-1), "first": rows[..., 0].mean(-1),
           "local": (rows * ((dist >= 1) & (dist <= LOCAL))).sum(-1).mean(-1)}
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(rows > 0, rows * np.log(rows), 0.0).sum(-1)  # (..., T-1)
        if sinks:
            left = np.clip(1.0 - mass, 0.0, 1.0)
            ent = ent - np.where(left > 0, left * np.log(left), 0.0)
    out["broad"] = (ent / np.log(i + 1 + sinks)).mean(-1)
    if sinks:
        out["sink"] = (1.0 - mass).mean(-1)
    return out


def positional_chance(T: int, sinks: bool) -> dict:
    """{role: chance} of the positional roles on a sequence of T tokens (module docstring)."""
    i = np.arange(1, T)
    share = (1.0 / (i + 1)).mean()
    out = {"previous": share, "self": share, "first": share, "local": (np.minimum(i, LOCAL) / (i + 1)).mean(),
           "broad": 1.0}
    if sinks:
        out["sink"] = (1.0 / (i + 2)).mean()
    return {k: float(v) for k, v in out.items()}


def repeat_scores(A: np.ndarray, ids: np.ndarray) -> tuple[dict, dict]:
    """({role: (B, layers, H)}, {role: (B,) chance}) of induction and duplicate for weights A (B,
    layers, H, T, T) on sequences ids (B, T): Olsson et al.'s score by :func:`induction_scores`; the
    duplicate score is the same function on the weights shifted one key to the right (column j + 1
    holding P[i, j]), which turns "the token after an earlier copy" into "the earlier copy"."""
    shifted = np.zeros_like(A)
    shifted[..., 1:] = A[..., :-1]
    scores = {"induction": [], "duplicate": []}
    chance = {"induction": [], "duplicate": []}
    for b in range(A.shape[0]):
        for role, a in (("induction", A[b]), ("duplicate", shifted[b])):
            s, c = induction_scores(a, ids[b], return_chance=True)
            scores[role].append(s)
            chance[role].append(c)
    return {k: np.stack(v) for k, v in scores.items()}, {k: np.array(v) for k, v in chance.items()}


# -- the table ----------------------------------------------------------------------------------------------
def _attentions(model, ids: np.ndarray) -> np.ndarray:
    """(B, layers, H, T, T) float64 causal weights of ids (B, T), one forward pass."""
    from .._backends import to_numpy

    _, per_layer, _ = model.forward(ids, attentions=True)
    return np.stack([to_numpy(w) for w in per_layer], axis=1).astype(np.float64)


def _probe(model, sequences: int, length: int, seed: int) -> np.ndarray:
    ids = repeated_tokens(sequences, length, model.vocab_size, seed=seed)
    bos = getattr(model.config, "bos_token_id", None)
    if bos is not None:
        ids = np.concatenate([np.full((sequences, 1), bos, np.int64), ids], axis=1)
    if ids.shape[1] > model.max_length:
        most = (model.max_length - (bos is not None)) // 2
        raise ValueError(f"length={length}: the repeated random sequences span {ids.shape[1]} positions (2 x {length}"
                         + (" after BOS" if bos is not None else "") + f"), more than {model.name}'s "
                         f"max_position_embeddings={model.max_length}; use length <= {most}")
    return ids


def decoder_roles(model, texts=None, *, sequences: int = 32, length: int = 24, seed: int = 0,
                  resamples: int = BOOTSTRAP, batch_size: int = 8, progress=None) -> RoleTable:
    """Every head's role in a decoder model, against chance (see the module docstring).

    Args:
        model: a :class:`mha.models.DecoderModel` (``mha.models.load``).
        texts: texts (or token-id sequences) on which the positional roles are measured; None: the
            repeated random sequences serve for every role.
        sequences, length: how many repeated random sequences, of how many tokens per half.
        seed: of the random tokens and of the bootstrap; resamples: bootstrap resamples.
        batch_size: random sequences per forward pass; progress: called with each count of sequences done.

    Returns:
        a :class:`RoleTable` (``.heads``: one :class:`DecoderRole` per (layer, query head) in order;
        ``.groups``: one per (layer, key/value group)).
    """
    if not (hasattr(model, "forward") and hasattr(model, "num_kv_heads") and hasattr(model, "config")):
        raise TypeError(f"model must be a decoder model (mha.models.load), got {type(model).__name__}")
    sequences, length = int_at_least("sequences", sequences, 2), int_at_least("length", length, 2)
    resamples, batch_size = int_at_least("resamples", resamples, 1), int_at_least("batch_size", batch_size, 1)
    seed = int_at_least("seed", seed, 0)
    texts = None if texts is None else list(texts)
    if texts is not None and len(texts) < 2:
        raise ValueError(f"texts: need at least 2 (a 95% interval over one text is meaningless), got {len(texts)}")
    sinks = bool(getattr(model.config, "sinks", False))
    probe = _probe(model, sequences, length, seed)
    T = probe.shape[1]
    per: dict = {}  # role -> list of (b, layers, H) per batch / text
    chance: dict = {}  # role -> list of (b,)
    for start in range(0, sequences, batch_size):
        ids = probe[start:start + batch_size]
        A = _attentions(model, ids)
        found = [repeat_scores(A, ids)]
        if texts is None:
            found.append((positional_scores(A, sinks), {k: np.full(len(ids), v)
                                                        for k, v in positional_chance(T, sinks).items()}))
        for s, c in found:
            for k in s:
                per.setdefault(k, []).append(s[k])
                chance.setdefault(k, []).append(c[k])
        if progress is not None:
            progress(len(ids))
    for text in texts or ():
        enc = model.encode(text)
        A = np.asarray(enc.attentions, np.float64)[None]  # (1, layers, H, T, T)
        for k, v in positional_scores(A, sinks).items():
            per.setdefault(k, []).append(v)
        for k, v in positional_chance(A.shape[-1], sinks).items():
            chance.setdefault(k, []).append(np.array([v]))
        if progress is not None:
            progress(1)
    roles = tuple(r for r in DECODER_ROLES if r in per)
    per = {k: np.concatenate(v) for k, v in per.items()}  # (n_role, layers, H)
    chance = {k: float(np.nanmean(np.concatenate(v))) for k, v in chance.items()}
    L, H, Hkv = model.num_layers, model.num_heads, model.num_kv_heads
    G = H // Hkv
    heads = _records(per, chance, roles, [(h,) for h in range(H)], [h // G for h in range(H)], resamples, seed)
    pooled = {k: v.reshape(v.shape[0], L, Hkv, G).mean(-1) for k, v in per.items()}
    groups = _records(pooled, chance, roles, [tuple(range(g * G, (g + 1) * G)) for g in range(Hkv)],
                      list(range(Hkv)), resamples, seed, group=True)
    return RoleTable(heads, groups, sequences, length, len(texts or ()), roles)


def _records(per: dict, chance: dict, roles: tuple, members: list, kv: list, resamples: int, seed: int,
             group: bool = False) -> list:
    """One :class:`DecoderRole` per (layer, unit) from per-sequence scores {role: (n_role, layers, U)}."""
    L, U = next(iter(per.values())).shape[1:]
    means = {k: nan_mean(per[k]) for k in roles}  # (layers, U) each
    low, high = {}, {}
    rng = np.random.default_rng(seed)
    for n in sorted({per[k].shape[0] for k in roles}):  # one bootstrap per set of sequences (same n)
        ks = [k for k in roles if per[k].shape[0] == n]
        x = np.stack([per[k] for k in ks], -1).reshape(n, -1)  # (n, layers * U * roles)
        lo, hi = _bootstrap(x, rng, resamples)
        for j, k in enumerate(ks):
            low[k], high[k] = lo.reshape(L, U, len(ks))[..., j], hi.reshape(L, U, len(ks))[..., j]
    out = []
    for la in range(L):
        for u in range(U):
            scores = {k: float(means[k][la, u]) for k in roles}
            role = pick_decoder_role(scores, chance)
            ci = (float(low[role][la, u]), float(high[role][la, u]))
            out.append(DecoderRole(
                la, None if group else u, role, scores[role], chance[role], ci,
                role != "broad" and ci[0] > chance[role], scores, kv_head=kv[u], heads=members[u],
                chances=dict(chance), intervals={k: (float(low[k][la, u]), float(high[k][la, u])) for k in roles}))
    return out


def pick_decoder_role(scores: dict, chance: dict) -> str:
    """The rule of the module docstring, from every measured role's mean score and chance."""
    pointed = [k for k in DECODER_ROLES if k != "broad" and k in scores and not np.isnan(scores[k])]
    best = max(pointed, key=lambda k: scores[k] - chance[k])
    if scores[best] - chance[best] >= MARGIN:
        return best
    if scores.get("broad", 0.0) >= BROAD:
        return "broad"
    return best


def head_roles(attentions, tokens=None, **decoder_options) -> list:
    """``mha.analysis.head_roles``: the encoder table (:func:`mha.analysis._roles.head_roles`) for attention
    arrays and their tokens; for a decoder model (``mha.models.load``) the decoder roles against chance,
    :func:`decoder_roles` (``tokens`` then are its texts, ``decoder_options`` its keyword arguments), one
    record per query head."""
    if hasattr(attentions, "forward") and hasattr(attentions, "num_kv_heads"):
        return decoder_roles(attentions, tokens, **decoder_options).heads
    if tokens is None or decoder_options:
        raise TypeError("head_roles(attentions, tokens) needs the tokens; keyword options are for decoder models")
    return _encoder_roles(attentions, tokens)
