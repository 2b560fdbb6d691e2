"""Greedy generation with a tiny language model built from mha layers, on both backends, with a KV cache.

Run: python examples/generate.py        (needs MLX for the training step: pip install 'mha-twin[mlx]')

The model: character embeddings (tied with the read-out), two pre-norm decoder blocks, each an
mha.MultiHeadAttention with grouped-query heads (4 query heads, 2 key/value heads), rotary positions
(`rope=True`) and a sliding window of 24 characters (`window=24`), then a SiLU MLP. It is trained for a
few seconds with the MLX backend (mx.grad through mha_mlx) to continue a short text, then copied to the
numpy backend (`layer.to("numpy")`) and made to write on both backends, three ways:

  - with a cache: a prefill of the prompt, then one token per step (`layer(x_new, cache=c, causal=True)`);
    the windowed layers' caches rotate, holding 23 positions whatever the length;
  - without a cache: the whole causal pass again at every step (what a cache saves);
  - and the assertion that both give the same tokens, on each backend.

It prints the text and tokens/second per backend and mode. The forward pass is written once against
the array namespace (numpy or mlx.core), like mha's own reference. MHA_EXAMPLE_QUICK=1: fewer steps.
"""

import os
import textwrap
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

import mha

QUICK = os.environ.get("MHA_EXAMPLE_QUICK") == "1"
TEXT = "the cat sat on the mat. the dog lay on the rug. "
CHARS = sorted(set(TEXT))
VOCAB, DIM, HEADS, KV_HEADS, LAYERS, WINDOW, CONTEXT = len(CHARS), 48, 4, 2, 2, 24, 40
STEPS = 150 if QUICK else 400
NEW_TOKENS = 100 if QUICK else 300


def encode(s):
    return np.array([CHARS.index(c) for c in s])


def decode(ids):
    return "".join(CHARS[int(i)] for i in ids)


def rms_norm(xp, x, gain):
    return x * (1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-5)) * gain


def forward(xp, m, tokens, caches=None):
    """Logits (B, T, VOCAB) of tokens (B, T); ``caches``: one KVCache per layer, or None (a full pass)."""
    x = m.emb[tokens]  # (B, T, DIM)
    for i, (attn, blk) in enumerate(zip(m.attn, m.blocks)):
        h = rms_norm(xp, x, blk["n1"])
        x = x + attn(h, causal=True, cache=None if caches is None else caches[i])
        h = rms_norm(xp, x, blk["n2"]) @ blk["w1"].T
        x = x + (h / (1.0 + xp.exp(-h))) @ blk["w2"].T  # SiLU MLP
    return rms_norm(xp, x, m.nf) @ m.emb.T


class TinyLM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)

        def w(o, i):
            return mx.array((rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32))

        self.emb = w(VOCAB, DIM)
        self.attn = [mha.MultiHeadAttention(DIM, HEADS, num_kv_heads=KV_HEADS, rope=True, window=WINDOW,
                                            backend="mlx", seed=seed + i) for i in range(LAYERS)]
        self.blocks = [{"n1": mx.ones(DIM), "n2": mx.ones(DIM), "w1": w(4 * DIM, DIM), "w2": w(DIM, 4 * DIM)}
                       for _ in range(LAYERS)]
        self.nf = mx.ones(DIM)

    def __call__(self, tokens):
        return forward(mx, self, tokens)


class NumpyLM:
    """The same model on the numpy backend: its arrays copied, its attention layers moved with .to()."""

    def __init__(self, m: TinyLM):
        self.emb, self.nf = np.array(m.emb), np.array(m.nf)
        self.blocks = [{k: np.array(v) for k, v in b.items()} for b in m.blocks]
        self.attn = [a.to("numpy") for a in m.attn]


def train(model):
    data = encode(TEXT * 8)
    rng = np.random.default_rng(1)
    opt = optim.AdamW(learning_rate=3e-3)

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    step = nn.value_and_grad(model, loss_fn)
    for i in range(STEPS):
        starts = rng.integers(0, len(data) - CONTEXT - 1, size=16)
        x = np.stack([data[s:s + CONTEXT] for s in starts])
        y = np.stack([data[s + 1:s + CONTEXT + 1] for s in starts])
        loss, grads = step(model, mx.array(x), mx.array(y))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return float(loss)


def generate(xp, m, prompt, n, cached: bool):
    """Greedy continuation of ``prompt``: (token ids, seconds, the caches or None)."""
    ids = list(encode(prompt))
    t0 = time.perf_counter()
    caches = None
    if cached:
        caches = [a.init_cache(1) for a in m.attn]
        logits = forward(xp, m, xp.array(np.array([ids])), caches)  # prefill
        for _ in range(n):
            nxt = int(np.argmax(mha.to_numpy(logits[0, -1])))
            ids.append(nxt)
            logits = forward(xp, m, xp.array(np.array([[nxt]])), caches)
    else:
        for _ in range(n):
            logits = forward(xp, m, xp.array(np.array([ids])))
            ids.append(int(np.argmax(mha.to_numpy(logits[0, -1]))))
    return ids[len(prompt):], time.perf_counter() - t0, caches


def main():
    mx.random.seed(0)
    model = TinyLM()
    t0 = time.perf_counter()
    loss = train(model)
    print(f"trained {STEPS} steps with the MLX backend in {time.perf_counter() - t0:.1f} s, final loss {loss:.3f}")
    models = {"mlx": (mx, model), "numpy": (np, NumpyLM(model))}
    prompt = "the dog"
    texts = {}
    for name, (xp, m) in models.items():
        with_cache, t_cache, caches = generate(xp, m, prompt, NEW_TOKENS, cached=True)
        without, t_full, _ = generate(xp, m, prompt, NEW_TOKENS, cached=False)
        # the windowed layers' caches rotate: the last WINDOW positions at most, in a 2 * WINDOW buffer
        assert all(c.kept <= WINDOW and c.capacity == 2 * WINDOW for c in caches), caches
        assert with_cache == without, f"{name}: cached decoding diverged from full recomputation"
        texts[name] = decode(with_cache)
        print(f"{name:>5}: {NEW_TOKENS / t_cache:7.0f} tokens/s with a cache, {NEW_TOKENS / t_full:6.0f} tokens/s "
              f"recomputing every step ({t_full / t_cache:.1f}x)")
    print(f"\nprompt {prompt!r} -> {texts['numpy'][:70]!r}")
    same = texts["numpy"] == texts["mlx"]
    print(f"numpy and MLX wrote the same text: {same}")
    print(textwrap.fill(f"the first layer's cache after it: {caches[0]} (buffer of {caches[0].capacity} positions)",
                        100, subsequent_indent="  "))
    assert TEXT[:20] in (prompt + texts["numpy"]) * 2 or QUICK, "the model should have learned the text"


if __name__ == "__main__":
    main()
