"""Hypothesis strategies for attention problems.

Hypothesis draws the *structure* (sizes, which masks, their broadcast shapes, small masks element by
element, the input mode) and a *seed*; the tensors are filled from ``numpy.random.default_rng(seed)``.
Drawing big float tensors element-wise with ``hypothesis.extra.numpy.arrays`` gives near-constant
arrays (a median of 0.5% distinct values measured at (4, 16, 16)), which hide axis and polarity bugs;
seeded tensors are in generic position, and shapes still shrink.

Sizes are small (the suite must stay fast) and skewed towards the revealing cases: head_dim >= 2,
heads >= 2, lengths >= 2, T != S, GQA with both num_kv_heads >= 2 and group >= 2, non-zero biases.

Compose them::

    from hypothesis import given
    from mha.testing import strategies as mst

    @given(mst.problems({"mask", "key_mask", "causal", "bias"}))
    def test_mine(problem):
        ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .. import AttentionWeights

MODES = ("normal", "spiky", "ties")
_MOSTLY_TRUE = st.sampled_from([True, True, True, False])  # shrinks towards True: the False that matters stays


@dataclass(frozen=True)
class Config:
    """Sizes of one problem. E = H * D; key/value inputs have widths kdim/vdim."""

    B: int
    T: int
    S: int
    H: int
    Hkv: int
    D: int
    kdim: int
    vdim: int
    bias: bool
    self_attention: bool

    @property
    def E(self) -> int:
        return self.H * self.D


@dataclass
class Problem:
    """One attention problem in this project's semantics (numpy arrays, batch-first).

    ``mask`` is None, bool (True = may attend), int 0/1, or float (additive, -inf hides), broadcastable to
    (B, H, T, S); ``key_mask`` is None or (B, S) bool; ``key``/``value`` are None for self-attention.
    """

    config: Config
    weights: AttentionWeights
    query: np.ndarray
    key: np.ndarray | None
    value: np.ndarray | None
    mask: np.ndarray | None = None
    key_mask: np.ndarray | None = None
    causal: bool = False
    seed: int = 0
    mode: str = "normal"
    extra: dict = field(default_factory=dict)
    rope: object = None  # layer option: an mha.RoPE, or None
    window: int | None = None  # layer option: the sliding window, or None
    conventions: dict = field(default_factory=dict)  # the implementation's declared conventions (defaults if empty)
    dtype: str = "float32"  # of weights and inputs; another one is passed to build(weights, dtype=...)

    def convention(self, key: str) -> str:
        """The declared value of convention ``key`` (mha.testing.conventions), the default if none."""
        from .conventions import DEFAULTS

        return self.conventions.get(key, DEFAULTS[key])

    def layer_options(self) -> dict:
        """The layer options that are set (``rope``, ``window``, a ``dtype`` other than float32): build the
        implementation with them."""
        options = {n: a for n, a in (("rope", self.rope), ("window", self.window)) if a is not None}
        if self.dtype != "float32":
            options["dtype"] = self.dtype
        return options

    def max_angle(self) -> float:
        """The largest RoPE angle of this problem's positions (0 without RoPE)."""
        if self.rope is None:
            return 0.0
        return max(self.config.S - 1, 0) * self.rope.scale

    @property
    def kv(self) -> tuple[np.ndarray, np.ndarray]:
        """(key, value) inputs, the query itself for self-attention."""
        return (self.query if self.key is None else self.key, self.query if self.value is None else self.value)

    def masks(self) -> dict:
        """The mask keyword arguments that are set."""
        out = {}
        if self.mask is not None:
            out["mask"] = self.mask
        if self.key_mask is not None:
            out["key_mask"] = self.key_mask
        if self.causal:
            out["causal"] = True
        return out

    def visible(self) -> np.ndarray:
        """(B, H, T, S) bool: which keys each query may see."""
        from .oracle import visible_keys

        c = self.config
        return visible_keys(c.B, c.H, c.T, c.S, mask=self.mask, key_mask=self.key_mask, causal=self.causal,
                            window=self.window, causal_align=self.convention("causal"))

    def reaches(self) -> np.ndarray:
        """(B, H, T, S) bool: which keys each query's output may depend on under the declared empty-row
        convention: the visible ones, and every key for a query that sees none under "mean_value"."""
        vis = self.visible()
        if self.convention("empty_row") == "mean_value":
            vis = vis | ~vis.any(-1, keepdims=True)
        return vis

    def oracle_options(self) -> dict:
        """Keyword arguments for mha.testing.oracle.attention: the layer options and the conventions."""
        options = {n: a for n, a in self.layer_options().items() if n != "dtype"}
        return {**options, "causal_align": self.convention("causal"), "empty_row": self.convention("empty_row")}

    def _repr_pretty_(self, printer, cycle):  # Hypothesis prints falsifying examples with this
        printer.text(repr(self))

    def __repr__(self) -> str:
        c = self.config
        parts = [f"B={c.B}, T={c.T}, S={c.S}, H={c.H}, num_kv_heads={c.Hkv}, D={c.D}"]
        if not c.self_attention:
            parts.append(f"kdim={c.kdim}, vdim={c.vdim}")
        parts.append(f"bias={c.bias}, mode={self.mode!r}, seed={self.seed}")
        if self.mask is not None:
            small = f"={self.mask.tolist()}" if self.mask.size <= 24 else ""
            parts.append(f"mask={self.mask.dtype}{tuple(self.mask.shape)}{small}")
        if self.key_mask is not None:
            parts.append(f"key_mask={self.key_mask.astype(int).tolist()}")
        if self.causal:
            parts.append("causal=True")
        if self.rope is not None:
            r = self.rope
            parts.append(f"rope=RoPE(fraction={r.fraction}, base={r.base}, traditional={r.traditional}, scale={r.scale})")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.dtype != "float32" or np.abs(self.query).max(initial=0) > 1e6:
            parts.append(f"dtype={self.dtype}, max|x|={float(np.abs(self.query).max(initial=0)):.3g}")
        return "Problem(" + ", ".join(parts) + ")"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def configs(draw, features=frozenset(), *, self_attention=None, min_heads=1, min_len=1, max_batch=3,
            max_len=7, min_head_dim=1, gqa=None, num_heads=None, head_dims=(3, 2, 5, 4, 1)) -> Config:
    """Sizes for a problem an implementation with ``features`` can express.

    ``self_attention`` forces (True) or forbids (False) self-attention; ``gqa=True`` forces
    num_kv_heads < num_heads (needs the "gqa" feature).
    """
    H = num_heads or draw(st.sampled_from([h for h in (2, 3, 4, 1, 6) if h >= min_heads]))
    Hkv = H
    if "gqa" in features and H > 1 and gqa is not False:
        choices = [d for d in _divisors(H) if d < H] if gqa else _divisors(H)[::-1]
        Hkv = draw(st.sampled_from(choices))
    D = draw(st.sampled_from([d for d in head_dims if d >= min_head_dim]))
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(min_len, max_len))
    if self_attention is None:
        self_attention = "cross" not in features or draw(st.booleans())
    if not self_attention and "cross" not in features:
        raise ValueError("a cross-attention problem needs the 'cross' feature")
    S = T if self_attention else draw(st.integers(min_len, max_len))
    E = H * D
    kdim = vdim = E
    if not self_attention and "kdim" in features and draw(st.booleans()):
        kdim, vdim = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    bias = "bias" in features and draw(st.sampled_from([True, True, False]))  # mostly non-zero biases
    return Config(B, T, S, H, Hkv, D, kdim, vdim, bool(bias), bool(self_attention))


