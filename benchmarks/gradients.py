"""Forward + backward: numpy's mha.vjp against torch autograd through nn.MultiheadAttention, same machine.

    python benchmarks/gradients.py                          # 1x512 and 4x1024, E=512, H=8, 2 threads each
    python benchmarks/gradients.py --shapes 1,512 --rounds 5 --json out.json

One training step's attention: the output for x (B, T, E) (self-attention, causal or not) and the
gradients of <dy, y> for x and every weight. torch: ``nn.MultiheadAttention(batch_first=True)`` in
training mode with dropout 0 and need_weights=False (its fused SDPA path, forward and backward), x with
requires_grad, ``y.backward(dy)``. numpy: ``out, pull = mha.vjp(layer, x); pull(dy)``. Both run in one
process, interleaved round by round (numpy, torch, torch, numpy, ...), each limited to ``--threads``
(torch.set_num_threads; numpy's workers and BLAS as mha_cpu.options.threads); the medians are compared.
Memory: tracemalloc's peak (numpy's allocations are traced) of the numpy forward alone (``layer(x)``)
and of forward + backward.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc

import numpy as np


def _numpy_step(layer, x, dy, causal):
    import mha

    _, pull = mha.vjp(layer, x, causal=causal)
    return pull(dy)


def _torch_step(module, x, dy, causal, torch):
    xt = torch.from_numpy(x).requires_grad_(True)
    T = x.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    y, _ = module(xt, xt, xt, need_weights=False, attn_mask=mask, is_causal=causal)
    y.backward(torch.from_numpy(dy))
    return xt.grad


def peak_bytes(fn, *args) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run(B: int, T: int, E: int, H: int, rounds: int, threads: int, causal: bool) -> dict:
    import torch

    import mha
    import mha_cpu

    torch.set_num_threads(threads)
    mha_cpu.options.threads = threads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, E), dtype=np.float32)
    dy = rng.standard_normal((B, T, E), dtype=np.float32)
    layer = mha.MultiHeadAttention(E, H, backend="numpy", seed=0)
    module = torch.nn.MultiheadAttention(E, H, batch_first=True)
    module.train()
    w = layer.weights
    with torch.no_grad():
        module.in_proj_weight.copy_(torch.from_numpy(np.concatenate([w.q_weight, w.k_weight, w.v_weight])))
        module.in_proj_bias.copy_(torch.from_numpy(np.concatenate([w.q_bias, w.k_bias, w.v_bias])))
        module.out_proj.weight.copy_(torch.from_numpy(w.o_weight))
        module.out_proj.bias.copy_(torch.from_numpy(w.o_bias))
    g_np = _numpy_step(layer, x, dy, causal)  # warm-up, and the two agree
    g_t = _torch_step(module, x, dy, causal, torch).numpy()
    agree = float(np.abs(mha.to_numpy(g_np.query) - g_t).max() / np.abs(g_t).max())
    times = {"numpy": [], "torch": []}
    for r in range(rounds):
        for name in (("numpy", "torch") if r % 2 == 0 else ("torch", "numpy")):
            t0 = time.perf_counter()
            if name == "numpy":
                _numpy_step(layer, x, dy, causal)
            else:
                module.zero_grad(set_to_none=True)
                _torch_step(module, x, dy, causal, torch)
            times[name].append(time.perf_counter() - t0)
    med = {n: float(np.median(t)) for n, t in times.items()}
    fwd = peak_bytes(lambda: layer(x, causal=causal))
    both = peak_bytes(_numpy_step, layer, x, dy, causal)
    return {"B": B, "T": T, "E": E, "H": H, "causal": causal, "threads": threads, "rounds": rounds,
            "numpy_ms": 1e3 * med["numpy"], "torch_ms": 1e3 * med["torch"], "ratio": med["numpy"] / med["torch"],
            "forward_peak_mib": fwd / 2**20, "forward_backward_peak_mib": both / 2**20,
            "grad_x_agreement": agree}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1,512;4,1024", help="B,T pairs separated by ';'")
    ap.add_argument("--E", type=int, default=512)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for spec in args.shapes.split(";"):
        B, T = (int(v) for v in spec.split(","))
        row = run(B, T, args.E, args.H, args.rounds, args.threads, args.causal)
        rows.append(row)
        print(f"B={B} T={T} E={args.E} H={args.H}{' causal' if args.causal else ''}: numpy {row['numpy_ms']:.1f} ms, "
              f"torch {row['torch_ms']:.1f} ms, numpy/torch {row['ratio']:.2f}; numpy peak memory: forward "
              f"{row['forward_peak_mib']:.1f} MiB, forward+backward {row['forward_backward_peak_mib']:.1f} MiB",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "results": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
