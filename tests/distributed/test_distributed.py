"""mha.distributed on 2 and 3 ranks of one machine (``mlx.launch --backend ring``), against the unsharded
layer and the float64 oracle.

Each launch runs tests/distributed_worker.py on every rank with many configurations at once (launching
costs 1-2 s), under a hard timeout after which the launcher's whole process group is killed; ports are
picked free. The ranks write their results to a temporary folder and the assertions run here.

Tolerances (derived, mha.testing.tolerance): the unsharded layer is one float32 evaluation, within
T1 = C u M of the exact result. HeadParallel adds the all_sum of n partial outputs, each bounded by M:
at most (n - 1) u M more. SequenceParallel merges up to n blocks by log-sum-exp: each block's lse is
rounded by at most u (1 + |lse|) beyond the logit error M already covers, and exp(lse_b - lse) turns
that into a relative error of the block's weight; with the exp and the two products, each merge adds at
most 2 u (1 + L) ||W_O|| max|v| to the output, L = max |lse| (the unsharded layer's, finite ones). With
C >= 1: M_ring = M + 2 n (1 + L) ||W_O|| max|v|.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import mha
from mha.testing import oracle, tolerance
from mha.testing.tolerance import _abs_projections
from tests.conftest import HAS_MLX
from tests.distributed.distributed_launch import launch
from tests.helpers import minilm_available

pytestmark = pytest.mark.skipif(not HAS_MLX, reason="mha.distributed needs MLX (pip install 'mha-twin[mlx]')")

U = tolerance.unit_roundoff("float32")


# -- the configurations --------------------------------------------------------------------------------
FIXED = [
    dict(name="mha-causal-keymask", B=2, T=37, H=6, Hkv=6, D=5, E=30, causal=True, key_mask=True, head_mask="BH"),
    dict(name="gqa-rope-window-floatmask", B=2, T=29, H=6, Hkv=3, D=4, E=24, rope=True, window=7, causal=True,
         mask="float"),
    dict(name="cross-boolmask-headmask", B=2, T=11, S=23, kdim=9, vdim=13, H=3, Hkv=3, D=5, E=15, mask="bool",
         head_mask="H", causal=True, key_mask=True),
    # a block whose first key is exactly the last query's causal limit (T = 6, S = 8 over 2 or 3 ranks)
    dict(name="cross-causal-edge", B=1, T=6, S=8, kdim=7, vdim=5, H=3, Hkv=3, D=3, E=9, causal=True),
    # float64 numpy layers: the exchanges carry float64 (MLX arrays on the CPU), bounds in float64's u
    dict(name="float64-gqa-keymask", B=2, T=19, H=6, Hkv=3, D=2, E=12, causal=True, key_mask=True, dtype="float64",
         numpy_only=True),
    # a window without causal: each block of the core's loop spans keys up to p + W - 1
    dict(name="window-noncausal", B=1, T=31, H=3, Hkv=3, D=4, E=12, window=4, key_mask=True, blocks=(2, 3)),
    dict(name="decode-gqa-rope-window", B=2, T=17, prefill=13, H=6, Hkv=3, D=4, E=24, rope=True, window=6,
         key_mask=True, decode=True),
    # Hugging Face's padding masks: element 1's first 8 keys carry finfo(float32).min or -1e9, so with causal
    # its first rows (rank 0's) see only keys that carry it: one average over all of them, not one per rank
    dict(name="hf-padding-finfo-min", B=2, T=23, H=4, Hkv=2, D=3, E=12, causal=True, mask="finfo", pad=8),
    dict(name="hf-padding-1e9-zigzag-window", B=2, T=26, H=4, Hkv=2, D=3, E=12, causal=True, mask="-1e9", pad=9,
         window=7, order="zigzag", rope=True),
    dict(name="hf-padding-finfo-min-noncausal", B=2, T=19, H=3, Hkv=3, D=4, E=12, mask="finfo", pad=19,
         key_mask=True),  # element 1: every key carries it
    # left padding by key_mask with causal: rank 0's rows of element 1 see no key at all (output bias)
    dict(name="left-padding-empty-rows", B=2, T=20, H=6, Hkv=2, D=2, E=12, causal=True, key_mask="left"),
    dict(name="zigzag-causal-gqa-rope-keymask", B=2, T=29, H=6, Hkv=3, D=4, E=24, causal=True, rope=True,
         key_mask=True, head_mask="H", order="zigzag", blocks=(3, 4)),
    # softcap, q/k norm and sinks (the sink counted once per query, not once per block)
    dict(name="features-rope-floatmask", B=2, T=22, H=4, Hkv=2, D=4, E=16, causal=True, rope=True,
         mask="float", features=True),
]


def random_cases(n: int, seed: int, count: int) -> list[dict]:
    """Random shapes and options with at least n GQA groups (HeadParallel needs one per rank)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        Hkv = rng.randint(n, 4)
        H = Hkv * rng.choice([1, 2, 3])
        D = rng.randint(2, 7)
        case = dict(name=f"random{i}", B=rng.randint(1, 3), T=rng.randint(n, 40), H=H, Hkv=Hkv, D=D,
                    E=rng.choice([H * D, H * D + 1]) if False else H * D, causal=rng.random() < 0.5,
                    key_mask=rng.random() < 0.5, mask=rng.choice([None, "bool", "float"]),
                    rope=rng.random() < 0.5, window=rng.choice([None, rng.randint(1, 9)]))
        if rng.random() < 0.3:
            case.update(S=rng.randint(n, 30), kdim=rng.randint(2, 9), vdim=rng.randint(2, 9), rope=False)
        elif rng.random() < 0.5:
            case.update(order="zigzag", T=max(case["T"], 2 * n))
        if rng.random() < 0.5:
            case.update(blocks=(rng.randint(1, 4), rng.randint(1, 5)))
        out.append(case)
    return out


