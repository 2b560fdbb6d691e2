"""Realistic attention bugs, each one edit of one function, for measuring the property suite's teeth.

Each mutant names the file, the function (qualified name) and the code it replaces there, matched as
an AST (tests/mutation/ast_edit.py): formatting, comments and moves within the function do not break it.
They cover the xp-generic reference (both backends run it), the masks, the front end, the cache, RoPE,
the MLX fused path and the numpy kernel, projections and splits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    function: str
    old: str
    new: str
    bug: str


R, M, V, X = "mha/_reference.py", "mha/_masks.py", "mha/_validate.py", "mha_mlx/_layer.py"
L, F, J = "mha_cpu/_layer.py", "mha_cpu/_kernel.py", "mha_cpu/_proj.py"
W, S, C = "mha_mlx/_blockwise.py", "mha_cpu/_decode.py", "mha_mlx/_core.py"
P, K, A = "mha/_rope.py", "mha/_cache.py", "mha/_prepare.py"
BLOCK, REDO, OOB, FIN = ("block", "redo", "out_of_band", "finish")
TASK = "MultiHeadAttention._forward_groups.task"

MUTANTS = [
    # the reference, the masks, the front end
    Mutant("scale-1/D", V, "LayerConfig.effective_scale", "1.0 / math.sqrt(self.head_dim)", "1.0 / self.head_dim",
           "scale 1/D instead of 1/sqrt(D)"),
    Mutant("scale-1/sqrtE", V, "LayerConfig.effective_scale", "1.0 / math.sqrt(self.head_dim)",
           "1.0 / math.sqrt(self.embed_dim)", "scale from the model width, not the head width"),
    Mutant("softmax-axis", R, "masked_softmax", "xp.sum(e, axis=-1, keepdims=True)", "xp.sum(e, axis=-2, keepdims=True)",
           "softmax normalised over the query axis"),
    Mutant("max-axis", R, "masked_softmax", "xp.max(logits, axis=-1, keepdims=True)",
           "xp.max(logits, axis=-2, keepdims=True)", "max-subtraction over the wrong axis"),
    Mutant("no-max-subtraction", R, "masked_softmax", "xp.exp((logits - m) * factor)", "xp.exp(logits * factor)",
           "softmax without max-subtraction (overflows on large logits)"),
    Mutant("split-no-transpose", R, "split_heads", "x.reshape(B, L, num_heads, HD // num_heads).transpose(0, 2, 1, 3)",
           "x.reshape(B, num_heads, L, HD // num_heads)", "head split by reshape without transpose"),
    Mutant("merge-no-transpose", R, "merge_heads", "x.transpose(0, 2, 1, 3).reshape(B, L, H * D)",
           "x.reshape(B, L, H * D)", "head merge by reshape without transpose"),
    Mutant("mask-polarity", M, "prepare", 'mask != 0 if kind in "iu" else mask',
           'mask != 0 if kind in "iu" else xp.logical_not(mask)', "bool mask read as True = blocked"),
    Mutant("mask-after-softmax", R, "attention", "weights, lse = masked_softmax(xp, logits, keep, c)",
           "weights, lse = masked_softmax(xp, logits, None, c)\nweights = weights * (1.0 if keep is None else keep)",
           "mask applied after the softmax (rows no longer sum to 1)"),
    Mutant("causal-off-by-one", M, "MaskSet.causal_keep", "dist >= 0 if self.causal else None",
           "dist > 0 if self.causal else None", "causal mask hides the diagonal"),
    Mutant("causal-top-left", M, "MaskSet.causal_keep",
           "xp.arange(t0, t1)[:, None] + (self.S - self.T) - xp.arange(s0, s1)[None, :]",
           "xp.arange(t0, t1)[:, None] - xp.arange(s0, s1)[None, :]", "causal aligned top-left when T != S"),
    Mutant("window-off-by-one", M, "MaskSet.causal_keep", "xp.abs(dist) < self.window", "xp.abs(dist) <= self.window",
           "the sliding window lets one key too many through"),
    Mutant("gqa-grouping-ref", R, "group_queries", "x.reshape((B, num_kv_heads, H // num_kv_heads) + tuple(x.shape[2:]))",
           "x.reshape((B, H // num_kv_heads, num_kv_heads) + tuple(x.shape[2:])).swapaxes(1, 2)",
           "GQA grouping interleaved in the reference"),
    Mutant("out-bias-dropped", R, "multi_head_attention", 'linear(xp, merge_heads(ctx), params["o_weight"], params["o_bias"])',
           'linear(xp, merge_heads(ctx), params["o_weight"], None)', "output bias dropped"),
    Mutant("wo-transposed", R, "multi_head_attention", 'linear(xp, merge_heads(ctx), params["o_weight"], params["o_bias"])',
           'linear(xp, merge_heads(ctx), params["o_weight"].T, params["o_bias"])', "W_O applied transposed"),
    Mutant("value-with-key-weights", R, "multi_head_attention", 'linear(xp, value, params["v_weight"], params["v_bias"])',
           'linear(xp, value, params["k_weight"], params["k_bias"])', "values projected with W_k"),
    Mutant("empty-rows-mean", R, "masked_softmax", "xp.where(keep, logits, NEG_INF)", "xp.where(keep, logits, -1e30)",
           "finite fill instead of -inf: a query with no key gets mean(V)"),
    Mutant("additive-ignored", M, "prepare", "bias = xp.where(hidden, 0.0, bias).astype(bias_dtype)", "bias = None",
           "additive float mask dropped (only its -inf entries kept)"),
    Mutant("key-mask-ignored", M, "prepare", "km if keep is None else xp.logical_and(keep, km)",
           "km if keep is None else keep", "key_mask dropped when a mask is also given"),
    Mutant("causal-or", M, "MaskSet.full_keep", "c if self.keep is None else xp.logical_and(self.keep, c)",
           "c if self.keep is None else xp.logical_or(self.keep, c)", "mask and causal combined by OR"),
    Mutant("head-mask-ignored", R, "multi_head_attention", "ctx = ctx * head_mask", "ctx = ctx",
           "head_mask ignored in the reference"),
    Mutant("rope-cache-offset-zero", A, "_record", "Positions(step.offset, step.offset, step)", "Positions(0, 0, step)",
           "RoPE restarts at position 0 in every cached call"),
    Mutant("rope-query-top-left", A, "_record", "Positions(S - T, 0)", "Positions(0, 0)",
           "queries rotated from position 0 when T != S"),
    Mutant("rope-sin-sign", P, "apply_rope", "xp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)",
           "xp.concatenate([a * cos + b * sin, a * sin + b * cos], axis=-1)", "split-half rotation with a wrong sign"),
    Mutant("rope-freq-index", P, "RoPE.angles", "self.base ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)",
           "self.base ** (-np.arange(1, dims + 1, 2, dtype=np.float64) / dims)", "frequencies off by one index"),
    Mutant("cache-window-keeps-too-few", K, "KVCache._plan", "min(self.kept, self.window - 1)",
           "min(self.kept, max(self.window - 2, 0))", "a rotating cache that drops one key too early"),
    Mutant("cache-forgets-padding", K, "KVCache._append",
           "self.valid[:, a:end] = True if step.valid_new is None else step.valid_new",
           "self.valid[:, a:end] = True", "left padding forgotten once cached"),
    Mutant("cache-compaction-keys-only", K, "KVCache._relocate", "self.values[:, :, :n] = src[1][:, :, start:start + n]",
           "pass", "compacting a rotating cache moves the keys but not the values"),
    # the MLX core: the fused path (mha_mlx/_core.py) and the layer around it
    Mutant("gqa-interleaved", C, "_fused", "kq, kk, kv = _kernel_inputs(q, k, v)",
           "kq, kk, kv = _kernel_inputs(q, mx.tile(k, (1, q.shape[1] // k.shape[1], 1, 1)), "
           "mx.tile(v, (1, q.shape[1] // k.shape[1], 1, 1)))",
           "GQA heads repeated by tiling (head h reads kv head h % Hkv) in the MLX fused kernel's inputs"),
    Mutant("gqa-interleaved-masked", W, "_grouped", "a.reshape(b, Hkv, h // Hkv, t, s)",
           "a.reshape(b, h // Hkv, Hkv, t, s).swapaxes(1, 2)",
           "the MLX blockwise path groups a per-head mask's heads interleaved (head h with kv head h % Hkv)"),
    Mutant("fused-double-scale", C, "_fused",
           "mx.fast.scaled_dot_product_attention(kq, kk, kv, scale=1.0, mask=arg, sinks=sinks)",
           "mx.fast.scaled_dot_product_attention(kq, kk, kv, scale=scale, mask=arg, sinks=sinks)",
           "MLX fused path scales twice (queries pre-scaled and scale passed)"),
    Mutant("fused-no-empty-fix", C, "_row_rules", "out = mx.where(_to_btH(visible), out, mx.array(0, dt))",
           "out = out", "MLX fused kernel's mean(V) for empty rows left in place"),
    Mutant("fused-no-nan-clean", C, "_clean", "return (mx.where(bad[..., None], 0, k), mx.where(bad[..., None], 0, v))",
           "return (mx.where(bad[..., None], 0, k), v)", "MLX fused path lets NaN at hidden values leak (0 * NaN)"),
    Mutant("fused-bias-without-keep", C, "_encode", 'arg = mx.where(keep, _finite_bias(bias, dtype), float("-inf"))',
           "arg = _finite_bias(bias, dtype)", "MLX fused path drops the bool part when an additive mask is given"),
    Mutant("fused-hidden-ties-finfo-min", C, "_encode", 'arg = mx.where(keep, _finite_bias(bias, dtype), float("-inf"))',
           "arg = mx.where(keep, _finite_bias(bias, dtype), mx.finfo(dtype).min)",
           "hidden keys encoded as finfo.min, which a user's finfo.min bias ties with (hidden keys then share "
           "the weight of a row whose visible keys all carry it)"),
    Mutant("rope-mlx-layout-flipped", X, "MultiHeadAttention._rope", "r.traditional", "not r.traditional", "MLX's fused RoPE with the other pair layout"),
    Mutant("mlx-window-ignored", C, "fused.fn",
           "MaskSet.aligned(q.shape[2], k.shape[2], keep=got.get('keep'), bias=got.get('bias'), causal=causal, "
           "window=window)",
           "MaskSet.aligned(q.shape[2], k.shape[2], keep=got.get('keep'), bias=got.get('bias'), causal=causal, "
           "window=None)", "MLX fused path ignores the window"),
    Mutant("mlx-batch-flag-ignored", X, "MultiHeadAttention._forward",
           "self._out(ctx.swapaxes(1, 2), head_mask, p, poison)", "self._out(ctx.swapaxes(1, 2), head_mask, p)",
           "MLX fused path without masks trusts the kernel with NaN/inf keys"),
    Mutant("mlx-nan-rule-top-left", C, "_row_rules", "last = mx.arange(T) + (S - T)", "last = mx.arange(T)",
           "the causal NaN rule of the MLX fused path aligned top-left when T != S"),
    Mutant("mlx-empty-rows-from-bool-mask", C, "_encode", "return (keep, sees_any)", "return (keep, None)",
           "rows that a bool mask leaves empty keep the kernel's mean of values"),
    Mutant("mlx-queries-unscaled", "mha_mlx/_range.py", "_scaled", "qs = (times_pow2(q, -e1) * scale).astype(q.dtype)",
           "qs = times_pow2(q, -e1).astype(q.dtype)", "the MLX core forgets the scale when it rescales the queries"),
    # the MLX blockwise path (long sequences; the property suite reaches it through small_blocks)
    Mutant("mlx-blocks-no-acc-rescale", W, "_query_block", "acc = acc * alpha + mx.matmul(p, v[:, :, None, s0:s1])",
           "acc = acc + mx.matmul(p, v[:, :, None, s0:s1])",
           "MLX blockwise: the accumulated context not rescaled when the running max grows"),
    Mutant("mlx-blocks-nan-forgotten", W, "_query_block",
           "touched = mx.logical_or(touched, mx.any(hit, axis=-1, keepdims=True))",
           "touched = mx.any(hit, axis=-1, keepdims=True)", "MLX blockwise: a NaN/inf key seen in an earlier key block forgotten"),
    Mutant("mlx-blocks-mask-rows", W, "_query_block", "masks.cut(rows=(t0, t1), cols=(s0, s1))",
           "masks.cut(rows=(0, t1 - t0), cols=(s0, s1))", "MLX blockwise: every query block gets the first rows' masks"),
    # the numpy kernel
    Mutant("online-no-acc-rescale", F, REDO, "task.acc *= alpha", "pass",
           "online softmax forgets to rescale the accumulated context when a row is re-centred"),
    Mutant("online-no-sum-rescale", F, REDO, "task.l_sum *= alpha", "pass",
           "online softmax (plain form) forgets to rescale the running sum"),
    Mutant("offset-never-moves", F, REDO, "np.where(bad & np.isfinite(top), top, task.m)",
           "task.m", "rows outside the band never re-centred: exp overflows on large logits"),
    Mutant("offset-moves-down-rescales", F, REDO, "np.exp(np.where(task.sums() > 0, task.m - m, 0) * c.logit_scale)",
           "np.exp((task.m - m) * c.logit_scale)", "a row without terms whose offset moves down far rescales its "
           "zeros by an overflowing factor (0 * inf = NaN)"),
    Mutant("redo-offset-by-difference", F, REDO, "np.where(bad & np.isfinite(top), top, task.m)",
           "np.where(bad & np.isfinite(top), task.m + (top - task.m), task.m)",
           "a re-centred row's offset moved by a rounded difference, not set to its maximum (exp(+-1024) "
           "at logits near 1e10)"),
    Mutant("bias-in-scaled-logits", F, "attention", "call.logit_scale != 1.0 and call.masks.bias is not None",
           "False", "an additive mask added to logits scaled down by a power of two (a huge scale, or the "
           "overflow rerun) counts that many times too much"),
    Mutant("causal-skip-off-by-one", M, "MaskSet.key_span", "hi = min(hi, t1 + off)", "hi = min(hi, t1 + off - 1)",
           "causal block skipping drops the last visible key"),
    Mutant("diagonal-mask-skipped", M, "MaskSet.crosses", "self.causal and s1 - 1 > t0 + off",
           "self.causal and s1 - 1 > t1 + off", "causal mask not applied inside some blocks that cross the diagonal"),
    Mutant("window-skip-off-by-one", M, "MaskSet.key_span", "lo = max(lo, t0 + off - self.window + 1)",
           "lo = max(lo, t0 + off - self.window + 2)", "block skipping drops the oldest key of the window"),
    Mutant("window-edge-block-unmasked", M, "MaskSet.crosses", "s1 - 1 >= t0 + off + W", "False",
           "a block reaching past the window's far edge taken as wholly visible"),
    Mutant("fast-gqa-modulo", F, "_Task.__post_init__",
           "c.q[self.b, self.i0:self.i1, self.hs].reshape(self.n, self.Hkv_, self.G, -1).transpose(1, 2, 0, 3)",
           "c.q[self.b, self.i0:self.i1, self.hs].reshape(self.n, self.G, self.Hkv_, -1).transpose(2, 1, 0, 3)",
           "numpy fast path groups query heads by h % Hkv instead of h // G"),
    Mutant("fast-weights-unnormalised", F, FIN, "c.weights[task.b, task.hs, task.i0:task.i1, start:end] /= denom",
           "pass", "numpy fast path with weights: the terms never divided by the row sums"),
    Mutant("fast-weights-redo-not-copied", F, REDO, "np.copyto(wbuf, s, where=bad)", "pass",
           "rows redone centred after the fact keep their first, out-of-band terms in the weights"),
    Mutant("fast-nan-not-poisoned", F, FIN, "ctx[rows] = np.nan", "pass",
           "a non-finite key or value visible to a query silently zeroed, not propagated"),
    Mutant("fast-head-mask-ignored", F, FIN, "ctx *= c.head_mask[task.b if c.head_mask.shape[0] > 1 else 0][task.hs, None, None]",
           "pass", "head_mask ignored in the numpy fast path"),
    Mutant("fast-split-wrong-heads", F, FIN, "c.head_mask[task.b if c.head_mask.shape[0] > 1 else 0][task.hs, None, None]",
           "c.head_mask[task.b if c.head_mask.shape[0] > 1 else 0][:task.H_, None, None]",
           "a head group split over workers takes the first heads' head_mask"),
    Mutant("aug-offset-not-in-query", F, REDO, "task.q_m[...] = -task.m", "pass",
           "augmented form: a re-centred offset never reaches the query's free column"),
    Mutant("aug-row-sums-ignored", F, FIN, "sums = task.sums()", "sums = np.ones_like(task.m)",
           "the row sums are not used to normalise"),
    Mutant("no-after-the-fact-check", F, OOB, "~(sums <= LIMIT)", "sums != sums",
           "exp without the max pass, and no check that the terms stayed below the band's top"),
    Mutant("first-terms-no-floor", F, OOB, "bad |= low if started is None else low & (started == 0)", "pass",
           "a row's first terms that all underflowed are taken as a row with no key"),
    Mutant("first-block-no-check", F, OOB, "started = task.sums()", "return None",
           "the exp taken at the offset without any check afterwards"),
    Mutant("empty-block-not-skipped", F, OOB, "bad &= ~(zero & ~_sees_any(task, j0, j1))", "pass",
           "a row with no visible key in a block is redone, centred on -inf"),
    Mutant("scratch-context-overwritten", F, BLOCK, "acc if task.acc is None else pv", "pv",
           "the first key block's terms, kept as the running context, in the scratch buffer that the next "
           "block's product overwrites"),
    # the numpy layer: projections, splits
    Mutant("fast-scale-not-folded", J, "Projections.__init__", "c.effective_scale", "1.0",
           "numpy fast path forgets the scale when folding it into W_q"),
    Mutant("fused-qkv-swapped", J, "Projections.heads",
           "q, k, v = y[..., :H * Dq], y[..., H * Dq:(H + Hkv) * Dq], y[..., (H + Hkv) * Dq:]",
           "q, v, k = y[..., :H * Dq], y[..., H * Dq:(H + Hkv) * Dq], y[..., (H + Hkv) * Dq:]",
           "fused QKV output split with K and V swapped"),
    Mutant("groups-rows-per-kv-head", J, "Projections.groups", "np.arange(g0 * G * Dq, g1 * G * Dq)",
           "np.arange(g0 * Dq, g1 * Dq)", "split by head groups: query rows taken per key/value head"),
    Mutant("groups-output-bias-lost", L, "MultiHeadAttention._forward_groups",
           'workers.linear(ctx.reshape(B, T, H * D), self._proj.o_weight_t, self._params["o_bias"], out)',
           'workers.linear(ctx.reshape(B, T, H * D), self._proj.o_weight_t, None, out)',
           "split by head groups: the output projection without its bias"),
    Mutant("linear-tile-bias-unsliced", "mha_cpu/_pool.py", "Workers.linear.part", "o += bias[c0:c0 + cs]",
           "o += bias[:o.shape[1]]", "tiled projection: every column tile adds the first tile's biases"),
    Mutant("map-skips-items", "mha_cpu/_pool.py", "Workers.map.work", "it = next(queue, _DONE)",
           "it = next(queue, _DONE)\nnext(queue, None)", "the pool drops every other task it hands out"),
    Mutant("groups-nonfinite-unchecked", L, TASK, "not np.isfinite(y[:, nq:]).all()", "False",
           "split by head groups: NaN/inf keys and values go straight into the kernel"),
    Mutant("rows-nonfinite-unchecked", L, "MultiHeadAttention._forward_rows",
           "bool(np.isfinite(k).all() and np.isfinite(v).all())", "True",
           "split by query rows: NaN/inf keys and values go straight into the kernel"),
    # the numpy decode step
    Mutant("decode-no-max", S, "_core", "s -= m", "pass",
           "decode step: the softmax without the row maximum subtracted"),
    Mutant("decode-rope-query-at-zero", S, "_core", "layer._rope(q, offset)", "layer._rope(q, 0)",
           "decode step: the new query rotated as if at position 0"),
    Mutant("decode-unnormalised", S, "_core", "ctx /= sums", "pass",
           "decode step: the context never divided by the row sums"),
    Mutant("decode-nonfinite-unchecked", S, "_core", "math.isfinite(np.add.reduce(kv, axis=None))", "True",
           "decode step: a NaN/inf new key or value goes into the cache and the softmax"),
    Mutant("lane-takes-padded-caches", S, "lane", "cache._padded", "False",
           "decode lane: steps over a cache holding padding skip the key mask"),
]
