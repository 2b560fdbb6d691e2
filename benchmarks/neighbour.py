"""How much torch in the same process slows the numpy layer, and what helps.

    python benchmarks/neighbour.py [--shape 1,512,512,8] [--repeat 30]

Each setting runs in a fresh process: the layer alone, then the layer with a torch.nn.MultiheadAttention
call before each of its calls (what a program that uses both does), under the environment variables of
the setting. torch's OpenMP threads keep spinning for a while after each call and take the cores the
layer's worker threads want. Printed: median ms of the layer's calls per setting, and the ratio to the
layer alone in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CODE = r"""
import json, sys, time
import numpy as np
B, T, E, H = map(int, sys.argv[1].split(",")); repeat = int(sys.argv[2]); mode = sys.argv[3]
import mha
x = np.random.default_rng(0).standard_normal((B, T, E), dtype=np.float32)
layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
other = lambda: None
if mode != "alone":
    import torch
    torch.set_grad_enabled(False)
    if mode == "torch-1-thread":
        torch.set_num_threads(1)
    tm = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    xt = torch.from_numpy(x)
    other = lambda: tm(xt, xt, xt, need_weights=False)
ts = []
for i in range(repeat + 3):
    other()
    t = time.perf_counter(); layer(x); dt = time.perf_counter() - t
    if i >= 3:
        ts.append(dt)
print(json.dumps(float(np.median(ts))))
"""

SETTINGS = [  # (name, mode, extra environment)
    ("layer alone", "alone", {}),
    ("after torch calls", "torch", {}),
    ("after torch calls, OMP_WAIT_POLICY=PASSIVE", "torch", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("after torch calls, torch.set_num_threads(1)", "torch-1-thread", {}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,512,512,8", help="B,T,E,H")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="settings take turns this many times")
    a = ap.parse_args(argv)
    times = {name: [] for name, _, _ in SETTINGS}
    for _ in range(a.rounds):
        for name, mode, env in SETTINGS:
            res = subprocess.run([sys.executable, "-c", CODE, a.shape, str(a.repeat), mode], capture_output=True,
                                 text=True, env={**os.environ, **env}, timeout=600)
            if res.returncode != 0:
                print(f"{name}: failed: {res.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            times[name].append(json.loads(res.stdout))
    alone = sorted(times["layer alone"])[len(times["layer alone"]) // 2]
    print(f"shape B,T,E,H = {a.shape}; median over {a.rounds} rounds x {a.repeat} calls of the layer")
    for name, ts in times.items():
        t = sorted(ts)[len(ts) // 2]
        print(f"  {name:<48} {t * 1e3:8.2f} ms  {t / alone:5.2f}x alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
