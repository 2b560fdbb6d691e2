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
- compute floor of the prefill: its FLOPs (:func:`prefill_flops`; also the least that the last position's
  logits need) at the best GFLOP/s of a float32 matrix product of the MLP's shape (2048 x 512 by
  512 x 2816) on the same threads.

    python benchmarks/decoders.py --rounds 5          # prints a table and writes --json if given
    python benchmarks/decoders.py --stages --baseline /tmp/main-src   # + each stage of a step; + another tree
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


def run_ours(folder: str, prompt: int, new: int, prefill: int, threads: int, stages: bool = False) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_limits

    import mha.models as mm
    import mha_cpu

    # decode steps on the same BLAS threads as the rest (issue 27 measures at 2 threads); the library's default
    # for a decode step is mha_cpu.options.step_blas_threads = 1 (docs/performance.md, "Threads")
    step = {"step_blas_threads": threads} if "step_blas_threads" in mha_cpu.options._spec else {}  # (older trees)
    with threadpool_limits(threads), mha_cpu.options.override(**step):
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
        if stages:  # the layers' calls at the step's BLAS threads, as in a step of model.forward
            with mha_cpu.options.override(blas_threads=threads):
                out["stages"] = stage_times(model, p, new)
    return out


def stage_times(model, prompt, new: int) -> dict:
    """Median milliseconds per decode step of each stage of a Llama-shaped model's step, the step rebuilt
    from the model's parts with a clock around each (after a prefill of ``prompt``; ``new`` steps): the
    embedding, the norms, the attention layer calls (projections, RoPE, cache, core, output projection),
    the MLPs' matrix-vector products and SiLU, the residual adds, the LM head and the argmax. It reads the
    model's parts (private attributes: a measurement of this project, kept beside the model's forward)."""
    import numpy as np

    clock, F = time.perf_counter, model.config.intermediate_size
    caches = [layer.init_cache(1, len(prompt) + new) for layer in model.layers]
    logits, _, _ = model.forward(prompt[None], caches=caches, last_only=True)
    tok, per_step = int(np.argmax(logits[0, -1])), []
    for _ in range(new):
        t = dict.fromkeys(("embed", "norms", "attention", "mlp_gate_up", "silu", "mlp_down", "residual", "lm_head",
                           "argmax"), 0.0)
        t0 = clock()
        x = np.take(model._embed, np.array([[tok]]), axis=0)
        t["embed"] += clock() - t0
        for attn, blk, cache in zip(model.layers, model._blocks, caches):
            t0 = clock()
            h = model._apply_norm(x, blk["norm1"])
            t1 = clock()
            a = attn(h, cache=cache, causal=True)
            t2 = clock()
            x = x + a
            t3 = clock()
            h = model._apply_norm(x, blk["norm2"])
            t4 = clock()
            g = h @ blk["in_t"]
            t5 = clock()
            g = g[..., :F] * (0.5 + 0.5 * np.tanh(0.5 * g[..., :F])) * g[..., F:]  # SiLU(gate) * up
            t6 = clock()
            m = g @ (blk["down"].T if "down" in blk else blk["down_t"])  # (older trees stored W_down^T)
            t7 = clock()
            x = x + m
            t8 = clock()
            for k, dt in (("norms", t1 - t0 + t4 - t3), ("attention", t2 - t1), ("residual", t3 - t2 + t8 - t7),
                          ("mlp_gate_up", t5 - t4), ("silu", t6 - t5), ("mlp_down", t7 - t6)):
                t[k] += dt
        t0 = clock()
        y = model._apply_norm(x, model._norm)
        t1 = clock()
        lg = y @ model._head_t
        t2 = clock()
        tok = int(np.argmax(lg[0, -1]))
        t["norms"], t["lm_head"], t["argmax"] = t["norms"] + t1 - t0, t2 - t1, clock() - t2
        t["step"] = sum(t.values())
        per_step.append(t)
    return {k: statistics.median(s[k] for s in per_step) * 1e3 for k in per_step[0]}


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
    """Read bandwidth (GB/s): the best of 30 products x (1, 512) @ W (512, 65536) float32 (128 MiB, larger
    than a last-level cache)."""
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


