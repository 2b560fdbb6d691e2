"""Decoder generation speed: this project's numpy backend against transformers (torch CPU, its default
attention), and against the memory-bandwidth floor.

The model is Llama-shaped with random weights (8 layers, hidden 512, 8 heads, 2 key/value heads, MLP
1408, vocab 32000; float32), saved once as a Hugging Face folder. Each measurement runs in a fresh
process, the candidates interleaved round by round; each figure is the median over rounds (within a round: see
each measure).

- decode: milliseconds per generated token: the median interval between successive tokens of N greedy
  tokens (timestamps from ``on_token``, and from a streamer for transformers), the better of two
  generations; tokens per second = 1000 / that. Medians and minima, because this machine is shared:
  a step stalled by another process must not move the figure.
- attentions: the same with ``attentions=True`` (every step's weights at absolute positions).
- prefill: one forward over a prompt of ``--prefill`` tokens into the cache (logits of the last position),
  as generation starts; the best of three.
- floor: the bytes of every weight read once per token (all but the embedding table, of which a token
  reads one row) divided by the machine's read bandwidth, measured here as the best of repeated
  matrix-vector products over a matrix larger than the last-level cache, on the same threads.
- compute floor of the prefill: its FLOPs (:func:`prefill_flops`) at the best GFLOP/s of a float32
  matrix product of the MLP's shape (2048 x 512 by 512 x 2816) on the same threads.

    python benchmarks/decoders.py --rounds 5          # prints a table and writes --json if given
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"llama-512": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096),
          "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512)}  # tiny: the script's own smoke test


def build(folder: Path, shape: str) -> Path:
    """The random Llama-shaped folder (made once; transformers' default init)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    import transformers as tr

    torch.manual_seed(0)
    tr.LlamaForCausalLM(tr.LlamaConfig(**SHAPES[shape])).save_pretrained(folder)
    return folder


def _timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _median_interval(stamps: list) -> float:
    """The median time between successive tokens, in ms (robust to a step stalled by another process)."""
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])) * 1e3


def run_ours(folder: str, prompt: int, new: int, prefill: int, threads: int) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    import mha.models as mm

    with threadpool_limits(threads):
        model = mm.load(folder, backend="numpy")
        ids = np.random.default_rng(0).integers(0, model.vocab_size, max(prompt, prefill))
        p = ids[:prompt]
        model.generate(p, 2, stop_at_eos=False)  # warm up (BLAS threads, the pool, first allocations)
        out = {}
        for att in (False, True):
            steps = []
            for _ in range(2):
                stamps = []
                model.generate(p, new, stop_at_eos=False, attentions=att,
                               on_token=lambda s, i, a: stamps.append(time.perf_counter()))
                steps.append(_median_interval(stamps))
            out["attentions" if att else "decode"] = min(steps)
        caches = lambda: [layer.init_cache(1, prefill) for layer in model.layers]  # noqa: E731
        out["prefill"] = _timed(lambda: model.forward(ids[None, :prefill], caches=caches(), last_only=True), 3) * 1e3
    return out


def run_transformers(folder: str, prompt: int, new: int, prefill: int, threads: int) -> dict:
    import torch
    import transformers as tr

    torch.set_num_threads(threads)
    model = tr.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, max(prompt, prefill)),
                        generator=torch.Generator().manual_seed(0))
    p = ids[:, :prompt]

    class Clock:  # a streamer: generate calls put() with the prompt, then with each new token
        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def gen(n):
        clock = Clock()
        model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
        return _median_interval(clock.stamps[1:])

    with torch.no_grad():
        gen(3)
        decode = min(gen(new) for _ in range(2))
        pre = _timed(lambda: model(ids[:, :prefill], logits_to_keep=1, use_cache=True), 3)
    return {"decode": decode, "prefill": pre * 1e3}


