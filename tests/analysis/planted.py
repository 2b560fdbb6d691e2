"""A hand-built two-layer attention-only decoder (the project's mha_attn_only family, seam.md) whose heads
are planted: what each attends to is set by its weights, so the role table has a known answer.

Residual stream (E = 2V + P): [token one-hot (V) | position one-hot (P) | previous token (V)].
Heads (H 4, Hkv 2, so heads 0-1 read key/value head 0 and heads 2-3 key/value head 1; D 32):

- layer 0 head 0, previous: query position i matches key position j when j + 1 == i; its value, the
  key's token, is written into the previous-token slot;
- layer 0 head 1, uniform: zero query weights (logits all 0, exactly uniform over the visible keys);
- layer 0 head 2, duplicate: query [token_i; -position_i] against key [token_j; position_j]: an earlier
  copy of its own token, never itself;
- layer 1 head 0, first: a constant query against the key "position 0";
- layer 1 head 2, induction: query token t against the key's previous-token slot: the position after
  an earlier copy of t (Olsson et al.'s pattern, made of layer 0's previous-token head);
- the rest (layer 0 head 3, layer 1 heads 1 and 3) small random weights (std 0.1: near uniform).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mha import _io

PLANTED = {(0, 0): "previous", (0, 2): "duplicate", (1, 0): "first", (1, 2): "induction"}
UNIFORM = {(0, 1)}
RANDOM = {(0, 3), (1, 1), (1, 3)}
V, P, H, HKV, D = 13, 16, 4, 2, 32


def planted_decoder(folder, *, c: float = 60.0, small: float = 0.1, seed: int = 0) -> Path:
    """Write the planted model (module docstring) to ``folder``; ``c``: the planted logits' strength."""
    rng = np.random.default_rng(seed)
    E = 2 * V + P
    tok, pos, prev = slice(0, V), slice(V, V + P), slice(V + P, E)
    emb, pe = np.zeros((V, E)), np.zeros((P, E))
    emb[:, tok], pe[:, pos] = np.eye(V), np.eye(P)
    w = {"embed_tokens.weight": emb, "embed_positions.weight": pe, "lm_head.weight": rng.normal(0, 1, (V, E))}
    rand = lambda *shape: rng.normal(0, small, shape)  # noqa: E731
    for layer in range(2):
        q, k, v, o = rand(H * D, E), rand(HKV * D, E), rand(HKV * D, E), rand(E, H * D)
        head = lambda a, h: a[h * D:(h + 1) * D]  # noqa: E731 (a view of head h's D rows)
        if layer == 0:
            for a, h in ((q, 0), (q, 1), (q, 2), (k, 0), (k, 1), (v, 0)):
                head(a, h)[:] = 0
            head(q, 0)[:P, pos] = c * np.eye(P)
            head(k, 0)[1:P, pos] = np.eye(P)[:P - 1]  # key j -> e_{j+1}
            head(v, 0)[:V, tok] = np.eye(V)
            o[:, :D] = 0
            o[prev, :V] = np.eye(V)  # head 0 writes the previous token
            head(q, 2)[:V, tok] = c * np.eye(V)
            head(q, 2)[V:V + P, pos] = -c * np.eye(P)
            head(k, 1)[:V, tok] = np.eye(V)
            head(k, 1)[V:V + P, pos] = np.eye(P)
        else:
            for a, h in ((q, 0), (q, 2), (k, 0), (k, 1)):
                head(a, h)[:] = 0
            head(q, 0)[0, tok] = c  # a constant (the token one-hot sums to 1) ...
            head(k, 0)[0, V] = 1.0  # ... against "position 0"
            head(q, 2)[:V, tok] = c * np.eye(V)
            head(k, 1)[:V, prev] = np.eye(V)
        w.update({f"layers.{layer}.self_attn.{n}_proj.weight": a for n, a in zip("qkvo", (q, k, v, o))})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "mha_attn_only", "vocab_size": V, "hidden_size": E, "num_hidden_layers": 2,
              "num_attention_heads": H, "num_key_value_heads": HKV, "head_dim": D, "max_position_embeddings": P,
              "attention_bias": False, "positions": "learned", "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    _io.save_safetensors(folder / "model.safetensors", {k: a.astype(np.float32) for k, a in w.items()})
    return folder