def all_cases(n: int) -> list[dict]:
    cases = []
    for backend in ("numpy", "mlx"):
        for kind in ("head", "sequence"):
            for j, c in enumerate(FIXED + random_cases(n, 100 * n + (backend == "mlx") + 2 * (kind == "head"), 2)):
                if c.get("numpy_only") and backend != "numpy":
                    continue
                if kind == "head" and (c.get("order") or c.get("mask") in ("finfo", "-1e9") or c["Hkv"] < n):
                    continue  # the sequence order and the big masks are the ring's business
                cases.append(dict(c, backend=backend, kind=kind, seed=1000 * n + j))
    if minilm_available() and n == 2:
        cases.append(dict(name="minilm", kind="minilm", backend="numpy"))
    return cases


# -- the checks ----------------------------------------------------------------------------------------
def _problem(case):
    from tests.distributed.distributed_worker import make_problem

    weights, kwargs, x, k, v, mask, key_mask, head_mask = make_problem(case)
    rope = mha.RoPE() if kwargs["rope"] else None
    features = {n: kwargs[n] for n in ("softcap", "qk_norm") if n in kwargs}
    return weights, rope, kwargs["window"], x, k, v, mask, key_mask, head_mask, features


def _expected(case, n: int):
    """(float64 output, weights, M per output row, MP, ||W_O|| max|v|, M_ring per row) of one case on n
    ranks: the
    oracle over the whole sequence. M is each row's own (a row whose weight sits on keys carrying
    finfo.min has float32's rounding of that number in its bound, the others not); M_ring bounds the
    ring, which attends each block with the mask shifted by each row's largest visible term (so such a
    row keeps its logits' digits): M of the shifted mask plus 2 n (1 + L) ||W_O|| max|v|, L the row's
    |lse| in the shifted problem (float64)."""
    weights, rope, window, x, k, v, mask, key_mask, head_mask, features = _problem(case)
    causal = bool(case.get("causal")) or bool(case.get("decode"))
    if case.get("decode") and key_mask is not None:
        key_mask[:, case["prefill"]:] = True  # decoded tokens are given without a key_mask: real
    masks = dict(mask=mask, key_mask=key_mask, causal=causal)
    y, P = oracle.attention(weights, x, k, v, **masks, head_mask=head_mask, rope=rope, window=window, **features)
    S = (k if k is not None else x).shape[1]
    angle = (S - 1) if rope else 0.0
    M = tolerance.magnitude(weights, x, k, v, y_ref=y, mask=mask, head_mask=head_mask, max_angle=angle, P_ref=P)
    MP = tolerance.weights_magnitude(weights, x, k, mask=mask, max_angle=angle)
    _, _, vs = _abs_projections(weights, x, x if k is None else k, x if v is None else v)
    wo = float(np.abs(weights.o_weight.astype(np.float64)).sum(axis=1).max())
    if head_mask is not None:
        wo *= float(np.abs(head_mask).max())
    wv = wo * max(float(np.abs(a).max()) for a in vs)
    shifted = _shifted(mask, oracle.visible_keys(*P.shape, **masks, window=window))
    M_shift = tolerance.magnitude(weights, x, k, v, y_ref=y, mask=shifted, head_mask=head_mask, max_angle=angle,
                                  P_ref=P)
    layer = mha.MultiHeadAttention.from_weights(weights, backend="numpy", dtype="float64", rope=rope, window=window,
                                                **features)
    f64 = (None if a is None else a.astype(np.float64) for a in (x, k, v))
    lse = np.abs(layer(*f64, **dict(masks, mask=shifted), return_lse=True)[1])  # (B, H, T)
    L = np.where(np.isfinite(lse), lse, 0.0).max(axis=1)[..., None]  # (B, T, 1): the row's worst head
    rows = np.zeros(y.shape[:2] + (1,))  # (B, T, 1): a bound per output row, also where the mask is not additive
    return y, P, M + rows, MP, wv, M_shift + rows + 2 * n * (1 + L) * wv


