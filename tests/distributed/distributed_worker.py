"""One rank of tests/test_distributed.py, started by ``mlx.launch``: runs many configurations in one launch.

    worker.py CONFIG.json OUTDIR

CONFIG.json holds {"cases": [...], "mode": "compare" | "die" | "hang" | "disagree" | "bad" | "minilm"}. In
"compare" mode every case builds the same layer and inputs on every rank (from its seed), runs the
unsharded layer and the sharded one (HeadParallel or SequenceParallel), and rank r writes
OUTDIR/rank{r}.npz with, per case, the unsharded output and its own sharded result; the test compares
them and the float64 oracle. The other modes exercise failures; each rank writes OUTDIR/rank{r}.json
with what happened (the error's type and message, and how long it took).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np

import mha


def make_problem(case):
    """(weights, layer kwargs, query, key, value, mask, key_mask, head_mask) of one case, from its seed."""
    rng = np.random.default_rng(case["seed"])
    E, H, Hkv, D = case["E"], case["H"], case["Hkv"], case["D"]
    kdim, vdim = case.get("kdim") or E, case.get("vdim") or E

    def w(o, i):
        return (rng.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32)

    def b(n):
        return (0.5 * rng.normal(size=n)).astype(np.float32)

    extra = {}
    if case.get("features"):  # the layer features: q/k RMSNorm weights and learned sinks (softcap below)
        extra = dict(q_norm=rng.uniform(0.5, 2, D).astype(np.float32), k_norm=rng.uniform(0.5, 2, D).astype(np.float32),
                     sinks=rng.normal(0.5, 1.0, H).astype(np.float32))
    weights = mha.AttentionWeights(w(H * D, E), w(Hkv * D, kdim), w(Hkv * D, vdim), w(E, H * D), b(H * D),
                                   b(Hkv * D), b(Hkv * D), b(E), num_heads=H, num_kv_heads=Hkv, **extra)
    B, T = case["B"], case["T"]
    S = case.get("S") or T
    x = rng.normal(size=(B, T, E)).astype(np.float32)
    cross = case.get("S") is not None
    k = rng.normal(size=(B, S, kdim)).astype(np.float32) if cross else None
    v = rng.normal(size=(B, S, vdim)).astype(np.float32) if cross else None
    mask = None
    if case.get("mask") == "bool":
        mask = rng.random((B, H, T, S)) < 0.7
        mask[0, 0, 1] = False  # a query that sees nothing: output = output bias
    elif case.get("mask") == "float":
        mask = np.where(rng.random((1, 1, T, S)) < 0.2, -np.inf, rng.normal(size=(1, 1, T, S))).astype(np.float32)
    elif case.get("mask") in ("finfo", "-1e9"):  # Hugging Face's left padding: the first keys of element 1
        fill = np.finfo(np.float32).min if case["mask"] == "finfo" else -1e9
        mask = np.zeros((B, 1, 1, S), np.float32)
        mask[-1, ..., :case.get("pad", S // 3)] = fill  # with causal, element 1's first rows see only these
    key_mask = None
    if case.get("key_mask"):
        key_mask = np.ones((B, S), bool)
        key_mask[-1, S - S // 3:] = False  # padding at the end of the last batch element
        key_mask[0, min(2, S - 1)] = False
        if case.get("key_mask") == "left":  # left padding: with causal, rows that see no key (rank 0's)
            key_mask[-1, :S // 2] = False
    head_mask = None
    if case.get("head_mask"):
        head_mask = rng.uniform(0.0, 2.0, size=(B, H) if case["head_mask"] == "BH" else (H,)).astype(np.float32)
        head_mask[..., 0] = 0.0
    kwargs = {"rope": case.get("rope"), "window": case.get("window"), "dtype": case.get("dtype", "float32")}
    if case.get("features"):
        kwargs.update(softcap=1.5, qk_norm=1e-5)
    if kwargs["dtype"] == "float64":
        x, k, v = (None if a is None else a.astype(np.float64) for a in (x, k, v))
    return weights, kwargs, x, k, v, mask, key_mask, head_mask


SENTENCES = ["The cat sat on the mat.", "A dog slept by the door all afternoon.",
             "Ring attention passes key and value blocks around the ranks.", "short"]


def minilm_case(case, group, dist):
    """MiniLM sentence embeddings: one process (numpy and MLX) and head-parallel over the group (numpy)."""
    import mha.models as mm

    single = mm.load_bert("minilm", backend="numpy")
    out = {"single": single.embed(SENTENCES)}
    if group.rank() == 0:  # a second one-process evaluation (MLX) measures float32's noise, for the tolerance
        on_mlx = single.to("mlx")
        out["single_mlx"] = on_mlx.embed(SENTENCES)
        out["single_mlx_attentions"] = on_mlx.encode(SENTENCES[0]).attentions
    hp = mm.load_bert("minilm", backend="numpy", group=group)
    out["sharded"] = hp.embed(SENTENCES)
    enc = hp.encode(SENTENCES[0])
    out["attentions"], out["single_attentions"] = enc.attentions, single.encode(SENTENCES[0]).attentions
    return out


def run_case(case, group, dist):
    """{name: array} for one case on this rank."""
    if case["kind"] == "minilm":
        return minilm_case(case, group, dist)
    weights, kwargs, x, k, v, mask, key_mask, head_mask = make_problem(case)
    layer = mha.MultiHeadAttention.from_weights(weights, backend=case["backend"], **kwargs)
    causal = bool(case.get("causal"))
    out = {}
    if case.get("decode"):
        return decode_case(case, layer, x, key_mask, group, dist)
    full = layer(x, k, v, mask=mask, key_mask=key_mask, causal=causal, head_mask=head_mask, return_lse=True)
    out["single"], out["single_lse"] = (mha.to_numpy(a) for a in full)
    if case["kind"] == "head":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hp = dist.HeadParallel(layer, group, timeout=30)
        out["uneven_warned"] = np.array(any(issubclass(c.category, dist.UnevenSplitWarning) for c in caught))
        y, wts, lse = hp(x, k, v, mask=mask, key_mask=key_mask, causal=causal, head_mask=head_mask,
                         return_weights=True, return_lse=True)
        out["sharded"] = mha.to_numpy(y)
        out["weights_rank"] = mha.to_numpy(wts)
        out["weights_all"] = mha.to_numpy(hp.gather_heads(wts))
        out["lse_all"] = mha.to_numpy(hp.gather_heads(lse))
        out["heads"] = np.array([hp.heads.start, hp.heads.stop])
        return out
    order = case.get("order", "contiguous")

    def rows(a, axis=-2):  # this rank's rows (or key columns) in the case's order
        return None if a is None else a if a.shape[axis] == 1 else dist.chunk(a, group, axis=axis, order=order)

    sp = dist.SequenceParallel(layer, group, order=order, timeout=30)
    with blocks(layer, case):
        y, lse = sp(rows(x), rows(k), rows(v), mask=rows(mask), key_mask=rows(key_mask, -1), causal=causal,
                    head_mask=head_mask, return_lse=True)
    out["sharded"], out["lse"] = mha.to_numpy(y), mha.to_numpy(lse)
    spans = dist.rank_spans(x.shape[1], group.size(), order)[group.rank()]
    out["rows"] = np.concatenate([np.arange(a, b) for a, b in spans])
    return out


def blocks(layer, case):
    """The backend's tiny blocks when the case asks (every ring step then runs the core's blockwise loop)."""
    import contextlib

    return type(layer).small_blocks(*case["blocks"]) if case.get("blocks") else contextlib.nullcontext()


def decode_case(case, layer, x, key_mask, group, dist):
    """Prefill ``case["prefill"]`` tokens, then decode the rest one token at a time, sharded and not."""
    n, r = group.size(), group.rank()
    P, T = case["prefill"], x.shape[1]
    cache = layer.init_cache(x.shape[0])
    km = None if key_mask is None else key_mask[:, :P]
    single = [mha.to_numpy(layer(x[:, :P], key_mask=km, cache=cache, causal=True))]
    single += [mha.to_numpy(layer(x[:, t:t + 1], cache=cache, causal=True)) for t in range(P, T)]
    out = {"single": np.concatenate(single, axis=1)}
    full = mha.to_numpy(layer(x, key_mask=None if km is None else np.concatenate(
        [km, np.ones((x.shape[0], T - P), bool)], axis=1), causal=True, return_lse=True)[1])
    out["max_lse"] = np.abs(full[np.isfinite(full)]).max(initial=0.0)  # for the ring's bound
    if case["kind"] == "head":
        hp = dist.HeadParallel(layer, group, timeout=30)
        c = hp.init_cache(x.shape[0])
        ys = [mha.to_numpy(hp(x[:, :P], key_mask=km, cache=c, causal=True))]
        ys += [mha.to_numpy(hp(x[:, t:t + 1], cache=c, causal=True)) for t in range(P, T)]
        out["sharded"] = np.concatenate(ys, axis=1)
        out["cache_kv_heads"] = np.array(c.num_kv_heads)
        return out
    sp = dist.SequenceParallel(layer, group, timeout=30)
    c = sp.init_cache(x.shape[0])
    sl = slice(*dist.chunk_bounds(P, n)[r])
    ys = [mha.to_numpy(sp(x[:, sl], key_mask=None if km is None else km[:, sl], cache=c, causal=True))]
    for t in range(P, T):  # the new token goes to the last rank, the others pass an empty chunk
        xt = x[:, t:t + 1] if r == n - 1 else x[:, t:t]
        ys.append(mha.to_numpy(sp(xt, cache=c, causal=True)))
    out["sharded_prefill"] = ys[0]
    out["sharded_decode"] = np.concatenate(ys[1:], axis=1)
    out["rows"] = np.arange(sl.start, sl.stop)
    out["cache_kept"] = np.array(c.kept)  # with a window: bounded by it, however long the decoding
    return out


def compare(cfg, group, dist, outdir):
    results = {}
    for i, case in enumerate(cfg["cases"]):
        for name, a in run_case(case, group, dist).items():
            results[f"{i}/{name}"] = a
    np.savez(os.path.join(outdir, f"rank{group.rank()}.npz"), **results)


def bad_input(cfg, group, dist, outdir):
    """"bad": on 3 ranks, one rank at a time passes a bad argument (a NaN in a float mask, a query of the
    wrong width, a mask over the wrong number of keys); every rank records what it raised and when, then
    a good call; last, rank 1's NaN mask again, uncaught: every process must end on its own."""
    r = group.rank()
    layer = mha.MultiHeadAttention(12, 4, backend=cfg.get("backend", "numpy"), seed=0)
    sp = dist.SequenceParallel(layer, group, timeout=cfg.get("timeout", 20))
    x = np.random.default_rng(r).normal(size=(2, 5, 12)).astype(np.float32)
    good = np.zeros((2, 1, 5, 15), np.float32)  # 5 rows per rank over the 15 keys of 3 ranks
    nan = good.copy()
    nan[1, 0, 2, 7] = np.nan
    calls = {"nan-mask": dict(mask=nan if r == 1 else good),
             "wrong-width": dict(query=np.ones((2, 5, 13), np.float32) if r == 0 else x, mask=good),
             "wrong-keys": dict(mask=good[..., :14] if r == 2 else good)}
    report = {"rank": r}
    for name, kw in calls.items():
        t0 = time.time()
        try:
            sp(kw.pop("query", x), **kw)
            report[name] = "no error"
        except Exception as err:
            report[name] = f"{type(err).__name__}: {err}"
        report[name + "_seconds"] = time.time() - t0
    report["after"] = float(np.abs(mha.to_numpy(sp(x, mask=good))).max())
    with open(os.path.join(outdir, f"rank{r}.json"), "w") as f:
        json.dump(report, f)
    sys.stdout.flush()
    sp(x, mask=nan if r == 1 else good)  # uncaught, on every rank


