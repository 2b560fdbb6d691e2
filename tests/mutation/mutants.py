"""Realistic attention bugs, each a one-place source edit, for measuring the property suite's teeth.

Each mutant names the file, the exact text it replaces (which must occur once) and the bug it stands
for. They cover the xp-generic reference (both backends run it), the mask handling, the MLX fused path
and the numpy fast path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    bug: str


R, M, V, X = "mha/_reference.py", "mha/_masks.py", "mha/_validate.py", "mha_mlx/_layer.py"
C, F = "mha_cpu/_layer.py", "mha_cpu/_fast.py"
P, K, B = "mha/_rope.py", "mha/_cache.py", "mha/_base.py"

MUTANTS = [
    Mutant("scale-1/D", V, "1.0 / math.sqrt(self.head_dim)", "1.0 / self.head_dim",
           "scale 1/D instead of 1/sqrt(D)"),
    Mutant("scale-1/sqrtE", V, "1.0 / math.sqrt(self.head_dim)", "1.0 / math.sqrt(self.embed_dim)",
           "scale from the model width, not the head width"),
    Mutant("softmax-axis", R, "denom = xp.sum(e, axis=-1, keepdims=True)", "denom = xp.sum(e, axis=-2, keepdims=True)",
           "softmax normalised over the query axis"),
    Mutant("max-axis", R, "m = xp.max(logits, axis=-1, keepdims=True)", "m = xp.max(logits, axis=-2, keepdims=True)",
           "max-subtraction over the wrong axis"),
    Mutant("no-max-subtraction", R, "e = xp.exp(logits - m)", "e = xp.exp(logits)",
           "softmax without max-subtraction (overflows on large logits)"),
    Mutant("split-no-transpose", R, "return x.reshape(B, L, num_heads, HD // num_heads).transpose(0, 2, 1, 3)",
           "return x.reshape(B, num_heads, L, HD // num_heads)", "head split by reshape without transpose"),
    Mutant("merge-no-transpose", R, "return x.transpose(0, 2, 1, 3).reshape(B, L, H * D)",
           "return x.reshape(B, L, H * D)", "head merge by reshape without transpose"),
    Mutant("mask-polarity", M, 'keep = mask != 0 if kind in "iu" else mask',
           'keep = mask != 0 if kind in "iu" else xp.logical_not(mask)', "bool mask read as True = blocked"),
    Mutant("mask-after-softmax", R, "weights, lse = masked_softmax(xp, logits, keep)  # (B, H, T, S), (B, H, T)",
           "weights, lse = masked_softmax(xp, logits, None)\n    weights = weights * (1.0 if keep is None else keep)",
           "mask applied after the softmax (rows no longer sum to 1)"),
    Mutant("causal-off-by-one", M, "keep = dist >= 0 if self.causal", "keep = dist > 0 if self.causal",
           "causal mask hides the diagonal"),
    Mutant("causal-top-left", M, "dist = xp.arange(self.T)[:, None] + (self.S - self.T) - xp.arange(self.S)[None, :]",
           "dist = xp.arange(self.T)[:, None] - xp.arange(self.S)[None, :]", "causal aligned top-left when T != S"),
    Mutant("window-off-by-one", M, "w = xp.abs(dist) < self.window", "w = xp.abs(dist) <= self.window",
           "the sliding window lets one key too many through"),
    Mutant("gqa-interleaved", X, "    ctx = fused_attention(q, k, v,",
           "    k, v = mx.tile(k, (1, H // Hkv, 1, 1)), mx.tile(v, (1, H // Hkv, 1, 1))\n    ctx = fused_attention(q, k, v,",
           "GQA heads repeated by tiling (head h reads kv head h % Hkv) in the MLX fused path"),
    Mutant("gqa-grouping-ref", R, "return x.reshape((B, num_kv_heads, H // num_kv_heads) + tuple(x.shape[2:]))",
           "return x.reshape((B, H // num_kv_heads, num_kv_heads) + tuple(x.shape[2:])).swapaxes(1, 2)",
           "GQA grouping interleaved in the reference"),
    Mutant("out-bias-dropped", R, 'out = linear(xp, merge_heads(ctx), params["o_weight"], params["o_bias"])',
           'out = linear(xp, merge_heads(ctx), params["o_weight"], None)', "output bias dropped"),
    Mutant("wo-transposed", R, 'out = linear(xp, merge_heads(ctx), params["o_weight"], params["o_bias"])',
           'out = linear(xp, merge_heads(ctx), params["o_weight"].T, params["o_bias"])', "W_O applied transposed"),
    Mutant("value-with-key-weights", R, 'v = split_heads(linear(xp, value, params["v_weight"], params["v_bias"])',
           'v = split_heads(linear(xp, value, params["k_weight"], params["k_bias"])', "values projected with W_k"),
    Mutant("empty-rows-mean", R, "logits = xp.where(keep, logits, NEG_INF)  # (B, H, T, S)",
           "logits = xp.where(keep, logits, -1e30)  # (B, H, T, S)",
           "finite fill instead of -inf: a query with no key gets mean(V)"),
    Mutant("additive-ignored", M, "bias = xp.where(hidden, 0.0, bias).astype(bias_dtype)", "bias = None",
           "additive float mask dropped (only its -inf entries kept)"),
    Mutant("key-mask-ignored", M, "keep = km if keep is None else xp.logical_and(keep, km)",
           "keep = km if keep is None else keep", "key_mask dropped when a mask is also given"),
    Mutant("causal-or", M, "return c if self.keep is None else xp.logical_and(self.keep, c)",
           "return c if self.keep is None else xp.logical_or(self.keep, c)", "mask and causal combined by OR"),
    Mutant("fused-no-empty-fix", X, "out = mx.where(visible, out, mx.array(0, dt))", "out = out",
           "MLX fused kernel's mean(V) for empty rows left in place"),
    Mutant("fused-no-nan-clean", X, "v = mx.where(bad[..., None], 0, v)", "v = v",
           "MLX fused path lets NaN at hidden values leak (0 * NaN)"),
    Mutant("fused-bias-without-keep", X, "arg = mx.where(keep, bias, mx.finfo(dt).min).astype(dt)",
           "arg = bias.astype(dt)", "MLX fused path drops the bool part when an additive mask is given"),
    Mutant("fused-double-scale", X, "ctx = fused_attention(q, k, v, scale=c.effective_scale",
           "ctx = fused_attention(q * c.effective_scale, k, v, scale=c.effective_scale",
           "MLX fused path scales twice (queries pre-scaled and scale passed)"),
    Mutant("online-no-acc-rescale", F, "                    ctx *= alpha\n", "                    pass\n",
           "online softmax forgets to rescale the accumulated context when the running max grows"),
    Mutant("online-no-sum-rescale", F, "                    l_sum *= alpha\n", "                    pass\n",
           "online softmax forgets to rescale the running sum"),
    Mutant("offset-never-moves", F, "move = np.isfinite(top) & ((rel > SHIFT) | (empty & (-rel > SHIFT)))",
           "move = np.zeros(top.shape, bool)", "softmax never re-centred: exp overflows on large logits"),
    Mutant("offset-moves-down", F, "move = np.isfinite(top) & ((rel > SHIFT) | (empty & (-rel > SHIFT)))",
           "move = np.isfinite(top) & (np.abs(rel) > SHIFT)",
           "offset also moved down after terms were accumulated (their rescale overflows)"),
    Mutant("causal-skip-off-by-one", F, "end = S if not causal else min(S, i1 + off)",
           "end = S if not causal else min(S, i1 + off - 1)", "causal block skipping drops the last visible key"),
    Mutant("diagonal-mask-skipped", F, "if causal and j1 - 1 > i0 + off:", "if causal and j1 - 1 > i1 + off:",
           "causal mask not applied inside some blocks that cross the diagonal"),
    Mutant("fast-gqa-modulo", F, "qb = q[b, i0:i1, hs].reshape(n, Hkv_, G, Dq).transpose(1, 2, 0, 3)",
           "qb = q[b, i0:i1, hs].reshape(n, G, Hkv_, Dq).transpose(2, 1, 0, 3)",
           "numpy fast path groups query heads by h % Hkv instead of h // G"),
    Mutant("fast-weights-unnormalised", F, "                s /= np.where(l_sum == 0, 1.0, l_sum).astype(dtype)  # final",
           "                pass  # final",
           "numpy fast path with weights: exp(logit - max) never divided by the sum"),
    Mutant("fast-scale-not-folded", C, "s = dt.type(c.effective_scale)", "s = dt.type(1.0)",
           "numpy fast path forgets the scale when folding it into W_q"),
    Mutant("fused-qkv-swapped", C, "k, v = y[..., H * D:(H + Hkv) * D], y[..., (H + Hkv) * D:]",
           "v, k = y[..., H * D:(H + Hkv) * D], y[..., (H + Hkv) * D:]", "fused QKV output split with K and V swapped"),
    Mutant("fast-nan-not-poisoned", F, "            ctx[rows_nan] = np.nan\n",
           "            pass\n", "a non-finite key or value visible to a query silently zeroed, not propagated"),
    Mutant("head-mask-ignored", R, "        ctx = ctx * head_mask\n", "        ctx = ctx\n",
           "head_mask ignored in the reference"),
    Mutant("fast-head-mask-ignored", F, "            ctx *= head_mask[b if head_mask.shape[0] > 1 else 0][hs, None, None]\n",
           "            pass\n", "head_mask ignored in the numpy fast path"),
    # decoding: RoPE, the cache, sliding windows
    Mutant("rope-cache-offset-zero", B, "pos = _Positions(step.offset if step else S - T, step.offset if step else 0, step)",
           "pos = _Positions(0 if step else S - T, 0, step)", "RoPE restarts at position 0 in every cached call"),
    Mutant("rope-query-top-left", B, "pos = _Positions(step.offset if step else S - T,",
           "pos = _Positions(step.offset if step else 0,", "queries rotated from position 0 when T != S"),
    Mutant("rope-mlx-layout-flipped", X, "traditional=r.traditional, base=r.base",
           "traditional=not r.traditional, base=r.base", "MLX's fused RoPE with the other pair layout"),
    Mutant("rope-sin-sign", P, "rot = xp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)",
           "rot = xp.concatenate([a * cos + b * sin, a * sin + b * cos], axis=-1)", "split-half rotation with a wrong sign"),
    Mutant("rope-freq-index", P, "inv_freq = self.base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)",
           "inv_freq = self.base ** (-np.arange(1, dims + 1, 2, dtype=np.float64) / dims)", "frequencies off by one index"),
    Mutant("cache-window-keeps-too-few", K, "keep_old = self.kept if self.window is None else min(self.kept, self.window - 1)",
           "keep_old = self.kept if self.window is None else min(self.kept, max(self.window - 2, 0))",
           "a rotating cache that drops one key too early"),
    Mutant("cache-forgets-padding", K, "self.valid[:, a:end] = True if step.valid_new is None else step.valid_new",
           "self.valid[:, a:end] = True", "left padding forgotten once cached"),
    Mutant("cache-compaction-keys-only", K, "            self.values[:, :, :n] = src[1][:, :, start:start + n]\n",
           "            pass\n", "compacting a rotating cache moves the keys but not the values"),
    Mutant("fast-window-skip-off-by-one", F, "start = max(0, i0 + off - window + 1)", "start = max(0, i0 + off - window + 2)",
           "the numpy fast path skips the oldest key of the window"),
    Mutant("fast-window-one-sided", F, "dist = np.abs(rows[:, None] + off - np.arange(j0, j1)[None, :])",
           "dist = rows[:, None] + off - np.arange(j0, j1)[None, :]", "window inside a block hides only the past"),
    Mutant("fast-split-wrong-heads", F, "            ctx *= head_mask[b if head_mask.shape[0] > 1 else 0][hs, None, None]\n",
           "            ctx *= head_mask[b if head_mask.shape[0] > 1 else 0][:H_, None, None]\n",
           "a head group split over workers takes the first heads' head_mask"),
    Mutant("aug-offset-not-in-query", F, "                if aug:\n                    q_m[...] = -m\n", "                if aug:\n                    pass\n",
           "augmented form: the moved offset never reaches the query's free column (exp overflows)"),
    Mutant("aug-row-sums-ignored", F, "            l_sum = ctx[..., D:].copy()", "            l_sum = np.ones_like(ctx[..., D:])",
           "augmented form: the row sums carried in the context's last column are not used"),
    Mutant("no-after-the-fact-check", F, "bad = ~(part[..., D:] <= LIMIT)  # NaN and inf fail too",
           "bad = np.zeros(part[..., D:].shape, bool)", "exp without the max pass, and no check that the terms stayed in the band"),
    Mutant("mlx-window-ignored", X, "return _fused(q, k, v, keep, bias, masks.causal, masks.window, float(scale))",
           "return _fused(q, k, v, keep, bias, masks.causal, None, float(scale))", "MLX fused path ignores the window"),
]
