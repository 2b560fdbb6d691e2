"""Head roles as corpus statistics, against chance (after Clark et al., 2019).

Over n sentences, each head gets every role's score per sentence (:func:`role_score_array`) and its role
from the means (:func:`pick_role`). For that role it reports:

- ``score``: the mean over sentences;
- ``chance``: the same score for uniform attention over the visible keys of the same sentences (for an
  encoder every key is visible, so 1/L per key: "first" scores 1/L, "broad" 1);
- ``ci``: a 95% percentile bootstrap interval of the mean, resampling sentences (2,000 resamples, fixed
  seed, so a report is reproducible);
- ``specialised``: the interval lies wholly above chance (never for "broad", whose chance is the top of
  its scale: broad means not specialised).

Punctuation scores skip sentences without punctuation, in the score and in its chance alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ._roles import ROLES, nan_mean, pick_role, role_score_array, token_list

BOOTSTRAP = 2000


@dataclass
class CorpusRole:
    """One head over a corpus: 0-based ``layer``/``head``, ``role``, mean ``score``, ``chance``, the 95%
    bootstrap interval ``ci`` = (low, high), ``specialised`` and ``scores`` (every role's mean)."""

    layer: int
    head: int
    role: str
    score: float
    chance: float
    ci: tuple
    specialised: bool
    scores: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "role": self.role, "score": round(self.score, 4),
                "chance": round(self.chance, 4), "ci": [round(self.ci[0], 4), round(self.ci[1], 4)],
                "specialised": self.specialised, "scores": {k: round(v, 4) for k, v in self.scores.items()}}


def corpus(path=None) -> list[str]:
    """Sentences of a corpus file, one per line (blank lines and lines starting with # skipped); None ->
    the shipped corpus (mha/analysis/data/corpus.txt, 148 sentences)."""
    if path is None:
        text = resources.files("mha.analysis").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    else:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read the corpus ({err})") from None
    lines = [ln.strip() for ln in text.splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"{path or 'the corpus'}: no sentences (one per line; # starts a comment)")
    return out


def _bootstrap(x: np.ndarray, rng, resamples: int) -> np.ndarray:
    """(2, K): 2.5th and 97.5th percentiles of the NaN-skipping mean of x (n, K) over sentences drawn
    with replacement; each resample is a count per sentence (multinomial), so no (R, n, K) array."""
    n = x.shape[0]
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # (R, n)
    valid = ~np.isnan(x)  # (n, K)
    sums, kept = counts @ np.where(valid, x, 0.0), counts @ valid  # (R, K) each
    means = np.divide(sums, kept, out=np.zeros_like(sums), where=kept > 0)  # (R, K)
    return np.percentile(means, [2.5, 97.5], axis=0)


def corpus_roles(attentions, tokens, *, resamples: int = BOOTSTRAP, seed: int = 0) -> list[CorpusRole]:
    """Label every head over a corpus, with chance and a bootstrap interval (see the module docstring).

    Args:
        attentions: one (layers, heads, L_s, L_s) array per sentence.
        tokens: one token list per sentence.
        resamples: bootstrap resamples; seed: their generator's seed.

    Returns:
        one :class:`CorpusRole` per (layer, head), in order.
    """
    atts = [np.asarray(a) for a in attentions]
    toks = [token_list(t, f"tokens[{i}]") for i, t in enumerate(tokens)]
    if len(atts) != len(toks) or len(atts) < 2:
        raise ValueError(f"need at least 2 sentences and one token list per attention array, got {len(atts)} "
                         f"arrays and {len(toks)} lists")
    for i, (a, t) in enumerate(zip(atts, toks)):
        if a.ndim != 4 or a.shape[-1] != a.shape[-2] or a.shape[-1] != len(t) or a.shape[:2] != atts[0].shape[:2]:
            raise ValueError(f"attentions must each be (layers, heads, L, L) with L = len(tokens) and the same "
                             f"(layers, heads), got {a.shape} for {len(t)} tokens (sentence {i})")
        if not t:
            raise ValueError(f"sentence {i} has 0 tokens: no attention to score; give at least one token")
    layers, heads = atts[0].shape[:2]
    per = np.stack([role_score_array(a, t) for a, t in zip(atts, toks)])  # (n, layers, heads, 8)
    uniform = np.stack([role_score_array(np.full((len(t), len(t)), 1.0 / len(t)), t) for t in toks])  # (n, 8)
    means = nan_mean(per)  # (layers, heads, 8)
    roles = [[pick_role(dict(zip(ROLES, means[la, h]))) for h in range(heads)] for la in range(layers)]
    which = np.array([[ROLES.index(r) for r in row] for row in roles])  # (layers, heads)
    chosen = np.take_along_axis(per, which[None, :, :, None], -1)[..., 0].reshape(len(atts), -1)  # (n, K)
    low, high = _bootstrap(chosen, np.random.default_rng(seed), resamples)  # (K,) each
    chance_all = nan_mean(uniform)  # (8,)
    out = []
    for k in range(layers * heads):
        la, h = divmod(k, heads)
        role = roles[la][h]
        chance = float(chance_all[ROLES.index(role)])
        out.append(CorpusRole(la, h, role, float(means[la, h, ROLES.index(role)]), chance,
                              (float(low[k]), float(high[k])), role != "broad" and float(low[k]) > chance,
                              {r: float(v) for r, v in zip(ROLES, means[la, h])}))
    return out