def random_weights(cfg: Config, rng: np.random.Generator, dtype=np.float32) -> AttentionWeights:
    """W ~ N(0, 1/in) for every projection, biases ~ N(0, 0.5^2) when ``cfg.bias``."""
    def w(o, i):
        return (rng.normal(size=(o, i)) / np.sqrt(i)).astype(dtype)

    def b(n):
        return (0.5 * rng.normal(size=n)).astype(dtype) if cfg.bias else None

    HD, KD = cfg.H * cfg.D, cfg.Hkv * cfg.D
    return AttentionWeights(w(HD, cfg.E), w(KD, cfg.kdim), w(KD, cfg.vdim), w(cfg.E, HD), b(HD), b(KD), b(KD),
                            b(cfg.E), num_heads=cfg.H, num_kv_heads=cfg.Hkv)


def random_inputs(cfg: Config, rng: np.random.Generator, mode: str = "normal", dtype=np.float32):
    """(query, key, value); key and value are None for self-attention.

    Modes: "normal" x ~ N(0, 1); "spiky" x ~ N(0, sigma^2) with sigma in [3, 10] (large logits);
    "ties" duplicated tokens (equal rows), a case where sorting or argmax bugs show.
    """
    sigma = rng.uniform(3.0, 10.0) if mode == "spiky" else 1.0

    def x(L, width):
        a = sigma * rng.normal(size=(cfg.B, L, width))
        if mode == "ties" and L >= 2:
            src = rng.integers(0, L, size=L)
            a = a[:, src]
        return a.astype(dtype)

    q = x(cfg.T, cfg.E)
    if cfg.self_attention:
        return q, None, None
    return q, x(cfg.S, cfg.kdim), x(cfg.S, cfg.vdim)


