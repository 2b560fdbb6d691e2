"""Paired A/B of two settings of the numpy fast path, in one process, alternating call by call.

    python benchmarks/paired.py --a '{"block_q": 64}' --b '{}'                    # T=512, 100 pairs
    python benchmarks/paired.py --shape 1,4096,512,8 --pairs 8 --a '{"scratch_bytes": 0}' --b '{}'
    python benchmarks/paired.py --weights --a '{"threads": 1}' --b '{}'

A and B are JSON objects of `mha_cpu.options` fields. Alternating A, B, B, A, ... in one process makes a
machine whose speed drifts over seconds slow both alike, so the paired difference is steadier than two
separate timings (the figures in the README's speed section that say "paired" come from this).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import mha
import mha_cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,512,512,8", help="B,T,E,H")
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--a", default="{}", help="JSON: mha_cpu.options fields for A")
    ap.add_argument("--b", default="{}", help="JSON: mha_cpu.options fields for B")
    ap.add_argument("--weights", action="store_true", help="call with return_weights=True")
    args = ap.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 4 or min(shape) < 1:
        ap.error(f"--shape must be four positive integers B,T,E,H, got {args.shape!r}")
    fields = set(mha_cpu.Options.__slots__)
    settings = []
    for name in ("a", "b"):
        try:
            opts = json.loads(getattr(args, name))
        except json.JSONDecodeError as err:
            ap.error(f"--{name} must be a JSON object, got {getattr(args, name)!r} ({err})")
        if not isinstance(opts, dict) or set(opts) - fields:
            ap.error(f"--{name} must be a JSON object of mha_cpu.options fields ({', '.join(sorted(fields))}), "
                     f"got {getattr(args, name)!r}")
        probe = mha_cpu.Options()
        try:
            for k, v in opts.items():
                setattr(probe, k, v)
        except (TypeError, ValueError) as err:
            ap.error(f"--{name}: {err}")
        settings.append(opts)
    B, T, E, H = shape
    x = np.random.default_rng(0).standard_normal((B, T, E), dtype=np.float32)
    layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
    times = ([], [])

    def run(i):
        with mha_cpu.options.override(**settings[i]):
            t = time.perf_counter()
            layer(x, return_weights=args.weights)
            times[i].append(time.perf_counter() - t)

    for p in range(args.pairs + 1):  # the first pair warms up
        for i in ((0, 1) if p % 2 == 0 else (1, 0)):
            run(i)
    a, b = (np.array(t[1:]) * 1e3 for t in times)
    d = b - a
    print(f"A {np.median(a):.3f} ms, B {np.median(b):.3f} ms; B - A paired median {np.median(d):+.3f} ms "
          f"(quartiles {np.percentile(d, 25):+.3f} .. {np.percentile(d, 75):+.3f}); B/A {np.median(b) / np.median(a):.3f}")
    return {"a_ms": float(np.median(a)), "b_ms": float(np.median(b)), "ratio": float(np.median(b) / np.median(a))}


if __name__ == "__main__":
    main()