def run_bandwidth(threads: int) -> dict:
    """Read bandwidth (GB/s): the best of 30 products x (1, 512) @ W (512, 65536) float32 (128 MiB, four
    times the last-level cache of the machine measured)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    w = np.random.default_rng(0).random((512, 65536), dtype=np.float32)
    x = np.ones((1, 512), np.float32)
    a = np.random.default_rng(1).random((2048, 512), dtype=np.float32)
    b = np.random.default_rng(2).random((512, 2816), dtype=np.float32)
    with threadpool_limits(threads):
        best = _timed(lambda: x @ w, 30)
        gemm = _timed(lambda: a @ b, 10)
    return {"gbps": w.nbytes / best / 1e9, "gflops": 2 * 2048 * 512 * 2816 / gemm / 1e9}


def prefill_flops(shape: dict, T: int) -> float:
    """Multiply-adds x 2 of a prefill of T tokens: every projection and MLP product, and the causal
    attention (T (T + 1) / 2 query-key pairs, twice D per head: logits and the weighted sum); the LM head
    for the last position only."""
    E, F, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    H, Hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    D = E // H
    per_token = E * (2 * H * D + 2 * Hkv * D) + 3 * E * F
    return 2.0 * L * (T * per_token + 2 * H * D * T * (T + 1) / 2) + 2.0 * E * shape["vocab_size"]


def weight_bytes(folder: Path) -> int:
    """Bytes read per token: every tensor but the embedding table (one row of it is read), float32, from
    the safetensors header (8 bytes of length, then JSON)."""
    with open(folder / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(4 * math.prod(e["shape"]) for k, e in header.items()
               if k not in ("__metadata__", "model.embed_tokens.weight"))


def _child(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--folder", str(args.folder), "--prompt", str(args.prompt),
           "--new", str(args.new), "--prefill", str(args.prefill), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-512")
    ap.add_argument("--folder", type=Path, default=None, help="where the model is saved (default /tmp/mha-bench-SHAPE)")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        args.folder = args.folder or Path(f"/tmp/mha-bench-{args.shape}")
        fn = {"ours": run_ours, "transformers": run_transformers}.get(args.child)
        res = run_bandwidth(args.threads) if fn is None else fn(str(args.folder), args.prompt, args.new, args.prefill,
                                                                 args.threads)
        print(json.dumps(res))
        return
    args.folder = args.folder or Path(f"/tmp/mha-bench-{args.shape}")
    build(args.folder, args.shape)
    rounds = {k: [] for k in ("ours", "transformers", "bandwidth")}
    for _ in range(args.rounds):
        for kind in rounds:
            rounds[kind].append(_child(kind, args))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rounds.items()}
    floor = weight_bytes(args.folder) / (med["bandwidth"]["gbps"] * 1e9) * 1e3
    compute_floor = prefill_flops(SHAPES[args.shape], args.prefill) / (med["bandwidth"]["gflops"] * 1e9) * 1e3
    ours, theirs = med["ours"], med["transformers"]
    result = {"ours_ms_per_token": ours["decode"], "ours_attentions_ms_per_token": ours["attentions"],
              "transformers_ms_per_token": theirs["decode"], "floor_ms_per_token": floor,
              "read_gbps": med["bandwidth"]["gbps"], "speedup": theirs["decode"] / ours["decode"],
              "over_floor": ours["decode"] / floor, "attentions_cost": ours["attentions"] / ours["decode"] - 1,
              "ours_prefill_ms": ours["prefill"], "transformers_prefill_ms": theirs["prefill"],
              "prefill_ratio": ours["prefill"] / theirs["prefill"], "gemm_gflops": med["bandwidth"]["gflops"],
              "prefill_compute_floor_ms": compute_floor, "rounds": rounds, "args": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}}
    print(f"decode  ours {ours['decode']:.2f} ms/token ({1e3 / ours['decode']:.0f} tok/s), attentions=True "
          f"{ours['attentions']:.2f} (+{100 * result['attentions_cost']:.0f}%); transformers {theirs['decode']:.2f} "
          f"ms/token: {result['speedup']:.2f}x")
    print(f"floor   {floor:.2f} ms/token ({weight_bytes(args.folder) / 1e6:.0f} MB at {result['read_gbps']:.1f} GB/s): "
          f"ours at {result['over_floor']:.2f}x")
    print(f"prefill {args.prefill} tokens: ours {ours['prefill']:.0f} ms, transformers {theirs['prefill']:.0f} ms: "
          f"{result['prefill_ratio']:.2f}x; compute floor {compute_floor:.0f} ms "
          f"({prefill_flops(SHAPES[args.shape], args.prefill) / 1e9:.0f} GFLOP at {result['gemm_gflops']:.0f} GFLOP/s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