@st.composite
def bool_masks(draw, cfg: Config, *, empty_rows=True) -> np.ndarray:
    """A keep mask (True = may attend) of a shape that broadcasts to (B, H, T, S); sometimes with a
    query row that sees nothing. Small masks are drawn element by element (they shrink to the one
    entry that matters), larger ones from a seed and a density."""
    target = (cfg.B, cfg.H, cfg.T, cfg.S)
    shape = draw(hnp.broadcastable_shapes(target, min_dims=1, max_dims=4))
    # broadcastable_shapes means mutually broadcastable; a mask must broadcast *to* the target
    shape = tuple(1 if t == 1 else n for n, t in zip(shape, target[len(target) - len(shape):]))
    if len(shape) == 3 and shape[0] != 1:  # a 3-D mask is ambiguous ((B, T, S) or (H, T, S)): 4-D instead
        shape = (1,) + shape
    size = int(np.prod(shape))
    if size <= 64:
        m = draw(hnp.arrays(np.bool_, shape, elements=_MOSTLY_TRUE,
                            fill=st.nothing()))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        m = rng.random(shape) < draw(st.sampled_from([0.8, 0.5, 0.95]))
    m = np.array(m, dtype=bool)
    if empty_rows and m.ndim >= 2 and draw(st.booleans()):
        row = draw(st.integers(0, m.shape[-2] - 1))
        m[..., row, :] = False
    return m


# What people pass for "masked" in an additive mask: -inf, and the finite stand-ins that ties and casts
# make treacherous: Hugging Face's finfo(float32).min, -1e9 (-inf once cast to float16), float16's own
# min and -1e4. Finite ones do not hide a key (only -inf does): they make its weight underflow to 0,
# unless every key a query sees carries one.
LARGE_NEGATIVES = (float("-inf"), float(np.finfo(np.float32).min), -1e9, float(np.finfo(np.float16).min), -1e4)


@st.composite
def additive_masks(draw, cfg: Config) -> np.ndarray:
    """A float mask added to the logits, broadcastable to (B, H, T, S): N(0, sigma^2) entries where a
    drawn keep mask says True, and where it says False one of :data:`LARGE_NEGATIVES` (-inf, or a large
    finite negative that leaves the key visible but weightless), or a mix of them entry by entry; half
    of the time a padding mask as Hugging Face builds one (:func:`padding_biases`)."""
    if draw(st.booleans()):
        return draw(padding_biases(cfg))
    keep = draw(bool_masks(cfg))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sigma = draw(st.sampled_from([1.0, 3.0, 0.0]))
    a = (sigma * rng.normal(size=keep.shape)).astype(np.float32)
    fill = draw(st.sampled_from(list(LARGE_NEGATIVES) + ["mixed"]))
    if fill == "mixed":
        fill = rng.choice(np.array(LARGE_NEGATIVES, np.float32), size=keep.shape)
    return np.where(keep, a, fill).astype(np.float32)


@st.composite
def padding_biases(draw, cfg: Config) -> np.ndarray:
    """(B, 1, 1, S): 0 at real keys, one of :data:`LARGE_NEGATIVES` at padding, which lies in a run at
    the start (left padding, as for generation) or the end of each batch element, of any length up to
    all of it: the shape and values of Hugging Face's extended attention mask. A blockwise kernel then
    meets whole blocks of keys that all carry the fill before any real key."""
    fill = draw(st.sampled_from(LARGE_NEGATIVES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))  # lengths spread evenly, not shrunk to 0
    return padding_bias(rng, cfg.B, cfg.S, fill)


