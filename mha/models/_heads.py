"""Heads of decoder models: ablation specs and GQA-aware pruning by weight surgery.

**Ablation** (``model.logits(ids, head_mask={layer: [heads]})``, ``model.generate(..., head_mask=...)``):
each listed query head's context is multiplied by 0 before the output projection o_proj, inside the
attention layer (the layer's ``head_mask``), so the head contributes nothing and o_proj's bias stays.
Ablating every query head of a key/value group (:func:`group_heads`) removes the group.

**Pruning** (``model.prune_heads({layer: [heads]})``) keeps ``num_heads % num_kv_heads == 0`` in every
layer: the query heads a layer keeps must leave the same number in every key/value group it keeps,
i.e. the request removes whole groups, or the same number of query heads from every group (or both:
whole groups, and an equal number from each of the rest). Any other request is refused before any
work, naming the groups and what each would keep. A key/value head goes with the last query head
reading it.

transformers' config has one head count for every layer. When layers keep different shapes, the
pruned model takes the smallest shape that holds each of them, ``num_kv_heads`` = the most groups any
layer keeps and ``num_heads / num_kv_heads`` = the most query heads per group any layer keeps; a layer
with fewer fills the rest with *dead* heads: zero query and key/value rows and zero o_proj columns,
so they add nothing (``pruned.dead_heads`` lists them). Such a layer saves no memory; prune the same
shape in every layer for a smaller model. The pruned model equals the original with the pruned heads
masked (its logits to float32 rounding).
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from .._prune import head_indices


def check_layer(layer, num_layers: int, what: str = "head_mask") -> int:
    """A 0-based layer index, checked; TypeError/ValueError naming ``what``."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"{what} must be a dict {{layer: [heads]}} with int layers, got the key {layer!r} "
                        f"({type(layer).__name__})")
    if not 0 <= layer < num_layers:
        raise ValueError(f"{what}: layer {layer} is out of range; the model has {num_layers} layers, 0 to "
                         f"{num_layers - 1}")
    return int(layer)


def head_spec(spec, num_layers: int, num_heads: int, what: str = "head_mask") -> dict:
    """``{layer: sorted query heads}`` from ``{layer: [heads]}`` (0-based), every index checked."""
    if not isinstance(spec, dict):
        raise TypeError(f"{what} must be a dict {{layer: [query heads]}}, got {type(spec).__name__}")
    out = {}
    for layer, heads in spec.items():
        layer = check_layer(layer, num_layers, what)
        hs = sorted(set(head_indices(heads, f"{what}[{layer}]")))
        bad = [h for h in hs if not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"{what}[{layer}]: head {bad[0]} is out of range; each layer has {num_heads} query heads, "
                             f"0 to {num_heads - 1}")
        if hs:
            out[layer] = hs
    return out


def multipliers(model, head_mask) -> dict | None:
    """``{layer: (H,) float32}`` multipliers (0 at the ablated heads) from ``{layer: [heads]}``; None
    for None or an empty spec."""
    if head_mask is None:
        return None
    spec = head_spec(head_mask, model.num_layers, model.num_heads)
    out = {}
    for layer, heads in spec.items():
        m = np.ones(model.num_heads, np.float32)
        m[heads] = 0.0
        out[layer] = m
    return out or None


def group_heads(model, kv_head: int) -> list:
    """The query heads reading key/value head ``kv_head`` (one group of grouped-query attention)."""
    Hkv = model.num_kv_heads
    if isinstance(kv_head, bool) or not isinstance(kv_head, numbers.Integral) or not 0 <= kv_head < Hkv:
        raise ValueError(f"kv_head must be an int from 0 to {Hkv - 1} ({model.name} has {Hkv} key/value heads per "
                         f"layer), got {kv_head!r}")
    G = model.num_heads // Hkv
    return list(range(kv_head * G, (kv_head + 1) * G))


