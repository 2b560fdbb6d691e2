"""Port a torch.nn.MultiheadAttention layer and check the outputs match.

Run: python examples/from_torch.py   (needs torch: pip install torch)

Torch's masks are the other way round (True = blocked) and its weights are averaged over heads unless
asked otherwise; this shows the conversion.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

import mha

torch.manual_seed(0)
E, H, B, T = 32, 4, 2, 6
ref = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()

weights = mha.AttentionWeights.from_torch(ref)  # packed in_proj_weight is split into q/k/v
x = np.random.default_rng(0).normal(size=(B, T, E)).astype(np.float32)
pad = np.array([[False] * T, [False] * 4 + [True] * 2])  # torch: True = padding

for backend in mha.available_backends():
    attn = mha.MultiHeadAttention.from_weights(weights, backend=backend)
    ours, w = attn(x, key_mask=~pad, return_weights=True)  # ours: True = real key
    with torch.no_grad():
        theirs, tw = ref(*(torch.from_numpy(x),) * 3, key_padding_mask=torch.from_numpy(pad),
                         average_attn_weights=False)
    out_diff = np.abs(mha.to_numpy(ours) - theirs.numpy()).max()
    w_diff = np.abs(mha.to_numpy(w) - tw.numpy()).max()
    print(f"{backend:>5}: max |output difference| {out_diff:.2e}, max |weight difference| {w_diff:.2e}")
    assert out_diff < 1e-5 and w_diff < 1e-6

path = Path(tempfile.mkdtemp()) / "attention.safetensors"
weights.save(path)  # safetensors, written atomically; mha.AttentionWeights.load(path) reads it back
assert mha.AttentionWeights.load(path) == weights
print(f"saved and reloaded {path}")