def failures(cfg, group, dist, outdir):
    """"die": rank 1 leaves before the first exchange; "hang": rank 1 sleeps instead; "disagree": the ranks
    give different batch sizes (every rank must raise the same ValueError and stay usable)."""
    r = group.rank()
    layer = mha.MultiHeadAttention(12, 4, backend="numpy", seed=0)
    x = np.ones((2, 5, 12), np.float32)
    report = {"rank": r}
    if cfg["mode"] == "die" and r == 1:
        os._exit(0)
    if cfg["mode"] == "hang" and r == 1:
        time.sleep(120)
    kind = dist.SequenceParallel if cfg.get("kind") == "sequence" else dist.HeadParallel
    t0 = time.time()
    try:
        obj = kind(layer, group, timeout=cfg.get("timeout", 5))
        if cfg["mode"] == "disagree":
            try:
                obj(x[: 1 + r % 2])
            except ValueError as err:
                report["first"] = f"ValueError: {err}"
        y = obj(x)
        report["after"] = float(np.abs(mha.to_numpy(y)).max())
    except Exception as err:  # what the test asserts on
        report["error"] = f"{type(err).__name__}: {err}"
        report["classes"] = [c.__name__ for c in type(err).__mro__]
    report["seconds"] = time.time() - t0
    with open(os.path.join(outdir, f"rank{r}.json"), "w") as f:
        json.dump(report, f)
    sys.stdout.flush()
    # A non-zero exit makes mlx.launch stop the other ranks: wanted for the sleeper of "hang", not while
    # the survivors of "die" are still writing their reports.
    os._exit(1 if "error" in report and cfg["mode"] == "hang" else 0)


def main():
    import mlx.core as mx

    import mha.distributed as dist

    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    outdir = sys.argv[2]
    group = mx.distributed.init()
    if cfg["mode"] == "compare":
        compare(cfg, group, dist, outdir)
    elif cfg["mode"] == "bad":
        bad_input(cfg, group, dist, outdir)
    else:
        failures(cfg, group, dist, outdir)


if __name__ == "__main__":
    main()