def _shifted(mask, visible):
    """A float mask minus each query row's largest term over its visible keys (B, H, T, S); -inf where
    hidden; None for other masks."""
    if mask is None or np.asarray(mask).dtype.kind != "f":
        return None
    m = np.broadcast_to(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), visible.shape).astype(np.float64)
    m = np.where(visible, m, -np.inf)
    top = m.max(axis=-1, keepdims=True)
    return np.where(visible, m - np.where(np.isfinite(top), top, 0.0), -np.inf)


def ring_magnitude(M, wv: float, n: int, lse):
    """M_ring of the module docstring: M + 2 n (1 + L) ||W_O|| max|v|."""
    L = float(np.abs(lse[np.isfinite(lse)]).max(initial=0.0))
    return M + 2 * n * (1 + L) * wv


def check_case(i: int, case: dict, ranks: list[dict], n: int) -> str:
    """Assert one case on every rank's results; returns a line of figures."""
    res = [{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(f"{i}/")} for r in ranks]
    if case["kind"] == "minilm":
        return check_minilm(res)
    y, P, M, MP, wv, M_ring = _expected(case, n)
    dt = case.get("dtype", "float32")
    t1 = tolerance.t1(dt, M)
    what = f"{case['name']} ({case['backend']}, {case['kind']}, n={n})"
    worst, bound = 0.0, 0.0
    if case.get("decode"):
        return check_decode(case, res, y, M, wv, n, what)
    for r, got in enumerate(res):
        tolerance.assert_close(got["single"], y, t1, f"{what}: unsharded layer vs oracle")
        if case["kind"] == "head":
            bound = t1 + (n - 1) * tolerance.unit_roundoff(dt) * M
            tolerance.assert_close(got["sharded"], y, bound, f"{what}: rank {r} vs oracle")
            tolerance.assert_close(got["sharded"], got["single"], t1 + bound, f"{what}: rank {r} vs unsharded")
            tolerance.assert_close(got["weights_all"], P, tolerance.t1(dt, MP), f"{what}: gathered weights")
            a, b = got["heads"]
            np.testing.assert_array_equal(got["weights_rank"], got["weights_all"][:, a:b])
            lse1 = got["single_lse"]
            big = np.abs(lse1[np.isfinite(lse1)]).max(initial=0.0)
            close_lse(got["lse_all"], lse1, tolerance.t2(dt, dt, MP + big), f"{what}: gathered lse")
            uneven = case["Hkv"] % n != 0
            assert bool(got["uneven_warned"]) == uneven, f"{what}: UnevenSplitWarning {'missing' if uneven else 'spurious'}"
        else:
            idx = got["rows"]
            bound = tolerance.t1(dt, M_ring[:, idx])
            close_to_either(got["sharded"], y[:, idx], got["single"][:, idx], bound,
                            f"{what}: rank {r} rows {_span(idx)} vs the oracle or the unsharded layer")
            tolerance.assert_close(got["sharded"], got["single"][:, idx], t1[:, idx] + bound,
                                   f"{what}: rank {r} vs unsharded")
            lse1 = got["single_lse"][:, :, idx]
            big = np.where(np.isfinite(lse1), np.abs(lse1.astype(np.float64)), 0.0)  # each its own (finfo.min: huge)
            close_lse(got["lse"], lse1, 4 * tolerance.unit_roundoff(dt) * (2 + 2 * n) * (MP + big),
                      f"{what}: rank {r} lse")
        worst = max(worst, float(np.nanmax(np.abs(got["sharded"] - (got["single"] if case["kind"] == "head"
                                                                    else got["single"][:, idx])), initial=0.0)))
    return f"{what}: max|sharded - unsharded| = {worst:.2e}, bound {np.min(t1) + np.min(bound):.2e} or more"