def plan(spec: dict, num_layers: int, H: int, Hkv: int) -> tuple[int, int, dict]:
    """(new H, new Hkv, {layer: [(kv head, [query heads]) kept, in order]}) of a checked pruning spec;
    ValueError when a layer would keep unequal groups (module docstring) or no head."""
    G = H // Hkv
    kept = {}
    for layer in range(num_layers):
        drop = set(spec.get(layer, ()))
        groups = [(g, [h for h in range(g * G, (g + 1) * G) if h not in drop]) for g in range(Hkv)]
        live = [(g, hs) for g, hs in groups if hs]
        if not live:
            raise ValueError(f"heads[{layer}]: cannot prune all {H} query heads of layer {layer}; keep at least one")
        sizes = {len(hs) for _, hs in live}
        if len(sizes) > 1:
            counts = ", ".join(f"group {g} (heads {g * G}-{g * G + G - 1}) keeps {len(hs)}" for g, hs in groups)
            raise ValueError(
                f"heads[{layer}]: removing heads {sorted(drop)} breaks grouped-query attention (num_heads % "
                f"num_kv_heads == 0): {counts}. Remove whole key/value groups, or the same number of query heads "
                f"from every group kept")
        kept[layer] = live
    new_kv = max(len(v) for v in kept.values())
    per_group = max(len(v[0][1]) for v in kept.values())
    return new_kv * per_group, new_kv, kept


def pruned_config(config, heads) -> tuple:
    """(the pruned model's DecoderConfig, {layer: [(kv head, [query heads]) kept]}) of a pruning request
    ``{layer: [query heads]}``, every check made (module docstring) from the config alone."""
    if not isinstance(heads, dict):
        raise TypeError(f"heads must be a dict {{layer: [query heads]}}, got {type(heads).__name__}")
    spec = head_spec(heads, config.num_layers, config.num_heads, "heads")
    if not spec:
        raise ValueError(f"heads names no head to prune (got {heads!r}); give {{layer: [query heads]}}")
    H, Hkv, kept = plan(spec, config.num_layers, config.num_heads, config.num_kv_heads)
    return dataclasses.replace(config, num_heads=H, num_kv_heads=Hkv), kept


def prune(model, heads):
    """A new :class:`DecoderModel` without ``{layer: [query heads]}`` (module docstring); the original
    is left unchanged."""
    c = model.config
    config, kept = pruned_config(c, heads)
    H, Hkv = config.num_heads, config.num_kv_heads
    w = model.canonical_weights()
    D, G = c.head_dim, H // Hkv
    head_map = {}
    for layer, live in kept.items():
        qs = [None] * H  # original query head of each new head (None: dead)
        kvs = [None] * Hkv
        for s, (g, hs) in enumerate(live):
            kvs[s] = g
            qs[s * G:s * G + len(hs)] = hs
        _surgery(w, f"{layer}.attn.", qs, kvs, D)
        head_map[layer] = qs
    new = type(model)(config, w, model.tokenizer, backend=model.backend, dtype=model.dtype,
                      name=f"{model.name}-pruned")
    new.source = getattr(model, "source", None)
    prior = getattr(model, "head_map", None)
    new.head_map = {la: [None if q is None else (q if prior is None else prior[la][q]) for q in qs]
                    for la, qs in head_map.items()}
    new.dead_heads = {la: [i for i, q in enumerate(qs) if q is None] for la, qs in new.head_map.items()
                      if None in qs}
    return new


def _surgery(w: dict, p: str, qs: list, kvs: list, D: int) -> None:
    """Layer weights with prefix ``p`` rebuilt in place for new query heads ``qs`` and key/value heads
    ``kvs`` (original indices, None = a dead head: zero rows and zero o_proj columns)."""
    def rows(a, idx):  # (n * D, ...) blocks of D rows in the order idx, zeros for None
        return np.concatenate([a[i * D:(i + 1) * D] if i is not None else np.zeros_like(a[:D]) for i in idx])

    for n, idx in (("q", qs), ("k", kvs), ("v", kvs)):
        w[p + f"{n}.w"] = rows(w[p + f"{n}.w"], idx)
        if p + f"{n}.b" in w:
            w[p + f"{n}.b"] = rows(w[p + f"{n}.b"], idx)
    o = w[p + "o.w"]  # (E, H * D)
    w[p + "o.w"] = np.ascontiguousarray(rows(np.ascontiguousarray(o.T), qs).T)
    if p + "sinks" in w:
        w[p + "sinks"] = np.array([w[p + "sinks"][q] if q is not None else 0.0 for q in qs], np.float32)