def prefill_flops(shape: dict, T: int, least: bool = False) -> float:
    """Multiply-adds x 2 of a prefill of T tokens: every projection and MLP product, and the causal
    attention (T (T + 1) / 2 query-key pairs, twice D per head: logits and the weighted sum); the LM head
    for the last position only. ``least``: only what the last position's logits need (the last layer's
    query and output projections, attention and MLP for that row alone, its keys and values for all)."""
    E, F, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    H, Hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    D = E // H
    per_token = E * (2 * H * D + 2 * Hkv * D) + 3 * E * F
    full = 2.0 * L * (T * per_token + 2 * H * D * T * (T + 1) / 2) + 2.0 * E * shape["vocab_size"]
    if not least:
        return full
    skipped = (T - 1) * (E * 2 * H * D + 3 * E * F) + 2 * H * D * (T * (T + 1) / 2 - T)  # the last layer's other rows
    return full - 2.0 * skipped


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
    cmd += ["--stages"] if args.stages and kind in ("ours", "baseline") else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if kind == "baseline":  # the same measures on another source tree of this project
        env["PYTHONPATH"] = os.pathsep.join([str(args.baseline)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _medians(runs: list) -> dict:
    """Per measure, the median over rounds (a dict of stages: per stage)."""
    return {m: ({k: statistics.median(r[m][k] for r in runs) for k in runs[0][m]} if isinstance(runs[0][m], dict)
                else statistics.median(r[m] for r in runs)) for m in runs[0]}


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
    ap.add_argument("--stages", action="store_true", help="also time each stage of a decode step (stage_times)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a source tree of this project (e.g. `git archive main | tar -x -C DIR`) measured as well, "
                         "interleaved in the same rounds")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        args.folder = args.folder or Path(f"/tmp/mha-bench-{args.shape}")
        if args.child == "bandwidth":
            res = run_bandwidth(args.threads)
        elif args.child == "transformers":
            res = run_transformers(str(args.folder), args.prompt, args.new, args.prefill, args.threads)
        else:
            res = run_ours(str(args.folder), args.prompt, args.new, args.prefill, args.threads, args.stages)
        print(json.dumps(res))
        return
    args.folder = args.folder or Path(f"/tmp/mha-bench-{args.shape}")
    build(args.folder, args.shape)
    kinds = ("ours", "transformers", "bandwidth") + (("baseline",) if args.baseline else ())
    rounds = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in rounds:
            rounds[kind].append(_child(kind, args))
    _report({k: _medians(v) for k, v in rounds.items()}, rounds, args)


def _report(med: dict, rounds: dict, args) -> None:
    """Print the table's figures (and write --json)."""
    floor = weight_bytes(args.folder) / (med["bandwidth"]["gbps"] * 1e9) * 1e3
    compute_floor = prefill_flops(SHAPES[args.shape], args.prefill) / (med["bandwidth"]["gflops"] * 1e9) * 1e3
    least_floor = prefill_flops(SHAPES[args.shape], args.prefill, True) / (med["bandwidth"]["gflops"] * 1e9) * 1e3
    ours, theirs = med["ours"], med["transformers"]
    result = {"ours_ms_per_token": ours["decode"], "ours_attentions_ms_per_token": ours["attentions"],
              "transformers_ms_per_token": theirs["decode"], "floor_ms_per_token": floor,
              "read_gbps": med["bandwidth"]["gbps"], "speedup": theirs["decode"] / ours["decode"],
              "over_floor": ours["decode"] / floor, "attentions_cost": ours["attentions"] / ours["decode"] - 1,
              "ours_prefill_ms": ours["prefill"], "transformers_prefill_ms": theirs["prefill"],
              "prefill_ratio": ours["prefill"] / theirs["prefill"], "gemm_gflops": med["bandwidth"]["gflops"],
              "prefill_compute_floor_ms": compute_floor, "prefill_least_floor_ms": least_floor, "medians": med, "rounds": rounds, "args": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}}
    for name in ("ours", "baseline"):
        if name in med:
            m = med[name]
            print(f"decode  {name} {m['decode']:.2f} ms/token ({1e3 / m['decode']:.0f} tok/s), attentions=True "
                  f"{m['attentions']:.2f} (+{100 * (m['attentions'] / m['decode'] - 1):.0f}%); transformers "
                  f"{theirs['decode']:.2f} ms/token: {theirs['decode'] / m['decode']:.2f}x; {m['decode'] / floor:.2f}x "
                  f"the floor; prefill {m['prefill']:.0f} ms: {m['prefill'] / theirs['prefill']:.2f}x transformers'")
            if "stages" in m:
                print(f"stages  {name} (ms per step): " + ", ".join(f"{k} {v:.2f}" for k, v in m["stages"].items()))
    print(f"floor   {floor:.2f} ms/token ({weight_bytes(args.folder) / 1e6:.0f} MB at {result['read_gbps']:.1f} GB/s): "
          f"ours at {result['over_floor']:.2f}x")
    print(f"prefill {args.prefill} tokens: ours {ours['prefill']:.0f} ms, transformers {theirs['prefill']:.0f} ms: "
          f"{result['prefill_ratio']:.2f}x; compute floor {compute_floor:.0f} ms "
          f"({prefill_flops(SHAPES[args.shape], args.prefill) / 1e9:.0f} GFLOP at {result['gemm_gflops']:.0f} GFLOP/s), "
          f"{least_floor:.0f} ms for the least work the last position needs "
          f"({prefill_flops(SHAPES[args.shape], args.prefill, True) / 1e9:.0f} GFLOP)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
