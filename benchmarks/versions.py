"""Two versions of the project timed in turns: alternating fresh processes, one per version per round.

    git worktree add --detach /tmp/old <commit>
    python benchmarks/versions.py /tmp/old . --shape 1,512,512,8 --rounds 8
    python benchmarks/versions.py /tmp/old . --shape 1,16384,512,8 --rounds 3 --calls 3
    python benchmarks/versions.py /tmp/old . --shape 1,300,512,8 --decode 300 --calls 200 --llama 2
    python benchmarks/versions.py /tmp/old . --shape 4,1024,512,8 --causal

Each round runs A then B (B then A on odd rounds), each a fresh Python process importing ``mha`` from its
tree (PYTHONPATH), timing ``--calls`` calls of the numpy layer after one warm-up call (median). A
machine whose speed drifts over seconds slows both alike, so the per-round ratio B/A is steadier than
two separate timings; the script prints each round, the median of the per-round ratios and the ratio
of each version's fastest round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import numpy as np
import mha
B, T, E, H = (int(a) for a in sys.argv[1].split(","))
calls, weights, decode, kv = int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
causal = sys.argv[6] == "1"
extra = dict(num_kv_heads=kv, bias=False, rope=True) if kv else {}  # the Llama-shaped layer of mha.models
layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0, **extra)
rng = np.random.default_rng(0)
if decode:
    cache = layer.init_cache(B, decode + calls + 2)
    layer(rng.standard_normal((B, decode, E), dtype=np.float32), cache=cache, causal=True)
    x = rng.standard_normal((B, 1, E), dtype=np.float32)
    run = lambda: layer(x, cache=cache, causal=True)
else:
    x = rng.standard_normal((B, T, E), dtype=np.float32)
    run = lambda: layer(x, return_weights=weights, causal=causal)
run()
times = []
for _ in range(calls):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
print(json.dumps({"file": mha.__file__, "ms": 1e3 * sorted(times)[len(times) // 2]}))
"""


def measure(tree: str, shape: str, calls: int, weights: bool, decode: int, kv: int = 0, causal: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    with tempfile.TemporaryDirectory() as cwd:  # not the repository: its own mha must not shadow the tree's
        res = subprocess.run([sys.executable, "-c", CHILD, shape, str(calls), "1" if weights else "0", str(decode),
                              str(kv), "1" if causal else "0"],
                             env=env, cwd=cwd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"{tree}: {res.stderr.strip()[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if not out["file"].startswith(os.path.abspath(tree)):
        raise SystemExit(f"{tree}: imported mha from {out['file']}")
    return out["ms"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="tree of version A (a worktree)")
    ap.add_argument("b", help="tree of version B")
    ap.add_argument("--shape", default="1,512,512,8", help="B,T,E,H")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--weights", action="store_true", help="call with return_weights=True")
    ap.add_argument("--decode", type=int, default=0, help="time one-token steps against a cache of this many")
    ap.add_argument("--llama", type=int, default=0, metavar="HKV",
                    help="the decoder models' layer instead: HKV key/value heads, RoPE, no biases")
    ap.add_argument("--causal", action="store_true", help="call with causal=True (not with --decode)")
    args = ap.parse_args(argv)
    parts = args.shape.split(",")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        ap.error(f"--shape must be four positive integers B,T,E,H, got {args.shape!r}")
    if args.causal and args.decode:
        ap.error("--causal is for whole calls; a --decode step is causal already")
    a, b, ratios = [], [], []
    for r in range(args.rounds):
        order = [(args.a, a), (args.b, b)] if r % 2 == 0 else [(args.b, b), (args.a, a)]
        for tree, times in order:
            times.append(measure(tree, args.shape, args.calls, args.weights, args.decode, args.llama, args.causal))
        ratios.append(b[-1] / a[-1])
        print(f"round {r}: A {a[-1]:.3f} ms, B {b[-1]:.3f} ms, B/A {ratios[-1]:.3f}", flush=True)
    result = {"a_ms": statistics.median(a), "b_ms": statistics.median(b), "ratio": statistics.median(ratios),
              "fastest_ratio": min(b) / min(a)}
    print(f"median B/A over rounds {result['ratio']:.3f}; fastest rounds: A {min(a):.3f} ms, B {min(b):.3f} ms, "
          f"B/A {result['fastest_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