def padding_bias(rng: np.random.Generator, B: int, S: int, fill: float, left: float = 0.7) -> np.ndarray:
    """(B, 1, 1, S) float32: ``fill`` on a run of 0 to S keys of each batch element, at the start (left
    padding, with probability ``left``) or the end, 0 elsewhere; lengths and sides from ``rng``."""
    m = np.zeros((B, 1, 1, S), np.float32)
    for b in range(B):
        n = int(rng.integers(0, S + 1))
        (m[b, ..., :n] if rng.random() < left else m[b, ..., S - n:])[...] = fill
    return m


@st.composite
def decoder_paddings(draw, cfg: Config) -> np.ndarray:
    """The additive mask of the most common decoder batch: Hugging Face's left padding, (B, 1, 1, S), 0 at
    real keys and (half of the time) finfo(float32).min at the padding, sent with causal=True. A padding
    query then sees only padding keys, every one carrying the fill, while the causal rule hides the
    real keys after it: an implementation that hides keys with that same finfo.min (as fused kernels
    do) ties them with the visible ones and leaks the future into that row."""
    fmin = float(np.finfo(np.float32).min)
    fill = draw(st.sampled_from((fmin,) * 4 + LARGE_NEGATIVES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = padding_bias(rng, cfg.B, cfg.S, fill, left=1.0)
    if cfg.S >= 2:  # the first sequence padded but not wholly: padding queries before real keys
        m[0] = 0.0
        m[0, ..., : int(rng.integers(1, cfg.S))] = fill
    return m


@st.composite
def key_masks(draw, cfg: Config) -> np.ndarray:
    """(B, S) bool, True = real key; sometimes a batch element that is all padding."""
    if cfg.B * cfg.S <= 64:
        km = draw(hnp.arrays(np.bool_, (cfg.B, cfg.S), elements=_MOSTLY_TRUE, fill=st.nothing()))
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        km = rng.random((cfg.B, cfg.S)) < 0.8
    return np.array(km, dtype=bool)


@st.composite
def ropes(draw, head_dim: int):
    """RoPE settings for heads of width ``head_dim`` (>= 2): both layouts, partial rotation, bases from
    RoFormer's 10000 down to 2.5 (fast-turning angles), position scales 1, 0.5 and 3."""
    from .. import RoPE

    fractions = [f for f in (1.0, 0.5) if int(head_dim * f) // 2 * 2 >= 2]  # whole heads first: the layouts differ
    return RoPE(fraction=draw(st.sampled_from(fractions)), base=draw(st.sampled_from([10000.0, 100.0, 2.5])),
                traditional=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 0.5, 3.0])))


