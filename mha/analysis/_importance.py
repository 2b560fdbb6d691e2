"""Head importance and the pruning experiment, for the sentence-embedding models of ``mha.models``.

- Ablation importance of head (l, h): 1 - mean cosine between the sentence embeddings of the full model
  and of the model with that one head masked (``head_mask``), over a list of sentences.
- Gradient importance (Michel et al., 2019): E |dL/dg_{l,h}| for a per-head gate g (all ones) on each
  head's context, L an InfoNCE loss over paraphrase pairs (a sentence should be nearest to its own
  paraphrase), computed by MLX's autodiff through this project's attention.
- The pruning curve: prune a growing fraction of heads (in a given order) by weight surgery and compare
  the pruned model's embeddings with the full model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np


def paraphrase_pairs() -> list[tuple[str, str]]:
    """The shipped sentence set: 32 paraphrase pairs (mha/analysis/data/sentences.txt)."""
    text = resources.files("mha.analysis").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            a, b = (s.strip() for s in line.split("||"))
            pairs.append((a, b))
    return pairs


def sentences() -> list[str]:
    return [s for pair in paraphrase_pairs() for s in pair]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two vectors (ties broken by order)."""
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _heads(model) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(model.num_layers) for h in model.head_ids[layer]]


def ablation_importance(model, sents=None, *, progress=None) -> np.ndarray:
    """(layers, heads): 1 - mean cosine(full, one head masked) over ``sents``; pruned heads get NaN."""
    sents = sents or sentences()
    base = model.embed(sents)
    imp = np.full((model.num_layers, model.num_heads), np.nan)
    for layer, h in _heads(model):
        hm = np.ones((model.num_layers, model.num_heads), np.float32)
        hm[layer, h] = 0.0
        imp[layer, h] = 1.0 - float(_cosines(base, model.embed(sents, head_mask=hm)).mean())
        if progress:
            progress(1)
    return imp


def gradient_importance(model, pairs=None, *, batch_size: int = 16, temperature: float = 0.05,
                        progress=None) -> np.ndarray:
    """(layers, heads): mean over batches of |dL/dg| for per-head gates g = 1, L the InfoNCE loss of
    paraphrase pairs. Runs on MLX (the model is moved there if needed)."""
    import mlx.core as mx

    if model.backend != "mlx":
        model = model.to("mlx")
    pairs = pairs or paraphrase_pairs()
    total = np.zeros((model.num_layers, model.num_heads))
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    gates = mx.ones((model.num_layers, model.num_heads))

    for batch in batches:
        a_ids, a_mask = model.tokenizer.encode_batch([p[0] for p in batch], model.embed_max_length)
        b_ids, b_mask = model.tokenizer.encode_batch([p[1] for p in batch], model.embed_max_length)

        def loss_fn(g):
            ea = _pooled(model, a_ids, a_mask, g)
            eb = _pooled(model, b_ids, b_mask, g)
            logits = (ea @ eb.T) / temperature  # (n, n): each sentence against every paraphrase
            labels = mx.arange(len(batch))
            lse = mx.logsumexp(logits, axis=1)
            return (lse - logits[labels, labels]).mean()

        _, grad = mx.value_and_grad(loss_fn)(gates)
        total += np.abs(np.array(grad)) / len(batches)
        if progress:
            progress(1)
    for layer in range(model.num_layers):  # pruned heads have no gate
        missing = [h for h in range(model.num_heads) if h not in model.head_ids[layer]]
        total[layer, missing] = np.nan
    return total


def _pooled(model, ids, mask, gates):
    """Mean-pooled, L2-normalised embeddings as an mx.array (differentiable in ``gates``)."""
    import mlx.core as mx

    hidden, _ = model.forward(ids, mask, head_mask=gates)
    m = mx.array(mask[..., None].astype(np.float32))
    pooled = (hidden * m).sum(1) / mx.maximum(m.sum(1), 1e-9)
    return pooled / mx.linalg.norm(pooled, axis=-1, keepdims=True)


def order_by(importance: np.ndarray) -> list[tuple[int, int]]:
    """Heads from least to most important (NaN, i.e. already pruned, left out)."""
    idx = [(layer, h) for layer in range(importance.shape[0]) for h in range(importance.shape[1])
           if np.isfinite(importance[layer, h])]
    return sorted(idx, key=lambda lh: importance[lh])


@dataclass
class PruneStep:
    fraction: float
    pruned: int
    cosine: float  # mean cosine between pruned and full embeddings of the same sentence
    rank_agreement: float  # Spearman correlation of all pairwise similarities, pruned vs full
    ms_per_sentence: float
    per_layer: list = field(default_factory=list)  # heads left in each layer

    def as_dict(self) -> dict:
        return {"fraction": self.fraction, "pruned": self.pruned, "cosine": round(self.cosine, 5),
                "rank_agreement": round(self.rank_agreement, 5), "ms_per_sentence": round(self.ms_per_sentence, 3),
                "heads_left_per_layer": self.per_layer}


def _plan(model, order, count: int) -> dict:
    """The first ``count`` heads of ``order`` that leave every layer at least one head."""
    left = {layer: len(model.head_ids[layer]) for layer in range(model.num_layers)}
    spec: dict = {}
    n = 0
    for layer, h in order:
        if n == count:
            break
        if left[layer] > 1:
            spec.setdefault(layer, []).append(h)
            left[layer] -= 1
            n += 1
    return spec


def pruning_curve(model, order, fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), sents=None,
                  *, progress=None) -> list[PruneStep]:
    """Prune the first fraction of ``order`` (every layer keeps at least one head) for each fraction and
    measure how far the embeddings move from the full model's."""
    sents = sents or sentences()

    def timed_embed(m):
        m.embed(sents[:2])  # warm-up: first calls allocate and start thread pools
        t0 = time.perf_counter()
        e = m.embed(sents)
        return e, (time.perf_counter() - t0) * 1e3 / len(sents)

    full, ms_full = timed_embed(model)
    sim_full = full @ full.T
    iu = np.triu_indices(len(sents), 1)
    total = sum(len(ids) for ids in model.head_ids)
    steps = [PruneStep(0.0, 0, 1.0, 1.0, ms_full, [len(ids) for ids in model.head_ids])]
    for frac in fractions:
        spec = _plan(model, order, int(round(frac * total)))
        pruned = model.prune_heads(spec)
        emb, ms = timed_embed(pruned)
        sim = emb @ emb.T
        steps.append(PruneStep(frac, sum(len(v) for v in spec.values()), float(_cosines(full, emb).mean()),
                               spearman(sim_full[iu], sim[iu]), ms, [len(ids) for ids in pruned.head_ids]))
        if progress:
            progress(1)
    return steps
