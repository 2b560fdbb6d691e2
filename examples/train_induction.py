"""An induction head forms while you watch: a two-layer attention-only decoder trained on numpy alone.

Run:  python examples/train_induction.py                     (about 3000 steps; minutes on 2 cores)
      python examples/train_induction.py --backend mlx       (the same training through the MLX layer)
      python examples/train_induction.py --out mha/models/data/induction --plot docs/induction.png
                                                              (how the shipped "induction" model was made)

The task: sequences of random tokens in which a random stretch (4 to 24 tokens, anywhere) is repeated
right after itself; the loss is the next-token cross-entropy on the repeat, where the next token can be
read off the first occurrence. Lengths and places vary, so no fixed offset solves it: the model must find
"the token after the previous occurrence of the current token", the induction mechanism of Olsson et
al. (2022): a previous-token head in layer 0 writes each token's predecessor into its position, and a
layer-1 head matches the current token against it (K-composition).

The model: the project's ``mha_attn_only`` family (mha.training.AttnOnlyDecoder): token and learned
position embeddings, two layers of mha.MultiHeadAttention (4 heads, causal) on a residual stream, an
unembedding; no MLP, no norm. Gradients by ``mha.vjp`` (numpy: analytic), Adam with weight decay and
gradient clipping (mha.training.Adam). Every ``--eval-every`` steps the induction score of each head
(mha.analysis.induction_scores: attention from the second occurrence of a token to the token after its
first, on fresh repeated random sequences) is measured; the plot shows the loss and the scores.
Seeded. MHA_EXAMPLE_QUICK=1 trains a few steps only (the tests run it so).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import numpy as np

import mha.analysis as ma
from mha.training import Adam, AttnOnlyDecoder

QUICK = os.environ.get("MHA_EXAMPLE_QUICK") == "1"
VOCAB, DIM, HEADS, LAYERS, CONTEXT = 64, 64, 4, 2, 48


def batch(rng: np.random.Generator, size: int):
    """(inputs, targets, mask), each (size, CONTEXT - 1): random tokens with a stretch repeated, the loss
    on the repeat (every position whose next token is the copy of a known one)."""
    ids = rng.integers(0, VOCAB, size=(size, CONTEXT))
    mask = np.zeros((size, CONTEXT), bool)
    for b in range(size):
        n = int(rng.integers(4, CONTEXT // 2 + 1))
        s = int(rng.integers(0, CONTEXT - 2 * n + 1))
        ids[b, s + n:s + 2 * n] = ids[b, s:s + n]
        mask[b, s + n:s + 2 * n - 1] = True  # inputs n .. 2n - 2 of the stretch: their next token is a copy
    return ids[:, :-1], ids[:, 1:], mask[:, :-1]


def scores(model: AttnOnlyDecoder, probe: np.ndarray) -> np.ndarray:
    """(layers, heads) induction scores on the probe sequences (B, T)."""
    _, att = model.forward(probe, attentions=True)  # (layers, B, H, T, T)
    return ma.induction_scores(np.moveaxis(att, 1, 0), probe)


def schedule(lr: float, steps: int, warmup: int = 100):
    """Linear warm-up, then cosine decay to a tenth."""
    def at(t: int) -> float:
        if t <= warmup:
            return lr * t / warmup
        p = min(1.0, (t - warmup) / max(1, steps - warmup))
        return lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)))
    return at


def train(steps: int, batch_size: int, lr: float, seed: int, backend: str, eval_every: int, weight_decay: float = 0.0,
          log=print):
    rng = np.random.default_rng(seed)
    model = AttnOnlyDecoder.init(VOCAB, DIM, LAYERS, HEADS, CONTEXT, seed=seed, backend=backend)
    opt = Adam(schedule(lr, steps), weight_decay=weight_decay, clip_norm=1.0)
    probe = ma.repeated_tokens(64, CONTEXT // 2, VOCAB, seed=seed + 1)  # fresh: never trained on
    history = {"step": [], "loss": [], "eval_step": [], "scores": []}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y, m = batch(rng, batch_size)
        loss, grads = model.loss_and_grads(x, y, m)
        model.set_params(opt.update(model.params, grads))
        history["step"].append(step)
        history["loss"].append(loss)
        if step % eval_every == 0 or step == steps:
            s = scores(model, probe)
            history["eval_step"].append(step)
            history["scores"].append(s.tolist())
            log(f"step {step:>5}  loss {np.mean(history['loss'][-eval_every:]):.3f}  best induction score "
                f"{s.max():.3f} (layer {np.unravel_index(s.argmax(), s.shape)[0]})  {time.perf_counter() - t0:.0f} s")
    history["seconds"] = time.perf_counter() - t0
    return model, history


def plot(history: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = np.array(history["scores"])  # (evals, layers, heads)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss = np.array(history["loss"])
    k = max(1, len(loss) // 100)
    a.plot(history["step"], loss, color="0.8", lw=0.7)
    a.plot(history["step"][k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), color="C0")
    a.set(title="training loss (cross-entropy on the repeat)", xlabel="step", ylabel="nats", yscale="log")
    for layer in range(sc.shape[1]):
        for h in range(sc.shape[2]):
            b.plot(history["eval_step"], sc[:, layer, h], color=f"C{layer}", alpha=0.5 + 0.5 * (layer == 1),
                   label=f"layer {layer}" if h == 0 else None)
    b.axhline(0.9, color="0.5", ls=":", lw=1)
    b.set(title="induction score of every head", xlabel="step", ylim=(0, 1))
    b.legend()
    final = sc[-1]
    names = [f"{layer}.{h}" for layer in range(final.shape[0]) for h in range(final.shape[1])]
    c.bar(names, final.ravel(), color=[f"C{layer}" for layer in range(final.shape[0]) for _ in range(final.shape[1])])
    c.set(title="final induction score per head (layer.head)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CARD = """# induction: a two-layer attention-only decoder trained on numpy