@st.composite
def problems(draw, features=frozenset(), *, masks=True, self_attention=None, min_heads=1, min_len=1,
             min_head_dim=1, max_len=7, max_batch=3, gqa=None, causal=None, modes=MODES,
             num_heads=None, positional=False, rope=None, window=None) -> Problem:
    """A whole problem (sizes, weights, inputs, masks) an implementation with ``features`` can run.

    ``masks=False`` draws no masks; ``causal`` forces (True) or forbids (False) the causal rule.
    ``positional=True`` also draws the layer options ``rope`` and ``window`` (when the features have
    them); ``rope=True``/``window=True`` force them.
    """
    features = frozenset(features)
    cfg = draw(configs(features, self_attention=self_attention, min_heads=min_heads, min_len=min_len,
                       max_len=max_len, max_batch=max_batch, min_head_dim=min_head_dim, gqa=gqa,
                       num_heads=num_heads,
                       # RoPE's two layouts differ only from 4 rotated dims on: put such heads first
                       head_dims=(4, 5, 3, 2, 1) if positional or rope else (3, 2, 5, 4, 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    mode = draw(st.sampled_from(list(modes)))
    rng = np.random.default_rng(seed)
    weights = random_weights(cfg, rng)
    q, k, v = random_inputs(cfg, rng, mode)
    p = Problem(cfg, weights, q, k, v, seed=seed, mode=mode)
    kind = "none"
    if masks:
        kinds = ["none"] + [f for f in ("mask", "additive_mask") if f in features]
        kinds += ["decoder"] if "additive_mask" in features else []  # left padding, mostly with causal=True
        kind = draw(st.sampled_from(kinds))
        if kind == "mask":
            m = draw(bool_masks(cfg))
            p.mask = m.astype(np.int64) if draw(st.integers(0, 4)) == 0 else m
        elif kind == "additive_mask":
            p.mask = draw(additive_masks(cfg))
        elif kind == "decoder":
            p.mask = draw(decoder_paddings(cfg))
        if "key_mask" in features and draw(st.booleans()):
            p.key_mask = draw(key_masks(cfg))
    if causal is not None:
        p.causal = causal
    elif masks and "causal" in features:
        p.causal = draw(st.sampled_from([True, True, True, False]) if kind == "decoder" else st.booleans())
    if cfg.D >= 2 and (rope or (positional and "rope" in features and draw(st.booleans()))):
        p.rope = draw(ropes(cfg.D))
    if window or (positional and "window" in features and draw(st.booleans())):
        # small windows often (a rotating cache then compacts), any width up to past the sequence
        p.window = draw(st.one_of(st.integers(1, 3), st.integers(1, max(cfg.T, cfg.S) + 1)))
    return p


def input_limit(weights: AttentionWeights, query, key=None, value=None, dtype="float32") -> float:
    """The largest factor by which ``query``, ``key`` and ``value`` may be multiplied with every
    projection (|x| |W|^T + |b|) and the output's bound (|b_O| + ||W_O||_inf max |v|) below an eighth of
    ``dtype``'s largest number: inputs that large are ones the dtype can hold and a layer must answer
    finitely (their logits, and the scale's, may pass the dtype's range: that is the implementation's
    to handle)."""
    w = {n: None if a is None else np.abs(np.asarray(a, np.float64)) for n, a in weights.to_dict().items()}
    key = query if key is None else key
    value = key if value is None else value

    def reach(x, name):  # largest projected entry per unit of input scale
        return float((np.abs(np.asarray(x, np.float64)).reshape(-1, np.shape(x)[-1]) @ w[f"{name}_weight"].T).max())

    vmax = reach(value, "v")
    growth = max(reach(query, "q"), reach(key, "k"), vmax, vmax * float(w["o_weight"].sum(axis=1).max()), 1e-300)
    return float(np.finfo(dtype).max) / 8 / growth


def magnified(problem: Problem, factor: float, dtype="float32") -> Problem:
    """``problem`` with its inputs multiplied by ``factor`` (and weights and inputs in ``dtype``)."""
    def big(x):
        return None if x is None else (np.asarray(x, np.float64) * factor).astype(dtype)

    weights = problem.weights if np.dtype(dtype) == problem.weights.dtype else problem.weights.astype(dtype)
    return replace(problem, weights=weights, query=big(problem.query), key=big(problem.key), value=big(problem.value),
                   dtype=np.dtype(dtype).name)


@st.composite
def extreme_problems(draw, features=frozenset(), *, dtype="float32", **kwargs) -> Problem:
    """Problems (bool masks, key_mask and causal only: no additive terms to mix with the logits) whose
    inputs are multiplied by 10^e, e up to the top t = log10 of :func:`input_limit` of ``dtype`` (float32
    about 10^37, float64 about 10^307): logits then pass what the dtype holds, as the scale can. The gap
    t - e is log-uniform in [0.01, t - 2] decades: most draws lie within a decade or two of the limit,
    where overflow starts, the rest all the way down to 10^2."""
    p = draw(problems(frozenset(features) - {"additive_mask"}, modes=("normal",), **kwargs))
    top = float(np.log10(input_limit(p.weights, p.query, p.key, p.value, dtype)))
    gap = 10.0 ** draw(st.floats(-2.0, float(np.log10(max(top - 2.0, 0.02)))))
    return magnified(p, 10.0 ** (top - min(gap, max(top - 2.0, 0.0))), dtype)


def with_weights(problem: Problem, weights: AttentionWeights) -> Problem:
    """The same problem with other weights (sizes must fit)."""
    return replace(problem, weights=weights)
