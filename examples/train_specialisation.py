"""Heads specialise because training makes them: a tiny attention-only model, trained with the MLX
backend on a task that needs three different relations, ends with different heads doing different jobs.

Run: python examples/train_specialisation.py         (needs MLX: pip install 'mha-twin[mlx]')

The task: random token sequences; at every position i the model must output
  (a) the previous token x[i-1],
  (b) the first token x[0],
  (c) whether x[i] already occurred earlier in the sequence.
The model: token + position embeddings, ONE causal mha_mlx.MultiHeadAttention layer (4 heads), a
residual connection and three linear read-outs. Nothing tells a head what to do. Before training, the
heads' attention is unstructured (all four alike); after it, `mha.analysis.head_roles` finds a
previous-token head and a first-token head, and the remaining heads put a far larger share of their
weight on earlier copies of the current token than before (the "earlier-same-token" column).
Seeded; about a minute on a laptop CPU. MHA_EXAMPLE_QUICK=1 runs a shortened version (used by the tests).
"""

import os
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

import mha.analysis as ma
import mha_mlx

QUICK = os.environ.get("MHA_EXAMPLE_QUICK") == "1"
VOCAB, LENGTH, DIM, HEADS = 10, 10, 48, 4
STEPS = 250 if QUICK else 1200
SEED = 0


def batch(rng, n):
    x = rng.integers(0, VOCAB, size=(n, LENGTH))
    prev = np.concatenate([np.zeros((n, 1), int), x[:, :-1]], axis=1)
    first = np.repeat(x[:, :1], LENGTH, axis=1)
    seen = np.array([[x[b, i] in x[b, :i] for i in range(LENGTH)] for b in range(n)], dtype=int)
    return x, prev, first, seen


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(LENGTH, DIM)
        self.attn = mha_mlx.MultiHeadAttention(DIM, HEADS, seed=SEED)
        self.read_prev = nn.Linear(DIM, VOCAB)
        self.read_first = nn.Linear(DIM, VOCAB)
        self.read_seen = nn.Linear(DIM, 2)

    def __call__(self, x, return_weights=False):
        h = self.tok(x) + self.pos(mx.arange(x.shape[1]))
        a, w = self.attn(h, causal=True, return_weights=True)
        h = h + a
        out = (self.read_prev(h), self.read_first(h), self.read_seen(h))
        return (out, w) if return_weights else out


def loss_fn(model, x, prev, first, seen):
    lp, lf, ls = model(x)
    ce = nn.losses.cross_entropy
    return ce(lp[:, 1:], prev[:, 1:]).mean() + ce(lf, first).mean() + ce(ls, seen).mean()


def describe(model, x):
    """Per head: head_roles' label, and the mass on earlier copies of the current token."""
    (_, _, _), w = model(mx.array(x), return_weights=True)
    w = np.array(w)  # (B, H, L, L)
    tokens = [[f"t{v}" for v in row] for row in x]
    roles = ma.head_roles([wb[None] for wb in w], tokens)
    same = np.zeros(HEADS)
    for b in range(len(x)):
        eq = (x[b][:, None] == x[b][None, :]) & np.tri(LENGTH, k=-1, dtype=bool)
        has = eq.any(1)
        if has.any():
            same += (w[b][:, has] * eq[has]).sum(-1).mean(-1) / len(x)
    return [(r.head, r.role, r.score, r.scores["previous"], r.scores["first"], same[r.head]) for r in roles]


def show(title, rows):
    print(title)
    print("  head  role        score  previous  first  earlier-same-token")
    for h, role, score, prev, first, same in rows:
        print(f"  {h:>4}  {role:<10} {score:>6.2f}  {prev:>8.2f}  {first:>5.2f}  {same:>18.2f}")


def main():
    mx.random.seed(SEED)
    rng = np.random.default_rng(SEED)
    model = Tiny()
    mx.eval(model.parameters())
    probe = batch(np.random.default_rng(1), 64)[0]
    before = describe(model, probe)
    show("before training:", before)
    opt = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, loss_fn)
    t0 = time.perf_counter()
    for i in range(STEPS):
        x, prev, first, seen = (mx.array(a) for a in batch(rng, 128))
        loss, grads = step(model, x, prev, first, seen)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if i % 200 == 0 or i == STEPS - 1:
            print(f"step {i:>4}  loss {float(loss):.3f}")
    x, prev, first, seen = batch(np.random.default_rng(2), 256)
    lp, lf, ls = (np.array(a) for a in model(mx.array(x)))
    acc = (lp[:, 1:].argmax(-1) == prev[:, 1:]).mean(), (lf.argmax(-1) == first).mean(), (ls.argmax(-1) == seen).mean()
    print(f"trained {STEPS} steps in {time.perf_counter() - t0:.0f} s; accuracy: previous {acc[0]:.2f}, "
          f"first {acc[1]:.2f}, seen-before {acc[2]:.2f}")
    after = describe(model, probe)
    show("after training:", after)
    roles = {r[1] for r in after}
    print("roles after training:", ", ".join(sorted(roles)))
    assert {"previous", "first"} <= roles, "expected a previous-token head and a first-token head"
    assert len({r[1] for r in before}) == 1, "before training the heads should look alike"
    return before, after


if __name__ == "__main__":
    main()