Trained by this project's numpy backend alone (gradients from `mha.vjp`, Adam from `mha.training`) with

    {command}

Architecture: `mha_attn_only` (token + learned position embeddings, {layers} layers of causal multi-head
attention with {heads} heads of width {head_dim} on a residual stream of width {dim}, an unembedding; no MLP, no
norm, no biases), vocabulary {vocab} (token ids 0..{vocab_max}, no tokenizer), context {context}.

Data: random tokens in which a random stretch of 4 to 24 tokens is repeated right after itself; the loss
is the next-token cross-entropy on the repeat. Seed {seed}, {steps} steps of {batch} sequences, learning rate
{lr} (warm-up, cosine decay to a tenth), weight decay {wd}, gradient clipping at norm 1; {seconds:.0f} s on
{cpu}.

Induction scores (Olsson et al.: attention from the second occurrence of a token to the token after its
first occurrence, on 64 fresh sequences of 24 random tokens repeated), layer x head:

{table}

Best head: layer {best_layer}, head {best_head}, score {best:.3f}. Final training loss {loss:.3f} nats.
Load it with `mha.models.load("induction")`; see docs/training.md.
"""


def card(history: dict, args, command: str) -> str:
    final = np.array(history["scores"][-1])
    li, hi = np.unravel_index(final.argmax(), final.shape)
    table = "\n".join(f"    layer {layer}: " + "  ".join(f"{v:.3f}" for v in row) for layer, row in enumerate(final))
    return CARD.format(command=command, layers=LAYERS, heads=HEADS, head_dim=DIM // HEADS, dim=DIM, vocab=VOCAB,
                       vocab_max=VOCAB - 1, context=CONTEXT, seed=args.seed, steps=args.steps, batch=args.batch,
                       lr=args.lr, wd=args.weight_decay, seconds=history["seconds"], cpu=_cpu(), table=table, best_layer=li,
                       best_head=hi, best=final.max(), loss=float(np.mean(history["loss"][-100:])))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40 if QUICK else 3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=["numpy", "mlx"], default="numpy")
    ap.add_argument("--eval-every", type=int, default=20 if QUICK else 100)
    ap.add_argument("--out", default=None, help="save the trained model here (config.json, model.safetensors, README.md)")
    ap.add_argument("--plot", default=None, help="write the loss and induction-score figure here (PNG)")
    args = ap.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(1, user_api="blas")  # small products: BLAS's threads cost more than they give
    except ImportError:
        blas = contextlib.nullcontext()
    with blas:
        model, history = train(args.steps, args.batch, args.lr, args.seed, args.backend, args.eval_every,
                               args.weight_decay)
    final = np.array(history["scores"][-1])
    print(f"trained {args.steps} steps in {history['seconds']:.0f} s on {args.backend}; induction scores "
          f"(layer x head):\n{np.round(final, 3)}")
    if not QUICK and args.steps >= 3000 and args.backend == "numpy":
        assert final.max() >= 0.9, "expected an induction head (score >= 0.9) after the full training"
    if args.out:
        folder = model.save(args.out)
        command = "python examples/train_induction.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k not in ("out", "plot"))
        (folder / "README.md").write_text(card(history, args, command))
        print(f"saved to {folder}")
    if args.plot:
        plot(history, args.plot)
        print(f"figure: {args.plot}")
    return model, history


if __name__ == "__main__":
    main()