def _span(idx) -> str:
    return f"{idx[0]}:{idx[-1] + 1}" if idx.size and np.all(np.diff(idx) == 1) else str(idx.tolist())


def close_to_either(a, oracle_rows, layer_rows, tol, what):
    """Each output row within ``tol`` (the ring's own bound, (B, t, 1)) of the float64 oracle or of the
    one-process float32 layer: a row whose visible keys all carry a mask term that absorbs its logits in
    float32 (finfo.min; -1e9 against logits below 30) is the plain mean of those values in the layer,
    and in the ring, while float64 may still tell the logits apart (-1e9). Either way one mean: the sum of
    per-rank means, or any non-convex mix, fails both."""
    off = np.minimum(np.abs(a - oracle_rows), np.abs(a - layer_rows))  # (B, t, E)
    worst = np.max(off / np.maximum(tol, 1e-300), axis=-1)
    assert np.all(worst <= 1), (f"{what}: row {np.unravel_index(np.argmax(worst), worst.shape)} is "
                                f"{np.max(worst):.3g} times its bound from both")


def close_lse(a, b, tol, what):
    """lse within ``tol`` where finite; -inf (a query that sees nothing) at the same places."""
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=f"{what}: -inf pattern")
    fin = np.isfinite(b)
    tolerance.assert_close(np.where(fin, a, 0.0), np.where(fin, b, 0.0), tol, what)


def check_decode(case, res, y, M, wv, n, what) -> str:
    dt = case.get("dtype", "float32")
    t1 = tolerance.t1(dt, M)
    P = case["prefill"]
    worst = 0.0
    for r, got in enumerate(res):
        tolerance.assert_close(got["single"], y, t1, f"{what}: unsharded decoding vs oracle")
        if case["kind"] == "head":
            bound = t1 + (n - 1) * tolerance.unit_roundoff(dt) * M
            tolerance.assert_close(got["sharded"], got["single"], t1 + bound, f"{what}: rank {r} decoding")
            from mha.distributed import head_split

            own = len(head_split(case["H"], case["Hkv"], n)[r]) // (case["H"] // case["Hkv"])
            assert int(got["cache_kv_heads"]) == own, f"{what}: rank {r}'s cache holds other heads than its own"
            worst = max(worst, float(np.abs(got["sharded"] - got["single"]).max()))
        else:
            idx = got["rows"]
            bound = tolerance.t1(dt, ring_magnitude(M, wv, n, np.array([got["max_lse"]])))
            tolerance.assert_close(got["sharded_prefill"], got["single"][:, idx], t1[:, idx] + bound[:, idx],
                                   f"{what}: prefill {r}")
            expect_T = case["T"] - P if r == n - 1 else 0
            assert got["sharded_decode"].shape[1] == expect_T, f"{what}: rank {r} decoded {got['sharded_decode'].shape}"
            if expect_T:
                tolerance.assert_close(got["sharded_decode"], got["single"][:, P:], t1[:, P:] + bound[:, P:],
                                       f"{what}: decoding")
                worst = max(worst, float(np.abs(got["sharded_decode"] - got["single"][:, P:]).max()))
            if case.get("window"):  # every key a later query can still see, and no other
                assert int(got["cache_kept"]) <= case["window"], f"{what}: rank {r} keeps {got['cache_kept']} keys"
    return f"{what}: max|sharded - unsharded| = {worst:.2e}, bound {np.min(t1) + np.min(bound):.2e} or more"


def check_minilm(res) -> str:
    """Head-parallel MiniLM embeddings vs one process. Tolerance by the adaptive rule (TESTING.md rule 3):
    at most twice the difference between two single-process float32 evaluations (numpy vs MLX) plus the
    rounding quantum of the values."""
    lines = []
    for r, got in enumerate(res):
        got = dict(got, single_mlx=res[0]["single_mlx"], single_mlx_attentions=res[0]["single_mlx_attentions"])
        one, two, hp = got["single"].astype(np.float64), got["single_mlx"].astype(np.float64), got["sharded"]
        naive = float(np.abs(one - two).max())
        q0 = float(np.abs(one).max()) * U
        diff = float(np.abs(hp - one).max())
        cos = float(np.min(np.sum(hp * one, axis=1) / np.linalg.norm(hp, axis=1) / np.linalg.norm(one, axis=1)))
        assert diff <= 2 * naive + 2 * q0, f"MiniLM rank {r}: max diff {diff:.3g} > 2 * {naive:.3g} + 2 * {q0:.3g}"
        att = float(np.abs(got["attentions"] - got["single_attentions"]).max())
        att_naive = float(np.abs(got["single_mlx_attentions"] - got["single_attentions"]).max())
        assert att <= 2 * att_naive + 2 * U, f"MiniLM rank {r}: attentions differ by {att:.3g} (numpy vs MLX: {att_naive:.3g})"
        lines.append(f"MiniLM head-parallel rank {r}: min cosine {cos:.9f}, max|diff| {diff:.2e} "
                     f"(numpy vs MLX one process: {naive:.2e})")
    return "; ".join(lines)


@pytest.mark.parametrize("n", [2, 3])
def test_sharded_equals_unsharded(n, tmp_path):
    """Both kinds x both backends x fixed and random configurations, one launch."""
    cases = all_cases(n)
    out, seconds = launch(n, {"mode": "compare", "cases": cases}, tmp_path, timeout=240)
    files = [tmp_path / f"rank{r}.npz" for r in range(n)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no results ({missing}):\n{out[-4000:]}"
    ranks = [dict(np.load(f)) for f in files]
    lines = [check_case(i, c, ranks, n) for i, c in enumerate(cases)]
    print(f"\n{n} ranks, {len(cases)} configurations, launch {seconds:.1f} s\n" + "\n".join(lines))
